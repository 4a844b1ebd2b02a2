"""Training objectives: latent prediction (I-JEPA / H-JEPA), SIGReg and LeJEPA's view loss, VICReg and the
contrastive NT-Xent (SimCLR) and InfoNCE (learnable temperature) losses.

Losses that report several terms return :class:`LossOutput` ``(total, terms)``; all of
them compute in float32 (float64 inputs stay float64) whatever the input dtype.
"""

from __future__ import annotations

from jepa_blocks.losses.infonce import InfoNCELoss, info_nce_loss
from jepa_blocks.losses.latent import LatentPredictionLoss, LossType, latent_prediction_loss
from jepa_blocks.losses.lejepa import LeJEPALoss, lejepa_view_loss
from jepa_blocks.losses.ntxent import NTXentLoss, ntxent_loss
from jepa_blocks.losses.output import LossOutput
from jepa_blocks.losses.sigreg import SIGRegLoss, lejepa_loss, sigreg, sigreg_directions
from jepa_blocks.losses.vicreg import (
    VICRegLoss,
    covariance_loss,
    invariance_loss,
    variance_loss,
    vicreg_loss,
)

__all__ = [
    "InfoNCELoss",
    "LatentPredictionLoss",
    "LeJEPALoss",
    "LossOutput",
    "LossType",
    "NTXentLoss",
    "SIGRegLoss",
    "VICRegLoss",
    "covariance_loss",
    "info_nce_loss",
    "invariance_loss",
    "latent_prediction_loss",
    "lejepa_loss",
    "lejepa_view_loss",
    "ntxent_loss",
    "sigreg",
    "sigreg_directions",
    "variance_loss",
    "vicreg_loss",
]
