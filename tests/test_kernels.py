"""The compiled CPU kernels (moe_serve.kernels) against the torch ops they replace.

Tolerances: 1e-5 absolute for RMSNorm and attention (fp32; different summation order, a polynomial exp within a
few ulp), 1e-5 relative for the MoE block. bf16, fp16, int8 and int4 experts are checked against fp32 math on the
weights they stand for, which the kernel computes up to fp32 rounding: activations stay fp32, except that a build
with bf16 dot products (`ops.bf16_dot`, AVX512-BF16) rounds the activations that meet bf16 weights to bf16, and one
with int8 dot products (`ops.int8_dot`, AVX512-VNNI) quantizes those that meet int8 weights per row; the reference
then does the same (`kernel_inputs`).
Shape legend: B sequences, H query heads, KVH kv heads, L keys, S KV slots, Hd head dim, T tokens, D hidden,
E experts, I expert width.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moe_serve.kernels import build_dir, build_variant, cpu_ops, runnable, variant_names, variant_ops
from moe_serve.kernels.layout import int4_panels, pad_columns, padded, panels
from moe_serve.model.linear import KERNEL_MAX_TOKENS, Projection
from moe_serve.router.gate import Gate
from moe_serve.model.quant import pack_weight


@pytest.fixture(scope="module", params=variant_names())
def ops(request: pytest.FixtureRequest):
    """Each instruction-set variant of the kernels this CPU can run (native is the one that serves)."""
    if request.param == "native":
        module = cpu_ops()
        assert module is not None, "the compiled CPU kernels did not build: see the warning it logged"
        return module
    if not runnable(request.param):
        pytest.skip(f"this CPU cannot run the {request.param} kernels (they are only built here)")
    return variant_ops(request.param)


def test_build_is_keyed_by_source_and_cpu() -> None:
    assert cpu_ops() is not None
    directory = build_dir()
    assert any(directory.glob("moe_serve_cpu_ops*.so"))
    assert len(directory.name) == 16


@pytest.mark.parametrize("variant", variant_names())
def test_every_variant_builds(variant: str) -> None:
    """Every instruction-set path compiles on this machine, whatever its CPU runs (make install builds them)."""
    assert any(build_variant(variant).glob("moe_serve_cpu_ops*.so"))


def test_processes_starting_at_once_build_the_kernels_once(tmp_path: Path) -> None:
    """Two processes asking for an unbuilt variant at once (Ray workers on a new node): one builds, the other waits
    for it, and both load a whole library."""
    script = ("import sys; from moe_serve.kernels import build_variant, variant_ops; "
              "print(build_variant('portable')); assert variant_ops('portable').moe_experts")
    env = {**os.environ, "MOE_SERVE_KERNEL_DIR": str(tmp_path)}
    runs = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for _ in range(2)]
    outputs = [run.communicate(timeout=900) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err[-2000:] for _, err in outputs]
    (directory,) = {Path(out.strip()) for out, _ in outputs}
    assert len(list(directory.glob("moe_serve_cpu_ops_portable*.so"))) == 1


def test_each_variant_runs_its_own_build() -> None:
    """The ops of every runnable variant come from that variant's build, not from the first one loaded here."""
    loaded = {"native": cpu_ops()} | {v: variant_ops(v) for v in variant_names() if v != "native" and runnable(v)}
    for variant, module in loaded.items():
        assert Path(module.__file__).parent == build_dir(variant), variant
    assert len({id(module) for module in loaded.values()}) == len(loaded)


@pytest.mark.parametrize("shape", [(1, 64), (16, 64), (3, 5, 24), (7, 100)])
def test_rms_norm(ops, shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(shape, generator=g), torch.randn(shape[-1], generator=g)
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-6), F.rms_norm(x, (shape[-1],), w, 1e-6), atol=1e-5, rtol=0)


def reference_attention(q: torch.Tensor, pages: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor,
                        window: int) -> torch.Tensor:
    """Each sequence's keys gathered from the pages [S, 2, KVH, Hd] by its slots, then torch's SDPA."""
    b, h, hd = q.shape
    kvh = pages.shape[2]
    out = []
    for s in range(b):
        last = int(positions[s])
        first = max(0, last - window + 1) if window else 0
        kv = pages[slots[s, first : last + 1]].float()  # [L, 2, KVH, Hd]
        k, v = kv[:, 0].transpose(0, 1), kv[:, 1].transpose(0, 1)  # [KVH, L, Hd]
        out.append(F.scaled_dot_product_attention(q[s].view(kvh, h // kvh, hd), k, v).reshape(h, hd))
    return torch.stack(out)


@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(2, 1, 32), (4, 2, 16), (4, 4, 24), (8, 2, 64)])
@pytest.mark.parametrize("window", [0, 5, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_decode_attention(ops, heads: int, kv_heads: int, head_dim: int, window: int, dtype: torch.dtype) -> None:
    """Sequences of different lengths (1 key up to L) in one batch, with and without a window, their keys scattered
    over the pages and two of them sharing their first slots (a shared prefix); bf16 pages are widened as they
    load (float math on their values)."""
    g = torch.Generator().manual_seed(1)
    b, length, num_slots = 6, 70, 500
    pages = torch.randn(num_slots, 2, kv_heads, head_dim, generator=g).to(dtype)
    slots = torch.randperm(num_slots, generator=g)[: b * length].view(b, length)
    slots[4, :32] = slots[5, :32]
    positions = torch.tensor([0, 3, 17, 31, 52, length - 1])
    # queries as the model hands them over: a view into a wider projection row
    q = torch.randn(b, heads * head_dim + 8, generator=g)[:, : heads * head_dim].view(b, heads, head_dim)
    out = ops.paged_decode_attention(q, pages, slots, positions, window, head_dim**-0.5)
    torch.testing.assert_close(out, reference_attention(q, pages, slots, positions, window), atol=1e-5, rtol=0)


def test_paged_decode_attention_rejects_bad_input(ops) -> None:
    pages, slots = torch.zeros(16, 2, 1, 16), torch.arange(16).view(2, 8)
    q = torch.zeros(2, 2, 16)
    with pytest.raises(RuntimeError, match="outside the slots"):
        ops.paged_decode_attention(q, pages, slots, torch.tensor([0, 8]), 0, 0.25)
    with pytest.raises(RuntimeError, match="outside the pages"):
        ops.paged_decode_attention(q, pages, slots + 16, torch.tensor([0, 1]), 0, 0.25)
    with pytest.raises(RuntimeError, match="do not fit"):
        ops.paged_decode_attention(torch.zeros(2, 2, 8), pages, slots, torch.tensor([0, 1]), 0, 0.25)
    with pytest.raises(RuntimeError, match="float32"):
        ops.paged_decode_attention(q.double(), pages, slots, torch.tensor([0, 1]), 0, 0.25)


E, D, I, TOP_K = 8, 48, 40, 2  # widths off the kernel's 32-column panels, so the padded ones run too
HALF_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
MODES = ["none", *HALF_DTYPES, "int8", "int4"]  # expert weight formats: float32, 16-bit floats, quantized


def reference_moe(x: torch.Tensor, gate: Gate, w13: torch.Tensor, w2: torch.Tensor,
                  rounded: Callable[[torch.Tensor], torch.Tensor] = lambda v: v) -> torch.Tensor:
    """w13 [E, 2I, D], w2 [E, D, I]: each token's top-k experts one at a time; `rounded`: what each matmul's input
    row becomes first (the kernels' dot-product paths, `kernel_inputs`)."""
    routing, inter = gate(x), w2.shape[2]
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for a in range(TOP_K):
            e = int(routing.expert_ids[t, a])
            gate_up = w13[e] @ rounded(x[t])
            out[t] += routing.weights[t, a] * (w2[e] @ rounded(F.silu(gate_up[:inter]) * gate_up[inter:]))
    return out


def kernel_inputs(ops, weights: torch.dtype | str) -> Callable[[torch.Tensor], torch.Tensor]:
    """What this build makes of an activation row [K] that meets weights of this dtype or expert mode: rounded to
    bf16 (bf16 dot products), quantized per row to int8 and back (int8 dot products), or left as it is."""
    if getattr(ops, "bf16_dot", False) and weights in (torch.bfloat16, "bfloat16"):
        return lambda v: v.bfloat16().float()
    if getattr(ops, "int8_dot", False) and weights == "int8":
        def quantized(v: torch.Tensor) -> torch.Tensor:  # the kernel's arithmetic: float32 scale, x * (1 / scale)
            top = v.abs().max()
            scale = top / 127 if top > 0 else torch.tensor(1.0)
            return torch.round(v * (1.0 / scale)) * scale
        return quantized
    return lambda v: v


def random_int4(g: torch.Generator, k: int, n: int, group: int) -> tuple[torch.Tensor, ...]:
    """One expert's [K, N] int4 weight: codes, group scales and offsets, and the float [N, K] it stands for."""
    codes = torch.randint(0, 16, (k, n), generator=g, dtype=torch.uint8)
    scales, offsets = torch.rand(k // group, n, generator=g) * 0.02, torch.randn(k // group, n, generator=g) * 0.01
    dense = codes.float() * scales.repeat_interleave(group, 0) + offsets.repeat_interleave(group, 0)
    return codes, scales, offsets, dense.t()


def random_experts(g: torch.Generator, mode: str, hidden: int, inter: int, group: int = 8) -> tuple[tuple, ...]:
    """moe_experts' weight arguments in `mode`, and the float w13 [E, 2I, D], w2 [E, D, I] they stand for."""
    if mode == "int4":
        w13 = [random_int4(g, hidden, 2 * inter, group) for _ in range(E)]
        w2 = [random_int4(g, inter, hidden, group) for _ in range(E)]
        args = [(int4_panels(torch.stack([w[0] for w in ws])),
                 *(pad_columns(torch.stack([w[part] for w in ws])) for part in (1, 2))) for ws in (w13, w2)]
        return (*args[0], *args[1], group), (torch.stack([w[3] for w in w13]), torch.stack([w[3] for w in w2]))
    w13 = torch.randn(E, 2 * inter, hidden, generator=g) * 0.1
    w2 = torch.randn(E, hidden, inter, generator=g) * 0.1
    if mode == "none":
        return (panels(w13.transpose(1, 2)), None, None, panels(w2.transpose(1, 2)), None, None, 0), (w13, w2)
    if mode in HALF_DTYPES:  # stored in 16 bits, widened as they load: exact against float math on those values
        w13, w2 = w13.to(HALF_DTYPES[mode]), w2.to(HALF_DTYPES[mode])
        args = (panels(w13.transpose(1, 2)), None, None, panels(w2.transpose(1, 2)), None, None, 0)
        return args, (w13.float(), w2.float())
    q13, q2 = [pack_weight(w, "int8") for w in w13], [pack_weight(w, "int8") for w in w2]
    args = [(panels(torch.stack([w.qweight.t() for w in ws])), pad_columns(torch.stack([w.scales.float() for w in ws])),
             None) for ws in (q13, q2)]
    dense = tuple(torch.stack([w.dequantize() for w in ws]) for ws in (q13, q2))
    return (*args[0], *args[1], 0), dense


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("norm_topk_prob", [True, False])
@pytest.mark.parametrize("tokens", [1, 3, 16, 70])  # 16 and 70: more rows per expert than one register tile
def test_moe_experts(ops, mode: str, norm_topk_prob: bool, tokens: int) -> None:
    g = torch.Generator().manual_seed(2)
    gate = Gate(torch.randn(E, D, generator=g), TOP_K, norm_topk_prob)
    args, (w13, w2) = random_experts(g, mode, D, I)
    x = torch.randn(tokens, D, generator=g)
    out = ops.moe_experts(x, gate.weight, TOP_K, norm_topk_prob, *args)
    expected = reference_moe(x, gate, w13, w2, kernel_inputs(ops, mode))
    assert ((out - expected).norm() / expected.norm()).item() < 1e-5


@pytest.mark.parametrize(("hidden", "inter", "group"), [(64, 64, 32), (96, 160, 32)])  # whole panels only
def test_moe_experts_int4_groups(ops, hidden: int, inter: int, group: int) -> None:
    g = torch.Generator().manual_seed(5)
    gate = Gate(torch.randn(E, hidden, generator=g), TOP_K, True)
    args, (w13, w2) = random_experts(g, "int4", hidden, inter, group)
    x = torch.randn(11, hidden, generator=g)
    out = ops.moe_experts(x, gate.weight, TOP_K, True, *args)
    expected = reference_moe(x, gate, w13, w2)
    assert ((out - expected).norm() / expected.norm()).item() < 1e-5


@pytest.mark.parametrize("mode", MODES)
def test_moe_experts_row_does_not_depend_on_its_batch(ops, mode: str) -> None:
    """A token's output is bit-identical alone and in a batch that sends dozens of rows to its experts (where
    quantized panels are decoded once for all rows instead of inline)."""
    g = torch.Generator().manual_seed(7)
    gate = Gate(torch.randn(E, D, generator=g), TOP_K, True)
    args, _ = random_experts(g, mode, D, I)
    x = torch.randn(64, D, generator=g)
    batched = ops.moe_experts(x, gate.weight, TOP_K, True, *args)
    for row in (0, 31, 63):
        alone = ops.moe_experts(x[row : row + 1].contiguous(), gate.weight, TOP_K, True, *args)
        assert torch.equal(alone[0], batched[row])


def test_moe_experts_rejects_bad_input(ops) -> None:
    x, router = torch.zeros(2, D), torch.zeros(E, D)
    w13, w2 = panels(torch.zeros(E, D, 2 * I)), panels(torch.zeros(E, I, D))
    with pytest.raises(RuntimeError, match="top_k"):
        ops.moe_experts(x, router, E + 1, True, w13, None, None, w2, None, None, 0)
    with pytest.raises(RuntimeError, match="w13"):
        ops.moe_experts(x, router, TOP_K, True, w13[:, :, :-1].contiguous(), None, None, w2, None, None, 0)
    with pytest.raises(RuntimeError, match="panels"):
        ops.moe_experts(x, router, TOP_K, True, torch.zeros(E, D, 2 * I), None, None, w2, None, None, 0)
    with pytest.raises(RuntimeError, match="scales"):
        ops.moe_experts(x, router, TOP_K, True, w13.to(torch.int8), None, None, w2.to(torch.int8), None, None, 0)
    with pytest.raises(RuntimeError, match="float32, bfloat16, float16, int8"):
        ops.moe_experts(x, router, TOP_K, True, w13.double(), None, None, w2.double(), None, None, 0)
    with pytest.raises(RuntimeError, match="group size"):
        codes13, codes2 = int4_panels(torch.zeros(E, D, 2 * I)), int4_panels(torch.zeros(E, I, D))
        s13, s2 = torch.zeros(E, 1, padded(2 * I)), torch.zeros(E, 1, padded(D))
        ops.moe_experts(x, router, TOP_K, True, codes13, s13, s13, codes2, s2, s2, 7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [1, 3, 4, 5, 9, 33])  # one token tile, partial ones; weights-outer and x-outer
@pytest.mark.parametrize(("n", "k"), [(101, 70), (96, 64)])  # tails of the vector, weight-tile and block widths
def test_linear(ops, dtype: torch.dtype, tokens: int, n: int, k: int) -> None:
    """x W^T over row-major weights: float math on the stored (rounded) weights, up to fp32 summation order."""
    g = torch.Generator().manual_seed(11)
    w = (torch.randn(n, k, generator=g) * 0.1).to(dtype)
    x = torch.randn(tokens, k + 6, generator=g)[:, :k]  # rows strided, as a view into a wider activation
    x_seen = torch.stack([kernel_inputs(ops, dtype)(row) for row in x])
    torch.testing.assert_close(ops.linear(x, w), F.linear(x_seen, w.float()), atol=1e-5, rtol=1e-5)


def test_linear_rejects_bad_input(ops) -> None:
    with pytest.raises(RuntimeError, match="features"):
        ops.linear(torch.zeros(2, 8), torch.zeros(4, 9))
    with pytest.raises(RuntimeError, match="float32"):
        ops.linear(torch.zeros(2, 8, dtype=torch.float64), torch.zeros(4, 8))
    with pytest.raises(RuntimeError, match="bfloat16"):
        ops.linear(torch.zeros(2, 8), torch.zeros(4, 8, dtype=torch.int8))
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.linear(torch.zeros(2, 8), torch.zeros(8, 4).t())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [2, KERNEL_MAX_TOKENS + 7])  # the kernel's batches and torch's
def test_projection(dtype: torch.dtype, tokens: int) -> None:
    g = torch.Generator().manual_seed(12)
    w, b = (torch.randn(40, 24, generator=g) * 0.1).to(dtype), torch.randn(40, generator=g).to(dtype)
    x = torch.randn(tokens, 24, generator=g).to(dtype)
    out = Projection(w, b)(x)
    assert out.dtype == dtype and out.shape == (tokens, 40)
    expected = F.linear(x.float(), w.float(), b.float())
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: the output's rounding
    torch.testing.assert_close(out.float(), expected, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("inter", [40, 64])  # blocks off and on the 32-column panels
def test_panels_from_column_blocks(inter: int) -> None:
    """An expert given as its gate and up blocks gets the panels of the joined [D, 2I] matrix."""
    gate, up = torch.randn(inter, 48), torch.randn(inter, 48)
    assert torch.equal(panels([(gate.t(), up.t())]), panels([torch.cat([gate, up]).t()]))
