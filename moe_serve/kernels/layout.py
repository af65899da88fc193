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


def panels(matrices: Sequence[torch.Tensor | tuple[torch.Tensor, ...]], out: torch.Tensor | None = None
           ) -> torch.Tensor:
    """Each expert's [K, N] (float or int8; a stacked [E, K, N] tensor, or a sequence that loads each expert as it
    is indexed, will do), or a tuple of its column blocks [K, N_i] (every N_i but the last a multiple of 32) ->
    [E, P, K, 32] column panels, filled one expert at a time, so a big layer never needs more than its panels and
    one expert's copy. A transposed row-major weight (W.t() of W [N, K]) is copied straight into its panels.
    `out`: where to write them (shaped as the result; a pool's slots), instead of a new tensor."""
    first = _blocks(matrices[0])
    k, n = first[0].shape[0], sum(b.shape[1] for b in first)
    if out is None:  # zeros only where there are padding columns: every other element is written below
        shape = (len(matrices), padded(n) // PANEL, k, PANEL)
        out = first[0].new_zeros(shape) if padded(n) != n else first[0].new_empty(shape)
    elif padded(n) != n:
        out.zero_()  # the padding columns
    for e in range(len(matrices)):
        panel = 0
        for block in first if e == 0 else _blocks(matrices[e]):  # a loading sequence reads each expert once
            width = block.shape[1]
            full = width // PANEL
            rows = block[:, : full * PANEL].t()  # [full 32, K]: a view when the block is a transposed weight
            out[e, panel : panel + full] = rows.reshape(full, PANEL, k).transpose(1, 2)
            if full * PANEL < width:
                out[e, panel + full, :, : width - full * PANEL] = block[:, full * PANEL :]
            panel += -(-width // PANEL)
    return out


def _blocks(matrix: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """A matrix's column blocks, each starting on a panel (blocks that would not are joined, at the cost of a copy)."""
    if not isinstance(matrix, tuple):
        return (matrix,)
    if any(block.shape[1] % PANEL for block in matrix[:-1]):
        return (torch.cat(matrix, dim=1),)
    return matrix


def int4_panels(codes: Sequence[torch.Tensor]) -> torch.Tensor:
    """Each expert's int4 codes [K, N] (values 0..15) -> [E, P, K, 16] bytes."""
    k, n = codes[0].shape
    out = torch.empty(len(codes), padded(n) // PANEL, k, PANEL // 2, dtype=torch.uint8)
    for e, c in enumerate(codes):
        p = panels([c.to(torch.uint8)])[0]
        out[e] = p[..., : PANEL // 2] | (p[..., PANEL // 2 :] << 4)
    return out
