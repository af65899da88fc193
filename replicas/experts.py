"""Expert shards inside the Serve application: one deployment owns the router and shard actors, engine replicas
call the router.

`ExpertShards` (a single replica) starts the shard actors in their placement group and the router actor; they are
owned by it, so they go when the application goes, and when its node dies Serve starts it again elsewhere with
fresh actors. Engine replicas ask it for the router's actor handle once and then call the router directly with
plain actor calls: several replicas share one router, and a Ray compiled graph binds its actors to one caller.

`RemoteExperts` is the engine's MoE backend in that setup. The router already retries a shard that Ray is
restarting; when a layer call still fails (a shard's node is gone and its bundle is being placed again, or the
router itself went with its owner), it waits, asks `ExpertShards` for the current router and calls again, for up
to `recovery_window_s`. Requests running through a recovery stall instead of failing.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import ray
import torch
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle

from moe_serve.router.deploy import start_expert_parallel
from moe_serve.router.router import RouterConfig, ShardCallFailed
from moe_serve.router.transport import PlainTransport
from moe_serve.replicas.settings import AppSettings

log = logging.getLogger(__name__)

# Errors after which the layer call is made again: the router or a shard died and is coming back.
RECOVERABLE = (RayActorError, ShardCallFailed)


class ExpertShards:
    """The Serve deployment holding the expert-parallel half of the model (shards + router)."""

    def __init__(self, settings: AppSettings) -> None:
        self.parallel = start_expert_parallel(
            settings.model_dir, settings.shards, strategy=settings.placement, quantize=settings.quantize,
            router_config=RouterConfig(auto_rebalance_every=settings.auto_rebalance_every),
            transport="plain", router_concurrency=max(1, settings.autoscaling.max_replicas),
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
        """Prometheus text of the router's counters: tokens per expert and layer, rows per shard, retries."""
        return ray.get(self.parallel.router.metrics_text.remote(), timeout=10)

    def rebalance(self) -> list[dict[str, int]]:
        return ray.get(self.parallel.router.rebalance.remote(), timeout=60)

    def __del__(self) -> None:
        parallel = getattr(self, "parallel", None)
        if parallel is not None:
            parallel.shutdown()


class RemoteExperts:
    """MoE backend of an engine replica: routed-expert outputs come from the `ExpertShards` router."""

    def __init__(self, shards: DeploymentHandle, router: Any, recovery_window_s: float = 120.0,
                 retry_pause_s: float = 0.5) -> None:
        """`router`: the handle `shards.router` gave (fetched by the caller, which may be on an event loop)."""
        self.shards = shards
        self.recovery_window_s = recovery_window_s
        self.retry_pause_s = retry_pause_s
        self.recoveries = 0
        self.transport = PlainTransport(router)

    def _current_router(self) -> Any:
        """Called from the engine's step thread, never from an event loop."""
        [router] = self.shards.router.remote().result(timeout_s=self.recovery_window_s)
        return router

    def __call__(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        deadline = time.monotonic() + self.recovery_window_s
        while True:
            try:
                # float32 on the wire (numpy has no bf16); the shards compute in float32
                return torch.from_numpy(self.transport(layer, hidden.float().numpy())).to(hidden.dtype)
            except RECOVERABLE as exc:
                if time.monotonic() >= deadline:
                    raise
                log.warning("MoE layer %d call failed (%s); retrying with the current router", layer, exc)
                self.recoveries += 1
                time.sleep(self.retry_pause_s)
                try:
                    self.transport.router = self._current_router()
                except Exception as fetch_error:  # noqa: BLE001 - ExpertShards itself may be restarting
                    log.warning("ExpertShards not reachable yet: %s", fetch_error)
