"""Faults: Redis killed, stalled or full. Lookups degrade to misses within the timeout, the circuit opens and
stops the waiting, writes are dropped, and caching comes back by itself; eviction under maxmemory never serves a
wrong block (a chain with a hole gives the prefix up to the hole)."""

from __future__ import annotations

import time
from typing import Any

from moe_serve.cache import CacheConfig, TieredKVCache
from moe_serve.cache.keys import WARM_PREFIX
from test_cache_redis import LAYOUT, MODEL, make_blocks, make_prompt, same, stored

TIMEOUT_S = 0.3
COOLDOWN_S = 0.5
# Scheduling slack: other processes can starve this one for a few hundred ms on a loaded 2-core machine. Either
# bound is far below the 5 s socket timeout a hang would take.
SLACK_S = 0.5
NO_WAIT_S = 0.25  # below TIMEOUT_S: a lookup that did not wait on Redis


def warm_only(server: Any, **overrides: Any) -> TieredKVCache:
    config = dict(warm_url=server.url(), lookup_timeout_s=TIMEOUT_S, write_timeout_s=TIMEOUT_S,
                  breaker_failures=3, breaker_cooldown_s=COOLDOWN_S)
    return TieredKVCache(CacheConfig(**{**config, **overrides}), MODEL, LAYOUT)


def timed_lookup(cache: TieredKVCache, keys: list[str]) -> tuple[int, float]:
    start = time.perf_counter()
    found = cache.lookup(keys)
    return found.num_blocks, time.perf_counter() - start


def wait_until(predicate: Any, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def resumes(cache: TieredKVCache, seed: int) -> bool:
    """Store and read back a new prefix: True once the warm tier works again."""
    keys, blocks = cache.block_keys(make_prompt(2, seed)), make_blocks(2, seed)
    cache.store(keys, blocks)
    cache.flush()
    return same(cache.lookup(keys).blocks, blocks)


def test_killed_redis_gives_quick_misses_opens_the_circuit_and_recovers(make_redis: Any) -> None:
    server = make_redis()
    # a cooldown the six lookups cannot outlast on a loaded machine (else one half-open probe fails in between)
    with warm_only(server, breaker_cooldown_s=2.0) as cache:
        keys, _ = stored(cache, 4)
        assert cache.lookup(keys).num_blocks == 4
        # the hit's TTL refresh is written behind: let it finish first, or its success, landing after the kill,
        # resets the breaker's count of consecutive failures and one more lookup waits on the dead server
        assert cache.flush()
        server.kill()
        for _ in range(6):
            found, seconds = timed_lookup(cache, keys)
            assert found == 0 and seconds < TIMEOUT_S + SLACK_S
        stats = cache.stats_dict()
        assert stats["circuit"]["warm"] == "open" and stats["tiers"]["warm"]["errors"] >= 3
        assert stats["tiers"]["warm"]["skipped_by_circuit"] >= 3  # no more waiting on a dead server
        start = time.perf_counter()
        cache.store(keys, make_blocks(4))  # fire and forget, dropped while the circuit is open
        assert time.perf_counter() - start < NO_WAIT_S and cache.flush(2.0)
        server.start()  # same port, empty (no persistence)
        wait_until(lambda: resumes(cache, seed=1), timeout_s=10.0)
        assert cache.stats_dict()["circuit"]["warm"] == "closed"
        assert cache.stats_dict()["tiers"]["warm"]["writes_dropped"] >= 4


def test_stalled_redis_costs_at_most_the_timeout_until_the_circuit_opens(make_redis: Any) -> None:
    server = make_redis()
    with warm_only(server, breaker_cooldown_s=2.0) as cache:  # open through the last lookup, as above
        keys, _ = stored(cache, 4)
        server.pause()  # SIGSTOP: connections accept, nothing answers
        try:
            seconds = [timed_lookup(cache, keys) for _ in range(5)]
            assert all(n == 0 and s < TIMEOUT_S + SLACK_S for n, s in seconds), seconds
            assert all(s < NO_WAIT_S for _, s in seconds[3:]), seconds  # open: no more waiting
            warm = cache.stats_dict()["tiers"]["warm"]
            assert warm["timeouts"] == 3 and warm["skipped_by_circuit"] == 2
        finally:
            server.resume()
        wait_until(lambda: cache.lookup(keys).num_blocks == 4, timeout_s=10.0)  # the data survived the stall
        assert cache.stats_dict()["circuit"]["warm"] == "closed"


def test_maxmemory_allkeys_lru_evictions_leave_correct_prefixes(make_redis: Any) -> None:
    server = make_redis("--maxmemory", "3mb", "--maxmemory-policy", "allkeys-lru")
    prompts = 30
    with warm_only(server, lookup_timeout_s=2.0, write_timeout_s=5.0) as writer:
        written = [stored(writer, 16, seed=s) for s in range(prompts)]  # ~4 MB of blocks into 3 MB
        assert writer.stats_dict()["redis_errors"] == 0
    with server.client() as client:
        assert client.info("stats")["evicted_keys"] > 0
    found_total = 0
    with warm_only(server, lookup_timeout_s=2.0) as reader:
        for keys, blocks in written:
            found = reader.lookup(keys)
            assert same(found.blocks, blocks[: found.num_blocks])  # a prefix, and exactly the right blocks
            found_total += found.num_blocks
    assert 0 < found_total < prompts * 16
    # an explicit hole in a complete chain. Emptied and unbounded first: approximate LRU may evict fresh keys,
    # and the generous timeouts keep a loaded machine from turning the lookup into a miss.
    with server.client() as client:
        client.flushall()
        client.config_set("maxmemory", 0)
    with warm_only(server, lookup_timeout_s=2.0, write_timeout_s=5.0) as cache:
        keys, blocks = stored(cache, 8, seed=99)
        with server.client() as client:
            client.delete(WARM_PREFIX + keys[5])
        found = cache.lookup(keys)
        assert found.num_blocks == 5 and same(found.blocks, blocks[:5])


def test_a_full_redis_rejects_writes_without_breaking_lookups(make_redis: Any) -> None:
    server = make_redis("--maxmemory", "2mb", "--maxmemory-policy", "noeviction")
    with warm_only(server, lookup_timeout_s=2.0, write_timeout_s=5.0) as cache:
        early_keys, early_blocks = stored(cache, 4, seed=0)
        for seed in range(1, 40):
            stored(cache, 16, seed=seed)
        stats = cache.stats_dict()["tiers"]["warm"]
        assert stats["writes_dropped"] > 0 and stats["errors"] == 0  # OOM rejections are not outages
        assert cache.stats_dict()["circuit"]["warm"] == "closed"
        found = cache.lookup(early_keys)
        assert found.num_blocks == 4 and same(found.blocks, early_blocks)


def test_no_redis_at_all_serves_misses_and_drops_writes(make_redis: Any) -> None:
    server = make_redis()
    server.kill()  # a URL where nothing listens
    config = CacheConfig(warm_url=server.url(), lookup_timeout_s=TIMEOUT_S)
    with TieredKVCache(config, MODEL, LAYOUT) as cache:
        keys = cache.block_keys(make_prompt(3))
        assert cache.lookup(keys).num_blocks == 0
        cache.store(keys, make_blocks(3))
        assert cache.flush(5.0)
        assert cache.lookup(keys).num_blocks == 0
        stats = cache.stats_dict()["tiers"]["warm"]
        assert stats["writes"] == 0 and stats["writes_dropped"] + stats["skipped_by_circuit"] > 0
