"""Argument checks shared by every public block, and the switch for value checks.

Each check raises ``TypeError`` (wrong kind of value) or ``ValueError`` (right kind, bad
value) with a message that names the argument, what was expected and what came. Blocks
call these at their public boundary only; internal code trusts its inputs.

Devices: :func:`check_same_device` rejects a tensor argument on another device than the
module's parameters and buffers (or than the call's other tensor arguments) with a
``ValueError`` naming it, the expected and the actual device. It reads ``tensor.device``
only (metadata, no host sync), so it always runs.

Value checks are a debug mode. Checks of type, shape and dtype read only metadata and
always run. Checks that read tensor *values* (NaN/Inf inputs, ids outside their range)
cost a pass over the tensor and, on an accelerator, a host sync; whether they run is
decided by (each item overrides the ones before it):

1. the environment variable ``JEPA_BLOCKS_VALUE_CHECKS``, read once when ``jepa_blocks``
   is imported: ``0`` (or ``false``, ``off``, ``no``) turns them off, ``1`` (``true``,
   ``on``, ``yes``), an empty value or no variable leaves them on; anything else raises
   ``ValueError`` at import. Processes that import the library afresh (``torchrun``
   ranks, spawned ``DataLoader`` workers) read it too; forked ones inherit the state;
2. :func:`set_value_checks`, which replaces that process-wide default (all threads).
   Decide once, before a training loop, not inside it;
3. :func:`value_checks`, a context manager that overrides the default inside its
   ``with`` block for the current thread (and asyncio task) only, nests, and restores
   the previous state on exit, exceptions included;
4. tracing: whatever the setting, they are skipped while ``torch.compile`` /
   ``torch.export`` (also ``torch.jit``, FX symbolic tracing) trace or a CUDA graph is
   captured, so that traced code holds no host sync.

:func:`value_checks_enabled` says whether they run now. A training loop decides once and
wraps the loop::

    with value_checks(debug):  # debug: e.g. a command-line flag
        for batch in loader:
            ...
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch

__all__ = [
    "VALUE_CHECKS_ENV_VAR",
    "check_bool",
    "check_choice",
    "check_device",
    "check_finite",
    "check_float",
    "check_grid",
    "check_index_range",
    "check_int",
    "check_pair",
    "check_overflow",
    "check_row_pairs",
    "check_same_device",
    "check_tensor",
    "has_data",
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

#: The environment variable that sets the default of the value checks (see above).
VALUE_CHECKS_ENV_VAR = "JEPA_BLOCKS_VALUE_CHECKS"
_ON = ("1", "true", "on", "yes")
_OFF = ("0", "false", "off", "no")


def _default_from_env(environ: Any = os.environ) -> bool:
    """The default set by :data:`VALUE_CHECKS_ENV_VAR`: ``True`` unless it says off."""
    raw = environ.get(VALUE_CHECKS_ENV_VAR)
    value = "" if raw is None else raw.strip().lower()
    if value in ("", *_ON):
        return True
    if value in _OFF:
        return False
    raise ValueError(
        f"environment variable {VALUE_CHECKS_ENV_VAR} must be one of {list(_OFF + _ON)} "
        f"(or empty), got {raw!r}"
    )


# The process-wide default (environment, then set_value_checks) and the override of the
# current thread / asyncio task (value_checks; None: no override).
_default = _default_from_env()
_override: contextvars.ContextVar[bool | None] = contextvars.ContextVar(
    "jepa_blocks_value_checks", default=None
)


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


def has_data(t: torch.Tensor) -> bool:
    """False for tensors without values to read: meta tensors and fake tensors (shape
    propagation, memory estimation), where a value check could only fail."""
    if t.device.type == "meta":
        return False
    return _is_fake is None or not _is_fake(t)


def value_checks_enabled() -> bool:
    """Whether checks that read tensor values (NaN/Inf, index ranges) run now.

    ``False`` while tracing (see the module docstring); otherwise the setting of the
    innermost :func:`value_checks` block of this thread, or, outside any, the process-wide
    default (``JEPA_BLOCKS_VALUE_CHECKS``, then :func:`set_value_checks`).
    """
    # Tracing first: under torch.compile this returns a constant, so the lookup of the
    # context variable below is never traced.
    if _is_tracing():
        return False
    override = _override.get()
    return _default if override is None else override


def set_value_checks(enabled: bool) -> None:
    """Set the process-wide default of the value checks (all threads).

    It replaces the default read from ``JEPA_BLOCKS_VALUE_CHECKS`` at import. Decide once,
    before a training loop (or use :func:`value_checks` around it), not inside it: an
    active :func:`value_checks` block still overrides it in its thread.

    Args:
        enabled: ``True`` to run value checks, ``False`` to skip them.

    Example:
        >>> set_value_checks(False)
        >>> value_checks_enabled()
        False
        >>> set_value_checks(True)
    """
    global _default
    _default = check_bool("enabled", enabled)


@contextlib.contextmanager
def value_checks(enabled: bool) -> Iterator[None]:
    """Run value checks (or not) inside a ``with`` block of the current thread.

    Overrides the process-wide default and any enclosing block; on exit, also through an
    exception, the previous state comes back. Other threads are not affected.

    Args:
        enabled: Whether value checks run inside the ``with`` block.

    Example:
        >>> with value_checks(False):
        ...     value_checks_enabled()
        False
        >>> value_checks_enabled()
        True
    """
    token = _override.set(check_bool("enabled", enabled))
    try:
        yield
    finally:
        _override.reset(token)


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
    bounds = {
        "min_value": min_value,
        "max_value": max_value,
        "min_inclusive": min_inclusive,
        "max_inclusive": max_inclusive,
    }
    low = check_float(f"{name}[0]", value[0], **bounds)
    high = check_float(f"{name}[1]", value[1], **bounds)
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
    """Both ``(N, D)`` float tensors of the same shape on one device, finite (a value check:
    one host sync, skipped unless :func:`value_checks_enabled`). Shared by the paired
    losses."""
    check_tensor(names[0], a, ndim=2, kind="float")
    check_tensor(names[1], b, ndim=2, kind="float")
    check_same_device((names[0], a), (names[1], b))
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


def _module_device(module: torch.nn.Module) -> torch.device | None:
    """Device of the first parameter (else buffer) of ``module``; ``None`` if it has none."""
    for tensors in (module.parameters(), module.buffers()):
        for t in tensors:
            return t.device
    return None


def check_same_device(
    *items: tuple[str, torch.Tensor | None], module: torch.nn.Module | None = None
) -> None:
    """Raise ``ValueError`` naming the first tensor of ``items`` on an unexpected device.

    The expected device is that of ``module``'s first parameter (or, without parameters,
    its first buffer); for a module without tensors, or without ``module``, it is the
    device of the first tensor of ``items``. A metadata check (``tensor.device``, no host
    sync): it always runs, also under tracing. ``None`` entries and non-tensors are
    skipped (their type is checked elsewhere).

    Args:
        *items: ``(name, tensor)`` pairs, tensors of any shape.
        module: The module whose device the tensors must be on, or ``None``.

    Example:
        >>> check_same_device(("x", torch.zeros(2, device="meta")), module=torch.nn.Linear(2, 2))
        Traceback (most recent call last):
        ...
        ValueError: x must be on the device of the Linear's parameters/buffers (cpu), got a tensor on meta; move the module or the tensor with .to(device)
    """
    tensors = [(n, t) for n, t in items if isinstance(t, torch.Tensor)]
    if not tensors:
        return
    expected = None if module is None else _module_device(module)
    if expected is not None:
        where = f"the device of the {type(module).__name__}'s parameters/buffers ({expected})"
        fix = "move the module or the tensor with .to(device)"
    else:
        first, t0 = tensors[0]
        expected, where = t0.device, f"the device of {first} ({t0.device})"
        fix = "move one of them with .to(device)"
    for name, t in tensors:
        if t.device != expected:
            raise ValueError(f"{name} must be on {where}, got a tensor on {t.device}; {fix}")


def check_finite(
    *items: tuple[str, torch.Tensor | None], max_abs: float | None = None, reason: str = ""
) -> None:
    """Raise ``ValueError`` naming the first of ``(name, tensor)`` pairs holding NaN or Inf.

    A value check: does nothing unless :func:`value_checks_enabled`. All tensors are
    tested with one host sync; ``None`` entries and non-floating tensors are skipped.

    Fast path: a sum is finite only if every entry is (NaN and Inf propagate through it),
    so one reduction per tensor usually decides, at a fraction of the cost of
    ``isfinite(t).all()``; a tensor whose sum is not finite (bad entries, or a sum that
    overflows) is then tested exactly.

    Args:
        *items: ``(name, tensor)`` pairs, tensors of any shape.
        max_abs: Also reject finite entries of magnitude above this bound (for blocks
            whose arithmetic would overflow beyond it); one min/max reduction per tensor
            then replaces the sum, still with one host sync.
        reason: Why ``max_abs`` holds, appended to its message.
    """
    if not value_checks_enabled():
        return
    named = [
        (name, t)
        for name, t in items
        if t is not None and (t.is_floating_point() or t.is_complex()) and t.numel() and has_data(t)
    ]
    if not named:
        return
    device = named[0][1].device
    if max_abs is not None:
        # min and max are exact: NaN if an entry is NaN, +-Inf if one is infinite (and
        # aminmax is one fast pass, unlike an inf-norm on the CPU).
        acc = torch.float64 if any(t.dtype == torch.float64 for _, t in named) else torch.float32
        ranges = [torch.stack(torch.aminmax(t.detach().abs() if t.is_complex() else t.detach())) for _, t in named]
        bounds = torch.stack([r.to(device=device, dtype=acc) for r in ranges]).tolist()
        for (name, _), (low, high) in zip(named, bounds, strict=True):
            top = max(-low, high)
            if not (math.isfinite(low) and math.isfinite(high)):
                raise ValueError(f"{name} must be finite, got NaN or Inf values")
            if top > max_abs:
                why = f" ({reason})" if reason else ""
                raise ValueError(
                    f"{name} must have entries of magnitude <= {max_abs:.3g}{why}, got up to {top:.3g}"
                )
        return
    flags = torch.stack([sum_is_finite(t).to(device) for _, t in named]).tolist()
    if all(flags):
        return
    for (name, t), quick in zip(named, flags, strict=True):
        if not quick and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} must be finite, got NaN or Inf values")


def check_overflow(
    result: torch.Tensor, *inputs: tuple[str, torch.Tensor], what: str, hint: str = ""
) -> None:
    """Raise ``ValueError`` if ``result``, computed from finite ``inputs``, is not finite.

    For computations whose value overflows the floating range for large but finite inputs
    (e.g. a 4th power of the input scale): the message names the inputs and their largest
    magnitude. A value check (one host sync; skipped unless :func:`value_checks_enabled`);
    call it after :func:`check_finite` of the inputs, so that a non-finite result can only
    come from an overflow inside.

    Args:
        result: The computed tensor (any shape).
        *inputs: ``(name, tensor)`` pairs it was computed from.
        what: What ``result`` is, for the message (e.g. ``"the VICReg loss"``).
        hint: What to do about it, appended to the message.
    """
    if not value_checks_enabled() or not has_data(result) or result.numel() == 0:
        return
    if bool(torch.isfinite(result).all()):
        return
    sizes = ", ".join(
        f"max |{name}| = {float(t.detach().abs().amax()):.3g}" if t.numel() else f"{name} empty"
        for name, t in inputs
    )
    names = " and ".join(name for name, _ in inputs)
    raise ValueError(
        f"{names} must be small enough for {what} to stay finite in {result.dtype}, got finite "
        f"inputs ({sizes}) whose result overflows to NaN/Inf{'; ' + hint if hint else ''}"
    )


def sum_is_finite(t: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """``isfinite(t.sum())`` accumulated in at least float32 (bool tensor, no host sync).

    ``True`` implies that every summed entry is finite; ``False`` means a NaN/Inf entry or
    an overflowing sum. With ``dim``, the sums over that dimension are tested one by one.
    """
    acc = torch.promote_types(t.dtype, torch.float32)
    total = t.sum(dtype=acc) if dim is None else t.sum(dim=dim, dtype=acc)
    return torch.isfinite(total)


def _autocast_query() -> Any:
    """``device_type -> bool``: whether autocast is on for a device type.

    torch >= 2.4 asks ``torch.is_autocast_enabled(device_type)``; 2.2 and 2.3 have no
    argument there (CUDA only) and ``torch.is_autocast_cpu_enabled()`` for the CPU (which
    newer releases deprecate).
    """
    query = torch.is_autocast_enabled
    try:
        query("cpu")
    except TypeError:  # torch < 2.4
        cpu = torch.is_autocast_cpu_enabled

        def legacy(device_type: str) -> bool:
            if device_type == "cpu":
                return cpu()
            return device_type == "cuda" and query()

        return legacy
    return query


_autocast_enabled = _autocast_query()


def match_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` cast to ``dtype`` (a module's parameter dtype) unless autocast is on for its device.

    Lets a float32 module take float16/bfloat16 inputs (and the reverse) without a dtype
    mismatch error; under autocast the input is left alone so autocast decides.
    """
    if x.dtype == dtype or _autocast_enabled(x.device.type):
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
    if not value_checks_enabled() or ids.numel() == 0 or not has_data(ids):
        return
    low_high = torch.stack(torch.aminmax(ids)).tolist()
    low, top = int(low_high[0]), int(low_high[1])
    if low < 0 or top >= high:
        where = f" {what}" if what else ""
        raise ValueError(f"{name} must hold ids in [0, {high}){where}, got range [{low}, {top}]")
