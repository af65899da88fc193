"""The MoE block in four stages, named as vLLM names them: Router (gate) -> Dispatch -> Experts -> Combine.

The gate and the stacked expert weights are separate objects on purpose: the router room owns gates, the
shard actors of the cluster room own experts, and the in-process engine wires both together with `LocalMoE`.
Shape legend: T = tokens, D = hidden, E = experts, A = activated experts per token (top-k), N = T * A,
I = expert intermediate size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moe_serve.model.quant import DenseWeight, PackedWeight, QuantMode, pack_weight

# MACs one expert's turn of the dispatch loop costs in fixed per-op overhead (~15 us at ~40 GMAC/s, 1 CPU thread,
# measured on the tiny model): dense MoE wins while its extra MACs stay below this per expert.
LOOP_OVERHEAD_MACS_PER_EXPERT = 600_000


@dataclass(frozen=True)
class Routing:
    weights: torch.Tensor  # [T, A] float, combine weights
    expert_ids: torch.Tensor  # [T, A] long, global expert ids


@dataclass(frozen=True)
class Gate:
    """Gate logits, top-k and renormalisation. Mixtral and Qwen `norm_topk_prob` renormalise the top-k weights."""

    weight: torch.Tensor  # [E, D]
    top_k: int
    norm_topk_prob: bool

    def __call__(self, x: torch.Tensor) -> Routing:
        return self.route(self.probs(x), x.dtype)

    def probs(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(F.linear(x, self.weight), dim=-1, dtype=torch.float32)  # [T, E]

    def dense_weights(self, logits: torch.Tensor) -> torch.Tensor:
        """Combine weights [T, E] from gate logits [T, E] (float32): the routed experts' weights, 0 elsewhere."""
        if self.norm_topk_prob:  # the renormalised top-k of a softmax is the softmax of the top-k logits
            values, expert_ids = torch.topk(logits, self.top_k, dim=-1)
            weights = torch.softmax(values, dim=-1)
        else:
            weights, expert_ids = torch.topk(torch.softmax(logits, dim=-1), self.top_k, dim=-1)
        return torch.zeros_like(logits).scatter_(1, expert_ids, weights)

    def route(self, probs: torch.Tensor, dtype: torch.dtype) -> Routing:
        weights, expert_ids = torch.topk(probs, self.top_k, dim=-1)  # [T, A]
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return Routing(weights.to(dtype), expert_ids)


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


class ExpertStack:
    """The FFNs of some experts of one layer (all of them in-process, a shard's subset on an actor)."""

    def __init__(
        self, expert_ids: Sequence[int], w13: torch.Tensor, w2: torch.Tensor, quantize: QuantMode = "none"
    ) -> None:
        # w13 [n, 2I, D] (gate rows then up rows), w2 [n, D, I]
        self.expert_ids = list(expert_ids)
        self.intermediate_size = w2.shape[2]
        self.w13: list[PackedWeight] = [pack_weight(w, quantize) for w in w13]
        self.w2: list[PackedWeight] = [pack_weight(w, quantize) for w in w2]

    @property
    def nbytes(self) -> int:
        return sum(w.nbytes for w in self.w13 + self.w2)

    def ffn(self, local_index: int, x: torch.Tensor) -> torch.Tensor:
        """SwiGLU FFN of one expert: [n, D] -> [n, D]."""
        gate_up = self.w13[local_index].matmul(x)  # [n, 2I]
        hidden = F.silu(gate_up[:, : self.intermediate_size]) * gate_up[:, self.intermediate_size :]
        return self.w2[local_index].matmul(hidden)

    def grouped_ffn(self, x_sorted: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        """Rows of `x_sorted` [N, D] grouped by local expert (`counts[i]` rows for local expert i) -> [N, D]."""
        out = torch.empty_like(x_sorted)
        start = 0
        for local_index, count in enumerate(counts):
            if count:
                out[start : start + count] = self.ffn(local_index, x_sorted[start : start + count])
                start += count
        return out


class DenseMLP:
    """SwiGLU MLP used for dense layers and for Qwen's shared expert."""

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor, output_gate: torch.Tensor | None = None) -> None:
        self.gate_up = gate_up  # [2I, D]
        self.down = down  # [D, I]
        self.output_gate = output_gate  # [1, D]: Qwen2-MoE scales the shared expert by sigmoid(x @ g)
        self.intermediate_size = down.shape[1]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = F.linear(x, self.gate_up)
        out = F.linear(F.silu(gate_up[:, : self.intermediate_size]) * gate_up[:, self.intermediate_size :], self.down)
        if self.output_gate is not None:
            out = torch.sigmoid(F.linear(x, self.output_gate)) * out
        return out


class DenseExperts:
    """Every expert of one layer and its gate as two matrices, for batches where the dispatch loop's overhead
    dominates. The gate's rows ride along in the first matmul, so routing costs no matmul of its own."""

    def __init__(self, stack: ExpertStack, gate: Gate) -> None:
        i = stack.intermediate_size
        w13 = [w.dequantize() for w in stack.w13]
        # [2 E I + E, D]: all gates, then all ups, then the router's rows
        self.gate_up_router = torch.cat([w[:i] for w in w13] + [w[i:] for w in w13] + [gate.weight.float()])
        self.down = torch.cat([w.dequantize() for w in stack.w2], dim=1)  # [D, E I]
        self.gate = gate
        self.num_experts = len(w13)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, D] -> [T, D], every expert computed and weighted by its (zero when unrouted) combine weight."""
        t, ei = x.shape[0], self.down.shape[1]
        y = F.linear(x, self.gate_up_router)  # [T, 2 E I + E]
        weights = self.gate.dense_weights(y[:, 2 * ei :])  # [T, E]
        hidden = F.silu(y[:, :ei]).mul_(y[:, ei : 2 * ei])  # [T, E I]
        hidden.view(t, self.num_experts, -1).mul_(weights.unsqueeze(2))
        return F.linear(hidden, self.down)  # the sum over experts happens inside the matmul


class LocalMoE:
    """In-process MoE backend: every layer's gate and all its experts in this process."""

    def __init__(self, gates: dict[int, Gate], experts: dict[int, ExpertStack], num_experts: int) -> None:
        self.gates = gates
        self.experts = experts
        self.num_experts = num_experts
        self._dense: dict[int, DenseExperts] = {}  # built on first use, so big models never pay the copy
        self._dense_max_tokens = {layer: self._dense_break_even(layer) for layer in experts}

    def __call__(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] <= self._dense_max_tokens[layer] and x.dtype == torch.float32:
            return self._dense_experts(layer)(x)
        routing = self.gates[layer](x)
        plan = dispatch(routing, self.num_experts)
        expert_out = self.experts[layer].grouped_ffn(x[plan.token_index], plan.counts)
        return combine(expert_out, plan, routing, x.shape[0])

    def _dense_break_even(self, layer: int) -> int:
        """Most tokens for which dense MoE's extra MACs cost less than the loop's overhead; 0: never dense."""
        stack = self.experts[layer]
        weights = stack.w13 + stack.w2
        if stack.expert_ids != list(range(self.num_experts)) or layer not in self.gates:
            return 0
        if not all(isinstance(w, DenseWeight) and w.weight.dtype == torch.float32 for w in weights):
            return 0
        hidden = stack.w13[0].in_features
        extra_per_token = (self.num_experts - self.gates[layer].top_k) * 3 * hidden * stack.intermediate_size
        return LOOP_OVERHEAD_MACS_PER_EXPERT * self.num_experts // max(extra_per_token, 1)

    def _dense_experts(self, layer: int) -> DenseExperts:
        if layer not in self._dense:
            self._dense[layer] = DenseExperts(self.experts[layer], self.gates[layer])
        return self._dense[layer]
