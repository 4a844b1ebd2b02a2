"""Masks for JEPA training: multi-block sampling, multi-crop views, DataLoader collation, index helpers."""

from jepa_blocks.masking.collate import MaskCollator
from jepa_blocks.masking.crops import crop_and_resize, sample_crop_boxes
from jepa_blocks.masking.indices import MaskIndices, gather_tokens, mask_to_indices
from jepa_blocks.masking.multiblock import (
    MultiBlockMasker,
    MultiBlockMasks,
    TargetSpec,
    block_shape,
    sample_multiblock_masks,
)
from jepa_blocks.masking.multicrop import MultiCropBatch, MultiCropCollator, MultiCropMasker

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
    "MultiCropMasker",
    "MultiCropBatch",
    "MultiCropCollator",
    "sample_crop_boxes",
    "crop_and_resize",
]
