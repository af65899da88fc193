"""Quantized experts against fp32: the compiled MoE kernel per layer, and the engine's decode end to end.

Contract: two tables, printed and written to bench/results/quant_decode.json with the machine's details.
- layer: one MoE block (8 experts, top-2; gate, experts, combine) through the compiled kernel, median us per call
  for fp32, int8 and int4 experts at T tokens, on the tiny bench shape (D 64, I 128: weights stay in cache) and a
  mid shape (D 1024, I 2816, Mixtral-8x7B's I / 5: 277 MB of fp32 experts, read from memory every call);
- engine: `LLMEngine` serving bench/engine.py's workload (16 requests, prompt 128, 128 new tokens, greedy) on the
  tiny bench model and on a 2-layer mid model of the same shape (made once into bench/.models/mid-mixtral), one
  engine per mode in this process, `--rounds` rounds going over the modes in turn (this shared 2-core machine
  drifts; interleaving hits every mode alike); the median round's decode tok/s (generated tokens / wall) is shown.
The issue's requirement: quantized decode not slower than fp32 on this CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from engine import BENCH_DIR, Workload, ensure_model, machine_info, make_prompts
from quant import time_calls
from moe_serve.kernels import cpu_ops
from moe_serve.model.kernel_moe import KernelExperts
from moe_serve.model.moe import ExpertStack

RESULTS_FILE = BENCH_DIR / "results" / "quant_decode.json"
MID_MODEL_DIR = BENCH_DIR / ".models" / "mid-mixtral"
MODES = ("none", "int8", "int4")
LAYER_SHAPES = {"tiny": (64, 128), "mid": (1024, 2816)}  # (D, I)
LAYER_TOKENS = (1, 4, 16, 64, 512)
EXPERTS, TOP_K = 8, 2


def moe_layer(ops: ModuleType, d: int, i: int, mode: str) -> KernelExperts:
    g = torch.Generator().manual_seed(0)
    w13 = torch.randn(EXPERTS, 2 * i, d, generator=g) * d**-0.5
    w2 = torch.randn(EXPERTS, d, i, generator=g) * i**-0.5
    stack = ExpertStack(range(EXPERTS), w13, w2, mode)
    return KernelExperts(ops, stack.w13, stack.w2, torch.randn(EXPERTS, d, generator=g), TOP_K, True)


def bench_layers(ops: ModuleType) -> list[dict[str, Any]]:
    rows = []
    print(f"{'shape':<6}{'T':>5}" + "".join(f"{m + ' us':>12}" for m in MODES) + f"{'int8 x':>9}{'int4 x':>9}")
    for shape, (d, i) in LAYER_SHAPES.items():
        layers = {mode: moe_layer(ops, d, i, mode) for mode in MODES}
        for tokens in LAYER_TOKENS:
            x = torch.randn(tokens, d)
            us = time_calls({mode: (lambda layer=layer: layer.routed(x)) for mode, layer in layers.items()}, rounds=15)
            rows.append({"shape": shape, "d": d, "i": i, "tokens": tokens, "us": us})
            print(f"{shape:<6}{tokens:>5}" + "".join(f"{us[m]:>12.1f}" for m in MODES)
                  + "".join(f"{us['none'] / us[m]:>8.2f}x" for m in ("int8", "int4")), flush=True)
        del layers
    return rows


def ensure_mid_model() -> Path:
    if not (MID_MODEL_DIR / "config.json").is_file():
        from moe_serve.model.tiny import make_tiny_model

        make_tiny_model(MID_MODEL_DIR, family="mixtral", hidden=1024, intermediate=2816, heads=8, kv_heads=2)
    return MID_MODEL_DIR


def bench_engines(model_dir: Path, rounds: int, w: Workload) -> dict[str, Any]:
    from moe_serve.replicas.engine import EngineConfig, LLMEngine
    from moe_serve.replicas.sampling import SamplingParams

    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    prompts = make_prompts(vocab, w)
    engines = {mode: LLMEngine.from_pretrained(model_dir, EngineConfig(max_num_seqs=w.num_requests, quantize=mode))
               for mode in MODES}
    params = SamplingParams(max_tokens=w.new_tokens, min_tokens=w.new_tokens, temperature=0.0, ignore_eos=True)
    warmup = SamplingParams(max_tokens=w.warmup_tokens, temperature=0.0, ignore_eos=True)
    walls: dict[str, list[float]] = {mode: [] for mode in MODES}
    tokens: dict[str, list[list[int]]] = {}
    for engine in engines.values():
        engine.generate(prompts, warmup)
    for _ in range(rounds):
        for mode, engine in engines.items():
            start = time.perf_counter()
            outputs = engine.generate(prompts, params)
            walls[mode].append(time.perf_counter() - start)
            tokens[mode] = [o.token_ids for o in outputs]
    generated = w.num_requests * w.new_tokens
    result = {mode: {"decode_tok_s": round(generated / statistics.median(walls[mode]), 1),
                     "wall_s_all": [round(s, 3) for s in walls[mode]]} for mode in MODES}
    for mode in ("int8", "int4"):  # greedy agreement with fp32 (quantization changes some tokens; shown, not judged)
        pairs = list(zip(tokens[mode], tokens["none"]))
        result[mode]["greedy_equal_to_fp32"] = f"{sum(a == b for a, b in pairs)}/{w.num_requests}"
        result[mode]["mean_common_prefix"] = statistics.fmean(_common_prefix(a, b) for a, b in pairs)
        result[mode]["vs_fp32"] = round(result[mode]["decode_tok_s"] / result["none"]["decode_tok_s"], 2)
    return result


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((n for n, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=5, help="engine rounds per mode (interleaved)")
    p.add_argument("--skip-mid-engine", action="store_true", help="the mid model's engine runs take a few minutes")
    p.add_argument("--out", type=Path, default=RESULTS_FILE)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    ops = cpu_ops()
    if ops is None:
        print("the compiled kernels are off or unbuilt (MOE_SERVE_KERNELS, make install): nothing to compare")
        return 1
    info = machine_info()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {info['cpu_model']}, load "
          f"{info['load_avg_1_5_15min']}")
    layers = bench_layers(ops)
    w = Workload()
    engines = {"tiny": bench_engines(ensure_model(None), args.rounds, w)}
    if not args.skip_mid_engine:
        engines["mid"] = bench_engines(ensure_mid_model(), max(1, args.rounds // 2), w)
    print(f"\nengine, {w.num_requests} requests x ({w.prompt_len} prompt + {w.new_tokens} new), decode tok/s (median)")
    print(f"{'model':<6}" + "".join(f"{m:>10}" for m in MODES) + f"{'int8 x':>9}{'int4 x':>9}  greedy = fp32: int8, int4 (mean common prefix)")
    for model, r in engines.items():
        print(f"{model:<6}" + "".join(f"{r[m]['decode_tok_s']:>10.1f}" for m in MODES)
              + "".join(f"{r[m]['vs_fp32']:>8.2f}x" for m in ("int8", "int4"))
              + "".join(f"  {r[m]['greedy_equal_to_fp32']} (prefix {r[m]['mean_common_prefix']:.0f})"
                        for m in ("int8", "int4")))
    info["load_avg_after"] = list(os.getloadavg())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": info, "layer_us": layers, "engine": engines,
                                    "workload": asdict(w)}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
