"""`moe-serve up` and `moe-serve status`: the one-command local cluster and a look at a running one.

`up` with no arguments is the embedded default: a local Ray (its GCS on a random port, never Redis's 6379), the
tiny model generated on first run into a cache directory, and the Serve application on 127.0.0.1. It blocks until
Ctrl-C or SIGTERM and then stops everything it started.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path
from typing import Any

DEFAULT_MODEL_NAME = "tiny-mixtral"


def cache_dir() -> Path:
    return Path(os.environ.get("MOE_SERVE_CACHE", Path.home() / ".cache" / "moe-serve"))


def ensure_default_model() -> Path:
    """The embedded default model, made once with `make_tiny_model` and reused afterwards."""
    from moe_serve.model.tiny import make_tiny_model

    model_dir = cache_dir() / DEFAULT_MODEL_NAME
    if not (model_dir / "config.json").is_file():
        make_tiny_model(model_dir, family="mixtral")
    return model_dir


def run_up(settings_args: dict[str, Any], host: str, port: int) -> None:
    from ray import serve

    from moe_serve.cluster.bringup import connect_ray
    from moe_serve.replicas.app import APP_NAME, build_app
    from moe_serve.replicas.settings import AppSettings

    if not settings_args.get("model_dir"):
        settings_args["model_dir"] = str(ensure_default_model())
    settings = AppSettings.model_validate(settings_args)
    connect_ray()
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(build_app(settings), name=APP_NAME, route_prefix="/")
        base = f"http://{host}:{port}"
        print(f"moe-serve is up: {base}/v1 serving {settings.served_name!r} from {settings.model_dir}", flush=True)
        print(f"  curl {base}/v1/completions -H 'Content-Type: application/json' "
              f"-d '{{\"model\": \"{settings.served_name}\", \"prompt\": \"The router\", \"max_tokens\": 16}}'",
              flush=True)
        print("Ctrl-C stops it.", flush=True)
        stop.wait()
    finally:
        import ray

        serve.shutdown()
        ray.shutdown()


def status(address: str) -> dict[str, Any]:
    import ray
    from ray import serve

    from moe_serve.replicas.app import APP_NAME

    ray.init(address=address, log_to_driver=False)
    try:
        app = serve.status().applications.get(APP_NAME)
        if app is None:
            return {"application": APP_NAME, "status": "not running"}
        deployments = {name: {"status": str(d.status), "replicas": {str(k): v for k, v in d.replica_states.items()}}
                       for name, d in app.deployments.items()}
        engine_stats = serve.get_deployment_handle("EngineReplica", APP_NAME).stats.remote().result(timeout_s=10)
        return {"application": APP_NAME, "status": str(app.status), "deployments": deployments,
                "engine_replica_sample": engine_stats}
    finally:
        ray.shutdown()


def print_json(payload: dict[str, Any]) -> None:
    print(json.dumps(payload, indent=2, default=str))
