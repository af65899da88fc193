"""Paged attention over a flat KV slot space, plus RoPE and RMSNorm.

The engine packs every scheduled token of a step into one flat batch [T]: decode tokens first (one per
sequence), then prefill chunks. `AttentionBatch` says where each token's K/V goes (`slot_mapping`) and which cached
slots each query attends to. A KV cache layer is a pair of tensors [S, KVH, Hd] (S = blocks * block_size slots);
blocks and block tables are the engine's business, this module only sees slot indices.
Shape legend: T = new tokens, B = decoding sequences, C = chunk length, L = keys attended, H = query heads,
KVH = key/value heads, Hd = head dim.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PrefillChunk:
    start: int  # first token of the chunk in the flat batch
    end: int
    key_slots: torch.Tensor  # [L] slots of every key the chunk sees (cached context + itself)
    key_positions: torch.Tensor  # [L]


@dataclass
class AttentionBatch:
    positions: torch.Tensor  # [T] position of every new token
    slot_mapping: torch.Tensor  # [T] slot each new token's K/V is written to
    num_decode: int  # the first num_decode tokens are single-token decodes
    decode_key_slots: torch.Tensor | None  # [B, L] padded with slot 0
    decode_key_positions: torch.Tensor | None  # [B, L] padded with -1
    prefills: list[PrefillChunk]
    _masks: dict[tuple[str, int, int | None], torch.Tensor] = field(default_factory=dict)

    def decode_mask(self, window: int | None) -> torch.Tensor:
        """[B, 1, 1, L] bool: key is real, not in the future and inside the window."""
        key = ("decode", 0, window)
        if key not in self._masks:
            assert self.decode_key_positions is not None
            q_pos = self.positions[: self.num_decode].unsqueeze(1)
            self._masks[key] = _allowed(q_pos, self.decode_key_positions, window)[:, None, None, :]
        return self._masks[key]

    def prefill_mask(self, index: int, window: int | None) -> torch.Tensor:
        """[1, 1, C, L] bool causal (and windowed) mask of prefill chunk `index`."""
        key = ("prefill", index, window)
        if key not in self._masks:
            chunk = self.prefills[index]
            q_pos = self.positions[chunk.start : chunk.end].unsqueeze(1)
            self._masks[key] = _allowed(q_pos, chunk.key_positions.unsqueeze(0), window)[None, None]
        return self._masks[key]


def _allowed(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    allowed = (k_pos >= 0) & (k_pos <= q_pos)
    if window is not None:
        allowed &= k_pos > q_pos - window  # transformers' sliding-window rule
    return allowed


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, weight.shape, weight, eps)


class Rotary:
    """Default RoPE with rotate-half layout, as Mixtral and Qwen use; cos/sin tables for every position."""

    def __init__(self, head_dim: int, theta: float, max_positions: int) -> None:
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)  # [P, Hd]
        self.cos, self.sin = emb.cos(), emb.sin()
        self.half = head_dim // 2

    def __call__(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [T, heads, Hd] rotated by each token's position."""
        cos = self.cos[positions].unsqueeze(1)  # [T, 1, Hd]
        sin = self.sin[positions].unsqueeze(1)
        rotated = torch.cat([-x[..., self.half :], x[..., : self.half]], dim=-1)
        return x * cos + rotated * sin


def paged_attention(
    q: torch.Tensor,  # [T, H, Hd]
    k_cache: torch.Tensor,  # [S, KVH, Hd], already holding this step's keys
    v_cache: torch.Tensor,
    batch: AttentionBatch,
    window: int | None,
) -> torch.Tensor:
    """Attention of every new token over its sequence's cached keys -> [T, H, Hd]."""
    out = torch.empty_like(q)
    b = batch.num_decode
    if b:
        assert batch.decode_key_slots is not None
        decode_q = q[:b].unsqueeze(1)  # [B, 1, H, Hd]
        out[:b] = _grouped_attention(decode_q, k_cache, v_cache, batch.decode_key_slots, batch.decode_mask(window))[:, 0]
    for index, chunk in enumerate(batch.prefills):
        chunk_q = q[chunk.start : chunk.end].unsqueeze(0)  # [1, C, H, Hd]
        mask = batch.prefill_mask(index, window)
        out[chunk.start : chunk.end] = _grouped_attention(chunk_q, k_cache, v_cache, chunk.key_slots[None], mask)[0]
    return out


def _grouped_attention(
    q: torch.Tensor,  # [B, C, H, Hd]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,  # [B, L]
    mask: torch.Tensor,  # [B, 1, C, L] bool
) -> torch.Tensor:
    """Grouped-query attention without copying K/V per query head -> [B, C, H, Hd].

    Heads are kv-major (query head h reads kv head h // G), so the G query heads sharing a kv head are folded into
    the query axis: one [G * C, L] attention per kv head instead of repeating K/V G times.
    """
    b, c, h, hd = q.shape
    kvh, length = k_cache.shape[1], slots.shape[1]
    groups = h // kvh
    flat = slots.flatten()
    k = k_cache.index_select(0, flat).view(b, length, kvh, hd).transpose(1, 2)  # [B, KVH, L, Hd]
    v = v_cache.index_select(0, flat).view(b, length, kvh, hd).transpose(1, 2)
    q = q.view(b, c, kvh, groups, hd).permute(0, 2, 3, 1, 4).reshape(b, kvh, groups * c, hd)
    if c > 1 and groups > 1:
        mask = mask.repeat(1, 1, groups, 1)  # rows ordered (group, token), as q
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, KVH, G * C, Hd]
    return out.view(b, kvh, groups, c, hd).permute(0, 3, 1, 2, 4).reshape(b, c, h, hd)
