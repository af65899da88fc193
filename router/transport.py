"""Transports: how a replica's MoE layer call reaches the router and its shards, and comes back.

- "plain": one actor call to `Router.moe`, which makes one actor call per shard (two nested hops).
- "routed": one actor call to `Router.moe`, and the router drives a compiled graph of its own to the shards
  (`compile_shard_fanout`). Any number of callers (engine replicas) can share it: the Serve app's transport.
- "compiled": a Ray compiled graph driven by the caller, caller -> `Router.dispatch_all` -> every shard's
  `forward_packed` -> `Router.combine_all` -> caller. No actor call at all, but one caller only: an actor runs one
  compiled graph at a time. The CLI's transport.
Graphs live in a `ManagedGraph`: when one fails (a shard died, a channel broke) it is torn down, the call is made
again on plain actor calls, whose router retries until Ray has restarted the shard, and the graph is compiled again
`recompile_after_s` later.
Compiled-graph channel readers busy-poll: Ray 2.60's `PlasmaObjectHeader::ReadAcquire` loops on `sched_yield`
until the next value is written, so every actor of a live graph spins while it waits (20-40 % of a core each on
the 2-core machine this was measured on, even with no call in flight). Two remedies, both optional:
`idle_teardown_s` tears an unused graph down (the next call compiles it again), and `poll="sleep"` makes the
graph's readers poll with a short exponential-backoff sleep instead of spinning (`install_sleeping_reads`).
Knows nothing of models or serving: arrays in, arrays out.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any, Literal, NoReturn, Protocol, TypeVar

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, RayActorError, RaySystemError

logger = logging.getLogger(__name__)

TransportKind = Literal["plain", "compiled", "routed"]
PollMode = Literal["spin", "sleep"]
TRANSPORTS: tuple[TransportKind, ...] = ("plain", "compiled", "routed")
T = TypeVar("T")
# Errors after which a compiled graph is no longer trusted: dead actors, closed or timed-out channels.
GRAPH_ERRORS = (RayActorError, RaySystemError, GetTimeoutError)


class Transport(Protocol):
    def __call__(self, layer: int, x: np.ndarray) -> np.ndarray:
        """Routed-expert output [T, D] of MoE layer `layer` for hidden states [T, D]."""
        ...

    def submit(self, layer: int, x: np.ndarray) -> Callable[[], np.ndarray]:
        """Start the same layer call and return what waits for its output; the caller waits for its calls in the
        order it submitted them, with at most two in flight (micro-batch overlap)."""
        ...

    def reconnect(self, router: Any) -> None:
        """Use this router actor handle from now on (the router was replaced)."""
        ...

    def stats(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class CompiledGraphConfig:
    buffer_size_bytes: int | None = None  # per channel; None: Ray's default (1 MB); channels grow when needed
    submit_timeout_s: float = 10.0  # waiting for the graph to take an input
    get_timeout_s: float = 60.0  # waiting for a layer's result (a restarted shard reloads its experts first)
    recompile_after_s: float = 2.0  # after a failure, plain calls for this long before compiling again
    ready_timeout_s: float = 1.0  # every actor must answer within this before a compile is tried
    idle_teardown_s: float | None = 10.0  # tear an unused graph down after this long; None: keep it
    max_compile_failures: int = 3  # then stay on plain calls for good
    poll: PollMode = "spin"  # "sleep": readers back off between polls (`install_sleeping_reads`)
    poll_sleep_s: tuple[float, float] = (1e-5, 5e-5)  # first and longest sleep between polls in "sleep" mode

    def __post_init__(self) -> None:
        if self.buffer_size_bytes is not None and self.buffer_size_bytes <= 0:
            raise ValueError(f"CompiledGraphConfig.buffer_size_bytes must be positive, got {self.buffer_size_bytes}")
        if self.poll not in ("spin", "sleep"):
            raise ValueError(f"CompiledGraphConfig.poll must be spin or sleep, got {self.poll!r}")
        for name in ("submit_timeout_s", "get_timeout_s", "recompile_after_s", "ready_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"CompiledGraphConfig.{name} must be positive, got {getattr(self, name)}")
        if self.idle_teardown_s is not None and self.idle_teardown_s <= 0:
            raise ValueError(
                f"CompiledGraphConfig.idle_teardown_s must be positive or None, got {self.idle_teardown_s}")


class PlainTransport:
    """One actor call to `Router.moe` per layer; `kind` "routed" when the router drives a graph to its shards."""

    def __init__(self, router: Any, kind: TransportKind = "plain") -> None:
        self.router = router
        self.kind = kind
        self.calls = 0

    def __call__(self, layer: int, x: np.ndarray) -> np.ndarray:
        return self.submit(layer, x)()

    def submit(self, layer: int, x: np.ndarray) -> Callable[[], np.ndarray]:
        self.calls += 1
        ref = self.router.moe.remote(layer, x)
        return lambda: np.array(ray.get(ref))  # the object-store copy is read-only

    def reconnect(self, router: Any) -> None:
        self.router = router

    def stats(self) -> dict[str, Any]:
        return {"kind": self.kind, "calls": self.calls}

    def close(self) -> None:
        pass


def install_sleeping_reads(min_sleep_s: float, max_sleep_s: float) -> None:
    """Make this process's shared-memory channel reads poll without spinning: try once, then sleep with
    exponential backoff (min_sleep_s doubling up to max_sleep_s) until the value is there or the timeout passes.

    Patches `ray.experimental.channel.shared_memory_channel.Channel.read` (Ray 2.60) in this process only; a
    zero timeout keeps its single-try meaning. Idempotent; the latest backoff wins.
    """
    from ray.exceptions import RayChannelTimeoutError
    from ray.experimental.channel import shared_memory_channel

    channel = shared_memory_channel.Channel
    spinning_read = getattr(channel.read, "spinning_read", channel.read)

    def read(self: Any, timeout: float | None = None) -> Any:
        if timeout == 0:
            return spinning_read(self, 0)
        deadline = None if timeout is None or timeout < 0 else time.monotonic() + timeout
        delay = min_sleep_s
        while True:
            try:
                return spinning_read(self, 0)
            except RayChannelTimeoutError:
                if deadline is not None and time.monotonic() >= deadline:
                    raise
                time.sleep(delay)
                delay = min(2 * delay, max_sleep_s)

    read.spinning_read = spinning_read  # type: ignore[attr-defined]
    channel.read = read


def _install_sleeping_reads_on_actor(actor_self: Any, min_sleep_s: float, max_sleep_s: float) -> None:
    install_sleeping_reads(min_sleep_s, max_sleep_s)


def compile_exchange(router: Any, shards: list[Any], config: CompiledGraphConfig) -> Any:
    """The per-layer graph: (layer, x) -> router.dispatch_all -> shard_i.forward_packed -> router.combine_all."""
    from ray.dag import InputNode

    with InputNode() as inp:
        # num_shards messages, then the LayerStep, which stays in the router's process (intra-process channel)
        outs = router.dispatch_all.options(num_returns=len(shards) + 1).bind(inp[0], inp[1])
        results = [shard.forward_packed.bind(outs[i]) for i, shard in enumerate(shards)]
        dag = router.combine_all.bind(outs[len(shards)], *results)
    return dag.experimental_compile(
        _submit_timeout=config.submit_timeout_s,
        _buffer_size_bytes=config.buffer_size_bytes,
        _max_inflight_executions=2,  # micro-batch overlap: both halves of a batch in flight
    )


class GraphDown(Exception):
    """The managed graph is not live (not compiled yet, torn down, or it just failed): use the fallback path."""


class ManagedGraph:
    """A compiled graph that compiles on first use once its actors answer, is torn down when it fails or idles, and
    compiles again `recompile_after_s` after a failure. `execute` and `submit` raise `GraphDown` whenever the caller
    must take its fallback path instead. `execute` holds a lock from submission to result, so any number of threads
    may share the graph; `submit` lets one caller keep two executions in flight (micro-batch overlap)."""

    def __init__(self, build: Callable[[], Any], actors: Callable[[], list[Any]], config: CompiledGraphConfig,
                 ) -> None:
        """`build` compiles the graph (its actors are up); `actors` lists the actors it runs on."""
        self.build = build
        self.actors = actors
        self.config = config
        self._graph: Any = None
        self._retry_at = 0.0  # monotonic time from which a compile may be tried
        self._last_call = time.monotonic()
        self._lock = threading.RLock()  # execute holds it across submit and result
        self._closed = False
        self.counts = {"graph_calls": 0, "fallback_calls": 0, "compiles": 0, "compile_failures": 0,
                       "graph_failures": 0, "idle_teardowns": 0}
        self._idle_watch: threading.Thread | None = None

    @property
    def live(self) -> bool:
        return self._graph is not None

    def execute(self, *args: Any, take: Callable[[Any], T]) -> T:
        """`take(result)` of one execution, called with the lock held: the result's arrays live in channel buffers
        that the next execution overwrites, so `take` copies what it keeps. Raises GraphDown when not live."""
        with self._lock:
            return self._submit(args, take)()

    def submit(self, *args: Any, take: Callable[[Any], T]) -> Callable[[], T]:
        """Start one execution now and return what waits for its `take(result)` (raising GraphDown if the graph
        failed meanwhile). One caller only, waiting for each execution in submission order, and no more in flight
        than the graph was compiled for."""
        with self._lock:
            return self._submit(args, take)

    def _submit(self, args: tuple[Any, ...], take: Callable[[Any], T]) -> Callable[[], T]:
        self._last_call = time.monotonic()  # idle time counts from the last submit or result
        if self._graph is None and not self._closed and time.monotonic() >= self._retry_at:
            self._compile()
        graph = self._graph
        if graph is None:
            self.counts["fallback_calls"] += 1
            raise GraphDown
        try:
            ref = graph.execute(*args)
        except GRAPH_ERRORS as exc:
            self._failed(graph, exc)

        def result() -> T:
            with self._lock:
                try:
                    out = take(ray.get(ref, timeout=self.config.get_timeout_s))
                    self.counts["graph_calls"] += 1
                    return out
                except GRAPH_ERRORS as exc:
                    self._failed(graph, exc)
                finally:
                    self._last_call = time.monotonic()

        return result

    def _failed(self, graph: Any, exc: Exception) -> NoReturn:
        """Drop `graph` (unless already replaced), count the call as a fallback one, and raise GraphDown."""
        if graph is self._graph:
            logger.warning("compiled graph failed (%s: %s); fallback calls until it is rebuilt",
                           type(exc).__name__, exc)
            self.counts["graph_failures"] += 1
            self._teardown()
            self._retry_at = time.monotonic() + self.config.recompile_after_s
        self.counts["fallback_calls"] += 1
        raise GraphDown from exc

    def reset(self) -> None:
        """Tear the graph down now (its actors changed); the next call compiles again."""
        with self._lock:
            self._teardown()
            self._retry_at = 0.0

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._teardown()

    # --- lifecycle (called with the lock held) -------------------------------------------------------------

    def _compile(self) -> None:
        if self.counts["compile_failures"] >= self.config.max_compile_failures:
            return
        actors = self.actors()
        ready, _ = ray.wait([a.__ray_ready__.remote() for a in actors], num_returns=len(actors),
                            timeout=self.config.ready_timeout_s)
        if len(ready) < len(actors):  # an actor is still (re)starting: compiling now would hang
            self._retry_at = time.monotonic() + self.config.recompile_after_s
            return
        try:
            if self.config.poll == "sleep":  # in every process that reads a channel (actors restart bare)
                install_sleeping_reads(*self.config.poll_sleep_s)
                ray.get([a.__ray_call__.remote(_install_sleeping_reads_on_actor, *self.config.poll_sleep_s)
                         for a in actors])
            self._graph = self.build()
            self.counts["compiles"] += 1
        except Exception as exc:  # noqa: BLE001 - any compile failure leaves the fallback path working
            logger.warning("compiling the expert graph failed (%s: %s); using fallback calls",
                           type(exc).__name__, exc)
            self.counts["compile_failures"] += 1
            self._retry_at = time.monotonic() + self.config.recompile_after_s
            return
        self._start_idle_watch()

    def _teardown(self) -> None:
        graph, self._graph = self._graph, None
        if graph is not None:
            try:
                graph.teardown()
            except Exception as exc:  # noqa: BLE001 - a half-dead graph must not fail the call that drops it
                logger.warning("compiled graph teardown: %s: %s", type(exc).__name__, exc)

    def _start_idle_watch(self) -> None:
        if self.config.idle_teardown_s is None or (self._idle_watch is not None and self._idle_watch.is_alive()):
            return
        self._idle_watch = threading.Thread(target=self._watch_idle, name="moe-graph-idle", daemon=True)
        self._idle_watch.start()

    def _watch_idle(self) -> None:
        """Tear the graph down once it has been unused for `idle_teardown_s`: its readers spin while idle."""
        idle_s = self.config.idle_teardown_s
        assert idle_s is not None
        while True:
            time.sleep(idle_s / 4)
            with self._lock:
                if self._graph is None:
                    self._idle_watch = None
                    return
                if time.monotonic() - self._last_call >= idle_s:
                    self.counts["idle_teardowns"] += 1
                    self._teardown()
                    self._idle_watch = None
                    return


def compile_shard_fanout(shards: list[Any], config: CompiledGraphConfig) -> Any:
    """The router-driven graph: the router's process writes one message per shard, every shard's `forward_packed`
    runs, and the router reads their outputs (a list in shard order)."""
    from ray.dag import InputNode, MultiOutputNode

    with InputNode() as inp:
        dag = MultiOutputNode([shard.forward_packed.bind(inp[i]) for i, shard in enumerate(shards)])
    return dag.experimental_compile(
        _submit_timeout=config.submit_timeout_s,
        _buffer_size_bytes=config.buffer_size_bytes,
        _max_inflight_executions=1,
    )


class CompiledTransport:
    """The caller-driven compiled graph when it is up, the plain transport while it is down. Calls are serialised.
    Only one caller can drive it: an actor runs one compiled graph at a time."""

    def __init__(self, router: Any, shards: list[Any], config: CompiledGraphConfig = CompiledGraphConfig()) -> None:
        self.router = router
        self.shards = shards
        self.config = config
        self.plain = PlainTransport(router)
        self.graph = ManagedGraph(lambda: compile_exchange(self.router, self.shards, config),
                                  lambda: [self.router, *self.shards], config)

    def __reduce__(self) -> tuple:
        # The graph belongs to the process that compiled it: a copy elsewhere compiles its own.
        return CompiledTransport, (self.router, self.shards, self.config)

    @property
    def live(self) -> bool:
        return self.graph.live

    def __call__(self, layer: int, x: np.ndarray) -> np.ndarray:
        try:
            return self.graph.execute(layer, x, take=np.array)  # own the memory: the channel buffer is reused
        except GraphDown:
            return self.plain(layer, x)

    def submit(self, layer: int, x: np.ndarray) -> Callable[[], np.ndarray]:
        try:
            result = self.graph.submit(layer, x, take=np.array)
        except GraphDown:
            return self.plain.submit(layer, x)

        def wait() -> np.ndarray:
            try:
                return result()
            except GraphDown:
                return self.plain(layer, x)

        return wait

    def reconnect(self, router: Any) -> None:
        self.router = self.plain.router = router
        self.graph.reset()

    def stats(self) -> dict[str, Any]:
        return {"kind": "compiled", "live": self.live, **self.graph.counts}

    def close(self) -> None:
        self.graph.close()


def make_transport(
    kind: TransportKind, router: Any, shards: list[Any], config: CompiledGraphConfig = CompiledGraphConfig()
) -> Transport:
    if kind in ("plain", "routed"):  # "routed": the router was started with RouterConfig(shard_graph=True)
        return PlainTransport(router, kind)
    if kind == "compiled":
        return CompiledTransport(router, shards, config)
    raise ValueError(f"unknown transport {kind!r}; choose one of {', '.join(TRANSPORTS)}")
