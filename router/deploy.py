"""Start the expert-parallel half of a model (shards + router actor) and give replicas an `MoEBackend` for it.

`ExpertParallel.moe(layer, hidden)` is what the engine's dense part calls per MoE layer. It reaches the router and
the shards through a transport (router/transport.py): a Ray compiled graph, or plain actor calls (the fallback
the compiled graph uses while it is down).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ray
import torch

from moe_serve.cluster.bringup import ShardGroup, start_shards
from moe_serve.cluster.placement import ExpertPlacement
from moe_serve.model.config import ModelConfig
from moe_serve.model.quant import QuantMode
from moe_serve.router.router import Router, RouterConfig
from moe_serve.router.transport import TRANSPORTS, CompiledGraphConfig, Transport, TransportKind, make_transport

# bench/dispatch.py on the 2-core CPU machine, router + 4 shards, tiny Mixtral (bench/results/dispatch.json): the
# compiled graph costs 2-3.5x less per MoE layer than plain actor calls at batch 1-32 when the machine is otherwise
# idle. Plain stays the fallback a compiled transport uses while its graph is down.
DEFAULT_TRANSPORT: TransportKind = "compiled"


@dataclass
class ExpertParallel:
    shards: ShardGroup
    router: Any  # Router actor handle
    transport: Transport

    def moe(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        # float32 on the wire (numpy has no bf16); the shards compute in float32
        return torch.from_numpy(self.transport(layer, hidden.float().numpy())).to(hidden.dtype)

    __call__ = moe

    def describe(self) -> dict[str, Any]:
        infos = self.shards.refresh_infos()
        nodes = [info.node_id for info in infos]
        plan = ray.get(self.router.placement_plan.remote())
        for entry, info in zip(plan["shards"], infos):
            entry.update(node=info.node_id, gpu_ids=info.gpu_ids, device=info.device)
        return {**plan, "nodes": sorted(set(nodes)), "uses_gpus": self.shards.uses_gpus,
                "transport": self.transport.stats()}

    def shutdown(self) -> None:
        self.transport.close()  # a compiled graph goes before its actors
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
    router_concurrency: int = 1,
) -> ExpertParallel:
    """Shards + router; `transport` "compiled" (a Ray compiled graph per layer call) or "plain" (actor calls).

    `router_concurrency`: plain calls the router serves at once (one per engine replica that shares it)."""
    if transport not in TRANSPORTS:
        raise ValueError(f"unknown transport {transport!r}; choose one of {', '.join(TRANSPORTS)}")
    config = ModelConfig.from_dir(model_dir)
    placement = ExpertPlacement.balanced(config.num_experts, num_shards)
    shards = start_shards(model_dir, placement, strategy, use_gpus=use_gpus, quantize=quantize)
    # A router that dies (its node went) comes back with the same gates and shards; callers retry meanwhile.
    router = ray.remote(Router).options(num_cpus=0, max_concurrency=router_concurrency, max_restarts=-1).remote(
        model_dir, placement, shards.actors, router_config
    )
    ray.get(router.placement_plan.remote())  # surface constructor errors now
    return ExpertParallel(shards, router, make_transport(transport, router, shards.actors, graph_config))
