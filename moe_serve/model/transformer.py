"""The dense part of an MoE transformer: embeddings, attention, norms, dense/shared MLPs and the LM head.

Routed experts are not here: every MoE layer calls an `MoEBackend` (`LocalMoE` in-process, the router actor when
experts live on other actors), so the dense part runs on a replica while experts run anywhere.
The model is stateless between steps; the KV cache tensors are passed in by the engine.
Shape legend: T = new tokens in the step, D = hidden, V = vocab.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from moe_serve.model.attention import AttentionBatch, Rotary, paged_attention, rms_norm
from moe_serve.model.checkpoint import Checkpoint
from moe_serve.model.config import ModelConfig
from moe_serve.model.moe import DenseMLP


class MoEBackend(Protocol):
    def __call__(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Routed-expert output [T, D] of MoE layer `layer` for hidden states [T, D]."""
        ...


@dataclass(frozen=True)
class LayerWeights:
    input_norm: torch.Tensor
    post_attention_norm: torch.Tensor
    qkv: torch.Tensor  # [(H + 2 KVH) * Hd, D]
    qkv_bias: torch.Tensor | None
    o_proj: torch.Tensor
    q_norm: torch.Tensor | None  # Qwen3: RMSNorm over each head
    k_norm: torch.Tensor | None
    dense_mlp: DenseMLP | None  # dense layers, or Qwen2-MoE's shared expert on MoE layers


class DenseModel:
    def __init__(self, config: ModelConfig, checkpoint: Checkpoint) -> None:
        self.config = config
        cfg = config
        self.embed = checkpoint.load("model.embed_tokens.weight", (cfg.vocab_size, cfg.hidden_size))
        self.norm = checkpoint.load("model.norm.weight", (cfg.hidden_size,))
        if cfg.tie_word_embeddings and not checkpoint.has("lm_head.weight"):
            self.lm_head = self.embed
        else:
            self.lm_head = checkpoint.load("lm_head.weight", (cfg.vocab_size, cfg.hidden_size))
        self.layers = [self._load_layer(checkpoint, i) for i in range(cfg.num_layers)]
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta, cfg.max_position_embeddings)

    def _load_layer(self, ckpt: Checkpoint, i: int) -> LayerWeights:
        cfg = self.config
        d, hd = cfg.hidden_size, cfg.head_dim
        p = f"model.layers.{i}"
        q_rows, kv_rows = cfg.num_heads * hd, cfg.num_kv_heads * hd
        qkv = torch.cat(
            [
                ckpt.load(f"{p}.self_attn.q_proj.weight", (q_rows, d)),
                ckpt.load(f"{p}.self_attn.k_proj.weight", (kv_rows, d)),
                ckpt.load(f"{p}.self_attn.v_proj.weight", (kv_rows, d)),
            ]
        )
        qkv_bias = None
        if cfg.attention_bias:
            qkv_bias = torch.cat(
                [
                    ckpt.load(f"{p}.self_attn.q_proj.bias", (q_rows,)),
                    ckpt.load(f"{p}.self_attn.k_proj.bias", (kv_rows,)),
                    ckpt.load(f"{p}.self_attn.v_proj.bias", (kv_rows,)),
                ]
            )
        q_norm = k_norm = None
        if cfg.qk_norm:
            q_norm = ckpt.load(f"{p}.self_attn.q_norm.weight", (hd,))
            k_norm = ckpt.load(f"{p}.self_attn.k_norm.weight", (hd,))
        return LayerWeights(
            input_norm=ckpt.load(f"{p}.input_layernorm.weight", (d,)),
            post_attention_norm=ckpt.load(f"{p}.post_attention_layernorm.weight", (d,)),
            qkv=qkv,
            qkv_bias=qkv_bias,
            o_proj=ckpt.load(f"{p}.self_attn.o_proj.weight", (d, q_rows)),
            q_norm=q_norm,
            k_norm=k_norm,
            dense_mlp=self._load_mlp(ckpt, i),
        )

    def _load_mlp(self, ckpt: Checkpoint, i: int) -> DenseMLP | None:
        cfg = self.config
        d = cfg.hidden_size
        if cfg.moe_layers[i]:
            if not cfg.shared_expert_intermediate_size:
                return None
            prefix, size = f"model.layers.{i}.mlp.shared_expert", cfg.shared_expert_intermediate_size
            output_gate = ckpt.load(f"model.layers.{i}.mlp.shared_expert_gate.weight", (1, d))
        else:
            prefix, size, output_gate = f"model.layers.{i}.mlp", cfg.dense_intermediate_size, None
        gate_up = torch.cat(
            [ckpt.load(f"{prefix}.gate_proj.weight", (size, d)), ckpt.load(f"{prefix}.up_proj.weight", (size, d))]
        )
        return DenseMLP(gate_up, ckpt.load(f"{prefix}.down_proj.weight", (d, size)), output_gate)

    @torch.inference_mode()
    def forward(
        self,
        token_ids: torch.Tensor,  # [T]
        batch: AttentionBatch,
        kv_cache: list[tuple[torch.Tensor, torch.Tensor]],  # per layer (k, v), each [S, KVH, Hd]
        moe: MoEBackend,
        logits_rows: torch.Tensor,  # which of the T tokens need logits (the last of each sequence)
    ) -> torch.Tensor:
        """Logits [len(logits_rows), V] after writing this step's K/V into the cache."""
        x = self.embed[token_ids]  # [T, D]
        for i, layer in enumerate(self.layers):
            x = x + self._attention(i, layer, rms_norm(x, layer.input_norm, self.config.rms_norm_eps), batch, kv_cache)
            h = rms_norm(x, layer.post_attention_norm, self.config.rms_norm_eps)
            ffn = moe(i, h) if self.config.moe_layers[i] else None
            if layer.dense_mlp is not None:
                ffn = layer.dense_mlp(h) if ffn is None else ffn + layer.dense_mlp(h)
            x = x + ffn
        x = rms_norm(x[logits_rows], self.norm, self.config.rms_norm_eps)
        return F.linear(x, self.lm_head)

    def _attention(
        self,
        i: int,
        layer: LayerWeights,
        x: torch.Tensor,
        batch: AttentionBatch,
        kv_cache: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        cfg = self.config
        t, hd = x.shape[0], cfg.head_dim
        qkv = F.linear(x, layer.qkv, layer.qkv_bias)
        q, k, v = qkv.split([cfg.num_heads * hd, cfg.num_kv_heads * hd, cfg.num_kv_heads * hd], dim=-1)
        q, k, v = q.view(t, cfg.num_heads, hd), k.view(t, cfg.num_kv_heads, hd), v.view(t, cfg.num_kv_heads, hd)
        if layer.q_norm is not None:
            q = rms_norm(q, layer.q_norm, cfg.rms_norm_eps)
            k = rms_norm(k, layer.k_norm, cfg.rms_norm_eps)
        q = self.rotary(q, batch.positions)
        k = self.rotary(k, batch.positions)
        k_cache, v_cache = kv_cache[i]
        k_cache[batch.slot_mapping] = k
        v_cache[batch.slot_mapping] = v
        out = paged_attention(q, k_cache, v_cache, batch, cfg.sliding_windows[i])
        return F.linear(out.reshape(t, cfg.num_heads * hd), layer.o_proj)
