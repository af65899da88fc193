"""Autoscaling on a real local Ray Serve: replicas go 1 -> more under a bounded concurrent load, back to 1 after."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import serve_app
from moe_serve.replicas.app import APP_NAME
from moe_serve.replicas.autoscaling import POLICY_PATH
from moe_serve.replicas.settings import AppSettings, AutoscalingSettings
from ray import serve
from ray.serve.config import AutoscalingConfig


def engine_replicas() -> int:
    deployment = serve.status().applications[APP_NAME].deployments["EngineReplica"]
    return deployment.replica_states.get("RUNNING", 0)


def test_autoscaling_settings_build_a_valid_serve_config() -> None:
    config = AutoscalingConfig(**AutoscalingSettings(min_replicas=0, max_replicas=4).serve_config())
    assert config.policy.policy_function == POLICY_PATH
    with pytest.raises(ValueError, match="max_replicas"):
        AutoscalingSettings(min_replicas=3, max_replicas=2)


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
