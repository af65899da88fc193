"""The in-process engine core: token ids in, token ids out, one continuous-batching step at a time.

The step thread schedules, runs the forward pass and samples; a request finishes on ids alone (EOS, stop token
ids, max_tokens, the context length). Text (detokenizing, stop strings) is the output processor's
(output_processor.py), run by the caller: `generate()` here, the async front's consumers when serving.
It owns the scheduler, the paged KV pool (whose shared prompt blocks are the prefix cache's hot tier, with Redis
and cold tiers around it: prefix_cache.py) and sampling; the model's dense part runs here and its experts
run behind an `MoEBackend` (in this process, or on shard actors through the router).
A step's host-side work is kept small because the tiny models are bound by per-op overhead: step tensors are
built from flat Python lists in one copy each (`_long_tensor`), and a pure decode step asks for all logits rows.
`LLMEngine.step()` is synchronous; `AsyncLLMEngine` (async_engine.py) drives it from a thread for streaming.
"""

from __future__ import annotations

import itertools
import os
import time
from array import array
from collections.abc import Sequence as Seq
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch

from moe_serve.cache import CacheConfig, model_fingerprint
from moe_serve.model.attention import AttentionBatch, PrefillChunk
from moe_serve.model.config import ModelConfig
from moe_serve.model.dtype import DeviceName, DTypeName, check_device, check_dtype_name, resolve_dtype
from moe_serve.model.loader import load_dense_model, load_local_model
from moe_serve.model.tokenizer import Tokenizer
from moe_serve.model.transformer import DenseModel, MoEBackend
from moe_serve.replicas.kv_cache import KVCacheSpec, PagedKVCache
from moe_serve.replicas.output_processor import OutputProcessor
from moe_serve.replicas.outputs import RequestOutput, StepOutput, TokenLogprob
from moe_serve.replicas.prefix_cache import PrefixCache
from moe_serve.replicas.sampling import SamplingParams, make_generator, sample
from moe_serve.replicas.scheduler import ScheduledChunk, Scheduler, Sequence, SequenceStatus, StepPlan
from moe_serve.replicas.step_budget import StepBudget


@dataclass(frozen=True)
class EngineConfig:
    max_num_seqs: int = 64  # sequences in the running batch
    max_num_batched_tokens: int = 512  # tokens per step; longer prompts are prefilled in chunks
    block_size: int = 16
    # the KV pool: every sequence's K/V, shared prompt blocks once, cached prefixes (the hot tier) included
    kv_cache_bytes: int = 256 * 2**20
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    quantize: Literal["none", "int8", "int4"] = "none"
    # serving dtype of weights, activations and the KV cache (moe_serve.model.dtype): auto = the checkpoint's
    # where the hardware computes it natively, else float32
    dtype: DTypeName = "auto"
    device: DeviceName = "cpu"
    # torch intra-op threads, which the compiled kernels share; None: 1 for small models (thread hand-offs cost
    # more than tiny matmuls gain), else the cores in this process's affinity mask. Process-wide: the engine owns
    # its process.
    num_threads: int | None = None
    # full prompt blocks shared between requests and kept after them (the hot tier), as vLLM's prefix caching
    enable_prefix_caching: bool = True
    cache: CacheConfig | None = None  # the Redis warm and the cold tier around the pool; None: none
    # inter-token budget: while requests decode, prefill chunks are sized so a step stays within it
    # (step_budget.py); None: chunks limited by max_num_batched_tokens only
    max_step_ms: float | None = 50.0
    # decode-only steps of 2+ sequences run as two micro-batches, one's attention overlapping the other's routed
    # experts on the shards; only with an MoE backend that can `submit` (experts on shard actors)
    micro_batch_overlap: bool = False
    # at most this many bytes of expert weights resident, loaded on first use (resident_experts.py); None: all
    expert_memory_bytes: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "kv_cache_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"EngineConfig.{name} must be positive, got {getattr(self, name)}")
        if self.quantize not in ("none", "int8", "int4"):
            raise ValueError(f"EngineConfig.quantize must be none, int8 or int4, got {self.quantize!r}")
        check_dtype_name(self.dtype)
        check_device(self.device)
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"EngineConfig.num_threads must be positive, got {self.num_threads}")
        if self.expert_memory_bytes is not None and self.expert_memory_bytes < 1:
            raise ValueError(
                f"EngineConfig.expert_memory_bytes must be positive or None, got {self.expert_memory_bytes}")
        if self.max_step_ms is not None and self.max_step_ms <= 0:
            raise ValueError(f"EngineConfig.max_step_ms must be positive or None, got {self.max_step_ms}")


class LLMEngine:
    def __init__(
        self,
        config: ModelConfig,
        model: DenseModel,
        moe: MoEBackend,
        engine_config: EngineConfig = EngineConfig(),
        tokenizer: Tokenizer | None = None,
        model_fp: str = "process-local",
    ) -> None:
        """`model_fp` roots the prefix cache's block keys (cache.model_fingerprint when blocks are shared with
        other processes through Redis)."""
        self.model_config = config
        self.config = engine_config
        _set_threads(engine_config.num_threads, config)
        self.model = model
        self.moe = moe
        self.tokenizer = tokenizer
        # config.json and generation_config.json (read by the tokenizer) may each name EOS ids
        tokenizer_eos = tokenizer.eos_token_ids if tokenizer else ()
        self.eos_token_ids = tuple(dict.fromkeys((*config.eos_token_ids, *tokenizer_eos)))
        self.max_model_len = min(engine_config.max_model_len or config.max_position_embeddings,
                                 config.max_position_embeddings)
        self.kv = PagedKVCache(KVCacheSpec.from_budget(config, engine_config.kv_cache_bytes, engine_config.block_size,
                                                       model.dtype))
        self.prefix_cache = PrefixCache.open(self.kv, model_fp, engine_config.cache) \
            if engine_config.enable_prefix_caching or engine_config.cache is not None else None
        self.step_budget = StepBudget(engine_config.max_step_ms) if engine_config.max_step_ms else None
        self.scheduler = Scheduler(self.kv, engine_config.max_num_seqs, engine_config.max_num_batched_tokens,
                                   self.prefix_cache, self.step_budget)
        self._block_offsets = torch.arange(engine_config.block_size)
        self._positions = torch.arange(self.max_model_len)
        self._seqs: dict[str, Sequence] = {}
        self._ids = itertools.count()

    @classmethod
    def from_pretrained(
        cls, model_dir: str | Path, engine_config: EngineConfig = EngineConfig(), moe: MoEBackend | None = None
    ) -> LLMEngine:
        """In-process experts by default; pass `moe` (e.g. the router of expert shards) to run them elsewhere."""
        tokenizer = Tokenizer.from_dir(model_dir)
        # threads before loading: what loading computes (RoPE tables) must not depend on what ran before
        _set_threads(engine_config.num_threads, ModelConfig.from_dir(model_dir))
        dtype = resolve_dtype(engine_config.dtype, model_dir, engine_config.device)
        if moe is not None:
            config, dense = load_dense_model(model_dir, dtype)
        else:
            loaded = load_local_model(model_dir, quantize=engine_config.quantize, dtype=dtype,
                                      expert_memory_bytes=engine_config.expert_memory_bytes)
            config, dense, moe = loaded.config, loaded.dense, loaded.moe
        # blocks shared through Redis need a fingerprint every process computes alike; the pool alone does not
        model_fp = model_fingerprint(model_dir, extra=f"quantize={engine_config.quantize}") \
            if engine_config.cache is not None else f"process-local:{engine_config.quantize}"
        return cls(config, dense, moe, engine_config, tokenizer, model_fp)

    # --- requests ------------------------------------------------------------------------------------------

    def validate(self, prompt_ids: Seq[int], params: SamplingParams) -> None:
        """Raise ValueError naming the problem for a request this engine cannot run."""
        if not prompt_ids:
            raise ValueError("prompt is empty: at least one token is needed")
        if params.resumed_tokens >= len(prompt_ids):
            raise ValueError(f"resumed_tokens ({params.resumed_tokens}) must be fewer than the prompt's "
                             f"{len(prompt_ids)} tokens")
        vocab = self.model_config.vocab_size
        bad = [t for t in prompt_ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"unknown token id(s) {bad[:5]}: the vocabulary has ids 0..{vocab - 1}")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(prompt_ids)} tokens, the context holds {self.max_model_len} "
                "(prompt plus at least one generated token)"
            )
        if self.kv.blocks_for(len(prompt_ids) + 1) > self.kv.spec.num_blocks:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens does not fit in the KV cache budget")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this model directory has none")

    def add_request(self, prompt_ids: Seq[int], params: SamplingParams, request_id: str | None = None) -> str:
        """Queue a request (validated first); returns its id. Its text, stop strings included, is the caller's
        (an OutputProcessor per request)."""
        self.validate(prompt_ids, params)
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self._seqs:
            raise ValueError(f"request id {request_id!r} is already in use")
        eos = self.eos_token_ids  # min_tokens bans EOS even under ignore_eos, as vLLM and transformers do
        vocab = self.model_config.vocab_size
        seq = Sequence(request_id, list(prompt_ids), params, make_generator(params))
        seq.early_stop_ids = tuple(t for t in (*eos, *params.stop_token_ids) if 0 <= t < vocab)
        self._seqs[request_id] = seq
        if params.prompt_logprobs is not None:
            seq.prompt_logprobs = [None]  # the first prompt token has no context to be predicted from
        if self.prefix_cache is not None:
            self.prefix_cache.arrive(seq)
        self.scheduler.add(seq)
        return request_id

    def abort_request(self, request_id: str) -> None:
        seq = self._seqs.get(request_id)
        if seq is not None and seq.status is not SequenceStatus.FINISHED:
            self._finish(seq, "abort")

    def has_request(self, request_id: str) -> bool:
        return request_id in self._seqs

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def pop_result(self, request_id: str) -> RequestOutput:
        """The final output of a finished request (token ids, no text); forgets the request."""
        seq = self._seqs.pop(request_id)
        return RequestOutput(
            request_id=seq.request_id,
            prompt_token_ids=seq.prompt_ids,
            token_ids=seq.output_ids,
            text=None,
            finish_reason=seq.finish_reason,
            ttft_s=None if seq.first_token_time is None else seq.first_token_time - seq.arrival_time,
            latency_s=time.perf_counter() - seq.arrival_time,
            logits=seq.logits if seq.params.return_logits else None,
            logprobs=seq.logprobs if seq.params.logprobs is not None else None,
            prompt_logprobs=seq.prompt_logprobs if seq.params.prompt_logprobs is not None else None,
            cached_tokens=seq.cached_tokens,
            cached_tokens_by_tier=seq.cached_by_tier,
        )

    def generate(self, prompts: Seq[Seq[int]], params: SamplingParams | Seq[SamplingParams]) -> list[RequestOutput]:
        """Run prompts to completion together; outputs in prompt order, with text when there is a tokenizer."""
        per_prompt = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, per_prompt, strict=True)]
        texts = {i: OutputProcessor(self.tokenizer, sp, stream=False) for i, sp in zip(ids, per_prompt)}
        while self.has_unfinished():
            outputs = self.step()
            for out in outputs:
                text = texts[out.request_id]
                text.process(out)
                if text.stopped_early:  # a stop string: the core stops here
                    self.abort_request(out.request_id)
            if not outputs and not self.scheduler.running:
                time.sleep(IDLE_WAIT_S)  # every waiting request's cache lookup is still out
        return [self._with_text(self.pop_result(i), texts[i]) for i in ids]

    def _with_text(self, result: RequestOutput, text: OutputProcessor) -> RequestOutput:
        return replace(result, text=text.text if self.tokenizer is not None else None,
                       finish_reason=text.finish_reason or result.finish_reason)

    # --- one step ------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        plan = self.scheduler.schedule()
        if plan.empty:
            return []
        started = time.perf_counter()
        chunks = plan.decodes + plan.prefills
        sampling = [c.seq for c in chunks if c.samples]
        token_ids, batch, logits_rows, prompt_targets = self._build_batch(plan)
        if self._overlaps(plan):
            halves = batch.split_decode(len(plan.decodes) // 2)
            logits = self.model.forward_overlapped(
                token_ids, halves, self.kv.layers, self.moe)  # type: ignore[arg-type]  # _overlaps saw `submit`
        else:
            logits = self.model.forward(token_ids, batch, self.kv.layers, self.moe, logits_rows)
        if prompt_targets:  # rows after the sampled ones score prompt tokens
            _record_prompt_logprobs(logits[len(sampling) :], prompt_targets)
            logits = logits[: len(sampling)]
        log_probs = _log_probs(logits, sampling)  # the model's own distribution: before bans and filters
        self._block_early_stops(logits, sampling)
        new_tokens = sample(logits, [s.params for s in sampling], [s.generator for s in sampling])
        token_logprobs = _token_logprobs(log_probs, sampling, new_tokens)
        prompts_done = [c.seq for c in plan.prefills if c.samples and not c.seq.output_ids]
        for chunk in chunks:
            chunk.seq.num_computed += chunk.num_tokens
        seconds = time.perf_counter() - started
        if self.step_budget is not None:
            self.step_budget.observe(len(plan.decodes), sum(c.num_tokens for c in plan.prefills), seconds)
        if self.prefix_cache is not None and plan.prefills:
            self._feed_cache(plan, prompts_done, seconds)
        return [self._append(seq, token, logits, row, token_logprobs.get(row))
                for row, (seq, token) in enumerate(zip(sampling, new_tokens))]

    def _overlaps(self, plan: StepPlan) -> bool:
        return (self.config.micro_batch_overlap and not plan.prefills and len(plan.decodes) >= 2
                and hasattr(self.moe, "submit"))

    def _feed_cache(self, plan: StepPlan, prompts_done: list[Sequence], seconds: float) -> None:
        """Prompt blocks computed this step join the pool's index; prompts whose prefill completed hand their
        blocks to the remote tiers; the prefill cost feeds the fetch-or-recompute model."""
        assert self.prefix_cache is not None
        self.prefix_cache.report_prefill(sum(c.num_tokens for c in plan.prefills), seconds)
        for chunk in plan.prefills:
            self.prefix_cache.computed(chunk.seq, chunk.seq.num_computed - chunk.num_tokens)
        for seq in prompts_done:
            self.prefix_cache.prompt_done(seq)

    def kv_stats(self) -> dict[str, int]:
        """KV memory now: pool blocks in use, shared by several requests, evictable (cached, unused) and free;
        the peak in use since `reset_kv_peak`, and its bytes (the pool holds every K/V there is: no other copy)."""
        pool = self.kv.pool.stats()
        block_bytes = self.kv.spec.block_bytes
        return {"blocks_total": pool.total, "blocks_in_use": pool.in_use, "blocks_shared": pool.shared,
                "blocks_evictable": pool.evictable, "blocks_free": pool.free, "peak_blocks_in_use": pool.peak_in_use,
                "block_bytes": block_bytes, "peak_kv_bytes": pool.peak_in_use * block_bytes}

    def reset_kv_peak(self) -> None:
        self.kv.pool.reset_peak()

    @staticmethod
    def _block_early_stops(logits: torch.Tensor, seqs: list[Sequence]) -> None:
        """Below min_tokens, EOS and stop token ids cannot be sampled (as vLLM's and transformers' min tokens)."""
        blocked = [(row, seq) for row, seq in enumerate(seqs)
                   if seq.early_stop_ids and len(seq.output_ids) < seq.params.min_tokens]
        if not blocked:
            return
        if len(blocked) == len(seqs) and all(s.early_stop_ids == seqs[0].early_stop_ids for s in seqs):
            # every row bans the same ids (the usual case): one column fill, no index tensors per row
            logits.index_fill_(1, _long_tensor(list(seqs[0].early_stop_ids)), float("-inf"))
            return
        rows: list[int] = []
        ids: list[int] = []
        for row, seq in blocked:
            rows += [row] * len(seq.early_stop_ids)
            ids += seq.early_stop_ids
        logits.index_put_((_long_tensor(rows), _long_tensor(ids)), torch.tensor(float("-inf")))  # one write

    def _build_batch(
        self, plan: StepPlan
    ) -> tuple[torch.Tensor, AttentionBatch, torch.Tensor | None, list[tuple[Sequence, int]]]:
        """Token ids [T], the attention batch, the rows needing logits (None: every row, in order, as in pure
        decode): the sampled rows, then rows scoring prompt tokens, one per (sequence, prompt position) target."""
        bs = self.config.block_size
        token_ids, positions, slots = [], [], []
        for chunk in plan.decodes:  # one token each: the last one, at position num_computed
            seq, pos = chunk.seq, chunk.seq.num_computed
            token_ids.append(seq.output_ids[-1] if seq.output_ids else seq.prompt_ids[-1])
            positions.append(pos)
            slots.append(seq.block_table[pos // bs] * bs + pos % bs)
        logits_rows = list(range(len(plan.decodes)))
        prompt_rows: list[int] = []
        prompt_targets: list[tuple[Sequence, int]] = []
        prefills = []
        for chunk in plan.prefills:
            seq, start, end = chunk.seq, chunk.seq.num_computed, chunk.seq.num_computed + chunk.num_tokens
            key_slots, key_pos = self._key_slots([chunk])
            prefills.append(PrefillChunk(len(token_ids), len(token_ids) + chunk.num_tokens, key_slots[0], key_pos[0]))
            token_ids += seq.token_ids(start, end)
            positions += range(start, end)
            slots += key_slots[0, start:end].tolist()
            if chunk.samples:
                logits_rows.append(len(token_ids) - 1)
            if seq.params.prompt_logprobs is not None:  # position p's logits score prompt token p + 1
                first_row = len(token_ids) - chunk.num_tokens
                for pos in range(max(start, len(seq.prompt_logprobs) - 1), min(end, len(seq.prompt_ids) - 1)):
                    prompt_rows.append(first_row + pos - start)
                    prompt_targets.append((seq, pos + 1))
        logits_rows += prompt_rows
        positions_t = _long_tensor(positions)
        decode_slots = decode_pos = None
        same_length = False
        if plan.decodes:
            lengths = [c.seq.num_computed + 1 for c in plan.decodes]
            same_length = min(lengths) == max(lengths)  # no padded keys: decode attention needs no mask
            decode_slots, decode_pos = self._key_slots(plan.decodes)
            decode_slots = decode_slots.contiguous()  # the paged kernel reads it in place
        batch = AttentionBatch(positions_t, _long_tensor(slots), len(plan.decodes), decode_slots, decode_pos, prefills,
                               same_length, self.model.dtype)
        in_order = len(logits_rows) == len(token_ids) and logits_rows == list(range(len(token_ids)))
        return _long_tensor(token_ids), batch, None if in_order else _long_tensor(logits_rows), prompt_targets

    def _key_slots(self, chunks: list[ScheduledChunk]) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots and positions [B, L] of every key each chunk's sequence attends to after this step (-1 = pad)."""
        bs = self.config.block_size
        lengths = [c.seq.num_computed + c.num_tokens for c in chunks]
        max_len = max(lengths)
        width = self.kv.blocks_for(max_len)
        tables: list[int] = []
        for c in chunks:
            tables += c.seq.block_table[:width]
            tables += [0] * (width - len(c.seq.block_table))
        blocks = _long_tensor(tables).view(len(chunks), width, 1)
        slots = (blocks * bs + self._block_offsets).view(len(chunks), width * bs)[:, :max_len]
        return slots, self._key_positions(lengths)

    def _key_positions(self, lengths: list[int]) -> torch.Tensor:
        """Positions [B, L] of the keys of sequences `lengths` long, -1 past each one's end (L = the longest)."""
        max_len = max(lengths)
        positions = self._positions[:max_len].expand(len(lengths), max_len)
        if min(lengths) < max_len:
            positions = torch.where(positions < _long_tensor(lengths).unsqueeze(1), positions, -1)
        return positions

    def _append(self, seq: Sequence, token: int, logits: torch.Tensor, row: int,
                logprob: TokenLogprob | None) -> StepOutput:
        if seq.first_token_time is None:
            seq.first_token_time = time.perf_counter()
        seq.output_ids.append(token)
        if seq.params.return_logits:
            seq.logits.append(logits[row].clone())
        if logprob is not None:
            seq.logprobs.append(logprob)
        prompt_logprobs = None
        if seq.params.prompt_logprobs is not None and len(seq.output_ids) == 1:
            prompt_logprobs = tuple(seq.prompt_logprobs)
        reason = self._finish_reason(seq, token)
        if reason is not None:
            self._finish(seq, reason)
        return StepOutput(seq.request_id, token, reason is not None, reason, seq.cached_tokens, logprob,
                          prompt_logprobs)

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        params = seq.params
        eos = () if params.ignore_eos else self.eos_token_ids
        if token in params.stop_token_ids or token in eos:
            return "stop"
        if len(seq.output_ids) >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _finish(self, seq: Sequence, reason: str) -> None:
        self.scheduler.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason


def _long_tensor(values: list[int]) -> torch.Tensor:
    """1-D int64 tensor of `values`; several times faster than torch.tensor(list) on the small lists of a step."""
    if not values:
        return torch.empty(0, dtype=torch.long)
    return torch.frombuffer(array("q", values), dtype=torch.int64)


IDLE_WAIT_S = 0.001
SMALL_MODEL_HIDDEN = 1024  # below this, one thread decodes faster than two on the CPUs we measured


def _set_threads(num_threads: int | None, config: ModelConfig) -> None:
    if num_threads is None:
        num_threads = 1 if config.hidden_size < SMALL_MODEL_HIDDEN else len(os.sched_getaffinity(0))
    torch.set_num_threads(num_threads)


def _log_probs(logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], torch.Tensor] | None:
    """Rows whose request wants logprobs, and their log-softmax [R, V]; None when no request does."""
    rows = [row for row, seq in enumerate(seqs) if seq.params.logprobs is not None]
    if not rows:
        return None
    return rows, torch.log_softmax(logits[rows].float(), dim=-1)


def _token_logprobs(log_probs: tuple[list[int], torch.Tensor] | None, seqs: list[Sequence],
                    tokens: list[int]) -> dict[int, TokenLogprob]:
    """Per row that asked: the sampled token's logprob and the request's top-n."""
    if log_probs is None:
        return {}
    rows, lp = log_probs
    scored = _scored(lp, [tokens[row] for row in rows], [seqs[row].params.logprobs or 0 for row in rows])
    return dict(zip(rows, scored, strict=True))


def _scored(log_probs: torch.Tensor, token_ids: list[int], top_n: list[int]) -> list[TokenLogprob]:
    """Per row of log_probs [R, V]: token_ids[r]'s logprob and the top_n[r] most likely tokens (one gather, one
    topk for all rows)."""
    chosen = log_probs.gather(1, _long_tensor(token_ids).unsqueeze(1)).flatten().tolist()
    most = max(top_n)
    top_lp, top_ids = log_probs.topk(most, dim=-1) if most else (log_probs[:, :0], log_probs[:, :0].long())
    return [TokenLogprob(c, tuple(zip(ids[:n], values[:n])))
            for c, ids, values, n in zip(chosen, top_ids.tolist(), top_lp.tolist(), top_n, strict=True)]


def _record_prompt_logprobs(logits: torch.Tensor, targets: list[tuple[Sequence, int]]) -> None:
    """Append to each sequence the logprob (and top-n) of prompt token `pos` from the logits row before it."""
    scored = _scored(torch.log_softmax(logits.float(), dim=-1), [seq.prompt_ids[pos] for seq, pos in targets],
                     [seq.params.prompt_logprobs or 0 for seq, _ in targets])
    for (seq, _), token_logprob in zip(targets, scored, strict=True):
        seq.prompt_logprobs.append(token_logprob)
