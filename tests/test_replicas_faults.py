"""A replica killed under load: only the requests in flight on it fail, and Serve brings the count back.

Two engine replicas (min = max = 2) serve a bounded load of streaming and non-streaming completions from a few
client threads. Mid-load one engine replica actor is killed with `ray.kill`. Each request carries its own
`x-request-id`, which Serve uses as the request id in every replica's log, so after the run the survivors' logs say
which requests they served: a failed request must have started before the kill, must not have been served by a
survivor, and there are at most as many failures as requests in flight at the kill. Requests that start after a
short recovery window all succeed, and the deployment is back to two running replicas.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import ray
from conftest import serve_app
from moe_serve.replicas.app import APP_NAME
from moe_serve.replicas.settings import AppSettings
from ray import serve

MODEL = "tiny"
CLIENTS = 4  # half stream, half do not
LOAD_S = 14.0  # every client stops starting requests after this
KILL_AT_S = 5.0
RECOVERY_S = 3.0  # requests that start later than this after the kill must all succeed
MAX_REQUESTS_PER_CLIENT = 300
REPLICA_PREFIX = f"SERVE_REPLICA::{APP_NAME}#EngineReplica#"


@pytest.fixture(scope="module")
def base_url(tiny_model_dir: Path) -> Iterator[str]:
    settings = AppSettings(model_dir=str(tiny_model_dir), model_name=MODEL, replica_num_cpus=0.25,
                           autoscaling={"min_replicas": 2, "max_replicas": 2})
    with serve_app(settings) as url:
        yield url


@dataclass(frozen=True)
class Outcome:
    request_id: str
    stream: bool
    start: float
    end: float
    error: str | None  # None: a 200 with a complete body (streams end with [DONE])


def one_request(http: httpx.Client, base_url: str, stream: bool, index: int) -> Outcome:
    request_id = f"fault-{uuid.uuid4().hex}"
    body = {"model": MODEL, "prompt": f"Request {index} asks the experts", "max_tokens": 24, "ignore_eos": True,
            "stream": stream}
    start, error = time.monotonic(), None
    try:
        with http.stream("POST", f"{base_url}/v1/completions", json=body, headers={"x-request-id": request_id}) as r:
            if r.status_code != 200:
                error = f"HTTP {r.status_code}: {r.read().decode(errors='replace')[:200]}"
            elif stream:
                events = [line for line in r.iter_lines() if line.startswith("data: ")]
                if not events or events[-1] != "data: [DONE]":
                    error = f"stream ended without [DONE] after {len(events)} events"
            elif len(json.loads(r.read())["choices"][0]["text"]) == 0:
                error = "empty completion"
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    return Outcome(request_id, stream, start, time.monotonic(), error)


def client(base_url: str, stream: bool, stop_at: float, outcomes: list[Outcome]) -> None:
    with httpx.Client(timeout=60) as http:
        for index in range(MAX_REQUESTS_PER_CLIENT):
            if time.monotonic() >= stop_at:
                return
            outcomes.append(one_request(http, base_url, stream, index))


def engine_replica_names() -> list[str]:
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith(REPLICA_PREFIX))


def running_engine_replicas() -> int:
    return serve.status().applications[APP_NAME].deployments["EngineReplica"].replica_states.get("RUNNING", 0)


def served_request_ids(replica_id: str) -> set[str]:
    """Request ids a replica logged a finished `generate` call for (OK or ERROR)."""
    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path()) / "serve"
    ids: set[str] = set()
    for path in logs.glob(f"replica_{APP_NAME}_EngineReplica_{replica_id}*.log"):
        ids.update(re.findall(r" (fault-[0-9a-f]{32}) .*CALL generate", path.read_text(errors="replace")))
    return ids


def wait_for(predicate: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.5)
    return False


@pytest.mark.timeout(180)
def test_killed_replica_fails_only_its_in_flight_requests(base_url: str) -> None:
    assert wait_for(lambda: running_engine_replicas() == 2 and len(engine_replica_names()) == 2, 60)
    before = engine_replica_names()
    outcomes: list[Outcome] = []
    t0 = time.monotonic()
    threads = [threading.Thread(target=client, args=(base_url, i % 2 == 0, t0 + LOAD_S, outcomes))
               for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    time.sleep(KILL_AT_S)
    victim = before[0]
    t_kill = time.monotonic()
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads)

    failed = [o for o in outcomes if o.error]
    in_flight_at_kill = [o for o in outcomes if o.start <= t_kill <= o.end]
    after_recovery = [o for o in outcomes if o.start > t_kill + RECOVERY_S]
    report = (f"{len(outcomes)} requests, {len(failed)} failed, {len(in_flight_at_kill)} in flight at the kill: "
              + "; ".join(f"{o.start - t_kill:+.2f}s {o.error}" for o in failed[:10]))
    print(report)  # shown with -s
    assert len(outcomes) >= 4 * CLIENTS and after_recovery, report
    assert all(o.start <= t_kill for o in failed), "a request that started after the kill failed: " + report
    assert len(failed) <= len(in_flight_at_kill), report
    assert not [o for o in after_recovery if o.error], report

    survivors = [name.removeprefix(REPLICA_PREFIX) for name in before if name != victim]
    served_by_survivors = set().union(*(served_request_ids(r) for r in survivors))
    assert served_by_survivors, "the survivor's log names none of the requests: cannot attribute them"
    assert not {o.request_id for o in failed} & served_by_survivors, "a surviving replica failed a request"

    assert wait_for(lambda: running_engine_replicas() == 2 and victim not in engine_replica_names(), 90), (
        f"Serve did not bring the engine replicas back to 2: {serve.status().applications[APP_NAME]}")
    response = httpx.post(f"{base_url}/v1/completions", json={"model": MODEL, "prompt": "after", "max_tokens": 4},
                          timeout=60)
    assert response.status_code == 200, response.text
