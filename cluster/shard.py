"""The expert shard: a Ray actor holding some experts of every MoE layer, on its own GPU when there is one.

It reads only its own experts from the safetensors files and runs the grouped expert FFN for one batched call
per layer: rows arrive sorted by expert, with the expert ids and row counts as small integer arrays (`forward` for
plain actor calls, `forward_packed` for the router's compiled graph, where every shard gets a message per layer,
possibly empty). On the CPU, with the compiled kernels built, a call's experts run in one kernel call
(`KernelExperts.grouped`), which also holds their weights; on a GPU, vLLM's fused MoE kernel does when the `gpu`
extra is installed and passes a check against torch (fused_experts.py). An expert it does not hold yet (a copy placed by
rebalancing, or any expert after a restart) is loaded on first use, so a restarted shard heals itself from the
checkpoint without the router replaying its history. With `expert_memory_bytes`, the shard starts with none of its
experts and keeps at most that many bytes of them resident (moe_serve/model/resident_experts.py: its own budget).
Knows nothing of routing, serving or caching.
"""

from __future__ import annotations

import functools
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

import numpy as np
import torch

from moe_serve.cluster.fused_experts import fused_or_none
from moe_serve.kernels import cpu_ops
from moe_serve.model.checkpoint import Checkpoint
from moe_serve.model.config import ModelConfig
from moe_serve.model.moe import ExpertStack
from moe_serve.model.quant import QuantMode
from moe_serve.model.resident_experts import Holder, ResidentExperts, kernel_or_stack


@dataclass(frozen=True)
class ShardInfo:
    shard_id: int
    node_id: str
    hostname: str
    pid: int
    gpu_ids: list[str]
    device: str
    experts: dict[int, list[int]]  # layer -> experts held
    expert_bytes: int


class ShardMessage(NamedTuple):
    """One shard's input for one MoE layer: `counts[i]` rows of `rows` for expert `expert_ids[i]`, in order."""

    layer: int
    rows: np.ndarray  # [n, D], n may be 0
    expert_ids: np.ndarray  # [k] int64
    counts: np.ndarray  # [k] int64


def shard_device(quantize: QuantMode) -> torch.device:
    """The GPU Ray gave this actor (CUDA_VISIBLE_DEVICES holds just it) when torch sees one, else the CPU.

    The int8/int4 packed-weight kernels are torch's CPU kernels, so quantized experts stay on the CPU. The CUDA
    branch has not run on a real GPU yet (none was available to the tests); CI covers the CPU branch.
    """
    if quantize == "none" and torch.cuda.is_available():
        return torch.device("cuda", 0)
    return torch.device("cpu")


class ExpertShard:
    def __init__(self, model_dir: str, shard_id: int, experts: list[int], quantize: QuantMode = "none",
                 expert_memory_bytes: int | None = None) -> None:
        self.shard_id = shard_id
        self.config = ModelConfig.from_dir(model_dir)
        self.quantize = quantize
        self.device = shard_device(quantize)
        torch.set_num_threads(1)  # shards share the node's cores with each other and the replica
        # the compiled kernels hold CPU experts when built (KernelExperts), else the torch ExpertStack does
        ops = cpu_ops() if self.device.type == "cpu" else None
        self.experts = ResidentExperts(Checkpoint(Path(model_dir), self.config), quantize, expert_memory_bytes,
                                       self.device, make_holder=functools.partial(self._holder, ops))
        if expert_memory_bytes is None:
            for layer in self.config.moe_layer_ids:
                self.experts.load(layer, experts)
        self.busy_s = 0.0
        self.calls = 0

    def _holder(self, ops: ModuleType | None, stack: ExpertStack) -> Holder:
        if self.device.type == "cuda":
            return fused_or_none(stack) or stack
        return kernel_or_stack(ops, stack)

    def load_experts(self, layer: int, experts: list[int]) -> None:
        self.experts.load(layer, experts)

    def forward(self, layer: int, x: np.ndarray, expert_ids: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Rows of x [N, D] grouped by expert (`counts[i]` rows for `expert_ids[i]`) -> expert outputs [N, D]."""
        start_time = time.perf_counter()
        rows = torch.from_numpy(np.ascontiguousarray(x)).to(self.device)
        out = self.experts.run(layer, rows, expert_ids.tolist(), counts.tolist())
        result = out.cpu().numpy()
        self.busy_s += time.perf_counter() - start_time
        self.calls += 1
        return result

    def forward_packed(self, message: ShardMessage) -> np.ndarray:
        """`forward` for one packed message; an empty message (no rows for this shard) costs no FFN call."""
        if not len(message.rows):
            return message.rows
        return self.forward(*message)

    def info(self) -> ShardInfo:
        import ray

        context = ray.get_runtime_context()
        return ShardInfo(
            shard_id=self.shard_id,
            node_id=context.get_node_id(),
            hostname=socket.gethostname(),
            pid=os.getpid(),
            gpu_ids=[str(g) for g in ray.get_gpu_ids()],
            device=str(self.device),
            experts={layer: self.experts.resident(layer) for layer in self.config.moe_layer_ids},
            expert_bytes=self.experts.expert_bytes,
        )

    def load_stats(self) -> dict[str, float]:
        return {"busy_s": self.busy_s, "calls": float(self.calls)}
