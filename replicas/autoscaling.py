"""LLM-aware autoscaling policy for the engine replicas, plugged into Ray Serve's `autoscaling_config.policy`.

Plain ongoing-request counts decide badly for an LLM replica: a request's cost is the sequence it keeps in the
running batch (and its KV blocks) for its whole generation, and requests still queued at handles are load too.
The policy asks for enough replicas that every replica holds at most `target_ongoing_requests` sequences
(running + waiting, as the replicas report them) and keeps KV use under a high-water mark.

It asks for the whole need at once (load / target, not one replica per step) and reads the load as the peak of
the summed sequences over `look_back_period_s`, not their mean: a mean over a window that still holds the idle
seconds before a burst asks for too few replicas, and short dips in a steady load (a stalled client, a busy
ingress) would restart Serve's upscale delay or start a downscale. Serve wraps the policy with min/max bounds
and the upscale/downscale delays: a short upscale delay and a long downscale delay keep it from flapping.
It does not start replicas or know how long they take to start; the deployment options own that.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

from ray.serve.config import AutoscalingContext

logger = logging.getLogger("ray.serve")  # the Serve controller's log, where the policy runs
KV_HIGH_WATER = 0.85  # above this fraction of KV blocks in use, a replica starts preempting
POLICY_PATH = "moe_serve.replicas.autoscaling:llm_load_policy"
SEQUENCE_METRICS = ("running", "waiting")  # what EngineReplica.record_autoscaling_stats reports as load

Series = list[tuple[float, float]]  # (timestamp, value), oldest first


def sequences_per_replica(raw: Mapping[str, Mapping[Hashable, Sequence[Any]]]) -> dict[Hashable, Series]:
    """running + waiting per replica, from Serve's raw metric series (one timestamp per report)."""
    per_replica: dict[Hashable, dict[float, float]] = {}
    for name in SEQUENCE_METRICS:
        for replica, series in raw.get(name, {}).items():
            points = per_replica.setdefault(replica, {})
            for point in series:
                points[point.timestamp] = points.get(point.timestamp, 0.0) + point.value
    return {replica: sorted(points.items()) for replica, points in per_replica.items()}


def peak_total(series: Mapping[Hashable, Series], since: float) -> float:
    """Peak over [since, now] of the sum over replicas, each a step function holding its last report."""
    level = {r: next((v for t, v in reversed(points) if t <= since), 0.0) for r, points in series.items()}
    peak = sum(level.values())
    changes = sorted(((t, r, v) for r, points in series.items() for t, v in points if t > since), key=lambda c: c[0])
    for _, replica, value in changes:
        level[replica] = value
        peak = max(peak, sum(level.values()))
    return peak


def current_load(ctx: AutoscalingContext) -> float:
    """Sequences the deployment holds: the window peak of running + waiting at the replicas, or Serve's own count
    of ongoing requests (window mean, with those still queued at handles when the replicas are full) if higher.
    Not their sum: a request moves from a handle's queue to a replica within the window and would count twice."""
    series = sequences_per_replica(ctx.raw_metrics or {})
    if series:
        now = ctx.current_time if ctx.current_time is not None else max(p[-1][0] for p in series.values() if p)
        sequences = peak_total(series, now - ctx.config.look_back_period_s)
    else:
        metrics = ctx.aggregated_metrics or {}
        sequences = sum(sum(metrics.get(name, {}).values()) for name in SEQUENCE_METRICS)
    return max(sequences, float(ctx.total_num_requests))


def llm_load_policy(ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
    current = ctx.current_num_replicas
    if current == 0:
        # scale from zero as soon as a request waits at a handle; it waits for the replica instead of failing
        return (1 if ctx.total_num_requests > 0 else 0), {}
    load = current_load(ctx)
    desired = load / ctx.config.get_target_ongoing_requests()
    kv_used = (ctx.aggregated_metrics or {}).get("kv_used_fraction", {})
    if kv_used:
        desired = max(desired, current * max(kv_used.values()) / KV_HIGH_WATER)
    # 0 only when idle; Serve's wrapper clamps to min_replicas and holds 1 -> 0 for downscale_to_zero_delay_s
    wanted = math.ceil(desired - 1e-9)
    if wanted != ctx.policy_state.get("wanted", ctx.target_num_replicas):
        logger.info(f"llm_load_policy: wants {wanted} (running {current}, target {ctx.target_num_replicas}); "
                    f"load {load:.1f} sequences")
    return wanted, {"wanted": wanted}
