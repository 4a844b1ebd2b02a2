import pytest
import torch

from jepa_blocks.evaluation import (
    anisotropy,
    codebook_usage,
    collapse_stats,
    effective_rank,
    embedding_diagnostics,
    is_collapsed,
    isotropy,
    uniformity,
)

KEYS = {
    "std_mean",
    "std_min",
    "effective_rank",
    "rank_ratio",
    "norm_mean",
    "dead_fraction",
    "isotropy",
    "uniformity",
    "anisotropy",
}


def features(n, d, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5  # correlated dimensions, non-zero mean
    return (torch.randn(n, d, generator=g) @ mix + torch.randn(d, generator=g)).to(dtype)


# --- embedding_diagnostics ------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method", ["entropy", "ratio"])
def test_values_equal_the_individual_functions(dtype, method):
    z = features(300, 12, dtype=dtype)
    stats = embedding_diagnostics(z, isotropy_method=method, uniformity_t=1.5, dead_threshold=0.3)
    assert set(stats) == KEYS and all(isinstance(v, float) for v in stats.values())
    want = {
        **collapse_stats(z, dead_threshold=0.3),
        "isotropy": isotropy(z, method=method),
        "uniformity": uniformity(z, 1.5),
        "anisotropy": anisotropy(z),
    }
    assert stats == pytest.approx(want, rel=1e-12, abs=1e-12)


def test_subsampling_is_the_documented_seeded_row_subset():
    z = features(500, 6, seed=1)
    stats = embedding_diagnostics(z, max_samples=64, seed=7)
    rows = torch.randperm(500, generator=torch.Generator().manual_seed(7))[:64]
    assert stats == pytest.approx(embedding_diagnostics(z[rows], max_samples=64), rel=1e-12)
    assert stats == embedding_diagnostics(z, max_samples=64, seed=7)  # deterministic
    assert stats != embedding_diagnostics(z, max_samples=64, seed=8)
    torch.manual_seed(123)  # the global RNG plays no part
    assert stats == embedding_diagnostics(z, max_samples=64, seed=7)
    assert effective_rank(z[rows]) == stats["effective_rank"]


def test_codebook_usage_is_added_when_codes_are_given():
    from jepa_blocks import quantizers

    assert codebook_usage is quantizers.codebook_usage  # one function, defined with the quantiser
    z = features(40, 4)
    stats = embedding_diagnostics(z, codes=torch.tensor([[0, 2], [2, 5]]), num_codes=8)
    assert set(stats) == KEYS | {"codebook_usage"}
    assert stats["codebook_usage"] == 3 / 8


def test_collapsed_inputs():
    const = torch.full((50, 16), 0.7)
    stats = embedding_diagnostics(const)
    assert stats["effective_rank"] == 1.0 and stats["std_mean"] == 0.0
    assert stats["dead_fraction"] == 1.0 and stats["isotropy"] == 0.0
    assert stats["anisotropy"] == pytest.approx(1.0) and stats["uniformity"] == pytest.approx(0.0)
    assert is_collapsed(stats)[0]
    # Dimensional collapse: every row on one line (rank 1), yet a healthy std.
    g = torch.Generator().manual_seed(0)
    line = torch.randn(200, 1, generator=g, dtype=torch.float64) * torch.randn(
        1, 16, generator=g, dtype=torch.float64
    )
    stats = embedding_diagnostics(3 * line)
    assert stats["effective_rank"] == pytest.approx(1.0, abs=1e-9)
    assert stats["std_mean"] > 1.0 and stats["isotropy"] == pytest.approx(0.0, abs=1e-9)
    collapsed, reason = is_collapsed(stats, rank_ratio_threshold=0.1)
    assert collapsed and "dimensional" in reason


def test_healthy_gaussian_is_not_collapsed():
    stats = embedding_diagnostics(torch.randn(2000, 8, generator=torch.Generator().manual_seed(0)))
    assert stats["rank_ratio"] > 0.95 and stats["isotropy"] > 0.95
    assert abs(stats["anisotropy"]) < 0.05 and stats["uniformity"] < -3.0
    assert not is_collapsed(stats)[0]


def test_gradients_and_graph_are_not_touched():
    z = features(30, 5).requires_grad_()
    stats = embedding_diagnostics(z)
    assert z.grad is None and all(isinstance(v, float) for v in stats.values())


@pytest.mark.parametrize(
    "z, kwargs, exc, name",
    [
        (torch.randn(10), {}, ValueError, "z"),
        (torch.ones(10, 3, dtype=torch.long), {}, TypeError, "z"),
        (torch.randn(1, 3), {}, ValueError, "z"),
        (torch.tensor([[0.0, 1.0], [float("nan"), 1.0]]), {}, ValueError, "z"),
        ([[0.0, 1.0]], {}, TypeError, "z"),
        (torch.randn(10, 3), {"codes": torch.tensor([0, 1])}, ValueError, "num_codes"),
        (torch.randn(10, 3), {"num_codes": 4}, ValueError, "codes"),
        (torch.randn(10, 3), {"codes": torch.tensor([0, 4]), "num_codes": 4}, ValueError, "codes"),
        (torch.randn(10, 3), {"max_samples": 1}, ValueError, "max_samples"),
        (torch.randn(10, 3), {"seed": 0.5}, TypeError, "seed"),
        (torch.randn(10, 3), {"isotropy_method": "max"}, ValueError, "isotropy_method"),
        (torch.randn(10, 3), {"uniformity_t": 0.0}, ValueError, "uniformity_t"),
        (torch.randn(10, 3), {"dead_threshold": -1.0}, ValueError, "dead_threshold"),
    ],
)
def test_bad_arguments_name_the_argument(z, kwargs, exc, name):
    with pytest.raises(exc, match=name):
        embedding_diagnostics(z, **kwargs)
