"""The inter-token phase of bench/load.py: does a long stream keep its pace while fresh long prompts arrive?

Contract: one streaming completion (`--intertoken-stream-tokens`, greedy, EOS ignored, a fresh random token-id
prompt) is watched; from its first token on, `--intertoken-prompts` fresh prompts of `--intertoken-prompt-tokens`
random token ids (never repeated: no prefix-cache hits) are sent `--intertoken-interval-s` apart, each generating
PROMPT_MAX_TOKENS tokens. First a warm-up: one fresh prompt of that length, then one stream alone whose decode rate
sizes the stream and the interval where they are not given (`plan_watch`). The arrival time of every SSE event of
the watched stream that carries tokens is recorded; reported: events, median / p99 / largest gap between
consecutive events, and the target largest <= 3 x median + 100 ms (ok / MISS), and how many prompts overlapped the
watch (their prefill done before its last event).
Two cases: "redis healthy", and "redis paused": the app's warm-tier redis-server stopped (SIGSTOP) from before the
watched stream starts until the watch is over (SIGCONT in a finally). Pausing needs the redis-server this process
started (`load.py --start`); with `--url` that case is recorded as skipped. Bounded: a fixed count of requests,
a timeout on every HTTP call and on each case as a whole; loopback only.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

PROMPT_MAX_TOKENS = 4  # tokens each fresh prompt generates: its prefill is the load, its decode joins the batch
STREAM_PROMPT_TOKENS = 16  # the watched stream's own prompt (fresh random ids too)
PROBE_TOKENS = 200  # the warm-up stream that measures the decode rate (auto stream length and interval)
AUTO_WATCH_S = 4.0  # auto: the watched stream is asked for enough tokens to last this long at the probe's rate ...
AUTO_MIN_STREAM_TOKENS = 300  # ... and at least this many
AUTO_ARRIVAL_SHARE = 0.5  # auto interval: the prompts arrive over this share of the stream's expected duration
API_MAX_TOKENS = 4096  # the app's default limits.max_tokens
TARGET_FACTOR, TARGET_SLACK_S = 3.0, 0.100  # largest gap <= 3 x median gap + 100 ms
TARGET_TEXT = "largest SSE gap <= 3 x median gap + 100 ms"
FIRST_ID = 3  # random ids from here to the vocab's end: 0-2 are pad/bos/eos in the checkpoints the bench makes
CACHE_METRIC_PREFIX = "moe_cache_"


# --- the app's warm-tier redis-server, when load.py starts the app ----------------------------------------------

class OwnRedis:
    """A child redis-server on a free loopback port, started as `moe-serve up` starts its own (no persistence,
    512 MB LRU), never the system's 6379; `pause()` (SIGSTOP) stalls it the way a hung server does."""

    def __init__(self) -> None:
        from moe_serve.up import start_redis

        self.workdir = Path(tempfile.mkdtemp(prefix="load-intertoken-redis-"))
        self.proc, self.url = start_redis(self.workdir)

    @contextmanager
    def paused(self) -> Iterator[None]:
        self.proc.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            self.proc.send_signal(signal.SIGCONT)

    def ping(self, timeout_s: float = 2.0) -> bool:
        import redis

        try:
            with redis.Redis.from_url(self.url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s) as client:
                return bool(client.ping())
        except redis.RedisError:
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a stopped process would hold a SIGTERM until continued
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)


@contextmanager
def own_redis() -> Iterator[OwnRedis]:
    server = OwnRedis()
    try:
        yield server
    finally:
        server.stop()


# --- results ---------------------------------------------------------------------------------------------------------

@dataclass
class PromptResult:
    index: int
    sent_s: float  # seconds since the watched stream's first token event
    first_token_s: float | None = None  # its prefill done
    done_s: float | None = None
    ok: bool = False
    error: str | None = None
    overlapped: bool = False  # sent after the watched stream's first event, prefill done before its last


@dataclass
class CaseResult:
    case: str  # "redis healthy" or "redis paused"
    skipped: str | None = None  # why the case did not run
    error: str | None = None  # the watched stream failed or the case timed out
    stream_tokens: int = 0  # completion tokens of the watched stream (its usage)
    ttft_s: float | None = None  # watched stream: request sent -> first token event
    watch_s: float | None = None  # first -> last token event
    events: int = 0  # token-carrying SSE events of the watched stream
    median_gap_s: float | None = None
    p99_gap_s: float | None = None
    largest_gap_s: float | None = None
    largest_gap_end_s: float | None = None  # when the largest gap ended, seconds since the first event
    largest_gap_busy_s: float | None = None  # largest of the gaps that overlap a prompt in flight (sent -> done)
    largest_gap_quiet_s: float | None = None  # largest of the others: the stream's own jitter, the machine's noise
    target_s: float | None = None  # 3 x median + 0.1
    ok: bool | None = None  # largest <= target; None when skipped or no gaps
    prompts_sent: int = 0
    prompts_ok: int = 0
    prompts_overlapped: int = 0
    replicas_max: int | None = None  # engine replicas seen during the case (1: every prompt met the stream)
    cache_counters: dict[str, float] = field(default_factory=dict)  # the case's deltas of /metrics moe_cache_*
    prompts: list[PromptResult] = field(default_factory=list)
    event_times_s: list[float] = field(default_factory=list)  # token events, seconds since the first one


# --- one case --------------------------------------------------------------------------------------------------------

def fresh_ids(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(FIRST_ID, vocab) for _ in range(n)]


def body(model: str, ids: list[int], max_tokens: int) -> dict[str, Any]:
    return {"model": model, "prompt": ids, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}


async def sse_events(response: httpx.Response) -> Any:
    """(arrival time, parsed event or None for [DONE]) per `data:` line."""
    async for line in response.aiter_lines():
        now = time.perf_counter()
        if line.startswith("data: "):
            yield now, None if line == "data: [DONE]" else json.loads(line[6:])


async def watch_case(base_url: str, model: str, stream_ids: list[int], prompts: list[list[int]], stream_tokens: int,
                     interval_s: float, request_timeout_s: float, result: CaseResult) -> None:
    """Fills `result` with the watched stream's event times and each prompt's timing (what came, if cancelled)."""
    times: list[float] = []
    try:
        await _watch(base_url, model, stream_ids, prompts, stream_tokens, interval_s, request_timeout_s, result, times)
    finally:
        summarize(result, times)


async def _watch(base_url: str, model: str, stream_ids: list[int], prompts: list[list[int]], stream_tokens: int,
                 interval_s: float, request_timeout_s: float, result: CaseResult, times: list[float]) -> None:
    first = asyncio.Event()
    stream_done = asyncio.Event()
    timeout = httpx.Timeout(request_timeout_s, connect=10.0)
    limits = httpx.Limits(max_connections=len(prompts) + 2, max_keepalive_connections=len(prompts) + 2)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as http:
        async def watched() -> None:
            sent = time.perf_counter()
            try:
                async with http.stream("POST", f"{base_url}/v1/completions",
                                       json=body(model, stream_ids, stream_tokens)) as response:
                    if response.status_code != 200:
                        result.error = f"watched stream: HTTP {response.status_code} {(await response.aread())[:200]!r}"
                        return
                    done = False
                    async for now, event in sse_events(response):
                        if event is None:
                            done = True
                            break
                        if event.get("choices"):
                            times.append(now)
                            if result.ttft_s is None:
                                result.ttft_s = now - sent
                                first.set()
                        if event.get("usage"):
                            result.stream_tokens = event["usage"]["completion_tokens"]
                    if not done:
                        result.error = "watched stream ended without [DONE]"
            except (httpx.HTTPError, json.JSONDecodeError) as exc:
                result.error = f"watched stream: {type(exc).__name__}: {exc}"
            finally:
                first.set()  # the sender must not wait for a first token that will not come
                stream_done.set()

        async def one_prompt(index: int, ids: list[int], t0: float) -> None:
            prompt = PromptResult(index=index, sent_s=time.perf_counter() - t0)
            result.prompts.append(prompt)
            try:
                async with http.stream("POST", f"{base_url}/v1/completions",
                                       json=body(model, ids, PROMPT_MAX_TOKENS)) as response:
                    if response.status_code != 200:
                        prompt.error = f"HTTP {response.status_code} {(await response.aread())[:200]!r}"
                        return
                    async for now, event in sse_events(response):
                        if event is None:
                            prompt.ok = prompt.first_token_s is not None
                            break
                        if event.get("choices") and prompt.first_token_s is None:
                            prompt.first_token_s = now - t0
                    prompt.done_s = time.perf_counter() - t0
                    if not prompt.ok:
                        prompt.error = "stream ended without [DONE]"
            except (httpx.HTTPError, json.JSONDecodeError) as exc:
                prompt.error = f"{type(exc).__name__}: {exc}"

        async def sender() -> None:
            await first.wait()
            if not times:
                return
            t0, tasks = times[0], []
            for index, ids in enumerate(prompts):
                delay = t0 + index * interval_s - time.perf_counter()
                if delay > 0:
                    try:  # wake early if the watched stream ends: the rest would measure nothing
                        await asyncio.wait_for(stream_done.wait(), timeout=delay)
                    except TimeoutError:
                        pass
                if stream_done.is_set():
                    break
                tasks.append(asyncio.create_task(one_prompt(index, ids, t0)))
            await asyncio.gather(*tasks)

        await asyncio.gather(watched(), sender())


def summarize(result: CaseResult, times: list[float]) -> None:
    result.events = len(times)
    if times:
        result.event_times_s = [round(t - times[0], 4) for t in times]
        result.watch_s = times[-1] - times[0]
    last_s = result.watch_s or 0.0
    for prompt in result.prompts:
        prompt.overlapped = prompt.first_token_s is not None and prompt.first_token_s <= last_s
    result.prompts_sent = len(result.prompts)
    result.prompts_ok = sum(p.ok for p in result.prompts)
    result.prompts_overlapped = sum(p.overlapped for p in result.prompts)
    gaps = np.diff(times)
    if len(gaps):
        result.median_gap_s = float(np.median(gaps))
        result.p99_gap_s = float(np.percentile(gaps, 99))
        at = int(np.argmax(gaps))
        result.largest_gap_s = float(gaps[at])
        result.largest_gap_end_s = result.event_times_s[at + 1]
        result.target_s = TARGET_FACTOR * result.median_gap_s + TARGET_SLACK_S
        spans = [(p.sent_s, p.done_s if p.done_s is not None else result.watch_s) for p in result.prompts]
        t = result.event_times_s  # gap i: (t[i], t[i + 1]); busy when a prompt's (sent, done) overlaps it
        busy = [any(sent < t[i + 1] and t[i] < done for sent, done in spans) for i in range(len(gaps))]
        result.largest_gap_busy_s = max((float(g) for g, b in zip(gaps, busy) if b), default=None)
        result.largest_gap_quiet_s = max((float(g) for g, b in zip(gaps, busy) if not b), default=None)
        result.ok = result.largest_gap_s <= result.target_s


# --- the phase -------------------------------------------------------------------------------------------------------

def cache_counters(base_url: str) -> dict[str, float] | None:
    """The app's moe_cache_* counters from GET /metrics (one replica's), histogram buckets left out."""
    try:
        text = httpx.get(f"{base_url}/metrics", timeout=10).text
    except httpx.HTTPError:
        return None
    counters = {}
    for line in text.splitlines():
        if line.startswith(CACHE_METRIC_PREFIX) and "_bucket" not in line and "_created" not in line:
            name, _, value = line.rpartition(" ")
            try:
                counters[name] = float(value)
            except ValueError:
                continue
    return counters


def model_shape(model_dir: str | Path | None) -> tuple[int, int]:
    """(vocab_size, max_position_embeddings) of the checkpoint; (256, 4096) when its directory is unknown."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())  # type: ignore[arg-type]
        return int(config["vocab_size"]), int(config.get("max_position_embeddings") or 4096)
    except (TypeError, OSError, KeyError, ValueError):
        return 256, 4096


@dataclass
class Plan:
    stream_tokens: int
    interval_s: float
    probe_tok_per_s: float  # the warm-up stream's decode rate, alone
    auto: list[str]  # which of the two were derived from the rate (not given on the command line)


def plan_watch(args: Any, base_url: str, model: str, rng: random.Random, vocab: int, max_positions: int) -> Plan:
    """Warm up (one fresh prompt of the prompts' length; one stream alone, whose rate sizes what was not given):
    the watched stream lasts about AUTO_WATCH_S (at least AUTO_MIN_STREAM_TOKENS tokens, within the model's length
    and the API's max_tokens) and the prompts arrive over the first half of it. A tiny model decodes thousands of
    tokens a second, a mid-size one tens: one fixed stream length cannot cover the arrivals on both."""
    httpx.post(f"{base_url}/v1/completions", timeout=args.intertoken_request_timeout_s,
               json={"model": model, "prompt": fresh_ids(rng, args.intertoken_prompt_tokens, vocab),
                     "max_tokens": 2}).raise_for_status()
    probe = CaseResult(case="probe")
    try:
        asyncio.run(asyncio.wait_for(
            watch_case(base_url, model, fresh_ids(rng, STREAM_PROMPT_TOKENS, vocab), [], PROBE_TOKENS, 0.0,
                       args.intertoken_request_timeout_s, probe), timeout=args.intertoken_timeout_s))
    except TimeoutError:
        probe.error = f"timed out after {args.intertoken_timeout_s:.0f} s"
    if probe.error or not probe.watch_s or probe.stream_tokens < 2:
        raise RuntimeError(f"inter-token warm-up stream failed: {probe.error or 'too few events to time'}")
    rate = (probe.stream_tokens - 1) / probe.watch_s
    auto = []
    stream_tokens = args.intertoken_stream_tokens
    if stream_tokens is None:
        auto.append("stream_tokens")
        cap = min(API_MAX_TOKENS, max_positions - STREAM_PROMPT_TOKENS - 8)
        stream_tokens = min(cap, max(AUTO_MIN_STREAM_TOKENS, math.ceil(rate * AUTO_WATCH_S)))
    interval_s = args.intertoken_interval_s
    if interval_s is None:
        auto.append("interval_s")
        interval_s = round(AUTO_ARRIVAL_SHARE * stream_tokens / rate / args.intertoken_prompts, 3)
    return Plan(stream_tokens=stream_tokens, interval_s=interval_s, probe_tok_per_s=round(rate, 1), auto=auto)


def run_case(case: str, args: Any, plan: Plan, base_url: str, model: str, vocab: int, rng: random.Random,
             replicas_since: Callable[[float], list[int]], now: Callable[[], float],
             condition: AbstractContextManager[Any] | None = None) -> CaseResult:
    """One watched stream and its prompts under `condition` (entered for the watch only: Redis paused)."""
    result = CaseResult(case=case)
    stream_ids = fresh_ids(rng, STREAM_PROMPT_TOKENS, vocab)
    prompts = [fresh_ids(rng, args.intertoken_prompt_tokens, vocab) for _ in range(args.intertoken_prompts)]
    before, start = cache_counters(base_url), now()
    with condition or nullcontext():
        try:
            asyncio.run(asyncio.wait_for(
                watch_case(base_url, model, stream_ids, prompts, plan.stream_tokens, plan.interval_s,
                           args.intertoken_request_timeout_s, result),
                timeout=args.intertoken_timeout_s))
        except TimeoutError:
            result.error = f"case timed out after {args.intertoken_timeout_s:.0f} s"
    if result.error:
        result.ok = False  # the gaps of a broken or cut-off stream are not a pass
    seen = replicas_since(start)
    result.replicas_max = max(seen) if seen else None
    after = cache_counters(base_url)
    if before is not None and after is not None:
        result.cache_counters = {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)}
    return result


def intertoken_phase(args: Any, base_url: str, model: str, model_dir: str | Path | None, redis: OwnRedis | None,
                     replicas_since: Callable[[float], list[int]], now: Callable[[], float]) -> dict[str, Any]:
    """Warm-up and plan (`plan_watch`), then "redis healthy", then "redis paused"."""
    seed = secrets.randbits(32)  # fresh prompts every run, recorded
    rng = random.Random(seed)
    vocab, max_positions = model_shape(model_dir)
    plan = plan_watch(args, base_url, model, rng, vocab, max_positions)
    common = (args, plan, base_url, model, vocab, rng, replicas_since, now)
    cases = [run_case("redis healthy", *common)]
    if redis is None:
        cases.append(CaseResult(case="redis paused", skipped="the app was not started by load.py (--url): its "
                                                             "Redis is not this process's to pause"))
    else:
        cases.append(run_case("redis paused", *common, redis.paused()))
    return {
        "target": TARGET_TEXT, "seed": seed, "vocab": vocab, "redis_url": redis.url if redis else None,
        "stream_tokens": plan.stream_tokens, "prompts": args.intertoken_prompts,
        "prompt_tokens": args.intertoken_prompt_tokens, "prompt_max_tokens": PROMPT_MAX_TOKENS,
        "interval_s": plan.interval_s, "auto": plan.auto, "probe_tok_per_s": plan.probe_tok_per_s,
        "cases": [asdict(c) for c in cases],
    }


# --- reporting -------------------------------------------------------------------------------------------------------

def ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f}"


def print_intertoken(report: dict[str, Any]) -> None:
    auto = f" ({' and '.join(report['auto'])} auto, from {report['probe_tok_per_s']:g} tok/s alone)" \
        if report["auto"] else ""
    print(f"\nInter-token gaps: one stream of {report['stream_tokens']} tokens watched while {report['prompts']} fresh "
          f"{report['prompt_tokens']}-token prompts arrive {report['interval_s']:g} s apart{auto}")
    print(f"target: {TARGET_TEXT}")
    print(f"{'case':<14} {'events':>6} {'median ms':>9} {'p99 ms':>8} {'largest ms':>10} {'target ms':>9} "
          f"{'overlap':>7} {'verdict':>7}")
    for c in report["cases"]:
        if c["skipped"]:
            print(f"{c['case']:<14} skipped: {c['skipped']}")
            continue
        verdict = "ok" if c["ok"] else "MISS"
        overlap = f"{c['prompts_overlapped']}/{report['prompts']}"
        print(f"{c['case']:<14} {c['events']:>6} {ms(c['median_gap_s']):>9} {ms(c['p99_gap_s']):>8} "
              f"{ms(c['largest_gap_s']):>10} {ms(c['target_s']):>9} {overlap:>7} {verdict:>7}")
        notes = []
        if c["error"]:
            notes.append(c["error"])
        if c["largest_gap_end_s"] is not None:
            notes.append(f"largest gap ended {c['largest_gap_end_s']:.2f} s after the first token; largest while "
                         f"prompts were in flight {ms(c['largest_gap_busy_s'])} ms, while none were "
                         f"{ms(c['largest_gap_quiet_s'])} ms; watch {c['watch_s']:.2f} s, {c['stream_tokens']} tokens, "
                         f"TTFT {c['ttft_s']:.2f} s")
        if c["prompts_overlapped"] < report["prompts"] and not c["error"]:
            notes.append(f"only {c['prompts_overlapped']} of {report['prompts']} prompts overlapped the watch "
                         f"({c['prompts_sent']} sent, {c['prompts_ok']} ok): raise --intertoken-stream-tokens or "
                         f"lower --intertoken-interval-s")
        if c["replicas_max"] is not None and c["replicas_max"] > 1:
            notes.append(f"{c['replicas_max']} engine replicas: prompts may have gone to another replica")
        if c["cache_counters"]:
            warm = {k.removeprefix(CACHE_METRIC_PREFIX): v for k, v in c["cache_counters"].items() if "warm" in k}
            if warm:
                notes.append("warm tier: " + ", ".join(f"{k} +{v:g}" for k, v in sorted(warm.items())))
        first_error = next((p["error"] for p in c["prompts"] if p["error"]), None)
        if first_error:
            notes.append(f"first prompt error: {first_error}")
        for note in notes:
            print(f"{'':<14} {note}")
