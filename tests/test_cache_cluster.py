"""The warm tier on a real Redis Cluster started by the test: found from one node's plain URL or a seed list, keys
spread over every master, reuse across processes, one pipeline per node per prefix lookup (counted by each master),
redirects after slots move, and a master failing over to its replica costing misses, never a failed request."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import random_prompts
from redis_servers import RedisClusterNodes
from test_cache_redis import _WRITER, LAYOUT, MODEL, make_blocks, make_prompt, same

from moe_serve.cache import CacheConfig, PromptCache, PromptCacheConfig, TieredKVCache
from moe_serve.cache.redis_client import RedisConfigError, check
from moe_serve.replicas.engine import EngineConfig, LLMEngine
from moe_serve.replicas.sampling import SamplingParams

BLOCKS = 24


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterNodes]:
    nodes = RedisClusterNodes(tmp_path_factory.mktemp("cluster"), masters=3).start()
    yield nodes
    nodes.kill()


@pytest.fixture
def empty_cluster(cluster: RedisClusterNodes) -> RedisClusterNodes:
    for node in cluster.masters():
        with node.client() as client:
            client.flushall()
            client.config_resetstat()
    return cluster


def warm_cache(url: str, **overrides: Any) -> TieredKVCache:
    config = dict(warm_url=url, lookup_timeout_s=2.0, touch_on_hit=False, **overrides)
    return TieredKVCache(CacheConfig(**config), MODEL, LAYOUT)


def test_a_node_url_finds_the_cluster_and_the_blocks_spread_over_every_master(empty_cluster: RedisClusterNodes) -> None:
    assert check(empty_cluster.url(0)) == "cluster" and check(empty_cluster.seeds_url()) == "cluster"
    with warm_cache(empty_cluster.url(1)) as writer:
        keys = writer.block_keys(make_prompt(BLOCKS, seed=1))
        writer.store(keys, make_blocks(BLOCKS, seed=1))
        assert writer.flush()
    assert all(count > 0 for count in empty_cluster.keys_per_master())
    assert sum(empty_cluster.keys_per_master()) == BLOCKS
    for url in (empty_cluster.url(2), empty_cluster.seeds_url()):
        with warm_cache(url) as reader:
            found = reader.lookup(keys)
            assert found.tiers == ["warm"] * BLOCKS and same(found.blocks, make_blocks(BLOCKS, seed=1))


def test_blocks_written_by_another_process_are_reused(empty_cluster: RedisClusterNodes) -> None:
    script = _WRITER.format(tests=str(Path(__file__).parent), url=empty_cluster.url(0))
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    with warm_cache(empty_cluster.seeds_url()) as cache:
        found = cache.lookup(cache.block_keys(make_prompt(5, seed=3)))
        assert found.tiers == ["warm"] * 5 and same(found.blocks, make_blocks(5, seed=3))


def test_a_repeated_prompt_is_served_from_the_cluster_by_another_process(empty_cluster: RedisClusterNodes,
                                                                         tiny_model_dir: Path) -> None:
    """The user's case: `moe-serve generate --cache redis://NODE` twice; the second run reuses the first's blocks."""
    def run() -> dict:
        result = subprocess.run(
            [sys.executable, "-m", "moe_serve.cli", "generate", str(tiny_model_dir), "--token-ids",
             ",".join(str(t) for t in range(10, 110)), "--max-tokens", "4", "--cache", empty_cluster.url(1)],
            capture_output=True, text=True, timeout=300, check=False)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    first, second = run(), run()
    assert first["cached_tokens"] == 0 and sum(empty_cluster.keys_per_master()) > 0
    assert second["cached_tokens"] > 0 and second["token_ids"] == first["token_ids"]


def test_the_prompt_cache_on_the_cluster(empty_cluster: RedisClusterNodes) -> None:
    text = "a long prompt " * 100
    config = PromptCacheConfig(warm_url=empty_cluster.url(0), warm_min_chars=10, lookup_timeout_s=2.0)
    writer = PromptCache("tokenizer-a", config)
    assert writer.encode(text, lambda t: [len(t), 7]) == [len(text), 7]
    writer.close()
    reader = PromptCache("tokenizer-a", config)
    assert reader.encode(text, lambda t: []) == [len(text), 7]  # from the warm tier, not this encoder
    reader.close()


def test_a_prefix_lookup_is_one_pipeline_per_node(empty_cluster: RedisClusterNodes) -> None:
    """Each master reads one batch of commands per lookup (its `total_reads_processed`), however many of the
    prefix's blocks it holds; one round trip per block would be one read per block."""
    with warm_cache(empty_cluster.url(0)) as cache:
        keys = cache.block_keys(make_prompt(BLOCKS, seed=2))
        cache.store(keys, make_blocks(BLOCKS, seed=2))
        assert cache.flush()
        masters = [node.client() for node in empty_cluster.masters()]
        held = [client.dbsize() for client in masters]
        assert all(count >= 3 for count in held), held

        def reads() -> list[int]:  # one read each: this INFO itself
            return [client.info("stats")["total_reads_processed"] for client in masters]

        for _ in range(3):
            before = reads()
            assert len(cache.lookup(keys).blocks) == BLOCKS
            assert [after - start - 1 for after, start in zip(reads(), before)] == [1] * len(masters)
        gets = [client.info("commandstats")["cmdstat_get"]["calls"] for client in masters]
        assert gets == [3 * count for count in held]
        for client in masters:
            client.close()


def test_lookups_follow_slots_that_moved_to_another_master(empty_cluster: RedisClusterNodes) -> None:
    with warm_cache(empty_cluster.url(0)) as cache:
        keys = cache.block_keys(make_prompt(BLOCKS, seed=4))
        cache.store(keys, make_blocks(BLOCKS, seed=4))
        assert cache.flush()
        assert len(cache.lookup(keys).blocks) == BLOCKS  # the client now holds the slot map
        source, target = empty_cluster.masters()[:2]
        with source.client() as client:
            held = client.dbsize()
        subprocess.run(["redis-cli", "--cluster", "reshard", f"127.0.0.1:{source.port}", "--cluster-from",
                        _node_id(source), "--cluster-to", _node_id(target), "--cluster-slots", "4000", "--cluster-yes"],
                       check=True, capture_output=True, timeout=120)
        empty_cluster.wait_ok()
        with source.client() as client:
            assert client.dbsize() < held, "some of the blocks moved with their slots"
        found = cache.lookup(keys)  # MOVED answers from the old owner, followed to the new one
        assert found.tiers == ["warm"] * BLOCKS and same(found.blocks, make_blocks(BLOCKS, seed=4))


def test_a_cluster_url_naming_a_database_is_refused(empty_cluster: RedisClusterNodes) -> None:
    with pytest.raises(RedisConfigError, match="Redis Cluster, which has only database 0"):
        check(empty_cluster.url(0) + "/2")


def test_a_master_failing_over_costs_misses_and_no_request(tmp_path: Path, mixtral_dir: Path) -> None:
    """3 masters with a replica each. A replica's engine writes the prompts' blocks; a master is killed; another
    replica's requests during the failover all complete with the same greedy tokens (lookups error: misses), and
    once the master's replica is promoted a third replica finds every prompt's blocks in the warm tier."""
    nodes = RedisClusterNodes(tmp_path, masters=3, replicas=1).start()
    engines = []

    def replica() -> LLMEngine:
        cache = CacheConfig(warm_url=nodes.seeds_url(), lookup_timeout_s=2.0, cost_check=False,
                            breaker_cooldown_s=0.2)
        engines.append(LLMEngine.from_pretrained(mixtral_dir, EngineConfig(**engine_config, cache=cache)))
        return engines[-1]

    def warm(engine: LLMEngine) -> dict[str, int]:
        assert engine.prefix_cache is not None
        return engine.prefix_cache.stats.as_dict()["tiers"]["warm"]

    try:
        prompts = random_prompts([160, 144, 176, 150], 256, seed=61)
        greedy = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
        engine_config = dict(block_size=16, kv_cache_bytes=16 << 20)
        expected = [o.token_ids for o in LLMEngine.from_pretrained(
            mixtral_dir, EngineConfig(**engine_config)).generate(prompts, greedy)]
        writer = replica()
        assert [o.token_ids for o in writer.generate(prompts, greedy)] == expected
        assert writer.prefix_cache is not None and writer.prefix_cache.flush()
        nodes.wait_ok()  # the replicas hold the blocks too
        nodes.masters()[0].kill()
        during = replica()
        assert [o.token_ids for o in during.generate(prompts, greedy)] == expected
        assert warm(during)["errors"] + warm(during)["timeouts"] >= 1, warm(during)
        nodes.wait_ok()
        reader = replica()
        after = [reader.generate([p], greedy)[0] for p in prompts]
        assert [o.token_ids for o in after] == expected
        assert all(o.cached_tokens_by_tier["warm"] > 0 for o in after), [o.cached_tokens_by_tier for o in after]
    finally:
        for engine in engines:
            if engine.prefix_cache is not None:
                engine.prefix_cache.close()
        nodes.kill()


def _node_id(node: Any) -> str:
    with node.client() as client:
        node_id = client.execute_command("CLUSTER", "MYID")
    return node_id.decode() if isinstance(node_id, bytes) else node_id

