"""jepa-blocks: composable PyTorch building blocks for JEPA and hierarchical JEPA.

The top level re-exports the core blocks; everything else stays importable from its
subpackage, named by role: :mod:`jepa_blocks.masking`, :mod:`jepa_blocks.encoders`,
:mod:`jepa_blocks.predictors`, :mod:`jepa_blocks.targets`, :mod:`jepa_blocks.losses`,
:mod:`jepa_blocks.positional`, :mod:`jepa_blocks.necks`, :mod:`jepa_blocks.pooling`,
:mod:`jepa_blocks.quantizers`, :mod:`jepa_blocks.evaluation`, :mod:`jepa_blocks.training`.

Input checks that read tensor values (NaN/Inf, index ranges) are a debug mode, set by
``JEPA_BLOCKS_VALUE_CHECKS``, :func:`set_value_checks` and :func:`value_checks`; see
the docs' "Value checks" section.
"""

from jepa_blocks._checks import set_value_checks, value_checks, value_checks_enabled
from jepa_blocks.encoders import EncoderOutput, ViTEncoder
from jepa_blocks.losses import (
    InfoNCELoss,
    LatentPredictionLoss,
    LossOutput,
    NTXentLoss,
    SIGRegLoss,
    VICRegLoss,
    latent_prediction_loss,
    sigreg,
    vicreg_loss,
)
from jepa_blocks.masking import (
    MaskCollator,
    MaskIndices,
    MultiBlockMasker,
    MultiBlockMasks,
    MultiCropMasker,
)
from jepa_blocks.necks import FPNNeck
from jepa_blocks.pooling import AttentionPool
from jepa_blocks.positional import RoPE2D
from jepa_blocks.predictors import HierarchicalPredictor
from jepa_blocks.quantizers import VectorQuantizer
from jepa_blocks.targets import EMATarget, hierarchical_targets

__version__ = "0.1.0"

__all__ = [
    # the seven core blocks
    "MultiBlockMasker",
    "HierarchicalPredictor",
    "EMATarget",
    "SIGRegLoss",
    "VICRegLoss",
    "RoPE2D",
    "FPNNeck",
    # blocks from neighbouring methods
    "MultiCropMasker",
    "NTXentLoss",
    "InfoNCELoss",
    "VectorQuantizer",
    "AttentionPool",
    # encoder, latent loss and the data they exchange
    "ViTEncoder",
    "EncoderOutput",
    "LatentPredictionLoss",
    "LossOutput",
    "MaskIndices",
    "MultiBlockMasks",
    "MaskCollator",
    # functional twins
    "hierarchical_targets",
    "latent_prediction_loss",
    "sigreg",
    "vicreg_loss",
    # value checks (a debug mode)
    "set_value_checks",
    "value_checks",
    "value_checks_enabled",
]
