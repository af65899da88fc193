"""The inter-token time budget: how many prefill tokens a step may carry beside its decodes.

A step that decodes running streams and prefills a new prompt delays every stream by its whole length, so while
anything decodes the scheduler sizes the prefill chunk to keep the step within `max_step_ms`, from costs learned
from measured steps: the time of a decode-only step and the extra time per prefill token a mixed step takes, each
a moving average (a decode step's cost is mostly reading the weights, which a batch shares, so the batch size
barely moves it). A step with no decodes is not limited (a lone prompt prefills at full speed), nor is the first
mixed step, before anything is measured; a chunk is never cut below `min_tokens`, so prompts always progress.
"""

from __future__ import annotations

SMOOTHING = 0.2  # weight of the newest measurement in the moving averages


class StepBudget:
    def __init__(self, max_step_ms: float, min_tokens: int = 16) -> None:
        if max_step_ms <= 0:
            raise ValueError(f"max_step_ms must be positive, got {max_step_ms}")
        self.max_step_s = max_step_ms / 1000
        self.min_tokens = min_tokens
        self.decode_s: float | None = None  # seconds of a decode-only step
        self.prefill_s: float | None = None  # extra seconds per prefill token in a mixed step
        self.last_step_s = 0.0
        self.over_budget_steps = 0  # mixed steps that ran past the budget

    def prefill_tokens(self, num_decodes: int) -> int:
        """Prefill tokens a step decoding `num_decodes` sequences may add (a large number when unconstrained)."""
        if not num_decodes or self.decode_s is None or self.prefill_s is None:
            return 1 << 30
        room = self.max_step_s - self.decode_s
        return max(self.min_tokens, int(room / self.prefill_s))

    def observe(self, num_decodes: int, prefill_tokens: int, seconds: float) -> None:
        """One step's measured wall time."""
        self.last_step_s = seconds
        if not prefill_tokens:
            if num_decodes:
                self.decode_s = _average(self.decode_s, seconds)
            return
        if num_decodes and seconds > self.max_step_s:
            self.over_budget_steps += 1
        if num_decodes and self.decode_s is None:
            return  # cannot split this step's time yet
        decode_part = self.decode_s if num_decodes else 0.0
        self.prefill_s = _average(self.prefill_s, max(seconds - decode_part, 0.0) / prefill_tokens)


def _average(old: float | None, new: float) -> float:
    return new if old is None else old + SMOOTHING * (new - old)
