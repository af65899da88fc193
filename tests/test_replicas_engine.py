"""Engine behaviour: sampling, stops, abort, streaming, preemption, bounded KV memory, bad input."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from conftest import random_prompts

from moe_serve.replicas.async_engine import AsyncLLMEngine
from moe_serve.replicas.engine import EngineConfig, LLMEngine
from moe_serve.replicas.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(mixtral_dir: Path) -> LLMEngine:
    return LLMEngine.from_pretrained(mixtral_dir, EngineConfig(block_size=8))


def prompts(engine: LLMEngine, lengths: list[int], seed: int = 0) -> list[list[int]]:
    return random_prompts(lengths, engine.model_config.vocab_size, seed)


def test_seeded_sampling_is_reproducible(engine: LLMEngine) -> None:
    prompt = prompts(engine, [10])
    params = SamplingParams(max_tokens=16, temperature=1.5, top_p=0.95, top_k=50, seed=7, ignore_eos=True)
    first = engine.generate(prompt, params)[0].token_ids
    again = engine.generate(prompt, params)[0].token_ids
    other = engine.generate(prompt, SamplingParams(**{**params.__dict__, "seed": 8}))[0].token_ids
    assert first == again
    assert first != other


def test_top_k_one_is_greedy(engine: LLMEngine) -> None:
    prompt = prompts(engine, [9])
    sampled = engine.generate(prompt, SamplingParams(max_tokens=12, temperature=2.0, top_k=1, ignore_eos=True))
    assert sampled[0].token_ids == engine.generate(prompt, GREEDY)[0].token_ids


def test_tiny_top_p_is_greedy(engine: LLMEngine) -> None:
    prompt = prompts(engine, [9], seed=4)
    sampled = engine.generate(prompt, SamplingParams(max_tokens=12, temperature=1.0, top_p=1e-6, ignore_eos=True))
    assert sampled[0].token_ids == engine.generate(prompt, GREEDY)[0].token_ids


def test_max_tokens_and_stop_token_ids(engine: LLMEngine) -> None:
    prompt = prompts(engine, [11])
    full = engine.generate(prompt, GREEDY)[0]
    assert len(full.token_ids) == 12 and full.finish_reason == "length"
    stop_at = full.token_ids[4]
    first_index = full.token_ids.index(stop_at)
    stopped = engine.generate(prompt, SamplingParams(max_tokens=12, temperature=0, stop_token_ids=(stop_at,)))[0]
    assert stopped.token_ids == full.token_ids[: first_index + 1]
    assert stopped.finish_reason == "stop"


def test_stop_string_truncates_text(tiny_model_dir: Path) -> None:
    engine = LLMEngine.from_pretrained(tiny_model_dir)
    assert engine.tokenizer is not None
    prompt = engine.tokenizer.encode("The router sends every token to")
    full = engine.generate([prompt], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0]
    assert full.text
    stop = full.text[len(full.text) // 2 :][:3]
    assert stop.strip(), f"pick a visible stop string from {full.text!r}"
    out = engine.generate([prompt], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=(stop,)))[0]
    assert out.finish_reason == "stop"
    assert out.text == full.text[: full.text.find(stop)]
    assert stop not in out.text


def stop_spanning_two_deltas(engine: LLMEngine, token_ids: list[int], text: str) -> str:
    """A stop string made of the end of one token's text and the start of the next's, first found there."""
    assert engine.tokenizer is not None
    texts = [engine.tokenizer.decode(token_ids[:k]) for k in range(len(token_ids) + 1)]
    for k in range(1, len(texts) - 1):
        delta = texts[k + 1][len(texts[k]) :]
        candidate = texts[k][-2:] + delta[:2]
        if texts[k + 1].startswith(texts[k]) and delta and candidate.strip() and len(texts[k]) >= 2 \
                and text.find(candidate) == len(texts[k]) - 2:
            return candidate
    raise AssertionError(f"no stop string spans two deltas of {text!r}")


def test_stop_string_spanning_two_deltas_is_found(tiny_model_dir: Path) -> None:
    """The stop-string scan looks at a tail window only; one that starts in an earlier delta must still be found."""
    engine = LLMEngine.from_pretrained(tiny_model_dir)
    assert engine.tokenizer is not None
    prompt = engine.tokenizer.encode("The router sends every token to")
    full = engine.generate([prompt], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0]
    stop = stop_spanning_two_deltas(engine, full.token_ids, full.text)
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=(stop,))
    out = engine.generate([prompt], params)[0]
    assert out.finish_reason == "stop"
    assert out.text == full.text[: full.text.find(stop)]


def test_stop_string_before_min_tokens_stops_at_min_tokens(tiny_model_dir: Path) -> None:
    """A stop string completed while min_tokens forbade stopping ends the request at the min_tokens step, even
    though it lies outside the tail window scanned at that step."""
    engine = LLMEngine.from_pretrained(tiny_model_dir)
    assert engine.tokenizer is not None
    prompt = engine.tokenizer.encode("The router sends every token to")
    full = engine.generate([prompt], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0]
    min_tokens = 12
    early = engine.tokenizer.decode(full.token_ids[:3])
    text_at_min = engine.tokenizer.decode(full.token_ids[:min_tokens])
    stop = early.strip()[:3]
    assert stop and text_at_min.find(stop) + len(stop) <= len(early), f"pick an early stop string from {full.text!r}"
    before_min = engine.tokenizer.decode(full.token_ids[: min_tokens - 1])
    window = len(text_at_min) - len(before_min) + len(stop) - 1
    assert stop not in text_at_min[-window:], "the stop string must lie outside the last step's window"
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=(stop,), min_tokens=min_tokens)
    out = engine.generate([prompt], params)[0]
    assert out.finish_reason == "stop"
    assert out.token_ids == full.token_ids[:min_tokens]
    assert out.text == text_at_min[: text_at_min.find(stop)]


def test_logprobs_are_the_models_log_softmax(engine: LLMEngine) -> None:
    prompt = prompts(engine, [12], seed=5)
    params = SamplingParams(max_tokens=6, temperature=0.7, top_k=5, seed=3, ignore_eos=True, logprobs=3,
                            return_logits=True)
    [out] = engine.generate(prompt, params)
    assert out.logprobs is not None and len(out.logprobs) == len(out.token_ids) == 6
    for token, logits, lp in zip(out.token_ids, out.logits, out.logprobs, strict=True):
        expected = torch.log_softmax(logits.float(), dim=-1)  # the raw logits: no temperature, no top-k
        assert abs(lp.logprob - expected[token].item()) < 1e-5
        values, ids = expected.topk(3)
        assert [t for t, _ in lp.top] == ids.tolist()
        assert [v for _, v in lp.top] == pytest.approx(values.tolist(), abs=1e-5)
    [plain] = engine.generate(prompt, SamplingParams(max_tokens=6, temperature=0.7, top_k=5, seed=3, ignore_eos=True))
    assert plain.token_ids == out.token_ids and plain.logprobs is None  # asking changes nothing else
    with pytest.raises(ValueError, match="logprobs must be between 0 and 20"):
        SamplingParams(logprobs=21)


def test_abort_frees_blocks(engine: LLMEngine) -> None:
    free_before = engine.kv.num_free_blocks
    request_id = engine.add_request(prompts(engine, [40])[0], SamplingParams(max_tokens=100, temperature=0))
    engine.step()
    assert engine.kv.num_free_blocks < free_before
    engine.abort_request(request_id)
    assert engine.kv.num_free_blocks == free_before
    assert engine.pop_result(request_id).finish_reason == "abort"
    assert not engine.has_unfinished()


def test_kv_memory_bounded_by_budget(mixtral_dir: Path) -> None:
    budget = 2**20
    engine = LLMEngine.from_pretrained(mixtral_dir, EngineConfig(kv_cache_bytes=budget, block_size=8))
    total = engine.kv.spec.num_blocks
    for round_ in range(3):
        engine.generate(prompts(engine, [30, 50, 20], seed=round_), GREEDY)
        assert engine.kv.num_free_blocks == total
        assert engine.kv.nbytes <= budget


def test_preemption_keeps_greedy_output(mixtral_dir: Path, engine: LLMEngine) -> None:
    """A KV budget too small for all sequences at once forces preemption and recompute; outputs do not change."""
    batch = prompts(engine, [30, 28, 25, 33], seed=5)
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    expected = [o.token_ids for o in engine.generate(batch, params)]
    spec = engine.kv.spec
    small = LLMEngine.from_pretrained(mixtral_dir, EngineConfig(block_size=8, kv_cache_bytes=14 * spec.block_bytes))
    assert small.kv.spec.num_blocks == 14  # 4 sequences of ~60 tokens need 32 blocks
    assert [o.token_ids for o in small.generate(batch, params)] == expected
    assert small.scheduler.num_preemptions > 0


async def test_async_streaming_matches_sync_and_abort_on_disconnect(mixtral_dir: Path, engine: LLMEngine) -> None:
    async_engine = AsyncLLMEngine(LLMEngine.from_pretrained(mixtral_dir, EngineConfig(block_size=8)))
    try:
        batch = prompts(engine, [15, 7, 22], seed=3)
        expected = [o.token_ids for o in engine.generate(batch, GREEDY)]

        async def collect(prompt: list[int]) -> list[int]:
            return [out.token_id async for out in async_engine.generate(prompt, GREEDY)]

        streamed = await asyncio.gather(*(collect(p) for p in batch))
        assert list(streamed) == expected

        free = async_engine.engine.kv.num_free_blocks
        stream = async_engine.generate(batch[0], SamplingParams(max_tokens=1000, temperature=0, ignore_eos=True))
        async for _ in stream:
            break  # the client goes away after the first token
        await stream.aclose()
        for _ in range(100):
            if not async_engine.engine.has_unfinished():
                break
            await asyncio.sleep(0.02)
        assert not async_engine.engine.has_unfinished()
        assert async_engine.engine.kv.num_free_blocks == free
    finally:
        async_engine.shutdown()


async def test_chunks_send_the_first_token_alone_then_everything_in_order(mixtral_dir: Path, engine: LLMEngine) -> None:
    async_engine = AsyncLLMEngine(LLMEngine.from_pretrained(mixtral_dir))
    try:
        prompt = prompts(engine, [9], seed=4)[0]
        params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
        expected = engine.generate([prompt], params)[0].token_ids
        for interval_s in (0.0, 0.05, None):
            chunks = [[o.token_id for o in chunk]
                      async for chunk in async_engine.generate_chunks(prompt, params, interval_s=interval_s)]
            assert len(chunks[0]) == 1 and [t for chunk in chunks for t in chunk] == expected
            if interval_s is None:
                assert len(chunks) == 2  # the first token, then the rest at the end
    finally:
        async_engine.shutdown()


@pytest.mark.parametrize(
    ("prompt", "params", "message"),
    [
        ([], {}, "prompt is empty"),
        ([5] * 9000, {}, "prompt has 9000 tokens, the context holds 8192"),
        ([5, 99999], {}, "unknown token id"),
        ([5, -1], {}, "unknown token id"),
    ],
)
def test_bad_requests_raise_clear_errors(engine: LLMEngine, prompt: list[int], params: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        engine.add_request(prompt, SamplingParams(**params))
    assert not engine.has_unfinished()


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"max_tokens": -1}, "max_tokens must be a positive integer"),
        ({"max_tokens": 0}, "max_tokens must be a positive integer"),
        ({"temperature": -0.5}, "temperature must be >= 0"),
        ({"top_p": 0.0}, "top_p must be in"),
        ({"top_k": -5}, "top_k must be"),
    ],
)
def test_bad_sampling_params(params: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**params)


async def test_async_bad_request_raises_in_caller(engine: LLMEngine, mixtral_dir: Path) -> None:
    async_engine = AsyncLLMEngine(LLMEngine.from_pretrained(mixtral_dir))
    try:
        with pytest.raises(ValueError, match="prompt is empty"):
            async for _ in async_engine.generate([], GREEDY):
                pass
    finally:
        async_engine.shutdown()


def test_min_tokens_blocks_stop_tokens(engine: LLMEngine) -> None:
    prompt = prompts(engine, [11], seed=9)
    full = engine.generate(prompt, GREEDY)[0].token_ids
    stop_id = full[1]
    params = SamplingParams(max_tokens=12, temperature=0, min_tokens=6, stop_token_ids=(stop_id,))
    out = engine.generate(prompt, params)[0]
    assert len(out.token_ids) >= 6
    assert stop_id not in out.token_ids[:6]


def test_min_tokens_bans_eos_even_when_ignored(engine: LLMEngine) -> None:
    """As transformers' min_new_tokens and vLLM's min_tokens: EOS cannot be sampled below the minimum."""
    prompt = prompts(engine, [13], seed=10)
    eos = engine.eos_token_ids[0]
    params = SamplingParams(max_tokens=8, temperature=0, min_tokens=8, ignore_eos=True, return_logits=True)
    out = engine.generate(prompt, params)[0]
    assert all(step[eos] == float("-inf") for step in out.logits)


@pytest.mark.parametrize(("text", "sampling"), [
    ("The experts were resumed", {"temperature": 0.0}),
    ("The experts were resumed", {"temperature": 0.9, "seed": 5}),
    ("Request 3 asks the experts", {"temperature": 0.9, "seed": 3}),  # its first tokens are half a character
])
async def test_a_resumed_request_continues_tokens_and_text(tiny_model_dir: Path, text: str, sampling: dict) -> None:
    """Migration's contract: the prompt plus the first k generated ids, with resumed_tokens=k and the remaining
    budget, gives the rest of the same tokens and text deltas (the random stream skips the k draws already made)."""
    async_engine = AsyncLLMEngine(LLMEngine.from_pretrained(tiny_model_dir))
    try:
        prompt = async_engine.engine.tokenizer.encode(text)
        full = SamplingParams(max_tokens=20, ignore_eos=True, **sampling)

        async def run(prompt_ids: list[int], params: SamplingParams) -> tuple[list[int], list[str]]:
            outs = [o async for chunk in async_engine.generate_chunks(prompt_ids, params) for o in chunk]
            return [o.token_id for o in outs], [o.text_delta for o in outs]

        tokens, deltas = await run(prompt, full)
        for k in (1, 2, 7):
            rest = SamplingParams(**{**full.__dict__, "max_tokens": 20 - k, "resumed_tokens": k})
            assert await run(prompt + tokens[:k], rest) == (tokens[k:], deltas[k:])
    finally:
        async_engine.shutdown()


@pytest.mark.parametrize("min_tokens", [0, 12])
async def test_streamed_text_never_holds_part_of_a_stop_string(tiny_model_dir: Path, min_tokens: int) -> None:
    """The deltas a client joins equal the engine's text cut at the stop string, for a stop string split over two
    deltas (min_tokens=0) and for one completed while min_tokens forbade stopping (its text is held back, not sent);
    a request resumed after any of its tokens (migration) sends exactly the rest of those deltas."""
    async_engine = AsyncLLMEngine(LLMEngine.from_pretrained(tiny_model_dir))
    engine = async_engine.engine
    try:
        assert engine.tokenizer is not None
        prompt = engine.tokenizer.encode("The router sends every token to")
        full = engine.generate([prompt], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0]
        if min_tokens:
            stop = engine.tokenizer.decode(full.token_ids[:3]).strip()[:3]
            assert stop and full.text.find(stop) < len(engine.tokenizer.decode(full.token_ids[:min_tokens]))
        else:
            stop = stop_spanning_two_deltas(engine, full.token_ids, full.text)
        params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=(stop,), min_tokens=min_tokens)
        expected = engine.generate([prompt], params)[0]
        assert expected.finish_reason == "stop" and stop not in expected.text

        async def deltas(prompt_ids: list[int], params: SamplingParams) -> list[str]:
            return [o.text_delta async for chunk in async_engine.generate_chunks(prompt_ids, params) for o in chunk]

        sent = await deltas(prompt, params)
        assert "".join(sent) == expected.text
        for k in range(1, len(expected.token_ids)):
            rest = SamplingParams(**{**params.__dict__, "max_tokens": 24 - k, "resumed_tokens": k,
                                     "min_tokens": max(0, min_tokens - k)})
            assert await deltas(prompt + expected.token_ids[:k], rest) == sent[k:], f"resumed after {k} tokens"
    finally:
        async_engine.shutdown()


@pytest.mark.parametrize(("resumed", "message"), [(-1, "resumed_tokens must be a non-negative integer"),
                                                  (3, r"resumed_tokens \(3\) must be fewer than the prompt's 3")])
def test_bad_resumed_tokens_are_refused(engine: LLMEngine, resumed: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        engine.validate([5, 6, 7], SamplingParams(resumed_tokens=resumed))
