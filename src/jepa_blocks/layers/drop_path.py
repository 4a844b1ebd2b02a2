"""Stochastic depth (drop path) whose per-sample draws can follow the sample, not the process.

timm's ``DropPath`` draws each sample's keep/drop decision from torch's global RNG, so the
decision for a sample depends on which process and micro-batch it lands in: two DDP
ranks, reseeded alike, draw the same stream for different samples. Here the keep decision
of a row can instead be a pure function of a per-sample seed given by the caller (e.g.
``sample_seed(seed, epoch, batch, global_index)``), of the row's position among that
sample's rows, of the layer and of the call: the same sample is kept or dropped alike on
any number of processes and in any micro-batch split. Without seeds the module behaves
exactly like timm's (same global-RNG draws), so it is a drop-in replacement with the same
(empty) ``state_dict``.

The per-row uniform is a SplitMix64 chain computed on the tensor's device (int64 with
wrapping arithmetic, no host sync)::

    u(row) = top 24 bits of mix(sample_seed[row // k], row % k, salt, call) / 2**24

with ``k = rows / samples`` (rows sample-major, e.g. ``(B * views, N, D)`` from
``(B, V, ...)``), ``salt`` a CRC32 of the layer's qualified name and ``call`` the number of
earlier calls of that layer inside :func:`sample_seeded_drop_path`. The row is kept when
``u >= drop_prob`` and scaled by ``1 / (1 - drop_prob)`` (``scale_by_keep``).
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from jepa_blocks._checks import check_bool, check_float, check_int, check_tensor
from jepa_blocks.distributed import unwrap_module

__all__ = ["DropPath", "drop_path", "sample_seeded_drop_path", "splitmix64_tensor"]


def _signed(v: int) -> int:
    """A 64-bit unsigned constant as the int64 with the same bits."""
    return v - (1 << 64) if v >= 1 << 63 else v


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_M1 = _signed(0xBF58476D1CE4E5B9)
_M2 = _signed(0x94D049BB133111EB)


def _shr(z: Tensor, k: int) -> Tensor:
    """Logical right shift of int64 bits (torch's ``>>`` is arithmetic)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def splitmix64_tensor(z: Tensor) -> Tensor:
    """One SplitMix64 step on every element of an int64 tensor (bits as unsigned 64-bit).

    The same map as ``jepa_blocks._seeding.splitmix64`` on Python ints, element-wise and on
    the tensor's device.

    Args:
        z: int64 tensor of any shape.

    Returns:
        int64 tensor of the same shape.
    """
    check_tensor("z", z, allow_empty=True)
    if z.dtype != torch.int64:
        raise TypeError(f"z must have dtype torch.int64, got {z.dtype}")
    z = z + _GOLDEN
    z = (z ^ _shr(z, 30)) * _M1
    z = (z ^ _shr(z, 27)) * _M2
    return z ^ _shr(z, 31)


def _row_uniforms(sample_seeds: Tensor, rows: int, salt: int, call: int) -> Tensor:
    """``(rows,)`` float32 uniforms in [0, 1): see the module docstring."""
    per_sample = rows // sample_seeds.shape[0]
    # Row r belongs to sample r // per_sample (rows are sample-major) and is its
    # (r % per_sample)-th row; mix(seed, sub, salt, call) = SplitMix64 chain from 0.
    h = splitmix64_tensor(sample_seeds.repeat_interleave(per_sample))
    sub = torch.arange(per_sample, device=h.device, dtype=torch.int64).repeat(sample_seeds.shape[0])
    h = splitmix64_tensor(h ^ sub)
    h = splitmix64_tensor(h ^ _signed(salt & ((1 << 64) - 1)))
    h = splitmix64_tensor(h ^ call)
    return _shr(h, 40).to(torch.float32) * 2.0**-24


def drop_path(
    x: Tensor,
    *,
    drop_prob: float,
    training: bool = True,
    scale_by_keep: bool = True,
    sample_seeds: Tensor | None = None,
    salt: int = 0,
    call: int = 0,
) -> Tensor:
    """Zero whole rows of ``x`` with probability ``drop_prob`` (stochastic depth).

    Args:
        x: Residual-branch output of shape ``(R, ...)``, one row per sample (or per view of
            a sample, sample-major).
        drop_prob: Probability of dropping a row, in ``[0, 1)``.
        training: Identity when ``False`` (evaluation).
        scale_by_keep: Divide kept rows by ``1 - drop_prob`` (the expectation is kept).
        sample_seeds: Optional int64 seeds of shape ``(B,)`` with ``R`` a multiple of ``B``:
            the keep decision of row ``r`` is then a function of ``sample_seeds[r // (R // B)]``,
            ``r % (R // B)``, ``salt`` and ``call`` only. ``None``: torch's global RNG, as
            timm's ``drop_path``.
        salt: Distinguishes layers that share the seeds (any int).
        call: Distinguishes calls of one layer that share the seeds (``>= 0``).

    Returns:
        Tensor of the shape and dtype of ``x``.

    Example:
        >>> x = torch.ones(4, 3, 8)
        >>> seeds = torch.tensor([11, 12, 13, 14])
        >>> a = drop_path(x, drop_prob=0.5, sample_seeds=seeds)
        >>> b = drop_path(x[2:], drop_prob=0.5, sample_seeds=seeds[2:])
        >>> torch.equal(a[2:], b)  # a sample's draw does not depend on its batch
        True
    """
    check_tensor("x", x, ndim=range(1, 33), allow_empty=True)
    drop_prob = check_float("drop_prob", drop_prob, min_value=0.0, max_value=1.0, max_inclusive=False)
    training = check_bool("training", training)
    scale_by_keep = check_bool("scale_by_keep", scale_by_keep)
    salt = check_int("salt", salt)
    call = check_int("call", call, min_value=0)
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1.0 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    if sample_seeds is None:  # timm's draw, from the global RNG
        mask = x.new_empty(shape).bernoulli_(keep_prob)
    else:
        check_tensor("sample_seeds", sample_seeds, ndim=1)
        if sample_seeds.dtype != torch.int64:
            raise TypeError(f"sample_seeds must have dtype torch.int64, got {sample_seeds.dtype}")
        if x.shape[0] % sample_seeds.shape[0]:
            raise ValueError(
                f"x must have a multiple of len(sample_seeds)={sample_seeds.shape[0]} rows, got shape {tuple(x.shape)}"
            )
        if sample_seeds.device != x.device:
            raise ValueError(f"sample_seeds must be on the device of x ({x.device}), got {sample_seeds.device}")
        u = _row_uniforms(sample_seeds, x.shape[0], salt, call)
        mask = (u >= drop_prob).to(x.dtype).reshape(shape)
    if scale_by_keep:
        mask = mask / keep_prob
    return x * mask


class DropPath(nn.Module):
    """Stochastic depth of a residual branch (drop-in for ``timm.layers.DropPath``).

    Draws from torch's global RNG unless :func:`sample_seeded_drop_path` has given it
    per-sample seeds. No parameters or buffers: ``state_dict`` is empty, as timm's.

    Args:
        drop_prob: Probability of dropping a row, in ``[0, 1)``.
        scale_by_keep: Divide kept rows by ``1 - drop_prob``.

    Shapes:
        x: ``(R, ...)`` -> ``(R, ...)``.

    Example:
        >>> layer = DropPath(drop_prob=0.1)
        >>> layer(torch.randn(4, 10, 32)).shape
        torch.Size([4, 10, 32])
    """

    def __init__(self, drop_prob: float = 0.0, *, scale_by_keep: bool = True) -> None:
        super().__init__()
        self.drop_prob = check_float("drop_prob", drop_prob, min_value=0.0, max_value=1.0, max_inclusive=False)
        self.scale_by_keep = check_bool("scale_by_keep", scale_by_keep)
        self.sample_seeds: Tensor | None = None  # set by sample_seeded_drop_path
        self.salt = 0
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        """Drop rows of ``x`` ``(R, ...)``; returns the same shape."""
        call = self.calls
        if self.sample_seeds is not None and self.training:
            self.calls += 1
        return drop_path(x, drop_prob=self.drop_prob, training=self.training, scale_by_keep=self.scale_by_keep,
                         sample_seeds=self.sample_seeds, salt=self.salt, call=call)

    def extra_repr(self) -> str:
        return f"drop_prob={round(self.drop_prob, 3):0.3f}"


@contextlib.contextmanager
def sample_seeded_drop_path(model: nn.Module, sample_seeds: Tensor) -> Iterator[None]:
    """Within the block, every :class:`DropPath` of ``model`` draws from ``sample_seeds``.

    Each layer's salt is the CRC32 of its qualified name in the unwrapped model (DDP and
    ``torch.compile`` prefixes removed, so the names are the same on one process and on
    many); its call counter starts at 0. Every forward of ``model`` inside the block must
    take rows sample-major over the ``B`` samples of ``sample_seeds`` (``(B * k, ...)``).

    Not for activation checkpointing: a forward recomputed after the block would draw from
    the global RNG.

    Args:
        model: A module holding :class:`DropPath` layers (possibly wrapped).
        sample_seeds: int64 seeds of shape ``(B,)``, one per sample, on the model's device.

    Example:
        >>> block = nn.Sequential(nn.Linear(8, 8), DropPath(drop_prob=0.5))
        >>> seeds = torch.arange(4)
        >>> with sample_seeded_drop_path(block, seeds):
        ...     a = block(torch.ones(4, 8))
        >>> with sample_seeded_drop_path(block, seeds[1:]):
        ...     b = block(torch.ones(3, 8))
        >>> torch.equal(a[1:], b)
        True
    """
    check_tensor("sample_seeds", sample_seeds, ndim=1)
    if sample_seeds.dtype != torch.int64:
        raise TypeError(f"sample_seeds must have dtype torch.int64, got {sample_seeds.dtype}")
    layers = [(name, m) for name, m in unwrap_module(model).named_modules() if isinstance(m, DropPath)]
    for name, layer in layers:
        layer.sample_seeds, layer.salt, layer.calls = sample_seeds, zlib.crc32(name.encode()), 0
    try:
        yield
    finally:
        for _, layer in layers:
            layer.sample_seeds, layer.calls = None, 0
