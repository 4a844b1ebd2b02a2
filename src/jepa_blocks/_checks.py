"""Argument checks shared by every public block.

Each check raises ``TypeError`` (wrong kind of value) or ``ValueError`` (right kind, bad
value) with a message that names the argument, what was expected and what came. Blocks
call these at their public boundary only; internal code trusts its inputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

__all__ = [
    "check_bool",
    "check_choice",
    "check_float",
    "check_int",
    "check_pair",
    "check_grid",
    "check_tensor",
]


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"Tensor(shape={tuple(value.shape)}, dtype={value.dtype})"
    return f"{value!r} ({type(value).__name__})"


def check_bool(name: str, value: Any) -> bool:
    """Return ``value`` if it is a ``bool``; raise ``TypeError`` naming ``name`` otherwise."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {_describe(value)}")
    return value


def check_int(
    name: str,
    value: Any,
    *,
    min_value: int | None = None,
    max_value: int | None = None,
) -> int:
    """Return ``value`` as ``int`` after checking its type and inclusive bounds."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {_describe(value)}")
    if min_value is not None and value < min_value:
        raise ValueError(f"{name} must be >= {min_value}, got {value}")
    if max_value is not None and value > max_value:
        raise ValueError(f"{name} must be <= {max_value}, got {value}")
    return int(value)


def check_float(
    name: str,
    value: Any,
    *,
    min_value: float | None = None,
    max_value: float | None = None,
    min_inclusive: bool = True,
    max_inclusive: bool = True,
) -> float:
    """Return ``value`` as ``float`` after checking it is a finite real number in range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {_describe(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if min_value is not None:
        bad = value < min_value if min_inclusive else value <= min_value
        if bad:
            op = ">=" if min_inclusive else ">"
            raise ValueError(f"{name} must be {op} {min_value}, got {value}")
    if max_value is not None:
        bad = value > max_value if max_inclusive else value >= max_value
        if bad:
            op = "<=" if max_inclusive else "<"
            raise ValueError(f"{name} must be {op} {max_value}, got {value}")
    return value


def check_pair(
    name: str,
    value: Any,
    *,
    min_value: float | None = None,
    max_value: float | None = None,
    min_inclusive: bool = True,
    max_inclusive: bool = True,
) -> tuple[float, float]:
    """Return a ``(low, high)`` range of floats with ``low <= high``, both in bounds."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise TypeError(f"{name} must be a (low, high) pair of floats, got {_describe(value)}")
    low = check_float(
        f"{name}[0]",
        value[0],
        min_value=min_value,
        max_value=max_value,
        min_inclusive=min_inclusive,
        max_inclusive=max_inclusive,
    )
    high = check_float(
        f"{name}[1]",
        value[1],
        min_value=min_value,
        max_value=max_value,
        min_inclusive=min_inclusive,
        max_inclusive=max_inclusive,
    )
    if low > high:
        raise ValueError(f"{name} must satisfy low <= high, got ({low}, {high})")
    return low, high


def check_grid(name: str, value: Any) -> tuple[int, int]:
    """Return an ``(H, W)`` patch grid of positive ints; an int ``n`` means ``(n, n)``."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise TypeError(f"{name} must be an int or an (H, W) pair of ints, got {_describe(value)}")
    h = check_int(f"{name}[0]", value[0], min_value=1)
    w = check_int(f"{name}[1]", value[1], min_value=1)
    return h, w


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    """Return ``value`` if it is one of ``choices``."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be one of {list(choices)}, got {_describe(value)}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def check_tensor(
    name: str,
    value: Any,
    *,
    ndim: int | Sequence[int] | None = None,
    kind: str | None = None,
    allow_empty: bool = False,
) -> torch.Tensor:
    """Check that ``value`` is a tensor of a given rank and dtype kind.

    Args:
        name: Argument name used in error messages.
        value: The object to check.
        ndim: Allowed number of dimensions (an int or a sequence of ints).
        kind: ``"float"`` (floating point), ``"int"`` (integer, not bool), ``"bool"``, or
            ``None`` for any dtype.
        allow_empty: Whether a tensor with zero elements is accepted.
    """
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {_describe(value)}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if value.ndim not in allowed:
            want = " or ".join(str(a) for a in allowed)
            raise ValueError(
                f"{name} must have {want} dimensions, got shape {tuple(value.shape)}"
            )
    if kind == "float" and not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if kind == "int" and (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor, got dtype {value.dtype}")
    if kind == "bool" and value.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor, got dtype {value.dtype}")
    if not allow_empty and value.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(value.shape)}")
    return value
