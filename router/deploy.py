"""Start the expert-parallel half of a model (shards + router actor) and give replicas an `MoEBackend` for it.

`ExpertParallel.moe(layer, hidden)` is what the engine's dense part calls per MoE layer: one hop to the router,
which fans out to the shards and returns the combined expert output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch

from moe_serve.cluster.bringup import ShardGroup, start_shards
from moe_serve.cluster.placement import ExpertPlacement
from moe_serve.model.config import ModelConfig
from moe_serve.model.quant import QuantMode
from moe_serve.router.router import Router, RouterConfig


@dataclass
class ExpertParallel:
    shards: ShardGroup
    router: Any  # Router actor handle

    def moe(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        out = ray.get(self.router.moe.remote(layer, hidden.numpy()))
        return torch.from_numpy(np.array(out))  # the object-store copy is read-only

    __call__ = moe

    def describe(self) -> dict[str, Any]:
        nodes = [info.node_id for info in self.shards.infos]
        plan = ray.get(self.router.placement_plan.remote())
        for entry, info in zip(plan["shards"], self.shards.infos):
            entry.update(node=info.node_id, gpu_ids=info.gpu_ids, device=info.device)
        return {**plan, "nodes": sorted(set(nodes)), "uses_gpus": self.shards.uses_gpus}

    def shutdown(self) -> None:
        ray.kill(self.router)
        self.shards.shutdown()


def start_expert_parallel(
    model_dir: str,
    num_shards: int,
    strategy: str = "PACK",
    quantize: QuantMode = "none",
    router_config: RouterConfig = RouterConfig(),
    use_gpus: bool | None = None,
) -> ExpertParallel:
    config = ModelConfig.from_dir(model_dir)
    placement = ExpertPlacement.balanced(config.num_experts, num_shards)
    shards = start_shards(model_dir, placement, strategy, use_gpus=use_gpus, quantize=quantize)
    router = ray.remote(Router).options(num_cpus=0, max_concurrency=1).remote(
        model_dir, placement, shards.actors, router_config
    )
    ray.get(router.placement_plan.remote())  # surface constructor errors now
    return ExpertParallel(shards, router)
