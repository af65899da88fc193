"""The inter-token budget: prefill chunks sized from measured step costs while sequences decode."""

from __future__ import annotations

import pytest

from moe_serve.replicas.step_budget import StepBudget

UNLIMITED = 1 << 30


def test_no_limit_without_decodes_or_before_anything_is_measured() -> None:
    budget = StepBudget(max_step_ms=50)
    assert budget.prefill_tokens(num_decodes=0) == UNLIMITED  # a lone prompt prefills at full speed
    assert budget.prefill_tokens(num_decodes=4) == UNLIMITED  # nothing measured yet
    budget.observe(num_decodes=0, prefill_tokens=512, seconds=0.512)  # 1 ms per prompt token
    assert budget.prefill_tokens(num_decodes=4) == UNLIMITED  # no decode step measured yet


def test_chunk_fills_what_the_decodes_leave_of_the_budget() -> None:
    budget = StepBudget(max_step_ms=50, min_tokens=16)
    budget.observe(num_decodes=0, prefill_tokens=512, seconds=0.512)  # 1 ms per prompt token
    budget.observe(num_decodes=8, prefill_tokens=0, seconds=0.010)  # a decode step: 10 ms
    assert budget.prefill_tokens(num_decodes=8) == 40  # (50 - 10) ms / 1 ms
    assert budget.prefill_tokens(num_decodes=0) == UNLIMITED
    budget.observe(num_decodes=8, prefill_tokens=0, seconds=0.060)  # a moving average: one step moves it a fifth
    assert budget.prefill_tokens(num_decodes=8) == 30  # (50 - 20) ms / 1 ms
    for _ in range(30):
        budget.observe(num_decodes=8, prefill_tokens=0, seconds=0.060)  # decodes alone now take more than the budget
    assert budget.prefill_tokens(num_decodes=8) == 16  # prompts still progress


def test_mixed_steps_refine_the_prefill_cost_and_count_overruns() -> None:
    budget = StepBudget(max_step_ms=50)
    budget.observe(num_decodes=4, prefill_tokens=0, seconds=0.010)
    budget.observe(num_decodes=4, prefill_tokens=100, seconds=0.210)  # (210 - 10) ms / 100 tokens = 2 ms
    assert budget.prefill_s == pytest.approx(0.002)
    assert budget.over_budget_steps == 1 and budget.prefill_tokens(num_decodes=4) == 20
    with pytest.raises(ValueError, match="max_step_ms"):
        StepBudget(max_step_ms=0)
