"""Regression targets for every hierarchy level, gathered at the masker's target ids.

Level ``l`` lives on the grid pooled by ``2**l x 2**l`` windows in ceil mode,
``level_grid_size(grid_size, l) = (ceil(H / 2**l), ceil(W / 2**l))``; a partial window at
the bottom or right edge averages only the patches it covers. Two sources of level
features:

- ``"pooled"``: one token map ``(B, H * W, D)`` (the target encoder's last layer); level
  ``l`` is its ``2**l`` average pooling. Level 0 is the plain I-JEPA target.
- ``"layers"``: one token map per level, ``(B, H * W, D_l)`` (e.g. deeper layers for
  coarser levels); level ``l`` pools ``features[l]`` to the level-``l`` grid so that its
  ids match the masker's.

Nothing here is detached or normalised. The caller runs the target (EMA) encoder under
``torch.no_grad()``, so its features carry no graph; gradients flow when they do. The
per-token normalisation of I-JEPA (``layer_norm`` without affine over the feature dim) is
the latent loss's job, applied to the gathered (pooled) targets; so is rejecting NaN/Inf
targets (features pass through here unchecked; the target ids are range-checked, a value
check).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from jepa_blocks._checks import check_choice, check_grid, check_index_range, check_tensor
from jepa_blocks.grid import level_grid_size, pool_grid_tokens
from jepa_blocks.masking.indices import MaskIndices, gather_tokens

__all__ = ["hierarchical_targets"]


def _target_ids(name: str, value: object, batch: int, num_cells: int, grid: tuple[int, int], level: int) -> torch.Tensor:
    """Check one level's target ids; return the long id tensor ``(B, K)`` or ``(B, M, K)``."""
    if isinstance(value, MaskIndices):
        ids = value.indices
    elif isinstance(value, torch.Tensor):
        ids = check_tensor(name, value, kind="int", allow_empty=True)
    else:
        raise TypeError(f"{name} must be a MaskIndices or an integer tensor, got {type(value).__name__}")
    if ids.ndim not in (2, 3):
        raise ValueError(f"{name} must have shape (B, M, K) or (B, K), got {tuple(ids.shape)}")
    if ids.shape[0] != batch:
        raise ValueError(f"{name} batch size {ids.shape[0]} does not match features batch size {batch}")
    check_index_range(name, ids, num_cells, what=f"of the level-{level} grid {grid}")
    return ids


def hierarchical_targets(
    features: torch.Tensor | Sequence[torch.Tensor],
    *,
    grid_size: int | tuple[int, int],
    targets: MaskIndices | torch.Tensor | Sequence[MaskIndices | torch.Tensor],
    source: Literal["pooled", "layers"] = "pooled",
) -> list[torch.Tensor]:
    """Pool the target encoder's tokens to every level and gather the target ids.

    Args:
        features: Target-encoder tokens of the full image in row-major grid order. For
            ``source="pooled"`` one tensor of shape ``(B, H * W, D)``; for
            ``source="layers"`` a sequence of ``L`` tensors of shape ``(B, H * W, D_l)``,
            one per level.
        grid_size: Level-0 patch grid ``(H, W)``.
        targets: One entry per level ``l`` (a single ``MaskIndices`` means one level):
            ``MaskIndices`` or long tensor of shape ``(B, M_l, K_l)`` or ``(B, K_l)`` with
            ids on the level-``l`` grid ``level_grid_size(grid_size, l)``.
        source: ``"pooled"`` (level ``l`` = ``2**l`` average pooling of ``features``) or
            ``"layers"`` (level ``l`` = ``features[l]`` pooled to the level-``l`` grid).

    Returns:
        One tensor per level of shape ``(B, M_l, K_l, D_l)`` (or ``(B, K_l, D_l)``), with
        ``D_l = D`` for ``"pooled"``. Padded target slots hold the feature of cell 0;
        mask them with ``targets[l].valid``. Not detached, not normalised (see the module
        docstring).

    Example:
        >>> feats = torch.randn(2, 36, 16)                       # target encoder, 6 x 6 grid
        >>> t0 = torch.tensor([[[0, 1, 6, 7]]]).expand(2, 1, 4)  # one 2 x 2 block of patches
        >>> t1 = torch.tensor([[4, 5]]).expand(2, 2)            # two cells of the 3 x 3 grid
        >>> [tuple(t.shape) for t in hierarchical_targets(feats, grid_size=6, targets=[t0, t1])]
        [(2, 1, 4, 16), (2, 2, 16)]
    """
    source = check_choice("source", source, ("pooled", "layers"))
    grid = check_grid("grid_size", grid_size)
    if isinstance(targets, (MaskIndices, torch.Tensor)):
        targets = [targets]
    if isinstance(targets, (str, bytes)) or not isinstance(targets, Sequence):
        raise TypeError(f"targets must be a sequence of MaskIndices, one per level, got {type(targets).__name__}")
    if len(targets) == 0:
        raise ValueError("targets must hold at least one level, got an empty sequence")
    num_levels = len(targets)

    if source == "pooled":
        if not isinstance(features, torch.Tensor):
            raise TypeError(
                f"features must be a tensor (B, H * W, D) for source='pooled', got {type(features).__name__}"
            )
        maps = [features] * num_levels
        names = ["features"] * num_levels
    else:
        if isinstance(features, torch.Tensor) or not isinstance(features, Sequence):
            raise TypeError(
                "features must be a sequence of per-level tensors (B, H * W, D_l) for "
                f"source='layers', got {type(features).__name__}"
            )
        if len(features) != num_levels:
            raise ValueError(
                f"features must hold one tensor per target level ({num_levels}) for "
                f"source='layers', got {len(features)}"
            )
        maps = list(features)
        names = [f"features[{lvl}]" for lvl in range(num_levels)]

    batch = None
    for name, fmap in zip(names, maps, strict=True):
        check_tensor(name, fmap, ndim=3, kind="float")
        if fmap.shape[1] != grid[0] * grid[1]:
            raise ValueError(
                f"{name} must have H * W = {grid[0] * grid[1]} tokens for grid_size {grid}, got "
                f"shape {tuple(fmap.shape)}"
            )
        if batch is None:
            batch = fmap.shape[0]
        elif fmap.shape[0] != batch:
            raise ValueError(f"{name} batch size {fmap.shape[0]} does not match features[0] batch size {batch}")

    outputs = []
    for lvl, (fmap, t) in enumerate(zip(maps, targets, strict=True)):
        lh, lw = level_grid_size(grid, lvl)
        ids = _target_ids(f"targets[{lvl}]", t, batch, lh * lw, (lh, lw), lvl)
        pooled = pool_grid_tokens(fmap, grid, level=lvl)  # (B, lh * lw, D_l)
        outputs.append(gather_tokens(pooled, ids.to(fmap.device)))
    return outputs
