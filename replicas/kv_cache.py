"""Paged KV cache: fixed-size blocks in preallocated tensors, a free list, and per-sequence block tables.

The block (block_size consecutive token positions, all layers, K and V) is the unit the tiered cache stores
and the unit requests share (block_pool.py: refcounted, content-addressed, evictable). Memory is allocated once
from a byte budget that also covers the decode workspace (`split_budget`), so KV memory never grows with the
number of requests served.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_serve.model.attention import DecodeKV
from moe_serve.model.config import ModelConfig
from moe_serve.replicas.block_pool import BlockPool


@dataclass(frozen=True)
class KVCacheSpec:
    block_size: int
    num_blocks: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype = torch.float32

    @property
    def block_bytes(self) -> int:
        """Bytes of one block over all layers, K and V."""
        return bytes_per_block(self.block_size, self.num_layers, self.num_kv_heads, self.head_dim, self.dtype)

    @classmethod
    def from_budget(cls, config: ModelConfig, budget_bytes: int, block_size: int,
                    dtype: torch.dtype = torch.float32) -> KVCacheSpec:
        per_block = bytes_per_block(block_size, config.num_layers, config.num_kv_heads, config.head_dim, dtype)
        num_blocks = budget_bytes // per_block
        if num_blocks < 2:
            raise ValueError(
                f"kv_cache_bytes={budget_bytes} holds {num_blocks} blocks of {per_block} bytes; need at least 2"
            )
        return cls(block_size, num_blocks, config.num_layers, config.num_kv_heads, config.head_dim, dtype)


def bytes_per_block(
    block_size: int, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype = torch.float32
) -> int:
    return 2 * layers * block_size * kv_heads * head_dim * torch.finfo(dtype).bits // 8


WORKSPACE_SHARE = 4  # the decode workspace takes at most 1/4 of the KV budget


def split_budget(kv_cache_bytes: int, workspace_cap_bytes: int) -> tuple[int, int]:
    """(pool bytes, decode workspace bytes) of one KV byte budget: the workspace gets up to its cap, never more
    than a quarter, and the pool the rest."""
    workspace = min(workspace_cap_bytes, kv_cache_bytes // WORKSPACE_SHARE)
    return kv_cache_bytes - workspace, workspace


class PagedKVCache:
    def __init__(self, spec: KVCacheSpec) -> None:
        self.spec = spec
        slots = spec.num_blocks * spec.block_size
        shape = (slots, 2, spec.num_kv_heads, spec.head_dim)  # [S, K/V, KVH, Hd]: one copy writes both
        # zeros, not empty: padded attention reads slot 0 under a mask, and NaN garbage would leak through SDPA
        self.layers = [torch.zeros(shape, dtype=spec.dtype) for _ in range(spec.num_layers)]
        self.pool = BlockPool(spec.num_blocks)

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    def allocate(self, count: int) -> list[int]:
        return self.pool.allocate(count)

    def free(self, blocks: list[int]) -> None:
        self.pool.free(blocks)

    def read_block(self, block: int) -> torch.Tensor:
        """A copy of one block, [L, bs, 2, KVH, Hd] (KVLayout's default order), e.g. to write it behind."""
        bs = self.spec.block_size
        return torch.stack([page[block * bs : (block + 1) * bs] for page in self.layers])

    def write_block(self, block: int, data: torch.Tensor) -> None:
        """Fill one block's pages from `data` [L, bs, 2, KVH, Hd]."""
        bs = self.spec.block_size
        for layer, page in enumerate(self.layers):  # page [S, 2, KVH, Hd]
            page[block * bs : (block + 1) * bs].copy_(data[layer])

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.spec.block_size)


class DecodeWorkspace:
    """The decoding batch's K/V laid out contiguously, [B, 2, KVH, Lc, Hd] per layer, kept from step to step.

    Paged attention gathers every key of every decoding sequence from its blocks each step. While the decoding
    batch stays the same (the same sequences in the same order, each one token longer than at the last step) this
    copy only needs the new token written, and decode attention reads it in place. Any other batch rebuilds it from
    the pages with one gather, the cost the paged path pays every step. The pages stay the source of truth.
    Memory: at most `budget_bytes`; a batch that does not fit gets None (the paged path).
    """

    def __init__(self, spec: KVCacheSpec, budget_bytes: int, max_len: int) -> None:
        self.spec = spec
        self.budget_bytes = budget_bytes
        self.max_len = max_len
        self._buffers: list[torch.Tensor] = []  # per layer [Bc, 2, KVH, Lc, Hd]
        self._seqs: list[object] = []  # the sequence of each row at the last step, [] when invalid
        self._lengths: list[int] = []
        self._bases: dict[int, torch.Tensor] = {}  # B -> [B, 2 * KVH] first row of each (sequence, K/V, head)

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self._buffers)

    def invalidate(self) -> None:
        self._seqs, self._lengths = [], []

    def prepare(self, seqs: list[object], lengths: list[int], positions: torch.Tensor) -> DecodeKV | None:
        """The workspace for decoding `seqs` to `lengths` keys (positions [B] = lengths - 1); None: does not fit."""
        b, length = len(seqs), max(lengths)
        same = len(seqs) == len(self._seqs) and all(a is c for a, c in zip(seqs, self._seqs))
        rebuild = not (same and lengths == [n + 1 for n in self._lengths])
        if not self._buffers or b > self._buffers[0].shape[0] or length > self._buffers[0].shape[3]:
            rebuild = True
            if not self._allocate(b, length):
                self.invalidate()
                return None
        self._seqs, self._lengths = list(seqs), list(lengths)
        capacity = self._buffers[0].shape[3]
        layers = [buf[:b] for buf in self._buffers]
        rows = self._base(b, capacity).add(positions.unsqueeze(1)).flatten()
        return DecodeKV(layers, rows, length, rebuild)

    def _allocate(self, b: int, length: int) -> bool:
        s = self.spec
        token_bytes = bytes_per_block(1, s.num_layers, s.num_kv_heads, s.head_dim, s.dtype)
        old_b = self._buffers[0].shape[0] if self._buffers else 0
        rows = max(b, old_b)
        capacity = min(self.max_len, max(64, 1 << (length - 1).bit_length()))  # doubling: few reallocations
        if rows * capacity * token_bytes > self.budget_bytes:
            capacity = length
            if rows * capacity * token_bytes > self.budget_bytes:
                return False
        self._buffers = []  # free the old ones first
        self._bases = {}
        shape = (rows, 2, s.num_kv_heads, capacity, s.head_dim)
        # zeros: columns past a row's length are read under a -inf mask, and NaN garbage would leak through it
        self._buffers = [torch.zeros(shape, dtype=s.dtype) for _ in range(s.num_layers)]
        return True

    def _base(self, b: int, capacity: int) -> torch.Tensor:
        if b not in self._bases:
            self._bases[b] = (torch.arange(b * 2 * self.spec.num_kv_heads) * capacity).view(b, -1)
        return self._bases[b]
