"""The autoscaling policy on made-up load reports, and on a real local Ray Serve: replicas go 1 -> more under a
bounded concurrent load, back to 1 after."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import serve_app
from moe_serve.replicas.app import APP_NAME
from moe_serve.replicas.autoscaling import POLICY_PATH, llm_load_policy, peak_total
from moe_serve.replicas.settings import AppSettings, AutoscalingSettings
from ray import serve
from ray.serve._private.common import DeploymentID, ReplicaID, TimeStampedValue
from ray.serve.config import AutoscalingConfig, AutoscalingContext

NOW = 1000.0
DEPLOYMENT = DeploymentID(name="EngineReplica", app_name=APP_NAME)


def make_ctx(reports: dict[str, list[tuple[float, float]]], target: int | None = None, handle_requests: float = 0.0,
             queued: float = 0.0, kv_used: float = 0.1, **config: float) -> AutoscalingContext:
    """One policy tick at NOW: `reports` maps a replica to its (seconds before NOW, running sequences) reports;
    `handle_requests` is Serve's ongoing count (queued at handles included), `queued` the part still queued."""
    replicas = {name: ReplicaID(unique_id=name, deployment_id=DEPLOYMENT) for name in reports}
    raw = {"running": {replicas[n]: [TimeStampedValue(NOW - ago, v) for ago, v in points]
                       for n, points in reports.items()},
           "waiting": {replicas[n]: [TimeStampedValue(NOW - ago, 0.0) for ago, _ in points]
                       for n, points in reports.items()}}
    settings = AutoscalingSettings(**({"max_replicas": 8, "target_ongoing_requests": 8, "look_back_period_s": 2,
                                       "metrics_interval_s": 0.5} | config))
    return AutoscalingContext(
        deployment_id=DEPLOYMENT, deployment_name=DEPLOYMENT.name, app_name=APP_NAME,
        current_num_replicas=len(reports), target_num_replicas=target or len(reports),
        running_replicas=list(replicas.values()), total_num_requests=handle_requests, total_queued_requests=queued,
        aggregated_metrics={"kv_used_fraction": {r: kv_used for r in replicas.values()}}, raw_metrics=raw,
        capacity_adjusted_min_replicas=1, capacity_adjusted_max_replicas=8, policy_state={},
        last_scale_up_time=None, last_scale_down_time=None, current_time=NOW,
        config=AutoscalingConfig(**settings.serve_config()),
    )


def engine_replicas() -> int:
    deployment = serve.status().applications[APP_NAME].deployments["EngineReplica"]
    return deployment.replica_states.get("RUNNING", 0)


def test_autoscaling_settings_build_a_valid_serve_config() -> None:
    config = AutoscalingConfig(**AutoscalingSettings(min_replicas=0, max_replicas=4).serve_config())
    assert config.policy.policy_function == POLICY_PATH
    with pytest.raises(ValueError, match="max_replicas"):
        AutoscalingSettings(min_replicas=3, max_replicas=2)


def test_peak_total_sums_step_functions_and_holds_the_level_before_the_window() -> None:
    series = {"a": [(0.0, 5.0), (2.0, 1.0)], "b": [(1.0, 4.0), (3.0, 0.0)]}
    assert peak_total(series, since=0.5) == 9.0  # a holds 5 from before the window, b adds 4 at t=1
    assert peak_total(series, since=2.5) == 5.0  # a 1 + b 4 held from before the window, then b drops to 0
    assert peak_total(series, since=3.5) == 1.0


def test_policy_asks_for_the_whole_need_at_once() -> None:
    wanted, state = llm_load_policy(make_ctx({"r1": [(0.4, 24.0)]}))
    assert wanted == 3 and state == {"wanted": 3}  # 24 sequences / 8 per replica, not one replica per step


def test_policy_reads_the_window_peak_so_a_dip_neither_undoes_an_upscale_nor_starts_a_downscale() -> None:
    dip = {"r1": [(1.8, 20.0), (1.0, 4.0), (0.2, 5.0)], "r2": [(1.6, 10.0), (0.6, 3.0)]}
    assert llm_load_policy(make_ctx(dip, target=4))[0] == 4  # 20 + 10 at 1.6 s ago, inside the 2 s window
    assert llm_load_policy(make_ctx(dip, target=4, look_back_period_s=0.9))[0] == 2  # 4 + 10 after the dip


def test_policy_counts_requests_queued_at_handles_once_and_scales_down_when_idle() -> None:
    assert llm_load_policy(make_ctx({"r1": [(0.3, 16.0)]}, handle_requests=10.0, queued=2.0))[0] == 2
    assert llm_load_policy(make_ctx({"r1": [(0.3, 0.0)]}, handle_requests=17.0, queued=17.0))[0] == 3
    idle = {"r1": [(5.0, 8.0), (2.5, 0.0)], "r2": [(5.0, 8.0), (2.5, 0.0)], "r3": [(2.5, 0.0), (0.5, 0.0)]}
    assert llm_load_policy(make_ctx(idle))[0] == 1
    silent = {"r1": [(5.0, 0.0), (0.5, 0.0)]}
    # Serve raises it to min_replicas; a min of 0 allows scale to zero
    assert llm_load_policy(make_ctx(silent, kv_used=0.0))[0] == 0


@pytest.fixture(scope="module")
def base_url(tiny_model_dir: Path) -> Iterator[str]:
    autoscaling = dict(min_replicas=1, max_replicas=2, target_ongoing_requests=2, upscale_delay_s=1,
                       downscale_delay_s=6, metrics_interval_s=0.5, look_back_period_s=2)
    settings = AppSettings(model_dir=str(tiny_model_dir), model_name="tiny", autoscaling=autoscaling,
                           replica_num_cpus=0.25)
    with serve_app(settings) as url:
        yield url


def test_scale_up_under_load_and_back_down(base_url: str) -> None:
    assert engine_replicas() == 1
    stop = threading.Event()
    failures: list[str] = []

    def client() -> None:
        body = {"model": "tiny", "prompt": "Scale", "max_tokens": 64, "ignore_eos": True}
        with httpx.Client(timeout=60) as http:
            while not stop.is_set():
                response = http.post(f"{base_url}/v1/completions", json=body)
                if response.status_code != 200:
                    failures.append(response.text)

    threads = [threading.Thread(target=client) for _ in range(8)]
    for thread in threads:
        thread.start()
    peak, deadline = 1, time.monotonic() + 60
    try:
        while time.monotonic() < deadline and peak < 2:
            peak = max(peak, engine_replicas())
            time.sleep(0.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    assert peak == 2, "never scaled up under load"
    assert not failures
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and engine_replicas() != 1:
        time.sleep(0.5)
    assert engine_replicas() == 1, "never scaled back down after the load stopped"
