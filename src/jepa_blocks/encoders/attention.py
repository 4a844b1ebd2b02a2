"""Backward-compatible location of the transformer pieces, now in :mod:`jepa_blocks.layers`.

Kept so that ``from jepa_blocks.encoders.attention import TransformerBlock`` keeps working;
new code imports from ``jepa_blocks.layers``. Nothing is defined here.
"""

from jepa_blocks.layers.attention import Attention, attention_mask_from_valid
from jepa_blocks.layers.block import TransformerBlock
from jepa_blocks.layers.init import init_transformer_weights, rescale_residual_branches
from jepa_blocks.layers.stack import transformer_stack

__all__ = [
    "Attention",
    "TransformerBlock",
    "attention_mask_from_valid",
    "init_transformer_weights",
    "rescale_residual_branches",
    "transformer_stack",
]
