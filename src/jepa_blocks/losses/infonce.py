"""InfoNCE with in-batch negatives (CPC, van den Oord et al. 2018; MoCo; CLIP).

For queries and keys of shape ``(N, D)`` whose row ``i`` form a positive pair, rows are
L2-normalised and, with the cosine similarity ``s_ij = q_i . k_j``::

    L_qk = mean_i -log( exp(s_ii / t) / sum_j exp(s_ij / t) )       (positives on the diagonal)
    L    = L_qk,  or  (L_qk + L_kq) / 2 when symmetric (CLIP)

``L_kq`` swaps the roles of queries and keys. Each query has one positive and ``N - 1``
negatives (the other keys of the batch; the queries are not candidates, unlike NT-Xent,
:mod:`jepa_blocks.losses.ntxent`). ``log(N) - L_qk`` is the InfoNCE lower bound on the
mutual information, so ``L_qk >= 0`` is compared against ``log(N)`` (chance level).

:class:`InfoNCELoss` learns the temperature inside a fixed range by construction::

    t = lo + (hi - lo) * sigmoid(theta)

so no optimiser step, however large, can move it out of ``[lo, hi]``; ``theta`` is the
only parameter. Defaults: start at 0.07 (MoCo, CLIP's initial value) in ``(0.05, 0.20)``.

Implementation notes:

* Computed in float32 (float64 stays float64) with autocast disabled, whatever the input
  dtype; a zero row is normalised to zero, never NaN. NaN or Inf inputs raise
  ``ValueError`` (a value check).
* ``gather_distributed=True``: the normalised keys (and the queries when symmetric) are
  gathered with gradients (unequal local sizes allowed); each rank scores its local
  queries against all ``N_global`` keys, with the positive of local row ``i`` at its
  *global* position, and the per-rank sums are all-reduced: every rank returns the loss of
  the global batch, and inputs follow the ``world_size * dL/dx_local`` convention of
  :mod:`jepa_blocks.distributed`. The gradient of a temperature *tensor* that requires
  grad is averaged over the ranks in backward, so every rank holds exactly the global
  ``dL/dt`` whether or not the loss module is wrapped in DDP.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from jepa_blocks._checks import (
    check_bool,
    check_float,
    check_pair,
    check_row_pairs,
    check_tensor,
    value_checks_enabled,
)
from jepa_blocks._precision import compute_dtype, full_precision
from jepa_blocks.losses._contrastive import (
    gather_rows,
    global_mean,
    sync_grad,
    unit_rows,
)
from jepa_blocks.losses.output import LossModule, LossOutput

__all__ = ["InfoNCELoss", "info_nce_loss"]


def _info_nce_value(
    q: Tensor, k: Tensor, temperature: float | Tensor, symmetric: bool, gather: bool
) -> Tensor:
    """InfoNCE of trusted local rows ``q``, ``k`` (n, D) in the compute dtype."""
    n, d = q.shape
    uq, uk = unit_rows(q), unit_rows(k)
    if symmetric:  # both sides are candidates of the other: one collective for both
        rows, offset = gather_rows(torch.cat([uq, uk], dim=1), gather)
        all_q, all_k = rows[:, :d], rows[:, d:]
    else:
        all_k, offset = gather_rows(uk, gather)
        all_q = None
    m = all_k.shape[0]  # global batch size
    if m < 2:
        raise ValueError(
            f"query and key must hold at least 2 pairs in the (global) batch (InfoNCE needs "
            f"negatives), got {m}"
        )
    if isinstance(temperature, Tensor):
        temperature = sync_grad(temperature, gather)
    positive = torch.arange(n, device=q.device) + offset  # global index of local row i
    local_sum = F.cross_entropy((uq / temperature) @ all_k.T, positive, reduction="sum")
    if all_q is not None:
        reverse = F.cross_entropy((uk / temperature) @ all_q.T, positive, reduction="sum")
        local_sum = 0.5 * (local_sum + reverse)
    return global_mean(local_sum, m, gather)


def _check_temperature_arg(temperature: float | Tensor) -> float | Tensor:
    if isinstance(temperature, Tensor):
        check_tensor("temperature", temperature, ndim=0, kind="float")
        if value_checks_enabled():  # one host sync
            value = float(temperature.detach())
            if not (math.isfinite(value) and value > 0.0):
                raise ValueError(f"temperature must be finite and > 0, got {value}")
        return temperature
    return check_float("temperature", temperature, min_value=0.0, min_inclusive=False)


def _info_nce(
    query: Tensor,
    key: Tensor,
    temperature: float | Tensor,
    symmetric: bool,
    gather_distributed: bool,
) -> Tensor:
    check_row_pairs(query, key, ("query", "key"))
    dtype = compute_dtype(query, key)
    with full_precision(query.device):
        if isinstance(temperature, Tensor):
            temperature = temperature.to(device=query.device, dtype=dtype)
        return _info_nce_value(
            query.to(dtype), key.to(dtype), temperature, symmetric, gather_distributed
        )


def info_nce_loss(
    query: Tensor,
    key: Tensor,
    *,
    temperature: float | Tensor = 0.07,
    symmetric: bool = False,
    gather_distributed: bool = False,
) -> Tensor:
    """InfoNCE loss with in-batch negatives, positives on the diagonal.

    Args:
        query: Query embeddings of shape ``(N, D)``.
        key: Key embeddings of shape ``(N, D)``; ``key[i]`` is the positive of
            ``query[i]``, every other key a negative.
        temperature: Softmax temperature: a float > 0, or a positive 0-dim float tensor
            (e.g. a learnable one; its value is checked: a value check).
        symmetric: Average the query-to-key and key-to-query losses (CLIP).
        gather_distributed: Gather the keys (and queries when symmetric) over the default
            process group with gradients (local ``N`` may differ between ranks) and return
            the loss of the global batch on every rank; a no-op without a group.

    Returns:
        Scalar tensor, float32 (float64 for float64 input), >= 0.

    Raises:
        ValueError: If the (global) batch has fewer than 2 pairs.
    """
    temperature = _check_temperature_arg(temperature)
    check_bool("symmetric", symmetric)
    check_bool("gather_distributed", gather_distributed)
    return _info_nce(query, key, temperature, symmetric, gather_distributed)


def _logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


class InfoNCELoss(LossModule):
    """InfoNCE with a temperature learned inside a fixed range.

    The temperature is ``lo + (hi - lo) * sigmoid(temperature_logit)``, so it stays in
    ``[lo, hi]`` whatever the optimiser does (a huge step can park it at a bound, where the
    sigmoid's gradient vanishes, but never beyond). ``temperature_logit`` is a 0-dim
    parameter (a buffer when ``learnable=False``); put the module's parameters in the
    optimiser without weight decay and save its ``state_dict`` with the model.

    As an extra term beside the latent (JEPA) loss, use the average-pooled context encoder
    output of one crop as ``query`` and the average-pooled EMA-target features of a second
    crop of the same images as ``key``.

    Args:
        init_temperature: Starting temperature, strictly inside ``temperature_range``.
        temperature_range: ``(lo, hi)`` with ``0 < lo < hi``.
        learnable: Learn the temperature (else it stays at ``init_temperature``).
        symmetric: Average both directions (CLIP), see :func:`info_nce_loss`.
        gather_distributed: Contrast against the batch gathered over the default process
            group (see :func:`info_nce_loss`).

    ``forward`` returns the loss as a Tensor; :attr:`last_terms` (and, with
    ``return_terms=True``, the returned :class:`LossOutput`) hold ``"infonce"`` and the
    ``"temperature"`` used. Inputs are ``(N, D)`` (pool tokens first).

    Example:
        >>> criterion = InfoNCELoss(init_temperature=0.07, temperature_range=(0.05, 0.2))
        >>> q, k = torch.randn(8, 16), torch.randn(8, 16)
        >>> loss = criterion(q, k)
        >>> loss.backward()
        >>> round(criterion.temperature, 4), criterion.temperature_logit.grad is not None
        (0.07, True)
    """

    temperature_logit: Tensor

    def __init__(
        self,
        *,
        init_temperature: float = 0.07,
        temperature_range: tuple[float, float] = (0.05, 0.20),
        learnable: bool = True,
        symmetric: bool = True,
        gather_distributed: bool = False,
    ) -> None:
        super().__init__()
        lo, hi = check_pair(
            "temperature_range", temperature_range, min_value=0.0, min_inclusive=False
        )
        if not lo < hi:
            raise ValueError(f"temperature_range must satisfy 0 < lo < hi, got ({lo}, {hi})")
        init = check_float(
            "init_temperature",
            init_temperature,
            min_value=lo,
            max_value=hi,
            min_inclusive=False,
            max_inclusive=False,
        )
        self.temperature_range = (lo, hi)
        self.learnable = check_bool("learnable", learnable)
        self.symmetric = check_bool("symmetric", symmetric)
        self.gather_distributed = check_bool("gather_distributed", gather_distributed)
        logit = torch.tensor(_logit((init - lo) / (hi - lo)), dtype=torch.float32)
        if learnable:
            self.temperature_logit = nn.Parameter(logit)
        else:
            self.register_buffer("temperature_logit", logit, persistent=True)

    def temperature_tensor(self, dtype: torch.dtype | None = None) -> Tensor:
        """The current temperature as a differentiable 0-dim tensor in ``[lo, hi]``.

        Args:
            dtype: Computation dtype (default: the parameter's).
        """
        lo, hi = self.temperature_range
        theta = self.temperature_logit if dtype is None else self.temperature_logit.to(dtype)
        # The clamp only removes rounding of the sum; its gradient is 1 inside [lo, hi].
        return (lo + (hi - lo) * torch.sigmoid(theta)).clamp(lo, hi)

    @property
    def temperature(self) -> float:
        """The current temperature as a Python float, for logging (one host sync)."""
        with torch.no_grad():
            return float(self.temperature_tensor(torch.float64))

    def forward(
        self, query: Tensor, key: Tensor, *, return_terms: bool = False
    ) -> Tensor | LossOutput:
        """InfoNCE of a batch of pairs at the current temperature.

        Args:
            query: Query embeddings of shape ``(N, D)``.
            key: Key embeddings of shape ``(N, D)``; ``key[i]`` is the positive of
                ``query[i]``.
            return_terms: Return ``LossOutput(total, {"infonce": total, "temperature": t})``
                instead of the Tensor.

        Returns:
            The scalar loss (float32, float64 for float64 input). The temperature used is
            logged as a detached 0-dim tensor (its gradient flows through the loss; use
            :meth:`temperature_tensor` to put a term of your own on it).
        """
        check_row_pairs(query, key, ("query", "key"))
        dtype = compute_dtype(query, key)
        with full_precision(query.device):
            t = self.temperature_tensor(dtype).to(query.device)
            total = _info_nce_value(
                query.to(dtype), key.to(dtype), t, self.symmetric, self.gather_distributed
            )
        return self._output(
            LossOutput(total, {"infonce": total, "temperature": t.detach()}), return_terms
        )

    def extra_repr(self) -> str:
        return (
            f"temperature_range={self.temperature_range}, learnable={self.learnable}, "
            f"symmetric={self.symmetric}, gather_distributed={self.gather_distributed}"
        )
