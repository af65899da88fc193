"""The engine with the tiered cache on a real redis-server: hits change no output, and blocks are shared across
engines and processes."""

from __future__ import annotations

import json
import time
import subprocess
import sys
from pathlib import Path

from conftest import RedisServer, random_prompts

from moe_serve.cache import CacheConfig
from moe_serve.replicas.engine import EngineConfig, LLMEngine
from moe_serve.replicas.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def cached_engine(model_dir: Path, redis: RedisServer) -> LLMEngine:
    config = EngineConfig(block_size=16, cache=CacheConfig(warm_url=redis.url()))
    return LLMEngine.from_pretrained(model_dir, config)


def test_warm_hit_equals_no_cache(mixtral_dir: Path, redis_db: RedisServer) -> None:
    prompts = random_prompts([70, 45], 256, seed=31)
    expected = [o.token_ids for o in LLMEngine.from_pretrained(mixtral_dir).generate(prompts, GREEDY)]
    writer = cached_engine(mixtral_dir, redis_db)
    assert [o.token_ids for o in writer.generate(prompts, GREEDY)] == expected
    assert writer.prefix_cache is not None and writer.prefix_cache.flush()
    reader = cached_engine(mixtral_dir, redis_db)  # a fresh engine: an empty pool, everything from Redis
    outputs = reader.generate(prompts, GREEDY)
    assert [o.token_ids for o in outputs] == expected
    assert [o.cached_tokens for o in outputs] == [64, 32]  # full blocks, the last prompt token recomputed
    assert outputs[0].cached_tokens_by_tier["warm"] == 64


def test_hot_hit_in_the_same_engine(mixtral_dir: Path, redis_db: RedisServer) -> None:
    engine = cached_engine(mixtral_dir, redis_db)
    prompt = random_prompts([40], 256, seed=32)
    first = engine.generate(prompt, GREEDY)[0]
    second = engine.generate(prompt, GREEDY)[0]
    assert second.token_ids == first.token_ids
    assert second.cached_tokens_by_tier["hot"] == 32


def test_second_process_reuses_blocks(tiny_model_dir: Path, redis_db: RedisServer) -> None:
    def run() -> dict:
        result = subprocess.run(
            [sys.executable, "-m", "moe_serve.cli", "generate", str(tiny_model_dir), "--token-ids",
             ",".join(str(t) for t in range(10, 60)), "--max-tokens", "4", "--cache", redis_db.url()],
            capture_output=True, text=True, timeout=300, check=False,
        )
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    first, second = run(), run()
    assert first["cached_tokens"] == 0
    assert second["cached_tokens"] == 48 and second["token_ids"] == first["token_ids"]


def test_redis_killed_mid_run_fails_no_request_and_caching_returns(mixtral_dir: Path, make_redis) -> None:  # noqa: ANN001
    redis = make_redis()
    prompts = random_prompts([50, 60, 40, 55], 256, seed=33)
    expected = [o.token_ids for o in LLMEngine.from_pretrained(mixtral_dir).generate(prompts, GREEDY)]
    engine = cached_engine(mixtral_dir, redis)
    ids = [engine.add_request(p, GREEDY) for p in prompts[:2]]
    engine.step()
    redis.kill()  # in the middle of the run: prefills done, writes behind may be in flight
    ids += [engine.add_request(p, GREEDY) for p in prompts[2:]]  # lookups while Redis is down
    while engine.has_unfinished():
        engine.step()
    assert [engine.pop_result(i).token_ids for i in ids] == expected
    redis.restart()  # empty, as after a crash
    time.sleep(2.5)  # the breaker's cool-down; the next call is its probe
    later = random_prompts([48], 256, seed=34)
    engine.generate(later, GREEDY)
    engine.generate(random_prompts([30], 256, seed=35), GREEDY)
    assert engine.prefix_cache is not None and engine.prefix_cache.flush()
    reader = cached_engine(mixtral_dir, redis)
    assert reader.generate(later, GREEDY)[0].cached_tokens == 32  # written after Redis came back
