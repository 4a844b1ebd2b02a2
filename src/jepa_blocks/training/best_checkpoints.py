"""Best-N checkpoint retention by a validation metric, surviving restarts.

Each kept checkpoint is written with :func:`~jepa_blocks.training.checkpoint.save_checkpoint`
(atomic); the index of kept files is a JSON file written atomically too.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from jepa_blocks._checks import check_choice, check_float, check_int
from jepa_blocks.training.checkpoint import _as_path, _atomic_write, save_checkpoint

__all__ = ["BestCheckpoints"]

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
