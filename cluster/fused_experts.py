"""vLLM's fused MoE kernel for a GPU shard's experts (the `gpu` extra), checked against torch before it is used.

When a shard runs on CUDA and `vllm` imports, its experts are stacked as vLLM's fused MoE reads them (w13
[E, 2I, D], gate rows then up rows; w2 [E, D, I]) and a call runs in one `fused_experts` launch: rows grouped by
expert become top-1 routing with weight 1, so the kernel returns each row's expert output (the router combines).
vLLM's Python API moves between releases and no GPU has run this path in this project's tests (CI has none), so
on load the shard compares one call against its torch FFN and keeps torch, with a warning, when the call fails
or disagrees.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from moe_serve.model.moe import ExpertStack
from moe_serve.model.quant import DenseWeight

log = logging.getLogger(__name__)

# relative error allowed between vLLM's kernel and torch on the probe (Triton may use TF32 on fp32 inputs)
PROBE_TOLERANCE = 2e-2


def vllm_fused_experts() -> Callable[..., torch.Tensor] | None:
    try:
        from vllm.model_executor.layers.fused_moe import fused_experts
    except Exception:  # not installed, or a build without its GPU kernels
        return None
    return fused_experts


class FusedMoEExperts:
    """Some experts of one layer, stacked on one GPU, run by vLLM's fused MoE kernel."""

    def __init__(self, fused_experts: Callable[..., torch.Tensor], stack: ExpertStack) -> None:
        if not all(isinstance(w, DenseWeight) for w in stack.w13 + stack.w2):
            raise ValueError("vLLM's fused MoE path takes unquantized experts")
        self._fused = fused_experts
        self.w13 = torch.stack([w.weight for w in stack.w13 if isinstance(w, DenseWeight)])  # [E, 2I, D]
        self.w2 = torch.stack([w.weight for w in stack.w2 if isinstance(w, DenseWeight)])  # [E, D, I]

    @property
    def nbytes(self) -> int:
        return self.w13.nbytes + self.w2.nbytes

    def grouped(self, rows: torch.Tensor, expert_ids: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """rows [N, D], `counts[i]` of them for expert `expert_ids[i]` (indices into this stack) -> [N, D]."""
        topk_ids = torch.repeat_interleave(expert_ids, counts).to(rows.device, torch.int32)[:, None]
        topk_weights = torch.ones(topk_ids.shape, device=rows.device, dtype=torch.float32)
        return self._fused(rows.to(self.w13.dtype), self.w13, self.w2, topk_weights, topk_ids).to(rows.dtype)


def fused_or_none(stack: ExpertStack) -> FusedMoEExperts | None:
    """The stack's experts behind vLLM's kernel when it imports, runs and agrees with the torch FFN on a probe."""
    fused = vllm_fused_experts()
    if fused is None or not all(isinstance(w, DenseWeight) for w in stack.w13 + stack.w2):
        return None
    try:
        candidate = FusedMoEExperts(fused, stack)
        n = len(stack.expert_ids)
        probe = torch.randn(2 * n, candidate.w13.shape[2], device=candidate.w13.device)
        got = candidate.grouped(probe, torch.arange(n), torch.full((n,), 2))
        want = torch.cat([stack.ffn(i, probe[2 * i : 2 * i + 2]) for i in range(n)])
        error = ((got.float() - want.float()).norm() / want.float().norm()).item()
    except Exception as exc:  # an API this code does not know, a kernel that fails on this GPU...
        log.warning("vLLM fused MoE unusable here, shard experts run on torch: %r", exc)
        return None
    if not error <= PROBE_TOLERANCE:
        log.warning("vLLM fused MoE disagrees with torch (relative error %.3g): shard experts run on torch", error)
        return None
    return candidate
