"""Smoke tests of the benchmark suite (benchmarks/run.py): every section runs on tiny sizes
and produces its JSON keys. No timing assertions."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
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
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


run = _load("run")
baselines = _load("baselines")
TINY = run.PRESETS["tiny"]
CPU = torch.device("cpu")


def _positive(results: dict, key: str) -> float:
    assert key in results, f"missing {key}; have {sorted(results)[:20]}"
    value = results[key]
    assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (key, value)
    return value


def test_masker_section_keys_and_threads_restored():
    before = torch.get_num_threads()
    res = run.bench_masker(TINY, CPU, threads=1)
    assert torch.get_num_threads() == before
    for key in (
        "masker.grid8.images_per_s",
        "masker.grid14.images_per_s",
        "masker.grid8_levels3.images_per_s",
        "masker.grid14.ms_per_batch",
        "masker.grid14.speedup_vs_ijepa",
        "masker.collate.images_per_s",
    ):
        _positive(res, key)
    assert res["masker.collate.workers"] == 2


def test_losses_section_keys_with_reference_ratios():
    # D = 192 and K = 256 have stored reference figures; N = 16 keeps it fast.
    sizes = dataclasses.replace(TINY, loss_dims=(8, 192), sigreg_ks=(256,), sigreg_chunk=64)
    res = run.bench_losses(sizes, CPU, threads=1)
    for d in (8, 192):
        for stem in (f"losses.sigreg.k256.d{d}", f"losses.vicreg.d{d}"):
            for what in ("ms", "peak_mb", "baseline_ms", "baseline_peak_mb", "ratio_same_run"):
                _positive(res, f"{stem}.{what}")
    for stem, ref in (
        ("losses.sigreg.k256.d192", 6.5),
        ("losses.vicreg.d192", 2.0),
    ):
        assert res[f"{stem}.ref_ms"] == ref
        assert res[f"{stem}.ratio"] == pytest.approx(res[f"{stem}.ms"] / ref)
    assert "losses.sigreg.k256.d8.ratio" not in res  # no stored figure for D = 8
    assert res["losses.vicreg.d192.ratio_lightly"] > 0
    for name in ("sigreg", "vicreg"):
        _positive(res, f"losses.{name}.ratio")
        _positive(res, f"losses.{name}.ratio_same_run")
    for n, d in TINY.sigreg_chunk_cases:
        chunk = f"losses.sigreg.k256.d{d}.n{n}.chunk64"
        for what in ("ms", "unchunked_ms", "peak_mb", "unchunked_peak_mb", "peak_ratio"):
            _positive(res, f"{chunk}.{what}")
        assert res[f"{chunk}.rel_diff"] < 1e-4
    assert res["losses.sigreg.baseline_rel_diff"] < 1e-10
    assert res["losses.vicreg.baseline_rel_diff"] < 1e-10


def test_encoder_section_keys():
    sizes = dataclasses.replace(TINY, encoder_keeps=(1.0, 0.75, 0.5, 0.25))
    res = run.bench_encoder(sizes, CPU, threads=1)
    for p, tokens in ((100, 64), (75, 48), (50, 32), (25, 16)):
        _positive(res, f"encoder.keep{p}.ms")
        _positive(res, f"encoder.keep{p}.ratio")
        assert res[f"encoder.keep{p}.tokens"] == tokens
    assert res["encoder.keep100.ratio"] == 1.0


def test_train_step_section_keys_and_compile_time_guard():
    res = run.bench_train_step(TINY, CPU, threads=1, compile=True, compile_timeout_s=0.01)
    for key in (
        "train_step.images_per_s",
        "train_step.ms",
        "train_step.gflop_per_step",
        "train_step.achieved_gflops",
        "train_step.matmul_fp32_gflops",
        "train_step.matmul_bf16_gflops",
        "train_step.mfu",
        "train_step.mfu_fp32",
        "train_step.mfu_bf16",
        "train_step.peak_mb",
        "train_step.static_mb",
    ):
        _positive(res, key)
    # The step runs in bf16 autocast: MFU is against the bf16 matmul, named in the results.
    assert res["train_step.mfu"] == res["train_step.mfu_bf16"]
    assert "bf16 matmul" in res["train_step.mfu_reference"]
    assert "train_step.mfu_peak" not in res  # data-sheet peaks are for GPUs only
    for phase in run.PHASES:
        _positive(res, f"train_step.phase.{phase}.ms")
    # The compile measurement could not finish in 0.01 s: recorded, not raised.
    assert "did not finish" in res["train_step.compile_error"]
    assert res["train_step.compile_speedup"] is None


def test_peak_memory_counts_a_known_allocation():
    def alloc():
        x = torch.empty(4 * 2**20, dtype=torch.uint8)  # 4 MiB
        x.fill_(1)
        y = torch.empty(2**20, dtype=torch.uint8)  # 1 MiB more while x is alive
        y.fill_(1)

    peak = run.peak_memory_mb(alloc, CPU)
    assert peak == pytest.approx(5.0, abs=0.1)


def test_baselines_compute_the_library_formulas():
    from jepa_blocks import sigreg, vicreg_loss

    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 6, generator=g, dtype=torch.float64)
    y = torch.randn(32, 6, generator=g, dtype=torch.float64)
    a = torch.randn(6, 10, generator=g, dtype=torch.float64)
    assert float(baselines.sigreg_baseline(x, directions=a)) == pytest.approx(
        float(sigreg(x, directions=a)), rel=1e-12
    )
    assert float(baselines.vicreg_baseline(x, y)) == pytest.approx(
        float(vicreg_loss(x, y).total), rel=1e-12
    )


def test_main_writes_json_and_report(tmp_path, capsys):
    out = tmp_path / "bench.json"
    run.main(
        ["--tiny", "--threads", "1", "--only", "encoder", "--device", "cpu", "--json", str(out)]
    )
    data = json.loads(out.read_text())
    assert data["meta"]["sizes"] == "tiny" and data["meta"]["threads"] == 1
    assert data["encoder.keep100.ms"] > 0
    assert "== encoder" in capsys.readouterr().out


def test_main_rejects_unknown_section():
    with pytest.raises(SystemExit, match="unknown section"):
        run.main(["--tiny", "--only", "nope"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_sections_are_prefixed():
    res = run.run_section("encoder", TINY, torch.device("cuda"), threads=1)
    assert res and all(k.startswith("cuda.encoder.") for k in res)


def test_compile_worker_failure_is_recorded():
    # The worker process parses the sizes, builds the step and fails on the bad patch size.
    bad = dataclasses.replace(TINY, patch_size=5)
    res = run.compiled_step_in_subprocess(bad, CPU, threads=1, timeout_s=120)
    assert res["error"].startswith("torch.compile step failed")
    assert "patch_size" in res["error"]


def test_predictor_modes_keys_ratios_report_and_command_line(tmp_path, capsys):
    step_module = _load("bench_train_step")
    res = step_module.bench_predictor_modes(TINY, CPU, threads=1, warmup=0, reps=1)
    old, new = step_module.PREDICTOR_MODES
    assert (old, new) == ("per_block", "shared_context")
    assert list(step_module.STEP_LAYOUTS) == [old, new, "shared_context_truncated"]
    for mode in step_module.STEP_LAYOUTS:
        for what in ("predictor_fwd_ms", "predictor_fwd_bwd_ms", "step_ms", "images_per_s"):
            _positive(res, f"train_step.modes.{mode}.{what}")
        for phase in run.PHASES:
            _positive(res, f"train_step.modes.{mode}.phase.{phase}.ms")
        assert res[f"train_step.modes.{mode}.images_per_s"] == pytest.approx(
            1e3 * TINY.batch / res[f"train_step.modes.{mode}.step_ms"]
        )
    for what in ("predictor_fwd", "predictor_fwd_bwd", "step"):
        assert res[f"train_step.modes.speedup.{what}"] == pytest.approx(
            res[f"train_step.modes.{old}.{what}_ms"] / res[f"train_step.modes.{new}.{what}_ms"]
        )
        assert res[f"train_step.modes.speedup_truncated.{what}"] == pytest.approx(
            res[f"train_step.modes.{new}.{what}_ms"] / res[f"train_step.modes.shared_context_truncated.{what}_ms"]
        )
    text = "\n".join(step_module.format_predictor_modes(res, TINY))
    assert "shared_context / per_block speed-up" in text and "phases of per_block" in text
    assert "truncated / padded masks" in text and "phases of shared_context_truncated" in text
    truncated = step_module.TrainStep(TINY, CPU, predictor_mode="shared_context", truncate=True)
    masks = truncated.masker(TINY.batch, generator=torch.Generator().manual_seed(0))
    assert all(bool(m.valid.all()) for m in (masks.context, *masks.targets))  # nothing padded
    out = tmp_path / "modes.json"
    step_module.main(["--preset", "tiny", "--threads", "1", "--warmup", "0", "--reps", "1", "--json", str(out)])
    assert "speed-up" in capsys.readouterr().out
    assert json.loads(out.read_text())["train_step.modes.speedup.step"] > 0


@pytest.mark.slow
def test_import_section_times_fresh_processes(tmp_path, capsys):
    out = tmp_path / "bench.json"
    run.main(["--tiny", "--only", "import", "--device", "cpu", "--json", str(out)])
    data = json.loads(out.read_text())
    for name in ("python", "torch", "jepa_blocks"):
        _positive(data, f"import.{name}_s")
    assert data["import.reps"] == TINY.import_reps == 1
    assert data["import.ratio"] == pytest.approx(data["import.jepa_blocks_s"] / data["import.torch_s"])
    assert data["import.python_s"] < data["import.torch_s"]  # torch's import is not free
    assert "import jepa_blocks" in capsys.readouterr().out
