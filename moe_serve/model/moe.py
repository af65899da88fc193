"""The MoE block in four stages, named as vLLM names them: Router (gate) -> Dispatch -> Experts -> Combine.

The gate and the stacked expert weights are separate objects on purpose: the router room owns gates, dispatch and
combine (router/gate.py), the shard actors of the cluster room own experts, and the in-process engine wires both
together with `LocalMoE`.
Shape legend: T = tokens, D = hidden, E = experts, A = activated experts per token (top-k), N = T * A,
I = expert intermediate size.

Paths of `LocalMoE` per batch, us per layer on the bench's tiny Mixtral (D 64, I 128, E 8, top-2; 1 thread,
best of 12-25 interleaved blocks of CPU time on a loaded 2-core AVX2 EPYC; loop = one expert at a time, the only
path before dd05ea5 besides fp32 dense; runs vary by ~10%, and dense vs routed at T = 16 flips between runs):
    T              1     16     32     64    256    512
    fp32 dense     75    224    345    703   4589   6471
    fp32 routed   125    193    247    420   1264   2817
    fp32 loop      -      -      -      -    1365   2687
    int8 dense    137    279    396    756   3004   5610
    int8 routed   188    254    311    457   1351   2995
    int8 loop     227    539    634    772   7273  18584
    int4 dense    102    291    510    995   4236  11758
    int4 loop     238    506    575    710   1705   4192
Quantized experts cannot beat fp32 per layer at this size: int8 pays a conversion pass into fp32 scratch (~60 us
per layer) on top of the same GEMMs, and the int4 kernel is slower than fp32 GEMM at every shape here. Over a
whole decode step (attention, host work) the gap was ~3% (16 sequences, steps of both engines alternated in one
process), within run-to-run noise of bench/engine.py.

With the compiled kernels built, `LocalMoE` hands every layer they can hold to `KernelExperts` (kernel_moe.py):
gate, top-k, the routed experts and combine in one call over the experts' column panels, each panel read once for
all its tokens, int8 and int4 decoded on the fly. Us per layer, bench/quant_decode.py (8 experts, top-2, 2-core
AVX-512 Xeon VM whose speed drifts between runs: compare within a row):
    T                            1       4      16      64     512
    tiny fp32 (D 64, I 128)        13      23      58     126     911   weights stay in cache
    tiny int8                      12      21      39     121     864
    tiny int4                      14      23      47     133    1076
    mid fp32 (D 1024, I 2816)    6473   21881   34260   58393  219010   weights come from memory
    mid int8                     2919    8647   11770   40687  202095
    mid int4                     3233   10536   15364   44805  243368
The torch paths above (about 4-8x slower than the kernel on the tiny shape) serve layers the kernel cannot hold
(a partial expert set, mixed formats) and builds without it.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moe_serve.kernels import cpu_ops
from moe_serve.model.kernel_moe import KERNEL_FLOAT_DTYPES, KernelExperts
from moe_serve.model.linear import Projection
from moe_serve.model.quant import (
    DenseWeight,
    Int4Weight,
    Int8Weight,
    PackedWeight,
    QuantMode,
    _int4pack,
    int4_codes,
    pack_weight,
    stackable,
)
from moe_serve.router.gate import Gate, combine, dispatch

# MACs one expert's turn of the dispatch loop costs in fixed per-op overhead (~15 us at ~40 GMAC/s, 1 CPU thread,
# measured on the tiny model): dense MoE wins while its extra MACs stay below this per expert.
LOOP_OVERHEAD_MACS_PER_EXPERT = 600_000
# Batch sizes where the routed stacked path beats the dense one (from) and the dispatch loop (up to), fp32.
ROUTED_MIN_TOKENS = 24
ROUTED_MAX_TOKENS = 256
_OPS = cpu_ops()  # compiled kernels (moe_serve.kernels), or None


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
        self.gate_up = Projection(gate_up)  # [2I, D]
        self.down = Projection(down)  # [D, I]
        # [1, D]: Qwen2-MoE scales the shared expert by sigmoid(x @ g)
        self.output_gate = None if output_gate is None else Projection(output_gate)
        self.intermediate_size = down.shape[1]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up(x)
        out = self.down(F.silu(gate_up[:, : self.intermediate_size]) * gate_up[:, self.intermediate_size :])
        if self.output_gate is not None:
            out = torch.sigmoid(self.output_gate(x)) * out
        return out


class StackedExperts:
    """Every expert of one layer as two stacked matrices, for batches where the dispatch loop's per-op overhead
    dominates. Two ways to run them, picked per batch by its size (LocalMoE):
    - dense: every expert for every token, weighted by its (zero when unrouted) combine weight, the sum over
      experts done inside the second matmul; the gate's rows ride along in the first matmul;
    - routed: only what the tokens picked: rows gathered per expert into a [E, C, D] block (C = the busiest
      expert's rows), two bmm over views of the same stacked weights, one gather back.
    The stack's per-expert weights become views of the stacked ones, so the layer's experts are held once
    (int4 keeps a second, input-stacked packing of its down weights: the CPU layout cannot be sliced along K).
    Storage stays the stack's: fp32 is used in place; int8 is converted at each call into fp32 scratch shared by
    every layer (conversion ~1 op per matrix, scales applied to the outputs); int4 runs its kernel on stacked packs.
    Shape legend: T tokens, D hidden, E experts, I expert width, C rows per expert in the routed block.
    """

    def __init__(self, stack: ExpertStack, gate: Gate, scratch: dict[str, torch.Tensor]) -> None:
        e, i = len(stack.w13), stack.intermediate_size
        d = stack.w13[0].in_features
        self.gate, self.num_experts, self.intermediate_size = gate, e, i
        self.mode: QuantMode = _stack_mode(stack)
        self._scratch = scratch
        router = gate.weight.float()
        if self.mode == "none":
            # [E 2I + E, D]: expert e's gate rows then its up rows, for every expert, then the router's rows
            self.gate_up_router = torch.cat([w.dequantize() for w in stack.w13] + [router])
            # [E I, D]: the down weights transposed, x @ W as BLAS likes it (44 vs 64 us at T = 16 on the bench)
            self.down_t = torch.cat([w.dequantize().t() for w in stack.w2])
            stack.w13 = [DenseWeight(w) for w in self.gate_up_router[: 2 * e * i].view(e, 2 * i, d)]
            stack.w2 = [DenseWeight(w.t()) for w in self.down_t.view(e, i, d)]
        elif self.mode == "int8":
            w13, w2 = [_as_int8(w) for w in stack.w13], [_as_int8(w) for w in stack.w2]
            self.q13 = torch.cat([w.qweight for w in w13])  # [E 2I, D] int8
            scales13 = torch.cat([w.scales for w in w13])  # [E 2I] bf16
            self.s13 = scales13.float()
            # [E, I, D] int8, each expert's down transposed (its row scales differ per expert: no K-stacking)
            self.q2_t = torch.stack([w.qweight.t() for w in w2])
            scales2 = torch.stack([w.scales for w in w2])  # [E, D] bf16
            self.s2 = scales2.float().unsqueeze(1)  # [E, 1, D]
            self.router = router
            stack.w13 = [Int8Weight(q, s) for q, s in zip(self.q13.view(e, 2 * i, d), scales13.view(e, 2 * i))]
            stack.w2 = [Int8Weight(q.t(), s) for q, s in zip(self.q2_t, scales2)]
        else:
            w13, w2 = [_as_int4(w) for w in stack.w13], [_as_int4(w) for w in stack.w2]
            self.group_size = w13[0].group_size
            self.p13 = torch.cat([w.packed for w in w13])  # the CPU layout is row-blocked: rows stack exactly
            self.sz13 = torch.cat([w.scales_and_zeros for w in w13], dim=1)  # [D/G, E 2I, 2]
            self.p2 = _int4pack(torch.cat([int4_codes(w) for w in w2], dim=1))  # [D, E I] codes, repacked
            self.sz2 = torch.cat([w.scales_and_zeros for w in w2])  # [E I/G, D, 2]
            self.router = router
            rows = 2 * i
            stack.w13 = [Int4Weight(self.p13[k * rows : (k + 1) * rows], w.scales_and_zeros, w.group_size)
                         for k, w in enumerate(w13)]

    def __call__(self, x: torch.Tensor, routed: bool) -> torch.Tensor:
        """x [T, D] fp32 -> [T, D]: the weighted sum of each token's routed experts."""
        if self.mode == "int4":
            return self._dense_int4(x)
        gate_up_router, down_t = self._fp32_weights()
        ei = self.num_experts * self.intermediate_size
        if routed:
            logits = F.linear(x, gate_up_router[2 * ei :])
            y = None
        else:
            y = F.linear(x, gate_up_router)  # [T, 2 E I + E]
            logits = y[:, 2 * ei :]
            if self.mode == "int8":
                y[:, : 2 * ei].mul_(self.s13)
        if routed:
            return self._routed(x, logits, gate_up_router, down_t)
        assert y is not None
        return self._dense(y[:, : 2 * ei], self.gate.dense_weights(logits), down_t)

    def _fp32_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """[E 2I + E, D] and the transposed down [E I, D], float32; int8 is converted into the shared scratch
        (scales of gate_up left to its output, those of down applied in the scratch)."""
        if self.mode == "none":
            return self.gate_up_router, self.down_t
        e, i = self.num_experts, self.intermediate_size
        d = self.q13.shape[1]
        gate_up_router = _scratch(self._scratch, "gate_up_router", (2 * e * i + e, d))
        down_t = _scratch(self._scratch, "down_t", (e * i, d))
        gate_up_router[: 2 * e * i].copy_(self.q13)
        gate_up_router[2 * e * i :].copy_(self.router)
        torch.mul(self.q2_t, self.s2, out=down_t.view(e, i, d))
        return gate_up_router, down_t

    def _dense(self, gate_up: torch.Tensor, weights: torch.Tensor, down_t: torch.Tensor) -> torch.Tensor:
        """gate_up [T, E 2I] (expert-major), combine weights [T, E] -> [T, D]."""
        t, e, i = gate_up.shape[0], self.num_experts, self.intermediate_size
        y = gate_up.view(t, e, 2 * i)
        hidden = F.silu(y[..., :i]).mul_(y[..., i:])  # [T, E, I]
        hidden.mul_(weights.unsqueeze(2))
        return torch.mm(hidden.view(t, e * i), down_t)  # the sum over experts happens inside the matmul

    def _routed(self, x: torch.Tensor, logits: torch.Tensor, gate_up_router: torch.Tensor,
                down_t: torch.Tensor) -> torch.Tensor:
        t, d = x.shape
        e, i, k = self.num_experts, self.intermediate_size, self.gate.top_k
        routing = self.gate.route(logits)
        block = RoutedBlock.plan(routing.expert_ids, e)
        xs = x[block.source_token].view(e, block.capacity, d)  # [E, C, D]
        w13 = gate_up_router[: 2 * e * i].view(e, 2 * i, d).transpose(1, 2)  # [E, D, 2I], a view
        y = torch.bmm(xs, w13)  # [E, C, 2I]
        if self.mode == "int8":
            y.mul_(self.s13.view(e, 1, 2 * i))
        hidden = F.silu(y[..., :i]).mul_(y[..., i:])  # [E, C, I]
        out = torch.bmm(hidden, down_t.view(e, i, d)).view(-1, d)[block.slot]  # [T K, D]
        return out.view(t, k, d).mul_(routing.weights.unsqueeze(2)).sum(1)

    def _dense_int4(self, x: torch.Tensor) -> torch.Tensor:
        t, e, i = x.shape[0], self.num_experts, self.intermediate_size
        xb = x.bfloat16()
        gate_up = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, self.p13, self.group_size, self.sz13).float()
        weights = self.gate.dense_weights(F.linear(x, self.router))
        y = gate_up.view(t, e, 2 * i)
        hidden = F.silu(y[..., :i]).mul_(y[..., i:])
        hidden.mul_(weights.unsqueeze(2))
        return torch.ops.aten._weight_int4pack_mm_for_cpu(
            hidden.view(t, e * i).bfloat16(), self.p2, self.group_size, self.sz2
        ).float()


@dataclass(frozen=True)
class RoutedBlock:
    """Where each token-expert pair sits in a [E, C] block of rows, C = the busiest expert's pair count.

    Built on the host from the [T, A] expert ids (one small copy): for the few dozen pairs of a decode step
    Python is cheaper than the half-dozen tensor ops (sort, bincount, cumsum, ...) that would do it on tensors.
    """

    source_token: torch.Tensor  # [E C] token each block row reads (pad rows read token 0, never read back)
    slot: torch.Tensor  # [T A] block row of each pair, in routing order
    capacity: int  # C

    @staticmethod
    def plan(expert_ids: torch.Tensor, num_experts: int) -> RoutedBlock:
        top_k = expert_ids.shape[1]
        flat = expert_ids.flatten().tolist()
        counts = [0] * num_experts
        rank = []
        for e in flat:
            rank.append(counts[e])
            counts[e] += 1
        capacity = max(counts)
        slots = [e * capacity + r for e, r in zip(flat, rank)]
        source = [0] * (num_experts * capacity)
        for pair, s in enumerate(slots):
            source[s] = pair // top_k
        return RoutedBlock(_long(source), _long(slots), capacity)


def _long(values: list[int]) -> torch.Tensor:
    return torch.frombuffer(array("q", values), dtype=torch.int64)


def _stack_mode(stack: ExpertStack) -> QuantMode:
    first = stack.w13[0]
    if isinstance(first, Int8Weight):
        return "int8"
    if isinstance(first, Int4Weight):
        return "int4"
    return "none"


def _as_int8(w: PackedWeight) -> Int8Weight:
    assert isinstance(w, Int8Weight)
    return w


def _as_int4(w: PackedWeight) -> Int4Weight:
    assert isinstance(w, Int4Weight)
    return w


def _scratch(buffers: dict[str, torch.Tensor], name: str, shape: tuple[int, int]) -> torch.Tensor:
    buf = buffers.get(name)
    if buf is None or buf.shape != shape:
        buf = buffers[name] = torch.empty(shape)
    return buf


class LocalMoE:
    """In-process MoE backend: every layer's gate and all its experts in this process.

    With the compiled kernels built, every layer whose weights they can hold runs there (`KernelExperts`, which
    then holds the layer's experts alone). Otherwise, per batch, one of three torch paths (`_path`): dense or
    routed over the stacked experts, or the dispatch loop (one expert at a time), which is also the only path for
    layers too big for dense ever to pay.
    """

    def __init__(self, gates: dict[int, Gate], experts: dict[int, ExpertStack], num_experts: int) -> None:
        self.gates: dict[int, Gate] = {}
        self.experts: dict[int, ExpertStack] = {}  # layers on the torch paths
        self.kernel_layers: dict[int, KernelExperts] = {}  # layers on the compiled kernel
        self.num_experts = num_experts
        self._stacked: dict[int, StackedExperts] = {}  # built on first use, so big models never pay the copy
        self._scratch: dict[str, torch.Tensor] = {}  # int8 -> fp32 conversion buffers, shared by every layer
        self._dense_max_tokens: dict[int, int] = {}
        for layer, stack in experts.items():
            self.add_layer(layer, gates[layer], stack)

    def kernel_holds(self, dtype: torch.dtype) -> bool:
        """Whether float experts of `dtype` go to the compiled kernel (add_kernel_layer)."""
        return _OPS is not None and dtype in KERNEL_FLOAT_DTYPES

    def add_kernel_layer(self, layer: int, gate: Gate, experts: KernelExperts) -> None:
        self.gates[layer] = gate
        self.kernel_layers[layer] = experts

    def add_layer(self, layer: int, gate: Gate, stack: ExpertStack) -> None:
        """One MoE layer with all its experts. Into the kernel's layout when it can hold them: the stack's weights
        are then not referenced here (a loader that drops its stack keeps one copy of the experts)."""
        self.gates[layer] = gate
        if _OPS is not None and self._stackable(stack, KERNEL_FLOAT_DTYPES):
            self.kernel_layers[layer] = KernelExperts(_OPS, stack.w13, stack.w2, gate.weight, gate.top_k,
                                                      gate.norm_topk_prob)
            return
        self.experts[layer] = stack
        self._dense_max_tokens[layer] = self._dense_break_even(layer)

    def __call__(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        if layer in self.kernel_layers:
            return self.kernel_layers[layer].routed(x)
        path = self._path(layer, x.shape[0]) if x.dtype == torch.float32 else "loop"
        if path != "loop":
            return self._stacked_experts(layer)(x, routed=path == "routed")
        routing = self.gates[layer](x)
        plan = dispatch(routing, self.num_experts)
        expert_out = self.experts[layer].grouped_ffn(x[plan.token_index], plan.counts)
        return combine(expert_out, plan, routing, x.shape[0])

    def _path(self, layer: int, t: int) -> str:
        """kernel (layers it holds), else dense, routed (both on the stacked experts) or loop, for a batch of t
        tokens (bench numbers in the module docstring). Only layers small enough for dense to ever pay
        (dense_max > 0) are stacked."""
        if layer in self.kernel_layers:
            return "kernel"
        dense_max = self._dense_max_tokens[layer]
        if not dense_max:
            return "loop"
        mode = _stack_mode(self.experts[layer])
        if mode == "int4":  # its kernel only pays stacked while dense is cheap
            return "dense" if t <= dense_max else "loop"
        if t < ROUTED_MIN_TOKENS and t <= dense_max:
            return "dense"
        # int8 through fp32 scratch beats its per-expert kernels at every T measured (8x at 512 tokens)
        return "routed" if mode == "int8" or t <= ROUTED_MAX_TOKENS else "loop"

    def _stackable(self, stack: ExpertStack, dtypes: Sequence[torch.dtype] = (torch.float32,)) -> bool:
        """All the layer's experts, in one format the stacked paths (float weights of `dtypes`) or the kernel take."""
        return stack.expert_ids == list(range(self.num_experts)) and stackable(stack.w13 + stack.w2, dtypes)

    def _dense_break_even(self, layer: int) -> int:
        """Most tokens for which dense MoE's extra MACs cost less than the loop's overhead; 0: never dense."""
        stack = self.experts[layer]
        if not self._stackable(stack):
            return 0
        hidden = stack.w13[0].in_features
        extra_per_token = (self.num_experts - self.gates[layer].top_k) * 3 * hidden * stack.intermediate_size
        return LOOP_OVERHEAD_MACS_PER_EXPERT * self.num_experts // max(extra_per_token, 1)

    def _stacked_experts(self, layer: int) -> StackedExperts:
        if layer not in self._stacked:
            self._stacked[layer] = StackedExperts(self.experts[layer], self.gates[layer], self._scratch)
        return self._stacked[layer]


