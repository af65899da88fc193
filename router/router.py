"""The router actor: gate, top-k, dispatch to expert shards, gather, combine; load statistics and rebalancing.

It owns the gate weights of every MoE layer and the expert placement, nothing else of the model. Two ways in:
- `moe` (plain actor call): sends one batched message to each shard that has rows, all concurrently, and retries a
  shard whose actor died (Ray restarts it and it reloads its experts), so a request running during a shard
  failure still completes with the same tokens;
- `dispatch_all` -> every shard's `forward_packed` -> `combine_all`: the same layer call as three tasks of a Ray
  compiled graph (router/transport.py), one message per shard, empty ones included.
Both count the same load statistics. Plain calls may come from several engine replicas at once (the actor then
runs them on a few threads); a compiled graph runs its tasks on a thread of its own; a lock keeps `rebalance`
between two dispatches and the counters consistent either way.
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


@dataclass(frozen=True)
class RouterConfig:
    capacity_factor: float | None = None  # None: dropless and exact (default)
    max_retries: int = 5  # per shard call, while Ray restarts a dead shard
    retry_backoff_s: float = 0.2
    auto_rebalance_every: int | None = None  # check balance every N calls of the first MoE layer; None: off
    imbalance_threshold: float = 1.5  # rebalance when the busiest shard has this many times the mean load

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
        self._first_moe_layer = self.model.moe_layer_ids[0]
        self._calls_since_check = 0
        self._lock = threading.RLock()
        self._empty_messages: dict[tuple[int, int, str], ShardMessage] = {}

    def moe(self, layer: int, x: np.ndarray) -> np.ndarray:
        """Routed-expert output [T, D] for hidden states [T, D] of one MoE layer (the plain transport)."""
        step = self._dispatch(layer, x)
        messages = {batch.shard: message for batch, message in zip(step.batches, step.messages)}
        return self._combine(step, self._call_shards(messages))

    # --- the compiled-graph transport: dispatch_all -> shard.forward_packed -> combine_all ------------------

    def dispatch_all(self, layer: int, x: np.ndarray) -> tuple[ShardMessage | LayerStep, ...]:
        """One message per shard (empty when it has no rows), then the step that `combine_all` needs."""
        step = self._dispatch(layer, x)
        key = (layer, x.shape[1], x.dtype.str)
        empty = self._empty_messages.get(key)
        if empty is None:
            empty = self._empty_messages[key] = empty_message(layer, x.shape[1], x.dtype)
        messages = [empty] * self.placement.num_shards
        for batch, message in zip(step.batches, step.messages):
            messages[batch.shard] = message
        return (*messages, step)

    def combine_all(self, step: LayerStep, *outputs: np.ndarray) -> np.ndarray:
        """Every shard's output (by shard id, empty ones included) -> routed-expert output [T, D]."""
        return self._combine(step, {batch.shard: outputs[batch.shard] for batch in step.batches})

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

    def _combine(self, step: LayerStep, results: dict[int, np.ndarray]) -> np.ndarray:
        out = step.combine(results).numpy()
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
        busy = ray.get([shard.load_stats.remote() for shard in self.shards])
        return {**self.stats.as_dict(), "shard_busy_s": [b["busy_s"] for b in busy],
                "placement": self.placement.describe()}

    def metrics_text(self) -> bytes:
        """Prometheus text exposition of the load counters (tokens per expert, rows per shard, fallbacks, retries)."""
        return self.stats.prometheus_text()

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
