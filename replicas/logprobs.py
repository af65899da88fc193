"""OpenAI `logprobs` of generated tokens, in the completions and the chat shapes.

The engine replica streams, per token, `[logprob, [[token_id, logprob], ...]]` (the sampled token's
log-probability under the model and the request's most likely alternatives), and with the first token the same
for the prompt when `echo` asks for them; this module names the tokens and builds the response objects.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from moe_serve.replicas.protocol import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob

TokenText = Callable[[int], str]
Entry = Sequence[Any]  # [logprob, [[token_id, logprob], ...]] per generated token, as the replica sends it


def token_text(tokenizer: Any | None) -> TokenText:
    """How a token is named: its text, or `token_id:N` (vLLM's form) when the model has no tokenizer."""
    if tokenizer is None:
        return lambda token: f"token_id:{token}"
    return lambda token: tokenizer.decode([token])


def completion_logprobs(token_ids: Sequence[int], entries: Sequence[Entry | None], name: TokenText,
                        with_top: bool, text_offset: int) -> CompletionLogprobs:
    """`text_offset`: where the first token's text starts in the choice's text (after an echoed prompt, say).
    An entry is None for a token nothing predicted (an echoed prompt's first)."""
    tokens = [name(t) for t in token_ids]
    offsets = []
    for text in tokens:
        offsets.append(text_offset)
        text_offset += len(text)
    return CompletionLogprobs(
        tokens=tokens,
        token_logprobs=[None if entry is None else entry[0] for entry in entries],
        top_logprobs=[None if entry is None else {name(t): lp for t, lp in entry[1]} for entry in entries]
        if with_top else None,
        text_offset=offsets,
    )


def chat_logprobs(token_ids: Sequence[int], entries: Sequence[Entry], name: TokenText) -> ChatLogprobs:
    def top(token: int, logprob: float) -> TopLogprob:
        text = name(token)
        return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode("utf-8", "surrogatepass")))

    return ChatLogprobs(content=[
        ChatTokenLogprob(**top(token, entry[0]).model_dump(), top_logprobs=[top(t, lp) for t, lp in entry[1]])
        for token, entry in zip(token_ids, entries, strict=True)
    ])
