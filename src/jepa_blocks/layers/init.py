"""I-JEPA weight initialisation of transformer modules.

``init_transformer_weights`` is applied to every submodule (``model.apply(...)``):
truncated-normal linear weights, zero biases, unit LayerNorm scales. Then
``rescale_residual_branches`` divides the output projections of each residual branch of
block ``l`` (1-based) by ``sqrt(2 l)``, as I-JEPA's ``fix_init_weight`` does, so that
deeper blocks start with smaller updates to the residual stream.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from jepa_blocks._checks import check_float

__all__ = ["init_transformer_weights", "rescale_residual_branches"]


def init_transformer_weights(module: nn.Module, *, std: float = 0.02) -> None:
    """I-JEPA initialisation of one module: truncated-normal linear weights, zero biases, unit norms.

    ``nn.Linear`` gets weights from ``trunc_normal_(std=std)`` (cut at +-2, i.e. effectively
    ``N(0, std^2)``) and zero biases; ``nn.LayerNorm`` gets unit scales and zero biases;
    other modules are left alone. Use it with ``model.apply(init_transformer_weights)``.

    Args:
        module: The module to initialise (its own parameters only, not its children's).
        std: Standard deviation of the linear weights, > 0.

    Example:
        >>> lin = nn.Linear(64, 64)
        >>> init_transformer_weights(lin)
        >>> bool((lin.bias == 0).all()), round(float(lin.weight.detach().std()), 2)
        (True, 0.02)
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    std = check_float("std", std, min_value=0.0, min_inclusive=False)
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        if module.weight is not None:
            nn.init.ones_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def rescale_residual_branches(blocks: Iterable[nn.Module]) -> None:
    """Divide each block's residual output projections by ``sqrt(2 * layer_id)`` (I-JEPA).

    Args:
        blocks: The blocks in order (e.g. from ``transformer_stack``); each needs
            ``attn.proj`` and ``mlp.fc2`` linear layers, as ``TransformerBlock`` has. Block
            ``i`` (0-based) has ``layer_id = i + 1``. Weights change in place.

    Example:
        >>> from jepa_blocks.layers import transformer_stack
        >>> blocks = transformer_stack(16, depth=2, num_heads=2)
        >>> before = blocks[1].mlp.fc2.weight.clone()
        >>> rescale_residual_branches(blocks)
        >>> torch.allclose(blocks[1].mlp.fc2.weight, before / 2)
        True
    """
    container = isinstance(blocks, (nn.ModuleList, nn.Sequential))
    if not container and (isinstance(blocks, (str, bytes, nn.Module)) or not isinstance(blocks, Iterable)):
        raise TypeError(f"blocks must be a sequence of transformer blocks, got {type(blocks).__name__}")
    blocks = list(blocks)
    for i, block in enumerate(blocks):
        proj = getattr(getattr(block, "attn", None), "proj", None)
        fc2 = getattr(getattr(block, "mlp", None), "fc2", None)
        if not isinstance(proj, nn.Linear) or not isinstance(fc2, nn.Linear):
            raise TypeError(
                f"blocks[{i}] must have attn.proj and mlp.fc2 linear layers (a TransformerBlock), "
                f"got {type(block).__name__}"
            )
    with torch.no_grad():
        for layer_id, block in enumerate(blocks, start=1):
            block.attn.proj.weight.div_((2.0 * layer_id) ** 0.5)
            block.mlp.fc2.weight.div_((2.0 * layer_id) ** 0.5)
