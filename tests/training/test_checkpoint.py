from __future__ import annotations

import copy
import json
import multiprocessing
import os
import pickle
import random
import signal
import time
import zipfile

import numpy as np
import pytest
import torch

from jepa_blocks.training import (
    FORMAT_VERSION,
    BestCheckpoints,
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from jepa_blocks.training import checkpoint as ckpt_mod


def _state(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "step": 7 + seed,
        "config": {"lr": 1e-3, "name": "run", "betas": (0.9, 0.95), "flag": None},
        "rng": rng_state(),
    }


def _assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_same(x, y)
    else:
        assert a == b


# ---------------------------------------------------------------- save / load


def test_round_trip_with_weights_only(tmp_path):
    state = _state()
    path = save_checkpoint(tmp_path / "sub" / "last.pt", state)
    assert path == tmp_path / "sub" / "last.pt"
    loaded = load_checkpoint(path)  # weights_only=True by default
    assert isinstance(loaded, Checkpoint) and isinstance(loaded, dict)
    _assert_same(state, dict(loaded))
    meta = loaded.metadata
    assert meta["format_version"] == FORMAT_VERSION
    assert meta["torch_version"] == str(torch.__version__)
    assert isinstance(meta["library_version"], str) and meta["library_version"]
    assert isinstance(meta["time"], float) and meta["time_utc"].endswith("Z")
    # the raw file carries our marker and loads with plain torch.load(weights_only=True)
    raw = torch.load(path, weights_only=True)
    assert raw["jepa_blocks_checkpoint"] == FORMAT_VERSION
    assert not list(tmp_path.glob("sub/*.tmp-*"))


def test_saving_a_loaded_checkpoint_again(tmp_path):
    save_checkpoint(tmp_path / "a.pt", {"x": torch.arange(3)})
    loaded = load_checkpoint(tmp_path / "a.pt")
    copied = copy.deepcopy(loaded)
    assert copied.metadata == loaded.metadata and copied.keys() == loaded.keys()
    save_checkpoint(tmp_path / "b.pt", loaded)
    _assert_same(dict(load_checkpoint(tmp_path / "b.pt")), {"x": torch.arange(3)})


def _disk_full(*args, **kwargs):
    raise OSError(28, "No space left on device")


def _partial_torch_save(obj, f, *args, **kwargs):
    f.write(b"PK\x03\x04 partial bytes of a checkpoint")
    _disk_full()


@pytest.mark.parametrize(
    ("module", "name", "broken"),
    [
        (ckpt_mod.torch, "save", _partial_torch_save),  # fails while writing
        (ckpt_mod.os, "fsync", _disk_full),  # fails while flushing to disk
        (ckpt_mod.os, "replace", _disk_full),  # fails at the rename
    ],
    ids=["torch.save", "os.fsync", "os.replace"],
)
def test_failed_save_leaves_previous_checkpoint_intact(tmp_path, monkeypatch, module, name, broken):
    path = tmp_path / "last.pt"
    save_checkpoint(path, _state(0))
    before = path.read_bytes()

    monkeypatch.setattr(module, name, broken)
    with pytest.raises(OSError, match="No space left on device"):  # the error propagates
        save_checkpoint(path, _state(1))
    monkeypatch.undo()

    assert path.read_bytes() == before
    assert list(tmp_path.iterdir()) == [path]  # the temp file was removed
    assert load_checkpoint(path)["step"] == 7


def test_interrupt_during_save_also_cleans_up(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"step": 1})
    before = path.read_bytes()

    def interrupted(obj, f, *args, **kwargs):
        f.write(b"xx")
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt_mod.torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"step": 2})
    assert path.read_bytes() == before and list(tmp_path.iterdir()) == [path]


def test_killed_writer_stray_temp_file_is_harmless(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, _state(0))
    before = path.read_bytes()
    # A writer killed mid-save leaves its temp file: half of a real checkpoint.
    stray = tmp_path / "last.pt.tmp-999999"
    stray.write_bytes(before[: len(before) // 2])
    assert path.read_bytes() == before
    assert load_checkpoint(path)["step"] == 7
    # the next save still works and replaces the checkpoint
    save_checkpoint(path, {"step": 8})
    assert load_checkpoint(path)["step"] == 8
    with pytest.raises(CheckpointError, match="last.pt.tmp-999999"):
        load_checkpoint(stray)


def _save_until_killed(path: str, numel: int, first_step: int) -> None:
    """Writer process: save complete states ``{step, w = full(step)}`` to ``path`` forever."""
    torch.set_num_threads(1)
    w = torch.empty(numel)
    step = first_step
    while True:
        save_checkpoint(path, {"step": step, "w": w.fill_(float(step))})
        step += 1


def test_sigkill_during_save_leaves_a_complete_checkpoint(tmp_path):
    # A writer saving a 4 MB state in a loop is killed with SIGKILL at random times (it
    # spends nearly all its time inside save_checkpoint). After every kill the path must
    # load and hold one complete state; the only litter allowed is the documented
    # '<path>.tmp-<pid>' of a killed writer.
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("needs the fork start method")
    ctx = multiprocessing.get_context("fork")
    path = tmp_path / "last.pt"
    numel = 1 << 20
    rng = random.Random(0)
    killed, interrupted_writes = [], 0
    for round_ in range(16):  # until 3 kills, 2 of them inside a write (not between saves)
        if round_ >= 3 and interrupted_writes >= 2:
            break
        proc = ctx.Process(target=_save_until_killed, args=(str(path), numel, 1000 * round_))
        proc.start()
        tmp = tmp_path / f"last.pt.tmp-{proc.pid}"
        deadline = time.monotonic() + 30
        # Wait until a complete checkpoint exists and this writer is inside a save.
        while not (path.exists() and tmp.exists()):
            assert time.monotonic() < deadline and proc.is_alive(), "writer made no progress"
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.15))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(timeout=30)
        assert proc.exitcode == -signal.SIGKILL
        killed.append(proc.pid)
        interrupted_writes += tmp.exists()

        ckpt = load_checkpoint(path)
        assert ckpt["w"].shape == (numel,)
        assert torch.equal(ckpt["w"], torch.full((numel,), float(ckpt["step"])))
        litter = {p.name for p in tmp_path.iterdir()} - {"last.pt"}
        assert litter <= {f"last.pt.tmp-{pid}" for pid in killed}, litter
    assert interrupted_writes >= 2  # kills really hit saves mid-way
    # The next save works and leaves no litter of its own.
    save_checkpoint(path, {"step": -1})
    assert load_checkpoint(path)["step"] == -1
    assert not (tmp_path / f"last.pt.tmp-{os.getpid()}").exists()


def test_keep_previous(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"step": 1}, keep_previous=True)  # nothing to keep yet
    assert not (tmp_path / "last.pt.prev").exists()
    save_checkpoint(path, {"step": 2}, keep_previous=True)
    save_checkpoint(path, {"step": 3}, keep_previous=True)
    assert load_checkpoint(path)["step"] == 3
    assert load_checkpoint(tmp_path / "last.pt.prev")["step"] == 2


def test_truncated_file_raises_naming_file(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, _state())
    data = path.read_bytes()
    for cut in (len(data) // 3, len(data) - 10):
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=r"last\.pt.*(truncated|corrupt)"):
            load_checkpoint(path)
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"last\.pt.*empty"):
        load_checkpoint(path)


def test_corrupt_bytes_inside_archive(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"w": torch.zeros(1000)})
    data = bytearray(path.read_bytes())
    # Clobber the pickle stream (the first entry after the local header) but keep the
    # zip directory, so the archive still looks complete.
    start = data.index(b"data.pkl") + len(b"data.pkl")
    data[start : start + 40] = b"\xff" * 40
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"last\.pt"):
        load_checkpoint(path)


def test_foreign_file(tmp_path):
    path = tmp_path / "foreign.pt"
    torch.save({"a": 1}, path)
    with pytest.raises(CheckpointError, match=r"foreign\.pt.*not a jepa-blocks checkpoint"):
        load_checkpoint(path)
    torch.save(torch.zeros(3), path)
    with pytest.raises(CheckpointError, match="not a jepa-blocks checkpoint"):
        load_checkpoint(path)
    path.write_text("just some text, not a torch file at all")
    with pytest.raises(CheckpointError, match=r"foreign\.pt.*not a complete zip archive"):
        load_checkpoint(path)
    with open(path, "wb") as f:  # a plain pickle of something else
        pickle.dump({"weights": [1.0, 2.0]}, f)
    with pytest.raises(CheckpointError, match=r"foreign\.pt.*not a complete zip archive"):
        load_checkpoint(path)
    with zipfile.ZipFile(path, "w") as archive:  # an intact zip that torch did not write
        archive.writestr("notes/readme.txt", "hello")
    with pytest.raises(CheckpointError, match=r"foreign\.pt.*zip archive without.*data\.pkl"):
        load_checkpoint(path)


class _Custom:
    pass


def test_non_allowlisted_object_needs_weights_only_false(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"obj": _Custom()})
    with pytest.raises(CheckpointError, match=r"c\.pt.*weights_only"):
        load_checkpoint(path)
    assert isinstance(load_checkpoint(path, weights_only=False)["obj"], _Custom)


def test_future_and_bad_format_version(tmp_path):
    path = tmp_path / "future.pt"
    torch.save({"jepa_blocks_checkpoint": FORMAT_VERSION + 1, "metadata": {}, "state": {}}, path)
    with pytest.raises(CheckpointError, match=r"future\.pt.*newer"):
        load_checkpoint(path)
    torch.save({"jepa_blocks_checkpoint": "1", "metadata": {}, "state": {}}, path)
    with pytest.raises(CheckpointError, match="invalid format version"):
        load_checkpoint(path)
    torch.save({"jepa_blocks_checkpoint": 1, "metadata": {}, "state": [1]}, path)
    with pytest.raises(CheckpointError, match="malformed"):
        load_checkpoint(path)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope\.pt.*does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="directory"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="directory"):
        save_checkpoint(tmp_path, {})
    assert issubclass(CheckpointError, ValueError)


def test_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match="state"):
        save_checkpoint(tmp_path / "x.pt", [1, 2])
    with pytest.raises(TypeError, match="path"):
        save_checkpoint(3, {})
    with pytest.raises(TypeError, match="keep_previous"):
        save_checkpoint(tmp_path / "x.pt", {}, keep_previous="yes")
    with pytest.raises(TypeError, match="path"):
        load_checkpoint(None)


# ---------------------------------------------------------------- BestCheckpoints


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


# ---------------------------------------------------------------- RNG state


def _draw():
    return (
        torch.rand(5),
        torch.randint(0, 1000, (3,)),
        [random.random() for _ in range(3)],
        np.random.rand(3),
        np.random.randn(1),  # exercises numpy's cached gaussian
    )


def test_rng_round_trip(tmp_path):
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    np.random.randn(1)  # leave a cached gaussian in the numpy state
    state = rng_state()
    first = _draw()
    save_checkpoint(tmp_path / "rng.pt", {"rng": state})
    _draw()  # move every generator on
    set_rng_state(state)
    _assert_same(list(first[:3]), list(_draw()[:3]))
    set_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    again = _draw()
    _assert_same(list(first[:3]), list(again[:3]))
    np.testing.assert_array_equal(first[3], again[3])
    np.testing.assert_array_equal(first[4], again[4])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_rng_round_trip_cuda(tmp_path):
    torch.cuda.manual_seed_all(5)
    state = rng_state()
    assert len(state["cuda"]) == torch.cuda.device_count()
    first = torch.rand(4, device="cuda")
    save_checkpoint(tmp_path / "rng.pt", {"rng": state})
    torch.rand(4, device="cuda")
    set_rng_state(load_checkpoint(tmp_path / "rng.pt", map_location="cuda")["rng"])
    torch.testing.assert_close(torch.rand(4, device="cuda"), first, rtol=0, atol=0)


def test_rng_state_bad_inputs():
    with pytest.raises(TypeError, match="state"):
        set_rng_state([1])
    with pytest.raises(ValueError, match="unknown keys"):
        set_rng_state({"python": random.getstate(), "jax": 1})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_rng_cuda_states_without_cuda_warn():
    state = rng_state()
    assert state["cuda"] == []
    state["cuda"] = [torch.zeros(16, dtype=torch.uint8)]
    with pytest.warns(UserWarning, match="CUDA"):
        set_rng_state(state)


def test_pid_in_temp_name(tmp_path, monkeypatch):
    seen = []
    real_replace = os.replace

    def spy(src, dst):
        seen.append(os.fspath(src))
        real_replace(src, dst)

    monkeypatch.setattr(ckpt_mod.os, "replace", spy)
    save_checkpoint(tmp_path / "x.pt", {})
    assert seen == [os.fspath(tmp_path / f"x.pt.tmp-{os.getpid()}")]
