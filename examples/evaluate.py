"""Evaluate a JEPA encoder checkpoint: kNN, linear probe, few-shot, fine-tuning, feature quality.

Commands (from the repository root):

    # a trained run; the same folder for train and test is split exactly as in training
    python examples/evaluate.py --checkpoint runs/cifar/last.pt \
        --train-data ../shared/data/cifar10-5k/train --test-data ../shared/data/cifar10-5k/train \
        --out runs/cifar/eval.json

    # the baseline: the same architecture at random initialisation
    python examples/evaluate.py --checkpoint runs/cifar/last.pt --train-data DIR --test-data DIR \
        --out runs/cifar/eval-random.json --random-init

    # add 5-way 1/5-shot episodes and 10 epochs of end-to-end fine-tuning
    python examples/evaluate.py --checkpoint runs/cifar/last.pt --train-data DIR --test-data DIR \
        --out runs/cifar/eval-full.json --few-shot --finetune --finetune-epochs 10

Features are the average-pooled final tokens (after the last norm) of the TARGET (EMA)
encoder by default, the usual choice for I-JEPA; ``--encoder context`` uses the online
context encoder instead. ``--per-level`` adds, for each hierarchy level l, a spatial
feature: the tokens pooled on the level-l grid (2^l x 2^l windows) and flattened.

Metrics (accuracies are fractions in [0, 1]):
- kNN: cosine similarity, temperature-weighted votes (T = 0.07), k in {10, 20, 200};
  ``knn_top1`` is k = 20; ``knn_top1_centred`` subtracts the bank mean first.
- Linear probe: multinomial logistic regression on frozen, standardised features,
  trained in torch; weight decay chosen on a split of the train features.
- Feature quality: effective rank, rank ratio, per-dimension variance, uniformity,
  isotropy (see ``jepa_blocks.evaluation``).
- ``--few-shot``: N-way K-shot episodes drawn from the TEST features, nearest centred
  cosine prototype; ``fewshot_{N}way_{K}shot`` is the mean accuracy over episodes and
  ``..._ci95`` the 95% confidence half-width (1.96 std / sqrt(episodes)).
- ``--finetune``: a copy of the encoder plus a linear head trained end to end on the
  train images (random resized crop + flip) with AdamW (separate encoder / head learning
  rates, optional layer-wise decay, warmup + cosine); ``finetune_top1`` is the test top-1
  after the last epoch, ``finetune.history`` the per-epoch record.

When ``--train-data`` and ``--test-data`` are the same folder, the test set is the
stratified validation split the trainer held out (same seed and fraction), and the kNN
bank / probe training set is the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from data import (  # noqa: E402
    WithTransform,
    eval_transform,
    load_dataset,
    pretrain_transform,
    stratified_split,
)
from runtime import pooled_features  # noqa: E402

from jepa_blocks import ViTEncoder  # noqa: E402
from jepa_blocks.evaluation import (  # noqa: E402
    collapse_stats,
    few_shot_accuracy,
    finetune,
    isotropy,
    knn_accuracy,
    linear_probe,
    uniformity,
)
from jepa_blocks.grid import level_grid_size  # noqa: E402
from jepa_blocks.training import load_checkpoint  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="RUN/last.pt (or a best-*.pt) from train_hjepa.py")
    p.add_argument("--train-data", default=None, help="image folder for the kNN bank / probe training (default: digits)")
    p.add_argument("--test-data", default=None, help="image folder to evaluate on (same as train: held-out split)")
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--encoder", choices=("target", "context"), default="target",
                   help="which encoder to evaluate: the EMA target (default) or the online context encoder")
    p.add_argument("--random-init", action="store_true", help="evaluate the same architecture untrained")
    p.add_argument("--per-level", action="store_true", help="also evaluate per-hierarchy-level spatial features")
    p.add_argument("--k", type=int, nargs="+", default=[10, 20, 200])
    p.add_argument("--temperature", type=float, default=0.07)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    fs = p.add_argument_group("few-shot episodes (on the test features)")
    fs.add_argument("--few-shot", action="store_true", help="add N-way K-shot nearest-prototype accuracy")
    fs.add_argument("--few-shot-way", type=int, default=5, help="classes per episode")
    fs.add_argument("--few-shot-shots", type=int, nargs="+", default=[1, 5], help="support images per class")
    fs.add_argument("--few-shot-query", type=int, default=15, help="query images per class")
    fs.add_argument("--few-shot-episodes", type=int, default=600)
    ft = p.add_argument_group("end-to-end fine-tuning")
    ft.add_argument("--finetune", action="store_true", help="fine-tune a copy of the encoder with a linear head")
    ft.add_argument("--finetune-epochs", type=int, default=10)
    ft.add_argument("--finetune-encoder-lr", type=float, default=1e-4)
    ft.add_argument("--finetune-head-lr", type=float, default=1e-3)
    ft.add_argument("--finetune-weight-decay", type=float, default=0.05)
    ft.add_argument("--finetune-layer-decay", type=float, default=None, help="e.g. 0.75; default: none")
    ft.add_argument("--finetune-warmup-epochs", type=float, default=1.0)
    ft.add_argument("--finetune-batch-size", type=int, default=128)
    ft.add_argument("--finetune-augment", action=argparse.BooleanOptionalAction, default=True,
                    help="random resized crop + flip on the fine-tuning images")
    return p.parse_args(argv)


def build_encoder(cfg: dict, ckpt: dict | None, which: str) -> ViTEncoder:
    """The encoder of a training config, with trained weights unless ``ckpt`` is None."""
    return ViTEncoder.from_checkpoint({**(ckpt or {}), "config": cfg}, weights=ckpt is not None,
                                      which="target" if which == "target" else "online")


def datasets(args, cfg: dict, train_transform=None):
    """(bank, test) evaluation datasets; one folder is split as the trainer split it.

    The bank uses ``train_transform`` when given (fine-tuning), else the eval transform.
    """
    tf = eval_transform(cfg["img_size"])
    train_tf = tf if train_transform is None else train_transform
    train_src, test_src = args.train_data, args.test_data
    same = train_src == test_src or (train_src and test_src and os.path.realpath(train_src) == os.path.realpath(test_src))
    base = load_dataset(train_src)
    if same:
        train_idx, test_idx = stratified_split(base.targets, val_fraction=cfg["val_fraction"], seed=cfg["seed"])
        return WithTransform(base, train_idx, train_tf), WithTransform(base, test_idx, tf)
    return WithTransform(base, None, train_tf), WithTransform(load_dataset(test_src), None, tf)


def evaluate_few_shot(xte, yte, args) -> dict:
    """N-way K-shot accuracy on the test features: ``fewshot_{N}way_{K}shot`` (+ ``_ci95``)."""
    res = few_shot_accuracy(xte, yte, n_way=args.few_shot_way, k_shot=tuple(args.few_shot_shots),
                            n_query=args.few_shot_query, num_episodes=args.few_shot_episodes, seed=args.seed)
    out = {}
    for k, r in res.items():
        key = f"fewshot_{args.few_shot_way}way_{k}shot"
        out[key], out[key + "_ci95"] = r["mean"], r["ci95"]
        print(f"few-shot {args.few_shot_way}-way {k}-shot: {100 * r['mean']:.2f}% +- {100 * r['ci95']:.2f}% "
              f"({args.few_shot_episodes} episodes, {args.few_shot_query} queries per class)")
    return out


def evaluate_finetune(encoder, cfg: dict, num_classes: int, test_loader, device, args) -> dict:
    """Fine-tune a copy of the encoder with a linear head; top-1 on the test loader."""
    augment = pretrain_transform(cfg["img_size"]) if args.finetune_augment else None
    bank, _ = datasets(args, cfg, train_transform=augment)
    loader = DataLoader(bank, batch_size=args.finetune_batch_size, shuffle=True, num_workers=args.workers,
                        drop_last=len(bank) > args.finetune_batch_size)
    amp = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    res = finetune(encoder, loader, test_loader, num_classes=num_classes, epochs=args.finetune_epochs,
                   encoder_lr=args.finetune_encoder_lr, head_lr=args.finetune_head_lr,
                   weight_decay=args.finetune_weight_decay, layer_decay=args.finetune_layer_decay,
                   warmup_epochs=args.finetune_warmup_epochs, device=device,
                   amp_dtype=amp, seed=args.seed)
    print(f"fine-tuning ({args.finetune_epochs} epochs): test top-1 {100 * res.top1:.2f}%")
    config = {k[len("finetune_"):]: v for k, v in vars(args).items() if k.startswith("finetune_")}
    return {"finetune_top1": res.top1, "finetune": {"config": config, "history": res.history}}


def evaluate_features(xtr, ytr, xte, yte, args) -> dict:
    knn = knn_accuracy(xtr, ytr, xte, yte, k=tuple(args.k), temperature=args.temperature)
    # Centring with the bank mean before the cosine removes a shared component that
    # dominates collapsed-ish JEPA features; reported beside the standard figure.
    centred = knn_accuracy(xtr, ytr, xte, yte, k=tuple(args.k), temperature=args.temperature, center=True)
    probe = linear_probe(xtr, ytr, xte, yte, weight_decays=(1e-4, 1e-3, 1e-2, 1e-1), seed=args.seed)
    stats = collapse_stats(xtr)
    out = {"knn_top1": knn.get(20, next(iter(knn.values())))}
    out.update({f"knn_top1_k{k}": v for k, v in knn.items()})
    out["knn_top1_centred"] = centred.get(20, next(iter(centred.values())))
    out.update({"linear_top1": probe.top1, "linear_train_top1": probe.train_top1,
                "uniformity": float(uniformity(xtr)), "isotropy": float(isotropy(xtr))})
    out.update({k: float(v) for k, v in stats.items()})
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    ckpt = load_checkpoint(args.checkpoint)
    cfg = ckpt["config"]
    encoder = build_encoder(cfg, None if args.random_init else ckpt, args.encoder).to(device)
    bank, test = datasets(args, cfg)
    loaders = [DataLoader(ds, batch_size=args.batch_size, num_workers=args.workers) for ds in (bank, test)]
    levels = cfg.get("levels", 1) if args.per_level else 0

    # 1. Features: average-pooled final tokens (+ per-level spatial features), extracted
    #    exactly as the trainer's final evaluation does (runtime.pooled_features).
    xtr, ytr, xte, yte = pooled_features(encoder, loaders, device, levels=levels)
    dim = cfg["embed_dim"]

    # 2. Metrics on the pooled features, then per level.
    result = {"checkpoint": args.checkpoint, "encoder": "random-init" if args.random_init else args.encoder,
              "train_images": len(bank), "test_images": len(test), "step": ckpt.get("step"),
              **evaluate_features(xtr[:, :dim], ytr, xte[:, :dim], yte, args)}
    offset = dim
    for level in range(levels):
        lh, lw = level_grid_size(encoder.default_grid, level)
        width = lh * lw * dim
        sl = slice(offset, offset + width)
        result[f"level{level}"] = evaluate_features(xtr[:, sl], ytr, xte[:, sl], yte, args)
        offset += width

    # 3. Optional: few-shot episodes on the pooled test features, then end-to-end fine-tuning.
    if args.few_shot:
        result.update(evaluate_few_shot(xte[:, :dim], yte, args))
    if args.finetune:
        num_classes = int(max(ytr.max(), yte.max())) + 1
        result.update(evaluate_finetune(encoder, cfg, num_classes, loaders[1], device, args))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, (dict, list))}, indent=2))
    return result


if __name__ == "__main__":
    main()
