"""``--resume --resume-fallback``: a damaged ``last.pt`` is skipped for the newest good kept
checkpoint, and the run continues from there exactly; without the flag it is refused."""

from __future__ import annotations

import struct
import zipfile

import pytest
import torch

from jepa_blocks.training import CheckpointError, load_checkpoint

pytest.importorskip("torchvision")

RUN = ["--max-steps", "4", "--eval-every", "2", "--no-final-eval", "--monitor-every", "0", "--keep-best", "2"]


def _damage_largest_record(path, nbytes: int = 64) -> None:
    """Invert ``nbytes`` bytes in the middle of the largest tensor record of a torch.save zip."""
    with zipfile.ZipFile(path) as archive:  # tensor storages are the records '<name>/data/<key>'
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
    for i in range(start, start + nbytes):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_damaged_last_resumes_from_previous_good_checkpoint(image_folder, tiny_args, load_example, tmp_path,
                                                            capsys):
    train = load_example("train_hjepa")
    common = [*tiny_args, *RUN, "--data", str(image_folder)]
    full, parts = tmp_path / "full", tmp_path / "parts"
    train.main([*common, "--out", str(full)])
    # Interrupted after step 3: last.pt holds step 3, the kept best-*.pt step 2.
    train.main([*common, "--out", str(parts), "--stop-at", "3"])
    assert load_checkpoint(parts / "last.pt")["step"] == 3
    _damage_largest_record(parts / "last.pt")

    with pytest.raises(CheckpointError, match=r"last\.pt.*damaged"):
        train.main([*common, "--out", str(parts), "--resume"])
    capsys.readouterr()
    with pytest.warns(UserWarning, match=r"skipping checkpoint .*last\.pt"):
        train.main([*common, "--out", str(parts), "--resume", "--resume-fallback"])
    assert "resumed from " + str(parts / "best-00000002-") in capsys.readouterr().out
    # Steps 3 and 4 retrained from step 2: the end state equals the uninterrupted run's.
    a, b = load_checkpoint(full / "last.pt"), load_checkpoint(parts / "last.pt")
    assert a["step"] == b["step"] == 4
    for key in ("encoder", "predictor", "target"):
        for name, value in a[key].items():
            assert torch.equal(value, b[key][name]), f"{key}.{name} differs"
