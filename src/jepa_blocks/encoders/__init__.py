"""Encoders: a ViT that processes only kept tokens, and its ``torch.export`` deploy path.

Its transformer pieces live in :mod:`jepa_blocks.layers`; ``Attention``,
``TransformerBlock`` and ``attention_mask_from_valid`` stay importable from here for
backward compatibility.
"""

from jepa_blocks.encoders.export import EncoderTokens, export_encoder
from jepa_blocks.encoders.vit import EncoderOutput, ViTEncoder
from jepa_blocks.layers import Attention, TransformerBlock, attention_mask_from_valid  # noqa: F401 (compat)

__all__ = [
    "EncoderOutput",
    "EncoderTokens",
    "ViTEncoder",
    "export_encoder",
]
