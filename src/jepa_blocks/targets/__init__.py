"""Target encoders: what the predictor regresses onto.

* :mod:`~jepa_blocks.targets.ema`: EMA copy of the online encoder with a momentum schedule.
"""

from jepa_blocks.targets.ema import EMATarget, ema_update_, momentum_schedule

__all__ = ["EMATarget", "ema_update_", "momentum_schedule"]
