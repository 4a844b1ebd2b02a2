"""Skip optimizer steps whose loss or gradients are not finite, and stop after too many.

A NaN or Inf loss must not reach the weights: one such ``optimizer.step()`` corrupts the
model, its Adam moments and (through ``EMATarget.update``) the target encoder, and every
later checkpoint with them. :class:`NonFiniteGuard` is the bookkeeping for the usual
remedy: check the loss (and the gradient norm) before stepping, skip the step, zero the
gradients, count the event, and raise :class:`NonFiniteLossError` once ``patience``
consecutive steps were skipped, which means the run diverged rather than hit one bad batch.

Under ``torch.distributed`` every rank must take the same decision (a rank that steps
while another skips leaves the replicas out of sync): :meth:`NonFiniteGuard.check`
all-reduces the flag when a process group is running.

Example (one training step)::

    loss = compute_loss(batch)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
    if guard.check(loss, grad_norm):          # finite: step as usual
        optimizer.step()
        ema.update(model)
    optimizer.zero_grad(set_to_none=True)     # either way
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist

from jepa_blocks._checks import check_int
from jepa_blocks.distributed import is_distributed

__all__ = ["NonFiniteGuard", "NonFiniteLossError"]


class NonFiniteLossError(RuntimeError):
    """Raised by :class:`NonFiniteGuard` after ``patience`` non-finite steps in a row."""


class NonFiniteGuard:
    """Decide whether a step's loss and gradients are finite; count and limit skipped steps.

    Args:
        patience: Raise :class:`NonFiniteLossError` when this many consecutive checks fail
            (``>= 1``).

    Attributes:
        skipped: Total number of skipped steps.
        consecutive: Current run of skipped steps (reset by a finite step).
        last_skipped_step: Value of ``step`` passed with the last failing check, or ``None``.

    Example:
        >>> guard = NonFiniteGuard(patience=2)
        >>> guard.check(torch.tensor(1.0)), guard.check(torch.tensor(float("nan")))
        (True, False)
        >>> guard.skipped, guard.consecutive
        (1, 1)
    """

    def __init__(self, *, patience: int = 5) -> None:
        self.patience = check_int("patience", patience, min_value=1)
        self.skipped = 0
        self.consecutive = 0
        self.last_skipped_step: int | None = None

    def check(self, loss: torch.Tensor, *grad_norms: torch.Tensor | float, step: int | None = None) -> bool:
        """``True`` when ``loss`` and every ``grad_norms`` value are finite (on every rank).

        Args:
            loss: The step's loss, any shape (usually a scalar).
            grad_norms: Optional gradient norms (e.g. the return of ``clip_grad_norm_``).
            step: The optimizer step, recorded for the error message.

        Returns:
            Whether to take the optimizer step. On ``False`` the counters are advanced and,
            after ``patience`` consecutive failures, :class:`NonFiniteLossError` is raised.
        """
        if not isinstance(loss, torch.Tensor):
            raise TypeError(f"loss must be a torch.Tensor, got {type(loss).__name__}")
        if loss.numel() == 0:
            raise ValueError(f"loss must not be empty, got shape {tuple(loss.shape)}")
        if step is not None:
            check_int("step", step)
        values = [loss.detach().float().reshape(-1)]
        for i, g in enumerate(grad_norms):
            if isinstance(g, bool) or not isinstance(g, (torch.Tensor, int, float)):
                raise TypeError(f"grad_norms[{i}] must be a tensor or a float, got {type(g).__name__}")
            values.append(torch.as_tensor(g, dtype=torch.float32, device=loss.device).detach().reshape(-1))
        bad = (~torch.isfinite(torch.cat(values))).any().float().reshape(1)
        if is_distributed():
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item() == 0:
            self.consecutive = 0
            return True
        self.skipped += 1
        self.consecutive += 1
        self.last_skipped_step = step
        if self.consecutive >= self.patience:
            where = f" (last at step {step})" if step is not None else ""
            raise NonFiniteLossError(
                f"stopping: the loss or its gradients were NaN/Inf in {self.consecutive} consecutive steps"
                f"{where}; {self.skipped} steps skipped in total. The weights were not updated by any of "
                "them: lower the learning rate, check the data, or resume from the last checkpoint."
            )
        return False

    def state_dict(self) -> dict[str, int | None]:
        """Counters, for checkpoints."""
        return {"skipped": self.skipped, "consecutive": self.consecutive, "last_skipped_step": self.last_skipped_step}

    def load_state_dict(self, state: dict[str, int | None]) -> None:
        """Restore the counters saved by :meth:`state_dict`."""
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a dict from state_dict(), got {type(state).__name__}")
        missing = sorted({"skipped", "consecutive", "last_skipped_step"} - set(state))
        if missing:
            raise ValueError(f"state is missing keys {missing} (not a NonFiniteGuard state_dict)")
        last = state["last_skipped_step"]
        self.skipped = check_int("state['skipped']", state["skipped"], min_value=0)
        self.consecutive = check_int("state['consecutive']", state["consecutive"], min_value=0)
        self.last_skipped_step = None if last is None else check_int("state['last_skipped_step']", last)

    def __repr__(self) -> str:
        return f"NonFiniteGuard(patience={self.patience}, skipped={self.skipped}, consecutive={self.consecutive})"
