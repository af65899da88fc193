"""Cache benchmark: p50/p99 latency of one block get per remote tier, and TTFT of a 2,048-token prompt with no
cache vs a hot (the engine's own pool), warm and cold hit.

Contract: it starts its own redis-server on a free loopback port (no persistence; never the system Redis) and stops
it at the end. Block gets go through the engine's API (`TieredKVCache.lookup` of one key, a fresh miss in every
tier above the one measured), so the numbers include the thread hop to the cache's I/O loop, Redis, checksum
and decode. Blocks: the bench tiny model's (2 layers, 1 KV head, head_dim 32, block 16: 8 KiB fp32) and a 64 KiB one
(16 layers); values are random normal fp32, which zstd barely compresses (real KV compresses a little better).
Also measured: a 128-block prefix (2,048 tokens) in one batched lookup, and a plain redis-py GET of the same
value as the floor. Targets (issue 5): block get p50 warm < 0.5 ms, cold < 5 ms (a hot hit is a pool table entry,
no get).
Prints a table and writes `bench/results/cache.json`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis
import torch

from moe_serve.cache import CacheConfig, KVLayout, TieredKVCache
from moe_serve.cache.keys import WARM_PREFIX

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_FILE = BENCH_DIR / "results" / "cache.json"
DEFAULT_MODEL_DIR = BENCH_DIR / ".models" / "tiny-mixtral"
REDIS_SERVER_BIN = "/usr/bin/redis-server"
TARGETS_MS = {"warm": 0.5, "cold": 5.0}  # p50 of one block get
BLOCKS = {
    "tiny-8KiB": KVLayout(block_size=16, num_layers=2, num_kv_heads=1, head_dim=32),
    "64KiB": KVLayout(block_size=16, num_layers=16, num_kv_heads=2, head_dim=16),
}
PREFIX_TOKENS = 2048
MODEL_FP = "bench-cache"


# --- redis-server ------------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def redis_server() -> Iterator[int]:
    """A private redis-server on a free loopback port, stopped on exit."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="bench-redis-") as workdir:
        proc = subprocess.Popen([REDIS_SERVER_BIN, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                 "--appendonly", "no", "--dir", workdir],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    redis.Redis(port=port).ping()
                    break
                except redis.ConnectionError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError("redis-server did not start") from None
                    time.sleep(0.01)
            yield port
        finally:
            proc.terminate()
            proc.wait(10)


# --- block gets --------------------------------------------------------------------------------------------------

def percentiles_ms(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3  # noqa: E731
    return {"p50_ms": round(pick(0.50), 4), "p99_ms": round(pick(0.99), 4),
            "mean_ms": round(statistics.fmean(samples) * 1e3, 4), "n": len(samples)}


def time_calls(fn: Callable[[], object], repeats: int, warmup: int = 50) -> list[float]:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return samples


def tier_configs(port: int, cold_dir: Path) -> dict[str, CacheConfig]:
    """One cache per measured tier, holding only that tier, so every get is served by it."""
    warm = f"redis://127.0.0.1:{port}/0"
    return {
        "warm": CacheConfig(warm_url=warm, touch_on_hit=False),
        "cold": CacheConfig(cold_url=f"redis://127.0.0.1:{port}/1"),
        "cold-int8": CacheConfig(cold_url=f"redis://127.0.0.1:{port}/2", cold_int8=True),
        "cold-dir": CacheConfig(cold_url=str(cold_dir)),
    }


def bench_block_gets(port: int, repeats: int) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-cold-") as cold_dir:
        for block_name, layout in BLOCKS.items():
            ids = torch.randint(3, 500, (PREFIX_TOKENS,), generator=torch.Generator().manual_seed(0)).tolist()
            generator = torch.Generator().manual_seed(1)
            for tier, config in tier_configs(port, Path(cold_dir) / block_name).items():
                with TieredKVCache(config, MODEL_FP, layout) as cache:
                    keys = cache.block_keys(ids)
                    blocks = [torch.randn(layout.block_shape, generator=generator) for _ in keys]
                    cache.store(keys, blocks)
                    assert cache.flush(30)
                    one = keys[:1]
                    assert cache.lookup(one).num_blocks == 1
                    row = {"block": block_name, "block_bytes": layout.block_bytes, "tier": tier,
                           **percentiles_ms(time_calls(lambda: cache.lookup(one), repeats))}
                    prefix = time_calls(lambda: cache.lookup(keys), max(20, repeats // 20), warmup=5)
                    assert cache.lookup(keys).num_blocks == len(keys)
                    row["prefix_2048_p50_ms"] = percentiles_ms(prefix)["p50_ms"]
                    row["stored_bytes_per_block"] = stored_bytes(cache, tier)
                    rows.append(row)
            rows.append(raw_get_row(port, block_name, layout, repeats))
    return rows


def stored_bytes(cache: TieredKVCache, tier: str) -> int | None:
    name = "warm" if tier == "warm" else "cold" if tier.startswith("cold") else None
    if name is None:
        return None
    counters = cache.stats_dict()["tiers"][name]  # type: ignore[index]
    return counters["bytes_written"] // max(counters["writes"], 1)


def raw_get_row(port: int, block_name: str, layout: KVLayout, repeats: int) -> dict[str, Any]:
    """The floor: a synchronous redis-py (hiredis) GET of a value of the same size, no header, no decode."""
    client = redis.Redis(port=port, db=3)
    client.set(WARM_PREFIX + "raw", os.urandom(layout.block_bytes))
    samples = time_calls(lambda: client.get(WARM_PREFIX + "raw"), repeats)
    client.close()
    return {"block": block_name, "block_bytes": layout.block_bytes, "tier": "redis-py GET (floor)",
            **percentiles_ms(samples)}


# --- TTFT ---------------------------------------------------------------------------------------------------------

def bench_ttft(model_dir: Path, port: int, prompt_tokens: int = PREFIX_TOKENS, repeats: int = 3) -> dict[str, Any]:
    """TTFT of one `prompt_tokens` prompt: no cache vs hot hit vs warm hit (a fresh engine reading Redis) vs cold
    hit (warm emptied). Target: warm hit >= 8x faster than no cache."""
    from dataclasses import replace

    from moe_serve.replicas.engine import EngineConfig, LLMEngine
    from moe_serve.replicas.sampling import SamplingParams

    base = EngineConfig(max_num_batched_tokens=prompt_tokens, kv_cache_bytes=512 * 2**20)
    warm_url, cold_url = f"redis://127.0.0.1:{port}/4", f"redis://127.0.0.1:{port}/5"
    prompt = torch.randint(3, 500, (prompt_tokens,), generator=torch.Generator().manual_seed(7)).tolist()
    params = SamplingParams(max_tokens=1, temperature=0.0)

    def make_engine(cache: CacheConfig | None) -> LLMEngine:
        return LLMEngine.from_pretrained(model_dir, replace(base, cache=cache, enable_prefix_caching=cache is not None))

    def ttft(engine: LLMEngine) -> float:
        out = engine.generate([prompt], params)[0]
        assert out.ttft_s is not None
        return out.ttft_s

    def fresh_ttft(cache: CacheConfig) -> float:
        engine = make_engine(cache)
        try:
            return ttft(engine)
        finally:
            engine.prefix_cache.close()

    def flush_warm() -> None:
        with redis.Redis(port=port, db=4) as client:
            client.flushdb()

    results: dict[str, Any] = {"status": "ok", "prompt_tokens": prompt_tokens}
    plain = make_engine(None)
    ttft(plain)  # warm-up (kernels, allocator)
    results["no_cache_s"] = statistics.median(ttft(plain) for _ in range(repeats))
    writer = make_engine(CacheConfig(warm_url=warm_url, cold_url=cold_url))
    ttft(writer)  # computes every block and stores the full ones behind the request
    assert writer.prefix_cache.flush(60)
    results["hot_hit_s"] = statistics.median(ttft(writer) for _ in range(repeats))
    writer.prefix_cache.close()
    results["warm_hit_s"] = statistics.median(fresh_ttft(CacheConfig(warm_url=warm_url)) for _ in range(repeats))
    cold_times = []
    for _ in range(repeats):
        flush_warm()  # only cold has the blocks (also undoes the last promotion into warm)
        cold_times.append(fresh_ttft(CacheConfig(warm_url=warm_url, cold_url=cold_url)))
    results["cold_hit_s"] = statistics.median(cold_times)
    results["warm_speedup"] = results["no_cache_s"] / results["warm_hit_s"]
    return results


# --- report ------------------------------------------------------------------------------------------------------

def print_table(rows: list[dict[str, Any]], ttft: dict[str, Any]) -> None:
    print(f"{'block':>10} {'tier':>22} {'p50 ms':>9} {'p99 ms':>9} {'target':>8} {'2048-tok prefix p50 ms':>23} "
          f"{'stored B/block':>15}")
    for row in rows:
        target = TARGETS_MS.get(row["tier"].split("-")[0]) if "floor" not in row["tier"] else None
        mark = "" if target is None else ("ok" if row["p50_ms"] < target else "MISS")
        print(f"{row['block']:>10} {row['tier']:>22} {row['p50_ms']:>9.4f} {row['p99_ms']:>9.4f} "
              f"{(f'<{target} ' + mark) if target else '':>8} {row.get('prefix_2048_p50_ms', ''):>23} "
              f"{row.get('stored_bytes_per_block') or '':>15}")
    print("TTFT:", json.dumps(ttft))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2000, help="timed gets per tier and block size")
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR, help="tiny model for the TTFT part")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    with redis_server() as port:
        rows = bench_block_gets(port, args.repeats)
        if args.model_dir.is_dir():
            ttft = bench_ttft(args.model_dir, port)
        else:
            ttft = {"status": "skipped", "reason": f"no model at {args.model_dir}"}
        redis_version = redis.Redis(port=port).info("server")["redis_version"]
    print_table(rows, ttft)
    report = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
        "redis_server": redis_version, "redis_py": redis.__version__,
        "load_avg_before": load_before, "load_avg_after": os.getloadavg(),
        "targets_p50_ms": TARGETS_MS, "block_gets": rows, "ttft": ttft,
    }
    RESULTS_FILE.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_FILE.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {RESULTS_FILE}")


if __name__ == "__main__":
    main()
