"""LayerScale: a learned per-channel scale of a residual branch (CaiT, DINOv2).

Same parameter (``gamma``, shape ``(D,)``) and forward as ``timm.layers.LayerScale``, so
the state dicts are interchangeable. Written here so that importing the library does not
import timm.
"""

from __future__ import annotations

import torch
from torch import nn

from jepa_blocks._checks import check_bool, check_float, check_int, check_tensor

__all__ = ["LayerScale"]


class LayerScale(nn.Module):
    """Multiply the last dimension by a learned vector ``gamma`` initialised to ``init_values``.

    Args:
        dim: Channels ``D``.
        init_values: Initial value of every entry of ``gamma`` (e.g. ``1e-5``).
        inplace: Multiply ``x`` in place (saves memory; only where autograd allows it).

    Shapes:
        x: ``(..., D)`` -> ``(..., D)``.

    Example:
        >>> ls = LayerScale(8, init_values=0.1)
        >>> ls(torch.ones(2, 8)).shape, ls.gamma.shape
        (torch.Size([2, 8]), torch.Size([8]))
    """

    def __init__(self, dim: int, init_values: float = 1e-5, inplace: bool = False) -> None:
        super().__init__()
        dim = check_int("dim", dim, min_value=1)
        self.init_values = check_float("init_values", init_values)
        self.inplace = check_bool("inplace", inplace)
        self.gamma = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Set every entry of ``gamma`` to ``init_values``."""
        nn.init.constant_(self.gamma, self.init_values)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scale ``x`` ``(..., D)`` channel-wise; returns ``(..., D)``."""
        check_tensor("x", x, kind="float", allow_empty=True)
        if x.ndim == 0 or x.shape[-1] != self.gamma.shape[0]:
            raise ValueError(f"x must have shape (..., {self.gamma.shape[0]}), got {tuple(x.shape)}")
        return x.mul_(self.gamma) if self.inplace else x * self.gamma
