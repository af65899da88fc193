"""Time vLLM (CPU build) on one batch of token-id prompts; run by bench/engine.py inside bench/.venv-vllm.

Contract: reads a JSON job file (model_dir, prompts, max_tokens, dtype, warmup_tokens, repeats, max_model_len),
builds one `vllm.LLM`, warms it up with a short run, times `repeats` greedy `generate` calls over all prompts
(min_tokens = max_tokens, EOS ignored) and prints the median one as a line `BENCH_RESULT <json>` on stdout (wall
time, per-request TTFT from vLLM's request metrics, generated ids); vLLM's own logs go to stderr. It owns no
prompt generation and no reporting: engine.py makes the prompts, so every system sees the same ids, and turns the
numbers into the table.
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


def build_llm(job: dict[str, Any]) -> Any:
    from vllm import LLM

    check_head_dim(job["model_dir"])
    return LLM(
        model=job["model_dir"],
        tokenizer=None,
        skip_tokenizer_init=True,  # token ids in, token ids out
        dtype=job["dtype"],
        max_model_len=job["max_model_len"],
        max_num_seqs=len(job["prompts"]),
        enforce_eager=job.get("enforce_eager", False),
        disable_log_stats=False,  # keeps RequestOutput.metrics (per-request first-token timing)
        seed=0,
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


def main(job_path: str) -> None:
    with open(job_path) as f:
        job = json.load(f)
    prompts: list[list[int]] = job["prompts"]
    max_tokens: int = job["max_tokens"]

    t0 = time.perf_counter()
    llm = build_llm(job)
    load_s = time.perf_counter() - t0
    run_batch(llm, prompts, job["warmup_tokens"])  # warm-up: compile, allocate, first-touch the KV cache

    runs = [timed_run(llm, prompts, max_tokens) for _ in range(job.get("repeats", 1))]
    outputs, wall_s, timings = sorted(runs, key=lambda run: run[1])[len(runs) // 2]  # the median run
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
        "env": {k: v for k, v in os.environ.items() if k.startswith("VLLM_")},
    }
    sys.stdout.flush()
    print(RESULT_PREFIX + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
