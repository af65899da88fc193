"""Block ids of the paged KV memory: free, in use (reference-counted), or cached and evictable (LRU).

A full prompt block whose K/V are computed is registered under its chained block key (cache/keys.py); a later
request whose prompt starts with the same blocks takes them (one more reference) instead of computing or copying
them, as vLLM's block pool and SGLang's radix cache do. A block nobody references keeps its key and waits in the
evictable queue, least recently freed first: that queue is the hot tier. `allocate` takes never-registered blocks
first, then evicts from the queue's front; `on_evict` sees each evicted key before its page is reused.
Owns ids and bookkeeping only; the K/V tensors are PagedKVCache's.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass


class OutOfBlocks(RuntimeError):
    """No free KV block: the scheduler preempts a sequence and retries."""


@dataclass(frozen=True)
class PoolStats:
    total: int
    in_use: int  # referenced by at least one request
    shared: int  # referenced by more than one request
    evictable: int  # cached, referenced by none (the hot tier)
    free: int  # holding nothing
    peak_in_use: int  # most blocks in use at once since the last reset


class BlockPool:
    def __init__(self, num_blocks: int, on_evict: Callable[[str, int], None] | None = None) -> None:
        self.num_blocks = num_blocks
        self.on_evict = on_evict  # (key, block id) before the page is reused, e.g. to write it behind
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low block ids first
        self._evictable: OrderedDict[int, None] = OrderedDict()  # front = evicted first
        self._refs = [0] * num_blocks
        self._key_of: dict[int, str] = {}
        self._block_of: dict[str, int] = {}
        self._peak_in_use = 0

    @property
    def num_free(self) -> int:
        """Blocks `allocate` can hand out: free ones plus evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_in_use(self) -> int:
        return self.num_blocks - self.num_free

    def allocate(self, count: int) -> list[int]:
        if count > self.num_free:
            raise OutOfBlocks(f"need {count} blocks, {self.num_free} free")
        blocks = [self._free.pop() for _ in range(min(count, len(self._free)))]
        while len(blocks) < count:
            block, _ = self._evictable.popitem(last=False)
            key = self._key_of.pop(block)
            del self._block_of[key]
            if self.on_evict is not None:
                self.on_evict(key, block)
            blocks.append(block)
        for block in blocks:
            self._refs[block] = 1
        self._peak_in_use = max(self._peak_in_use, self.num_in_use)
        return blocks

    def free(self, blocks: Sequence[int]) -> None:
        """Drop one reference to each block; the last one frees it, or queues it as evictable if it has a key.
        Freed in reverse, so a sequence's tail blocks are evicted before its head (the head is shared more)."""
        for block in reversed(blocks):
            self._refs[block] -= 1
            if self._refs[block]:
                continue
            if block in self._key_of:
                self._evictable[block] = None
            else:
                self._free.append(block)

    def cached_prefix(self, keys: Sequence[str]) -> list[int]:
        """Blocks of the longest prefix of `keys` held in the pool (not yet taken: see `take`)."""
        blocks = []
        for key in keys:
            block = self._block_of.get(key)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def num_evictable_among(self, blocks: Sequence[int]) -> int:
        """How many of `blocks` taking them would remove from the evictable queue."""
        return sum(1 for b in blocks if not self._refs[b])

    def take(self, blocks: Sequence[int]) -> None:
        """One more reference to each of `blocks` (cached ones found by `cached_prefix`)."""
        for block in blocks:
            if not self._refs[block]:
                del self._evictable[block]
            self._refs[block] += 1
        self._peak_in_use = max(self._peak_in_use, self.num_in_use)

    def register(self, key: str, block: int) -> bool:
        """Name a computed, full block by its key so later requests can share it. False (and nothing changes)
        when the key already names another block (two requests computed the same prefix) or the block has a key."""
        if key in self._block_of or block in self._key_of:
            return False
        self._block_of[key] = block
        self._key_of[block] = key
        return True

    def key_of(self, block: int) -> str | None:
        return self._key_of.get(block)

    def cached_blocks(self) -> list[tuple[str, int]]:
        """Every (key, block) the pool holds, in use or evictable."""
        return list(self._block_of.items())

    def refcount(self, block: int) -> int:
        return self._refs[block]

    def stats(self) -> PoolStats:
        shared = sum(1 for r in self._refs if r > 1)
        return PoolStats(self.num_blocks, self.num_in_use, shared, len(self._evictable), len(self._free),
                         self._peak_in_use)

    def reset_peak(self) -> None:
        self._peak_in_use = self.num_in_use
