"""Target encoders: what the predictor regresses onto.

* :mod:`~jepa_blocks.targets.ema`: EMA copy of the online encoder with a momentum schedule.
* :mod:`~jepa_blocks.targets.hierarchy`: per-level target features (pooled or per layer)
  gathered at the masker's target ids.
"""

from jepa_blocks.targets.ema import EMATarget, ema_update_, momentum_schedule
from jepa_blocks.targets.hierarchy import hierarchical_targets

__all__ = ["EMATarget", "ema_update_", "hierarchical_targets", "momentum_schedule"]
