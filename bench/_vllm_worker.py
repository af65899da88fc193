"""Time vLLM (CPU build) on batches of token-id prompts; run by bench/engine.py and bench/prefix.py inside
bench/.venv-vllm.

Contract: reads a JSON job file (model_dir, prompts, max_tokens, dtype, warmup_tokens, repeats, max_model_len),
builds one `vllm.LLM`, warms it up with a short run, times `repeats` greedy `generate` calls over all prompts
(min_tokens = max_tokens, EOS ignored) and prints the median one as a line `BENCH_RESULT <json>` on stdout (wall
time, per-request TTFT from vLLM's request metrics, generated ids, and the generated ids of every timed run in
`token_ids_all`); vLLM's own logs go to stderr. It owns no prompt generation and no reporting: the bench script
makes the prompts, so every system sees the same ids, and turns the numbers into the table.
Optional job fields (absent: the behaviour above): `warmup_prompts` (the warm-up's own batch), `timed_prompts` (one
batch per timed run, in place of `prompts` and `repeats`), `enable_prefix_caching` (passed to `vllm.LLM`; absent:
vLLM's default). With prefix caching on, the result also has `prefix_cache` (vLLM's hit and query token counters
over the timed runs).
It imports nothing from moe_serve: this venv has vLLM's torch and transformers pins, not ours.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

# Set before vLLM is imported: its logger reads these once.
os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")

RESULT_PREFIX = "BENCH_RESULT "


def check_head_dim(model_dir: str) -> None:
    """Fail fast, with the reason, on a head size that vLLM's CPU attention has no kernel for."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    supported = CPUAttentionBackend.get_supported_head_sizes()
    if head_dim not in supported:
        raise ValueError(f"vLLM CPU attention does not support head_dim={head_dim} (supported: {supported})")


def build_llm(job: dict[str, Any], max_num_seqs: int) -> Any:
    from vllm import LLM

    check_head_dim(job["model_dir"])
    options = {k: job[k] for k in ("enable_prefix_caching",) if k in job}
    return LLM(
        model=job["model_dir"],
        tokenizer=None,
        skip_tokenizer_init=True,  # token ids in, token ids out
        dtype=job["dtype"],
        max_model_len=job["max_model_len"],
        max_num_seqs=max_num_seqs,
        enforce_eager=job.get("enforce_eager", False),
        disable_log_stats=False,  # keeps RequestOutput.metrics (per-request first-token timing)
        seed=0,
        **options,
    )


def run_batch(llm: Any, prompts: list[list[int]], max_tokens: int) -> tuple[list[Any], float]:
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(max_tokens=max_tokens, min_tokens=max_tokens, ignore_eos=True, temperature=0.0,
                            detokenize=False)
    inputs = [TokensPrompt(prompt_token_ids=ids) for ids in prompts]
    start = time.perf_counter()
    outputs = llm.generate(inputs, params, use_tqdm=False)
    return outputs, time.perf_counter() - start


def timed_run(llm: Any, prompts: list[list[int]], max_tokens: int) -> tuple[list[Any], float, dict[str, Any] | None]:
    outputs, wall_s = run_batch(llm, prompts, max_tokens)
    return outputs, wall_s, request_timings(outputs)


def request_timings(outputs: list[Any]) -> dict[str, Any] | None:
    """TTFT per request and the decode-phase span, from vLLM's request metrics when it kept them.

    first_token_latency is from the request's arrival in the frontend; the *_ts stamps are engine-core clock.
    """
    metrics = [out.metrics for out in outputs]
    if any(m is None or not getattr(m, "first_token_ts", 0.0) for m in metrics):
        return None
    ttft = [m.first_token_latency for m in metrics]
    decode_span = max(m.last_token_ts for m in metrics) - min(m.first_token_ts for m in metrics)
    return {"ttft_s": ttft, "decode_span_s": decode_span}


def prefix_cache_counters(llm: Any) -> dict[str, int]:
    """vLLM's prefix-cache counters so far, in tokens: looked up (`queried_tokens`) and found (`hit_tokens`)."""
    names = {"vllm:prefix_cache_queries": "queried_tokens", "vllm:prefix_cache_hits": "hit_tokens"}
    return {names[m.name]: m.value for m in llm.get_metrics() if m.name in names}


def main(job_path: str) -> None:
    with open(job_path) as f:
        job = json.load(f)
    timed: list[list[list[int]]] = job.get("timed_prompts") or [job["prompts"]] * job.get("repeats", 1)
    warmup: list[list[int]] = job.get("warmup_prompts") or timed[0]
    max_tokens: int = job["max_tokens"]

    t0 = time.perf_counter()
    llm = build_llm(job, max(len(batch) for batch in (warmup, *timed)))
    load_s = time.perf_counter() - t0
    run_batch(llm, warmup, job["warmup_tokens"])  # warm-up: compile, allocate, first-touch the KV cache

    counters = prefix_cache_counters(llm) if job.get("enable_prefix_caching") else None
    runs = [timed_run(llm, prompts, max_tokens) for prompts in timed]
    median = sorted(range(len(runs)), key=lambda i: runs[i][1])[len(runs) // 2]
    outputs, wall_s, timings = runs[median]
    prompts = timed[median]
    ttft_source = "request_metrics"
    if timings is None:  # no metrics kept: TTFT is a max_tokens=1 batch
        _, one_s = run_batch(llm, prompts, 1)
        timings = {"ttft_s": [one_s] * len(prompts), "decode_span_s": None}
        ttft_source = "max_tokens=1 batch"

    import torch
    import vllm

    result = {
        "vllm_version": vllm.__version__,
        "torch_version": torch.__version__,
        "frontend_torch_threads": torch.get_num_threads(),  # this process; the model runs in vLLM's worker
        "dtype": job["dtype"],
        "load_s": load_s,
        "wall_s": wall_s,
        "wall_s_all": [run[1] for run in runs],
        "ttft_s": timings["ttft_s"],
        "decode_span_s": timings["decode_span_s"],
        "ttft_source": ttft_source,
        "token_ids": [list(out.outputs[0].token_ids) for out in outputs],
        "token_ids_all": [[list(out.outputs[0].token_ids) for out in run[0]] for run in runs],
        "env": {k: v for k, v in os.environ.items() if k.startswith("VLLM_")},
    }
    if counters is not None:  # the TTFT fallback batch, when there is one, counts too
        after = prefix_cache_counters(llm)
        result["prefix_cache"] = {k: after[k] - counters[k] for k in after}
    sys.stdout.flush()
    print(RESULT_PREFIX + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
