"""The prompt (tokenization) cache: text -> token ids, so a repeated long prompt is not retokenized.

Keyed by the tokenizer's fingerprint, the encode variant and a hash of the text (keys.prompt_key). Hot is an LRU in
memory (a token budget); warm is Redis, one key per text with a TTL, the ids as raw little-endian int32 after the
codec's header (codec.encode_ids); nothing is unpickled. Only texts of at least `warm_min_chars` go to Redis:
below that, tokenizing is cheaper than a round trip. Redis trouble means tokenizing, never an error.
Does not own: the tokenizer (callers pass its encode function) or chat rendering.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from moe_serve.cache.breaker import CircuitBreaker
from moe_serve.cache.codec import CorruptValue, decode_ids, encode_ids
from moe_serve.cache.keys import PROMPT_PREFIX, prompt_key
from moe_serve.cache.loop import BackgroundLoop
from moe_serve.cache.stats import CacheStats
from moe_serve.cache.tiers import STORE_ERRORS, RedisStore

Encode = Callable[[str], list[int]]


@dataclass(frozen=True)
class PromptCacheConfig:
    hot_tokens: int = 4 * 2**20  # ids kept in memory, over all entries
    warm_url: str | None = None  # redis://host:port/db; None: memory only
    warm_ttl_s: float = 86400.0
    warm_min_chars: int = 1024
    lookup_timeout_s: float = 0.2
    write_timeout_s: float = 1.0
    breaker_failures: int = 3
    breaker_cooldown_s: float = 2.0


class PromptCache:
    """Thread-safe; `close()` when done (it waits briefly for writes behind)."""

    def __init__(self, tokenizer_fp: str, config: PromptCacheConfig = PromptCacheConfig(),
                 stats: CacheStats | None = None) -> None:
        self.tokenizer_fp = tokenizer_fp
        self.config = config
        self.stats = stats or CacheStats()
        self._hot: OrderedDict[str, tuple[int, ...]] = OrderedDict()
        self._hot_tokens = 0
        self._lock = threading.Lock()
        self._writes: set[concurrent.futures.Future[None]] = set()
        self._store = RedisStore("warm", config.warm_url, PROMPT_PREFIX, config.warm_ttl_s, max_connections=4,
                                 socket_timeout_s=max(config.lookup_timeout_s, config.write_timeout_s) * 4) \
            if config.warm_url else None
        self._breaker = CircuitBreaker(config.breaker_failures, config.breaker_cooldown_s)
        self._io = BackgroundLoop("moe-prompt-cache-io") if self._store is not None else None
        if self._io is not None:
            self.stats.watch_circuit("prompt_warm", lambda: self._breaker.state.value)

    def encode(self, text: str, encode: Encode, variant: str = "") -> list[int]:
        """Ids of `text`: from the cache, else from `encode(text)` (then cached). `variant` names the encode
        options (e.g. 'special=1') so differently encoded ids never share a key."""
        key = prompt_key(self.tokenizer_fp, text, variant)
        ids = self._get_hot(key)
        if ids is None and self._warm_for(text):
            ids = self._get_warm(key)
        if ids is None:
            return self._tokenize(key, text, encode)
        return list(ids)

    async def aencode(self, text: str, encode: Encode, variant: str = "") -> list[int]:
        """`encode` for async callers (the HTTP ingress): the Redis round trip runs on the cache's own loop and
        is awaited, so the caller's event loop is never blocked on Redis."""
        key = prompt_key(self.tokenizer_fp, text, variant)
        ids = self._get_hot(key)
        if ids is None and self._warm_for(text):
            assert self._io is not None
            try:
                async with asyncio.timeout(self.config.lookup_timeout_s + 0.05):
                    ids = self._warm_hit(key, await asyncio.wrap_future(self._io.submit(self._fetch(key))))
            except TimeoutError:
                ids = None
        if ids is None:
            return self._tokenize(key, text, encode)
        return list(ids)

    def _tokenize(self, key: str, text: str, encode: Encode) -> list[int]:
        self.stats.count("prompt_misses")
        ids = list(encode(text))
        self._put_hot(key, ids)
        if self._warm_for(text):
            assert self._io is not None
            future = self._io.submit(self._put_warm(key, ids))
            with self._lock:
                self._writes.add(future)
            future.add_done_callback(self._write_done)
        return ids

    def _warm_for(self, text: str) -> bool:
        return self._io is not None and len(text) >= self.config.warm_min_chars

    def _get_hot(self, key: str) -> tuple[int, ...] | None:
        with self._lock:
            ids = self._hot.get(key)
            if ids is not None:
                self._hot.move_to_end(key)
        if ids is not None:
            self.stats.count_prompt_hit("hot")
        return ids

    def _put_hot(self, key: str, ids: Sequence[int]) -> None:
        if len(ids) > self.config.hot_tokens:
            return
        with self._lock:
            if key in self._hot:
                return
            self._hot[key] = tuple(ids)
            self._hot_tokens += len(ids)
            while self._hot_tokens > self.config.hot_tokens:
                _, old = self._hot.popitem(last=False)
                self._hot_tokens -= len(old)

    def _get_warm(self, key: str) -> tuple[int, ...] | None:
        assert self._io is not None
        future = self._io.submit(self._fetch(key))
        try:
            ids = future.result(self.config.lookup_timeout_s + 0.05)
        except TimeoutError:
            future.cancel()
            return None
        return self._warm_hit(key, ids)

    def _warm_hit(self, key: str, ids: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if ids is not None:
            self.stats.count_prompt_hit("warm")
            self._put_hot(key, ids)
        return ids

    async def _fetch(self, key: str) -> tuple[int, ...] | None:
        assert self._store is not None
        if not self._breaker.allow():
            self.stats.add("warm", skipped_by_circuit=1)
            return None
        start = time.perf_counter()
        try:
            async with asyncio.timeout(self.config.lookup_timeout_s):
                (value,) = await self._store.get_many([key])
        except STORE_ERRORS:
            self._breaker.record_failure()
            self.stats.add("warm", errors=1)
            return None
        self._breaker.record_success()
        self.stats.observe_get("warm", time.perf_counter() - start)
        if value is None:
            return None
        try:
            return tuple(decode_ids(self.tokenizer_fp, key, value))
        except CorruptValue as err:
            self.stats.count_corrupt(err.kind)
            return None

    async def _put_warm(self, key: str, ids: Sequence[int]) -> None:
        assert self._store is not None
        if not self._breaker.allow():
            return
        try:
            async with asyncio.timeout(self.config.write_timeout_s):
                if not (await self._store.exists_many([key]))[0]:
                    await self._store.put_many([(key, encode_ids(self.tokenizer_fp, key, ids))])
        except STORE_ERRORS:
            self._breaker.record_failure()
            self.stats.add("warm", errors=1)
            return
        self._breaker.record_success()

    def _write_done(self, future: concurrent.futures.Future[None]) -> None:
        with self._lock:
            self._writes.discard(future)

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait for the writes behind; False on timeout."""
        with self._lock:
            pending = list(self._writes)
        done, not_done = concurrent.futures.wait(pending, timeout_s)
        return not not_done

    def close(self) -> None:
        if self._io is not None and self._store is not None:
            self.flush(1.0)
            self._io.close(self._store.close)

    def __enter__(self) -> PromptCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
