"""The Serve application with its experts on shard actors (`shards: 2`): two engine replicas share one router, which
drives a compiled graph to the shards; greedy output equals the in-process engine's, the per-expert load reaches
/metrics, and a killed router or shard stalls running requests of both replicas instead of failing them."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import ray
from conftest import serve_app
from moe_serve.replicas.app import APP_NAME
from moe_serve.replicas.engine import LLMEngine
from moe_serve.replicas.sampling import SamplingParams
from moe_serve.replicas.settings import AppSettings
from ray import serve

from moe_serve.model.tokenizer import Tokenizer

MODEL = "tiny"
PROMPT = "Experts on shards answer the router with"


@pytest.fixture(scope="module")
def base_url(tiny_model_dir: Path) -> Iterator[str]:
    settings = AppSettings(model_dir=str(tiny_model_dir), model_name=MODEL, shards=2, placement="spread",
                           autoscaling={"min_replicas": 2, "max_replicas": 2, "llm_policy": False})
    with serve_app(settings) as url:
        yield url


def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)


def in_process_text(model_dir: Path, max_tokens: int) -> str:
    engine = LLMEngine.from_pretrained(model_dir)
    prompt_ids = Tokenizer.from_dir(model_dir).encode(PROMPT)
    [out] = engine.generate([prompt_ids], SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    return out.text or ""


def complete(base_url: str, max_tokens: int) -> str:
    response = client(base_url).completions.create(model=MODEL, prompt=PROMPT, max_tokens=max_tokens, temperature=0,
                                                   extra_body={"ignore_eos": True})
    return response.choices[0].text


def test_greedy_equals_in_process_on_every_replica(base_url: str, tiny_model_dir: Path) -> None:
    expected = in_process_text(tiny_model_dir, 16)
    with ThreadPoolExecutor(6) as pool:
        texts = list(pool.map(lambda _: complete(base_url, 16), range(6)))
    assert texts == [expected] * 6
    status = serve.status().applications[APP_NAME].deployments
    assert status["ExpertShards"].replica_states.get("RUNNING") == 1
    assert status["EngineReplica"].replica_states.get("RUNNING") == 2
    # Both replicas' layer calls went to the shared router, which drove its compiled graph to the shards.
    described = serve.get_deployment_handle("ExpertShards", APP_NAME).describe.remote().result(timeout_s=30)
    assert described["transport"]["kind"] == "routed" and described["transport"]["shard_graph"]["graph_calls"] > 0


def test_placement_and_expert_load_are_visible(base_url: str) -> None:
    complete(base_url, 4)
    described = serve.get_deployment_handle("ExpertShards", APP_NAME).describe.remote().result(timeout_s=30)
    assert len(described["shards"]) == 2
    experts = sorted(e for shard in described["shards"] for e in shard["experts"])
    assert experts == list(range(len(experts))) and len(experts) >= 2
    assert sum(sum(row) for row in described["load"]["expert_tokens"]) > 0
    metrics = httpx.get(f"{base_url}/metrics", timeout=30).text
    assert 'moe_expert_tokens_total{expert="0",layer="0"}' in metrics
    assert "moe_shard_rows_total" in metrics


def test_rebalance_through_the_deployment_keeps_outputs(base_url: str, tiny_model_dir: Path) -> None:
    expected = in_process_text(tiny_model_dir, 16)
    experts = serve.get_deployment_handle("ExpertShards", APP_NAME)
    complete(base_url, 16)  # some load to rank the experts by
    added = experts.rebalance.remote().result(timeout_s=60)
    assert added and all(copy["shard"] in (0, 1) for copy in added)
    copies = experts.describe.remote().result(timeout_s=30)["copies"]
    assert any(copies.values())
    assert complete(base_url, 16) == expected


def stream_text(base_url: str, max_tokens: int, first_token: threading.Event) -> str:
    stream = client(base_url).completions.create(model=MODEL, prompt=PROMPT, max_tokens=max_tokens, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True})
    text = ""
    for chunk in stream:
        text += chunk.choices[0].text if chunk.choices else ""
        first_token.set()
    return text


@pytest.mark.parametrize("victim", ["router", "shard"])
def test_killed_router_or_shard_fails_no_request(base_url: str, tiny_model_dir: Path, victim: str) -> None:
    expected = in_process_text(tiny_model_dir, 96)
    experts = serve.get_deployment_handle("ExpertShards", APP_NAME)
    [router] = experts.router.remote().result(timeout_s=30)
    target = router if victim == "router" else experts.shard_actors.remote().result(timeout_s=30)[0]
    started = [threading.Event() for _ in range(2)]
    with ThreadPoolExecutor(2) as pool:
        running = [pool.submit(stream_text, base_url, 96, event) for event in started]
        assert all(event.wait(60) for event in started)
        ray.kill(target, no_restart=False)  # Ray restarts it (max_restarts=-1); layer calls meanwhile are retried
        assert [f.result(timeout=180) for f in running] == [expected, expected]
    assert complete(base_url, 96) == expected
