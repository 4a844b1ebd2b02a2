"""Layers: the transformer pieces shared by encoders, predictors, pooling and evaluation.

``Attention`` (with an optional return of its probabilities) and the pure
``dot_product_attention`` behind it, the pre-norm ``TransformerBlock``, the
``transformer_stack`` builder and the I-JEPA initialisation helpers.
"""

from jepa_blocks.layers.attention import Attention, attention_mask_from_valid, dot_product_attention
from jepa_blocks.layers.block import TransformerBlock
from jepa_blocks.layers.init import init_transformer_weights, rescale_residual_branches
from jepa_blocks.layers.stack import transformer_stack

__all__ = [
    "Attention",
    "TransformerBlock",
    "attention_mask_from_valid",
    "dot_product_attention",
    "init_transformer_weights",
    "rescale_residual_branches",
    "transformer_stack",
]
