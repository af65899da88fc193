"""The fetch-or-recompute decision: a fetch is skipped when its measured cost exceeds the measured cost of
recomputing the same tokens (LMCache's Redis connector can be slower than recompute; we check first).

Fetch cost of a tier = round trip + bytes / bandwidth, fitted online to the gets actually made (decode included).
Recompute cost = tokens x the prefill seconds per token the engine reports. Until the engine has reported, every
fetch is made.
"""

from __future__ import annotations


class TransferModel:
    """seconds(nbytes) = round_trip + nbytes / bandwidth, fitted by exponentially weighted least squares.

    The prior (two pseudo-observations from `round_trip_s` and `bandwidth_bps`) fades as real gets arrive."""

    def __init__(self, round_trip_s: float, bandwidth_bps: float, decay: float = 0.95) -> None:
        self.decay = decay
        self._w = self._x = self._y = self._xx = self._xy = 0.0
        big = 1 << 20
        self._add(0.0, round_trip_s, 1.0)
        self._add(float(big), round_trip_s + big / bandwidth_bps, 1.0)

    def _add(self, x: float, y: float, weight: float) -> None:
        self._w += weight
        self._x += weight * x
        self._y += weight * y
        self._xx += weight * x * x
        self._xy += weight * x * y

    def observe(self, nbytes: int, seconds: float) -> None:
        for name in ("_w", "_x", "_y", "_xx", "_xy"):
            setattr(self, name, getattr(self, name) * self.decay)
        self._add(float(nbytes), seconds, 1.0)

    def fit(self) -> tuple[float, float]:
        """(round trip seconds, seconds per byte), both clamped at >= 0."""
        mean_x, mean_y = self._x / self._w, self._y / self._w
        var = self._xx / self._w - mean_x * mean_x
        slope = (self._xy / self._w - mean_x * mean_y) / var if var > 1e-9 else 0.0
        slope = max(slope, 0.0)
        return max(mean_y - slope * mean_x, 0.0), slope

    def estimate(self, nbytes: int) -> float:
        round_trip, per_byte = self.fit()
        return round_trip + nbytes * per_byte


class RecomputeModel:
    """Prefill seconds per token, an exponential moving average of what the engine reports."""

    def __init__(self, alpha: float = 0.2) -> None:
        self.alpha = alpha
        self.seconds_per_token: float | None = None

    def observe(self, tokens: int, seconds: float) -> None:
        if tokens <= 0 or seconds <= 0:
            return
        rate = seconds / tokens
        prev = self.seconds_per_token
        self.seconds_per_token = rate if prev is None else prev + self.alpha * (rate - prev)

    def estimate(self, tokens: int) -> float | None:
        return None if self.seconds_per_token is None else tokens * self.seconds_per_token
