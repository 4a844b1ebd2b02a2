"""Collectives that carry gradients, for losses computed on the global batch, and the
unwrapping of DDP / FSDP / ``torch.compile`` wrappers.

Every collective works on the default process group and degrades to the identity when
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
from torch import Tensor, nn

from jepa_blocks._checks import check_tensor

__all__ = [
    "all_reduce_with_grad",
    "gather_with_grad",
    "is_distributed",
    "module_wrappers",
    "unwrap_module",
    "world_size",
]

# Attributes in which a wrapper holds the real module: DDP / DataParallel (``module``),
# ``torch.compile``'s OptimizedModule (``_orig_mod``) and FSDP (``_fsdp_wrapped_module``).
_WRAPPER_ATTRS = ("module", "_orig_mod", "_fsdp_wrapped_module")


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


class _AllReduceSumWithGrad(torch.autograd.Function):
    """Sum all-reduce whose backward is again a sum all-reduce of the incoming gradients.

    Low-precision floats (bf16, fp16) are summed in float32 and the sum is cast back, in
    both directions, so the result does not depend on the ranks' summation order more
    than one rounding to the input dtype.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        return _sum_over_ranks(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        return _sum_over_ranks(grad)


def _sum_over_ranks(x: Tensor) -> Tensor:
    """A new tensor: ``x`` summed over the default group (in float32 for bf16 / fp16)."""
    wide = x.dtype in (torch.bfloat16, torch.float16)
    out = x.detach().to(torch.float32 if wide else x.dtype, memory_format=torch.contiguous_format, copy=True)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(x.dtype) if wide else out


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

    A small ``autograd.Function`` over ``torch.distributed.all_reduce`` (whose backward is
    again a sum all-reduce), giving the same ``world_size * dL/dx_local`` convention as
    :func:`gather_with_grad`. (It replaces the deprecated
    ``torch.distributed.nn.functional.all_reduce``, which warns on every rank; the
    replacement that warning names, ``torch.distributed._functional_collectives``, is
    private, and its autograd support depends on the torch version.) bf16 and fp16 inputs are summed in
    float32 and cast back, in the forward and the backward.

    Args:
        x: Tensor of any shape, the same on every rank.

    Returns:
        The element-wise sum over ranks, same shape as ``x``; ``x`` itself without an
        initialised process group or with one process.
    """
    check_tensor("x", x, allow_empty=True)
    if not is_distributed():
        return x
    return _AllReduceSumWithGrad.apply(x)


def _inner(module: nn.Module) -> nn.Module | None:
    """The module that ``module`` wraps, or ``None`` if it is no wrapper (see below)."""
    names = [n for n, _ in module.named_parameters()] + [n for n, _ in module.named_buffers()]
    for attr in _WRAPPER_ATTRS:
        inner = getattr(module, attr, None)
        if (
            isinstance(inner, nn.Module)
            and inner is not module
            and all(n.startswith(attr + ".") for n in names)
        ):
            return inner
    return None


def _chain(module: nn.Module) -> list[nn.Module]:
    """``[module, ..., real model]``: each entry wraps the next."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    chain = [module]
    while (inner := _inner(chain[-1])) is not None:
        chain.append(inner)
    return chain


def module_wrappers(module: nn.Module) -> list[nn.Module]:
    """The wrappers around the real model, outermost first (empty for a plain module).

    A wrapper is recognised by duck typing: it holds the wrapped module in ``module``
    (DDP, DataParallel), ``_orig_mod`` (``torch.compile``'s OptimizedModule) or
    ``_fsdp_wrapped_module`` (FSDP), and has no parameters or buffers of its own besides
    that child's. Any other module ends the chain.

    Args:
        module: A module, possibly wrapped several times (e.g. ``torch.compile(DDP(m))``).

    Returns:
        The wrappers from ``module`` inwards; the real model is not included.
    """
    return _chain(module)[:-1]


def unwrap_module(module: nn.Module) -> nn.Module:
    """The real model inside DDP / DataParallel, FSDP and ``torch.compile`` wrappers.

    Strips every wrapper of :func:`module_wrappers`, in any nesting; a plain module is
    returned unchanged. Its ``state_dict`` has the model's own keys (no ``module.`` or
    ``_orig_mod.`` prefix). Under FSDP (``FullyShardedDataParallel``) the unwrapped
    module holds this rank's shards: use FSDP's own state-dict API for checkpoints. A
    module sharded in place by ``fully_shard`` (FSDP2) is no wrapper and comes back as is.

    Args:
        module: A module, possibly wrapped.

    Returns:
        The innermost module.

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> unwrap_module(torch.compile(model)) is model
        True
    """
    return _chain(module)[-1]
