"""Encoders: a ViT that processes only kept tokens, and its transformer block."""

from jepa_blocks.encoders.attention import Attention, TransformerBlock, attention_mask_from_valid
from jepa_blocks.encoders.export import EncoderTokens, export_encoder
from jepa_blocks.encoders.vit import EncoderOutput, ViTEncoder

__all__ = [
    "Attention",
    "EncoderOutput",
    "EncoderTokens",
    "TransformerBlock",
    "ViTEncoder",
    "attention_mask_from_valid",
    "export_encoder",
]
