from __future__ import annotations

import copy
import multiprocessing
import os
import pickle
import random
import re
import signal
import struct
import time
import warnings
import zipfile

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from jepa_blocks.training import (
    FORMAT_VERSION,
    Checkpoint,
    CheckpointError,
    UnverifiedCheckpointWarning,
    load_checkpoint,
    load_latest_good,
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


# ---------------------------------------------------------------- integrity (CRC-32)


def _largest_record(path) -> zipfile.ZipInfo:
    with zipfile.ZipFile(path) as archive:
        return max(archive.infolist(), key=lambda info: info.file_size)


def _damage_record(path, info: zipfile.ZipInfo, *, offset: int, nbytes: int = 64) -> None:
    """Invert ``nbytes`` bytes of a record's data, ``offset`` bytes into it."""
    data = bytearray(path.read_bytes())
    # Local file header: 30 fixed bytes, then the name and the extra field (torch pads
    # there to align the data), whose lengths sit at bytes 26..29.
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len + offset
    for i in range(start, start + nbytes):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _trained_adamw_state() -> dict:
    torch.manual_seed(0)
    model = torch.nn.Linear(48, 40)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(5, 48)).square().sum().backward()
    opt.step()
    # the AdamW moments are the largest tensor records once the weights are stored in half
    return {"model": {k: v.half() for k, v in model.state_dict().items()}, "optimizer": opt.state_dict()}


def test_damaged_tensor_record_is_rejected_naming_the_file(tmp_path):
    path = tmp_path / "last.pt"
    state = _trained_adamw_state()
    save_checkpoint(path, state)
    info = _largest_record(path)
    _damage_record(path, info, offset=info.file_size // 2)
    # torch.load alone does not notice: the damage would load as wrong values (the bug).
    raw = torch.load(path, weights_only=True)["state"]["optimizer"]["state"][0]
    saved = state["optimizer"]["state"][0]
    assert sum(not torch.equal(raw[k], saved[k]) for k in ("exp_avg", "exp_avg_sq")) == 1
    with pytest.raises(CheckpointError, match=rf"last\.pt.*damaged.*{re.escape(info.filename)}.*CRC-32"):
        load_checkpoint(path)
    load_checkpoint(path, verify=False)  # the opt-out skips the check


@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_any_damaged_byte_of_any_record_is_rejected(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("crc") / "last.pt"
    save_checkpoint(path, {"w": torch.arange(300.0), "step": 4})
    with zipfile.ZipFile(path) as archive:
        infos = [i for i in archive.infolist() if i.file_size]
    info = data.draw(st.sampled_from(infos))
    nbytes = data.draw(st.integers(1, min(64, info.file_size)))
    offset = data.draw(st.integers(0, info.file_size - nbytes))
    _damage_record(path, info, offset=offset, nbytes=nbytes)
    with pytest.raises(CheckpointError, match=r"last\.pt"):
        load_checkpoint(path)


def test_crc32_written_even_when_torch_option_is_off(tmp_path):
    if not hasattr(torch.serialization, "set_crc32_options"):
        pytest.skip("this torch always writes CRC-32s")
    torch.serialization.set_crc32_options(False)
    try:
        save_checkpoint(tmp_path / "a.pt", {"w": torch.ones(100)})
        assert not torch.serialization.get_crc32_options()  # the user's option is restored
        # a file torch wrote without CRC-32s: loads, with a warning that it is unverified
        torch.save({"jepa_blocks_checkpoint": 1, "metadata": {}, "state": {"w": torch.ones(100)}},
                   tmp_path / "b.pt")
    finally:
        torch.serialization.set_crc32_options(True)
    assert all(i.CRC for i in zipfile.ZipFile(tmp_path / "a.pt").infolist() if i.file_size)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_checkpoint(tmp_path / "a.pt")
    with pytest.warns(UnverifiedCheckpointWarning, match=r"b\.pt.*no CRC-32"):
        assert torch.equal(load_checkpoint(tmp_path / "b.pt")["w"], torch.ones(100))


# ---------------------------------------------------------------- load_latest_good


def test_load_latest_good_prefers_last_then_falls_back_newest_first(tmp_path):
    from jepa_blocks.training import BestCheckpoints

    best = BestCheckpoints(tmp_path, keep=3, mode="max", metric_name="knn")
    for step, acc in [(100, 0.5), (200, 0.3), (300, 0.4)]:  # newest is not the best
        best.update(step, acc, {"step": step, "w": torch.full((64,), float(step))})
    save_checkpoint(tmp_path / "last.pt", {"step": 350, "w": torch.zeros(64)})
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ckpt = load_latest_good(tmp_path)
    assert ckpt["step"] == 350 and ckpt.path == tmp_path / "last.pt"

    _damage_record(tmp_path / "last.pt", _largest_record(tmp_path / "last.pt"), offset=8)
    with pytest.warns(UserWarning, match=r"skipping checkpoint '.*last\.pt'.*damaged"):
        ckpt = load_latest_good(tmp_path)
    assert ckpt["step"] == 300 and ckpt.path.name.startswith("best-00000300-")
    assert torch.equal(ckpt["w"], torch.full((64,), 300.0))

    newest = tmp_path / ckpt.path.name
    newest.write_bytes(newest.read_bytes()[:100])  # truncated too
    with pytest.warns(UserWarning) as record:
        ckpt = load_latest_good(tmp_path)
    assert ckpt["step"] == 200
    assert [str(w.message).split("'")[1] for w in record] == [str(tmp_path / "last.pt"), str(newest)]


def test_load_latest_good_uses_prev_and_reports_when_nothing_loads(tmp_path):
    assert load_latest_good(tmp_path) is None  # no candidate at all
    save_checkpoint(tmp_path / "last.pt", {"step": 1}, keep_previous=True)
    save_checkpoint(tmp_path / "last.pt", {"step": 2}, keep_previous=True)
    (tmp_path / "last.pt").write_bytes(b"")
    with pytest.warns(UserWarning, match="empty"):
        assert load_latest_good(tmp_path)["step"] == 1
    (tmp_path / "last.pt.prev").write_bytes(b"junk")
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match=r"no loadable.*last\.pt.*last\.pt\.prev"):
        load_latest_good(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_latest_good(tmp_path / "missing")
    with pytest.raises(TypeError, match="last_name"):
        load_latest_good(tmp_path, last_name=3)
