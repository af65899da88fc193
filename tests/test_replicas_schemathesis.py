"""Schemathesis over the app's own OpenAPI schema: about 1,000 generated requests, no 5xx, still healthy after.

The schema is the one the running Serve app publishes (GET /openapi.json). Each operation gets schema-valid
(positive) and schema-violating (negative) cases; the generation routes have most of the budget. The app runs with
`max_tokens` capped at 16 so that every valid request generates little, and most generated bodies are pointed at
the served model name so they get past the 404 and reach the tokenizer, the sampler and the engine.
A 5xx is collected, not raised, so one run lists every failing request (as curl) with the body of the response.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import requests
import schemathesis
from conftest import serve_app
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from moe_serve.replicas.settings import AppSettings
from schemathesis import Case, GenerationMode

MODEL = "tiny"
MAX_TOKENS = 16  # the app's limit here: longer asks are a 400, so no valid request generates for long
# Examples per (operation, mode) of the generation routes: they take the budget.
BUDGET = {
    ("POST /v1/completions", GenerationMode.POSITIVE): 360,
    ("POST /v1/completions", GenerationMode.NEGATIVE): 130,
    ("POST /v1/chat/completions", GenerationMode.POSITIVE): 360,
    ("POST /v1/chat/completions", GenerationMode.NEGATIVE): 130,
}
GET_REPEATS = 7  # /health, /metrics, /v1/models have one distinct request each: sent a few times
TOTAL_AT_LEAST = 900


@pytest.fixture(scope="module")
def base_url(tiny_model_dir: Path) -> Iterator[str]:
    settings_ = AppSettings(model_dir=str(tiny_model_dir), model_name=MODEL, limits={"max_tokens": MAX_TOKENS},
                            autoscaling={"min_replicas": 1, "max_replicas": 1})
    with serve_app(settings_) as url:
        yield url


@dataclass
class Run:
    base_url: str
    session: requests.Session = field(default_factory=requests.Session)
    sent: int = 0
    server_errors: list[str] = field(default_factory=list)

    def send(self, case: Case) -> None:
        response = case.call(base_url=self.base_url, session=self.session, timeout=60)
        self.sent += 1
        if response.status_code >= 500:
            curl = case.as_curl_command()
            curl = curl if len(curl) <= 400 else curl[:400] + "..."
            self.server_errors.append(f"{response.status_code} {response.text[:200]!r}: {curl}")


@st.composite
def aimed_at_model(draw: st.DrawFn, cases: st.SearchStrategy[Case]) -> Case:
    """Four of five bodies name the served model, so they get past the 404 and into generation."""
    case = draw(cases)
    if isinstance(case.body, dict) and "model" in case.body and draw(st.integers(0, 4)) > 0:
        case.body["model"] = MODEL
    return case


def run_operation(run: Run, cases: st.SearchStrategy[Case], max_examples: int) -> None:
    @settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=aimed_at_model(cases))
    def fuzz(case: Case) -> None:
        run.send(case)

    fuzz()


@pytest.mark.timeout(300)
def test_generated_requests_get_no_5xx_and_leave_the_server_healthy(base_url: str) -> None:
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json", timeout=30)
    operations = {op.label: op for op in (result.ok() for result in schema.get_all_operations())}
    assert set(operations) >= {"GET /health", "GET /metrics", "GET /v1/models", "POST /v1/completions",
                               "POST /v1/chat/completions"}, sorted(operations)
    run = Run(base_url)
    for label, operation in sorted(operations.items()):
        if operation.method.upper() == "GET":
            for _ in range(GET_REPEATS):
                run_operation(run, operation.as_strategy(GenerationMode.POSITIVE), max_examples=1)
            continue
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            run_operation(run, operation.as_strategy(mode), BUDGET.get((label, mode), 50))

    first = "\n".join(run.server_errors[:5])
    assert not run.server_errors, f"{len(run.server_errors)} of {run.sent} requests got a 5xx, the first:\n{first}"
    assert run.sent >= TOTAL_AT_LEAST, f"only {run.sent} requests were generated"
    health = httpx.get(f"{base_url}/health", timeout=30)
    assert health.status_code == 200 and health.json()["status"] == "ok", health.text


# Inputs at the edges of the schema, several found by hand or by the run above: each must get a 2xx or a 4xx
# and leave the server healthy.
EDGE_CASES = {
    "tiny temperature": {"prompt": "hello", "max_tokens": 4, "temperature": 5e-324},
    "tiny top_p": {"prompt": "hello", "max_tokens": 4, "temperature": 1.0, "top_p": 1e-300},
    "huge top_k": {"prompt": "hello", "max_tokens": 4, "top_k": 10**24},
    "huge seed": {"prompt": "hello", "max_tokens": 4, "seed": 10**24},
    "negative seed": {"prompt": "hello", "max_tokens": 4, "seed": -1},
    "nul stop string": {"prompt": "hello", "max_tokens": 4, "stop": "\u0000"},
    "lone surrogate prompt": {"prompt": "\ud800 hi", "max_tokens": 4},
    "lone surrogate stop": {"prompt": "hello", "max_tokens": 4, "stop": ["\udfff"]},
    "empty token list": {"prompt": [], "max_tokens": 4},
    "empty nested token list": {"prompt": [[]], "max_tokens": 4},
    "negative token id": {"prompt": [-1, 5], "max_tokens": 4},
    "min_tokens above max_tokens": {"prompt": "hello", "max_tokens": 2, "min_tokens": 10**6},
}
CHAT_EDGE_CASES = {
    "lone surrogate message": {"messages": [{"role": "user", "content": "\ud800"}], "max_tokens": 3},
    "empty message": {"messages": [{"role": "user", "content": ""}], "max_tokens": 3},
}


@pytest.mark.parametrize(
    ("path", "body"),
    [("/v1/completions", body) for body in EDGE_CASES.values()]
    + [("/v1/chat/completions", body) for body in CHAT_EDGE_CASES.values()],
    ids=[*EDGE_CASES, *CHAT_EDGE_CASES],
)
def test_edge_case_is_not_a_server_error(base_url: str, path: str, body: dict[str, object]) -> None:
    wait_healthy(base_url)  # a replica an earlier case took down is replaced first, so each case stands alone
    content = json.dumps({"model": MODEL, **body})  # ASCII-escaped, so lone surrogates travel as JSON escapes
    response = httpx.post(f"{base_url}{path}", content=content, headers={"content-type": "application/json"},
                          timeout=60)
    assert response.status_code < 500, response.text
    health = httpx.get(f"{base_url}/health", timeout=30)
    assert health.status_code == 200, f"the server is unhealthy after this request: {health.text}"


def wait_healthy(base_url: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if httpx.get(f"{base_url}/health", timeout=30).status_code == 200:
            return
        time.sleep(1.0)
    pytest.fail(f"the server did not become healthy within {timeout_s:.0f} s")
