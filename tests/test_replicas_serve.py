"""End to end on a real local Ray Serve with the official `openai` client: the OpenAI surface, errors, auth,
streaming, concurrency and client disconnects."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from conftest import serve_app
from moe_serve.replicas.app import APP_NAME
from moe_serve.replicas.engine import LLMEngine
from moe_serve.replicas.sampling import SamplingParams
from moe_serve.replicas.settings import AppSettings
from ray import serve

from moe_serve.model.tokenizer import Tokenizer

API_KEY = "test-key-123"
MODEL = "tiny"


@dataclass
class Server:
    base: str
    model_dir: Path
    engine_deployment: str  # the deployment whose replicas hold the engines

    def client(self, api_key: str = API_KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base}/v1", api_key=api_key, max_retries=0, timeout=60)

    def post(self, path: str, content: bytes | str, api_key: str = API_KEY) -> httpx.Response:
        headers = {"content-type": "application/json", "authorization": f"Bearer {api_key}"}
        return httpx.post(f"{self.base}{path}", content=content, headers=headers, timeout=60)


@pytest.fixture(scope="module", params=[False, True], ids=["separate", "colocated"])
def server(request: pytest.FixtureRequest, tiny_model_dir: Path, redis_server: Any) -> Iterator[Server]:
    """The app with engine replicas of their own, then with each ingress replica holding its engine."""
    settings = AppSettings(model_dir=str(tiny_model_dir), model_name=MODEL, api_key=API_KEY,
                           limits={"max_prompt_tokens": 600, "max_tokens": 4000},
                           cache={"redis_url": redis_server.url(5 + request.param)},  # each its own warm tier
                           autoscaling={"min_replicas": 1, "max_replicas": 1}, colocated=request.param)
    with serve_app(settings) as url:
        yield Server(url, tiny_model_dir, "Ingress" if request.param else "EngineReplica")


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path) -> LLMEngine:
    return LLMEngine.from_pretrained(tiny_model_dir)


def engine_text(engine: LLMEngine, prompt_ids: list[int], max_tokens: int) -> str:
    [out] = engine.generate([prompt_ids], SamplingParams(max_tokens=max_tokens, temperature=0.0))
    return out.text or ""


def test_health_models_and_metrics(server: Server) -> None:
    assert httpx.get(f"{server.base}/health").json()["status"] == "ok"
    assert [m.id for m in server.client().models.list().data] == [MODEL]
    server.client().completions.create(model=MODEL, prompt="warm up", max_tokens=2)
    metrics = httpx.get(f"{server.base}/metrics").text
    for name in ("moe_requests_total", "moe_time_to_first_token_seconds", "moe_request_latency_seconds",
                 "moe_generated_tokens_total", "moe_queue_depth", "moe_running_sequences",
                 "moe_kv_cache_used_fraction", "moe_engine_replicas", "moe_cache_lookups_total",
                 "moe_prompt_cache_prompt_misses_total", 'moe_kv_pool_blocks{state="evictable"}',
                 "moe_engine_step_seconds", "moe_engine_step_budget_seconds 0.05", "moe_cache_lookup_wait_seconds",
                 "moe_inter_token_latency_seconds", "moe_request_queue_time_seconds", "moe_http_requests_total",
                 "moe_process_cpu_seconds_total", "moe_kv_fragmentation_fraction"):
        assert name in metrics, name


def test_completion_greedy_equals_engine(server: Server, reference: LLMEngine) -> None:
    prompt = "The router sends each token to"
    response = server.client().completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    tokenizer = Tokenizer.from_dir(server.model_dir)
    assert response.choices[0].text == engine_text(reference, tokenizer.encode(prompt), 12)
    assert response.usage.prompt_tokens == len(tokenizer.encode(prompt))
    assert response.usage.prompt_tokens_details.cached_tokens == 0


def test_completion_from_token_ids(server: Server, reference: LLMEngine) -> None:
    ids = [5, 17, 99, 230]
    response = server.client().completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0)
    assert response.choices[0].text == engine_text(reference, ids, 6)


def test_chat_greedy_and_streaming_agree(server: Server, reference: LLMEngine) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is an expert?"}]
    client = server.client()
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    tokenizer = Tokenizer.from_dir(server.model_dir)
    assert plain.choices[0].message.content == engine_text(reference, tokenizer.encode_chat(messages), 10)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == plain.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_logprobs_in_completions_and_chat(server: Server, reference: LLMEngine) -> None:
    client, tokenizer = server.client(), Tokenizer.from_dir(server.model_dir)
    prompt = "Experts share the load"
    [expected] = reference.generate([tokenizer.encode(prompt)], SamplingParams(max_tokens=5, temperature=0.0,
                                                                                logprobs=2))
    assert expected.logprobs is not None
    response = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0, logprobs=2)
    logprobs = response.choices[0].logprobs
    assert logprobs.tokens == [tokenizer.decode([t]) for t in expected.token_ids]
    assert logprobs.token_logprobs == pytest.approx([lp.logprob for lp in expected.logprobs], abs=1e-4)
    assert [list(top) for top in logprobs.top_logprobs] == [[tokenizer.decode([t]) for t, _ in lp.top]
                                                           for lp in expected.logprobs]
    assert logprobs.text_offset[0] == 0 and "".join(logprobs.tokens) == response.choices[0].text
    streamed = [c.choices[0].logprobs for c in client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=5, temperature=0, logprobs=2, stream=True)]
    assert [lp for chunk in streamed for lp in chunk.token_logprobs] == pytest.approx(logprobs.token_logprobs)
    assert [o for chunk in streamed for o in chunk.text_offset] == logprobs.text_offset

    # echo with logprobs scores the prompt too (what lm-eval's loglikelihood requests ask for)
    echoed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0, logprobs=1, echo=True)
    prompt_ids = tokenizer.encode(prompt)
    [scored] = reference.generate([prompt_ids], SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1))
    assert scored.prompt_logprobs is not None
    lp = echoed.choices[0].logprobs
    assert lp.tokens[:-1] == [tokenizer.decode([t]) for t in prompt_ids]  # then the one generated token
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1 : len(prompt_ids)] == pytest.approx([p.logprob for p in scored.prompt_logprobs[1:]],
                                                                    abs=1e-4)
    streamed = [c.choices[0].logprobs for c in client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=1, temperature=0, logprobs=1, echo=True, stream=True)]
    assert [t for chunk in streamed for t in chunk.tokens] == lp.tokens
    assert [o for chunk in streamed for o in chunk.text_offset] == lp.text_offset

    messages = [{"role": "user", "content": prompt}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0,
                                          logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert "".join(c.token for c in content) == chat.choices[0].message.content
    assert all(len(c.top_logprobs) == 3 and c.top_logprobs[0].logprob >= c.logprob - 1e-6 for c in content)
    assert bytes(content[0].bytes).decode() == content[0].token
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0)
    assert plain.choices[0].logprobs is None


def test_n_choices_are_seeded_generations(server: Server, reference: LLMEngine) -> None:
    """Choice i of a seeded request with n choices is the engine's generation with seed + i."""
    client, tokenizer = server.client(), Tokenizer.from_dir(server.model_dir)
    prompt = "Three experts answer"
    expected = [reference.generate([tokenizer.encode(prompt)], SamplingParams(max_tokens=8, temperature=1.0,
                                                                              seed=40 + i, ignore_eos=True))[0].text
                for i in range(3)]
    assert len(set(expected)) > 1
    response = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, seed=40, n=3,
                                         extra_body={"ignore_eos": True})
    assert [c.index for c in response.choices] == [0, 1, 2]
    assert [c.text for c in response.choices] == expected and response.usage.completion_tokens == 24
    events = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, seed=40, n=3, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    texts = ["", "", ""]
    for event in events[:-1]:
        texts[event.choices[0].index] += event.choices[0].text
    assert texts == expected and events[-1].usage.completion_tokens == 24
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=4,
                                          n=2, seed=1, extra_body={"ignore_eos": True})
    assert [c.index for c in chat.choices] == [0, 1] and chat.usage.completion_tokens == 8
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                                 max_tokens=4, n=2, seed=1, stream=True,
                                                 extra_body={"ignore_eos": True}))
    streamed = ["", ""]
    for c in chunks:
        streamed[c.choices[0].index] += c.choices[0].delta.content or ""
    assert streamed == [c.message.content for c in chat.choices]


def test_streaming_completion_ends_with_done(server: Server) -> None:
    request = {"model": MODEL, "prompt": "Cache", "max_tokens": 5, "ignore_eos": True, "temperature": 0}
    headers = {"content-type": "application/json", "authorization": f"Bearer {API_KEY}"}
    with httpx.stream("POST", f"{server.base}/v1/completions", content=json.dumps({**request, "stream": True}),
                      timeout=60, headers=headers) as r:
        assert r.status_code == 200
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert 3 <= len(events) <= 6  # the first token alone, the other four in one to four chunks, then [DONE]
    streamed = "".join(json.loads(e[len("data: "):])["choices"][0]["text"] for e in events[:-1])
    whole = httpx.post(f"{server.base}/v1/completions", json=request, headers=headers, timeout=60).json()
    assert streamed == whole["choices"][0]["text"] and whole["usage"]["completion_tokens"] == 5


def test_concurrent_clients(server: Server, reference: LLMEngine) -> None:
    prompts = [f"Request number {i} asks the experts" for i in range(8)]
    tokenizer = Tokenizer.from_dir(server.model_dir)

    def ask(prompt: str) -> str:
        response = server.client().completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
        return response.choices[0].text

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, prompts))
    assert answers == [engine_text(reference, tokenizer.encode(p), 8) for p in prompts]


def test_api_key_enforced(server: Server) -> None:
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="wrong").completions.create(model=MODEL, prompt="x", max_tokens=2)
    response = httpx.post(f"{server.base}/v1/completions", json={"model": MODEL, "prompt": "x"})
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ('{"model": "tiny", "prompt": ', 400, "not valid JSON"),
        ('{"model": "tiny", "prompt": "x", "max_tokens": "many"}', 422, "max_tokens"),
        ('{"model": "tiny", "prompt": 5}', 422, "prompt"),
        ('{"model": "gpt-9", "prompt": "x"}', 404, "does not exist"),
        ('{"model": "tiny", "prompt": "x", "max_tokens": -4}', 422, "max_tokens"),
        ('{"model": "tiny", "prompt": "x", "max_tokens": 100000000}', 400, "exceeds the limit"),
        ('{"model": "tiny", "prompt": "x", "n": 9}', 400, "n=9"),
        ('{"model": "tiny", "prompt": ""}', 400, "prompt is empty"),
        ('{"model": "tiny", "prompt": [1, 2, 99999]}', 400, "unknown token id"),
        ('{"model": "tiny", "prompt": "x", "temperature": -1}', 422, "temperature"),
        ('{"model": "tiny", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}', 422, "stop"),
        ('{"model": "tiny", "prompt": "x", "logprobs": 21}', 422, "logprobs"),
        ('{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}', 400,
         "top_logprobs needs logprobs"),
    ],
)
def test_bad_input_gets_openai_error(server: Server, body: str, status: int, fragment: str) -> None:
    route = "/v1/chat/completions" if '"messages"' in body else "/v1/completions"
    response = server.post(route, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert fragment in error["message"] and error["type"]


def test_prompt_too_long(server: Server) -> None:
    response = server.post("/v1/completions", f'{{"model": "tiny", "prompt": {list(range(3, 700))}}}')
    assert response.status_code == 400
    assert "the limit is 600" in response.json()["error"]["message"]


def test_oversized_body(server: Server) -> None:
    response = server.post("/v1/completions", '{"model": "tiny", "prompt": "' + "x" * (2 << 20) + '"}')
    assert response.status_code == 413


def test_chat_bad_role(server: Server) -> None:
    response = server.post("/v1/chat/completions", '{"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}')
    assert response.status_code == 422


def aborted_requests(server: Server) -> float:
    match = re.search(r'^moe_requests_total\{outcome="aborted"\} (\S+)$', httpx.get(f"{server.base}/metrics").text,
                      re.MULTILINE)
    return float(match.group(1)) if match else 0.0


@pytest.mark.parametrize("n", [1, 3])
def test_client_disconnect_frees_its_slot(server: Server, n: int) -> None:
    handle = serve.get_deployment_handle(server.engine_deployment, APP_NAME)
    aborted_before = aborted_requests(server)
    body = (f'{{"model": "{MODEL}", "prompt": "Long story", "max_tokens": 4000, "ignore_eos": true, "stream": true, '
            f'"n": {n}}}')  # with n > 1, every choice's generation stops
    with httpx.stream("POST", f"{server.base}/v1/completions", content=body, timeout=60,
                      headers={"content-type": "application/json", "authorization": f"Bearer {API_KEY}"}) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break  # one token, then the client hangs up
    deadline = time.monotonic() + 20
    stats = handle.stats.remote().result()
    while time.monotonic() < deadline and (stats["running"] or stats["kv_used_fraction"] > 0):
        time.sleep(0.2)
        stats = handle.stats.remote().result()
    assert stats["running"] == 0 and stats["kv_used_fraction"] == 0.0
    assert aborted_requests(server) == aborted_before + n  # every choice's stream was cancelled, not run out


def test_repeated_long_prompt_reports_cached_tokens(server: Server) -> None:
    prompt = list(range(20, 220))  # 200 tokens: 12 full blocks of 16 before the last token
    client = server.client()
    first = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0)
    second = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details.cached_tokens == 192
    assert second.choices[0].text == first.choices[0].text
    metrics = httpx.get(f"{server.base}/metrics").text
    assert 'moe_cache_hits_total{tier="hot"}' in metrics


def test_engine_holders_report_load_to_the_autoscaler(server: Server) -> None:
    """What the autoscaling policy reads, from whichever deployment holds the engines (colocated: the ingress)."""
    stats = serve.get_deployment_handle(server.engine_deployment, APP_NAME).record_autoscaling_stats.remote().result()
    assert set(stats) == {"running", "waiting", "kv_used_fraction"} and stats["running"] >= 0
