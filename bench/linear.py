"""Dense projections: the compiled row kernel (moe_serve/model/linear.py) vs torch's F.linear, per dtype and batch.

Contract: for each weight shape of the mid-size Mixtral (qkv with folded RoPE rows, o_proj, LM head) and each
dtype and batch size T, times both on the same weight tensor (bench/quant.py's `time_calls`: median over `--rounds`
interleaved rounds, torch threads = every core this process may use), prints a table and writes
`bench/results/linear.json`. It is what
`linear.KERNEL_MAX_TOKENS` is chosen from.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from quant import time_calls

from moe_serve.kernels import cpu_flags, cpu_ops

RESULTS = Path(__file__).resolve().parent / "results" / "linear.json"
SHAPES = {"qkv": (2816, 1024), "o_proj": (1024, 1024), "lm_head": (32000, 1024)}  # [N, K]
TOKENS = (1, 4, 16, 32, 64, 128, 512)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    ops = cpu_ops()
    assert ops is not None, "the compiled kernels did not build"
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    rows = []
    print(f"{'weight':<9}{'dtype':<10}{'T':>5}{'torch ms':>10}{'kernel ms':>11}{'kernel x':>10}")
    for name, (n, k) in SHAPES.items():
        for dtype in (torch.float32, torch.bfloat16):
            w = (torch.randn(n, k) * 0.02).to(dtype)
            for t in TOKENS:
                x = torch.randn(t, k)
                xd = x.to(dtype)
                us = time_calls({"torch": lambda: F.linear(xd, w), "kernel": lambda: ops.linear(x, w)}, args.rounds)
                torch_ms, kernel_ms = us["torch"] / 1e3, us["kernel"] / 1e3
                rows.append({"weight": name, "shape": [n, k], "dtype": str(dtype).removeprefix("torch."), "tokens": t,
                             "torch_ms": torch_ms, "kernel_ms": kernel_ms})
                print(f"{name:<9}{rows[-1]['dtype']:<10}{t:>5}{torch_ms:>10.2f}{kernel_ms:>11.2f}"
                      f"{torch_ms / kernel_ms:>9.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    machine = {"cpu_flags": sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "fma"))),
               "threads": torch.get_num_threads()}
    args.out.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
