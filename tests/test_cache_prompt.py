"""The prompt cache: a hit returns identical ids without tokenizing, from memory or from another replica through
Redis; keys carry a TTL; bad values and a missing Redis mean tokenizing, never an error."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
import tokenizers
from tokenizers import models, pre_tokenizers, trainers

from moe_serve.cache import PromptCache, PromptCacheConfig, prompt_key
from moe_serve.cache.keys import PROMPT_PREFIX

TEXT = "You are a helpful assistant. Answer briefly and cite your sources. " * 40  # a long system prompt


@pytest.fixture(scope="module")
def tokenizer() -> tokenizers.Tokenizer:
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT, "hello world " * 50], trainer)
    return tok


class CountingEncoder:
    def __init__(self, tok: tokenizers.Tokenizer) -> None:
        self.tok, self.calls = tok, 0

    def __call__(self, text: str) -> list[int]:
        self.calls += 1
        return self.tok.encode(text).ids


def fingerprint(tok: tokenizers.Tokenizer) -> str:
    return hashlib.sha256(tok.to_str().encode()).hexdigest()


def make_prompt_cache(tok: tokenizers.Tokenizer, server: Any | None = None, **overrides: Any) -> PromptCache:
    config = PromptCacheConfig(warm_url=server.url() if server else None, **overrides)
    return PromptCache(fingerprint(tok), config)


def test_hot_hit_returns_identical_ids_without_tokenizing(tokenizer: tokenizers.Tokenizer) -> None:
    encode = CountingEncoder(tokenizer)
    with make_prompt_cache(tokenizer) as cache:
        first = cache.encode(TEXT, encode)
        second = cache.encode(TEXT, encode)
        second.append(0)  # callers get their own list
        assert cache.encode(TEXT, encode) == first == tokenizer.encode(TEXT).ids
        assert encode.calls == 1
        cache.encode(TEXT, encode, variant="special=0")  # other encode options: another entry
        assert encode.calls == 2
        assert cache.stats.as_dict()["prompt_hits"]["hot"] == 2


def test_warm_hit_in_another_replica_skips_tokenization(redis_db: Any, tokenizer: tokenizers.Tokenizer) -> None:
    encode = CountingEncoder(tokenizer)
    with make_prompt_cache(tokenizer, redis_db) as first:
        ids = first.encode(TEXT, encode)
        first.encode("short text", encode)  # below warm_min_chars: memory only
        assert first.flush()
    with redis_db.client() as client:
        keys = list(client.scan_iter(PROMPT_PREFIX + "*"))
        assert keys == [(PROMPT_PREFIX + prompt_key(fingerprint(tokenizer), TEXT)).encode()]
        assert 0 < client.pttl(keys[0]) <= 86_400_000
    with make_prompt_cache(tokenizer, redis_db) as second:
        assert second.encode(TEXT, encode) == ids
        assert encode.calls == 2 and second.stats.as_dict()["prompt_hits"]["warm"] == 1


def test_another_tokenizer_never_reads_these_ids(redis_db: Any, tokenizer: tokenizers.Tokenizer) -> None:
    encode = CountingEncoder(tokenizer)
    with make_prompt_cache(tokenizer, redis_db) as cache:
        cache.encode(TEXT, encode)
        assert cache.flush()
    with PromptCache("another-tokenizer", PromptCacheConfig(warm_url=redis_db.url())) as other:
        other.encode(TEXT, encode)
    assert encode.calls == 2


def test_a_corrupt_value_is_retokenized(redis_db: Any, tokenizer: tokenizers.Tokenizer) -> None:
    encode = CountingEncoder(tokenizer)
    with redis_db.client() as client:
        client.set(PROMPT_PREFIX + prompt_key(fingerprint(tokenizer), TEXT), b"MSTK" + b"\x00" * 200, px=60_000)
    with make_prompt_cache(tokenizer, redis_db) as cache:
        assert cache.encode(TEXT, encode) == tokenizer.encode(TEXT).ids
        assert encode.calls == 1 and cache.stats.as_dict()["corrupt_total"] == 1


def test_without_redis_prompts_are_still_tokenized(make_redis: Any, tokenizer: tokenizers.Tokenizer) -> None:
    server = make_redis()
    server.kill()
    encode = CountingEncoder(tokenizer)
    with make_prompt_cache(tokenizer, server) as cache:
        assert cache.encode(TEXT, encode) == tokenizer.encode(TEXT).ids
        assert cache.encode(TEXT, encode) == tokenizer.encode(TEXT).ids  # hot still works
        assert encode.calls == 1


async def test_async_encode_for_the_ingress(redis_db: Any, tokenizer: tokenizers.Tokenizer) -> None:
    encode = CountingEncoder(tokenizer)
    with make_prompt_cache(tokenizer, redis_db) as first:
        ids = await first.aencode(TEXT, encode)
        assert first.flush()
    with make_prompt_cache(tokenizer, redis_db) as second:
        assert await second.aencode(TEXT, encode) == ids == tokenizer.encode(TEXT).ids
    assert encode.calls == 1
