"""Draw a training run as PNG files: masks over images, curves, and a PCA of features.

Command (from the repository root):

    python examples/plot_run.py --run runs/cifar --data ../shared/data/cifar10-5k/train

Writes into RUN/plots/:
- ``masks.png``: multi-block masks sampled by the run's MultiBlockMasker over validation
  images (context patches visible, each level-0 target block in its own colour, coarser
  levels' blocks outlined, the rest dimmed);
- ``curves.png``: from RUN/metrics.jsonl, against training minutes: the total loss (and
  the latent loss when logged) on a log axis; every other logged loss term (per level,
  regularisers, local crops, ...; unweighted, as logged) on a panel of its own; learning
  rate and EMA momentum on twin axes; validation kNN top-1 in percent;
- ``pca.png``: a 2D PCA of the target encoder's average-pooled validation features,
  coloured by class.

Only the curves, e.g. while a run is still training (no checkpoint or data needed):

    python examples/plot_run.py --run runs/cifar --curves-only
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
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


# Keys of a training record that are not loss terms: bookkeeping, schedules, throughput
# and diagnostics logged beside the terms. Terms logged as ``terms/<name>`` need no list.
NOT_TERMS = frozenset({"step", "epoch", "loss", "lr", "wd", "momentum", "grad_norm", "images_per_s",
                       "time_min", "consecutive", "skipped_total", "temperature"})
NOT_TERM_PARTS = ("perplexity", "usage")  # vq_perplexity, vq_usage, vq_usage_window
MAIN_TERMS = ("latent",)  # drawn with the total loss: the objective itself, not an add-on
LR_COLOUR, MOMENTUM_COLOUR = "tab:blue", "tab:red"
NO_VAL_NOTE = "no validation records yet"


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics.jsonl; a last line still being written is left out."""
    with open(path) as fh:
        lines = fh.read().split("\n")
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # no newline yet: the trainer is writing it
                break
            raise ValueError(f"{path}, line {i + 1}: not a JSON record: {line[:80]!r}") from None
    return records


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def split_records(records: list[dict]) -> tuple[list[dict], list[dict], int]:
    """``(train, val, skipped)``: training-step records, validation records and the number
    of steps skipped for a non-finite loss (their records carry no curve values)."""
    train, val, skipped = [], [], 0
    for r in records:
        if r.get("skipped_nonfinite"):
            skipped += 1
        elif r.get("val") or ("knn_top1" in r and "loss" not in r):
            val.append(r)
        elif "loss" in r and not r.get("monitor"):
            train.append(r)
    return train, val, skipped


def loss_terms(train: list[dict]) -> list[str]:
    """Keys of the logged loss terms other than the total, in first-seen order.

    ``terms/<name>`` keys when the trainer logs them so; otherwise every numeric key that is
    not bookkeeping, a schedule or a diagnostic (``NOT_TERMS``, ``NOT_TERM_PARTS``).
    """
    keys = list(dict.fromkeys(k for r in train for k, v in r.items() if _number(v)))
    prefixed = [k for k in keys if k.startswith("terms/")]
    if prefixed:
        return prefixed
    return [k for k in keys if k not in NOT_TERMS and not any(p in k for p in NOT_TERM_PARTS)]


def _term_name(key: str) -> str:
    return key.removeprefix("terms/")


def _series(records: list[dict], key: str) -> list[float]:
    return [r[key] if _number(r.get(key)) else float("nan") for r in records]


def _set_log_if_positive(ax, values: list[float]) -> None:
    """Log scale when every finite value is positive (a log axis drops the others)."""
    finite = [v for v in values if math.isfinite(v)]
    if finite and min(finite) > 0:
        ax.set_yscale("log")


def _note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="0.4")


def curves_figure(records: list[dict]) -> Figure:
    """Four panels from metrics.jsonl records: total (and latent) loss, the other loss
    terms, the lr / EMA momentum schedules, and validation kNN top-1 (%)."""
    train, val, skipped = split_records(records)
    # x: training minutes where every record has them, else optimizer steps.
    by_time = all(_number(r.get("time_min")) for r in train + val)
    x_key, x_label = ("time_min", "training minutes") if by_time else ("step", "optimizer step")
    t = _series(train, x_key)
    fig = Figure(figsize=(20, 4.2), layout="constrained")
    ax_loss, ax_terms, ax_lr, ax_val = fig.subplots(1, 4)

    # 1. The objective: total loss, and the latent (prediction) loss when logged.
    terms = loss_terms(train)
    main = [k for k in terms if _term_name(k) in MAIN_TERMS]
    others = [k for k in terms if k not in main]
    plotted = []
    if train:
        ax_loss.plot(t, _series(train, "loss"), label="total")
        plotted += _series(train, "loss")
    for key in main:
        ax_loss.plot(t, _series(train, key), label=_term_name(key))
        plotted += _series(train, key)
    _set_log_if_positive(ax_loss, plotted)
    title = "loss" + (f" ({skipped} non-finite steps skipped)" if skipped else "")
    ax_loss.set(xlabel=x_label, ylabel="loss", title=title)
    if train:
        ax_loss.legend()
    else:
        _note(ax_loss, "no training records yet")

    # 2. Every other term on its own axis: an unweighted regulariser cannot squash the loss.
    plotted = []
    for key in others:
        ax_terms.plot(t, _series(train, key), label=_term_name(key), alpha=0.8)
        plotted += _series(train, key)
    _set_log_if_positive(ax_terms, plotted)
    ax_terms.set(xlabel=x_label, ylabel="term value", title="loss terms (unweighted, as logged)")
    if others:
        ax_terms.legend(fontsize=8)
    else:
        _note(ax_terms, "no loss terms logged")

    # 3. Schedules: lr (left axis) and EMA momentum (right axis), one colour each, one legend.
    ax_lr.set(xlabel=x_label, title="schedules")
    lines = []
    if any(_number(r.get("lr")) for r in train):
        lines += ax_lr.plot(t, _series(train, "lr"), color=LR_COLOUR, label="learning rate")
        ax_lr.set_ylabel("learning rate", color=LR_COLOUR)
        ax_lr.tick_params(axis="y", colors=LR_COLOUR)
    if any(_number(r.get("momentum")) for r in train):
        ax_m = ax_lr.twinx()
        lines += ax_m.plot(t, _series(train, "momentum"), color=MOMENTUM_COLOUR, label="EMA momentum")
        ax_m.set_ylabel("EMA momentum", color=MOMENTUM_COLOUR)
        ax_m.tick_params(axis="y", colors=MOMENTUM_COLOUR)
    if lines:  # on the top-most axes, so the other axes' line does not cover it
        lines[-1].axes.legend(lines, [ln.get_label() for ln in lines], loc="center right")
    else:
        _note(ax_lr, "no schedules logged")

    # 4. Validation kNN: metrics.jsonl stores top-1 as a fraction in [0, 1]; drawn in percent.
    val = [r for r in val if _number(r.get("knn_top1"))]
    ax_val.set(xlabel=x_label, ylabel="kNN top-1 (%)", title="validation kNN (k=20)")
    if val:
        ax_val.plot(_series(val, x_key), [100 * r["knn_top1"] for r in val], marker="o")
    else:
        _note(ax_val, NO_VAL_NOTE)
    return fig


def plot_curves(records: list[dict], path: str) -> Figure:
    """Write :func:`curves_figure` of ``records`` to ``path`` (PNG) and return it."""
    fig = curves_figure(records)
    fig.savefig(path, dpi=110)
    return fig


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
    p.add_argument("--curves-only", action="store_true",
                   help="draw only curves.png (from metrics.jsonl: no checkpoint or data needed)")
    args = p.parse_args(argv)
    metrics = os.path.join(args.run, "metrics.jsonl")
    if not os.path.exists(metrics):
        p.error(f"no metrics.jsonl in {args.run}")
    out_dir = os.path.join(args.run, "plots")
    os.makedirs(out_dir, exist_ok=True)
    written = [os.path.join(out_dir, "curves.png")]
    plot_curves(read_metrics(metrics), written[-1])
    if args.curves_only:
        print("wrote", written[-1])
        return written
    ckpt_path = os.path.join(args.run, "last.pt")
    if not os.path.exists(ckpt_path):
        p.error(f"no checkpoint {ckpt_path} yet (pass --curves-only to draw the curves alone)")
    ckpt = load_checkpoint(ckpt_path)
    cfg = ckpt["config"]
    data = args.data if args.data is not None else cfg["data"]
    base = load_dataset(data)
    _, val_idx = stratified_split(base.targets, val_fraction=cfg["val_fraction"] or 0.2, seed=cfg["seed"])
    val = WithTransform(base, val_idx[: args.max_points], eval_transform(cfg["img_size"]))
    encoder = build_encoder(cfg, ckpt, "target")
    grid = encoder.default_grid

    masker = MultiBlockMasker(grid_size=grid, num_targets=cfg["num_targets"], target_scale=tuple(cfg["target_scale"]),
                              context_scale=tuple(cfg["context_scale"]), levels=cfg["levels"])
    images = torch.stack([val[i][0] for i in range(min(args.num_images, len(val)))])
    written.append(os.path.join(out_dir, "masks.png"))
    plot_masks(images, masker, grid, cfg["patch_size"], written[-1])

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
