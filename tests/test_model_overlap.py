"""Micro-batch overlap in the engine (EngineConfig.micro_batch_overlap): a decode-only step split in two halves whose
MoE calls are submitted and waited for later gives the same tokens and log-probabilities as the whole batch, for a
Mixtral and a Qwen2-MoE (shared expert, a dense layer); the split itself keeps every half's keys and masks right."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import random_prompts

from moe_serve.model.attention import AttentionBatch
from moe_serve.replicas.engine import EngineConfig, LLMEngine
from moe_serve.replicas.sampling import SamplingParams

PARAMS = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, logprobs=2)


class DeferredMoE:
    """An in-process backend that can `submit`: each call runs only when waited for, as a remote one returns later,
    so a half's hidden states must stay untouched while its call is away."""

    def __init__(self, moe: Callable[[int, torch.Tensor], torch.Tensor]) -> None:
        self.moe = moe
        self.submitted = 0

    def __call__(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        return self.moe(layer, hidden)

    def submit(self, layer: int, hidden: torch.Tensor) -> Callable[[], torch.Tensor]:
        self.submitted += 1
        return lambda: self.moe(layer, hidden)


@pytest.mark.parametrize("family_dir", ["mixtral_dir", "qwen2_dir"])
def test_overlapped_decode_equals_whole_batch(family_dir: str, request: pytest.FixtureRequest) -> None:
    model_dir = request.getfixturevalue(family_dir)
    prompts = random_prompts([5, 17, 9, 30, 12], 256, seed=21)  # different lengths: padded keys and masks
    whole = LLMEngine.from_pretrained(model_dir).generate(prompts, PARAMS)
    overlapped = LLMEngine.from_pretrained(model_dir, EngineConfig(micro_batch_overlap=True))
    deferred = DeferredMoE(overlapped.moe)
    overlapped.moe = deferred
    outputs = overlapped.generate(prompts, PARAMS)
    assert [o.token_ids for o in outputs] == [o.token_ids for o in whole]
    for got, want in zip(outputs, whole):
        assert got.logprobs is not None and want.logprobs is not None
        assert [lp.logprob for lp in got.logprobs] == pytest.approx([lp.logprob for lp in want.logprobs], abs=1e-4)
    moe_layers = sum(overlapped.model_config.moe_layers)
    assert deferred.submitted == 2 * moe_layers * (PARAMS.max_tokens - 1)  # every decode step, both halves


def test_overlap_needs_a_backend_that_submits(mixtral_dir: Path) -> None:
    engine = LLMEngine.from_pretrained(mixtral_dir, EngineConfig(micro_batch_overlap=True))  # LocalMoE: no submit
    outputs = engine.generate(random_prompts([5, 9], 256, seed=22), PARAMS)
    assert all(len(o.token_ids) == PARAMS.max_tokens for o in outputs)


def decode_batch(lengths: list[int]) -> AttentionBatch:
    """A decode-only batch: sequence i has lengths[i] keys in slots 100 i + k, its query at the last position."""
    width = max(lengths)
    slots = torch.zeros(len(lengths), width, dtype=torch.long)
    positions = torch.full((len(lengths), width), -1, dtype=torch.long)
    for i, n in enumerate(lengths):
        slots[i, :n] = 100 * i + torch.arange(n)
        positions[i, :n] = torch.arange(n)
    last = torch.tensor(lengths) - 1
    return AttentionBatch(last, slots[torch.arange(len(lengths)), last], len(lengths), slots, positions, [])


def test_split_decode_cuts_each_half_to_its_own_keys() -> None:
    first, second = decode_batch([3, 3, 7, 5]).split_decode(2)
    assert first.num_decode == 2 and first.positions.tolist() == [2, 2] and first.slot_mapping.tolist() == [2, 102]
    assert first.decode_key_slots.shape == (2, 3) and first.decode_same_length  # no padding left: no mask
    assert first.decode_mask(None) is None
    assert second.decode_key_slots.shape == (2, 7) and not second.decode_same_length
    assert second.decode_key_slots.is_contiguous()
    mask = second.decode_mask(None)
    assert mask is not None and (mask[1, 0, 0, 5:] == float("-inf")).all() and (mask[1, 0, 0, :5] == 0).all()


@pytest.mark.parametrize("n", [0, 4])
def test_split_decode_refuses_an_empty_half(n: int) -> None:
    with pytest.raises(ValueError, match="needs a decode-only batch of more than"):
        decode_batch([3, 3, 7, 5]).split_decode(n)
