"""The batched sampler: frequencies follow the filtered distribution, seeded rows do not depend on their batch,
and degenerate rows fall back to greedy."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from moe_serve.replicas.sampling import SamplingParams, make_generator, sample

PROBS = [0.5, 0.3, 0.15, 0.05]
LOGITS = torch.tensor([math.log(p) for p in PROBS] + [-1e9] * 4)  # 8 ids, the last four never drawn
DRAWS = 6000


def frequencies(params: SamplingParams) -> dict[int, float]:
    rows = [SamplingParams(**{**params.__dict__, "seed": seed}) for seed in range(DRAWS)]
    tokens = sample(LOGITS.expand(DRAWS, -1).clone(), rows, [make_generator(p) for p in rows])
    return {token: count / DRAWS for token, count in Counter(tokens).items()}


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({}, PROBS),
        ({"top_k": 2}, [0.5 / 0.8, 0.3 / 0.8]),
        ({"top_p": 0.85}, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95]),  # the token crossing 0.85 stays
        ({"top_p": 0.5}, [1.0]),
        ({"top_k": 3, "top_p": 0.7}, [0.5 / 0.8, 0.3 / 0.8]),  # top-p applies to what top-k left
    ],
)
def test_frequencies_follow_the_filtered_distribution(filters: dict, expected: list[float]) -> None:
    seen = frequencies(SamplingParams(temperature=1.0, **filters))
    assert set(seen) == set(range(len(expected)))
    for token, p in enumerate(expected):
        assert abs(seen[token] - p) < 0.03, (token, seen[token], p)


def test_temperature_flattens_and_sharpens() -> None:
    hot, cold = frequencies(SamplingParams(temperature=4.0)), frequencies(SamplingParams(temperature=0.25))
    assert hot[3] > 0.15 and cold[0] > 0.85  # p ** (1 / T), renormalised: 0.19 and 0.89


def test_a_seeded_row_draws_the_same_tokens_whatever_shares_its_batch() -> None:
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=7)
    others = [SamplingParams(temperature=0.0), SamplingParams(temperature=2.0, top_k=3), SamplingParams(seed=1)]
    logits = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    alone_gen, batch_gens = make_generator(seeded), [make_generator(p) for p in [*others, seeded]]
    alone = [sample(logits[3:], [seeded], [alone_gen])[0] for _ in range(20)]
    together = [sample(logits, [*others, seeded], batch_gens)[3] for _ in range(20)]
    assert alone == together and len(set(alone)) > 1


def test_degenerate_rows_fall_back_to_greedy() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0], [float("nan")] * 3, [1.0, float("inf"), 0.0]])
    params = [SamplingParams(temperature=1e-4, top_p=1e-300), SamplingParams(), SamplingParams(top_k=2)]
    tokens = sample(logits, params, [make_generator(p) for p in params])
    assert tokens[0] == 1 and tokens[2] == 1 and 0 <= tokens[1] < 3
