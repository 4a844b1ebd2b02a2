"""Pre-norm transformer block with rotary positions and padded-token masking.

Built from local copies of timm's ``Mlp`` and ``LayerScale`` (same parameters, no timm
import) and a ``DropPath`` whose draws can follow the sample rather than the process
(``layers/drop_path.py``), with parameter names that
match ``timm.models.vision_transformer.Block`` (``norm1``, ``attn.qkv``, ``attn.proj``,
``ls1.gamma``, ``norm2``, ``mlp.fc1``, ``mlp.fc2``, ``ls2.gamma``), so timm ViT weights
load into it. Two things timm's block does not take are added: per-token rotary
cos/sin (``RoPE2D``) applied to q and k, and a validity mask so padded tokens of a
``MaskIndices`` batch are never attended to.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from jepa_blocks._checks import check_bool, check_float, check_int, match_dtype
from jepa_blocks.layers.attention import Attention, _check_tokens
from jepa_blocks.layers.drop_path import DropPath
from jepa_blocks.layers.layer_scale import LayerScale
from jepa_blocks.layers.mlp import Mlp

__all__ = ["TransformerBlock"]


class TransformerBlock(nn.Module):
    """Pre-norm ViT block: ``x + ls1(attn(norm1(x)))`` then ``x + ls2(mlp(norm2(x)))``.

    Args:
        dim: Token width ``D``.
        num_heads: Attention heads.
        mlp_ratio: Hidden width of the MLP as a multiple of ``D``.
        qkv_bias: Bias in the qkv projection.
        drop_path: Stochastic-depth rate of both residual branches.
        layer_scale_init: Initial LayerScale value (e.g. ``1e-5``); ``None`` disables it.
        attn_drop: Attention dropout. proj_drop: Dropout after projections.
        norm_layer: Normalisation constructor taking the width.
        act_layer: MLP activation constructor.
        fused_attn: Use SDPA (see ``Attention``).

    Shapes:
        x: ``(B, N, D)`` -> ``(B, N, D)``; rope and attn_mask as in ``Attention``.

    Example:
        >>> block = TransformerBlock(64, num_heads=4)
        >>> block(torch.randn(2, 10, 64)).shape
        torch.Size([2, 10, 64])
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        layer_scale_init: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: Callable[[int], nn.Module] | None = None,
        act_layer: type[nn.Module] = nn.GELU,
        fused_attn: bool = True,
    ) -> None:
        super().__init__()
        self.dim = check_int("dim", dim, min_value=1)
        norm_layer = norm_layer or (lambda d: nn.LayerNorm(d, eps=1e-6))
        mlp_ratio = check_float("mlp_ratio", mlp_ratio, min_value=0.0, min_inclusive=False)
        fused_attn = check_bool("fused_attn", fused_attn)
        drop_path = check_float("drop_path", drop_path, min_value=0.0, max_value=1.0, max_inclusive=False)
        if layer_scale_init is not None:
            layer_scale_init = check_float("layer_scale_init", layer_scale_init, min_value=0.0, min_inclusive=False)
        self.norm1 = norm_layer(dim)
        self.attn = Attention(
            dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop, fused=fused_attn
        )
        self.ls1 = LayerScale(dim, init_values=layer_scale_init) if layer_scale_init else nn.Identity()
        self.drop_path1 = DropPath(drop_prob=drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.ls2 = LayerScale(dim, init_values=layer_scale_init) if layer_scale_init else nn.Identity()
        self.drop_path2 = DropPath(drop_prob=drop_path) if drop_path > 0 else nn.Identity()

    def forward(
        self,
        x: torch.Tensor,
        *,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Apply the block.

        Args:
            x: Tokens of shape ``(B, N, D)``.
            rope: Optional ``(cos, sin)`` for the attention (see ``Attention``).
            attn_mask: Optional bool mask ``(B, 1, 1, N)`` or ``(B, 1, N, N)``.

        Returns:
            Tokens of shape ``(B, N, D)``.
        """
        x = match_dtype(_check_tokens(x, self.dim), self.attn.qkv.weight.dtype)
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), rope=rope, attn_mask=attn_mask)))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x
