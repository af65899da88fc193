"""Prefix-affinity routing: rendezvous hashing properties, and same-prefix requests landing on one replica."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import serve_app
from moe_serve.replicas.api import REPLICA_HEADER
from moe_serve.replicas.routing import prefix_digest, rendezvous_order
from moe_serve.replicas.settings import AppSettings


def test_rendezvous_moves_only_the_removed_replicas_prefixes() -> None:
    replicas = [f"replica-{i}" for i in range(4)]
    digests = [prefix_digest(list(range(i, i + 40))) for i in range(200)]
    before = {d: rendezvous_order(d, replicas)[0] for d in digests}
    after = {d: rendezvous_order(d, replicas[:3])[0] for d in digests}
    moved = [d for d in digests if before[d] != after[d]]
    assert moved and all(before[d] == "replica-3" for d in moved)
    assert len(set(before.values())) == 4  # prefixes spread over every replica


def test_digest_covers_only_the_affinity_prefix() -> None:
    shared = list(range(100, 132))
    assert prefix_digest(shared + [1, 2]) == prefix_digest(shared + [7])
    assert prefix_digest([5] + shared) != prefix_digest(shared)


@pytest.fixture(scope="module")
def base_url(tiny_model_dir: Path) -> Iterator[str]:
    settings = AppSettings(model_dir=str(tiny_model_dir), model_name="tiny", replica_num_cpus=0.25,
                           autoscaling={"min_replicas": 2, "max_replicas": 2})
    with serve_app(settings) as url:
        yield url


def served_by(base_url: str, prompt: list[int]) -> str:
    response = httpx.post(f"{base_url}/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 2},
                          timeout=60)
    assert response.status_code == 200, response.text
    return response.headers[REPLICA_HEADER]


def test_same_prefix_same_replica(base_url: str) -> None:
    system_prompt = list(range(10, 50))
    replicas = {served_by(base_url, system_prompt + [60 + i]) for i in range(6)}
    assert len(replicas) == 1
    spread = {served_by(base_url, list(range(i * 7 + 3, i * 7 + 43))) for i in range(12)}
    assert len(spread) == 2  # different prefixes use both replicas
