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

    # continue a run from RUN/last.pt
    python examples/train_hjepa.py --data DIR --out RUN --resume

What one step does: the DataLoader workers draw multi-block masks (MultiBlockMasker
inside MaskCollator); the EMA target encoder sees every patch and its tokens are pooled
into one target set per hierarchy level; the context encoder sees only the context
patches (token dropping); the HierarchicalPredictor predicts every level's target blocks;
the latent loss (smooth-L1 to layer-normed targets, level weights 1.0/0.7/0.5) plus an
optional SIGReg or VICReg term is minimised with AdamW; the EMA target is updated after
optimizer.step().

Writes RUN/last.pt, RUN/best-*.pt (by validation kNN top-1), RUN/metrics.jsonl,
RUN/config.json, RUN/eval.json and TensorBoard scalars under RUN/tb.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from data import split_datasets  # noqa: E402

from jepa_blocks import (  # noqa: E402
    EMATarget,
    HierarchicalPredictor,
    LatentPredictionLoss,
    MaskCollator,
    MultiBlockMasker,
    SIGRegLoss,
    VICRegLoss,
    ViTEncoder,
    hierarchical_targets,
)
from jepa_blocks.evaluation import (  # noqa: E402
    collapse_stats,
    extract_features,
    is_collapsed,
    knn_accuracy,
    linear_probe,
    pool_tokens,  # noqa: E402
)
from jepa_blocks.training import (  # noqa: E402
    BestCheckpoints,
    OptimizerScheduler,
    load_checkpoint,
    param_groups_for_weight_decay,
    rng_state,
    save_checkpoint,
    set_rng_state,
)

# -----------------------------------------------------------------------------
# Configuration: one dataclass; presets fill defaults; every field is a CLI flag.

PRESETS: dict[str, dict] = {
    # 32 px images, patch 4 (8x8 grid), ViT-Tiny width at depth 6: at this CPU budget more
    # steps beat a bigger model (see benchmarks/RESULTS.md for the tuning runs).
    # Tuned on the cifar10-5k validation split (benchmarks/RESULTS.md): a VICReg term between
    # the pooled context tokens and the pooled target tokens of a second crop, and a faster
    # EMA start (0.98, so the target follows the online encoder within a 20-minute run),
    # gave the best short-budget features.
    "cifar": dict(img_size=32, patch_size=4, embed_dim=192, depth=6, num_heads=3, pred_dim=96, pred_depth=3,
                  pred_heads=3, batch_size=128, lr=1e-3, warmup_steps=200, reg="vicreg", reg_weight=0.05,
                  views=2, ema_start=0.98, workers=1),
    # 224 px images, patch 16 (14x14 grid), ViT-Small-like encoder.
    "imagenet": dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6, pred_dim=192,
                     pred_depth=6, pred_heads=6, batch_size=128, lr=1.5e-3, warmup_steps=2000),
}


@dataclass
class Config:
    preset: str = "cifar"
    data: str | None = None  # folder, cifar10/cifar100/stl10, or None for the embedded digits
    data_root: str = "data"  # where torchvision sets live
    download: bool = False
    out: str = "runs/hjepa"
    resume: bool = False
    # model
    img_size: int = 32
    patch_size: int = 4
    embed_dim: int = 192
    depth: int = 6
    num_heads: int = 3
    pos_embed: str = "sincos"
    pred_dim: int = 96
    pred_depth: int = 3
    pred_heads: int = 3
    levels: int = 3
    level_weights: tuple[float, ...] = (1.0, 0.7, 0.5)
    # masking
    num_targets: int = 4
    target_scale: tuple[float, float] = (0.15, 0.2)
    context_scale: tuple[float, float] = (0.85, 1.0)
    # objective
    loss: str = "smooth_l1"
    reg: str = "none"  # none | sigreg | vicreg
    reg_weight: float = 0.0  # 0: the regulariser's default (sigreg 0.005, vicreg 0.01)
    views: int = 1  # 2: a second crop whose pooled target features the vicreg term is matched to
    crop_scale: tuple[float, float] = (0.3, 1.0)
    # optimisation
    batch_size: int = 128
    accum_steps: int = 1
    epochs: int = 100
    time_budget_min: float = 0.0  # 0: no budget; else stop cleanly when spent
    lr: float = 1e-3
    min_lr: float = 1e-6
    warmup_steps: int = 200
    wd_start: float = 0.04
    wd_end: float = 0.4
    betas: tuple[float, float] = (0.9, 0.95)
    ema_start: float = 0.996
    ema_end: float = 1.0
    clip_grad: float = 1.0
    amp: str = "auto"  # auto | bf16 | fp16 | off
    # runtime
    device: str = "auto"
    seed: int = 0
    workers: int = 2
    val_fraction: float = 0.2
    log_every: int = 10
    eval_every: int = 0  # optimizer steps between validation kNN; 0: every 5 epochs
    monitor_every: int = 100
    keep_best: int = 2
    max_steps: int = 0  # stop after this many optimizer steps (0: unlimited); used by tests
    final_eval: bool = True
    compile: bool = False
    extra: dict = field(default_factory=dict)


def parse_config(argv: list[str] | None = None) -> Config:
    """Preset defaults, then command-line overrides (``--embed-dim 256`` etc.)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default="cifar", choices=sorted(PRESETS))
    preset = pre.parse_known_args(argv)[0].preset
    defaults = {**dataclasses.asdict(Config()), **PRESETS[preset], "preset": preset}
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Config):
        if f.name == "extra":
            continue
        flag, value = "--" + f.name.replace("_", "-"), defaults[f.name]
        if isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        elif isinstance(value, tuple):
            parser.add_argument(flag, type=float, nargs=len(value) if f.name != "level_weights" else "+",
                                default=value)
        else:
            kind = type(value) if value is not None else str
            choices = sorted(PRESETS) if f.name == "preset" else None
            parser.add_argument(flag, type=kind, default=value, choices=choices)
    args = vars(parser.parse_args(argv))
    cfg = Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in args.items()})
    given = sys.argv[1:] if argv is None else argv
    if cfg.data in (None, "", "digits") and not any(a.startswith("--epochs") for a in given):
        cfg.epochs = 15  # the embedded digits default: a few CPU minutes end to end
    return cfg


# -----------------------------------------------------------------------------
# Small named helpers


def setup_distributed(cfg: Config) -> tuple[int, int, torch.device]:
    """Initialise DDP under torchrun (gloo on CPU, nccl on CUDA); return rank, world, device."""
    want_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if want_cuda else "gloo")
    if want_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def autocast_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """bf16 where the hardware supports it (CPU with AVX512-BF16, Ampere+ GPUs)."""
    if cfg.amp == "off":
        return None
    if cfg.amp == "fp16":
        return torch.float16
    if cfg.amp == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if _cpu_has_bf16() else None


def _cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as fh:
            flags = fh.read()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        return False


def build_models(cfg: Config, device: torch.device):
    encoder = ViTEncoder(img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim, depth=cfg.depth,
                         num_heads=cfg.num_heads, pos_embed=cfg.pos_embed).to(device)
    grid = encoder.default_grid
    predictor = HierarchicalPredictor(grid_size=grid, embed_dim=cfg.embed_dim, predictor_dim=cfg.pred_dim,
                                      depth=cfg.pred_depth, num_heads=cfg.pred_heads, num_levels=cfg.levels,
                                      pos_embed=cfg.pos_embed).to(device)
    masker = MultiBlockMasker(grid_size=grid, num_targets=cfg.num_targets, target_scale=cfg.target_scale,
                              context_scale=cfg.context_scale, levels=cfg.levels)
    return encoder, predictor, masker


def build_regulariser(cfg: Config, distributed: bool):
    if cfg.reg == "sigreg":
        return SIGRegLoss(num_directions=256, gather_distributed=distributed), cfg.reg_weight or 0.005
    if cfg.reg == "vicreg":
        return VICRegLoss(gather_distributed=distributed), cfg.reg_weight or 0.01
    if cfg.reg != "none":
        raise ValueError(f"--reg must be none, sigreg or vicreg, got {cfg.reg!r}")
    return None, 0.0


@torch.no_grad()
def pooled_features(encoder, loaders, device, amp) -> list[torch.Tensor]:
    """Average-pooled final tokens and labels of each loader: ``[x0, y0, x1, y1, ...]``.

    Runs ``encoder`` in eval mode and restores its previous mode afterwards.
    """
    was_training = encoder.training
    encoder.eval()

    def embed(images):
        return pool_tokens(encoder(images).tokens.float())

    out = [t for loader in loaders for t in extract_features(embed, loader, device=device, amp_dtype=amp)]
    encoder.train(was_training)
    return out


def validation_knn(encoder, train_loader, val_loader, device, amp) -> dict[str, float]:
    """kNN top-1 (k=20, cosine, T=0.07) of average-pooled tokens on the validation split.

    The trainer passes the online context encoder (the network being optimised); the final
    evaluation and ``evaluate.py`` default to the EMA target encoder.
    """
    xtr, ytr, xva, yva = pooled_features(encoder, (train_loader, val_loader), device, amp)
    acc = knn_accuracy(xtr, ytr, xva, yva, k=(20,), temperature=0.07)
    return {"knn_top1": acc[20]}


def write_jsonl(path: str, record: dict) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, DDP) else model


# -----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(argv)
    rank, world, device = setup_distributed(cfg)
    master = rank == 0
    os.makedirs(cfg.out, exist_ok=True)
    torch.manual_seed(cfg.seed + rank)
    amp = autocast_dtype(cfg, device)

    # 1. Data: a stratified validation split is carved from the folder (labels only for eval).
    pretrain_set, eval_train_set, eval_val_set = split_datasets(
        cfg.data, val_fraction=cfg.val_fraction, seed=cfg.seed, img_size=cfg.img_size,
        root=cfg.data_root, download=cfg.download and master, views=cfg.views, crop_scale=cfg.crop_scale)
    encoder, predictor, masker = build_models(cfg, device)
    sampler = DistributedSampler(pretrain_set, num_replicas=world, rank=rank, seed=cfg.seed, drop_last=True) \
        if world > 1 else None
    local_batch = cfg.batch_size // (world * cfg.accum_steps)
    if local_batch < 1:
        raise ValueError(f"--batch-size {cfg.batch_size} is too small for {world} ranks x {cfg.accum_steps} accumulation")
    loader_gen = torch.Generator().manual_seed(cfg.seed)
    loader = DataLoader(pretrain_set, batch_size=local_batch, shuffle=sampler is None, sampler=sampler,
                        drop_last=True, num_workers=cfg.workers, collate_fn=MaskCollator(masker),
                        persistent_workers=cfg.workers > 0, generator=loader_gen)
    eval_loaders = [DataLoader(ds, batch_size=256, num_workers=cfg.workers) for ds in (eval_train_set, eval_val_set)]
    steps_per_epoch = len(loader) // cfg.accum_steps
    total_steps = max(1, steps_per_epoch * cfg.epochs)
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)

    # 2. Models, EMA target, losses, optimiser and schedules.
    target = EMATarget(encoder, total_steps=total_steps, momentum=(cfg.ema_start, cfg.ema_end))
    criterion = LatentPredictionLoss(loss_type=cfg.loss, level_weights=cfg.level_weights[: cfg.levels])
    regulariser, reg_weight = build_regulariser(cfg, world > 1)
    groups = param_groups_for_weight_decay(encoder, predictor, weight_decay=cfg.wd_start)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)
    scheduler = OptimizerScheduler(optimizer, total_steps=total_steps, warmup_steps=min(cfg.warmup_steps, total_steps),
                                   lr=(cfg.lr * 0.2, cfg.lr, cfg.min_lr), weight_decay=(cfg.wd_start, cfg.wd_end))
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    if world > 1:
        encoder = DDP(encoder)
        predictor = DDP(predictor)
    step_encoder, step_predictor = encoder, predictor
    if cfg.compile:
        step_encoder, step_predictor = torch.compile(encoder), torch.compile(predictor)
    best = BestCheckpoints(cfg.out, keep=cfg.keep_best, mode="max", metric_name="knn_top1") if master else None
    metrics_path = os.path.join(cfg.out, "metrics.jsonl")

    # 3. Resume: models, EMA, optimiser, schedules, scaler, RNG and loop position.
    step, epoch, trained_s = 0, 0, 0.0
    last_path = os.path.join(cfg.out, "last.pt")
    if cfg.resume and os.path.exists(last_path):
        ckpt = load_checkpoint(last_path, map_location=device)
        unwrap(encoder).load_state_dict(ckpt["encoder"])
        unwrap(predictor).load_state_dict(ckpt["predictor"])
        target.load_state_dict(ckpt["target"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        step, epoch, trained_s = ckpt["step"], ckpt["epoch"], ckpt["trained_s"]
        if cfg.time_budget_min > 0:  # keep the fitted schedule until it is re-fitted below
            total_steps = max(ckpt["total_steps"], step + 1)
        scheduler.total_steps = target.total_steps = total_steps
        set_rng_state(ckpt["rng"])
        if master:
            print(f"resumed from {last_path} at step {step} (epoch {epoch})")
    elif master:
        with open(os.path.join(cfg.out, "config.json"), "w") as fh:
            json.dump(dataclasses.asdict(cfg), fh, indent=2)

    def training_state() -> dict:
        return {"encoder": unwrap(encoder).state_dict(), "predictor": unwrap(predictor).state_dict(),
                "target": target.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "step": step,
                "epoch": epoch, "trained_s": elapsed(), "total_steps": total_steps, "rng": rng_state(),
                "config": dataclasses.asdict(cfg)}

    writer = None
    if master:
        try:
            from torch.utils.tensorboard import SummaryWriter
            writer = SummaryWriter(os.path.join(cfg.out, "tb"))
        except ImportError:
            print("tensorboard not installed: skipping TensorBoard scalars")
    eval_every = cfg.eval_every or 5 * steps_per_epoch
    budget_s = cfg.time_budget_min * 60 if cfg.time_budget_min > 0 else math.inf
    progress = None
    if master:
        from tqdm import tqdm
        progress = tqdm(total=total_steps, initial=step, dynamic_ncols=True, disable=not sys.stderr.isatty())

    # 4. The loop: one flat loop over optimizer steps.
    stop = step >= total_steps
    run_start = t_last = time.perf_counter()
    images_since, first_step, t_calib = 0, step, None

    def elapsed() -> float:  # wall-clock seconds of this run, earlier sessions included
        return trained_s + time.perf_counter() - run_start

    while not stop:
        if sampler is not None:
            sampler.set_epoch(epoch)
        loader_gen.manual_seed(cfg.seed * 1000 + epoch)  # data order depends on epoch only
        micro = 0
        for (images, _labels), masks in loader:
            images, masks = images.to(device, non_blocking=True), masks.to(device)
            other_view = None
            if images.ndim == 5:  # (B, views, C, H, W): JEPA on the first crop
                images, other_view = images[:, 0], images[:, 1]
            # 4a. Targets: EMA encoder on every patch, pooled per hierarchy level.
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                with torch.no_grad():
                    full = target(images)
                    targets = hierarchical_targets(full.tokens.float(), grid_size=full.grid_size,
                                                   targets=masks.targets)
                # 4b. Context encoder on the context patches only; predictor for every level.
                ctx = step_encoder(images, keep=masks.context)
                preds = step_predictor(ctx.tokens, context_indices=masks.context, targets=masks.targets)
            preds = [p.float() for p in preds]
            loss, terms = criterion(preds, targets, [t.valid for t in masks.targets])
            if regulariser is not None:
                pooled = pool_tokens(ctx.tokens.float(), ctx.valid)
                if cfg.reg == "sigreg":
                    reg = regulariser((pooled - pooled.mean(0)) / (pooled.std(0) + 1e-4))
                else:
                    other = full
                    if other_view is not None:
                        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                            other = target(other_view)
                    reg = regulariser(pooled, pool_tokens(other.tokens.float()))[0]
                terms["reg"] = reg.detach()
                loss = loss + reg_weight * reg
            scaler.scale(loss / cfg.accum_steps).backward()
            micro += 1
            images_since += images.shape[0] * world
            if micro % cfg.accum_steps:
                continue
            # 4c. Optimizer step, then the EMA update (schedules count optimizer steps).
            sched = scheduler.current()  # lr and weight decay of this optimizer step
            lr, wd = sched["lr"], sched["weight_decay"]
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], cfg.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            momentum = target.momentum
            target.update(encoder)
            step += 1
            # With a time budget, the schedules (lr, wd, EMA) are fitted to the steps the
            # budget allows: every 10 steps, total_steps is re-estimated from the mean wall-clock
            # time per step since step 10 of this run (robust to a busy machine).
            if math.isfinite(budget_s) and step == first_step + 10:
                t_calib = elapsed()
            if t_calib is not None and step >= first_step + 20 and step % 10 == 0:
                per_step = (elapsed() - t_calib) / (step - first_step - 10)
                fitted = step + max(1, int((budget_s - elapsed()) / per_step))
                total_steps = min(fitted, steps_per_epoch * cfg.epochs, cfg.max_steps or fitted)
                scheduler.total_steps = target.total_steps = total_steps
                scheduler.warmup_steps = min(cfg.warmup_steps, total_steps // 8)
                if progress is not None:
                    progress.total = total_steps
            if progress is not None:
                progress.update(1)
            # 4d. Logging, collapse monitoring, validation and checkpoints.
            if master and (step % cfg.log_every == 0 or step == 1):
                now = time.perf_counter()
                record = {"step": step, "epoch": epoch, "loss": loss.item(), "lr": lr, "wd": wd,
                          "momentum": momentum, "grad_norm": float(grad_norm),
                          "images_per_s": images_since / max(now - t_last, 1e-9), "time_min": elapsed() / 60,
                          **{k: v.item() for k, v in terms.items()}}
                t_last, images_since = now, 0
                write_jsonl(metrics_path, record)
                if writer is not None:
                    for k, v in record.items():
                        writer.add_scalar(f"train/{k}", v, step)
                if progress is not None:
                    progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", m=f"{momentum:.4f}",
                                         ips=f"{record['images_per_s']:.0f}")
                elif step % (cfg.log_every * 10) == 0 or step == 1:
                    print(f"step {step}/{total_steps} loss {record['loss']:.4f} lr {lr:.2e} "
                          f"m {momentum:.4f} {record['images_per_s']:.0f} img/s {elapsed() / 60:.1f} min", flush=True)
            if master and cfg.monitor_every and step % cfg.monitor_every == 0:
                stats = collapse_stats(pool_tokens(full.tokens.float()))
                collapsed, reason = is_collapsed(stats)
                write_jsonl(metrics_path, {"step": step, "monitor": True, **{f"feat_{k}": v for k, v in stats.items()}})
                if collapsed:
                    print(f"WARNING step {step}: representation collapse suspected: {reason}", flush=True)
            if step % eval_every == 0 or step >= total_steps:
                if master:
                    val = validation_knn(unwrap(encoder), *eval_loaders, device, amp)
                    write_jsonl(metrics_path, {"step": step, "val": True, "encoder": "context",
                                               "time_min": elapsed() / 60, **val})
                    if writer is not None:
                        writer.add_scalar("val/knn_top1", val["knn_top1"], step)
                    state = training_state()
                    save_checkpoint(last_path, state)
                    best.update(step, val["knn_top1"], state)
            spent = elapsed() >= budget_s
            if world > 1:  # every rank stops at the same step
                flag = torch.tensor([float(spent)], device=device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                spent = bool(flag.item())
            if step >= total_steps or spent:
                stop = True
                break
        else:
            epoch += 1
    if master:
        save_checkpoint(last_path, training_state())
    if progress is not None:
        progress.close()

    # 5. Final evaluation on the validation split: kNN and linear probe (target encoder).
    result: dict = {"steps": step, "train_minutes": elapsed() / 60}
    if master and cfg.final_eval:
        result.update(evaluate_encoder(target.module, *eval_loaders, device, amp))
        with open(os.path.join(cfg.out, "eval.json"), "w") as fh:
            json.dump(result, fh, indent=2)
        print(json.dumps(result, indent=2))
    if writer is not None:
        writer.close()
    if world > 1:
        dist.destroy_process_group()
    return result


def evaluate_encoder(encoder, train_loader, val_loader, device, amp) -> dict:
    """kNN (k = 10, 20, 200) and a linear probe on average-pooled final tokens."""
    xtr, ytr, xva, yva = pooled_features(encoder, (train_loader, val_loader), device, amp)
    knn = knn_accuracy(xtr, ytr, xva, yva, k=(10, 20, 200), temperature=0.07)
    probe = linear_probe(xtr, ytr, xva, yva, weight_decays=(1e-4, 1e-3, 1e-2, 1e-1))
    stats = collapse_stats(xtr)
    return {"knn_top1": knn[20], **{f"knn_top1_k{k}": v for k, v in knn.items()},
            "linear_top1": probe.top1, "effective_rank": stats["effective_rank"]}


if __name__ == "__main__":
    main()
