"""The example trainer is exact on resume and under DDP, and survives NaN/Inf losses.

* Exact resume: a run stopped after 3 steps and resumed in a *new process* (with a
  different number of DataLoader workers) logs the same losses and ends with bitwise the
  same weights, EMA target and optimizer state as an uninterrupted run. Drop-path, a
  second augmented view and the VICReg term are on, so data order, augmentations, masks,
  dropout, EMA and schedules must all be restored for this to hold.
* DDP: 3 steps on 2 gloo processes (global batch 8 = 2 x 4) give the weights of one
  process with batch 8, for both regularisers (which gather across ranks).
* Non-finite losses skip the optimizer and EMA update, are logged, and stop the run after
  ``--nonfinite-patience`` in a row.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from jepa_blocks.training import NonFiniteLossError, load_checkpoint

pytest.importorskip("torchvision")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

RUN = ["--max-steps", "6", "--eval-every", "100", "--no-final-eval", "--monitor-every", "0"]


def _records(run_dir) -> dict[int, dict]:
    """Training-step records of metrics.jsonl by step (skipped steps excluded)."""
    records = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return {r["step"]: r for r in records if "loss" in r and not r.get("skipped_nonfinite")}


def _losses(run_dir) -> dict[int, float]:
    return {step: r["loss"] for step, r in _records(run_dir).items()}


def _train_subprocess(args: list[str]) -> None:
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "train_hjepa.py"), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def _assert_states_equal(a: dict, b: dict, *, exact: bool, rtol: float = 0.0, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, dict):
            _assert_states_equal(x, y, exact=exact, rtol=rtol, atol=atol)
        elif isinstance(x, torch.Tensor):
            if exact:
                assert torch.equal(x, y), f"{key} differs"
            else:
                torch.testing.assert_close(x, y, rtol=rtol, atol=atol, msg=lambda m, k=key: f"{k}: {m}")
        elif isinstance(x, (list, tuple)) and x and isinstance(x[0], dict):
            for u, v in zip(x, y, strict=True):
                _assert_states_equal(u, v, exact=exact, rtol=rtol, atol=atol)
        else:
            assert x == y, f"{key}: {x} != {y}"


@pytest.mark.slow
def test_resume_in_new_process_is_exact(image_folder, tiny_args, tmp_path):
    common = [*tiny_args, *RUN, "--data", str(image_folder), "--drop-path", "0.2", "--views", "2",
              "--reg", "vicreg", "--reg-weight", "0.5"]
    full, parts = tmp_path / "full", tmp_path / "parts"
    _train_subprocess([*common, "--out", str(full)])
    # Interrupted after 3 steps (mid-epoch: 20 training images, 2 batches of 8 per epoch),
    # with a DataLoader worker, then resumed in a new process without workers.
    _train_subprocess([*common, "--out", str(parts), "--stop-at", "3", "--workers", "1"])
    interrupted = load_checkpoint(parts / "last.pt")
    assert (interrupted["step"], interrupted["epoch"], interrupted["batch_in_epoch"]) == (3, 1, 1)
    _train_subprocess([*common, "--out", str(parts), "--resume"])

    assert _losses(full) == _losses(parts)  # exactly equal floats, steps 1..6
    assert sorted(_losses(full)) == [1, 2, 3, 4, 5, 6]
    a, b = load_checkpoint(full / "last.pt"), load_checkpoint(parts / "last.pt")
    for key in ("encoder", "predictor", "target", "optimizer", "scheduler"):
        _assert_states_equal(a[key], b[key], exact=True)
    assert a["step"] == b["step"] == 6 and a["batch_in_epoch"] == b["batch_in_epoch"]


def _ddp_worker(rank: int, world: int, load_example, args: list[str]) -> None:
    load_example("train_hjepa").main(args)  # forked: the loader function is inherited, not pickled


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("reg", ["vicreg", "sigreg"])
def test_ddp_steps_equal_single_process_on_global_batch(reg, image_folder, tiny_args, load_example, run_gloo,
                                                       tmp_path):
    common = [*tiny_args, *RUN, "--data", str(image_folder), "--max-steps", "3", "--reg", reg,
              "--reg-weight", "0.5", "--views", "2" if reg == "vicreg" else "1"]
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    run_gloo(_ddp_worker, load_example, [*common, "--out", str(ddp)], timeout=180.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the gloo workers: same reduction order inside matmuls
    try:
        load_example("train_hjepa").main([*common, "--out", str(single)])
    finally:
        torch.set_num_threads(threads)

    a, b = load_checkpoint(single / "last.pt"), load_checkpoint(ddp / "last.pt")
    assert a["step"] == b["step"] == 3
    # Same samples, augmentations and masks; only float summation order differs (padding
    # lengths of the per-rank mask lists, the gradient all-reduce). Losses and global
    # gradient norms agree to ~1e-7; the weights to 1e-4, i.e. 3% of the largest move
    # AdamW can make in 3 steps at lr 1e-3: Adam divides by sqrt(v), so for parameters
    # whose gradient is ~0 (a few LayerNorm biases) rounding noise gets a visible update.
    for key in ("encoder", "predictor", "target"):
        _assert_states_equal(a[key], b[key], exact=False, rtol=0.0, atol=1e-4)
    ra, rb = _records(single), _records(ddp)
    assert ra.keys() == rb.keys() == {1, 2, 3}
    for step in ra:
        for name in ("loss", "reg", "grad_norm", "level0", "level1"):
            assert ra[step][name] == pytest.approx(rb[step][name], rel=1e-5, abs=1e-7), (step, name)


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_local_crops_equal_single_process(image_folder, tiny_args, load_example, run_gloo, tmp_path):
    """Multi-crop JEPA under torchrun: the one predictor (grid at forward time) serves the
    global and the local crops, DDP-wrapped (was: a weight-tied second predictor outside
    DDP, refused with several processes)."""
    common = [*tiny_args, *RUN, "--data", str(image_folder), "--max-steps", "3", "--local-crops", "2",
              "--local-size", "12", "--local-levels", "2"]
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    run_gloo(_ddp_worker, load_example, [*common, "--out", str(ddp)], timeout=180.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        load_example("train_hjepa").main([*common, "--out", str(single)])
    finally:
        torch.set_num_threads(threads)
    a, b = load_checkpoint(single / "last.pt"), load_checkpoint(ddp / "last.pt")
    for key in ("encoder", "predictor", "target"):
        _assert_states_equal(a[key], b[key], exact=False, rtol=0.0, atol=1e-4)
    ra, rb = _records(single), _records(ddp)
    for step in ra:
        for name in ("loss", "local", "grad_norm", "level0"):
            assert ra[step][name] == pytest.approx(rb[step][name], rel=1e-5, abs=1e-7), (step, name)


def _counting(fn):
    """A function (so it binds as a method) that counts its calls in ``.calls[0]``."""

    def wrapper(*args, **kwargs):
        wrapper.calls[0] += 1
        return fn(*args, **kwargs)

    wrapper.calls = [0]
    return wrapper


def _nan_loss_at(train, monkeypatch, bad_calls) -> None:
    """Make the trainer's latent loss return NaN on the given (1-based) calls."""
    base = train.LatentPredictionLoss
    calls = {"n": 0}

    class NaNLoss(base):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            calls["n"] += 1
            if bad_calls(calls["n"]):
                return type(out)(out.total * float("nan"), out.terms)
            return out

    monkeypatch.setattr(train, "LatentPredictionLoss", NaNLoss)


def test_nonfinite_loss_skips_optimizer_and_ema(image_folder, tiny_args, load_example, monkeypatch, tmp_path):
    train = load_example("train_hjepa")
    _nan_loss_at(train, monkeypatch, lambda n: n in (2, 3))
    opt_step = _counting(torch.optim.AdamW.step)
    ema_update = _counting(train.EMATarget.update)
    monkeypatch.setattr(torch.optim.AdamW, "step", opt_step)
    monkeypatch.setattr(train.EMATarget, "update", ema_update)

    result = train.main([*tiny_args, *RUN, "--data", str(image_folder), "--max-steps", "3", "--out", str(tmp_path)])
    assert result["steps"] == 3
    assert opt_step.calls[0] == ema_update.calls[0] == 3  # 5 batches, 2 skipped
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    skipped = [r for r in records if r.get("skipped_nonfinite")]
    assert [(r["step"], r["consecutive"], r["skipped_total"]) for r in skipped] == [(1, 1, 1), (1, 2, 2)]
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert ckpt["guard"]["skipped"] == 2 and ckpt["guard"]["consecutive"] == 0
    assert ckpt["target"]["num_steps"].item() == 3
    assert all(torch.isfinite(v).all() for v in ckpt["encoder"].values() if v.is_floating_point())


def test_nonfinite_losses_in_a_row_stop_the_run(image_folder, tiny_args, load_example, monkeypatch, tmp_path):
    train = load_example("train_hjepa")
    _nan_loss_at(train, monkeypatch, lambda n: n >= 2)
    with pytest.raises(NonFiniteLossError, match="3 consecutive steps"):
        train.main([*tiny_args, *RUN, "--data", str(image_folder), "--nonfinite-patience", "3",
                    "--out", str(tmp_path)])
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert sum(bool(r.get("skipped_nonfinite")) for r in records) == 2  # the third raises before logging


@pytest.mark.slow
@pytest.mark.parametrize("extra", [
    ["--reg", "infonce", "--views", "2", "--pool", "attention"],
    ["--reg", "sigreg", "--vq-codes", "8", "--vq-refresh-every", "2", "--drop-path", "0.1"],
    ["--reg", "ntxent", "--views", "2", "--local-crops", "2", "--local-size", "12"],
], ids=["infonce-attnpool", "sigreg-vq", "ntxent-multicrop"])
def test_optional_terms_train_log_and_resume_exactly(extra, image_folder, tiny_args, load_example, tmp_path):
    """Every optional block of the trainer logs its terms and is restored exactly on resume
    (the learnable temperature, the attention pool and its EMA copy, the VQ codebook with its
    refresh buffers, SIGReg's step, local crops)."""
    train = load_example("train_hjepa")
    common = [*tiny_args, *RUN, "--data", str(image_folder), "--max-steps", "4", *extra]
    train.main([*common, "--out", str(tmp_path / "full")])
    train.main([*common, "--out", str(tmp_path / "parts"), "--stop-at", "2"])
    train.main([*common, "--out", str(tmp_path / "parts"), "--resume"])
    assert _losses(tmp_path / "full") == _losses(tmp_path / "parts")
    a, b = load_checkpoint(tmp_path / "full" / "last.pt"), load_checkpoint(tmp_path / "parts" / "last.pt")
    for key in ("encoder", "predictor", "target", "optimizer", "terms"):  # terms: regulariser, vq, pools
        _assert_states_equal(a[key], b[key], exact=True)
    record = _records(tmp_path / "full")[4]
    expected = {"reg"} | ({"temperature"} if "infonce" in extra else set()) \
        | ({"vq_commit", "vq_perplexity", "vq_usage", "vq_usage_window"} if "--vq-codes" in extra else set()) \
        | ({"local"} if "--local-crops" in extra else set())
    assert expected <= set(record)
    if "infonce" in extra:
        assert 0.05 <= record["temperature"] <= 0.2
    if "--pool" in extra:
        assert not torch.equal(a["terms"]["pool.online.query_tokens"], a["terms"]["pool.ema.query_tokens"])  # EMA lags
