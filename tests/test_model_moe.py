"""LocalMoE's paths (the compiled kernel, dense and routed over the stacked experts, the dispatch loop) give the
same output.

The loop path is the reference: it runs each expert's own weights. Tolerances: fp32 paths agree to float rounding
(< 1e-5 relative); the stacked int8 path multiplies the exactly dequantized weights in fp32 while the loop runs the
bf16 kernels, so they differ by the kernels' bf16 rounding (< 1%, as tests/test_model_quant.py's KERNEL_TOL). A
compiled build with int8 dot products (AVX512-VNNI) also quantizes the activations per row, as vLLM's dynamic
per-token W8A8 does, which about doubles the int8 error (< 3%; tests/test_kernels.py checks that arithmetic exactly).
Shape legend: T = tokens, D = hidden, E = experts, I = expert width.
"""

import pytest
import torch

from moe_serve.kernels import cpu_ops
from moe_serve.model import moe as moe_module
from moe_serve.model.kernel_moe import KernelExperts
from moe_serve.model.moe import ROUTED_MAX_TOKENS, ROUTED_MIN_TOKENS, ExpertStack, LocalMoE
from moe_serve.router.gate import Gate, combine, dispatch

E, D, I, TOP_K = 8, 64, 128, 2
TOL = {"none": 1e-5, "int8": 1e-2, "int4": 1e-2}
INT8_ACTIVATIONS_TOL = 3e-2  # int8 weights and per-row int8 activations


def make_moe(mode: str, norm_topk_prob: bool = True, seed: int = 0) -> tuple[LocalMoE, ExpertStack, Gate]:
    g = torch.Generator().manual_seed(seed)
    gate = Gate(torch.randn(E, D, generator=g), TOP_K, norm_topk_prob)
    w13, w2 = torch.randn(E, 2 * I, D, generator=g) * 0.1, torch.randn(E, D, I, generator=g) * 0.1
    reference = ExpertStack(range(E), w13, w2, mode)  # never stacked: keeps its own per-expert weights
    return LocalMoE({0: gate}, {0: ExpertStack(range(E), w13, w2, mode)}, E), reference, gate


def loop_output(stack: ExpertStack, gate: Gate, x: torch.Tensor) -> torch.Tensor:
    routing = gate(x)
    plan = dispatch(routing, E)
    return combine(stack.grouped_ffn(x[plan.token_index], plan.counts), plan, routing, x.shape[0])


def tolerance(mode: str, compiled: bool) -> float:
    """How far a path may be from the loop: TOL, or INT8_ACTIVATIONS_TOL where the kernel quantizes activations."""
    if compiled and mode == "int8" and getattr(cpu_ops(), "int8_dot", False):
        return INT8_ACTIVATIONS_TOL
    return TOL[mode]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("mode", ["none", "int8", "int4"])
@pytest.mark.parametrize("norm_topk_prob", [True, False])
@pytest.mark.parametrize("tokens", [1, 5, ROUTED_MIN_TOKENS, 32, 100, ROUTED_MAX_TOKENS + 8])
def test_every_path_matches_the_loop(mode: str, norm_topk_prob: bool, tokens: int, kernels: str) -> None:
    moe, reference, gate = make_moe(mode, norm_topk_prob)
    x = torch.randn(tokens, D, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert rel_err(moe(0, x), loop_output(reference, gate, x)) < tolerance(mode, kernels == "compiled")


@pytest.mark.parametrize("mode", ["none", "int8"])
@pytest.mark.parametrize("tokens", [1, 16, 40])
def test_dense_and_routed_agree(mode: str, tokens: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(moe_module, "_OPS", None)  # the torch paths
    moe, _, _ = make_moe(mode)
    x = torch.randn(tokens, D, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        stacked = moe._stacked_experts(0)
        assert rel_err(stacked(x, routed=True), stacked(x, routed=False)) < 1e-5


@pytest.mark.parametrize("mode", ["none", "int8", "int4"])
def test_stacking_keeps_one_copy_and_the_loop_exact(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """After stacking, the stack's per-expert weights are views of the stacked ones and the loop gives the same
    output (to float rounding: fp32 down weights are now read transposed)."""
    monkeypatch.setattr(moe_module, "_OPS", None)  # the torch paths
    moe, reference, gate = make_moe(mode)
    stack = moe.experts[0]
    before = stack.nbytes
    x = torch.randn(48, D, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        moe._stacked_experts(0)
        assert rel_err(loop_output(stack, gate, x), loop_output(reference, gate, x)) < 1e-6
    assert stack.nbytes == before
    if mode != "int4":  # int4 keeps a K-stacked repack of its down weights besides the per-expert ones
        first = stack.w13[0]
        storage = first.weight if mode == "none" else first.qweight  # type: ignore[union-attr]
        assert storage.untyped_storage().nbytes() >= E * 2 * I * D * storage.element_size()


def test_paths_by_batch_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(moe_module, "_OPS", None)  # the torch paths, as without a kernel build
    moe, _, _ = make_moe("none")
    assert moe._path(0, 1) == "dense"
    assert moe._path(0, ROUTED_MIN_TOKENS) == "routed"
    assert moe._path(0, ROUTED_MAX_TOKENS + 1) == "loop"
    int8, _, _ = make_moe("int8")
    assert int8._path(0, 4 * ROUTED_MAX_TOKENS) == "routed"
    int4, _, _ = make_moe("int4")
    assert int4._path(0, 1) == "dense" and int4._path(0, 4 * ROUTED_MAX_TOKENS) == "loop"


def test_compiled_kernel_serves_every_mode_at_every_size() -> None:
    assert cpu_ops() is not None, "the compiled CPU kernels did not build: see the warning it logged"
    for mode in ("none", "int8", "int4"):
        moe, _, _ = make_moe(mode)
        assert all(moe._path(0, t) == "kernel" for t in (1, ROUTED_MIN_TOKENS, 4 * ROUTED_MAX_TOKENS))
        assert not moe.experts  # the kernel holds the layer's experts alone


@pytest.mark.parametrize("mode", ["none", "int8", "int4"])
def test_kernel_holds_experts_once(mode: str) -> None:
    """A layer the kernel takes is held in its panels alone: about the stack's bytes (fp32 and int8 exactly up to
    scale dtypes; int4 keeps fp32 scale and offset per group where the stack keeps bf16 pairs)."""
    assert cpu_ops() is not None
    g = torch.Generator().manual_seed(0)
    stack = ExpertStack(range(E), torch.randn(E, 2 * I, D, generator=g), torch.randn(E, D, I, generator=g), mode)
    moe = LocalMoE({0: Gate(torch.randn(E, D, generator=g), TOP_K, True)}, {0: stack}, E)
    assert 0.9 < moe.kernel_layers[0].nbytes / stack.nbytes < 1.3


@pytest.mark.parametrize("mode", ["none", "int8", "int4"])
def test_kernel_grouped_matches_the_loop(mode: str) -> None:
    """The shards' call: rows grouped by expert, no gate or combine; against each expert's own FFN."""
    ops = cpu_ops()
    assert ops is not None
    _, reference, _ = make_moe(mode)
    experts = KernelExperts(ops, reference.w13, reference.w2)
    expert_ids, counts = torch.tensor([5, 0, 3]), torch.tensor([2, 0, 7])
    rows = torch.randn(9, D, generator=torch.Generator().manual_seed(4))
    out = experts.grouped(rows, expert_ids, counts)
    expected = torch.cat([reference.ffn(5, rows[:2]), reference.ffn(3, rows[2:])])
    assert rel_err(out, expected) < tolerance(mode, compiled=True)
    with pytest.raises(RuntimeError, match="sum to"):
        experts.grouped(rows, expert_ids, torch.tensor([2, 0, 6]))
    with pytest.raises(RuntimeError, match="out of range"):
        experts.grouped(rows, torch.tensor([5, 0, E]), counts)
