"""LeJEPA's view loss against an independent re-derivation of the paper's formula."""

from __future__ import annotations

import pytest
import torch

from jepa_blocks.losses import LeJEPALoss, SIGRegLoss, lejepa_view_loss, sigreg


def _reference(z: torch.Tensor, lam: float, g: int, directions: torch.Tensor) -> torch.Tensor:
    """(1 - lam) * mean_v mean_n ||z_vn - c_n||^2 / P + lam * mean_v SIGReg(z_v), loop form."""
    v, n, p = z.shape
    centre = sum(z[i] for i in range(g)) / g
    inv = sum(((z[i] - centre) ** 2).sum() for i in range(v)) / (v * n * p)
    sig = sum(sigreg(z[i], directions=directions) for i in range(v)) / v
    return (1 - lam) * inv + lam * sig


@pytest.mark.parametrize(("v", "g", "lam"), [(2, 2, 0.05), (4, 2, 0.02), (3, 1, 0.5)])
def test_matches_formula(v, g, lam):
    torch.manual_seed(0)
    z = torch.randn(v, 16, 5, dtype=torch.float64)
    loss_fn = SIGRegLoss(num_directions=32, seed=3)
    a = loss_fn.directions(5, dtype=torch.float64)
    out = lejepa_view_loss(z, sigreg=loss_fn, lam=lam, num_global_views=g)
    torch.testing.assert_close(out.total, _reference(z, lam, g, a))
    assert set(out.terms) == {"invariance", "sigreg"}


def test_gather_distributed_without_group_is_plain():
    """Without a process group the global-batch invariance is the plain mean (same value,
    same gradients); the 2-rank case is in tests/test_distributed.py."""
    torch.manual_seed(0)
    z = torch.randn(3, 10, 4, dtype=torch.float64, requires_grad=True)
    loss_fn = SIGRegLoss(num_directions=8, seed=1).eval()
    plain = lejepa_view_loss(z, sigreg=loss_fn, lam=0.3, num_global_views=2).total
    (grad,) = torch.autograd.grad(plain, z)
    gathered = lejepa_view_loss(z, sigreg=loss_fn, lam=0.3, num_global_views=2, gather_distributed=True).total
    torch.testing.assert_close(gathered, plain, rtol=1e-12, atol=0)
    torch.testing.assert_close(torch.autograd.grad(gathered, z)[0], grad, rtol=1e-12, atol=1e-15)


def test_sigreg_is_per_view_not_on_flattened_views():
    """stable-pretraining issue 413: SIGReg of all views flattened is a different number."""
    torch.manual_seed(0)
    z = torch.randn(2, 32, 4, dtype=torch.float64)
    z[1] += 3.0  # the two views have different means
    loss_fn = SIGRegLoss(num_directions=16).eval()
    out = lejepa_view_loss(z, sigreg=loss_fn, lam=1.0)
    flattened = loss_fn(z.flatten(0, 1))
    per_view = (loss_fn(z[0]) + loss_fn(z[1])) / 2
    torch.testing.assert_close(out.total, per_view)
    assert not torch.allclose(out.total, flattened)


def test_identical_views_have_zero_invariance_and_gradients_flow():
    z = torch.randn(1, 8, 3).expand(3, 8, 3).clone().requires_grad_()
    total, terms = LeJEPALoss(lam=0.05, num_directions=8)(z, return_terms=True)
    assert terms["invariance"] < 1e-12
    total.backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()


def test_module_advances_sigreg_step_once_per_call():
    loss_fn = LeJEPALoss(num_directions=8)
    loss_fn(torch.randn(2, 8, 3))
    assert int(loss_fn.sigreg.step) == 1


# ---- global and local views, re-derived from the paper's algorithm -------------------------


def _epps_pulley_sigreg(x: torch.Tensor, a: torch.Tensor, knots: int = 17, t_max: float = 3.0) -> torch.Tensor:
    """SIGReg of one view x (N, P) along unit directions a (P, K), written as LeJEPA's
    minimal code: cos/sin at every knot t_j = j * dt, trapezoid weights doubled inside."""
    t = torch.linspace(0, t_max, knots, dtype=x.dtype)
    dt = t_max / (knots - 1)
    w = torch.full((knots,), 2 * dt, dtype=x.dtype)
    w[[0, -1]] = dt
    phi = torch.exp(-t.square() / 2)
    xt = (x @ a).unsqueeze(-1) * t  # (N, K, knots)
    err = (xt.cos().mean(0) - phi).square() + xt.sin().mean(0).square()  # (K, knots)
    return ((err @ (w * phi)) * x.shape[0]).mean()


def _paper_lejepa(global_views, local_views, lam, a):
    """Algorithm 1 of LeJEPA: centres from the global views, all views predict them, SIGReg
    per view averaged, (1 - lam) * prediction + lam * SIGReg."""
    all_views = list(global_views) + list(local_views)
    centre = torch.stack(list(global_views)).mean(0)
    sim = torch.stack([(centre - v).square().mean() for v in all_views]).mean()
    sig = torch.stack([_epps_pulley_sigreg(v, a) for v in all_views]).mean()
    return (1 - lam) * sim + lam * sig, sim, sig


@pytest.mark.parametrize(("g", "l", "lam"), [(2, 0, 0.05), (2, 6, 0.02), (1, 3, 0.5), (2, 4, 1.0)])
def test_global_and_local_views_match_the_paper(g, l, lam):  # noqa: E741
    gen = torch.Generator().manual_seed(g * 10 + l)
    glob = torch.randn(g, 24, 6, generator=gen, dtype=torch.float64) * 1.5 + 0.2
    loc = torch.randn(l, 24, 6, generator=gen, dtype=torch.float64)
    glob.requires_grad_(True)
    loss_fn = LeJEPALoss(lam=lam, num_directions=32, seed=5)
    a = loss_fn.sigreg.directions(6, dtype=torch.float64)
    if l:
        loss = loss_fn(glob, local_views=loc)
    else:
        loss = loss_fn(glob)
    ref, sim, sig = _paper_lejepa(glob, loc, lam, a)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(loss_fn.last_terms["invariance"], sim.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(loss_fn.last_terms["sigreg"], sig.detach(), rtol=1e-10, atol=1e-12)
    # The two weightings of stable-pretraining issue 413 give other numbers.
    if 0 < lam < 1:
        assert not torch.allclose(loss, sim + lam * sig)
    # Same as one tensor with num_global_views.
    both = LeJEPALoss(lam=lam, num_directions=32, seed=5, num_global_views=g)(torch.cat([glob, loc]))
    torch.testing.assert_close(both, loss, rtol=0, atol=0)
    (grad,) = torch.autograd.grad(loss, glob)
    (ref_grad,) = torch.autograd.grad(ref, glob)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-8, atol=1e-10)


def test_local_views_are_checked_and_lightly_calls_fail_loudly():
    z, local = torch.randn(2, 8, 4), torch.randn(3, 8, 4)
    with pytest.raises(ValueError, match="num_global_views"):
        LeJEPALoss(num_directions=8, num_global_views=1)(z, local_views=local)
    with pytest.raises(ValueError, match="local_views"):
        LeJEPALoss(num_directions=8)(z, local_views=local[:, :5])
    with pytest.raises(TypeError):  # lightly's positional (local_proj, global_proj) call
        LeJEPALoss(num_directions=8)(local, z)  # type: ignore[misc]


def test_lightly_argument_names_are_aliases():
    ours = LeJEPALoss(lam=0.1, num_directions=16, num_knots=9, t_max=2.0)
    theirs = LeJEPALoss(lambda_param=0.1, sigreg_num_vectors=16, sigreg_knots=9, sigreg_t_max=2.0)
    assert theirs.lam == 0.1 and repr(theirs) == repr(ours)
    with pytest.raises(TypeError, match="lam.*lambda_param"):
        LeJEPALoss(lam=0.1, lambda_param=0.1)


def test_manual_step_shares_directions_between_calls():
    loss_fn = LeJEPALoss(num_directions=8, auto_step=False)
    z = torch.randn(2, 8, 3)
    assert torch.equal(loss_fn(z), loss_fn(z)) and int(loss_fn.sigreg.step) == 0
    loss_fn.sigreg.advance()
    assert int(loss_fn.sigreg.step) == 1
