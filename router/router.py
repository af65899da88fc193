"""The router actor: gate, top-k, dispatch to expert shards, gather, combine; load statistics and rebalancing.

It owns the gate weights of every MoE layer and the expert placement, nothing else of the model. Two ways in:
- `moe` (an actor call, from any number of callers): one batched message to each shard that has rows. With
  `RouterConfig.shard_graph` the router drives a Ray compiled graph of its own to the shards (every shard gets a
  message, empty ones included), else it makes plain actor calls, all concurrently; the plain calls are also the
  fallback while that graph is down, and they retry a shard whose actor died (Ray restarts it and it reloads its
  experts), so a request running during a shard failure still completes with the same tokens;
- `dispatch_all` -> every shard's `forward_packed` -> `combine_all`: the same layer call as three tasks of a
  compiled graph that the (single) caller drives (router/transport.py).
Both count the same load statistics. Calls from several engine replicas run on a few threads of the actor; a
compiled graph runs its tasks on a thread of its own; a lock keeps `rebalance` between two dispatches and the
counters consistent either way.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

from moe_serve.cluster.placement import ExpertPlacement
from moe_serve.cluster.shard import ShardMessage
from moe_serve.model.checkpoint import Checkpoint
from moe_serve.model.config import ModelConfig
from moe_serve.router.gate import Gate, dispatch
from moe_serve.router.dispatch import LayerStep, apply_capacity, empty_message, split_by_shard
from moe_serve.router.stats import LoadStats
from moe_serve.router.transport import CompiledGraphConfig, GraphDown, ManagedGraph, compile_shard_fanout

SCRAPE_TIMEOUT_S = 5.0  # how long a metrics scrape waits for the shards' busy seconds


@dataclass(frozen=True)
class RouterConfig:
    capacity_factor: float | None = None  # None: dropless and exact (default)
    max_retries: int = 5  # per shard call, while Ray restarts a dead shard
    retry_backoff_s: float = 0.2
    auto_rebalance_every: int | None = None  # check balance every N calls of the first MoE layer; None: off
    imbalance_threshold: float = 1.5  # rebalance when the busiest shard has this many times the mean load
    shard_graph: bool = False  # `moe` reaches the shards through a compiled graph the router drives
    graph: CompiledGraphConfig = CompiledGraphConfig()  # that graph's settings

    def __post_init__(self) -> None:
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be positive, got {self.capacity_factor}")


class ShardCallFailed(RuntimeError):
    """A shard stayed unreachable through every retry."""


class Router:
    def __init__(
        self,
        model_dir: str,
        placement: ExpertPlacement,
        shards: list[Any],  # ExpertShard actor handles, one per placement shard
        config: RouterConfig = RouterConfig(),
    ) -> None:
        torch.set_num_threads(1)
        self.model = ModelConfig.from_dir(model_dir)
        checkpoint = Checkpoint(Path(model_dir), self.model)
        self.gates = {
            layer: Gate(checkpoint.load_gate(layer), self.model.top_k, self.model.norm_topk_prob)
            for layer in self.model.moe_layer_ids
        }
        if len(shards) != placement.num_shards:
            raise ValueError(f"placement has {placement.num_shards} shards, got {len(shards)} shard actors")
        self.placement = placement
        self.shards = shards
        self.config = config
        self.stats = LoadStats(self.model.num_layers, self.model.num_experts, placement.num_shards)
        self._shard_busy_s: list[float] = []  # as the shards last reported it
        self._first_moe_layer = self.model.moe_layer_ids[0]
        self._calls_since_check = 0
        self._lock = threading.RLock()
        self._empty_messages: dict[tuple[int, int, str], ShardMessage] = {}
        self.shard_graph: ManagedGraph | None = None
        if config.shard_graph:
            self.shard_graph = ManagedGraph(lambda: compile_shard_fanout(self.shards, config.graph),
                                            lambda: self.shards, config.graph)
            if ray.get_runtime_context().was_current_actor_reconstructed:
                # The shards still run the dead router's graph (an actor runs one at a time and nobody tore it
                # down): restart them; plain calls retry meanwhile and the graph compiles once they are back.
                for shard in shards:
                    ray.kill(shard, no_restart=False)

    def moe(self, layer: int, x: np.ndarray) -> np.ndarray:
        """Routed-expert output [T, D] for hidden states [T, D] of one MoE layer."""
        step = self._dispatch(layer, x)
        start = time.perf_counter()
        if self.shard_graph is not None:
            try:
                out = self.shard_graph.execute(*self._all_messages(step, x),
                                               take=lambda outputs: step.combine(dict(enumerate(outputs))))
                self.stats.observe_call(time.perf_counter() - start)
                return self._finish(step, out)
            except GraphDown:
                pass  # plain calls below
        messages = {batch.shard: message for batch, message in zip(step.batches, step.messages)}
        outputs = self._call_shards(messages)
        self.stats.observe_call(time.perf_counter() - start)
        return self._finish(step, step.combine(outputs))

    def close(self) -> None:
        """Tear the shard graph down (before the shards or this actor go)."""
        if self.shard_graph is not None:
            self.shard_graph.close()

    def graph_stats(self) -> dict[str, Any] | None:
        """Counters of the router-driven shard graph (calls, fallbacks, compiles, failures); None when off."""
        return None if self.shard_graph is None else {"live": self.shard_graph.live, **self.shard_graph.counts}

    # --- the caller-driven compiled graph: dispatch_all -> shard.forward_packed -> combine_all --------------

    def dispatch_all(self, layer: int, x: np.ndarray) -> tuple[ShardMessage | LayerStep, ...]:
        """One message per shard (empty when it has no rows), then the step that `combine_all` needs."""
        step = self._dispatch(layer, x)
        return (*self._all_messages(step, x), step)

    def combine_all(self, step: LayerStep, *outputs: np.ndarray) -> np.ndarray:
        """Every shard's output (by shard id, empty ones included) -> routed-expert output [T, D]."""
        return self._finish(step, step.combine(dict(enumerate(outputs))))

    # --- one layer call --------------------------------------------------------------------------------------

    def _dispatch(self, layer: int, x: np.ndarray) -> LayerStep:
        hidden = torch.from_numpy(np.ascontiguousarray(x))
        gate = self.gates[layer]
        logits = gate.logits(hidden)
        routing = gate.route(logits, hidden.dtype)
        with self._lock:  # placement and stats are shared with `rebalance` when a compiled graph runs
            if self.config.capacity_factor is not None:
                routing, moved = apply_capacity(routing, logits, self.config.capacity_factor, gate)
                self.stats.capacity_fallbacks += moved
            plan = dispatch(routing, self.model.num_experts)
            self.stats.count_tokens(layer, plan.counts)
            batches = split_by_shard(plan, self.placement, layer)
        x_sorted = hidden.index_select(0, plan.token_index)
        messages = [batch.message(layer, x_sorted) for batch in batches]
        return LayerStep(layer, routing, plan, batches, messages, hidden.shape[0], tuple(x_sorted.shape),
                         hidden.dtype)

    def _all_messages(self, step: LayerStep, x: np.ndarray) -> list[ShardMessage]:
        """One message per shard, in shard order: its rows, or a shared empty message."""
        key = (step.layer, x.shape[1], x.dtype.str)
        empty = self._empty_messages.get(key)
        if empty is None:
            empty = self._empty_messages[key] = empty_message(step.layer, x.shape[1], x.dtype)
        messages = [empty] * self.placement.num_shards
        for batch, message in zip(step.batches, step.messages):
            messages[batch.shard] = message
        return messages

    def _finish(self, step: LayerStep, combined: torch.Tensor) -> np.ndarray:
        """Count the shards' rows, maybe rebalance, and return the combined output."""
        out = combined.numpy()
        with self._lock:
            for batch in step.batches:
                self.stats.count_shard_rows(batch.shard, batch.num_rows)
        self._maybe_rebalance(step.layer)
        return out

    def _call_shards(self, messages: dict[int, ShardMessage]) -> dict[int, np.ndarray]:
        pending = {shard: self.shards[shard].forward.remote(*msg) for shard, msg in messages.items()}
        results: dict[int, np.ndarray] = {}
        for attempt in range(self.config.max_retries + 1):
            failed = {}
            for shard, ref in pending.items():
                try:
                    results[shard] = ray.get(ref)
                except (ActorDiedError, ActorUnavailableError, RayActorError) as exc:
                    failed[shard] = exc
            if not failed:
                return results
            with self._lock:  # several callers may be retrying at once (a threaded router)
                self.stats.shard_retries += len(failed)
            if attempt == self.config.max_retries:
                raise ShardCallFailed(f"shards {sorted(failed)} failed {attempt + 1} times: {failed}")
            time.sleep(self.config.retry_backoff_s * (attempt + 1))
            pending = {shard: self.shards[shard].forward.remote(*messages[shard]) for shard in failed}
        return results

    # --- load statistics and rebalancing -------------------------------------------------------------------

    def load_stats(self) -> dict[str, Any]:
        """Tokens per expert per layer, rows and busy seconds per shard, fallbacks, retries, placement."""
        return {**self.stats.as_dict(), "shard_busy_s": self._shard_busy(timeout_s=None),
                "placement": self.placement.describe()}

    def metrics_text(self) -> bytes:
        """Prometheus text exposition of the load counters (tokens per expert, rows and busy seconds per shard,
        fallbacks, retries). A shard that does not answer in time (restarting) leaves its last busy seconds."""
        try:
            self._shard_busy(timeout_s=SCRAPE_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - a scrape must not wait for a restart
            pass
        return self.stats.prometheus_text(self._shard_busy_s)

    def _shard_busy(self, timeout_s: float | None) -> list[float]:
        """Seconds each shard has spent computing, asked of every shard now."""
        reports = ray.get([shard.load_stats.remote() for shard in self.shards], timeout=timeout_s)
        self._shard_busy_s = [report["busy_s"] for report in reports]
        return self._shard_busy_s

    def placement_plan(self) -> dict[str, Any]:
        return self.placement.describe()

    def rebalance(self, copies_per_layer: int = 1) -> list[dict[str, int]]:
        """Place a copy of each layer's hottest experts on the least-loaded shard that lacks them.

        The copy's weights are loaded before routing changes, so no call ever waits on a missing expert.
        """
        added = []
        with self._lock:
            for layer in self.model.moe_layer_ids:
                for expert, target in self.stats.hot_expert_moves(layer, self.placement, copies_per_layer):
                    ray.get(self.shards[target].load_experts.remote(layer, [expert]))
                    self.placement.add_copy(layer, expert, target)
                    added.append({"layer": layer, "expert": expert, "shard": target})
            self.stats.reset_window()
        return added

    def _maybe_rebalance(self, layer: int) -> None:
        every = self.config.auto_rebalance_every
        if every is None or layer != self._first_moe_layer:
            return
        self._calls_since_check += 1
        if self._calls_since_check >= every:
            self._calls_since_check = 0
            if self.stats.imbalance(self.placement, layer) > self.config.imbalance_threshold:
                self.stats.auto_rebalances += 1
                self.rebalance()
