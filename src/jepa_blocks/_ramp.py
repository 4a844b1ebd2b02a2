"""The one ramp behind every schedule: learning rate, weight decay and EMA momentum.

:func:`ramp` is a pure function without argument checks; the public schedules
(:func:`jepa_blocks.training.schedules.warmup_cosine`,
:func:`~jepa_blocks.training.schedules.cosine_ramp`,
:func:`jepa_blocks.targets.ema.momentum_schedule`) check their arguments and call it.
"""

from __future__ import annotations

import math
from typing import Literal

__all__ = ["ramp"]


def _interp(weight: float, at_zero: float, at_one: float) -> float:
    """``at_zero + (at_one - at_zero) * weight`` for ``weight`` in [0, 1], exact at both ends.

    The lerp form is monotone in ``weight`` under rounding; the result is clamped into the
    interval spanned by the two ends, and ``weight == 1`` returns ``at_one`` exactly
    (``a + (b - a) * 1`` may differ from ``b`` in the last bit).
    """
    if weight == 1.0:
        return at_one
    value = at_zero + (at_one - at_zero) * weight
    return min(max(value, min(at_zero, at_one)), max(at_zero, at_one))


def ramp(
    step: int,
    total_steps: int,
    start: float,
    end: float,
    shape: Literal["linear", "cosine"],
) -> float:
    """Value at ``step`` of a ramp from ``start`` (step 0) to ``end`` (step ``total_steps``).

    With ``t = step / total_steps``: ``'linear'`` gives ``start + (end - start) * t``,
    ``'cosine'`` gives ``end + (start - end) * (1 + cos(pi t)) / 2``. The result is
    ``start`` exactly at step 0, ``end`` from ``total_steps`` on, and stays between the
    two, monotone in ``step``.

    Args:
        step: Steps taken, ``>= 0``.
        total_steps: Length of the ramp, ``>= 1``.
        start: Value at step 0.
        end: Value from ``total_steps`` on.
        shape: ``'linear'`` or ``'cosine'``.
    """
    if step >= total_steps:
        return end
    t = step / total_steps
    if shape == "linear":
        return _interp(t, start, end)
    # (1 + cos(pi t)) / 2, the weight of ``start``, written as cos^2(pi t / 2): the same
    # value, exactly 1 at t = 0.
    return _interp(math.cos(0.5 * math.pi * t) ** 2, end, start)
