"""The engine replica: a Ray Serve deployment owning one continuous-batching engine and its KV cache.

It receives token ids and sampling fields from the ingress and streams back small dicts, each carrying the tokens
generated since the last one (the first token alone, at once; with `queue_seconds`, the time the request waited here
before its first step).
Client errors (bad request, full queue) come back as a single `{"error": ...}` item so the ingress can answer
with the right 4xx before any byte of the response is sent. Cancelling the stream aborts the request and frees
its KV blocks.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.handle import DeploymentHandle

from moe_serve.replicas.async_engine import AsyncLLMEngine
from moe_serve.replicas.engine import EngineConfig, LLMEngine, TokenLogprob
from moe_serve.replicas.experts import remote_moe
from moe_serve.replicas.routing import ROUTER_PATH
from moe_serve.replicas.sampling import SamplingParams
from moe_serve.replicas.settings import AppSettings

logger = logging.getLogger("ray.serve")


class EngineReplica:
    async def __init__(  # type: ignore[misc]
        self, settings: AppSettings, experts: DeploymentHandle | None = None
    ) -> None:
        """`experts`: the `ExpertShards` deployment when the experts live on shard actors (settings.shards > 0).

        Async (Serve awaits it) so the router's handle can be awaited: blocking on a handle in the loop is refused."""
        self.settings = settings
        replica = serve.get_replica_context().replica_id
        self.replica_id = replica.unique_id
        self.deployment = replica.deployment_id.name  # EngineReplica, or Ingress when colocated
        engine_config = EngineConfig(
            quantize=settings.quantize, dtype=settings.dtype, device=settings.device,
            num_threads=settings.replica_threads, kv_cache_bytes=settings.kv_cache_bytes,
            max_num_seqs=settings.max_num_seqs, max_step_ms=settings.max_step_ms, cache=settings.cache_config(),
            micro_batch_overlap=settings.micro_batch_overlap,
            expert_memory_bytes=settings.expert_memory_bytes,
        )
        moe = None
        if experts is not None:
            [router] = await experts.router.remote()
            moe = remote_moe(experts, router, settings)
        self.engine = AsyncLLMEngine(LLMEngine.from_pretrained(settings.model_dir, engine_config, moe=moe))

    async def generate(self, prompt_ids: list[int], sampling: dict[str, Any],
                       interval_s: float | None = 0.0) -> AsyncIterator[dict[str, Any]]:
        """Chunks of generated tokens (see AsyncLLMEngine.generate_chunks for `interval_s`)."""
        waiting = self.engine.num_waiting()  # per request: not the whole stats(), which walks the pool
        if waiting >= self.settings.limits.max_queued_requests:
            yield {"error": {"status": 429, "message": f"replica queue is full ({waiting} waiting)"}}
            return
        try:
            params = SamplingParams(**sampling)
            request_id = uuid.uuid4().hex
            first = True
            async with aclosing(self.engine.generate_chunks(prompt_ids, params, request_id, interval_s)) as chunks:
                async for chunk in chunks:
                    last = chunk[-1]
                    item = {"token_ids": [out.token_id for out in chunk], "text": "".join(o.text_delta for o in chunk),
                            "finished": last.finished, "finish_reason": last.finish_reason,
                            "cached_tokens": last.cached_tokens, "replica": self.replica_id}
                    if params.logprobs is not None:  # [logprob, [[token_id, logprob], ...]] per token
                        item["logprobs"] = [_entry(o.logprob) for o in chunk]
                    if chunk[0].prompt_logprobs is not None:  # the first chunk: the same per prompt token
                        item["prompt_logprobs"] = [_entry(lp) for lp in chunk[0].prompt_logprobs]
                    if first:
                        item["queue_seconds"] = self.engine.queue_seconds(request_id)
                        first = False
                    yield item
        except ValueError as exc:
            yield {"error": {"status": 400, "message": str(exc)}}

    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def stats(self) -> dict[str, Any]:
        """AsyncLLMEngine.stats, and which replica (`replica`, `deployment`) they describe."""
        return {**self.engine.stats(), "replica": self.replica_id, "deployment": self.deployment}

    def cache_metrics(self) -> bytes:
        """Prometheus text of this replica's prefix cache (hits, misses, bytes, latency per tier); empty when off."""
        return self.engine.cache_metrics()

    def cache_stats(self) -> dict[str, Any] | None:
        """This replica's prefix-cache counters and pool blocks (for `moe-serve status`); None when off."""
        return self.engine.cache_stats()

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Load this replica reports to Serve's autoscaler (read by replicas/autoscaling.py)."""
        stats = self.engine.stats()
        return {"running": stats["running"], "waiting": stats["waiting"], "kv_used_fraction": stats["kv_used_fraction"]}

    def __del__(self) -> None:
        """Serve calls this on scale-down after the replica's in-flight requests finished (graceful drain): stop the
        engine thread and write the pool's cached KV blocks to the warm tier so the surviving replicas keep the hits."""
        engine = getattr(self, "engine", None)
        if engine is None:
            return
        self.engine = None  # once: a colocating ingress calls this, then garbage collection may again
        engine.shutdown()
        logger.info("drained %d cached KV blocks to the lower cache tiers", engine.drain_cache())

    def check_health(self) -> None:
        if not self.engine.stats()["healthy"]:
            raise RuntimeError("engine thread is not running")


def engine_deployment_options(settings: AppSettings, name: str) -> dict[str, Any]:
    """`serve.deployment` options of the deployment `name` whose replicas hold the engines. Prefix-affinity routing
    needs the prompt's token ids in the call, so it applies to the EngineReplica deployment only."""
    routing = {"request_router_config": RequestRouterConfig(request_router_class=ROUTER_PATH)} \
        if settings.prefix_affinity and name == "EngineReplica" else {}
    return dict(
        name=name,
        ray_actor_options={"num_cpus": settings.replica_num_cpus},
        autoscaling_config=settings.autoscaling.serve_config(),
        max_ongoing_requests=settings.max_num_seqs + settings.limits.max_queued_requests,
        health_check_period_s=5,
        graceful_shutdown_timeout_s=30,
        **routing,
    )


def _entry(logprob: TokenLogprob | None) -> list[Any] | None:
    """A token's logprob as the ingress expects it: [logprob, [[token_id, logprob], ...]]; None for none."""
    return None if logprob is None else [logprob.logprob, [list(t) for t in logprob.top]]
