"""Observability end to end: a real Prometheus scrapes the running app's /metrics and Ray's metrics port, and every
query of the Grafana dashboard and every alert rule evaluates without error; after a little traffic the panels that
must have data have it. Also: the committed dashboard is the generator's output, `promtool check rules` passes, and
the engine reports queue time and KV fragmentation as documented.

Panels allowed to stay empty here, and why: GPU utilisation and GPU memory (no GPU on the test machine).
"""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import free_port, serve_app

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "helm" / "moe-serve" / "dashboards" / "moe-serve.json"
ALERTS = REPO / "helm" / "moe-serve" / "prometheus" / "alerts.yaml"
MODEL = "tiny"
SCRAPE_INTERVAL = "1s"
# Grafana's variables as a dashboard viewer would have them: the window of rates, every MoE layer.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$layer": ".*"}
MAY_BE_EMPTY = {"GPU utilisation", "GPU memory"}  # no GPU here


@dataclass
class Prometheus:
    url: str
    at: float | None = None  # evaluation time of queries; None: now

    def query(self, expr: str) -> dict[str, Any]:
        """The /api/v1/query answer for `expr` at `at`; fails the test on any error."""
        params = {"query": expr} if self.at is None else {"query": expr, "time": str(self.at)}
        response = httpx.get(f"{self.url}/api/v1/query", params=params, timeout=10)
        body = response.json()
        assert response.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
        return body["data"]

    def settle(self, timeout_s: float = 60.0) -> None:
        """Pin `at` to a moment after several successful scrapes of every job: a scrape that fails (one slower than
        the interval on a loaded machine) marks its target's series stale, and an instant query would see none."""
        self.at = None
        deadline = time.monotonic() + timeout_s
        while True:
            result = self.query("min_over_time(up[4s])")["result"]
            if len(result) == 2 and all(float(r["value"][1]) == 1 for r in result):
                self.at = result[0]["value"][0]
                return
            assert time.monotonic() < deadline, f"scrapes keep failing: {result}"
            time.sleep(0.5)

    def has_data(self, expr: str) -> bool:
        """A non-empty result with at least one number (histogram quantiles of no observations are NaN)."""
        data = self.query(expr)
        if data["resultType"] == "scalar":
            return not math.isnan(float(data["result"][1]))
        return any(not math.isnan(float(item["value"][1])) for item in data["result"])

    def wait_for(self, expr: str, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.has_data(expr):
            assert time.monotonic() < deadline, f"Prometheus never had data for {expr}"
            time.sleep(0.5)


def panels() -> list[dict[str, Any]]:
    return [p for p in json.loads(DASHBOARD.read_text())["panels"] if p["type"] != "row"]


def promql(expr: str) -> str:
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    return expr


def alert_exprs() -> dict[str, str]:
    return {rule["alert"]: rule["expr"] for group in yaml.safe_load(ALERTS.read_text())["groups"]
            for rule in group["rules"]}


@pytest.fixture(scope="module")
def app_and_ray(tiny_model_dir: Path, redis_server: Any) -> Iterator[tuple[str, int]]:
    """The app (one engine replica, experts on one shard so the router counts expert load, Redis as its warm tier)
    on a local Ray whose metrics export port is known. Ray's own report interval (10 s) is kept: its export drops a
    gauge not refreshed within two intervals, and a 1 s interval lost Serve's health gauge on a loaded machine."""
    import ray
    from moe_serve.replicas.settings import AppSettings

    ray_port = free_port()
    try:
        ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False,
                 _metrics_export_port=ray_port)
        settings = AppSettings(model_dir=str(tiny_model_dir), model_name=MODEL, shards=1,
                               cache={"redis_url": redis_server.url(3)},
                               autoscaling={"min_replicas": 1, "max_replicas": 1})
        with serve_app(settings) as url:  # joins the Ray started here; shuts Serve and Ray down after
            yield url, ray_port
    finally:
        if ray.is_initialized():
            ray.shutdown()


@pytest.fixture(scope="module")
def prometheus(app_and_ray: tuple[str, int], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    """A private prometheus scraping the app and Ray every second."""
    base, ray_port = app_and_ray
    workdir = tmp_path_factory.mktemp("prometheus")
    config = {
        "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL},
        "scrape_configs": [
            {"job_name": "moe-serve", "static_configs": [{"targets": [base.removeprefix("http://")]}]},
            {"job_name": "ray", "static_configs": [{"targets": [f"127.0.0.1:{ray_port}"]}]},
        ],
    }
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    proc = subprocess.Popen(
        ["prometheus", f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=(workdir / "prometheus.log").open("w"),
    )
    server = Prometheus(f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{server.url}/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, (workdir / "prometheus.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "prometheus did not become ready"
            time.sleep(0.2)
        server.wait_for('up{job="moe-serve"} == 1')  # the idle state is scraped before any traffic
        yield server
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def send_traffic(base: str, prometheus: Prometheus) -> None:
    """Completions, a stream, a chat, a repeated long prompt (prefix-cache hits) and a client error. The first
    request is scraped before the others are sent: a series born with a request rises only across scrapes."""
    long_prompt = "Experts share one router and every replica shares the warm tier in Redis. " * 6
    with httpx.Client(base_url=base, timeout=120) as client:
        for prompt in ("Hello", "The router sends each token to", long_prompt, long_prompt):
            response = client.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 8})
            assert response.status_code == 200, response.text
            if prompt == "Hello":
                prometheus.wait_for('moe_http_requests_total{route="/v1/completions"}')
        with client.stream("POST", "/v1/completions", json={"model": MODEL, "prompt": "Stream", "max_tokens": 24,
                                                             "stream": True, "ignore_eos": True}) as stream:
            assert stream.status_code == 200 and "[DONE]" in "".join(stream.iter_text())
        chat = client.post("/v1/chat/completions", json={"model": MODEL, "max_tokens": 8,
                                                         "messages": [{"role": "user", "content": "Hi"}]})
        assert chat.status_code == 200, chat.text
        assert client.post("/v1/completions", json={"model": "nope", "prompt": "x"}).status_code == 404


def test_dashboard_and_alert_queries_evaluate_on_a_real_prometheus(app_and_ray: tuple[str, int],
                                                                    prometheus: Prometheus) -> None:
    base, _ = app_and_ray
    send_traffic(base, prometheus)
    # scraped after the traffic: the last request's counters, the shards' busy time, Ray's Serve gauges
    prometheus.wait_for('sum(moe_http_requests_total{status_code="404"}) >= 1')
    prometheus.wait_for("sum(moe_requests_total) >= 6")
    prometheus.wait_for("sum(moe_shard_busy_seconds_total) > 0")
    prometheus.wait_for('ray_serve_autoscaling_target_replicas{application="moe-serve"}')
    prometheus.wait_for('ray_serve_deployment_replica_healthy{application="moe-serve"}')
    time.sleep(2)  # two more scrapes: every rate has a sample after the last request
    prometheus.settle()

    empty = []
    for panel in panels():
        exprs = [promql(t["expr"]) for t in panel["targets"]]
        if not any([prometheus.has_data(e) for e in exprs]):  # list: every query is evaluated (none may error)
            empty.append(panel["title"])
    assert set(empty) <= MAY_BE_EMPTY, f"panels without data after traffic: {sorted(set(empty) - MAY_BE_EMPTY)}"
    for expr in alert_exprs().values():
        prometheus.query(expr)  # evaluates without error (firing or not)

    # The numbers behind the panels are the traffic's: 6 generations, one streamed in chunks, 1 client error.
    assert prometheus.has_data("sum(moe_request_queue_time_seconds_count) >= 6")
    assert prometheus.has_data("sum(moe_inter_token_latency_seconds_count) >= 23")  # the stream's 24 tokens - 1
    assert prometheus.has_data('sum(moe_cache_hits_total{tier="hot"}) > 0')  # the repeated prompt's blocks
    assert prometheus.has_data("sum(moe_expert_tokens_total) > 0")
    deployments = {s["metric"]["deployment"] for s in prometheus.query("moe_process_cpu_seconds_total")["result"]}
    assert deployments == {"Ingress", "EngineReplica"}


def test_dashboard_is_the_generators_output() -> None:
    from moe_serve.observability.dashboard import render

    assert DASHBOARD.read_text() == render(), "run `python -m moe_serve.observability.dashboard` and commit"
    titles = [p["title"] for p in panels()]
    assert len(titles) == len(set(titles)) and MAY_BE_EMPTY <= set(titles)


def test_alert_rules_pass_promtool(tmp_path: Path) -> None:
    result = subprocess.run(["promtool", "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_exprs())} rules found" in result.stdout
    broken = tmp_path / "broken.yaml"  # promtool is not vacuous: a bad expression fails
    broken.write_text(yaml.safe_dump({"groups": [{"name": "x", "rules": [{"alert": "X", "expr": "sum(rate(x[5m])"}]}]}))
    assert subprocess.run(["promtool", "check", "rules", str(broken)], capture_output=True, timeout=60).returncode != 0


def test_engine_reports_queue_time_and_kv_fragmentation(tiny_model_dir: Path) -> None:
    """One running sequence in a 4096-slot block: its unused slots are the block minus its computed tokens."""
    from moe_serve.replicas.async_engine import AsyncLLMEngine
    from moe_serve.replicas.engine import EngineConfig, LLMEngine
    from moe_serve.replicas.sampling import SamplingParams

    async def run() -> None:
        engine = AsyncLLMEngine(LLMEngine.from_pretrained(tiny_model_dir, EngineConfig(block_size=4096)))
        try:
            idle = engine.stats()
            assert (idle["kv_reserved_unused_slots"], idle["kv_fragmentation_fraction"]) == (0, 0.0)
            params = SamplingParams(max_tokens=4000, ignore_eos=True)
            chunks = engine.generate_chunks([5, 6, 7, 8, 9], params, request_id="r1", interval_s=0.0)
            assert engine.queue_seconds("r1") is None  # not sent yet
            started = time.perf_counter()
            await anext(chunks)
            first_token_s = time.perf_counter() - started
            queued = engine.queue_seconds("r1")
            assert queued is not None and 0 <= queued <= first_token_s
            stats = engine.stats()
            assert stats["running"] == 1
            assert 4096 - 4000 - 5 <= stats["kv_reserved_unused_slots"] <= 4096 - 5  # 5 prompt tokens computed
            assert stats["kv_fragmentation_fraction"] == pytest.approx(stats["kv_reserved_unused_slots"] / 4096)
            assert stats["cpu_seconds"] > 0 and stats["gpus"] == []
            await chunks.aclose()  # aborts the request
            assert engine.queue_seconds("r1") is None  # forgotten with its stream
        finally:
            engine.shutdown()

    asyncio.run(run())
