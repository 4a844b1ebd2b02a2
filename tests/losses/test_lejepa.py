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
    total, terms = LeJEPALoss(lam=0.05, num_directions=8)(z)
    assert terms["invariance"] < 1e-12
    total.backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()


def test_module_advances_sigreg_step_once_per_call():
    loss_fn = LeJEPALoss(num_directions=8)
    loss_fn(torch.randn(2, 8, 3))
    assert int(loss_fn.sigreg.step) == 1
