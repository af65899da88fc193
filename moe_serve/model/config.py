"""Model configuration: one frozen dataclass for every supported MoE family, parsed from `config.json`.

This module owns the mapping from each family's Hugging Face config keys to our field names. It knows nothing
about weights, devices or serving. Families: Mixtral, Qwen2-MoE (gated shared expert, `norm_topk_prob`,
`decoder_sparse_step`, `mlp_only_layers`), Qwen3-MoE (per-head q/k RMSNorm, no shared expert) and OLMoE (q/k
RMSNorm over the whole projection, optional `clip_qkv`, top-k of the softmax without renormalisation).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


class ModelConfigError(ValueError):
    """A config.json that is missing, unreadable or describes a model we cannot serve."""


@dataclass(frozen=True)
class ModelConfig:
    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    # Per layer: the attention window in tokens, None for full attention.
    sliding_windows: tuple[int | None, ...]
    # Per layer: True where the FFN is a sparse MoE block, False where it is a dense MLP.
    moe_layers: tuple[bool, ...]
    num_experts: int
    top_k: int
    expert_intermediate_size: int
    dense_intermediate_size: int
    norm_topk_prob: bool
    shared_expert_intermediate_size: int  # 0: no shared expert
    attention_bias: bool
    qk_norm: bool
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    qk_norm_per_head: bool = True  # Qwen3 normalises each head; OLMoE the whole q (and k) projection
    clip_qkv: float | None = None  # OLMoE: q, k, v clamped to [-clip, clip] after the norms

    @property
    def moe_layer_ids(self) -> list[int]:
        return [i for i, is_moe in enumerate(self.moe_layers) if is_moe]

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ModelConfigError(f"{path}: missing; a model directory needs config.json (Hugging Face layout)")
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelConfigError(f"{path}: unreadable JSON ({exc})") from exc
        return cls.from_hf(raw, source=str(path))

    @classmethod
    def from_hf(cls, raw: dict[str, Any], source: str = "config") -> ModelConfig:
        family = raw.get("model_type")
        if family not in SUPPORTED_FAMILIES:
            raise ModelConfigError(
                f"{source}: unknown model_type {family!r}; supported: {', '.join(SUPPORTED_FAMILIES)}"
            )
        try:
            return _PARSERS[family](raw)
        except KeyError as exc:
            raise ModelConfigError(f"{source}: missing required key {exc.args[0]!r} for {family}") from exc


def _rope_theta(raw: dict[str, Any]) -> float:
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ModelConfigError(f"rope_type {rope_type!r} is not supported (only the default RoPE)")
    return float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))


def _eos_ids(raw: dict[str, Any]) -> tuple[int, ...]:
    eos = raw.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def _common(raw: dict[str, Any]) -> dict[str, Any]:
    heads = raw["num_attention_heads"]
    return dict(
        family=raw["model_type"],
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        num_layers=raw["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=raw.get("num_key_value_heads") or heads,
        head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        rope_theta=_rope_theta(raw),
        max_position_embeddings=raw.get("max_position_embeddings", 8192),
        tie_word_embeddings=raw.get("tie_word_embeddings", False),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=_eos_ids(raw),
    )


def _parse_mixtral(raw: dict[str, Any]) -> ModelConfig:
    layers = raw["num_hidden_layers"]
    window = raw.get("sliding_window") or None
    return ModelConfig(
        **_common(raw),
        sliding_windows=(window,) * layers,
        moe_layers=(True,) * layers,
        num_experts=raw["num_local_experts"],
        top_k=raw["num_experts_per_tok"],
        expert_intermediate_size=raw["intermediate_size"],
        dense_intermediate_size=raw["intermediate_size"],
        norm_topk_prob=True,  # Mixtral always renormalises the top-k softmax weights
        shared_expert_intermediate_size=0,
        attention_bias=False,
        qk_norm=False,
    )


def _qwen_windows(raw: dict[str, Any]) -> tuple[int | None, ...]:
    """Qwen layers use `layer_types` when present, else transformers' rule for `use_sliding_window`."""
    layers = raw["num_hidden_layers"]
    window = raw.get("sliding_window") or None
    types = raw.get("layer_types")
    if types is None:
        use = bool(raw.get("use_sliding_window", False))
        max_window_layers = raw.get("max_window_layers", layers)
        types = [
            "sliding_attention" if use and (i + 1) % 2 and i < max_window_layers else "full_attention"
            for i in range(layers)
        ]
    if len(types) != layers:
        raise ModelConfigError(f"layer_types has {len(types)} entries for {layers} layers")
    return tuple(window if t == "sliding_attention" and raw.get("use_sliding_window") else None for t in types)


def _qwen_num_experts(raw: dict[str, Any]) -> int:
    """Qwen configs name it `num_experts`; transformers 5 writes `num_local_experts` for Qwen3-MoE."""
    return raw["num_experts"] if "num_experts" in raw else raw["num_local_experts"]


def _qwen_moe_layers(raw: dict[str, Any]) -> tuple[bool, ...]:
    step = raw.get("decoder_sparse_step", 1) or 1
    mlp_only = set(raw.get("mlp_only_layers") or [])
    experts = _qwen_num_experts(raw)
    return tuple(
        i not in mlp_only and experts > 0 and (i + 1) % step == 0 for i in range(raw["num_hidden_layers"])
    )


def _parse_qwen(raw: dict[str, Any]) -> ModelConfig:
    """Qwen2-MoE and Qwen3-MoE: Qwen2 adds a gated shared expert and q/k/v biases, Qwen3 per-head q/k norms."""
    qwen2 = raw["model_type"] == "qwen2_moe"
    return ModelConfig(
        **_common(raw),
        sliding_windows=_qwen_windows(raw),
        moe_layers=_qwen_moe_layers(raw),
        num_experts=_qwen_num_experts(raw),
        top_k=raw["num_experts_per_tok"],
        expert_intermediate_size=raw["moe_intermediate_size"],
        dense_intermediate_size=raw["intermediate_size"],
        norm_topk_prob=raw.get("norm_topk_prob", False),
        shared_expert_intermediate_size=raw.get("shared_expert_intermediate_size", 0) if qwen2 else 0,
        attention_bias=raw.get("qkv_bias", True) if qwen2 else raw.get("attention_bias", False),
        qk_norm=not qwen2,
    )


def _parse_olmoe(raw: dict[str, Any]) -> ModelConfig:
    layers = raw["num_hidden_layers"]
    return ModelConfig(
        **_common(raw),
        sliding_windows=(None,) * layers,
        moe_layers=(True,) * layers,
        num_experts=raw["num_experts"],
        top_k=raw["num_experts_per_tok"],
        expert_intermediate_size=raw["intermediate_size"],
        dense_intermediate_size=raw["intermediate_size"],
        norm_topk_prob=raw.get("norm_topk_prob", False),
        shared_expert_intermediate_size=0,
        attention_bias=raw.get("attention_bias", False),
        qk_norm=True,
        qk_norm_per_head=False,
        clip_qkv=raw.get("clip_qkv"),
    )


_PARSERS = {"mixtral": _parse_mixtral, "qwen2_moe": _parse_qwen, "qwen3_moe": _parse_qwen, "olmoe": _parse_olmoe}
