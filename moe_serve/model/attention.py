"""Paged attention over a flat KV slot space, plus RoPE and RMSNorm.

The engine packs every scheduled token of a step into one flat batch [T]: decode tokens first (one per
sequence), then prefill chunks. `AttentionBatch` says where each token's K/V goes (`slot_mapping`) and which cached
slots each query attends to. A KV cache layer is one tensor [S, 2, KVH, Hd] (S = blocks * block_size slots; index 0
of the second axis is K, 1 is V), so one copy writes a step's K and V and one gather reads them. Blocks and block
tables are the engine's business, this module only sees slot indices.
Everything a step shares across layers (RoPE cos/sin of its positions, additive masks per window) is computed once
per step and cached on the batch.
Shape legend: T = new tokens, B = decoding sequences, C = chunk length, L = keys attended, H = query heads,
KVH = key/value heads, Hd = head dim.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from moe_serve.kernels import cpu_ops

_OPS = cpu_ops()  # compiled decode kernels, or None: torch ops only


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
    decode_same_length: bool = False  # every decoding sequence attends to the same L keys (no padding)
    dtype: torch.dtype = torch.float32  # of queries and keys, and so of the additive masks
    _masks: dict[tuple[str, int, int | None], torch.Tensor] = field(default_factory=dict)
    _rope: tuple[torch.Tensor, torch.Tensor] | None = None

    def split_decode(self, n: int) -> tuple[AttentionBatch, AttentionBatch]:
        """A decode-only batch as two: its first `n` sequences and the rest (micro-batch overlap). Each half's key
        table is cut to its own longest sequence, so a half without padding needs no mask."""
        if self.prefills or self.decode_key_slots is None or self.decode_key_positions is None \
                or not 0 < n < self.num_decode:
            raise ValueError(f"split_decode({n}) needs a decode-only batch of more than {n} sequences")

        def half(rows: slice) -> AttentionBatch:
            positions = self.positions[rows]
            width = int(positions.max()) + 1  # a decode query sits at its sequence's last position
            return AttentionBatch(positions, self.slot_mapping[rows], len(positions),
                                  self.decode_key_slots[rows, :width].contiguous(),
                                  self.decode_key_positions[rows, :width], [],
                                  bool(positions.min() == positions.max()), self.dtype)

        return half(slice(0, n)), half(slice(n, None))

    def rope(self, rotary: Rotary) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, 1, Hd] of this step's positions, gathered once for every layer."""
        if self._rope is None:
            self._rope = rotary.tables(self.positions)
        return self._rope

    def decode_mask(self, window: int | None) -> torch.Tensor | None:
        """[B, 1, 1, L] additive float mask: 0 where the key is real, not in the future and inside the window;
        None when it would be all zeros (no padding, every key inside the window)."""
        assert self.decode_key_positions is not None
        if self.decode_same_length and (window is None or window >= self.decode_key_positions.shape[1]):
            return None  # a decode query sits at its sequence's last position: no key is in its future
        key = ("decode", 0, window)
        if key not in self._masks:
            q_pos = self.positions[: self.num_decode].unsqueeze(1)
            allowed = _allowed(q_pos, self.decode_key_positions, window)
            self._masks[key] = _additive(allowed, self.dtype)[:, None, None, :]
        return self._masks[key]

    def prefill_mask(self, index: int, window: int | None) -> torch.Tensor:
        """[1, 1, C, L] additive causal (and windowed) mask of prefill chunk `index`."""
        key = ("prefill", index, window)
        if key not in self._masks:
            chunk = self.prefills[index]
            q_pos = self.positions[chunk.start : chunk.end].unsqueeze(1)
            allowed = _allowed(q_pos, chunk.key_positions.unsqueeze(0), window)
            self._masks[key] = _additive(allowed, self.dtype)[None, None]
        return self._masks[key]


def _allowed(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    allowed = (k_pos >= 0) & (k_pos <= q_pos)
    if window is not None:
        allowed &= k_pos > q_pos - window  # transformers' sliding-window rule
    return allowed


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.where(allowed, 0.0, float("-inf")).to(dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype != torch.float32:  # as transformers: normalise in float32, round to x's dtype, then scale
        return weight * F.rms_norm(x.float(), weight.shape, None, eps).to(x.dtype)
    if _OPS is not None and weight.dtype == torch.float32 and x.is_contiguous() and not x.is_cuda:
        return _OPS.rms_norm(x, weight, eps)
    return F.rms_norm(x, weight.shape, weight, eps)


def rotate_half_rows(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rows of a projection [heads * Hd, ...] (or its bias) so that `x @ w'.T == rotate_half(x @ w.T)` per head."""
    heads = w.view(-1, head_dim, *w.shape[1:])
    half = head_dim // 2
    return torch.cat([-heads[:, half:], heads[:, :half]], dim=1).reshape(w.shape)


_ROPE_CHUNK = 1024  # positions per step of building the RoPE tables


class Rotary:
    """Default RoPE with rotate-half layout, as Mixtral and Qwen use; cos/sin tables for every position, of the
    float32 angles transformers computes, rounded to float32 and then to the serving dtype (as transformers casts).

    cos and sin are taken in float64 by numpy, not by torch: torch sends big float32 cos/sin to MKL's VML, whose
    lazy kernel dispatch races when its first call runs on several threads (pytorch/pytorch#188792), so the first
    tables a process builds could come out ~1000 ulp off in one thread's chunk and differ from every later build.
    """

    def __init__(self, head_dim: int, theta: float, max_positions: int, dtype: torch.dtype = torch.float32) -> None:
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
        self.cos = torch.empty(max_positions, head_dim, dtype=dtype)  # [P, Hd]
        self.sin = torch.empty(max_positions, head_dim, dtype=dtype)
        for start in range(0, max_positions, _ROPE_CHUNK):  # float64 transients of one chunk, not of the table
            positions = torch.arange(start, min(start + _ROPE_CHUNK, max_positions), dtype=torch.float32)
            freqs = torch.outer(positions, inv_freq)
            angles = torch.cat([freqs, freqs], dim=-1).double().numpy()
            self.cos[start : start + len(positions)] = torch.from_numpy(np.cos(angles)).float()
            self.sin[start : start + len(positions)] = torch.from_numpy(np.sin(angles)).float()
        self.half = head_dim // 2

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, 1, Hd] of `positions`, broadcastable over heads."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, heads, Hd] rotated by the angles in cos, sin [T, 1, Hd]."""
        rotated = torch.cat([-x[..., self.half :], x[..., : self.half]], dim=-1)
        return (x * cos).addcmul_(rotated, sin)  # one rounding fewer than x * cos + rotated * sin in 16 bits


def paged_attention(
    q: torch.Tensor,  # [T, H, Hd]
    kv_cache: torch.Tensor,  # [S, 2, KVH, Hd], already holding this step's keys and values
    batch: AttentionBatch,
    window: int | None,
) -> torch.Tensor:
    """Attention of every new token over its sequence's cached keys -> [T, H, Hd]."""
    b = batch.num_decode
    if b and not batch.prefills:  # pure decode step: no output buffer to fill piecewise
        return _decode_attention(q, kv_cache, batch, window)
    out = torch.empty_like(q)
    if b:
        out[:b] = _decode_attention(q[:b], kv_cache, batch, window)
    for index, chunk in enumerate(batch.prefills):
        chunk_q = q[chunk.start : chunk.end].unsqueeze(0)  # [1, C, H, Hd]
        mask = batch.prefill_mask(index, window)
        out[chunk.start : chunk.end] = _grouped_attention(chunk_q, kv_cache, chunk.key_slots[None], mask)[0]
    return out


def _decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, batch: AttentionBatch, window: int | None
                      ) -> torch.Tensor:
    """One query per decoding sequence, q [B, H, Hd] -> [B, H, Hd], over its keys where they are in the pages: the
    compiled kernel reads float32 and bf16 pages in place (computing in float32), so a shared prefix is read, never
    copied; torch's path gathers the keys first."""
    assert batch.decode_key_slots is not None
    if _OPS is not None and kv_cache.dtype in (torch.float32, torch.bfloat16) and q.dtype == kv_cache.dtype \
            and not q.is_cuda:
        out = _OPS.paged_decode_attention(q.float(), kv_cache, batch.decode_key_slots, batch.positions[: q.shape[0]],
                                          window or 0, q.shape[2] ** -0.5)
        return out.to(q.dtype)
    mask = batch.decode_mask(window)  # [B, 1, 1, L] or None
    return _grouped_attention(q.unsqueeze(1), kv_cache, batch.decode_key_slots, mask)[:, 0]


def _grouped_attention(
    q: torch.Tensor,  # [B, C, H, Hd]
    kv_cache: torch.Tensor,  # [S, 2, KVH, Hd]
    slots: torch.Tensor,  # [B, L]
    mask: torch.Tensor | None,  # [B, 1, C, L] additive; None: every key
) -> torch.Tensor:
    """Grouped-query attention without copying K/V per query head -> [B, C, H, Hd].

    Heads are kv-major (query head h reads kv head h // G), so the G query heads sharing a kv head are folded into
    the query axis: one [G * C, L] attention per kv head instead of repeating K/V G times.
    """
    b, c, h, hd = q.shape
    kvh, length = kv_cache.shape[2], slots.shape[1]
    groups = h // kvh
    kv = kv_cache.index_select(0, slots.flatten()).view(b, length, 2, kvh, hd)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)  # [B, KVH, L, Hd]
    q = q.view(b, c, kvh, groups, hd).permute(0, 2, 3, 1, 4).reshape(b, kvh, groups * c, hd)
    if c > 1 and groups > 1 and mask is not None:
        mask = mask.repeat(1, 1, groups, 1)  # rows ordered (group, token), as q
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, KVH, G * C, Hd]
    return out.view(b, kvh, groups, c, hd).permute(0, 3, 1, 2, 4).reshape(b, c, h, hd)
