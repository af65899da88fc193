"""The mid-size checkpoints the engine benchmark runs at real model shapes (`bench/engine.py --suite mid`).

Two shapes, random weights saved in bf16 by `transformers` `save_pretrained` (the layout and dtype a published
checkpoint has), made once into bench/.models/:
- mixtral-mid: hidden 1024, intermediate 2048, 8 experts top-2, 4 layers, heads 16/4, vocab 32000 (277M params);
- qwen3-mid: hidden 1024, 64 experts top-8, moe_intermediate 512, 4 layers, heads 16/4 of 64, vocab 32000 (479M).
A tiny model is bound by per-op overhead; these are bound by memory bandwidth and matmul throughput, as real ones.
Their experts are only ~70% of the weights (4 layers beside a 32000-token vocabulary); in published MoE checkpoints
they are 93-97% (Mixtral 8x7B, Qwen3-30B-A3B). The footprint benchmark also runs two deeper shapes that match that:
- mixtral-deep: mixtral-mid with 16 layers and intermediate 3584 (1.5B params, experts 93%);
- qwen3-deep: qwen3-mid with 16 layers (1.7B params, experts 94%).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

MODELS_DIR = Path(__file__).resolve().parent / ".models"
_COMMON: dict[str, Any] = dict(hidden_size=1024, num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=4,
                               vocab_size=32000, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2,
                               tie_word_embeddings=False)
MID_SHAPES: dict[str, dict[str, Any]] = {
    "mixtral-mid": dict(_COMMON, model_type="mixtral", intermediate_size=2048, num_local_experts=8,
                        num_experts_per_tok=2),
    "qwen3-mid": dict(_COMMON, model_type="qwen3_moe", head_dim=64, intermediate_size=2048, moe_intermediate_size=512,
                      num_experts=64, num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1),
}
MID_SHAPES["mixtral-deep"] = dict(MID_SHAPES["mixtral-mid"], num_hidden_layers=16, intermediate_size=3584)
MID_SHAPES["qwen3-deep"] = dict(MID_SHAPES["qwen3-mid"], num_hidden_layers=16)


def ensure_mid_model(name: str, root: Path = MODELS_DIR, dtype: torch.dtype = torch.bfloat16) -> Path:
    """The checkpoint `name` of MID_SHAPES, made (seed 0) on first use."""
    out = root / f"{name}-{str(dtype).removeprefix('torch.')}"
    if (out / "config.json").is_file():
        return out
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = dict(MID_SHAPES[name])
    config = AutoConfig.for_model(shape.pop("model_type"), **shape)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    model.save_pretrained(out)
    return out


def param_counts(model_dir: Path) -> dict[str, int]:
    """Parameters by kind: `embed` (one row read per token), `dense` (every other non-expert weight, LM head
    included: all read every decode step) and `experts` (all layers)."""
    from safetensors import safe_open

    counts = {"dense": 0, "experts": 0, "embed": 0}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                kind = "experts" if ".experts." in key else "embed" if "embed_tokens" in key else "dense"
                counts[kind] += math.prod(f.get_slice(key).get_shape())
    return counts


def decode_step_bytes(model_dir: Path, batch: int, dense_bytes_per_param: float,
                      expert_bytes_per_param: float) -> float:
    """Weight bytes one decode step of `batch` sequences reads: every dense weight, and in each MoE layer the experts
    that at least one of the batch's tokens routes to (expected count under uniform routing, E (1 - (1 - A/E)^B))."""
    cfg = json.loads((model_dir / "config.json").read_text())
    experts = cfg.get("num_local_experts") or cfg["num_experts"]
    top_k = cfg["num_experts_per_tok"]
    counts = param_counts(model_dir)
    touched = 1 - (1 - top_k / experts) ** batch
    return counts["dense"] * dense_bytes_per_param + counts["experts"] * touched * expert_bytes_per_param


def read_bandwidth(nbytes: int = 512 << 20, repeats: int = 5) -> float:
    """Bytes per second a decode step can read: a sum over a buffer far larger than the caches, on every core this
    process may use, best of `repeats`."""
    import time

    threads = torch.get_num_threads()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    src = torch.ones(nbytes // 4)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        src.sum()
        best = min(best, time.perf_counter() - start)
    torch.set_num_threads(threads)
    return nbytes / best
