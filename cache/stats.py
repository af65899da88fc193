"""Cache metrics: hits, misses, bytes and latency per tier, fetches skipped by cost, corrupt values, Redis errors
and circuit state, as a plain dict and as Prometheus text.

Counting is an integer add under a lock (the engine thread and the cache's I/O thread both count); the
Prometheus view is built from the same numbers only when scraped, in its own CollectorRegistry.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from moe_serve.cache.codec import Corrupt

TIERS = ("hot", "warm", "cold")
# Upper bounds (seconds) of the latency histogram buckets; the last bucket is +Inf.
LATENCY_BUCKETS = (2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0)
CIRCUIT_STATES = {"closed": 0, "half_open": 1, "open": 2}


@dataclass
class TierCounters:
    hits: int = 0  # blocks (or prompts) served by this tier
    misses: int = 0  # looked up here and not served (absent, expired, corrupt)
    bytes_read: int = 0  # decoded bytes served
    bytes_written: int = 0  # encoded bytes written
    writes: int = 0  # values written
    writes_skipped_present: int = 0  # already there: the existence check saved the write
    writes_dropped: int = 0  # not written: queue full, circuit open, error or timeout
    promotions: int = 0  # values copied into this tier from a lower one
    demotions: int = 0  # values written here because a higher tier evicted them
    errors: int = 0  # Redis / file errors and timeouts
    timeouts: int = 0
    skipped_by_cost: int = 0  # blocks not fetched because recomputing them was measured to be cheaper
    skipped_by_circuit: int = 0  # calls not made because the circuit was open
    get_calls: int = 0
    get_seconds_sum: float = 0.0
    get_buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))


@dataclass
class Histogram:
    calls: int = 0
    seconds_sum: float = 0.0
    buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))

    def observe(self, seconds: float) -> None:
        self.calls += 1
        self.seconds_sum += seconds
        self.buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1


class CacheStats:
    def __init__(self, tiers: tuple[str, ...] = TIERS) -> None:
        self._lock = threading.Lock()
        self.tiers = {name: TierCounters() for name in tiers}
        self.corrupt = {kind.value: 0 for kind in Corrupt}
        self.lookups = 0
        self.lookup_timeouts = 0  # lookups whose remote part outlived the caller's wait
        self.prompt_hits = {name: 0 for name in tiers}
        self.prompt_misses = 0
        self.lookup_wait = Histogram()  # arrival to admission of requests that waited on a remote lookup
        self._circuits: dict[str, Callable[[], str]] = {}

    def add(self, tier: str, **counts: int) -> None:
        with self._lock:
            counters = self.tiers[tier]
            for name, n in counts.items():
                setattr(counters, name, getattr(counters, name) + n)

    def observe_get(self, tier: str, seconds: float) -> None:
        """Latency of one get call (a whole batched lookup counts once)."""
        with self._lock:
            counters = self.tiers[tier]
            counters.get_calls += 1
            counters.get_seconds_sum += seconds
            counters.get_buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1

    def observe_lookup_wait(self, seconds: float) -> None:
        with self._lock:
            self.lookup_wait.observe(seconds)

    def count_corrupt(self, kind: Corrupt) -> None:
        with self._lock:
            self.corrupt[kind.value] += 1

    def count(self, name: str, n: int = 1) -> None:
        """Global counters: lookups, lookup_timeouts, prompt_misses."""
        with self._lock:
            setattr(self, name, getattr(self, name) + n)

    def count_prompt_hit(self, tier: str) -> None:
        with self._lock:
            self.prompt_hits[tier] += 1

    def watch_circuit(self, tier: str, state: Callable[[], str]) -> None:
        """Report `state()` ("closed", "half_open" or "open") as the tier's circuit state."""
        self._circuits[tier] = state

    def as_dict(self) -> dict[str, Any]:
        with self._lock:
            return {
                "tiers": {name: asdict(c) for name, c in self.tiers.items()},
                "corrupt": dict(self.corrupt),
                "corrupt_total": sum(self.corrupt.values()),
                "fetch_skipped_by_cost": sum(c.skipped_by_cost for c in self.tiers.values()),
                "redis_errors": sum(c.errors for c in self.tiers.values()),
                "lookups": self.lookups,
                "lookup_timeouts": self.lookup_timeouts,
                "lookup_wait": asdict(self.lookup_wait),
                "prompt_hits": dict(self.prompt_hits),
                "prompt_misses": self.prompt_misses,
                "circuit": {name: state() for name, state in self._circuits.items()},
            }

    def prometheus_text(self, prefix: str = "moe_cache") -> bytes:
        """`prefix` starts every metric name: one process can then show two caches' counters (KV and prompt)."""
        registry = CollectorRegistry()
        registry.register(_StatsCollector(self, prefix))
        return generate_latest(registry)


_TIER_COUNTERS = {
    "hits": "Blocks served by the tier",
    "misses": "Blocks looked up in the tier and not served",
    "bytes_read": "Decoded bytes served by the tier",
    "bytes_written": "Encoded bytes written to the tier",
    "writes": "Values written to the tier",
    "writes_skipped_present": "Writes skipped because the value was already present",
    "writes_dropped": "Writes dropped (queue full, circuit open, error, timeout)",
    "promotions": "Values copied into the tier from a lower tier",
    "demotions": "Values written to the tier after a higher tier evicted them",
    "errors": "Errors and timeouts talking to the tier",
    "skipped_by_cost": "Blocks not fetched because recomputing was cheaper",
    "skipped_by_circuit": "Calls not made because the circuit was open",
}


class _StatsCollector(Collector):
    def __init__(self, stats: CacheStats, prefix: str) -> None:
        self.stats = stats
        self.prefix = prefix

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily]:
        snap = self.stats.as_dict()
        for name, doc in _TIER_COUNTERS.items():
            family = CounterMetricFamily(f"{self.prefix}_{name}", doc, labels=["tier"])
            for tier, counters in snap["tiers"].items():
                family.add_metric([tier], float(counters[name]))
            yield family
        latency = HistogramMetricFamily(f"{self.prefix}_get_seconds", "Latency of one get (a batched lookup) per tier",
                                        labels=["tier"])
        for tier, counters in snap["tiers"].items():
            latency.add_metric([tier], _cumulative(counters["get_buckets"]), counters["get_seconds_sum"])
        yield latency
        wait = HistogramMetricFamily(f"{self.prefix}_lookup_wait_seconds",
                                     "Time a request waited in the queue for its remote prefix lookup")
        wait.add_metric([], _cumulative(snap["lookup_wait"]["buckets"]), snap["lookup_wait"]["seconds_sum"])
        yield wait
        corrupt = CounterMetricFamily(f"{self.prefix}_corrupt", "Values rejected by the codec", labels=["kind"])
        for kind, n in snap["corrupt"].items():
            corrupt.add_metric([kind], float(n))
        yield corrupt
        prompt = CounterMetricFamily(f"{self.prefix}_prompt_hits", "Prompt-cache hits", labels=["tier"])
        for tier, n in snap["prompt_hits"].items():
            prompt.add_metric([tier], float(n))
        yield prompt
        yield CounterMetricFamily(f"{self.prefix}_prompt_misses", "Prompts tokenized", value=snap["prompt_misses"])
        yield CounterMetricFamily(f"{self.prefix}_lookups", "Prefix lookups", value=snap["lookups"])
        yield CounterMetricFamily(f"{self.prefix}_lookup_timeouts", "Lookups cut short by the caller's timeout",
                                  value=snap["lookup_timeouts"])
        circuit = GaugeMetricFamily(f"{self.prefix}_circuit_state", "Circuit breaker: 0 closed, 1 half-open, 2 open",
                                    labels=["tier"])
        for tier, state in snap["circuit"].items():
            circuit.add_metric([tier], float(CIRCUIT_STATES[state]))
        yield circuit


def _cumulative(counts: list[int]) -> list[tuple[str, float]]:
    """Per-bucket counts as Prometheus' cumulative (upper bound, count) pairs."""
    total, buckets = 0, []
    for bound, n in zip((*LATENCY_BUCKETS, float("inf")), counts):
        total += n
        buckets.append((str(bound) if bound != float("inf") else "+Inf", float(total)))
    return buckets
