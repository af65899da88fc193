"""Prometheus metrics of the ingress: requests, latencies (end-to-end, TTFT, inter-token, queue time), tokens, HTTP
responses, the sampled replica's load and KV pool, and the CPU (and GPU) use of every process it has heard from.

One registry per ingress instance (not the process-global one), so redeploying in the same process never
registers a metric twice. Gauges without a `replica` label describe the replica that answered the last scrape's
`stats` call (one per scrape); the `moe_process_*` series keep every replica's last report, labelled by replica,
until it has not reported for PROCESS_TTL_S.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# Inter-token gaps are steps (tens of ms); finer buckets below 0.1 s than LATENCY_BUCKETS.
INTER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5)
PROCESS_TTL_S = 300.0  # a replica silent this long (gone, or never sampled again) leaves the moe_process_* series


@dataclass
class ProcessReport:
    """What one process last said about itself (`stats()`: cpu_seconds, gpus)."""

    deployment: str
    cpu_seconds: float
    gpus: list[dict[str, float]] = field(default_factory=list)  # per device: index, utilization, memory_used_bytes
    seen: float = field(default_factory=time.monotonic)


class ServingMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("moe_requests", "Generation requests by outcome", ["outcome"], registry=r)
        self.latency = Histogram("moe_request_latency_seconds", "End-to-end request latency at the ingress, from the "
                                 "request's start to its last token", buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("moe_time_to_first_token_seconds", "Time to first token", buckets=LATENCY_BUCKETS,
                              registry=r)
        self.inter_token = Histogram("moe_inter_token_latency_seconds", "Gap between consecutive output tokens at "
                                     "the ingress (a chunk's gap shared by its tokens)", buckets=INTER_TOKEN_BUCKETS,
                                     registry=r)
        self.queue_time = Histogram("moe_request_queue_time_seconds", "Time from a request reaching its engine "
                                    "replica to its first scheduled step", buckets=LATENCY_BUCKETS, registry=r)
        self.http = Counter("moe_http_requests", "HTTP responses of the ingress by route and status code",
                            ["route", "status_code"], registry=r)
        self.tokens = Counter("moe_generated_tokens", "Generated tokens", registry=r)
        self.migrations = Counter("moe_request_migrations",
                                  "Times a request was resent to another engine replica after its replica died",
                                  registry=r)
        self.tokens_per_s = Gauge("moe_request_tokens_per_second", "Tokens/s of the last finished request",
                                  registry=r)
        self.running = Gauge("moe_running_sequences", "Sequences in the sampled replica's batch", registry=r)
        self.waiting = Gauge("moe_queue_depth", "Requests waiting in the sampled replica", registry=r)
        self.kv_used = Gauge("moe_kv_cache_used_fraction", "KV blocks in use in the sampled replica", registry=r)
        self.replicas = Gauge("moe_engine_replicas", "Engine replicas running", registry=r)
        self.kv_blocks = Gauge("moe_kv_pool_blocks", "KV pool blocks of the sampled replica: in use, shared by several "
                               "requests, evictable (cached, unreferenced: the hot tier)", ["state"], registry=r)
        self.kv_unused_slots = Gauge("moe_kv_reserved_unused_slots", "Token slots of the sampled replica's running "
                                     "sequences' blocks that hold no token yet (internal fragmentation)", registry=r)
        self.kv_fragmentation = Gauge("moe_kv_fragmentation_fraction", "Reserved-but-unused share of the token slots "
                                      "in the sampled replica's running sequences' blocks", registry=r)
        self.step_seconds = Gauge("moe_engine_step_seconds", "The sampled replica's last step", registry=r)
        self.step_budget = Gauge("moe_engine_step_budget_seconds", "Inter-token budget steps are sized for (0: off)",
                                 registry=r)
        self.steps_over_budget = Gauge("moe_engine_steps_over_budget", "Steps with decodes that ran past the budget",
                                       registry=r)
        self.processes: dict[str, ProcessReport] = {}  # replica id -> its last report
        self._lock = threading.Lock()
        r.register(_ReportedCollector(self))

    def finish(self, seconds: float, tokens: int, completed: bool) -> None:
        self.requests.labels(outcome="completed" if completed else "aborted").inc()
        self.latency.observe(seconds)
        self.tokens.inc(tokens)
        if seconds > 0:
            self.tokens_per_s.set(tokens / seconds)

    def observe_chunk(self, gap_s: float, tokens: int) -> None:
        """A streamed chunk of `tokens` tokens arrived `gap_s` after the previous one: each token counts as one
        inter-token gap of gap_s / tokens (a replica batches the tokens of a stream interval into one chunk, and a
        non-streamed request's tokens after the first come in one chunk, so this is their mean time per token)."""
        for _ in range(tokens):
            self.inter_token.observe(gap_s / tokens)

    def observe_replica(self, stats: dict[str, Any], replicas: int) -> None:
        self.running.set(stats["running"])
        self.waiting.set(stats["waiting"])
        self.kv_used.set(stats["kv_used_fraction"])
        for state in ("in_use", "shared", "evictable"):
            self.kv_blocks.labels(state=state).set(stats[f"kv_blocks_{state}"])
        self.kv_unused_slots.set(stats["kv_reserved_unused_slots"])
        self.kv_fragmentation.set(stats["kv_fragmentation_fraction"])
        self.step_seconds.set(stats["step_seconds"])
        self.step_budget.set(stats["step_budget_seconds"])
        self.steps_over_budget.set(stats["steps_over_budget"])
        self.replicas.set(replicas)
        self.observe_process(stats["replica"], stats["deployment"], stats["cpu_seconds"], stats.get("gpus", []))

    def observe_process(self, replica: str, deployment: str, cpu_seconds: float,
                        gpus: list[dict[str, float]] | None = None) -> None:
        with self._lock:
            self.processes[replica] = ProcessReport(deployment, cpu_seconds, list(gpus or []))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _ReportedCollector(Collector):
    """Counters other processes keep, as last reported: CPU seconds and GPU use of every process heard from within
    PROCESS_TTL_S. (The expert shards' busy seconds come with the router's counters.)"""

    def __init__(self, metrics: ServingMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        labels = ["deployment", "replica"]
        cpu = CounterMetricFamily("moe_process_cpu_seconds", "CPU seconds (user + system) of each ingress and engine "
                                  "replica process", labels=labels)
        gpu_util = GaugeMetricFamily("moe_gpu_utilization_ratio", "Busy share of the last sample period of each GPU "
                                     "an engine replica uses (NVML)", labels=[*labels, "gpu"])
        gpu_memory = GaugeMetricFamily("moe_gpu_memory_used_bytes", "Device memory torch holds on each GPU an engine "
                                       "replica uses", labels=[*labels, "gpu"])
        now = time.monotonic()
        with self.metrics._lock:
            for replica, report in list(self.metrics.processes.items()):
                if now - report.seen > PROCESS_TTL_S:
                    del self.metrics.processes[replica]
                    continue
                cpu.add_metric([report.deployment, replica], report.cpu_seconds)
                for gpu in report.gpus:
                    device = [report.deployment, replica, str(int(gpu["index"]))]
                    if gpu.get("utilization") is not None:
                        gpu_util.add_metric(device, gpu["utilization"])
                    gpu_memory.add_metric(device, gpu["memory_used_bytes"])
        yield from (cpu, gpu_util, gpu_memory)
