"""Continuous batching: which sequences run in the next step, and how many of their tokens.

Every step takes one token from each decoding sequence, then fills the remaining token budget with prefill
chunks (long prompts are split across steps). While sequences decode, the prefill budget is also cut so the step
stays within the inter-token time budget (step_budget.py): running streams keep their pace while prompts arrive.
Waiting requests join in arrival order as soon as blocks and batch slots allow, skipping those whose prefix-cache
lookup is still out (they wait in the queue, not the step); a cached prefix is taken at admission. Finished ones
leave at once. When KV blocks run out the newest running sequence is preempted: its blocks are freed and it is
recomputed later (prompt + tokens generated so far), so no request fails for lack of memory.
"""

from __future__ import annotations

import random
import time
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

import torch

from moe_serve.replicas.block_pool import OutOfBlocks
from moe_serve.replicas.kv_cache import PagedKVCache
from moe_serve.replicas.sampling import SamplingParams
from moe_serve.replicas.step_budget import StepBudget


class SequenceStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    generator: random.Random | None  # sampled requests' own random stream
    arrival_time: float = field(default_factory=time.perf_counter)
    output_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose K/V are in the cache
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    first_token_time: float | None = None
    logits: list[torch.Tensor] = field(default_factory=list)
    logprobs: list[Any] = field(default_factory=list)  # engine.TokenLogprob per generated token, when asked
    prompt_logprobs: list[Any] = field(default_factory=list)  # per prompt position, None at 0, when asked
    early_stop_ids: tuple[int, ...] = ()  # ids masked while below min_tokens: EOS and stop ids
    cache_keys: list[str] = field(default_factory=list)  # tiered-cache keys of the prompt's full blocks
    cache_hit: Any = None  # a remote cache lookup waiting for admission (prefix_cache.PendingLookup)
    cached_tokens: int = 0  # prompt tokens whose KV came from the tiered cache
    cached_by_tier: dict[str, int] = field(default_factory=dict)

    def token_ids(self, start: int, end: int) -> list[int]:
        """Ids of positions [start, end) of prompt + output, without concatenating the whole sequence."""
        p = len(self.prompt_ids)
        if end <= p:
            return self.prompt_ids[start:end]
        if start >= p:
            return self.output_ids[start - p : end - p]
        return self.prompt_ids[start:] + self.output_ids[: end - p]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed


@dataclass(frozen=True)
class ScheduledChunk:
    seq: Sequence
    num_tokens: int

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the end of the sequence, so its last token's logits are sampled."""
        return self.seq.num_computed + self.num_tokens == self.seq.num_tokens


@dataclass(frozen=True)
class StepPlan:
    decodes: list[ScheduledChunk]
    prefills: list[ScheduledChunk]
    preempted: list[Sequence]

    @property
    def empty(self) -> bool:
        return not self.decodes and not self.prefills


class PrefixHit(Protocol):
    pool_blocks: list[int]


class PrefixReuse(Protocol):
    """What the scheduler asks of the prefix cache (prefix_cache.PrefixCache)."""

    def ready(self, seq: Sequence) -> bool: ...

    def match(self, seq: Sequence) -> PrefixHit: ...

    def admission_cost(self, hit: PrefixHit) -> int: ...

    def admit(self, seq: Sequence, hit: PrefixHit) -> None: ...

    def forget(self, seq: Sequence) -> None: ...


class Scheduler:
    def __init__(
        self,
        kv: PagedKVCache,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        prefix: PrefixReuse | None = None,
        step_budget: StepBudget | None = None,
    ) -> None:
        self.kv = kv
        self.prefix = prefix
        self.step_budget = step_budget
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Drop a sequence from the queues and give its blocks back."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
            if self.prefix is not None:
                self.prefix.forget(seq)
        self.kv.free(seq.block_table)
        seq.block_table = []

    def schedule(self) -> StepPlan:
        preempted: list[Sequence] = []
        decodes = self._schedule_decodes(preempted)
        budget = self.max_num_batched_tokens - len(decodes)
        if decodes and self.step_budget is not None:
            budget = min(budget, self.step_budget.prefill_tokens(len(decodes)))
        prefills: list[ScheduledChunk] = []
        for seq in [s for s in self.running if s.num_uncomputed > 1]:
            if budget <= 0:
                break
            chunk = self._reserve(seq, min(seq.num_uncomputed, budget))
            if chunk is not None:
                prefills.append(chunk)
                budget -= chunk.num_tokens
        for seq in list(self.waiting):
            if budget <= 0 or len(self.running) >= self.max_num_seqs or preempted:
                break
            if self.prefix is not None and not self.prefix.ready(seq):
                continue  # its cache lookup is still out: it waits in the queue, the step does not
            if not self._admit(seq):
                break
            chunk = self._reserve(seq, min(seq.num_uncomputed, budget))
            if chunk is None:
                break
            self.waiting.remove(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            prefills.append(chunk)
            budget -= chunk.num_tokens
        return StepPlan(decodes, prefills, preempted)

    def _admit(self, seq: Sequence) -> bool:
        """Take the sequence's cached prefix if its whole prompt fits beside what is running (admitting only what
        fits avoids admit/preempt thrash); False when it does not fit."""
        needed = self.kv.blocks_for(seq.num_tokens + 1)
        if self.prefix is None:
            return needed <= self.kv.num_free_blocks
        hit = self.prefix.match(seq)
        if needed - len(hit.pool_blocks) + self.prefix.admission_cost(hit) > self.kv.num_free_blocks:
            return False
        self.prefix.admit(seq, hit)
        return True

    def _schedule_decodes(self, preempted: list[Sequence]) -> list[ScheduledChunk]:
        decodes: list[ScheduledChunk] = []
        for seq in [s for s in self.running if s.num_uncomputed == 1]:
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted while making room for an earlier one
            while (chunk := self._reserve(seq, 1)) is None:
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            if chunk is not None:
                decodes.append(chunk)
        return decodes

    def _reserve(self, seq: Sequence, num_tokens: int) -> ScheduledChunk | None:
        """Allocate the blocks `num_tokens` more tokens need; None when the cache is full."""
        missing = self.kv.blocks_for(seq.num_computed + num_tokens) - len(seq.block_table)
        if missing > 0:
            try:
                seq.block_table.extend(self.kv.allocate(missing))
            except OutOfBlocks:
                return None
        return ScheduledChunk(seq, num_tokens)

    def _preempt(self, seq: Sequence) -> None:
        self.num_preemptions += 1
        self.running.remove(seq)
        self.kv.free(seq.block_table)
        seq.block_table = []
        seq.num_computed = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
