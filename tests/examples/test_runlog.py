"""The trainer's RunLog: ``--log-to`` sinks beside metrics.jsonl (TensorBoard, CSV, wandb)."""

from __future__ import annotations

import csv
import json
import sys
import types

import pytest


@pytest.fixture()
def runtime(load_example):
    return load_example("runtime")


def _log(runtime, out, log_to, **kwargs):
    out.mkdir(parents=True, exist_ok=True)  # the trainer creates the run folder first
    budget = runtime.TimeBudget(minutes=0.0, warmup_steps=1, cap=10)
    return runtime.RunLog(str(out), enabled=True, total_steps=10, step=0, budget=budget, print_every=100,
                          log_to=log_to, **kwargs)


def _write_some(log):
    log.write({"step": 1, "epoch": 0, "loss": 0.5, "lr": 1e-3, "skipped_nonfinite": False})
    log.write({"step": 2, "val": True, "knn_top1": 0.25}, prefix="val")


def test_csv_rows_match_metrics_jsonl_and_append_on_resume(runtime, tmp_path):
    log = _log(runtime, tmp_path, "csv")
    _write_some(log)
    log.close()
    assert not (tmp_path / "tb").exists()  # tensorboard not asked for
    log = _log(runtime, tmp_path, "csv,tensorboard")  # a resumed run appends, header once
    log.write({"step": 3, "loss": 0.25})
    log.close()
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    got = [(int(r["step"]), r["group"], r["name"], float(r["value"])) for r in rows]
    assert got == [(1, "train", "epoch", 0.0), (1, "train", "loss", 0.5), (1, "train", "lr", 1e-3),
                   (2, "val", "knn_top1", 0.25), (3, "train", "loss", 0.25)]
    # every numeric, non-flag value of metrics.jsonl is in the CSV, exactly
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    expected = [(r["step"], k, v) for r in records for k, v in r.items()
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)]
    assert [(s, n, v) for s, _, n, v in got] == expected
    assert (tmp_path / "tb").exists()


def test_log_to_none_and_bad_names(runtime, tmp_path):
    log = _log(runtime, tmp_path, "none")
    _write_some(log)
    log.close()
    assert (tmp_path / "metrics.jsonl").exists()
    assert not (tmp_path / "metrics.csv").exists() and not (tmp_path / "tb").exists()
    with pytest.raises(ValueError, match=r"--log-to.*'csv,mlflow'.*unknown: mlflow"):
        _log(runtime, tmp_path, "csv,mlflow")


def test_wandb_is_imported_only_when_asked_and_offline_by_default(runtime, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    _log(runtime, tmp_path / "a", "csv").close()  # never imports it
    with pytest.raises(ImportError, match="--log-to wandb needs the wandb package"):
        _log(runtime, tmp_path / "b", "wandb")

    calls = []

    class Run:
        def log(self, data, step):
            calls.append(("log", data, step))

        def finish(self):
            calls.append(("finish",))

    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: calls.append(("init", kw)) or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    log = _log(runtime, tmp_path / "c", "wandb", config={"lr": 1e-3})
    _write_some(log)
    log.close()
    assert calls[0][1]["mode"] == "offline" and calls[0][1]["config"] == {"lr": 1e-3}
    assert calls[1] == ("log", {"train/epoch": 0, "train/loss": 0.5, "train/lr": 1e-3}, 1)
    assert calls[2] == ("log", {"val/knn_top1": 0.25}, 2) and calls[3] == ("finish",)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    calls.clear()
    _log(runtime, tmp_path / "d", "wandb").close()
    assert calls[0][1]["mode"] == "disabled"
