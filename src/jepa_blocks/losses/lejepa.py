"""LeJEPA's view objective: predict the centre of the global views, regularise with SIGReg.

For projected embeddings ``z`` of ``V`` views of the same ``N`` images (the first ``G``
views global, the others local crops), as in the LeJEPA paper's algorithm and its
minimal code::

    c    = mean_{v < G} z_v                        centre of the global views, (N, P)
    inv  = mean_{v, n, p} (z_{v,n,p} - c_{n,p})^2  every view (global and local) predicts it
    sig  = mean_v SIGReg(z_v)                      SIGReg per view, never on views pooled
    loss = (1 - lam) * inv + lam * sig

There is no EMA and no stop-gradient: the centre carries gradients, and SIGReg keeps the
embedding distribution an isotropic Gaussian, which rules out collapse. ``lam`` is 0.02
in LeJEPA's minimal code and 0.05 in the paper. Applying SIGReg to all views flattened
into one batch, or writing ``inv + lam * sig``, are the two mistakes stable-pretraining
issue 413 reports; the tests re-derive the formula above independently.

Local views (smaller crops) are projected to the same ``P`` and stacked after the global
ones; their resolution does not matter here. All views of one step use the same SIGReg
directions (one call of the :class:`~jepa_blocks.losses.SIGRegLoss`).

Distributed (``gather_distributed=True``): the invariance is the mean over the global
batch (its sum and count are all-reduced with gradients) and SIGReg the statistic of the
global batch, so the value is the same on every rank and DDP's averaged gradients are
those of one process on the concatenated batch, for any split of the rows over ranks
(a per-rank mean would log one rank's value, and bias the gradients when ranks hold
different numbers of rows).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from jepa_blocks._checks import check_bool, check_finite, check_float, check_int, check_tensor
from jepa_blocks.distributed import all_reduce_with_grad
from jepa_blocks.losses._aliases import accepts_aliases
from jepa_blocks.losses.output import LossModule, LossOutput
from jepa_blocks.losses.sigreg import SIGRegLoss, lejepa_loss

__all__ = ["LeJEPALoss", "lejepa_view_loss"]


def lejepa_view_loss(
    z: Tensor,
    *,
    sigreg: nn.Module,
    lam: float = 0.05,
    num_global_views: int | None = None,
    gather_distributed: bool = False,
) -> LossOutput:
    """LeJEPA loss of projected views (formula in the module docstring).

    Args:
        z: Projected embeddings of shape ``(V, N, P)``; the first ``num_global_views``
            views are global, the rest local.
        sigreg: Callable mapping ``(V, N, P)`` to the mean of the per-view SIGReg values
            (a :class:`~jepa_blocks.losses.SIGRegLoss`).
        lam: SIGReg share in ``[0, 1]``.
        num_global_views: ``G`` in ``[1, V]``; ``None`` means every view is global.
        gather_distributed: The invariance is the mean over the global batch across the
            default process group (see the module docstring); give ``sigreg`` the same
            setting.

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
    if check_bool("gather_distributed", gather_distributed):
        count = all_reduce_with_grad(zf.new_tensor(float(zf.numel())))
        inv = all_reduce_with_grad((zf - centre).square().sum()) / count
    else:
        inv = (zf - centre).square().mean()
    sig = sigreg(zf)
    return LossOutput(lejepa_loss(inv, sig, lam=lam), {"invariance": inv, "sigreg": sig})


class LeJEPALoss(LossModule):
    """Module form of :func:`lejepa_view_loss` with its own :class:`SIGRegLoss`.

    ``loss(z)`` treats every view of ``z`` as global (LeJEPA's minimal code);
    ``loss(z, local_views=local)`` adds local crops, which predict the centre of
    the global views and are regularised per view like them. With ``num_global_views=G``
    one ``(V, N, P)`` tensor can hold both, global views first.

    Compared with lightly's ``LeJEPALoss(local_proj, global_proj)``: the global views come
    first here and the local ones only by keyword, so a positional lightly-style call
    fails instead of silently swapping them. lightly's argument names are accepted as
    aliases: ``lambda_param`` (for ``lam``), ``sigreg_num_vectors`` (``num_directions``),
    ``sigreg_knots`` (``num_knots``) and ``sigreg_t_max`` (``t_max``); passing both names
    raises ``TypeError``. The default ``num_directions`` is 256 as in LeJEPA's minimal code
    (lightly: 1024).

    Args:
        lam: SIGReg share in ``[0, 1]`` (LeJEPA: 0.05; minimal code: 0.02).
        num_global_views: Global views among the ``V`` given in one tensor (``None``:
            all); must be ``None`` when ``local_views`` are passed.
        num_directions: SIGReg directions per step.
        num_knots: SIGReg quadrature knots on ``[0, t_max]``.
        t_max: Upper end of SIGReg's frequency range.
        seed: Seed of SIGReg's direction sequence.
        gather_distributed: Invariance and SIGReg of the global batch across ranks.
        auto_step: Advance SIGReg's step after each training-mode forward; with
            ``False`` call ``loss.sigreg.advance()`` after each optimizer step (see
            :class:`SIGRegLoss`).

    Example:
        >>> loss_fn = LeJEPALoss(lam=0.05, num_directions=64)
        >>> z = torch.randn(2, 32, 16, requires_grad=True)       # 2 global views, 32 images
        >>> local = torch.randn(6, 32, 16, requires_grad=True)   # 6 small crops, projected
        >>> loss = loss_fn(z, local_views=local)
        >>> loss.backward()
        >>> sorted(loss_fn.last_terms)
        ['invariance', 'sigreg']
    """

    @accepts_aliases(
        lambda_param="lam",
        sigreg_num_vectors="num_directions",
        sigreg_knots="num_knots",
        sigreg_t_max="t_max",
    )
    def __init__(
        self,
        *,
        lam: float = 0.05,
        num_global_views: int | None = None,
        num_directions: int = 256,
        num_knots: int = 17,
        t_max: float = 3.0,
        seed: int = 0,
        gather_distributed: bool = False,
        auto_step: bool = True,
    ) -> None:
        super().__init__()
        self.lam = check_float("lam", lam, min_value=0.0, max_value=1.0)
        self.num_global_views = (None if num_global_views is None
                                 else check_int("num_global_views", num_global_views, min_value=1))
        self.sigreg = SIGRegLoss(num_directions=num_directions, num_knots=num_knots, t_max=t_max, seed=seed,
                                 gather_distributed=gather_distributed, auto_step=auto_step)

    def forward(
        self, z: Tensor, *, local_views: Tensor | None = None, return_terms: bool = False
    ) -> Tensor | LossOutput:
        """LeJEPA loss of projected views.

        Args:
            z: Projected global views of shape ``(G, N, P)`` (with ``num_global_views``
                set: all ``V`` views, the global ones first).
            local_views: Projected local views of shape ``(L, N, P)``, or ``None``.
            return_terms: Return ``LossOutput(total, {"invariance": ..., "sigreg": ...})``
                instead of the Tensor.

        Returns:
            The scalar loss (float32, float64 for float64 input).
        """
        g = self.num_global_views
        if local_views is not None:
            if g is not None:
                raise ValueError(
                    f"num_global_views must be None when local_views are passed (all views "
                    f"of z are global), got num_global_views={g}"
                )
            check_tensor("z", z, ndim=3, kind="float")
            check_tensor("local_views", local_views, ndim=3, kind="float")
            if local_views.shape[1:] != z.shape[1:]:
                raise ValueError(
                    f"local_views must have shape (L, N={z.shape[1]}, P={z.shape[2]}) like z, "
                    f"got {tuple(local_views.shape)}"
                )
            g = z.shape[0]
            dtype = torch.promote_types(z.dtype, local_views.dtype)
            z = torch.cat([z.to(dtype), local_views.to(dtype)])
        out = lejepa_view_loss(z, sigreg=self.sigreg, lam=self.lam, num_global_views=g,
                               gather_distributed=self.sigreg.gather_distributed)
        return self._output(out, return_terms)

    def extra_repr(self) -> str:
        return f"lam={self.lam}, num_global_views={self.num_global_views}"
