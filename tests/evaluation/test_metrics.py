import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from jepa_blocks.evaluation import (
    anisotropy,
    collapse_stats,
    effective_rank,
    feature_std,
    is_collapsed,
    isotropy,
    rank_ratio,
    uniformity,
)


def orthonormal(n, k, seed, avoid_ones=False):
    """(n, k) matrix with orthonormal columns; optionally orthogonal to the all-ones vector."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, k + 1, dtype=torch.float64, generator=g)
    if avoid_ones:
        a[:, 0] = 1.0
    q, _ = torch.linalg.qr(a)
    return q[:, 1:] if avoid_ones else q[:, :k]


def with_singular_values(n, d, values, seed=0):
    """(n, d) matrix, already centred, whose singular values are exactly `values`; plus an offset row."""
    k = len(values)
    u = orthonormal(n, k, seed, avoid_ones=True)  # columns sum to 0: centring leaves u unchanged
    v = orthonormal(d, k, seed + 1)
    offset = torch.randn(
        1, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 2)
    )
    return u @ torch.diag(torch.tensor(values, dtype=torch.float64)) @ v.T + 3 * offset


def random_rotation(d, seed):
    return orthonormal(d, d, seed)


# --- effective rank -------------------------------------------------------------------


def test_effective_rank_isotropic_gaussian():
    g = torch.Generator().manual_seed(0)
    tall = torch.randn(4000, 32, generator=g)
    assert effective_rank(tall) == pytest.approx(32, rel=0.03)
    assert rank_ratio(tall) == pytest.approx(1.0, rel=0.03)
    wide = torch.randn(32, 4000, generator=g)
    assert effective_rank(wide) == pytest.approx(32, rel=0.05)  # 31 after centring


@pytest.mark.parametrize("k", [1, 2, 5, 17])
def test_effective_rank_equal_singular_values_is_k(k):
    z = with_singular_values(60, 24, [2.5] * k, seed=k)
    assert effective_rank(z) == pytest.approx(k, abs=1e-9)


def test_effective_rank_matches_entropy_formula():
    # Roy & Vetterli: p = s / sum(s), erank = exp(-sum p log p).
    s = [3.0, 1.0, 0.5]
    p = [v / sum(s) for v in s]
    expected = math.exp(-sum(q * math.log(q) for q in p))
    assert effective_rank(with_singular_values(40, 10, s)) == pytest.approx(expected, abs=1e-9)


def test_effective_rank_rank_one_and_constant():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(100, 1, generator=g) * torch.randn(1, 50, generator=g) + torch.randn(
        1, 50, generator=g
    )
    assert effective_rank(z) == pytest.approx(1.0, abs=1e-4)
    assert effective_rank(torch.ones(10, 4) * 7.0) == 1.0


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), scale=st.floats(1e-3, 1e3))
def test_effective_rank_rotation_and_scale_invariant(seed, scale):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(30, 12, dtype=torch.float64, generator=g) * torch.linspace(
        0.1, 3, 12, dtype=torch.float64
    )
    r = random_rotation(12, seed)
    ref = effective_rank(z)
    assert 1.0 <= ref <= 12.0
    assert effective_rank(z @ r) == pytest.approx(ref, rel=1e-9)
    assert effective_rank(scale * z) == pytest.approx(ref, rel=1e-9)
    assert isotropy(z @ r, method="entropy") == pytest.approx(
        isotropy(z, method="entropy"), rel=1e-9
    )
    assert isotropy(scale * z) == pytest.approx(isotropy(z), rel=1e-7)
    assert uniformity(z @ r) == pytest.approx(uniformity(z), abs=1e-9)


def test_effective_rank_float32_input_and_rank_ratio():
    z = torch.randn(50, 8)
    assert effective_rank(z) == pytest.approx(effective_rank(z.double()), rel=1e-6)
    assert rank_ratio(z) == pytest.approx(effective_rank(z) / 8)
    assert rank_ratio(z.T) == pytest.approx(effective_rank(z.T) / 8)


# --- std and collapse -----------------------------------------------------------------


def test_feature_std_and_collapse_stats():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(200, 6, generator=g) * torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 0.0])
    std = feature_std(z)
    assert std.shape == (6,) and std.dtype == torch.float32
    for d in range(6):
        col = z[:, d].double().tolist()
        m = sum(col) / len(col)
        assert std[d].item() == pytest.approx(
            math.sqrt(sum((c - m) ** 2 for c in col) / (len(col) - 1)), rel=1e-5
        )
    assert feature_std(z.double()).dtype == torch.float64
    stats = collapse_stats(z)
    assert set(stats) == {
        "std_mean",
        "std_min",
        "effective_rank",
        "rank_ratio",
        "norm_mean",
        "dead_fraction",
    }
    assert stats["std_min"] == 0.0
    assert stats["dead_fraction"] == pytest.approx(1 / 6)
    assert stats["std_mean"] == pytest.approx(std.mean().item(), rel=1e-6)
    assert stats["norm_mean"] == pytest.approx(z.norm(dim=1).mean().item(), rel=1e-5)
    assert stats["rank_ratio"] == pytest.approx(stats["effective_rank"] / 6)
    assert all(isinstance(v, float) for v in stats.values())


def test_collapse_detection():
    g = torch.Generator().manual_seed(3)
    healthy = torch.randn(512, 192, generator=g)
    point = torch.randn(1, 192, generator=g) + 1e-6 * torch.randn(512, 192, generator=g)
    line = torch.randn(512, 1, generator=g) * torch.randn(
        1, 192, generator=g
    )  # rank 1, large variance
    ok, reason = is_collapsed(collapse_stats(healthy))
    assert not ok and reason.startswith("healthy")
    bad, reason = is_collapsed(collapse_stats(point))
    assert bad and "complete collapse" in reason and "std_threshold" in reason
    bad, reason = is_collapsed(collapse_stats(line))
    assert bad and "dimensional collapse" in reason and "rank_ratio_threshold" in reason
    # Thresholds are the caller's: a stricter rank threshold flags low-rank-but-alive features.
    low_rank = torch.randn(512, 4, generator=g) @ torch.randn(4, 192, generator=g)
    assert not is_collapsed(collapse_stats(low_rank))[0]
    assert is_collapsed(collapse_stats(low_rank), rank_ratio_threshold=0.1)[0]
    nan_stats = dict(collapse_stats(healthy), std_mean=float("nan"))
    assert is_collapsed(nan_stats)[0]


def test_is_collapsed_bad_inputs():
    with pytest.raises(TypeError, match="stats"):
        is_collapsed(torch.randn(4, 4))
    with pytest.raises(ValueError, match="stats"):
        is_collapsed({"std_mean": 1.0})
    stats = collapse_stats(torch.randn(20, 4))
    with pytest.raises(ValueError, match="rank_ratio_threshold"):
        is_collapsed(stats, rank_ratio_threshold=1.5)
    with pytest.raises(ValueError, match="std_threshold"):
        is_collapsed(stats, std_threshold=-1.0)


# --- uniformity -----------------------------------------------------------------------


def test_uniformity_matches_pairwise_loop():
    g = torch.Generator().manual_seed(4)
    z = torch.randn(12, 5, dtype=torch.float64, generator=g)
    u = [row / row.norm() for row in z]
    terms = [
        math.exp(-2.0 * float((u[i] - u[j]).square().sum()))
        for i in range(12)
        for j in range(i + 1, 12)
    ]
    assert uniformity(z) == pytest.approx(math.log(sum(terms) / len(terms)), abs=1e-12)


def test_uniformity_spread_below_collapsed():
    g = torch.Generator().manual_seed(5)
    spread = torch.randn(500, 16, generator=g)
    clustered = torch.randn(1, 16, generator=g) + 0.05 * torch.randn(500, 16, generator=g)
    assert uniformity(spread) < uniformity(clustered) - 1.0
    assert uniformity(torch.ones(50, 16) * 3.0) == pytest.approx(0.0, abs=1e-12)
    assert -8.0 <= uniformity(spread) <= 0.0


def test_uniformity_subset_is_seeded():
    z = torch.randn(3000, 8, generator=torch.Generator().manual_seed(6))
    a = uniformity(z, max_samples=256, seed=1)
    assert a == uniformity(z, max_samples=256, seed=1)
    assert a != uniformity(z, max_samples=256, seed=2)
    assert a == pytest.approx(uniformity(z), abs=0.05)


# --- isotropy and anisotropy ----------------------------------------------------------


def test_isotropy_whitened_and_rank_deficient():
    n, d = 100, 8
    white = orthonormal(n, d, 7, avoid_ones=True) * math.sqrt(n - 1) + 5.0  # covariance exactly I
    assert isotropy(white) == pytest.approx(1.0, abs=1e-9)
    assert isotropy(white, method="entropy") == pytest.approx(1.0, abs=1e-9)
    deficient = with_singular_values(100, 8, [3.0, 2.0, 1.0])
    assert isotropy(deficient) == 0.0
    assert 0.0 < isotropy(deficient, method="entropy") < 1.0
    rank1 = with_singular_values(100, 8, [3.0])
    assert isotropy(rank1, method="entropy") == pytest.approx(0.0, abs=1e-9)
    assert isotropy(torch.randn(10, 20)) == 0.0  # N <= D: never full rank
    assert isotropy(torch.ones(5, 3)) == 0.0


def test_isotropy_entropy_matches_formula():
    z = with_singular_values(30, 4, [4.0, 2.0, 1.0, 1.0])
    lam = [v**2 for v in (4.0, 2.0, 1.0, 1.0)]
    p = [v / sum(lam) for v in lam]
    expected = -sum(q * math.log(q) for q in p) / math.log(4)
    assert isotropy(z, method="entropy") == pytest.approx(expected, abs=1e-9)
    assert isotropy(z) == pytest.approx(1.0 / 16.0, abs=1e-9)


def test_anisotropy():
    g = torch.Generator().manual_seed(8)
    z = torch.randn(15, 4, dtype=torch.float64, generator=g)
    u = z / z.norm(dim=1, keepdim=True)
    pairs = [float(u[i] @ u[j]) for i in range(15) for j in range(15) if i != j]
    assert anisotropy(z) == pytest.approx(sum(pairs) / len(pairs), abs=1e-12)
    assert anisotropy(torch.ones(10, 3) * torch.arange(1.0, 11.0)[:, None]) == pytest.approx(1.0)
    assert abs(anisotropy(torch.randn(2000, 16, generator=g))) < 0.01
    shared = torch.randn(2000, 16, generator=g) + 10.0  # one component dominates
    assert anisotropy(shared) > 0.9


# --- bad inputs -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "fn",
    [effective_rank, rank_ratio, feature_std, collapse_stats, uniformity, isotropy, anisotropy],
)
def test_bad_feature_matrices(fn):
    with pytest.raises(ValueError, match="z"):
        fn(torch.randn(1, 4))
    with pytest.raises(ValueError, match="z"):
        fn(torch.randn(4))
    with pytest.raises(ValueError, match="z"):
        fn(torch.randn(2, 3, 4))
    with pytest.raises(TypeError, match="z"):
        fn(torch.ones(4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="z"):
        fn(torch.full((4, 4), float("nan")))
    with pytest.raises(TypeError, match="z"):
        fn([[1.0, 2.0], [3.0, 4.0]])


def test_bad_options():
    z = torch.randn(10, 4)
    with pytest.raises(ValueError, match="t"):
        uniformity(z, t=0.0)
    with pytest.raises(ValueError, match="max_samples"):
        uniformity(z, max_samples=1)
    with pytest.raises(ValueError, match="method"):
        isotropy(z, method="max")
    with pytest.raises(ValueError, match="dead_threshold"):
        collapse_stats(z, dead_threshold=-1.0)


def test_docstring_examples_run():
    import doctest
    import importlib

    module = importlib.import_module("jepa_blocks.evaluation.metrics")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
