"""NT-Xent: the normalised temperature-scaled cross-entropy of SimCLR (Chen et al. 2020).

For two views ``z_a, z_b`` of shape ``(N, D)`` whose row ``i`` come from the same sample,
the ``2N`` rows ``u_1..u_2N`` (view a first, then view b) are L2-normalised and, with the
cosine similarity ``s_ij = u_i . u_j``::

    l_i = -log( exp(s_{i,p(i)} / t) / sum_{k != i} exp(s_ik / t) )
    L   = mean of l_i over the 2N anchors

where ``p(i)`` is the other view of the same sample. Each anchor has one positive and
``2N - 2`` negatives (both views of every other sample). Bounds: ``L >= 0``; with cosine
similarities in ``[-1, 1]``, ``L >= log(1 + (2N - 2) exp(-2 / t))``; when every row is the
same vector ``L = log(2N - 1)`` (all ``2N - 1`` candidates score alike), and for pairs of
identical rows orthogonal to all other pairs ``L = log(1 + (2N - 2) exp(-1 / t))``.

Temperature: SimCLR's ImageNet default is 0.1 (0.5 in its small-batch CIFAR-10 runs).
(C-JEPA, arXiv 2410.19560, adds VICReg, not NT-Xent, to I-JEPA; NT-Xent is offered here as
the contrastive alternative to that term.)

Implementation notes:

* Computed in float32 (float64 stays float64) with autocast disabled, whatever the input
  dtype; a zero row is normalised to zero (similarity 0 to everything), never NaN. NaN or
  Inf inputs raise ``ValueError`` (a value check).
* ``gather_distributed=True``: the normalised rows of both views are gathered with
  gradients (unequal local sizes allowed); each rank scores its local anchors against all
  ``2 N_global`` rows, with the positive of local row ``i`` at its *global* position, and
  the per-rank sums are all-reduced, so every rank returns the loss of the global batch and
  DDP's gradient averaging gives the single-process gradient of the concatenated batch
  (see :mod:`jepa_blocks.distributed`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from jepa_blocks._checks import check_bool, check_float, check_row_pairs
from jepa_blocks._precision import compute_dtype, full_precision
from jepa_blocks.losses._contrastive import gather_rows, global_mean, unit_rows
from jepa_blocks.losses.output import LossModule, LossOutput

__all__ = ["NTXentLoss", "ntxent_loss"]


def _ntxent_value(a: Tensor, b: Tensor, temperature: float, gather: bool) -> Tensor:
    """NT-Xent of trusted local views ``a``, ``b`` (n, D) in the compute dtype."""
    n, d = a.shape
    ua, ub = unit_rows(a), unit_rows(b)
    rows, offset = gather_rows(torch.cat([ua, ub], dim=1), gather)  # one collective
    m = rows.shape[0]  # global number of pairs
    if m < 2:
        raise ValueError(
            f"z_a and z_b must hold at least 2 pairs in the (global) batch (NT-Xent needs "
            f"negatives), got {m}"
        )
    # Keys in SimCLR's 2N order: view-a rows 0..M-1, then view-b rows M..2M-1.
    keys = torch.cat([rows[:, :d], rows[:, d:]], dim=0)  # (2M, D)
    anchors = torch.cat([ua, ub], dim=0) / temperature  # (2n, D): local view a, then b
    logits = anchors @ keys.T  # (2n, 2M)
    pair = torch.arange(n, device=a.device) + offset  # global pair index of local row i
    self_col = torch.cat([pair, pair + m])  # where each anchor sits among the keys
    pos_col = torch.cat([pair + m, pair])  # the other view of the same sample
    cols = torch.arange(2 * m, device=a.device)
    logits = logits.masked_fill(cols[None, :] == self_col[:, None], float("-inf"))
    local_sum = F.cross_entropy(logits, pos_col, reduction="sum")
    return global_mean(local_sum, 2 * m, gather)


def _ntxent(
    z_a: Tensor,
    z_b: Tensor,
    temperature: float,
    gather_distributed: bool,
    names: tuple[str, str],
) -> Tensor:
    check_row_pairs(z_a, z_b, names)
    dtype = compute_dtype(z_a, z_b)
    with full_precision(z_a.device):
        return _ntxent_value(z_a.to(dtype), z_b.to(dtype), temperature, gather_distributed)


def ntxent_loss(
    z_a: Tensor,
    z_b: Tensor,
    *,
    temperature: float = 0.1,
    gather_distributed: bool = False,
) -> Tensor:
    """SimCLR's NT-Xent loss of two views, mean over the ``2N`` anchors.

    Args:
        z_a: Embeddings of the first view, shape ``(N, D)``.
        z_b: Embeddings of the second view, shape ``(N, D)``; row ``i`` is the positive
            of ``z_a[i]``.
        temperature: Softmax temperature, > 0 (SimCLR: 0.1).
        gather_distributed: Gather both views over the default process group (with
            gradients; local ``N`` may differ between ranks) and return the loss of the
            global batch on every rank; a no-op without a group.

    Returns:
        Scalar tensor, float32 (float64 for float64 input), >= 0.

    Raises:
        ValueError: If the (global) batch has fewer than 2 pairs.
    """
    temperature = check_float("temperature", temperature, min_value=0.0, min_inclusive=False)
    check_bool("gather_distributed", gather_distributed)
    return _ntxent(z_a, z_b, temperature, gather_distributed, ("z_a", "z_b"))


class NTXentLoss(LossModule):
    """NT-Xent (SimCLR) loss module with a fixed temperature.

    A drop-in for lightly's ``NTXentLoss`` without memory bank (``memory_bank_size=0``):
    same argument names and ``(N, D)`` inputs (like lightly, no ``(N, T, D)``: pool the
    tokens first), and ``forward`` returns a Tensor. The default temperature differs:
    0.1 here, 0.5 in lightly. 0.1 is SimCLR's ImageNet value (0.5 is from its
    small-batch CIFAR-10 runs) and the value the example trainer's contrastive term uses;
    pass ``temperature=0.5`` to reproduce lightly's numbers.

    As an extra term beside the latent (JEPA) loss, compare the average-pooled context
    encoder output of one crop with the average-pooled EMA-target features of a second
    crop of the same images (row ``i`` of both = image ``i``), and add
    ``weight * NTXentLoss(...)(pooled_context, pooled_target)`` to the latent loss. The
    target side is computed without gradient, so only the context encoder is pulled
    towards its positive and pushed from the other images.

    Args:
        temperature: Softmax temperature, > 0 (SimCLR: 0.1).
        gather_distributed: Contrast against the batch gathered over the default process
            group (see :func:`ntxent_loss`).

    Example:
        >>> criterion = NTXentLoss(temperature=0.1)
        >>> z_a, z_b = torch.randn(8, 16), torch.randn(8, 16)
        >>> loss = criterion(z_a, z_b)
        >>> loss.shape, bool(loss > 0), list(criterion.last_terms)
        (torch.Size([]), True, ['ntxent'])
    """

    def __init__(self, *, temperature: float = 0.1, gather_distributed: bool = False) -> None:
        super().__init__()
        self.temperature = check_float(
            "temperature", temperature, min_value=0.0, min_inclusive=False
        )
        self.gather_distributed = check_bool("gather_distributed", gather_distributed)

    def forward(
        self, z_a: Tensor, z_b: Tensor, *, return_terms: bool = False
    ) -> Tensor | LossOutput:
        """NT-Xent of two views.

        Args:
            z_a: Embeddings of the first view, shape ``(N, D)``.
            z_b: Embeddings of the second view, shape ``(N, D)``.
            return_terms: Return ``LossOutput(total, {"ntxent": total})`` instead of the
                Tensor.

        Returns:
            Scalar tensor (float32, or float64 for float64 input).
        """
        value = _ntxent(z_a, z_b, self.temperature, self.gather_distributed, ("z_a", "z_b"))
        return self._output(LossOutput(value, {"ntxent": value}), return_terms)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, gather_distributed={self.gather_distributed}"
