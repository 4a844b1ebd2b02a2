"""Exponential-moving-average (EMA) target encoder, as in BYOL, I-JEPA and V-JEPA.

After every optimizer step the target weights move towards the online weights:
``target = m * target + (1 - m) * online``. I-JEPA ramps the momentum ``m`` linearly
from 0.996 to 1.0 over the whole run; its first update uses 0.996 and only parameters
are averaged. We also copy buffers (e.g. BatchNorm running statistics), which I-JEPA's
ViT does not have.

Pure functions first (:func:`momentum_schedule`, :func:`ema_update_`), then
:class:`EMATarget`, a module that owns a frozen copy of the online encoder and keeps its
schedule position in ``state_dict``.

Non-finite weights: a NaN or Inf averaged into the target never leaves it (``m * NaN``
stays NaN), and the target is what a run's non-finite-step guard must keep clean. So
:meth:`EMATarget.update` refuses online parameters or floating buffers holding NaN/Inf:
it raises ``ValueError`` naming the online tensor and leaves the target (weights,
buffers, step count) unchanged. The check is one fused norm over the online tensors
(``torch._foreach_norm``, one read of the weights: about a third of the memory traffic
of the update's own ``lerp``) and one host sync per weight update, right after
``optimizer.step()``, where a training loop typically syncs anyway (loss logging, the
non-finite guard). It is on whatever the value-check setting (skipped only while tracing
or capturing a CUDA graph); ``check_finite=False`` turns it off. :func:`ema_update_`, the
bare kernel, does not check.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from jepa_blocks._checks import (
    _is_tracing,
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_pair,
    has_data,
)
from jepa_blocks._ramp import ramp
from jepa_blocks.distributed import module_wrappers, unwrap_module

__all__ = ["momentum_schedule", "ema_update_", "EMATarget"]

_SCHEDULES = ("linear", "cosine")


def momentum_schedule(
    step: int,
    *,
    total_steps: int,
    start: float = 0.996,
    end: float = 1.0,
    schedule: Literal["linear", "cosine"] = "linear",
) -> float:
    """EMA momentum at optimizer step ``step`` (0-based).

    With ``t = min(step, total_steps) / total_steps``:

    * ``'linear'``: ``start + (end - start) * t`` (I-JEPA);
    * ``'cosine'``: ``end - (end - start) * (cos(pi * t) + 1) / 2`` (BYOL).

    Both give ``start`` at step 0 (the first update) and ``end`` from ``total_steps`` on;
    ``'cosine'`` is the ramp of :func:`~jepa_blocks.training.schedules.cosine_ramp`.

    Args:
        step: Number of optimizer steps taken before this update, ``>= 0``.
        total_steps: Length of the ramp, ``>= 1``.
        start: Momentum at step 0, in ``[0, 1]``.
        end: Momentum from ``total_steps`` on, in ``[start, 1]``.
        schedule: Shape of the ramp.

    Returns:
        The momentum, a float in ``[start, end]``, non-decreasing in ``step``.
    """
    step = check_int("step", step, min_value=0)
    total_steps = check_int("total_steps", total_steps, min_value=1)
    start = check_float("start", start, min_value=0.0, max_value=1.0)
    end = check_float("end", end, min_value=0.0, max_value=1.0)
    if start > end:
        raise ValueError(f"start must be <= end, got start={start}, end={end}")
    schedule = check_choice("schedule", schedule, _SCHEDULES)
    return ramp(step, total_steps, start, end, schedule)


def _lerp_params(targets: list[torch.Tensor], onlines: list[torch.Tensor], weight: float) -> None:
    """``target += weight * (online - target)`` per pair; inputs already checked."""
    fast: dict[tuple[torch.device, torch.dtype], tuple[list[torch.Tensor], list[torch.Tensor]]]
    fast = {}
    for t, o in zip(targets, onlines, strict=True):
        if not t.is_floating_point():
            t.copy_(o)  # integer "parameters" cannot be averaged: follow online.
        elif t.device == o.device and t.dtype == o.dtype:
            group = fast.setdefault((t.device, t.dtype), ([], []))
            group[0].append(t)
            group[1].append(o)
        else:  # different device or dtype (e.g. an fp32 EMA of a bf16 model): one at a time.
            t.lerp_(o.to(device=t.device, dtype=t.dtype), weight)
    for ts, os_ in fast.values():
        if hasattr(torch, "_foreach_lerp_"):
            torch._foreach_lerp_(ts, os_, weight)
        else:  # pragma: no cover - very old torch
            for t, o in zip(ts, os_, strict=True):
                t.lerp_(o, weight)


@torch.no_grad()
def ema_update_(
    target_params: Sequence[torch.Tensor],
    online_params: Sequence[torch.Tensor],
    momentum: float,
) -> None:
    """In place ``target = momentum * target + (1 - momentum) * online``, without autograd.

    Computed as ``target.lerp_(online, 1 - momentum)`` (``torch._foreach_lerp_`` per
    device/dtype group, a loop for pairs whose device or dtype differ). ``momentum = 1``
    leaves the targets untouched; ``momentum = 0`` copies the online values.

    Args:
        target_params: Tensors updated in place, each of any shape ``(*S_i)``.
        online_params: Tensors of the same shapes ``(*S_i)``, in the same order.
        momentum: Weight of the old target value, in ``[0, 1]``.
    """
    for name, seq in (("target_params", target_params), ("online_params", online_params)):
        if isinstance(seq, torch.Tensor) or not isinstance(seq, Sequence):
            raise TypeError(f"{name} must be a sequence of tensors, got {type(seq).__name__}")
        for i, p in enumerate(seq):
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(p).__name__}")
    if len(target_params) != len(online_params):
        raise ValueError(
            f"online_params must have as many tensors as target_params ({len(target_params)}), "
            f"got {len(online_params)}"
        )
    for i, (t, o) in enumerate(zip(target_params, online_params, strict=True)):
        if t.shape != o.shape:
            raise ValueError(
                f"online_params[{i}] must have the shape of target_params[{i}] "
                f"{tuple(t.shape)}, got {tuple(o.shape)}"
            )
    momentum = check_float("momentum", momentum, min_value=0.0, max_value=1.0)
    if momentum == 1.0:
        return
    _lerp_params(list(target_params), list(online_params), 1.0 - momentum)


def _full(t: torch.Tensor) -> torch.Tensor:
    """The global value of a DTensor (FSDP2 shards), else ``t`` itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _first_nonfinite(named: list[tuple[str, torch.Tensor]]) -> str | None:
    """Name of the first floating tensor of ``named`` holding NaN or Inf, else ``None``.

    Fast path: one fused 2-norm per (device, dtype) group (``torch._foreach_norm``; NaN
    and Inf propagate into the norm) and one host sync for all groups together. A norm
    that is not finite (a NaN/Inf entry, or finite entries so large that the norm
    overflows) is then confirmed exactly with ``isfinite(t).all()``, one tensor at a time.
    """
    groups: dict[tuple[torch.device, torch.dtype], list[tuple[str, torch.Tensor]]] = {}
    for name, t in named:
        if (t.is_floating_point() or t.is_complex()) and t.numel() and has_data(t):
            groups.setdefault((t.device, t.dtype), []).append((name, t.detach()))
    if not groups:
        return None
    order: list[tuple[str, torch.Tensor]] = []
    flags: list[torch.Tensor] = []
    device = next(iter(groups))[0]
    for (_, dtype), items in groups.items():
        tensors = [t for _, t in items]
        # Half-precision norms overflow early (fp16: 65504): accumulate them in float32.
        acc = torch.float32 if dtype in (torch.float16, torch.bfloat16) else None
        try:
            norms = torch._foreach_norm(tensors, dtype=acc)
        except (AttributeError, TypeError, RuntimeError):  # pragma: no cover - older torch
            norms = [torch.linalg.vector_norm(t, dtype=acc) for t in tensors]
        # FSDP2 shards are DTensors: their norms are global only after full_tensor() (a
        # collective, so every rank reaches the same verdict).
        norms = [_full(n) for n in norms]
        flags.append(torch.isfinite(torch.stack(norms)).to(device))
        order += items
    finite = torch.cat(flags).tolist()  # the one host sync
    for (name, t), quick in zip(order, finite, strict=True):
        if not quick and not bool(_full(torch.isfinite(t).all())):
            return name
    return None


def _ddp_buffer_group(online: nn.Module) -> Any | None:
    """Process group of a buffer-broadcasting DDP wrapper around ``online``, else ``None``."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    from torch.nn.parallel import DistributedDataParallel

    ddp = [w for w in module_wrappers(online) if isinstance(w, DistributedDataParallel)]
    if not ddp or not ddp[0].broadcast_buffers or dist.get_world_size(ddp[0].process_group) < 2:
        return None
    return ddp[0].process_group


def _broadcast_from_first_rank(tensors: list[torch.Tensor], group: Any) -> None:
    """Overwrite ``tensors`` with rank 0's values of ``group``: one broadcast per dtype/device."""
    src = dist.get_global_rank(group, 0)
    by_kind: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for t in tensors:
        by_kind.setdefault((t.device, t.dtype), []).append(t)
    for ts in by_kind.values():
        flat = torch.cat([t.reshape(-1) for t in ts])
        dist.broadcast(flat, src=src, group=group)
        for t, part in zip(ts, flat.split([t.numel() for t in ts]), strict=True):
            t.copy_(part.view_as(t))


def _match(
    kind: str, target: list[tuple[str, torch.Tensor]], online: list[tuple[str, torch.Tensor]]
) -> list[torch.Tensor]:
    """Online tensors in the target's order; ``ValueError`` naming ``online`` on mismatch."""
    online_by_name = dict(online)
    target_names = [n for n, _ in target]
    if len(online_by_name) != len(target) or any(n not in online_by_name for n in target_names):
        missing = sorted(set(target_names) - set(online_by_name))
        unexpected = sorted(set(online_by_name) - set(target_names))
        raise ValueError(
            f"online must have the same {kind} names as the EMA copy: "
            f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
        )
    out = []
    for name, t in target:
        o = online_by_name[name]
        if o.shape != t.shape:
            raise ValueError(
                f"online {kind} {name!r} must have shape {tuple(t.shape)} like the EMA copy, "
                f"got {tuple(o.shape)}"
            )
        out.append(o)
    return out


class EMATarget(nn.Module):
    """Frozen EMA copy of an online encoder, updated after each optimizer step.

    The module owns a deep copy of ``online`` (``self.module``) whose parameters have
    ``requires_grad=False`` and whose forward runs under ``torch.no_grad()``. Call
    :meth:`update` right after ``optimizer.step()``: each call counts one optimizer step
    and, every ``update_every`` calls, moves the copy's parameters towards the online
    ones with the scheduled momentum and copies the online buffers (BatchNorm running
    statistics and the like).

    The number of steps taken is the persistent buffer ``num_steps``, so ``state_dict()``
    / ``load_state_dict()`` restore the schedule position together with the weights.

    Eval mode, always: the copy runs without dropout or drop-path and with the BatchNorm
    running statistics copied from ``online``, whatever the mode of the EMATarget or of a
    parent module (``.train()`` sets ``self.training`` but leaves the copy in eval mode).
    Regression targets are then a deterministic function of the weights.

    ``update_every = k``: the update on the ``k``-th, ``2k``-th, ... call (optimizer step
    ``s = k - 1, 2k - 1, ...``, 0-based) uses the plain schedule value ``m(s)``. With
    ``compensate=True`` it uses ``m(s) ** k`` instead, so that one update every ``k``
    steps decays the old target like ``k`` per-step updates would.

    Args:
        online: The online (context) encoder. DDP / DataParallel / ``torch.compile``
            wrappers are unwrapped before copying
            (:func:`~jepa_blocks.distributed.unwrap_module`). The copy keeps its device
            and dtype; ``.to()`` on the EMATarget moves it as usual.
        total_steps: Number of optimizer steps over which the momentum ramps, ``>= 1``.
        momentum: ``(start, end)`` with ``0 <= start <= end <= 1``, or one float for a
            constant momentum.
        schedule: Ramp shape, see :func:`momentum_schedule`.
        update_every: Update the weights every this many :meth:`update` calls, ``>= 1``.
        compensate: Use ``m ** update_every`` per update instead of ``m``.
        check_finite: Refuse online weights holding NaN/Inf in :meth:`update` (see the
            module docstring: one fused reduction and one host sync per weight update).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> online = nn.Linear(4, 3)
        >>> ema = EMATarget(online, total_steps=100)
        >>> ema.momentum
        0.996
        >>> ema(torch.randn(2, 4)).requires_grad
        False
        >>> ema.update(online)  # after optimizer.step()
        >>> ema.step, ema.momentum
        (1, 0.99604)
    """

    num_steps: torch.Tensor

    def __init__(
        self,
        online: nn.Module,
        *,
        total_steps: int,
        momentum: float | tuple[float, float] = (0.996, 1.0),
        schedule: Literal["linear", "cosine"] = "linear",
        update_every: int = 1,
        compensate: bool = False,
        check_finite: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(online, nn.Module):
            raise TypeError(f"online must be a torch.nn.Module, got {type(online).__name__}")
        self.total_steps = check_int("total_steps", total_steps, min_value=1)
        if isinstance(momentum, (int, float)) and not isinstance(momentum, bool):
            m = check_float("momentum", momentum, min_value=0.0, max_value=1.0)
            momentum = (m, m)
        self.start, self.end = check_pair("momentum", momentum, min_value=0.0, max_value=1.0)
        self.schedule = check_choice("schedule", schedule, _SCHEDULES)
        self.update_every = check_int("update_every", update_every, min_value=1)
        self.compensate = check_bool("compensate", compensate)
        self.check_finite = check_bool("check_finite", check_finite)

        online = unwrap_module(online)
        self.module = copy.deepcopy(online)
        for p in self.module.parameters():
            p.requires_grad_(False)
            p.grad = None
        self.register_buffer("num_steps", torch.zeros((), dtype=torch.long))
        # Host mirror of ``num_steps`` so that update() needs no device sync; re-read from
        # the buffer after load_state_dict() (see _load_from_state_dict).
        self._host_step: int | None = 0
        self.train(online.training)

    def train(self, mode: bool = True) -> EMATarget:
        """Set ``self.training``; the EMA copy itself always stays in eval mode."""
        super().train(mode)
        self.module.eval()
        return self

    @property
    def step(self) -> int:
        """Optimizer steps counted so far (calls to :meth:`update`)."""
        if self._host_step is None:
            self._host_step = int(self.num_steps.item())
        return self._host_step

    def _momentum_at(self, step: int) -> float:
        m = momentum_schedule(
            step,
            total_steps=self.total_steps,
            start=self.start,
            end=self.end,
            schedule=self.schedule,
        )
        return m**self.update_every if self.compensate else m

    @property
    def momentum(self) -> float:
        """Momentum that the next weight update (not necessarily the next call) will use."""
        k = self.update_every
        next_update_step = self.step + (-(self.step + 1)) % k  # smallest s >= step, (s+1) % k == 0
        return self._momentum_at(next_update_step)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the EMA copy under ``torch.no_grad()``; same inputs/outputs as ``online``."""
        with torch.no_grad():
            return self.module(*args, **kwargs)

    @torch.no_grad()
    def update(self, online: nn.Module) -> None:
        """Count one optimizer step; every ``update_every`` calls, move towards ``online``.

        Under DDP, pass the DDP-wrapped module and call this on every rank: each rank's
        forward updates its own buffers (e.g. BatchNorm statistics of its local batch), so
        when ``online`` is a ``DistributedDataParallel`` with ``broadcast_buffers=True``
        (the default) the copied buffers are then broadcast from rank 0 of its process
        group, as DDP itself does before each forward (a collective; parameters need none,
        DDP keeps them identical). The EMA copy then stays bitwise identical on every
        rank. Build the EMATarget from the DDP-wrapped module (or from identically seeded
        models), so that the copies start identical too.

        A weight update refuses online parameters (or floating buffers) holding NaN or
        Inf: it raises ``ValueError`` naming the tensor and changes nothing, the step
        count included (unless ``check_finite=False``; see the module docstring for the
        cost). Skip the call for a step the non-finite guard skipped.

        Args:
            online: The online encoder (possibly DDP / ``torch.compile`` wrapped) with the
                same parameter and buffer names and shapes as the copy.
        """
        if not isinstance(online, nn.Module):
            raise TypeError(f"online must be a torch.nn.Module, got {type(online).__name__}")
        sync_group = _ddp_buffer_group(online)
        online = unwrap_module(online)
        target_params = list(self.module.named_parameters())
        online_params = _match("parameter", target_params, list(online.named_parameters()))
        target_buffers = list(self.module.named_buffers())
        online_buffers = _match("buffer", target_buffers, list(online.named_buffers()))

        step = self.step
        if (step + 1) % self.update_every == 0:
            m = self._momentum_at(step)
            if self.check_finite and not _is_tracing():
                names = [f"online parameter {n!r}" for n, _ in target_params] if m != 1.0 else []
                names += [f"online buffer {n!r}" for n, _ in target_buffers]
                values = (online_params if m != 1.0 else []) + online_buffers
                bad = _first_nonfinite(list(zip(names, values, strict=True)))
                if sync_group is not None and target_buffers:
                    # Buffers differ per rank: decide together, or a healthy rank would
                    # wait forever in the broadcast below while the other one raised.
                    flag = torch.tensor([bad is not None], device=target_buffers[0][1].device)
                    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=sync_group)
                    if bool(flag.item()) and bad is None:
                        bad = "the online weights of another rank"
                if bad is not None:
                    raise ValueError(
                        f"online must hold finite weights to update the EMA target, got NaN or "
                        f"Inf in {bad}; the target is left unchanged (skip the update after a "
                        "non-finite optimizer step, or restore the online weights)"
                    )
            if m != 1.0:
                _lerp_params([t for _, t in target_params], online_params, 1.0 - m)
            for (_, t), o in zip(target_buffers, online_buffers, strict=True):
                t.copy_(o)
            if sync_group is not None and target_buffers:
                # Under DDP each rank's forward updates its own buffers (BatchNorm statistics
                # of its local batch) and DDP re-broadcasts rank 0's at the next forward:
                # take rank 0's too, so that the targets stay identical on every rank.
                _broadcast_from_first_rank([t for _, t in target_buffers], sync_group)
        self.num_steps.add_(1)
        self._host_step = step + 1

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._host_step = None  # num_steps may have changed: re-read it on next use.

    def extra_repr(self) -> str:
        return (
            f"total_steps={self.total_steps}, momentum=({self.start}, {self.end}), "
            f"schedule={self.schedule!r}, update_every={self.update_every}, "
            f"compensate={self.compensate}, check_finite={self.check_finite}"
        )
