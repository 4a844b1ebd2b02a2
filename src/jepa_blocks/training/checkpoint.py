"""Crash-safe checkpoints: atomic save, checked load, best-N retention, RNG state.

* :func:`save_checkpoint` never leaves a half-written file at the target path: it writes
  ``<path>.tmp-<pid>`` in the same directory, flushes and ``fsync``-s it, then renames it
  onto ``path`` with ``os.replace`` (atomic on POSIX and Windows) and ``fsync``-s the
  directory. If the writer raises or is killed, the previous checkpoint at ``path`` is
  untouched; a killed writer may leave its ``*.tmp-<pid>`` file behind, which is never
  read and safe to delete.
* :func:`load_checkpoint` raises :class:`CheckpointError` (a ``ValueError``) naming the
  file and the problem: missing, empty, truncated or corrupt, not a jepa-blocks
  checkpoint, or written by a newer format.
* :class:`BestCheckpoints` keeps the best ``N`` checkpoints by a validation metric and
  survives restarts.
* :func:`rng_state` / :func:`set_rng_state` capture and restore every global RNG for an
  exact resume.

Loading uses ``torch.load(..., weights_only=True)`` by default: it refuses to run
arbitrary pickled code, and what a training loop needs fits inside its allow-list
(tensors, ``state_dict()`` of modules, optimizers and schedulers, Python scalars,
strings, ``None``, lists, tuples, dicts, and :func:`rng_state`, which stores the NumPy
state as a tensor for this reason). Pass ``weights_only=False`` only for files you
trust that hold other objects (e.g. a dataclass config; prefer ``dataclasses.asdict``).

A checkpoint file holds ``{"jepa_blocks_checkpoint": <format version>, "metadata":
{...}, "state": <your dict>}``; :func:`load_checkpoint` returns your dict as a
:class:`Checkpoint` (a ``dict`` with a ``metadata`` attribute).
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import time
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch

from jepa_blocks._checks import check_bool, check_choice, check_float, check_int

__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "Checkpoint",
    "save_checkpoint",
    "load_checkpoint",
    "BestCheckpoints",
    "rng_state",
    "set_rng_state",
]

#: Version of the on-disk layout written by :func:`save_checkpoint`.
FORMAT_VERSION = 1
_MARKER = "jepa_blocks_checkpoint"


class CheckpointError(ValueError):
    """A checkpoint file is missing, damaged, foreign or from a newer format."""


class Checkpoint(dict):
    """The state dict given to :func:`save_checkpoint`, plus the file's ``metadata``.

    ``metadata`` holds ``format_version``, ``library_version``, ``torch_version``,
    ``time`` (seconds since the epoch) and ``time_utc`` (ISO 8601).

    Example:
        >>> import tempfile, torch
        >>> path = tempfile.mkdtemp() + "/last.pt"
        >>> _ = save_checkpoint(path, {"step": 3, "w": torch.zeros(2)})
        >>> ckpt = load_checkpoint(path)
        >>> ckpt["step"], ckpt.metadata["format_version"]
        (3, 1)
    """

    metadata: dict[str, Any]

    def __init__(self, state: Mapping[str, Any], metadata: dict[str, Any]) -> None:
        super().__init__(state)
        self.metadata = metadata


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

    _atomic_write(path, lambda f: torch.save(payload, f))
    return path


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
) -> Checkpoint:
    """Load a checkpoint written by :func:`save_checkpoint`.

    Args:
        path: The checkpoint file.
        map_location: Passed to ``torch.load``; default ``"cpu"``.
        weights_only: Passed to ``torch.load``. Keep True (safe: no arbitrary code runs)
            unless the file is trusted and holds objects outside torch's allow-list.

    Returns:
        The saved state dict, as a :class:`Checkpoint` with a ``metadata`` attribute.

    Raises:
        CheckpointError: Naming the file, if it is missing, a directory, empty, truncated
            or corrupt, not loadable with ``weights_only=True``, not a jepa-blocks
            checkpoint, or written with a newer format version.
    """
    path = _as_path("path", path)
    weights_only = check_bool("weights_only", weights_only)
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
    return Checkpoint(state, metadata)


# ---------------------------------------------------------------------------------------
# Best-N retention
# ---------------------------------------------------------------------------------------

_METRIC_NAME = re.compile(r"^[A-Za-z0-9_]+$")


class BestCheckpoints:
    """Keep the ``keep`` best checkpoints of a run by a validation metric.

    Files are named ``best-<step>-<metric_name>=<value>.pt`` (step zero-padded to 8
    digits, value with 6 significant digits) inside ``directory``. The exact values are
    kept in ``best-<metric_name>.json``, written atomically after every change; on
    construction the index is merged with a scan of the directory (files missing on disk
    are dropped, matching files absent from the index, e.g. after a crash between the two
    writes, are adopted), so the selection survives restarts. Several trackers with
    different ``metric_name`` can share a directory.

    A new value is kept if fewer than ``keep`` checkpoints exist or it is strictly better
    than the worst kept one (ties keep the older checkpoint). A new value at a step that
    is already kept replaces that entry if it makes the cut. Changing ``keep`` between
    runs is allowed: surplus checkpoints go at the next :meth:`update`.

    Args:
        directory: Where the checkpoints live (created if missing).
        keep: How many to keep, ``>= 1``.
        mode: ``"max"`` if larger is better (accuracy), ``"min"`` if smaller (loss).
        metric_name: Name used in file names: letters, digits and ``_`` only.

    Example:
        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> best = BestCheckpoints(d, keep=2, mode="max", metric_name="knn")
        >>> for step, acc in [(100, 0.30), (200, 0.45), (300, 0.40), (400, 0.20)]:
        ...     _ = best.update(step, acc, {"step": step})
        >>> [(e["step"], e["metric"]) for e in best.entries]
        [(200, 0.45), (300, 0.4)]
        >>> best.best_path.name
        'best-00000200-knn=0.45.pt'
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        keep: int = 3,
        mode: Literal["max", "min"] = "max",
        metric_name: str = "metric",
    ) -> None:
        self.directory = _as_path("directory", directory)
        self.keep = check_int("keep", keep, min_value=1)
        self.mode = check_choice("mode", mode, ("max", "min"))
        if not isinstance(metric_name, str):
            raise TypeError(f"metric_name must be a str, got {type(metric_name).__name__}")
        if not _METRIC_NAME.match(metric_name):
            raise ValueError(
                f"metric_name must contain only letters, digits and '_', got {metric_name!r}"
            )
        self.metric_name = metric_name
        self._file_re = re.compile(rf"^best-(\d+)-{re.escape(metric_name)}=([^/\\]+)\.pt$")
        self.directory.mkdir(parents=True, exist_ok=True)
        self._entries: list[dict[str, Any]] = self._recover()

    @property
    def index_path(self) -> Path:
        """The JSON index of kept checkpoints."""
        return self.directory / f"best-{self.metric_name}.json"

    @property
    def entries(self) -> list[dict[str, Any]]:
        """Kept checkpoints, best first: dicts with ``step``, ``metric`` and ``path``."""
        return [
            {"step": e["step"], "metric": e["metric"], "path": self.directory / e["file"]}
            for e in self._entries
        ]

    @property
    def best_path(self) -> Path | None:
        """Path of the best checkpoint, or ``None`` if none is kept."""
        return self.directory / self._entries[0]["file"] if self._entries else None

    def _file_name(self, step: int, metric: float) -> str:
        return f"best-{step:08d}-{self.metric_name}={metric:.6g}.pt"

    def _sort(self, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        # Best first; among equal metrics the older (smaller step) first, so ties keep it.
        sign = -1.0 if self.mode == "max" else 1.0
        return sorted(entries, key=lambda e: (sign * e["metric"], e["step"]))

    def _recover(self) -> list[dict[str, Any]]:
        by_file: dict[str, dict[str, Any]] = {}
        if self.index_path.exists():
            try:
                index = json.loads(self.index_path.read_text())
                if index.get("mode") != self.mode:
                    raise ValueError(
                        f"mode={self.mode!r} does not match mode={index.get('mode')!r} "
                        f"recorded in '{self.index_path}'"
                    )
                for e in index["entries"]:
                    by_file[str(e["file"])] = {
                        "step": int(e["step"]),
                        "metric": float(e["metric"]),
                        "file": str(e["file"]),
                    }
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
                warnings.warn(
                    f"ignoring unreadable index '{self.index_path}' ({err}); rebuilding it "
                    "from the file names",
                    stacklevel=3,
                )
                by_file = {}
        # Keep only entries whose file exists; adopt matching files the index lacks.
        on_disk = {p.name for p in self.directory.iterdir() if self._file_re.match(p.name)}
        entries = [e for name, e in by_file.items() if name in on_disk]
        for name in sorted(on_disk - by_file.keys()):
            match = self._file_re.match(name)
            if match is None:
                continue
            try:
                metric = float(match.group(2))
            except ValueError:
                continue
            if math.isfinite(metric):
                entries.append({"step": int(match.group(1)), "metric": metric, "file": name})
        return self._sort(entries)

    def _write_index(self) -> None:
        index = {
            "version": 1,
            "metric_name": self.metric_name,
            "mode": self.mode,
            "entries": self._entries,
        }
        data = json.dumps(index, indent=1).encode()
        _atomic_write(self.index_path, lambda f: f.write(data))

    def _qualifies(self, metric: float, entries: list[dict[str, Any]]) -> bool:
        if len(entries) < self.keep:
            return True
        worst = entries[self.keep - 1]["metric"]
        return metric > worst if self.mode == "max" else metric < worst

    def would_keep(self, metric: float) -> bool:
        """Whether :meth:`update` would keep a checkpoint with this metric value."""
        return self._qualifies(check_float("metric", metric), self._entries)

    def update(self, step: int, metric: float, state: Mapping[str, Any]) -> Path | None:
        """Save ``state`` if ``metric`` is among the best, and delete what falls out.

        Afterwards exactly ``min(keep, number of candidates)`` checkpoints remain.

        Args:
            step: Optimizer step of the evaluation, ``>= 0``.
            metric: Validation metric, finite (a NaN raises ``ValueError``).
            state: Checkpoint content, as for :func:`save_checkpoint`.

        Returns:
            The path written, or ``None`` if the value did not make the cut.
        """
        step = check_int("step", step, min_value=0)
        metric = check_float("metric", metric)
        # A repeated step (a resumed run evaluating again) replaces the old entry if the
        # new value is kept; otherwise the old entry stays.
        same_step = [e for e in self._entries if e["step"] == step]
        others = [e for e in self._entries if e["step"] != step]
        path: Path | None = None
        if self._qualifies(metric, others):
            name = self._file_name(step, metric)
            path = save_checkpoint(self.directory / name, state)
            candidates = others + [{"step": step, "metric": metric, "file": name}]
            replaced = [e for e in same_step if e["file"] != name]
        else:
            candidates = others + same_step
            replaced = []
        candidates = self._sort(candidates)
        dropped = candidates[self.keep :] + replaced
        if path is None and not dropped:
            return None
        self._entries = candidates[: self.keep]
        # Index first, deletions after: a crash in between leaves extra files that the
        # next scan adopts and the next update prunes, never an index naming lost files.
        self._write_index()
        for e in dropped:
            (self.directory / e["file"]).unlink(missing_ok=True)
        return path

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(directory='{self.directory}', keep={self.keep}, "
            f"mode={self.mode!r}, metric_name={self.metric_name!r}, "
            f"kept={[(e['step'], e['metric']) for e in self._entries]})"
        )


# ---------------------------------------------------------------------------------------
# RNG state
# ---------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Capture the global random states for an exact resume.

    Covers Python's ``random``, NumPy's legacy global ``np.random`` (if NumPy is
    installed; ``np.random.Generator`` objects you hold yourself are not global and not
    included), torch's CPU generator and, when CUDA is available, the generator of every
    CUDA device. Everything is stored as tensors and Python scalars, so the result can be
    saved with :func:`save_checkpoint` and loaded with ``weights_only=True``.

    Returns:
        ``{"python": tuple, "numpy": dict | None, "torch": uint8 tensor (S,),
        "cuda": list of uint8 tensors (S_cuda,), one per device}``.
    """
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": None,
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    try:
        import numpy as np
    except ImportError:
        return state
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state["numpy"] = {
        "bit_generator": str(name),
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached_gaussian),
    }
    return state


def _to_tuple(value: Any) -> Any:
    """Lists back to tuples, recursively (``random.setstate`` wants tuples)."""
    if isinstance(value, (list, tuple)):
        return tuple(_to_tuple(v) for v in value)
    return value


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore the random states captured by :func:`rng_state`.

    Entries that are missing are left alone. A NumPy state without NumPy installed, or
    CUDA states on a machine with fewer (or no) CUDA devices, restore what they can and
    warn.

    Args:
        state: A dict returned by :func:`rng_state` (possibly through a checkpoint).
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a dict from rng_state(), got {type(state).__name__}")
    unknown = set(state) - {"python", "numpy", "torch", "cuda"}
    if unknown:
        raise ValueError(
            f"state has unknown keys {sorted(unknown)}; expected a dict from rng_state()"
        )
    if state.get("python") is not None:
        random.setstate(_to_tuple(state["python"]))
    if state.get("torch") is not None:
        torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8).cpu())
    numpy_state = state.get("numpy")
    if numpy_state is not None:
        try:
            import numpy as np
        except ImportError:
            warnings.warn(
                "state holds a NumPy RNG state but NumPy is not installed; skipped it",
                stacklevel=2,
            )
        else:
            keys = torch.as_tensor(numpy_state["keys"]).cpu().numpy().astype(np.uint32)
            np.random.set_state(
                (
                    numpy_state["bit_generator"],
                    keys,
                    int(numpy_state["pos"]),
                    int(numpy_state["has_gauss"]),
                    float(numpy_state["cached_gaussian"]),
                )
            )
    cuda_states = state.get("cuda") or []
    if cuda_states:
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if available < len(cuda_states):
            warnings.warn(
                f"state holds RNG states of {len(cuda_states)} CUDA devices but "
                f"{available} are available; restored the first {available}",
                stacklevel=2,
            )
        for device, cuda_state in enumerate(cuda_states[:available]):
            torch.cuda.set_rng_state(
                torch.as_tensor(cuda_state, dtype=torch.uint8).cpu(), device=device
            )
