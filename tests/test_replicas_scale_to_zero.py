"""Scale to zero (`min_replicas: 0`): with no engine replica running, the first request waits for one instead of
failing, and once idle the deployment goes back to zero replicas."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
from conftest import serve_app
from moe_serve.replicas.app import APP_NAME
from moe_serve.replicas.settings import AppSettings
from ray import serve


def running_engine_replicas() -> int:
    return serve.status().applications[APP_NAME].deployments["EngineReplica"].replica_states.get("RUNNING", 0)


def test_first_request_waits_for_a_replica_and_idle_goes_back_to_zero(tiny_model_dir: Path) -> None:
    settings = AppSettings(model_dir=str(tiny_model_dir), model_name="tiny",
                           autoscaling={"min_replicas": 0, "max_replicas": 1, "initial_replicas": 0,
                                        "upscale_delay_s": 0, "downscale_delay_s": 2,
                                        "downscale_to_zero_delay_s": 4})
    with serve_app(settings) as base:
        assert running_engine_replicas() == 0
        response = httpx.post(f"{base}/v1/completions", timeout=180,
                              json={"model": "tiny", "prompt": "Wake up", "max_tokens": 4})
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == 4
        assert running_engine_replicas() == 1
        deadline = time.monotonic() + 90
        while running_engine_replicas() and time.monotonic() < deadline:
            time.sleep(1)
        assert running_engine_replicas() == 0
