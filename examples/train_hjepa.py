"""Train a hierarchical JEPA (H-JEPA) from jepa-blocks on images, then evaluate it.

Commands (from the repository root):

    # embedded default: scikit-learn's digits, a few CPU minutes, then kNN + linear probe
    python examples/train_hjepa.py

    # an image folder (class sub-folders; labels are used only for validation)
    python examples/train_hjepa.py --data ../shared/data/cifar10-5k/train --out runs/cifar \
        --time-budget-min 20

    # ImageNet-size preset on a GPU, several processes
    torchrun --nproc_per_node 4 examples/train_hjepa.py --preset imagenet --data DIR \
        --out runs/in1k --device cuda

    # continue a run from RUN/last.pt; list every flag with its default
    python examples/train_hjepa.py --data DIR --out RUN --resume
    python examples/train_hjepa.py --help

One step: multi-block masks are drawn for the global batch (MultiBlockMasker) and each rank
takes its rows; the EMA target encoder sees every patch and its tokens are pooled into one
target set per hierarchy level; the context encoder sees only the context patches; the
HierarchicalPredictor predicts every level's target blocks; the latent loss (smooth-L1 to
layer-normed targets) plus the optional terms of ``terms.py`` (--reg, --vq-codes,
--local-crops) is minimised with AdamW; the EMA target follows after optimizer.step(). A
step whose loss or gradients are NaN/Inf is skipped (no optimizer or EMA update) and logged;
the run stops after --nonfinite-patience such steps in a row.

Reproducibility: every random draw is a function of (seed, epoch, batch): the data order
(ResumableSampler, micro-batches in global-batch order), each sample's augmentation
(SeededDataset), the masks, the terms' draws and each sample's drop-path draws (seeded by its
row in the global batch, not by the rank). A run resumed from RUN/last.pt continues exactly
as if it had never stopped, and W processes with the global batch B take the same steps as
one process with batch B (up to float summation order), with any --accum-steps and
--drop-path. Both are tested. Not covered: time-budget runs, whose step count depends on
the wall clock.

Writes RUN/last.pt, RUN/best-*.pt (by validation kNN top-1), RUN/metrics.jsonl,
RUN/config.json, RUN/eval.json and TensorBoard scalars under RUN/tb.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from data import split_datasets  # noqa: E402
from fsdp import CheckpointIO, clip_gradients, wrap_models  # noqa: E402
from runtime import (  # noqa: E402
    MicroBatchSampler,
    RunLog,
    TimeBudget,
    autocast_dtype,
    average_gradients,
    evaluate_encoder,
    format_result,
    no_sync,
    pixel_baseline,
    row_seeds,
    set_schedule_length,
    setup_distributed,
    validation_knn,
)
from terms import REG_CHOICES, StepBatch, TermSet  # noqa: E402

from jepa_blocks import (  # noqa: E402
    EMATarget,
    HierarchicalPredictor,
    LatentPredictionLoss,
    MultiBlockMasker,
    ViTEncoder,
    hierarchical_targets,
    value_checks,
)
from jepa_blocks.distributed import unwrap_module  # noqa: E402
from jepa_blocks.layers import sample_seeded_drop_path  # noqa: E402
from jepa_blocks.training import (  # noqa: E402
    BestCheckpoints,
    NonFiniteGuard,
    OptimizerScheduler,
    SeededDataset,
    load_latest_good,
    param_groups_for_weight_decay,
    sample_seed,
)

# -----------------------------------------------------------------------------
# Configuration: one dataclass; presets fill defaults; every field is a CLI flag.

PRESETS: dict[str, dict] = {
    # 32 px images, patch 4 (8x8 grid), ViT-Tiny width at depth 6: at this CPU budget more
    # steps beat a bigger model. H-JEPA on the first view plus LeJEPA's view term (projector,
    # invariance + SIGReg per view) over two colour-jittered views, EMA start 0.98: +5 kNN and
    # +2 linear over the former VICReg term in fixed-step runs, 2 seeds (benchmarks/RESULTS.md).
    "cifar": dict(img_size=32, patch_size=4, embed_dim=192, depth=6, num_heads=3, pred_dim=96, pred_depth=3,
                  pred_heads=3, batch_size=128, lr=1e-3, warmup_steps=200, reg="lejepa", reg_weight=1.0,
                  views=2, jepa_views=1, color_jitter=0.4, grayscale=0.2, ema_start=0.98, workers=1),
    # 224 px images, patch 16 (14x14 grid), ViT-Small-like encoder.
    "imagenet": dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6, pred_dim=192,
                     pred_depth=6, pred_heads=6, batch_size=128, lr=1.5e-3, warmup_steps=2000),
}
# The embedded digits default (1,437 pretraining images) overrides these unless given.
DIGITS: dict = dict(epochs=15, warmup_steps=20)


def opt(default, help: str, choices=None):
    """A config field with its help text (and choices) for ``--help``."""
    kw = {"default_factory": lambda: default} if isinstance(default, (list, dict)) else {"default": default}
    return field(**kw, metadata={"help": help, "choices": choices})


@dataclass
class Config:
    preset: str = opt("cifar", "defaults for 32 px (cifar) or 224 px (imagenet) images", tuple(PRESETS))
    data: str | None = opt(None, "image folder, cifar10/cifar100/stl10, or none for the embedded digits")
    data_root: str = opt("data", "where torchvision data sets live")
    download: bool = opt(False, "download a torchvision data set (needs internet)")
    out: str = opt("runs/hjepa", "run folder")
    resume: bool = opt(False, "continue from OUT/last.pt")
    resume_fallback: bool = opt(False, "with --resume: if OUT/last.pt is damaged, use the newest good kept checkpoint")
    # model
    img_size: int = opt(32, "image side in pixels")
    patch_size: int = opt(4, "patch side in pixels")
    embed_dim: int = opt(192, "encoder width")
    depth: int = opt(6, "encoder blocks")
    num_heads: int = opt(3, "encoder attention heads")
    pos_embed: str = opt("sincos", "position encoding", ("sincos", "rope"))
    pred_dim: int = opt(96, "predictor width")
    pred_depth: int = opt(3, "predictor blocks")
    pred_heads: int = opt(3, "predictor attention heads")
    predictor_mode: str = opt("shared_context", "predictor layout: context once per sample (1.2-1.3x faster "
                              "runs, learns the same: benchmarks/RESULTS.md) or once per target block (I-JEPA)",
                              ("shared_context", "per_block"))
    drop_path: float = opt(0.0, "stochastic depth of the context encoder")
    levels: int = opt(3, "hierarchy levels predicted")
    level_weights: tuple[float, ...] = opt((1.0, 0.7, 0.5), "latent loss weight per level")
    # masking
    num_targets: int = opt(4, "target blocks per level")
    target_scale: tuple[float, float] = opt((0.15, 0.2), "area fraction of a target block")
    context_scale: tuple[float, float] = opt((0.85, 1.0), "area fraction of the context block")
    mask_truncate: bool = opt(False, "cut every sample's context and target lists to the batch's smallest (I-JEPA): "
                              "no padding, fewer tokens")
    # data and views
    views: int = opt(1, "augmented views per image (the extra terms use the others)")
    jepa_views: int = opt(1, "views that get the masked latent prediction (<= --views)")
    crop_scale: tuple[float, float] = opt((0.3, 1.0), "area fraction of a random resized crop")
    color_jitter: float = opt(0.0, "brightness/contrast/saturation jitter strength (0: off), with p 0.8")
    grayscale: float = opt(0.0, "probability of a grayscale view")
    # objective (terms.py)
    loss: str = opt("smooth_l1", "latent loss", ("smooth_l1", "l1", "l2"))
    reg: str = opt("none", "extra term on pooled features (terms.py)", REG_CHOICES)
    reg_weight: float = opt(0.0, "weight of --reg; 0 picks the term's default")
    lejepa_lambda: float = opt(0.05, "SIGReg share of --reg lejepa: (1 - l) * invariance + l * SIGReg")
    proj_dims: tuple[int, ...] = opt((512, 512, 64), "projector widths of --reg lejepa (hidden..., out); 0: none")
    lejepa_local_views: int = opt(0, "small crops per image added to --reg lejepa as local views "
                                     "(--local-size, --local-scale)")
    pool: str = opt("mean", "pooling of tokens for the extra terms", ("mean", "attention"))
    vq_codes: int = opt(0, "> 0: a VQ codebook over the layer-normed pooled context features")
    vq_refresh_every: int = opt(3000, "steps between dead-code refreshes of the codebook")
    local_crops: int = opt(0, "> 0: small crops per image, each with its own multi-block masks")
    local_size: int = opt(16, "px of a local crop (a multiple of --patch-size)")
    local_scale: tuple[float, float] = opt((0.05, 0.4), "area fraction of a local crop")
    local_levels: int = opt(1, "hierarchy levels predicted on local crops")
    local_weight: float = opt(1.0, "weight of the local crops' latent loss")
    # optimisation
    batch_size: int = opt(128, "global batch (all ranks)")
    accum_steps: int = opt(1, "micro-batches per optimizer step")
    epochs: int = opt(100, "epochs (the digits default uses 15)")
    time_budget_min: float = opt(0.0, "stop cleanly after this many minutes; schedules fitted to it (0: none)")
    lr: float = opt(1e-3, "peak learning rate")
    min_lr: float = opt(1e-6, "final learning rate")
    warmup_steps: int = opt(200, "linear warmup in optimizer steps")
    wd_start: float = opt(0.04, "weight decay at the start (cosine ramp)")
    wd_end: float = opt(0.4, "weight decay at the end")
    betas: tuple[float, float] = opt((0.9, 0.95), "AdamW betas")
    ema_start: float = opt(0.996, "EMA momentum at the start")
    ema_end: float = opt(1.0, "EMA momentum at the end")
    clip_grad: float = opt(1.0, "gradient norm clip")
    nonfinite_patience: int = opt(5, "stop after this many consecutive NaN/Inf steps (each is skipped)")
    amp: str = opt("auto", "autocast dtype (auto: bf16 where supported)", ("auto", "bf16", "fp16", "off"))
    # runtime
    device: str = opt("auto", "device", ("auto", "cpu", "cuda"))
    value_checks: str = opt("auto", "NaN/index checks of the blocks (host syncs): auto = on for CPU, off for CUDA",
                            ("auto", "on", "off"))
    seed: int = opt(0, "seed of weights, data order, augmentations and masks")
    workers: int = opt(2, "data loader workers")
    val_fraction: float = opt(0.2, "held-out fraction of a folder (stratified)")
    log_every: int = opt(10, "steps between metrics.jsonl records")
    log_to: str = opt("tensorboard", "also log to: comma-separated tensorboard,csv,wandb (wandb offline unless WANDB_MODE), or none")
    print_every: int = opt(50, "steps between plain progress lines when not on a terminal")
    eval_every: int = opt(0, "steps between validation kNN (0: every 5 epochs)")
    monitor_every: int = opt(100, "steps between collapse diagnostics (0: never)")
    keep_best: int = opt(2, "best checkpoints kept")
    max_steps: int = opt(0, "cap of the schedule length in optimizer steps (0: epochs x steps per epoch)")
    stop_at: int = opt(0, "stop after this many steps, schedules unchanged (an interruption)")
    final_eval: bool = opt(True, "kNN + linear probe of the target encoder at the end")
    compile: bool = opt(False, "torch.compile the encoder and predictor")
    fsdp: bool = opt(False, "under torchrun: shard encoder, predictor and EMA target with FSDP2 (fully_shard); "
                            "checkpoints as a torch.distributed.checkpoint folder OUT/last.dcp")


def parse_config(argv: list[str] | None = None) -> Config:
    """Preset defaults, then command-line overrides (``--embed-dim 256`` etc.)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default="cifar", choices=sorted(PRESETS))
    preset = pre.parse_known_args(argv)[0].preset
    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(Config)}
    defaults.update(PRESETS[preset], preset=preset)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Config):
        flag, value, meta = "--" + f.name.replace("_", "-"), defaults[f.name], f.metadata
        help_text = f"{meta['help']} (default: {value})"
        if isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value, help=meta["help"])
        elif isinstance(value, tuple):
            kind = int if all(isinstance(v, int) for v in value) else float
            n = "+" if f.name in ("level_weights", "proj_dims") else len(value)
            parser.add_argument(flag, type=kind, nargs=n, default=value, help=help_text, metavar="X")
        else:
            kind = type(value) if value is not None else str
            parser.add_argument(flag, type=kind, default=value, choices=meta["choices"], help=help_text)
    args = vars(parser.parse_args(argv))
    cfg = Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in args.items()})
    given = sys.argv[1:] if argv is None else argv
    if cfg.data in (None, "", "digits"):  # the embedded default: a few CPU minutes end to end
        for name, value in DIGITS.items():
            if not any(a.split("=")[0] == "--" + name.replace("_", "-") for a in given):
                setattr(cfg, name, value)
    if not 1 <= cfg.jepa_views <= cfg.views:
        parser.error(f"--jepa-views must be in [1, --views {cfg.views}], got {cfg.jepa_views}")
    return cfg


# -----------------------------------------------------------------------------
# Builders


def build_models(cfg: Config, device: torch.device):
    encoder = ViTEncoder(img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim, depth=cfg.depth,
                         num_heads=cfg.num_heads, pos_embed=cfg.pos_embed, drop_path_rate=cfg.drop_path).to(device)
    grid = encoder.default_grid
    predictor = HierarchicalPredictor(grid_size=grid, embed_dim=cfg.embed_dim, predictor_dim=cfg.pred_dim,
                                      depth=cfg.pred_depth, num_heads=cfg.pred_heads, num_levels=cfg.levels,
                                      mode=cfg.predictor_mode,
                                      pos_embed=cfg.pos_embed).to(device)
    masker = MultiBlockMasker(grid_size=grid, num_targets=cfg.num_targets, target_scale=cfg.target_scale,
                              context_scale=cfg.context_scale, levels=cfg.levels, truncate=cfg.mask_truncate)
    return encoder, predictor, masker


def build_data(cfg: Config, rank: int, world: int, master: bool):
    """Pretraining loader (one item = this rank's share of a global batch) and eval loaders."""
    pretrain_set, eval_train, eval_val = split_datasets(
        cfg.data, val_fraction=cfg.val_fraction, seed=cfg.seed, img_size=cfg.img_size, root=cfg.data_root,
        download=cfg.download and master, views=cfg.views, crop_scale=cfg.crop_scale,
        color_jitter=cfg.color_jitter, grayscale=cfg.grayscale)
    if cfg.batch_size % (world * cfg.accum_steps):
        raise ValueError(f"--batch-size {cfg.batch_size} must be a multiple of {world} ranks x "
                         f"{cfg.accum_steps} accumulation steps")
    sampler = MicroBatchSampler(pretrain_set, global_batch_size=cfg.batch_size, rank=rank, world_size=world,
                                seed=cfg.seed, micro_batches=cfg.accum_steps)
    loader = DataLoader(SeededDataset(pretrain_set), batch_size=sampler.local_batch_size, sampler=sampler,
                        drop_last=True, num_workers=cfg.workers, persistent_workers=cfg.workers > 0,
                        generator=torch.Generator().manual_seed(cfg.seed))  # keeps the global RNG untouched
    eval_loaders = [DataLoader(ds, batch_size=256, num_workers=cfg.workers) for ds in (eval_train, eval_val)]
    return sampler, loader, eval_loaders


def build_optimizer(cfg: Config, modules, total_steps: int):
    groups = param_groups_for_weight_decay(*modules, weight_decay=cfg.wd_start)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)
    scheduler = OptimizerScheduler(optimizer, total_steps=total_steps, warmup_steps=min(cfg.warmup_steps, total_steps),
                                   lr=(cfg.lr * 0.2, cfg.lr, cfg.min_lr), weight_decay=(cfg.wd_start, cfg.wd_end))
    return optimizer, scheduler


# -----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(argv)
    rank, world, device, owns_group = setup_distributed(cfg.device)
    master = rank == 0
    os.makedirs(cfg.out, exist_ok=True)
    torch.manual_seed(cfg.seed)  # identical initial weights (and EMA targets) on every rank
    amp = autocast_dtype(cfg.amp, device)
    checks = cfg.value_checks == "on" or (cfg.value_checks == "auto" and device.type == "cpu")

    # 1. Data, models, terms, optimiser, schedules, EMA target.
    encoder, predictor, masker = build_models(cfg, device)  # first: --final-eval rebuilds the same init
    sampler, loader, eval_loaders = build_data(cfg, rank, world, master)
    local_batch = sampler.local_batch_size
    steps_per_epoch = sampler.batches_per_epoch
    total_steps = min(max(1, steps_per_epoch * cfg.epochs), cfg.max_steps or steps_per_epoch * cfg.epochs)
    terms = TermSet(cfg, distributed=world > 1).to(device)
    criterion = LatentPredictionLoss(loss_type=cfg.loss, level_weights=cfg.level_weights[: cfg.levels],
                                     gather_distributed=world > 1)
    # DDP-wrapped, or FSDP2-sharded with --fsdp (fsdp.py); the EMA target copied first, sharded alike.
    target = EMATarget(encoder, total_steps=total_steps, momentum=(cfg.ema_start, cfg.ema_end))
    encoder, predictor = wrap_models(cfg, encoder, predictor, target, world)
    optimizer, scheduler = build_optimizer(cfg, (unwrap_module(encoder), unwrap_module(predictor), terms),
                                           total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    guard = NonFiniteGuard(patience=cfg.nonfinite_patience)
    ckpt_io = CheckpointIO(cfg, master=master, encoder=encoder, predictor=predictor, target=target, terms=terms,
                           optimizer=optimizer)
    step_encoder, step_predictor = (torch.compile(encoder), torch.compile(predictor)) if cfg.compile \
        else (encoder, predictor)
    best = BestCheckpoints(cfg.out, keep=cfg.keep_best, mode="max", metric_name="knn_top1") \
        if master and not cfg.fsdp else None

    def training_state() -> dict:
        return {"encoder": unwrap_module(encoder).state_dict(), "predictor": unwrap_module(predictor).state_dict(),
                "target": target.state_dict(), "terms": terms.state_dict(), "optimizer": ckpt_io.optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "guard": guard.state_dict(),
                "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "trained_s": budget.elapsed(),
                "total_steps": scheduler.total_steps, "config": dataclasses.asdict(cfg)}

    # 2. Resume: weights, EMA, terms, optimiser, schedules, guard and loop position (the RNG
    #    streams are re-derived from (seed, epoch, batch), so nothing else is needed).
    step, epoch, batch_in_epoch, trained_s = 0, 0, 0, 0.0
    last_path = ckpt_io.last_path
    ckpt = None
    if cfg.resume and cfg.resume_fallback:  # last.pt, last.pt.prev, best-*.pt newest first
        ckpt = load_latest_good(cfg.out, map_location=device)
    elif cfg.resume and os.path.exists(last_path):
        ckpt = ckpt_io.load(last_path, map_location=device)
    if ckpt is not None:
        for module, key in ((unwrap_module(encoder), "encoder"), (unwrap_module(predictor), "predictor"),
                            (target, "target"), (terms, "terms"), (ckpt_io.optimizer, "optimizer"), (scaler, "scaler"),
                            (guard, "guard")):
            module.load_state_dict(ckpt[key])
        step, epoch, batch_in_epoch, trained_s = ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"], ckpt["trained_s"]
        if cfg.time_budget_min > 0:  # keep the fitted schedule length until it is refitted
            total_steps = max(ckpt["total_steps"], step + 1, scheduler.warmup_steps)
        set_schedule_length(total_steps, scheduler, target)
        scheduler.load_state_dict(ckpt["scheduler"])
        if master:
            print(f"resumed from {ckpt.path} at step {step} (epoch {epoch})")
    elif master:
        with open(os.path.join(cfg.out, "config.json"), "w") as fh:
            json.dump(dataclasses.asdict(cfg), fh, indent=2)
    budget = TimeBudget(minutes=cfg.time_budget_min, warmup_steps=scheduler.warmup_steps,
                        cap=min(steps_per_epoch * cfg.epochs, cfg.max_steps or steps_per_epoch * cfg.epochs),
                        spent_s=trained_s)
    log = RunLog(cfg.out, enabled=master, total_steps=total_steps, step=step, budget=budget,
                 print_every=cfg.print_every, log_to=cfg.log_to, config=dataclasses.asdict(cfg))
    eval_every = cfg.eval_every or 5 * steps_per_epoch
    autocast = lambda: torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None)  # noqa: E731
    micro = local_batch // cfg.accum_steps
    vj = cfg.jepa_views

    # 3. The loop: one flat loop over optimizer steps.
    stop = step >= total_steps
    with value_checks(checks):  # decided once for the whole run (host syncs on a GPU)
        while not stop:
            sampler.set_epoch(epoch, start_batch=batch_in_epoch)
            for images, _labels in loader:
                # 3.1 Data and masks: masks for the whole global batch (x JEPA views) from a
                #     (seed, epoch, batch) generator; this rank takes its rows.
                seed = sample_seed(cfg.seed, epoch, batch_in_epoch)
                images = images.to(device, non_blocking=True)
                images = images if images.ndim == 5 else images[:, None]  # (B, V, C, H, W)
                gen = torch.Generator().manual_seed(sample_seed(cfg.seed, epoch, batch_in_epoch, 0x6D61736B))
                masks = masker(cfg.batch_size * vj, generator=gen).to(device)
                torch.manual_seed(sample_seed(cfg.seed, epoch, batch_in_epoch, rank))  # any global-RNG draw
                losses = []
                for m in range(cfg.accum_steps):
                    # Micro-batch m holds the same global rows on any number of ranks (the
                    # sampler's order); drop-path draws per sample from (seed, epoch, batch, row).
                    rows = sampler.micro_rows(m)
                    mb_masks = masks.rows(rows.start * vj, rows.stop * vj)
                    x = images[m * micro:(m + 1) * micro]
                    with no_sync(encoder, predictor, skip=world > 1 and m < cfg.accum_steps - 1), \
                            sample_seeded_drop_path(encoder, row_seeds(seed, rows, device)):
                        # 3.2 Forward: EMA targets on every patch, context encoder + predictor on the rest.
                        jepa_images = x[:, :vj].flatten(0, 1)
                        with autocast():
                            with torch.no_grad():
                                full = target(jepa_images)
                                targets = hierarchical_targets(full.tokens.float(), grid_size=full.grid_size,
                                                               targets=mb_masks.targets)
                            ctx = step_encoder(jepa_images, keep=mb_masks.context)
                            preds = step_predictor(ctx.tokens, context_indices=mb_masks.context,
                                                   targets=mb_masks.targets, grid_size=ctx.grid_size)
                        # 3.3 Loss: latent prediction plus the optional terms.
                        loss, logs = criterion([p.float() for p in preds], targets, [t.valid for t in mb_masks.targets],
                                               return_terms=True)
                        batch = StepBatch(images=x, context=ctx, target=full, encoder=step_encoder,
                                          predictor=step_predictor, target_encoder=target, latent_loss=criterion,
                                          autocast=autocast, rows=rows, global_batch=cfg.batch_size, seed=seed,
                                          jepa_views=vj)
                        extra = terms(batch)
                        loss = loss + extra.total
                        logs.update(extra.terms)
                        # 3.4 Backward (DDP syncs gradients on the last micro-batch only).
                        scaler.scale(loss / cfg.accum_steps).backward()
                    losses.append(loss.detach())
                loss = torch.stack(losses).mean()
                batch_in_epoch += 1
                # 3.5 Optimizer step; a NaN/Inf loss or gradient skips it and the EMA update
                #     (decided jointly by all ranks) and is logged.
                average_gradients(terms, world)
                sched = scheduler.current()
                scaler.unscale_(optimizer)
                grad_norm = clip_gradients([p for g in optimizer.param_groups for p in g["params"]], cfg.clip_grad)
                if not guard.check(loss, *(() if scaler.is_enabled() else (grad_norm,)), step=step + 1):
                    optimizer.zero_grad(set_to_none=True)
                    scaler.update()
                    log.write({"step": step, "skipped_nonfinite": True, "loss": loss.item(),
                               "grad_norm": float(grad_norm), "consecutive": guard.consecutive,
                               "skipped_total": guard.skipped})
                    if master:
                        print(f"WARNING: non-finite loss {loss.item()} (grad norm {float(grad_norm)}) after step "
                              f"{step}: step skipped ({guard.consecutive} in a row, {guard.skipped} in total)",
                              flush=True)
                    continue
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                # 3.6 EMA: the target encoder, then the terms' EMA copies, with one momentum.
                momentum = target.momentum
                target.update(encoder)
                terms.after_step(momentum)
                step += 1
                fitted = budget.fit(step)  # a time budget refits the schedules' length
                if fitted is not None:
                    total_steps = fitted
                    set_schedule_length(total_steps, scheduler, target)
                # 3.7 Log, monitor collapse.
                record = None
                if step % cfg.log_every == 0 or step == 1:
                    record = {"step": step, "epoch": epoch, "loss": loss.item(), "lr": sched["lr"],
                              "wd": sched["weight_decay"], "momentum": momentum, "grad_norm": float(grad_norm),
                              "time_min": budget.elapsed() / 60, **{k: float(v.detach()) for k, v in logs.items()},
                              **terms.log_values()}
                log.train_step(step, total_steps, local_batch * world, record)
                if cfg.monitor_every and step % cfg.monitor_every == 0:
                    log.monitor(step, full.tokens)
                # 3.8 Evaluate (online encoder) and checkpoint (rank 0; every rank under FSDP).
                if ckpt_io.writes and (step % eval_every == 0 or step >= total_steps):
                    val = validation_knn(unwrap_module(encoder), eval_loaders, device)
                    log.write({"step": step, "val": True, "encoder": "context", "time_min": budget.elapsed() / 60,
                               **val}, prefix="val")
                    state = training_state()
                    ckpt_io.save(last_path, state)
                    if best is not None:
                        best.update(step, val["knn_top1"], state)
                # 3.9 Stop at the end of the schedule, the budget or --stop-at (all ranks together).
                spent = budget.spent()
                if world > 1:
                    flag = torch.tensor([float(spent)], device=device)
                    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                    spent = bool(flag.item())
                if step >= total_steps or spent or (cfg.stop_at and step >= cfg.stop_at):
                    stop = True
                    break
            else:
                epoch, batch_in_epoch = epoch + 1, 0
    if ckpt_io.writes:
        ckpt_io.save(last_path, training_state())
    log.close()

    # 4. Final evaluation on the held-out split: the EMA target and the online encoder, beside
    #    the same encoder at its initial weights and the raw pixels.
    result: dict = {"steps": step, "train_minutes": budget.elapsed() / 60}
    if ckpt_io.writes and cfg.final_eval:  # every rank under FSDP (a forward is a collective)
        torch.manual_seed(cfg.seed)
        random_init = build_models(cfg, device)[0]
        result.update(evaluate_encoder(target.module, eval_loaders, device))
        result["online"] = evaluate_encoder(unwrap_module(encoder), eval_loaders, device)
        result["random_init"] = evaluate_encoder(random_init, eval_loaders, device)
        result["raw_pixels"] = pixel_baseline(eval_loaders)
        if master:
            with open(os.path.join(cfg.out, "eval.json"), "w") as fh:
                json.dump(result, fh, indent=2)
            print(format_result(result))
    if owns_group:
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
