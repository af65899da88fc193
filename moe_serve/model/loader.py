"""Load a whole model for in-process use: config, dense part, and an MoE backend holding every expert (or, under an
expert memory budget, the gates alone, experts loaded on first use)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from moe_serve.kernels import cpu_ops
from moe_serve.model.checkpoint import Checkpoint
from moe_serve.model.kernel_moe import KernelExperts
from moe_serve.model.config import ModelConfig
from moe_serve.model.moe import ExpertStack, LocalMoE
from moe_serve.router.gate import Gate
from moe_serve.model.quant import QuantMode
from moe_serve.model.resident_experts import OnDemandMoE, ResidentExperts
from moe_serve.model.transformer import DenseModel


@dataclass
class LoadedModel:
    config: ModelConfig
    dense: DenseModel
    moe: LocalMoE | OnDemandMoE  # both hold every MoE layer's gate (`gates`)


def load_dense_model(model_dir: str | Path, dtype: torch.dtype = torch.float32) -> tuple[ModelConfig, DenseModel]:
    """The dense part alone, for a replica whose experts live on shard actors."""
    config = ModelConfig.from_dir(model_dir)
    return config, DenseModel(config, Checkpoint(model_dir, config, dtype))


def load_local_model(model_dir: str | Path, quantize: QuantMode = "none", dtype: torch.dtype = torch.float32,
                     expert_memory_bytes: int | None = None) -> LoadedModel:
    """Every weight in `dtype` (quantized experts are packed from it), converted one tensor at a time. With
    `expert_memory_bytes`, the experts load on first use and at most that many bytes of them stay resident."""
    config = ModelConfig.from_dir(model_dir)
    checkpoint = Checkpoint(model_dir, config, dtype)
    gates = {layer: Gate(checkpoint.load_gate(layer), config.top_k, config.norm_topk_prob)
             for layer in config.moe_layer_ids}
    if expert_memory_bytes is not None:
        experts = ResidentExperts(checkpoint, quantize, expert_memory_bytes)
        moe = OnDemandMoE(gates, experts, config.num_experts)
        return LoadedModel(config, DenseModel(config, checkpoint), moe)
    all_experts = list(range(config.num_experts))
    moe = LocalMoE({}, {}, config.num_experts)
    for layer, gate in gates.items():  # one layer at a time: a layer the kernel takes is held once
        if quantize == "none" and moe.kernel_holds(dtype):  # one expert at a time, straight into panels
            experts = KernelExperts.load(
                cpu_ops(), config.num_experts, functools.partial(checkpoint.load_expert_w13, layer),
                functools.partial(checkpoint.load_expert_w2, layer), gate.weight, gate.top_k, gate.norm_topk_prob)
            moe.add_kernel_layer(layer, gate, experts)
            continue
        moe.add_layer(layer, gate, ExpertStack(all_experts, *checkpoint.load_experts(layer, all_experts), quantize))
    return LoadedModel(config, DenseModel(config, checkpoint), moe)
