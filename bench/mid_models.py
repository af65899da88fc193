"""The mid-size checkpoints the engine benchmark runs at real model shapes (`bench/engine.py --suite mid`).

Two shapes, random weights saved in bf16 by `transformers` `save_pretrained` (the layout and dtype a published
checkpoint has), made once into bench/.models/:
- mixtral-mid: hidden 1024, intermediate 2048, 8 experts top-2, 4 layers, heads 16/4, vocab 32000 (277M params);
- qwen3-mid: hidden 1024, 64 experts top-8, moe_intermediate 512, 4 layers, heads 16/4 of 64, vocab 32000 (479M).
A tiny model is bound by per-op overhead; these are bound by memory bandwidth and matmul throughput, as real ones.
"""

from __future__ import annotations

import json
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


def weight_bytes(model_dir: Path) -> dict[str, int]:
    """Bytes of the checkpoint's tensors read per decode step: every dense weight (embeddings excluded: one row
    per token), and the experts, whose share depends on how many are routed (see `decode_bytes`)."""
    from safetensors import safe_open

    totals = {"dense": 0, "experts": 0, "embed": 0}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                t = f.get_slice(key)
                n = _numel(t.get_shape()) * _itemsize(t.get_dtype())
                kind = "experts" if ".experts." in key else "embed" if "embed_tokens" in key else "dense"
                totals[kind] += n
    return totals


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _itemsize(dtype: str) -> int:
    return {"F32": 4, "BF16": 2, "F16": 2, "I8": 1, "U8": 1, "I64": 8}.get(dtype, 4)


def config_summary(model_dir: Path) -> dict[str, Any]:
    return json.loads((model_dir / "config.json").read_text())
