"""CPU-side logic of benchmarks/gpu_check.py: arguments, peak table, test selection, OOM
batch search, report formatting, and a tiny dry run (no GPU needed)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"


def _load(name: str):
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


gpu_check = _load("gpu_check")
timing = _load("timing")


def test_arguments_defaults_dry_run_and_errors(capsys):
    args = gpu_check.parse_args([])
    assert args.device == "cuda" and not args.dry_run
    assert (args.batch, args.min_batch, args.reps, args.trainer_steps) == (512, 8, 10, 50)
    assert args.checks == list(gpu_check.CHECKS)
    dry = gpu_check.parse_args(["--device", "cpu"])
    assert dry.dry_run and dry.device == "cpu" and dry.trainer_steps == 2
    assert gpu_check.parse_args(["--dry-run"]).device == "cpu"
    # --only keeps the script's order
    assert gpu_check.parse_args(["--only", "trainer,sdpa"]).checks == ["sdpa", "trainer"]
    for bad, match in (
        (["--only", "nope"], "unknown check"),
        (["--batch", "0"], "--batch must be >= 1"),
        (["--batch", "4", "--min-batch", "8"], "must not exceed"),
    ):
        with pytest.raises(SystemExit):
            gpu_check.parse_args(bad)
        assert match in capsys.readouterr().err


def test_without_cuda_exits_with_a_clear_message(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "CUDA is not available" in err and "--dry-run" in err
    assert not (tmp_path / "gpu_check.json").exists()


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989.4),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H200", 989.4),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA L4", 121.0),
        ("NVIDIA L40S", 362.0),
        ("Tesla T4", None),
    ],
)
def test_bf16_peak_table(name, peak):
    assert timing.bf16_peak_tflops(name) == peak


def test_peak_falls_back_to_a_measured_matmul_on_unknown_devices():
    value, what = gpu_check.bf16_peak(torch.device("cpu"), matmul_n=64, reps=1)
    assert value > 0 and "measured bf16 matmul 64^3" in what


def test_cuda_test_selection():
    assert gpu_check.needs_cuda("test_cuda_update_and_cpu_ema", [])
    assert gpu_check.needs_cuda("test_x", [("cuda", "")])
    assert gpu_check.needs_cuda("test_x", [("skipif", "needs CUDA")])
    assert gpu_check.needs_cuda("test_x", [("skipif", "no GPU here")])
    assert not gpu_check.needs_cuda("test_x", [("skipif", "needs lightning"), ("slow", "")])
    assert not gpu_check.needs_cuda("test_masks_disjoint", [])
    files = gpu_check.cuda_test_files()
    assert ROOT / "tests" / "targets" / "test_ema.py" in files  # has a CUDA-only test
    assert all("cuda" in f.read_text().lower() or "gpu" in f.read_text().lower() for f in files)


def test_pytest_summary_parsing():
    assert gpu_check.parse_pytest_summary("x\n3 passed, 1 skipped, 2 deselected in 4.1s\n") == {
        "passed": 3,
        "skipped": 1,
        "deselected": 2,
    }
    assert gpu_check.parse_pytest_summary("7/947 tests collected (940 deselected) in 3s") == {
        "collected": 7,
        "deselected": 940,
    }
    assert gpu_check.parse_pytest_summary("1 failed, 1 error in 2s")["errors"] == 1
    assert gpu_check.parse_pytest_summary("no summary") == {}


def test_batch_search_halves_until_one_fits(monkeypatch):
    assert gpu_check.batches_to_try(512, 8) == [512, 256, 128, 64, 32, 16, 8]
    assert gpu_check.batches_to_try(100, 30) == [100, 50, 30]
    assert gpu_check.batches_to_try(8, 8) == [8]
    tried = []

    def fake_measure(sizes, device, *, reps, peak_tflops):
        tried.append(sizes.batch)
        if sizes.batch > 64:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return {"batch": sizes.batch, "images_per_s": 1.0}

    monkeypatch.setattr(gpu_check, "measure_step", fake_measure)
    args = gpu_check.parse_args(["--dry-run"])
    res = gpu_check.check_step(
        args, torch.device("cpu"), gpu_check.TINY_CIFAR, batches=[256, 128, 64, 32], peak=(1.0, "x")
    )
    assert tried == [256, 128, 64] and res["batch"] == 64 and res["ok"]
    assert res["out_of_memory_at"] == [256, 128]
    # Other errors are not taken for out-of-memory.
    assert gpu_check.is_oom(RuntimeError("CUDA error: out of memory"))
    assert not gpu_check.is_oom(RuntimeError("shape mismatch"))

    def always_oom(sizes, device, *, reps, peak_tflops):
        raise torch.cuda.OutOfMemoryError("out of memory")

    monkeypatch.setattr(gpu_check, "measure_step", always_oom)
    res = gpu_check.check_step(
        args, torch.device("cpu"), gpu_check.TINY_CIFAR, batches=[4, 2], peak=(1.0, "x")
    )
    assert not res["ok"] and res["error"] == "no batch fits"


def test_markdown_report_has_a_row_per_check():
    report = {
        "meta": {
            "date": "2026-12-07T18:00:00+00:00",
            "device": "NVIDIA H100 80GB HBM3",
            "torch": "2.x",
            "command": "python benchmarks/gpu_check.py",
            "dry_run": False,
            "total_s": 312.0,
        },
        "checks": {
            "tests": {"ok": True, "counts": {"passed": 6, "skipped": 1}, "files": 9},
            "sdpa": {
                "ok": False,
                "tolerance": {"rtol": 0.02, "atol": 0.02},
                "cases": [
                    {"backend": "flash", "shape": [2, 3, 4, 5], "masked": False, "available": True,
                     "worst_over_tolerance": 1.5},
                    {"backend": "efficient", "shape": [2, 3, 4, 5], "masked": True, "available": False},
                ],
            },
            "step_imagenet": {"ok": True, "batch": 256, "images_per_s": 2500.0, "ms": 102.4,
                              "peak_mb": 40000.0, "gflop_per_step": 1234.0, "achieved_tflops": 300.0,
                              "mfu": 0.3, "peak_tflops": 989.4, "peak_reference": "data sheet",
                              "out_of_memory_at": [512]},
            "trainer": {"ok": False, "error": "TimeoutExpired: 150 s"},
        },
    }  # fmt: skip
    md = gpu_check.format_markdown(report)
    lines = md.splitlines()
    assert lines[0].startswith("### GPU check") and "NVIDIA H100" in md
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| check")]
    assert [r.split("|")[1].strip() for r in rows] == ["tests", "sdpa", "step_imagenet", "trainer"]
    assert "6 passed" in rows[0] and "pass" in rows[0]
    assert "**FAIL**" in rows[1] and "1.5 of tol" in rows[1] and "no kernel" in rows[1]
    assert "2,500 images/s" in rows[2] and "MFU 0.3" in rows[2] and "batch 512" in rows[2]
    assert "**FAIL**" in rows[3] and "TimeoutExpired" in rows[3]


@pytest.mark.slow
def test_tiny_dry_run_writes_the_report(tmp_path, capsys):
    rc = gpu_check.main(
        ["--dry-run", "--only", "sdpa,step_imagenet,step_cifar", "--out", str(tmp_path)]
    )
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert rc == 0, report
    assert report["meta"]["dry_run"] and set(report["checks"]) == {
        "sdpa",
        "step_imagenet",
        "step_cifar",
    }
    for name in ("step_imagenet", "step_cifar"):
        step = report["checks"][name]
        assert step["ok"] and step["images_per_s"] > 0 and step["gflop_per_step"] > 0
        assert 0 < step["mfu"] and "measured bf16 matmul" in step["peak_reference"]
    flash = [c for c in report["checks"]["sdpa"]["cases"] if c.get("available")]
    assert flash and all(c["worst_over_tolerance"] <= 1 for c in flash)
    assert (tmp_path / "gpu_check.md").read_text().count("| pass |") == 3
    assert "wrote" in capsys.readouterr().out


def test_trainer_command_and_metrics(tmp_path):
    args = gpu_check.parse_args(["--trainer-steps", "7"])
    cmd = gpu_check.trainer_command(args, tmp_path / "run")
    assert cmd[cmd.index("--device") + 1] == "cuda" and cmd[cmd.index("--max-steps") + 1] == "7"
    assert "--no-final-eval" in cmd and "--batch-size" not in cmd  # the preset's own batch
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n\n{"step": 2, "loss": 1.5}\n')
    assert [r["step"] for r in gpu_check.read_metrics(path)] == [1, 2]
    assert gpu_check.read_metrics(tmp_path / "missing.jsonl") == []
