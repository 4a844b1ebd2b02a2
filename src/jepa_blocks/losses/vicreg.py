"""VICReg: variance-invariance-covariance regularisation (Bardes, Ponce & LeCun 2022).

For two branches ``x, y`` of shape ``(N, D)`` (formula of facebookresearch/vicreg)::

    invariance = mean((x - y)^2)
    std_x      = sqrt(var_unbiased(x, dim 0) + eps)
    variance   = mean(relu(1 - std_x)) / 2 + mean(relu(1 - std_y)) / 2
    cov_x      = x_c^T x_c / (N - 1),   x_c = x - mean(x, 0)
    covariance = sum(offdiag(cov_x)^2) / D + sum(offdiag(cov_y)^2) / D
    total      = lambda * invariance + mu * variance + nu * covariance

Implementation notes:

* The off-diagonal sum is ``||cov||_F^2 - ||diag(cov)||^2`` with ``diag(cov)`` the
  per-feature variances, so no mask is built. ``||X^T X||_F = ||X X^T||_F``: when
  ``N < D`` the ``(N, N)`` Gram matrix is used instead of the ``(D, D)`` covariance, so
  the cost is ``O(N D min(N, D))``.
* Computed in float32 (float64 stays float64) with autocast disabled.
* ``gather_distributed=True`` gathers both branches with
  :func:`jepa_blocks.distributed.gather_with_grad` and computes *every* term, the
  invariance term included, on the global batch: the value equals a single process on the
  concatenated batch, also with unequal local batch sizes. (The official code computes
  the invariance term on the local batch and divides the covariance by the configured
  batch size.) Gradients follow the ``world_size * dL/dx_local`` convention of
  :mod:`jepa_blocks.distributed`, which DDP's averaging turns into the exact gradient.
* NaN or Inf inputs raise ``ValueError`` (a value check), and so do finite inputs so
  large that the loss overflows (the covariance term scales as the 4th power of the
  inputs: float32 overflows for entries around 1e9 to 1e10), after the computation (a
  second value check; with value checks off the Inf/NaN passes through). Inputs on two devices raise
  ``ValueError`` (a metadata check).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from jepa_blocks._checks import (
    check_bool,
    check_finite,
    check_float,
    check_overflow,
    check_row_pairs,
    check_same_device,
    check_tensor,
)
from jepa_blocks._precision import compute_dtype, full_precision
from jepa_blocks.distributed import gather_with_grad
from jepa_blocks.losses.output import LossModule, LossOutput

__all__ = [
    "VICRegLoss",
    "covariance_loss",
    "invariance_loss",
    "variance_loss",
    "vicreg_loss",
]


def _check_batch(name: str, x: Tensor, ndim: int | tuple[int, ...] = 2) -> Tensor:
    check_tensor(name, x, ndim=ndim, kind="float")
    if x.shape[0] < 2:
        raise ValueError(
            f"{name} must have at least 2 samples (shape (N, D) or (N, T, D) with N >= 2), "
            f"got shape {tuple(x.shape)}"
        )
    return x


_OVERFLOW_HINT = "normalise or scale down the embeddings, or pass float64 inputs"


def _check_pair(x: Tensor, y: Tensor, names: tuple[str, str]) -> None:
    """``check_row_pairs`` for ``(N, D)`` or ``(N, T, D)`` pairs."""
    check_tensor(names[0], x, ndim=(2, 3), kind="float")
    check_tensor(names[1], y, ndim=(2, 3), kind="float")
    check_same_device((names[0], x), (names[1], y))
    if x.shape != y.shape:
        raise ValueError(
            f"{names[0]} and {names[1]} must have the same shape (N, D) or (N, T, D), got "
            f"{tuple(x.shape)} and {tuple(y.shape)}"
        )
    check_finite((names[0], x), (names[1], y))


# ---- kernels on trusted, float32/float64 tensors ----------------------------------------


def _centred_and_var(x: Tensor) -> tuple[Tensor, Tensor]:
    """Centred ``x`` (..., N, D) and unbiased per-feature variances (..., D)."""
    xc = x - x.mean(dim=-2, keepdim=True)
    var = xc.square().sum(dim=-2) / (x.shape[-2] - 1)
    return xc, var


def _variance_term(var: Tensor, eps: float) -> Tensor:
    # The clamp at the smallest normal float keeps the gradient finite at total collapse
    # with eps = 0 (sqrt'(0) = inf times d var / dx = 0 would be NaN); it changes the
    # value by at most sqrt(tiny) ~ 1e-19.
    std = torch.sqrt((var + eps).clamp_min(torch.finfo(var.dtype).tiny))
    return F.relu(1.0 - std).mean()


def _covariance_term(xc: Tensor, var: Tensor) -> Tensor:
    """Covariance term of ``xc`` (..., N, D), averaged over the leading dims."""
    n, d = xc.shape[-2:]
    if d == 1:  # no off-diagonal entries: an exact 0 that still has a (zero) gradient
        return xc.sum() * 0.0
    # sum_{i != j} cov_ij^2 = ||cov||_F^2 - sum_i cov_ii^2, and
    # ||xc^T xc||_F = ||xc xc^T||_F: use the smaller of the (D, D) and (N, N) products.
    gram = xc @ xc.mT if n < d else xc.mT @ xc
    fro2 = gram.square().sum(dim=(-2, -1)) / float(n - 1) ** 2
    return ((fro2 - var.square().sum(dim=-1)) / d).mean()


# ---- public functions -------------------------------------------------------------------


def invariance_loss(x: Tensor, y: Tensor) -> Tensor:
    """Mean squared error between the two branches.

    Args:
        x: Embeddings of shape ``(N, D)``.
        y: Embeddings of shape ``(N, D)``.

    Returns:
        Scalar tensor (float32, float64 for float64 input).
    """
    check_row_pairs(x, y, ("x", "y"))
    dtype = compute_dtype(x, y)
    with full_precision(x.device):
        value = F.mse_loss(x.to(dtype), y.to(dtype))
    check_overflow(value, ("x", x), ("y", y), what="the invariance loss", hint=_OVERFLOW_HINT)
    return value


def variance_loss(x: Tensor, eps: float = 1e-4) -> Tensor:
    """Hinge on the per-feature standard deviation: ``mean(relu(1 - sqrt(var + eps)))``.

    Args:
        x: Embeddings of shape ``(N, D)``, ``N >= 2`` (unbiased variance).
        eps: Added to the variance before the square root, >= 0 (the sum is clamped at
            the smallest normal float, so even 0 gives finite gradients at collapse).

    Returns:
        Scalar tensor in ``[0, 1)`` (float32, float64 for float64 input).
    """
    _check_batch("x", x)
    check_finite(("x", x))
    eps = check_float("eps", eps, min_value=0.0)
    with full_precision(x.device):
        _, var = _centred_and_var(x.to(compute_dtype(x)))
        return _variance_term(var, eps)


def covariance_loss(x: Tensor) -> Tensor:
    """Sum of squared off-diagonal covariance entries divided by ``D``.

    Args:
        x: Embeddings of shape ``(N, D)``, ``N >= 2``; the covariance is
            ``x_c^T x_c / (N - 1)``.

    Returns:
        Scalar tensor >= 0 (up to rounding; float32, float64 for float64 input).
    """
    _check_batch("x", x)
    check_finite(("x", x))
    with full_precision(x.device):
        xc, var = _centred_and_var(x.to(compute_dtype(x)))
        value = _covariance_term(xc, var)
    check_overflow(value, ("x", x), what="the covariance loss", hint=_OVERFLOW_HINT)
    return value


def vicreg_loss(
    x: Tensor,
    y: Tensor,
    *,
    lambda_param: float = 25.0,
    mu_param: float = 25.0,
    nu_param: float = 1.0,
    eps: float = 1e-4,
    gather_distributed: bool = False,
) -> LossOutput:
    """VICReg loss of two embedding branches.

    Args:
        x: Embeddings of the first view, shape ``(N, D)``, or ``(N, T, D)``: then every
            term is computed at each position ``t`` over the batch and averaged over ``T``
            (lightly's convention).
        y: Embeddings of the second view, same shape as ``x``.
        lambda_param: Weight of the invariance term, >= 0.
        mu_param: Weight of the variance term, >= 0.
        nu_param: Weight of the covariance term, >= 0.
        eps: Variance epsilon inside the square root, >= 0.
        gather_distributed: Gather both branches over the default process group and
            compute all terms on the global batch (no-op without a group). Local sizes
            may differ between ranks.

    Returns:
        ``LossOutput(total, terms)`` with unweighted scalar terms ``"invariance"``,
        ``"variance"`` and ``"covariance"``.
    """
    return _vicreg(
        x,
        y,
        lambda_param=lambda_param,
        mu_param=mu_param,
        nu_param=nu_param,
        eps=eps,
        gather_distributed=gather_distributed,
        names=("x", "y"),
    )


def _vicreg(
    x: Tensor,
    y: Tensor,
    *,
    lambda_param: float,
    mu_param: float,
    nu_param: float,
    eps: float,
    gather_distributed: bool,
    names: tuple[str, str],
) -> LossOutput:
    _check_pair(x, y, names)
    lambda_param = check_float("lambda_param", lambda_param, min_value=0.0)
    mu_param = check_float("mu_param", mu_param, min_value=0.0)
    nu_param = check_float("nu_param", nu_param, min_value=0.0)
    eps = check_float("eps", eps, min_value=0.0)
    check_bool("gather_distributed", gather_distributed)
    dtype = compute_dtype(x, y)
    with full_precision(x.device):
        x, y = x.to(dtype), y.to(dtype)
        if gather_distributed:
            d = x.shape[-1]
            # One gather for both branches (same local batch size by construction).
            xy = gather_with_grad(torch.cat([x, y], dim=-1))
            x, y = xy[..., :d], xy[..., d:]
        _check_batch(names[0], x, ndim=(2, 3))
        inv = F.mse_loss(x, y)
        if x.ndim == 3:  # (N, T, D): the terms of each position t over the batch, mean over T
            x, y = x.transpose(0, 1), y.transpose(0, 1)
        xc, var_x = _centred_and_var(x)
        yc, var_y = _centred_and_var(y)
        var = 0.5 * (_variance_term(var_x, eps) + _variance_term(var_y, eps))
        cov = _covariance_term(xc, var_x) + _covariance_term(yc, var_y)
        total = lambda_param * inv + mu_param * var + nu_param * cov
    # Finite inputs, non-finite loss: the covariance term grows as the 4th power of the
    # input scale and overflows (a value check: one host sync).
    check_overflow(total, (names[0], x), (names[1], y), what="the VICReg loss", hint=_OVERFLOW_HINT)
    return LossOutput(total, {"invariance": inv, "variance": var, "covariance": cov})


class VICRegLoss(LossModule):
    """VICReg loss module, a drop-in for lightly's ``VICRegLoss``.

    The argument names, defaults (25, 25, 1, eps 1e-4) and input shapes are lightly's:
    ``(N, D)`` pairs, or ``(N, T, D)`` (e.g. tokens), for which every term is computed at
    each position ``t`` over the batch and averaged over ``T`` (lightly's and VICRegL's
    convention, not a flattening of the ``N * T`` rows). ``forward`` returns the weighted
    total as a Tensor; the unweighted terms are in :attr:`last_terms` and, with
    ``return_terms=True``, in the returned :class:`LossOutput`. One difference: with
    ``gather_distributed=True`` the invariance term is computed on the global batch too
    (lightly computes it on the local batch), which changes nothing when local batch sizes
    are equal.

    Args:
        lambda_param: Weight of the invariance term.
        mu_param: Weight of the variance term.
        nu_param: Weight of the covariance term.
        gather_distributed: Compute all terms on the batch gathered over the default
            process group.
        eps: Variance epsilon inside the square root.

    Example:
        >>> criterion = VICRegLoss()
        >>> z_a, z_b = torch.randn(8, 16), torch.randn(8, 16)
        >>> loss = criterion(z_a, z_b)
        >>> loss.shape, sorted(criterion.last_terms)
        (torch.Size([]), ['covariance', 'invariance', 'variance'])
        >>> loss, terms = criterion(z_a, z_b, return_terms=True)
    """

    def __init__(
        self,
        *,
        lambda_param: float = 25.0,
        mu_param: float = 25.0,
        nu_param: float = 1.0,
        gather_distributed: bool = False,
        eps: float = 1e-4,
    ) -> None:
        super().__init__()
        self.lambda_param = check_float("lambda_param", lambda_param, min_value=0.0)
        self.mu_param = check_float("mu_param", mu_param, min_value=0.0)
        self.nu_param = check_float("nu_param", nu_param, min_value=0.0)
        self.gather_distributed = check_bool("gather_distributed", gather_distributed)
        self.eps = check_float("eps", eps, min_value=0.0)

    def forward(self, z_a: Tensor, z_b: Tensor, *, return_terms: bool = False) -> Tensor | LossOutput:
        """VICReg loss of two branches.

        Args:
            z_a: Embeddings of the first view, shape ``(N, D)`` or ``(N, T, D)``.
            z_b: Embeddings of the second view, same shape as ``z_a``.
            return_terms: Return ``LossOutput(total, terms)`` (see :func:`vicreg_loss`)
                instead of the Tensor.

        Returns:
            The weighted scalar loss (float32, float64 for float64 input).
        """
        out = _vicreg(
            z_a,
            z_b,
            lambda_param=self.lambda_param,
            mu_param=self.mu_param,
            nu_param=self.nu_param,
            eps=self.eps,
            gather_distributed=self.gather_distributed,
            names=("z_a", "z_b"),
        )
        return self._output(out, return_terms)

    def extra_repr(self) -> str:
        return (
            f"lambda_param={self.lambda_param}, mu_param={self.mu_param}, "
            f"nu_param={self.nu_param}, eps={self.eps}, "
            f"gather_distributed={self.gather_distributed}"
        )
