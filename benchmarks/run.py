"""Benchmark suite of jepa-blocks: masking, losses, token dropping and a full H-JEPA step.

Commands (from the repository root):

    python benchmarks/run.py                          # everything, ~4 min on 2 CPU cores
    python benchmarks/run.py --quick                  # smoke run, under a minute
    python benchmarks/run.py --only losses,encoder    # some sections
    python benchmarks/run.py --json out.json --no-compile --threads 2

Sections (JSON keys are flat, ``section.what.unit``; CUDA results carry a ``cuda.`` prefix):

0. ``import``: wall time of ``import jepa_blocks`` and of ``import torch`` (medians over
   fresh processes; run once, not per device).
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
import datetime
import json
import os
import platform
import resource
import sys
import time
import traceback

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # keep torch.profiler quiet

import torch  # noqa: E402

# The sections, helpers and presets are the modules beside this script.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_encoder import bench_encoder  # noqa: E402
from bench_import import bench_import  # noqa: E402
from bench_losses import bench_losses  # noqa: E402
from bench_masker import bench_masker  # noqa: E402
from bench_train_step import (  # noqa: E402
    PHASES,
    bench_train_step,
    compiled_step_in_subprocess,
    compiled_step_rate,
)
from report import format_report  # noqa: E402
from sizes import PRESETS, Results, Sizes  # noqa: E402
from timing import cpu_has_bf16, peak_memory_mb  # noqa: E402

# What the tests and other scripts use from here, besides main.
__all__ = [
    "PHASES",
    "PRESETS",
    "SECTIONS",
    "Sizes",
    "bench_encoder",
    "bench_import",
    "bench_losses",
    "bench_masker",
    "bench_train_step",
    "compiled_step_in_subprocess",
    "format_report",
    "main",
    "peak_memory_mb",
    "run_section",
]

SECTIONS = ("import", "masker", "losses", "encoder", "train_step")
DEVICELESS = ("import",)  # sections run once, on no particular device


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
    if name == "import":
        return bench_import(sizes)
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
        res = compiled_step_rate(sizes, torch.device(args.device), args.threads)
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
    for i, device in enumerate(devices):
        for name in names:
            if name in DEVICELESS and i > 0:
                continue
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
