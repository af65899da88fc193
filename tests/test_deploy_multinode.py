"""A real two-node Ray cluster on this machine, deployed the way users deploy: `ray start --head` and `ray start
--address` in separate processes (each declaring two fake GPUs), `serve deploy` of a variant of
ray_configs/serve.yaml with two expert shards spread over both nodes, completions over HTTP. Then the worker node
is stopped under load: its shard is placed again on the head node and requests go on; none fails outside the
recovery window. Everything started is stopped at the end."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from conftest import free_port
from moe_serve.replicas.engine import LLMEngine
from moe_serve.replicas.sampling import SamplingParams

from moe_serve.model.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PROMPT = "Two nodes share the experts of"
MAX_TOKENS = 16
RECOVERY_WINDOW_S = 90.0  # node death noticed, shard placed again and restarted, calls retried


@dataclass
class RayNode:
    """One `ray start --block` process: SIGTERM drains the node and stops every process it started."""

    process: subprocess.Popen[bytes]

    def stop(self, timeout_s: float = 60.0) -> None:
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)


@dataclass
class TwoNodeCluster:
    temp_dir: Path
    gcs_port: int
    dashboard_port: int
    env: dict[str, str]
    head: RayNode | None = None
    worker: RayNode | None = None
    nodes: list[RayNode] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    def start_node(self, *args: str) -> RayNode:
        log = open(self.temp_dir / f"node{len(self.nodes)}.log", "wb")  # noqa: SIM115 - the node process owns it
        process = subprocess.Popen([str(BIN / "ray"), "start", *args, "--block"], stdout=log, stderr=subprocess.STDOUT,
                                   env=self.env, start_new_session=True)
        node = RayNode(process)
        self.nodes.append(node)
        return node

    def python(self, code: str, timeout_s: float = 60.0) -> Any:
        """Run `code` as a driver of this cluster in its own process; it prints one JSON value."""
        script = f"import json, ray\nray.init(address={self.address!r}, log_to_driver=False)\n{code}"
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=self.env,
                                timeout=timeout_s)
        assert result.returncode == 0, result.stderr[-2000:]
        return json.loads(result.stdout.strip().splitlines()[-1])

    def alive_nodes(self) -> list[dict[str, Any]]:
        return self.python("print(json.dumps([{'id': n['NodeID'], 'gpus': n['Resources'].get('GPU', 0)} "
                           "for n in ray.nodes() if n['Alive']]))")

    def nodes_when(self, count: int) -> list[dict[str, Any]] | None:
        """The alive nodes once there are `count` of them, else None."""
        nodes = self.alive_nodes()
        return nodes if len(nodes) == count else None

    def cli(self, *args: str, timeout_s: float = 120.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(args), capture_output=True, text=True, env=self.env, timeout=timeout_s)


def wait_until(predicate: Any, timeout_s: float, what: str, pause_s: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            value = predicate()
            if value:
                return value
        except Exception:  # noqa: BLE001 - the cluster is still coming up
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(pause_s)


@pytest.fixture
def cluster() -> Iterator[TwoNodeCluster]:
    temp_dir = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_gcs_rpc_server_connect_timeout_s": "20",
           "TOKENIZERS_PARALLELISM": "false"}
    nodes = TwoNodeCluster(temp_dir, free_port(), free_port(), env)
    try:
        yield nodes
    finally:
        for node in reversed(nodes.nodes):
            node.stop()
        for log in sorted(temp_dir.glob("node*.log")):  # shown by pytest when the test failed
            print(f"--- {log.name}", *log.read_text(errors="replace").splitlines()[-15:], sep="\n")
        shutil.rmtree(temp_dir, ignore_errors=True)
    for node in nodes.nodes:
        assert node.process.poll() is not None


def serve_config(model_dir: Path, http_port: int) -> dict[str, Any]:
    """ray_configs/serve.yaml with this machine's model, port and sizes (what a user edits)."""
    config = yaml.safe_load((REPO / "ray_configs" / "serve.yaml").read_text())
    config["proxy_location"] = "HeadOnly"
    config["http_options"] = {"host": "127.0.0.1", "port": http_port, "request_timeout_s": 300}
    args = config["applications"][0]["args"]
    args.update(model_dir=str(model_dir), model_name="tiny", shards=2, placement="SPREAD",
                kv_cache_bytes=32 << 20, max_num_seqs=8)
    args["autoscaling"].update(min_replicas=1, max_replicas=1, initial_replicas=1)
    return config


@dataclass
class Outcome:
    start: float
    end: float
    ok: bool
    detail: str


def load_until(base: str, stop: threading.Event, outcomes: list[Outcome]) -> None:
    while not stop.is_set():
        start = time.monotonic()
        try:
            response = httpx.post(f"{base}/v1/completions", timeout=300,
                                  json={"model": "tiny", "prompt": PROMPT, "max_tokens": MAX_TOKENS,
                                        "temperature": 0, "ignore_eos": True})
            ok, detail = response.status_code == 200, response.text[:300]
        except httpx.HTTPError as exc:
            ok, detail = False, repr(exc)
        outcomes.append(Outcome(start, time.monotonic(), ok, detail))


def test_serve_deploy_on_two_nodes_survives_losing_the_worker(cluster: TwoNodeCluster, tiny_model_dir: Path) -> None:
    common = ["--node-ip-address", "127.0.0.1", "--num-gpus", "2", "--disable-usage-stats"]
    cluster.head = cluster.start_node(
        "--head", "--port", str(cluster.gcs_port), "--num-cpus", "4", "--temp-dir", str(cluster.temp_dir),
        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(cluster.dashboard_port), *common)
    wait_until(lambda: cluster.nodes_when(1), 120, "the head node")
    cluster.worker = cluster.start_node("--address", cluster.address, "--num-cpus", "2",
                                        "--temp-dir", str(cluster.temp_dir), *common)
    nodes = wait_until(lambda: cluster.nodes_when(2), 240, "the worker node")
    assert all(n["gpus"] == 2 for n in nodes)

    http_port = free_port()
    config_path = cluster.temp_dir / "serve.yaml"
    config_path.write_text(yaml.safe_dump(serve_config(tiny_model_dir, http_port)))
    dashboard = f"http://127.0.0.1:{cluster.dashboard_port}"
    deployed = wait_until(lambda: cluster.cli(str(BIN / "serve"), "deploy", "-a", dashboard, str(config_path)
                                              ).returncode == 0, 120, "serve deploy to be accepted", pause_s=3)
    assert deployed
    base = f"http://127.0.0.1:{http_port}"
    wait_until(lambda: httpx.get(f"{base}/health", timeout=5).status_code == 200, 300, "the application")

    def status() -> dict[str, Any]:
        result = cluster.cli(str(BIN / "moe-serve"), "status", "--address", cluster.address)
        assert result.returncode == 0, result.stderr[-2000:]
        return json.loads(result.stdout)

    shard_nodes = {shard["node"] for shard in status()["experts"]["shards"]}
    assert shard_nodes == {n["id"] for n in nodes}, "SPREAD should put one shard on each node"
    engine = LLMEngine.from_pretrained(tiny_model_dir)
    [reference] = engine.generate([Tokenizer.from_dir(tiny_model_dir).encode(PROMPT)],
                                  SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True))

    stop, outcomes = threading.Event(), []
    loader = threading.Thread(target=load_until, args=(base, stop, outcomes))
    loader.start()
    try:
        wait_until(lambda: sum(o.ok for o in outcomes) >= 3, 120, "requests before the node loss", pause_s=0.2)
        killed_at = time.monotonic()
        cluster.worker.stop()
        survivors = wait_until(lambda: cluster.nodes_when(1), 120, "the node loss")
        head_id = survivors[0]["id"]
        wait_until(lambda: {s["node"] for s in status()["experts"]["shards"]} == {head_id},
                   RECOVERY_WINDOW_S, "both shards on the head node", pause_s=2)
        recovered_at = time.monotonic()
        wait_until(lambda: sum(o.ok and o.start > recovered_at for o in outcomes) >= 3, 120,
                   "requests after the recovery", pause_s=0.2)
    finally:
        stop.set()
        loader.join(timeout=300)
    failures = [o for o in outcomes if not o.ok]
    outside = [o for o in failures if o.end < killed_at or o.start > killed_at + RECOVERY_WINDOW_S]
    assert not outside, outside
    longest = max(o.end - o.start for o in outcomes)
    print(f"\nrequests: {len(outcomes)}, failed during recovery: {len(failures)}, both shards on the head "
          f"{recovered_at - killed_at:.1f} s after the stop, longest request {longest:.1f} s")
    response = httpx.post(f"{base}/v1/completions", timeout=120,
                          json={"model": "tiny", "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0,
                                "ignore_eos": True})
    assert response.json()["choices"][0]["text"] == reference.text

    assert cluster.cli(str(BIN / "serve"), "shutdown", "-a", dashboard, "-y").returncode == 0
