"""Output processing, off the engine core's step thread: a request's token ids in, its text out.

The engine core (engine.py) handles token ids only and finishes a request on ids alone (EOS, stop token ids,
max_tokens, the context length), as vLLM's engine core does. Text is made here, per request: incremental
detokenization and stop strings. A stop string ends the request once min_tokens are out and its text is cut before
it; the caller then aborts the request in the core (`OutputProcessor.stopped_early`), and any token the core made
after the stop is dropped. While stop strings may still end the text, its last (longest stop - 1) characters are
held back, as vLLM holds them, so a stop string split over two deltas never reaches the client in part; nor does the
text after one completed while min_tokens forbade stopping. Without a tokenizer every text delta is "".
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
        through the detokenizer, so the text goes on exactly as the first replica's would have (a character it held
        back half-made, and a stop string begun there, included); the text the first replica sent is not sent
        again."""
        self.params = params
        self.tokenizer = tokenizer
        per_step = tokenizer is not None and (stream or bool(params.stop))
        self._detok = IncrementalDetokenizer(tokenizer) if per_step and tokenizer is not None else None
        self._hold = max(map(len, params.stop)) - 1 if params.stop else 0
        self.text = ""
        self.token_ids: list[int] = []
        self.finished = False
        self.finish_reason: str | None = None
        self.stopped_early = False  # finished here (a stop string) before the core finished it
        self._stop_before_min: int | None = None  # where a stop string completed while min_tokens forbade stopping
        self._min_tokens = params.min_tokens + len(resumed)  # a resumed request's min_tokens counts what is left
        self._resumed = len(resumed)
        if self._detok is not None:
            for produced, token_id in enumerate(resumed, 1):
                delta = self._detok.add(token_id)
                self.text += delta
                if self.params.stop:  # never "stop" here: the first replica would have finished
                    self._check_stop(delta, produced)
        self._sent = self._sendable()  # self.text[:_sent] has been sent (here, or by the first replica)

    def process(self, out: StepOutput) -> StepOutput:
        """The core's output with its text delta, finished at a stop string. Call in order, until finished."""
        self.token_ids.append(out.token_id)
        delta = self._detok.add(out.token_id) if self._detok is not None else ""
        self.text += delta
        reason = out.finish_reason
        if self.params.stop:
            reason = self._check_stop(delta, self._resumed + len(self.token_ids)) or reason
        if reason is not None:
            self._finish_text()
            if self.params.stop:
                self._truncate_at_stop()
            self.finished, self.finish_reason = True, reason
            self.stopped_early = not out.finished
        sendable = len(self.text) if self.finished else self._sendable()
        text_delta, self._sent = self.text[self._sent : sendable], max(self._sent, sendable)
        return dataclasses.replace(out, text_delta=text_delta, finished=reason is not None, finish_reason=reason)

    def _sendable(self) -> int:
        """How much of the unfinished text may be sent: all but what a stop string could still claim."""
        end = len(self.text) - self._hold
        if self._stop_before_min is not None:
            end = min(end, self._stop_before_min)
        return max(0, end)

    def _check_stop(self, delta: str, produced: int) -> str | None:
        """"stop" when a stop string ends the request at its `produced`-th token; remembers one completed while
        min_tokens forbade stopping, which ends it once they are out."""
        if produced < self._min_tokens:
            if self._stop_before_min is None and self._stop_string_in_text(delta):
                self._stop_before_min = self._first_stop()
            return None
        return "stop" if self._stop_before_min is not None or self._stop_string_in_text(delta) else None

    def _finish_text(self) -> None:
        """Add the text not yet made: what the detokenizer holds back, or all of it when none ran per step."""
        if self._detok is not None:
            self.text += self._detok.finish()
        elif self.tokenizer is not None:
            self.text += self.tokenizer.decode(self.token_ids)

    def _stop_string_in_text(self, delta: str) -> bool:
        """Whether a stop string ends in the part of the text this delta could complete (linear, not quadratic, in
        the output length)."""
        if not delta:
            return False
        tail = self.text[max(0, len(self.text) - len(delta) - self._hold) :]  # _hold: the longest stop string - 1
        return any(s in tail for s in self.params.stop)

    def _first_stop(self) -> int | None:
        """Where the first stop string in the text starts; None when there is none."""
        return min((i for i in map(self.text.find, self.params.stop) if i >= 0), default=None)

    def _truncate_at_stop(self) -> None:
        """Cut the text before the first stop string, if any (the request may have ended on a token id or length)."""
        cut = self._first_stop()
        if cut is not None:
            self.text = self.text[:cut]
