"""The engine's link to the tiered cache: reuse cached prompt-prefix KV blocks, write new ones behind.

At arrival a request's full prompt blocks are looked up (hot, then warm, then cold; the cache batches each tier).
At admission the hits are copied into freshly allocated pages and counted as computed, so prefill starts after
them; at least one prompt token is always computed, because its logits are needed. When a prompt's prefill
completes, its new full blocks are handed to the cache, which writes them behind the request.
"""

from __future__ import annotations

import torch

from moe_serve.cache import CacheConfig, KVLayout, TieredKVCache, model_fingerprint
from moe_serve.replicas.kv_cache import PagedKVCache
from moe_serve.replicas.scheduler import Sequence


class PrefixCacheLink:
    def __init__(self, cache: TieredKVCache, kv: PagedKVCache) -> None:
        self.cache = cache
        self.kv = kv
        self.block_size = kv.spec.block_size

    @classmethod
    def open(cls, config: CacheConfig, model_dir: str, quantize: str, kv: PagedKVCache) -> PrefixCacheLink:
        spec = kv.spec
        layout = KVLayout(spec.block_size, spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.dtype)
        fingerprint = model_fingerprint(model_dir, extra=f"quantize={quantize}")
        return cls(TieredKVCache(config, fingerprint, layout), kv)

    def lookup(self, seq: Sequence) -> None:
        seq.cache_keys = self.cache.block_keys(seq.prompt_ids)
        reusable = (len(seq.prompt_ids) - 1) // self.block_size  # the last prompt token is always computed
        hit = self.cache.lookup(seq.cache_keys[:reusable]) if reusable else None
        seq.cache_hit = hit if hit is not None and hit.num_blocks else None

    def admit(self, seq: Sequence) -> None:
        """Copy a looked-up prefix into pages (called before the first chunk is reserved)."""
        hit, seq.cache_hit = seq.cache_hit, None
        if hit is None or seq.num_computed or seq.block_table:
            return
        seq.block_table = self.kv.allocate(hit.num_blocks)  # admission checked the whole prompt fits
        bs = self.block_size
        for block_id, block in zip(seq.block_table, hit.blocks):
            for layer, page in enumerate(self.kv.layers):  # block [L, bs, 2, KVH, Hd], page [S, 2, KVH, Hd]
                page[block_id * bs : (block_id + 1) * bs].copy_(block[layer])
        seq.num_computed = hit.cached_tokens
        seq.cached_tokens = hit.cached_tokens
        seq.cached_by_tier = hit.tokens_by_tier

    def store_prompt(self, seq: Sequence) -> None:
        """Hand the prompt's full blocks not already cached to the cache (written behind)."""
        bs = self.block_size
        first = seq.cached_tokens // bs
        blocks = [
            torch.stack([page[b * bs : (b + 1) * bs] for page in self.kv.layers])  # a copy, not a page view
            for b in seq.block_table[first : len(seq.cache_keys)]
        ]
        if blocks:
            self.cache.store(seq.cache_keys[first : first + len(blocks)], blocks)

    def report_prefill(self, num_tokens: int, seconds: float) -> None:
        self.cache.report_prefill(num_tokens, seconds)

    def drain(self) -> int:
        """Hand every hot block to the warm/cold tiers before this replica goes (see `TieredKVCache.drain`)."""
        return self.cache.drain()

    def close(self) -> None:
        self.cache.close()
