"""Feature pyramid network neck (Lin et al., 2017) over multi-level encoder features.

Levels are ordered from the finest (highest resolution) to the coarsest. Each level gets
a 1x1 lateral conv to ``out_channels``; a top-down pathway starts at the coarsest level,
upsamples the running map to the next finer level's exact size and fuses it with that
level's lateral map; a 3x3 conv then smooths every fused map::

    p_{L-1} = lateral_{L-1}(x_{L-1})
    p_i     = fuse(lateral_i(x_i), upsample(p_{i+1}, size of x_i))     i = L-2, ..., 0
    out_i   = conv3x3_i(p_i)

Inputs may be maps ``(B, C, H, W)`` or ViT token grids ``(B, H * W, C)`` (row-major,
``id = row * W + col``); levels may share one resolution (several ViT layers at 14x14),
then the upsampling is skipped.

Features of another floating dtype than the weights are cast to it (unless autocast is
on). NaN/Inf features raise ``ValueError`` (a value check); features on another device
than the weights raise ``ValueError`` (a metadata check).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from jepa_blocks._checks import (
    check_choice,
    check_finite,
    check_grid,
    check_int,
    check_same_device,
    check_tensor,
    match_dtype,
)

__all__ = ["tokens_to_map", "FPNNeck"]


def _tokens_to_map(
    x: torch.Tensor, grid_size: int | tuple[int, int] | None, x_name: str, grid_name: str
) -> torch.Tensor:
    n = x.shape[1]
    if grid_size is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(
                f"{x_name} has {n} tokens, not a perfect square, so its grid cannot be "
                f"inferred: pass {grid_name}=(H, W) with H * W = {n}"
            )
        h = w = side
    else:
        h, w = check_grid(grid_name, grid_size)
        if h * w != n:
            raise ValueError(
                f"{grid_name}={(h, w)} must have H * W equal to the {n} tokens of {x_name}, "
                f"got {h * w}"
            )
    return rearrange(x, "b (h w) c -> b c h w", h=h, w=w)


def tokens_to_map(x: torch.Tensor, grid_size: int | tuple[int, int] | None = None) -> torch.Tensor:
    """Reshape a row-major token grid into a feature map.

    Args:
        x: Tokens of shape ``(B, H * W, C)``, token ``row * W + col`` at ``(row, col)``.
        grid_size: ``(H, W)`` (an int means square); ``None`` infers a square grid and
            raises ``ValueError`` when ``H * W`` is not a perfect square.

    Returns:
        Map of shape ``(B, C, H, W)``.
    """
    check_tensor("x", x, ndim=3)
    return _tokens_to_map(x, grid_size, "x", "grid_size")


class FPNNeck(nn.Module):
    """Top-down feature pyramid over ``L`` levels, finest first.

    Args:
        in_channels: Channels ``C_i`` of each input level, finest first (``L >= 1``).
        out_channels: Channels of every output map.
        fusion: ``'add'``: ``lateral + upsampled`` (the paper); ``'concat'``: concatenate
            ``[lateral, upsampled]`` along channels, then a 1x1 conv back to
            ``out_channels``.
        upsample_mode: ``F.interpolate`` mode used to reach the finer level's exact size
            (``'bilinear'`` with ``align_corners=False``), so odd sizes such as
            ``7 -> 4 -> 2`` work.

    Example:
        >>> import torch
        >>> neck = FPNNeck(in_channels=[32, 64], out_channels=16)
        >>> feats = [torch.randn(2, 32, 8, 8), torch.randn(2, 16, 64)]  # a map, 4x4 tokens
        >>> [tuple(y.shape) for y in neck(feats)]
        [(2, 16, 8, 8), (2, 16, 4, 4)]
    """

    def __init__(
        self,
        *,
        in_channels: Sequence[int],
        out_channels: int = 256,
        fusion: Literal["add", "concat"] = "add",
        upsample_mode: Literal["nearest", "bilinear"] = "nearest",
    ) -> None:
        super().__init__()
        if isinstance(in_channels, (str, bytes)) or not isinstance(in_channels, Sequence):
            raise TypeError(
                f"in_channels must be a sequence of ints, got {type(in_channels).__name__}"
            )
        if len(in_channels) == 0:
            raise ValueError("in_channels must name at least one level, got an empty sequence")
        self.in_channels = tuple(
            check_int(f"in_channels[{i}]", c, min_value=1) for i, c in enumerate(in_channels)
        )
        self.out_channels = check_int("out_channels", out_channels, min_value=1)
        self.fusion = check_choice("fusion", fusion, ("add", "concat"))
        self.upsample_mode = check_choice("upsample_mode", upsample_mode, ("nearest", "bilinear"))

        d = self.out_channels
        self.lateral = nn.ModuleList(nn.Conv2d(c, d, kernel_size=1) for c in self.in_channels)
        # One fuse conv per level that receives a top-down map (all but the coarsest).
        self.fuse = (
            nn.ModuleList(nn.Conv2d(2 * d, d, kernel_size=1) for _ in self.in_channels[:-1])
            if self.fusion == "concat"
            else None
        )
        self.output = nn.ModuleList(
            nn.Conv2d(d, d, kernel_size=3, padding=1) for _ in self.in_channels
        )

    @property
    def num_levels(self) -> int:
        """Number of pyramid levels ``L``."""
        return len(self.in_channels)

    def _to_maps(
        self,
        features: Sequence[torch.Tensor],
        grid_sizes: Sequence[int | tuple[int, int] | None] | None,
    ) -> list[torch.Tensor]:
        """Check the inputs and bring every level to ``(B, C_i, H_i, W_i)``."""
        if isinstance(features, torch.Tensor) or not isinstance(features, Sequence):
            raise TypeError(
                f"features must be a sequence of tensors, got {type(features).__name__}"
            )
        if len(features) != self.num_levels:
            raise ValueError(
                f"features must have one tensor per level of in_channels "
                f"({self.num_levels}), got {len(features)}"
            )
        if grid_sizes is not None:
            if isinstance(grid_sizes, (str, bytes)) or not isinstance(grid_sizes, Sequence):
                raise TypeError(
                    f"grid_sizes must be a sequence of (H, W) pairs, got {type(grid_sizes).__name__}"
                )
            if len(grid_sizes) != self.num_levels:
                raise ValueError(
                    f"grid_sizes must have one entry per feature ({self.num_levels}), "
                    f"got {len(grid_sizes)}"
                )
        maps = []
        for i, x in enumerate(features):
            name, grid_name = f"features[{i}]", f"grid_sizes[{i}]"
            check_tensor(name, x, ndim=(3, 4), kind="float")
            check_same_device((name, x), module=self)
            grid = None if grid_sizes is None else grid_sizes[i]
            if x.ndim == 3:
                if x.shape[2] != self.in_channels[i]:
                    raise ValueError(
                        f"{name} must have {self.in_channels[i]} channels (in_channels[{i}]) "
                        f"in its last dimension as a (B, N, C) token grid, got {x.shape[2]}"
                    )
                x = _tokens_to_map(x, grid, name, grid_name)
            else:
                if x.shape[1] != self.in_channels[i]:
                    raise ValueError(
                        f"{name} must have {self.in_channels[i]} channels (in_channels[{i}]) "
                        f"in dimension 1 as a (B, C, H, W) map, got {x.shape[1]}"
                    )
                if grid is not None and check_grid(grid_name, grid) != tuple(x.shape[-2:]):
                    raise ValueError(
                        f"{grid_name}={check_grid(grid_name, grid)} must match the spatial "
                        f"size of the map {name}, got {tuple(x.shape[-2:])}"
                    )
            if x.shape[0] != features[0].shape[0]:
                raise ValueError(
                    f"{name} must have the batch size of features[0] ({features[0].shape[0]}), "
                    f"got {x.shape[0]}"
                )
            if maps and (x.shape[-2] > maps[-1].shape[-2] or x.shape[-1] > maps[-1].shape[-1]):
                raise ValueError(
                    f"features must be ordered from the finest to the coarsest level, but "
                    f"{name} is {tuple(x.shape[-2:])}, larger than features[{i - 1}] "
                    f"{tuple(maps[-1].shape[-2:])}"
                )
            maps.append(x)
        check_finite(*((f"features[{i}]", x) for i, x in enumerate(features)))
        dtype = self.lateral[0].weight.dtype
        return [match_dtype(x, dtype) for x in maps]

    def forward(
        self,
        features: Sequence[torch.Tensor],
        *,
        grid_sizes: Sequence[int | tuple[int, int] | None] | None = None,
    ) -> list[torch.Tensor]:
        """Fuse the levels top-down.

        Args:
            features: ``L`` tensors, finest first; level ``i`` is a map of shape
                ``(B, C_i, H_i, W_i)`` or a token grid of shape ``(B, H_i * W_i, C_i)``.
                Sizes must not grow from one level to the next (``H_{i+1} <= H_i``,
                ``W_{i+1} <= W_i``).
            grid_sizes: ``(H_i, W_i)`` per level (``None`` entries allowed). Needed for
                token grids that are not square; checked against maps.

        Returns:
            ``L`` maps of shape ``(B, out_channels, H_i, W_i)``, in the input order.
        """
        maps = self._to_maps(features, grid_sizes)
        laterals = [conv(x) for conv, x in zip(self.lateral, maps, strict=True)]
        merged: list[torch.Tensor] = [laterals[-1]] * self.num_levels
        running = laterals[-1]
        for i in range(self.num_levels - 2, -1, -1):
            lateral = laterals[i]
            up = running
            if up.shape[-2:] != lateral.shape[-2:]:
                if self.upsample_mode == "bilinear":
                    up = F.interpolate(
                        up, size=lateral.shape[-2:], mode="bilinear", align_corners=False
                    )
                else:
                    up = F.interpolate(up, size=lateral.shape[-2:], mode="nearest")
            if self.fuse is None:
                running = lateral + up
            else:
                running = self.fuse[i](torch.cat([lateral, up], dim=1))
            merged[i] = running
        return [conv(p) for conv, p in zip(self.output, merged, strict=True)]

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, out_channels={self.out_channels}, "
            f"fusion={self.fusion!r}, upsample_mode={self.upsample_mode!r}"
        )
