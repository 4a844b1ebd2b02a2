"""Encoders: a ViT that processes only kept tokens, any timm ViT as a token encoder, export.

``ViTEncoder`` (``from_timm``, ``from_checkpoint``), ``TimmTokenEncoder`` (a timm
``VisionTransformer`` with token dropping and padding masks) and the ``torch.export``
deploy path. timm is imported only when a timm model is used.

Its transformer pieces live in :mod:`jepa_blocks.layers`; ``Attention``,
``TransformerBlock`` and ``attention_mask_from_valid`` stay importable from here for
backward compatibility.
"""

from jepa_blocks.encoders.export import EncoderTokens, export_encoder
from jepa_blocks.encoders.timm_adapter import TimmTokenEncoder
from jepa_blocks.encoders.vit import EncoderOutput, ViTEncoder
from jepa_blocks.layers import Attention, TransformerBlock, attention_mask_from_valid  # noqa: F401 (compat)

__all__ = [
    "EncoderOutput",
    "EncoderTokens",
    "TimmTokenEncoder",
    "ViTEncoder",
    "export_encoder",
]
