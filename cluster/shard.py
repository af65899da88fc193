"""The expert shard: a Ray actor holding some experts of every MoE layer, on its own GPU when there is one.

It reads only its own experts from the safetensors files and runs the grouped expert FFN for one batched call
per layer: rows arrive sorted by expert, with the expert ids and row counts as small integer arrays (`forward` for
plain actor calls, `forward_packed` for the router's compiled graph, where every shard gets a message per layer,
possibly empty). On the CPU, with the compiled kernels built, a call's experts run in one kernel call
(`KernelExperts.grouped`), which also holds their weights; on a GPU, vLLM's fused MoE kernel does when the `gpu`
extra is installed and passes a check against torch (fused_experts.py). An expert it does not hold yet (a copy placed by
rebalancing, or any expert after a restart) is loaded on first use, so a restarted shard heals itself from the
checkpoint without the router replaying its history.
Knows nothing of routing, serving or caching.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from moe_serve.cluster.fused_experts import FusedMoEExperts, fused_or_none
from moe_serve.kernels import cpu_ops
from moe_serve.model.checkpoint import Checkpoint
from moe_serve.model.config import ModelConfig
from moe_serve.model.kernel_moe import KERNEL_FLOAT_DTYPES, KernelExperts
from moe_serve.model.moe import ExpertStack
from moe_serve.model.quant import QuantMode, stackable


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


Holder = ExpertStack | KernelExperts | FusedMoEExperts  # where a shard's expert lives


def _runs_by_holder(held: dict[int, tuple[Holder, int]], expert_ids: list[int], counts: list[int],
                    ) -> Iterator[tuple[Holder, list[int], list[int]]]:
    """The call's (expert, count) runs, consecutive ones with the same holder merged: (holder, indices, counts)."""
    current: Holder | None = None
    indices: list[int] = []
    run_counts: list[int] = []
    for expert, count in zip(expert_ids, counts):
        holder, index = held[expert]
        if holder is not current and current is not None:
            yield current, indices, run_counts
            indices, run_counts = [], []
        current = holder
        indices.append(index)
        run_counts.append(count)
    if current is not None:
        yield current, indices, run_counts


def shard_device(quantize: QuantMode) -> torch.device:
    """The GPU Ray gave this actor (CUDA_VISIBLE_DEVICES holds just it) when torch sees one, else the CPU.

    The int8/int4 packed-weight kernels are torch's CPU kernels, so quantized experts stay on the CPU. The CUDA
    branch has not run on a real GPU yet (none was available to the tests); CI covers the CPU branch.
    """
    if quantize == "none" and torch.cuda.is_available():
        return torch.device("cuda", 0)
    return torch.device("cpu")


class ExpertShard:
    def __init__(
        self, model_dir: str, shard_id: int, experts: list[int], quantize: QuantMode = "none"
    ) -> None:
        self.shard_id = shard_id
        self.config = ModelConfig.from_dir(model_dir)
        self.checkpoint = Checkpoint(Path(model_dir), self.config)
        self.quantize = quantize
        self.device = shard_device(quantize)
        torch.set_num_threads(1)  # shards share the node's cores with each other and the replica
        # the compiled kernels hold CPU experts when built (KernelExperts), else the torch ExpertStack does
        self._ops = cpu_ops() if self.device.type == "cpu" else None
        # layer -> expert id -> (holder, index in it); a holder per load keeps loading incremental
        self._experts: dict[int, dict[int, tuple[Holder, int]]] = {}
        for layer in self.config.moe_layer_ids:
            self.load_experts(layer, experts)
        self.busy_s = 0.0
        self.calls = 0

    def load_experts(self, layer: int, experts: list[int]) -> None:
        held = self._experts.setdefault(layer, {})
        missing = [e for e in experts if e not in held]
        if not missing:
            return
        w13, w2 = self.checkpoint.load_experts(layer, missing)
        stack = ExpertStack(missing, w13.to(self.device), w2.to(self.device), quantize=self.quantize)
        holder: Holder = stack
        if self._ops is not None and stackable(stack.w13 + stack.w2, KERNEL_FLOAT_DTYPES):
            holder = KernelExperts(self._ops, stack.w13, stack.w2)  # the experts' only copy from here on
        elif self.device.type == "cuda":
            holder = fused_or_none(stack) or stack
        held.update({expert: (holder, index) for index, expert in enumerate(missing)})

    def forward(self, layer: int, x: np.ndarray, expert_ids: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Rows of x [N, D] grouped by expert (`counts[i]` rows for `expert_ids[i]`) -> expert outputs [N, D]."""
        start_time = time.perf_counter()
        self.load_experts(layer, [int(e) for e in expert_ids])
        held = self._experts[layer]
        rows = torch.from_numpy(np.ascontiguousarray(x)).to(self.device)
        out = torch.empty_like(rows)
        start = 0
        for holder, indices, run_counts in _runs_by_holder(held, expert_ids.tolist(), counts.tolist()):
            n = sum(run_counts)
            segment = rows[start : start + n]
            if not isinstance(holder, ExpertStack):  # one kernel call for all its experts' rows
                out[start : start + n] = holder.grouped(segment, torch.tensor(indices), torch.tensor(run_counts))
            else:
                offset = 0
                for index, count in zip(indices, run_counts):
                    out[start + offset : start + offset + count] = holder.ffn(index, segment[offset : offset + count])
                    offset += count
            start += n
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
        holders = {id(holder): holder for held in self._experts.values() for holder, _ in held.values()}
        return ShardInfo(
            shard_id=self.shard_id,
            node_id=context.get_node_id(),
            hostname=socket.gethostname(),
            pid=os.getpid(),
            gpu_ids=[str(g) for g in ray.get_gpu_ids()],
            device=str(self.device),
            experts={layer: sorted(held) for layer, held in self._experts.items()},
            expert_bytes=sum(holder.nbytes for holder in holders.values()),
        )

    def load_stats(self) -> dict[str, float]:
        return {"busy_s": self.busy_s, "calls": float(self.calls)}
