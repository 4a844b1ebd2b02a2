"""Feasibility analysis of a multi-block spec: can the sampler ever meet its minimums?

``MultiBlockMasker`` runs it once, at construction, so that a spec whose
``min_target_tokens`` or ``min_context_tokens`` can never be met raises a ``ValueError``
naming the numbers, instead of re-drawing forever (I-JEPA's collator hangs on small grids:
facebookresearch/ijepa issue 68).

* Targets: the smallest block the size rule gives at a level's lowest scale, over every
  aspect in range, must have ``min_target_tokens`` tokens.
* Context: at most ``min(largest context block, H * W - smallest target footprint)``
  tokens can remain, where the largest context block is taken at the highest context
  scale over every aspect, and the smallest footprint is, over the levels, the largest
  of the smallest level-0 footprints of one block of that level. That bound must reach
  ``min_context_tokens``.

The size rule is a step function of the aspect, so ``_reachable_shapes`` lists every
shape it can give exactly, from its breakpoints, in ``O(sqrt(H * W))`` steps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from jepa_blocks.masking.multiblock import TargetSpec

__all__ = ["check_feasible"]


def check_feasible(
    *,
    grid: tuple[int, int],
    level_grids: Sequence[tuple[int, int]],
    specs: Sequence[TargetSpec],
    context_scale: tuple[float, float],
    context_aspect_ratio: tuple[float, float],
    min_target_tokens: int,
    min_context_tokens: int,
) -> None:
    """Raise ``ValueError`` if the multi-block spec can never meet its minimums.

    Args:
        grid: The level-0 grid ``(H, W)``.
        level_grids: ``(h_l, w_l)`` per level.
        specs: The checked ``TargetSpec`` of each level.
        context_scale: ``(low, high)`` context block scale.
        context_aspect_ratio: ``(low, high)`` context block height / width.
        min_target_tokens: Smallest allowed target block.
        min_context_tokens: Smallest allowed context.
    """
    h0, w0 = grid
    # -- target blocks
    min_union = 0  # a lower bound on the level-0 footprint of all targets of a sample
    for lvl, (spec, (gh, gw)) in enumerate(zip(specs, level_grids, strict=True)):
        if spec.num_blocks > gh * gw:
            raise ValueError(
                f"levels: level {lvl} asks for {spec.num_blocks} target blocks on a {gh}x{gw} grid "
                f"(num_targets must be <= {gh * gw} there)"
            )
        shapes = _reachable_shapes(spec.scale[0], spec.aspect_ratio, gh, gw)
        (bh, bw), a = min(shapes.items(), key=lambda item: item[0][0] * item[0][1])
        if bh * bw < min_target_tokens:
            raise ValueError(
                f"min_target_tokens={min_target_tokens} can never be met: the smallest target "
                f"block on level {lvl} (grid {gh}x{gw}, scale {spec.scale[0]}, aspect {a:.4g}) is "
                f"{bh}x{bw} = {bh * bw} tokens; raise the target scale or lower min_target_tokens"
            )
        min_union = max(
            min_union,
            min(_footprint_extent(h, lvl, h0) * _footprint_extent(w, lvl, w0) for h, w in shapes),
        )

    # -- context
    if min_context_tokens > h0 * w0:
        raise ValueError(
            f"min_context_tokens={min_context_tokens} exceeds the {h0}x{w0} = {h0 * w0} tokens "
            f"of grid_size {grid}"
        )
    ctx_shapes = _reachable_shapes(context_scale[1], context_aspect_ratio, h0, w0)
    max_block = max(h * w for h, w in ctx_shapes)
    max_context = min(max_block, h0 * w0 - min_union)
    if max_context < min_context_tokens:
        raise ValueError(
            f"min_context_tokens={min_context_tokens} can never be met: the largest context "
            f"block has {max_block} tokens and the targets cover at least {min_union} of the "
            f"{h0 * w0}, so at most {max_context} context tokens remain; lower "
            "min_context_tokens, raise context_scale or shrink the targets"
            + (f" (fewer levels than {len(specs)})" if len(specs) > 1 else "")
        )


def _shape_scalar(keep: float, a: float, gh: int, gw: int) -> tuple[int, int]:
    # Same float64 operations as ``multiblock._block_shape`` on Python floats.
    h = min(max(math.floor(math.sqrt(keep * a) + 0.5), 1), gh)
    w = min(max(math.floor(math.sqrt(keep / a) + 0.5), 1), gw)
    return h, w


def _reachable_shapes(
    scale: float, aspect: tuple[float, float], gh: int, gw: int
) -> dict[tuple[int, int], float]:
    """Every ``(h, w)`` the rule gives at ``scale`` for an aspect in ``aspect``.

    ``h`` only changes where ``sqrt(keep * a)`` crosses ``n + 1/2`` and ``w`` where
    ``sqrt(keep / a)`` does, so evaluating at the ends, at every such breakpoint, at its
    floating-point neighbours and between consecutive points sees every shape. Returns
    ``{(h, w): an aspect giving it}``.
    """
    keep = gh * gw * scale
    lo, hi = aspect
    points = {lo, hi}
    # Only h-crossings below the clamp (n < gh) and w-crossings with n < gw can change the
    # shape, and only those whose breakpoint lies in (lo, hi): visit just those n, so the
    # cost does not grow with the grid side (a 10^9 grid would otherwise loop 10^9 times).
    h_ns = _crossings(math.sqrt(keep * lo), math.sqrt(keep * hi), gh)
    w_ns = _crossings(math.sqrt(keep / hi), math.sqrt(keep / lo), gw)
    candidates = [(n + 0.5) ** 2 / keep for n in h_ns] + [keep / (n + 0.5) ** 2 for n in w_ns]
    for b in candidates:
        if lo < b < hi:
            points.update((b, math.nextafter(b, -math.inf), math.nextafter(b, math.inf)))
    ordered = sorted(p for p in points if lo <= p <= hi)
    ordered += [(x + y) / 2 for x, y in zip(ordered, ordered[1:], strict=False)]
    shapes: dict[tuple[int, int], float] = {}
    for a in ordered:
        shapes.setdefault(_shape_scalar(keep, a, gh, gw), a)
    return shapes


def _crossings(low_root: float, high_root: float, size: int) -> range:
    """The ``n`` in ``[0, size)`` with ``n + 1/2`` in ``[low_root, high_root]``, one extra each side.

    Robust to ``inf`` roots (an extreme aspect ratio): they are clipped to ``[0, size)``.
    """
    start = math.floor(low_root - 0.5) - 1 if low_root - 0.5 < size else size
    stop = math.ceil(high_root - 0.5) + 2 if high_root - 0.5 < size else size
    return range(max(start, 0), min(stop, size))


def _footprint_extent(n: int, level: int, size: int) -> int:
    """Fewest level-0 rows (or columns) that ``n`` adjacent level-``level`` cells can cover."""
    f = 2**level
    last = size - (-(-size // f) - 1) * f  # rows covered by the last (partial) cell
    return (n - 1) * f + min(f, last)
