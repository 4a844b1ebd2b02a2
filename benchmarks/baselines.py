"""Straightforward re-implementations of the reference loss formulas, timed beside ours.

These are written for the benchmark from the published formulas (SIGReg: LeJEPA,
Balestriero & LeCun 2025; VICReg: Bardes et al. 2022), following the *structure* of the
reference code so that their cost is representative of it, not copied from it:

* :func:`sigreg_baseline` has LeJEPA's structure: one ``randn(D, K)`` draw normalised
  without an eps, projections ``x @ A``, the full ``(N, K, knots)`` tensor of arguments
  ``t_j p_n``, ``cos``/``sin`` over it and autograd through them.
* :func:`vicreg_baseline` is the official VICReg formula with the full ``(D, D)``
  covariance matrices and a boolean off-diagonal mask.

Ratios "ours / baseline" measured in one run are less sensitive to machine noise than
ratios against the stored reference timings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["sigreg_baseline", "vicreg_baseline"]


def sigreg_baseline(
    x: Tensor,
    *,
    num_directions: int = 1024,
    num_knots: int = 17,
    t_max: float = 3.0,
    directions: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Epps-Pulley SIGReg with autograd through ``cos``/``sin`` (LeJEPA's structure).

    Args:
        x: Embeddings of shape ``(N, D)``.
        num_directions: Number ``K`` of random directions (ignored with ``directions``).
        num_knots: Knots on ``[0, t_max]``, ``t = 0`` included.
        t_max: Upper end of the frequency range.
        directions: Optional directions of shape ``(D, K)`` (normalised here).
        generator: Generator for the ``randn(D, K)`` draw.

    Returns:
        Scalar tensor: mean over directions of ``N * sum_j w_j err_j``.
    """
    n, d = x.shape
    if directions is None:
        directions = torch.randn(
            d, num_directions, generator=generator, device=x.device, dtype=x.dtype
        )
    a = directions / directions.norm(dim=0, keepdim=True)  # no eps, as the reference
    knots = torch.linspace(0.0, t_max, num_knots, device=x.device, dtype=x.dtype)
    step = t_max / (num_knots - 1)
    trapezoid = torch.full_like(knots, 2.0 * step)
    trapezoid[0] = step
    trapezoid[-1] = step
    gauss_cf = torch.exp(-0.5 * knots.square())
    weights = trapezoid * gauss_cf  # (J,)
    args = (x @ a).unsqueeze(-1) * knots  # (N, K, J)
    real = torch.cos(args).mean(dim=0)  # (K, J)
    imag = torch.sin(args).mean(dim=0)
    err = (real - gauss_cf).square() + imag.square()
    return (n * (err @ weights)).mean()


def vicreg_baseline(
    x: Tensor,
    y: Tensor,
    *,
    lambda_param: float = 25.0,
    mu_param: float = 25.0,
    nu_param: float = 1.0,
    eps: float = 1e-4,
) -> Tensor:
    """VICReg of two branches with ``(D, D)`` covariances and a boolean off-diagonal mask.

    Args:
        x: Embeddings of the first branch, shape ``(N, D)``.
        y: Embeddings of the second branch, shape ``(N, D)``.
        lambda_param: Invariance weight.
        mu_param: Variance weight.
        nu_param: Covariance weight.
        eps: Added to the variance inside the square root.

    Returns:
        Scalar tensor ``lambda * inv + mu * var + nu * cov``.
    """
    n, d = x.shape
    invariance = F.mse_loss(x, y)
    off_diagonal = ~torch.eye(d, dtype=torch.bool, device=x.device)
    variance = x.new_zeros(())
    covariance = x.new_zeros(())
    for z in (x, y):
        zc = z - z.mean(dim=0)
        std = torch.sqrt(zc.var(dim=0) + eps)
        variance = variance + F.relu(1.0 - std).mean() / 2
        cov = (zc.T @ zc) / (n - 1)  # (D, D)
        covariance = covariance + cov[off_diagonal].square().sum() / d
    return lambda_param * invariance + mu_param * variance + nu_param * covariance
