"""Benchmark suite of jepa-blocks: masking, losses, token dropping and a full H-JEPA step.

Commands (from the repository root):

    python benchmarks/run.py                          # everything, ~4 min on 2 CPU cores
    python benchmarks/run.py --quick                  # smoke run, under a minute
    python benchmarks/run.py --only losses,encoder    # some sections
    python benchmarks/run.py --json out.json --no-compile --threads 2

Sections (JSON keys are flat, ``section.what.unit``; CUDA results carry a ``cuda.`` prefix):

1. ``masker``: ``MultiBlockMasker`` (I-JEPA defaults) masks per second for a batch of 256 on
   an 8x8 and a 14x14 grid on one thread, and through a 2-worker DataLoader.
2. ``losses``: forward + backward time and peak memory of ``SIGRegLoss`` and ``VICRegLoss``
   for N = 256 and several D, against the stored reference timings and against
   re-implementations of the reference formulas (``benchmarks/baselines.py``) timed in the
   same run; SIGReg with ``chunk`` (memory bounded, value unchanged).
3. ``encoder``: context-encoder forward + backward time against the fraction of kept tokens.
4. ``train_step``: images/s of a full H-JEPA training step (CIFAR preset, bf16 autocast),
   model FLOP utilisation against a large matmul measured in the same run, peak memory,
   and the ``torch.compile`` speed-up (in a subprocess with a time limit).

Timing: ``time.perf_counter`` around each call (with ``torch.cuda.synchronize`` on CUDA),
warm-up calls first, the median of the repetitions reported. Threads are set explicitly
(``--threads``, default: all cores; the masker section uses one thread).

Peak memory on CPU: the largest amount of memory held by torch's CPU allocator during the
call *above what was held when it started*, from the allocation and free events of
``torch.profiler`` (``profile_memory=True``) summed in time order. It counts tensors only
(no Python objects, no allocator caching); it is exact for what torch allocates. On CUDA:
``torch.cuda.max_memory_allocated`` minus the allocation at the start.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # keep torch.profiler quiet

import torch  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from baselines import sigreg_baseline, vicreg_baseline  # noqa: E402

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
    sigreg,
)
from jepa_blocks.training import param_groups_for_weight_decay  # noqa: E402

MB = 2.0**20

# ----------------------------------------------------------------------------- references
# Measured with the official code on a machine like the target one (2 CPU cores, torch
# 2.14.1); see /work/shared/REFERENCES.md. N = 256, forward + backward, milliseconds.
REF_DIMS = (192, 384, 768, 1024, 2048)
REF_SIGREG_MS = {
    1024: dict(zip(REF_DIMS, (34.9, 44.1, 50.4, 56.9, 62.4), strict=True)),
    256: dict(zip(REF_DIMS, (6.5, 8.1, 8.3, 9.1, 11.4), strict=True)),
}
REF_SIGREG_LIGHTLY_MS = {1024: dict(zip(REF_DIMS, (35.3, 37.1, 41.5, 48.4, 60.2), strict=True))}
REF_VICREG_MS = dict(zip(REF_DIMS, (2.0, 4.4, 13.9, 24.4, 121.6), strict=True))
REF_VICREG_LIGHTLY_MS = dict(zip(REF_DIMS, (3.2, 7.3, 23.3, 41.0, 260.7), strict=True))
REF_IJEPA_MASKS_PER_S = 5300.0  # official I-JEPA collator, batch 256, 14x14 grid

TARGETS = {
    "masker.grid14.images_per_s": ">= 100000",
    "losses.sigreg.k1024.d2048.ms": "<= 50",
    "losses.sigreg.ratio": "<= 0.8 (worst D, K vs stored LeJEPA)",
    "losses.vicreg.ratio": "<= 1.0 (worst D vs stored official)",
    "encoder.keep25.ratio": "<= 0.35",
}


# ----------------------------------------------------------------------------- sizes


@dataclass(frozen=True)
class Sizes:
    """Problem sizes and repetition counts of one benchmark run."""

    name: str = "full"
    # masker
    masker_batch: int = 256
    masker_grids: tuple[int, ...] = (8, 14)
    masker_warmup: int = 10
    masker_reps: int = 100
    collate_batches: int = 24
    collate_workers: int = 2
    # losses
    loss_n: int = 256
    loss_dims: tuple[int, ...] = REF_DIMS
    sigreg_ks: tuple[int, ...] = (256, 1024)
    sigreg_chunk: int = 256
    # (N, D) of the chunk comparison; K = max(sigreg_ks). At N = 256 the (D, K) directions
    # dominate the memory; at large N the (N, K) projections do, which chunking bounds.
    sigreg_chunk_cases: tuple[tuple[int, int], ...] = ((256, 2048), (4096, 512))
    loss_warmup: int = 3
    loss_reps: int = 10
    # model: the CIFAR preset of examples/train_hjepa.py
    img_size: int = 32
    patch_size: int = 4
    embed_dim: int = 192
    depth: int = 6
    num_heads: int = 3
    pred_dim: int = 96
    pred_depth: int = 3
    pred_heads: int = 3
    levels: int = 3
    batch: int = 128
    # encoder
    encoder_keeps: tuple[float, ...] = (1.0, 0.75, 0.5, 0.25)
    encoder_warmup: int = 2
    encoder_reps: int = 5
    # train step
    step_warmup: int = 3
    step_reps: int = 8
    matmul_n: int = 2048
    matmul_n_cuda: int = 8192
    matmul_reps: int = 5
    compile_warmup: int = 6  # recompilations for new mask sizes settle after ~5 steps
    compile_timeout_s: float = 420.0


PRESETS: dict[str, Sizes] = {
    "full": Sizes(),
    "quick": Sizes(
        name="quick",
        masker_reps=30,
        collate_batches=8,
        loss_dims=(192, 2048),
        loss_warmup=1,
        loss_reps=3,
        encoder_keeps=(1.0, 0.25),
        encoder_warmup=1,
        encoder_reps=2,
        step_warmup=1,
        step_reps=2,
        matmul_n=1024,
        matmul_reps=3,
        compile_warmup=3,
        compile_timeout_s=180.0,
    ),
    # For the tests: every code path, tiny tensors.
    "tiny": Sizes(
        name="tiny",
        masker_batch=8,
        masker_warmup=1,
        masker_reps=2,
        collate_batches=3,
        loss_n=16,
        loss_dims=(8, 16),
        sigreg_ks=(16, 32),
        sigreg_chunk=8,
        sigreg_chunk_cases=((16, 16), (64, 8)),
        loss_warmup=1,
        loss_reps=2,
        embed_dim=16,
        depth=1,
        num_heads=2,
        pred_dim=8,
        pred_depth=1,
        pred_heads=2,
        levels=2,
        batch=4,
        encoder_keeps=(1.0, 0.5),
        encoder_warmup=0,
        encoder_reps=1,
        step_warmup=1,
        step_reps=1,
        matmul_n=64,
        matmul_n_cuda=256,
        matmul_reps=1,
        compile_warmup=1,
        compile_timeout_s=60.0,
    ),
}

Results = dict[str, float | int | str | None]


# ----------------------------------------------------------------------------- helpers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(
    fn: Callable[[], object], *, warmup: int, reps: int, device: torch.device
) -> list[float]:
    """Seconds per call of ``fn`` for ``reps`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(max(reps, 1)):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def median_ms(times: list[float]) -> float:
    return 1e3 * statistics.median(times)


@contextlib.contextmanager
def num_threads(n: int) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)``, restoring the old value after."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence the C++ profiler's start/stop lines on file descriptor 2."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no usable fd 2 (some embedded interpreters)
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak memory (MiB) allocated by torch during ``fn()`` above what was live before.

    CPU: running sum of the profiler's allocation (+) and free (-) events in time order.
    CUDA: ``max_memory_allocated`` after a reset, minus ``memory_allocated`` at the start.
    Returns ``None`` if the profiler gives no memory events.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / MB
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:
        events = prof.profiler.kineto_results.events()
    except AttributeError:
        return None
    cpu = torch.autograd.DeviceType.CPU
    deltas = sorted(
        (e.start_ns(), e.nbytes())
        for e in events
        if e.name() == "[memory]" and e.device_type() == cpu
    )
    if not deltas:
        return None
    live = peak = 0
    for _, nbytes in deltas:
        live += nbytes
        peak = max(peak, live)
    return peak / MB


def matmul_gflops(n: int, dtype: torch.dtype, device: torch.device, reps: int) -> float:
    """GFLOP/s of an ``(n, n) @ (n, n)`` matmul in ``dtype`` (median of ``reps``)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device, dtype)
    b = torch.randn(n, n, generator=g).to(device, dtype)
    times = time_calls(lambda: torch.matmul(a, b), warmup=2, reps=reps, device=device)
    return 2.0 * n**3 / statistics.median(times) / 1e9


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=torch.bfloat16)


def cpu_has_bf16() -> bool:
    """Whether the CPU advertises native bf16 (AVX512-BF16 or AMX)."""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = fh.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


# ----------------------------------------------------------------------------- 1. masker


def bench_masker(sizes: Sizes, device: torch.device, *, threads: int) -> Results:
    """Masks per second of ``MultiBlockMasker`` (I-JEPA defaults), one thread.

    Keys: ``masker.grid{G}.images_per_s``, ``masker.grid{G}.ms_per_batch``,
    ``masker.grid14.speedup_vs_ijepa``, ``masker.grid8_levels3.images_per_s`` (the 3-level
    H-JEPA masker of the CIFAR preset) and, on CPU, ``masker.collate.images_per_s`` (a
    DataLoader with ``collate_workers`` workers and ``MaskCollator`` over small tensors).
    """
    out: Results = {}
    b = sizes.masker_batch
    configs = [(f"grid{g}", MultiBlockMasker(grid_size=g)) for g in sizes.masker_grids]
    configs.append(("grid8_levels3", MultiBlockMasker(grid_size=8, levels=3)))
    with num_threads(1):
        for name, masker in configs:
            gen = torch.Generator(device=device).manual_seed(0)
            times = time_calls(
                lambda m=masker, g=gen: m(b, generator=g),
                warmup=sizes.masker_warmup,
                reps=sizes.masker_reps,
                device=device,
            )
            ms = median_ms(times)
            out[f"masker.{name}.ms_per_batch"] = ms
            out[f"masker.{name}.images_per_s"] = b / (ms / 1e3)
    if "masker.grid14.images_per_s" in out:
        out["masker.grid14.speedup_vs_ijepa"] = (
            out["masker.grid14.images_per_s"] / REF_IJEPA_MASKS_PER_S
        )
    if device.type == "cpu":
        out.update(_bench_collate(sizes))
    return out


def _bench_collate(sizes: Sizes) -> Results:
    grid = max(sizes.masker_grids)
    b = sizes.masker_batch
    n_batches = sizes.collate_batches + 1  # the first batch (worker start-up) is not timed
    data = TensorDataset(torch.randn(b * n_batches, 16))
    loader = DataLoader(
        data,
        batch_size=b,
        num_workers=sizes.collate_workers,
        collate_fn=MaskCollator(MultiBlockMasker(grid_size=grid), seed=0),
        prefetch_factor=4 if sizes.collate_workers > 0 else None,
    )
    it = iter(loader)
    next(it)
    start = time.perf_counter()
    seen = sum(batch[0][0].shape[0] for batch in it)
    elapsed = time.perf_counter() - start
    return {
        "masker.collate.images_per_s": seen / elapsed,
        "masker.collate.workers": sizes.collate_workers,
        "masker.collate.grid": grid,
    }


# ----------------------------------------------------------------------------- 2. losses


def _fwd_bwd(loss_fn: Callable[[], torch.Tensor], leaves: list[torch.Tensor]) -> Callable[[], None]:
    def call() -> None:
        for t in leaves:
            t.grad = None
        loss_fn().backward()

    return call


def _relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def bench_losses(sizes: Sizes, device: torch.device, *, threads: int) -> Results:
    """Forward + backward time and peak memory of SIGReg and VICReg, N = ``loss_n``.

    Per ``K`` and ``D``: ``losses.sigreg.k{K}.d{D}.{ms,peak_mb}`` (ours),
    ``...baseline_ms``, ``...baseline_peak_mb`` (LeJEPA-structured re-implementation,
    same run), ``...ratio_same_run`` (ours / baseline), ``...ref_ms`` and ``...ratio``
    (ours / stored LeJEPA figure, when one exists) and ``...lightly_ref_ms``,
    ``...ratio_lightly``. VICReg likewise under ``losses.vicreg.d{D}``. Chunked SIGReg at
    the largest ``K`` for each ``(N, D)`` of ``sigreg_chunk_cases``:
    ``losses.sigreg.k{K}.d{D}.n{N}.chunk{C}.{ms,peak_mb,value}``, the same with an
    ``unchunked_`` prefix, ``peak_ratio`` (chunked / unchunked) and ``rel_diff`` (relative
    difference of the values, same directions). Summaries: ``losses.sigreg.ratio`` and ``losses.vicreg.ratio`` (worst
    stored-reference ratio), ``...ratio_same_run`` (worst same-run ratio), and
    ``losses.sigreg.baseline_rel_diff`` / ``losses.vicreg.baseline_rel_diff`` (value of
    ours against the baseline on the same input and directions: both compute the same
    statistic).
    """
    out: Results = {}
    n = sizes.loss_n
    g = torch.Generator(device="cpu").manual_seed(0)
    with num_threads(threads):
        for d in sizes.loss_dims:
            x = torch.randn(n, d, generator=g).to(device).requires_grad_()
            y = (x.detach() + 0.5 * torch.randn(n, d, generator=g).to(device)).requires_grad_()
            for k in sizes.sigreg_ks:
                out.update(_bench_sigreg(x, k, sizes, device))
            out.update(_bench_vicreg(x, y, sizes, device))

        # Value checks: ours and the baseline compute the same statistic.
        d = max(sizes.loss_dims)
        k = max(sizes.sigreg_ks)
        x = torch.randn(n, d, generator=g, dtype=torch.float64).to(device)
        y = x + 0.5 * torch.randn(n, d, generator=g, dtype=torch.float64).to(device)
        a = torch.randn(d, k, generator=g, dtype=torch.float64).to(device)
        out["losses.sigreg.baseline_rel_diff"] = _relative(
            float(sigreg(x, directions=a)), float(sigreg_baseline(x, directions=a))
        )
        out["losses.vicreg.baseline_rel_diff"] = _relative(
            float(VICRegLoss()(x, y).total), float(vicreg_baseline(x, y))
        )
        for n_c, d_c in sizes.sigreg_chunk_cases:
            out.update(_bench_sigreg_chunk(sizes, device, n_c, d_c, k, g))

    for name in ("sigreg", "vicreg"):
        for kind in ("ratio", "ratio_same_run"):
            found = [
                v
                for key, v in out.items()
                if key.startswith(f"losses.{name}.")
                and key.endswith(f".{kind}")
                and ".chunk" not in key
            ]
            if found:
                out[f"losses.{name}.{kind}"] = max(found)
    return out


def _bench_sigreg(x: torch.Tensor, k: int, sizes: Sizes, device: torch.device) -> Results:
    d = x.shape[1]
    key = f"losses.sigreg.k{k}.d{d}"
    ours = SIGRegLoss(num_directions=k).to(device)  # train mode: new directions every call
    gen = torch.Generator(device=device).manual_seed(1)
    cases = {
        "": _fwd_bwd(lambda: ours(x), [x]),
        "baseline_": _fwd_bwd(lambda: sigreg_baseline(x, num_directions=k, generator=gen), [x]),
    }
    out = _time_cases(key, cases, sizes, device)
    _add_ratios(out, key, REF_SIGREG_MS.get(k, {}).get(d), "ref", "ratio")
    _add_ratios(out, key, REF_SIGREG_LIGHTLY_MS.get(k, {}).get(d), "lightly_ref", "ratio_lightly")
    return out


def _bench_vicreg(x: torch.Tensor, y: torch.Tensor, sizes: Sizes, device: torch.device) -> Results:
    d = x.shape[1]
    key = f"losses.vicreg.d{d}"
    ours = VICRegLoss().to(device)
    cases = {
        "": _fwd_bwd(lambda: ours(x, y).total, [x, y]),
        "baseline_": _fwd_bwd(lambda: vicreg_baseline(x, y), [x, y]),
    }
    out = _time_cases(key, cases, sizes, device)
    _add_ratios(out, key, REF_VICREG_MS.get(d), "ref", "ratio")
    _add_ratios(out, key, REF_VICREG_LIGHTLY_MS.get(d), "lightly_ref", "ratio_lightly")
    return out


def _time_cases(
    key: str, cases: dict[str, Callable[[], None]], sizes: Sizes, device: torch.device
) -> Results:
    out: Results = {}
    for prefix, call in cases.items():
        times = time_calls(call, warmup=sizes.loss_warmup, reps=sizes.loss_reps, device=device)
        out[f"{key}.{prefix}ms"] = median_ms(times)
        out[f"{key}.{prefix}peak_mb"] = peak_memory_mb(call, device)
    out[f"{key}.ratio_same_run"] = out[f"{key}.ms"] / out[f"{key}.baseline_ms"]
    return out


def _add_ratios(out: Results, key: str, ref: float | None, ref_name: str, ratio_name: str) -> None:
    if ref is not None:
        out[f"{key}.{ref_name}_ms"] = ref
        out[f"{key}.{ratio_name}"] = out[f"{key}.ms"] / ref


def _bench_sigreg_chunk(
    sizes: Sizes, device: torch.device, n: int, d: int, k: int, g: torch.Generator
) -> Results:
    """Chunked SIGReg against unchunked with the same directions (eval mode: step fixed)."""
    c = sizes.sigreg_chunk
    key = f"losses.sigreg.k{k}.d{d}.n{n}.chunk{c}"
    x = torch.randn(n, d, generator=g).to(device).requires_grad_()
    out: Results = {}
    for prefix, chunk in (("", c), ("unchunked_", None)):
        loss_fn = SIGRegLoss(num_directions=k, chunk=chunk).to(device).eval()
        call = _fwd_bwd(lambda loss_fn=loss_fn: loss_fn(x), [x])
        times = time_calls(call, warmup=sizes.loss_warmup, reps=sizes.loss_reps, device=device)
        out[f"{key}.{prefix}ms"] = median_ms(times)
        out[f"{key}.{prefix}peak_mb"] = peak_memory_mb(call, device)
        with torch.no_grad():
            out[f"{key}.{prefix}value"] = float(loss_fn(x))
    if out[f"{key}.peak_mb"] is not None and out[f"{key}.unchunked_peak_mb"]:
        out[f"{key}.peak_ratio"] = out[f"{key}.peak_mb"] / out[f"{key}.unchunked_peak_mb"]
    out[f"{key}.rel_diff"] = _relative(out[f"{key}.value"], out[f"{key}.unchunked_value"])
    return out


# ----------------------------------------------------------------------------- 3. encoder


def _encoder(sizes: Sizes, device: torch.device) -> ViTEncoder:
    return ViTEncoder(
        img_size=sizes.img_size,
        patch_size=sizes.patch_size,
        embed_dim=sizes.embed_dim,
        depth=sizes.depth,
        num_heads=sizes.num_heads,
    ).to(device)


def bench_encoder(sizes: Sizes, device: torch.device, *, threads: int) -> Results:
    """Context-encoder forward + backward time (bf16 autocast) against the kept fraction.

    Keys: ``encoder.keep{P}.ms``, ``encoder.keep{P}.ratio`` (time / time at 100%),
    ``encoder.keep{P}.tokens`` for ``P`` in percent. 100% runs without ``keep`` (no
    gather); the others keep a random, sorted subset of each sample's tokens.
    """
    out: Results = {}
    torch.manual_seed(0)
    enc = _encoder(sizes, device).train()
    grid = enc.default_grid
    n = grid[0] * grid[1]
    b = sizes.batch
    images = torch.randn(b, 3, sizes.img_size, sizes.img_size, device=device)
    with num_threads(threads):
        for frac in sizes.encoder_keeps:
            k = max(1, round(frac * n))
            keep = None
            if k < n:
                keep = torch.rand(b, n, device=device).argsort(-1)[:, :k].sort(-1).values

            def call(keep: torch.Tensor | None = keep) -> None:
                enc.zero_grad(set_to_none=True)
                with _autocast(device):
                    tokens = enc(images, keep=keep).tokens
                tokens.float().square().mean().backward()

            times = time_calls(
                call, warmup=sizes.encoder_warmup, reps=sizes.encoder_reps, device=device
            )
            pct = round(100 * frac)
            out[f"encoder.keep{pct}.ms"] = median_ms(times)
            out[f"encoder.keep{pct}.tokens"] = k
    full = out.get("encoder.keep100.ms")
    if full:
        for frac in sizes.encoder_keeps:
            pct = round(100 * frac)
            out[f"encoder.keep{pct}.ratio"] = out[f"encoder.keep{pct}.ms"] / full
    return out


# ----------------------------------------------------------------------------- 4. train step

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
        self.encoder = _encoder(sizes, device).train()
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
                _sync(device)
                marks.append(time.perf_counter())

        masks = self.masker(self.batch, generator=self.generator)
        mark()
        with _autocast(device):
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


def _compiled_step_rate(sizes: Sizes, device: torch.device, threads: int) -> dict:
    """Images/s of ``TrainStep(compile=True)``; the warm-up steps include compilation."""
    with num_threads(threads):
        step = TrainStep(sizes, device, compile=True)
        start = time.perf_counter()
        for _ in range(max(sizes.compile_warmup, 1)):
            step()
        _sync(device)
        warmup_s = time.perf_counter() - start
        times = time_calls(step, warmup=0, reps=sizes.step_reps, device=device)
    return {"images_per_s": sizes.batch / statistics.median(times), "warmup_s": warmup_s}


def compiled_step_in_subprocess(
    sizes: Sizes, device: torch.device, *, threads: int, timeout_s: float
) -> dict:
    """Run :func:`_compiled_step_rate` in a fresh process, killed after ``timeout_s``.

    Returns ``{"images_per_s", "warmup_s"}`` or ``{"error": str}``.
    """
    with tempfile.TemporaryDirectory() as tmp:
        result_path = os.path.join(tmp, "compiled.json")
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
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


# ----------------------------------------------------------------------------- driver

SECTIONS = ("masker", "losses", "encoder", "train_step")


def run_section(
    name: str,
    sizes: Sizes,
    device: torch.device,
    *,
    threads: int,
    compile: bool = False,
    compile_timeout_s: float | None = None,
) -> Results:
    """Run one section; keys are prefixed with ``cuda.`` on a CUDA device."""
    if name == "masker":
        res = bench_masker(sizes, device, threads=threads)
    elif name == "losses":
        res = bench_losses(sizes, device, threads=threads)
    elif name == "encoder":
        res = bench_encoder(sizes, device, threads=threads)
    elif name == "train_step":
        res = bench_train_step(
            sizes, device, threads=threads, compile=compile, compile_timeout_s=compile_timeout_s
        )
    else:
        raise ValueError(f"unknown section {name!r}; choose from {', '.join(SECTIONS)}")
    prefix = "cuda." if device.type == "cuda" else ""
    return {prefix + k: v for k, v in res.items()}


def _fmt(v: object, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{digits}g}"
    return str(v)


def format_report(results: Results, sizes: Sizes, threads: int) -> str:
    """Human-readable tables of the results (both devices if present)."""
    formatters = {
        "masker": _format_masker,
        "losses": _format_losses,
        "encoder": _format_encoder,
        "train_step": _format_step,
    }
    lines: list[str] = []
    for prefix in ("", "cuda."):
        keys = [
            k for k in results if k.startswith(prefix) and (prefix or not k.startswith("cuda."))
        ]
        if not keys:
            continue
        r = {k[len(prefix) :]: results[k] for k in keys}
        dev = "CUDA" if prefix else f"CPU, {threads} threads"
        lines.append(f"#### {dev} ({sizes.name} sizes)")
        for name, fmt in formatters.items():
            if f"{name}.error" in r:
                lines.append(f"\n== {name}: FAILED: {r[f'{name}.error']}")
            elif any(k.startswith(name + ".") for k in r):
                lines += fmt(r, sizes)
        lines.append("")
    return "\n".join(lines)


def _format_masker(r: Results, sizes: Sizes) -> list[str]:
    lines = [f"\n== masker: batch {sizes.masker_batch}, one thread, I-JEPA defaults =="]
    for g in (*(f"grid{g}" for g in sizes.masker_grids), "grid8_levels3"):
        if f"masker.{g}.images_per_s" in r:
            lines.append(
                f"  {g:<14} {_fmt(r[f'masker.{g}.images_per_s']):>10} masks/s  "
                f"({_fmt(r[f'masker.{g}.ms_per_batch'])} ms/batch)"
            )
    if "masker.grid14.speedup_vs_ijepa" in r:
        lines.append(
            f"  grid14 vs I-JEPA collator ({REF_IJEPA_MASKS_PER_S:,.0f}/s): "
            f"x{_fmt(r['masker.grid14.speedup_vs_ijepa'])}   target "
            f"{TARGETS['masker.grid14.images_per_s']}/s"
        )
    if "masker.collate.images_per_s" in r:
        lines.append(
            f"  DataLoader + MaskCollator, {r['masker.collate.workers']} workers, grid "
            f"{r['masker.collate.grid']}: {_fmt(r['masker.collate.images_per_s'])} images/s"
        )
    return lines


def _format_encoder(r: Results, sizes: Sizes) -> list[str]:
    lines = [f"\n== encoder: fwd+bwd, batch {sizes.batch}, bf16 autocast =="]
    for frac in sizes.encoder_keeps:
        p = round(100 * frac)
        if f"encoder.keep{p}.ms" in r:
            lines.append(
                f"  keep {p:>3}% ({r[f'encoder.keep{p}.tokens']:>4} tokens): "
                f"{_fmt(r[f'encoder.keep{p}.ms']):>8} ms   "
                f"ratio {_fmt(r.get(f'encoder.keep{p}.ratio'))}"
            )
    lines.append(f"  target: keep25 ratio {TARGETS['encoder.keep25.ratio']}")
    return lines


def _format_losses(r: Results, sizes: Sizes) -> list[str]:
    dims = sizes.loss_dims
    head = f"  {'':<34}" + "".join(f"{'D=' + str(d):>9}" for d in dims)
    lines = [f"\n== losses: fwd+bwd, N={sizes.loss_n}, median ms (peak MiB) ==", head]

    def row(label: str, fmt: Callable[[int], str]) -> None:
        lines.append(f"  {label:<34}" + "".join(f"{fmt(d):>9}" for d in dims))

    for k in sizes.sigreg_ks:
        base = f"losses.sigreg.k{k}.d"
        row(f"SIGReg K={k} ours ms", lambda d, b=base: _fmt(r.get(f"{b}{d}.ms")))
        row("  baseline (same run) ms", lambda d, b=base: _fmt(r.get(f"{b}{d}.baseline_ms")))
        row("  ours / baseline", lambda d, b=base: _fmt(r.get(f"{b}{d}.ratio_same_run"), 2))
        row("  LeJEPA stored ms", lambda d, b=base: _fmt(r.get(f"{b}{d}.ref_ms")))
        row("  ours / LeJEPA stored", lambda d, b=base: _fmt(r.get(f"{b}{d}.ratio"), 2))
        row("  ours / lightly stored", lambda d, b=base: _fmt(r.get(f"{b}{d}.ratio_lightly"), 2))
        row("  peak MiB ours", lambda d, b=base: _fmt(r.get(f"{b}{d}.peak_mb")))
        row("  peak MiB baseline", lambda d, b=base: _fmt(r.get(f"{b}{d}.baseline_peak_mb")))
    base = "losses.vicreg.d"
    row("VICReg 2 views ours ms", lambda d: _fmt(r.get(f"{base}{d}.ms")))
    row("  baseline (same run) ms", lambda d: _fmt(r.get(f"{base}{d}.baseline_ms")))
    row("  ours / baseline", lambda d: _fmt(r.get(f"{base}{d}.ratio_same_run"), 2))
    row("  official stored ms", lambda d: _fmt(r.get(f"{base}{d}.ref_ms")))
    row("  ours / official stored", lambda d: _fmt(r.get(f"{base}{d}.ratio"), 2))
    row("  ours / lightly stored", lambda d: _fmt(r.get(f"{base}{d}.ratio_lightly"), 2))
    row("  peak MiB ours", lambda d: _fmt(r.get(f"{base}{d}.peak_mb")))
    row("  peak MiB baseline", lambda d: _fmt(r.get(f"{base}{d}.baseline_peak_mb")))
    for key in r:
        if ".chunk" in key and key.endswith(".ms"):
            stem = key[: -len(".ms")]
            lines.append(
                f"  {stem[len('losses.') :]}: {_fmt(r[key])} ms (unchunked "
                f"{_fmt(r.get(stem + '.unchunked_ms'))}), peak {_fmt(r.get(stem + '.peak_mb'))} "
                f"MiB (unchunked {_fmt(r.get(stem + '.unchunked_peak_mb'))}), value rel. diff "
                f"{_fmt(r.get(stem + '.rel_diff'), 2)}"
            )
    lines.append(
        f"  worst ratio SIGReg vs stored {_fmt(r.get('losses.sigreg.ratio'), 2)} "
        f"(target {TARGETS['losses.sigreg.ratio']}), same run "
        f"{_fmt(r.get('losses.sigreg.ratio_same_run'), 2)}; VICReg vs stored "
        f"{_fmt(r.get('losses.vicreg.ratio'), 2)} (target {TARGETS['losses.vicreg.ratio']}), "
        f"same run {_fmt(r.get('losses.vicreg.ratio_same_run'), 2)}"
    )
    lines.append(
        f"  value check vs baseline (float64): SIGReg rel. diff "
        f"{_fmt(r.get('losses.sigreg.baseline_rel_diff'), 2)}, VICReg "
        f"{_fmt(r.get('losses.vicreg.baseline_rel_diff'), 2)}"
    )
    return lines


def _format_step(r: Results, sizes: Sizes) -> list[str]:
    lines = [
        f"\n== train_step: H-JEPA, batch {sizes.batch}, {sizes.levels} levels, bf16 autocast ==",
        f"  {_fmt(r['train_step.images_per_s'])} images/s ({_fmt(r['train_step.ms'])} ms/step)",
        "  phases (ms): "
        + ", ".join(f"{p} {_fmt(r.get(f'train_step.phase.{p}.ms'))}" for p in PHASES),
        f"  {_fmt(r['train_step.gflop_per_step'])} GFLOP/step -> "
        f"{_fmt(r['train_step.achieved_gflops'])} GFLOP/s; matmul {r['train_step.matmul_n']}^3: "
        f"fp32 {_fmt(r['train_step.matmul_fp32_gflops'])}, bf16 "
        f"{_fmt(r['train_step.matmul_bf16_gflops'])} GFLOP/s",
        f"  MFU {_fmt(r['train_step.mfu'], 2)}: vs fp32 matmul {_fmt(r['train_step.mfu_fp32'], 2)} "
        f"(bf16 autocast can exceed 1), vs bf16 matmul {_fmt(r['train_step.mfu_bf16'], 2)}",
        f"  peak {_fmt(r['train_step.peak_mb'])} MiB above the "
        f"{_fmt(r['train_step.static_mb'])} MiB of weights, grads, AdamW state and EMA copy",
    ]
    if "train_step.compile_speedup" in r:
        if r.get("train_step.compile_error"):
            lines.append(f"  torch.compile: skipped ({r['train_step.compile_error']})")
        else:
            lines.append(
                f"  torch.compile: {_fmt(r['train_step.compile_images_per_s'])} images/s, "
                f"speed-up x{_fmt(r['train_step.compile_speedup'], 3)} (warm-up incl. "
                f"compilation {_fmt(r['train_step.compile_warmup_s'])} s)"
            )
    return lines


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # not on every platform
        return None


def meta(sizes: Sizes, threads: int, devices: list[torch.device]) -> dict:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "sizes": sizes.name,
        "threads": threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpu_bf16": cpu_has_bf16(),
        "devices": [str(d) for d in devices],
        "memory_method": "torch.profiler CPU allocation events (peak above start); CUDA: "
        "max_memory_allocated",
    }
    if any(d.type == "cuda" for d in devices):
        info["cuda_device"] = torch.cuda.get_device_name()
    return info


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--only", default="", help=f"comma-separated subset of {', '.join(SECTIONS)}"
    )
    parser.add_argument("--json", default="benchmarks/results.json", help="where to write JSON")
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repetitions")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (tests, smoke runs)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--device",
        choices=("all", "cpu", "cuda"),
        default="all",
        help="all: CPU, then CUDA when available",
    )
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="measure the torch.compile speed-up (default: on, off with --quick/--tiny)",
    )
    parser.add_argument("--compile-timeout", type=float, default=None, help="seconds")
    parser.add_argument("--compile-worker", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> Results:
    args = parse_args(argv)
    if args.compile_worker is not None:  # child process of compiled_step_in_subprocess
        fields = json.loads(args.compile_worker)
        sizes = Sizes(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
        res = _compiled_step_rate(sizes, torch.device(args.device), args.threads)
        with open(args.json, "w") as fh:
            json.dump(res, fh)
        return res

    sizes = PRESETS["tiny" if args.tiny else "quick" if args.quick else "full"]
    compile = args.compile if args.compile is not None else sizes.name == "full"
    names = [s.strip() for s in args.only.split(",") if s.strip()] or list(SECTIONS)
    for name in names:
        if name not in SECTIONS:
            raise SystemExit(f"--only: unknown section {name!r}; choose from {', '.join(SECTIONS)}")
    devices = []
    if args.device in ("all", "cpu"):
        devices.append(torch.device("cpu"))
    if args.device in ("all", "cuda") and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    if not devices:
        raise SystemExit("--device cuda: CUDA is not available")

    results: Results = {}
    failed = []
    load_start = _load_average()
    if load_start is not None and load_start > 0.5:
        print(
            f"warning: 1-minute load average {load_start:.2f} before the run: other processes "
            "are using the CPU and will distort the timings",
            flush=True,
        )
    start = time.perf_counter()
    for device in devices:
        for name in names:
            t0 = time.perf_counter()
            try:
                res = run_section(
                    name,
                    sizes,
                    device,
                    threads=args.threads,
                    compile=compile,
                    compile_timeout_s=args.compile_timeout,
                )
            except Exception as err:  # keep the other sections; report and exit non-zero
                traceback.print_exc()
                prefix = "cuda." if device.type == "cuda" else ""
                res = {f"{prefix}{name}.error": f"{type(err).__name__}: {err}"}
                failed.append(f"{device.type}/{name}")
            results.update(res)
            print(f"[{device.type}] {name}: {time.perf_counter() - t0:.1f} s", flush=True)
    info = meta(sizes, args.threads, devices)
    info["total_s"] = time.perf_counter() - start
    info["loadavg_1min_start"] = load_start
    info["loadavg_1min_end"] = _load_average()
    info["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print()
    print(format_report(results, sizes, args.threads))
    print(f"total {info['total_s']:.0f} s, max RSS {info['max_rss_mb']:.0f} MiB")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump({"meta": info, **results}, fh, indent=1)
        print(f"wrote {args.json}")
    if failed:
        raise SystemExit(f"failed sections: {', '.join(failed)} (see the tracebacks above)")
    return results


if __name__ == "__main__":
    main()
