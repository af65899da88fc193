"""Experts loaded from the checkpoint when first used and kept under a byte budget: the in-process MoE backend
(`OnDemandMoE`) and each expert shard hold their experts here.

Without a budget every expert asked for stays resident, loaded a group at a time (one holder per load). With one
(`budget_bytes`), an expert is read from the memory-mapped safetensors files and packed on first use into a slot of
one pool (as many slots as the budget holds, pages touched only when filled; without the compiled kernels, its own
holder), and the resident set never exceeds the budget. Usage is the router's load: tokens routed to each expert,
halved every DECAY_CALLS calls of its layer, so it follows the load as it shifts. Each MoE layer counts on an equal
share of the budget (every layer runs top-k experts a token), so the first layers a request reaches cannot take it
all. Once a layer's share is full, an expert a call needs is loaded only in place of a clearly less used one
(`_worth_swapping`; the least used first, least recently used breaking ties, never one the call needs, of its own
layer or of one holding more than its share); the rest run straight from the memory-mapped checkpoint, nothing kept.
Packing an expert into a slot costs several runs of it, and a run from the checkpoint little more than a resident
one, so experts of near-equal use do not swap places, and a batch needing more experts than the budget holds still
runs.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F

from moe_serve.kernels import cpu_ops
from moe_serve.model.checkpoint import Checkpoint
from moe_serve.model.kernel_moe import KERNEL_FLOAT_DTYPES, KernelExperts
from moe_serve.model.linear import KERNEL_MAX_TOKENS, Projection
from moe_serve.model.moe import ExpertStack
from moe_serve.model.quant import QuantMode, stackable
from moe_serve.router.gate import Gate, combine, dispatch

Holder = Any  # where experts' weights live: ExpertStack, KernelExperts, or on a GPU vLLM's fused experts
DECAY_CALLS = 64  # a layer's usage counts halve every this many of its calls
SWAP_LEAD = 16.0  # an expert replaces a resident one only when routed more than this many tokens more
# An expert given more rows than this in one call (a prefill chunk) runs from the checkpoint, on torch's GEMM, fast at
# that size, and is not loaded then: packing pays off over decode steps, and a first token need not wait for it
ADMIT_MAX_ROWS = KERNEL_MAX_TOKENS
READ_AHEAD_AGAIN = 1024  # calls of `run` (all layers') before an expert read lately is read ahead again
_OPS = cpu_ops()  # compiled kernels (moe_serve.kernels), or None


@dataclass
class ResidentStats:
    loads: int = 0  # experts read from the checkpoint
    evictions: int = 0
    hits: int = 0  # experts a call needed that were resident
    read_ahead: int = 0  # experts the page cache was asked to read ahead of the layer that needs them
    streamed: int = 0  # expert runs straight from the checkpoint (not worth a resident one's place)
    peak_bytes: int = 0  # most expert bytes resident at any time


class ResidentExperts:
    """Experts of every MoE layer of one checkpoint: loaded on first use, under `budget_bytes` when given.
    `make_holder(stack)` turns loaded experts into what runs them (default: `kernel_or_stack`)."""

    def __init__(self, checkpoint: Checkpoint, quantize: QuantMode = "none", budget_bytes: int | None = None,
                 device: torch.device = torch.device("cpu"),
                 make_holder: Callable[[ExpertStack], Holder] | None = None) -> None:
        self.checkpoint = checkpoint
        self.quantize = quantize
        self.budget_bytes = budget_bytes
        self.device = device
        self._make_holder = make_holder or functools.partial(kernel_or_stack, _OPS)
        self._held: dict[int, dict[int, tuple[Holder, int]]] = {}  # layer -> expert -> (holder, index in it)
        self._usage: dict[int, dict[int, float]] = {}  # layer -> expert -> usage
        self._last_use: dict[tuple[int, int], int] = {}
        self._calls: dict[int, int] = {}
        self._clock = 0  # calls of `run`, every layer's
        self._last_read: dict[tuple[int, int], int] = {}  # when an expert not resident was last streamed or read ahead
        self.resident_bytes = 0  # under a budget
        self.stats = ResidentStats()
        if budget_bytes is not None:
            self._start_budget(budget_bytes)

    def _start_budget(self, budget_bytes: int) -> None:
        """Loads one expert to learn an expert's size (every expert of a checkpoint has the same shapes) and refuses
        a budget that cannot hold one layer's top-k. Kernel experts then live in one pool of as many slots as the
        budget holds, so a call's resident experts still run in one kernel call."""
        config = self.checkpoint.config
        layer = config.moe_layer_ids[0]
        probe = self._make_holder(self._stack(layer, [0]))
        self.expert_nbytes = probe.expert_nbytes if isinstance(probe, KernelExperts) else probe.nbytes
        if budget_bytes < config.top_k * self.expert_nbytes:
            raise ValueError(f"expert memory budget {budget_bytes} bytes is smaller than one layer's top-{config.top_k}"
                             f" experts ({config.top_k} x {self.expert_nbytes} bytes)")
        capacity = min(budget_bytes // self.expert_nbytes, config.num_experts * len(config.moe_layer_ids))
        self._layers = config.moe_layer_ids
        self._share = capacity // len(self._layers)  # experts of the budget each MoE layer may count on
        self._pool = KernelExperts.slots_like(probe, capacity) if isinstance(probe, KernelExperts) else None
        # float experts in the checkpoint's serving dtype go from the file straight into their slot
        self._pool_takes_float = self.quantize == "none" and self.device.type == "cpu"
        self._free_slots = list(range(capacity))
        self._place(layer, 0, self._slot_for(probe))

    # --- loading and eviction ------------------------------------------------------------------------------

    def resident(self, layer: int) -> list[int]:
        return sorted(self._held.get(layer, {}))

    def load(self, layer: int, experts: list[int]) -> None:
        """Make `experts` of `layer` resident (evicting others under a budget; they must fit it together)."""
        held = self._held.setdefault(layer, {})
        missing = [e for e in experts if e not in held]
        if not missing:
            return
        if self.budget_bytes is None:  # one holder for the whole load
            holder = self._make_holder(self._stack(layer, missing))
            held.update({expert: (holder, index) for index, expert in enumerate(missing)})
            self.stats.loads += len(missing)
            return
        for expert in missing:
            self._load_one(layer, expert, keep={(layer, e) for e in experts})

    def _load_one(self, layer: int, expert: int, keep: set[tuple[int, int]]) -> None:
        if not self._make_room(layer, keep):
            raise ValueError(f"expert memory budget {self.budget_bytes} bytes cannot hold the experts one call "
                             f"needs at once ({len(keep)})")
        self._read(layer, expert)

    def read_ahead(self, layer: int, experts: list[int]) -> int:
        """Have the page cache read those of `experts` of `layer` that are not resident, in the background
        (`Checkpoint.read_ahead`): OnDemandMoE asks for the next layer's likely experts while the current one runs, so
        a checkpoint not yet in the page cache (a cold start, or a node short of memory) reads from disk during
        compute, not when the layer needs them. An expert streamed or read ahead in the last READ_AHEAD_AGAIN calls
        is skipped: its pages are most likely cached, and asking again costs tens of microseconds an expert. Loading
        itself stays on the caller's thread: on a CPU a second thread packing experts takes cores from the kernels.
        Returns how many it asked for."""
        held = self._held.get(layer, {})
        missing = [expert for expert in experts if expert not in held and
                   self._clock - self._last_read.get((layer, expert), -READ_AHEAD_AGAIN) >= READ_AHEAD_AGAIN]
        for expert in missing:
            self.checkpoint.read_ahead(layer, expert)
            self._last_read[(layer, expert)] = self._clock
        self.stats.read_ahead += len(missing)
        return len(missing)

    def _make_room(self, layer: int, keep: set[tuple[int, int]], usage: float | None = None) -> bool:
        """Room for one more expert of `layer`, evicting the least used experts it may replace (`_least_used`),
        never one of `keep`, and for an expert of `usage` only those it is worth swapping for; whether there is
        room."""
        while not self._room_for(layer):
            victim = self._least_used(layer, keep)
            if victim is None or (usage is not None and not _worth_swapping(usage, victim[0])):
                return False
            self._evict(*victim[2])
        return True

    def _room_for(self, layer: int) -> bool:
        """Whether `layer` may take one more expert without an eviction. Each MoE layer has an equal share of the
        budget (every layer runs top-k experts per token): one below its share always has room (free room is never
        less than what the layers below their share lack), one at its share only room no other layer's share
        needs."""
        assert self.budget_bytes is not None
        free = (self.budget_bytes - self.resident_bytes) // self.expert_nbytes
        if free <= 0:
            return False
        if self._count(layer) < self._share:
            return True
        return free > sum(max(0, self._share - self._count(other)) for other in self._layers if other != layer)

    def _count(self, layer: int) -> int:
        return len(self._held.get(layer, {}))

    def _least_used(self, layer: int, keep: set[tuple[int, int]]) -> tuple[float, int, tuple[int, int]] | None:
        """(usage, last use, (layer, expert)) of the least used resident expert an expert of `layer` may replace
        (least recently used among equals): one of `layer`'s own or of a layer holding more than its share, not in
        `keep`; None when there is none."""
        layers = [other for other in self._held if other == layer or self._count(other) > self._share]
        candidates = [(self._usage.get(other, {}).get(expert, 0.0), self._last_use.get((other, expert), -1),
                       (other, expert))
                      for other in layers for expert in self._held[other] if (other, expert) not in keep]
        return min(candidates, default=None)

    def _read(self, layer: int, expert: int) -> None:
        """Load one expert from the checkpoint into the room made for it: float experts straight from the file into
        a pool slot's panels, others packed first."""
        if self._pool is None or not self._pool_takes_float:
            self._place(layer, expert, self._slot_for(self._make_holder(self._stack(layer, [expert]))))
            return
        slot = self._free_slots.pop()
        with self.checkpoint.expert_weights(layer, expert) as (gate, up, down):
            self._pool.fill(slot, (gate, up), down)
        self._place(layer, expert, (self._pool, slot))

    def _slot_for(self, holder: Holder) -> tuple[Holder, int]:
        """Where one loaded expert (expert 0 of `holder`) is held: copied into a pool slot, or its holder."""
        if self._pool is None:
            return holder, 0
        slot = self._free_slots.pop()
        self._pool.put(slot, holder)
        return self._pool, slot

    def _place(self, layer: int, expert: int, entry: tuple[Holder, int]) -> None:
        """Book a loaded expert as resident at `entry` (its holder, its index there)."""
        self._held.setdefault(layer, {})[expert] = entry
        self.resident_bytes += self.expert_nbytes
        self.stats.loads += 1
        self.stats.peak_bytes = max(self.stats.peak_bytes, self.resident_bytes)

    def _evict(self, layer: int, expert: int) -> None:
        _, index = self._held[layer].pop(expert)
        if self._pool is not None:
            self._free_slots.append(index)
        self.resident_bytes -= self.expert_nbytes
        self.stats.evictions += 1

    def _stack(self, layer: int, experts: list[int]) -> ExpertStack:
        w13, w2 = self.checkpoint.load_experts(layer, experts)
        return ExpertStack(experts, w13.to(self.device), w2.to(self.device), quantize=self.quantize)

    # --- running -------------------------------------------------------------------------------------------

    def run(self, layer: int, rows: torch.Tensor, expert_ids: list[int], counts: list[int]) -> torch.Tensor:
        """Rows [N, D] grouped by expert (`counts[i]` rows for `expert_ids[i]`, in order) -> expert outputs [N, D].
        Experts not resident are loaded; under a budget, only those given at most ADMIT_MAX_ROWS rows, while their
        layer has room or in place of one they are worth swapping for (`_admit`): the others run straight from the
        checkpoint."""
        self._note_use(layer, expert_ids, counts)
        held = self._held.setdefault(layer, {})
        self.stats.hits += sum(e in held for e in expert_ids)
        if self.budget_bytes is None:
            self.load(layer, expert_ids)
        else:
            usage, rows_of = self._usage[layer], dict(zip(expert_ids, counts))
            keep = {(layer, e) for e in expert_ids}  # never evict an expert this call needs
            for expert in sorted(expert_ids, key=usage.__getitem__, reverse=True):  # the most used first
                if rows_of[expert] <= ADMIT_MAX_ROWS:
                    self._admit(layer, expert, keep)
        resident = [i for i, expert in enumerate(expert_ids) if expert in held]
        if len(resident) == len(expert_ids):
            return _run_resident(held, expert_ids, counts, rows)
        out = torch.empty_like(rows)
        starts = list(itertools.accumulate(counts, initial=0))
        if resident:  # their rows gathered, so the resident experts run in one kernel call (per holder)
            index = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in resident])
            out[index] = _run_resident(held, [expert_ids[i] for i in resident], [counts[i] for i in resident],
                                       rows[index])
        for i, expert in enumerate(expert_ids):
            if expert not in held:
                out[starts[i] : starts[i + 1]] = self._stream(layer, expert, rows[starts[i] : starts[i + 1]])
        return out

    def _admit(self, layer: int, expert: int, keep: set[tuple[int, int]]) -> None:
        """Load `expert` if its layer has room, or in place of the least used expert it may replace (`_least_used`,
        not one of `keep`) when worth it; otherwise it stays out (streamed)."""
        if expert not in self._held[layer] and self._make_room(layer, keep, self._usage[layer].get(expert, 0.0)):
            self._read(layer, expert)

    def _stream(self, layer: int, expert: int, rows: torch.Tensor) -> torch.Tensor:
        """One expert's FFN over its rows straight from the checkpoint, nothing kept: float weights as the memory-map
        gives them, quantized ones packed for this call alone."""
        self.stats.streamed += 1
        self._last_read[(layer, expert)] = self._clock
        if self.quantize != "none":
            holder = self._make_holder(self._stack(layer, [expert]))
            return _run(holder, [0], [rows.shape[0]], rows)
        with self.checkpoint.expert_weights(layer, expert) as weights:
            gate, up, down = map(Projection, weights)
            return down(F.silu(gate(rows)) * up(rows))  # the row kernel reads each weight once, as it lies

    def _note_use(self, layer: int, expert_ids: list[int], counts: list[int]) -> None:
        calls = self._calls[layer] = self._calls.get(layer, 0) + 1
        usage = self._usage.setdefault(layer, {})
        if calls % DECAY_CALLS == 0:
            for expert in usage:
                usage[expert] /= 2
        self._clock += 1
        now = self._clock
        for expert, count in zip(expert_ids, counts):
            usage[expert] = usage.get(expert, 0.0) + count
            self._last_use[(layer, expert)] = now

    def usage(self) -> dict[tuple[int, int], float]:
        """(layer, expert) -> tokens routed to it, halved every DECAY_CALLS calls of its layer."""
        return {(layer, expert): count for layer, usage in self._usage.items() for expert, count in usage.items()}

    @property
    def expert_bytes(self) -> int:
        """Bytes of the experts resident now (under a budget, counted by expert, not by the pool's size)."""
        if self.budget_bytes is not None:
            return self.resident_bytes
        holders = {id(h): h for held in self._held.values() for h, _ in held.values()}
        return sum(h.nbytes for h in holders.values())


def _worth_swapping(usage: float, victim_usage: float) -> bool:
    return usage > victim_usage + SWAP_LEAD


def kernel_or_stack(ops: ModuleType | None, stack: ExpertStack) -> Holder:
    """The compiled kernel's holder when it is built and takes the weights (the experts' only copy from then on),
    else the torch stack."""
    if ops is not None and stackable(stack.w13 + stack.w2, KERNEL_FLOAT_DTYPES):
        return KernelExperts(ops, stack.w13, stack.w2)
    return stack


def _run_resident(held: dict[int, tuple[Holder, int]], expert_ids: list[int], counts: list[int],
                  rows: torch.Tensor) -> torch.Tensor:
    """Resident experts over their rows (`counts[i]` rows for `expert_ids[i]`, in order): one kernel call per run of
    experts sharing a holder (one call in all for a pool)."""
    runs = list(_runs_by_holder(held, expert_ids, counts))
    if len(runs) == 1:
        return _run(*runs[0], rows)
    out, start = torch.empty_like(rows), 0
    for holder, indices, run_counts in runs:
        stop = start + sum(run_counts)
        out[start:stop] = _run(holder, indices, run_counts, rows[start:stop])
        start = stop
    return out


def _runs_by_holder(held: dict[int, tuple[Holder, int]], expert_ids: list[int], counts: list[int],
                    ) -> Iterator[tuple[Holder, list[int], list[int]]]:
    """The call's (expert, count) runs, consecutive ones with the same holder merged: (holder, indices in the holder,
    counts)."""
    run: tuple[Holder, list[int], list[int]] | None = None
    for expert, count in zip(expert_ids, counts):
        holder, index = held[expert]
        if run is not None and holder is not run[0]:
            yield run
            run = None
        if run is None:
            run = (holder, [], [])
        run[1].append(index)
        run[2].append(count)
    if run is not None:
        yield run


def _run(holder: Holder, indices: list[int], counts: list[int], rows: torch.Tensor) -> torch.Tensor:
    """One holder's experts `indices` over their rows (`counts` each, in order): one kernel call when it can."""
    if not isinstance(holder, ExpertStack):
        return holder.grouped(rows, torch.tensor(indices), torch.tensor(counts))
    out, start = torch.empty_like(rows), 0
    for index, count in zip(indices, counts):
        out[start : start + count] = holder.ffn(index, rows[start : start + count])
        start += count
    return out


class OnDemandMoE:
    """The in-process MoE backend over `ResidentExperts`: gates at start-up, experts when first routed to. Each
    layer's call first has the experts the next MoE layer will likely route its tokens to read ahead into the page
    cache (`ResidentExperts.read_ahead`), so reading from disk overlaps this layer's experts and the next attention.
    The guess is the next layer's gate applied to this layer's input: the residual stream changes little from one
    layer to the next, so it is cheap and, unlike past usage, knows the first request's experts too."""

    def __init__(self, gates: dict[int, Gate], experts: ResidentExperts, num_experts: int) -> None:
        self.gates = gates
        self.experts = experts
        self.num_experts = num_experts
        layers = sorted(gates)
        self._next_layer = dict(zip(layers, layers[1:]))

    def __call__(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        next_layer = self._next_layer.get(layer)
        if next_layer is not None and len(self.experts.resident(next_layer)) < self.num_experts:
            gate = self.gates[next_layer]
            likely = torch.topk(gate.logits(x), gate.top_k, dim=-1).indices.unique().tolist()
            self.experts.read_ahead(next_layer, likely)
        routing = self.gates[layer](x)
        plan = dispatch(routing, self.num_experts)
        used = [e for e, n in enumerate(plan.counts) if n]
        out = self.experts.run(layer, x[plan.token_index], used, [plan.counts[e] for e in used])
        return combine(out, plan, routing, x.shape[0])
