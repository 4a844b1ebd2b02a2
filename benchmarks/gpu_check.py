"""One-command GPU check of jepa-blocks: the CUDA paths that CPU-only CI never runs.

Commands (from the repository root):

    python benchmarks/gpu_check.py                    # one CUDA GPU, under 8 minutes
    python benchmarks/gpu_check.py --out gpu_report   # report folder
    python benchmarks/gpu_check.py --only sdpa,step_cifar
    python benchmarks/gpu_check.py --dry-run          # no GPU: the script's logic on CPU, tiny sizes

Checks, in order (each one is recorded even when another fails):

1. ``tests``: the CUDA-only tests of ``tests/`` (names with "cuda"/"gpu", a ``cuda``/``gpu``
   marker, or a skip reason that mentions CUDA/GPU) in a pytest subprocess. The dry run
   only collects them.
2. ``sdpa``: ``F.scaled_dot_product_attention`` with each fused backend (flash,
   memory-efficient) against the explicit ``softmax(q k^T / sqrt(Dh)) v`` of
   ``jepa_blocks.layers.dot_product_attention(fused=False)``, both in bf16, outputs and
   input gradients, with and without a padding mask (flash takes no mask). Tolerance:
   ``|fused - explicit| <= atol + rtol * |explicit|`` with rtol = atol = ``SDPA_TOL``
   (two bf16 roundings of unit-scale values: bf16 has an 8-bit mantissa, eps 2^-8). The
   largest error of each path against a float32 reference is reported beside it.
3. ``step_imagenet``: one H-JEPA training step (``benchmarks/bench_train_step.TrainStep``:
   masks, EMA target, context encoder, hierarchical predictor, latent loss, backward,
   AdamW, EMA update) at the ImageNet preset of ``examples/train_hjepa.py`` (ViT-S/16-like:
   224 px, patch 16, width 384, depth 12, 6 heads; predictor 192 wide, depth 6), bf16
   autocast, at the largest batch that fits: ``--batch`` first, halved after each
   out-of-memory error.
4. ``step_cifar``: the same step at the CIFAR preset (32 px, patch 4, width 192, depth 6),
   batch 128.
   Both steps report images/s, peak memory (``torch.cuda.max_memory_allocated``), FLOPs
   per step (``torch.utils.flop_counter``) and the MFU against the GPU's dense bf16 peak:
   the data-sheet figure of ``timing.BF16_PEAK_TFLOPS`` when the GPU's name is in the
   table, otherwise the rate of a large bf16 matmul measured here (named in the report).
5. ``trainer``: ``examples/train_hjepa.py`` for ``--trainer-steps`` (50) steps with
   ``--device cuda`` on the embedded digits data, in a subprocess; its last loss and
   images/s come from the run's ``metrics.jsonl``.

Writes ``OUT/gpu_check.json`` (every figure) and ``OUT/gpu_check.md`` (a table for
``benchmarks/RESULTS.md``). Exit code 0 when every check that ran passed, 1 when one
failed, 2 when CUDA is missing without ``--dry-run``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from sizes import PRESETS, Sizes  # noqa: E402
from timing import bf16_peak_tflops, matmul_gflops, sync, time_calls  # noqa: E402

CHECKS = ("tests", "sdpa", "step_imagenet", "step_cifar", "trainer")
SDPA_TOL = 2e-2  # rtol = atol for fused vs explicit bf16 attention (see the docstring)
TIME_LIMITS_S = {"tests": 240.0, "trainer": 150.0}  # subprocess time limits (GPU run)
CUDA_WORDS = ("cuda", "gpu")

# The ImageNet preset of examples/train_hjepa.py (ViT-S/16-like) on the benchmark's Sizes.
IMAGENET = dataclasses.replace(
    PRESETS["full"],
    name="imagenet",
    img_size=224,
    patch_size=16,
    embed_dim=384,
    depth=12,
    num_heads=6,
    pred_dim=192,
    pred_depth=6,
    pred_heads=6,
)
CIFAR = dataclasses.replace(PRESETS["full"], name="cifar")
# Dry run: every code path on tiny tensors.
TINY_IMAGENET = dataclasses.replace(
    PRESETS["tiny"], name="tiny-imagenet", img_size=64, patch_size=8
)
TINY_CIFAR = dataclasses.replace(PRESETS["tiny"], name="tiny-cifar")


# ---- arguments ---------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="benchmarks/gpu_check", help="report folder")
    parser.add_argument("--only", default="", help=f"comma-separated subset of {', '.join(CHECKS)}")
    parser.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default="cuda",
        help="cpu: run the CPU-side logic on tiny settings (same as --dry-run)",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="CPU, tiny sizes, tests only collected"
    )
    parser.add_argument(
        "--batch",
        type=int,
        default=None,
        help="first batch tried at the ImageNet preset (512; dry run 8)",
    )
    parser.add_argument(
        "--min-batch",
        type=int,
        default=None,
        help="smallest batch tried before giving up (8; dry run 2)",
    )
    parser.add_argument(
        "--reps", type=int, default=None, help="timed steps per preset (10; dry run 1)"
    )
    parser.add_argument(
        "--trainer-steps", type=int, default=None, help="trainer steps (50; dry run 2)"
    )
    args = parser.parse_args(argv)
    if args.device == "cpu":
        args.dry_run = True
    if args.dry_run:
        args.device = "cpu"
    dry = args.dry_run
    defaults = {
        "batch": 8 if dry else 512,
        "min_batch": 2 if dry else 8,
        "reps": 1 if dry else 10,
        "trainer_steps": 2 if dry else 50,
    }
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.min_batch > args.batch:
        parser.error(f"--min-batch ({args.min_batch}) must not exceed --batch ({args.batch})")
    names = [s.strip() for s in args.only.split(",") if s.strip()] or list(CHECKS)
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        parser.error(f"--only: unknown check {unknown[0]!r}; choose from {', '.join(CHECKS)}")
    args.checks = [c for c in CHECKS if c in names]
    return args


# ---- peaks -------------------------------------------------------------------------------


def bf16_peak(device: torch.device, *, matmul_n: int, reps: int) -> tuple[float, str]:
    """``(TFLOP/s, what it is)``: the data-sheet dense bf16 peak of the GPU when known,
    otherwise the rate of an ``(n, n) @ (n, n)`` bf16 matmul measured now."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = bf16_peak_tflops(name)
        if peak is not None:
            return peak, f"data-sheet dense bf16 peak of {name}"
    measured = matmul_gflops(matmul_n, torch.bfloat16, device, reps) / 1e3
    return (
        measured,
        f"measured bf16 matmul {matmul_n}^3 on {device_name(device)} (not in the table)",
    )


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


# ---- 1. CUDA-only tests ------------------------------------------------------------------


def needs_cuda(name: str, markers: Sequence[tuple[str, str]]) -> bool:
    """Whether a test is CUDA-only: ``name`` or a marker name mentions CUDA/GPU, or a
    ``skip``/``skipif`` reason does. ``markers``: ``(marker name, reason or "")`` pairs."""
    lowered = name.lower()
    if any(w in lowered for w in CUDA_WORDS):
        return True
    for marker, reason in markers:
        if marker.lower() in CUDA_WORDS:
            return True
        if marker in ("skip", "skipif") and any(w in reason.lower() for w in CUDA_WORDS):
            return True
    return False


def pytest_collection_modifyitems(config, items) -> None:  # pragma: no cover - pytest hook
    """Keep only the CUDA-only tests (active when this file is loaded with ``-p gpu_check``)."""
    keep, drop = [], []
    for item in items:
        markers = [(m.name, str(m.kwargs.get("reason", ""))) for m in item.iter_markers()]
        (keep if needs_cuda(item.name, markers) else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep


def cuda_test_files(root: Path = ROOT / "tests") -> list[Path]:
    """Test files whose text mentions CUDA or a GPU (pytest then selects inside them)."""
    files = []
    for path in sorted(root.rglob("test_*.py")):
        text = path.read_text(errors="replace").lower()
        if any(w in text for w in CUDA_WORDS):
            files.append(path)
    return files


def parse_pytest_summary(output: str) -> dict[str, int]:
    """Counts of the last pytest summary line, e.g. ``{"passed": 5, "skipped": 1}``."""
    counts: dict[str, int] = {}
    for line in reversed(output.strip().splitlines()):
        found = re.findall(
            # "7/947 tests collected" (with deselection) counts the 7 selected
            r"(\d+)(?:/\d+)? (passed|failed|skipped|deselected|errors?|xfailed|xpassed|tests? collected)",
            line,
        )
        if found:
            for n, what in found:
                key = {
                    "error": "errors",
                    "test collected": "collected",
                    "tests collected": "collected",
                }.get(what, what)
                counts[key] = int(n)
            break
    return counts


def check_tests(args: argparse.Namespace, device: torch.device) -> dict:
    files = cuda_test_files()
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-p", "gpu_check"]
    if args.dry_run:
        cmd.append("--collect-only")
    cmd += [str(f.relative_to(ROOT)) for f in files]
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])
    )
    proc = subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIME_LIMITS_S["tests"]
    )
    out = proc.stdout + proc.stderr
    counts = parse_pytest_summary(out)
    ran = (
        counts.get("collected", 0)
        if args.dry_run
        else counts.get("passed", 0) + counts.get("failed", 0)
    )
    ok = proc.returncode == 0 and ran > 0 and not counts.get("failed") and not counts.get("errors")
    return {
        "ok": ok,
        "command": " ".join(cmd),
        "files": len(files),
        "counts": counts,
        "returncode": proc.returncode,
        "tail": "\n".join(out.strip().splitlines()[-15:]),
    }


# ---- 2. fused attention vs explicit ------------------------------------------------------


def _attention_case(
    device: torch.device, b: int, h: int, n: int, dh: int, masked: bool, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, dh, generator=g).to(device) for _ in range(3))
    mask = None
    if masked:  # the last quarter of each sequence's keys is padding, as in the predictor
        valid = torch.ones(b, n, dtype=torch.bool)
        valid[:, n - n // 4 :] = False
        mask = valid[:, None, None, :].to(device)
    return q, k, v, mask


def _attend(
    fn: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, dtype: torch.dtype
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    leaves = [t.detach().to(dtype).requires_grad_(True) for t in (q, k, v)]
    out = fn(*leaves, mask)
    g = torch.Generator(device="cpu").manual_seed(7)
    out.backward(torch.randn(out.shape, generator=g).to(out.device, out.dtype))
    return out.detach().float(), [t.grad.float() for t in leaves]


def _max_violation(a: torch.Tensor, ref: torch.Tensor, tol: float) -> float:
    """Largest ``|a - ref| / (tol + tol * |ref|)``: <= 1 means within tolerance."""
    return float(((a - ref).abs() / (tol + tol * ref.abs())).max())


def check_sdpa(args: argparse.Namespace, device: torch.device) -> dict:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from jepa_blocks.layers import dot_product_attention

    def explicit(q, k, v, mask):
        return dot_product_attention(q, k, v, attn_mask=mask, fused=False)

    backends = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION}
    # (B, heads, N, Dh): encoder of the CIFAR preset, ViT-S/16 at 224 px, a predictor sequence.
    shapes = [(128, 3, 64, 64), (64, 6, 196, 64), (256, 6, 80, 32)]
    if args.dry_run:
        shapes = [(2, 2, 16, 8)]
    rows, ok = [], True
    for i, (b, h, n, dh) in enumerate(shapes):
        for masked in (False, True):
            q, k, v, mask = _attention_case(device, b, h, n, dh, masked, seed=i)
            ref_out, ref_grads = _attend(explicit, q, k, v, mask, torch.float32)
            ex_out, ex_grads = _attend(explicit, q, k, v, mask, torch.bfloat16)
            for name, backend in backends.items():
                row = {"backend": name, "shape": [b, h, n, dh], "masked": masked}
                if masked and name == "flash":
                    continue  # the flash kernel takes no attention mask

                def fused(q, k, v, mask, backend=backend):
                    with sdpa_kernel([backend]):
                        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

                try:
                    out, grads = _attend(fused, q, k, v, mask, torch.bfloat16)
                except RuntimeError as err:  # no kernel of this backend for these inputs
                    row.update(available=False, note=str(err).splitlines()[0][:200])
                    rows.append(row)
                    continue
                worst = max(
                    _max_violation(a, e, SDPA_TOL)
                    for a, e in zip([out, *grads], [ex_out, *ex_grads], strict=True)
                )
                row.update(
                    available=True,
                    worst_over_tolerance=worst,
                    ok=worst <= 1.0,
                    fused_vs_fp32_max_abs=max(
                        float((a - r).abs().max())
                        for a, r in zip([out, *grads], [ref_out, *ref_grads], strict=True)
                    ),
                    explicit_vs_fp32_max_abs=max(
                        float((a - r).abs().max())
                        for a, r in zip([ex_out, *ex_grads], [ref_out, *ref_grads], strict=True)
                    ),
                )
                ok &= row["ok"]
                rows.append(row)
    compared = [r for r in rows if r.get("available")]
    # On CUDA both fused backends must exist for bf16; on CPU (dry run) some may not.
    if device.type == "cuda":
        ok &= {r["backend"] for r in compared} == set(backends)
    return {
        "ok": ok and bool(compared),
        "tolerance": {"rtol": SDPA_TOL, "atol": SDPA_TOL},
        "cases": rows,
    }


# ---- 3-4. the H-JEPA step ----------------------------------------------------------------


def is_oom(err: BaseException) -> bool:
    """A CUDA out-of-memory error (or the generic RuntimeError some builds raise)."""
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and "out of memory" in str(err).lower()


def batches_to_try(first: int, smallest: int) -> list[int]:
    """``first, first / 2, ...`` down to ``smallest`` (always included once)."""
    out, b = [], first
    while b > smallest:
        out.append(b)
        b //= 2
    out.append(smallest)
    return out


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_step(sizes: Sizes, device: torch.device, *, reps: int, peak_tflops: float) -> dict:
    """Images/s, peak memory, FLOPs and MFU of ``TrainStep`` at ``sizes`` (raises on OOM)."""
    from bench_train_step import TrainStep, count_flops

    step = TrainStep(sizes, device)
    try:
        for _ in range(2):  # warm-up: kernels chosen, allocator filled
            step()
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = time_calls(step, warmup=0, reps=reps, device=device)
        peak_mb = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
        flops = count_flops(step)
    finally:
        del step
        _free(device)
    sec = statistics.median(times)
    achieved = flops / sec / 1e12
    return {
        "batch": sizes.batch,
        "ms": 1e3 * sec,
        "images_per_s": sizes.batch / sec,
        "peak_mb": peak_mb,
        "gflop_per_step": flops / 1e9,
        "achieved_tflops": achieved,
        "mfu": achieved / peak_tflops,
    }


def check_step(
    args: argparse.Namespace,
    device: torch.device,
    sizes: Sizes,
    *,
    batches: list[int],
    peak: tuple[float, str],
) -> dict:
    """The step at the first batch of ``batches`` that fits; the OOM batches are listed."""
    oom = []
    for batch in batches:
        try:
            res = measure_step(
                dataclasses.replace(sizes, batch=batch), device, reps=args.reps, peak_tflops=peak[0]
            )
        except Exception as err:
            if not is_oom(err):
                raise
            oom.append(batch)
            _free(device)
            continue
        res.update(
            ok=True,
            preset=sizes.name,
            out_of_memory_at=oom,
            peak_tflops=peak[0],
            peak_reference=peak[1],
        )
        return res
    return {"ok": False, "preset": sizes.name, "out_of_memory_at": oom, "error": "no batch fits"}


# ---- 5. the trainer ----------------------------------------------------------------------


def trainer_command(args: argparse.Namespace, out_dir: Path) -> list[str]:
    cmd = [
        sys.executable, str(ROOT / "examples" / "train_hjepa.py"),
        "--device", args.device,
        "--max-steps", str(args.trainer_steps),
        "--out", str(out_dir),
        "--no-final-eval",
        "--log-to", "none",
        "--log-every", "1",
        "--eval-every", "1000000",
        "--monitor-every", "0",
    ]  # fmt: skip
    if args.dry_run:  # a model that trains in seconds on a CPU
        cmd += ["--batch-size", "16", "--embed-dim", "16", "--depth", "1", "--num-heads", "2",
                "--pred-dim", "8", "--pred-depth", "1", "--pred-heads", "2", "--workers", "0"]  # fmt: skip
    return cmd


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def check_trainer(args: argparse.Namespace, device: torch.device) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = Path(tmp) / "run"
        cmd = trainer_command(args, out_dir)
        start = time.perf_counter()
        proc = subprocess.run(
            cmd, cwd=ROOT, capture_output=True, text=True, timeout=TIME_LIMITS_S["trainer"]
        )
        wall = time.perf_counter() - start
        records = [
            r for r in read_metrics(out_dir / "metrics.jsonl") if "step" in r and "loss" in r
        ]
    last = records[-1] if records else {}
    rates = [r["images_per_s"] for r in records[1:] if "images_per_s" in r]  # first: warm-up
    ok = proc.returncode == 0 and last.get("step") == args.trainer_steps
    ok = ok and all(isinstance(r["loss"], float) and r["loss"] == r["loss"] for r in records)
    return {
        "ok": ok,
        "command": " ".join(cmd),
        "returncode": proc.returncode,
        "wall_s": wall,
        "steps": last.get("step"),
        "first_loss": records[0]["loss"] if records else None,
        "last_loss": last.get("loss"),
        "images_per_s": statistics.median(rates) if rates else None,
        "tail": "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-10:]),
    }


# ---- report ------------------------------------------------------------------------------


def _f(v: object, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.{digits}g}"
    return str(v)


def format_markdown(report: dict) -> str:
    """The report as markdown: a header with the machine, then one row per check."""
    meta = report["meta"]
    lines = [
        f"### GPU check ({meta['date']})",
        "",
        f"Device: {meta['device']}; torch {meta['torch']}; command `{meta['command']}`"
        + (" (dry run: CPU, tiny sizes)" if meta["dry_run"] else "")
        + f"; {meta['total_s']:.0f} s in all.",
        "",
        "| check | result | figures |",
        "|---|---|---|",
    ]
    checks = report["checks"]
    for name in CHECKS:
        if name not in checks:
            continue
        res = checks[name]
        status = "pass" if res.get("ok") else "**FAIL**"
        if "error" in res and not res.get("ok"):
            figures = f"error: {res['error']}"
        elif name == "tests":
            counts = ", ".join(f"{n} {k}" for k, n in sorted(res.get("counts", {}).items()))
            figures = f"{counts or 'no summary'} ({res.get('files')} files)"
        elif name == "sdpa":
            parts = []
            for c in res.get("cases", []):
                where = f"{c['backend']} {'x'.join(map(str, c['shape']))}{' masked' if c['masked'] else ''}"
                if c.get("available"):
                    parts.append(f"{where}: {_f(c['worst_over_tolerance'], 2)} of tol")
                else:
                    parts.append(f"{where}: no kernel")
            tol = res.get("tolerance", {})
            figures = f"tol rtol=atol={tol.get('rtol')}; " + "; ".join(parts)
        elif name.startswith("step_"):
            figures = (
                f"batch {res.get('batch')}: {_f(res.get('images_per_s'))} images/s, "
                f"{_f(res.get('ms'))} ms/step, peak {_f(res.get('peak_mb'))} MiB, "
                f"{_f(res.get('gflop_per_step'))} GFLOP/step, {_f(res.get('achieved_tflops'))} TFLOP/s, "
                f"MFU {_f(res.get('mfu'), 2)} vs {res.get('peak_reference')} ({_f(res.get('peak_tflops'))} TFLOP/s)"
            )
            if res.get("out_of_memory_at"):
                figures += (
                    f"; out of memory at batch {', '.join(map(str, res['out_of_memory_at']))}"
                )
        else:  # trainer
            figures = (
                f"{res.get('steps')} steps, loss {_f(res.get('first_loss'))} -> {_f(res.get('last_loss'))}, "
                f"{_f(res.get('images_per_s'))} images/s, {_f(res.get('wall_s'))} s wall"
            )
        lines.append(f"| {name} | {status} | {figures} |")
    return "\n".join(lines) + "\n"


def run_checks(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    start = time.perf_counter()
    checks: dict[str, dict] = {}
    peak: tuple[float, str] | None = None
    for name in args.checks:
        t0 = time.perf_counter()
        print(f"[gpu_check] {name} ...", flush=True)
        try:
            if name == "tests":
                res = check_tests(args, device)
            elif name == "sdpa":
                res = check_sdpa(args, device)
            elif name.startswith("step_"):
                if peak is None:
                    peak = bf16_peak(
                        device,
                        matmul_n=256 if args.dry_run else 8192,
                        reps=1 if args.dry_run else 5,
                    )
                imagenet = name == "step_imagenet"
                sizes = (
                    (TINY_IMAGENET if imagenet else TINY_CIFAR)
                    if args.dry_run
                    else (IMAGENET if imagenet else CIFAR)
                )
                batches = batches_to_try(args.batch, args.min_batch) if imagenet else [sizes.batch]
                res = check_step(args, device, sizes, batches=batches, peak=peak)
            else:
                res = check_trainer(args, device)
        except Exception as err:  # record it; the other checks still run
            traceback.print_exc()
            res = {"ok": False, "error": f"{type(err).__name__}: {str(err)[:500]}"}
        res["seconds"] = time.perf_counter() - t0
        checks[name] = res
        print(
            f"[gpu_check] {name}: {'pass' if res.get('ok') else 'FAIL'} ({res['seconds']:.0f} s)",
            flush=True,
        )
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "dry_run": args.dry_run,
        "command": " ".join(["python", "benchmarks/gpu_check.py", *args.argv]),
        "total_s": time.perf_counter() - start,
    }
    return {"meta": meta, "ok": all(c.get("ok") for c in checks.values()), "checks": checks}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.argv = argv
    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "gpu_check: CUDA is not available on this machine (torch "
            f"{torch.__version__}, built for CUDA {torch.version.cuda}). Run it on a GPU, or "
            "pass --dry-run (or --device cpu) to test the script's own logic on CPU.",
            file=sys.stderr,
        )
        return 2
    report = run_checks(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    markdown = format_markdown(report)
    (out / "gpu_check.md").write_text(markdown)
    print()
    print(markdown)
    print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
