"""Greedy tokens and logits of our engine against `transformers` on the same random weights.

Logit tolerance: 1e-4 absolute (fp32 on both sides; measured differences are ~1e-7).
Tests taking the `kernels` fixture run twice: with the compiled CPU kernels (moe_serve.kernels) and on torch ops.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from conftest import random_prompts, save_hf_model

from moe_serve.model import transformer
from moe_serve.replicas.engine import EngineConfig, LLMEngine
from moe_serve.replicas.sampling import SamplingParams

LOGIT_ATOL = 1e-4
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, return_logits=True)


@functools.cache
def hf_model(model_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def reference(model_dir: Path, prompt: list[int], max_new_tokens: int) -> tuple[list[int], list[torch.Tensor]]:
    hf = hf_model(model_dir)
    out = hf.generate(
        torch.tensor([prompt]), max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
        output_logits=True, return_dict_in_generate=True, pad_token_id=0,
    )
    return out.sequences[0, len(prompt):].tolist(), [step[0] for step in out.logits]


def assert_matches(model_dir: Path, prompt: list[int], tokens: list[int], logits: list[torch.Tensor]) -> None:
    ref_tokens, ref_logits = reference(model_dir, prompt, len(tokens))
    assert tokens == ref_tokens
    for ours, theirs in zip(logits, ref_logits, strict=True):
        torch.testing.assert_close(ours, theirs, atol=LOGIT_ATOL, rtol=0)


@pytest.mark.parametrize("family_dir", ["mixtral_dir", "qwen2_dir"])
def test_batch_of_one_matches_transformers(family_dir: str, request: pytest.FixtureRequest, kernels: str) -> None:
    model_dir = request.getfixturevalue(family_dir)
    engine = LLMEngine.from_pretrained(model_dir)
    [prompt] = random_prompts([23], engine.model_config.vocab_size)
    [out] = engine.generate([prompt], GREEDY)
    assert_matches(model_dir, prompt, out.token_ids, out.logits)


@pytest.mark.parametrize("family_dir", ["mixtral_dir", "qwen2_dir"])
def test_rotary_unfolded_matches_transformers(family_dir: str, request: pytest.FixtureRequest,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The rotary path of models at or above FOLD_ROTARY_MAX_HIDDEN (q and k rotated by their own ops), here on the
    small model with the threshold lowered."""
    monkeypatch.setattr(transformer, "FOLD_ROTARY_MAX_HIDDEN", 0)
    model_dir = request.getfixturevalue(family_dir)
    engine = LLMEngine.from_pretrained(model_dir)
    assert not any(layer.rotary_folded for layer in engine.model.layers)
    [prompt] = random_prompts([23], engine.model_config.vocab_size)
    [out] = engine.generate([prompt], GREEDY)
    assert_matches(model_dir, prompt, out.token_ids, out.logits)


@pytest.mark.parametrize("family_dir", ["mixtral_dir", "qwen2_dir"])
def test_mixed_batch_joining_at_different_steps(family_dir: str, request: pytest.FixtureRequest, kernels: str) -> None:
    """Prompts of different lengths join a running batch at different steps; chunked prefill is forced small."""
    model_dir = request.getfixturevalue(family_dir)
    engine = LLMEngine.from_pretrained(model_dir, EngineConfig(max_num_batched_tokens=24, block_size=8))
    prompts = random_prompts([3, 40, 17, 61], engine.model_config.vocab_size, seed=1)
    join_at_step = [0, 2, 5, 9]
    ids: dict[int, str] = {}
    step = 0
    while len(ids) < len(prompts) or engine.has_unfinished():
        for i, when in enumerate(join_at_step):
            if when == step:
                ids[i] = engine.add_request(prompts[i], GREEDY)
        engine.step()
        step += 1
    for i, prompt in enumerate(prompts):
        out = engine.pop_result(ids[i])
        assert_matches(model_dir, prompt, out.token_ids, out.logits)


def test_qwen3_moe_matches_transformers(tmp_path: Path) -> None:
    model_dir = save_hf_model(tmp_path, "qwen3_moe", decoder_sparse_step=2, num_hidden_layers=2)
    engine = LLMEngine.from_pretrained(model_dir)
    [prompt] = random_prompts([19], engine.model_config.vocab_size)
    [out] = engine.generate([prompt], GREEDY)
    assert_matches(model_dir, prompt, out.token_ids, out.logits)


def test_sliding_window_longer_prompt(tmp_path: Path, kernels: str) -> None:
    model_dir = save_hf_model(tmp_path, "mixtral", sliding_window=16)
    engine = LLMEngine.from_pretrained(model_dir, EngineConfig(max_num_batched_tokens=20, block_size=4))
    assert engine.model_config.sliding_windows == (16, 16)
    [prompt] = random_prompts([50], engine.model_config.vocab_size, seed=2)
    [out] = engine.generate([prompt], GREEDY)
    assert_matches(model_dir, prompt, out.token_ids, out.logits)


def test_prompt_near_8192_tokens(tmp_path: Path) -> None:
    model_dir = save_hf_model(tmp_path, "mixtral", hidden_size=32, num_local_experts=4, intermediate_size=32)
    engine = LLMEngine.from_pretrained(model_dir, EngineConfig(max_num_batched_tokens=1024))
    assert engine.max_model_len == 8192
    [prompt] = random_prompts([8180], engine.model_config.vocab_size, seed=3)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, return_logits=True)
    [out] = engine.generate([prompt], params)
    assert_matches(model_dir, prompt, out.token_ids, out.logits)


def test_olmoe_matches_transformers(tmp_path: Path, kernels: str) -> None:
    """q/k norms over the whole projection, clip_qkv (low enough to clamp), top-k softmax weights not renormalised."""
    model_dir = save_hf_model(tmp_path, "olmoe", num_hidden_layers=2, clip_qkv=0.8)
    engine = LLMEngine.from_pretrained(model_dir)
    config = engine.model_config
    assert config.family == "olmoe" and not config.qk_norm_per_head and not config.norm_topk_prob
    prompts = random_prompts([19, 6], config.vocab_size, seed=2)
    for prompt, out in zip(prompts, engine.generate(prompts, GREEDY), strict=True):
        assert_matches(model_dir, prompt, out.token_ids, out.logits)


def test_prompt_logprobs_match_transformers(mixtral_dir: Path) -> None:
    """Every prompt token after the first is scored from the logits before it, across prefill chunks."""
    engine = LLMEngine.from_pretrained(mixtral_dir, EngineConfig(max_num_batched_tokens=16, block_size=8))
    prompts = random_prompts([37, 5], engine.model_config.vocab_size, seed=3)
    params = [SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=2),
              SamplingParams(max_tokens=3, temperature=0.0)]
    scored, plain = engine.generate(prompts, params)
    with torch.no_grad():
        logits = hf_model(mixtral_dir)(torch.tensor([prompts[0]])).logits[0]
    expected = torch.log_softmax(logits.float(), dim=-1)
    assert scored.prompt_logprobs is not None and scored.prompt_logprobs[0] is None
    assert len(scored.prompt_logprobs) == len(prompts[0])
    for pos, lp in enumerate(scored.prompt_logprobs[1:], start=1):
        assert lp is not None and abs(lp.logprob - expected[pos - 1, prompts[0][pos]].item()) < LOGIT_ATOL
        assert [t for t, _ in lp.top] == expected[pos - 1].topk(2).indices.tolist()
    assert plain.prompt_logprobs is None
    assert scored.token_ids == engine.generate(prompts[:1], SamplingParams(max_tokens=2, temperature=0.0))[0].token_ids
