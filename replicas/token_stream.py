"""The ingress's side of the engine replicas' token streams: one `TokenStream` per choice, collected whole or
merged as they come.

The replica streams dicts carrying the tokens generated since the last one (`token_ids`, merged `text`,
`finished`, `finish_reason`, `cached_tokens`, and `logprobs` / `prompt_logprobs` when asked); the first item is
fetched before any response byte is sent, so the replica's errors become 4xx answers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from moe_serve.replicas.logprobs import Entry
from moe_serve.replicas.metrics import ServingMetrics
from moe_serve.replicas.protocol import APIError


class TokenStream:
    """The replica's token stream, with the first item fetched early and metrics recorded on the way."""

    def __init__(self, generator: Any, metrics: ServingMetrics) -> None:
        self.generator = generator
        self.metrics = metrics
        self.start = time.perf_counter()
        self.tokens = 0
        self.cached_tokens = 0
        self.replica = ""
        self.error: str | None = None  # set when the replica fails mid-stream
        self.prompt_logprobs: list[Entry | None] | None = None  # with the first item, when the prompt was scored
        self._first: dict[str, Any] | None = None

    async def first(self) -> None:
        try:
            item = await self.generator.__anext__()
        except StopAsyncIteration:
            raise APIError(503, "the engine replica ended the stream without output") from None
        except Exception as exc:  # replica died or its engine failed: the client may retry
            raise APIError(503, f"engine replica unavailable: {type(exc).__name__}") from exc
        if "error" in item:
            raise APIError(item["error"]["status"], item["error"]["message"])
        self.metrics.ttft.observe(time.perf_counter() - self.start)
        self.replica = item.get("replica", "")
        self.prompt_logprobs = item.get("prompt_logprobs")
        self._first = item

    async def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        finished = False
        try:
            item = self._first
            while item is not None and "error" not in item:
                self.tokens += len(item["token_ids"])
                self.cached_tokens = item["cached_tokens"]
                finished = item["finished"]
                yield item
                if finished:
                    break
                try:
                    item = await anext(self.generator, None)
                except Exception as exc:  # the replica died mid-stream
                    self.error = f"engine replica failed mid-stream: {type(exc).__name__}"
                    item = None
        finally:
            if not finished:
                self.generator.cancel()  # client went away: the replica aborts and frees the KV blocks
            self.metrics.finish(time.perf_counter() - self.start, self.tokens, finished)


@dataclass
class Collected:
    """A whole non-streamed generation."""

    text: str
    finish_reason: str | None
    token_ids: list[int]
    logprobs: list[Entry]  # empty unless the request asked for logprobs


async def collect(stream: TokenStream) -> Collected:
    parts, reason, token_ids, logprobs = [], None, [], []
    async for item in stream:
        parts.append(item["text"])
        reason = item["finish_reason"]
        token_ids += item["token_ids"]
        logprobs += item.get("logprobs") or []
    if stream.error is not None:
        raise APIError(503, stream.error)
    return Collected("".join(parts), reason, token_ids, logprobs)


async def collect_all(streams: list[TokenStream]) -> list[Collected]:
    try:
        return list(await asyncio.gather(*(collect(s) for s in streams)))
    except BaseException:
        for stream in streams:  # one choice failed: stop the others' generations too
            stream.generator.cancel()
        raise


async def merged(streams: list[TokenStream]) -> AsyncIterator[tuple[int, dict[str, Any]]]:
    """The items of the n streams of one request as they come, each with its choice index."""
    if len(streams) == 1:
        async for item in streams[0]:
            yield 0, item
        return
    items: asyncio.Queue[tuple[int, dict[str, Any] | None]] = asyncio.Queue()

    async def pump(index: int, stream: TokenStream) -> None:
        try:
            async for item in stream:
                items.put_nowait((index, item))
        finally:
            items.put_nowait((index, None))  # this stream is done

    tasks = [asyncio.create_task(pump(i, stream)) for i, stream in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            index, item = await items.get()
            if item is None:
                running -= 1
            else:
                yield index, item
    finally:  # a client that went away cancels every choice's generation
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
