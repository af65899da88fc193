"""Sampling parameters and the batched sampler: greedy, temperature, top-k, top-p, per-request seeds.

Knows token ids and logits only; stop strings are checked by the engine, which owns detokenization.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


GREEDY_TEMPERATURE = 1e-5
MAX_LOGPROBS = 20  # most alternatives per token a request may ask for (OpenAI's top_logprobs limit)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    return_logits: bool = False  # keep each step's logits in the output (tests and debugging)
    min_tokens: int = field(default=0)
    logprobs: int | None = None  # log-probability of each sampled token and of this many most likely ones
    prompt_logprobs: int | None = None  # the same for every prompt token after the first (no prefix cache hits)
    # a request resumed on another replica (migration): the prompt's last `resumed_tokens` ids were generated
    # already; its random stream skips their draws and its text continues theirs
    resumed_tokens: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be between 0 and max_tokens, got {self.min_tokens!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1, 0 (off) or positive, got {self.top_k!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_LOGPROBS:
                raise ValueError(f"{name} must be between 0 and {MAX_LOGPROBS}, got {value!r}")
        if not isinstance(self.resumed_tokens, int) or self.resumed_tokens < 0:
            raise ValueError(f"resumed_tokens must be a non-negative integer, got {self.resumed_tokens!r}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        # below this, logits / temperature overflows float32: treat it as greedy (vLLM's threshold)
        return self.temperature < GREEDY_TEMPERATURE


def make_generator(params: SamplingParams) -> random.Random | None:
    """The request's own random stream: seeded requests draw the same tokens whatever else shares the batch."""
    if params.greedy:
        return None
    generator = random.Random(params.seed)  # None: seeded from the OS
    for _ in range(params.resumed_tokens):  # one draw per sampled token (`sample`)
        generator.random()
    return generator


def sample(
    logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[random.Random | None]
) -> list[int]:
    """One token id per row of logits [B, V]; the sampled rows are filtered and drawn together.

    Each sampled row takes one uniform number from its request's generator and picks the token where the
    cumulative distribution crosses it (inverse CDF): one batched pass instead of per-row tensor ops.
    """
    token_ids = logits.argmax(dim=-1).tolist()
    rows = [row for row, p in enumerate(params) if not p.greedy]
    if not rows:
        return token_ids
    sampled = logits if len(rows) == len(params) else logits[rows]
    probs = filtered_probs(sampled, [params[row] for row in rows])
    cdf = probs.cumsum_(dim=-1)
    totals = cdf[:, -1:]
    uniforms = torch.tensor([[generators[row].random()] for row in rows], dtype=cdf.dtype)  # type: ignore[union-attr]
    # right=True: the first token whose cumulative sum exceeds the draw, so zero-probability tokens never win
    picks = torch.searchsorted(cdf, uniforms * totals, right=True).clamp_(max=cdf.shape[1] - 1).flatten().tolist()
    usable = (torch.isfinite(totals) & (totals > 0)).flatten().tolist()
    for row, pick, ok in zip(rows, picks, usable):
        if ok:  # a degenerate row (overflowing temperature, NaN) keeps its greedy token instead of failing
            token_ids[row] = pick
    return token_ids


def filtered_probs(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Probabilities [R, V] after each row's temperature, then top-k, then top-p (the token crossing top_p stays,
    and however small top_p is, the most likely token stays)."""
    vocab = logits.shape[-1]
    logits = logits.float() / torch.tensor([[p.temperature] for p in params])
    top_k = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
    if any(top_k):
        kept = torch.topk(logits, max(top_k), dim=-1).values  # [R, max k], descending
        threshold = kept.gather(1, torch.tensor([[max(k, 1) - 1] for k in top_k]))
        threshold[torch.tensor(top_k) == 0] = float("-inf")
        logits = logits.masked_fill(logits < threshold, float("-inf"))  # ties at the k-th value stay
    if any(p.top_p < 1.0 for p in params):
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        top_p = torch.tensor([[p.top_p if p.top_p < 1.0 else 2.0] for p in params])  # 2: nothing is dropped
        drop_sorted = sorted_probs.cumsum(dim=-1).sub_(sorted_probs) >= top_p
        drop_sorted[:, 0] = False
        logits = logits.masked_fill(torch.empty_like(drop_sorted).scatter_(1, order, drop_sorted), float("-inf"))
    return torch.softmax(logits, dim=-1)
