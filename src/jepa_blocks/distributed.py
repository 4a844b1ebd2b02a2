"""Collectives that carry gradients, for losses computed on the global batch.

Every function works on the default process group and degrades to the identity when
``torch.distributed`` is unavailable, not initialised, or has a single process, so a loss
can call them unconditionally.

Gradient convention
-------------------
Under DDP every rank computes the *same* global loss ``L`` from the gathered (or
all-reduced) tensors. The backward of :func:`gather_with_grad` and
:func:`all_reduce_with_grad` sums the incoming gradients over the ranks, so rank ``r``
receives::

    grad(x_r) = sum over ranks s of dL_s / dx_r = world_size * dL / dx_r

i.e. ``world_size`` times the gradient of the global loss with respect to its local
input. DDP then *averages* parameter gradients over the ranks, which divides that factor
away: the parameters get exactly the gradient a single process would compute on the
concatenated global batch. (Returning only this rank's slice without the sum, as some
implementations do, leaves the gradients ``1 / world_size`` too small, e.g. lightly
issue 1920.) Do not rescale the loss by ``world_size`` on top of this.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from jepa_blocks._checks import check_tensor

__all__ = ["all_reduce_with_grad", "gather_with_grad", "is_distributed", "world_size"]


def is_distributed() -> bool:
    """Whether a default process group with more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of processes in the default group, ``1`` without ``torch.distributed``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 with unequal sizes; backward sums grads, returns own slice."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        ws = dist.get_world_size()
        rank = dist.get_rank()
        # 1. Exchange full shapes so unequal batch sizes can be padded and trimmed, and
        #    mismatched trailing shapes fail loudly instead of corrupting the gather.
        shape = torch.tensor(x.shape, dtype=torch.long, device=x.device)
        shapes = [torch.empty_like(shape) for _ in range(ws)]
        dist.all_gather(shapes, shape)
        shapes_list = [tuple(int(v) for v in s.tolist()) for s in shapes]
        trailing = {s[1:] for s in shapes_list}
        if len(trailing) != 1:
            raise ValueError(
                "gather_with_grad needs the same shape apart from dim 0 on every rank, "
                f"got shapes {shapes_list}"
            )
        sizes = [s[0] for s in shapes_list]
        max_size = max(sizes)
        # 2. Pad to the largest local batch, gather, then trim each rank's block.
        xc = x.contiguous()
        if xc.shape[0] < max_size:
            pad = xc.new_zeros((max_size - xc.shape[0], *xc.shape[1:]))
            xc = torch.cat([xc, pad], dim=0)
        blocks = [torch.empty_like(xc) for _ in range(ws)]
        dist.all_gather(blocks, xc)
        ctx.sizes = sizes
        ctx.rank = rank
        return torch.cat([b[:n] for b, n in zip(blocks, sizes, strict=True)], dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]]


def gather_with_grad(x: Tensor) -> Tensor:
    """All-gather ``x`` along dim 0 over the default process group, keeping gradients.

    Local batch sizes may differ between ranks (sizes are exchanged first, blocks are
    padded to the largest one for the collective, then trimmed). The result is the rank-
    ordered concatenation and is identical on every rank.

    Backward all-reduces (sums) the incoming gradient and returns this rank's slice, so
    with the same global loss on every rank each rank's input gradient is
    ``world_size * dL/dx_local``; DDP's gradient averaging turns that into the exact
    single-process gradient (see the module docstring).

    Args:
        x: Local tensor of shape ``(N_local, ...)``; trailing shape and dtype must be the
            same on every rank.

    Returns:
        Tensor of shape ``(N_global, ...)`` with ``N_global = sum of N_local``. Without an
        initialised process group, or with one process, ``x`` itself.
    """
    check_tensor("x", x, ndim=range(1, 33), allow_empty=True)
    if not is_distributed():
        return x
    return _GatherWithGrad.apply(x)


def all_reduce_with_grad(x: Tensor) -> Tensor:
    """Sum ``x`` over the default process group, keeping gradients.

    Uses ``torch.distributed.nn.functional.all_reduce`` (whose backward is again a sum
    all-reduce), giving the same ``world_size * dL/dx_local`` convention as
    :func:`gather_with_grad`.

    Args:
        x: Tensor of any shape, the same on every rank.

    Returns:
        The element-wise sum over ranks, same shape as ``x``; ``x`` itself without an
        initialised process group or with one process.
    """
    check_tensor("x", x, allow_empty=True)
    if not is_distributed():
        return x
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(x, op=dist.ReduceOp.SUM)
