"""What the engine produces: per step and request (`StepOutput`), per finished request (`RequestOutput`), and the
log-probabilities they carry. Plain frozen dataclasses, shared by the engine core and the output processor."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class StepOutput:
    """What one step produced for one request (the unit streamed to clients)."""

    request_id: str
    token_id: int
    finished: bool
    finish_reason: str | None  # "stop" or "length" when finished, "abort" when aborted
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    logprob: TokenLogprob | None = None  # when the request asked for logprobs
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None  # with the first token, when asked
    text_delta: str = ""  # made by the output processor (output_processor.py), never by the core


@dataclass(frozen=True)
class TokenLogprob:
    """A sampled token's log-probability under the model (before temperature and filters), and the top ones."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first


@dataclass(frozen=True)
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str | None  # None from the core (token ids only); `LLMEngine.generate` and the output processor add it
    finish_reason: str | None
    ttft_s: float | None
    latency_s: float
    logits: list[torch.Tensor] | None = None  # per generated token, when SamplingParams.return_logits
    cached_tokens: int = 0  # prompt tokens whose KV came from the tiered cache
    cached_tokens_by_tier: dict[str, int] = field(default_factory=dict)
    logprobs: list[TokenLogprob] | None = None  # per generated token, when SamplingParams.logprobs is set
    prompt_logprobs: list[TokenLogprob | None] | None = None  # per prompt token (None for the first), when asked
