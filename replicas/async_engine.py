"""Async streaming front of the engine: `generate()` yields each token as it is produced (`generate_chunks()` in
chunks, for consumers that pay per message), `abort()` stops one. Text and stop strings are made on the
consumer's side (output_processor.py), not on the step thread.

This is the client side of the engine core: callers (the replica, tests) go through its methods, never through
`.engine`. A single background thread owns the `LLMEngine` and runs its steps (torch releases the GIL inside kernels, so
the event loop stays responsive). Requests and aborts reach that thread through a thread-safe inbox; outputs go
back to each request's asyncio queue with `call_soon_threadsafe`. A request whose consumer stops iterating
(client disconnect, cancellation) is aborted and its KV blocks are freed.
`stats()` also reports this process's CPU seconds, its GPUs' use (when it uses CUDA) and the KV pool's internal
fragmentation; `queue_seconds()` how long a request waited before its first scheduled step.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

import torch

from moe_serve.replicas.engine import LLMEngine, StepOutput
from moe_serve.replicas.output_processor import OutputProcessor
from moe_serve.replicas.sampling import SamplingParams

IDLE_WAIT_S = 0.002  # inbox wait while every waiting request's cache lookup is still out


@dataclass(frozen=True)
class _Add:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrived: float = field(default_factory=time.perf_counter)  # when it reached this engine


@dataclass(frozen=True)
class _Abort:
    request_id: str


class EngineDeadError(RuntimeError):
    """The engine thread failed; requests cannot be served until the engine is rebuilt."""


def _output(item: StepOutput | BaseException) -> StepOutput:
    if isinstance(item, BaseException):
        raise item
    return item


async def _more(outputs: asyncio.Queue[StepOutput | BaseException], interval_s: float | None) -> list[StepOutput]:
    """What joins a chunk after its first item: outputs ready within interval_s (None: up to the last one)."""
    if interval_s is None:
        more = []
        while not more or not more[-1].finished:
            more.append(_output(await outputs.get()))
        return more
    if interval_s > 0:
        await asyncio.sleep(interval_s)
    more = []
    while not outputs.empty() and not (more and more[-1].finished):
        more.append(_output(outputs.get_nowait()))
    return more


def _processed(text: OutputProcessor, items: list[StepOutput]) -> list[StepOutput]:
    """The items with their text, up to the one that finishes the request (a stop string may end it early)."""
    chunk = []
    for item in items:
        chunk.append(text.process(item))
        if text.finished:
            break
    return chunk


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._inbox: queue.SimpleQueue[_Add | _Abort | None] = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[StepOutput | BaseException]]] = {}
        self._ids = itertools.count()
        self._error: BaseException | None = None
        self._unscheduled: dict[str, float] = {}  # request id -> arrival, until its first step (engine thread's)
        self._queue_s: dict[str, float] = {}  # request id -> arrival to first step, while its stream lives
        self._thread = threading.Thread(target=self._run, name="moe-engine", daemon=True)
        self._thread.start()

    async def generate(
        self, prompt_ids: Sequence[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[StepOutput]:
        async with aclosing(self.generate_chunks(prompt_ids, params, request_id, interval_s=0.0)) as chunks:
            async for chunk in chunks:
                for item in chunk:
                    yield item

    async def generate_chunks(
        self, prompt_ids: Sequence[int], params: SamplingParams, request_id: str | None = None,
        interval_s: float | None = 0.0,
    ) -> AsyncIterator[list[StepOutput]]:
        """The request's outputs in chunks: the first token alone, as soon as it exists (time to first token),
        then whatever was produced in the following `interval_s` per chunk (0: what is ready, no waiting; None:
        the rest in one chunk at the end). Fewer, larger messages cost the stream's consumers far less CPU per
        token than one message per token."""
        if self._error is not None:
            raise EngineDeadError(f"engine thread failed: {self._error!r}")
        self.engine.validate(prompt_ids, params)  # bad input fails here, in the caller, with a clear message
        request_id = request_id or f"async-{next(self._ids)}"
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        outputs: asyncio.Queue[StepOutput | BaseException] = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), outputs)
        self._inbox.put(_Add(request_id, list(prompt_ids), params))
        resumed = prompt_ids[len(prompt_ids) - params.resumed_tokens :] if params.resumed_tokens else ()
        text = OutputProcessor(self.engine.tokenizer, params, resumed=resumed)  # made here, off the step thread
        first = True
        try:
            while not text.finished:
                items = [_output(await outputs.get())]
                if not first and not items[-1].finished:
                    items += await _more(outputs, interval_s)
                first = False
                yield _processed(text, items)
        finally:
            self._streams.pop(request_id, None)
            self._queue_s.pop(request_id, None)
            if not text.finished or text.stopped_early:  # the client left, or a stop string ended it here
                self._inbox.put(_Abort(request_id))

    def stats(self) -> dict[str, Any]:
        """Load of this engine (read without locking: a snapshot for metrics and autoscaling, not an invariant).

        kv_reserved_unused_slots: token slots of the running sequences' blocks that hold no token yet (each sequence's
        last block is partly filled: internal fragmentation); kv_fragmentation_fraction: their share of those blocks'
        slots. cpu_seconds: this process's CPU time (user + system, every thread); gpus: per CUDA device this process
        uses, utilization (0-1, None without NVML) and memory_used_bytes; empty without CUDA."""
        engine = self.engine
        kv = engine.kv_stats()
        budget = engine.step_budget
        reserved, unused = self._reserved_slots()
        return {
            "waiting": self.num_waiting(),
            "running": len(engine.scheduler.running),
            "kv_used_fraction": kv["blocks_in_use"] / kv["blocks_total"],
            "kv_blocks_in_use": kv["blocks_in_use"],
            "kv_blocks_shared": kv["blocks_shared"],
            "kv_blocks_evictable": kv["blocks_evictable"],
            "step_seconds": budget.last_step_s if budget else 0.0,
            "step_budget_seconds": budget.max_step_s if budget else 0.0,
            "steps_over_budget": budget.over_budget_steps if budget else 0,
            "preemptions": engine.scheduler.num_preemptions,
            "kv_reserved_unused_slots": unused,
            "kv_fragmentation_fraction": unused / reserved if reserved else 0.0,
            "cpu_seconds": time.process_time(),
            "gpus": gpu_usage(),
            "healthy": self._error is None and self._thread.is_alive(),
        }

    def _reserved_slots(self) -> tuple[int, int]:
        """(slots, unused slots) of the blocks the running sequences hold."""
        block_size = self.engine.kv.spec.block_size
        reserved = unused = 0
        for seq in list(self.engine.scheduler.running):
            slots = len(seq.block_table) * block_size
            reserved += slots
            unused += max(0, slots - seq.num_computed)
        return reserved, unused

    def queue_seconds(self, request_id: str) -> float | None:
        """Time from `request_id` reaching this engine (`generate_chunks`) to the start of the first step that
        scheduled it; None before then. Known once its first output is out, and while its stream lives."""
        return self._queue_s.get(request_id)

    def num_waiting(self) -> int:
        """Requests not yet running: queued in the engine or still in the inbox."""
        return len(self.engine.scheduler.waiting) + self._inbox.qsize()

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def cache_metrics(self) -> bytes:
        """Prometheus text of the prefix cache (hits per tier, lookups, lookup wait, Redis); empty when off."""
        prefix = self.engine.prefix_cache
        return prefix.stats.prometheus_text() if prefix is not None else b""

    def cache_stats(self) -> dict[str, object] | None:
        """The prefix cache's counters and the pool's blocks; None when off."""
        prefix = self.engine.prefix_cache
        if prefix is None:
            return None
        return {**prefix.stats.as_dict(), "pool": self.engine.kv_stats()}

    def abort(self, request_id: str) -> None:
        self._inbox.put(_Abort(request_id))

    def shutdown(self) -> None:
        self._inbox.put(None)
        self._thread.join(timeout=10)

    def drain_cache(self) -> int:
        """After `shutdown`: hand the pool's cached blocks to the remote tiers and close them; returns how many."""
        prefix = self.engine.prefix_cache
        if prefix is None:
            return 0
        drained = prefix.drain()
        prefix.close()
        return drained

    # --- engine thread -------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            timeout: float | None = None
            while self._drain_inbox(block=not self.engine.has_unfinished(), timeout=timeout):
                started = time.perf_counter()
                outputs = self.engine.step()
                if self._unscheduled:
                    self._note_scheduled(started, outputs)
                for output in outputs:
                    self._deliver(output.request_id, output)
                    if output.finished:
                        self.engine.pop_result(output.request_id)
                # nothing ran: the waiting requests' cache lookups are out; wait on the inbox, not in a spin
                timeout = IDLE_WAIT_S if not outputs and not self.engine.scheduler.running else None
        except BaseException as exc:  # surface the failure to every waiting caller instead of hanging them
            self._error = exc
            for request_id in list(self._streams):
                self._deliver(request_id, EngineDeadError(f"engine thread failed: {exc!r}"))

    def _note_scheduled(self, started: float, outputs: list[StepOutput]) -> None:
        """Requests the step begun at `started` scheduled for the first time: running now, or finished in it."""
        scheduled = {seq.request_id for seq in self.engine.scheduler.running} | {o.request_id for o in outputs}
        for request_id in [r for r in self._unscheduled if r in scheduled]:
            self._queue_s[request_id] = started - self._unscheduled.pop(request_id)

    def _drain_inbox(self, block: bool, timeout: float | None = None) -> bool:
        """Apply pending adds and aborts, waiting for the first one if `block` (forever) or `timeout` (seconds);
        False when shut down."""
        while True:
            try:
                message = self._inbox.get(block=block or timeout is not None, timeout=None if block else timeout)
            except queue.Empty:
                return True
            block, timeout = False, None
            if message is None:
                return False
            if isinstance(message, _Add):
                self._add(message)
            else:
                self._abort(message.request_id)

    def _add(self, message: _Add) -> None:
        try:
            self.engine.add_request(message.prompt_ids, message.params, message.request_id)
            self._unscheduled[message.request_id] = message.arrived
        except ValueError as exc:
            self._deliver(message.request_id, exc)

    def _abort(self, request_id: str) -> None:
        self._unscheduled.pop(request_id, None)
        self._queue_s.pop(request_id, None)
        if self.engine.has_request(request_id):
            self.engine.abort_request(request_id)
            self.engine.pop_result(request_id)

    def _deliver(self, request_id: str, item: StepOutput | BaseException) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            loop, outputs = stream
            loop.call_soon_threadsafe(outputs.put_nowait, item)


def gpu_usage() -> list[dict[str, Any]]:
    """Per CUDA device of this process: index, utilization (0-1 over NVML's last sample period; None when NVML is
    not there) and memory_used_bytes (torch's reserved memory). Empty unless this process has initialised CUDA."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return []
    devices = []
    for index in range(torch.cuda.device_count()):
        try:
            utilization: float | None = torch.cuda.utilization(index) / 100
        except Exception:  # noqa: BLE001 - no NVML bindings (nvidia-ml-py) or no NVML driver library
            utilization = None
        devices.append({"index": index, "utilization": utilization,
                        "memory_used_bytes": torch.cuda.memory_reserved(index)})
    return devices
