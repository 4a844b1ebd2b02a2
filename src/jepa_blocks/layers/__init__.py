"""Layers: the transformer pieces shared by encoders, predictors, pooling and evaluation.

``Attention`` (with an optional return of its probabilities) and the pure
``dot_product_attention`` behind it, the pre-norm ``TransformerBlock``, the
``transformer_stack`` builder and the I-JEPA initialisation helpers.
"""

from jepa_blocks.layers.attention import Attention, attention_mask_from_valid, dot_product_attention
from jepa_blocks.layers.block import TransformerBlock
from jepa_blocks.layers.drop_path import DropPath, drop_path, sample_seeded_drop_path
from jepa_blocks.layers.init import init_transformer_weights, rescale_residual_branches
from jepa_blocks.layers.layer_scale import LayerScale
from jepa_blocks.layers.mlp import Mlp
from jepa_blocks.layers.patch_embed import PatchEmbed
from jepa_blocks.layers.stack import transformer_stack

__all__ = [
    "Attention",
    "DropPath",
    "LayerScale",
    "Mlp",
    "PatchEmbed",
    "TransformerBlock",
    "attention_mask_from_valid",
    "dot_product_attention",
    "drop_path",
    "init_transformer_weights",
    "rescale_residual_branches",
    "sample_seeded_drop_path",
    "transformer_stack",
]
