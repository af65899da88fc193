"""Prometheus metrics of the ingress: requests, latency, TTFT, tokens, and the replicas' load when scraped.

One registry per ingress instance (not the process-global one), so redeploying in the same process never
registers a metric twice.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class ServingMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("moe_requests", "Generation requests by outcome", ["outcome"], registry=r)
        self.latency = Histogram("moe_request_latency_seconds", "Request latency", buckets=LATENCY_BUCKETS,
                                 registry=r)
        self.ttft = Histogram("moe_time_to_first_token_seconds", "Time to first token", buckets=LATENCY_BUCKETS,
                              registry=r)
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
        self.step_seconds = Gauge("moe_engine_step_seconds", "The sampled replica's last step", registry=r)
        self.step_budget = Gauge("moe_engine_step_budget_seconds", "Inter-token budget steps are sized for (0: off)",
                                 registry=r)
        self.steps_over_budget = Gauge("moe_engine_steps_over_budget", "Steps with decodes that ran past the budget",
                                       registry=r)

    def finish(self, seconds: float, tokens: int, completed: bool) -> None:
        self.requests.labels(outcome="completed" if completed else "aborted").inc()
        self.latency.observe(seconds)
        self.tokens.inc(tokens)
        if seconds > 0:
            self.tokens_per_s.set(tokens / seconds)

    def observe_replica(self, stats: dict[str, float], replicas: int) -> None:
        self.running.set(stats["running"])
        self.waiting.set(stats["waiting"])
        self.kv_used.set(stats["kv_used_fraction"])
        for state in ("in_use", "shared", "evictable"):
            self.kv_blocks.labels(state=state).set(stats[f"kv_blocks_{state}"])
        self.step_seconds.set(stats["step_seconds"])
        self.step_budget.set(stats["step_budget_seconds"])
        self.steps_over_budget.set(stats["steps_over_budget"])
        self.replicas.set(replicas)

    def render(self) -> bytes:
        return generate_latest(self.registry)
