"""LeJEPA's view objective: predict the centre of the global views, regularise with SIGReg.

For projected embeddings ``z`` of ``V`` views of the same ``N`` images (the first ``G``
views global, the others local crops), as in LeJEPA's minimal code::

    c    = mean_{v < G} z_v                        centre of the global views, (N, P)
    inv  = mean_{v, n, p} (z_{v,n,p} - c_{n,p})^2  every view predicts the centre
    sig  = mean_v SIGReg(z_v)                      SIGReg per view, never on views pooled
    loss = (1 - lam) * inv + lam * sig

There is no EMA and no stop-gradient: the centre carries gradients, and SIGReg keeps the
embedding distribution an isotropic Gaussian, which rules out collapse. ``lam`` is 0.02
in LeJEPA's minimal code and 0.05 in the paper. Applying SIGReg to all views flattened
into one batch, or writing ``inv + lam * sig``, are the two mistakes stable-pretraining
issue 413 reports; the tests re-derive the formula above independently.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from jepa_blocks._checks import check_finite, check_float, check_int, check_tensor
from jepa_blocks.losses.output import LossOutput
from jepa_blocks.losses.sigreg import SIGRegLoss, lejepa_loss

__all__ = ["LeJEPALoss", "lejepa_view_loss"]


def lejepa_view_loss(
    z: Tensor, *, sigreg: nn.Module, lam: float = 0.05, num_global_views: int | None = None
) -> LossOutput:
    """LeJEPA loss of projected views (formula in the module docstring).

    Args:
        z: Projected embeddings of shape ``(V, N, P)``; the first ``num_global_views``
            views are global.
        sigreg: Callable mapping ``(V, N, P)`` to the mean of the per-view SIGReg values
            (a :class:`~jepa_blocks.losses.SIGRegLoss`).
        lam: SIGReg share in ``[0, 1]``.
        num_global_views: ``G`` in ``[1, V]``; ``None`` means every view is global.

    Returns:
        ``LossOutput(total, {"invariance": inv, "sigreg": sig})`` in float32 (float64 for
        float64 input).
    """
    check_tensor("z", z, ndim=3, kind="float")
    v = z.shape[0]
    if v < 2 or z.shape[1] == 0:
        raise ValueError(f"z must hold at least 2 views of N >= 1 rows (V, N, P), got shape {tuple(z.shape)}")
    check_finite(("z", z))
    g = v if num_global_views is None else check_int("num_global_views", num_global_views, min_value=1,
                                                     max_value=v)
    lam = check_float("lam", lam, min_value=0.0, max_value=1.0)
    zf = z.double() if z.dtype == torch.float64 else z.float()
    centre = zf[:g].mean(0)
    inv = (zf - centre).square().mean()
    sig = sigreg(zf)
    return LossOutput(lejepa_loss(inv, sig, lam=lam), {"invariance": inv, "sigreg": sig})


class LeJEPALoss(nn.Module):
    """Module form of :func:`lejepa_view_loss` with its own :class:`SIGRegLoss`.

    Args:
        lam: SIGReg share in ``[0, 1]`` (LeJEPA: 0.05; minimal code: 0.02).
        num_global_views: Global views among the ``V`` given (``None``: all).
        num_directions: SIGReg directions per step.
        seed: Seed of SIGReg's direction sequence.
        gather_distributed: SIGReg on the global batch across ranks.

    Example:
        >>> loss_fn = LeJEPALoss(lam=0.05, num_directions=64)
        >>> z = torch.randn(2, 32, 16, requires_grad=True)   # 2 views, 32 images
        >>> total, terms = loss_fn(z)
        >>> total.backward()
        >>> sorted(terms)
        ['invariance', 'sigreg']
    """

    def __init__(
        self,
        *,
        lam: float = 0.05,
        num_global_views: int | None = None,
        num_directions: int = 256,
        seed: int = 0,
        gather_distributed: bool = False,
    ) -> None:
        super().__init__()
        self.lam = check_float("lam", lam, min_value=0.0, max_value=1.0)
        self.num_global_views = (None if num_global_views is None
                                 else check_int("num_global_views", num_global_views, min_value=1))
        self.sigreg = SIGRegLoss(num_directions=num_directions, seed=seed, gather_distributed=gather_distributed)

    def forward(self, z: Tensor) -> LossOutput:
        """Loss of projected views ``z`` of shape ``(V, N, P)``."""
        return lejepa_view_loss(z, sigreg=self.sigreg, lam=self.lam, num_global_views=self.num_global_views)

    def extra_repr(self) -> str:
        return f"lam={self.lam}, num_global_views={self.num_global_views}"
