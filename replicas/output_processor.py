"""Output processing, off the engine core's step thread: a request's token ids in, its text out.

The engine core (engine.py) handles token ids only and finishes a request on ids alone (EOS, stop token ids,
max_tokens, the context length), as vLLM's engine core does. Text is made here, per request: incremental
detokenization and stop strings. A stop string ends the request once min_tokens are out and its text is cut before
it; the caller then aborts the request in the core (`OutputProcessor.stopped_early`), and any token the core made
after the stop is dropped. Without a tokenizer every text delta is "".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from moe_serve.model.tokenizer import IncrementalDetokenizer, Tokenizer
from moe_serve.replicas.outputs import StepOutput
from moe_serve.replicas.sampling import SamplingParams


class OutputProcessor:
    """One request's outputs in order; `stream=False` decodes once at the end unless stop strings need the text."""

    def __init__(self, tokenizer: Tokenizer | None, params: SamplingParams, stream: bool = True,
                 resumed: Sequence[int] = ()) -> None:
        """`resumed`: the ids a request resumed on this replica generated before (migration). They are replayed
        through the detokenizer, so the text goes on exactly as the first replica's would have, a character it
        held back half-made included; their own text is not output again."""
        self.params = params
        self.tokenizer = tokenizer
        per_step = tokenizer is not None and (stream or bool(params.stop))
        self._detok = IncrementalDetokenizer(tokenizer) if per_step and tokenizer is not None else None
        if self._detok is not None:
            for token_id in resumed:
                self._detok.add(token_id)
        self.text = ""
        self.token_ids: list[int] = []
        self.finished = False
        self.finish_reason: str | None = None
        self.stopped_early = False  # finished here (a stop string) before the core finished it

    def process(self, out: StepOutput) -> StepOutput:
        """The core's output with its text delta, finished at a stop string. Call in order, until finished."""
        self.token_ids.append(out.token_id)
        delta = self._detok.add(out.token_id) if self._detok is not None else ""
        self.text += delta
        reason = out.finish_reason
        if self.params.stop and len(self.token_ids) >= self.params.min_tokens and self._stop_string_in_text(delta):
            reason = "stop"
        if reason is not None:
            delta += self._finish_text()
            if self.params.stop:
                delta = self._truncate_at_stop(delta)
            self.finished, self.finish_reason = True, reason
            self.stopped_early = not out.finished
        return dataclasses.replace(out, text_delta=delta, finished=reason is not None, finish_reason=reason)

    def _finish_text(self) -> str:
        """The text not yet emitted: what the detokenizer holds back, or all of it when none ran per step."""
        if self._detok is not None:
            tail = self._detok.finish()
        elif self.tokenizer is not None:
            tail = self.tokenizer.decode(self.token_ids)
        else:
            tail = ""
        self.text += tail
        return tail

    def _stop_string_in_text(self, delta: str) -> bool:
        """Whether a stop string is in the text; only the part this delta could complete is scanned (linear, not
        quadratic, in the output length), except at the token reaching min_tokens, where a stop string completed
        earlier, while stops were not allowed yet, must still end the request."""
        text, stop = self.text, self.params.stop
        if len(self.token_ids) > self.params.min_tokens:
            if not delta:
                return False
            text = text[max(0, len(text) - len(delta) - max(map(len, stop)) + 1) :]
        return any(s in text for s in stop)

    def _truncate_at_stop(self, delta: str) -> str:
        """Cut the text before the first stop string; returns what is left of this step's delta."""
        found = [i for i in (self.text.find(s) for s in self.params.stop) if i >= 0]
        if not found:  # stopped by a token id or the length, not a string
            return delta
        cut = min(found)
        delta_start = len(self.text) - len(delta)
        self.text = self.text[:cut]
        return delta[: max(0, cut - delta_start)]
