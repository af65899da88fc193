"""The Grafana dashboard of a moe-serve deployment, built with grafana-foundation-sdk and written to the Helm chart.

`python -m moe_serve.observability.dashboard` writes helm/moe-serve/dashboards/moe-serve.json (the chart ships it as a
ConfigMap for Grafana's dashboard sidecar); a test keeps the committed file equal to a fresh build. Every query
reads Prometheus: `moe_*` series from the app's /metrics (the ingress) and `ray_serve_*` series from Ray's metrics
export port on the Ray pods (replica health and the Serve autoscaler's decisions). PromQL uses Grafana's
`$__rate_interval` and the `$layer` variable (MoE layers, for the expert-load heatmaps); nothing else.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from grafana_foundation_sdk.builders import dashboard as dash
from grafana_foundation_sdk.builders import heatmap, prometheus, stat, statetimeline, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync,
    DataSourceRef,
    ValueMap,
    ValueMappingResult,
    VariableRefresh,
    VariableSort,
)

OUTPUT = Path(__file__).resolve().parents[2] / "helm" / "moe-serve" / "dashboards" / "moe-serve.json"
UID = "moe-serve-overview"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
RATE = "$__rate_interval"
APP = 'application="moe-serve"'  # the Serve application's name in ray_serve_* series


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str


def quantiles(histogram: str, selector: str = "", by: str = "", qs: tuple[float, ...] = (0.5, 0.9, 0.99)
              ) -> list[Query]:
    """p50/p90/p99 of a Prometheus histogram (`histogram` without _bucket), optionally per label `by`."""
    group = f"le, {by}" if by else "le"
    prefix = f"{{{{{by}}}}} " if by else ""
    return [Query(f"histogram_quantile({q}, sum by ({group}) (rate({histogram}_bucket{{{selector}}}[{RATE}])))",
                  f"{prefix}p{round(q * 100)}") for q in qs]


def with_queries(panel: timeseries.Panel | stat.Panel | heatmap.Panel | statetimeline.Panel, queries: list[Query]
                 ) -> timeseries.Panel | stat.Panel | heatmap.Panel | statetimeline.Panel:
    for ref, query in zip("ABCDEFGH", queries):
        panel = panel.with_target(prometheus.Dataquery().expr(query.expr).legend_format(query.legend).ref_id(ref))
    return panel.datasource(DATASOURCE)


def series(title: str, unit: str, queries: list[Query], description: str, width: int = 8) -> timeseries.Panel:
    panel = timeseries.Panel().title(title).description(description).unit(unit).height(8).span(width)
    return with_queries(panel, queries)


def circuit_states() -> statetimeline.Panel:
    states = ValueMap({"0": ValueMappingResult(text="closed", color="green"),
                       "1": ValueMappingResult(text="half-open", color="orange"),
                       "2": ValueMappingResult(text="open", color="red")})
    panel = (statetimeline.Panel().title("Cache circuit breaker by tier").height(8).span(8).mappings([states])
             .description("Redis tiers' circuit breaker: closed (in use), half-open (probing), open (skipped: requests "
                          "recompute). From the sampled replica."))
    return with_queries(panel, [Query("max by (tier) (moe_cache_circuit_state)", "{{tier}}")])


def expert_heatmap() -> heatmap.Panel:
    panel = (heatmap.Panel().title("Expert load, layer $layer").repeat("layer").max_per_row(2).height(9).span(12)
             .description("Tokens/s routed to each expert of the layer (rows: expert ids); needs expert shards "
                          "(settings.shards > 0): the router counts them.")
             .calculate(False).unit("short"))
    return with_queries(panel, [Query(f'sum by (expert) (rate(moe_expert_tokens_total{{layer=~"$layer"}}[{RATE}]))',
                                      "{{expert}}")])


def rows() -> list[tuple[str, list[timeseries.Panel | stat.Panel | heatmap.Panel | statetimeline.Panel]]]:
    v1 = 'route=~"/v1/.*"'
    return [
        ("Requests", [
            series("Request rate by outcome", "reqps",
                   [Query(f"sum by (outcome) (rate(moe_requests_total[{RATE}]))", "{{outcome}}")],
                   "Generations finished (completed) or stopped early (aborted: client gone, replica lost), per "
                   "choice."),
            series("HTTP responses by route and status", "reqps",
                   [Query(f"sum by (route, status_code) (rate(moe_http_requests_total{{{v1}}}[{RATE}]))",
                          "{{route}} {{status_code}}")],
                   "Responses of the OpenAI routes by status code."),
            series("Error ratio", "percentunit",
                   [Query(f'(sum(rate(moe_http_requests_total{{{v1},status_code=~"5.."}}[{RATE}])) or vector(0)) / '
                          f"sum(rate(moe_http_requests_total{{{v1}}}[{RATE}]))", "5xx"),
                    Query(f'(sum(rate(moe_http_requests_total{{{v1},status_code=~"4.."}}[{RATE}])) or vector(0)) / '
                          f"sum(rate(moe_http_requests_total{{{v1}}}[{RATE}]))", "4xx")],
                   "Share of /v1 responses that are server errors (5xx) and client errors (4xx, including 429)."),
        ]),
        ("Latency", [
            series("Time to first token", "s", quantiles("moe_time_to_first_token_seconds"),
                   "From the request reaching the ingress to its first token.", width=6),
            series("Inter-token latency", "s", quantiles("moe_inter_token_latency_seconds"),
                   "Gap between output tokens as the ingress receives them.", width=6),
            series("End-to-end latency", "s", quantiles("moe_request_latency_seconds"),
                   "From the request reaching the ingress to its last token.", width=6),
            series("Queue time", "s", quantiles("moe_request_queue_time_seconds"),
                   "From a request reaching its engine replica to its first scheduled step (includes waiting for "
                   "its remote prefix lookup).", width=6),
        ]),
        ("Throughput and load", [
            series("Generated tokens/s", "short",
                   [Query(f"sum(rate(moe_generated_tokens_total[{RATE}]))", "tokens/s")],
                   "Output tokens per second over all requests."),
            series("Running and waiting sequences", "short",
                   [Query("sum(moe_running_sequences)", "running"), Query("sum(moe_queue_depth)", "waiting")],
                   "Sequences in the sampled engine replica's batch and in its queue."),
            series("Engine step time and budget", "s",
                   [Query("max(moe_engine_step_seconds)", "last step"),
                    Query("max(moe_engine_step_budget_seconds)", "budget")],
                   "The sampled replica's last step and the inter-token budget prefill chunks are sized for."),
            series("Request migrations", "ops",
                   [Query(f"sum(rate(moe_request_migrations_total[{RATE}]))", "migrations/s")],
                   "Requests resent to another engine replica after theirs died."),
        ]),
        ("KV cache", [
            series("KV pool in use", "percentunit", [Query("max(moe_kv_cache_used_fraction)", "in use")],
                   "Share of the sampled replica's KV blocks referenced by requests."),
            series("KV pool blocks by state", "short",
                   [Query("sum by (state) (moe_kv_pool_blocks)", "{{state}}")],
                   "In use, shared by several requests, and evictable (cached, unreferenced: the hot tier)."),
            series("KV fragmentation", "percentunit",
                   [Query("max(moe_kv_fragmentation_fraction)", "reserved, unused")],
                   "Share of the slots in running sequences' blocks that hold no token yet (partly filled last "
                   "blocks).", width=4),
            series("KV slots reserved, unused", "short",
                   [Query("max(moe_kv_reserved_unused_slots)", "slots")],
                   "Token slots reserved by running sequences' blocks and not yet filled.", width=4),
        ]),
        ("Prefix cache", [
            series("Cache hits by tier", "short",
                   [Query(f"sum by (tier) (rate(moe_cache_hits_total[{RATE}]))", "{{tier}}")],
                   "KV blocks served per second by the hot (pool), warm (Redis) and cold tiers (sampled replica)."),
            series("Cache hit ratio by tier", "percentunit",
                   [Query(f"sum by (tier) (rate(moe_cache_hits_total[{RATE}])) / sum by (tier) "
                          f"(rate(moe_cache_hits_total[{RATE}]) + rate(moe_cache_misses_total[{RATE}]))", "{{tier}}")],
                   "Blocks served over blocks looked up, per tier."),
            series("Redis get latency", "s",
                   quantiles("moe_cache_get_seconds", 'tier!="hot"', by="tier", qs=(0.5, 0.99)),
                   "One batched get from the warm (Redis) and cold tiers."),
            circuit_states(),
            series("Prefix lookup wait", "s", quantiles("moe_cache_lookup_wait_seconds", qs=(0.5, 0.99)),
                   "Time a request waited in the queue for its remote prefix lookup."),
            series("Cache errors and dropped writes", "ops",
                   [Query(f"sum by (tier) (rate(moe_cache_errors_total[{RATE}]))", "errors {{tier}}"),
                    Query(f"sum by (tier) (rate(moe_cache_writes_dropped_total[{RATE}]))", "dropped {{tier}}")],
                   "Errors and timeouts talking to a tier, and writes not made (queue full, circuit open)."),
        ]),
        ("Experts", [
            expert_heatmap(),
            series("Expert load imbalance", "short",
                   [Query(f"max by (layer) (rate(moe_expert_tokens_total[{RATE}])) / "
                          f"avg by (layer) (rate(moe_expert_tokens_total[{RATE}]))", "layer {{layer}}")],
                   "Busiest expert's tokens over the mean expert's, per layer (1: balanced).", width=12),
            series("Shard rows/s", "short",
                   [Query(f"sum by (shard) (rate(moe_shard_rows_total[{RATE}]))", "shard {{shard}}")],
                   "Token rows each expert shard computes per second."),
            series("Shard call latency", "s", quantiles("moe_shard_call_seconds", qs=(0.5, 0.99)),
                   "One MoE layer's call from the router to its shards and back (the expert-parallel round trip)."),
            series("Shard compute time per row", "s",
                   [Query(f"sum by (shard) (rate(moe_shard_busy_seconds_total[{RATE}])) / "
                          f"sum by (shard) (rate(moe_shard_rows_total[{RATE}]))", "shard {{shard}}")],
                   "Seconds of shard compute per token row (busy time over rows, not the call's round trip)."),
            series("Shard busy share", "percentunit",
                   [Query(f"sum by (shard) (rate(moe_shard_busy_seconds_total[{RATE}]))", "shard {{shard}}"),
                    Query(f"sum(rate(moe_shard_retries_total[{RATE}]))", "retries/s")],
                   "Share of time each shard computes, and shard calls retried after a failure."),
        ]),
        ("Replicas and autoscaling", [
            series("Engine replicas and autoscaling decisions", "short",
                   [Query("max(moe_engine_replicas)", "running"),
                    Query(f"max by (deployment) (ray_serve_autoscaling_target_replicas{{{APP}}})",
                          "target {{deployment}}"),
                    Query(f"max by (deployment) (ray_serve_autoscaling_desired_replicas{{{APP}}})",
                          "policy decision {{deployment}}")],
                   "Running engine replicas, the Serve autoscaler's target and its policy's raw decision (before "
                   "min/max and delays).", width=12),
            series("Healthy replicas by deployment", "short",
                   [Query(f"sum by (deployment) (ray_serve_deployment_replica_healthy{{{APP}}})", "{{deployment}}")],
                   "Replicas passing Serve's health check.", width=12),
        ]),
        ("Hardware", [
            series("CPU per process", "short",
                   [Query(f"sum by (deployment, replica) (rate(moe_process_cpu_seconds_total[{RATE}]))",
                          "{{deployment}} {{replica}}")],
                   "CPU cores used by each ingress and engine replica process."),
            series("GPU utilisation", "percentunit",
                   [Query("max by (replica, gpu) (moe_gpu_utilization_ratio)", "{{replica}} gpu {{gpu}}")],
                   "Engine replicas' GPUs (NVML busy share); empty on CPU."),
            series("GPU memory", "bytes",
                   [Query("max by (replica, gpu) (moe_gpu_memory_used_bytes)", "{{replica}} gpu {{gpu}}")],
                   "Memory torch holds on engine replicas' GPUs; empty on CPU."),
        ]),
    ]


def build() -> dict[str, object]:
    layer = (dash.QueryVariable("layer").label("MoE layer").datasource(DATASOURCE)
             .query("label_values(moe_expert_tokens_total, layer)").refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
             .sort(VariableSort.NATURAL_ASC).multi(True).include_all(True))
    board = (dash.Dashboard("moe-serve").uid(UID).tags(["moe-serve", "llm", "ray"]).refresh("30s")
             .time("now-1h", "now").tooltip(DashboardCursorSync.CROSSHAIR).editable()
             .description("Requests, latency, KV cache, prefix cache, expert load, autoscaling and hardware of a "
                          "moe-serve deployment (generated by moe_serve/observability/dashboard.py)")
             .with_variable(dash.DatasourceVariable("datasource").label("Prometheus").type("prometheus"))
             .with_variable(layer))
    ids = iter(range(1, 1000))
    for title, panels in rows():
        board = board.with_row(dash.Row(title).id(next(ids)))
        for panel in panels:
            board = board.with_panel(panel.id(next(ids)))
    return json.loads(json.dumps(board.build(), cls=JSONEncoder))


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else OUTPUT
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render())
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
