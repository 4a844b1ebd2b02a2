"""Argument checks shared by every public block.

Each check raises ``TypeError`` (wrong kind of value) or ``ValueError`` (right kind, bad
value) with a message that names the argument, what was expected and what came. Blocks
call these at their public boundary only; internal code trusts its inputs.

Value checks. Checks of type, shape and dtype only read metadata and always run. Checks
that read tensor *data* (NaN/Inf, index ranges) need a host sync on an accelerator and
cannot be traced, so they run only while :func:`value_checks_enabled` is true: they are
on by default, off while ``torch.compile`` / ``torch.export`` (or ``torch.jit`` / FX)
trace or a CUDA graph is captured, and the user can turn them off with
:func:`set_value_checks` or, for a block of code, :func:`value_checks`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch

__all__ = [
    "check_bool",
    "check_choice",
    "check_finite",
    "check_float",
    "check_index_range",
    "check_int",
    "check_pair",
    "check_grid",
    "check_tensor",
    "match_dtype",
    "set_value_checks",
    "sum_is_finite",
    "value_checks",
    "value_checks_enabled",
]

try:
    from torch._subclasses.fake_tensor import is_fake as _is_fake
except ImportError:  # pragma: no cover - torch without fake tensors
    _is_fake = None

# The user's switch for checks that read tensor data (see the module docstring).
_VALUE_CHECKS = True


def _is_tracing() -> bool:
    """Whether a compiler, exporter or graph capture is tracing the current code."""
    compiler = getattr(torch, "compiler", None)
    for name in ("is_compiling", "is_exporting"):
        fn = getattr(compiler, name, None)
        if fn is not None and fn():
            return True
    if torch.jit.is_scripting() or torch.jit.is_tracing():
        return True
    fx = getattr(torch.fx, "_symbolic_trace", None)
    is_fx = getattr(fx, "is_fx_symbolic_tracing", None) or getattr(fx, "is_fx_tracing", None)
    if is_fx is not None and is_fx():
        return True
    # A host sync during CUDA graph capture is an error: skip the checks there too.
    return bool(
        torch.cuda.is_available()
        and torch.cuda.is_initialized()
        and torch.cuda.is_current_stream_capturing()
    )


def _has_data(t: torch.Tensor) -> bool:
    """False for tensors without values to read: meta tensors and fake tensors (shape
    propagation, memory estimation), where a value check could only fail."""
    if t.device.type == "meta":
        return False
    return _is_fake is None or not _is_fake(t)


def value_checks_enabled() -> bool:
    """Whether checks that read tensor data (NaN/Inf, index ranges) should run now.

    ``False`` while ``torch.compile`` or ``torch.export`` trace (also ``torch.jit``, FX
    symbolic tracing and CUDA graph capture), so that traced code holds no host sync, and
    when the user turned the checks off with :func:`set_value_checks` or
    :func:`value_checks`; ``True`` otherwise.
    """
    if not _VALUE_CHECKS:
        return False
    return not _is_tracing()


def set_value_checks(enabled: bool) -> None:
    """Turn the checks that read tensor data on or off for the whole process.

    Value checks (NaN/Inf inputs, index ranges) cost one pass over the checked tensors
    and, on an accelerator, a host sync per check: turn them off for the last few
    percent of speed once a training run works. Shape, dtype and hyperparameter checks
    always run. Under ``torch.compile`` / ``torch.export`` they are skipped anyway. The
    switch is process-wide (shared by all threads).

    Args:
        enabled: ``True`` (the default state) to run value checks, ``False`` to skip them.

    Example:
        >>> set_value_checks(False)
        >>> value_checks_enabled()
        False
        >>> set_value_checks(True)
    """
    global _VALUE_CHECKS
    _VALUE_CHECKS = check_bool("enabled", enabled)


@contextlib.contextmanager
def value_checks(enabled: bool) -> Iterator[None]:
    """Context manager that sets :func:`set_value_checks` and restores the old state.

    Args:
        enabled: Whether value checks run inside the ``with`` block.

    Example:
        >>> with value_checks(False):
        ...     value_checks_enabled()
        False
        >>> value_checks_enabled()
        True
    """
    global _VALUE_CHECKS
    enabled = check_bool("enabled", enabled)
    previous = _VALUE_CHECKS
    _VALUE_CHECKS = enabled
    try:
        yield
    finally:
        _VALUE_CHECKS = previous


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
    finite: bool = False,
) -> torch.Tensor:
    """Check that ``value`` is a tensor of a given rank and dtype kind.

    Args:
        name: Argument name used in error messages.
        value: The object to check.
        ndim: Allowed number of dimensions (an int or a sequence of ints).
        kind: ``"float"`` (floating point), ``"int"`` (integer, not bool), ``"bool"``, or
            ``None`` for any dtype.
        allow_empty: Whether a tensor with zero elements is accepted.
        finite: Also reject NaN and Inf entries (a value check: skipped unless
            :func:`value_checks_enabled`).
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
    if finite:
        check_finite((name, value))
    return value


def check_row_pairs(a: torch.Tensor, b: torch.Tensor, names: tuple[str, str]) -> None:
    """Both ``(N, D)`` float tensors of the same shape, finite (a value check: one host
    sync, skipped unless :func:`value_checks_enabled`). Shared by the paired losses."""
    check_tensor(names[0], a, ndim=2, kind="float")
    check_tensor(names[1], b, ndim=2, kind="float")
    if a.shape != b.shape:
        raise ValueError(
            f"{names[0]} and {names[1]} must have the same shape (N, D), got "
            f"{tuple(a.shape)} and {tuple(b.shape)}"
        )
    check_finite((names[0], a), (names[1], b))


def check_device(name: str, value: Any) -> torch.device:
    """``value`` (a ``torch.device`` or a device string) as a ``torch.device``."""
    try:
        return torch.device(value)
    except (RuntimeError, TypeError) as err:
        raise (TypeError if isinstance(err, TypeError) else ValueError)(
            f"{name} must be a torch.device, a device string or None, got {value!r}: {err}"
        ) from err


def check_finite(*items: tuple[str, torch.Tensor | None]) -> None:
    """Raise ``ValueError`` naming the first of ``(name, tensor)`` pairs holding NaN or Inf.

    A value check: does nothing unless :func:`value_checks_enabled`. All tensors are
    tested with one host sync; ``None`` entries and non-floating tensors are skipped.

    Fast path: a sum is finite only if every entry is (NaN and Inf propagate through it),
    so one reduction per tensor usually decides, at a fraction of the cost of
    ``isfinite(t).all()``; a tensor whose sum is not finite (bad entries, or a sum that
    overflows) is then tested exactly.

    Args:
        *items: ``(name, tensor)`` pairs, tensors of any shape.
    """
    if not value_checks_enabled():
        return
    named = [
        (name, t)
        for name, t in items
        if t is not None and (t.is_floating_point() or t.is_complex()) and t.numel() and _has_data(t)
    ]
    if not named:
        return
    device = named[0][1].device
    flags = torch.stack([sum_is_finite(t).to(device) for _, t in named]).tolist()
    if all(flags):
        return
    for (name, t), quick in zip(named, flags, strict=True):
        if not quick and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} must be finite, got NaN or Inf values")


def sum_is_finite(t: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """``isfinite(t.sum())`` accumulated in at least float32 (bool tensor, no host sync).

    ``True`` implies that every summed entry is finite; ``False`` means a NaN/Inf entry or
    an overflowing sum. With ``dim``, the sums over that dimension are tested one by one.
    """
    acc = torch.promote_types(t.dtype, torch.float32)
    total = t.sum(dtype=acc) if dim is None else t.sum(dim=dim, dtype=acc)
    return torch.isfinite(total)


def match_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` cast to ``dtype`` (a module's parameter dtype) unless autocast is on for its device.

    Lets a float32 module take float16/bfloat16 inputs (and the reverse) without a dtype
    mismatch error; under autocast the input is left alone so autocast decides.
    """
    if x.dtype == dtype or torch.is_autocast_enabled(x.device.type):
        return x
    return x.to(dtype)


def check_index_range(name: str, ids: torch.Tensor, high: int, *, what: str = "") -> None:
    """Raise ``ValueError`` naming ``name`` unless every entry of ``ids`` lies in ``[0, high)``.

    A value check: does nothing unless :func:`value_checks_enabled` (one host sync).

    Args:
        name: Argument name used in the message.
        ids: Integer tensor of any shape; empty tensors pass.
        high: Exclusive upper bound.
        what: Optional description of the range for the message, e.g. ``"of the 4x4 grid"``.
    """
    if not value_checks_enabled() or ids.numel() == 0 or not _has_data(ids):
        return
    low_high = torch.stack(torch.aminmax(ids)).tolist()
    low, top = int(low_high[0]), int(low_high[1])
    if low < 0 or top >= high:
        where = f" {what}" if what else ""
        raise ValueError(f"{name} must hold ids in [0, {high}){where}, got range [{low}, {top}]")
