"""Draw a training run as PNG files: masks over images, curves, and a PCA of features.

Command (from the repository root):

    python examples/plot_run.py --run runs/cifar --data ../shared/data/cifar10-5k/train

Writes into RUN/plots/:
- ``masks.png``: multi-block masks sampled by the run's MultiBlockMasker over validation
  images (context patches visible, each level-0 target block in its own colour, coarser
  levels' blocks outlined, the rest dimmed);
- ``curves.png``: training loss (and per-level terms), learning rate, EMA momentum and
  validation kNN top-1 against training minutes, from RUN/metrics.jsonl;
- ``pca.png``: a 2D PCA of the target encoder's average-pooled validation features,
  coloured by class.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from data import (  # noqa: E402
    IMAGENET_MEAN,
    IMAGENET_STD,
    WithTransform,
    eval_transform,
    load_dataset,
    stratified_split,
)
from evaluate import build_encoder  # noqa: E402

from jepa_blocks import MultiBlockMasker  # noqa: E402
from jepa_blocks.evaluation import extract_features, pool_tokens  # noqa: E402
from jepa_blocks.grid import level_footprint  # noqa: E402
from jepa_blocks.training import load_checkpoint  # noqa: E402

COLOURS = torch.tensor([[0.90, 0.25, 0.20], [0.20, 0.55, 0.90], [0.95, 0.70, 0.10], [0.40, 0.80, 0.30],
                        [0.70, 0.35, 0.85], [0.10, 0.75, 0.75]])


def read_metrics(path: str) -> list[dict]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def plot_curves(records: list[dict], path: str) -> None:
    train = [r for r in records if "loss" in r]
    val = [r for r in records if r.get("val")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    t = [r["time_min"] for r in train]
    axes[0].plot(t, [r["loss"] for r in train], label="total")
    for key in sorted({k for r in train for k in r if k.startswith("level") or k == "reg"}):
        axes[0].plot(t, [r.get(key, float("nan")) for r in train], label=key, alpha=0.7)
    axes[0].set(xlabel="training minutes", ylabel="loss", yscale="log", title="loss")
    axes[0].legend()
    axes[1].plot(t, [r["lr"] for r in train], label="lr")
    ax2 = axes[1].twinx()
    ax2.plot(t, [r["momentum"] for r in train], color="tab:orange", label="EMA momentum")
    axes[1].set(xlabel="training minutes", ylabel="learning rate", title="schedules")
    ax2.set_ylabel("EMA momentum")
    if val:
        axes[2].plot([r["time_min"] for r in val], [100 * r["knn_top1"] for r in val], marker="o")
    axes[2].set(xlabel="training minutes", ylabel="kNN top-1 (%)", title="validation kNN (k=20)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_masks(images: torch.Tensor, masker: MultiBlockMasker, grid: tuple[int, int], patch: int, path: str) -> None:
    """Context patches at full brightness, level-0 targets tinted, coarse levels outlined."""
    b = images.shape[0]
    masks = masker(b, generator=torch.Generator().manual_seed(0))
    h, w = grid
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    pics = (images * std + mean).clamp(0, 1)
    fig, axes = plt.subplots(1, b, figsize=(2.2 * b, 2.5))
    for i, ax in enumerate(axes):
        ctx = masks.context.to_bool_mask(h * w)[i].reshape(h, w)
        shade = torch.where(ctx, 1.0, 0.3).repeat_interleave(patch, 0).repeat_interleave(patch, 1)
        pic = pics[i] * shade
        lvl0 = masks.targets[0]
        for m in range(lvl0.shape[1]):
            blk = lvl0.to_bool_mask(h * w)[i, m].reshape(h, w)
            blk = blk.repeat_interleave(patch, 0).repeat_interleave(patch, 1)
            colour = COLOURS[m % len(COLOURS)][:, None, None]
            pic = torch.where(blk, 0.45 * pics[i] + 0.55 * colour, pic)
        ax.imshow(pic.permute(1, 2, 0).numpy(), interpolation="nearest")
        for level in range(1, len(masks.targets)):
            lh, lw = masks.level_grids[level]
            dense = masks.targets[level].to_bool_mask(lh * lw)[i]
            for m in range(dense.shape[0]):
                fine = level_footprint(dense[m], grid, level=level).reshape(h, w).nonzero()
                if len(fine):
                    (r0, c0), (r1, c1) = fine.min(0).values, fine.max(0).values
                    ax.add_patch(plt.Rectangle((c0 * patch - 0.5, r0 * patch - 0.5), (c1 - c0 + 1) * patch,
                                               (r1 - r0 + 1) * patch, fill=False, lw=1.5, ls="--",
                                               ec=["white", "black", "cyan"][(level - 1) % 3]))
        ax.set_axis_off()
    fig.suptitle("context (bright), level-0 targets (colours), coarser-level targets (dashed)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_pca(features: torch.Tensor, labels: torch.Tensor, classes: list[str], path: str) -> None:
    x = features - features.mean(0)
    _, _, v = torch.pca_lowrank(x, q=2, center=False)
    xy = x @ v[:, :2]
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    cmap = plt.get_cmap("tab10")
    for c in labels.unique().tolist():
        sel = labels == c
        ax.scatter(xy[sel, 0], xy[sel, 1], s=6, color=cmap(c % 10), label=classes[c] if c < len(classes) else c)
    ax.set(title="PCA of target-encoder features (validation split)", xlabel="PC 1", ylabel="PC 2")
    ax.legend(markerscale=3, fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> list[str]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run directory written by train_hjepa.py")
    p.add_argument("--data", default=None, help="the run's image folder (default: the run's config)")
    p.add_argument("--num-images", type=int, default=6)
    p.add_argument("--max-points", type=int, default=2000)
    args = p.parse_args(argv)
    out_dir = os.path.join(args.run, "plots")
    os.makedirs(out_dir, exist_ok=True)
    ckpt = load_checkpoint(os.path.join(args.run, "last.pt"))
    cfg = ckpt["config"]
    data = args.data if args.data is not None else cfg["data"]
    base = load_dataset(data)
    _, val_idx = stratified_split(base.targets, val_fraction=cfg["val_fraction"] or 0.2, seed=cfg["seed"])
    val = WithTransform(base, val_idx[: args.max_points], eval_transform(cfg["img_size"]))
    encoder = build_encoder(cfg, ckpt, "target")
    grid = encoder.default_grid
    written = []

    masker = MultiBlockMasker(grid_size=grid, num_targets=cfg["num_targets"], target_scale=tuple(cfg["target_scale"]),
                              context_scale=tuple(cfg["context_scale"]), levels=cfg["levels"])
    images = torch.stack([val[i][0] for i in range(min(args.num_images, len(val)))])
    written.append(os.path.join(out_dir, "masks.png"))
    plot_masks(images, masker, grid, cfg["patch_size"], written[-1])

    written.append(os.path.join(out_dir, "curves.png"))
    plot_curves(read_metrics(os.path.join(args.run, "metrics.jsonl")), written[-1])

    loader = DataLoader(val, batch_size=256)
    feats, labels = extract_features(lambda x: pool_tokens(encoder(x).tokens), loader)
    classes = getattr(base, "classes", [str(i) for i in range(int(labels.max()) + 1)])
    written.append(os.path.join(out_dir, "pca.png"))
    plot_pca(feats, labels, classes, written[-1])
    for path in written:
        print("wrote", path)
    return written


if __name__ == "__main__":
    main()
