"""I-JEPA multi-block masking, vectorised over the batch, with an optional hierarchy.

Each sample gets ``M`` rectangular *target* blocks (they may overlap each other) and one
rectangular *context* block; the context is the context block minus the level-0 footprint
of every target block of every level, so context and targets are disjoint by construction.

Block size rule (one rule for targets and context). On a ``gh x gw`` grid, for a scale ``s``
and an aspect ratio ``a`` (height / width), each drawn independently and uniformly from
its range, once per block and per sample::

    keep = gh * gw * s                                 (a real number, not floored)
    h    = clamp(floor(sqrt(keep * a) + 0.5), 1, gh)    (round half up)
    w    = clamp(floor(sqrt(keep / a) + 0.5), 1, gw)

computed in float64. ``h`` and ``w`` may reach ``gh`` and ``gw`` (the context block at
scale 1.0 is the whole grid). The block's top-left corner is uniform over every valid
placement: ``top`` in ``{0, ..., gh - h}`` and ``left`` in ``{0, ..., gw - w}``, both
inclusive, so every patch, corners and last row/column included, can be covered.

Differences from the official I-JEPA collator (facebookresearch/ijepa), on purpose:

* scale and aspect are independent draws (I-JEPA uses one draw for both);
* each sample and each block gets its own size (I-JEPA: one size per batch);
* ``keep`` is not floored and blocks are not shrunk below the grid size;
* placements include the last row and column (I-JEPA PR 40: exclusive upper bound);
* index lists are padded with a validity mask instead of cut to the batch minimum
  (I-JEPA issue 60), and the optional cut drops random tokens, not the bottom-right;
* impossible specs raise at construction and rejection is bounded (issue 68 hangs).

Hierarchy. Level ``l`` lives on the grid ``level_grid_size(grid, l)`` (``2**l`` pooling,
ceil mode). Its target blocks are sampled on that grid with the same rule, so a scale
means the same image fraction at every level, up to quantisation: on a coarse grid the
rounding and the clamp to ``>= 1`` cell decide (a 2x2 grid at scale 0.15 gives 1x1 blocks,
i.e. 25% of the image).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from jepa_blocks._checks import check_bool, check_grid, check_int, check_pair, value_checks_enabled
from jepa_blocks.grid import level_footprint, level_grid_size
from jepa_blocks.masking._feasibility import check_feasible
from jepa_blocks.masking._sampling import check_sampling
from jepa_blocks.masking.indices import MaskIndices, mask_to_indices

__all__ = [
    "TargetSpec",
    "MultiBlockMasks",
    "MultiBlockMasker",
    "block_shape",
    "sample_multiblock_masks",
]

# Coarsest level's scale bounds may be at most this multiple of level 0's.
_MAX_LEVEL_SCALE_GROWTH = 1.33
# Largest supported grid (H * W tokens): sampling holds dense (B, H * W) masks, and the
# feasibility analysis (_feasibility.py) visits O(sqrt(H * W)) block sizes.
_MAX_GRID_TOKENS = 2**20
_MAX_RESAMPLE_ROUNDS = 100


@dataclass(frozen=True)
class TargetSpec:
    """Target blocks of one hierarchy level.

    Attributes:
        num_blocks: Number ``M`` of target blocks per sample.
        scale: ``(low, high)`` fraction of the level grid covered by one block, in ``(0, 1]``.
        aspect_ratio: ``(low, high)`` block height / width, ``> 0``.

    Example:
        >>> TargetSpec(num_blocks=2, scale=(0.15, 0.2))
        TargetSpec(num_blocks=2, scale=(0.15, 0.2), aspect_ratio=(0.75, 1.5))
    """

    num_blocks: int = 4
    scale: tuple[float, float] = (0.15, 0.2)
    aspect_ratio: tuple[float, float] = (0.75, 1.5)

    def __post_init__(self) -> None:
        check_int("num_blocks", self.num_blocks, min_value=1)
        scale = check_pair("scale", self.scale, min_value=0.0, min_inclusive=False, max_value=1.0)
        aspect = check_pair("aspect_ratio", self.aspect_ratio, min_value=0.0, min_inclusive=False)
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "aspect_ratio", aspect)


@dataclass(frozen=True)
class MultiBlockMasks:
    """One batch of multi-block masks.

    Attributes:
        context: ``MaskIndices`` of shape ``(B, Kc)``: context token ids on the level-0 grid.
        targets: One ``MaskIndices`` per level ``l``, of shape ``(B, M_l, K_l)``: the ids of
            each target block on the level-``l`` grid ``level_grids[l]``.
        grid_size: The level-0 grid ``(H, W)``.
        level_grids: ``(h_l, w_l)`` per level.
        context_box: Long tensor of shape ``(B, 4)``: the sampled context block as
            ``(top, left, height, width)`` on the level-0 grid (before removing targets).
        target_boxes: One long tensor of shape ``(B, M_l, 4)`` per level: each target block
            as ``(top, left, height, width)`` on its level grid.

    Example:
        >>> masks = MultiBlockMasker(grid_size=8)(2, generator=torch.Generator().manual_seed(0))
        >>> masks.context.shape[0], masks.targets[0].shape[:2]
        (2, torch.Size([2, 4]))
    """

    context: MaskIndices
    targets: tuple[MaskIndices, ...]
    grid_size: tuple[int, int]
    level_grids: tuple[tuple[int, int], ...]
    context_box: torch.Tensor
    target_boxes: tuple[torch.Tensor, ...]

    @property
    def num_levels(self) -> int:
        """Number of hierarchy levels ``L``."""
        return len(self.targets)

    def target_union(self, level: int = 0) -> MaskIndices:
        """Union of the target blocks of ``level``, per sample.

        Returns:
            ``MaskIndices`` of shape ``(B, K)`` with ids on the level-``level`` grid.
        """
        level = check_int("level", level, min_value=0, max_value=self.num_levels - 1)
        gh, gw = self.level_grids[level]
        dense = self.targets[level].to_bool_mask(gh * gw).any(dim=1)  # (B, gh * gw)
        return mask_to_indices(dense)

    def _map(self, fn) -> MultiBlockMasks:
        """Apply ``fn`` to every index, validity and box tensor."""
        return MultiBlockMasks(
            context=MaskIndices(fn(self.context.indices), fn(self.context.valid)),
            targets=tuple(MaskIndices(fn(t.indices), fn(t.valid)) for t in self.targets),
            grid_size=self.grid_size,
            level_grids=self.level_grids,
            context_box=fn(self.context_box),
            target_boxes=tuple(fn(b) for b in self.target_boxes),
        )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> MultiBlockMasks:
        """Move every tensor to ``device``."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> MultiBlockMasks:
        """Pin every tensor (called by ``DataLoader(pin_memory=True)``)."""
        return self._map(lambda t: t.pin_memory())

    def rows(self, start: int, stop: int) -> MultiBlockMasks:
        """The masks of samples ``start .. stop - 1`` (views; padding columns are kept).

        Used to hand each rank its share of masks drawn once for a global batch, so that
        a run on ``W`` processes sees exactly the masks of a single-process run.

        Args:
            start: First sample, ``0 <= start < stop``.
            stop: One past the last sample, ``<= B``.

        Returns:
            ``MultiBlockMasks`` with batch size ``stop - start``.
        """
        batch = self.context.shape[0]
        start = check_int("start", start, min_value=0, max_value=max(batch - 1, 0))
        stop = check_int("stop", stop, min_value=start + 1, max_value=batch)
        return self._map(lambda t: t[start:stop])


# ----------------------------------------------------------------------------- size rule


def block_shape(
    scale: torch.Tensor, aspect_ratio: torch.Tensor, grid_size: int | tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block height and width from scale and aspect ratio (the rule in the module docstring).

    Args:
        scale: Float tensor of shape ``(...)``: fraction of the grid, in ``(0, 1]``. Cast to
            float64 first (the sampler draws in float64).
        aspect_ratio: Float tensor of shape ``(...)``: height / width, ``> 0``.
        grid_size: The grid ``(gh, gw)`` the block lives on.

    Returns:
        ``(h, w)``: long tensors of shape ``(...)``, ``1 <= h <= gh``, ``1 <= w <= gw``.

    Checking the ranges of ``scale`` and ``aspect_ratio`` is a value check.
    """
    gh, gw = check_grid("grid_size", grid_size)
    s = _real_tensor("scale", scale, None)
    a = _real_tensor("aspect_ratio", aspect_ratio, s.device)
    if value_checks_enabled():
        bad_s = bool(((s <= 0) | (s > 1) | s.isnan()).any())
        bad_a = bool(((a <= 0) | ~a.isfinite()).any())
        if bad_s:
            raise ValueError(f"scale must lie in (0, 1], got values in [{s.min()}, {s.max()}]")
        if bad_a:
            raise ValueError(f"aspect_ratio must be finite and > 0, got values in [{a.min()}, {a.max()}]")
    return _block_shape(s, a, float(gh * gw), gh, gw)


def _real_tensor(name: str, value: object, device: torch.device | None) -> torch.Tensor:
    """``value`` (a real number or a real tensor) as a float64 tensor."""
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"{name} must be a real tensor or number, got dtype {value.dtype}")
    elif isinstance(value, bool) or not (isinstance(value, (int, float)) or hasattr(value, "__array__")):
        raise TypeError(f"{name} must be a real tensor or number, got {type(value).__name__}")
    return torch.as_tensor(value, dtype=torch.float64, device=device)


def _block_shape(
    s: torch.Tensor,
    a: torch.Tensor,
    n_tokens: float | torch.Tensor,
    gh: int | torch.Tensor,
    gw: int | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    keep = n_tokens * s
    h = torch.floor(torch.sqrt(keep * a) + 0.5).long()
    w = torch.floor(torch.sqrt(keep / a) + 0.5).long()
    if isinstance(gh, int):
        return h.clamp(1, gh), w.clamp(1, gw)
    one = torch.ones_like(h)
    return torch.minimum(torch.maximum(h, one), gh), torch.minimum(torch.maximum(w, one), gw)


# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class _Config:
    grid_size: tuple[int, int]
    level_grids: tuple[tuple[int, int], ...]
    specs: tuple[TargetSpec, ...]
    context_scale: tuple[float, float]
    context_aspect_ratio: tuple[float, float]
    min_target_tokens: int
    min_context_tokens: int
    truncate: bool
    max_resample_rounds: int
    # Per block slot (slot 0: context, then the blocks of level 0, 1, ...): float64 rows
    # (scale_low, scale_span, aspect_low, aspect_span, tokens, gh, gw), built on CPU.
    slots: torch.Tensor = field(repr=False, compare=False)

    def describe(self) -> str:
        levels = ", ".join(
            f"level {lvl} grid {g}: {s.num_blocks} x scale {s.scale} aspect {s.aspect_ratio}"
            for lvl, (g, s) in enumerate(zip(self.level_grids, self.specs, strict=True))
        )
        return (
            f"grid {self.grid_size}, targets [{levels}], context scale {self.context_scale} "
            f"aspect {self.context_aspect_ratio}, min_context_tokens={self.min_context_tokens}"
        )


_DEFAULT_TARGET = TargetSpec()


def _build_config(
    *,
    grid_size: int | tuple[int, int],
    num_targets: int,
    target_scale: tuple[float, float],
    target_aspect_ratio: tuple[float, float],
    context_scale: tuple[float, float],
    context_aspect_ratio: tuple[float, float],
    min_target_tokens: int,
    min_context_tokens: int,
    levels: int | Sequence[TargetSpec],
    truncate: bool,
    max_resample_rounds: int,
) -> _Config:
    grid = check_grid("grid_size", grid_size)
    h0, w0 = grid
    if h0 * w0 > _MAX_GRID_TOKENS:
        raise ValueError(
            f"grid_size must have at most {_MAX_GRID_TOKENS} = 2**20 tokens (H * W), got "
            f"{grid} = {h0 * w0} tokens"
        )
    num_targets = check_int("num_targets", num_targets, min_value=1)
    if num_targets > h0 * w0:
        raise ValueError(
            f"num_targets must be <= the {h0 * w0} cells of grid_size {grid}, got {num_targets}"
        )
    target_scale = check_pair(
        "target_scale", target_scale, min_value=0.0, min_inclusive=False, max_value=1.0
    )
    target_aspect_ratio = check_pair(
        "target_aspect_ratio", target_aspect_ratio, min_value=0.0, min_inclusive=False
    )
    context_scale = check_pair(
        "context_scale", context_scale, min_value=0.0, min_inclusive=False, max_value=1.0
    )
    context_aspect_ratio = check_pair(
        "context_aspect_ratio", context_aspect_ratio, min_value=0.0, min_inclusive=False
    )
    min_target_tokens = check_int("min_target_tokens", min_target_tokens, min_value=1)
    min_context_tokens = check_int("min_context_tokens", min_context_tokens, min_value=1)
    truncate = check_bool("truncate", truncate)
    # Bounded: each round costs ~0.1-10 ms, and a spec that fails 100 rounds needs fixing,
    # not more rounds (an unbounded retry is what hangs I-JEPA's collator).
    max_resample_rounds = check_int(
        "max_resample_rounds", max_resample_rounds, min_value=0, max_value=_MAX_RESAMPLE_ROUNDS
    )

    # -- target specs per level
    if isinstance(levels, int) and not isinstance(levels, bool):
        n_levels = check_int("levels", levels, min_value=1, max_value=16)
        specs = tuple(
            TargetSpec(
                num_blocks=max(1, num_targets // 2**lvl),
                scale=target_scale,
                aspect_ratio=target_aspect_ratio,
            )
            for lvl in range(n_levels)
        )
    elif isinstance(levels, Sequence) and not isinstance(levels, (str, bytes)):
        if len(levels) == 0 or not all(isinstance(s, TargetSpec) for s in levels):
            raise TypeError(
                f"levels must be an int >= 1 or a non-empty sequence of TargetSpec, got {levels!r}"
            )
        if (num_targets, target_scale, target_aspect_ratio) != (
            _DEFAULT_TARGET.num_blocks,
            _DEFAULT_TARGET.scale,
            _DEFAULT_TARGET.aspect_ratio,
        ):
            raise ValueError(
                "levels is a sequence of TargetSpec, which sets every level's targets: leave "
                "num_targets, target_scale and target_aspect_ratio at their defaults, got "
                f"num_targets={num_targets}, target_scale={target_scale}, "
                f"target_aspect_ratio={target_aspect_ratio}"
            )
        specs = tuple(levels)
        for lvl in range(1, len(specs)):
            if specs[lvl].scale[1] < specs[lvl - 1].scale[1]:
                raise ValueError(
                    f"levels: the scale upper bound must be non-decreasing with the level, got "
                    f"{specs[lvl - 1].scale[1]} at level {lvl - 1} and {specs[lvl].scale[1]} at level {lvl}"
                )
        first, last = specs[0].scale, specs[-1].scale
        limit = _MAX_LEVEL_SCALE_GROWTH * (1 + 1e-9)
        if last[0] > limit * first[0] or last[1] > limit * first[1]:
            raise ValueError(
                f"levels: the coarsest level's scale {last} exceeds 1.33x level 0's {first}; use a "
                "gentle progression, at most 1.33x; never the 2x/4x geometric growth (each level "
                "already lives on a 2x coarser grid, so a constant scale keeps the image fraction)"
            )
    else:
        raise TypeError(
            f"levels must be an int >= 1 or a non-empty sequence of TargetSpec, got {levels!r}"
        )
    level_grids = tuple(level_grid_size(grid, lvl) for lvl in range(len(specs)))

    check_feasible(
        grid=grid,
        level_grids=level_grids,
        specs=specs,
        context_scale=context_scale,
        context_aspect_ratio=context_aspect_ratio,
        min_target_tokens=min_target_tokens,
        min_context_tokens=min_context_tokens,
    )

    rows = [(*context_scale, *context_aspect_ratio, h0, w0)]
    for spec, (gh, gw) in zip(specs, level_grids, strict=True):
        rows += [(*spec.scale, *spec.aspect_ratio, gh, gw)] * spec.num_blocks
    slots = torch.tensor(
        [(s0, s1 - s0, a0, a1 - a0, gh * gw, gh, gw) for s0, s1, a0, a1, gh, gw in rows],
        dtype=torch.float64,
    )
    return _Config(
        grid_size=grid,
        level_grids=level_grids,
        specs=specs,
        context_scale=context_scale,
        context_aspect_ratio=context_aspect_ratio,
        min_target_tokens=min_target_tokens,
        min_context_tokens=min_context_tokens,
        truncate=truncate,
        max_resample_rounds=max_resample_rounds,
        slots=slots,
    )


# ----------------------------------------------------------------------------- sampling


def _draw_boxes(slots: torch.Tensor, n: int, generator: torch.Generator | None) -> torch.Tensor:
    """Boxes ``(n, S, 4)`` as (top, left, h, w) for every slot: context, then targets."""
    # One uniform draw per sample, slot and quantity: (scale, aspect, top, left).
    u = torch.rand(
        n, slots.shape[0], 4, generator=generator, device=slots.device, dtype=torch.float64
    )
    s = slots[:, 0] + slots[:, 1] * u[..., 0]
    a = slots[:, 2] + slots[:, 3] * u[..., 1]
    gh, gw = slots[:, 5].long(), slots[:, 6].long()
    h, w = _block_shape(s, a, slots[:, 4], gh, gw)
    # floor(u * (number of placements)) is uniform over {0, ..., g - size}; the clamp only
    # guards against u * n rounding up to n.
    top = torch.minimum(torch.floor(u[..., 2] * (gh - h + 1)).long(), gh - h)
    left = torch.minimum(torch.floor(u[..., 3] * (gw - w + 1)).long(), gw - w)
    return torch.stack((top, left, h, w), dim=-1)


def _row_col_masks(boxes: torch.Tensor, gh: int, gw: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``(..., gh)`` and columns ``(..., gw)`` that boxes ``(..., 4)`` span (bool)."""
    top, left, h, w = boxes.unbind(-1)
    rows = torch.arange(gh, device=boxes.device)
    cols = torch.arange(gw, device=boxes.device)
    in_rows = (rows >= top.unsqueeze(-1)) & (rows < (top + h).unsqueeze(-1))
    in_cols = (cols >= left.unsqueeze(-1)) & (cols < (left + w).unsqueeze(-1))
    return in_rows, in_cols


def _covered(boxes: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
    """Union of ``M`` boxes ``(n, M, 4)`` as a bool mask ``(n, gh * gw)``.

    Box ``m`` is the outer product of its row and column indicators, so the number of
    boxes covering each cell is ``rows^T @ cols`` summed over ``m``: one batched matmul
    instead of materialising ``(n, M, gh, gw)``.
    """
    in_rows, in_cols = _row_col_masks(boxes, gh, gw)
    dtype = torch.float32
    count = torch.bmm(in_rows.to(dtype).transpose(1, 2), in_cols.to(dtype))  # (n, gh, gw)
    return (count > 0).flatten(1)


def _context_mask(cfg: _Config, boxes: torch.Tensor) -> torch.Tensor:
    """Context ``(n, H * W)``: context block minus the footprint of all target blocks."""
    h0, w0 = cfg.grid_size
    m0 = cfg.specs[0].num_blocks
    union = _covered(boxes[:, 1 : 1 + m0], h0, w0)
    start = 1 + m0
    for lvl in range(1, len(cfg.specs)):
        gh, gw = cfg.level_grids[lvl]
        m = cfg.specs[lvl].num_blocks
        cells = _covered(boxes[:, start : start + m], gh, gw)
        union = union | level_footprint(cells, cfg.grid_size, level=lvl)
        start += m
    in_rows, in_cols = _row_col_masks(boxes[:, 0], h0, w0)
    block = (in_rows.unsqueeze(-1) & in_cols.unsqueeze(-2)).flatten(1)
    return block & ~union


def _box_indices(boxes: torch.Tensor, gh: int, gw: int) -> MaskIndices:
    """Ascending ids of full rectangles ``(..., 4)`` on a ``gh x gw`` grid: ``(..., K)``.

    Slot ``j`` of a ``h x w`` box holds the cell ``(top + j // w, left + j % w)``, which is
    row-major, hence ascending; slots ``j >= h * w`` are padding. The offsets
    ``(j // w) * gw + j % w`` come from a small ``(gw + 1, K)`` table indexed by ``w``.
    """
    top, left, h, w = boxes.unbind(-1)
    area = h * w
    k = int(area.max()) if area.numel() else 0
    j = torch.arange(k, device=boxes.device)
    widths = torch.arange(1, gw + 1, device=boxes.device).unsqueeze(-1)  # (gw, 1)
    rows = torch.div(j, widths, rounding_mode="floor")  # (gw, K)
    table = torch.cat((torch.zeros_like(j).unsqueeze(0), rows * gw + (j - rows * widths)))
    ids = table[w] + (top * gw + left).unsqueeze(-1)  # (..., K)
    valid = j < area.unsqueeze(-1)
    return MaskIndices(ids.masked_fill_(~valid, 0), valid)


def _truncate(m: MaskIndices, generator: torch.Generator | None) -> MaskIndices:
    """Cut every list to the smallest count, keeping a uniform random subset in order."""
    k = int(m.counts.min())
    if k == m.shape[-1]:
        return m
    # Random keys, padding last: the k smallest keys pick a uniform k-subset of the real
    # tokens; sorting the kept slots keeps the ids ascending.
    keys = torch.rand(m.shape, generator=generator, device=m.indices.device)
    keys = keys.masked_fill(~m.valid, 2.0)
    slots = torch.topk(keys, k, dim=-1, largest=False).indices.sort(dim=-1).values
    return MaskIndices(m.indices.gather(-1, slots), torch.ones_like(slots, dtype=torch.bool))


def _sample(
    cfg: _Config,
    batch_size: int,
    generator: torch.Generator | None,
    device: torch.device | str | None,
) -> MultiBlockMasks:
    batch_size = check_int("batch_size", batch_size, min_value=1)
    generator, sample_device, device = check_sampling(generator, device)
    slots = cfg.slots.to(sample_device)

    boxes = _draw_boxes(slots, batch_size, generator)
    context = _context_mask(cfg, boxes)
    bad = context.sum(-1) < cfg.min_context_tokens
    # Rejection: re-draw whole samples (all blocks) whose context is too small, only those,
    # for at most max_resample_rounds rounds. One host sync per round.
    for _ in range(cfg.max_resample_rounds):
        redo = bad.nonzero().squeeze(1)
        if redo.numel() == 0:
            break
        new_boxes = _draw_boxes(slots, redo.numel(), generator)
        new_context = _context_mask(cfg, new_boxes)
        boxes[redo] = new_boxes
        context[redo] = new_context
        bad[redo] = new_context.sum(-1) < cfg.min_context_tokens
    n_bad = int(bad.sum())
    if n_bad:
        raise RuntimeError(
            f"{n_bad} of {batch_size} samples still had fewer than min_context_tokens="
            f"{cfg.min_context_tokens} context tokens after max_resample_rounds="
            f"{cfg.max_resample_rounds} re-draws ({cfg.describe()}); lower min_context_tokens, "
            "use fewer or smaller targets, raise context_scale or max_resample_rounds"
        )

    ctx = mask_to_indices(context)
    targets = []
    target_boxes = []
    start = 1
    for spec, (gh, gw) in zip(cfg.specs, cfg.level_grids, strict=True):
        level_boxes = boxes[:, start : start + spec.num_blocks]
        target_boxes.append(level_boxes)
        targets.append(_box_indices(level_boxes, gh, gw))
        start += spec.num_blocks
    if cfg.truncate:
        ctx = _truncate(ctx, generator)
        targets = [_truncate(t, generator) for t in targets]

    masks = MultiBlockMasks(
        context=ctx,
        targets=tuple(targets),
        grid_size=cfg.grid_size,
        level_grids=cfg.level_grids,
        context_box=boxes[:, 0],
        target_boxes=tuple(target_boxes),
    )
    if device is not None and device != sample_device:
        masks = masks.to(device)
    return masks


def sample_multiblock_masks(
    batch_size: int,
    *,
    grid_size: int | tuple[int, int],
    num_targets: int = 4,
    target_scale: tuple[float, float] = (0.15, 0.2),
    target_aspect_ratio: tuple[float, float] = (0.75, 1.5),
    context_scale: tuple[float, float] = (0.85, 1.0),
    context_aspect_ratio: tuple[float, float] = (1.0, 1.0),
    min_target_tokens: int = 1,
    min_context_tokens: int = 10,
    levels: int | Sequence[TargetSpec] = 1,
    truncate: bool = False,
    max_resample_rounds: int = 20,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> MultiBlockMasks:
    """Sample multi-block masks for a batch (functional form of ``MultiBlockMasker``).

    Validates the spec on every call; build a ``MultiBlockMasker`` once to sample many
    batches. See ``MultiBlockMasker`` for the arguments.

    Returns:
        ``MultiBlockMasks``: context ``(B, Kc)`` and per level targets ``(B, M_l, K_l)``.
    """
    # Every argument but the three of the call is a MultiBlockMasker argument.
    spec = {k: v for k, v in locals().items() if k not in ("batch_size", "generator", "device")}
    return MultiBlockMasker(**spec)(batch_size, generator=generator, device=device)


class MultiBlockMasker:
    """I-JEPA multi-block masker (see the module docstring for the exact sampling rule).

    Args:
        grid_size: Patch grid ``(H, W)``, or ``n`` for ``(n, n)``; at most ``2**20`` tokens.
        num_targets: Target blocks per sample at level 0. With ``levels=L`` (an int),
            level ``l`` has ``max(1, num_targets // 2**l)`` blocks.
        target_scale: ``(low, high)`` fraction of the level grid per target block.
        target_aspect_ratio: ``(low, high)`` target height / width.
        context_scale: ``(low, high)`` fraction of the grid covered by the context block
            before the targets are removed.
        context_aspect_ratio: ``(low, high)`` context block height / width.
        min_target_tokens: Smallest allowed target block, in tokens of its level grid. The
            constructor raises ``ValueError`` if the size rule can produce a smaller block.
        min_context_tokens: Smallest allowed context. Samples below it are re-drawn (whole
            samples, only those); the constructor raises ``ValueError`` if it can never be met.
        levels: ``L`` (int): ``L`` levels sharing ``target_scale`` and
            ``target_aspect_ratio`` (constant image fraction), ``max(1, num_targets // 2**l)``
            blocks at level ``l``. Or an explicit sequence of ``TargetSpec``, one per level
            (then leave the three ``target``/``num_targets`` arguments at their defaults);
            scale upper bounds must not decrease and the coarsest level's scale bounds must be
            at most 1.33x level 0's.
        truncate: ``False`` (default): index lists are padded to the batch maximum with a
            validity mask. ``True``: as I-JEPA, every context list is cut to the smallest
            context count of the batch and, per level, every target list to the smallest
            target block of the batch; the tokens dropped are a uniformly random subset of
            each list (ascending order kept), not the bottom-right ones. ``valid`` is then
            all ``True`` and cut target blocks are no longer full rectangles.
        max_resample_rounds: Re-draw rounds (at most 100) for samples below ``min_context_tokens`` before
            a ``RuntimeError`` naming the spec is raised.

    Call ``masker(batch_size, *, generator=None, device=None)``. Sampling runs on the
    generator's device (CPU when ``generator`` is ``None``, using the global torch RNG);
    ``device`` moves the result. Same generator state, same masks.

    Returns:
        (MultiBlockMasks): ``context`` of shape ``(B, Kc)`` (level-0 ids), ``targets[l]`` of
        shape ``(B, M_l, K_l)`` (level-``l`` ids), plus the sampled boxes.

    Example:
        >>> masker = MultiBlockMasker(grid_size=14)
        >>> masks = masker(8, generator=torch.Generator().manual_seed(0))
        >>> masks.targets[0].shape[:2], masks.context.shape[0]
        (torch.Size([8, 4]), 8)
    """

    def __init__(
        self,
        *,
        grid_size: int | tuple[int, int],
        num_targets: int = 4,
        target_scale: tuple[float, float] = (0.15, 0.2),
        target_aspect_ratio: tuple[float, float] = (0.75, 1.5),
        context_scale: tuple[float, float] = (0.85, 1.0),
        context_aspect_ratio: tuple[float, float] = (1.0, 1.0),
        min_target_tokens: int = 1,
        min_context_tokens: int = 10,
        levels: int | Sequence[TargetSpec] = 1,
        truncate: bool = False,
        max_resample_rounds: int = 20,
    ) -> None:
        self._cfg = _build_config(
            grid_size=grid_size,
            num_targets=num_targets,
            target_scale=target_scale,
            target_aspect_ratio=target_aspect_ratio,
            context_scale=context_scale,
            context_aspect_ratio=context_aspect_ratio,
            min_target_tokens=min_target_tokens,
            min_context_tokens=min_context_tokens,
            levels=levels,
            truncate=truncate,
            max_resample_rounds=max_resample_rounds,
        )

    @property
    def grid_size(self) -> tuple[int, int]:
        """The level-0 grid ``(H, W)``."""
        return self._cfg.grid_size

    @property
    def level_grids(self) -> tuple[tuple[int, int], ...]:
        """Grid ``(h_l, w_l)`` of each level."""
        return self._cfg.level_grids

    @property
    def target_specs(self) -> tuple[TargetSpec, ...]:
        """The resolved ``TargetSpec`` of each level."""
        return self._cfg.specs

    def __call__(
        self,
        batch_size: int,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> MultiBlockMasks:
        """Sample masks for ``batch_size`` samples (see the class docstring)."""
        return _sample(self._cfg, batch_size, generator, device)

    def __repr__(self) -> str:
        c = self._cfg
        return (
            f"MultiBlockMasker(grid_size={c.grid_size}, levels={list(c.specs)}, "
            f"context_scale={c.context_scale}, context_aspect_ratio={c.context_aspect_ratio}, "
            f"min_target_tokens={c.min_target_tokens}, min_context_tokens={c.min_context_tokens}, "
            f"truncate={c.truncate}, max_resample_rounds={c.max_resample_rounds})"
        )
