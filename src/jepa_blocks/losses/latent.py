"""Latent prediction loss of (hierarchical) JEPA: predictor output vs target features.

For each level ``l`` the predictor output and the target features hold ``K`` token slots
per index list, some of them padding (see :mod:`jepa_blocks.masking.indices`)::

    target_l = layer_norm(target_l)                  over D, no affine (optional, I-JEPA)
    e        = elementwise loss(prediction_l, target_l), averaged over D     (..., K)
    loss_l   = mean of e over the valid token slots only (0 if there are none)
    total    = sum_l level_weights[l] * loss_l

I-JEPA's code uses smooth-L1 with beta 1 (the paper says L2); V-JEPA uses L1.

Padded slots are replaced by zeros *before* the elementwise loss, so whatever they hold
(even NaN) changes neither the value nor the gradient, and their prediction gradient is
exactly zero. The loss does not detach the targets: gradient flow into the target branch
is the caller's choice (an EMA target encoder run under ``torch.no_grad()`` has none).
Computed in float32 (float64 stays float64) with autocast disabled. NaN or Inf in a
*valid* slot raises ``ValueError`` (a value check).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from jepa_blocks._checks import (
    check_bool,
    check_choice,
    check_float,
    check_same_device,
    check_tensor,
    sum_is_finite,
    value_checks_enabled,
)
from jepa_blocks._precision import compute_dtype, full_precision
from jepa_blocks.distributed import all_reduce_with_grad, is_distributed
from jepa_blocks.losses.output import LossModule, LossOutput

__all__ = ["LatentPredictionLoss", "LossType", "latent_prediction_loss"]

LossType = Literal["smooth_l1", "l1", "l2"]
_LOSS_TYPES = ("smooth_l1", "l1", "l2")


def _as_list(name: str, value: Tensor | Sequence[Tensor]) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(
            f"{name} must be a Tensor or a sequence of Tensors, got {type(value).__name__}"
        )
    if len(value) == 0:
        raise ValueError(f"{name} must hold at least one level, got an empty sequence")
    return list(value)


def _check_weights(level_weights: Sequence[float], num_levels: int | None) -> tuple[float, ...]:
    if isinstance(level_weights, (str, bytes)) or not isinstance(level_weights, Sequence):
        raise TypeError(
            f"level_weights must be a sequence of floats, got {type(level_weights).__name__}"
        )
    if len(level_weights) == 0:
        raise ValueError("level_weights must not be empty")
    weights = tuple(
        check_float(f"level_weights[{i}]", w, min_value=0.0) for i, w in enumerate(level_weights)
    )
    if num_levels is not None and len(weights) < num_levels:
        raise ValueError(
            f"level_weights must have at least {num_levels} entries (one per level), "
            f"got {len(weights)}"
        )
    return weights


def _check_finite_slots(
    preds: list[Tensor], targs: list[Tensor], valids: list[Tensor | None]
) -> None:
    """Raise if a *valid* slot of a prediction or target holds NaN/Inf (padding may).

    A value check: one host sync for all levels.
    """
    if not value_checks_enabled():
        return

    def finite_slots(x: Tensor, v: Tensor | None, exact: bool) -> Tensor:
        # Fast: per-slot feature sums (finite sum => finite entries); exact: isfinite.
        ok = torch.isfinite(x).all(dim=-1) if exact else sum_is_finite(x, dim=-1)  # (..., K)
        return ok.all() if v is None else (ok | ~v.to(ok.device)).all()

    named = [
        (name, x, v)
        for lvl, (p, t, v) in enumerate(zip(preds, targs, valids, strict=True))
        for name, x in ((f"predictions[{lvl}]", p), (f"targets[{lvl}]", t))
    ]
    device = preds[0].device
    quick = torch.stack([finite_slots(x, v, False).to(device) for _, x, v in named]).tolist()
    for (name, x, v), good in zip(named, quick, strict=True):
        if not good and not bool(finite_slots(x, v, True)):
            raise ValueError(f"{name} must be finite in its valid slots, got NaN or Inf values")


def _elementwise(pred: Tensor, target: Tensor, loss_type: str, beta: float) -> Tensor:
    if loss_type == "smooth_l1":
        return F.smooth_l1_loss(pred, target, reduction="none", beta=beta)
    if loss_type == "l1":
        return F.l1_loss(pred, target, reduction="none")
    return F.mse_loss(pred, target, reduction="none")


def _level_loss(
    pred: Tensor,
    target: Tensor,
    valid: Tensor | None,
    *,
    loss_type: str,
    beta: float,
    normalize_targets: bool,
) -> tuple[Tensor, Tensor]:
    """Sum of the per-token losses over the valid slots, and the number of valid slots."""
    dtype = compute_dtype(pred, target)
    pred, target = pred.to(dtype), target.to(dtype)
    if valid is not None:
        keep = valid.unsqueeze(-1)
        pred = torch.where(keep, pred, 0.0)
        target = torch.where(keep, target, 0.0)
    if normalize_targets:
        target = F.layer_norm(target, target.shape[-1:])
    per_token = _elementwise(pred, target, loss_type, beta).mean(dim=-1)  # (..., K)
    if valid is None:
        return per_token.sum(), per_token.new_tensor(float(per_token.numel()))
    per_token = torch.where(valid, per_token, 0.0)
    return per_token.sum(), valid.sum().to(dtype)


def latent_prediction_loss(
    predictions: Tensor | Sequence[Tensor],
    targets: Tensor | Sequence[Tensor],
    valid: Tensor | Sequence[Tensor | None] | None = None,
    *,
    loss_type: LossType = "smooth_l1",
    beta: float = 1.0,
    normalize_targets: bool = True,
    level_weights: Sequence[float] = (1.0, 0.7, 0.5),
    gather_distributed: bool = False,
) -> LossOutput:
    """Weighted sum over levels of the masked mean prediction error.

    Args:
        predictions: Per level, predicted features of shape ``(..., K, D)`` (e.g.
            ``(B, M, K, D)`` or ``(B, K, D)``); a single tensor means one level.
        targets: Per level, target features of the same shape as the prediction. Not
            detached here.
        valid: Per level, a bool mask of shape ``(..., K)`` (``True`` = real token) or
            ``None`` (all valid); a single tensor for one level, or ``None`` for all.
        loss_type: ``"smooth_l1"`` (I-JEPA), ``"l1"`` (V-JEPA) or ``"l2"``.
        beta: Smooth-L1 transition point, >= 0 (only used by ``"smooth_l1"``).
        normalize_targets: Layer-normalise targets over ``D`` without affine parameters.
        level_weights: Non-negative weight per level; needs at least one entry per level
            (extra entries are ignored).
        gather_distributed: Under ``torch.distributed``, sum the per-level error sums and
            valid-token counts over all ranks, so every rank returns the mean over the
            *global* batch's valid tokens (with the gradient convention of
            :mod:`jepa_blocks.distributed`). Without it each rank averages its own tokens,
            and DDP's gradient averaging weights ranks equally even when their numbers of
            target tokens differ (they do: block sizes are random), which is not the
            single-process gradient. A no-op without an initialised process group.

    Returns:
        ``LossOutput(total, terms)`` with ``terms = {"level0": ..., "level1": ...}``, the
        unweighted per-level losses (scalars, float32 or float64 for float64 input).
    """
    preds = _as_list("predictions", predictions)
    targs = _as_list("targets", targets)
    num_levels = len(preds)
    if len(targs) != num_levels:
        raise ValueError(f"targets must have one entry per level ({num_levels}), got {len(targs)}")
    if valid is None:
        valids: list[Tensor | None] = [None] * num_levels
    else:
        if isinstance(valid, Tensor):
            valids = [valid]
        elif isinstance(valid, Sequence) and not isinstance(valid, (str, bytes)):
            valids = list(valid)
        else:
            raise TypeError(
                "valid must be None, a bool Tensor or a sequence of bool Tensors/None, "
                f"got {type(valid).__name__}"
            )
        if len(valids) != num_levels:
            raise ValueError(
                f"valid must have one entry per level ({num_levels}), got {len(valids)}"
            )
    check_choice("loss_type", loss_type, _LOSS_TYPES)
    beta = check_float("beta", beta, min_value=0.0)
    check_bool("normalize_targets", normalize_targets)
    weights = _check_weights(level_weights, num_levels)

    for lvl, (p, t, v) in enumerate(zip(preds, targs, valids, strict=True)):
        check_tensor(f"predictions[{lvl}]", p, ndim=range(2, 9), kind="float")
        check_tensor(f"targets[{lvl}]", t, ndim=range(2, 9), kind="float")
        same = (f"predictions[{lvl}]", p), (f"targets[{lvl}]", t), (f"valid[{lvl}]", v)
        check_same_device(("predictions[0]", preds[0]), *same)
        if p.shape != t.shape:
            raise ValueError(
                f"targets[{lvl}] must have the shape of predictions[{lvl}] "
                f"{tuple(p.shape)}, got {tuple(t.shape)}"
            )
        if v is not None:
            check_tensor(f"valid[{lvl}]", v, kind="bool")
            if v.shape != p.shape[:-1]:
                raise ValueError(
                    f"valid[{lvl}] must have shape {tuple(p.shape[:-1])} (predictions[{lvl}] "
                    f"without its feature dim), got {tuple(v.shape)}"
                )
    _check_finite_slots(preds, targs, valids)

    check_bool("gather_distributed", gather_distributed)
    with full_precision(preds[0].device):
        sums, counts = zip(
            *(
                _level_loss(p, t, v, loss_type=loss_type, beta=beta, normalize_targets=normalize_targets)
                for p, t, v in zip(preds, targs, valids, strict=True)
            ),
            strict=True,
        )
        sum_t, count_t = torch.stack(sums), torch.stack(counts)  # (L,), (L,)
        if gather_distributed and is_distributed():
            sum_t = all_reduce_with_grad(sum_t)
            count_t = all_reduce_with_grad(count_t.detach())
        per_level = sum_t / count_t.clamp_min(1)
        terms = {f"level{lvl}": per_level[lvl] for lvl in range(num_levels)}
        total = sum(w * term for w, term in zip(weights[:num_levels], terms.values(), strict=True))
    return LossOutput(total, terms)


class LatentPredictionLoss(LossModule):
    """Masked, level-weighted latent prediction loss (see :func:`latent_prediction_loss`).

    Args:
        loss_type: ``"smooth_l1"``, ``"l1"`` or ``"l2"``.
        beta: Smooth-L1 transition point.
        normalize_targets: Layer-normalise targets over the feature dim (no affine).
        level_weights: Non-negative weight per level.
        gather_distributed: Average over the valid tokens of the global batch under
            ``torch.distributed`` (see :func:`latent_prediction_loss`).

    ``forward`` returns the weighted total as a Tensor; the per-level losses are in
    :attr:`last_terms` and, with ``return_terms=True``, in the returned
    :class:`LossOutput`.

    Example:
        >>> criterion = LatentPredictionLoss()
        >>> pred, target = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
        >>> valid = torch.tensor([[True] * 5, [True, True, True, False, False]])
        >>> loss = criterion(pred, target, valid)
        >>> loss.shape, list(criterion.last_terms)
        (torch.Size([]), ['level0'])
        >>> loss, terms = criterion(pred, target, valid, return_terms=True)
    """

    def __init__(
        self,
        *,
        loss_type: LossType = "smooth_l1",
        beta: float = 1.0,
        normalize_targets: bool = True,
        level_weights: Sequence[float] = (1.0, 0.7, 0.5),
        gather_distributed: bool = False,
    ) -> None:
        super().__init__()
        self.loss_type = check_choice("loss_type", loss_type, _LOSS_TYPES)
        self.beta = check_float("beta", beta, min_value=0.0)
        self.normalize_targets = check_bool("normalize_targets", normalize_targets)
        self.level_weights = _check_weights(level_weights, None)
        self.gather_distributed = check_bool("gather_distributed", gather_distributed)

    def forward(
        self,
        predictions: Tensor | Sequence[Tensor],
        targets: Tensor | Sequence[Tensor],
        valid: Tensor | Sequence[Tensor | None] | None = None,
        *,
        return_terms: bool = False,
    ) -> Tensor | LossOutput:
        """Loss of predictions against targets, see :func:`latent_prediction_loss`.

        Args:
            predictions: Per level, tensors of shape ``(..., K, D)``.
            targets: Per level, tensors of the same shapes.
            valid: Per level, bool ``(..., K)`` masks or ``None``.
            return_terms: Return ``LossOutput(total, {"level0": ..., ...})`` instead of
                the Tensor.

        Returns:
            The weighted scalar loss (float32, float64 for float64 input).
        """
        out = latent_prediction_loss(
            predictions,
            targets,
            valid,
            loss_type=self.loss_type,  # type: ignore[arg-type]
            beta=self.beta,
            normalize_targets=self.normalize_targets,
            level_weights=self.level_weights,
            gather_distributed=self.gather_distributed,
        )
        return self._output(out, return_terms)

    def extra_repr(self) -> str:
        return (
            f"loss_type={self.loss_type!r}, beta={self.beta}, "
            f"normalize_targets={self.normalize_targets}, level_weights={self.level_weights}, "
            f"gather_distributed={self.gather_distributed}"
        )
