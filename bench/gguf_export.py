"""Write a GGUF file for llama.cpp from a Hugging Face MoE checkpoint (Mixtral or Qwen3-MoE layout), with the `gguf`
package; run inside bench/.venv-llama (numpy and gguf, no torch) by bench/_llama_worker.py.

Contract: `export(model_dir, out, dtype)` writes `out` with the checkpoint's weights in `dtype` ("bfloat16" or
"float32"; norms and the router stay float32, as llama.cpp's own converter keeps them), the model's hyperparameters,
and a placeholder SentencePiece vocabulary of the checkpoint's size (the bench feeds token ids, never text). The
tensor names, expert stacking and the rotary permutation of Mixtral's q/k rows follow llama.cpp's
convert_hf_to_gguf.py, so that llama.cpp computes what transformers computes on the same weights. Quantized files
(Q8_0, Q4_0) are made from this one by llama.cpp's own quantizer (the worker calls it), as its users make them.
"""

from __future__ import annotations

import json
import mmap
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np

ARCHS = {"mixtral": "llama", "qwen3_moe": "qwen3moe"}  # HF model_type -> llama.cpp architecture
_SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}


class Checkpoint:
    """The float tensors of a safetensors checkpoint, by HF name, read through mmap and widened to float32."""

    def __init__(self, model_dir: Path) -> None:
        self._where: dict[str, tuple[mmap.mmap, dict[str, Any], int]] = {}
        for path in sorted(model_dir.glob("*.safetensors")):
            with open(path, "rb") as f:
                data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            (header_len,) = struct.unpack("<Q", data[:8])
            header = json.loads(data[8:8 + header_len])
            header.pop("__metadata__", None)
            for name, info in header.items():
                if info["dtype"] not in _SAFETENSORS_DTYPES:
                    raise ValueError(f"{path.name}: tensor {name} has dtype {info['dtype']}; expected F32, F16 or BF16")
                self._where[name] = (data, info, 8 + header_len)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> np.ndarray:
        data, info, base = self._where[name]
        start, end = info["data_offsets"]
        raw = np.frombuffer(data, dtype=_SAFETENSORS_DTYPES[info["dtype"]], count=(end - start) // np.dtype(
            _SAFETENSORS_DTYPES[info["dtype"]]).itemsize, offset=base + start).reshape(info["shape"])
        if info["dtype"] == "BF16":  # bf16 is the top half of a float32
            return (raw.astype(np.uint32) << 16).view(np.float32)
        return raw.astype(np.float32)


def permute_rotary(w: np.ndarray, heads: int) -> np.ndarray:
    """q/k rows from HF's rotate-half order to llama.cpp's interleaved pairs (its LLaMA rope), per head."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tensors(ckpt: Checkpoint, cfg: dict[str, Any]) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array in HF [out, in] order; experts stacked [E, out, in]) for every weight."""
    mixtral = cfg["model_type"] == "mixtral"
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    experts = cfg.get("num_local_experts") or cfg["num_experts"]
    yield "token_embd.weight", ckpt.get("model.embed_tokens.weight")
    yield "output_norm.weight", ckpt.get("model.norm.weight")
    lm_head = "lm_head.weight" if "lm_head.weight" in ckpt else "model.embed_tokens.weight"
    yield "output.weight", ckpt.get(lm_head)
    for i in range(cfg["num_hidden_layers"]):
        hf, blk = f"model.layers.{i}", f"blk.{i}"
        q, k = ckpt.get(f"{hf}.self_attn.q_proj.weight"), ckpt.get(f"{hf}.self_attn.k_proj.weight")
        if mixtral:
            q, k = permute_rotary(q, heads), permute_rotary(k, kv_heads)
        yield f"{blk}.attn_norm.weight", ckpt.get(f"{hf}.input_layernorm.weight")
        yield f"{blk}.attn_q.weight", q
        yield f"{blk}.attn_k.weight", k
        yield f"{blk}.attn_v.weight", ckpt.get(f"{hf}.self_attn.v_proj.weight")
        yield f"{blk}.attn_output.weight", ckpt.get(f"{hf}.self_attn.o_proj.weight")
        if not mixtral:
            yield f"{blk}.attn_q_norm.weight", ckpt.get(f"{hf}.self_attn.q_norm.weight")
            yield f"{blk}.attn_k_norm.weight", ckpt.get(f"{hf}.self_attn.k_norm.weight")
        yield f"{blk}.ffn_norm.weight", ckpt.get(f"{hf}.post_attention_layernorm.weight")
        moe = f"{hf}.block_sparse_moe" if mixtral else f"{hf}.mlp"
        yield f"{blk}.ffn_gate_inp.weight", ckpt.get(f"{moe}.gate.weight")
        names = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
        for gguf_name, hf_name in zip(("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"), names, strict=True):
            yield f"{blk}.{gguf_name}.weight", np.stack(
                [ckpt.get(f"{moe}.experts.{e}.{hf_name}.weight") for e in range(experts)])


def add_hparams(writer: gguf.GGUFWriter, cfg: dict[str, Any], file_type: gguf.LlamaFileType) -> None:
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    writer.add_name(f"moe-serve bench {cfg['model_type']}")
    writer.add_vocab_size(cfg["vocab_size"])
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_head_count_kv(cfg["num_key_value_heads"])
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(cfg.get("rope_theta") or cfg.get("rope_parameters", {}).get("rope_theta", 1e6)))
    writer.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
    writer.add_expert_count(cfg.get("num_local_experts") or cfg["num_experts"])
    writer.add_expert_used_count(cfg["num_experts_per_tok"])
    if cfg["model_type"] == "qwen3_moe":
        writer.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
    writer.add_file_type(file_type)


def add_vocab(writer: gguf.GGUFWriter, cfg: dict[str, Any]) -> None:
    """A SentencePiece vocabulary of vocab_size pieces: <unk>, <s>, </s>, the 256 byte pieces, then placeholders."""
    n = cfg["vocab_size"]
    special = ["<unk>", "<s>", "</s>"]
    pieces = special + [f"<0x{b:02X}>" for b in range(256)]
    pieces += [f"\u2581t{i}" for i in range(len(pieces), n)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.BYTE] * 256
    types += [gguf.TokenType.NORMAL] * (n - len(types))
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(pieces[:n])
    writer.add_token_scores([0.0] * n)
    writer.add_token_types(types[:n])
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(cfg.get("bos_token_id", 1))
    writer.add_eos_token_id(cfg.get("eos_token_id", 2))
    writer.add_add_bos_token(False)


def export(model_dir: Path, out: Path, dtype: str) -> Path:
    cfg = json.loads((model_dir / "config.json").read_text())
    if cfg["model_type"] not in ARCHS:
        raise ValueError(f"no GGUF export for model_type {cfg['model_type']!r}; supported: {sorted(ARCHS)}")
    if dtype not in ("bfloat16", "float32"):
        raise ValueError(f"GGUF export dtype must be bfloat16 or float32, got {dtype!r}")
    bf16 = dtype == "bfloat16"
    writer = gguf.GGUFWriter(str(out.with_suffix(".tmp")), ARCHS[cfg["model_type"]])
    add_hparams(writer, cfg, gguf.LlamaFileType.MOSTLY_BF16 if bf16 else gguf.LlamaFileType.ALL_F32)
    add_vocab(writer, cfg)
    for name, array in tensors(Checkpoint(model_dir), cfg):
        keep_f32 = not bf16 or array.ndim == 1 or name.endswith("ffn_gate_inp.weight")
        if keep_f32:
            writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))
        else:
            writer.add_tensor(name, gguf.quants.quantize(array, gguf.GGMLQuantizationType.BF16),
                              raw_dtype=gguf.GGMLQuantizationType.BF16)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    out.with_suffix(".tmp").replace(out)
    return out
