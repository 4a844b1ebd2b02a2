from __future__ import annotations

import copy
import multiprocessing
import os
import pickle
import random
import signal
import time
import zipfile

import pytest
import torch

from jepa_blocks.training import (
    FORMAT_VERSION,
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    rng_state,
    save_checkpoint,
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


def test_pid_in_temp_name(tmp_path, monkeypatch):
    seen = []
    real_replace = os.replace

    def spy(src, dst):
        seen.append(os.fspath(src))
        real_replace(src, dst)

    monkeypatch.setattr(ckpt_mod.os, "replace", spy)
    save_checkpoint(tmp_path / "x.pt", {})
    assert seen == [os.fspath(tmp_path / f"x.pt.tmp-{os.getpid()}")]


def test_moved_names_stay_importable_from_checkpoint():
    from jepa_blocks.training import best_checkpoints, rng

    assert ckpt_mod.BestCheckpoints is best_checkpoints.BestCheckpoints
    assert ckpt_mod.rng_state is rng.rng_state and ckpt_mod.set_rng_state is rng.set_rng_state
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        ckpt_mod.nope  # noqa: B018
