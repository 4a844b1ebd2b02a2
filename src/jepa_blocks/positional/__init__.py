"""Positional encodings: fixed 2D sin-cos tables and axial 2D rotary embeddings."""

from jepa_blocks.positional.rope2d import RoPE2D, apply_rotary, rope_2d_angles
from jepa_blocks.positional.sincos import sincos_2d, sincos_2d_table

__all__ = ["RoPE2D", "apply_rotary", "rope_2d_angles", "sincos_2d", "sincos_2d_table"]
