"""The ``keep=`` argument of the token encoders, checked once for all of them."""

from __future__ import annotations

import torch
from torch import nn

from jepa_blocks._checks import check_index_range, check_same_device, check_tensor
from jepa_blocks.masking.indices import MaskIndices


def keep_indices(
    keep: MaskIndices | torch.Tensor, *, batch: int, grid: tuple[int, int], module: nn.Module
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token ids ``(B, K)`` and their validity ``(B, K)`` (``None``: all real) of ``keep``.

    Args:
        keep: ``MaskIndices`` of shape ``(B, K)`` (padded lists) or a long tensor ``(B, K)``.
        batch: The batch size ``B`` of the images.
        grid: The ``(H, W)`` patch grid; ids must lie in ``[0, H * W)``.
        module: The encoder; ``keep`` must be on its device.

    Raises:
        TypeError / ValueError: naming ``keep``, for a wrong type, shape, device or id.
    """
    if isinstance(keep, MaskIndices):
        ids, valid = keep.indices, keep.valid
    else:
        ids, valid = check_tensor("keep", keep, ndim=2, kind="int"), None
    if ids.ndim != 2 or ids.shape[0] != batch:
        raise ValueError(f"keep must have shape ({batch}, K), got {tuple(ids.shape)}")
    check_same_device(("keep", ids), ("keep.valid", valid), module=module)
    check_index_range("keep", ids, grid[0] * grid[1], what=f"of the {grid[0]}x{grid[1]} patch grid")
    return ids, valid
