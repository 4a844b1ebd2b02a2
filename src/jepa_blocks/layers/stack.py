"""A stack of pre-norm transformer blocks with linearly rising stochastic depth.

The encoder and the predictor build their blocks here, so both follow one recipe
(I-JEPA / timm: the drop-path rate of block ``i`` of ``depth`` is
``drop_path_rate * i / (depth - 1)``, 0 for the first block).
"""

from __future__ import annotations

import torch
from torch import nn

from jepa_blocks._checks import check_float, check_int
from jepa_blocks.layers.block import TransformerBlock

__all__ = ["transformer_stack"]


def transformer_stack(
    dim: int,
    *,
    depth: int,
    num_heads: int,
    mlp_ratio: float = 4.0,
    qkv_bias: bool = True,
    drop_path_rate: float = 0.0,
    layer_scale_init: float | None = None,
    fused_attn: bool = True,
) -> nn.ModuleList:
    """``depth`` pre-norm blocks with stochastic depth rising linearly from 0 to ``drop_path_rate``.

    Args:
        dim: Token width ``D``.
        depth: Number of blocks.
        num_heads: Attention heads per block; must divide ``dim``.
        mlp_ratio: MLP hidden width as a multiple of ``D``.
        qkv_bias: Bias in the qkv projections.
        drop_path_rate: Stochastic-depth rate of the last block, in ``[0, 1)``.
        layer_scale_init: LayerScale initial value, or ``None`` for none.
        fused_attn: Use ``scaled_dot_product_attention`` (see ``Attention``).

    Returns:
        ``nn.ModuleList`` of ``depth`` ``TransformerBlock`` mapping ``(B, N, D)`` to
        ``(B, N, D)``.

    Example:
        >>> blocks = transformer_stack(32, depth=3, num_heads=4, drop_path_rate=0.2)
        >>> [round(b.drop_path1.drop_prob, 2) if hasattr(b.drop_path1, "drop_prob") else 0.0 for b in blocks]
        [0.0, 0.1, 0.2]
    """
    dim = check_int("dim", dim, min_value=1)
    depth = check_int("depth", depth, min_value=1)
    drop_path_rate = check_float("drop_path_rate", drop_path_rate, min_value=0.0, max_value=1.0, max_inclusive=False)
    rates = torch.linspace(0.0, drop_path_rate, depth).tolist()
    return nn.ModuleList(
        TransformerBlock(
            dim,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            drop_path=rate,
            layer_scale_init=layer_scale_init,
            fused_attn=fused_attn,
        )
        for rate in rates
    )
