"""Section 4, ``train_step``: images/s, FLOPs, MFU and peak memory of a full H-JEPA step.

Also the predictor's two sequence layouts (``HierarchicalPredictor(mode=...)``), timed in one
run with the same weights and masks: ``per_block`` (I-JEPA, the context once per target
block) and ``shared_context`` (the context once per sample), and ``shared_context`` on
I-JEPA's truncated masks (``MultiBlockMasker(truncate=True)``, the trainer's
``--mask-truncate``). Alone, from the repository root:

    python benchmarks/bench_train_step.py --threads 1 --reps 7     # CIFAR preset, bf16 autocast
"""

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
    bf16_peak_tflops,
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

    def __init__(
        self,
        sizes: Sizes,
        device: torch.device,
        *,
        compile: bool = False,
        predictor_mode: str = "per_block",
        truncate: bool = False,
    ) -> None:
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
            mode=predictor_mode,
        ).to(device)
        self.masker = MultiBlockMasker(grid_size=grid, levels=sizes.levels, truncate=truncate)
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
        loss = self.criterion(preds, targets, [t.valid for t in masks.targets])
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


# Sequence layouts of HierarchicalPredictor compared by bench_predictor_modes; the first is
# the baseline (I-JEPA's layout).
PREDICTOR_MODES = ("per_block", "shared_context")
# Every step layout timed there, name -> (predictor mode, truncated masks): the two modes on
# padded masks, and the trainer's default mode on I-JEPA's truncated masks (--mask-truncate).
STEP_LAYOUTS = {
    "per_block": ("per_block", False),
    "shared_context": ("shared_context", False),
    "shared_context_truncated": ("shared_context", True),
}
# Speed-ups reported, key -> (baseline layout, faster layout, label).
SPEEDUPS = {
    "speedup": (*PREDICTOR_MODES, f"{PREDICTOR_MODES[1]} / {PREDICTOR_MODES[0]}"),
    "speedup_truncated": ("shared_context", "shared_context_truncated", "truncated / padded masks (shared_context)"),
}


def bench_predictor_modes(
    sizes: Sizes,
    device: torch.device,
    *,
    threads: int,
    warmup: int | None = None,
    reps: int | None = None,
) -> Results:
    """Predictor and whole-step times of ``TrainStep`` in each of ``STEP_LAYOUTS``.

    The steps are built from the same seed (same weights, images and mask stream; the
    truncated layout cuts the same draws). Timed calls alternate between the layouts, so
    machine load hits all alike. The predictor is timed on fixed inputs (one mask batch per
    layout, context tokens from one encoder forward) under bf16 autocast in training mode:
    forward alone, and forward + backward of a stand-in loss (mean square of the
    predictions).

    Keys, per layout ``m``: ``train_step.modes.{m}.{predictor_fwd_ms,
    predictor_fwd_bwd_ms, step_ms, images_per_s}`` (medians) and
    ``train_step.modes.{m}.phase.{name}.ms`` (phases of the step, with extra syncs, separate
    steps); the speed-ups of ``shared_context`` over ``per_block``,
    ``train_step.modes.speedup.{predictor_fwd, predictor_fwd_bwd, step}``, and of the
    truncated masks over the padded ones (both ``shared_context``),
    ``train_step.modes.speedup_truncated.{...}`` (ratios of the medians: > 1 is faster).
    """
    warmup = sizes.step_warmup if warmup is None else warmup
    reps = sizes.step_reps if reps is None else reps
    out: Results = {}
    with num_threads(threads):
        steps = {name: TrainStep(sizes, device, predictor_mode=mode, truncate=truncate)
                 for name, (mode, truncate) in STEP_LAYOUTS.items()}
        base = steps[PREDICTOR_MODES[0]]
        inputs = {}
        for name, step in steps.items():
            masks = step.masker(sizes.batch, generator=torch.Generator(device=device).manual_seed(1))
            with torch.no_grad(), bf16_autocast(device):
                inputs[name] = (base.encoder(base.images, keep=masks.context).tokens, masks)

        def predictor_fwd(layout: str) -> list[torch.Tensor]:
            tokens, masks = inputs[layout]
            with bf16_autocast(device):
                return steps[layout].predictor(tokens, context_indices=masks.context, targets=masks.targets)

        def predictor_fwd_bwd(layout: str) -> None:
            sum(p.float().square().mean() for p in predictor_fwd(layout)).backward()
            steps[layout].predictor.zero_grad(set_to_none=True)

        calls: dict[str, Callable[[str], object]] = {
            "predictor_fwd_ms": predictor_fwd,
            "predictor_fwd_bwd_ms": predictor_fwd_bwd,
            "step_ms": lambda layout: steps[layout](),
        }
        for name, fn in calls.items():
            times: dict[str, list[float]] = {layout: [] for layout in STEP_LAYOUTS}
            for _ in range(warmup):
                for layout in STEP_LAYOUTS:
                    fn(layout)
            for _ in range(max(reps, 1)):
                for layout in STEP_LAYOUTS:
                    sync(device)
                    start = time.perf_counter()
                    fn(layout)
                    sync(device)
                    times[layout].append(time.perf_counter() - start)
            for layout in STEP_LAYOUTS:
                out[f"train_step.modes.{layout}.{name}"] = median_ms(times[layout])
        phases: dict[str, dict[str, list[float]]] = {layout: {} for layout in STEP_LAYOUTS}
        for _ in range(max(2, reps // 2)):
            for layout in STEP_LAYOUTS:
                steps[layout](phases[layout])
    for layout in STEP_LAYOUTS:
        out[f"train_step.modes.{layout}.images_per_s"] = (
            1e3 * sizes.batch / out[f"train_step.modes.{layout}.step_ms"]
        )
        for phase in PHASES:
            out[f"train_step.modes.{layout}.phase.{phase}.ms"] = median_ms(phases[layout][phase])
    for key, (old, new, _) in SPEEDUPS.items():
        for what in ("predictor_fwd", "predictor_fwd_bwd", "step"):
            out[f"train_step.modes.{key}.{what}"] = (
                out[f"train_step.modes.{old}.{what}_ms"] / out[f"train_step.modes.{new}.{what}_ms"]
            )
    return out


def format_predictor_modes(r: Results, sizes: Sizes) -> list[str]:
    """Lines of a small table of :func:`bench_predictor_modes`' results."""
    lines = [
        f"  predictor layouts, H-JEPA step at batch {sizes.batch}, {sizes.levels} levels, bf16 autocast "
        "(ms, medians; same weights and mask draws, calls alternated)",
        f"    {'layout':<26}{'pred fwd':>10}{'pred f+b':>10}{'step':>10}{'images/s':>10}",
    ]
    for layout in STEP_LAYOUTS:
        k = f"train_step.modes.{layout}"
        lines.append(
            f"    {layout:<26}{r[k + '.predictor_fwd_ms']:>10.1f}{r[k + '.predictor_fwd_bwd_ms']:>10.1f}"
            f"{r[k + '.step_ms']:>10.1f}{r[k + '.images_per_s']:>10.1f}"
        )
    for key, (_, _, label) in SPEEDUPS.items():
        sp = f"train_step.modes.{key}"
        lines.append(
            f"    {label} speed-up: predictor fwd "
            f"x{r[sp + '.predictor_fwd']:.2f}, fwd+bwd x{r[sp + '.predictor_fwd_bwd']:.2f}, "
            f"step x{r[sp + '.step']:.2f} (images/s)"
        )
    for layout in STEP_LAYOUTS:
        lines.append(
            f"    phases of {layout} (ms): "
            + ", ".join(f"{p} {r[f'train_step.modes.{layout}.phase.{p}.ms']:.1f}" for p in PHASES)
        )
    return lines


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
    modes: bool = True,
) -> Results:
    """Images/s, phase times, FLOPs, MFU and peak memory of ``TrainStep``.

    With ``modes``, also the predictor layouts compared in one run
    (:func:`bench_predictor_modes`, keys ``train_step.modes.*``).

    Keys: ``train_step.{images_per_s, ms, gflop_per_step, achieved_gflops,
    matmul_fp32_gflops, matmul_bf16_gflops, mfu, mfu_bf16, peak_mb, static_mb}``,
    ``train_step.phase.{name}.ms`` (median per phase, measured with extra syncs in separate
    steps), and ``train_step.compile_{speedup, images_per_s, warmup_s, error}``. The step
    runs under bf16 autocast, so ``mfu`` is against the bf16 matmul rate measured in the
    same run, on every device (``mfu_reference`` names it); ``mfu_fp32`` (bf16 work against
    the fp32 rate: not a utilisation, it can exceed 1) is kept for comparison with older
    runs. On CUDA ``mfu_peak`` is against the GPU's data-sheet dense bf16 peak
    (``timing.bf16_peak_tflops``; ``None`` for an unknown GPU).
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
        out["train_step.mfu"] = achieved / bf16  # the step's dtype: bf16 autocast
        out["train_step.mfu_reference"] = f"bf16 matmul {n}x{n}x{n} measured in the same run"
        if device.type == "cuda":
            peak = bf16_peak_tflops(torch.cuda.get_device_name(device))
            out["train_step.peak_bf16_tflops"] = peak
            out["train_step.mfu_peak"] = achieved / (1e3 * peak) if peak else None
        out["train_step.peak_mb"] = peak_memory_mb(step, device)
        out["train_step.static_mb"] = step.static_mb()
        del step
    if modes:
        out.update(bench_predictor_modes(sizes, device, threads=threads))
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


def main(argv: list[str] | None = None) -> None:
    """Command line: the predictor-layout comparison alone (see the module docstring)."""
    import argparse

    from sizes import PRESETS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="full", choices=sorted(PRESETS), help="sizes (full: CIFAR preset)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls per mode (default: preset)")
    parser.add_argument("--reps", type=int, default=None, help="timed calls per mode (default: preset)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    sizes = PRESETS[args.preset]
    res = bench_predictor_modes(
        sizes, torch.device(args.device), threads=args.threads, warmup=args.warmup, reps=args.reps
    )
    print(f"{args.threads} thread(s), torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}")
    print("\n".join(format_predictor_modes(res, sizes)))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
