"""Draw the self-attention of a trained encoder over validation images, as PNG files.

Commands (from the repository root):

    # a run of train_hjepa.py: RUN/last.pt, the EMA target encoder, its last block
    python examples/plot_attention.py --run runs/cifar --data ../shared/data/cifar10-5k/train

    # any checkpoint of the trainer, several blocks, the online encoder, a chosen query patch
    python examples/plot_attention.py --checkpoint runs/cifar/best-1234.pt --layers 0 2 5 \\
        --encoder context --query 2 5 --images 8 --out runs/cifar/attention

JEPA encoders have no CLS token, so two CLS-free views of each block's (N x N) attention
are drawn (see ``jepa_blocks.evaluation.attention_maps``), one PNG each per block:

- ``attention_query_layer{L}.png``: where ONE query patch looks (its attention row; the
  patch is outlined; default: the centre patch);
- ``attention_received_layer{L}.png``: the mean attention each patch RECEIVES over all
  queries, i.e. which patches the block relies on.

Rows are images; columns are the input, the head-averaged map, then every head. Each
map is overlaid on a grey copy of its image and scaled to its own maximum (colours compare
patches within a panel, not across panels); "peak 3.2x" says the panel's largest value is
3.2 times uniform attention (1 / number of patches). Written into ``--out`` (default ``RUN/plots``, or
``plots`` next to the checkpoint).
"""

from __future__ import annotations

import argparse
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

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

from jepa_blocks.evaluation import attention_maps, query_attention, received_attention  # noqa: E402
from jepa_blocks.training import load_checkpoint  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run directory written by train_hjepa.py (reads RUN/last.pt)")
    src.add_argument("--checkpoint", help="a checkpoint file of train_hjepa.py (last.pt or best-*.pt)")
    p.add_argument("--data", default=None, help="the run's image source (default: the run's config)")
    p.add_argument("--images", type=int, default=6, help="validation images to draw (spread over the split)")
    p.add_argument("--layers", type=int, nargs="+", default=[-1], help="block indices, negative from the end")
    p.add_argument("--encoder", choices=("target", "context"), default="target")
    p.add_argument("--query", type=int, nargs=2, default=None, metavar=("ROW", "COL"),
                   help="query patch on the patch grid (default: the centre patch)")
    p.add_argument("--out", default=None, help="output folder (default: RUN/plots)")
    return p.parse_args(argv)


def load_images(cfg: dict, data: str | None, count: int) -> torch.Tensor:
    """``count`` validation images ``(B, C, H, W)``, spread evenly over the trainer's split."""
    base = load_dataset(data)
    _, val_idx = stratified_split(base.targets, val_fraction=cfg["val_fraction"] or 0.2, seed=cfg["seed"])
    val = WithTransform(base, val_idx, eval_transform(cfg["img_size"]))
    count = max(1, min(count, len(val)))
    picks = torch.linspace(0, len(val) - 1, count).round().long().unique().tolist()
    return torch.stack([val[i][0] for i in picks])


def plot_maps(images: torch.Tensor, maps: torch.Tensor, title: str, path: str,
              mark: tuple[int, int, int] | None = None) -> None:
    """Overlay per-head maps ``(B, heads, h, w)`` and their head average on the images.

    ``mark = (row, col, patch)`` outlines one patch in every panel.
    """
    b, heads = maps.shape[:2]
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    rgb = (images * std + mean).clamp(0, 1)
    pics = rgb.permute(0, 2, 3, 1).numpy()
    grey = rgb.mean(1).numpy()  # the maps are drawn over a grey copy of the image
    panels = torch.cat([maps.mean(1, keepdim=True), maps], dim=1)  # (B, 1 + heads, h, w)
    peak = panels.amax(dim=(-2, -1), keepdim=True)
    cells = maps.shape[-2] * maps.shape[-1]
    panels = panels / peak.clamp_min(1e-12)
    height, width = images.shape[-2:]
    cols = 2 + heads
    fig, axes = plt.subplots(b, cols, figsize=(1.9 * cols, 1.9 * b + 0.6), squeeze=False)
    for i in range(b):
        axes[i, 0].imshow(pics[i], interpolation="nearest")
        for j in range(1 + heads):
            ax = axes[i, j + 1]
            ax.imshow(grey[i], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.imshow(panels[i, j].numpy(), cmap="inferno", alpha=0.7, vmin=0, vmax=1,
                      extent=(-0.5, width - 0.5, height - 0.5, -0.5), interpolation="nearest")
            # the panel's peak relative to uniform attention (1 / cells): how focused it is
            ax.text(0.03, 0.97, f"peak {peak[i, j].item() * cells:.1f}x", transform=ax.transAxes, fontsize=7,
                    va="top", color="white", bbox=dict(facecolor="black", alpha=0.5, pad=1, lw=0))
            if mark is not None:
                row, col, patch = mark
                ax.add_patch(plt.Rectangle((col * patch - 0.5, row * patch - 0.5), patch, patch, fill=False,
                                           ec="cyan", lw=1.5))
        for ax in axes[i]:
            ax.set_axis_off()
    for j, name in enumerate(["image", "mean of heads"] + [f"head {h}" for h in range(heads)]):
        axes[0, j].set_title(name, fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> list[str]:
    args = parse_args(argv)
    ckpt_path = os.path.join(args.run, "last.pt") if args.run else args.checkpoint
    out_dir = args.out or os.path.join(args.run or os.path.dirname(os.path.abspath(ckpt_path)), "plots")
    os.makedirs(out_dir, exist_ok=True)
    ckpt = load_checkpoint(ckpt_path)
    cfg = ckpt["config"]
    encoder = build_encoder(cfg, ckpt, args.encoder)
    images = load_images(cfg, args.data if args.data is not None else cfg["data"], args.images)
    grid = encoder.grid_size_for(images)
    row, col = args.query if args.query is not None else (grid[0] // 2, grid[1] // 2)
    if not (0 <= row < grid[0] and 0 <= col < grid[1]):
        raise SystemExit(f"--query {row} {col} is outside the {grid[0]}x{grid[1]} patch grid")
    patch = cfg["patch_size"]
    written = []
    for layer in args.layers:
        if not -encoder.depth <= layer < encoder.depth:
            raise SystemExit(f"--layers {layer} is outside the encoder's {encoder.depth} blocks")
        name = layer % encoder.depth
        maps = attention_maps(encoder, images, layer=layer)  # (B, heads, N, N)
        written.append(os.path.join(out_dir, f"attention_query_layer{name}.png"))
        plot_maps(images, query_attention(maps, grid, query=(row, col)),
                  f"{args.encoder} encoder, block {name}: attention of query patch ({row}, {col})",
                  written[-1], mark=(row, col, patch))
        written.append(os.path.join(out_dir, f"attention_received_layer{name}.png"))
        plot_maps(images, received_attention(maps, grid),
                  f"{args.encoder} encoder, block {name}: mean attention each patch receives", written[-1])
    for path in written:
        print("wrote", path)
    return written


if __name__ == "__main__":
    main()
