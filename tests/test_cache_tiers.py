"""Tier building blocks without Redis: circuit breaker, cost models, the directory store."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import torch

from moe_serve.cache import CachedBlock
from moe_serve.cache.breaker import CircuitBreaker, CircuitState
from moe_serve.cache.cost import RecomputeModel, TransferModel
from moe_serve.cache.tiers import DirectoryStore


def block(nbytes: int = 1024) -> CachedBlock:
    return CachedBlock(torch.zeros(nbytes // 4))


def test_breaker_opens_after_consecutive_failures_and_probes_after_cooldown() -> None:
    now = [0.0]
    breaker = CircuitBreaker(failures=3, cooldown_s=1.0, clock=lambda: now[0])
    breaker.record_failure()
    breaker.record_success()  # a success resets the count
    for _ in range(2):
        breaker.record_failure()
    assert breaker.allow() and breaker.state is CircuitState.CLOSED
    breaker.record_failure()
    assert breaker.state is CircuitState.OPEN and not breaker.allow()
    now[0] = 1.5
    assert breaker.allow() and breaker.state is CircuitState.HALF_OPEN  # the probe
    assert not breaker.allow()  # only one probe at a time
    breaker.record_failure()  # probe failed: open for another cool-down
    assert breaker.state is CircuitState.OPEN and not breaker.allow()
    now[0] = 3.0
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state is CircuitState.CLOSED and breaker.times_opened == 2


def test_transfer_model_learns_round_trip_and_bandwidth() -> None:
    model = TransferModel(round_trip_s=1e-3, bandwidth_bps=1e6)  # a pessimistic prior
    for _ in range(200):
        for nbytes in (1_000, 100_000, 1_000_000):
            model.observe(nbytes, 2e-4 + nbytes / 1e9)
    round_trip, per_byte = model.fit()
    assert abs(round_trip - 2e-4) < 2e-5 and abs(per_byte * 1e9 - 1) < 0.05
    assert abs(model.estimate(10_000_000) - (2e-4 + 1e-2)) < 1e-3


def test_recompute_model_averages_reports() -> None:
    model = RecomputeModel()
    assert model.estimate(100) is None
    model.observe(1000, 1.0)
    assert model.estimate(100) == 0.1
    model.observe(0, 1.0)  # ignored
    assert model.seconds_per_token == 1e-3


def test_directory_store_ttl_nx_and_atomic_files(tmp_path: Path) -> None:
    store = DirectoryStore("cold", tmp_path, ttl_s=60)

    async def run() -> None:
        first = await store.put_many([("ab" * 16, b"one"), ("cd" * 16, b"two")])
        assert sorted(first.written) == ["ab" * 16, "cd" * 16]
        again = await store.put_many([("ab" * 16, b"other")])
        assert again.written == [] and again.present == 1  # not rewritten
        assert await store.get_many(["ab" * 16, "ef" * 16]) == [b"one", None]
        assert await store.exists_many(["cd" * 16, "ef" * 16]) == [True, False]
        old = time.time() - 120
        os.utime(store.path("cd" * 16), (old, old))  # older than the TTL: expired
        assert await store.get_many(["cd" * 16]) == [None]
        assert not store.path("cd" * 16).exists()
        await store.delete_many(["ab" * 16])
        assert await store.get_many(["ab" * 16]) == [None]

    asyncio.run(run())
    assert not list(tmp_path.rglob("*.tmp"))
