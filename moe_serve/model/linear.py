"""Dense projections `x @ W.T (+ b)` of the dense part, on one weight tensor in the serving dtype.

Decode-sized batches run the compiled row kernel (moe_serve/kernels, "Dense projections"): it reads the weight once
for a few token rows and widens bf16/fp16 as it loads (bf16 meets bf16-rounded activations in AVX512-BF16 dot
products where built for them), where torch's CPU GEMMs are slow for skinny batches and convert bf16 on CPUs
without native bf16 (bench/linear.py measures both).
Bigger batches (prefill chunks) run torch's matmul on the same tensor, unless the CPU has no native 16-bit GEMM, where
the kernel serves every batch. Output dtype = input dtype; accumulation is float32 on both paths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_serve.kernels import cpu_ops
from moe_serve.model.dtype import native

# Largest batch the row kernel takes from torch's GEMM when torch computes the dtype natively: past it, torch's
# blocked GEMM reuses each weight panel for more rows than the kernel's register tiles (bench/linear.py).
KERNEL_MAX_TOKENS = 32
_OPS = cpu_ops()


class Projection:
    """One linear layer: weight [N, K], optional bias [N]."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.weight = weight.contiguous()
        self.bias = bias
        on_cpu = weight.device.type == "cpu"
        self._kernel_max_tokens = 0
        if on_cpu and weight.dtype in (torch.float32, torch.bfloat16, torch.float16):
            self._kernel_max_tokens = KERNEL_MAX_TOKENS if native(weight.dtype) else 1 << 62

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, K] -> [T, N] in x's dtype."""
        if _OPS is None or x.shape[0] > self._kernel_max_tokens or x.is_cuda:
            return F.linear(x, self.weight, self.bias)
        x32 = x.float()
        if x32.stride(-1) != 1:
            x32 = x32.contiguous()
        y = _OPS.linear(x32, self.weight)
        if self.bias is not None:
            y += self.bias
        return y.to(x.dtype)
