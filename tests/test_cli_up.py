"""`moe-serve up` as a user runs it (a child process) with expert shards and its own redis-server, read back by
`moe-serve status`; Ctrl-C stops everything it started."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import free_port

CLI = [sys.executable, "-m", "moe_serve.cli"]


def wait_for_line(process: subprocess.Popen[str], marker: str, timeout_s: float) -> list[str]:
    deadline = time.monotonic() + timeout_s
    lines: list[str] = []
    while time.monotonic() < deadline:
        line = process.stdout.readline()  # type: ignore[union-attr]
        if not line and process.poll() is not None:
            break
        lines.append(line)
        if marker in line:
            return lines
    raise AssertionError(f"`moe-serve up` never printed {marker!r}: {''.join(lines)}")


def port_open(url: str) -> bool:
    host, port = url.removeprefix("redis://").split("/")[0].split(":")
    with socket.socket() as sock:
        return sock.connect_ex((host, int(port))) == 0


@pytest.mark.parametrize("colocate", [False, True], ids=["separate", "colocated"])
def test_up_with_shards_status_and_ctrl_c(tiny_model_dir: Path, tmp_path: Path, colocate: bool) -> None:
    env = {**os.environ, "MOE_SERVE_CACHE": str(tmp_path)}
    env.pop("MOE_SERVE_REDIS_URL", None)
    port = free_port()
    up = subprocess.Popen([*CLI, "up", str(tiny_model_dir), "--port", str(port), "--shards", "2",
                           "--max-replicas", "1", "--model-name", "tiny", *(["--colocate"] if colocate else [])],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        lines = wait_for_line(up, "Ctrl-C stops it", timeout_s=300)
        output = "".join(lines)
        assert f"http://127.0.0.1:{port}/v1" in output and "experts on 2 shard actors" in output
        redis_url = next(w for w in output.split() if w.startswith("redis://"))
        assert port_open(redis_url)
        response = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                              json={"model": "tiny", "prompt": "The router", "max_tokens": 4})
        assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 4

        status = subprocess.run([*CLI, "status"], capture_output=True, text=True, env=env, timeout=120)
        assert status.returncode == 0, status.stderr
        report = json.loads(status.stdout)
        assert report["status"] == "ApplicationStatus.RUNNING" or report["status"].endswith("RUNNING")
        engines = set() if colocate else {"EngineReplica"}  # colocated: the ingress replicas hold the engines
        assert set(report["deployments"]) == {"Ingress", "ExpertShards", *engines}
        assert report["engine_replica_sample"]["healthy"]
        assert len(report["experts"]["shards"]) == 2
        assert sum(map(sum, report["experts"]["load"]["expert_tokens"])) > 0
        assert report["cache_sample"] is not None
    finally:
        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=120) == 0
    assert not (tmp_path / "up.json").exists()
    assert not port_open(redis_url)
