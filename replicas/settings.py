"""Settings of the Serve application: one pydantic model, read from the CLI, Serve YAML or Python.

Edges validate (pydantic with descriptions); the hot path gets plain values from here.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from moe_serve.cache import CacheConfig
from moe_serve.cluster.placement import Strategy
from moe_serve.model.dtype import DeviceName, DTypeName
from moe_serve.replicas.autoscaling import POLICY_PATH
from moe_serve.replicas.protocol import Limits

API_KEY_ENV = "MOE_SERVE_API_KEY"
REDIS_URL_ENV = "MOE_SERVE_REDIS_URL"
COLD_CACHE_ENV = "MOE_SERVE_COLD_CACHE_URL"


class CacheSettings(BaseModel):
    """The tiered prompt-prefix KV cache of every engine replica; URLs default to the environment."""

    redis_url: str | None = Field(None, description="Warm tier: redis://[user:password@]host:port/db, rediss:// for "
                                  "TLS, one node of a Redis Cluster or a host:port,host:port seed list; the user, "
                                  "password and TLS files may come from MOE_SERVE_REDIS_* variables instead "
                                  f"(cache/redis_client.py); default: ${REDIS_URL_ENV}")
    cold_url: str | None = Field(None, description=f"Cold tier, a Redis URL or directory; default: ${COLD_CACHE_ENV}")
    hot_bytes: int | None = Field(None, ge=0, description="Deprecated and ignored: the hot tier is the engine's KV "
                                                          "pool, sized by kv_cache_bytes")
    warm_ttl_s: float = Field(3600.0, gt=0)
    cold_ttl_s: float = Field(7 * 86400.0, gt=0)

    @field_validator("hot_bytes")
    @classmethod
    def _deprecated(cls, value: int | None) -> int | None:
        if value is not None:
            logging.getLogger(__name__).warning("cache.hot_bytes is deprecated and ignored: the hot tier is the "
                                                "engine's KV pool, sized by kv_cache_bytes")
        return value


class AutoscalingSettings(BaseModel):
    min_replicas: int = Field(1, ge=0, description="0 allows scale to zero; the first request then waits")
    max_replicas: int = Field(2, ge=1)
    initial_replicas: int | None = Field(None, ge=0)
    target_ongoing_requests: float = Field(8.0, gt=0, description="Requests per replica Serve aims for")
    upscale_delay_s: float = Field(1.0, ge=0)
    downscale_delay_s: float = Field(30.0, ge=0, description="Long enough to ride out dips in the load (no flapping)")
    downscale_to_zero_delay_s: float | None = Field(None, ge=0, description="Idle time before the last replica goes")
    metrics_interval_s: float = Field(0.5, gt=0, description="How often replicas report their load")
    look_back_period_s: float = Field(2.0, gt=0, description="Window the policy takes the peak load over")
    llm_policy: bool = Field(True, description="Scale on sequences and KV use (our policy) instead of Serve's "
                                                "request-count default")

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingSettings:
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) < min_replicas ({self.min_replicas})")
        return self

    def serve_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "min_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "target_ongoing_requests": self.target_ongoing_requests,
            "upscale_delay_s": self.upscale_delay_s,
            "downscale_delay_s": self.downscale_delay_s,
            "metrics_interval_s": self.metrics_interval_s,
            "look_back_period_s": self.look_back_period_s,
        }
        if self.downscale_to_zero_delay_s is not None:
            config["downscale_to_zero_delay_s"] = self.downscale_to_zero_delay_s
        if self.llm_policy:
            config["policy"] = {"policy_function": POLICY_PATH}
        if self.initial_replicas is not None:
            config["initial_replicas"] = self.initial_replicas
        return config


class AppSettings(BaseModel):
    model_dir: str = Field(..., description="Hugging Face layout model directory")
    model_name: str | None = Field(None, description="Name served in /v1/models; default: the directory name")
    quantize: Literal["none", "int8", "int4"] = Field("none", description="Weight-only quantization of experts")
    dtype: DTypeName = Field(
        "auto", description="Serving dtype of weights, activations and KV cache: auto = the checkpoint's dtype where "
                            "the hardware computes it natively (bf16 with AVX512-BF16/AMX or on CUDA), else float32")
    device: DeviceName = Field("cpu", description="Where each engine replica runs its dense part and KV cache")
    threads: int | None = Field(
        None, gt=0, description="Torch and kernel threads per engine replica; default: replica_num_cpus rounded up")
    kv_cache_bytes: int = Field(256 << 20, gt=0, description="KV memory per engine replica: the paged pool, whose "
                                                             "cached prefix blocks are the hot tier")
    max_step_ms: float | None = Field(50.0, gt=0, description="Inter-token budget: while requests decode, prefill "
                                                               "chunks are sized to keep a step within it; None: off")
    max_num_seqs: int = Field(64, gt=0, description="Sequences in one replica's running batch")
    api_key: str | None = Field(None, description=f"Required bearer token on /v1 routes; default: ${API_KEY_ENV}")
    limits: Limits = Field(default_factory=Limits)
    autoscaling: AutoscalingSettings = Field(default_factory=AutoscalingSettings)
    replica_num_cpus: float = Field(0.5, gt=0, description="Ray CPUs reserved per engine replica")
    stream_interval_ms: float = Field(
        20.0, ge=0, description="After the first token, a streamed response sends what was generated in this "
                                "interval as one chunk (fewer messages per token under load); 0: every engine step")
    prefix_affinity: bool = Field(True, description="Route requests sharing a prompt prefix to the same replica "
                                                    "(engine replicas of their own only)")
    colocated: bool = Field(False, description="Each ingress replica holds its engine: no Ray hop per streamed chunk, "
                                               "faster on a node of few cores; no prefix-affinity routing")
    cache: CacheSettings = Field(default_factory=CacheSettings)
    shards: int = Field(0, ge=0, description="Expert shard actors (one GPU each where the cluster has GPUs) that all "
                                             "engine replicas share through one router; 0: experts in every replica")
    placement: Strategy = Field(
        "PACK", description="Placement-group strategy of the shards: STRICT_SPREAD puts each on its own node")
    auto_rebalance_every: int | None = Field(
        None, gt=0, description="Copy hot experts to less-loaded shards, checked every N first-layer calls; None: off")
    micro_batch_overlap: bool = Field(
        False, description="With shards: decode steps run as two micro-batches, one's attention overlapping the "
                           "other's experts on the shards (slower on few cores: see bench/results/dispatch*.json)")
    expert_memory_bytes: int | None = Field(
        None, gt=0, description="Expert weights kept resident, in bytes, per engine replica (or per shard with "
                                "shards): experts load from the memory-mapped checkpoint on first use and the least "
                                "used go first; None: every expert resident from start-up")
    shard_transport: Literal["routed", "plain"] = Field(
        "routed", description="How the shared router reaches its shards: a compiled graph it drives (routed) or "
                              "plain actor calls")

    @field_validator("placement", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @property
    def replica_threads(self) -> int:
        return self.threads or max(1, math.ceil(self.replica_num_cpus))

    @property
    def served_name(self) -> str:
        return self.model_name or os.path.basename(os.path.normpath(self.model_dir))

    def cache_config(self) -> CacheConfig | None:
        """None when neither a warm nor a cold tier is configured (the cache is then off)."""
        warm = self.cache.redis_url or os.environ.get(REDIS_URL_ENV) or None
        cold = self.cache.cold_url or os.environ.get(COLD_CACHE_ENV) or None
        if warm is None and cold is None:
            return None
        return CacheConfig(warm_url=warm, warm_ttl_s=self.cache.warm_ttl_s,
                           cold_url=cold, cold_ttl_s=self.cache.cold_ttl_s)

    def resolved_api_key(self) -> str | None:
        return self.api_key or os.environ.get(API_KEY_ENV) or None
