"""Shared pieces of the contrastive losses (NT-Xent, InfoNCE): global rows, global means.

Distributed scheme (``gather_distributed=True`` under an initialised process group):

* the L2-normalised local rows are gathered with
  :func:`jepa_blocks.distributed.gather_with_grad` (unequal local sizes allowed), together
  with one extra column holding the owner's rank; the gathered blocks are rank-ordered,
  so the global index of this rank's first row is the number of gathered rows owned by a
  lower rank (computed on the device, no host synchronisation);
* every rank scores only its *local* anchors against the *global* keys (cost
  ``O(N_local * N_global * D)`` instead of ``O(N_global^2 * D)``) and sums their
  cross-entropies; the sums are all-reduced with a gradient-carrying all-reduce and divided
  by the global number of anchors, so every rank returns the loss of the global batch and
  each rank's input gradient is ``world_size * dL/dx_local`` (the convention of
  :mod:`jepa_blocks.distributed`, turned exact by DDP's averaging).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from jepa_blocks.distributed import all_reduce_with_grad, gather_with_grad, is_distributed

__all__ = ["gather_rows", "global_mean", "sync_grad", "unit_rows"]


def unit_rows(x: Tensor) -> Tensor:
    """Rows divided by their L2 norm (clamped at 1e-12: a zero row stays zero, never NaN)."""
    return F.normalize(x, dim=-1, eps=1e-12)


def gather_rows(x: Tensor, gather: bool) -> tuple[Tensor, Tensor | int]:
    """Rows of the global batch and the global index of this rank's first row.

    Args:
        x: Local rows of shape ``(N_local, C)``.
        gather: Whether to gather over the default process group.

    Returns:
        ``(rows, offset)``: rows of shape ``(N_global, C)`` (``x`` itself without a group
        or with ``gather=False``) and the offset (a long scalar tensor, or ``0``).
    """
    if not (gather and is_distributed()):
        return x, 0
    rank = dist.get_rank()
    # Column C holds the owner's rank (exact in float32 for any realistic world size).
    tagged = torch.cat([x, x.new_full((x.shape[0], 1), float(rank))], dim=1)
    rows = gather_with_grad(tagged)
    offset = (rows[:, -1].detach() < rank).sum()
    return rows[:, :-1], offset


def global_mean(local_sum: Tensor, count: int, gather: bool) -> Tensor:
    """``sum over ranks of local_sum / count``, gradient-carrying; ``count`` is global."""
    if gather and is_distributed():
        local_sum = all_reduce_with_grad(local_sum.reshape(1)).reshape(())
    return local_sum / count


class _SyncGrad(torch.autograd.Function):
    """Identity forward; backward averages the gradient over the ranks."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        return x.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad / dist.get_world_size()


def sync_grad(x: Tensor, gather: bool) -> Tensor:
    """Make the gradient reaching a replicated tensor (a shared temperature) identical on
    every rank and equal to the gradient of the global loss.

    Each rank's local cross-entropy sum depends on its own copy of the temperature, and
    :func:`global_mean` hands every rank ``world_size`` times its share; averaging over
    the ranks in backward leaves exactly ``dL/dx`` on every rank, whether or not the
    owning module is wrapped in DDP (DDP's averaging of equal values changes nothing).
    """
    if not (gather and is_distributed()) or not x.requires_grad:
        return x
    return _SyncGrad.apply(x)
