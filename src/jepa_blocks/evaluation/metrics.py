"""Feature-quality and collapse diagnostics on a feature matrix ``Z`` of shape ``(N, D)``.

All statistics are computed in float64 and returned as Python floats (``feature_std``
returns a tensor). Definitions:

- **Effective rank** (Roy & Vetterli 2007; RankMe, Garrido et al. 2023): with
  ``s_1 .. s_r`` the singular values of the centred ``Z`` and ``p_i = s_i / sum_j s_j``,
  ``erank = exp(-sum_i p_i log p_i)``. It lies in ``[1, min(N - 1, D)]`` (centring removes
  one direction): ``k`` equal singular values give exactly ``k``. A matrix whose rows are
  all equal (no variance at all) is given ``1``.
- **Rank ratio**: ``erank / min(N, D)``, in ``(0, 1]``.
- **Uniformity** (Wang & Isola 2020): ``log mean_{i<j} exp(-t ||u_i - u_j||^2)`` over
  L2-normalised rows ``u``; in ``[-4t, 0]``, ``0`` when all rows point the same way,
  lower when they spread over the sphere.
- **Isotropy** of the covariance eigenvalues ``l_1 >= .. >= l_D``: ``"ratio"`` is
  ``l_D / l_1``, ``"entropy"`` is ``H(l / sum l) / log D``; both lie in ``[0, 1]`` and
  equal 1 exactly when the covariance is a multiple of the identity. The ratio is 0 for
  any rank-deficient covariance (always when ``N <= D``); the entropy is 0 only for rank 1
  and degrades smoothly.
- **Anisotropy** (Ethayarajh 2019): mean cosine similarity over pairs of distinct
  *uncentred* rows, in ``[-1/(N-1), 1]``; near 1 when one shared component dominates every
  feature (the dimensional collapse that centring before kNN undoes).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

from jepa_blocks._checks import check_choice, check_finite, check_float, check_int, check_tensor

__all__ = [
    "anisotropy",
    "collapse_stats",
    "effective_rank",
    "feature_std",
    "is_collapsed",
    "isotropy",
    "rank_ratio",
    "uniformity",
]


def _check_z(z: torch.Tensor, name: str = "z") -> torch.Tensor:
    """Validate a (N, D) float feature matrix with N >= 2 and return it in float64."""
    check_tensor(name, z, ndim=2, kind="float")
    if z.shape[0] < 2:
        raise ValueError(f"{name} must have at least 2 rows (samples), got shape {tuple(z.shape)}")
    check_finite((name, z))  # a value check (host sync), see jepa_blocks._checks
    return z.double()


def _entropy(p: torch.Tensor) -> float:
    """Shannon entropy (nats) of a probability vector, with 0 log 0 = 0."""
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def _effective_rank(z64: torch.Tensor) -> float:
    s = torch.linalg.svdvals(z64 - z64.mean(dim=0))
    total = s.sum()
    # No variance at all (or only round-off of it): one point, rank 1 by convention.
    if total <= 1e-12 * z64.abs().max().clamp_min(1e-300) * math.sqrt(z64.numel()):
        return 1.0
    return math.exp(_entropy(s / total))


def effective_rank(z: torch.Tensor) -> float:
    """Effective rank (RankMe) of the centred features.

    Args:
        z: Features of shape ``(N, D)``, ``N >= 2``.

    Returns:
        ``exp`` of the entropy of the normalised singular values, in ``[1, min(N, D)]``.

    Example:
        >>> round(effective_rank(torch.eye(4) * 3.0), 6)  # centred eye(4) has rank 3
        3.0
    """
    return _effective_rank(_check_z(z))


def rank_ratio(z: torch.Tensor) -> float:
    """Effective rank divided by ``min(N, D)``, in ``(0, 1]``.

    Args:
        z: Features of shape ``(N, D)``, ``N >= 2``.
    """
    z64 = _check_z(z)
    return _effective_rank(z64) / min(z64.shape)


def feature_std(z: torch.Tensor) -> torch.Tensor:
    """Per-dimension standard deviation (Bessel-corrected).

    Args:
        z: Features of shape ``(N, D)``, ``N >= 2``.

    Returns:
        Std of shape ``(D,)``, float64 for float64 ``z`` and float32 otherwise.
    """
    z64 = _check_z(z)
    return z64.std(dim=0).to(torch.float64 if z.dtype == torch.float64 else torch.float32)


def collapse_stats(z: torch.Tensor, *, dead_threshold: float = 1e-4) -> dict[str, float]:
    """Summary statistics for a collapse monitor.

    Args:
        z: Features of shape ``(N, D)``, ``N >= 2``.
        dead_threshold: A dimension whose std is below this is counted as dead.

    Returns:
        ``{"std_mean", "std_min", "effective_rank", "rank_ratio", "norm_mean",
        "dead_fraction"}``: mean and min per-dimension std, effective rank, rank ratio,
        mean L2 norm of the rows, fraction of dead dimensions.

    Example:
        >>> stats = collapse_stats(torch.randn(256, 8))
        >>> round(stats["dead_fraction"], 2), is_collapsed(stats)[0]
        (0.0, False)
    """
    dead_threshold = check_float("dead_threshold", dead_threshold, min_value=0.0)
    z64 = _check_z(z)
    std = z64.std(dim=0)
    erank = _effective_rank(z64)
    return {
        "std_mean": float(std.mean()),
        "std_min": float(std.min()),
        "effective_rank": erank,
        "rank_ratio": erank / min(z64.shape),
        "norm_mean": float(z64.norm(dim=1).mean()),
        "dead_fraction": float((std < dead_threshold).double().mean()),
    }


def _subset(z: torch.Tensor, max_samples: int, seed: int) -> torch.Tensor:
    if z.shape[0] <= max_samples:
        return z
    idx = torch.randperm(z.shape[0], generator=torch.Generator().manual_seed(seed))[:max_samples]
    return z[idx.to(z.device)]


def uniformity(z: torch.Tensor, t: float = 2.0, *, max_samples: int = 2048, seed: int = 0) -> float:
    """Uniformity loss of the L2-normalised rows (Wang & Isola 2020).

    Args:
        z: Features of shape ``(N, D)``, ``N >= 2``.
        t: Kernel scale, > 0.
        max_samples: Above this many rows a seeded random subset of this size is used.
        seed: Seed of that subset.

    Returns:
        ``log mean_{i<j} exp(-t ||u_i - u_j||^2)`` in ``[-4t, 0]``; lower is more uniform.
    """
    t = check_float("t", t, min_value=0.0, min_inclusive=False)
    max_samples = check_int("max_samples", max_samples, min_value=2)
    seed = check_int("seed", seed)
    u = F.normalize(_subset(_check_z(z), max_samples, seed), dim=1)
    sq = torch.pdist(u).square()  # (n (n - 1) / 2,): each unordered pair once
    return float(torch.logsumexp(-t * sq, dim=0) - math.log(sq.numel()))


def isotropy(z: torch.Tensor, *, method: Literal["ratio", "entropy"] = "ratio") -> float:
    """How evenly the feature covariance spreads over all directions.

    Args:
        z: Features of shape ``(N, D)``, ``N >= 2``.
        method: ``"ratio"``: smallest over largest covariance eigenvalue; ``"entropy"``:
            entropy of the normalised eigenvalues divided by ``log D``.

    Returns:
        A value in ``[0, 1]``, 1 for a covariance proportional to the identity (and, by
        convention, for ``D == 1``); 0 when all rows are equal.
    """
    method = check_choice("method", method, ("ratio", "entropy"))
    z64 = _check_z(z)
    zc = z64 - z64.mean(dim=0)
    eig = torch.linalg.eigvalsh(zc.T @ zc / (z64.shape[0] - 1)).clamp_min(0.0)  # ascending
    top = float(eig[-1])
    if top <= 0.0:
        return 0.0
    d = eig.numel()
    if d == 1:
        return 1.0
    if method == "ratio":
        # Eigenvalues below round-off of the largest are exact zeros of a rank-deficient matrix.
        low = float(eig[0])
        return 0.0 if low <= top * d * 1e-13 else min(low / top, 1.0)
    return min(_entropy(eig / eig.sum()) / math.log(d), 1.0)


def anisotropy(z: torch.Tensor) -> float:
    """Mean cosine similarity between distinct rows (no centring).

    Args:
        z: Features of shape ``(N, D)``, ``N >= 2``.

    Returns:
        A value in ``[-1 / (N - 1), 1]``; 1 when every row points the same way.
    """
    u = F.normalize(_check_z(z), dim=1)
    n = u.shape[0]
    # ||sum_i u_i||^2 = sum_i ||u_i||^2 + sum_{i != j} <u_i, u_j>: O(N D), no N x N matrix.
    pair_sum = u.sum(dim=0).square().sum() - u.square().sum()
    return float(pair_sum / (n * (n - 1)))


def is_collapsed(
    stats: dict[str, float],
    *,
    std_threshold: float = 1e-4,
    rank_ratio_threshold: float = 0.01,
) -> tuple[bool, str]:
    """Decide from :func:`collapse_stats` whether the features have collapsed.

    Two failure modes are checked: *complete* collapse (every input maps to nearly the
    same point: mean per-dimension std below ``std_threshold``) and *dimensional* collapse
    (the features span few directions: rank ratio below ``rank_ratio_threshold``). The
    default rank-ratio threshold of 0.01 flags an effective rank below ~2 of 192; a plain
    I-JEPA prototype here sat at ~4 of 192 (0.02), which is poor but still learning.

    Args:
        stats: Output of :func:`collapse_stats`.
        std_threshold: Mean-std threshold of complete collapse, >= 0 (absolute: pick it
            for the scale of your features).
        rank_ratio_threshold: Rank-ratio threshold of dimensional collapse, in [0, 1].

    Returns:
        ``(collapsed, reason)``, the reason naming the statistic, its value and the
        threshold.
    """
    if not isinstance(stats, dict):
        raise TypeError(f"stats must be a dict from collapse_stats, got {type(stats).__name__}")
    missing = [k for k in ("std_mean", "rank_ratio", "effective_rank") if k not in stats]
    if missing:
        raise ValueError(f"stats is missing keys {missing}; pass the output of collapse_stats")
    std_threshold = check_float("std_threshold", std_threshold, min_value=0.0)
    rank_ratio_threshold = check_float(
        "rank_ratio_threshold", rank_ratio_threshold, min_value=0.0, max_value=1.0
    )
    std_mean, ratio, erank = (
        float(stats["std_mean"]),
        float(stats["rank_ratio"]),
        float(stats["effective_rank"]),
    )
    if not all(math.isfinite(v) for v in (std_mean, ratio, erank)):
        return True, f"non-finite statistics: std_mean={std_mean}, rank_ratio={ratio}"
    if std_mean < std_threshold:
        return True, (
            f"complete collapse: mean feature std {std_mean:.3g} < std_threshold {std_threshold:.3g}"
        )
    if ratio < rank_ratio_threshold:
        return True, (
            f"dimensional collapse: rank ratio {ratio:.3g} (effective rank {erank:.3g}) "
            f"< rank_ratio_threshold {rank_ratio_threshold:.3g}"
        )
    return False, (
        f"healthy: mean feature std {std_mean:.3g} >= {std_threshold:.3g}, "
        f"rank ratio {ratio:.3g} (effective rank {erank:.3g}) >= {rank_ratio_threshold:.3g}"
    )
