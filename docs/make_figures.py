"""Generate every picture of the documentation into docs/assets/ (PNG files).

Command (from the repository root):

    python docs/make_figures.py

The PNGs are committed, so ``mkdocs build`` needs no generation step; rerun this script
after changing a block whose picture is shown. Every picture is drawn from the library's
own blocks (``MultiBlockMasker``, ``momentum_schedule``, ``RoPE2D``), with a fixed seed,
except the two pieces that show *other* code's behaviour, which this script simulates
from the facts in the docs: I-JEPA's official mask collator (exclusive upper bound on
positions, one block size per batch, index lists cut to the batch minimum in row-major
order) and V-JEPA 2's RoPE tiling (``repeat`` instead of ``repeat_interleave``).
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from jepa_blocks import MultiBlockMasker, RoPE2D  # noqa: E402
from jepa_blocks.grid import level_footprint  # noqa: E402
from jepa_blocks.positional import rope_2d_angles  # noqa: E402
from jepa_blocks.targets import momentum_schedule  # noqa: E402

ASSETS = Path(__file__).resolve().parent / "assets"
DPI = 100
TARGET_COLOURS = ["#d62728", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2"]
LEVEL_COLOURS = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd"]
CONTEXT = "#9ecae1"
UNUSED = "#f2f2f2"


def _save(fig: plt.Figure, name: str) -> Path:
    ASSETS.mkdir(parents=True, exist_ok=True)
    path = ASSETS / name
    fig.savefig(path, dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    print(f"wrote {path.relative_to(ASSETS.parent.parent)} ({path.stat().st_size / 1024:.0f} KB)")
    return path


def _grid_axes(ax: plt.Axes, h: int, w: int) -> None:
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    for r in range(h + 1):
        ax.axhline(r, color="white", lw=0.6)
    for c in range(w + 1):
        ax.axvline(c, color="white", lw=0.6)


def _draw_sample(ax: plt.Axes, masks, i: int) -> None:
    """Context patches filled, each level-0 target block outlined in its own colour."""
    h, w = masks.grid_size
    dense = masks.context.to_bool_mask(h * w)[i].reshape(h, w).numpy()
    ax.imshow(dense, cmap=ListedColormap([UNUSED, CONTEXT]), vmin=0, vmax=1,
              extent=(0, w, h, 0), interpolation="nearest")
    for m, (top, left, bh, bw) in enumerate(masks.target_boxes[0][i].tolist()):
        colour = TARGET_COLOURS[m % len(TARGET_COLOURS)]
        ax.add_patch(Rectangle((left, top), bw, bh, facecolor=colour, alpha=0.35, edgecolor=colour, lw=2))
    _grid_axes(ax, h, w)


# ----------------------------------------------------------------------------- masks


def masks_figure(grid: int, name: str, samples: int = 4, seed: int = 0) -> Path:
    masker = MultiBlockMasker(grid_size=grid)
    masks = masker(samples, generator=torch.Generator().manual_seed(seed))
    fig, axes = plt.subplots(1, samples, figsize=(2.3 * samples, 2.6))
    for i, ax in enumerate(axes):
        _draw_sample(ax, masks, i)
        n_ctx = int(masks.context.counts[i])
        n_tgt = masks.target_boxes[0][i][:, 2:].prod(-1).tolist()
        ax.set_title(f"context {n_ctx}\ntargets {n_tgt}", fontsize=8)
    fig.suptitle(f"MultiBlockMasker(grid_size={grid}): context (blue) and 4 target blocks", fontsize=10)
    return _save(fig, name)


def hierarchy_figure(grid: int = 14, levels: int = 3, seed: int = 3) -> Path:
    masker = MultiBlockMasker(grid_size=grid, levels=levels)
    masks = masker(1, generator=torch.Generator().manual_seed(seed))
    fig, axes = plt.subplots(1, levels + 1, figsize=(2.5 * (levels + 1), 2.9))
    for lvl in range(levels):
        ax = axes[lvl]
        gh, gw = masks.level_grids[lvl]
        ax.imshow(np.zeros((gh, gw)), cmap=ListedColormap([UNUSED]), extent=(0, gw, gh, 0))
        colour = LEVEL_COLOURS[lvl]
        for top, left, bh, bw in masks.target_boxes[lvl][0].tolist():
            ax.add_patch(Rectangle((left, top), bw, bh, facecolor=colour, alpha=0.35, edgecolor=colour, lw=2))
        _grid_axes(ax, gh, gw)
        ax.set_title(f"level {lvl}: {gh}x{gw} grid\n{masker.target_specs[lvl].num_blocks} target block(s)",
                     fontsize=8)
    # Every level's target footprint on the level-0 grid, with the context left over.
    ax = axes[levels]
    h, w = masks.grid_size
    dense = masks.context.to_bool_mask(h * w)[0].reshape(h, w).numpy()
    ax.imshow(dense, cmap=ListedColormap([UNUSED, CONTEXT]), vmin=0, vmax=1,
              extent=(0, w, h, 0), interpolation="nearest")
    for lvl in range(levels):
        gh, gw = masks.level_grids[lvl]
        for m in range(masks.targets[lvl].shape[1]):
            cells = masks.targets[lvl].to_bool_mask(gh * gw)[0, m]
            foot = level_footprint(cells, (h, w), level=lvl).reshape(h, w).numpy()
            rows, cols = np.nonzero(foot)
            top, left = rows.min(), cols.min()
            ax.add_patch(Rectangle((left, top), cols.max() - left + 1, rows.max() - top + 1,
                                   fill=False, edgecolor=LEVEL_COLOURS[lvl], lw=2))
    _grid_axes(ax, h, w)
    ax.set_title("footprints on the level-0 grid\ncontext (blue) avoids all of them", fontsize=8)
    fig.suptitle(f"MultiBlockMasker(grid_size={grid}, levels={levels})", fontsize=10)
    return _save(fig, "masks_hierarchy.png")


# ----------------------------------------------------------------------------- I-JEPA simulation


def _official_block_size(gen, h: int, w: int, scale, aspect) -> tuple[int, int]:
    # One uniform draw for both scale and aspect; keep floored; shrunk below the grid size.
    r = float(torch.rand(1, generator=gen))
    s = scale[0] + r * (scale[1] - scale[0])
    a = aspect[0] + r * (aspect[1] - aspect[0])
    keep = int(h * w * s)
    bh, bw = round(math.sqrt(keep * a)), round(math.sqrt(keep / a))
    while bh >= h:
        bh -= 1
    while bw >= w:
        bw -= 1
    return bh, bw


def _official_block(gen, h: int, w: int, size, forbidden: np.ndarray | None, min_keep: int) -> np.ndarray:
    bh, bw = size
    for _ in range(1000):  # the official loop is unbounded; bounded here
        # Exclusive upper bound: top in {0, ..., h - bh - 1}, the last row never used.
        top = int(torch.randint(0, h - bh, (1,), generator=gen))
        left = int(torch.randint(0, w - bw, (1,), generator=gen))
        mask = np.zeros((h, w), dtype=bool)
        mask[top : top + bh, left : left + bw] = True
        if forbidden is not None:
            mask &= ~forbidden
        if mask.sum() > min_keep:
            return mask
    raise RuntimeError("no valid block (the official collator would hang here)")


def official_collator_batch(batch: int, grid: int, gen: torch.Generator):
    """Simulated I-JEPA collator: returns (context ids, [target ids per block]) per sample."""
    h = w = grid
    t_size = _official_block_size(gen, h, w, (0.15, 0.2), (0.75, 1.5))  # one size per batch
    c_size = _official_block_size(gen, h, w, (0.85, 1.0), (1.0, 1.0))
    contexts, targets, sampled = [], [], []
    for _ in range(batch):
        blocks = [_official_block(gen, h, w, t_size, None, 4) for _ in range(4)]
        union = np.logical_or.reduce(blocks)
        ctx = _official_block(gen, h, w, c_size, union, 10)
        sampled.append(ctx.sum())
        contexts.append(np.flatnonzero(ctx))  # row-major, ascending
        targets.append([np.flatnonzero(b) for b in blocks])
    # Every list cut to the batch minimum: keeps the first (top-left) ids in row-major order.
    k_ctx = min(len(c) for c in contexts)
    k_tgt = min(len(t) for ts in targets for t in ts)
    contexts = [c[:k_ctx] for c in contexts]
    targets = [[t[:k_tgt] for t in ts] for ts in targets]
    return contexts, targets, float(np.mean(sampled))


def ijepa_comparison_figure(grid: int = 14, batch: int = 128, batches: int = 16, seed: int = 0) -> Path:
    n = grid * grid
    gen = torch.Generator().manual_seed(seed)
    off_ctx, off_tgt = np.zeros(n), np.zeros(n)
    off_sampled, off_returned, example_off = [], [], None
    for _ in range(batches):
        contexts, targets, sampled = official_collator_batch(batch, grid, gen)
        off_sampled.append(sampled)
        for c, ts in zip(contexts, targets, strict=True):
            off_ctx[c] += 1
            off_returned.append(len(c))
            union = np.zeros(n, dtype=bool)
            for t in ts:
                union[t] = True
            off_tgt += union
        if example_off is None:
            example_off = (contexts[0], targets[0])
    total = batch * batches

    masker = MultiBlockMasker(grid_size=grid)
    ours_ctx, ours_tgt, ours_counts = np.zeros(n), np.zeros(n), []
    g2 = torch.Generator().manual_seed(seed)
    example_ours = None
    for _ in range(batches):
        masks = masker(batch, generator=g2)
        ctx = masks.context.to_bool_mask(n).numpy()
        tgt = masks.target_union(0).to_bool_mask(n).numpy()
        ours_ctx += ctx.sum(0)
        ours_tgt += tgt.sum(0)
        ours_counts += masks.context.counts.tolist()
        if example_ours is None:
            example_ours = (ctx[0], masks.targets[0].to_bool_mask(n)[0].numpy())

    fig, axes = plt.subplots(2, 3, figsize=(9.6, 6.6))
    rows = [
        ("I-JEPA collator (simulated)", off_ctx / total, off_tgt / total,
         f"sampled {np.mean(off_sampled) / n:.0%}, returned {np.mean(off_returned) / n:.0%}"),
        ("jepa-blocks MultiBlockMasker", ours_ctx / total, ours_tgt / total,
         f"returned {np.mean(ours_counts) / n:.0%} (nothing cut)"),
    ]
    for r, (label, ctx_freq, tgt_freq, note) in enumerate(rows):
        ax = axes[r, 0]
        picture = np.zeros(n)
        if r == 0:
            c, ts = example_off
            picture[c] = 1
            for m, t in enumerate(ts):
                picture[t] = 2 + m
        else:
            c, ts = example_ours
            picture[c] = 1
            for m in range(ts.shape[0]):
                picture[ts[m]] = 2 + m
        cmap = ListedColormap([UNUSED, CONTEXT, *TARGET_COLOURS[:4]])
        ax.imshow(picture.reshape(grid, grid), cmap=cmap, vmin=0, vmax=5, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(label, fontsize=9)
        ax.set_title("one returned sample", fontsize=9)
        for col, (freq, what) in enumerate(((ctx_freq, f"P(patch in context)\n{note}"),
                                            (tgt_freq, "P(patch in a target block)"))):
            ax = axes[r, col + 1]
            im = ax.imshow(freq.reshape(grid, grid), cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(what, fontsize=9)
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(f"{grid}x{grid} grid, {total} samples: the bottom rows and right columns "
                 "are lost by the official collator", fontsize=10)
    fig.tight_layout()
    return _save(fig, "masks_ijepa_comparison.png")


# ----------------------------------------------------------------------------- EMA schedule


def momentum_figure(total_steps: int = 1000) -> Path:
    steps = np.arange(0, int(total_steps * 1.1))
    fig, ax = plt.subplots(figsize=(6.0, 3.2))
    for schedule, style in (("linear", "-"), ("cosine", "--")):
        m = [momentum_schedule(int(s), total_steps=total_steps, schedule=schedule) for s in steps]
        ax.plot(steps, m, style, label=f'schedule="{schedule}"')
    ax.axvline(total_steps, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("EMA momentum m")
    ax.set_title(f"momentum_schedule(step, total_steps={total_steps}), 0.996 -> 1.0", fontsize=10)
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, "ema_momentum.png")


# ----------------------------------------------------------------------------- RoPE


def _rotate_full(x: torch.Tensor, cos_full: torch.Tensor, sin_full: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs with per-channel cos/sin of width Dh (the V-JEPA 2 form)."""
    x0, x1 = x[..., 0::2], x[..., 1::2]
    partner = torch.stack((-x1, x0), dim=-1).flatten(-2)
    return x * cos_full + partner * sin_full


def rope_figure(head_dim: int = 32, offset: tuple[int, int] = (1, 2), shifts: int = 24) -> Path:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(head_dim, generator=g, dtype=torch.float64)
    k = torch.randn(head_dim, generator=g, dtype=torch.float64)
    base = torch.arange(shifts, dtype=torch.float64)
    pos_q = torch.stack((base, base), dim=-1)  # walk along the diagonal
    pos_k = pos_q + torch.tensor(offset, dtype=torch.float64)
    rope = RoPE2D(head_dim=head_dim)
    ours = []
    for pq, pk in zip(pos_q, pos_k, strict=True):
        qr, _ = rope(q.view(1, 1, 1, -1), q.view(1, 1, 1, -1), positions=pq.view(1, 2))
        kr, _ = rope(k.view(1, 1, 1, -1), k.view(1, 1, 1, -1), positions=pk.view(1, 2))
        ours.append(float((qr * kr).sum()))
    tiled = []
    for pq, pk in zip(pos_q, pos_k, strict=True):
        aq, ak = rope_2d_angles(pq.view(1, 2), head_dim)[0], rope_2d_angles(pk.view(1, 2), head_dim)[0]
        # The bug: sin/cos tiled with repeat (a0 a1 .. a0 a1 ..), not repeat_interleave (a0 a0 a1 a1 ..).
        qr = _rotate_full(q, aq.cos().repeat(2), aq.sin().repeat(2))
        kr = _rotate_full(k, ak.cos().repeat(2), ak.sin().repeat(2))
        tiled.append(float((qr * kr).sum()))
    fig, ax = plt.subplots(figsize=(6.0, 3.2))
    ax.plot(base.numpy(), ours, "o-", ms=3, label="RoPE2D (repeat_interleave pairs)")
    ax.plot(base.numpy(), tiled, "s--", ms=3, label="tiled with repeat (V-JEPA 2 bug)")
    ax.set_xlabel("absolute position (r, r) of the query; key at (r, r) + " + str(offset))
    ax.set_ylabel("attention score q . k")
    ax.set_title("Same relative offset, moving absolute position", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, "rope_relative.png")


def main() -> None:
    torch.manual_seed(0)
    paths = [
        masks_figure(8, "masks_8x8.png"),
        masks_figure(14, "masks_14x14.png"),
        hierarchy_figure(),
        ijepa_comparison_figure(),
        momentum_figure(),
        rope_figure(),
    ]
    too_big = [p.name for p in paths if p.stat().st_size > 200 * 1024]
    if too_big:
        raise SystemExit(f"figures over 200 KB: {too_big}")


if __name__ == "__main__":
    main()
