"""Soak run: `moe-serve up` with Redis under mixed traffic for a set time, a replica killed and Redis restarted on
the way; memory, pool and cache sizes and outcomes recorded over time.

Contract: starts its own redis-server (a free loopback port, restarted once on the same port) and `moe-serve up` on
the embedded tiny model with two engine replicas (in a private MOE_SERVE_CACHE), drives traffic at `--rate`
requests/s with at most `--max-in-flight` at once for `--duration-s`, and stops everything by itself. Loopback only.
Traffic, by weight: streamed and whole completions, chat completions, streams the client drops after two events
(aborts), requests the client gives up on before the answer (disconnects), long prompts, a few repeated prompts
(prefix-cache hits), and bad requests that must get a 4xx. Faults: at `--kill-at` of the run one EngineReplica
process gets SIGKILL (its requests must migrate, nothing is lost); at `--redis-restart-at` the redis-server is
killed and started again 2 s later (cache misses, no errors).
Every `--sample-s`: the RSS of every process of the app (the `moe-serve up` process tree: driver, GCS, raylet, Serve
controller and proxy, ingress and engine replicas, redis), the KV pool blocks and cache counters from /metrics,
Redis's memory and key count, and the outcome counts so far.
Reported: outcomes per kind (lost = an unexpected error: a 5xx, a broken stream, a bad request not refused); per
process the RSS slope over the samples after `--warmup` of its life (MiB/min, least squares); targets: nothing lost,
every slope < 1 MiB/min. Writes bench/results/soak.json and, with matplotlib (the `bench` extra), soak_rss.png and
soak_outcomes.png.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
TARGET_SLOPE_MIB_PER_MIN = 1.0
KIND_WEIGHTS = {"stream": 4, "complete": 3, "chat": 2, "abort": 1, "disconnect": 1, "long": 1, "repeat": 3, "bad": 1}
REPEATED = [f"Repeated prompt {i}: the experts of this mixture answer in turn, " * 6 for i in range(4)]
LONG_PROMPT = "A long prompt about routers, shards and caches keeps the prefill busy for a while. " * 60
BAD_BODIES = [{"prompt": "x", "max_tokens": -1}, {"prompt": "", "max_tokens": 4}, {"prompt": "x", "n": 99},
              {"prompt": "x", "temperature": "hot"}]


@dataclass(frozen=True)
class Config:
    duration_s: float
    rate: float
    max_in_flight: int
    kill_at: float  # fraction of the run
    redis_restart_at: float
    sample_s: float
    warmup: float  # fraction of each process's sampled life left out of its slope


# --- the app under test ----------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """A child redis-server on a fixed loopback port that can be killed and started again on it."""

    def __init__(self, workdir: Path) -> None:
        self.port, self.workdir = free_port(), workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise FileNotFoundError("redis-server not found: run `make install`")
        self.proc = subprocess.Popen([binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
                                      "--appendonly", "no", "--maxmemory", "512mb", "--maxmemory-policy",
                                      "allkeys-lru", "--dir", str(self.workdir)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise ConnectionError(f"redis-server did not start on port {self.port}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def info(self) -> dict[str, int] | None:
        import redis

        try:
            with redis.Redis(port=self.port, socket_timeout=1, socket_connect_timeout=1) as client:
                return {"used_memory": int(client.info("memory")["used_memory"]), "keys": int(client.dbsize())}
        except redis.RedisError:
            return None


def start_app(port: int, redis_url: str, cache_dir: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "MOE_SERVE_CACHE": str(cache_dir)}
    cli = Path(sys.executable).with_name("moe-serve")
    proc = subprocess.Popen([str(cli), "up", "--port", str(port), "--redis", redis_url, "--min-replicas", "2",
                             "--max-replicas", "2"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moe-serve up exited with {proc.returncode}: {proc.stdout.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(1)
    stop_app(proc)
    raise TimeoutError("moe-serve up did not answer /v1/models within 300 s")


def stop_app(proc: subprocess.Popen[str]) -> None:
    """Ctrl-C, as a user stops it; the whole process group if it does not go within a minute."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


# --- processes and their memory --------------------------------------------------------------------------------------

def process_tree(root: int) -> dict[int, str]:
    """pid -> a readable name (Ray's process titles, else the command) for root and every descendant."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        children = [p for p, parent in parents.items() if parent == pid and p not in tree]
        tree.update(children)
        frontier += children
    names = {}
    for pid in tree:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        names[pid] = process_name(cmdline)
    return names


def process_name(cmdline: str) -> str:
    if cmdline.startswith("ray::"):  # Ray's title: the actor, then ".method" while it runs one
        return cmdline.split()[0].removeprefix("ray::").split(".")[0]  # e.g. ServeReplica:moe-serve:EngineReplica
    for known in ("gcs_server", "raylet", "redis-server", "dashboard", "log_monitor", "monitor.py",
                  "runtime_env", "moe-serve up"):
        if known in cmdline:
            return known
    return cmdline[:60]


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def engine_replica_pids(root: int) -> list[int]:
    return [pid for pid, name in process_tree(root).items() if "EngineReplica" in name]


# --- traffic ---------------------------------------------------------------------------------------------------------

async def one_request(http: httpx.AsyncClient, kind: str, model: str, rng: random.Random) -> str:
    """The outcome: "ok", "expected" (an abort, a disconnect, a refused bad request) or "lost: why"."""
    body: dict[str, Any] = {"model": model, "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    try:
        if kind == "bad":
            response = await http.post("/v1/completions", json={"model": model, **rng.choice(BAD_BODIES)})
            return "expected" if 400 <= response.status_code < 500 else f"lost: bad request got {response.status_code}"
        if kind == "disconnect":  # gone after 50 ms, or answered within them: either is fine
            with contextlib.suppress(httpx.TimeoutException):
                await http.post("/v1/completions", json={**body, "prompt": "Give up on me", "max_tokens": 64},
                                timeout=0.05)
            return "expected"
        if kind == "chat":
            response = await http.post("/v1/chat/completions", json={**body, "messages": [
                {"role": "user", "content": f"Question {rng.randrange(1000)} for the experts"}]})
            return "ok" if response.status_code == 200 and response.json()["choices"] else \
                f"lost: chat {response.status_code} {response.text[:120]}"
        prompt = {"long": LONG_PROMPT, "repeat": rng.choice(REPEATED)}.get(kind, f"Request {rng.randrange(10**6)}")
        if kind in ("complete", "long"):
            response = await http.post("/v1/completions", json={**body, "prompt": prompt})
            return "ok" if response.status_code == 200 and response.json()["choices"][0]["text"] is not None else \
                f"lost: completion {response.status_code} {response.text[:120]}"
        async with http.stream("POST", "/v1/completions", json={**body, "prompt": prompt, "stream": True}) as r:
            if r.status_code != 200:
                return f"lost: stream {r.status_code} {(await r.aread())[:120]!r}"
            events = 0
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                events += 1
                if kind == "abort" and events == 2:
                    return "expected"  # leaving the block closes the connection mid-stream
                if line == "data: [DONE]":
                    return "ok"
            return f"lost: stream ended without [DONE] after {events} events"
    except httpx.HTTPError as exc:
        return f"lost: {type(exc).__name__}: {exc}"


async def drive(base_url: str, model: str, config: Config, stop_at: float, outcomes: list[dict[str, Any]],
                started: float) -> None:
    rng = random.Random(0)
    kinds, weights = list(KIND_WEIGHTS), list(KIND_WEIGHTS.values())
    in_flight = asyncio.Semaphore(config.max_in_flight)
    tasks: set[asyncio.Task[None]] = set()
    limits = httpx.Limits(max_connections=config.max_in_flight * 2)
    async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits) as http:

        async def run(kind: str) -> None:
            sent = time.monotonic()
            try:
                outcome = await one_request(http, kind, model, rng)
            finally:
                in_flight.release()
            outcomes.append({"t": round(sent - started, 2), "kind": kind, "outcome": outcome,
                             "latency_s": round(time.monotonic() - sent, 3)})

        next_at = time.monotonic()
        while time.monotonic() < stop_at:
            await in_flight.acquire()
            task = asyncio.create_task(run(rng.choices(kinds, weights)[0]))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            next_at += rng.expovariate(config.rate)
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=180)


# --- sampling and faults ---------------------------------------------------------------------------------------------

METRICS = re.compile(r'^(moe_kv_pool_blocks\{state="\w+"\}|moe_cache_(?:hits|misses|errors|writes_dropped)_total'
                     r'\{tier="\w+"\}|moe_request_migrations_total|moe_running_sequences) (\S+)$', re.MULTILINE)


async def sample(base_url: str, app_pid: int, redis: RedisServer, outcomes: list[dict[str, Any]],
                 started: float) -> dict[str, Any]:
    row: dict[str, Any] = {"t": round(time.monotonic() - started, 1)}
    row["rss_mib"] = {f"{name}[{pid}]": rss for pid, name in process_tree(app_pid).items()
                      if (rss := rss_mib(pid)) is not None}
    redis_pid = redis.proc.pid if redis.proc is not None and redis.proc.poll() is None else None
    if redis_pid is not None and (rss := rss_mib(redis_pid)) is not None:
        row["rss_mib"][f"redis-server[{redis_pid}]"] = rss
    try:
        async with httpx.AsyncClient(timeout=10) as http:
            text = (await http.get(f"{base_url}/metrics")).text
        row["metrics"] = {name: float(value) for name, value in METRICS.findall(text)}
    except httpx.HTTPError as exc:
        row["metrics"] = {"error": f"{type(exc).__name__}"}
    row["redis"] = await asyncio.to_thread(redis.info)
    row["outcomes"] = dict(Counter(o["outcome"].split(":")[0] for o in outcomes))
    return row


async def soak(config: Config, workdir: Path) -> dict[str, Any]:
    redis = RedisServer(workdir / "redis")
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    app = start_app(port, redis.url, workdir / "cache")
    events: list[dict[str, Any]] = []
    samples: list[dict[str, Any]] = []
    outcomes: list[dict[str, Any]] = []
    try:
        model = httpx.get(f"{base_url}/v1/models", timeout=10).json()["data"][0]["id"]
        started = time.monotonic()
        stop_at = started + config.duration_s
        traffic = asyncio.create_task(drive(base_url, model, config, stop_at, outcomes, started))
        faults = [(config.kill_at * config.duration_s, "kill an engine replica"),
                  (config.redis_restart_at * config.duration_s, "restart redis")]
        while not traffic.done():
            now = time.monotonic() - started
            for at, fault in list(faults):
                if now >= at:
                    faults.remove((at, fault))
                    events.append({"t": round(now, 1), "event": fault, **await apply_fault(fault, app.pid, redis)})
            samples.append(await sample(base_url, app.pid, redis, outcomes, started))
            await asyncio.wait([traffic], timeout=config.sample_s)
        await traffic
        samples.append(await sample(base_url, app.pid, redis, outcomes, started))
    finally:
        stop_app(app)
        redis.kill()
    return {"events": events, "samples": samples, "outcomes": outcomes}


async def apply_fault(fault: str, app_pid: int, redis: RedisServer) -> dict[str, Any]:
    if fault == "kill an engine replica":
        pids = engine_replica_pids(app_pid)
        if not pids:
            return {"error": "no EngineReplica process found"}
        os.kill(pids[0], signal.SIGKILL)
        return {"pid": pids[0]}
    redis.kill()
    await asyncio.sleep(2)
    redis.start()
    return {"port": redis.port}


# --- report ----------------------------------------------------------------------------------------------------------

def rss_series(samples: list[dict[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    """Per process, "name[pid]" -> [(t, RSS MiB)]: a pid's samples under one name, the last it had (a worker is
    IDLE before it becomes a replica)."""
    by_pid: dict[str, list[tuple[float, float]]] = {}
    names: dict[str, str] = {}
    for row in samples:
        for key, rss in row["rss_mib"].items():
            name, pid = key.rsplit("[", 1)
            by_pid.setdefault(pid, []).append((row["t"], rss))
            names[pid] = name
    return {f"{names[pid]}[{pid}": points for pid, points in by_pid.items()}


def rss_slopes(samples: list[dict[str, Any]], warmup: float) -> dict[str, dict[str, float]]:
    """Per process: first and last RSS and the least-squares slope (MiB/min) after the warm-up share of its life."""
    slopes = {}
    for name, points in rss_series(samples).items():
        kept = points[int(len(points) * warmup):]
        if len(kept) < 4:
            continue
        t, rss = np.array(kept).T
        slope = float(np.polyfit(t / 60, rss, 1)[0]) if t[-1] > t[0] else 0.0
        slopes[name] = {"rss_first_mib": round(float(rss[0]), 1), "rss_last_mib": round(float(rss[-1]), 1),
                        "slope_mib_per_min": round(slope, 3), "minutes": round(float(t[-1] - t[0]) / 60, 2)}
    return slopes


def summarize(run: dict[str, Any], config: Config) -> dict[str, Any]:
    per_kind: dict[str, Counter[str]] = {}
    for o in run["outcomes"]:
        per_kind.setdefault(o["kind"], Counter())[o["outcome"].split(":")[0]] += 1
    lost = [o for o in run["outcomes"] if o["outcome"].startswith("lost")]
    slopes = rss_slopes(run["samples"], config.warmup)
    worst = max(slopes.items(), key=lambda kv: kv[1]["slope_mib_per_min"], default=(None, None))
    return {
        "requests": len(run["outcomes"]),
        "per_kind": {kind: dict(counts) for kind, counts in sorted(per_kind.items())},
        "lost": len(lost),
        "lost_examples": lost[:10],
        "rss": slopes,
        "worst_slope": {"process": worst[0], **(worst[1] or {})},
        "meets_no_loss": not lost,
        "meets_rss_slope": all(s["slope_mib_per_min"] < TARGET_SLOPE_MIB_PER_MIN for s in slopes.values()),
    }


def print_report(summary: dict[str, Any], events: list[dict[str, Any]]) -> None:
    print(f"soak: {summary['requests']} requests; events: " + "; ".join(f"{e['event']} at {e['t']} s" for e in events))
    print(f"{'kind':<12}{'ok':>8}{'expected':>10}{'lost':>8}")
    for kind, counts in summary["per_kind"].items():
        print(f"{kind:<12}{counts.get('ok', 0):>8}{counts.get('expected', 0):>10}{counts.get('lost', 0):>8}")
    print(f"{'process':<52}{'RSS first':>11}{'RSS last':>10}{'MiB/min':>9}{'min':>6}")
    for name, s in sorted(summary["rss"].items(), key=lambda kv: -kv[1]["slope_mib_per_min"]):
        print(f"{name:<52}{s['rss_first_mib']:>11.1f}{s['rss_last_mib']:>10.1f}{s['slope_mib_per_min']:>9.3f}"
              f"{s['minutes']:>6.1f}")
    print(f"targets: nothing lost ({'ok' if summary['meets_no_loss'] else 'MISS'}: {summary['lost']} lost); every RSS "
          f"slope after warm-up < {TARGET_SLOPE_MIB_PER_MIN} MiB/min ({'ok' if summary['meets_rss_slope'] else 'MISS'}:"
          f" worst {summary['worst_slope'].get('slope_mib_per_min')} for {summary['worst_slope'].get('process')})")


def plot(run: dict[str, Any], out_dir: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no plots: matplotlib is not installed (pip install -e '.[bench]')")
        return []
    samples = run["samples"]
    fig, ax = plt.subplots(figsize=(10, 5))
    for name, points in sorted(rss_series(samples).items()):
        ax.plot(*zip(*points), label=name)
    for event in run["events"]:
        ax.axvline(event["t"], color="grey", linestyle="--")
        ax.text(event["t"], ax.get_ylim()[1], event["event"], rotation=90, va="top", fontsize=7)
    ax.set(xlabel="s", ylabel="RSS MiB", title="RSS of every process")
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1, 1))
    fig.tight_layout()
    rss_png = out_dir / "soak_rss.png"
    fig.savefig(rss_png, dpi=100)
    fig, ax = plt.subplots(figsize=(10, 4))
    for key in ("ok", "expected", "lost"):
        ax.plot([row["t"] for row in samples], [row["outcomes"].get(key, 0) for row in samples], label=key)
    cached = [row["metrics"].get('moe_kv_pool_blocks{state="evictable"}') for row in samples]
    keys = [(row["redis"] or {}).get("keys") for row in samples]
    ax2 = ax.twinx()
    ax2.plot([row["t"] for row in samples], cached, color="black", linestyle=":", label="hot-tier KV blocks")
    ax2.plot([row["t"] for row in samples], keys, color="grey", linestyle="--", label="Redis keys")
    ax2.set_ylabel("hot-tier blocks (sampled replica), Redis keys")
    ax2.legend(loc="lower right")
    ax.set(xlabel="s", ylabel="requests so far", title="Outcomes over time")
    ax.legend(loc="upper left")
    fig.tight_layout()
    outcomes_png = out_dir / "soak_outcomes.png"
    fig.savefig(outcomes_png, dpi=100)
    return [str(rss_png), str(outcomes_png)]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration-s", type=float, default=600.0)
    p.add_argument("--rate", type=float, default=4.0, help="requests per second (Poisson arrivals)")
    p.add_argument("--max-in-flight", type=int, default=8)
    p.add_argument("--kill-at", type=float, default=0.33, help="fraction of the run")
    p.add_argument("--redis-restart-at", type=float, default=0.66, help="fraction of the run")
    p.add_argument("--sample-s", type=float, default=5.0)
    p.add_argument("--warmup", type=float, default=0.2, help="share of each process's samples left out of its slope")
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = p.parse_args(argv)
    config = Config(args.duration_s, args.rate, args.max_in_flight, args.kill_at, args.redis_restart_at,
                    args.sample_s, args.warmup)
    workdir = Path(tempfile.mkdtemp(prefix="moe-soak-"))
    try:
        run = asyncio.run(soak(config, workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    summary = summarize(run, config)
    print_report(summary, run["events"])
    args.out.mkdir(parents=True, exist_ok=True)
    plots = plot(run, args.out)
    result = {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "config": asdict(config),
              "cpus": os.cpu_count(), "summary": summary, "events": run["events"], "samples": run["samples"],
              "plots": plots}
    (args.out / "soak.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out / 'soak.json'}")


if __name__ == "__main__":
    main()
