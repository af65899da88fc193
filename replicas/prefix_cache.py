"""The engine's prompt-prefix cache: shared blocks in the KV pool (hot), Redis and cold tiers around it.

Hot is the pool itself (block_pool.py): at admission the longest prefix of a prompt's full blocks held in the pool
is taken by reference, no copy. Warm and cold (cache.TieredKVCache, a connector with its own I/O thread) are asked
when the request arrives; the request waits in the queue, never the step loop, until that lookup resolves or its
deadline passes (then it is a miss and the prefix is recomputed), and the blocks found land in fresh pages at
admission. Prompt blocks are registered in the pool as their K/V are computed, handed to the remote tiers when the
prompt's prefill completes (write-behind, existence-checked there), and written behind when the pool evicts one
that never was. The last prompt token is always computed: its logits are needed.
Keys are cache/keys.py's chained block keys, so the pool and Redis name a block alike.
"""

from __future__ import annotations

import concurrent.futures
import time
from dataclasses import dataclass

from moe_serve.cache import CacheConfig, CacheLookup, CacheStats, KVLayout, TieredKVCache, prefix_block_keys
from moe_serve.cache.tiered import GRACE_S
from moe_serve.replicas.kv_cache import PagedKVCache
from moe_serve.replicas.scheduler import Sequence


@dataclass
class PendingLookup:
    """A remote lookup of keys[first:] started when the request arrived."""

    future: concurrent.futures.Future[CacheLookup]
    first: int
    started: float
    deadline: float


@dataclass(frozen=True)
class PrefixHit:
    """What admission would reuse: pool blocks by reference, then remote blocks copied into new pages."""

    pool_blocks: list[int]
    remote: CacheLookup | None  # its blocks follow pool_blocks (None: nothing usable)

    @property
    def num_blocks(self) -> int:
        return len(self.pool_blocks) + (self.remote.num_blocks if self.remote else 0)


class PrefixCache:
    def __init__(self, kv: PagedKVCache, model_fp: str, layout: KVLayout, remote: TieredKVCache | None) -> None:
        self.kv = kv
        self.pool = kv.pool
        self.layout = layout
        self.model_fp = model_fp
        self.remote = remote
        self.stats = remote.stats if remote is not None else CacheStats()
        self.block_size = kv.spec.block_size
        self._written: set[int] = set()  # pool blocks whose key was handed to the remote tiers
        self._lossy: set[int] = set()  # pool blocks filled from int8 values: never written up as exact ones
        if remote is not None:
            self.pool.on_evict = self._evicted

    @classmethod
    def open(cls, kv: PagedKVCache, model_fp: str, config: CacheConfig | None) -> PrefixCache:
        """The pool's prefix cache, with the remote tiers `config` names (None: the pool alone)."""
        spec = kv.spec
        layout = KVLayout(spec.block_size, spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.dtype)
        remote = TieredKVCache(config, model_fp, layout) if config and (config.warm_url or config.cold_url) else None
        return cls(kv, model_fp, layout, remote)

    # --- arrival -------------------------------------------------------------------------------------------

    def arrive(self, seq: Sequence) -> None:
        """Name the prompt's full blocks and start the remote lookup of those the pool lacks (never waits)."""
        seq.cache_keys = prefix_block_keys(self.model_fp, self.layout, seq.prompt_ids)
        reusable = self._reusable(seq)
        if self.remote is None or not reusable:
            return
        first = len(self.pool.cached_prefix(reusable))
        if first < len(reusable):
            now = time.monotonic()
            timeout = self.remote.config.lookup_timeout_s
            seq.cache_hit = PendingLookup(self.remote.lookup_async(reusable[first:]), first, now,
                                          now + timeout + GRACE_S)

    def ready(self, seq: Sequence) -> bool:
        """Whether the request may be admitted: no remote lookup pending, or its deadline has passed."""
        pending = seq.cache_hit
        if not isinstance(pending, PendingLookup) or pending.future.done():
            return True
        if time.monotonic() < pending.deadline:
            return False
        pending.future.cancel()  # a miss: the prefix is recomputed
        self.stats.count("lookup_timeouts")
        seq.cache_hit = None
        return True

    def forget(self, seq: Sequence) -> None:
        """The request left before admission: stop waiting for its lookup."""
        if isinstance(seq.cache_hit, PendingLookup):
            seq.cache_hit.future.cancel()
        seq.cache_hit = None

    # --- admission -----------------------------------------------------------------------------------------

    def match(self, seq: Sequence) -> PrefixHit:
        """The longest cached prefix admission can reuse now (takes nothing yet)."""
        reusable = self._reusable(seq) if not seq.num_computed else []
        pool_blocks = self.pool.cached_prefix(reusable)
        found = self._resolved(seq)
        if found is None:
            return PrefixHit(pool_blocks, None)
        # remote blocks (keys[first:]) continue the pool's prefix only if the pool still covers keys[:first]
        skip = len(pool_blocks) - seq.cache_hit.first
        if not 0 <= skip < found.num_blocks:
            return PrefixHit(pool_blocks, None)
        return PrefixHit(pool_blocks, found.after(skip))

    def admission_cost(self, hit: PrefixHit) -> int:
        """Free blocks taking `hit` uses up: its evictable pool blocks (they leave the queue)."""
        return self.pool.num_evictable_among(hit.pool_blocks)

    def admit(self, seq: Sequence, hit: PrefixHit) -> None:
        """Give the sequence the hit's blocks (admission checked that its whole prompt fits)."""
        pending, seq.cache_hit = seq.cache_hit, None
        if isinstance(pending, PendingLookup):
            self.stats.observe_lookup_wait(time.monotonic() - pending.started)
        if not hit.num_blocks:
            return
        self.pool.take(hit.pool_blocks)
        seq.block_table = list(hit.pool_blocks)
        by_tier = {"hot": len(hit.pool_blocks) * self.block_size}
        if hit.pool_blocks:
            self.stats.add("hot", hits=len(hit.pool_blocks))
        if hit.remote is not None:
            landed = self.kv.allocate(hit.remote.num_blocks)
            keys = seq.cache_keys[len(hit.pool_blocks) : hit.num_blocks]
            for key, block, data, approximate in zip(keys, landed, hit.remote.blocks, hit.remote.lossy, strict=True):
                self.kv.write_block(block, data)
                if self.pool.register(key, block):
                    self._written.add(block)  # it came from there
                    if approximate:
                        self._lossy.add(block)
            seq.block_table += landed
            for tier, tokens in hit.remote.tokens_by_tier.items():
                by_tier[tier] = by_tier.get(tier, 0) + tokens
        seq.num_computed = seq.cached_tokens = hit.num_blocks * self.block_size
        seq.cached_by_tier = by_tier

    # --- after a step --------------------------------------------------------------------------------------

    def computed(self, seq: Sequence, start: int) -> None:
        """Register the prompt blocks that became full between positions `start` and seq.num_computed."""
        last = min(seq.num_computed // self.block_size, len(seq.cache_keys))
        for i in range(start // self.block_size, last):
            self.pool.register(seq.cache_keys[i], seq.block_table[i])

    def prompt_done(self, seq: Sequence) -> None:
        """The prompt's prefill completed: hand the blocks it computed to the remote tiers (written behind)."""
        if self.remote is None:
            return
        first = seq.cached_tokens // self.block_size
        entries = [(key, block) for key, block in zip(seq.cache_keys[first:], seq.block_table[first:])
                   if block not in self._written and self.pool.key_of(block) == key]
        if entries:
            self.remote.store([k for k, _ in entries], [self.kv.read_block(b) for _, b in entries])
            self._written.update(b for _, b in entries)

    def report_prefill(self, num_tokens: int, seconds: float) -> None:
        if self.remote is not None:
            self.remote.report_prefill(num_tokens, seconds)

    # --- shutdown ------------------------------------------------------------------------------------------

    def drain(self) -> int:
        """Hand every block the pool holds to the remote tiers before this replica goes; returns how many."""
        if self.remote is None:
            return 0
        return self.remote.drain([(key, self.kv.read_block(block)) for key, block in self.pool.cached_blocks()
                                  if block not in self._lossy])

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait for the writes behind (tests, benchmarks, shutdown); False on timeout."""
        return self.remote.flush(timeout_s) if self.remote is not None else True

    def close(self) -> None:
        if self.remote is not None:
            self.remote.close()

    # --- helpers -------------------------------------------------------------------------------------------

    def _reusable(self, seq: Sequence) -> list[str]:
        """Keys of the prompt blocks a hit may cover: all full blocks before the last prompt token, and none when
        every prompt token must be computed (prompt logprobs)."""
        if seq.params.prompt_logprobs is not None:
            return []
        return seq.cache_keys[: (len(seq.prompt_ids) - 1) // self.block_size]

    def _resolved(self, seq: Sequence) -> CacheLookup | None:
        """What the sequence's remote lookup found, if it has answered with at least one block."""
        pending = seq.cache_hit
        if not isinstance(pending, PendingLookup) or not pending.future.done() or pending.future.cancelled():
            return None
        try:
            found = pending.future.result()
        except Exception:  # noqa: BLE001 - a failed lookup is a miss; the cache counted the error
            return None
        return found if found.num_blocks else None

    def _evicted(self, key: str, block: int) -> None:
        """The pool reuses a cached block's page: write it behind first unless the remote tiers have it."""
        self._lossy.discard(block)
        if block in self._written:
            self._written.discard(block)
            return
        assert self.remote is not None
        self.remote.demote([key], [self.kv.read_block(block)])
