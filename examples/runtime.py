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
from jepa_blocks.training import ResumableSampler, sample_seed

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


class MicroBatchSampler(ResumableSampler):
    """:class:`ResumableSampler` whose local batch follows the global batch's micro-batch order.

    Each global batch of ``B`` samples is cut into ``micro_batches`` consecutive micro-batches
    of ``B / micro_batches`` samples, and rank ``r`` of ``W`` takes the ``r``-th contiguous
    share of each, micro-batch after micro-batch. So micro-batch ``m`` of every rank together
    holds global rows ``[m * B / M, (m + 1) * B / M)`` whatever ``W``: with gradient
    accumulation the losses computed on the global micro-batch (the latent loss's token
    mean, the regularisers' gathers) see the same samples on one process and on ``W``.
    With ``micro_batches=1`` it is ``ResumableSampler``.
    """

    def __init__(self, data_source, *, micro_batches: int, **kwargs) -> None:
        super().__init__(data_source, **kwargs)
        if micro_batches < 1 or self.global_batch_size % (micro_batches * self.world_size):
            raise ValueError(f"global_batch_size {self.global_batch_size} must be a multiple of "
                             f"{self.world_size} ranks x {micro_batches} micro-batches")
        self.micro_batches = micro_batches

    def micro_rows(self, m: int) -> slice:
        """Global-batch rows of this rank's part of micro-batch ``m``."""
        per_micro = self.global_batch_size // self.micro_batches
        share = per_micro // self.world_size
        return slice(m * per_micro + self.rank * share, m * per_micro + (self.rank + 1) * share)

    def __iter__(self):
        order = self._order()
        for b in range(self.start_batch, self.batches_per_epoch):
            for m in range(self.micro_batches):
                rows = self.micro_rows(m)
                for index in order[b * self.global_batch_size + rows.start: b * self.global_batch_size + rows.stop]:
                    yield index, sample_seed(self.seed, self.epoch, index)


def row_seeds(seed: int, rows: slice, device: torch.device) -> torch.Tensor:
    """Per-sample seeds ``(len(rows),)`` int64 of global-batch rows, for the drop-path draws:
    a function of the step's ``(seed, epoch, batch)`` seed and the row, not of the rank."""
    return torch.tensor([sample_seed(seed, 0x64726F70, i) for i in range(rows.start, rows.stop)],
                        dtype=torch.int64, device=device)


def no_sync(*models, skip: bool) -> contextlib.ExitStack:
    """No gradient sync of every model while ``skip`` (micro-batches before the last): DDP's
    ``no_sync``, or FSDP2's ``set_requires_gradient_sync(False)`` (restored on exit)."""
    stack = contextlib.ExitStack()
    for model in models if skip else ():
        if hasattr(model, "set_requires_gradient_sync"):  # torch.distributed.fsdp.FSDPModule
            model.set_requires_gradient_sync(False)
            stack.callback(model.set_requires_gradient_sync, True)
        else:
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
    """metrics.jsonl, TensorBoard / CSV / wandb scalars and progress output of the master process.

    ``log_to`` (``--log-to``) picks the sinks beside metrics.jsonl, comma-separated:
    ``tensorboard`` (RUN/tb), ``csv`` (RUN/metrics.csv, one ``step,group,name,value`` row
    per scalar, appended across resumes), ``wandb`` (imported only then; offline into
    RUN/wandb unless ``WANDB_MODE`` says otherwise; ``WANDB_PROJECT`` names the project),
    or ``none``.

    On a terminal a tqdm bar shows progress (over the budget's seconds when there is a time
    budget, so the ETA is right from the first step); otherwise (nohup, SLURM) a plain line
    is printed every ``print_every`` steps.
    """

    SINKS = ("tensorboard", "csv", "wandb")

    def __init__(self, out: str, *, enabled: bool, total_steps: int, step: int, budget: TimeBudget,
                 print_every: int, log_to: str = "tensorboard", config: dict | None = None) -> None:
        sinks = [s.strip() for s in log_to.split(",") if s.strip() and s.strip() != "none"]
        bad = [s for s in sinks if s not in self.SINKS]
        if bad:
            raise ValueError(f"--log-to must be 'none' or comma-separated names from {', '.join(self.SINKS)}; "
                             f"got {log_to!r} (unknown: {', '.join(bad)})")
        self.enabled, self.budget, self.print_every = enabled, budget, print_every
        self.path = os.path.join(out, "metrics.jsonl")
        self.writer = self.bar = self.csv = self.wandb = None
        self.t_last, self.images = time.perf_counter(), 0
        if not enabled:
            return
        if "tensorboard" in sinks:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(os.path.join(out, "tb"))
            except ImportError:
                print("tensorboard not installed: skipping TensorBoard scalars")
        if "csv" in sinks:  # long format (one scalar a row), appended across resumes
            path = os.path.join(out, "metrics.csv")
            new = not os.path.exists(path) or os.path.getsize(path) == 0
            self.csv = open(path, "a", newline="")
            if new:
                self.csv.write("step,group,name,value\n")
        if "wandb" in sinks:  # imported only when asked; offline unless WANDB_MODE says otherwise
            try:
                import wandb
            except ImportError as err:
                raise ImportError("--log-to wandb needs the wandb package: pip install wandb") from err
            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "jepa-blocks"), dir=out,
                                    mode=os.environ.get("WANDB_MODE", "offline"), config=config)
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
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                   and k != "step"}
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(f"{prefix}/{k}", v, record["step"])
        if self.csv is not None:
            self.csv.writelines(f"{record['step']},{prefix},{k},{v!r}\n" for k, v in scalars.items())
            self.csv.flush()
        if self.wandb is not None:
            self.wandb.log({f"{prefix}/{k}": v for k, v in scalars.items()}, step=record["step"])

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
        if self.csv is not None:
            self.csv.close()
        if self.wandb is not None:
            self.wandb.finish()


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

    Runs ``encoder`` in eval mode and restores its previous mode afterwards. An FSDP2 root
    (``--fsdp``: every rank calls this) is resharded afterwards: a forward without backward
    leaves its parameters gathered.
    """
    was_training = encoder.training
    encoder.eval()
    try:
        embed = feature_fn(encoder, levels=levels)
        return [t for loader in loaders for t in extract_features(embed, loader, device=device)]
    finally:
        encoder.train(was_training)
        if hasattr(encoder, "reshard"):  # torch.distributed.fsdp.FSDPModule
            encoder.reshard()


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
