"""Dispatch: turn one layer's routing into one batched message per shard, and put the answers back in order.

Pure tensor code, no Ray. Rows are sorted by expert (`moe.dispatch`), then each expert's rows go to its holders:
one holder takes them all; with copies from rebalancing the rows are split into near-equal contiguous pieces.
Capacity-factor mode caps the rows per expert copy and moves overflow to each token's next-best expert.
Shape legend: T = tokens, E = experts, A = activated experts per token, N = T * A, D = hidden.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from moe_serve.cluster.placement import ExpertPlacement
from moe_serve.model.moe import DispatchPlan, Routing


@dataclass
class ShardBatch:
    """Everything one shard receives for one layer: rows grouped by expert, and where they came from."""

    shard: int
    expert_ids: list[int] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    sorted_rows: list[torch.Tensor] = field(default_factory=list)  # index ranges into the expert-sorted rows

    @property
    def num_rows(self) -> int:
        return sum(self.counts)

    def add(self, expert: int, rows: torch.Tensor) -> None:
        self.expert_ids.append(expert)
        self.counts.append(len(rows))
        self.sorted_rows.append(rows)

    def row_index(self) -> torch.Tensor:
        return torch.cat(self.sorted_rows)

    def message(self, x_sorted: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rows [n, D], expert ids [k], counts [k]) as contiguous arrays: no per-token Python objects."""
        rows = x_sorted.index_select(0, self.row_index()).numpy()
        return rows, np.asarray(self.expert_ids, dtype=np.int64), np.asarray(self.counts, dtype=np.int64)


def split_by_shard(plan: DispatchPlan, placement: ExpertPlacement, layer: int) -> list[ShardBatch]:
    """Assign every expert-sorted row to a shard holding that expert; only shards with rows are returned."""
    batches = {shard: ShardBatch(shard) for shard in range(placement.num_shards)}
    start = 0
    for expert, count in enumerate(plan.counts):
        if count:
            holders = placement.holders(layer, expert)
            bounds = np.linspace(0, count, len(holders) + 1).round().astype(int)
            for holder, lo, hi in zip(holders, bounds[:-1], bounds[1:]):
                if hi > lo:
                    batches[holder].add(expert, torch.arange(start + lo, start + hi))
            start += count
    return [batch for batch in batches.values() if batch.counts]


def apply_capacity(
    routing: Routing, gate_probs: torch.Tensor, capacity_factor: float, norm_topk_prob: bool
) -> tuple[Routing, int]:
    """Cap rows per expert at ceil(factor * N / E); overflowing picks move to the token's next-best expert with room.

    Returns the new routing and how many token-expert picks were moved (a token keeps A distinct experts).
    """
    num_tokens, top_k = routing.expert_ids.shape
    num_experts = gate_probs.shape[1]
    capacity = max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts))
    ranked = torch.argsort(gate_probs, dim=-1, descending=True).tolist()  # [T, E]
    load = [0] * num_experts
    chosen_ids: list[list[int]] = []
    moved = 0
    for token, preferences in enumerate(ranked):
        picks: list[int] = []
        for rank, expert in enumerate(preferences):
            if load[expert] < capacity or num_experts - rank <= top_k - len(picks):
                picks.append(expert)  # the last clause keeps A picks even when every expert is full
                load[expert] += 1
                moved += rank >= top_k
                if len(picks) == top_k:
                    break
        chosen_ids.append(picks)
    expert_ids = torch.tensor(chosen_ids, dtype=torch.long)
    weights = gate_probs.gather(1, expert_ids)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return Routing(weights.to(routing.weights.dtype), expert_ids), moved
