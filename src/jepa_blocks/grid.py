"""Patch-grid geometry shared by masking, positions, predictors and hierarchical targets.

A ``(H, W)`` patch grid numbers its tokens row-major: ``id = row * W + col``. Hierarchy
level ``l`` pools the grid with ``2**l x 2**l`` windows (ceil mode), so its grid is
``(ceil(H / 2**l), ceil(W / 2**l))`` and its cell ``(r, c)`` covers the level-0 rows
``[r * 2**l, min((r + 1) * 2**l, H))`` and the matching columns.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from jepa_blocks._checks import check_grid, check_int, check_tensor

__all__ = ["level_grid_size", "token_positions", "pool_grid_tokens", "level_footprint"]


def level_grid_size(grid_size: int | tuple[int, int], level: int) -> tuple[int, int]:
    """Grid of hierarchy level ``level``: ``(ceil(H / 2**level), ceil(W / 2**level))``."""
    h, w = check_grid("grid_size", grid_size)
    level = check_int("level", level, min_value=0)
    f = 2**level
    return -(-h // f), -(-w // f)


def token_positions(
    indices: torch.Tensor,
    grid_size: int | tuple[int, int],
    *,
    level: int = 0,
) -> torch.Tensor:
    """(row, col) positions of token ids, in level-0 patch units.

    A level-``l`` cell is placed at the centre of its level-0 footprint, so that positions
    of all levels live in one coordinate frame (what RoPE and sin-cos embeddings need to
    relate a coarse query to fine context tokens). Level-0 positions are integers.

    Args:
        indices: Long tensor of shape ``(...)`` with ids on the level-``level`` grid.
        grid_size: The level-0 grid ``(H, W)``.
        level: Hierarchy level of ``indices``.

    Returns:
        Float tensor of shape ``(..., 2)`` holding ``(row, col)``.
    """
    check_tensor("indices", indices, kind="int", allow_empty=True)
    h, w = check_grid("grid_size", grid_size)
    lh, lw = level_grid_size((h, w), level)
    f = 2**level
    rows = torch.div(indices, lw, rounding_mode="floor")
    cols = indices - rows * lw
    # Centre of the footprint, clipped at the grid edge for partial (ceil-mode) cells.
    row0, col0 = rows * f, cols * f
    row1 = torch.clamp(row0 + f, max=h) - 1
    col1 = torch.clamp(col0 + f, max=w) - 1
    pos = torch.stack(((row0 + row1) / 2.0, (col0 + col1) / 2.0), dim=-1)
    return pos.to(torch.get_default_dtype())


def level_footprint(indices: torch.Tensor, grid_size: int | tuple[int, int], *, level: int) -> torch.Tensor:
    """Level-0 token mask covered by level-``level`` cells.

    Args:
        indices: Bool tensor of shape ``(..., h_l * w_l)``: a dense mask on the level grid.
        grid_size: The level-0 grid ``(H, W)``.
        level: Hierarchy level of ``indices``.

    Returns:
        Bool tensor of shape ``(..., H * W)``.
    """
    check_tensor("indices", indices, kind="bool", allow_empty=True)
    h, w = check_grid("grid_size", grid_size)
    lh, lw = level_grid_size((h, w), level)
    if indices.shape[-1] != lh * lw:
        raise ValueError(
            f"indices must have {lh * lw} entries on the level-{level} grid ({lh}, {lw}), "
            f"got {indices.shape[-1]}"
        )
    f = 2**level
    cells = indices.reshape(*indices.shape[:-1], lh, lw)
    fine = cells.repeat_interleave(f, dim=-2).repeat_interleave(f, dim=-1)[..., :h, :w]
    return fine.reshape(*indices.shape[:-1], h * w)


def pool_grid_tokens(
    x: torch.Tensor, grid_size: int | tuple[int, int], *, level: int
) -> torch.Tensor:
    """Average-pool tokens on the grid with ``2**level`` windows (ceil mode).

    Partial windows at the bottom and right edges average only the tokens they cover.

    Args:
        x: Tokens of shape ``(B, H * W, D)``.
        grid_size: The grid ``(H, W)`` of ``x``.
        level: Pooling level; ``0`` returns ``x`` unchanged.

    Returns:
        Tokens of shape ``(B, h_l * w_l, D)`` with ``(h_l, w_l) = level_grid_size``.
    """
    check_tensor("x", x, ndim=3, kind="float")
    h, w = check_grid("grid_size", grid_size)
    level = check_int("level", level, min_value=0)
    if x.shape[1] != h * w:
        raise ValueError(f"x must have H * W = {h * w} tokens for grid_size {(h, w)}, got {x.shape[1]}")
    if level == 0:
        return x
    f = 2**level
    b, _, d = x.shape
    maps = x.transpose(1, 2).reshape(b, d, h, w)
    pooled = F.avg_pool2d(maps, f, stride=f, ceil_mode=True, count_include_pad=False)
    return pooled.flatten(2).transpose(1, 2)
