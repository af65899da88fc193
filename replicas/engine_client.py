"""How the ingress reaches an engine replica: over a Serve handle (its own deployment) or in its own process
(`AppSettings.colocated`). Both give the ingress the same calls; a token stream is an async iterator of the replica's
chunk dicts with `cancel()`, which aborts the generation and frees its KV blocks.

In process, a streamed chunk costs no Ray message and no second process (bench/serve_vs_vllm.py's `ours-colocated`
measures it). Over the handle, requests are routed by prompt prefix (routing.py) and the ingress scales apart from
the engines.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, Protocol

from ray.serve.handle import DeploymentHandle

from moe_serve.replicas.engine_replica import EngineReplica


class TokenChunks(Protocol):
    def __aiter__(self) -> AsyncIterator[dict[str, Any]]: ...

    async def __anext__(self) -> dict[str, Any]: ...

    def cancel(self) -> None: ...


class EngineClient(Protocol):
    def generate(self, prompt_ids: list[int], sampling: dict[str, Any], interval_s: float | None) -> TokenChunks: ...

    async def stats(self) -> dict[str, float]: ...

    async def cache_metrics(self) -> bytes: ...

    async def max_model_len(self) -> int: ...


class RemoteEngine:
    """The `EngineReplica` deployment, through its handle."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self.handle = handle

    def generate(self, prompt_ids: list[int], sampling: dict[str, Any], interval_s: float | None) -> TokenChunks:
        return self.handle.options(stream=True).generate.remote(prompt_ids, sampling, interval_s)

    async def stats(self) -> dict[str, float]:
        return await self.handle.stats.remote()

    async def cache_metrics(self) -> bytes:
        return await self.handle.cache_metrics.remote()

    async def max_model_len(self) -> int:
        return await self.handle.max_model_len.remote()


class LocalEngine:
    """An `EngineReplica` built in this process (the ingress's own replica holds the engine)."""

    def __init__(self, replica: EngineReplica) -> None:
        self.replica = replica

    def generate(self, prompt_ids: list[int], sampling: dict[str, Any], interval_s: float | None) -> TokenChunks:
        return _LocalChunks(self.replica.generate(prompt_ids, sampling, interval_s))

    async def stats(self) -> dict[str, float]:
        return self.replica.stats()

    async def cache_metrics(self) -> bytes:
        return self.replica.cache_metrics()

    async def max_model_len(self) -> int:
        return self.replica.max_model_len()


class _LocalChunks:
    def __init__(self, chunks: AsyncIterator[dict[str, Any]]) -> None:
        self._chunks = chunks
        self._closing: asyncio.Task[None] | None = None

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        return self

    async def __anext__(self) -> dict[str, Any]:
        return await self._chunks.__anext__()

    def cancel(self) -> None:
        """Close the generation (its `finally` aborts the request in the engine); safe to call more than once."""
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._close())

    async def _close(self) -> None:
        try:
            await self._chunks.aclose()
        except RuntimeError:  # a task is inside __anext__: cancelling that task closes the generation instead
            pass
