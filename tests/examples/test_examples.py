"""Fast end-to-end checks of the example scripts on tiny generated images (no downloads)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchvision")
ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def _load(name: str):
    sys.path.insert(0, str(EXAMPLES))
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """Two classes of 24x24 PNGs: bright-left vs bright-right images with noise."""
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    g = torch.Generator().manual_seed(0)
    for c, name in enumerate(("left", "right")):
        (root / name).mkdir()
        for i in range(14):
            img = torch.rand(24, 24, 3, generator=g) * 0.4
            img[:, (0 if c == 0 else 12) : (12 if c == 0 else 24)] += 0.5
            Image.fromarray((img.clamp(0, 1) * 255).byte().numpy()).save(root / name / f"{i}.png")
    return root


TINY = ["--img-size", "24", "--patch-size", "4", "--embed-dim", "32", "--depth", "2", "--num-heads", "2",
        "--pred-dim", "16", "--pred-depth", "1", "--pred-heads", "2", "--levels", "2", "--batch-size", "8",
        "--workers", "0", "--val-fraction", "0.25", "--warmup-steps", "1", "--log-every", "1",
        "--monitor-every", "2", "--eval-every", "2", "--amp", "off"]


@pytest.fixture(scope="module")
def trained_run(image_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    train = _load("train_hjepa")
    result = train.main(["--data", str(image_folder), "--out", str(out), "--max-steps", "3", *TINY])
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


def test_resume_continues_from_checkpoint(trained_run, image_folder):
    from jepa_blocks.training import load_checkpoint

    before = load_checkpoint(trained_run / "last.pt")
    train = _load("train_hjepa")
    result = train.main(["--data", str(image_folder), "--out", str(trained_run), "--max-steps", "5", "--resume",
                         "--no-final-eval", *TINY])
    after = load_checkpoint(trained_run / "last.pt")
    assert before["step"] == 3 and after["step"] == 5 and result["steps"] == 5
    assert after["target"]["num_steps"].item() == 5  # EMA schedule position restored and advanced
    assert after["optimizer"]["state"], "optimizer state carried over"
    steps = [json.loads(line)["step"] for line in (trained_run / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps[-2:] == [4, 5]


def test_evaluate_and_random_init(trained_run, image_folder, tmp_path):
    evaluate = _load("evaluate")
    common = ["--checkpoint", str(trained_run / "last.pt"), "--train-data", str(image_folder),
              "--test-data", str(image_folder), "--workers", "0", "--k", "1", "5"]
    trained = evaluate.main([*common, "--out", str(tmp_path / "e.json"), "--per-level"])
    random = evaluate.main([*common, "--out", str(tmp_path / "r.json"), "--random-init"])
    for res in (trained, random):
        assert {"knn_top1", "linear_top1", "effective_rank"} <= set(res)
        assert res["test_images"] == 8  # the trainer's held-out split: round(25% of 14) = 4 per class
    assert "level0" in trained and "level1" in trained
    assert json.loads((tmp_path / "r.json").read_text())["encoder"] == "random-init"


def test_plot_run_writes_pngs(trained_run, image_folder):
    plot = _load("plot_run")
    written = plot.main(["--run", str(trained_run), "--data", str(image_folder), "--num-images", "3"])
    assert len(written) == 3
    for path in written:
        assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quickstart_runs():
    quick = _load("quickstart")
    losses = quick.main(steps=2, batch_size=4)
    assert len(losses) == 2 and all(loss == loss for loss in losses)  # no NaN
