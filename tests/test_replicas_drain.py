"""Graceful drain: when Serve stops an engine replica, its in-flight request finishes and its hot KV blocks are
written to the warm tier, so the replicas that stay (or come later) keep the prefix hits."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai
from conftest import serve_app
from moe_serve.replicas.app import APP_NAME
from moe_serve.replicas.settings import AppSettings
from ray import serve

MODEL = "tiny"
LONG_PROMPT = " ".join(f"word{i}" for i in range(120))  # several 16-token KV blocks


def warm_keys(redis: Any, db: int) -> int:
    with redis.client(db) as client:
        return client.dbsize()


def test_stopping_a_replica_finishes_its_request_and_drains_hot_blocks_to_warm(tiny_model_dir: Path,
                                                                               redis_db: Any) -> None:
    settings = AppSettings(model_dir=str(tiny_model_dir), model_name=MODEL, cache={"redis_url": redis_db.url(3)},
                           autoscaling={"min_replicas": 1, "max_replicas": 1})
    with serve_app(settings) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
        client.completions.create(model=MODEL, prompt=LONG_PROMPT, max_tokens=1)
        deadline = time.monotonic() + 10
        while warm_keys(redis_db, 3) == 0 and time.monotonic() < deadline:  # written behind the prefill
            time.sleep(0.1)
        stored = warm_keys(redis_db, 3)
        assert stored > 0
        with redis_db.client(3) as redis:
            redis.flushdb()  # as if Redis had evicted them: only the replica's hot tier still has the blocks

        stream = client.completions.create(model=MODEL, prompt="Drain me", max_tokens=200, temperature=0,
                                           stream=True, stream_options={"include_usage": True},
                                           extra_body={"ignore_eos": True})
        chunks = iter(stream)
        first = next(chunks)
        deleting = threading.Thread(target=serve.delete, args=(APP_NAME,))
        deleting.start()  # Serve waits for the in-flight stream, then calls the replica's __del__
        rest = list(chunks)
        deleting.join(timeout=120)
        assert not deleting.is_alive()
        pieces = [first, *rest]
        assert pieces[-1].usage is not None and pieces[-1].usage.completion_tokens == 200  # all of it arrived
        assert pieces[-2].choices[0].finish_reason == "length"
        assert warm_keys(redis_db, 3) >= stored  # the long prompt's blocks (and the new request's) are back
        assert httpx.get(f"{base}/health", timeout=10).status_code == 404  # the application is gone
