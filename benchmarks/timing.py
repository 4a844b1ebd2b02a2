"""Timing, peak-memory and matmul-rate helpers of the benchmark suite.

The method (warm-up, median of ``time.perf_counter`` with CUDA syncs; peak memory from
``torch.profiler`` allocation events on CPU, ``max_memory_allocated`` on CUDA) is in the
docstring of ``run.py``, which ``python benchmarks/run.py --help`` prints.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator

import torch

MB = 2.0**20


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); a no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(
    fn: Callable[[], object], *, warmup: int, reps: int, device: torch.device
) -> list[float]:
    """Seconds per call of ``fn`` for ``reps`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(max(reps, 1)):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def median_ms(times: list[float]) -> float:
    """Median of ``times`` (seconds), in milliseconds."""
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


# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s from the vendors' data sheets,
# matched in this order as substrings of ``torch.cuda.get_device_name()`` (so "H100 PCIe"
# before "H100", "L40S" and "L40" before "L4").
BF16_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H200 NVL", 835.0),
    ("H200", 989.4),  # also GH200
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
)


def bf16_peak_tflops(device_name: str) -> float | None:
    """Data-sheet dense bf16 peak (TFLOP/s) of a GPU by name, ``None`` if not in the table."""
    for key, peak in BF16_PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return peak
    return None


def bf16_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to bfloat16 on ``device``'s type."""
    return torch.autocast(device.type, dtype=torch.bfloat16)


def cpu_has_bf16() -> bool:
    """Whether the CPU advertises native bf16 (AVX512-BF16 or AMX)."""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = fh.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
