"""Section 4, ``train_step``: images/s, FLOPs, MFU and peak memory of a full H-JEPA step."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import torch
from bench_encoder import build_encoder
from sizes import Results, Sizes
from timing import (
    MB,
    bf16_autocast,
    matmul_gflops,
    median_ms,
    num_threads,
    peak_memory_mb,
    sync,
    time_calls,
)

from jepa_blocks import (
    EMATarget,
    HierarchicalPredictor,
    LatentPredictionLoss,
    MultiBlockMasker,
    hierarchical_targets,
)
from jepa_blocks.training import param_groups_for_weight_decay

# The command line whose --compile-worker runs compiled_step_rate in a fresh process.
RUN_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "run.py")

PHASES = (
    "masks",
    "target",
    "hier_targets",
    "encoder",
    "predictor",
    "loss",
    "backward",
    "optimizer",
    "ema",
)


class TrainStep:
    """One H-JEPA optimisation step of the CIFAR preset (as in examples/train_hjepa.py).

    masker -> EMA target forward -> ``hierarchical_targets`` -> context encoder on the
    context tokens -> ``HierarchicalPredictor`` -> ``LatentPredictionLoss`` -> backward ->
    gradient clipping -> AdamW step -> EMA update. Images are random (the data pipeline is
    not part of the step); the masks are sampled inside the step.
    """

    def __init__(self, sizes: Sizes, device: torch.device, *, compile: bool = False) -> None:
        torch.manual_seed(0)
        self.device = device
        self.batch = sizes.batch
        self.encoder = build_encoder(sizes, device).train()
        grid = self.encoder.default_grid
        self.predictor = HierarchicalPredictor(
            grid_size=grid,
            embed_dim=sizes.embed_dim,
            predictor_dim=sizes.pred_dim,
            depth=sizes.pred_depth,
            num_heads=sizes.pred_heads,
            num_levels=sizes.levels,
        ).to(device)
        self.masker = MultiBlockMasker(grid_size=grid, levels=sizes.levels)
        self.target = EMATarget(self.encoder, total_steps=1_000_000)
        self.criterion = LatentPredictionLoss(level_weights=(1.0, 0.7, 0.5)[: sizes.levels])
        groups = param_groups_for_weight_decay(self.encoder, self.predictor, weight_decay=0.04)
        self.params = [p for group in groups for p in group["params"]]
        self.optimizer = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.95))
        self.run_encoder: Callable = self.encoder
        self.run_predictor: Callable = self.predictor
        if compile:
            self.run_encoder = torch.compile(self.encoder)
            self.run_predictor = torch.compile(self.predictor)
        self.images = torch.randn(sizes.batch, 3, sizes.img_size, sizes.img_size, device=device)
        self.generator = torch.Generator(device=device).manual_seed(0)

    def static_mb(self) -> float:
        """Parameters, gradients, AdamW state and the EMA copy, in MiB."""
        tensors = [*self.params, *self.target.parameters()]
        tensors += [p.grad for p in self.params if p.grad is not None]
        for state in self.optimizer.state.values():
            tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
        return sum(t.numel() * t.element_size() for t in tensors) / MB

    def __call__(self, phases: dict[str, list[float]] | None = None) -> None:
        device = self.device
        marks = [time.perf_counter()]

        def mark() -> None:
            if phases is not None:
                sync(device)
                marks.append(time.perf_counter())

        masks = self.masker(self.batch, generator=self.generator)
        mark()
        with bf16_autocast(device):
            with torch.no_grad():
                full = self.target(self.images)
                mark()
                targets = hierarchical_targets(
                    full.tokens.float(), grid_size=full.grid_size, targets=masks.targets
                )
                mark()
            ctx = self.run_encoder(self.images, keep=masks.context)
            mark()
            preds = self.run_predictor(
                ctx.tokens, context_indices=masks.context, targets=masks.targets
            )
            mark()
        preds = [p.float() for p in preds]
        loss = self.criterion(preds, targets, [t.valid for t in masks.targets]).total
        mark()
        loss.backward()
        mark()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        mark()
        self.target.update(self.encoder)
        mark()
        if phases is not None:
            for name, t0, t1 in zip(PHASES, marks[:-1], marks[1:], strict=True):
                phases.setdefault(name, []).append(t1 - t0)


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of ``fn`` counted by ``torch.utils.flop_counter.FlopCounterMode``."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def bench_train_step(
    sizes: Sizes,
    device: torch.device,
    *,
    threads: int,
    compile: bool = True,
    compile_timeout_s: float | None = None,
) -> Results:
    """Images/s, phase times, FLOPs, MFU and peak memory of ``TrainStep``.

    Keys: ``train_step.{images_per_s, ms, gflop_per_step, achieved_gflops,
    matmul_fp32_gflops, matmul_bf16_gflops, mfu, mfu_bf16, peak_mb, static_mb}``,
    ``train_step.phase.{name}.ms`` (median per phase, measured with extra syncs in separate
    steps), and ``train_step.compile_{speedup, images_per_s, warmup_s, error}``. ``mfu``
    is against the fp32 matmul rate on CPU and against the bf16 one on CUDA;
    ``mfu_fp32`` and ``mfu_bf16`` name the rate explicitly.
    """
    out: Results = {}
    with num_threads(threads):
        step = TrainStep(sizes, device)
        times = time_calls(step, warmup=sizes.step_warmup, reps=sizes.step_reps, device=device)
        sec = statistics.median(times)
        out["train_step.ms"] = 1e3 * sec
        out["train_step.images_per_s"] = sizes.batch / sec
        phases: dict[str, list[float]] = {}
        for _ in range(max(2, sizes.step_reps // 2)):
            step(phases)
        for name in PHASES:
            out[f"train_step.phase.{name}.ms"] = median_ms(phases[name])
        flops = count_flops(step)
        out["train_step.gflop_per_step"] = flops / 1e9
        out["train_step.achieved_gflops"] = flops / sec / 1e9
        n = sizes.matmul_n_cuda if device.type == "cuda" else sizes.matmul_n
        fp32 = matmul_gflops(n, torch.float32, device, sizes.matmul_reps)
        bf16 = matmul_gflops(n, torch.bfloat16, device, sizes.matmul_reps)
        out["train_step.matmul_n"] = n
        out["train_step.matmul_fp32_gflops"] = fp32
        out["train_step.matmul_bf16_gflops"] = bf16
        achieved = out["train_step.achieved_gflops"]
        out["train_step.mfu_fp32"] = achieved / fp32
        out["train_step.mfu_bf16"] = achieved / bf16
        out["train_step.mfu"] = achieved / (bf16 if device.type == "cuda" else fp32)
        out["train_step.peak_mb"] = peak_memory_mb(step, device)
        out["train_step.static_mb"] = step.static_mb()
        del step
    if compile:
        timeout = sizes.compile_timeout_s if compile_timeout_s is None else compile_timeout_s
        res = compiled_step_in_subprocess(sizes, device, threads=threads, timeout_s=timeout)
        out["train_step.compile_error"] = res.get("error")
        rate = res.get("images_per_s")
        out["train_step.compile_images_per_s"] = rate
        out["train_step.compile_warmup_s"] = res.get("warmup_s")
        out["train_step.compile_speedup"] = rate / out["train_step.images_per_s"] if rate else None
    return out


def compiled_step_rate(sizes: Sizes, device: torch.device, threads: int) -> dict:
    """Images/s of ``TrainStep(compile=True)``; the warm-up steps include compilation."""
    with num_threads(threads):
        step = TrainStep(sizes, device, compile=True)
        start = time.perf_counter()
        for _ in range(max(sizes.compile_warmup, 1)):
            step()
        sync(device)
        warmup_s = time.perf_counter() - start
        times = time_calls(step, warmup=0, reps=sizes.step_reps, device=device)
    return {"images_per_s": sizes.batch / statistics.median(times), "warmup_s": warmup_s}


def compiled_step_in_subprocess(
    sizes: Sizes, device: torch.device, *, threads: int, timeout_s: float
) -> dict:
    """Run :func:`compiled_step_rate` in a fresh process, killed after ``timeout_s``.

    Returns ``{"images_per_s", "warmup_s"}`` or ``{"error": str}``.
    """
    with tempfile.TemporaryDirectory() as tmp:
        result_path = os.path.join(tmp, "compiled.json")
        cmd = [
            sys.executable,
            RUN_SCRIPT,
            "--compile-worker",
            json.dumps(dataclasses.asdict(sizes)),
            "--device",
            device.type,
            "--threads",
            str(threads),
            "--json",
            result_path,
        ]
        # A new session, so that a timeout kills the worker's compile subprocesses too.
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
        try:
            _, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return {"error": f"torch.compile step did not finish within {timeout_s:.0f} s"}
        if proc.returncode != 0 or not os.path.exists(result_path):
            lines = [line for line in (err or "").strip().splitlines() if line.strip()]
            tail = lines[-1] if lines else f"exit code {proc.returncode}"
            return {"error": f"torch.compile step failed: {tail[:500]}"}
        with open(result_path) as fh:
            return json.load(fh)
