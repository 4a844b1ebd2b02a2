"""Plot validation kNN top-1 against training minutes for one or more H-JEPA runs.

Command (from the repository root):

    python benchmarks/plot_knn.py --runs runs/cifar20 --random-init runs/cifar20/eval-random.json \
        --out benchmarks/knn_vs_minutes.png

Reads the ``{"val": true, "time_min": ..., "knn_top1": ...}`` records of each run's
``metrics.jsonl`` (written by ``examples/train_hjepa.py``) and, optionally, the kNN of the
same architecture at random initialisation (``examples/evaluate.py --random-init``) as a
horizontal reference line.
"""

from __future__ import annotations

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--runs", nargs="+", required=True, help="run directories with metrics.jsonl"
    )
    parser.add_argument(
        "--random-init", default=None, help="evaluate.py --random-init JSON for the baseline line"
    )
    parser.add_argument("--out", default="benchmarks/knn_vs_minutes.png")
    args = parser.parse_args(argv)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for run in args.runs:
        with open(os.path.join(run, "metrics.jsonl")) as fh:
            val = [r for r in map(json.loads, fh) if r.get("val")]
        ax.plot(
            [r["time_min"] for r in val],
            [100 * r["knn_top1"] for r in val],
            marker="o",
            label=f"{os.path.basename(os.path.normpath(run))} ({val[-1].get('encoder', 'context')} encoder)",
        )
    if args.random_init:
        with open(args.random_init) as fh:
            base = json.load(fh)["knn_top1"]
        ax.axhline(100 * base, color="grey", ls="--", label="same architecture, random init")
    ax.set(
        xlabel="training minutes (2-core CPU, wall clock)",
        ylabel="validation kNN top-1 (%)",
        title="kNN (k=20, cosine, T=0.07) on the cifar10-5k validation split",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    plt.close(fig)
    print("wrote", args.out)
    return args.out


if __name__ == "__main__":
    main()
