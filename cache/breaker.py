"""Circuit breaker for one remote tier: after `failures` consecutive errors or timeouts it opens and calls are not
made (misses and dropped writes, at once); after `cooldown_s` one probe call is let through (half-open): success
closes it, failure opens it for another cool-down. So a dead or stalled Redis costs at most `failures` timeouts,
and caching resumes by itself when Redis returns.

Used from the cache's I/O event loop only (one thread); the state is read by metrics from any thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import Enum


class CircuitState(str, Enum):
    CLOSED = "closed"
    HALF_OPEN = "half_open"
    OPEN = "open"


class CircuitBreaker:
    def __init__(self, failures: int = 3, cooldown_s: float = 2.0, clock: Callable[[], float] = time.monotonic) -> None:
        if failures < 1 or cooldown_s < 0:
            raise ValueError("CircuitBreaker needs failures >= 1 and cooldown_s >= 0")
        self.failures = failures
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._state = CircuitState.CLOSED
        self._consecutive = 0
        self._opened_at = 0.0
        self.times_opened = 0

    @property
    def state(self) -> CircuitState:
        return self._state

    def allow(self) -> bool:
        """May a call be made now? While half-open only the single probe in flight is allowed."""
        if self._state is CircuitState.CLOSED:
            return True
        if self._state is CircuitState.OPEN and self._clock() - self._opened_at >= self.cooldown_s:
            self._state = CircuitState.HALF_OPEN
            return True  # this caller is the probe
        return False

    def record_success(self) -> None:
        self._consecutive = 0
        self._state = CircuitState.CLOSED

    def record_failure(self) -> None:
        self._consecutive += 1
        if self._state is CircuitState.HALF_OPEN or self._consecutive >= self.failures:
            if self._state is not CircuitState.OPEN:
                self.times_opened += 1
            self._state = CircuitState.OPEN
            self._opened_at = self._clock()
