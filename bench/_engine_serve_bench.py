"""The serving workload of bench/serve_vs_vllm.py run on our engine alone, in one process: no HTTP, no Ray Serve.
Run by serve_vs_vllm.py (system `engine`) in our venv.

Contract: reads a JSON job file {"model_dir", "dtype", "threads", "input_len", "output_len", "num_prompts",
"concurrency", "warmups"}; makes random prompts of `input_len` token ids (seed 0), runs `warmups` of them, then
`num_prompts` through `AsyncLLMEngine` with `concurrency` clients each sending its next request when the last one
finished (as vLLM's client does at --max-concurrency), greedy, `output_len` tokens each, EOS ignored; prints
`BENCH_RESULT <json>` with the serving benchmark's metric names (output_throughput, request_throughput,
mean/p99 ttft, itl and tpot in ms, completed). ITL here is per token: the engine hands over every token.
Set against `ours`, it splits the serving cost into the engine's and the serving path's (Serve hops, HTTP).
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np

RESULT_PREFIX = "BENCH_RESULT "


async def closed_loop(engine, prompts: list[list[int]], concurrency: int, params) -> tuple[float, list[tuple]]:
    """Each of `concurrency` clients takes the next prompt when its last request finished -> (seconds, per request
    (ttft_s, tokens, gaps_s))."""
    queue = list(reversed(prompts))
    results = []

    async def one(prompt: list[int]) -> tuple[float, int, list[float]]:
        start = last = time.perf_counter()
        ttft, gaps, tokens = 0.0, [], 0
        async for _ in engine.generate(prompt, params):
            now = time.perf_counter()
            if tokens == 0:
                ttft = now - start
            else:
                gaps.append(now - last)
            last, tokens = now, tokens + 1
        return ttft, tokens, gaps

    async def client() -> None:
        while queue:
            results.append(await one(queue.pop()))

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return time.perf_counter() - start, results


def main(job_path: str) -> None:
    from moe_serve.replicas.async_engine import AsyncLLMEngine
    from moe_serve.replicas.engine import EngineConfig, LLMEngine
    from moe_serve.replicas.sampling import SamplingParams

    job = json.loads(Path(job_path).read_text())
    vocab = json.loads((Path(job["model_dir"]) / "config.json").read_text())["vocab_size"]
    rng = random.Random(0)
    prompts = [[rng.randrange(vocab) for _ in range(job["input_len"])]
               for _ in range(job["warmups"] + job["num_prompts"])]
    config = EngineConfig(dtype=job["dtype"], num_threads=job["threads"])
    engine = AsyncLLMEngine(LLMEngine.from_pretrained(job["model_dir"], config))
    params = SamplingParams(max_tokens=job["output_len"], temperature=0.0, ignore_eos=True)
    try:
        asyncio.run(closed_loop(engine, prompts[: job["warmups"]], job["concurrency"], params))
        seconds, results = asyncio.run(closed_loop(engine, prompts[job["warmups"]:], job["concurrency"], params))
    finally:
        engine.shutdown()
    ttfts = [r[0] * 1000 for r in results]
    gaps = [g * 1000 for r in results for g in r[2]]
    tpots = [statistics.fmean(r[2]) * 1000 for r in results if r[2]]
    tokens = sum(r[1] for r in results)
    doc = {"completed": len(results), "duration": seconds, "total_output_tokens": tokens,
           "output_throughput": tokens / seconds, "request_throughput": len(results) / seconds,
           "mean_ttft_ms": statistics.fmean(ttfts), "p99_ttft_ms": float(np.percentile(ttfts, 99)),
           "mean_itl_ms": statistics.fmean(gaps), "p99_itl_ms": float(np.percentile(gaps, 99)),
           "mean_tpot_ms": statistics.fmean(tpots)}
    print(RESULT_PREFIX + json.dumps(doc), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
