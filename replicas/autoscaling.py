"""LLM-aware autoscaling policy for the engine replicas, plugged into Ray Serve's `autoscaling_config.policy`.

Plain ongoing-request counts decide badly for an LLM replica: a request's cost is the sequence it keeps in the
running batch (and its KV blocks) for its whole generation, and requests still queued at handles are load too.
The policy asks for enough replicas that every replica holds at most `target_ongoing_requests` sequences
(running + waiting, as the replicas report them) and keeps KV use under a high-water mark. Serve wraps the
policy with min/max bounds and the upscale/downscale delays, which is what keeps it from flapping.
"""

from __future__ import annotations

import math
from typing import Any

from ray.serve.config import AutoscalingContext

KV_HIGH_WATER = 0.85  # above this fraction of KV blocks in use, a replica starts preempting
POLICY_PATH = "moe_serve.replicas.autoscaling:llm_load_policy"


def llm_load_policy(ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
    current = ctx.current_num_replicas
    if current == 0:
        # scale from zero as soon as a request waits at a handle; it waits for the replica instead of failing
        return (1 if ctx.total_num_requests > 0 else 0), {}
    target = ctx.config.get_target_ongoing_requests()
    metrics = ctx.aggregated_metrics or {}
    sequences = sum(metrics.get("running", {}).values()) + sum(metrics.get("waiting", {}).values())
    load = max(sequences, float(ctx.total_num_requests))
    desired = load / target
    kv_used = metrics.get("kv_used_fraction", {})
    if kv_used:
        desired = max(desired, current * max(kv_used.values()) / KV_HIGH_WATER)
    return max(1, math.ceil(desired - 1e-9)), {}
