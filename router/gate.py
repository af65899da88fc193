"""Gating, dispatch and combine: the MoE vocabulary the in-process engine, the router actor and capacity mode share.

`Gate` holds the one routing rule (the compiled kernel's `moe_experts` follows it too); `dispatch` sorts token-expert
pairs by expert; `combine` sums each token's weighted expert outputs. Pure tensor code: no weights but the gates.
Shape legend: T = tokens, D = hidden, E = experts, A = activated experts per token (top-k), N = T * A.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Routing:
    weights: torch.Tensor  # [T, A] float, combine weights
    expert_ids: torch.Tensor  # [T, A] long, global expert ids


@dataclass(frozen=True)
class Gate:
    """The one routing rule every MoE path follows (the compiled kernel's `moe_experts` and capacity mode too): the
    top-k experts by gate logit, weighted by the softmax over all experts taken at them, renormalised to sum to 1
    where the family does (Mixtral, Qwen `norm_topk_prob`), which is the softmax of the chosen logits."""

    weight: torch.Tensor  # [E, D]
    top_k: int
    norm_topk_prob: bool

    def __call__(self, x: torch.Tensor) -> Routing:
        return self.route(self.logits(x), x.dtype)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """[T, D] -> [T, E], in the gate's dtype (float32) whatever x's."""
        return F.linear(x.to(self.weight.dtype), self.weight)

    def route(self, logits: torch.Tensor, dtype: torch.dtype = torch.float32) -> Routing:
        """Routing from gate logits [T, E]; weights in `dtype`."""
        expert_ids = torch.topk(logits, self.top_k, dim=-1).indices  # [T, A]
        return Routing(self.combine_weights(logits, expert_ids).to(dtype), expert_ids)

    def combine_weights(self, logits: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """Float32 weights [T, A] of the experts `expert_ids` [T, A] picked for each token (by route() or otherwise)."""
        if self.norm_topk_prob:
            return torch.softmax(logits.gather(1, expert_ids), dim=-1, dtype=torch.float32)
        return torch.softmax(logits, dim=-1, dtype=torch.float32).gather(1, expert_ids)

    def dense_weights(self, logits: torch.Tensor) -> torch.Tensor:
        """Combine weights [T, E] from gate logits [T, E]: the routed experts' weights, 0 elsewhere."""
        routing = self.route(logits)
        return torch.zeros_like(logits, dtype=torch.float32).scatter_(1, routing.expert_ids, routing.weights)


@dataclass(frozen=True)
class DispatchPlan:
    """Token-expert pairs sorted by expert, so each expert's tokens are one contiguous slice."""

    token_index: torch.Tensor  # [N] source token of each sorted row
    pair_order: torch.Tensor  # [N] position of each sorted row in routing.expert_ids.flatten()
    counts: list[int]  # [E] rows per expert, in expert id order


def dispatch(routing: Routing, num_experts: int) -> DispatchPlan:
    flat = routing.expert_ids.flatten()  # [N]
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    return DispatchPlan(order // routing.expert_ids.shape[1], order, counts)


def combine(expert_out: torch.Tensor, plan: DispatchPlan, routing: Routing, num_tokens: int) -> torch.Tensor:
    """Weighted sum of each token's expert outputs: [N, D] sorted rows -> [T, D]."""
    weights = routing.weights.flatten()[plan.pair_order].unsqueeze(1)  # [N, 1]
    out = torch.zeros(num_tokens, expert_out.shape[1], dtype=expert_out.dtype)
    return out.index_add_(0, plan.token_index, expert_out * weights)
