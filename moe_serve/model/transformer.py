"""The dense part of an MoE transformer: embeddings, attention, norms, dense/shared MLPs and the LM head.

Routed experts are not here: every MoE layer calls an `MoEBackend` (`LocalMoE` in-process, the router actor when
experts live on other actors), so the dense part runs on a replica while experts run anywhere.
The model is stateless between steps; the KV cache tensors are passed in by the engine.
In small models without q/k norms, RoPE's rotate-half is folded into the fused qkv projection (extra rows holding
rotate_half of the q and k rows), so rotary costs two in-place elementwise ops per layer; from FOLD_ROTARY_MAX_HIDDEN
up, reading those rows costs more than the rotary ops they save.
Shape legend: T = new tokens in the step, D = hidden, V = vocab.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from moe_serve.model.attention import AttentionBatch, Rotary, paged_attention, rms_norm, rotate_half_rows
from moe_serve.model.checkpoint import Checkpoint
from moe_serve.model.config import ModelConfig
from moe_serve.model.linear import Projection
from moe_serve.model.moe import DenseMLP

# Fold rotate-half into qkv below this hidden size: there a step is bound by per-op overhead; above it by reading
# weights, and the folded rows add (H + KVH) / (H + 2 KVH) to the qkv bytes (83% with 4 query heads per kv head).
FOLD_ROTARY_MAX_HIDDEN = 1024


class MoEBackend(Protocol):
    def __call__(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Routed-expert output [T, D] of MoE layer `layer` for hidden states [T, D]."""
        ...


class AsyncMoEBackend(MoEBackend, Protocol):
    def submit(self, layer: int, hidden: torch.Tensor) -> Callable[[], torch.Tensor]:
        """Start the same call and return what waits for its output; waited for in submission order."""
        ...


@dataclass(frozen=True)
class LayerWeights:
    input_norm: torch.Tensor
    post_attention_norm: torch.Tensor
    qkv: Projection  # [(H + 2 KVH) * Hd, D], then rotate_half of the q and k rows if rotary_folded
    rotary_folded: bool
    o_proj: Projection
    q_norm: torch.Tensor | None  # Qwen3: RMSNorm over each head [Hd]; OLMoE: over the whole projection [H Hd]
    k_norm: torch.Tensor | None
    dense_mlp: DenseMLP | None  # dense layers, or Qwen2-MoE's shared expert on MoE layers


class DenseModel:
    """Weights and activations in the checkpoint's serving dtype (`Checkpoint.dtype`); logits come out float32."""

    def __init__(self, config: ModelConfig, checkpoint: Checkpoint) -> None:
        self.config = config
        self.dtype = checkpoint.dtype
        cfg = config
        self.embed = checkpoint.load("model.embed_tokens.weight", (cfg.vocab_size, cfg.hidden_size))
        self.norm = checkpoint.load("model.norm.weight", (cfg.hidden_size,))
        if cfg.tie_word_embeddings and not checkpoint.has("lm_head.weight"):
            self.lm_head = Projection(self.embed)
        else:
            self.lm_head = Projection(checkpoint.load("lm_head.weight", (cfg.vocab_size, cfg.hidden_size)))
        self.layers = [self._load_layer(checkpoint, i) for i in range(cfg.num_layers)]
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta, cfg.max_position_embeddings, self.dtype)

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
            q_norm = ckpt.load(f"{p}.self_attn.q_norm.weight", (hd,) if cfg.qk_norm_per_head else (q_rows,))
            k_norm = ckpt.load(f"{p}.self_attn.k_norm.weight", (hd,) if cfg.qk_norm_per_head else (kv_rows,))
        fold = not cfg.qk_norm and d < FOLD_ROTARY_MAX_HIDDEN
        if fold:  # x @ rows'.T == rotate_half(x @ rows.T), exactly (a signed permutation)
            qkv = torch.cat([qkv, rotate_half_rows(qkv[: q_rows + kv_rows], hd)])
            if qkv_bias is not None:
                qkv_bias = torch.cat([qkv_bias, rotate_half_rows(qkv_bias[: q_rows + kv_rows], hd)])
        return LayerWeights(
            input_norm=ckpt.load(f"{p}.input_layernorm.weight", (d,)),
            post_attention_norm=ckpt.load(f"{p}.post_attention_layernorm.weight", (d,)),
            qkv=Projection(qkv, qkv_bias),
            rotary_folded=fold,
            o_proj=Projection(ckpt.load(f"{p}.self_attn.o_proj.weight", (d, q_rows))),
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
        kv_cache: list[torch.Tensor],  # per layer [S, 2, KVH, Hd]
        moe: MoEBackend,
        logits_rows: torch.Tensor | None,  # which of the T tokens need logits; None: all of them
    ) -> torch.Tensor:
        """Logits [len(logits_rows), V] after writing this step's K/V into the cache."""
        eps = self.config.rms_norm_eps
        x = self.embed[token_ids]  # [T, D]
        for i, layer in enumerate(self.layers):
            x = self._attention(i, layer, rms_norm(x, layer.input_norm, eps), batch, kv_cache[i], x)
            h = rms_norm(x, layer.post_attention_norm, eps)
            if self.config.moe_layers[i]:
                x.add_(moe(i, h))
            if layer.dense_mlp is not None:
                x.add_(layer.dense_mlp(h))
        if logits_rows is not None:
            x = x[logits_rows]
        return self.lm_head(rms_norm(x, self.norm, eps)).float()

    @torch.inference_mode()
    def forward_overlapped(
        self,
        token_ids: torch.Tensor,  # [T]
        halves: tuple[AttentionBatch, AttentionBatch],  # AttentionBatch.split_decode of a decode-only batch
        kv_cache: list[torch.Tensor],
        moe: AsyncMoEBackend,
    ) -> torch.Tensor:
        """`forward` of a decode-only batch in two micro-batches, pipelined so that each half's attention (and dense
        MLP) runs while the other half's routed experts are away: logits [T, V] for every row, in order. The same
        operations in the same order per row as `forward`."""
        eps = self.config.rms_norm_eps
        split = halves[0].num_decode
        xs = [self.embed[token_ids[:split]], self.embed[token_ids[split:]]]
        pending: list[tuple[Callable[[], torch.Tensor], torch.Tensor | None] | None] = [None, None]
        for i, layer in enumerate(self.layers):
            for half, batch in enumerate(halves):
                self._land(xs[half], pending[half])  # this half's previous MoE layer
                x = self._attention(i, layer, rms_norm(xs[half], layer.input_norm, eps), batch, kv_cache[i], xs[half])
                h = rms_norm(x, layer.post_attention_norm, eps)
                dense = layer.dense_mlp(h) if layer.dense_mlp is not None else None
                if self.config.moe_layers[i]:
                    pending[half] = (moe.submit(i, h), dense)
                else:
                    pending[half] = None
                    if dense is not None:
                        x.add_(dense)
                xs[half] = x
        for half in (0, 1):
            self._land(xs[half], pending[half])
        return self.lm_head(rms_norm(torch.cat(xs), self.norm, eps)).float()

    @staticmethod
    def _land(x: torch.Tensor, pending: tuple[Callable[[], torch.Tensor], torch.Tensor | None] | None) -> None:
        """Add an MoE layer's outputs to the residual x, routed experts first, as `forward` does."""
        if pending is not None:
            wait, dense = pending
            x.add_(wait())
            if dense is not None:
                x.add_(dense)

    def _attention(
        self,
        i: int,
        layer: LayerWeights,
        x: torch.Tensor,
        batch: AttentionBatch,
        kv_cache: torch.Tensor,
        residual: torch.Tensor,
    ) -> torch.Tensor:
        """residual + attention(x)."""
        q, kv = self._qkv(layer, x, batch)
        kv_cache.index_copy_(0, batch.slot_mapping, kv)
        out = paged_attention(q, kv_cache, batch, self.config.sliding_windows[i])
        return residual + layer.o_proj(out.reshape(x.shape[0], -1))

    def _qkv(self, layer: LayerWeights, x: torch.Tensor, batch: AttentionBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """q [T, H, Hd] and kv [T, 2, KVH, Hd], queries and keys rotated by position."""
        cfg = self.config
        t, hd, h, kvh = x.shape[0], cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
        nq, nkv = h * hd, kvh * hd
        y = layer.qkv(x)
        cos, sin = batch.rope(self.rotary)
        if layer.rotary_folded:  # rows nq + 2 nkv onwards hold rotate_half(q, k): rotate in place
            qk = y[:, : nq + nkv].view(t, h + kvh, hd)
            qk.mul_(cos).addcmul_(y[:, nq + 2 * nkv :].view(t, h + kvh, hd), sin)
            return y[:, :nq].view(t, h, hd), y[:, nq : nq + 2 * nkv].view(t, 2, kvh, hd)
        q, k = y[:, :nq].view(t, h, hd), y[:, nq : nq + nkv].view(t, kvh, hd)
        if layer.q_norm is not None:
            assert layer.k_norm is not None
            if cfg.qk_norm_per_head:
                q, k = rms_norm(q, layer.q_norm, cfg.rms_norm_eps), rms_norm(k, layer.k_norm, cfg.rms_norm_eps)
            else:
                q = rms_norm(y[:, :nq], layer.q_norm, cfg.rms_norm_eps).view(t, h, hd)
                k = rms_norm(y[:, nq : nq + nkv], layer.k_norm, cfg.rms_norm_eps).view(t, kvh, hd)
        v = y[:, nq + nkv :].view(t, kvh, hd)
        if cfg.clip_qkv is not None:
            q, k, v = (a.clamp(-cfg.clip_qkv, cfg.clip_qkv) for a in (q, k, v))
        return self.rotary(q, cos, sin), torch.stack([self.rotary(k, cos, sin), v], dim=1)
