"""Experts held in the compiled kernel's layout (moe_serve/kernels): the in-process MoE path and the shards' FFN.

`KernelExperts` copies an `ExpertStack`'s weights (fp32, bf16, fp16, int8 or int4) into the kernel's column panels
(moe_serve/kernels/layout.py) and needs nothing else: a caller that then drops the stack (the loader, a shard)
holds the experts once. Two calls:
- `routed(x)`: gate, top-k, the routed experts and the combine for tokens x [T, D] (LocalMoE's layers);
- `grouped(rows, expert_ids, counts)`: the experts' FFN outputs for rows already grouped by expert (a shard's call;
  the router gates and combines).
Accumulation is fp32 in the kernel whatever the storage. Activations come in and go out as fp32 (other dtypes are
cast on the way); inside, bf16 and fp16 weights are widened as they load, except where the kernels are built with dot
products: there bf16 experts take activations rounded to bf16 (AVX512-BF16) and int8 experts activations quantized
per row to int8 (AVX512-VNNI), as `ops.bf16_dot` / `ops.int8_dot` say.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import torch

from moe_serve.kernels.layout import int4_panels, pad_columns, panels
from moe_serve.model.quant import DenseWeight, Int4Weight, Int8Weight, PackedWeight, int4_codes, stackable

KERNEL_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # float weights the kernel holds as they are


class KernelExperts:
    """Stacked experts [E] of one layer in panels; expert i of the stack is index i here."""

    def __init__(self, ops: ModuleType, w13: list[PackedWeight], w2: list[PackedWeight],
                 router: torch.Tensor | None = None, top_k: int = 0, norm_topk_prob: bool = True) -> None:
        # w13[e] [2I, D] (gate rows then up rows), w2[e] [D, I]; the kernel multiplies x @ W.T, so W.T [K, N] goes
        # into panels
        if not stackable(w13 + w2, KERNEL_FLOAT_DTYPES):
            raise ValueError("expert weights are not all float CPU weights of one dtype (float32, bfloat16 or "
                             "float16), all int8, or all int4 with one group size")
        args = (*_panel_args(w13), *_panel_args(w2), getattr(w13[0], "group_size", 0))
        self._hold(ops, len(w13), args, router, top_k, norm_topk_prob)

    @classmethod
    def load(cls, ops: ModuleType, num_experts: int, w13_of: Callable[[int], tuple[torch.Tensor, ...]],
             w2_of: Callable[[int], torch.Tensor], router: torch.Tensor, top_k: int,
             norm_topk_prob: bool) -> KernelExperts:
        """Float experts read one at a time (w13_of(e): the gate [I, D] and up [I, D] rows, w2_of(e) [D, I], e.g.
        from the checkpoint) straight into panels: loading holds the panels and one expert's tensors, never a
        second copy of the layer, and copies each weight once."""
        args = (panels(_Loaded(num_experts, lambda e: tuple(w.t() for w in w13_of(e)))), None, None,
                panels(_Loaded(num_experts, lambda e: w2_of(e).t())), None, None, 0)
        experts = cls.__new__(cls)
        experts._hold(ops, num_experts, args, router, top_k, norm_topk_prob)
        return experts

    def _hold(self, ops: ModuleType, num_experts: int, args: tuple, router: torch.Tensor | None, top_k: int,
              norm_topk_prob: bool) -> None:
        """args: the panel tensors, scales, offsets and group size moe_experts and grouped_experts take."""
        self._ops, self.num_experts, self._args = ops, num_experts, args
        self.router = None if router is None else router.float().contiguous()
        self.top_k, self.norm_topk_prob = top_k, norm_topk_prob

    @classmethod
    def slots_like(cls, expert: KernelExperts, count: int) -> KernelExperts:
        """Room for `count` experts shaped like `expert`'s first, any of which `put` fills: a pool of resident
        experts whose calls still run in one kernel call. Its pages are not touched until written."""
        args = tuple(torch.empty((count, *t.shape[1:]), dtype=t.dtype) if isinstance(t, torch.Tensor) else t
                     for t in expert._args)
        slots = cls.__new__(cls)
        slots._hold(expert._ops, count, args, None, 0, True)
        return slots

    def fill(self, index: int, w13: tuple[torch.Tensor, torch.Tensor], w2: torch.Tensor) -> None:
        """Float weights of one expert (its gate and up rows [I, D] each, its down projection [D, I]; this holder's
        dtype, as `load` takes them) packed straight into expert `index`: one copy of each weight."""
        panels([tuple(w.t() for w in w13)], out=self._args[0][index : index + 1])
        panels([w2.t()], out=self._args[3][index : index + 1])

    def put(self, index: int, expert: KernelExperts) -> None:
        """Expert 0 of `expert` (shaped as this holder's experts) into this holder's expert `index`."""
        for mine, theirs in zip(self._args, expert._args, strict=True):
            if isinstance(mine, torch.Tensor):
                mine[index].copy_(theirs[0])

    @property
    def nbytes(self) -> int:
        return sum(t.untyped_storage().nbytes() for t in self._args if isinstance(t, torch.Tensor))

    @property
    def expert_nbytes(self) -> int:
        """Bytes of one expert here."""
        return self.nbytes // self.num_experts

    def routed(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, D] -> the weighted sum of each token's top-k experts [T, D] (needs the router)."""
        assert self.router is not None, "built without a router: grouped() only"
        out = self._ops.moe_experts(_fp32(x), self.router, self.top_k, self.norm_topk_prob, *self._args)
        return out.to(x.dtype)

    def grouped(self, rows: torch.Tensor, expert_ids: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """rows [N, D], `counts[i]` of them for expert `expert_ids[i]` (this object's indices), in order -> [N, D]."""
        return self._ops.grouped_experts(_fp32(rows), expert_ids, counts, *self._args).to(rows.dtype)


class _Loaded(Sequence[Any]):
    """A sequence whose element i is made when it is indexed (nothing is kept)."""

    def __init__(self, length: int, make: Callable[[int], Any]) -> None:
        self._length, self._make = length, make

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> Any:  # type: ignore[override]
        if not 0 <= index < self._length:
            raise IndexError(index)
        return self._make(index)


def _fp32(x: torch.Tensor) -> torch.Tensor:
    return x.float().contiguous()


def _panel_args(weights: list[PackedWeight]) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One matrix of every expert ([N, K] each) as moe_experts reads it: panels, scales, offsets."""
    first = weights[0]
    if isinstance(first, Int8Weight):
        int8 = [w for w in weights if isinstance(w, Int8Weight)]
        return panels([w.qweight.t() for w in int8]), pad_columns(torch.stack([w.scales.float() for w in int8])), None
    if isinstance(first, Int4Weight):
        int4 = [w for w in weights if isinstance(w, Int4Weight)]
        # one expert's codes at a time: int4_codes unpacks to int32, 8x the packed bytes
        codes = torch.cat([int4_panels([int4_codes(w).t()]) for w in int4])
        scales, zeros = torch.stack([w.scales_and_zeros.float() for w in int4]).unbind(-1)  # [E, K/G, N] each
        return codes, pad_columns(scales), pad_columns(zeros - 8 * scales)  # w = q scale + offset
    return panels([w.weight.t() for w in weights if isinstance(w, DenseWeight)]), None, None
