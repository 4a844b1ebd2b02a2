"""Capture and restore every global random state, for an exact resume.

:func:`rng_state` returns tensors and Python scalars only, so it can go into a checkpoint
written by :func:`~jepa_blocks.training.checkpoint.save_checkpoint` and be loaded back
with ``weights_only=True``.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["rng_state", "set_rng_state"]


def rng_state() -> dict[str, Any]:
    """Capture the global random states for an exact resume.

    Covers Python's ``random``, NumPy's legacy global ``np.random`` (if NumPy is
    installed; ``np.random.Generator`` objects you hold yourself are not global and not
    included), torch's CPU generator and, when CUDA is available, the generator of every
    CUDA device. Everything is stored as tensors and Python scalars, so the result can be
    saved with ``save_checkpoint`` and loaded with ``weights_only=True``.

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
