"""Expert weights in the compiled MoE kernel's layout (cpu_ops.cpp, "Expert matmuls over column panels").

An expert matrix [K, N] (input rows, output columns: x @ W) becomes ceil(N / 32) column panels of [K, 32], each
contiguous, columns past N zero; per-column scales and offsets are padded to the same width. int4 codes pack two
columns a byte: byte j of a panel row holds column j in its low nibble and column j + 16 in its high nibble.
"""

from __future__ import annotations

from collections.abc import Sequence

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


def panels(matrices: Sequence[torch.Tensor]) -> torch.Tensor:
    """Each expert's [K, N] (float or int8; a stacked [E, K, N] tensor, or a sequence that loads each expert as it
    is indexed, will do) -> [E, P, K, 32] column panels, filled one expert at a time, so a big layer never needs more
    than its panels and one expert's copy."""
    k, n = matrices[0].shape
    full = n // PANEL
    out = matrices[0].new_zeros(len(matrices), padded(n) // PANEL, k, PANEL)
    for e, m in enumerate(matrices):
        out[e, :full] = m[:, : full * PANEL].reshape(k, full, PANEL).transpose(0, 1)
        if full * PANEL < n:
            out[e, full, :, : n - full * PANEL] = m[:, full * PANEL :]
    return out


def int4_panels(codes: Sequence[torch.Tensor]) -> torch.Tensor:
    """Each expert's int4 codes [K, N] (values 0..15) -> [E, P, K, 16] bytes."""
    k, n = codes[0].shape
    out = torch.empty(len(codes), padded(n) // PANEL, k, PANEL // 2, dtype=torch.uint8)
    for e, c in enumerate(codes):
        p = panels([c.to(torch.uint8)])[0]
        out[e] = p[..., : PANEL // 2] | (p[..., PANEL // 2 :] << 4)
    return out
