"""Times fp32 `F.linear` against the int8 and int4 packed matmuls of `moe_serve.model.quant`.

Owns: the timing harness and bench/results/quant.json. Does not own: the kernels or the choice between
them (quant.py reads its thresholds from the numbers this prints).

Shapes are one expert's FFN: gate_up `[2I, D]` on x `[T, D]` and down `[D, I]` on x `[T, I]`, for
(D, I) in (64, 128), (256, 512), (1024, 2816) and (4096, 14336) cut to an I = 1024 slice. Every
method runs once per round, rounds interleaved, so that load from other processes hits all methods
alike; the figure is the median over rounds of the per-call time, in microseconds, at the default
thread count. Besides the three modes it times the two int8 candidates that quant.py switches
between (`int8pack_mm`, and the bf16 GEMM on a transient bf16 copy of q) and reports errors.
"""

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from moe_serve.model.quant import Int8Weight, PackedWeight, pack_weight

EXPERT_SHAPES = ((64, 128), (256, 512), (1024, 2816), (4096, 1024))  # (D, I); last: 14336 sliced
TOKENS = (1, 8, 32, 256)
ROUNDS = 25
MIN_SAMPLE_S = 2e-3  # repeat a call within one sample until the sample takes this long
RESULTS = Path(__file__).parent / "results" / "quant.json"
METHODS = ("fp32", "int8", "int4", "int8pack", "int8gemm")


@dataclass(frozen=True)
class Row:
    d: int
    i: int
    matrix: str  # "gate_up" [2I, D] or "down" [D, I]
    out_features: int
    in_features: int
    tokens: int
    us: dict[str, float]  # median microseconds per call, by method
    rel_err: dict[str, float]  # ||y - y_ref|| / ||y_ref||, Frobenius


def time_calls(fns: dict[str, Callable[[], object]], rounds: int = ROUNDS) -> dict[str, float]:
    """Median microseconds per call of each function, over interleaved rounds."""
    reps = {name: _reps_per_sample(fn) for name, fn in fns.items()}
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(reps[name]):
                fn()
            samples[name].append((time.perf_counter() - start) / reps[name])
    return {name: round(statistics.median(s) * 1e6, 1) for name, s in samples.items()}


def _reps_per_sample(fn: Callable[[], object]) -> int:
    fn()  # warm-up: first-call allocation and kernel dispatch
    start = time.perf_counter()
    fn()
    return max(1, min(1000, int(MIN_SAMPLE_S / max(time.perf_counter() - start, 1e-7))))


def bench_matrix(d: int, i: int, matrix: str, w: Tensor) -> list[Row]:
    int8, int4 = pack_weight(w, "int8"), pack_weight(w, "int4")
    assert isinstance(int8, Int8Weight)
    q = int8.qweight
    rows = []
    for tokens in TOKENS:
        x = torch.randn(tokens, w.shape[1])
        fns = {
            "fp32": lambda: F.linear(x, w),
            "int8": lambda: int8.matmul(x),
            "int4": lambda: int4.matmul(x),
            "int8pack": lambda: torch.ops.aten._weight_int8pack_mm(x.bfloat16(), q, int8.scales).float(),
            "int8gemm": lambda: F.linear(x.bfloat16(), q.bfloat16()).float().mul_(int8.scales),
        }
        rows.append(Row(d, i, matrix, *w.shape, tokens, time_calls(fns), errors(x, w, int8, int4)))
        print(format_row(rows[-1]), flush=True)
    return rows


def errors(x: Tensor, w: Tensor, int8: PackedWeight, int4: PackedWeight) -> dict[str, float]:
    """Quantization error against fp32 weights, and kernel error against the dequantized weights."""
    ref = F.linear(x, w)
    out = {}
    for name, packed in (("int8", int8), ("int4", int4)):
        y = packed.matmul(x)
        out[f"{name}_vs_fp32"] = _rel(y, ref)
        out[f"{name}_vs_dequant"] = _rel(y, F.linear(x, packed.dequantize()))
    return out


def _rel(y: Tensor, ref: Tensor) -> float:
    return round(((y - ref).norm() / ref.norm()).item(), 5)


def fixed_overhead_us() -> dict[str, float]:
    """Per-call costs that dominate the D = 64 shapes at T = 1: the dtype casts and the bare kernels."""
    w = torch.randn(256, 64)
    int8, int4 = pack_weight(w, "int8"), pack_weight(w, "int4")
    assert isinstance(int8, Int8Weight)
    x, xb, yb = torch.randn(1, 64), torch.randn(1, 64).bfloat16(), torch.randn(1, 256).bfloat16()
    return time_calls({
        "fp32_linear": lambda: F.linear(x, w),
        "cast_to_bf16": lambda: x.bfloat16(),
        "cast_to_fp32": lambda: yb.float(),
        "int8pack_mm_bf16_in_out": lambda: torch.ops.aten._weight_int8pack_mm(xb, int8.qweight, int8.scales),
        "int8_matmul": lambda: int8.matmul(x),
        "int4_matmul": lambda: int4.matmul(x),
    })


def format_row(r: Row) -> str:
    times = " ".join(f"{r.us[m]:>9.1f}" for m in METHODS)
    speedups = " ".join(f"{r.us['fp32'] / r.us[m]:>5.2f}x" for m in ("int8", "int4"))
    errs = f"{r.rel_err['int8_vs_fp32']:>7.2%} {r.rel_err['int4_vs_fp32']:>7.2%}"
    shape = f"{r.out_features:>5}x{r.in_features:<5}"
    return f"{r.d:>5} {r.i:>5} {r.matrix:>8} {shape} {r.tokens:>4} {times} {speedups} {errs}"


def header() -> str:
    methods = " ".join(f"{m:>9}" for m in METHODS)
    return (f"{'D':>5} {'I':>5} {'matrix':>8} {'[out x in]':<11} {'T':>4} {methods}"
            f" {'int8 x':>6} {'int4 x':>6} {'err8':>7} {'err4':>7}")


def main() -> None:
    torch.manual_seed(0)
    load_before = os.getloadavg()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{torch.backends.cpu.get_cpu_capability()}, load {load_before}; times in us (median)")
    print(header())
    rows = []
    for d, i in EXPERT_SHAPES:
        rows += bench_matrix(d, i, "gate_up", torch.randn(2 * i, d) * 0.02)
        rows += bench_matrix(d, i, "down", torch.randn(d, i) * 0.02)
    overhead = fixed_overhead_us()
    print("fixed per-call costs at [256 x 64], T = 1 (us):", overhead)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "machine": platform.machine(),
        "load_avg_before": load_before,  # other processes on the machine skew every column
        "load_avg_after": os.getloadavg(),
        "rows": [asdict(r) for r in rows],
        "fixed_overhead_us": overhead,
    }, indent=1))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
