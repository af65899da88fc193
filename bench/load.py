"""Load benchmark of the Serve application: throughput and latency per concurrency, and autoscaling over time.

Contract: a bounded load generator (every phase stops by itself, in request count or in time) that only targets
loopback. `--url http://127.0.0.1:PORT` measures a running app; `--start` starts a local Ray + Serve app on the
tiny model (made once into bench/.models/) with autoscaling min 1 / max 3 (configurable) and stops it at the end.

Phases, in this order (`--skip-autoscaling`, `--skip-intertoken`; `--intertoken-only` runs the inter-token one alone):
- autoscaling: wait until the engine replicas are at min, then a steady closed-loop load (`--scale-concurrency`
  clients) for `--scale-load-s`, then silence until the count is back at min (bounded by `--silence-s`). The count
  is sampled every 0.5 s (`serve.status()` RUNNING replicas when this process started the app, else the
  `moe_engine_replicas` gauge of GET /metrics). Reported: scale-up time (load start -> needed replicas running),
  scale-down time (last request done -> back to min), and flapping (the count changed direction more than once:
  up, down, up ...). Runs first, from a settled min, so the throughput levels cannot leave it scaled up.
  With `--start`, the Serve controller's and the replicas' logs then say where the scale-up time went: when the
  policy first asked for more than min, when the controller upscaled, and per new replica when it was added, its
  Ray worker process was up, the replica actor was built (the deployment class unpickled: imports of torch and
  moe_serve), EngineReplica.__init__ was done (model load, engine thread) and the controller saw it RUNNING.
- inter-token (bench/intertoken.py), from min replicas: one streaming completion of `--intertoken-stream-tokens`
  (greedy, EOS ignored) is watched; from its first token on, `--intertoken-prompts` fresh prompts of
  `--intertoken-prompt-tokens` (600) random token ids (never repeated: no prefix-cache hits) arrive
  `--intertoken-interval-s` apart, each generating a few tokens (unless given, the stream's length and the interval
  come from a warm-up stream's rate: about 4 s of stream, prompts over its first half; a tiny model decodes
  thousands of tokens a second, a mid-size one tens). Reported from the arrival time of each of the
  stream's SSE events: events, median / p99 / largest gap, and the target largest gap <= 3 x median + 100 ms
  (ok / MISS), with how many prompts overlapped the watch. Twice: "redis healthy" and "redis paused" (the app's
  warm-tier redis-server under SIGSTOP for the watch, SIGCONT after). With `--start` this process starts that
  redis-server (a free loopback port, no persistence) and gives the app its URL as the warm cache; with `--url`
  the paused case is recorded as skipped.
- throughput: per concurrency level (default 1, 4, 16), `--requests` streaming completions of exactly
  `--max-tokens` tokens (EOS ignored, greedy). Reported: requests/s and tokens/s over the level's wall time, TTFT
  (request sent -> first token event) and latency (request sent -> [DONE]) p50/p99, errors, most replicas seen.

Prints tables with the targets (scale-up < 15 s, scale-down < 45 s, no flapping; the inter-token gap), writes
bench/results/load.json (the inter-token phase under "intertoken"; alone, bench/results/intertoken_<model>.json
instead, <model> the model directory's name) and PNG plots (latency/throughput per concurrency; replica count over
time with load start/stop marked). `--model` also takes a name of bench/mid_models.py (`mixtral-mid`: made once
into bench/.models/mixtral-mid-bfloat16; no tokenizer, so only the inter-token phase, which sends token ids);
`--dtype` sets the app's serving dtype.
It owns the load and the reporting, not the app.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import math
import os
import platform
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from tqdm.auto import tqdm

from intertoken import TARGET_TEXT, OwnRedis, intertoken_phase, own_redis, print_intertoken

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
DEFAULT_MODEL_DIR = BENCH_DIR / ".models" / "serve-tiny-mixtral"  # make_tiny_model's defaults, as `moe-serve up`
MODEL_NAME = "tiny"
RAY_WORKER_NICENESS = 15  # Ray's default `worker_niceness`: every actor of the app runs at it
SAMPLE_PERIOD_S = 0.5
TARGETS = {"scale_up_s": 15.0, "scale_down_s": 45.0}
REPLICA_GAUGE = re.compile(r"^moe_engine_replicas\s+(\S+)$", re.MULTILINE)


@dataclass
class RequestResult:
    ok: bool
    ttft_s: float | None = None
    latency_s: float | None = None
    tokens: int = 0
    error: str | None = None


@dataclass
class LevelResult:
    concurrency: int
    requests: int
    errors: int
    wall_s: float
    req_per_s: float
    tok_per_s: float
    ttft_p50_s: float | None
    ttft_p99_s: float | None
    latency_p50_s: float | None
    latency_p99_s: float | None
    replicas_max: int | None
    first_error: str | None


@dataclass
class ScaleResult:
    count_source: str  # "serve.status" (RUNNING replicas) or "metrics" (the gauge, which counts every state)
    min_replicas: int
    max_replicas: int
    needed_replicas: int
    concurrency: int
    settled_at_min: bool
    load_start_s: float  # seconds since the sampler started
    load_stop_s: float
    requests: int
    errors: int
    first_error: str | None
    scale_up_s: float | None  # load start -> needed replicas running
    scale_up_decision_s: float | None  # load start -> needed replicas running or starting
    first_up_s: float | None  # load start -> more than min replicas running
    scale_down_s: float | None
    peak_replicas: int
    changes: int
    flapped: bool  # the count changed direction more than once (up, down, up ...)
    down_under_load: bool  # the count went down while the load was still running
    load_start_wall: float = 0.0  # time.time() at load start, to place log lines
    samples: list[tuple[float, int, int]] = field(default_factory=list)  # (t, running, running + starting)
    timeline: Timeline | None = None


@dataclass
class ReplicaStart:
    """One engine replica started by the scale-up; seconds since load start (None: not in the logs)."""

    replica: str
    added_s: float  # the controller starts it (after the policy's decision and the upscale delay)
    worker_s: float | None = None  # its Ray worker process is up (python started, ray imported)
    built_s: float | None = None  # replica actor built: deployment class unpickled (imports torch, moe_serve)
    constructed_s: float | None = None  # EngineReplica.__init__ done (model load, engine thread)
    running_s: float | None = None  # the controller saw it ready: RUNNING
    pid: int | None = None


@dataclass
class Timeline:
    """Where the scale-up time went, from the Serve controller's and the new replicas' logs."""

    logs_dir: str
    policy_wants: list[tuple[float, int]] = field(default_factory=list)  # (t, replicas the policy asked for)
    upscales: list[tuple[float, int, int]] = field(default_factory=list)  # (t, from, to) the controller's decisions
    downscales: list[tuple[float, int, int]] = field(default_factory=list)
    starts: list[ReplicaStart] = field(default_factory=list)


# --- replica count -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Count:
    running: int  # replicas serving
    requested: int  # running + starting: what the autoscaler has asked for (equal to running from the gauge)


def serve_status_count() -> Count:
    from ray import serve

    from moe_serve.replicas.app import APP_NAME

    states = serve.status().applications[APP_NAME].deployments["EngineReplica"].replica_states
    running = states.get("RUNNING", 0)
    return Count(running, running + states.get("STARTING", 0))


def metrics_gauge_count(base_url: str) -> Callable[[], Count]:
    def count() -> Count:
        text = httpx.get(f"{base_url}/metrics", timeout=10).text
        match = REPLICA_GAUGE.search(text)
        if match is None:
            raise RuntimeError("no moe_engine_replicas gauge in /metrics")
        value = int(float(match.group(1)))
        return Count(value, value)

    return count


class ReplicaSampler:
    """Samples the engine replica count every 0.5 s on a thread; times are seconds since `start()`."""

    def __init__(self, count: Callable[[], Count]) -> None:
        self.count = count
        self.samples: list[tuple[float, Count]] = []
        self.t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="replica-sampler", daemon=True)

    def start(self) -> ReplicaSampler:
        self.t0 = time.monotonic()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def now(self) -> float:
        return time.monotonic() - self.t0

    def latest(self) -> int | None:
        return self.samples[-1][1].running if self.samples else None

    def since(self, start: float) -> list[tuple[float, Count]]:
        return [(t, c) for t, c in self.samples if t >= start]

    def _run(self) -> None:
        while not self._stop.is_set():
            tick = time.monotonic()
            try:
                self.samples.append((self.now(), self.count()))
            except Exception:  # a busy controller or a slow scrape skips one sample, not the run
                pass
            self._stop.wait(max(0.0, SAMPLE_PERIOD_S - (time.monotonic() - tick)))


# --- one streaming request -----------------------------------------------------------------------------------

async def stream_completion(http: httpx.AsyncClient, base_url: str, prompt: str, max_tokens: int) -> RequestResult:
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.monotonic()
    result = RequestResult(ok=False)
    try:
        async with http.stream("POST", f"{base_url}/v1/completions", json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}"
                return result
            done = False
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                event = json.loads(line[6:])
                if event.get("choices") and result.ttft_s is None:
                    result.ttft_s = time.monotonic() - start
                if event.get("usage"):
                    result.tokens = event["usage"]["completion_tokens"]
            result.latency_s = time.monotonic() - start
            result.ok = done and result.ttft_s is not None
            result.error = None if result.ok else "stream ended without [DONE]"
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    return result


def prompt_for(index: int) -> str:
    return f"Request {index}: the router sends each token to the experts that"


# --- phase: throughput per concurrency -----------------------------------------------------------------------

async def run_fixed(base_url: str, concurrency: int, requests: int, max_tokens: int, bar: tqdm) -> list[RequestResult]:
    """`requests` requests, at most `concurrency` in flight."""
    results: list[RequestResult] = []
    indices = iter(range(requests))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        async def worker() -> None:
            for index in indices:
                results.append(await stream_completion(http, base_url, prompt_for(index), max_tokens))
                bar.update(1)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def summarize_level(concurrency: int, results: list[RequestResult], wall_s: float, replicas: list[int]) -> LevelResult:
    ok = [r for r in results if r.ok]
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    latencies = [r.latency_s for r in ok if r.latency_s is not None]
    return LevelResult(
        concurrency=concurrency, requests=len(results), errors=len(results) - len(ok), wall_s=wall_s,
        req_per_s=len(ok) / wall_s, tok_per_s=sum(r.tokens for r in ok) / wall_s,
        ttft_p50_s=percentile(ttfts, 50), ttft_p99_s=percentile(ttfts, 99),
        latency_p50_s=percentile(latencies, 50), latency_p99_s=percentile(latencies, 99),
        replicas_max=max(replicas) if replicas else None,
        first_error=next((r.error for r in results if r.error), None),
    )


def throughput_phase(args: argparse.Namespace, base_url: str, sampler: ReplicaSampler) -> list[LevelResult]:
    levels = []
    for concurrency in args.concurrency:
        with tqdm(total=args.requests, desc=f"concurrency {concurrency:>3}", unit="req") as bar:
            t_start, start = sampler.now(), time.monotonic()
            results = asyncio.run(run_fixed(base_url, concurrency, args.requests, args.max_tokens, bar))
            wall = time.monotonic() - start
        levels.append(summarize_level(concurrency, results, wall, [c.running for _, c in sampler.since(t_start)]))
    return levels


# --- phase: autoscaling ----------------------------------------------------------------------------------------

async def run_for(base_url: str, concurrency: int, seconds: float, max_tokens: int,
                  sampler: ReplicaSampler) -> list[RequestResult]:
    """Closed loop: `concurrency` clients send requests back to back until `seconds` have passed."""
    results: list[RequestResult] = []
    deadline = time.monotonic() + seconds
    counter = iter(range(1 << 30))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    with tqdm(total=round(seconds), desc="autoscaling load", unit="s") as bar:
        async def ticker() -> None:
            while (left := deadline - time.monotonic()) > 0:
                await asyncio.sleep(min(1.0, left))
                bar.n = min(bar.total, round(seconds - max(0.0, deadline - time.monotonic())))
                bar.set_postfix(replicas=sampler.latest(), done=len(results))  # refreshes the bar

        async with httpx.AsyncClient(timeout=120, limits=limits) as http:
            async def worker() -> None:
                while time.monotonic() < deadline:
                    results.append(await stream_completion(http, base_url, prompt_for(next(counter)), max_tokens))

            await asyncio.gather(ticker(), *(worker() for _ in range(concurrency)))
    return results


def wait_until(sampler: ReplicaSampler, done: Callable[[], bool], timeout_s: float, desc: str) -> bool:
    """Poll `done` every sample period for at most `timeout_s`, with a progress bar; True when it came true."""
    start = time.monotonic()
    with tqdm(total=round(timeout_s), desc=desc, unit="s") as bar:
        while time.monotonic() - start < timeout_s:
            if done():
                return True
            time.sleep(SAMPLE_PERIOD_S)
            bar.n = min(bar.total, round(time.monotonic() - start))
            bar.set_postfix(replicas=sampler.latest())  # refreshes the bar
    return False


def back_at_min(sampler: ReplicaSampler, min_replicas: int, since: float, hold_s: float) -> Callable[[], bool]:
    """True once the count has been above min since `since` and is now at min for `hold_s` (a flap shows up)."""
    def done() -> bool:
        samples = sampler.since(since)
        if not samples or max(c.running for _, c in samples) <= min_replicas:
            return False  # not scaled up yet: a late scale-up must still be seen, and its way back down
        last_above = max(t for t, c in samples if c.running > min_replicas)
        return samples[-1][0] - last_above >= hold_s

    return done


def direction_runs(counts: list[int]) -> list[int]:
    """+1/-1 per run of same-direction changes: [1, 2, 3, 2, 1] -> [+1, -1]; [1, 2, 1, 2, 1] -> [+1, -1, +1, -1]."""
    runs: list[int] = []
    for before, after in zip(counts, counts[1:], strict=False):
        if after != before:
            step = 1 if after > before else -1
            if not runs or runs[-1] != step:
                runs.append(step)
    return runs


def scale_down_time(samples: list[tuple[float, Count]], min_replicas: int, load_stop: float) -> float | None:
    """Load stop -> the count's last return to min (negative: it was back before the load stopped); None when it
    never rose above min or is not back."""
    above = [i for i, (_, c) in enumerate(samples) if c.running > min_replicas]
    if not above or above[-1] == len(samples) - 1:
        return None
    return samples[above[-1] + 1][0] - load_stop


def scaling_phase(args: argparse.Namespace, base_url: str, sampler: ReplicaSampler) -> ScaleResult:
    needed = min(args.max_replicas, max(args.min_replicas, math.ceil(args.scale_concurrency / args.target_ongoing)))
    settled = wait_until(sampler, lambda: sampler.latest() == args.min_replicas, args.settle_s, "settle at min")
    load_start, load_start_wall = sampler.now(), time.time()
    results = asyncio.run(run_for(base_url, args.scale_concurrency, args.scale_load_s, args.scale_max_tokens, sampler))
    load_stop = sampler.now()  # the last request is done: silence from here
    wait_until(sampler, back_at_min(sampler, args.min_replicas, load_start, args.hold_s), args.silence_s,
               "silence until min")
    samples = sampler.since(load_start)
    counts = [c.running for _, c in samples]
    runs = direction_runs(counts)
    under_load = [c.running for t, c in samples if t <= load_stop]
    return ScaleResult(
        count_source=args.count_source, min_replicas=args.min_replicas, max_replicas=args.max_replicas,
        needed_replicas=needed, concurrency=args.scale_concurrency, settled_at_min=settled,
        load_start_s=load_start, load_stop_s=load_stop, requests=len(results),
        errors=sum(not r.ok for r in results), first_error=next((r.error for r in results if r.error), None),
        scale_up_s=next((t - load_start for t, c in samples if c.running >= needed), None),
        scale_up_decision_s=next((t - load_start for t, c in samples if c.requested >= needed), None),
        first_up_s=next((t - load_start for t, c in samples if c.running > args.min_replicas), None),
        scale_down_s=scale_down_time(samples, args.min_replicas, load_stop),
        peak_replicas=max(counts, default=0), changes=sum(a != b for a, b in zip(counts, counts[1:], strict=False)),
        flapped=len(runs) > 2,
        down_under_load=any(b < a for a, b in zip(under_load, under_load[1:], strict=False)),
        load_start_wall=load_start_wall, samples=[(round(t, 2), c.running, c.requested) for t, c in sampler.samples],
    )


# --- where the scale-up time goes: the Serve controller's and the replicas' logs ---------------------------------

LOG_TIME = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})")
ENGINE = "deployment='EngineReplica'"
POLICY_WANTS = re.compile(r"llm_load_policy: wants (\d+)")
SCALING = re.compile(r"(Upscaling|Downscaling) Deployment\(name='EngineReplica'.* from (\d+) to (\d+) replicas")
STARTING = re.compile(r"Starting Replica\(id='(\w+)', deployment='EngineReplica'")
STARTED = re.compile(r"Replica\(id='(\w+)', deployment='EngineReplica'.* started successfully .*\(PID: (\d+)\)")


def log_lines(path: Path) -> Iterator[tuple[float, str]]:
    """(wall time, line) for every timestamped line of a Ray or Serve log."""
    if not path.is_file():
        return
    for line in path.read_text(errors="replace").splitlines():
        if match := LOG_TIME.search(line[:40]):
            yield dt.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp(), line


def first_line_time(path: Path, needle: str = "") -> float | None:
    return next((t for t, line in log_lines(path) if needle in line), None)


def startup_timeline(logs_dir: Path, load_start_wall: float, load_stop_wall: float) -> Timeline:
    """Policy wishes, controller decisions and each new replica's startup phases during the autoscaling phase."""
    timeline = Timeline(logs_dir=str(logs_dir))
    starts: dict[str, ReplicaStart] = {}
    for path in sorted((logs_dir / "serve").glob("controller_*.log")):
        for wall, line in log_lines(path):
            t = round(wall - load_start_wall, 2)
            if wall < load_start_wall - 1:
                continue
            if match := POLICY_WANTS.search(line):
                timeline.policy_wants.append((t, int(match.group(1))))
            elif match := SCALING.search(line):
                step = (t, int(match.group(2)), int(match.group(3)))
                (timeline.upscales if match.group(1) == "Upscaling" else timeline.downscales).append(step)
            elif (match := STARTING.search(line)) and wall <= load_stop_wall:
                starts[match.group(1)] = ReplicaStart(replica=match.group(1), added_s=t)
            elif (match := STARTED.search(line)) and match.group(1) in starts:
                starts[match.group(1)].running_s, starts[match.group(1)].pid = t, int(match.group(2))
    for start in starts.values():
        replica_log = logs_dir / "serve" / f"replica_moe-serve_EngineReplica_{start.replica}.log"
        for attr, needle in (("built_s", "Started initializing replica"), ("constructed_s", "Finished initializing")):
            if (wall := first_line_time(replica_log, needle)) is not None:
                setattr(start, attr, round(wall - load_start_wall, 2))
        worker_logs = list(logs_dir.glob(f"python-core-worker-*_{start.pid}.log")) if start.pid else []
        if worker_logs and (wall := first_line_time(worker_logs[0])) is not None:
            start.worker_s = round(wall - load_start_wall, 2)
    timeline.starts = sorted(starts.values(), key=lambda s: s.added_s)
    return timeline


# --- the app, when this process starts it -------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ensure_model(model_dir: Path | None) -> Path:
    if model_dir is not None:
        if not model_dir.exists() and len(model_dir.parts) == 1:
            from mid_models import MID_SHAPES, ensure_mid_model

            if str(model_dir) in MID_SHAPES:  # a bench/mid_models.py shape: made once, in bf16
                return ensure_mid_model(str(model_dir))
        return model_dir
    if not (DEFAULT_MODEL_DIR / "config.json").is_file():
        from moe_serve.model.tiny import make_tiny_model

        make_tiny_model(DEFAULT_MODEL_DIR, family="mixtral", show_progress=False)
    return DEFAULT_MODEL_DIR


def autoscaling_overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides = {"min_replicas": args.min_replicas, "max_replicas": args.max_replicas,
                 "target_ongoing_requests": args.target_ongoing, "upscale_delay_s": args.upscale_delay_s,
                 "downscale_delay_s": args.downscale_delay_s, "metrics_interval_s": args.metrics_interval_s,
                 "look_back_period_s": args.look_back_period_s}
    return {k: v for k, v in overrides.items() if v is not None}


@contextmanager
def local_app(args: argparse.Namespace, redis_url: str | None = None) -> Iterator[tuple[str, dict[str, Any], Path]]:
    """A local Ray (GCS on a free port, never 6379) + Serve app on 127.0.0.1, with its logs directory; stopped on
    the way out. `redis_url`: the warm cache tier (else the environment's, as the app's default)."""
    import ray
    from ray import serve

    from moe_serve.cluster.bringup import connect_ray
    from moe_serve.replicas.app import APP_NAME, build_app
    from moe_serve.replicas.settings import AppSettings

    extra: dict[str, Any] = {"cache": {"redis_url": redis_url}} if redis_url else {}
    if args.dtype is not None:
        extra["dtype"] = args.dtype
    settings = AppSettings(model_dir=str(ensure_model(args.model)), model_name=MODEL_NAME,
                           autoscaling=autoscaling_overrides(args), **extra)
    connect_ray()
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(settings), name=APP_NAME, route_prefix="/")
        logs_dir = Path(ray._private.worker._global_node.get_logs_dir_path())
        yield f"http://127.0.0.1:{port}", settings.model_dump(mode="json"), logs_dir
    finally:
        serve.shutdown()
        ray.shutdown()


# --- reporting --------------------------------------------------------------------------------------------------

def fmt(value: float | None, unit: str = "", digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}{unit}"


def verdict(value: float | None, target: float) -> str:
    if value is None:
        return "MISSED (not reached)"
    return "ok" if 0 <= value < target else "MISSED"


def print_report(levels: list[LevelResult], scale: ScaleResult | None) -> None:
    header = (f"{'conc':>5} {'reqs':>5} {'err':>4} {'req/s':>7} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p99':>9} "
              f"{'lat p50':>8} {'lat p99':>8} {'replicas':>8}")
    print("\nThroughput per concurrency (streaming completions)")
    print(header)
    for lv in levels:
        print(f"{lv.concurrency:>5} {lv.requests:>5} {lv.errors:>4} {lv.req_per_s:>7.2f} {lv.tok_per_s:>8.1f} "
              f"{fmt(lv.ttft_p50_s, 's'):>9} {fmt(lv.ttft_p99_s, 's'):>9} {fmt(lv.latency_p50_s, 's'):>8} "
              f"{fmt(lv.latency_p99_s, 's'):>8} {lv.replicas_max if lv.replicas_max is not None else '-':>8}")
        if lv.first_error:
            print(f"      first error: {lv.first_error}")
    if scale is None:
        return
    print(f"\nAutoscaling: {scale.concurrency} clients for the load, replicas min {scale.min_replicas} / "
          f"max {scale.max_replicas}, needed {scale.needed_replicas}, peak {scale.peak_replicas}; "
          f"{scale.requests} requests, {scale.errors} errors")
    asked = f" (asked for at {fmt(scale.scale_up_decision_s, ' s', 1)})" if scale.count_source == "serve.status" else ""
    print(f"  scale-up   {fmt(scale.scale_up_s, ' s', 1):>10}   target < {TARGETS['scale_up_s']:.0f} s   "
          f"{verdict(scale.scale_up_s, TARGETS['scale_up_s'])}{asked}")
    print(f"  scale-down {fmt(scale.scale_down_s, ' s', 1):>10}   target < {TARGETS['scale_down_s']:.0f} s   "
          f"{verdict(scale.scale_down_s, TARGETS['scale_down_s'])}")
    print(f"  flapping   {'yes' if scale.flapped else 'no':>10}   target: no     "
          f"{'MISSED' if scale.flapped else 'ok'} ({scale.changes} count changes)")
    if scale.down_under_load:
        print("  note: the count went down while the load was still running"
              + (f" (back at min {-scale.scale_down_s:.1f} s before it stopped)"
                 if scale.scale_down_s is not None and scale.scale_down_s < 0 else ""))
    if scale.scale_up_s is None and scale.first_up_s is not None:
        print(f"  scale-up reached {scale.peak_replicas} of the {scale.needed_replicas} needed; the first replica "
              f"beyond min was running at {scale.first_up_s:.1f} s")
    if not scale.settled_at_min:
        print("  note: the count was not at min when the load started")
    if scale.first_error:
        print(f"  first error of the load: {scale.first_error}")
    if scale.timeline is not None:
        print_timeline(scale.timeline, scale.load_stop_s - scale.load_start_s, scale.min_replicas)


def print_timeline(timeline: Timeline, load_s: float, min_replicas: int) -> None:
    """The scale-up, phase by phase: seconds since load start, each phase's own duration in parentheses."""
    print("\nWhere the scale-up time went (s since load start; Serve controller and replica logs)")
    wants = [f"{n}@{t:.1f}" for t, n in timeline.policy_wants if t <= load_s]
    first = next((t for t, n in timeline.policy_wants if n > min_replicas), None)
    print(f"  policy first asked for more than min at {fmt(first, ' s', 1)}; its wishes under load: "
          f"{', '.join(wants[:12]) or '-'}{' ...' if len(wants) > 12 else ''}")
    steps = ", ".join(f"{a}->{b} at {t:.1f} s" for t, a, b in timeline.upscales if t <= load_s)
    print(f"  controller upscaled: {steps or '-'}")
    print(f"  {'replica':<10} {'added':>6} {'worker up':>14} {'actor built':>14} {'init done':>14} {'running':>14}")
    for st in timeline.starts:
        cells, before = [], st.added_s
        for value in (st.worker_s, st.built_s, st.constructed_s, st.running_s):
            cells.append("-" if value is None else f"{value:.1f} (+{value - before:.1f})")
            before = value if value is not None else before
        print(f"  {st.replica:<10} {st.added_s:>6.1f} " + " ".join(f"{c:>14}" for c in cells))


def plot(levels: list[LevelResult], scale: ScaleResult | None, out_dir: Path) -> list[Path]:
    try:
        import matplotlib
    except ImportError:  # the `bench` extra; the table and JSON do without it
        print("no plots: matplotlib is not installed (pip install -e '.[bench]')")
        return []

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    if levels:
        conc = [lv.concurrency for lv in levels]
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
        for attr, label, style in (("latency_p50_s", "latency p50", "o-"), ("latency_p99_s", "latency p99", "o--"),
                                   ("ttft_p50_s", "TTFT p50", "s-"), ("ttft_p99_s", "TTFT p99", "s--")):
            left.plot(conc, [getattr(lv, attr) or np.nan for lv in levels], style, label=label)
        left.set(xscale="log", xlabel="concurrency", ylabel="seconds", title="Latency")
        left.set_xticks(conc, [str(c) for c in conc])
        left.legend()
        right.plot(conc, [lv.tok_per_s for lv in levels], "o-", color="tab:green")
        for lv in levels:
            right.annotate(f"{lv.req_per_s:.1f} req/s", (lv.concurrency, lv.tok_per_s), textcoords="offset points",
                           xytext=(0, 8), ha="center", fontsize=8)
        right.set(xscale="log", xlabel="concurrency", ylabel="tokens/s", title="Throughput")
        right.set_xticks(conc, [str(c) for c in conc])
        right.margins(y=0.15)
        fig.tight_layout()
        paths.append(out_dir / "load_throughput.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    if scale is not None and scale.samples:
        fig, ax = plt.subplots(figsize=(10, 4))
        t = [s[0] - scale.load_start_s for s in scale.samples]
        ax.step(t, [s[1] for s in scale.samples], where="post", label="running")
        ax.step(t, [s[2] for s in scale.samples], where="post", linestyle=":", label="running + starting")
        ax.axvline(0, color="tab:green", linestyle="--", label="load start")
        ax.axvline(scale.load_stop_s - scale.load_start_s, color="tab:red", linestyle="--", label="load stop")
        if scale.timeline is not None and scale.timeline.upscales:
            ax.axvline(scale.timeline.upscales[0][0], color="tab:purple", linestyle="-.", label="controller upscales")
        ax.axhline(scale.needed_replicas, color="gray", linestyle=":", label="needed")
        ax.set(xlabel="seconds since load start", ylabel="replicas", title="Engine replicas over time",
               ylim=(0, scale.max_replicas + 0.5))
        ax.legend(loc="upper right")
        fig.tight_layout()
        paths.append(out_dir / "load_replicas.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


# --- main ---------------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from moe_serve.replicas.settings import AutoscalingSettings

    defaults = AutoscalingSettings()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="base URL of a running app on loopback, e.g. http://127.0.0.1:8000")
    target.add_argument("--start", action="store_true", help="start a local Ray + Serve app on the tiny model")
    p.add_argument("--model", type=Path, default=None,
                   help=f"model directory for --start (default {DEFAULT_MODEL_DIR}), or a bench/mid_models.py\n"
                        "name (mixtral-mid, qwen3-mid: made once in bf16, no tokenizer: use --intertoken-only)")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default=None,
                   help="--start only: the app's serving dtype (default: the app's, auto)")
    p.add_argument("--concurrency", type=lambda s: [int(c) for c in s.split(",")], default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=128, help="requests per concurrency level")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per request (EOS ignored)")
    p.add_argument("--min-replicas", type=int, default=1, help="with --url: the running app's")
    p.add_argument("--max-replicas", type=int, default=3, help="with --url: the running app's")
    p.add_argument("--target-ongoing", type=float, default=None,
                   help=f"target ongoing requests per replica (default: the app's, {defaults.target_ongoing_requests})")
    p.add_argument("--upscale-delay-s", type=float, default=None, help="--start only (default: the app's)")
    p.add_argument("--downscale-delay-s", type=float, default=None, help="--start only (default: the app's)")
    p.add_argument("--metrics-interval-s", type=float, default=None, help="--start only (default: the app's)")
    p.add_argument("--look-back-period-s", type=float, default=None, help="--start only (default: the app's)")
    p.add_argument("--scale-concurrency", type=int, default=24, help="clients during the autoscaling load")
    p.add_argument("--scale-load-s", type=float, default=45.0)
    p.add_argument("--scale-max-tokens", type=int, default=64)
    p.add_argument("--settle-s", type=float, default=90.0, help="longest wait for min replicas before the load")
    p.add_argument("--silence-s", type=float, default=60.0, help="longest wait for min replicas after the load")
    p.add_argument("--hold-s", type=float, default=5.0, help="watch this long at min for a flap back up")
    p.add_argument("--client-nice", type=int, default=RAY_WORKER_NICENESS,
                   help="lower the load generator's CPU priority by this much (os.nice) after the app is up; the\n"
                        "default puts it level with Ray's worker processes (Ray runs them at nice 15), as clients on\n"
                        "other machines would be; 0 lets it outrank every process of the app")
    p.add_argument("--skip-autoscaling", action="store_true")
    p.add_argument("--skip-intertoken", action="store_true")
    p.add_argument("--intertoken-only", action="store_true",
                   help="run the inter-token phase alone; writes intertoken_<model>.json instead of load.json")
    p.add_argument("--intertoken-stream-tokens", type=int, default=None,
                   help="tokens of the watched stream (default: enough for ~4 s at the rate a warm-up stream\n"
                        "measures, at least 300, at most 4096 or the model's length)")
    p.add_argument("--intertoken-prompts", type=int, default=6, help="fresh prompts sent during the watch")
    p.add_argument("--intertoken-prompt-tokens", type=int, default=600, help="random token ids per fresh prompt")
    p.add_argument("--intertoken-interval-s", type=float, default=None,
                   help="between fresh prompts (default: they arrive over the first half of the stream's\n"
                        "expected duration)")
    p.add_argument("--intertoken-request-timeout-s", type=float, default=60.0,
                   help="per HTTP call (connect 10 s; read: longest wait for the next bytes)")
    p.add_argument("--intertoken-timeout-s", type=float, default=300.0, help="longest a case may take in all")
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = p.parse_args(argv)
    if args.target_ongoing is None:
        args.target_ongoing = defaults.target_ongoing_requests
    if args.url and httpx.URL(args.url).host not in ("127.0.0.1", "localhost", "::1"):
        p.error("--url must point at loopback (127.0.0.1)")
    if args.intertoken_only and args.skip_intertoken:
        p.error("--intertoken-only and --skip-intertoken exclude each other")
    if args.intertoken_only:
        args.skip_autoscaling = True
    if min(args.intertoken_stream_tokens or 1, args.intertoken_prompts, args.intertoken_prompt_tokens) < 1:
        p.error("--intertoken-stream-tokens, --intertoken-prompts and --intertoken-prompt-tokens must be >= 1")
    return args


def run(args: argparse.Namespace, base_url: str, count: Callable[[], Count], app: dict[str, Any] | None,
        logs_dir: Path | None = None, redis: OwnRedis | None = None) -> dict[str, Any]:
    prompt: str | list[int] = [1, 5, 6, 7] if args.intertoken_only else "warm up"  # ids: a model without tokenizer
    httpx.post(f"{base_url}/v1/completions", json={"model": MODEL_NAME, "prompt": prompt, "max_tokens": 2},
               timeout=120).raise_for_status()
    if args.client_nice:
        os.nice(args.client_nice)  # this thread and the ones it starts from here: the Ray processes keep theirs
    sampler = ReplicaSampler(count).start()
    try:
        scale = None if args.skip_autoscaling else scaling_phase(args, base_url, sampler)
        if scale is not None and logs_dir is not None:
            load_stop_wall = scale.load_start_wall + scale.load_stop_s - scale.load_start_s
            scale.timeline = startup_timeline(logs_dir, scale.load_start_wall, load_stop_wall)
        intertoken = None
        if not args.skip_intertoken:
            if sampler.latest() != args.min_replicas:
                wait_until(sampler, lambda: sampler.latest() == args.min_replicas, args.settle_s, "settle at min")
            model_dir = app["model_dir"] if app else args.model
            intertoken = intertoken_phase(
                args, base_url, MODEL_NAME, model_dir, redis,
                lambda since: [c.running for _, c in sampler.since(since)], sampler.now)
        levels = [] if args.intertoken_only else throughput_phase(args, base_url, sampler)
    finally:
        sampler.stop()
    if not args.intertoken_only:
        print_report(levels, scale)
    if intertoken is not None:
        print_intertoken(intertoken)
    args.out.mkdir(parents=True, exist_ok=True)
    plots = [] if args.intertoken_only else plot(levels, scale, args.out)
    return {
        "meta": {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "url": base_url,
                 "mode": "start" if args.start else "url", "host": platform.node(), "cpus": os.cpu_count(),
                 "python": platform.python_version(), "app_settings": app,
                 "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                 "plots": [str(p.relative_to(BENCH_DIR.parent)) if p.is_relative_to(BENCH_DIR.parent) else str(p)
                           for p in plots]},
        "targets": TARGETS | {"flapping": False, "intertoken": TARGET_TEXT},
        "throughput": [asdict(lv) for lv in levels],
        "autoscaling": asdict(scale) if scale else None,
        "intertoken": intertoken,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.monotonic()
    args.count_source = "serve.status" if args.start else "metrics"
    if args.start:
        with ExitStack() as stack:  # the app stops before its redis-server
            redis = None if args.skip_intertoken else stack.enter_context(own_redis())
            base_url, app, logs_dir = stack.enter_context(local_app(args, redis.url if redis else None))
            report = run(args, base_url, serve_status_count, app, logs_dir, redis)
    else:
        base_url = args.url.rstrip("/")
        report = run(args, base_url, metrics_gauge_count(base_url), None)
    report["meta"]["total_s"] = round(time.monotonic() - started, 1)
    if args.intertoken_only:
        model_dir = report["meta"]["app_settings"]["model_dir"] if args.start else args.model
        name = Path(model_dir).name if model_dir else httpx.URL(base_url).netloc.decode().replace(":", "-")
        dtype = f"_{args.dtype}" if args.dtype and args.dtype not in Path(str(model_dir)).name else ""
        out = args.out / f"intertoken_{name}{dtype}.json"
    else:
        out = args.out / "load.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out}{'' if args.intertoken_only else f' and plots in {args.out}'} "
          f"({report['meta']['total_s']:.0f} s in all)")


if __name__ == "__main__":
    main()
