"""Necks: turn encoder features into maps for dense heads.

* :mod:`~jepa_blocks.necks.fpn`: top-down feature pyramid (FPN) over multi-level features.
"""

from jepa_blocks.necks.fpn import FPNNeck, tokens_to_map

__all__ = ["FPNNeck", "tokens_to_map"]
