"""The remote KV tiers against a real redis-server: TTLs, existence checks, one-round-trip lookups, demotion and
promotion over warm -> cold, other processes, corrupt and foreign values, the cost model, metrics. (The hot tier
is the engine's pool: test_replicas_prefix.py.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from moe_serve.cache import BlockCodec, CacheConfig, KVLayout, TieredKVCache
from moe_serve.cache.codec import FLAG_ZSTD, Header
from moe_serve.cache.keys import COLD_PREFIX, WARM_PREFIX

LAYOUT = KVLayout(block_size=16, num_layers=2, num_kv_heads=2, head_dim=16)
MODEL = "model-a"


def make_cache(server: Any, model: str = MODEL, **overrides: Any) -> TieredKVCache:
    config = dict(warm_url=server.url(0), cold_url=server.url(1), lookup_timeout_s=2.0)
    return TieredKVCache(CacheConfig(**{**config, **overrides}), model, LAYOUT)


def make_prompt(num_blocks: int, seed: int = 0) -> list[int]:
    return torch.randint(3, 500, (num_blocks * LAYOUT.block_size,), generator=torch.Generator().manual_seed(seed)
                         ).tolist()


def make_blocks(num: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(LAYOUT.block_shape, generator=generator) for _ in range(num)]


def stored(cache: TieredKVCache, num_blocks: int, seed: int = 0) -> tuple[list[str], list[torch.Tensor]]:
    keys, blocks = cache.block_keys(make_prompt(num_blocks, seed)), make_blocks(num_blocks, seed)
    cache.store(keys, blocks)
    assert cache.flush()
    return keys, blocks


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def calls(server: Any, command: str) -> int:
    with server.client() as client:
        return client.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0)


def test_a_fresh_cache_reads_what_another_wrote(redis_db: Any) -> None:
    with make_cache(redis_db) as writer:
        keys, blocks = stored(writer, 6)
    with make_cache(redis_db) as reader:
        found = reader.lookup(keys + reader.block_keys(make_prompt(2, seed=9)))  # a longer, partly unknown list
        assert found.tiers == ["warm"] * 6 and same(found.blocks, blocks)
        assert found.cached_tokens == 6 * 16 and found.tokens_by_tier == {"hot": 0, "warm": 96, "cold": 0}


def test_every_key_written_has_a_ttl(redis_db: Any) -> None:
    with make_cache(redis_db, warm_ttl_s=600, cold_ttl_s=7200) as cache:
        stored(cache, 5)
        stored(cache, 3, seed=1)
    for db, low, high in ((0, 0, 600_000), (1, 600_000, 7_200_000)):
        with redis_db.client(db) as client:
            keys = list(client.scan_iter())
            assert len(keys) == 8
            assert all(low < client.pttl(k) <= high for k in keys), db


def test_existence_check_prevents_rewrites(redis_db: Any) -> None:
    with make_cache(redis_db) as first:
        keys, blocks = stored(first, 8)
    with redis_db.client() as client:
        client.config_resetstat()
    with make_cache(redis_db) as second:  # knows nothing locally: only the existence check can stop it
        second.store(keys, blocks)
        assert second.flush()
        stats = second.stats_dict()["tiers"]
    assert calls(redis_db, "set") == 0 and calls(redis_db, "exists") == 2 * 8  # warm and cold
    assert stats["warm"]["writes"] == 0 and stats["warm"]["writes_skipped_present"] == 8


def test_a_prefix_lookup_is_one_round_trip(redis_db: Any) -> None:
    with make_cache(redis_db) as writer:
        keys, _ = stored(writer, 12)
    with redis_db.client() as client:
        client.config_resetstat()
    with make_cache(redis_db) as reader:
        assert len(reader.lookup(keys).blocks) == 12
    assert calls(redis_db, "mget") == 1 and calls(redis_db, "get") == 0


def test_demotion_and_promotion_across_warm_and_cold(redis_db: Any) -> None:
    warm, cold = redis_db.client(0), redis_db.client(1)
    with make_cache(redis_db) as cache:
        keys, blocks = stored(cache, 4)
        # warm blocks are kept cold, compressed
        assert warm.dbsize() == 4 and cold.dbsize() == 4
        assert Header.unpack(cold.get(COLD_PREFIX + keys[0])).flags & FLAG_ZSTD
        # demotion (the engine's pool evicts keys 2 and 3) after warm lost everything (a restart)
        warm.flushdb()
        cache.demote(keys[2:], blocks[2:])
        assert cache.flush()
        assert {WARM_PREFIX + k for k in keys[2:]} == {k.decode() for k in warm.scan_iter()}
        assert cache.stats_dict()["tiers"]["warm"]["demotions"] == 2
    warm.flushdb()  # as if every warm key expired: cold still has them
    with make_cache(redis_db) as fresh:
        found = fresh.lookup(keys)
        assert found.tiers == ["cold"] * 4 and same(found.blocks, blocks)
        assert fresh.flush()
        assert fresh.stats_dict()["tiers"]["warm"]["promotions"] == 4  # cold hit -> warm
    with make_cache(redis_db) as other:
        assert other.lookup(keys).tiers == ["warm"] * 4
    warm.close()
    cold.close()


def test_warm_keys_expire_and_cold_keeps_them(redis_db: Any) -> None:
    import time

    with make_cache(redis_db, warm_ttl_s=0.2) as cache:
        keys, blocks = stored(cache, 3)
    time.sleep(0.3)
    with make_cache(redis_db, warm_ttl_s=0.2) as fresh:
        found = fresh.lookup(keys)
        assert found.tiers == ["cold"] * 3 and same(found.blocks, blocks)


def test_int8_cold_tier_in_a_directory_is_lossy_and_never_promoted_to_warm(redis_db: Any, tmp_path: Path) -> None:
    with make_cache(redis_db, cold_url=str(tmp_path), cold_int8=True) as cache:
        keys, blocks = stored(cache, 4)
    assert len(list(tmp_path.glob("??/*"))) == 4
    with redis_db.client() as client:
        client.flushdb()
    with make_cache(redis_db, cold_url=str(tmp_path), cold_int8=True) as fresh:
        found = fresh.lookup(keys)
        assert found.tiers == ["cold"] * 4 and found.lossy_blocks == 4
        assert all(torch.allclose(a, b, atol=0.05) for a, b in zip(found.blocks, blocks))
        assert fresh.flush()
    with redis_db.client() as client:
        assert client.dbsize() == 0  # approximate blocks never pose as exact ones in warm


_WRITER = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_cache_redis import LAYOUT, MODEL, make_blocks, make_prompt
from moe_serve.cache import CacheConfig, TieredKVCache
with TieredKVCache(CacheConfig(warm_url={url!r}), MODEL, LAYOUT) as cache:
    cache.store(cache.block_keys(make_prompt(5, seed=3)), make_blocks(5, seed=3))
    assert cache.flush()
"""


def test_blocks_written_by_another_process_are_reused(redis_db: Any) -> None:
    script = _WRITER.format(tests=str(Path(__file__).parent), url=redis_db.url(0))
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    with make_cache(redis_db) as cache:
        found = cache.lookup(cache.block_keys(make_prompt(5, seed=3)))
        assert found.tiers == ["warm"] * 5 and same(found.blocks, make_blocks(5, seed=3))


def test_corrupt_foreign_and_truncated_values_are_counted_misses(redis_db: Any) -> None:
    with make_cache(redis_db, cold_url=None) as cache:
        keys, blocks = stored(cache, 6)
    with redis_db.client() as client:
        value = client.get(WARM_PREFIX + keys[4])
        flipped = bytearray(value)
        flipped[-1] ^= 1
        client.set(WARM_PREFIX + keys[4], bytes(flipped))  # checksum
        client.set(WARM_PREFIX + keys[2], value[:-10])  # truncated
        client.set(WARM_PREFIX + keys[0], BlockCodec("model-b", LAYOUT).encode(keys[0], blocks[0]))  # foreign
    with make_cache(redis_db, cold_url=None) as fresh:
        assert fresh.lookup(keys).blocks == []
        assert fresh.lookup(keys[1:2]).tiers == ["warm"]
        assert same(fresh.lookup(keys[3:]).blocks, blocks[3:4])  # stops before the corrupt block
        assert fresh.lookup(keys[2:]).blocks == []
        corrupt = fresh.stats_dict()["corrupt"]
        assert corrupt["owner"] == 1 and corrupt["checksum"] == 1 and corrupt["truncated"] == 1
        assert fresh.flush()
    with redis_db.client() as client:  # corrupt values are deleted, so a good copy can take their place
        assert client.exists(*(WARM_PREFIX + keys[i] for i in (0, 2, 4))) == 0


def test_a_corrupt_warm_value_is_served_from_cold_and_repaired(redis_db: Any) -> None:
    with make_cache(redis_db) as cache:
        keys, blocks = stored(cache, 3)
    with redis_db.client() as client:
        client.set(WARM_PREFIX + keys[1], b"garbage")
    with make_cache(redis_db) as fresh:
        found = fresh.lookup(keys)
        assert found.tiers == ["warm", "cold", "cold"] and same(found.blocks, blocks)
        assert fresh.flush()
    with make_cache(redis_db) as other:
        assert other.lookup(keys).tiers == ["warm"] * 3


def test_fetch_is_skipped_when_recompute_is_cheaper(redis_db: Any) -> None:
    with make_cache(redis_db) as cache:
        keys, _ = stored(cache, 4)
    with make_cache(redis_db) as fast_engine:
        fast_engine.report_prefill(10_000, 1e-6)  # 0.1 ns per token: nothing is worth fetching
        assert fast_engine.lookup(keys).blocks == []
        stats = fast_engine.stats_dict()
        assert stats["fetch_skipped_by_cost"] == 8  # 4 blocks, warm and cold
        assert stats["tiers"]["warm"]["get_calls"] == 0
    with make_cache(redis_db) as slow_engine:
        slow_engine.report_prefill(100, 1.0)  # 10 ms per token: fetching wins
        assert slow_engine.lookup(keys).tiers == ["warm"] * 4
        assert slow_engine.stats_dict()["fetch_skipped_by_cost"] == 0


def test_metrics_as_dict_and_prometheus_text(redis_db: Any) -> None:
    with make_cache(redis_db) as cache:
        keys, _ = stored(cache, 2)
        cache.lookup(keys)
        stats = cache.stats_dict()
        text = cache.prometheus_text().decode()
    assert stats["tiers"]["warm"]["hits"] == 2 and stats["tiers"]["warm"]["bytes_read"] == 2 * LAYOUT.block_bytes
    assert stats["circuit"] == {"warm": "closed", "cold": "closed"} and stats["redis_errors"] == 0
    for line in ('moe_cache_hits_total{tier="warm"} 2.0', 'moe_cache_circuit_state{tier="cold"} 0.0',
                 'moe_cache_get_seconds_count{tier="warm"} 1.0', 'moe_cache_corrupt_total{kind="checksum"} 0.0',
                 "moe_cache_skipped_by_cost_total", 'moe_cache_errors_total{tier="warm"} 0.0'):
        assert line in text, line


def test_lookup_async_resolves_without_blocking_and_close_is_final(redis_db: Any) -> None:
    with make_cache(redis_db) as writer:
        keys, blocks = stored(writer, 4)
    cache = make_cache(redis_db)
    future = cache.lookup_async(keys)
    found = future.result(5)
    assert found.tiers == ["warm"] * 4 and same(found.blocks, blocks)
    cache.close()
    cache.close()
    assert cache.lookup_async(keys).result(5).blocks == []  # after close: a miss at once, no error
    cache.store(cache.block_keys(make_prompt(1, seed=5)), make_blocks(1, seed=5))


def test_drain_writes_blocks_lost_from_warm_back_for_other_replicas(redis_db: Any) -> None:
    """A replica going away hands its pool's blocks down: warm keys evicted meanwhile come back, present ones stay."""
    with make_cache(redis_db, cold_url=None, max_pending_blocks=12) as leaving:  # drains in chunks of 6
        keys, blocks = stored(leaving, 10)
        with redis_db.client(0) as client:
            client.delete(*list(client.scan_iter())[:7])  # as allkeys-lru eviction or an expired TTL would
            assert client.dbsize() == 3
        assert leaving.drain(list(zip(keys, blocks))) == 10
        with redis_db.client(0) as client:
            assert client.dbsize() == 10
    with make_cache(redis_db, cold_url=None) as survivor:
        found = survivor.lookup(keys)
        assert found.tiers == ["warm"] * 10 and same(found.blocks, blocks)
