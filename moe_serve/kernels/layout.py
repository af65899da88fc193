"""Expert weights in the compiled MoE kernel's layout (cpu_ops.cpp, "Expert matmuls over column panels").

An expert matrix [K, N] (input rows, output columns: x @ W) becomes ceil(N / 32) column panels of [K, 32], each
contiguous, columns past N zero; per-column scales and offsets are padded to the same width. int4 codes pack two
columns a byte: byte j of a panel row holds column j in its low nibble and column j + 16 in its high nibble.
"""

from __future__ import annotations

import torch

PANEL = 32


def padded(n: int) -> int:
    """N rounded up to whole panels."""
    return -(-n // PANEL) * PANEL


def pad_columns(t: torch.Tensor) -> torch.Tensor:
    """[..., N] -> [..., padded(N)], zeros appended."""
    n = t.shape[-1]
    out = t.new_zeros(*t.shape[:-1], padded(n))
    out[..., :n] = t
    return out


def panels(w: torch.Tensor) -> torch.Tensor:
    """Stacked [E, K, N] (float32 or int8) -> [E, P, K, 32] column panels."""
    e, k, _ = w.shape
    return pad_columns(w).view(e, k, -1, PANEL).permute(0, 2, 1, 3).contiguous()


def int4_panels(codes: torch.Tensor) -> torch.Tensor:
    """Stacked int4 codes [E, K, N] (values 0..15, uint8) -> [E, P, K, 16] bytes."""
    p = panels(codes.to(torch.uint8))
    return (p[..., : PANEL // 2] | (p[..., PANEL // 2 :] << 4)).contiguous()
