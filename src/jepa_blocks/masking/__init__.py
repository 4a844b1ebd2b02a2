"""Masks for JEPA training: multi-block sampling, DataLoader collation, index helpers."""

from jepa_blocks.masking.collate import MaskCollator
from jepa_blocks.masking.indices import MaskIndices, gather_tokens, mask_to_indices
from jepa_blocks.masking.multiblock import (
    MultiBlockMasker,
    MultiBlockMasks,
    TargetSpec,
    block_shape,
    sample_multiblock_masks,
)

__all__ = [
    "MaskIndices",
    "mask_to_indices",
    "gather_tokens",
    "MultiBlockMasker",
    "MultiBlockMasks",
    "TargetSpec",
    "block_shape",
    "sample_multiblock_masks",
    "MaskCollator",
]
