"""Weight-only quantization of expert FFN weights, and matmuls that run on the packed storage.

Owns: packing one float `[out, in]` weight (`pack_weight`) into dense, int8 or int4 storage, and
`x @ W.T` on that storage. Does not own: which weights get quantized or how they are stacked per
expert (the shard actors decide), reading checkpoints, or GPU kernels (CPU tensors only).

Contract: `matmul(x)` takes float `[T, in]` (float32, or bfloat16 as it is) and returns float32
`[T, out]`; `dequantize()` returns, for tests and references, the float32 `[out, in]` weight that
`matmul` multiplies by. A packed weight keeps no float copy of itself: the only float weight it ever
builds is a transient bf16 copy of one int8 matrix inside a call with T > INT8_KERNEL_MAX_TOKENS.

Formats and kernels, chosen with bench/quant.py (2-core AVX512-BF16 CPU, torch 2.13):
- int8 (Grok-1's expert layout): symmetric per output channel, q in [-127, 127], one bf16 scale per
  row. T <= 32: `aten._weight_int8pack_mm` (gpt-fast's int8 path), whose cost grows linearly in T;
  T > 32: oneDNN bf16 GEMM on a transient bf16 copy of q (exact, |q| <= 127), then the row scales.
- int4: asymmetric per group of `group_size` input channels (32, 64, 128 or 256), bf16 scale and
  zero per group, w = (q - 8) * scale + zero, stored in the CPU tinygemm layout of
  `aten._convert_weight_to_int4pack_for_cpu` and multiplied by `aten._weight_int4pack_mm_for_cpu`
  at every T (it scales better in T than int8pack_mm but stays ~2x slower than bf16 GEMM at T = 256).
Both kernels run on bf16 activations: their fp32 paths are 20-150x slower at [1024 x 2816]. So the
kernel output differs from `x @ dequantize().T` in fp32 by bf16 rounding of x and of the output,
0.2-0.3% relative.

Speed (bench/quant.py, medians): from [1024 x 256] up, both modes beat fp32 `F.linear` at every T:
7.5-16x at T = 1 on the D >= 1024 experts, 2-4x at T = 256. Smaller calls are bound by fixed costs:
2.6 us of dtype casts plus the kernel's OpenMP launch (int8pack_mm alone: 5.0 us at [256 x 64] on
2 threads, 2.9 us on 1; the whole fp32 `F.linear`: 2.6 us), so the D = 64 experts run 2-4x slower
quantized at T = 1 and up to 1.3x slower at T = 8-32, and [256 x 512] is ~1.2x slower at T = 1. No
kernel here avoids that; at that size the memory saved is immaterial, so tiny models are best served
with mode "none". (Stacked experts of small models skip these kernels when the compiled MoE kernel of
moe_serve/kernels is built: it converts int8 and int4 on the fly and runs them about as fast as fp32.)

Measured relative error of `x @ W_q.T` against the fp32 weight (Frobenius, Gaussian x). Gaussian
weights, bench/quant.py shapes: int8 0.6-0.9% (growing with in_features), int4 7.0-8.2% (group 32);
at [4096 x 1024]: int4 9.0% with group 64, 10.0% with 128. Heavier-tailed Student-t(4) weights at
[4096 x 1024]: int8 1.9%, int4 9.4% (group 32).

Shapes: T = tokens, N = out_features, K = in_features, G = group_size.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

QuantMode = Literal["none", "int8", "int4"]
QUANT_MODES: tuple[QuantMode, ...] = get_args(QuantMode)
INT4_GROUP_SIZES = (32, 64, 128, 256)  # the only ones the CPU int4 kernel accepts
DEFAULT_GROUP_SIZE = 32  # same speed as 64 in bench/quant.py, lower error
INT4_OUT_MULTIPLE = 16  # the CPU int4 packer needs N divisible by 16
INT8_KERNEL_MAX_TOKENS = 32  # int8pack_mm and the bf16 GEMM break even at T ~ 32
COMPUTE_DTYPE = torch.bfloat16  # activations and scales of both kernels
_MIN_SCALE = 1e-12  # keeps all-zero rows and groups finite
_INNER_K_TILES = 2  # required by the packer's signature, ignored on CPU


class PackedWeight(Protocol):
    """One `[out, in]` weight in some storage, multiplied as `x @ W.T`."""

    @property
    def out_features(self) -> int: ...

    @property
    def in_features(self) -> int: ...

    @property
    def nbytes(self) -> int: ...

    def matmul(self, x: Tensor) -> Tensor: ...

    def dequantize(self) -> Tensor: ...


@dataclass(frozen=True)
class DenseWeight:
    weight: Tensor  # [N, K] float

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def nbytes(self) -> int:
        return _nbytes(self.weight)

    def matmul(self, x: Tensor) -> Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight).float()

    def dequantize(self) -> Tensor:
        return self.weight.float()


@dataclass(frozen=True)
class Int8Weight:
    qweight: Tensor  # [N, K] int8
    scales: Tensor  # [N] bf16

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def in_features(self) -> int:
        return self.qweight.shape[1]

    @property
    def nbytes(self) -> int:
        return _nbytes(self.qweight) + _nbytes(self.scales)

    def matmul(self, x: Tensor) -> Tensor:
        x = _kernel_input(x)
        if x.shape[0] <= INT8_KERNEL_MAX_TOKENS:
            return torch.ops.aten._weight_int8pack_mm(x, self.qweight.contiguous(), self.scales).float()
        return F.linear(x, self.qweight.to(COMPUTE_DTYPE)).float().mul_(self.scales)

    def dequantize(self) -> Tensor:
        return self.qweight.float() * self.scales.float()[:, None]


@dataclass(frozen=True)
class Int4Weight:
    packed: Tensor  # tinygemm layout of the [N, K] nibbles, uint8; CPU-specific, opaque
    scales_and_zeros: Tensor  # [K/G, N, 2] bf16
    group_size: int

    @property
    def out_features(self) -> int:
        return self.scales_and_zeros.shape[1]

    @property
    def in_features(self) -> int:
        return self.scales_and_zeros.shape[0] * self.group_size

    @property
    def nbytes(self) -> int:
        return _nbytes(self.packed) + _nbytes(self.scales_and_zeros)

    def matmul(self, x: Tensor) -> Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(
            _kernel_input(x), self.packed, self.group_size, self.scales_and_zeros
        ).float()

    def dequantize(self) -> Tensor:
        n, k, g = self.out_features, self.in_features, self.group_size
        q = int4_codes(self).float()
        scales, zeros = self.scales_and_zeros.float().transpose(0, 1).unbind(-1)  # [N, K/G] each
        groups = (q.reshape(n, k // g, g) - 8) * scales[..., None] + zeros[..., None]
        return groups.reshape(n, k)


def int4_codes(w: Int4Weight) -> Tensor:
    """The [N, K] int32 codes (0..15) an int4 weight holds, read back exactly from its packed layout."""
    n, k = w.out_features, w.in_features
    q = torch.empty(n * k, dtype=torch.int32)
    q[_int4pack_source_index(n, k)] = _nibbles(w.packed).to(torch.int32)
    return q.view(n, k)


def stackable(weights: Sequence[PackedWeight], dtypes: Sequence[torch.dtype] = (torch.float32,)) -> bool:
    """Float CPU weights of one of `dtypes`, all of one dtype, or all int8, or all int4 with one group size: what
    the stacked paths (float32 only) and the compiled kernel (float32, bfloat16, float16) take."""
    dense_dtypes = {w.weight.dtype for w in weights if isinstance(w, DenseWeight) and w.weight.device.type == "cpu"}
    if all(isinstance(w, DenseWeight) for w in weights) and len(dense_dtypes) == 1 and dense_dtypes <= set(dtypes):
        return True
    if all(isinstance(w, Int8Weight) for w in weights):
        return True
    return all(isinstance(w, Int4Weight) for w in weights) and len({w.group_size for w in weights}) == 1  # type: ignore[union-attr]


def pack_weight(w: Tensor, mode: QuantMode, group_size: int = DEFAULT_GROUP_SIZE) -> PackedWeight:
    """Packs a float `[out, in]` weight; `group_size` applies to int4 only."""
    _check(w, mode, group_size)
    if mode == "int8":
        return _pack_int8(w.float())
    if mode == "int4":
        return _pack_int4(w.float(), group_size)
    return DenseWeight(w)


def _check(w: Tensor, mode: str, group_size: int) -> None:
    if mode not in QUANT_MODES:
        raise ValueError(f"unknown quant mode {mode!r}, expected one of {QUANT_MODES}")
    if w.ndim != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise ValueError(f"weight must be a float tensor, got {w.dtype}")
    if mode != "none" and w.device.type != "cpu":
        raise ValueError(f"{mode} kernels run on CPU only, got a weight on {w.device}")
    if mode == "int4":
        _check_int4_shape(w.shape[0], w.shape[1], group_size)


def _check_int4_shape(out_features: int, in_features: int, group_size: int) -> None:
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"int4 group_size must be one of {INT4_GROUP_SIZES}, got {group_size}")
    if in_features % group_size:
        raise ValueError(f"int4 needs in_features ({in_features}) divisible by group_size ({group_size})")
    if out_features % INT4_OUT_MULTIPLE:
        raise ValueError(f"int4 needs out_features ({out_features}) divisible by {INT4_OUT_MULTIPLE}")


def _pack_int8(w: Tensor) -> Int8Weight:
    scales = (w.abs().amax(dim=1) / 127).clamp_min(_MIN_SCALE).to(COMPUTE_DTYPE)  # [N]
    q = torch.round(w / scales.float()[:, None]).clamp(-127, 127)
    return Int8Weight(q.to(torch.int8).contiguous(), scales)


def _pack_int4(w: Tensor, group_size: int) -> Int4Weight:
    n, k = w.shape
    groups = w.reshape(n, k // group_size, group_size)  # [N, K/G, G]
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)  # [N, K/G]
    scales = ((hi - lo) / 15).clamp_min(_MIN_SCALE).to(COMPUTE_DTYPE)
    zeros = (lo + 8 * scales.float()).to(COMPUTE_DTYPE)  # the value of q = 8
    q = torch.round((groups - zeros.float()[..., None]) / scales.float()[..., None] + 8).clamp(0, 15)
    packed = _int4pack(q.to(torch.int32).reshape(n, k))
    scales_and_zeros = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous()  # [K/G, N, 2]
    return Int4Weight(packed, scales_and_zeros, group_size)


def _kernel_input(x: Tensor) -> Tensor:
    # .bfloat16() costs 0.6 us less per call than .to(COMPUTE_DTYPE); the kernels need dense rows
    return x.bfloat16().contiguous()


def _int4pack(q: Tensor) -> Tensor:
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, _INNER_K_TILES)


def _nibbles(packed: Tensor) -> Tensor:
    return torch.stack([packed & 15, packed >> 4], dim=-1).flatten()


def _int4pack_source_index(out_features: int, in_features: int) -> Tensor:
    """For each nibble of the packed tensor, the flat index of the [N, K] element it holds.

    The layout differs between AVX512, AVX2 and scalar builds, so it is read off the packer itself:
    packing the base-16 digits of every element's index sends each digit where that element goes.
    """
    index = torch.arange(out_features * in_features).reshape(out_features, in_features)
    source = torch.zeros(index.numel(), dtype=torch.int64)
    for digit in range(max(1, ((index.numel() - 1).bit_length() + 3) // 4)):
        nibbles = _nibbles(_int4pack(((index >> 4 * digit) & 15).to(torch.int32)))
        source |= nibbles.long() << 4 * digit
    return source


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()
