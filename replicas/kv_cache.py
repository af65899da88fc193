"""Paged KV cache: fixed-size blocks in preallocated tensors, a free list, and per-sequence block tables.

The block (block_size consecutive token positions, all layers, K and V) is the unit the tiered cache stores
and the unit requests share (block_pool.py: refcounted, content-addressed, evictable). Memory is allocated once
from a byte budget, so KV memory never grows with the number of requests served; attention reads the pages in
place, so there is no other copy of a sequence's K/V.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

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


def lazily_zeroed(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zero CPU tensor whose pages the OS zeroes on first write (calloc maps fresh pages; torch.zeros writes every
    byte): a replica's pool costs neither start-up time nor resident memory until its blocks are used."""
    nbytes = math.prod(shape) * dtype.itemsize
    return torch.from_numpy(np.zeros(nbytes, dtype=np.uint8)).view(dtype).view(shape)


class PagedKVCache:
    def __init__(self, spec: KVCacheSpec) -> None:
        self.spec = spec
        slots = spec.num_blocks * spec.block_size
        shape = (slots, 2, spec.num_kv_heads, spec.head_dim)  # [S, K/V, KVH, Hd]: one copy writes both
        # zeros, not empty: padded attention reads slot 0 under a mask, and NaN garbage would leak through SDPA
        self.layers = [lazily_zeroed(shape, spec.dtype) for _ in range(spec.num_layers)]
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
