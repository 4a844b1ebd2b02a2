"""Fixed 2D sine-cosine position embeddings at arbitrary (row, col) positions.

Channel layout of a ``dim``-wide embedding (``dim`` divisible by 4, ``F = dim // 4``)::

    [ sin(w_0 r) .. sin(w_{F-1} r) | cos(w_0 r) .. cos(w_{F-1} r)     <- first half: row
      sin(w_0 c) .. sin(w_{F-1} c) | cos(w_0 c) .. cos(w_{F-1} c) ]   <- second half: column

with ``w_i = 1 / base ** (i / F)``. This is the MAE / I-JEPA construction except for the
order of the halves: I-JEPA's first half encodes the column, ours (like V-JEPA 2) the row.
Positions may be fractional, so coarse hierarchy cells placed at the centre of their
footprint (``jepa_blocks.grid.token_positions``) get embeddings in the same frame as
patches.
"""

from __future__ import annotations

import torch

from jepa_blocks._checks import check_float, check_grid, check_int, check_tensor
from jepa_blocks.grid import token_positions

__all__ = ["sincos_2d", "sincos_2d_table"]


def sincos_2d(positions: torch.Tensor, dim: int, *, base: float = 10000.0) -> torch.Tensor:
    """Sine-cosine embeddings of 2D positions.

    Args:
        positions: Float tensor of shape ``(..., 2)`` holding ``(row, col)``.
        dim: Embedding width, divisible by 4.
        base: Frequency base (10000 as in the Transformer and MAE).

    Returns:
        Float32 tensor of shape ``(..., dim)`` (float64 for float64 positions).
    """
    check_tensor("positions", positions, allow_empty=True)
    if positions.shape[-1:] != (2,):
        raise ValueError(f"positions must have shape (..., 2), got {tuple(positions.shape)}")
    dim = check_int("dim", dim, min_value=4)
    if dim % 4:
        raise ValueError(f"dim must be divisible by 4, got {dim}")
    base = check_float("base", base, min_value=1.0, min_inclusive=False)
    dtype = torch.float64 if positions.dtype == torch.float64 else torch.float32
    f = dim // 4
    omega = base ** (-torch.arange(f, dtype=dtype, device=positions.device) / f)
    angles = positions.to(dtype).unsqueeze(-1) * omega  # (..., 2, F)
    emb = torch.cat((angles.sin(), angles.cos()), dim=-1)  # (..., 2, 2F): [sin | cos] per axis
    return emb.flatten(-2)  # (..., 4F): row half, then column half


def sincos_2d_table(grid_size: int | tuple[int, int], dim: int, *, base: float = 10000.0) -> torch.Tensor:
    """Embeddings of every cell of a ``(H, W)`` grid in row-major order.

    Returns:
        Float32 tensor of shape ``(H * W, dim)``.
    """
    h, w = check_grid("grid_size", grid_size)
    return sincos_2d(token_positions(torch.arange(h * w), (h, w)), dim, base=base)
