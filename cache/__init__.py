"""cache room: the remote KV block tiers (warm -> cold) around each engine's KV pool (the hot tier, which is the
engine's: replicas/block_pool.py), and the prompt cache, shared by every replica.

Owns: deterministic block keys (keys.py), the safe value format (codec.py), the tiers (tiers.py), the engine's
connector with non-blocking lookups, write-behind and the fetch-or-recompute decision (tiered.py), the prompt
cache (prompt.py) and cache metrics (stats.py). Knows nothing of experts, HTTP or the engine's paged memory:
blocks are tensors of `KVLayout.block_shape`. Nothing read from Redis is ever unpickled.
"""

from moe_serve.cache.codec import BlockCodec, CachedBlock, Corrupt, CorruptValue, decode_ids, encode_ids
from moe_serve.cache.keys import KVLayout, model_fingerprint, prefix_block_keys, prompt_key
from moe_serve.cache.prompt import PromptCache, PromptCacheConfig
from moe_serve.cache.stats import CacheStats
from moe_serve.cache.tiered import CacheConfig, CacheLookup, TieredKVCache

__all__ = [
    "BlockCodec",
    "CacheConfig",
    "CacheLookup",
    "CacheStats",
    "CachedBlock",
    "Corrupt",
    "CorruptValue",
    "KVLayout",
    "PromptCache",
    "PromptCacheConfig",
    "TieredKVCache",
    "decode_ids",
    "encode_ids",
    "model_fingerprint",
    "prefix_block_keys",
    "prompt_key",
]
