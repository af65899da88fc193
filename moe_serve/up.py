"""`moe-serve up` and `moe-serve status`: the one-command local cluster and a look at a running one.

`up` with no arguments is the embedded default: a local Ray (its GCS on a random port, never Redis's 6379), the
tiny model generated on first run into a cache directory, a child redis-server on a free port for the warm
cache tier, and the Serve application on 127.0.0.1. It blocks until
Ctrl-C or SIGTERM and then stops everything it started.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

DEFAULT_MODEL_NAME = "tiny-mixtral"
UP_STATE_FILE = "up.json"  # where `up` records its Ray address and URL for `status`


def cache_dir() -> Path:
    return Path(os.environ.get("MOE_SERVE_CACHE", Path.home() / ".cache" / "moe-serve"))


def ensure_default_model() -> Path:
    """The embedded default model, made once with `make_tiny_model` and reused afterwards."""
    from moe_serve.model.tiny import make_tiny_model

    model_dir = cache_dir() / DEFAULT_MODEL_NAME
    if not (model_dir / "config.json").is_file():
        make_tiny_model(model_dir, family="mixtral")
    return model_dir


def start_redis(work_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A child redis-server on a free loopback port for the warm tier, with an eviction policy, no persistence."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise FileNotFoundError("redis-server not found: run `make install`, or pass --redis URL")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    work_dir.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
         "--maxmemory", "512mb", "--maxmemory-policy", "allkeys-lru", "--dir", str(work_dir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return process, f"redis://127.0.0.1:{port}/0"
        time.sleep(0.05)
    process.kill()
    raise ConnectionError(f"redis-server did not start on port {port}")


def run_up(settings_args: dict[str, Any], host: str, port: int, redis: str | None) -> None:
    """`redis`: a URL, "auto" (a child redis-server on a free port) or "off"."""
    from ray import serve

    from moe_serve.cache.redis_client import check, redact
    from moe_serve.cluster.bringup import connect_ray
    from moe_serve.replicas.app import APP_NAME, build_app
    from moe_serve.replicas.settings import AppSettings

    if not settings_args.get("model_dir"):
        settings_args["model_dir"] = str(ensure_default_model())
    redis_process = None
    if redis == "auto":
        redis_process, redis = start_redis(cache_dir() / "redis")
    redis_mode = None
    if redis and redis != "off":
        settings_args["cache"] = {"redis_url": redis}
        redis_mode = check(redis)  # a wrong password or certificate stops here, with the reason
    settings = AppSettings.model_validate(settings_args)
    connect_ray()
    state_file = cache_dir() / UP_STATE_FILE
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(build_app(settings), name=APP_NAME, route_prefix="/")
        base = f"http://{host}:{port}"
        state_file.parent.mkdir(parents=True, exist_ok=True)
        state_file.write_text(json.dumps({"address": ray_address(), "url": base, "pid": os.getpid()}))
        print(f"moe-serve is up: {base}/v1 serving {settings.served_name!r} from {settings.model_dir}", flush=True)
        if settings.shards:
            print(f"  experts on {settings.shards} shard actors ({settings.placement})", flush=True)
        if redis and redis != "off":
            where = {"cluster": "a Redis Cluster at ", "single": "", None: "(not answering yet) "}[redis_mode]
            print(f"  prefix KV cache: hot in each replica, warm in {where}{redact(redis)}", flush=True)
        print(f"  curl {base}/v1/completions -H 'Content-Type: application/json' "
              f"-d '{{\"model\": \"{settings.served_name}\", \"prompt\": \"The router\", \"max_tokens\": 16}}'",
              flush=True)
        print("Ctrl-C stops it.", flush=True)
        stop.wait()
    finally:
        import ray

        state_file.unlink(missing_ok=True)
        serve.shutdown()
        ray.shutdown()
        if redis_process is not None:
            redis_process.terminate()
            redis_process.wait(timeout=10)


def ray_address() -> str:
    import ray

    return ray.get_runtime_context().gcs_address


def recorded_address() -> str:
    """The Ray address a running `moe-serve up` recorded, else "auto" (a `ray start` cluster on this machine)."""
    try:
        return json.loads((cache_dir() / UP_STATE_FILE).read_text())["address"]
    except (FileNotFoundError, KeyError, ValueError):
        return "auto"


def status(address: str | None = None, timeout_s: float = 10.0) -> dict[str, Any]:
    # Read when Ray is imported: a dead address makes ray.init retry for minutes, so bound it; and Ray's token
    # authentication is on by default, so a joining driver must present the token too.
    os.environ.setdefault("RAY_gcs_rpc_server_connect_timeout_s", str(int(timeout_s)))
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    import ray
    from ray import serve

    from moe_serve.replicas.app import APP_NAME

    ray.init(address=address or recorded_address(), log_to_driver=False)
    try:
        app = serve.status().applications.get(APP_NAME)
        if app is None:
            return {"application": APP_NAME, "status": "not running"}
        deployments = {name: {"status": str(d.status), "replicas": {str(k): v for k, v in d.replica_states.items()}}
                       for name, d in app.deployments.items()}
        # the engines' deployment: their own, or the ingress holding them (colocated)
        engine = serve.get_deployment_handle("EngineReplica" if "EngineReplica" in deployments else "Ingress", APP_NAME)
        result = {"application": APP_NAME, "status": str(app.status), "deployments": deployments,
                  "engine_replica_sample": engine.stats.remote().result(timeout_s=timeout_s),
                  "cache_sample": engine.cache_stats.remote().result(timeout_s=timeout_s)}
        if "ExpertShards" in deployments:
            experts = serve.get_deployment_handle("ExpertShards", APP_NAME)
            result["experts"] = experts.describe.remote().result(timeout_s=timeout_s)
        return result
    finally:
        ray.shutdown()


def print_json(payload: dict[str, Any]) -> None:
    print(json.dumps(payload, indent=2, default=str))
