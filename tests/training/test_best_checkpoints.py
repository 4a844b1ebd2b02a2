"""Tests for jepa_blocks.training.best_checkpoints (best-N retention by a metric)."""

from __future__ import annotations

import json

import pytest

from jepa_blocks.training import BestCheckpoints, load_checkpoint, save_checkpoint


def _kept(best: BestCheckpoints) -> list[tuple[int, float]]:
    return [(e["step"], e["metric"]) for e in best.entries]


def _files(directory) -> set[str]:
    return {p.name for p in directory.glob("best-*.pt")}


def test_best_keeps_exactly_best_n_max(tmp_path):
    best = BestCheckpoints(tmp_path, keep=3, mode="max", metric_name="knn")
    metrics = [0.10, 0.50, 0.30, 0.20, 0.60, 0.45, 0.05, 0.45]
    results = [
        best.update(100 * (i + 1), m, {"step": 100 * (i + 1)}) for i, m in enumerate(metrics)
    ]
    assert results[6] is None and results[7] is None  # 0.45 ties the worst kept: the older stays
    assert _kept(best) == [(500, 0.60), (200, 0.50), (600, 0.45)]
    assert _files(tmp_path) == {
        "best-00000500-knn=0.6.pt",
        "best-00000200-knn=0.5.pt",
        "best-00000600-knn=0.45.pt",
    }
    assert best.best_path == tmp_path / "best-00000500-knn=0.6.pt"
    assert load_checkpoint(best.best_path)["step"] == 500
    index = json.loads(best.index_path.read_text())
    assert [e["step"] for e in index["entries"]] == [500, 200, 600]


def test_best_min_mode_and_survives_restart(tmp_path):
    best = BestCheckpoints(tmp_path, keep=2, mode="min", metric_name="val_loss")
    for step, loss in [(1, 0.9), (2, 0.5), (3, 0.7)]:
        best.update(step, loss, {"step": step})
    assert _kept(best) == [(2, 0.5), (3, 0.7)]

    again = BestCheckpoints(tmp_path, keep=2, mode="min", metric_name="val_loss")
    assert _kept(again) == [(2, 0.5), (3, 0.7)]
    assert not again.would_keep(0.8) and again.would_keep(0.6)
    again.update(4, 0.6, {"step": 4})
    assert _kept(again) == [(2, 0.5), (4, 0.6)]
    assert len(_files(tmp_path)) == 2
    with pytest.raises(ValueError, match="mode"):
        BestCheckpoints(tmp_path, keep=2, mode="max", metric_name="val_loss")


def test_best_exact_metric_kept_in_index(tmp_path):
    best = BestCheckpoints(tmp_path, keep=2, metric_name="acc")
    best.update(1, 0.123456789, {})
    best.update(2, 0.123456788, {})
    again = BestCheckpoints(tmp_path, keep=2, metric_name="acc")
    # file names round to 6 digits, the index keeps the exact floats and their order
    assert _kept(again) == [(1, 0.123456789), (2, 0.123456788)]


def test_best_recovers_without_index_and_adopts_orphans(tmp_path):
    best = BestCheckpoints(tmp_path, keep=2, metric_name="m")
    best.update(1, 0.1, {})
    best.update(2, 0.2, {})
    # crash after saving a new file but before the index was written
    save_checkpoint(tmp_path / "best-00000003-m=0.3.pt", {})
    again = BestCheckpoints(tmp_path, keep=2, metric_name="m")
    assert _kept(again) == [(3, 0.3), (2, 0.2), (1, 0.1)]
    again.update(4, 0.05, {})  # not kept, but the surplus is pruned
    assert _kept(again) == [(3, 0.3), (2, 0.2)]
    assert _files(tmp_path) == {"best-00000003-m=0.3.pt", "best-00000002-m=0.2.pt"}
    # index lost: rebuilt from the file names
    again.index_path.unlink()
    third = BestCheckpoints(tmp_path, keep=2, metric_name="m")
    assert _kept(third) == [(3, 0.3), (2, 0.2)]
    # a file deleted by hand is dropped from the index
    (tmp_path / "best-00000003-m=0.3.pt").unlink()
    assert _kept(BestCheckpoints(tmp_path, keep=2, metric_name="m")) == [(2, 0.2)]


def test_best_corrupt_index_warns_and_rebuilds(tmp_path):
    best = BestCheckpoints(tmp_path, keep=2, metric_name="m")
    best.update(5, 0.5, {})
    best.index_path.write_text("{not json")
    with pytest.warns(UserWarning, match="index"):
        again = BestCheckpoints(tmp_path, keep=2, metric_name="m")
    assert _kept(again) == [(5, 0.5)]


def test_best_same_step_replaces_and_trackers_share_directory(tmp_path):
    acc = BestCheckpoints(tmp_path, keep=2, metric_name="acc")
    loss = BestCheckpoints(tmp_path, keep=1, mode="min", metric_name="loss")
    acc.update(10, 0.4, {"v": 1})
    acc.update(10, 0.5, {"v": 2})  # a resumed run evaluates step 10 again
    loss.update(10, 1.0, {})
    loss.update(20, 2.0, {})
    assert _kept(acc) == [(10, 0.5)]
    assert load_checkpoint(acc.best_path)["v"] == 2
    assert _kept(loss) == [(10, 1.0)]
    assert _files(tmp_path) == {"best-00000010-acc=0.5.pt", "best-00000010-loss=1.pt"}


def test_best_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="keep"):
        BestCheckpoints(tmp_path, keep=0)
    with pytest.raises(ValueError, match="mode"):
        BestCheckpoints(tmp_path, mode="maximum")
    with pytest.raises(ValueError, match="metric_name"):
        BestCheckpoints(tmp_path, metric_name="val-loss")
    best = BestCheckpoints(tmp_path)
    with pytest.raises(ValueError, match="metric"):
        best.update(1, float("nan"), {})
    with pytest.raises(ValueError, match="step"):
        best.update(-1, 0.5, {})
