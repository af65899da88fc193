"""The GPU branch of the expert shards: CUDA experts (and vLLM's fused MoE kernel when the `gpu` extra is installed)
give the CPU's outputs. Skipped without a CUDA device, so CI (no GPU) never runs it; on a GPU machine:
`.venv/bin/python -m pytest -q tests/test_gpu_shards.py`.

Tolerances: 2e-2 relative per expert FFN (the fused kernel may run fp32 matmuls in TF32); greedy tokens must equal
the in-process CPU engine's on the tiny model (its logit gaps are far above TF32 error)."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray
import torch
from conftest import random_prompts

from moe_serve.cluster.bringup import connect_ray
from moe_serve.cluster.fused_experts import PROBE_TOLERANCE, fused_or_none, vllm_fused_experts
from moe_serve.model.checkpoint import Checkpoint
from moe_serve.model.config import ModelConfig
from moe_serve.model.moe import ExpertStack
from moe_serve.replicas.engine import LLMEngine
from moe_serve.replicas.sampling import SamplingParams
from moe_serve.router.deploy import start_expert_parallel

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


def layer_experts(model_dir: Path, device: str) -> ExpertStack:
    config = ModelConfig.from_dir(model_dir)
    w13, w2 = Checkpoint(model_dir, config).load_experts(config.moe_layer_ids[0], [0, 1, 2])
    return ExpertStack([0, 1, 2], w13.to(device), w2.to(device))


def test_cuda_experts_match_the_cpu(mixtral_dir: Path) -> None:
    cpu, cuda = layer_experts(mixtral_dir, "cpu"), layer_experts(mixtral_dir, "cuda")
    x = torch.randn(5, cpu.w13[0].in_features)
    for i in range(3):
        want = cpu.ffn(i, x)
        got = cuda.ffn(i, x.cuda()).cpu()
        assert ((got - want).norm() / want.norm()).item() < PROBE_TOLERANCE


@pytest.mark.skipif(vllm_fused_experts() is None, reason="vLLM (the gpu extra) is not installed")
def test_vllm_fused_experts_are_used_and_match(mixtral_dir: Path) -> None:
    cpu = layer_experts(mixtral_dir, "cpu")
    fused = fused_or_none(layer_experts(mixtral_dir, "cuda"))
    assert fused is not None, "vLLM imports but its fused MoE failed the probe: see the logged warning"
    x = torch.randn(6, cpu.w13[0].in_features)
    got = fused.grouped(x.cuda(), torch.tensor([2, 0]), torch.tensor([4, 2])).cpu()
    want = torch.cat([cpu.ffn(2, x[:4]), cpu.ffn(0, x[4:])])
    assert ((got - want).norm() / want.norm()).item() < PROBE_TOLERANCE


def test_gpu_shards_give_the_in_process_tokens(mixtral_dir: Path) -> None:
    prompts = random_prompts([6, 31, 18], 256, seed=3)
    expected = [o.token_ids for o in LLMEngine.from_pretrained(mixtral_dir).generate(prompts, GREEDY)]
    connect_ray()
    try:
        parallel = start_expert_parallel(str(mixtral_dir), 1, transport="plain")
        try:
            engine = LLMEngine.from_pretrained(mixtral_dir, moe=parallel)
            assert [o.token_ids for o in engine.generate(prompts, GREEDY)] == expected
            assert all(s["device"].startswith("cuda") for s in parallel.describe()["shards"])
        finally:
            parallel.shutdown()
    finally:
        ray.shutdown()
