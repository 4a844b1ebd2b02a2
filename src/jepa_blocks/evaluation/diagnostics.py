"""One call that gathers the embedding diagnostics for logging.

It adds :func:`~jepa_blocks.quantizers.vq.codebook_usage` when a quantiser's codes are
given (defined with the quantiser; :mod:`jepa_blocks.evaluation` re-exports it).
"""

from __future__ import annotations

from typing import Literal

import torch

from jepa_blocks._checks import check_choice, check_float, check_int, check_tensor
from jepa_blocks.evaluation.metrics import (
    _subset,
    anisotropy,
    collapse_stats,
    isotropy,
    uniformity,
)
from jepa_blocks.quantizers.vq import codebook_usage

__all__ = ["embedding_diagnostics"]


def embedding_diagnostics(
    z: torch.Tensor,
    *,
    codes: torch.Tensor | None = None,
    num_codes: int | None = None,
    max_samples: int = 1024,
    seed: int = 0,
    isotropy_method: Literal["ratio", "entropy"] = "entropy",
    uniformity_t: float = 2.0,
    dead_threshold: float = 1e-4,
) -> dict[str, float]:
    """All embedding diagnostics of :mod:`jepa_blocks.evaluation.metrics` in one dict, for logging.

    At most ``max_samples`` rows are used: for ``N > max_samples`` the rows
    ``torch.randperm(N, generator=torch.Generator().manual_seed(seed))[:max_samples]``
    (deterministic, independent of the global RNG). Only those rows are copied to the
    CPU and every statistic is computed there in float64, so the cost is bounded
    (about an SVD of a ``(max_samples, D)`` matrix and ``max_samples^2 / 2`` pair
    distances) whatever ``N`` and the device. The statistics come from the functions of
    :mod:`~jepa_blocks.evaluation.metrics` (see there for definitions and ranges).

    Args:
        z: Embeddings of shape ``(N, D)``, ``N >= 2``, finite, on any device; gradients
            are not tracked.
        codes: Optional integer code ids of any shape ``(...)`` (e.g. a quantiser's
            codes of the same batch), all of them counted (no subsampling).
        num_codes: Codebook size ``K``; required exactly when ``codes`` is given.
        max_samples: Largest number of rows used, ``>= 2``.
        seed: Seed of the row subset.
        isotropy_method: ``"entropy"`` (default; informative also when ``N <= D``) or
            ``"ratio"`` (0 for any rank-deficient covariance), see
            :func:`~jepa_blocks.evaluation.metrics.isotropy`.
        uniformity_t: Kernel scale ``t > 0`` of the uniformity.
        dead_threshold: A dimension whose std is below this counts as dead.

    Returns:
        The keys of :func:`~jepa_blocks.evaluation.metrics.collapse_stats`
        (``std_mean``, ``std_min``, ``effective_rank``, ``rank_ratio``, ``norm_mean``,
        ``dead_fraction``; so the dict can be passed to
        :func:`~jepa_blocks.evaluation.metrics.is_collapsed`), plus ``isotropy``,
        ``uniformity``, ``anisotropy``, and ``codebook_usage`` when ``codes`` is given.
        ``rank_ratio`` is relative to ``min(rows used, D)``.

    Example:
        >>> stats = embedding_diagnostics(torch.randn(500, 8), max_samples=256)
        >>> sorted(stats)[:4], round(stats["rank_ratio"], 1)
        (['anisotropy', 'dead_fraction', 'effective_rank', 'isotropy'], 1.0)
        >>> embedding_diagnostics(torch.ones(6, 8))["effective_rank"]  # complete collapse
        1.0
    """
    check_tensor("z", z, ndim=2, kind="float")
    if (codes is None) != (num_codes is None):
        missing = "num_codes" if num_codes is None else "codes"
        raise ValueError(f"codes and num_codes must be given together, {missing} is None")
    max_samples = check_int("max_samples", max_samples, min_value=2)
    seed = check_int("seed", seed, min_value=-(2**63), max_value=2**64 - 1)  # manual_seed's range
    isotropy_method = check_choice("isotropy_method", isotropy_method, ("ratio", "entropy"))
    uniformity_t = check_float("uniformity_t", uniformity_t, min_value=0.0, min_inclusive=False)
    # Subset first, then one copy of the used rows to the CPU in float64.
    zs = _subset(z.detach(), max_samples, seed).to("cpu", torch.float64)
    stats = collapse_stats(zs, dead_threshold=dead_threshold)  # checks rows >= 2, finite
    stats["isotropy"] = isotropy(zs, method=isotropy_method)
    stats["uniformity"] = uniformity(zs, uniformity_t, max_samples=max_samples, seed=seed)
    stats["anisotropy"] = anisotropy(zs)
    if codes is not None:
        stats["codebook_usage"] = codebook_usage(codes, num_codes=num_codes)
    return stats
