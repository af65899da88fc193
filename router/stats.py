"""Expert load statistics of the router: tokens per expert per layer, rows per shard, the shard calls' latency, and
the rebalancing policy.

Counting is a numpy add per layer call; the Prometheus view is built from the same arrays only when scraped
(`prometheus_text`), so metrics cost nothing on the dispatch path.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from moe_serve.cluster.placement import ExpertPlacement

# Upper bounds (s) of the shard call latency buckets: one layer's fan-out to the shards and back
CALL_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0, 5.0)


class LoadStats:
    def __init__(self, num_layers: int, num_experts: int, num_shards: int) -> None:
        self.expert_tokens = np.zeros((num_layers, num_experts), dtype=np.int64)  # since start
        self.window_tokens = np.zeros((num_layers, num_experts), dtype=np.int64)  # since the last rebalance
        self.shard_rows = np.zeros(num_shards, dtype=np.int64)
        self.capacity_fallbacks = 0
        self.shard_retries = 0
        self.auto_rebalances = 0
        self.call_buckets = np.zeros(len(CALL_BUCKETS) + 1, dtype=np.int64)  # the last: above every bound
        self.call_seconds = 0.0

    def observe_call(self, seconds: float) -> None:
        """One layer's shard round trip: from its messages going out to every shard's output back."""
        self.call_buckets[np.searchsorted(CALL_BUCKETS, seconds)] += 1
        self.call_seconds += seconds

    def count_tokens(self, layer: int, counts: Sequence[int]) -> None:
        self.expert_tokens[layer] += counts
        self.window_tokens[layer] += counts

    def count_shard_rows(self, shard: int, rows: int) -> None:
        self.shard_rows[shard] += rows

    def reset_window(self) -> None:
        self.window_tokens[:] = 0

    def shard_load(self, placement: ExpertPlacement, layer: int) -> np.ndarray:
        """Expected rows per shard in `layer` over the window, with copies sharing their expert's rows."""
        load = np.zeros(placement.num_shards)
        for expert, tokens in enumerate(self.window_tokens[layer]):
            holders = placement.holders(layer, expert)
            load[holders] += tokens / len(holders)
        return load

    def imbalance(self, placement: ExpertPlacement, layer: int) -> float:
        load = self.shard_load(placement, layer)
        return float(load.max() / load.mean()) if load.sum() else 1.0

    def hot_expert_moves(self, layer: int, placement: ExpertPlacement, copies: int) -> list[tuple[int, int]]:
        """(expert, target shard) for the `copies` hottest experts of a layer, each to the least-loaded shard
        that does not hold it yet."""
        load = self.shard_load(placement, layer)
        moves = []
        for expert in np.argsort(-self.window_tokens[layer])[:copies]:
            if not self.window_tokens[layer, expert]:
                break
            holders = placement.holders(layer, int(expert))
            candidates = [s for s in range(placement.num_shards) if s not in holders]
            if not candidates:
                continue
            target = min(candidates, key=lambda s: load[s])
            moves.append((int(expert), target))
            load[target] += self.window_tokens[layer, expert] / (len(holders) + 1)
        return moves

    def as_dict(self) -> dict[str, Any]:
        return {
            "expert_tokens": self.expert_tokens.tolist(),
            "shard_rows": self.shard_rows.tolist(),
            "capacity_fallbacks": self.capacity_fallbacks,
            "shard_retries": self.shard_retries,
            "auto_rebalances": self.auto_rebalances,
        }

    def prometheus_text(self, shard_busy_s: Sequence[float] = ()) -> bytes:
        """The counters, with `shard_busy_s` (seconds each shard has computed, as the shards report it)."""
        registry = CollectorRegistry()
        registry.register(_StatsCollector(self, shard_busy_s))
        return generate_latest(registry)


class _StatsCollector(Collector):
    def __init__(self, stats: LoadStats, shard_busy_s: Sequence[float]) -> None:
        self.stats = stats
        self.shard_busy_s = shard_busy_s

    def collect(self) -> Iterator[CounterMetricFamily]:
        tokens = CounterMetricFamily("moe_expert_tokens", "Tokens routed to each expert", labels=["layer", "expert"])
        for (layer, expert), value in np.ndenumerate(self.stats.expert_tokens):
            tokens.add_metric([str(layer), str(expert)], float(value))
        rows = CounterMetricFamily("moe_shard_rows", "Token rows computed by each expert shard", labels=["shard"])
        for shard, value in enumerate(self.stats.shard_rows):
            rows.add_metric([str(shard)], float(value))
        busy = CounterMetricFamily("moe_shard_busy_seconds", "Seconds each expert shard spent computing (resets when "
                                   "the shard restarts)", labels=["shard"])
        for shard, seconds in enumerate(self.shard_busy_s):
            busy.add_metric([str(shard)], seconds)
        yield tokens
        yield rows
        yield busy
        yield CounterMetricFamily("moe_capacity_fallbacks", "Picks moved past a full expert",
                                  value=self.stats.capacity_fallbacks)
        yield CounterMetricFamily("moe_shard_retries", "Shard calls retried after a failure",
                                  value=self.stats.shard_retries)
        cumulative = np.cumsum(self.stats.call_buckets)
        buckets = [(str(bound), float(n)) for bound, n in zip(CALL_BUCKETS, cumulative)]
        yield HistogramMetricFamily("moe_shard_call_seconds", "One layer's call to its shards, out and back",
                                    buckets=[*buckets, ("+Inf", float(cumulative[-1]))],
                                    sum_value=self.stats.call_seconds)
