"""Crash-safe checkpoints: atomic save and checked load.

* :func:`save_checkpoint` never leaves a half-written file at the target path: it writes
  ``<path>.tmp-<pid>`` in the same directory, flushes and ``fsync``-s it, then renames it
  onto ``path`` with ``os.replace`` (atomic on POSIX and Windows) and ``fsync``-s the
  directory. If the writer raises or is killed, the previous checkpoint at ``path`` is
  untouched; a killed writer may leave its ``*.tmp-<pid>`` file behind, which is never
  read and safe to delete.
* :func:`load_checkpoint` raises :class:`CheckpointError` (a ``ValueError``) naming the
  file and the problem: missing, empty, truncated or corrupt, damaged (a record whose
  bytes no longer match their CRC-32), not a jepa-blocks checkpoint, or written by a
  newer format.
* :func:`load_latest_good` loads the newest checkpoint of a run folder that passes
  these checks: ``last.pt``, then ``last.pt.prev``, then the kept ``best-*.pt`` files,
  newest first; each file it skips is named in a warning.

Integrity: ``torch.save`` writes a zip archive in which every record (the pickle and
one record per tensor storage) carries the CRC-32 of its bytes, but ``torch.load`` never
checks them, so flipped bytes inside a tensor load silently as wrong values.
:func:`save_checkpoint` makes sure the CRC-32s are written (even where
``torch.serialization.set_crc32_options(False)`` turned them off) and
:func:`load_checkpoint` reads every record once and compares it with its CRC-32 before
unpickling (``verify=True``, the default; about the cost of reading the file once more).
Checkpoints written by earlier jepa-blocks versions carry the CRC-32s too and are
verified the same way. A file whose records all have a zero CRC-32 (written by
``torch.save`` with CRC-32s turned off) cannot be verified: it loads with a
:class:`UnverifiedCheckpointWarning`. CRC-32 catches accidental damage (bad disks,
cut-off copies, flipped bits), not deliberate tampering.

Best-N retention is :class:`~jepa_blocks.training.best_checkpoints.BestCheckpoints`; the
RNG state of an exact resume is :func:`~jepa_blocks.training.rng.rng_state` (both stay
importable from this module too).

Loading uses ``torch.load(..., weights_only=True)`` by default: it refuses to run
arbitrary pickled code, and what a training loop needs fits inside its allow-list
(tensors, ``state_dict()`` of modules, optimizers and schedulers, Python scalars,
strings, ``None``, lists, tuples, dicts, and ``rng_state()``, which stores the NumPy
state as a tensor for this reason). Pass ``weights_only=False`` only for files you
trust that hold other objects (e.g. a dataclass config; prefer ``dataclasses.asdict``).

A checkpoint file holds ``{"jepa_blocks_checkpoint": <format version>, "metadata":
{...}, "state": <your dict>}``; :func:`load_checkpoint` returns your dict as a
:class:`Checkpoint` (a ``dict`` with a ``metadata`` attribute).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import time
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from jepa_blocks._checks import check_bool

__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "Checkpoint",
    "UnverifiedCheckpointWarning",
    "save_checkpoint",
    "load_checkpoint",
    "load_latest_good",
]

FORMAT_VERSION = 1
_MARKER = "jepa_blocks_checkpoint"


class CheckpointError(ValueError):
    """A checkpoint file is missing, damaged, foreign or from a newer format."""


class UnverifiedCheckpointWarning(UserWarning):
    """A checkpoint loaded without an integrity check (its records carry no CRC-32)."""


class Checkpoint(dict):
    """The state dict given to :func:`save_checkpoint`, plus the file's ``metadata``.

    ``metadata`` holds ``format_version``, ``library_version``, ``torch_version``,
    ``time`` (seconds since the epoch) and ``time_utc`` (ISO 8601). ``path`` is the file
    it was loaded from (``None`` for one built by hand).

    Example:
        >>> import tempfile, torch
        >>> path = tempfile.mkdtemp() + "/last.pt"
        >>> _ = save_checkpoint(path, {"step": 3, "w": torch.zeros(2)})
        >>> ckpt = load_checkpoint(path)
        >>> ckpt["step"], ckpt.metadata["format_version"]
        (3, 1)
    """

    metadata: dict[str, Any]
    path: Path | None

    def __init__(
        self, state: Mapping[str, Any], metadata: dict[str, Any], path: Path | None = None
    ) -> None:
        super().__init__(state)
        self.metadata = metadata
        self.path = path


def _library_version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("jepa-blocks")
    except PackageNotFoundError:
        import jepa_blocks

        return str(getattr(jepa_blocks, "__version__", "unknown"))


def _metadata() -> dict[str, Any]:
    now = time.time()
    return {
        "format_version": FORMAT_VERSION,
        "library_version": _library_version(),
        # str(): torch.__version__ is a TorchVersion, which weights_only loading rejects.
        "torch_version": str(torch.__version__),
        "time": now,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
    }


def _as_path(name: str, path: Any) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name} must be a str or os.PathLike, got {type(path).__name__}")
    return Path(path)


def _fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable; a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: Path, write: Any) -> None:
    """Call ``write(file)`` on ``<path>.tmp-<pid>``, fsync, and rename it onto ``path``."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # Also on KeyboardInterrupt: the half-written temp file must not survive.
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    _fsync_directory(path.parent)


def save_checkpoint(
    path: str | os.PathLike[str],
    state: Mapping[str, Any],
    *,
    keep_previous: bool = False,
) -> Path:
    """Save ``state`` to ``path`` atomically.

    The file is written to ``<path>.tmp-<pid>`` in the same directory, flushed and
    ``fsync``-ed, then renamed onto ``path``; on any exception the temp file is removed
    and an existing checkpoint at ``path`` is left as it was. Missing parent directories
    are created. In distributed training call it from one rank only.

    Args:
        path: Destination file.
        state: What to save, e.g. ``{"model": model.state_dict(), "optimizer":
            optimizer.state_dict(), "step": step, "rng": rng_state()}``. Keep it to
            types that ``torch.load(weights_only=True)`` accepts (see the module docs).
        keep_previous: If True and ``path`` exists, keep the old file as
            ``<path>.prev`` (replacing an older ``.prev``); ``path`` itself is never
            missing during the save.

    Returns:
        ``path`` as a ``Path``.
    """
    path = _as_path("path", path)
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a dict, got {type(state).__name__}")
    keep_previous = check_bool("keep_previous", keep_previous)
    if path.is_dir():
        raise CheckpointError(f"cannot save checkpoint to '{path}': it is a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {_MARKER: FORMAT_VERSION, "metadata": _metadata(), "state": dict(state)}

    if keep_previous and path.exists():
        previous = path.with_name(path.name + ".prev")
        previous.unlink(missing_ok=True)
        try:
            # A hard link keeps ``path`` in place until the new file replaces it.
            os.link(path, previous)
        except OSError:
            import shutil

            shutil.copy2(path, previous)

    with _crc32_on():
        _atomic_write(path, lambda f: torch.save(payload, f))
    return path


@contextlib.contextmanager
def _crc32_on() -> Iterator[None]:
    """Make ``torch.save`` write the CRC-32 of every record (torch's global option)."""
    get = getattr(torch.serialization, "get_crc32_options", None)
    set_ = getattr(torch.serialization, "set_crc32_options", None)
    if get is None or set_ is None or get():  # older torch always writes them
        yield
        return
    set_(True)
    try:
        yield
    finally:
        set_(False)


def _verify_records(path: Path) -> None:
    """Read every record of the zip archive at ``path`` and compare it with its CRC-32.

    Raises:
        CheckpointError: Naming the file and the first damaged record.
    """
    name = "<central directory>"
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            if not any(info.CRC for info in infos if info.file_size):
                warnings.warn(
                    f"checkpoint file '{path}' carries no CRC-32s (written with torch's "
                    "CRC-32 option off): it is loaded without an integrity check",
                    UnverifiedCheckpointWarning,
                    stacklevel=3,
                )
                return
            for info in infos:
                name = info.filename
                # ZipExtFile compares the CRC-32 when the record has been read to its end.
                with archive.open(info) as record:
                    while record.read(1 << 22):
                        pass
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as err:
        raise CheckpointError(
            f"checkpoint file '{path}' is damaged: record '{name}' does not match its "
            f"CRC-32 or cannot be read ({err}); resume from an earlier checkpoint "
            "(load_latest_good)"
        ) from err


def _has_torch_record(path: Path) -> bool:
    """Whether the zip archive at ``path`` lists a ``<name>/data.pkl`` entry (torch.save's).

    A damaged central directory counts as "has one": torch.load then reports the damage.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return True
    return any(name.count("/") == 1 and name.endswith("/data.pkl") for name in names)


def _weights_only_reason(err: BaseException) -> str:
    text = str(err)
    match = re.search(r"WeightsUnpickler error: ([^\n]*)", text)
    return match.group(1) if match else text.splitlines()[0] if text else type(err).__name__


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    map_location: Any = "cpu",
    weights_only: bool = True,
    verify: bool = True,
) -> Checkpoint:
    """Load a checkpoint written by :func:`save_checkpoint`.

    Args:
        path: The checkpoint file.
        map_location: Passed to ``torch.load``; default ``"cpu"``.
        weights_only: Passed to ``torch.load``. Keep True (safe: no arbitrary code runs)
            unless the file is trusted and holds objects outside torch's allow-list.
        verify: Compare every record of the file with its CRC-32 before loading (reads
            the file once more). A file without CRC-32s loads with an
            :class:`UnverifiedCheckpointWarning`.

    Returns:
        The saved state dict, as a :class:`Checkpoint` with ``metadata`` and ``path``
        attributes.

    Raises:
        CheckpointError: Naming the file, if it is missing, a directory, empty, truncated
            or corrupt, damaged (a record that does not match its CRC-32), not loadable
            with ``weights_only=True``, not a jepa-blocks checkpoint, or written with a
            newer format version.
    """
    path = _as_path("path", path)
    weights_only = check_bool("weights_only", weights_only)
    verify = check_bool("verify", verify)
    if not path.exists():
        raise CheckpointError(f"checkpoint file '{path}' does not exist")
    if path.is_dir():
        raise CheckpointError(f"checkpoint path '{path}' is a directory, not a file")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"checkpoint file '{path}' is empty (0 bytes): the save was cut off")
    if not zipfile.is_zipfile(path):
        # torch.save writes a zip archive whose directory sits at the end: a cut-off file
        # has none.
        raise CheckpointError(
            f"checkpoint file '{path}' is truncated or corrupt ({size} bytes, not a "
            "complete zip archive as torch.save writes), or not a file written by "
            "save_checkpoint"
        )
    if not _has_torch_record(path):
        raise CheckpointError(
            f"'{path}' is not a jepa-blocks checkpoint: it is a zip archive without the "
            "'<name>/data.pkl' record that torch.save writes"
        )
    if verify:
        _verify_records(path)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=weights_only)
    except Exception as err:
        if weights_only and "Weights only load failed" in str(err):
            raise CheckpointError(
                f"checkpoint file '{path}' could not be loaded with weights_only=True: "
                f"{_weights_only_reason(err)}. It is corrupt or holds objects outside "
                "torch's weights-only allow-list; pass weights_only=False only if you "
                "trust the file"
            ) from err
        raise CheckpointError(
            f"checkpoint file '{path}' is corrupt or truncated: torch.load failed with "
            f"{type(err).__name__}: {err}"
        ) from err

    if not isinstance(payload, dict) or _MARKER not in payload:
        what = (
            f"a dict with keys {sorted(map(str, payload))[:8]}"
            if isinstance(payload, dict)
            else f"a {type(payload).__name__}"
        )
        raise CheckpointError(
            f"'{path}' is not a jepa-blocks checkpoint: it holds {what}, without the "
            f"'{_MARKER}' key written by save_checkpoint"
        )
    version = payload[_MARKER]
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CheckpointError(f"checkpoint file '{path}' has an invalid format version {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint file '{path}' has format version {version}, newer than the "
            f"version {FORMAT_VERSION} this jepa-blocks reads; upgrade jepa-blocks"
        )
    state, metadata = payload.get("state"), payload.get("metadata")
    if not isinstance(state, dict) or not isinstance(metadata, dict):
        raise CheckpointError(
            f"checkpoint file '{path}' is malformed: 'state' and 'metadata' must be dicts"
        )
    return Checkpoint(state, metadata, path)


def _first_number(name: str) -> int:
    match = re.search(r"\d+", name)
    return int(match.group()) if match else -1


def load_latest_good(
    directory: str | os.PathLike[str],
    *,
    last_name: str = "last.pt",
    pattern: str = "best-*.pt",
    map_location: Any = "cpu",
    weights_only: bool = True,
) -> Checkpoint | None:
    """Load the newest checkpoint of a run folder that :func:`load_checkpoint` accepts.

    Candidates, in this order: ``directory/<last_name>``, ``directory/<last_name>.prev``
    (see ``keep_previous`` of :func:`save_checkpoint`), then the files matching
    ``pattern`` (the kept checkpoints of
    :class:`~jepa_blocks.training.best_checkpoints.BestCheckpoints`), newest first: by
    the first number in the file name (the zero-padded step of ``best-<step>-...``),
    then by modification time. Missing candidates are passed over silently; each
    candidate that exists but fails to load is named, with the reason, in a
    ``UserWarning``. The file used is ``checkpoint.path``.

    Args:
        directory: The run folder.
        last_name: File name of the latest checkpoint.
        pattern: Glob of the earlier checkpoints kept in ``directory``.
        map_location: Passed to :func:`load_checkpoint`.
        weights_only: Passed to :func:`load_checkpoint`.

    Returns:
        The newest good checkpoint, or ``None`` if ``directory`` holds no candidate.

    Raises:
        CheckpointError: If ``directory`` is missing or not a directory, or if candidates
            exist but none loads (each is named with its reason).
        TypeError: An argument of the wrong type.
        ValueError: An empty or absolute ``last_name`` or ``pattern``, or a ``last_name``
            with a folder in it.

    Example:
        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> _ = save_checkpoint(d + "/best-00000100-knn=0.5.pt", {"step": 100})
        >>> _ = save_checkpoint(d + "/last.pt", {"step": 150})
        >>> _ = open(d + "/last.pt", "wb").write(b"damaged")
        >>> import warnings
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")
        ...     ckpt = load_latest_good(d)
        >>> ckpt["step"], ckpt.path.name
        (100, 'best-00000100-knn=0.5.pt')
    """
    directory = _as_path("directory", directory)
    for arg, value in (("last_name", last_name), ("pattern", pattern)):
        if not isinstance(value, str):
            raise TypeError(f"{arg} must be a non-empty str, got {value!r}")
        if not value or os.path.isabs(value):
            raise ValueError(f"{arg} must be a non-empty name relative to directory, got {value!r}")
    if Path(last_name).name != last_name:
        raise ValueError(f"last_name must be a file name without a folder, got {last_name!r}")
    weights_only = check_bool("weights_only", weights_only)
    if not directory.is_dir():
        what = "is not a directory" if directory.exists() else "does not exist"
        raise CheckpointError(f"checkpoint directory '{directory}' {what}")
    first = [directory / last_name, directory / f"{last_name}.prev"]
    kept = sorted(
        (p for p in directory.glob(pattern) if p.is_file() and p not in first),
        key=lambda p: (_first_number(p.name), p.stat().st_mtime, p.name),
        reverse=True,
    )
    failures: list[str] = []
    for candidate in [p for p in first if p.exists()] + kept:
        try:
            return load_checkpoint(candidate, map_location=map_location, weights_only=weights_only)
        except CheckpointError as err:
            failures.append(str(err))
            warnings.warn(f"skipping checkpoint '{candidate}': {err}", UserWarning, stacklevel=2)
    if failures:
        raise CheckpointError(
            f"no loadable checkpoint in '{directory}': " + "; ".join(failures)
        )
    return None


# Names that moved to their own modules and stay importable from here. Loaded on first
# use: best_checkpoints imports this module, so an eager import would be a cycle.
_MOVED = {
    "BestCheckpoints": "jepa_blocks.training.best_checkpoints",
    "rng_state": "jepa_blocks.training.rng",
    "set_rng_state": "jepa_blocks.training.rng",
}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
