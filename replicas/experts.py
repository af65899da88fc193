"""Expert shards inside the Serve application: one deployment owns the router and shard actors, engine replicas
call the router.

`ExpertShards` (a single replica) starts the shard actors in their placement group and the router actor; they are
owned by it, so they go when the application goes, and when its node dies Serve starts it again elsewhere with
fresh actors. Engine replicas ask it for the router's actor handle once and then call the router directly: several
replicas share one router, and by default the router drives a compiled graph to its shards (the "routed"
transport), since an actor runs one compiled graph at a time and so no replica can drive one through the shared
shards. `remote_moe` is an engine replica's MoE backend: the same `RemoteMoE` as the CLI's, whose recovery asks
`ExpertShards` for the current router.
"""

from __future__ import annotations

from typing import Any

import ray
from ray.serve.handle import DeploymentHandle

from moe_serve.replicas.settings import AppSettings
from moe_serve.router.backend import RemoteMoE
from moe_serve.router.deploy import start_expert_parallel
from moe_serve.router.router import RouterConfig
from moe_serve.router.transport import make_transport


class ExpertShards:
    """The Serve deployment holding the expert-parallel half of the model (shards + router)."""

    def __init__(self, settings: AppSettings) -> None:
        self.parallel = start_expert_parallel(
            settings.model_dir, settings.shards, strategy=settings.placement, quantize=settings.quantize,
            router_config=RouterConfig(auto_rebalance_every=settings.auto_rebalance_every),
            transport=settings.shard_transport, router_concurrency=2 * max(1, settings.autoscaling.max_replicas),
            expert_memory_bytes=settings.expert_memory_bytes,
        )

    def router(self) -> list[Any]:
        """The router's actor handle, in a list so Serve passes it through as a value."""
        return [self.parallel.router]

    def shard_actors(self) -> list[Any]:
        return list(self.parallel.shards.actors)

    def describe(self) -> dict[str, Any]:
        """Placement (experts per shard, node, GPU ids) and the router's load statistics."""
        return {**self.parallel.describe(), "load": ray.get(self.parallel.router.load_stats.remote(), timeout=10)}

    def metrics_text(self) -> bytes:
        """Prometheus text of the router's counters: tokens per expert and layer, rows and busy seconds per shard,
        retries, shard call latency."""
        return ray.get(self.parallel.router.metrics_text.remote(), timeout=10)

    def rebalance(self) -> list[dict[str, int]]:
        return ray.get(self.parallel.router.rebalance.remote(), timeout=60)

    def __del__(self) -> None:
        parallel = getattr(self, "parallel", None)
        if parallel is not None:
            parallel.shutdown()


def remote_moe(experts: DeploymentHandle, router: Any, settings: AppSettings,
               recovery_window_s: float = 120.0) -> RemoteMoE:
    """An engine replica's MoE backend. `router`: the handle `experts.router` gave (fetched by the caller, which may
    be on an event loop); recovery fetches the current one from the step thread, never from an event loop."""

    def current_router() -> Any:
        [handle] = experts.router.remote().result(timeout_s=recovery_window_s)
        return handle

    return RemoteMoE(make_transport(settings.shard_transport, router, []), current_router,
                     recovery_window_s=recovery_window_s)
