"""One KV pool: prompt blocks shared by key and refcounted, kept evictable after their requests (the hot tier), and
remote lookups that never hold up a step."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import random_prompts

from moe_serve.cache import CacheConfig
from moe_serve.replicas.block_pool import BlockPool, OutOfBlocks
from moe_serve.replicas.engine import EngineConfig, LLMEngine
from moe_serve.replicas.kv_cache import lazily_zeroed
from moe_serve.replicas.sampling import SamplingParams

BLOCK = 16
PREFIX, OWN, NEW, REQUESTS = 1024, 32, 32, 32


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def engine_for(model_dir: Path, **overrides: Any) -> LLMEngine:
    config = {"block_size": BLOCK, "kv_cache_bytes": 64 << 20, "max_num_seqs": REQUESTS, **overrides}
    return LLMEngine.from_pretrained(model_dir, EngineConfig(**config))


def shared_prefix_prompts(seed: int, requests: int = REQUESTS, own: int = OWN) -> list[list[int]]:
    [prefix] = random_prompts([PREFIX], 256, seed=seed)
    return [prefix + tail for tail in random_prompts([own] * requests, 256, seed=seed + 1)]


def assert_no_references(engine: LLMEngine) -> None:
    pool = engine.kv.pool
    assert all(pool.refcount(b) == 0 for b in range(pool.num_blocks))
    assert pool.stats().in_use == 0 and pool.num_free == pool.num_blocks


# --- the pool on its own --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_pool_memory_is_zero_writable_and_shaped(dtype: torch.dtype) -> None:
    pages = lazily_zeroed((64, 2, 4, 32), dtype)
    assert pages.shape == (64, 2, 4, 32) and pages.dtype == dtype and pages.is_contiguous()
    assert not pages.any()
    pages[3, 1] = 1.5
    assert pages.sum().item() == 1.5 * 4 * 32


def test_pool_shares_registered_blocks_and_evicts_least_recently_freed_first() -> None:
    evicted: list[str] = []
    pool = BlockPool(4, on_evict=lambda key, block: evicted.append(key))
    a = pool.allocate(2)
    assert pool.register("k0", a[0]) and pool.register("k1", a[1])
    assert not pool.register("k0", 99) and not pool.register("other", a[0])  # one key per block, one block per key
    assert pool.cached_prefix(["k0", "k1", "k2"]) == a
    pool.take(a)  # a second request shares both
    assert pool.stats().shared == 2 and pool.num_free == 2
    pool.free(a)
    pool.free(a)  # the last reference: cached, evictable, still findable
    assert pool.stats().evictable == 2 and pool.cached_prefix(["k0", "k1"]) == a
    pool.allocate(2)  # free blocks go first
    assert evicted == []
    pool.allocate(1)  # then the tail of the last sequence freed, before its head
    assert evicted == ["k1"] and pool.cached_prefix(["k0", "k1"]) == a[:1]
    with pytest.raises(OutOfBlocks):
        pool.allocate(2)


# --- the engine -----------------------------------------------------------------------------------------------------

def test_requests_sharing_a_prefix_hold_it_once(mixtral_dir: Path) -> None:
    engine = engine_for(mixtral_dir)
    prompts = shared_prefix_prompts(seed=40)
    ids = [engine.add_request(p, greedy(NEW)) for p in prompts]
    most_shared = 0
    while engine.has_unfinished():
        engine.step()
        most_shared = max(most_shared, engine.kv_stats()["blocks_shared"])
    outputs = [engine.pop_result(i) for i in ids]
    own_blocks = -(-(OWN + NEW) // BLOCK) + 1  # a request's own tokens, plus the block it may straddle
    assert most_shared == PREFIX // BLOCK
    assert engine.kv_stats()["peak_blocks_in_use"] <= PREFIX // BLOCK + REQUESTS * own_blocks
    assert sum(o.cached_tokens == PREFIX for o in outputs) >= REQUESTS - 1  # the first computes the prefix
    assert_no_references(engine)
    assert engine.kv_stats()["blocks_evictable"] >= PREFIX // BLOCK  # kept as the hot tier after the requests


def test_sharing_changes_no_greedy_output(mixtral_dir: Path) -> None:
    prompts = shared_prefix_prompts(seed=41, requests=8)
    shared = engine_for(mixtral_dir).generate(prompts, greedy(12))
    private = engine_for(mixtral_dir, enable_prefix_caching=False).generate(prompts, greedy(12))
    assert [o.token_ids for o in shared] == [o.token_ids for o in private]
    assert sum(o.cached_tokens for o in shared) > 0 and all(o.cached_tokens == 0 for o in private)


def test_eviction_never_takes_a_block_a_running_request_uses(mixtral_dir: Path) -> None:
    """A pool too small for everything: cached blocks are evicted and sequences preempted while others share a
    prefix, and every output still equals the private computation."""
    prompts = shared_prefix_prompts(seed=42, requests=4) + random_prompts([600, 500, 700], 256, seed=43)
    expected = [o.token_ids for o in engine_for(mixtral_dir, enable_prefix_caching=False).generate(prompts, greedy(24))]
    block_bytes = engine_for(mixtral_dir).kv.spec.block_bytes
    small = engine_for(mixtral_dir, kv_cache_bytes=150 * block_bytes)
    small.generate(shared_prefix_prompts(seed=42, requests=1, own=40), greedy(1))  # the prefix, cached
    assert [o.token_ids for o in small.generate(prompts, greedy(24))] == expected
    assert small.scheduler.num_preemptions > 0 or small.kv.pool.stats().evictable < PREFIX // BLOCK
    assert_no_references(small)


def test_references_return_to_zero_on_abort(mixtral_dir: Path) -> None:
    engine = engine_for(mixtral_dir)
    prompts = shared_prefix_prompts(seed=44, requests=3)
    ids = [engine.add_request(p, greedy(50)) for p in prompts]
    for _ in range(6):
        engine.step()
    assert engine.kv_stats()["blocks_shared"] > 0
    for request_id in ids:
        engine.abort_request(request_id)
        engine.pop_result(request_id)
    assert_no_references(engine)


def test_paused_redis_delays_no_step_and_a_timed_out_lookup_recomputes(mixtral_dir: Path, make_redis: Any) -> None:
    redis = make_redis()
    prompts = random_prompts([300, 200, 250], 256, seed=45)
    expected = [o.token_ids for o in engine_for(mixtral_dir, enable_prefix_caching=False).generate(prompts, greedy(6))]
    # far longer than 5 steps; no cost check, which would skip fetches this tiny model recomputes faster
    cache = CacheConfig(warm_url=redis.url(), lookup_timeout_s=3.0, cost_check=False)
    engine = engine_for(mixtral_dir, cache=cache)
    running = engine.add_request(random_prompts([40], 256, seed=46)[0], greedy(10_000))
    while not engine.step():
        pass  # until it decodes
    redis.pause()  # SIGSTOP: the lookups of the next requests get no answer
    try:
        ids = [engine.add_request(p, greedy(6)) for p in prompts]
        for _ in range(5):  # steps go on while the new requests wait in the queue for their lookups
            assert [out.request_id for out in engine.step()] == [running]
            assert len(engine.scheduler.waiting) == len(prompts)
        finished: set[str] = set()
        while not finished >= set(ids):  # the lookups time out, the requests are admitted and recomputed
            finished.update(out.request_id for out in engine.step() if out.finished)
    finally:
        redis.resume()
    assert [engine.pop_result(i).token_ids for i in ids] == expected
    assert engine.prefix_cache is not None
    assert engine.prefix_cache.stats.as_dict()["tiers"]["warm"]["timeouts"] >= 1
    engine.abort_request(running)
    engine.prefix_cache.close()


def test_int8_blocks_from_the_cold_tier_are_never_drained_to_warm(mixtral_dir: Path, redis_db: Any,
                                                                  tmp_path: Path) -> None:
    """Blocks filled from lossy int8 values serve hits, but a replica going away never writes them up as exact."""
    cache = CacheConfig(warm_url=redis_db.url(), cold_url=str(tmp_path), cold_int8=True, cost_check=False)
    prompt = random_prompts([40], 256, seed=47)
    writer = engine_for(mixtral_dir, cache=cache)
    writer.generate(prompt, greedy(2))
    assert writer.prefix_cache is not None and writer.prefix_cache.flush()
    writer.prefix_cache.close()
    with redis_db.client() as client:
        client.flushdb()  # only the cold tier, in int8, has the prompt's blocks now
    reader = engine_for(mixtral_dir, cache=cache)
    [out] = reader.generate(prompt, greedy(2))
    assert out.cached_tokens_by_tier["cold"] == 32
    assert reader.prefix_cache is not None and reader.prefix_cache.drain() == 0
    with redis_db.client() as client:
        assert client.dbsize() == 0
    reader.prefix_cache.close()
