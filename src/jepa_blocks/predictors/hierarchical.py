"""Narrow I-JEPA-style predictor that predicts target features at several hierarchy levels.

Level convention: level ``l`` is the patch grid pooled by ``2**l x 2**l`` windows (ceil
mode), of size ``level_grid_size(grid_size, l) = (ceil(H / 2**l), ceil(W / 2**l))``, with
row-major cell ids. Context ids are always on the level-0 grid; the targets of level ``l``
are ids on the level-``l`` grid. Every token gets its position from
``jepa_blocks.grid.token_positions``: a coarse cell sits at the centre of its level-0
footprint, so context tokens and queries of all levels share one coordinate frame.

With ``num_levels=1`` this is the I-JEPA predictor: a linear map from the encoder width to
the predictor width, one learnable mask token, fixed 2D sin-cos positions, context tokens
followed by one query per target position, pre-norm ViT blocks, a final norm and a linear
head back to the encoder width, read only at the queries.

Two sequence layouts (constructor argument ``mode``); in both, each target block's
predictions depend on the context and on that block only, never on the other blocks.

``mode="per_block"`` (default, I-JEPA): one sequence per target block, so the context is
repeated (and recomputed) for every block::

    [ c_0 .. c_{Nc-1} | q_0 .. q_{K_l-1} , pad .. pad ]     length Nc + Q, Q = max_l K_l
      context tokens    the block's queries, padded to Q

All blocks of all levels run batched in one pass of ``B * sum_l M_l`` sequences, ordered
sample-major: sequence ``b * M_total + j`` holds block ``j`` of sample ``b`` where the
blocks of level 0 come first, then those of level 1, and so on. Attention is full inside a
sequence: the context tokens attend to the block's queries too.

``mode="shared_context"``: one sequence per sample, the context once, then every block of
level 0 (each padded to ``K_0``), of level 1 (padded to ``K_1``), and so on::

    [ c_0 .. c_{Nc-1} | block 0 of level 0 | .. | block M_0-1 of level 0 | block 0 of level 1 | .. ]

with restricted attention (``jepa_blocks.predictors._shared_context``): the context tokens
attend to the context only, so they are computed once whatever the queries, and the
queries of a block attend to the context and to their own block only. Per-token layers run
on ``B * (Nc + sum_l M_l K_l)`` tokens instead of ``B * sum_l M_l (Nc + Q)``; no score
matrix over all blocks is formed. It is not numerically the per-block mode: there the
context features also see the block's queries.

In both layouts padded context tokens and padded queries are hidden as attention keys, so
they never change a real query's output.

Inputs are validated at ``forward``; a ``context`` with NaN/Inf and ids outside their
level grid raise ``ValueError`` (value checks). A ``context`` of another floating dtype
than the weights is cast to it (unless autocast is on).

The patch grid is a forward argument (``grid_size=``), as for ``ViTEncoder`` (whose
``EncoderOutput.grid_size`` can be passed on), so one predictor serves global views and
small local crops alike; the constructor's ``grid_size`` is only the default. A small
grid may have fewer levels than the predictor: ``forward(..., num_levels=L)`` predicts
only the first ``L`` levels (mask tokens and heads ``0 .. L-1``). The fixed position
tables of a grid (sin-cos or RoPE cos/sin over the cells of every level) are built on
first use and cached on the module per ``(H, W)``, outside the ``state_dict``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from jepa_blocks._checks import (
    check_bool,
    check_choice,
    check_finite,
    check_float,
    check_grid,
    check_index_range,
    check_int,
    check_same_device,
    check_tensor,
    match_dtype,
)
from jepa_blocks.grid import level_grid_size, token_positions
from jepa_blocks.layers import (
    attention_mask_from_valid,
    init_transformer_weights,
    rescale_residual_branches,
    transformer_stack,
)
from jepa_blocks.masking.indices import MaskIndices
from jepa_blocks.positional.rope2d import RoPE2D
from jepa_blocks.positional.sincos import sincos_2d
from jepa_blocks.predictors._shared_context import block_key_mask, shared_context_block

__all__ = ["HierarchicalPredictor"]

# Grids whose position tables a predictor keeps at once (oldest dropped first). Training
# uses one or two (global and local crops); evaluation at other resolutions adds a few.
_MAX_CACHED_GRIDS = 8


def _max_levels(grid_size: tuple[int, int]) -> int:
    """Number of levels up to and including the first one whose grid is ``1 x 1``."""
    return 1 + math.ceil(math.log2(max(grid_size)))


def _level_positions(grid_size: tuple[int, int], num_levels: int) -> tuple[torch.Tensor, list[int]]:
    """Positions of every cell of every level, concatenated level after level.

    Returns:
        ``(positions, offsets)``: float tensor of shape ``(sum_l h_l * w_l, 2)`` holding
        ``(row, col)`` in level-0 units, and the row where each level's cells start (cell
        ``i`` of level ``l`` is row ``offsets[l] + i``).
    """
    chunks, offsets, start = [], [], 0
    for level in range(num_levels):
        lh, lw = level_grid_size(grid_size, level)
        chunks.append(token_positions(torch.arange(lh * lw), grid_size, level=level))
        offsets.append(start)
        start += lh * lw
    return torch.cat(chunks), offsets


class _GridTables(NamedTuple):
    """Everything a forward pass needs to know about one patch grid.

    ``offsets[l]``: first row of level ``l`` in the tables; ``level_cells[l]``: its number
    of cells. ``pos`` is the sin-cos table ``(cells, P)`` or ``None``; ``cos`` / ``sin``
    the RoPE tables ``(cells, Dh / 2)`` or ``None``. Float32 (cast at use), on ``device``.
    """

    offsets: list[int]
    level_cells: list[int]
    pos: torch.Tensor | None
    cos: torch.Tensor | None
    sin: torch.Tensor | None
    device: torch.device


def _as_mask_indices(name: str, value: object) -> MaskIndices:
    """Accept a ``MaskIndices`` or an integer tensor of ids (then every id is real)."""
    if isinstance(value, MaskIndices):
        return value
    if isinstance(value, torch.Tensor):
        check_tensor(name, value, kind="int", allow_empty=True)
        return MaskIndices(value, torch.ones_like(value, dtype=torch.bool))
    raise TypeError(
        f"{name} must be a MaskIndices or an integer tensor, got {type(value).__name__}"
    )


def _check_ids_in_range(name: str, ids: torch.Tensor, num_cells: int, grid: tuple[int, int], level: int) -> None:
    check_index_range(name, ids, num_cells, what=f"of the level-{level} grid {grid}")


def _pack_blocks(
    targets: Sequence[MaskIndices], offsets: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad every level's blocks to the longest list and stack them along the block axis.

    Args:
        targets: One ``MaskIndices`` of shape ``(B, M_l, K_l)`` per level.
        offsets: Start row of each level in the concatenated position table.

    Returns:
        ``(ids, valid, level)``: ``ids`` long ``(B, M_total, Q)`` rows of the position
        table (level offset added), ``valid`` bool ``(B, M_total, Q)``, ``level`` long
        ``(M_total,)`` the level of each block. ``Q = max_l K_l``; blocks of level 0 come
        first, padding slots point at the level's cell 0 and are not valid.
    """
    q = max(t.shape[-1] for t in targets)
    ids, valid, level = [], [], []
    for lvl, (t, off) in enumerate(zip(targets, offsets, strict=True)):
        pad = q - t.shape[-1]
        ids.append(F.pad(t.indices, (0, pad)) + off)
        valid.append(F.pad(t.valid, (0, pad), value=False))
        level.append(torch.full((t.shape[1],), lvl, dtype=torch.long, device=t.indices.device))
    return torch.cat(ids, dim=1), torch.cat(valid, dim=1), torch.cat(level)


class HierarchicalPredictor(nn.Module):
    """I-JEPA predictor over ``num_levels`` hierarchy levels (plain I-JEPA for one level).

    Each target block becomes its own sequence ``[context tokens ; block queries]``; a
    query is the learnable mask token of its level plus its position (sin-cos added, or
    RoPE inside every attention). Level ``l`` reads its queries through its own head
    ``Linear(predictor_dim, out_dim[l])``. See the module docstring for the level
    convention and the sequence layout.

    Args:
        grid_size: Default level-0 patch grid ``(H, W)`` (an int means square), used when
            ``forward`` gets no ``grid_size``; ``None`` makes ``grid_size`` a required
            forward argument.
        embed_dim: Width ``D`` of the context encoder's tokens.
        predictor_dim: Width ``P`` of the predictor (384 in I-JEPA's ViT-H predictor).
        depth: Number of transformer blocks.
        num_heads: Attention heads; must divide ``predictor_dim``.
        num_levels: Number of hierarchy levels ``L``, at most the number of levels until
            the default grid is ``1 x 1`` (``1 + ceil(log2(max(H, W)))``). A ``forward``
            call predicts all of them (or its own ``num_levels``, the first ones), and its
            grid must have that many levels.
        out_dim: Output width per level: an int for all levels, a sequence of ``L`` ints,
            or ``None`` for ``embed_dim`` everywhere.
        mlp_ratio: MLP hidden width as a multiple of ``predictor_dim``.
        qkv_bias: Bias in the qkv projections.
        drop_path_rate: Stochastic depth of the last block; it rises linearly from 0.
        layer_scale_init: Initial LayerScale value, or ``None`` for no LayerScale.
        pos_embed: ``"sincos"`` adds fixed 2D sin-cos embeddings (``predictor_dim``
            divisible by 4); ``"rope"`` rotates q and k by 2D RoPE in every block and adds
            no absolute embedding (head width divisible by 4).
        rope_theta: RoPE frequency base.
        fused_attn: Use ``scaled_dot_product_attention`` (``False``: explicit softmax).
        grad_checkpointing: Recompute each block in the backward pass while training.
        mode: Sequence layout. ``"per_block"`` (I-JEPA): one ``[context ; queries]``
            sequence per target block, so the context goes through the predictor once per
            block and also attends to that block's queries. ``"shared_context"``: one
            sequence per sample; the context attends to the context only and is computed
            once, each block's queries attend to the context and to their own block only.
            Both keep every block's predictions independent of the other blocks; the
            context features differ (in ``"shared_context"`` they do not see the
            queries), and drop path draws once per sample instead of once per block. Same
            parameters in both modes (a ``state_dict`` loads into either).

    Shapes:
        context: ``(B, Nc, D)``; context_indices: ``(B, Nc)`` ids on the level-0 grid;
        targets[l]: ``(B, M_l, K_l)`` or ``(B, K_l)`` ids on the level-``l`` grid;
        output[l]: ``(B, M_l, K_l, out_dim[l])`` or ``(B, K_l, out_dim[l])``.

    Example:
        >>> pred = HierarchicalPredictor(grid_size=8, embed_dim=64, predictor_dim=32,
        ...                              depth=2, num_heads=4, num_levels=2)
        >>> context = torch.randn(2, 40, 64)                 # 40 context tokens per image
        >>> context_ids = torch.arange(40).expand(2, 40)     # their ids on the 8 x 8 grid
        >>> ids0 = torch.tensor([[0, 1, 8, 9], [54, 55, 62, 63]]).expand(2, 2, 4)  # 2 blocks
        >>> ids1 = torch.tensor([[10, 11, 14, 15]]).expand(2, 1, 4)  # 1 block, 4 x 4 grid
        >>> out = pred(context, context_indices=context_ids, targets=[ids0, ids1])
        >>> [tuple(o.shape) for o in out]
        [(2, 2, 4, 64), (2, 1, 4, 64)]
        >>> # The same module on a small 4 x 4 local crop: pass its grid (and, if wanted,
        >>> # predict level 0 only).
        >>> local_targets = torch.tensor([[12, 13]]).expand(2, 1, 2)
        >>> local = pred(context[:, :9], context_indices=context_ids[:, :9], targets=local_targets,
        ...              grid_size=4, num_levels=1)
        >>> [tuple(o.shape) for o in local]
        [(2, 1, 2, 64)]
    """

    def __init__(
        self,
        *,
        grid_size: int | tuple[int, int] | None = None,
        embed_dim: int,
        predictor_dim: int = 384,
        depth: int = 6,
        num_heads: int = 12,
        num_levels: int = 1,
        out_dim: int | Sequence[int] | None = None,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        layer_scale_init: float | None = None,
        pos_embed: Literal["sincos", "rope"] = "sincos",
        rope_theta: float = 100.0,
        fused_attn: bool = True,
        grad_checkpointing: bool = False,
        mode: Literal["per_block", "shared_context"] = "per_block",
    ) -> None:
        super().__init__()
        self.grid_size = None if grid_size is None else check_grid("grid_size", grid_size)
        self.embed_dim = check_int("embed_dim", embed_dim, min_value=1)
        self.predictor_dim = check_int("predictor_dim", predictor_dim, min_value=1)
        depth = check_int("depth", depth, min_value=1)
        num_heads = check_int("num_heads", num_heads, min_value=1)
        if predictor_dim % num_heads:
            raise ValueError(
                f"num_heads must divide predictor_dim, got predictor_dim={predictor_dim}, "
                f"num_heads={num_heads}"
            )
        max_levels = None if self.grid_size is None else _max_levels(self.grid_size)
        self.num_levels = check_int("num_levels", num_levels, min_value=1, max_value=max_levels)
        self.out_dims = self._parse_out_dim(out_dim)
        mlp_ratio = check_float("mlp_ratio", mlp_ratio, min_value=0.0, min_inclusive=False)
        qkv_bias = check_bool("qkv_bias", qkv_bias)
        drop_path_rate = check_float(
            "drop_path_rate", drop_path_rate, min_value=0.0, max_value=1.0, max_inclusive=False
        )
        if layer_scale_init is not None:
            layer_scale_init = check_float(
                "layer_scale_init", layer_scale_init, min_value=0.0, min_inclusive=False
            )
        self.pos_embed = check_choice("pos_embed", pos_embed, ("sincos", "rope"))
        rope_theta = check_float("rope_theta", rope_theta, min_value=1.0, min_inclusive=False)
        fused_attn = check_bool("fused_attn", fused_attn)
        self.grad_checkpointing = check_bool("grad_checkpointing", grad_checkpointing)
        self.mode = check_choice("mode", mode, ("per_block", "shared_context"))
        head_dim = predictor_dim // num_heads
        if self.pos_embed == "sincos" and predictor_dim % 4:
            raise ValueError(
                f"predictor_dim must be divisible by 4 for pos_embed='sincos', got {predictor_dim}"
            )
        if self.pos_embed == "rope" and head_dim % 4:
            raise ValueError(
                "predictor_dim / num_heads (the head width) must be divisible by 4 for "
                f"pos_embed='rope', got {predictor_dim} / {num_heads} = {head_dim}"
            )

        self.predictor_embed = nn.Linear(embed_dim, predictor_dim)
        self.mask_tokens = nn.Parameter(torch.zeros(self.num_levels, predictor_dim))
        self.blocks = transformer_stack(
            predictor_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            drop_path_rate=drop_path_rate,
            layer_scale_init=layer_scale_init,
            fused_attn=fused_attn,
        )
        self.norm = nn.LayerNorm(predictor_dim, eps=1e-6)
        self.heads = nn.ModuleList(nn.Linear(predictor_dim, d) for d in self.out_dims)
        self.rope = RoPE2D(head_dim=head_dim, theta=rope_theta) if self.pos_embed == "rope" else None
        # Position tables per grid, (H, W) -> _GridTables: a plain dict, so not in the
        # state dict; entries are rebuilt for a new device and dropped by .to() / .half().
        self._grid_tables: dict[tuple[int, int], _GridTables] = {}
        if self.grid_size is not None:
            self._tables_for(self.grid_size, torch.device("cpu"))

        self.apply(init_transformer_weights)
        rescale_residual_branches(self.blocks)
        nn.init.trunc_normal_(self.mask_tokens, std=0.02)

    def _parse_out_dim(self, out_dim: int | Sequence[int] | None) -> list[int]:
        if out_dim is None:
            return [self.embed_dim] * self.num_levels
        if isinstance(out_dim, int) and not isinstance(out_dim, bool):
            return [check_int("out_dim", out_dim, min_value=1)] * self.num_levels
        if isinstance(out_dim, (str, bytes)) or not isinstance(out_dim, Sequence):
            raise TypeError(
                f"out_dim must be an int, a sequence of num_levels ints or None, got "
                f"{type(out_dim).__name__}"
            )
        if len(out_dim) != self.num_levels:
            raise ValueError(
                f"out_dim must have num_levels={self.num_levels} entries, got {len(out_dim)}"
            )
        return [check_int(f"out_dim[{i}]", d, min_value=1) for i, d in enumerate(out_dim)]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Turn per-block gradient checkpointing on or off (used only while training)."""
        self.grad_checkpointing = check_bool("enable", enable)

    def _tables_for(self, grid: tuple[int, int], device: torch.device) -> _GridTables:
        """The cached position tables of ``grid`` on ``device``, built on a miss."""
        tables = self._grid_tables.get(grid)
        if tables is not None and tables.device == device:
            return tables
        # Rows of the tables: level l's cell id i sits at row offsets[l] + i. A grid with
        # fewer levels than the predictor gets the levels it has.
        num_levels = min(self.num_levels, _max_levels(grid))
        positions, offsets = _level_positions(grid, num_levels)
        positions = positions.to(device)
        cells = [math.prod(level_grid_size(grid, lvl)) for lvl in range(num_levels)]
        pos = cos = sin = None
        if self.rope is None:
            pos = sincos_2d(positions, self.predictor_dim)  # (cells, P)
        else:
            cos, sin = (t[0] for t in self.rope.cos_sin(positions))  # (cells, Dh / 2) each
        tables = _GridTables(offsets, cells, pos, cos, sin, device)
        self._grid_tables.pop(grid, None)
        while len(self._grid_tables) >= _MAX_CACHED_GRIDS:
            self._grid_tables.pop(next(iter(self._grid_tables)))
        self._grid_tables[grid] = tables
        return tables

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> HierarchicalPredictor:
        # Every .to() / .cuda() / .double() / .half() passes here: drop the cached tables,
        # the next forward rebuilds those it needs on its device (float32, cast at use).
        self._grid_tables.clear()
        return super()._apply(fn, recurse)

    def _forward_grid(self, grid_size: object, num_levels: int) -> tuple[int, int]:
        """The grid of this call (argument or default), checked against ``num_levels``."""
        if grid_size is None:
            if self.grid_size is None:
                raise ValueError(
                    "grid_size must be passed to forward: this predictor was built without a "
                    "default grid_size"
                )
            return self.grid_size  # has self.num_levels >= num_levels levels (constructor)
        grid = check_grid("grid_size", grid_size)
        max_levels = _max_levels(grid)
        if num_levels > max_levels:
            raise ValueError(
                f"grid_size {grid} has only {max_levels} hierarchy levels (down to 1 x 1), "
                f"fewer than num_levels={num_levels} to predict (pass num_levels=<= {max_levels} "
                "to predict the first levels only)"
            )
        return grid

    def _check_targets(
        self,
        targets: object,
        batch: int,
        device: torch.device,
        grid: tuple[int, int],
        cells: list[int],
        num_levels: int,
    ) -> tuple[list[MaskIndices], list[bool]]:
        """Validate targets; return them as ``(B, M_l, K_l)`` plus which were ``(B, K_l)``."""
        if isinstance(targets, (MaskIndices, torch.Tensor)):
            if num_levels != 1:
                raise TypeError(
                    f"targets must be a sequence of num_levels={num_levels} MaskIndices, "
                    "got a single one"
                )
            targets = [targets]
        if isinstance(targets, (str, bytes)) or not isinstance(targets, Sequence):
            raise TypeError(
                f"targets must be a MaskIndices or a sequence of MaskIndices, got "
                f"{type(targets).__name__}"
            )
        if len(targets) != num_levels:
            raise ValueError(
                f"targets must hold one entry per level (num_levels={num_levels}), "
                f"got {len(targets)}"
            )
        out, squeeze = [], []
        for lvl, t in enumerate(targets):
            name = f"targets[{lvl}]"
            t = _as_mask_indices(name, t)
            if t.indices.ndim not in (2, 3):
                raise ValueError(
                    f"{name} must have shape (B, M, K) or (B, K), got {tuple(t.shape)}"
                )
            if t.shape[0] != batch:
                raise ValueError(
                    f"{name} batch size {t.shape[0]} does not match context batch size {batch}"
                )
            _check_ids_in_range(name, t.indices, cells[lvl], level_grid_size(grid, lvl), lvl)
            squeeze.append(t.indices.ndim == 2)
            if t.indices.ndim == 2:
                t = MaskIndices(t.indices.unsqueeze(1), t.valid.unsqueeze(1))
            out.append(t.to(device))
        return out, squeeze

    def forward(
        self,
        context: torch.Tensor,
        *,
        context_indices: MaskIndices | torch.Tensor,
        targets: MaskIndices | torch.Tensor | Sequence[MaskIndices | torch.Tensor],
        grid_size: int | tuple[int, int] | None = None,
        num_levels: int | None = None,
    ) -> list[torch.Tensor]:
        """Predict the target features of every block of every level.

        Args:
            context: Context-encoder tokens of shape ``(B, Nc, D)``.
            context_indices: ``MaskIndices`` or long tensor of shape ``(B, Nc)``: each
                context token's id on the level-0 grid. Padded tokens (``valid`` False)
                are ignored.
            targets: For ``num_levels == 1`` a ``MaskIndices`` (or long tensor), else a
                sequence of ``num_levels`` of them (this call's ``num_levels``); entry ``l`` has shape
                ``(B, M_l, K_l)`` (``M_l`` blocks) or ``(B, K_l)`` (one block) with ids on
                the level-``l`` grid. Long tensors count as all valid.
            grid_size: Level-0 patch grid ``(H, W)`` of this batch (e.g. the encoder's
                ``EncoderOutput.grid_size``); ``None`` uses the constructor's. It must have
                at least ``num_levels`` levels (``ValueError`` naming ``grid_size``).
            num_levels: Predict only the first ``num_levels`` levels, in
                ``[1, self.num_levels]`` (e.g. level 0 alone on small local crops);
                ``None`` predicts all of them.

        Returns:
            One tensor per level of shape ``(B, M_l, K_l, out_dim[l])`` (or
            ``(B, K_l, out_dim[l])`` for ``(B, K_l)`` targets). Padded target slots hold
            finite values; mask them with ``targets[l].valid``.
        """
        check_tensor("context", context, ndim=3, kind="float")
        check_same_device(("context", context), module=self)
        if num_levels is not None:
            num_levels = check_int("num_levels", num_levels, min_value=1, max_value=self.num_levels)
        num_levels = self.num_levels if num_levels is None else num_levels
        grid = self._forward_grid(grid_size, num_levels)
        b, nc, d = context.shape
        if d != self.embed_dim:
            raise ValueError(
                f"context must have width embed_dim={self.embed_dim}, got shape {tuple(context.shape)}"
            )
        ctx = _as_mask_indices("context_indices", context_indices)
        if tuple(ctx.shape) != (b, nc):
            raise ValueError(
                f"context_indices must have shape (B, Nc) = {(b, nc)} matching context, got "
                f"{tuple(ctx.shape)}"
            )
        tables = self._tables_for(grid, context.device)
        _check_ids_in_range("context_indices", ctx.indices, tables.level_cells[0], grid, 0)
        ctx = ctx.to(context.device)
        levels, squeeze = self._check_targets(
            targets, b, context.device, grid, tables.level_cells, num_levels
        )
        check_finite(("context", context))
        context = match_dtype(context, self.predictor_embed.weight.dtype)

        x = self.predictor_embed(context)  # (B, Nc, P)
        if self.mode == "per_block":
            feats = self._predict_per_block(x, ctx, levels, tables)
        elif self.mode == "shared_context":
            feats = self._predict_shared_context(x, ctx, levels, tables)
        else:  # the attribute was reassigned after construction
            check_choice("mode", self.mode, ("per_block", "shared_context"))
        outputs = []
        for lvl, f in enumerate(feats):
            pred = self.heads[lvl](f)  # (B, M_l, K_l, out_dim_l)
            outputs.append(pred.squeeze(1) if squeeze[lvl] else pred)
        return outputs

    def _apply_block(self, fn: Callable[..., torch.Tensor], *args: object, **kwargs: object) -> torch.Tensor:
        """``fn(*args, **kwargs)``, recomputed in the backward pass while checkpointing."""
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False, **kwargs)
        return fn(*args, **kwargs)

    def _predict_per_block(
        self, x: torch.Tensor, ctx: MaskIndices, levels: list[MaskIndices], tables: _GridTables
    ) -> list[torch.Tensor]:
        """I-JEPA layout: one ``[context ; queries]`` sequence per block (module docstring).

        Args:
            x: Embedded context ``(B, Nc, P)``; ctx: its ids ``(B, Nc)``; levels: targets
            ``(B, M_l, K_l)`` per level.

        Returns:
            Normed query features ``(B, M_l, K_l, P)`` per level.
        """
        b, nc, p = x.shape
        ids, valid, block_level = _pack_blocks(levels, tables.offsets[: len(levels)])  # (B, Mt, Q), (Mt,)
        mt, q = ids.shape[1], ids.shape[2]
        if mt * q == 0:  # nothing to predict
            out = x.new_zeros(b, mt, q, p)
        else:
            queries = self.mask_tokens[block_level].to(x.dtype)[None, :, None, :]  # (1, Mt, 1, P)
            queries = queries.expand(b, mt, q, p)
            if self.pos_embed == "sincos":
                table = tables.pos.to(x.dtype)
                x = x + table[ctx.indices]
                queries = queries + table[ids]
            # One sequence per (sample, block): the sample's context, then the block's queries.
            seq = torch.cat((x.unsqueeze(1).expand(b, mt, nc, p), queries), dim=2).flatten(0, 1)
            seq_valid = torch.cat((ctx.valid.unsqueeze(1).expand(b, mt, nc), valid), dim=2)
            attn_mask = attention_mask_from_valid(seq_valid.flatten(0, 1))  # (B*Mt, 1, 1, Nc+Q)
            rope = None
            if self.pos_embed == "rope":
                seq_ids = torch.cat((ctx.indices.unsqueeze(1).expand(b, mt, nc), ids), dim=2)
                seq_ids = seq_ids.flatten(0, 1)  # (B*Mt, Nc+Q) rows of the position tables
                rope = (tables.cos[seq_ids].unsqueeze(1), tables.sin[seq_ids].unsqueeze(1))
            for block in self.blocks:
                seq = self._apply_block(block, seq, rope=rope, attn_mask=attn_mask)
            out = self.norm(seq[:, nc:]).reshape(b, mt, q, p)  # queries only
        feats, start = [], 0
        for t in levels:
            m, k = t.shape[1], t.shape[2]
            feats.append(out[:, start : start + m, :k])
            start += m
        return feats

    def _predict_shared_context(
        self, x: torch.Tensor, ctx: MaskIndices, levels: list[MaskIndices], tables: _GridTables
    ) -> list[torch.Tensor]:
        """Shared-context layout: one sequence per sample (module docstring).

        Same arguments and return as :meth:`_predict_per_block`.
        """
        b, nc, p = x.shape
        groups = [(t.shape[1], t.shape[2]) for t in levels]  # (M_l, K_l) per level
        if sum(m * k for m, k in groups) == 0:  # nothing to predict
            return [x.new_zeros(b, m, k, p) for m, k in groups]
        ids = [t.indices + off for t, off in zip(levels, tables.offsets, strict=False)]  # table rows
        queries = [self.mask_tokens[lvl].to(x.dtype).expand(b, m, k, p) for lvl, (m, k) in enumerate(groups)]
        if self.pos_embed == "sincos":
            table = tables.pos.to(x.dtype)
            x = x + table[ctx.indices]
            queries = [qu + table[i] for qu, i in zip(queries, ids, strict=True)]
        # [context | level 0's blocks, M_0 x K_0 | level 1's blocks | ...], (B, N, P)
        seq = torch.cat([x, *(qu.flatten(1, 2) for qu in queries)], dim=1)
        rope = None
        if self.pos_embed == "rope":
            seq_ids = torch.cat([ctx.indices, *(i.flatten(1, 2) for i in ids)], dim=1)  # (B, N)
            rope = (tables.cos[seq_ids].unsqueeze(1), tables.sin[seq_ids].unsqueeze(1))
        context_mask = attention_mask_from_valid(ctx.valid)  # (B, 1, 1, Nc) or None
        key_masks = [block_key_mask(ctx.valid, t.valid) for t in levels]
        for i, block in enumerate(self.blocks):
            seq = self._apply_block(
                shared_context_block, block, seq, num_context=nc, groups=groups, rope=rope,
                context_mask=context_mask, key_masks=key_masks,
                # The last block skips the context rows: their outputs are never read.
                keep_context=i < len(self.blocks) - 1,
            )
        out = self.norm(seq)  # (B, N - Nc, P): queries only
        chunks = out.split([m * k for m, k in groups], dim=1)
        return [c.unflatten(1, (m, k)) for c, (m, k) in zip(chunks, groups, strict=True)]

    def extra_repr(self) -> str:
        return (
            f"grid_size={self.grid_size}, num_levels={self.num_levels}, "
            f"out_dims={self.out_dims}, pos_embed={self.pos_embed!r}, mode={self.mode!r}"
        )
