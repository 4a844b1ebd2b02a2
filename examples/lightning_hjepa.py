"""Train an H-JEPA from jepa-blocks with Lightning, monitored by online kNN and collapse metrics.

Commands (from the repository root; needs ``pip install -e '.[examples,lightning]'``):

    # scikit-learn's digits, 32 px, 600 steps (a GPU is picked up when there is one)
    python examples/lightning_hjepa.py

    # a short smoke run
    python examples/lightning_hjepa.py --max-steps 20 --img-size 16 --embed-dim 64

The blocks are the same as in ``train_hjepa.py``; Lightning runs the loop. What the
integration adds (:mod:`jepa_blocks.integrations.lightning`):

* :class:`~jepa_blocks.integrations.lightning.EMATargetCallback` updates the EMA target
  encoder after every optimizer step;
* :class:`~jepa_blocks.integrations.lightning.EmbeddingMonitor` logs kNN top-1 on the
  held-out digits and the effective rank / feature std of their embeddings each epoch;
* :class:`~jepa_blocks.training.OptimizerScheduler` (warmup-cosine lr, cosine weight-decay
  ramp) is returned from ``configure_optimizers`` as an ordinary torch ``LRScheduler``.

Metrics go to ``OUT/metrics.csv`` (Lightning's CSVLogger); checkpoints to ``OUT/checkpoints``.
"""

from __future__ import annotations

import argparse
import os
import sys

import lightning as L
import torch
from torch.utils.data import DataLoader, Subset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from data import split_datasets  # noqa: E402

from jepa_blocks import (  # noqa: E402
    EMATarget,
    HierarchicalPredictor,
    LatentPredictionLoss,
    MultiBlockMasker,
    ViTEncoder,
    hierarchical_targets,
)
from jepa_blocks.integrations.lightning import EMATargetCallback, EmbeddingMonitor  # noqa: E402
from jepa_blocks.training import OptimizerScheduler, param_groups_for_weight_decay  # noqa: E402


class HJEPA(L.LightningModule):
    """Context encoder, hierarchical predictor and EMA target; one masked latent-prediction step."""

    def __init__(self, *, img_size: int, patch_size: int, embed_dim: int, depth: int, num_heads: int,
                 pred_dim: int, pred_depth: int, levels: int, lr: float, total_steps: int, warmup_steps: int):
        super().__init__()
        self.save_hyperparameters()
        self.encoder = ViTEncoder(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                                  num_heads=num_heads)
        grid = self.encoder.default_grid
        self.predictor = HierarchicalPredictor(grid_size=grid, embed_dim=embed_dim, predictor_dim=pred_dim,
                                               depth=pred_depth, num_heads=num_heads, num_levels=levels)
        self.masker = MultiBlockMasker(grid_size=grid, levels=levels)
        self.target = EMATarget(self.encoder, total_steps=total_steps)  # updated by EMATargetCallback
        self.criterion = LatentPredictionLoss(level_weights=(1.0, 0.7, 0.5)[:levels])

    def training_step(self, batch, batch_idx):
        images = batch[0]
        images = images[:, 0] if images.ndim == 5 else images  # one view
        masks = self.masker(images.shape[0]).to(self.device)
        full = self.target(images)  # all patches, no grad
        targets = hierarchical_targets(full.tokens, grid_size=full.grid_size, targets=masks.targets)
        ctx = self.encoder(images, keep=masks.context)
        preds = self.predictor(ctx.tokens, context_indices=masks.context, targets=masks.targets,
                               grid_size=ctx.grid_size)
        loss = self.criterion(preds, targets, [t.valid for t in masks.targets])
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        hp = self.hparams
        groups = param_groups_for_weight_decay(self.encoder, self.predictor, weight_decay=0.04)
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=(0.9, 0.95))
        scheduler = OptimizerScheduler(optimizer, total_steps=hp.total_steps, warmup_steps=hp.warmup_steps,
                                       lr=(0.2 * hp.lr, hp.lr, 1e-6), weight_decay=(0.04, 0.4))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/lightning-hjepa", help="run folder")
    p.add_argument("--max-steps", type=int, default=600, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=40)
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--embed-dim", type=int, default=192)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--num-heads", type=int, default=3)
    p.add_argument("--pred-dim", type=int, default=96)
    p.add_argument("--pred-depth", type=int, default=2)
    p.add_argument("--levels", type=int, default=2)
    p.add_argument("--monitor-size", type=int, default=0, help="cap of the kNN bank and query sets (0: all)")
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    L.seed_everything(args.seed, verbose=False)
    pretrain, bank, queries = split_datasets(None, val_fraction=0.2, seed=args.seed, img_size=args.img_size)
    if args.monitor_size:
        bank, queries = (Subset(ds, range(min(args.monitor_size, len(ds)))) for ds in (bank, queries))
    loader = DataLoader(pretrain, batch_size=args.batch_size, shuffle=True, drop_last=True)
    model = HJEPA(img_size=args.img_size, patch_size=args.patch_size, embed_dim=args.embed_dim, depth=args.depth,
                  num_heads=args.num_heads, pred_dim=args.pred_dim, pred_depth=args.pred_depth, levels=args.levels,
                  lr=args.lr, total_steps=args.max_steps, warmup_steps=min(args.warmup_steps, args.max_steps))
    monitor = EmbeddingMonitor(DataLoader(bank, batch_size=256), DataLoader(queries, batch_size=256),
                               module="target", k=(10, 20))
    trainer = L.Trainer(max_steps=args.max_steps, accelerator=args.accelerator, devices=1,
                        default_root_dir=args.out, logger=L.pytorch.loggers.CSVLogger(args.out, name="", version=""),
                        callbacks=[EMATargetCallback(), monitor], log_every_n_steps=10,
                        enable_progress_bar=sys.stderr.isatty(), enable_model_summary=False)
    trainer.fit(model, loader)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    metrics.update(monitor.last)
    print(f"after {trainer.global_step} steps: loss {metrics.get('train/loss', float('nan')):.4f}, "
          f"held-out kNN top-1 {100 * monitor.last['monitor/knn_top1']:.1f}% (EMA target, k=10), "
          f"effective rank {monitor.last['monitor/effective_rank']:.1f}")
    return metrics


if __name__ == "__main__":
    main()
