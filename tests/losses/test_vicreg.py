"""Tests for jepa_blocks.losses.vicreg."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from jepa_blocks.losses import (
    LossOutput,
    VICRegLoss,
    covariance_loss,
    invariance_loss,
    variance_loss,
    vicreg_loss,
)

F64 = torch.float64


def _rand(*shape, seed=0, dtype=F64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _published(x, y, lam=25.0, mu=25.0, nu=1.0, eps=1e-4):
    """The facebookresearch/vicreg formula with explicit loops and an explicit mask."""
    n, d = x.shape
    inv = sum((x[i, j] - y[i, j]) ** 2 for i in range(n) for j in range(d)) / (n * d)
    terms_std, terms_cov = [], []
    for z in (x, y):
        zc = z - z.sum(0) / n
        std = torch.sqrt((zc**2).sum(0) / (n - 1) + eps)
        terms_std.append(torch.clamp(1 - std, min=0).mean())
        cov = torch.zeros(d, d, dtype=z.dtype)
        for i in range(d):
            for j in range(d):
                cov[i, j] = (zc[:, i] * zc[:, j]).sum() / (n - 1)
        off = ~torch.eye(d, dtype=torch.bool)
        terms_cov.append(cov[off].pow(2).sum() / d)
    var = terms_std[0] / 2 + terms_std[1] / 2
    cov = terms_cov[0] + terms_cov[1]
    return lam * inv + mu * var + nu * cov, inv, var, cov


@settings(max_examples=20, deadline=None)
@given(
    n=st.integers(2, 9),
    d=st.integers(1, 9),
    scale=st.floats(0.05, 3.0),
    seed=st.integers(0, 2**16),
)
def test_matches_published_formula(n, d, scale, seed):
    # n < d uses the (N, N) Gram path, n >= d the (D, D) covariance path.
    x = _rand(n, d, seed=seed) * scale
    y = _rand(n, d, seed=seed + 1) * scale + 0.3
    total, terms = vicreg_loss(x, y)
    ref_total, ref_inv, ref_var, ref_cov = _published(x, y)
    torch.testing.assert_close(total, ref_total, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(terms["invariance"], ref_inv, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(terms["variance"], ref_var, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(terms["covariance"], ref_cov, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(invariance_loss(x, y), ref_inv, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        0.5 * (variance_loss(x) + variance_loss(y)), ref_var, rtol=1e-10, atol=1e-12
    )
    torch.testing.assert_close(
        covariance_loss(x) + covariance_loss(y), ref_cov, rtol=1e-9, atol=1e-12
    )


def test_gradients_match_published_formula():
    for n, d in ((5, 12), (12, 5)):
        x = _rand(n, d, seed=1).requires_grad_(True)
        y = _rand(n, d, seed=2).requires_grad_(True)
        gx, gy = torch.autograd.grad(vicreg_loss(x, y).total, (x, y))
        rx, ry = torch.autograd.grad(_published(x, y)[0], (x, y))
        torch.testing.assert_close(gx, rx, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(gy, ry, rtol=1e-9, atol=1e-12)


def test_output_type_weights_and_module():
    x, y = _rand(16, 8, seed=3), _rand(16, 8, seed=4)
    out = vicreg_loss(x, y, lambda_param=2.0, mu_param=3.0, nu_param=0.5)
    assert isinstance(out, LossOutput) and set(out.terms) == {
        "invariance",
        "variance",
        "covariance",
    }
    t = out.terms
    expected = 2.0 * t["invariance"] + 3.0 * t["variance"] + 0.5 * t["covariance"]
    torch.testing.assert_close(out.total, expected)
    module = VICRegLoss(lambda_param=2.0, mu_param=3.0, nu_param=0.5)
    loss, terms = module(x, y, return_terms=True)
    torch.testing.assert_close(loss, out.total, rtol=0, atol=0)
    assert "lambda_param=2.0" in repr(module)


def test_invariance_zero_and_variance_zero_when_std_at_least_one():
    x = _rand(32, 6, seed=5) * 3
    assert (x.std(0) >= 1).all()
    _, terms = vicreg_loss(x, x.clone())
    assert terms["invariance"] == 0
    assert terms["variance"] == 0


def test_constant_features():
    x = torch.full((8, 4), 2.5)
    total, terms = vicreg_loss(x, x)
    torch.testing.assert_close(terms["variance"], torch.tensor(0.99))
    torch.testing.assert_close(total, torch.tensor(24.75))
    assert terms["covariance"] == 0
    # eps keeps the gradient finite at collapse.
    z = torch.zeros(8, 4, requires_grad=True)
    vicreg_loss(z, z * 1.0).total.backward()
    assert torch.isfinite(z.grad).all()


def test_permutation_symmetry_translation_and_scaling():
    x, y = _rand(20, 7, seed=6), _rand(20, 7, seed=7)
    total, terms = vicreg_loss(x, y)
    rows = torch.randperm(20, generator=torch.Generator().manual_seed(0))
    cols = torch.randperm(7, generator=torch.Generator().manual_seed(1))
    for xx, yy in ((x[rows], y[rows]), (x[:, cols], y[:, cols]), (y, x)):
        torch.testing.assert_close(vicreg_loss(xx, yy).total, total, rtol=1e-12, atol=1e-12)
    shift = _rand(7, seed=8) * 5
    torch.testing.assert_close(
        vicreg_loss(x + shift, y + shift).total, total, rtol=1e-12, atol=1e-12
    )
    # Independent shifts leave the variance and covariance terms unchanged.
    _, shifted = vicreg_loss(x + shift, y - shift)
    torch.testing.assert_close(shifted["variance"], terms["variance"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(shifted["covariance"], terms["covariance"], rtol=1e-12, atol=1e-12)
    s = 1.7
    _, scaled = vicreg_loss(s * x, s * y)
    torch.testing.assert_close(scaled["invariance"], s**2 * terms["invariance"], rtol=1e-12, atol=0)
    torch.testing.assert_close(scaled["covariance"], s**4 * terms["covariance"], rtol=1e-10, atol=0)


def test_isotropic_gaussian_covariance_floor():
    n, d = 64, 16
    values = [
        float(vicreg_loss(_rand(n, d, seed=s), _rand(n, d, seed=100 + s)).terms["covariance"])
        for s in range(8)
    ]
    floor = 2 * (d - 1) / (n - 1)
    assert abs(sum(values) / len(values) / floor - 1) < 0.15


def test_low_precision_and_autocast():
    x, y = _rand(32, 16, seed=9, dtype=torch.float32), _rand(32, 16, seed=10, dtype=torch.float32)
    ref = vicreg_loss(x, y).total
    for dtype in (torch.bfloat16, torch.float16):
        xb = x.to(dtype).requires_grad_(True)
        out = vicreg_loss(xb, y.to(dtype)).total
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, ref, rtol=0.02, atol=0.02)
        torch.testing.assert_close(
            out, vicreg_loss(xb.detach().float(), y.to(dtype).float()).total, rtol=1e-6, atol=1e-6
        )
        out.backward()
        assert xb.grad.dtype == dtype and torch.isfinite(xb.grad.float()).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vicreg_loss(x, y).total
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert vicreg_loss(x.double(), y.double()).total.dtype == F64


def test_gather_flag_without_group_is_plain():
    x, y = _rand(10, 5, seed=11), _rand(10, 5, seed=12)
    a = vicreg_loss(x, y, gather_distributed=True).total
    assert torch.equal(a, vicreg_loss(x, y).total)


def test_bad_inputs_name_the_argument():
    x = _rand(4, 3)
    with pytest.raises(ValueError, match="x"):
        vicreg_loss(x[:1], x[:1])
    with pytest.raises(ValueError, match="y"):
        vicreg_loss(x, _rand(4, 2))
    with pytest.raises(ValueError, match="x"):
        vicreg_loss(x[0], x[0])
    with pytest.raises(TypeError, match="y"):
        vicreg_loss(x, torch.ones(4, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="lambda_param"):
        vicreg_loss(x, x, lambda_param=-1.0)
    with pytest.raises(ValueError, match="eps"):
        variance_loss(x, eps=-1e-3)
    with pytest.raises(ValueError, match="x"):
        variance_loss(x[:1])
    with pytest.raises(ValueError, match="x"):
        covariance_loss(x[:1])
    with pytest.raises(ValueError, match="y"):
        invariance_loss(x, x[:2])
    with pytest.raises(ValueError, match="mu_param"):
        VICRegLoss(mu_param=-2.0)
    with pytest.raises(TypeError, match="gather_distributed"):
        VICRegLoss(gather_distributed=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="z_a"):
        VICRegLoss()(x[:1], x[:1])
    with pytest.raises(ValueError, match="z_b"):
        VICRegLoss()(x, x[:, :2])


def _lightly_tokens(x, y, lam=25.0, mu=25.0, nu=1.0, eps=1e-4):
    """VICReg of (N, T, D) pairs as lightly's VICRegLoss writes it (VICRegL): variance over
    dim 0 per (t, d), covariance per position t by einsum and a mask, means over T."""
    inv = ((x - y) ** 2).mean()

    def var(z):
        return torch.relu(1 - torch.sqrt(z.var(dim=0) + eps)).mean()

    def cov(z):
        zc = z - z.mean(dim=0)
        n, d = z.shape[0], z.shape[-1]
        c = torch.einsum("btc,btd->tcd", zc, zc) / (n - 1)
        off = ~torch.eye(d, dtype=torch.bool)
        return (c[:, off] ** 2).sum(-1).div(d).mean()

    return lam * inv + mu * (var(x) + var(y)) / 2 + nu * (cov(x) + cov(y))


@settings(max_examples=15, deadline=None)
@given(
    n=st.integers(2, 7),
    t=st.integers(1, 4),
    d=st.integers(1, 9),
    seed=st.integers(0, 2**16),
)
def test_tokens_match_lightly_and_mean_over_positions(n, t, d, seed):
    x = _rand(n, t, d, seed=seed).requires_grad_(True)
    y = _rand(n, t, d, seed=seed + 1) * 0.7 + 0.2
    criterion = VICRegLoss()
    loss = criterion(x, y)
    torch.testing.assert_close(loss, _lightly_tokens(x, y), rtol=1e-10, atol=1e-12)
    per_position = [vicreg_loss(x[:, i], y[:, i]) for i in range(t)]
    torch.testing.assert_close(loss, sum(o.total for o in per_position) / t, rtol=1e-10, atol=1e-12)
    for name in ("invariance", "variance", "covariance"):
        mean_term = sum(o.terms[name] for o in per_position) / t
        torch.testing.assert_close(criterion.last_terms[name], mean_term, rtol=1e-10, atol=1e-12)
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_token_inputs_are_checked():
    x = _rand(4, 3, 5)
    with pytest.raises(ValueError, match="z_b"):
        VICRegLoss()(x, x[:, :2])
    with pytest.raises(ValueError, match="z_a"):
        VICRegLoss()(x[:1], x[:1])
    with pytest.raises(ValueError, match="z_a"):
        VICRegLoss()(x[None], x[None])  # 4-D
    with pytest.raises(ValueError, match="z_b"):
        VICRegLoss()(x, x.flatten(1))  # 3-D against 2-D


# ---- two gloo processes ------------------------------------------------------------------


def _worker_vicreg(rank: int, world: int) -> None:
    sizes = (3, 6)  # unequal local batch sizes
    for d in (4, 12):  # covariance path and Gram path
        full_x, full_y = _rand(sum(sizes), d, seed=20), _rand(sum(sizes), d, seed=21) * 0.5
        start = sum(sizes[:rank])
        sl = slice(start, start + sizes[rank])
        x = full_x[sl].clone().requires_grad_(True)
        y = full_y[sl].clone().requires_grad_(True)
        out = VICRegLoss(gather_distributed=True)(x, y, return_terms=True)
        out.total.backward()
        rx, ry = full_x.clone().requires_grad_(True), full_y.clone().requires_grad_(True)
        ref = vicreg_loss(rx, ry)
        ref.total.backward()
        torch.testing.assert_close(out.total, ref.total, rtol=1e-12, atol=1e-12)
        for name in ref.terms:
            torch.testing.assert_close(out.terms[name], ref.terms[name], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(x.grad, world * rx.grad[sl], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(y.grad, world * ry.grad[sl], rtol=1e-9, atol=1e-12)


@pytest.mark.distributed
def test_gloo_gather_equals_single_process(run_gloo):
    run_gloo(_worker_vicreg)
