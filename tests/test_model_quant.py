"""Weight-only quantization: kernels vs their dequantized weights, error vs fp32, sizes, bad input.

Tolerances, all relative Frobenius errors of `x @ W.T` with Gaussian x and weights:
- kernel vs `x @ dequantize().T` in fp32: < 1% (measured 0.2-0.3%: bf16 rounding of x and of the output);
- int8 vs fp32 weights: < 1.5% (measured 0.6-0.8% at in_features <= 512, 0.9% at 4096);
- int4 vs fp32 weights: < 10% with group 32, < 12% with group 64 (measured 7.0-8.2% and ~9%).
"""

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from moe_serve.model.quant import DenseWeight, Int4Weight, Int8Weight, PackedWeight, pack_weight

KERNEL_TOL = 0.01
INT8_TOL = 0.015
INT4_TOL = {32: 0.10, 64: 0.12}
SHAPES = ((256, 64), (64, 128), (512, 256))  # [out, in] of the tiny models' experts


def make_weight(out_features: int = 256, in_features: int = 128, seed: int = 0) -> Tensor:
    return torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed)) * 0.02


def make_x(tokens: int, in_features: int, seed: int = 1) -> Tensor:
    return torch.randn(tokens, in_features, generator=torch.Generator().manual_seed(seed))


def rel_err(y: Tensor, ref: Tensor) -> float:
    return ((y - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("tokens", [1, 32, 33, 300])  # int8 switches kernels above 32 tokens
def test_kernel_matches_dequantized_reference(mode: str, shape: tuple[int, int], tokens: int) -> None:
    packed = pack_weight(make_weight(*shape), mode)
    x = make_x(tokens, shape[1])
    y = packed.matmul(x)
    assert y.dtype == torch.float32 and y.shape == (tokens, shape[0])
    assert rel_err(y, x @ packed.dequantize().T) < KERNEL_TOL


@pytest.mark.parametrize("shape", SHAPES)
def test_int8_error_against_fp32(shape: tuple[int, int]) -> None:
    w, x = make_weight(*shape), make_x(64, shape[1])
    assert rel_err(pack_weight(w, "int8").matmul(x), x @ w.T) < INT8_TOL


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("group_size", [32, 64])
def test_int4_error_against_fp32(shape: tuple[int, int], group_size: int) -> None:
    w, x = make_weight(*shape), make_x(64, shape[1])
    assert rel_err(pack_weight(w, "int4", group_size).matmul(x), x @ w.T) < INT4_TOL[group_size]


def test_int8_dequantize_within_half_a_step() -> None:
    w = make_weight()
    packed = pack_weight(w, "int8")
    assert isinstance(packed, Int8Weight)
    step = packed.scales.float()[:, None]  # [N, 1]
    assert ((packed.dequantize() - w).abs() <= 0.51 * step).all()


@pytest.mark.parametrize("group_size", [32, 64])
def test_int4_dequantize_within_half_a_step(group_size: int) -> None:
    w = make_weight()
    packed = pack_weight(w, "int4", group_size)
    assert isinstance(packed, Int4Weight)
    step = packed.scales_and_zeros[..., 0].float().T.repeat_interleave(group_size, dim=1)  # [N, K]
    assert ((packed.dequantize() - w).abs() <= 0.6 * step).all()  # 0.5 plus bf16 rounding of the zero


def test_dense_is_plain_linear() -> None:
    w, x = make_weight(), make_x(5, 128)
    packed = pack_weight(w, "none")
    assert isinstance(packed, DenseWeight)
    assert torch.equal(packed.matmul(x), F.linear(x, w))
    assert packed.nbytes == w.numel() * 4


def test_nbytes_of_quantized_storage() -> None:
    n, k = 512, 256
    w = make_weight(n, k)
    assert pack_weight(w, "int8").nbytes == n * k + 2 * n  # 1/4 of fp32 plus a bf16 scale per row
    for g in (32, 64):
        # 1/8 of fp32 plus a bf16 scale and zero per group
        assert pack_weight(w, "int4", g).nbytes == n * k // 2 + (k // g) * n * 2 * 2


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_packed_weights_report_their_shape(mode: str) -> None:
    packed: PackedWeight = pack_weight(make_weight(64, 128), mode)
    assert (packed.out_features, packed.in_features) == (64, 128)
    assert packed.dequantize().shape == (64, 128)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_zero_rows_and_bf16_weights(mode: str) -> None:
    w = make_weight()
    w[:16] = 0
    packed = pack_weight(w.bfloat16(), mode)
    deq = packed.dequantize()
    assert torch.isfinite(deq).all() and (deq[:16] == 0).all()


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("tokens", [5, 40])
def test_non_contiguous_and_bf16_activations(mode: str, tokens: int) -> None:
    packed = pack_weight(make_weight(), mode)
    x = make_x(128, tokens).T  # [T, 128], column-major
    ref = x @ packed.dequantize().T
    assert rel_err(packed.matmul(x), ref) < KERNEL_TOL
    assert rel_err(packed.matmul(x.bfloat16()), ref) < KERNEL_TOL


@pytest.mark.parametrize(
    ("w", "mode", "group_size", "message"),
    [
        (make_weight(), "int3", 32, "unknown quant mode 'int3'"),
        (torch.zeros(4, 64, 64), "int8", 32, "2-D"),
        (torch.zeros(64, 64, dtype=torch.int8), "int8", 32, "float"),
        (make_weight(64, 100), "int4", 32, r"in_features \(100\) divisible by group_size \(32\)"),
        (make_weight(64, 64), "int4", 128, r"in_features \(64\) divisible by group_size \(128\)"),
        (make_weight(64, 64), "int4", 16, "group_size must be one of"),
        (make_weight(40, 64), "int4", 32, r"out_features \(40\) divisible by 16"),
    ],
)
def test_bad_input_names_the_problem(w: Tensor, mode: str, group_size: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        pack_weight(w, mode, group_size)  # type: ignore[arg-type]
