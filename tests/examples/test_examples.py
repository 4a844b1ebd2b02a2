"""Fast end-to-end checks of the example scripts on tiny generated images (no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchvision")
# Shared fixtures (tests/examples/conftest.py): image_folder (28 tiny PNGs in 2 classes),
# tiny_args (trainer flags for a few-second run) and load_example (import a script).


@pytest.fixture(scope="module")
def trained_run(image_folder, tiny_args, load_example, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    train = load_example("train_hjepa")
    result = train.main(["--data", str(image_folder), "--out", str(out), "--max-steps", "3", *tiny_args])
    assert result["steps"] == 3
    return out


def test_trainer_writes_checkpoint_metrics_and_eval(trained_run):
    assert (trained_run / "last.pt").exists()
    records = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in train)
    assert {"lr", "momentum", "images_per_s", "level0", "level1"} <= set(train[0])
    assert any(r.get("monitor") for r in records) and any(r.get("val") for r in records)
    result = json.loads((trained_run / "eval.json").read_text())
    for key in ("knn_top1", "linear_top1", "effective_rank"):
        assert key in result
    assert 0.0 <= result["knn_top1"] <= 1.0
    assert list(trained_run.glob("best-*.pt")), "best-N checkpoints by validation kNN"


def test_resume_continues_from_checkpoint(trained_run, image_folder, load_example, tiny_args):
    from jepa_blocks.training import load_checkpoint

    before = load_checkpoint(trained_run / "last.pt")
    train = load_example("train_hjepa")
    result = train.main(["--data", str(image_folder), "--out", str(trained_run), "--max-steps", "5", "--resume",
                         "--no-final-eval", *tiny_args])
    after = load_checkpoint(trained_run / "last.pt")
    assert before["step"] == 3 and after["step"] == 5 and result["steps"] == 5
    assert after["target"]["num_steps"].item() == 5  # EMA schedule position restored and advanced
    assert after["optimizer"]["state"], "optimizer state carried over"
    steps = [json.loads(line)["step"] for line in (trained_run / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps[-2:] == [4, 5]


def test_evaluate_and_random_init(trained_run, image_folder, tmp_path, load_example):
    evaluate = load_example("evaluate")
    common = ["--checkpoint", str(trained_run / "last.pt"), "--train-data", str(image_folder),
              "--test-data", str(image_folder), "--workers", "0", "--k", "1", "5"]
    extra = ["--few-shot", "--few-shot-way", "2", "--few-shot-shots", "1", "2", "--few-shot-query", "2",
             "--few-shot-episodes", "20", "--finetune", "--finetune-epochs", "2", "--finetune-batch-size", "8"]
    trained = evaluate.main([*common, "--out", str(tmp_path / "e.json"), "--per-level", *extra])
    random = evaluate.main([*common, "--out", str(tmp_path / "r.json"), "--random-init"])
    for res in (trained, random):
        assert {"knn_top1", "linear_top1", "effective_rank"} <= set(res)
        assert res["test_images"] == 8  # the trainer's held-out split: round(25% of 14) = 4 per class
    assert "level0" in trained and "level1" in trained
    assert json.loads((tmp_path / "r.json").read_text())["encoder"] == "random-init"
    saved = json.loads((tmp_path / "e.json").read_text())
    for k in (1, 2):
        assert 0.0 <= saved[f"fewshot_2way_{k}shot"] <= 1.0 and saved[f"fewshot_2way_{k}shot_ci95"] >= 0.0
    assert 0.0 <= saved["finetune_top1"] <= 1.0 and len(saved["finetune"]["history"]) == 2
    assert "fewshot_2way_1shot" not in random and "finetune_top1" not in random


def test_evaluate_reproduces_the_trainers_final_evaluation(trained_run, image_folder, tmp_path, load_example):
    """One feature setting for both (was: bf16 autocast in the trainer, float32 in evaluate.py)."""
    evaluate = load_example("evaluate")
    res = evaluate.main(["--checkpoint", str(trained_run / "last.pt"), "--train-data", str(image_folder),
                         "--test-data", str(image_folder), "--workers", "0", "--k", "10", "20", "200",
                         "--out", str(tmp_path / "e.json")])
    trainer = json.loads((trained_run / "eval.json").read_text())
    for key in ("knn_top1", "knn_top1_k10", "knn_top1_k200", "linear_top1"):
        assert res[key] == pytest.approx(trainer[key], abs=1e-9), key
    assert res["effective_rank"] == pytest.approx(trainer["effective_rank"], rel=1e-3)  # eigensolver rounding


def test_plot_attention_writes_pngs(trained_run, image_folder, tmp_path, load_example):
    plot = load_example("plot_attention")
    written = plot.main(["--run", str(trained_run), "--data", str(image_folder), "--images", "2",
                         "--layers", "0", "-1", "--out", str(tmp_path)])
    names = sorted(Path(p).name for p in written)
    assert names == ["attention_query_layer0.png", "attention_query_layer1.png",
                     "attention_received_layer0.png", "attention_received_layer1.png"]
    for path in written:
        assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ckpt_written = plot.main(["--checkpoint", str(trained_run / "last.pt"), "--data", str(image_folder),
                              "--images", "1", "--encoder", "context", "--query", "0", "5",
                              "--out", str(tmp_path / "ckpt")])
    assert len(ckpt_written) == 2 and all(Path(p).exists() for p in ckpt_written)


def test_plot_run_writes_pngs(trained_run, image_folder, load_example):
    plot = load_example("plot_run")
    written = plot.main(["--run", str(trained_run), "--data", str(image_folder), "--num-images", "3"])
    assert len(written) == 3
    for path in written:
        assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quickstart_runs(load_example):
    quick = load_example("quickstart")
    losses = quick.main(steps=2, batch_size=4)
    assert len(losses) == 2 and all(loss == loss for loss in losses)  # no NaN
