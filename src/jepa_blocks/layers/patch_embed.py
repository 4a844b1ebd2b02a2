"""Patch embedding: a strided convolution that turns an image into a row-major token grid.

Same parameters (``proj.weight``, ``proj.bias``; ``norm`` an identity unless asked) and
construction order as ``timm.layers.PatchEmbed(strict_img_size=False)``, so timm ViT
weights load and the initial weights under a fixed seed are timm's. Written here so that
importing the library does not import timm.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from jepa_blocks._checks import check_bool, check_grid, check_int, check_tensor
from jepa_blocks.layers.mlp import _build_layer

__all__ = ["PatchEmbed"]


class PatchEmbed(nn.Module):
    """Image ``(B, C, H * p, W * p)`` to tokens ``(B, H * W, D)`` in row-major grid order.

    Args:
        img_size: Default image size (an int or ``(H, W)``, divisible by ``patch_size``);
            sets ``grid_size`` and ``num_patches``. Images of any size divisible by
            ``patch_size`` are accepted.
        patch_size: Patch side ``p`` in pixels.
        in_chans: Image channels ``C``.
        embed_dim: Token width ``D``.
        norm_layer: Optional normalisation of the tokens, called with ``D``.
        bias: Bias in the projection.

    Attributes:
        img_size: ``(H * p, W * p)`` of ``img_size``.
        patch_size: ``(p, p)``.
        grid_size: ``(H, W)`` of ``img_size``.
        num_patches: ``H * W`` of ``img_size``.

    Shapes:
        images ``(B, C, H * p, W * p)`` -> tokens ``(B, H * W, D)``; token ``row * W + col``
        is the patch at ``(row, col)``.

    Example:
        >>> embed = PatchEmbed(img_size=32, patch_size=4, embed_dim=64)
        >>> embed(torch.randn(2, 3, 32, 32)).shape, embed.grid_size
        (torch.Size([2, 64, 64]), (8, 8))
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        norm_layer: Callable[[int], nn.Module] | None = None,
        bias: bool = True,
    ) -> None:
        super().__init__()
        p = check_int("patch_size", patch_size, min_value=1)
        self.img_size = check_grid("img_size", img_size)
        if self.img_size[0] % p or self.img_size[1] % p:
            raise ValueError(f"img_size {self.img_size} must be divisible by patch_size {p}")
        self.patch_size = (p, p)
        self.grid_size = (self.img_size[0] // p, self.img_size[1] // p)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        in_chans = check_int("in_chans", in_chans, min_value=1)
        embed_dim = check_int("embed_dim", embed_dim, min_value=1)
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=p, stride=p, bias=check_bool("bias", bias))
        self.norm = _build_layer("norm_layer", norm_layer, embed_dim) if norm_layer is not None else nn.Identity()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Embed ``images`` ``(B, C, H * p, W * p)``; returns ``(B, H * W, D)``."""
        check_tensor("images", images, ndim=4, kind="float")
        if images.shape[1] != self.proj.in_channels:
            raise ValueError(f"images must have {self.proj.in_channels} channels, got shape {tuple(images.shape)}")
        h, w = images.shape[-2:]
        ph, pw = self.patch_size
        if h % ph or w % pw:
            raise ValueError(f"images height and width must be divisible by patch_size {ph}, got {(h, w)}")
        return self.norm(self.proj(images).flatten(2).transpose(1, 2))
