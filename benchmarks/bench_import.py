"""Section 0, ``import``: wall time of ``import jepa_blocks`` against ``import torch``.

Each figure is the median over fresh interpreter processes (``python -X importtime`` is
not used: it slows the import down); the process start-up without any import is measured
the same way and reported beside them, not subtracted.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

from sizes import Results, Sizes

# What each child process imports; the empty statement is the interpreter start-up alone.
STATEMENTS = {"python": "pass", "torch": "import torch", "jepa_blocks": "import jepa_blocks"}


def import_seconds(statement: str, *, reps: int) -> list[float]:
    """Wall seconds of ``python -c statement`` in ``reps`` fresh processes (start-up included)."""
    times = []
    for _ in range(max(reps, 1)):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", statement], check=True)
        times.append(time.perf_counter() - start)
    return times


def bench_import(sizes: Sizes) -> Results:
    """``import.{python,torch,jepa_blocks}_s`` (medians of ``sizes.import_reps`` fresh
    processes, interleaved so that a load change hits all three alike) and
    ``import.ratio`` (jepa_blocks / torch)."""
    runs: dict[str, list[float]] = {name: [] for name in STATEMENTS}
    for _ in range(max(sizes.import_reps, 1)):
        for name, statement in STATEMENTS.items():
            runs[name] += import_seconds(statement, reps=1)
    out: Results = {f"import.{name}_s": statistics.median(t) for name, t in runs.items()}
    out["import.reps"] = max(sizes.import_reps, 1)
    out["import.ratio"] = out["import.jepa_blocks_s"] / out["import.torch_s"]
    return out
