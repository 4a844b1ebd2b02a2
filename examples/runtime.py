"""Named helpers of the example trainer that are not about the objective.

Distributed set-up, the autocast dtype, the time budget (schedule refitting), run logging
(metrics.jsonl, TensorBoard, a progress bar on a terminal or plain lines in a log file),
and evaluation (the one feature-extraction setting shared with ``evaluate.py``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist

from jepa_blocks.evaluation import (
    collapse_stats,
    embedding_diagnostics,
    extract_features,
    is_collapsed,
    knn_accuracy,
    linear_probe,
    pool_tokens,
)

# -----------------------------------------------------------------------------
# Devices and processes


def setup_distributed(device: str) -> tuple[int, int, torch.device, bool]:
    """Initialise DDP under torchrun (gloo on CPU, nccl on CUDA).

    Args:
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.

    Returns:
        ``(rank, world_size, device, created)``; ``created`` says whether this call made
        the process group (a group set up by the caller, e.g. a test, is reused and kept).
    """
    want_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    created = False
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        if world > 1:
            dist.init_process_group("nccl" if want_cuda else "gloo")
            created = True
    if want_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local), created
    return rank, world, torch.device("cpu"), created


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``--amp`` (auto: bf16 where the hardware has it)."""
    if amp == "off":
        return None
    if amp == "fp16":
        return torch.float16
    if amp == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    try:
        with open("/proc/cpuinfo") as fh:
            flags = fh.read()
    except OSError:
        return None
    return torch.bfloat16 if "avx512_bf16" in flags or "amx_bf16" in flags else None


def average_gradients(module: torch.nn.Module, world: int) -> None:
    """Average a module's gradients over the ranks (what DDP does for the wrapped models)."""
    if world > 1:
        for p in module.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad.div_(world)


def no_sync(*models, skip: bool) -> contextlib.ExitStack:
    """DDP's ``no_sync`` of every model while ``skip`` (micro-batches before the last)."""
    stack = contextlib.ExitStack()
    for model in models if skip else ():
        stack.enter_context(model.no_sync())
    return stack


def set_schedule_length(total: int, scheduler, target) -> None:
    """Refit the schedules' length (lr, weight decay, EMA momentum) to ``total`` steps."""
    scheduler.total_steps = target.total_steps = total


def format_result(result: dict) -> str:
    """The final evaluation as a small table: trained encoders beside the two baselines."""
    rows = [("target (EMA) encoder", result), ("online encoder", result["online"]),
            ("random init", result["random_init"]), ("raw pixels", result["raw_pixels"])]
    lines = [f"after {result['steps']} steps ({result['train_minutes']:.1f} min), held-out split:",
             f"{'features':<22}{'kNN top-1':>10}{'linear':>9}"]
    lines += [f"{name:<22}{100 * r['knn_top1']:>9.1f}%{100 * r['linear_top1']:>8.1f}%" for name, r in rows]
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# Time budget


class TimeBudget:
    """Fit the schedules' length to the steps a wall-clock budget allows.

    Every ``every`` steps after a calibration phase, the total is re-estimated from the
    mean time per step since the ``calibrate``-th step of this session (robust to a busy
    start). Only the total changes: the warmup is never refitted, so the learning rate
    never jumps; the total never falls below ``warmup_steps + 1`` nor the current step.

    Args:
        minutes: The budget; ``0`` means none (``fit`` then always returns ``None``).
        warmup_steps: The schedule's warmup, a floor for the fitted total.
        cap: Upper bound of the fitted total (epochs x steps per epoch, ``--max-steps``).
        spent_s: Seconds already trained in earlier sessions of this run.
    """

    def __init__(self, *, minutes: float, warmup_steps: int, cap: int, spent_s: float = 0.0,
                 calibrate: int = 10, every: int = 10) -> None:
        self.budget_s = minutes * 60 if minutes > 0 else math.inf
        self.warmup_steps, self.cap, self.spent_s = warmup_steps, cap, spent_s
        self.calibrate, self.every = calibrate, every
        self.start = time.perf_counter()
        self.first_step: int | None = None
        self.t_calib: float | None = None

    @property
    def enabled(self) -> bool:
        return math.isfinite(self.budget_s)

    def elapsed(self) -> float:
        """Seconds trained by this run, earlier sessions included."""
        return self.spent_s + time.perf_counter() - self.start

    def spent(self) -> bool:
        return self.elapsed() >= self.budget_s

    def fit(self, step: int) -> int | None:
        """The refitted total after optimizer step ``step``, or ``None`` when not due."""
        if not self.enabled:
            return None
        if self.first_step is None:
            self.first_step = step - 1
        done = step - self.first_step
        if done == self.calibrate:
            self.t_calib = self.elapsed()
        if self.t_calib is None or done < 2 * self.calibrate or step % self.every:
            return None
        per_step = (self.elapsed() - self.t_calib) / (done - self.calibrate)
        fitted = step + max(1, int((self.budget_s - self.elapsed()) / per_step))
        return max(min(fitted, self.cap), self.warmup_steps + 1, step)

    def remaining_s(self) -> float:
        return max(0.0, self.budget_s - self.elapsed())


# -----------------------------------------------------------------------------
# Logging


class RunLog:
    """metrics.jsonl, TensorBoard scalars and progress output of the master process.

    On a terminal a tqdm bar shows progress (over the budget's seconds when there is a time
    budget, so the ETA is right from the first step); otherwise (nohup, SLURM) a plain line
    is printed every ``print_every`` steps.
    """

    def __init__(self, out: str, *, enabled: bool, total_steps: int, step: int, budget: TimeBudget,
                 print_every: int) -> None:
        self.enabled, self.budget, self.print_every = enabled, budget, print_every
        self.path = os.path.join(out, "metrics.jsonl")
        self.writer = self.bar = None
        self.t_last, self.images = time.perf_counter(), 0
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(os.path.join(out, "tb"))
        except ImportError:
            print("tensorboard not installed: skipping TensorBoard scalars")
        if sys.stderr.isatty():
            from tqdm import tqdm
            if budget.enabled:
                self.bar = tqdm(total=round(budget.budget_s), initial=round(budget.elapsed()), unit="s",
                                dynamic_ncols=True, bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s [{elapsed}<{remaining}{postfix}]")
            else:
                self.bar = tqdm(total=total_steps, initial=step, dynamic_ncols=True)

    def write(self, record: dict, *, prefix: str = "train") -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.writer.add_scalar(f"{prefix}/{k}", v, record["step"])

    def train_step(self, step: int, total: int, images: int, record: dict | None) -> None:
        """Count one optimizer step of ``images`` images; ``record`` (or None) is logged."""
        self.images += images
        if not self.enabled:
            return
        if record is not None:
            now = time.perf_counter()
            record["images_per_s"] = self.images / max(now - self.t_last, 1e-9)
            self.t_last, self.images = now, 0
            self.write(record)
        if self.bar is not None:
            self.bar.update(round(self.budget.elapsed()) - self.bar.n if self.budget.enabled else 1)
            if record is not None:
                self.bar.set_postfix(step=step, loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                     ips=f"{record['images_per_s']:.0f}")
        elif step == 1 or step % self.print_every == 0:
            eta = self.budget.remaining_s() if self.budget.enabled else None
            last = record or {}
            print(f"step {step}/{total} loss {last.get('loss', float('nan')):.4f} "
                  f"lr {last.get('lr', float('nan')):.2e} {self.budget.elapsed() / 60:.1f} min"
                  + (f", {eta / 60:.1f} min left" if eta is not None else ""), flush=True)

    def monitor(self, step: int, tokens: torch.Tensor) -> None:
        """Collapse diagnostics of pooled target features; warns when collapse is suspected."""
        if not self.enabled:
            return
        stats = embedding_diagnostics(pool_tokens(tokens.float()), seed=step)
        self.write({"step": step, "monitor": True, **{f"feat_{k}": v for k, v in stats.items()}}, prefix="monitor")
        collapsed, reason = is_collapsed(stats)
        if collapsed:
            print(f"WARNING step {step}: representation collapse suspected: {reason}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


# -----------------------------------------------------------------------------
# Evaluation: one feature setting for the trainer and evaluate.py


def feature_fn(encoder, *, levels: int = 0):
    """The one feature map of the trainer's validation, its final evaluation and
    ``evaluate.py``: average-pooled final tokens in float32 (no autocast), then for each of
    ``levels`` hierarchy levels the tokens pooled on that level's grid, flattened.

    Returns a function ``images (B, C, H, W) -> (B, D * (1 + sum of level cells))``.
    """
    from jepa_blocks.grid import pool_grid_tokens

    def embed(images: torch.Tensor) -> torch.Tensor:
        tokens = encoder(images).tokens.float()
        grid = encoder.grid_size_for(images)
        feats = [pool_tokens(tokens)] + [pool_grid_tokens(tokens, grid, level=lv).flatten(1) for lv in range(levels)]
        return torch.cat(feats, dim=1)

    return embed


@torch.no_grad()
def pooled_features(encoder, loaders, device, *, levels: int = 0) -> list[torch.Tensor]:
    """:func:`feature_fn` features and labels of each loader: ``[x0, y0, x1, y1, ...]``.

    Runs ``encoder`` in eval mode and restores its previous mode afterwards.
    """
    was_training = encoder.training
    encoder.eval()
    try:
        embed = feature_fn(encoder, levels=levels)
        return [t for loader in loaders for t in extract_features(embed, loader, device=device)]
    finally:
        encoder.train(was_training)


def validation_knn(encoder, loaders, device) -> dict[str, float]:
    """kNN top-1 (k=20, cosine, T=0.07) on the validation split."""
    xtr, ytr, xva, yva = pooled_features(encoder, loaders, device)
    return {"knn_top1": knn_accuracy(xtr, ytr, xva, yva, k=(20,), temperature=0.07)[20]}


def evaluate_encoder(encoder, loaders, device) -> dict[str, float]:
    """kNN (k = 10, 20, 200), a linear probe and the effective rank of pooled features."""
    xtr, ytr, xva, yva = pooled_features(encoder, loaders, device)
    knn = knn_accuracy(xtr, ytr, xva, yva, k=(10, 20, 200), temperature=0.07)
    probe = linear_probe(xtr, ytr, xva, yva, weight_decays=(1e-4, 1e-3, 1e-2, 1e-1))
    return {"knn_top1": knn[20], **{f"knn_top1_k{k}": v for k, v in knn.items()},
            "linear_top1": probe.top1, "effective_rank": collapse_stats(xtr)["effective_rank"]}


def pixel_baseline(loaders) -> dict[str, float]:
    """kNN and linear probe on the raw (normalised) pixels of the same split."""
    (xtr, ytr), (xva, yva) = [extract_features(lambda x: x.flatten(1).float(), ld) for ld in loaders]
    knn = knn_accuracy(xtr, ytr, xva, yva, k=(20,), temperature=0.07)
    probe = linear_probe(xtr, ytr, xva, yva, weight_decays=(1e-4, 1e-3, 1e-2, 1e-1))
    return {"knn_top1": knn[20], "linear_top1": probe.top1}
