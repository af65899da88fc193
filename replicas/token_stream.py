"""The ingress's side of the engine replicas' token streams: one `TokenStream` per choice, collected whole or
merged as they come.

The replica streams dicts carrying the tokens generated since the last one (`token_ids`, merged `text`,
`finished`, `finish_reason`, `cached_tokens`, and `logprobs` / `prompt_logprobs` when asked); the first item is
fetched before any response byte is sent, so the replica's errors become 4xx answers.
Metrics: time to first token and the replica's queue time with the first item, the inter-token gaps with each later
item (ServingMetrics.observe_chunk), end-to-end latency and tokens when the stream ends.
Request migration: when the replica serving a stream dies (its stream raises), the request is sent again (`resume`)
with the tokens produced so far appended to the prompt and the remaining budget, to another replica or the restarted
one, for up to MIGRATION_WINDOW_S; the client sees one uninterrupted response. A seeded or greedy request gives the
same tokens as without the failure (the new replica's random stream skips the draws already made).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from moe_serve.replicas.logprobs import Entry
from moe_serve.replicas.metrics import ServingMetrics
from moe_serve.replicas.protocol import APIError

log = logging.getLogger("ray.serve")

MIGRATION_WINDOW_S = 60.0  # how long a stream keeps resending after its replica died (a restart takes seconds)
# produced token ids -> the same request's stream for the rest, or None when nothing remains to generate
Resume = Callable[[list[int]], Any]


class StreamCutShort(ConnectionError):
    """A replica's stream ended without a finished item."""


class TokenStream:
    """The replica's token stream, with the first item fetched early, metrics recorded on the way, and the request
    migrated to another replica (`resume`) when its replica dies."""

    def __init__(self, generator: Any, metrics: ServingMetrics, resume: Resume | None = None) -> None:
        self.generator = generator
        self.metrics = metrics
        self.resume = resume
        self.start = time.perf_counter()
        self._last_tokens_at = self.start  # when the latest item with tokens arrived
        self.token_ids: list[int] = []  # produced so far, on every replica this request ran on
        self.migrations = 0
        self.cached_tokens = 0
        self._original_prompt = True  # the running generator's prompt is the request's (nothing produced was added)
        self.replica = ""
        self.error: str | None = None  # set when the replica fails mid-stream
        self.prompt_logprobs: list[Entry | None] | None = None  # with the first item, when the prompt was scored
        self._first: dict[str, Any] | None = None

    @property
    def tokens(self) -> int:
        return len(self.token_ids)

    async def _next(self) -> dict[str, Any]:
        """The next item of an unfinished request; when its replica died, the request resent with what it produced."""
        deadline = None
        while True:
            try:
                item = await anext(self.generator, None)
                if item is None:  # only a finished item ends a stream: this one was cut
                    raise StreamCutShort("the engine replica's stream ended before the request finished")
                return item
            except Exception as exc:  # the replica died (or its engine failed)
                deadline = deadline or time.monotonic() + MIGRATION_WINDOW_S
                if self.resume is None or time.monotonic() >= deadline:
                    raise
                log.warning("engine replica failed after %d tokens (%s); resending the request",
                            len(self.token_ids), type(exc).__name__)
                self.migrations += 1
                self.metrics.migrations.inc()
                await asyncio.sleep(min(0.1 * 2 ** min(self.migrations, 4), 1.0))  # let Serve see the death
                self.generator = self.resume(list(self.token_ids))
                self._original_prompt = not self.token_ids
                if self.generator is None:  # the budget was spent: only the finish was lost
                    return {"token_ids": [], "text": "", "finished": True, "finish_reason": "length",
                            "cached_tokens": self.cached_tokens, "logprobs": []}

    async def first(self) -> None:
        try:
            item = await self._next()
        except Exception as exc:  # no replica answered within the migration window: the client may retry
            raise APIError(503, f"engine replica unavailable: {type(exc).__name__}") from exc
        if "error" in item:
            raise APIError(item["error"]["status"], item["error"]["message"])
        self._last_tokens_at = time.perf_counter()
        self.metrics.ttft.observe(self._last_tokens_at - self.start)
        if item.get("queue_seconds") is not None:
            self.metrics.queue_time.observe(item["queue_seconds"])
        self.replica = item.get("replica", "")
        self.prompt_logprobs = item.get("prompt_logprobs")
        self._first = item

    async def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        finished = False
        try:
            item = self._first
            while item is not None:
                if "error" in item:  # the replica a migrated request reached refused it (a full queue)
                    self.error = f"engine replica refused the migrated request: {item['error']['message']}"
                    break
                self.token_ids += item["token_ids"]
                if self._original_prompt:  # a resumed prompt's cached tokens would count produced ones
                    self.cached_tokens = item["cached_tokens"]
                finished = item["finished"]
                yield item
                if finished:
                    break
                try:
                    item = await self._next()
                except Exception as exc:  # no replica took the request within the migration window
                    self.error = f"engine replica failed mid-stream: {type(exc).__name__}"
                    item = None
                if item is not None and item.get("token_ids"):
                    now = time.perf_counter()
                    self.metrics.observe_chunk(now - self._last_tokens_at, len(item["token_ids"]))
                    self._last_tokens_at = now
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
