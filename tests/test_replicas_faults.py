"""A replica killed under load fails no request: its requests migrate to the other replica with the tokens they had.

Two engine replicas (min = max = 2) serve a bounded load of streaming and non-streaming completions, greedy and
seeded, from a few client threads. Mid-load one engine replica actor is killed with `ray.kill`. The ingress resends
each request that was running on it, with the tokens already produced appended to the prompt, so every request
succeeds with the text the in-process engine gives for it undisturbed; some requests did migrate (the ingress counts
them in /metrics); the deployment is back to two running replicas.
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
from moe_serve.model.tokenizer import Tokenizer
from moe_serve.replicas.app import APP_NAME
from moe_serve.replicas.engine import LLMEngine
from moe_serve.replicas.sampling import SamplingParams
from moe_serve.replicas.settings import AppSettings
from ray import serve

MODEL = "tiny"
CLIENTS = 4  # half stream, half do not
LOAD_S = 14.0  # every client stops starting requests after this
KILL_AT_S = 5.0
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
    key: tuple[int, bool]  # (prompt index, seeded)
    stream: bool
    start: float
    end: float
    text: str
    error: str | None  # None: a 200 with a complete body (streams end with [DONE])


PROMPTS = 6
# long enough that a replica is never idle between its requests when it is killed (24 tokens took ~20 ms here, and a
# kill once fell between two of them: nothing migrated)
MAX_TOKENS = 160


def sampling_of(prompt: int, seeded: bool) -> dict:
    return {"temperature": 0.9, "seed": prompt} if seeded else {"temperature": 0.0}


def request_body(index: int, stream: bool) -> dict:
    """Prompt `index % PROMPTS`; every third request samples with a seed, the others are greedy."""
    prompt = index % PROMPTS
    return {"model": MODEL, "prompt": f"Request {prompt} asks the experts", "max_tokens": MAX_TOKENS,
            "ignore_eos": True, "stream": stream, **sampling_of(prompt, index % 3 == 0)}


def expected_texts(model_dir: Path) -> dict[tuple[int, bool], str]:
    """(prompt index, seeded) -> the in-process engine's text for that request, undisturbed."""
    engine, tokenizer = LLMEngine.from_pretrained(model_dir), Tokenizer.from_dir(model_dir)
    texts = {}
    for prompt in range(PROMPTS):
        for seeded in (False, True):
            params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, **sampling_of(prompt, seeded))
            [out] = engine.generate([tokenizer.encode(f"Request {prompt} asks the experts")], params)
            texts[(prompt, seeded)] = out.text or ""
    return texts


def one_request(http: httpx.Client, base_url: str, stream: bool, index: int) -> Outcome:
    request_id = f"fault-{uuid.uuid4().hex}"
    body = request_body(index, stream)
    start, error, text = time.monotonic(), None, ""
    try:
        with http.stream("POST", f"{base_url}/v1/completions", json=body, headers={"x-request-id": request_id}) as r:
            if r.status_code != 200:
                error = f"HTTP {r.status_code}: {r.read().decode(errors='replace')[:200]}"
            elif stream:
                events = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
                if not events or events[-1] != "[DONE]":
                    error = f"stream ended without [DONE] after {len(events)} events"
                text = "".join(c["text"] for e in events[:-1] for c in json.loads(e)["choices"])
            else:
                text = json.loads(r.read())["choices"][0]["text"]
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    return Outcome(request_id, (index % PROMPTS, "seed" in body), stream, start, time.monotonic(), text, error)


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


def busiest_replica(names: list[str], timeout_s: float = 10.0) -> str:
    """The replica with the most requests running now (waiting until one has some): killing it must migrate them.
    Prefix-affinity routing may send every prompt of the load to one replica."""
    deadline = time.monotonic() + timeout_s
    while True:
        ongoing = {name: ray.get(ray.get_actor(name, namespace="serve").get_num_ongoing_requests.remote(), timeout=5)
                   for name in names}
        busiest = max(ongoing, key=ongoing.__getitem__)
        if ongoing[busiest] or time.monotonic() >= deadline:
            return busiest
        time.sleep(0.05)


def wait_for(predicate: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.5)
    return False


@pytest.mark.timeout(240)
def test_killed_replica_fails_no_request(base_url: str, tiny_model_dir: Path) -> None:
    expected = expected_texts(tiny_model_dir)
    assert wait_for(lambda: running_engine_replicas() == 2 and len(engine_replica_names()) == 2, 60)
    before = engine_replica_names()
    outcomes: list[Outcome] = []
    t0 = time.monotonic()
    threads = [threading.Thread(target=client, args=(base_url, i % 2 == 0, t0 + LOAD_S, outcomes))
               for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    time.sleep(KILL_AT_S)
    victim = busiest_replica(before)
    t_kill = time.monotonic()
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    for thread in threads:
        thread.join(timeout=180)
    assert not any(thread.is_alive() for thread in threads)

    failed = [o for o in outcomes if o.error]
    wrong = [o for o in outcomes if not o.error and o.text != expected[o.key]]
    in_flight_at_kill = [o for o in outcomes if o.start <= t_kill <= o.end]
    report = (f"{len(outcomes)} requests, {len(in_flight_at_kill)} in flight at the kill, {len(failed)} failed, "
              f"{len(wrong)} with other text: " + "; ".join(f"{o.start - t_kill:+.2f}s {o.error}" for o in failed[:5])
              + "; ".join(f"{o.key} {o.text!r} != {expected[o.key]!r}" for o in wrong[:3]))
    print(report)  # shown with -s
    assert len(outcomes) >= 4 * CLIENTS and in_flight_at_kill, report
    assert not failed and not wrong, report
    migrated = re.search(r"^moe_request_migrations_total (\S+)$", httpx.get(f"{base_url}/metrics", timeout=30).text,
                         re.MULTILINE)
    assert migrated and float(migrated.group(1)) >= 1, "no request migrated: the kill hit no running request"

    assert wait_for(lambda: running_engine_replicas() == 2 and victim not in engine_replica_names(), 90), (
        f"Serve did not bring the engine replicas back to 2: {serve.status().applications[APP_NAME]}")
