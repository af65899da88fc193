"""Dispatch: turn one layer's routing into one batched message per shard, and put the answers back in order.

Pure tensor code, no Ray. Rows are sorted by expert (`moe.dispatch`), then each expert's rows go to its holders:
one holder takes them all; with copies from rebalancing the rows are split into near-equal contiguous pieces.
Capacity-factor mode caps the rows per expert copy and moves overflow to each token's next-best expert.
`LayerStep` carries what combine needs from dispatch, so the two can run as separate tasks of a compiled graph.
Shape legend: T = tokens, E = experts, A = activated experts per token, N = T * A, D = hidden.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from moe_serve.cluster.placement import ExpertPlacement
from moe_serve.cluster.shard import ShardMessage
from moe_serve.router.gate import DispatchPlan, Gate, Routing, combine


@dataclass
class ShardBatch:
    """Everything one shard receives for one layer: rows grouped by expert, and where they came from."""

    shard: int
    expert_ids: list[int] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    # [lo, hi) ranges of the expert-sorted rows, adjacent ones merged: one range unless copies split experts
    ranges: list[tuple[int, int]] = field(default_factory=list)

    @property
    def num_rows(self) -> int:
        return sum(self.counts)

    def add(self, expert: int, lo: int, hi: int) -> None:
        self.expert_ids.append(expert)
        self.counts.append(hi - lo)
        if self.ranges and self.ranges[-1][1] == lo:
            self.ranges[-1] = (self.ranges[-1][0], hi)
        else:
            self.ranges.append((lo, hi))

    def message(self, layer: int, x_sorted: torch.Tensor) -> ShardMessage:
        """Rows [n, D], expert ids [k] and counts [k] as contiguous arrays: no per-token Python objects."""
        if len(self.ranges) == 1:
            lo, hi = self.ranges[0]
            rows = x_sorted[lo:hi]  # a contiguous view: serialising the message is the only copy
        else:
            rows = torch.cat([x_sorted[lo:hi] for lo, hi in self.ranges])
        return ShardMessage(layer, rows.numpy(), np.asarray(self.expert_ids, dtype=np.int64),
                            np.asarray(self.counts, dtype=np.int64))

    def scatter(self, out_sorted: np.ndarray, rows: np.ndarray) -> None:
        """Put this shard's output rows back at their expert-sorted positions."""
        start = 0
        for lo, hi in self.ranges:
            out_sorted[lo:hi] = rows[start : start + hi - lo]
            start += hi - lo


def empty_message(layer: int, hidden: int, dtype: np.dtype) -> ShardMessage:
    """The message of a shard with no rows in this layer call (a compiled graph sends every shard one)."""
    no_ids = np.zeros(0, dtype=np.int64)
    return ShardMessage(layer, np.zeros((0, hidden), dtype=dtype), no_ids, no_ids)


@dataclass(frozen=True)
class LayerStep:
    """One layer call between dispatch and combine: the routing, the expert sort, and each shard's rows."""

    layer: int
    routing: Routing
    plan: DispatchPlan
    batches: list[ShardBatch]  # shards with rows only
    messages: list[ShardMessage]  # one per batch, same order
    num_tokens: int
    sorted_shape: tuple[int, int]  # [N, D]
    dtype: torch.dtype

    def combine(self, results: dict[int, np.ndarray]) -> torch.Tensor:
        """Shard outputs (by shard id) -> routed-expert output [T, D]."""
        out_sorted = torch.empty(self.sorted_shape, dtype=self.dtype)
        out_view = out_sorted.numpy()  # numpy assignment takes the read-only arrays channels hand out
        for batch in self.batches:
            batch.scatter(out_view, results[batch.shard])
        return combine(out_sorted, self.plan, self.routing, self.num_tokens)


def split_by_shard(plan: DispatchPlan, placement: ExpertPlacement, layer: int) -> list[ShardBatch]:
    """Assign every expert-sorted row to a shard holding that expert; only shards with rows are returned.

    An expert with copies has its rows split into near-equal contiguous pieces, one per holder.
    """
    holders_of = placement.holder_table(layer)
    batches: dict[int, ShardBatch] = {}
    start = 0
    for expert, count in enumerate(plan.counts):
        if not count:
            continue
        holders = holders_of[expert]
        if len(holders) == 1:
            bounds = [0, count]
        else:
            bounds = np.linspace(0, count, len(holders) + 1).round().astype(int).tolist()
        for holder, lo, hi in zip(holders, bounds[:-1], bounds[1:]):
            if hi > lo:
                batch = batches.get(holder)
                if batch is None:
                    batch = batches[holder] = ShardBatch(holder)
                batch.add(expert, start + lo, start + hi)
        start += count
    return sorted(batches.values(), key=lambda b: b.shard)


def apply_capacity(
    routing: Routing, logits: torch.Tensor, capacity_factor: float, gate: Gate
) -> tuple[Routing, int]:
    """Cap rows per expert at ceil(factor * N / E); overflowing picks move to the token's next-best expert with room.
    `routing` is gate.route(logits); the moved picks are weighted by the gate's own rule (Gate.combine_weights).

    Returns the new routing and how many token-expert picks were moved (a token keeps A distinct experts).
    """
    num_tokens, top_k = routing.expert_ids.shape
    num_experts = logits.shape[1]
    capacity = max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts))
    ranked = torch.argsort(logits, dim=-1, descending=True).tolist()  # [T, E]
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
    return Routing(gate.combine_weights(logits, expert_ids).to(routing.weights.dtype), expert_ids), moved
