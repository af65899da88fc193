"""Start the expert-parallel half of a model (shards + router actor) and give the engine a `RemoteMoE` for it.

`ExpertParallel.moe(layer, hidden)` is what the engine's dense part calls per MoE layer. It reaches the router and
the shards through a transport (router/transport.py): "compiled" (a graph the caller drives; one caller only),
"routed" (an actor call to a router that drives a graph to its shards; any number of callers) or "plain".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import ray
import torch

from moe_serve.cluster.bringup import ShardGroup, start_shards
from moe_serve.cluster.placement import ExpertPlacement
from moe_serve.model.config import ModelConfig
from moe_serve.model.quant import QuantMode
from moe_serve.router.backend import RemoteMoE
from moe_serve.router.router import Router, RouterConfig
from moe_serve.router.transport import TRANSPORTS, CompiledGraphConfig, Transport, TransportKind, make_transport

# The lowest per-layer cost for a single caller in bench/dispatch.py (bench/results/dispatch.json).
DEFAULT_TRANSPORT: TransportKind = "compiled"


@dataclass
class ExpertParallel:
    shards: ShardGroup
    router: Any  # Router actor handle
    transport: Transport
    backend: RemoteMoE = field(init=False)

    def __post_init__(self) -> None:
        # The router restarts in place (max_restarts=-1): its handle stays the current one.
        self.backend = RemoteMoE(self.transport, lambda: self.router)

    def moe(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        return self.backend(layer, hidden)

    __call__ = moe

    def submit(self, layer: int, hidden: torch.Tensor) -> Callable[[], torch.Tensor]:
        return self.backend.submit(layer, hidden)

    def describe(self) -> dict[str, Any]:
        infos = self.shards.refresh_infos()
        nodes = [info.node_id for info in infos]
        plan = ray.get(self.router.placement_plan.remote())
        for entry, info in zip(plan["shards"], infos):
            entry.update(node=info.node_id, gpu_ids=info.gpu_ids, device=info.device)
        transport = self.backend.stats()
        shard_graph = ray.get(self.router.graph_stats.remote())
        if shard_graph is not None:
            transport["shard_graph"] = shard_graph
        return {**plan, "nodes": sorted(set(nodes)), "uses_gpus": self.shards.uses_gpus, "transport": transport}

    def shutdown(self) -> None:
        self.transport.close()  # a compiled graph goes before its actors
        try:
            ray.get(self.router.close.remote(), timeout=10)  # and so does the router's own
        except Exception:  # noqa: BLE001 - a dead or restarting router has no graph to tear down
            pass
        ray.kill(self.router)
        self.shards.shutdown()


def start_expert_parallel(
    model_dir: str,
    num_shards: int,
    strategy: str = "PACK",
    quantize: QuantMode = "none",
    router_config: RouterConfig = RouterConfig(),
    use_gpus: bool | None = None,
    transport: TransportKind = DEFAULT_TRANSPORT,
    graph_config: CompiledGraphConfig = CompiledGraphConfig(),
    router_concurrency: int = 2,
    expert_memory_bytes: int | None = None,
) -> ExpertParallel:
    """Shards + router, reached through `transport` (one of TRANSPORTS; "routed" turns the router's shard graph on,
    with `graph_config`). `router_concurrency`: calls the router serves at once (two per engine replica sharing
    it: the halves of an overlapped step). `expert_memory_bytes`: each shard's budget of resident experts."""
    if transport not in TRANSPORTS:
        raise ValueError(f"unknown transport {transport!r}; choose one of {', '.join(TRANSPORTS)}")
    router_config = replace(router_config, shard_graph=transport == "routed", graph=graph_config)
    config = ModelConfig.from_dir(model_dir)
    placement = ExpertPlacement.balanced(config.num_experts, num_shards)
    shards = start_shards(model_dir, placement, strategy, use_gpus=use_gpus, quantize=quantize,
                          expert_memory_bytes=expert_memory_bytes)
    # A router that dies (its node went) comes back with the same gates and shards; callers retry meanwhile.
    router = ray.remote(Router).options(num_cpus=0, max_concurrency=router_concurrency, max_restarts=-1).remote(
        model_dir, placement, shards.actors, router_config
    )
    ray.get(router.placement_plan.remote())  # surface constructor errors now
    return ExpertParallel(shards, router, make_transport(transport, router, shards.actors, graph_config))
