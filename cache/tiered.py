"""`TieredKVCache`: the warm and cold tiers as a connector around the engine's KV pool (the hot tier).

Owns the policy over the remote tiers of tiers.py: the longest cached prefix (warm, then cold, each one batched
get), promotion of cold hits to warm, write-behind of stored and demoted blocks with existence checks, the
fetch-or-recompute decision (cost.py), circuit breakers (breaker.py) and metrics (stats.py).
Does not own: the engine's paged KV memory, which is the hot tier (replicas/block_pool.py). Blocks come in and go
out as tensors of `KVLayout.block_shape`; the engine gathers them from and scatters them into its own pages.

Threads: every Redis and file operation runs on a private event loop thread (loop.py). `lookup_async` and the
writes never block the caller; lookups run ahead of writes (the writer waits while a lookup is in flight, as
LMCache orders its Redis queue).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from moe_serve.cache.breaker import CircuitBreaker
from moe_serve.cache.codec import BlockCodec, CachedBlock
from moe_serve.cache.cost import RecomputeModel, TransferModel
from moe_serve.cache.keys import COLD_PREFIX, WARM_PREFIX, KVLayout, prefix_block_keys
from moe_serve.cache.loop import BackgroundLoop
from moe_serve.cache.stats import CacheStats
from moe_serve.cache.tiers import STORE_ERRORS, RedisStore, RemoteTier, TierRegistry, make_store

log = logging.getLogger(__name__)

# How long the caller waits beyond the lookup timeout for the loop to hand back what it has.
GRACE_S = 0.05
START_PROBE_TIMEOUT_S = 1.0  # per Redis tier at start-up: a wrong password is an error, no answer is not
# Priors of the transfer model until gets are measured: round trip and bandwidth per tier.
PRIORS = {"warm": (2e-4, 1e9), "cold": (5e-4, 2e8)}
TOUCH_MEMORY = 65536  # warm keys whose last TTL refresh is remembered
ENCODE_SLICE = 8  # blocks encoded between yields of the I/O loop

JobKind = Literal["store", "demote", "promote", "touch", "delete"]


@dataclass(frozen=True)
class CacheConfig:
    """The remote tiers of one engine. The CLI's `--cache URL` sets warm_url, `--cold-cache URL|DIR` cold_url."""

    warm_url: str | None = None  # redis://host:port/db; None: no warm tier
    warm_ttl_s: float = 3600.0
    cold_url: str | None = None  # redis://... (a second server or database) or a directory; None: no cold tier
    cold_ttl_s: float = 7 * 86400.0
    cold_zstd_level: int = 3
    cold_int8: bool = False  # opt-in lossy int8 KV in the cold tier (flagged in each value's header)
    lookup_timeout_s: float = 0.5  # the longest a lookup waits on the remote tiers
    write_timeout_s: float = 2.0  # per write batch and tier; late writes are dropped
    socket_timeout_s: float = 5.0  # backstop under the two above
    breaker_failures: int = 3  # consecutive errors/timeouts that open a tier's circuit
    breaker_cooldown_s: float = 2.0  # open -> one probe after this long
    max_connections: int = 8  # per Redis tier
    max_pending_blocks: int = 4096  # queued for writing; beyond this, new writes are dropped (counted)
    write_batch_blocks: int = 64  # blocks per write round (the writer yields to lookups between rounds)
    touch_on_hit: bool = True  # refresh a warm hit's TTL (behind the lookup), so popular prefixes stay
    cost_check: bool = True  # skip fetches measured to cost more than recomputing

    def __post_init__(self) -> None:
        if self.warm_ttl_s <= 0 or self.cold_ttl_s <= 0 or self.lookup_timeout_s <= 0:
            raise ValueError("CacheConfig: positive TTLs and lookup timeout are required")


@dataclass(frozen=True)
class CacheLookup:
    """The longest cached prefix of the keys asked for: blocks[i] is the block of keys[i]."""

    blocks: list[torch.Tensor]
    tiers: list[str]  # where each block came from
    block_size: int
    lossy: list[bool]  # per block: came from int8 (cold_int8)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def lossy_blocks(self) -> int:
        return sum(self.lossy)

    def after(self, skip: int) -> CacheLookup:
        """The blocks from `skip` on."""
        return CacheLookup(self.blocks[skip:], self.tiers[skip:], self.block_size, self.lossy[skip:])

    @property
    def cached_tokens(self) -> int:
        return len(self.blocks) * self.block_size

    @property
    def tokens_by_tier(self) -> dict[str, int]:
        counts = {"hot": 0, "warm": 0, "cold": 0}
        for tier in self.tiers:
            counts[tier] = counts.get(tier, 0) + self.block_size
        return counts


@dataclass
class _Job:
    kind: JobKind
    targets: tuple[str, ...]  # remote tier names
    entries: Sequence[tuple[str, CachedBlock | None]] = ()  # None: touch/delete


class TieredKVCache:
    """warm -> cold KV block cache for one model and layout. Thread-safe; `close()` when done."""

    def __init__(self, config: CacheConfig, model_fp: str, layout: KVLayout, stats: CacheStats | None = None) -> None:
        self.config = config
        self.model_fp = model_fp
        self.layout = layout
        self.stats = stats or CacheStats()
        self.recompute = RecomputeModel()
        remote = []
        if config.warm_url:
            remote.append(self._remote_tier("warm", config.warm_url, WARM_PREFIX, config.warm_ttl_s, None, False))
        if config.cold_url:
            remote.append(self._remote_tier("cold", config.cold_url, COLD_PREFIX, config.cold_ttl_s,
                                            config.cold_zstd_level, config.cold_int8))
        self.tiers = TierRegistry(remote)
        for tier in remote:
            self.stats.watch_circuit(tier.name, lambda t=tier: t.breaker.state.value)
        self._io = BackgroundLoop("moe-kv-cache-io") if remote else None
        # I/O-loop state (touched only on the loop thread)
        self._jobs: deque[_Job] = deque()
        self._pending_blocks = 0
        self._lookups_in_flight = 0
        self._touched: OrderedDict[str, float] = OrderedDict()  # warm key -> when its TTL was last refreshed
        if self._io is not None:
            try:
                self._io.run(self._start(), 5.0 + 2 * START_PROBE_TIMEOUT_S * len(remote))
            except BaseException:
                self._io.close(self._close_stores)
                raise

    def _remote_tier(self, name: str, url: str, prefix: str, ttl_s: float, zstd_level: int | None,
                     int8: bool) -> RemoteTier:
        store = make_store(name, url, prefix, ttl_s, max_connections=self.config.max_connections,
                           socket_timeout_s=self.config.socket_timeout_s)
        codec = BlockCodec(self.model_fp, self.layout, zstd_level=zstd_level, int8=int8,
                           on_corrupt=self.stats.count_corrupt)
        breaker = CircuitBreaker(self.config.breaker_failures, self.config.breaker_cooldown_s)
        return RemoteTier(name, store, codec, breaker, TransferModel(*PRIORS[name]))

    async def _start(self) -> None:
        """Start the writer, once every Redis tier has accepted its credentials and certificate (RedisConfigError
        if not; one that cannot be reached yet serves misses until it can)."""
        for tier in self.tiers.remote:
            if isinstance(tier.store, RedisStore):
                await tier.store.target.probe(START_PROBE_TIMEOUT_S)
        self._work = asyncio.Event()
        self._idle = asyncio.Event()  # no lookup in flight
        self._idle.set()
        self._drained = asyncio.Event()
        self._drained.set()
        self._writer = asyncio.get_running_loop().create_task(self._write_loop())

    # --- the engine's API ----------------------------------------------------------------------------------

    def block_keys(self, token_ids: Sequence[int]) -> list[str]:
        """Keys of the full blocks of `token_ids` for this cache's model and layout."""
        return prefix_block_keys(self.model_fp, self.layout, token_ids)

    def lookup_async(self, keys: Sequence[str], timeout_s: float | None = None
                     ) -> concurrent.futures.Future[CacheLookup]:
        """The longest prefix of `keys` found, one batched get per tier (warm, then cold for the rest), without
        blocking the caller: start it when a request arrives, collect it when the scheduler admits the request,
        so the step loop never waits on Redis. The future always resolves, within about `timeout_s` (default
        config.lookup_timeout_s); Redis down, slow or skipped by cost or circuit gives a shorter prefix."""
        self.stats.count("lookups")
        if not self._remote_open or not keys:
            done: concurrent.futures.Future[CacheLookup] = concurrent.futures.Future()
            done.set_result(self._result([]))
            return done
        timeout = self.config.lookup_timeout_s if timeout_s is None else timeout_s
        return self._io.submit(self._lookup_in_loop(list(keys), timeout))  # type: ignore[union-attr]

    def lookup(self, keys: Sequence[str], timeout_s: float | None = None) -> CacheLookup:
        """`lookup_async` waited for (tools and tests; the engine never waits)."""
        timeout = self.config.lookup_timeout_s if timeout_s is None else timeout_s
        future = self.lookup_async(keys, timeout)
        try:
            return future.result(timeout + GRACE_S)
        except TimeoutError:
            future.cancel()
            self.stats.count("lookup_timeouts")
            return self._result([])

    async def _lookup_in_loop(self, keys: list[str], timeout_s: float) -> CacheLookup:
        found = await self._lookup_remote(keys, timeout_s)
        return self._result([(tier, block) for _, tier, block in found])

    def _result(self, found: list[tuple[str, CachedBlock]]) -> CacheLookup:
        return CacheLookup([b.data for _, b in found], [t for t, _ in found], self.layout.block_size,
                           [b.lossy for _, b in found])

    @property
    def _remote_open(self) -> bool:
        return self._io is not None and not self._io.closed

    def store(self, keys: Sequence[str], blocks: Sequence[torch.Tensor]) -> None:
        """Write blocks[i] under keys[i] to warm and cold, behind (existence-checked, with TTLs).

        Never blocks on I/O; writes are dropped (and counted) when the queue is full or a circuit is open.
        The tensors are kept as given: pass fresh ones (e.g. gathered from the KV pages), not views of pages
        that will be overwritten."""
        self._write("store", keys, blocks)

    def demote(self, keys: Sequence[str], blocks: Sequence[torch.Tensor]) -> None:
        """`store` for blocks the engine's pool evicts (counted as demotions)."""
        self._write("demote", keys, blocks)

    def _write(self, kind: JobKind, keys: Sequence[str], blocks: Sequence[torch.Tensor]) -> None:
        if len(keys) != len(blocks):
            raise ValueError(f"{len(keys)} keys for {len(blocks)} blocks")
        for data in blocks:
            if tuple(data.shape) != self.layout.block_shape or data.dtype != self.layout.dtype:
                raise ValueError(f"block {tuple(data.shape)} {data.dtype} does not match the layout "
                                 f"{self.layout.block_shape} {self.layout.dtype}")
        entries = [(k, CachedBlock(b)) for k, b in zip(keys, blocks)]
        self._submit(_Job(kind, tuple(t.name for t in self.tiers.remote), entries))

    def report_prefill(self, num_tokens: int, seconds: float) -> None:
        """The engine's measured prefill cost (e.g. one prefill step: its tokens and wall seconds)."""
        self.recompute.observe(num_tokens, seconds)

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until every queued write is done (tests, benchmarks, shutdown); False on timeout."""
        if not self._remote_open:
            return True
        try:
            self._io.run(self._drained_wait(), timeout_s)  # type: ignore[union-attr]
            return True
        except TimeoutError:
            return False

    def drain(self, blocks: Sequence[tuple[str, torch.Tensor]], timeout_s: float = 20.0) -> int:
        """Write (key, block) pairs to the remote tiers and wait for it: a replica going away hands its pool's
        blocks down, so the others keep the hits. Existence-checked, so blocks already there cost one EXISTS.
        Returns the blocks handed over."""
        if not (self._remote_open and self.tiers.remote):
            return 0
        entries = [(k, CachedBlock(b)) for k, b in blocks]
        deadline = time.monotonic() + timeout_s
        chunk = max(1, self.config.max_pending_blocks // 2)  # never more than the write queue takes at once
        for start in range(0, len(entries), chunk):
            self._submit(_Job("demote", tuple(t.name for t in self.tiers.remote), entries[start : start + chunk]))
            if not self.flush(max(0.0, deadline - time.monotonic())):
                return start
        return len(entries)

    def stats_dict(self) -> dict[str, object]:
        return self.stats.as_dict()

    def prometheus_text(self) -> bytes:
        return self.stats.prometheus_text()

    def close(self, flush_timeout_s: float = 2.0) -> None:
        if self._io is None or self._io.closed:
            return
        self.flush(flush_timeout_s)
        self._io.close(self._close_stores)

    def __enter__(self) -> TieredKVCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- caller thread helpers -----------------------------------------------------------------------------

    def _submit(self, job: _Job) -> None:
        if not (self._remote_open and job.targets and job.entries):
            return
        assert self._io is not None
        if self._io.in_loop_thread:
            self._enqueue(job)
        else:
            self._io.call_soon(self._enqueue, job)

    # --- I/O loop: lookups ---------------------------------------------------------------------------------

    async def _lookup_remote(self, keys: list[str], timeout_s: float) -> list[tuple[str, str, CachedBlock]]:
        self._lookups_in_flight += 1
        self._idle.clear()
        try:
            return await self._walk_tiers(keys, asyncio.get_running_loop().time() + timeout_s)
        finally:
            self._lookups_in_flight -= 1
            if not self._lookups_in_flight:
                self._idle.set()

    async def _walk_tiers(self, keys: list[str], deadline: float) -> list[tuple[str, str, CachedBlock]]:
        loop = asyncio.get_running_loop()
        found: list[tuple[str, str, CachedBlock]] = []
        rest = keys
        for tier in self.tiers.remote:
            if not rest:
                break
            if self._too_costly(tier, len(rest)):
                self.stats.add(tier.name, skipped_by_cost=len(rest))
                continue
            if not tier.breaker.allow():
                self.stats.add(tier.name, skipped_by_circuit=1, misses=len(rest))
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            start = time.perf_counter()
            try:
                async with asyncio.timeout(remaining):
                    values = await tier.store.get_many(rest)
            except STORE_ERRORS as err:
                self._failed(tier, err, misses=len(rest))
                if isinstance(err, TimeoutError):
                    break  # the caller's time is up: no time left for lower tiers
                continue
            except asyncio.CancelledError:  # the caller stopped waiting first: as late as a timeout
                self._failed(tier, TimeoutError("lookup cancelled by the caller"), misses=len(rest))
                raise
            tier.breaker.record_success()
            blocks, corrupt = self._decode_prefix(tier, rest, values)
            elapsed = time.perf_counter() - start
            nbytes = sum(b.nbytes for b in blocks)
            tier.transfer.observe(nbytes, elapsed)
            self.stats.add(tier.name, hits=len(blocks), misses=len(rest) - len(blocks), bytes_read=nbytes)
            self.stats.observe_get(tier.name, elapsed)
            found += [(key, tier.name, block) for key, block in zip(rest, blocks)]
            self._after_hits(tier, rest[:len(blocks)], blocks, corrupt)
            rest = rest[len(blocks):]
        return found

    def _decode_prefix(self, tier: RemoteTier, keys: list[str], values: list[bytes | None]
                       ) -> tuple[list[CachedBlock], list[str]]:
        """Decoded blocks up to the first missing or corrupt value, and the key of a corrupt one (to delete)."""
        blocks: list[CachedBlock] = []
        for key, value in zip(keys, values):
            if value is None:
                return blocks, []
            block = tier.codec.decode(key, value)
            if block is None:
                return blocks, [key]
            blocks.append(block)
        return blocks, []

    def _after_hits(self, tier: RemoteTier, keys: list[str], blocks: list[CachedBlock], corrupt: list[str]) -> None:
        """Behind the lookup: promote hits to the remote tiers above, refresh warm TTLs, delete a corrupt value
        (so a good copy can be written in its place)."""
        if corrupt:
            self._enqueue(_Job("delete", (tier.name,), [(k, None) for k in corrupt]))
        if not keys:
            return
        above = tuple(t.name for t in self.tiers.above(tier.name))
        exact = [(k, b) for k, b in zip(keys, blocks) if not b.lossy]  # lossy blocks stay cold
        if above and exact:
            self._enqueue(_Job("promote", above, list(exact)))
        if tier.name == "warm" and self.config.touch_on_hit:
            stale = self._stale_touches(keys)
            if stale:
                self._enqueue(_Job("touch", ("warm",), [(k, None) for k in stale]))

    def _stale_touches(self, keys: list[str]) -> list[str]:
        """Keys whose warm TTL this cache has not refreshed in the last quarter TTL (bounded memory)."""
        now, every = time.monotonic(), self.config.warm_ttl_s / 4
        stale = [k for k in keys if now - self._touched.get(k, -every) >= every]
        for key in stale:
            self._touched[key] = now
            self._touched.move_to_end(key)
        while len(self._touched) > TOUCH_MEMORY:
            self._touched.popitem(last=False)
        return stale

    def _too_costly(self, tier: RemoteTier, num_blocks: int) -> bool:
        if not self.config.cost_check:
            return False
        recompute = self.recompute.estimate(num_blocks * self.layout.block_size)
        return recompute is not None and tier.transfer.estimate(num_blocks * self.layout.block_bytes) > recompute

    def _failed(self, tier: RemoteTier, err: BaseException, **counts: int) -> None:
        tier.breaker.record_failure()
        timeout = int(isinstance(err, TimeoutError))
        self.stats.add(tier.name, errors=1, timeouts=timeout, **counts)
        log.debug("cache tier %s: %r (circuit %s)", tier.name, err, tier.breaker.state.value)

    # --- I/O loop: writes behind ---------------------------------------------------------------------------

    def _enqueue(self, job: _Job) -> None:
        blocks = len(job.entries) if job.kind in ("store", "demote", "promote") else 0
        if self._pending_blocks + blocks > self.config.max_pending_blocks:
            for name in job.targets:
                self.stats.add(name, writes_dropped=blocks)
            return
        self._pending_blocks += blocks
        self._jobs.append(job)
        self._drained.clear()
        self._work.set()

    async def _drained_wait(self) -> None:
        await self._drained.wait()

    async def _write_loop(self) -> None:
        while True:
            await self._work.wait()
            self._work.clear()
            while self._jobs:
                await self._idle.wait()  # lookups first
                batch = self._take_batch()
                try:
                    await self._write_batch(batch)
                except Exception:  # noqa: BLE001 - the writer must outlive any one bad batch
                    log.exception("cache write batch failed")
            self._drained.set()

    def _take_batch(self) -> list[_Job]:
        batch, blocks = [], 0
        while self._jobs and blocks < self.config.write_batch_blocks:
            job = self._jobs.popleft()
            batch.append(job)
            if job.kind in ("store", "demote", "promote"):
                blocks += len(job.entries)
                self._pending_blocks -= len(job.entries)
        return batch

    async def _write_batch(self, batch: list[_Job]) -> None:
        for tier in self.tiers.remote:
            puts: dict[str, tuple[JobKind, CachedBlock]] = {}
            touches: list[str] = []
            deletes: list[str] = []
            for job in batch:
                if tier.name not in job.targets:
                    continue
                for key, block in job.entries:
                    if job.kind == "touch":
                        touches.append(key)
                    elif job.kind == "delete":
                        deletes.append(key)
                    elif block is not None and not block.lossy:
                        puts.setdefault(key, (job.kind, block))
            if deletes or touches:
                await self._guarded(tier, self._touch_delete(tier, touches, deletes), 0)
            if puts:
                await self._guarded(tier, self._put(tier, puts), len(puts))

    async def _guarded(self, tier: RemoteTier, coro: Coroutine[Any, Any, None], blocks: int) -> None:
        """Run a write coroutine under the tier's circuit and write timeout; on failure its blocks are dropped."""
        if not tier.breaker.allow():
            coro.close()
            self.stats.add(tier.name, skipped_by_circuit=1, writes_dropped=blocks)
            return
        try:
            async with asyncio.timeout(self.config.write_timeout_s):
                await coro
        except STORE_ERRORS as err:
            self._failed(tier, err, writes_dropped=blocks)
            return
        tier.breaker.record_success()

    async def _touch_delete(self, tier: RemoteTier, touches: list[str], deletes: list[str]) -> None:
        if deletes:
            await tier.store.delete_many(deletes)
        if touches:
            await tier.store.touch_many(touches)

    async def _put(self, tier: RemoteTier, puts: dict[str, tuple[JobKind, CachedBlock]]) -> None:
        """Existence check (one round trip), then encode and SET NX with the TTL only what is missing."""
        keys = list(puts)
        present = await tier.store.exists_many(keys)
        values: dict[str, bytes] = {}
        for key in (k for k, p in zip(keys, present) if not p):
            values[key] = tier.codec.encode(key, puts[key][1].data)
            if len(values) % ENCODE_SLICE == 0:
                await asyncio.sleep(0)  # let a lookup that arrived meanwhile send its get (zstd/int8 take a while)
        result = await tier.store.put_many(list(values.items()))
        kinds = [puts[k][0] for k in result.written]
        self.stats.add(
            tier.name,
            writes=len(result.written),
            bytes_written=sum(len(values[k]) for k in result.written),
            writes_skipped_present=len(keys) - len(values) + result.present,
            writes_dropped=result.rejected,
            promotions=kinds.count("promote"),
            demotions=kinds.count("demote"),
        )

    async def _close_stores(self) -> None:
        self._writer.cancel()
        await asyncio.gather(self._writer, return_exceptions=True)  # let it finish cancelling before the loop ends
        for tier in self.tiers.remote:
            try:
                await tier.store.close()
            except STORE_ERRORS:
                pass
