"""Learning-rate and weight-decay schedules, as used by I-JEPA.

I-JEPA trains with AdamW, a learning rate warmed up linearly from 2e-4 to 1e-3 over 40
epochs and then decayed with a cosine to 1e-6, and a weight decay that rises along a
cosine from 0.04 to 0.4. Biases and 1-D parameters get no weight decay.

Pure functions first (:func:`warmup_cosine`, :func:`cosine_ramp`), then
:class:`OptimizerScheduler`, which writes both schedules into an optimizer's parameter
groups and keeps its step counter in ``state_dict`` so that a resumed run continues
exactly where it stopped. It is a ``torch.optim.lr_scheduler.LRScheduler``, so frameworks
that accept torch's schedulers (Lightning) accept it.

Steps are *optimizer* steps, counted from 0. With gradient accumulation over ``k``
micro-batches there is one optimizer step per ``k`` micro-batches: size ``total_steps``
and ``warmup_steps`` in optimizer steps and call :meth:`OptimizerScheduler.step` once
per ``optimizer.step()``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler

from jepa_blocks._checks import check_float, check_int
from jepa_blocks._ramp import ramp

__all__ = ["warmup_cosine", "cosine_ramp", "OptimizerScheduler"]


def warmup_cosine(
    step: int,
    *,
    total_steps: int,
    warmup_steps: int,
    start_value: float,
    peak_value: float,
    final_value: float,
) -> float:
    """Linear warmup followed by a cosine decay (I-JEPA's learning-rate schedule).

    * ``step < warmup_steps``: ``start + (peak - start) * step / warmup_steps``;
    * ``warmup_steps <= step < total_steps``: with
      ``t = (step - warmup_steps) / (total_steps - warmup_steps)``,
      ``final + (peak - final) * (1 + cos(pi t)) / 2``;
    * ``step >= total_steps``: ``final``.

    So step 0 gives ``start_value`` (or ``peak_value`` when ``warmup_steps == 0``), step
    ``warmup_steps`` gives ``peak_value`` and the value reaches ``final_value`` at
    ``total_steps`` and stays there.

    Args:
        step: Optimizer steps taken so far, ``>= 0``.
        total_steps: Length of the whole schedule (warmup included), ``>= 1``.
        warmup_steps: Length of the linear warmup, in ``[0, total_steps]``.
        start_value: Value at step 0.
        peak_value: Value at the end of the warmup.
        final_value: Value from ``total_steps`` on.

    Returns:
        The value at ``step``, a float.
    """
    step = check_int("step", step, min_value=0)
    total_steps = check_int("total_steps", total_steps, min_value=1)
    warmup_steps = check_int("warmup_steps", warmup_steps, min_value=0)
    if warmup_steps > total_steps:
        raise ValueError(
            f"warmup_steps must be <= total_steps, got warmup_steps={warmup_steps}, "
            f"total_steps={total_steps}"
        )
    start_value = check_float("start_value", start_value)
    peak_value = check_float("peak_value", peak_value)
    final_value = check_float("final_value", final_value)
    if step < warmup_steps:
        return ramp(step, warmup_steps, start_value, peak_value, "linear")
    return ramp(step - warmup_steps, total_steps - warmup_steps, peak_value, final_value, "cosine")


def cosine_ramp(
    step: int,
    *,
    total_steps: int,
    start_value: float,
    final_value: float,
) -> float:
    """Cosine from ``start_value`` to ``final_value`` (I-JEPA's weight-decay schedule).

    With ``t = min(step, total_steps) / total_steps`` the value is
    ``final + (start - final) * (1 + cos(pi t)) / 2``: ``start_value`` at step 0,
    ``final_value`` from ``total_steps`` on, monotone in between. It rises when
    ``final_value > start_value`` (I-JEPA: 0.04 -> 0.4) and falls otherwise.

    Args:
        step: Optimizer steps taken so far, ``>= 0``.
        total_steps: Length of the ramp, ``>= 1``.
        start_value: Value at step 0.
        final_value: Value from ``total_steps`` on.

    Returns:
        The value at ``step``, a float.
    """
    step = check_int("step", step, min_value=0)
    total_steps = check_int("total_steps", total_steps, min_value=1)
    start_value = check_float("start_value", start_value)
    final_value = check_float("final_value", final_value)
    return ramp(step, total_steps, start_value, final_value, "cosine")


def _lr_triple(value: Any) -> tuple[float, float, float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        v = check_float("lr", value, min_value=0.0)
        return v, v, v
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 3:
        raise TypeError(
            f"lr must be a float or a (start, peak, final) triple of floats, got {value!r}"
        )
    names = ("lr[0] (start)", "lr[1] (peak)", "lr[2] (final)")
    start, peak, final = (
        check_float(n, v, min_value=0.0) for n, v in zip(names, value, strict=True)
    )
    return start, peak, final


def _wd_pair(value: Any) -> tuple[float, float] | None:
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        v = check_float("weight_decay", value, min_value=0.0)
        return v, v
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise TypeError(
            f"weight_decay must be None, a float or a (start, final) pair of floats, got {value!r}"
        )
    start = check_float("weight_decay[0] (start)", value[0], min_value=0.0)
    final = check_float("weight_decay[1] (final)", value[1], min_value=0.0)
    return start, final


def _set_hyper(group: dict[str, Any], key: str, value: float) -> None:
    # Fused / capturable optimizers may hold lr as a tensor: update it in place so that
    # captured graphs and the optimizer's own references see the new value.
    current = group.get(key)
    if isinstance(current, torch.Tensor):
        current.fill_(value)
    else:
        group[key] = value


class OptimizerScheduler(LRScheduler):
    """Write a warmup-cosine learning rate and a cosine weight decay into an optimizer.

    A ``torch.optim.lr_scheduler.LRScheduler``, so it drops into code that expects one
    (Lightning's ``configure_optimizers``, ``get_last_lr()``), with the same calling
    convention: the constructor writes the values of step 0 into every parameter group,
    and :meth:`step` is called once **after each** ``optimizer.step()`` (once per
    optimizer step, not per micro-batch when accumulating gradients; Lightning:
    ``"interval": "step"``); it advances the counter (``last_epoch``, also
    :attr:`step_count`) and writes the values of the next step. Past ``total_steps`` the
    final values are kept. Unlike torch's schedulers it also drives the weight decay.

    Per parameter group:

    * ``lr = lr_schedule(step) * group.get("lr_scale", 1.0)`` (``lr_scale`` is the usual
      hook for layer-wise learning-rate decay);
    * ``weight_decay = wd_schedule(step)`` if the group is decayed, else ``0.0``. A group
      is *not* decayed when it carries ``"apply_wd": False`` (as the groups built by
      :func:`~jepa_blocks.training.param_groups.param_groups_for_weight_decay` do) or,
      without that key, when its ``weight_decay`` is 0 when the scheduler is built.
      The decision is stored in the group as ``"apply_wd"`` so that it travels with
      ``optimizer.state_dict()`` and is not re-guessed after a resume.

    ``state_dict()`` holds the step counter only (``{"step": n}``, as before it became an
    ``LRScheduler``; the schedule itself comes from the constructor arguments, so a run
    whose length was refitted keeps the refitted ``total_steps``); after
    ``load_state_dict()`` the scheduler writes the values of the restored step into the
    optimizer, so a resumed run sees exactly the learning rates and weight decays of the
    uninterrupted one.

    Args:
        optimizer: The optimizer whose parameter groups are driven.
        total_steps: Optimizer steps of the whole run, ``>= 1``.
        lr: ``(start, peak, final)`` of :func:`warmup_cosine`, all ``>= 0``, or one float
            for a constant learning rate. I-JEPA: ``(2e-4, 1e-3, 1e-6)``.
        weight_decay: ``(start, final)`` of :func:`cosine_ramp`, one float for a constant
            weight decay, or ``None`` to leave ``weight_decay`` alone. I-JEPA:
            ``(0.04, 0.4)``.
        warmup_steps: Optimizer steps of the linear learning-rate warmup, in
            ``[0, total_steps]``.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = torch.optim.AdamW(
        ...     [{"params": [model.weight]}, {"params": [model.bias], "apply_wd": False}]
        ... )
        >>> sched = OptimizerScheduler(
        ...     opt, total_steps=100, warmup_steps=10, lr=(2e-4, 1e-3, 1e-6),
        ...     weight_decay=(0.04, 0.4),
        ... )
        >>> for _ in range(10):
        ...     opt.step()
        ...     sched.step()
        >>> round(sched.current()["lr"], 6), sched.step_count
        (0.001, 10)
        >>> opt.param_groups[1]["weight_decay"]
        0.0
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        total_steps: int,
        lr: float | Sequence[float],
        weight_decay: float | Sequence[float] | None = None,
        warmup_steps: int = 0,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        self.total_steps = check_int("total_steps", total_steps, min_value=1)
        self.warmup_steps = check_int("warmup_steps", warmup_steps, min_value=0)
        if self.warmup_steps > self.total_steps:
            raise ValueError(
                f"warmup_steps must be <= total_steps, got warmup_steps={self.warmup_steps}, "
                f"total_steps={self.total_steps}"
            )
        self.lr = _lr_triple(lr)
        self.weight_decay = _wd_pair(weight_decay)
        for i, group in enumerate(optimizer.param_groups):
            scale = group.get("lr_scale", 1.0)
            check_float(f"optimizer.param_groups[{i}]['lr_scale']", scale, min_value=0.0)
            if "apply_wd" in group:
                if not isinstance(group["apply_wd"], bool):
                    raise TypeError(
                        f"optimizer.param_groups[{i}]['apply_wd'] must be a bool, "
                        f"got {group['apply_wd']!r}"
                    )
            else:
                group["apply_wd"] = float(group.get("weight_decay", 0.0)) != 0.0
        # LRScheduler sets last_epoch = -1, then calls self.step() once: step 0's values.
        super().__init__(optimizer, last_epoch=-1)

    @property
    def step_count(self) -> int:
        """Optimizer steps taken so far (``last_epoch``); the optimizer holds this step's values."""
        return self.last_epoch

    def lr_at(self, step: int) -> float:
        """Base learning rate (before ``lr_scale``) at optimizer step ``step``."""
        start, peak, final = self.lr
        return warmup_cosine(
            step,
            total_steps=self.total_steps,
            warmup_steps=self.warmup_steps,
            start_value=start,
            peak_value=peak,
            final_value=final,
        )

    def weight_decay_at(self, step: int) -> float | None:
        """Weight decay of decayed groups at ``step``; ``None`` when not scheduled."""
        if self.weight_decay is None:
            return None
        start, final = self.weight_decay
        return cosine_ramp(step, total_steps=self.total_steps, start_value=start, final_value=final)

    def current(self) -> dict[str, float | int | None]:
        """Values for the optimizer step about to be taken, for logging.

        Returns:
            ``{"step": int, "lr": float, "weight_decay": float | None}`` with the base
            learning rate (before any ``lr_scale``) and the weight decay of decayed groups.
        """
        return {
            "step": self.last_epoch,
            "lr": self.lr_at(self.last_epoch),
            "weight_decay": self.weight_decay_at(self.last_epoch),
        }

    def get_lr(self) -> list[float]:
        """Learning rate of every parameter group at the current step (``lr_scale`` applied).

        Returns:
            One float per parameter group. The values last written into the optimizer
            are :meth:`get_last_lr`.
        """
        lr = self.lr_at(max(self.last_epoch, 0))
        return [lr * float(group.get("lr_scale", 1.0)) for group in self.optimizer.param_groups]

    def step(self, epoch: int | None = None) -> None:
        """Advance by one optimizer step and write that step's values into the optimizer.

        Call once after every ``optimizer.step()``.

        Args:
            epoch: Not supported (torch deprecated it); must be ``None``. To jump to a
                step use ``load_state_dict({"step": n})``.
        """
        if epoch is not None:
            raise TypeError(
                f"epoch must be None (OptimizerScheduler.step() advances by one optimizer "
                f"step; use load_state_dict({{'step': n}}) to jump), got {epoch!r}"
            )
        self._step_count = getattr(self, "_step_count", 0) + 1  # LRScheduler's bookkeeping
        self.last_epoch += 1
        self._apply()

    def _apply(self) -> None:
        lr = self.lr_at(self.last_epoch)
        wd = self.weight_decay_at(self.last_epoch)
        for group in self.optimizer.param_groups:
            _set_hyper(group, "lr", lr * float(group.get("lr_scale", 1.0)))
            if wd is not None:
                # Groups added after construction without a flag: decide as at construction.
                apply_wd = group.setdefault(
                    "apply_wd", float(group.get("weight_decay", 0.0)) != 0.0
                )
                _set_hyper(group, "weight_decay", wd if apply_wd else 0.0)
        # get_last_lr(): copies, as torch's schedulers return them.
        self._last_lr = [
            g["lr"].clone() if isinstance(g["lr"], torch.Tensor) else g["lr"]
            for g in self.optimizer.param_groups
        ]

    def state_dict(self) -> dict[str, int]:
        """The step counter (the schedule itself comes from the constructor arguments)."""
        return {"step": self.last_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the step counter and write that step's values into the optimizer.

        Args:
            state_dict: A dict returned by :meth:`state_dict`.
        """
        if not isinstance(state_dict, dict) or "step" not in state_dict:
            raise ValueError(f"state_dict must be a dict with a 'step' entry, got {state_dict!r}")
        step = state_dict["step"]
        if isinstance(step, torch.Tensor) and step.numel() == 1:
            step = int(step.item())
        self.last_epoch = check_int("state_dict['step']", step, min_value=0)
        self._apply()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(total_steps={self.total_steps}, "
            f"warmup_steps={self.warmup_steps}, lr={self.lr}, "
            f"weight_decay={self.weight_decay}, step={self.last_epoch})"
        )
