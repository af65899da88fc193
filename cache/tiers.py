"""The remote tiers, in an ordered registry warm -> cold, as LMCache orders its backends. (The hot tier is the
engine's own KV pool, replicas/block_pool.py.)

warm = a `ValueStore` on Redis (`RedisStore`): one key per value, a TTL on every key, batched gets (MGET: one round
       trip for a whole prefix; on a Redis Cluster, one pipeline per node holding any of the keys), existence checks
       before writes (pipelined EXISTS, then SET NX with a TTL).
cold = a `ValueStore` on a second Redis URL/database or a local directory (`DirectoryStore`), holding compressed
       (and optionally int8) values with a longer TTL.
Stores move bytes only: encoding and validation are the codec's (codec.py), policy is the facade's (tiered.py).
Redis clients are created lazily on the caller's event loop and never shared between loops.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError

from moe_serve.cache.breaker import CircuitBreaker
from moe_serve.cache.codec import BlockCodec
from moe_serve.cache.cost import TransferModel
from moe_serve.cache.redis_client import REDIS_ERRORS, RedisClient, RedisTarget, close_client, redact

# Errors a store may raise; the facade counts them, feeds the circuit breaker and treats the call as a miss.
STORE_ERRORS = REDIS_ERRORS  # a directory store's OSError is among them


@dataclass(frozen=True)
class PutResult:
    written: list[str] = field(default_factory=list)  # keys written
    present: int = 0  # already there (SET NX lost a race, or the file exists)
    rejected: int = 0  # refused by the store (Redis OOM under maxmemory noeviction)


class ValueStore(Protocol):
    """Bytes under string keys, with a TTL; every method is one round trip for the whole batch."""

    name: str

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]: ...

    async def exists_many(self, keys: Sequence[str]) -> list[bool]: ...

    async def put_many(self, items: Sequence[tuple[str, bytes]]) -> PutResult: ...

    async def touch_many(self, keys: Sequence[str]) -> None: ...

    async def delete_many(self, keys: Sequence[str]) -> None: ...

    async def close(self) -> None: ...


class RedisStore:
    """Values under `prefix + key` in one Redis database or a Redis Cluster (redis_client.py: URLs, TLS, ACL users);
    every key is written with a TTL (`ttl_s`)."""

    def __init__(
        self,
        name: str,
        url: str,
        prefix: str,
        ttl_s: float,
        *,
        max_connections: int = 8,
        socket_timeout_s: float = 5.0,
    ) -> None:
        if ttl_s <= 0:
            raise ValueError(f"{name}: a TTL is required on every key, got ttl_s={ttl_s}")
        self.name = name
        self.target = RedisTarget.parse(url)
        self.url = redact(url)
        self.prefix = prefix
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self._max_connections = max_connections
        self._socket_timeout_s = socket_timeout_s
        self._client: RedisClient | None = None

    async def client(self) -> RedisClient:
        """The client, made on first use inside the running loop (asking the server whether it is a cluster)."""
        if self._client is None:
            self._client = await self.target.connect(self._max_connections, self._socket_timeout_s)
        return self._client

    def _k(self, key: str) -> str:
        return self.prefix + key

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        client = await self.client()
        if not isinstance(client, RedisCluster):
            return await client.mget([self._k(k) for k in keys])
        pipe = client.pipeline()  # grouped by node: one round trip to each node holding any of the keys
        for key in keys:
            pipe.get(self._k(key))
        return await pipe.execute()

    async def exists_many(self, keys: Sequence[str]) -> list[bool]:
        pipe = (await self.client()).pipeline(transaction=False)
        for key in keys:
            pipe.exists(self._k(key))
        return [bool(n) for n in await pipe.execute()]

    async def put_many(self, items: Sequence[tuple[str, bytes]]) -> PutResult:
        if not items:
            return PutResult()
        pipe = (await self.client()).pipeline(transaction=False)
        for key, value in items:
            pipe.set(self._k(key), value, px=self.ttl_ms, nx=True)
        written, present, rejected = [], 0, 0
        for (key, _), result in zip(items, await pipe.execute(raise_on_error=False)):
            if isinstance(result, ResponseError):  # e.g. OOM under maxmemory-policy noeviction: a full Redis
                rejected += 1
            elif isinstance(result, Exception):
                raise result
            elif result:
                written.append(key)
            else:
                present += 1
        return PutResult(written, present, rejected)

    async def touch_many(self, keys: Sequence[str]) -> None:
        pipe = (await self.client()).pipeline(transaction=False)
        for key in keys:
            pipe.pexpire(self._k(key), self.ttl_ms)
        await pipe.execute()

    async def delete_many(self, keys: Sequence[str]) -> None:
        if keys:
            await (await self.client()).unlink(*[self._k(k) for k in keys])

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await close_client(client)


class DirectoryStore:
    """Values as files `root/<key[:2]>/<key>`; the TTL is the file's age (mtime), refreshed by touches.

    Writes go to a temporary file and are renamed into place, so a reader never sees half a value."""

    def __init__(self, name: str, root: str | Path, ttl_s: float) -> None:
        if ttl_s <= 0:
            raise ValueError(f"{name}: a TTL is required, got ttl_s={ttl_s}")
        self.name = name
        self.root = Path(root)
        self.ttl_s = ttl_s
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.root / key[:2] / key

    def _live(self, path: Path, now: float) -> bool:
        try:
            if now - path.stat().st_mtime <= self.ttl_s:
                return True
            path.unlink(missing_ok=True)  # expired
        except FileNotFoundError:
            pass
        return False

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        now, values = time.time(), []
        for key in keys:
            path = self.path(key)
            values.append(path.read_bytes() if self._live(path, now) else None)
        return values

    async def exists_many(self, keys: Sequence[str]) -> list[bool]:
        now = time.time()
        return [self._live(self.path(k), now) for k in keys]

    async def put_many(self, items: Sequence[tuple[str, bytes]]) -> PutResult:
        now, written, present = time.time(), [], 0
        for key, value in items:
            path = self.path(key)
            if self._live(path, now):
                present += 1
                continue
            path.parent.mkdir(exist_ok=True)
            tmp = path.with_name(f".{key}.{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_bytes(value)
            os.replace(tmp, path)
            written.append(key)
        return PutResult(written, present)

    async def touch_many(self, keys: Sequence[str]) -> None:
        for key in keys:
            try:
                os.utime(self.path(key))
            except FileNotFoundError:
                pass

    async def delete_many(self, keys: Sequence[str]) -> None:
        for key in keys:
            self.path(key).unlink(missing_ok=True)

    def sweep(self) -> int:
        """Delete expired files; returns how many."""
        now, removed = time.time(), 0
        for path in self.root.glob("??/*"):
            if path.name.startswith("."):
                continue
            if not self._live(path, now):
                removed += 1
        return removed

    async def close(self) -> None:
        return None


def make_store(name: str, url: str, prefix: str, ttl_s: float, *, max_connections: int = 8,
               socket_timeout_s: float = 5.0) -> ValueStore:
    """A Redis store for redis://, rediss:// and unix:// URLs, a directory store for a path or file:// URL."""
    scheme = url.partition("://")[0] if "://" in url else ""
    if scheme in ("redis", "rediss", "unix"):
        return RedisStore(name, url, prefix, ttl_s, max_connections=max_connections,
                          socket_timeout_s=socket_timeout_s)
    if scheme not in ("", "file"):
        raise ValueError(f"{name} tier: {redact(url)!r} is neither a Redis URL (redis://, rediss://, unix://) nor a "
                         "directory")
    return DirectoryStore(name, url.removeprefix("file://"), ttl_s)


@dataclass
class RemoteTier:
    """A tier behind the I/O loop: its store, its codec, its circuit breaker and its measured transfer cost."""

    name: str
    store: ValueStore
    codec: BlockCodec
    breaker: CircuitBreaker
    transfer: TransferModel


class TierRegistry:
    """The remote tiers in order (warm, cold): lookups walk down, promotions walk up."""

    def __init__(self, remote: Sequence[RemoteTier]) -> None:
        self.remote = list(remote)

    def above(self, name: str) -> list[RemoteTier]:
        """The remote tiers above `name` (where a hit in `name` is promoted to)."""
        index = [t.name for t in self.remote].index(name)
        return self.remote[:index]
