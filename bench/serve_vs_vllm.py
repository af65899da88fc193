"""Serving side by side with vLLM's own client: `moe-serve up` vs `vllm serve` on the same checkpoint.

Contract: for each system in `--systems` (one after the other, never both at once), start its OpenAI-compatible
server on 127.0.0.1 and a free port, wait (bounded) for /v1/models to list the model, run vLLM's serving benchmark
(`vllm.benchmarks.serve`, driven through its `add_cli_args` and `main` by bench/_vllm_serve_bench.py in
bench/.venv-vllm) on /v1/completions, then stop the server (SIGINT / SIGTERM, SIGKILL to what is left after a
timeout), whatever happened. Workload: the benchmark's `random` dataset, `--input-len` 128 -> `--output-len` 128
tokens (EOS ignored, greedy), `--num-prompts` requests at `--concurrency` 16, after `--warmups` warm-up requests.
Systems: `ours` = `moe-serve up` (one engine replica, local Ray, its default Redis warm tier; `--threads` torch
threads, default 1 below hidden 1024 else every core); `ours-colocated` = the same with `--colocate` (the ingress
replica holds the engine); `vllm-cpu` = vLLM's OpenAI api_server (the module `vllm
serve` runs) with OpenMP threads bound one per core, none reserved (its best setting on this machine kind).
Both serve the same directory in the same `--dtype` (default: the checkpoint's own) under the same name. `engine` =
the same workload on our engine alone (bench/_engine_serve_bench.py: `AsyncLLMEngine` in one process, same threads,
no HTTP, no Serve): beside `ours` it splits our cost into the engine's and the serving path's.
Models: the tiny bench Mixtral by default (bench/engine.py's: head_dim 32, the smallest vLLM's CPU attention takes),
`--model DIR`, or `--suite mid` (bench/mid_models.py's mixtral-mid, bf16). A checkpoint without tokenizer.json is
served from a sibling directory linking its files plus a byte-level BPE tokenizer of its vocab size: the client
and both servers turn the random prompts into text and back.
Metrics are the benchmark's own; its ITL is the gap between streamed events (vLLM sends one token per event, ours
the tokens of each `stream_interval_ms`).
Targets, for ours at its best setting (the one of `ours` and `ours-colocated` with more output tok/s):
ours / vllm-cpu output tok/s >= 1.2x; ours' TTFT mean and ITL p99 no worse than vLLM's. It prints them
with ok / MISS and writes `--out` (default bench/results/serve_vs_vllm.json, serve_vs_vllm_mid.json with --suite
mid): metadata, `systems.<name>` (status, reason, the benchmark's numbers) and the targets. A system that fails is
recorded with its reason, and the other still runs.
"""

from __future__ import annotations

import argparse
import functools
import datetime as dt
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine import (VLLM_ENV, VLLM_ENV_SCRIPT, VLLM_VENV, clean_env, ensure_model, ensure_venv, last_error_line,
                    machine_info, read_model_config, run_worker, vllm_binding_env, write_json)

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_FILE = BENCH_DIR / "results" / "serve_vs_vllm.json"
MID_RESULTS_FILE = BENCH_DIR / "results" / "serve_vs_vllm_mid.json"
BENCH_WORKER = BENCH_DIR / "_vllm_serve_bench.py"
ENGINE_WORKER = BENCH_DIR / "_engine_serve_bench.py"
SYSTEMS = ("ours", "ours-colocated", "engine", "vllm-cpu")
DTYPES = ("float32", "bfloat16")
# (benchmark metric, label, bound on ours / vllm-cpu, True when higher is better)
TARGETS = (("output_throughput", "output tok/s", 1.2, True), ("mean_ttft_ms", "TTFT mean ms", 1.0, False),
           ("p99_itl_ms", "ITL p99 ms", 1.0, False))
STOP_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Model:
    dir: Path  # what both servers load and the client's tokenizer: the checkpoint, or its linked copy
    checkpoint: Path
    name: str  # served name in /v1/models
    dtype: str
    config: dict[str, Any]


@dataclass(frozen=True)
class Server:
    command: list[str]
    env: dict[str, str]
    stop_signal: int


# --- model -------------------------------------------------------------------------------------------------


def resolve_model(args: argparse.Namespace) -> Model:
    if args.suite == "mid":
        from mid_models import ensure_mid_model

        checkpoint = ensure_mid_model("mixtral-mid")
    else:
        checkpoint = ensure_model(args.model).resolve()
    raw = json.loads((checkpoint / "config.json").read_text())
    dtype = args.dtype or raw.get("torch_dtype") or raw.get("dtype") or "float32"
    return Model(with_tokenizer(checkpoint), checkpoint, checkpoint.name, dtype, read_model_config(checkpoint))


def with_tokenizer(checkpoint: Path) -> Path:
    """The checkpoint when it has tokenizer.json, else `<name>-tokenizer` beside it: links to its files plus a
    byte-level BPE tokenizer with exactly its vocab size (moe_serve.model.tiny.train_tokenizer), made once."""
    if (checkpoint / "tokenizer.json").is_file():
        return checkpoint
    out = checkpoint.with_name(f"{checkpoint.name}-tokenizer")
    if (out / "tokenizer.json").is_file():
        return out
    from moe_serve.model.tiny import BOS, EOS, UNK, train_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    for src in checkpoint.iterdir():
        if not (out / src.name).exists():
            (out / src.name).symlink_to(src.resolve())
    vocab = json.loads((checkpoint / "config.json").read_text())["vocab_size"]
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
                        "unk_token": UNK, "pad_token": EOS, "clean_up_tokenization_spaces": False}
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    train_tokenizer(vocab).save(str(out / "tokenizer.json.tmp"))
    (out / "tokenizer.json.tmp").replace(out / "tokenizer.json")  # last: it marks the directory complete
    return out


# --- servers -----------------------------------------------------------------------------------------------


def ours_server(model: Model, port: int, args: argparse.Namespace, work_dir: Path, colocate: bool = False) -> Server:
    """`moe-serve up` with one fixed engine replica (`colocate`: held by the ingress replica, `--colocate`); its
    state file and Redis directory in `work_dir`, so a `moe-serve up` someone else runs keeps its own."""
    command = [sys.executable, "-m", "moe_serve.cli", "up", str(model.dir), "--host", "127.0.0.1", "--port",
               str(port), "--model-name", model.name, "--dtype", model.dtype,
               "--threads", str(our_threads(model, args)),
               "--min-replicas", "1", "--max-replicas", "1", *(["--colocate"] if colocate else [])]
    return Server(command, os.environ | {"MOE_SERVE_CACHE": str(work_dir)}, signal.SIGINT)


def our_threads(model: Model, args: argparse.Namespace) -> int:
    return args.threads or (1 if model.config["hidden_size"] < 1024 else len(os.sched_getaffinity(0)))


def vllm_server(model: Model, port: int, args: argparse.Namespace, work_dir: Path) -> Server:
    """vLLM's OpenAI api_server (what `vllm serve` runs; the wheel's `vllm` CLI fails on its package metadata)."""
    command = [str(VLLM_VENV / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server", "--model",
               str(model.dir), "--served-model-name", model.name, "--host", "127.0.0.1", "--port", str(port),
               "--dtype", model.dtype, "--seed", "0"]
    return Server(command, clean_env() | VLLM_ENV | vllm_binding_env("all"), signal.SIGTERM)


SERVERS = {"ours": ours_server, "ours-colocated": functools.partial(ours_server, colocate=True),
           "vllm-cpu": vllm_server}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running(server: Server, base_url: str, model_name: str, log_path: Path, timeout_s: float) -> Iterator[float]:
    """The server started, its output in `log_path`, and ready: yields its start-up seconds; stopped on exit."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(server.command, env=server.env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            wait_ready(proc, base_url, model_name, timeout_s, log_path)
            yield time.perf_counter() - start
        finally:
            stop(proc, server.stop_signal)


def wait_ready(proc: subprocess.Popen[bytes], base_url: str, model_name: str, timeout_s: float,
               log_path: Path) -> None:
    """Until GET /v1/models lists `model_name`; fails when the server exits or `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited rc={proc.returncode}: {last_error_line(log_path.read_text())} "
                               f"(log: {log_path})")
        try:
            with urllib.request.urlopen(f"{base_url}/v1/models", timeout=5) as resp:
                if any(m.get("id") == model_name for m in json.load(resp).get("data", [])):
                    return
        except (urllib.error.URLError, OSError, ValueError):
            pass
        time.sleep(2)
    raise TimeoutError(f"server not ready after {timeout_s:.0f}s (log: {log_path})")


def stop(proc: subprocess.Popen[bytes], sig: int) -> None:
    """`sig` to the server, then SIGKILL to whatever is left of its process group (Ray's or vLLM's children)."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            print(f"[serve_vs_vllm] server pid {proc.pid} still up after {STOP_TIMEOUT_S:.0f}s: SIGKILL",
                  file=sys.stderr, flush=True)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


# --- benchmark ---------------------------------------------------------------------------------------------


def bench_argv(base_url: str, model: Model, args: argparse.Namespace) -> list[str]:
    """vLLM's serving benchmark command line: random prompts, streamed completions, greedy, EOS ignored."""
    return ["--backend", "openai", "--base-url", base_url, "--endpoint", "/v1/completions", "--model", model.name,
            "--tokenizer", str(model.dir), "--dataset-name", "random", "--random-input-len", str(args.input_len),
            "--random-output-len", str(args.output_len), "--num-prompts", str(args.num_prompts),
            "--max-concurrency", str(args.concurrency), "--num-warmups", str(args.warmups), "--ignore-eos",
            "--temperature", "0", "--seed", "0", "--disable-tqdm", "--save-detailed",
            "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99"]


def run_system(system: str, model: Model, args: argparse.Namespace) -> dict[str, Any]:
    if system == "engine":
        return run_engine(model, args)
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    log_path = args.out.with_name(f"{args.out.stem}_{system}_server.log.tmp")
    with tempfile.TemporaryDirectory(prefix="serve_vs_vllm-") as work_dir:
        server = SERVERS[system](model, port, args, Path(work_dir))
        with running(server, base_url, model.name, log_path, args.start_timeout) as startup_s:
            print(f"[serve_vs_vllm] {system} up in {startup_s:.0f}s on {base_url}; benchmarking ...",
                  file=sys.stderr, flush=True)
            raw, _ = run_worker(VLLM_VENV, BENCH_WORKER, {"argv": bench_argv(base_url, model, args)}, {},
                                args.bench_timeout, f"serve_vs_vllm_{system}")
    return bench_result(raw, args.num_prompts) | {"startup_s": startup_s, "server_command": server.command,
                                                  "server_log": str(log_path)}


def run_engine(model: Model, args: argparse.Namespace) -> dict[str, Any]:
    """The same workload on our engine in one process (no server): bench/_engine_serve_bench.py in our venv."""
    job = {"model_dir": str(model.checkpoint), "dtype": model.dtype, "threads": our_threads(model, args),
           "input_len": args.input_len, "output_len": args.output_len, "num_prompts": args.num_prompts,
           "concurrency": args.concurrency, "warmups": args.warmups}
    raw, _ = run_worker(Path(sys.prefix), ENGINE_WORKER, job, {}, args.bench_timeout, "serve_vs_vllm_engine")
    return bench_result(raw, args.num_prompts)


def bench_result(raw: dict[str, Any], num_prompts: int) -> dict[str, Any]:
    """The benchmark's scalar numbers; status "failed" (with the first error) unless every request completed."""
    numbers = {k: v for k, v in raw.items() if isinstance(v, (int, float, str)) or v is None}
    errors = [e for e in raw.get("errors", []) if e]
    if raw.get("completed") == num_prompts and not errors:
        return {"status": "ok", "reason": None} | numbers
    reason = f"{raw.get('completed')}/{num_prompts} requests completed"
    return {"status": "failed", "reason": f"{reason}: {errors[0][-400:]}" if errors else reason} | numbers


def guarded(system: str, model: Model, args: argparse.Namespace) -> dict[str, Any]:
    print(f"[serve_vs_vllm] {model.name}: {system} ...", file=sys.stderr, flush=True)
    try:
        return run_system(system, model, args)
    except Exception as exc:  # noqa: BLE001 - a system that fails is a result; the other still runs
        print(f"[serve_vs_vllm] {system} failed: {exc}", file=sys.stderr, flush=True)
        return {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"}


# --- report ------------------------------------------------------------------------------------------------


def targets(systems: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Ours at its best setting (the more output tok/s of `ours` and `ours-colocated`) against vllm-cpu on each
    target metric, where both ran."""
    peer = systems.get("vllm-cpu", {})
    ran = [name for name in ("ours", "ours-colocated") if systems.get(name, {}).get("status") == "ok"]
    if not ran or peer.get("status") != "ok":
        return {}
    best = max(ran, key=lambda name: systems[name]["output_throughput"])
    ours = systems[best]
    out = {}
    for metric, label, bound, higher_better in TARGETS:
        ratio = ours[metric] / peer[metric] if peer[metric] else None
        met = None if ratio is None else (ratio >= bound if higher_better else ratio <= bound)
        out[metric] = {"label": label, "system": best, "ours": ours[metric], "vllm-cpu": peer[metric], "ratio": ratio,
                       "target": f"ours / vllm-cpu {'>=' if higher_better else '<='} {bound}", "met": met}
    return out


def fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_report(doc: dict[str, Any]) -> None:
    w = doc["workload"]
    print(f"\n== {doc['model']['name']} ({doc['dtype']}): vLLM's serving benchmark, random {w['input_len']} -> "
          f"{w['output_len']} tokens, {w['num_prompts']} requests at concurrency {w['concurrency']} ==")
    cols = (("output tok/s", "output_throughput", 13, ".1f"), ("req/s", "request_throughput", 8, ".2f"),
            ("TTFT mean", "mean_ttft_ms", 11, ".1f"), ("TTFT p99", "p99_ttft_ms", 10, ".1f"),
            ("ITL mean", "mean_itl_ms", 10, ".1f"), ("ITL p99", "p99_itl_ms", 9, ".1f"),
            ("TPOT mean", "mean_tpot_ms", 11, ".1f"), ("done", "completed", 6, "d"), ("start s", "startup_s", 9, ".0f"))
    head = f"{'system':<15}" + "".join(f"{label:>{width}}" for label, _, width, _ in cols)
    print(head + "   (times in ms)")
    print("-" * len(head))
    for name, r in doc["systems"].items():
        if r["status"] != "ok":
            print(f"{name:<15}{r['status']}: {r['reason']}")
            continue
        print(f"{name:<15}" + "".join(f"{fmt(r.get(key), spec):>{width}}" for _, key, width, spec in cols))
    for t in doc["targets"].values():
        verdict = "n/a" if t["met"] is None else ("ok" if t["met"] else "MISS")
        print(f"target {t['label']}: {t['target']}: {t['system']} {t['ours']:.1f} vs vllm-cpu {t['vllm-cpu']:.1f} "
              f"({fmt(t['ratio'], '.2f')}x)  {verdict}")


# --- main --------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=None,
                   help="HF-layout MoE checkpoint (default: the tiny bench Mixtral)")
    p.add_argument("--suite", choices=("mid",), default=None, help="mid: bench/mid_models.py's mixtral-mid (bf16)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="both servers' dtype (default: the checkpoint's)")
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated subset of {','.join(SYSTEMS)}")
    p.add_argument("--num-prompts", type=int, default=128)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--warmups", type=int, default=16, help="warm-up requests before the timed ones")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=None,
                   help="ours: engine threads (default: 1 below hidden size 1024, else every core)")
    p.add_argument("--start-timeout", type=float, default=300.0, help="seconds for a server to come up")
    p.add_argument("--bench-timeout", type=float, default=1800.0, help="seconds for one benchmark run")
    p.add_argument("--out", type=Path, default=None,
                   help=f"results JSON (default: {RESULTS_FILE.name}, {MID_RESULTS_FILE.name} with --suite mid)")
    args = p.parse_args(argv)
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if set(args.systems) - set(SYSTEMS):
        p.error(f"unknown systems {sorted(set(args.systems) - set(SYSTEMS))}; choose from {SYSTEMS}")
    if args.suite and args.model:
        p.error("--suite and --model exclude each other")
    args.out = (args.out or (MID_RESULTS_FILE if args.suite else RESULTS_FILE)).resolve()
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    machine = machine_info()  # before the runs: the load average is the one they started under
    ensure_venv(VLLM_ENV_SCRIPT, {"VLLM_CPU_VENV": str(VLLM_VENV)}, timeout_s=900)  # vLLM's server and the client
    model = resolve_model(args)
    systems = {system: guarded(system, model, args) for system in args.systems}
    doc = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine,
           "model": {"name": model.name, "checkpoint": str(model.checkpoint), "served_dir": str(model.dir),
                     "config": model.config},
           "dtype": model.dtype,
           "workload": {"client": "vllm.benchmarks.serve", "backend": "openai", "endpoint": "/v1/completions",
                        "dataset": "random", "input_len": args.input_len, "output_len": args.output_len,
                        "num_prompts": args.num_prompts, "concurrency": args.concurrency, "warmups": args.warmups,
                        "temperature": 0.0, "ignore_eos": True},
           "systems": systems, "targets": targets(systems)}
    write_json(args.out, doc)
    print_report(doc)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
