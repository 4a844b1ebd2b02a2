"""Tests for jepa_blocks.losses.ntxent."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st

from jepa_blocks._checks import value_checks
from jepa_blocks.losses import NTXentLoss, ntxent_loss

F64 = torch.float64


def _rand(*shape, seed=0, dtype=F64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _cos(u: list[float], v: list[float]) -> float:
    nu = math.sqrt(sum(x * x for x in u))
    nv = math.sqrt(sum(x * x for x in v))
    if nu == 0.0 or nv == 0.0:
        return 0.0
    return sum(x * y for x, y in zip(u, v, strict=True)) / (nu * nv)


def _published(z_a: torch.Tensor, z_b: torch.Tensor, t: float) -> float:
    """SimCLR's NT-Xent with explicit loops over anchors, in the paper's interleaved order
    (a_0, b_0, a_1, b_1, ...): the partner of position 2k is 2k + 1 and vice versa."""
    views = []
    for ra, rb in zip(z_a.tolist(), z_b.tolist(), strict=True):
        views += [ra, rb]
    total = 0.0
    for i, anchor in enumerate(views):
        partner = i + 1 if i % 2 == 0 else i - 1
        num = math.exp(_cos(anchor, views[partner]) / t)
        den = sum(math.exp(_cos(anchor, v) / t) for k, v in enumerate(views) if k != i)
        total += -math.log(num / den)
    return total / len(views)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(2, 7),
    d=st.integers(1, 6),
    t=st.floats(0.05, 2.0),
    scale=st.floats(0.1, 10.0),
    seed=st.integers(0, 2**16),
)
def test_matches_published_formula(n, d, t, scale, seed):
    z_a = _rand(n, d, seed=seed) * scale
    z_b = z_a + 0.7 * _rand(n, d, seed=seed + 1)
    got = ntxent_loss(z_a, z_b, temperature=t)
    assert got.dtype == F64
    assert math.isclose(float(got), _published(z_a, z_b, t), rel_tol=1e-10, abs_tol=1e-12)
    assert torch.equal(NTXentLoss(temperature=t)(z_a, z_b), got)


@settings(max_examples=12, deadline=None)
@given(n=st.integers(2, 9), d=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_pair_permutation_view_swap_and_row_scaling(n, d, seed):
    z_a, z_b = _rand(n, d, seed=seed), _rand(n, d, seed=seed + 1)
    ref = ntxent_loss(z_a, z_b)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    scale = _rand(n, 1, seed=seed + 2).abs() + 0.1  # positive per-row scales (cosine)
    for xa, xb in ((z_a[perm], z_b[perm]), (z_b, z_a), (z_a * scale, z_b)):
        torch.testing.assert_close(ntxent_loss(xa, xb), ref, rtol=1e-12, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(2, 9),
    d=st.integers(1, 6),
    t=st.floats(0.05, 2.0),
    seed=st.integers(0, 2**16),
)
def test_bounds(n, d, t, seed):
    # Each anchor: log(1 + sum over 2N-2 negatives of exp((s_neg - s_pos) / t)) with
    # s_neg - s_pos in [-2, 2].
    z_a, z_b = _rand(n, d, seed=seed), _rand(n, d, seed=seed + 1)
    value = float(ntxent_loss(z_a, z_b, temperature=t))
    lower = math.log1p((2 * n - 2) * math.exp(-2 / t))
    upper = math.log1p((2 * n - 2) * math.exp(2 / t))
    assert 0.0 <= lower <= value + 1e-12
    assert value <= upper + 1e-9


@settings(max_examples=20, deadline=None)
@given(
    n=st.integers(2, 12),
    d=st.integers(1, 6),
    t=st.floats(0.05, 5.0),
    seed=st.integers(0, 2**16),
)
def test_all_identical_rows_give_log_2n_minus_1(n, d, t, seed):
    # Every similarity is 1: each anchor's softmax is uniform over its 2N - 1 candidates.
    v = _rand(1, d, seed=seed) + 1e-3
    z = v.expand(n, d) * (_rand(n, 1, seed=seed + 1).abs() + 0.5)
    value = float(ntxent_loss(z, z.flip(0), temperature=t))
    assert math.isclose(value, math.log(2 * n - 1), rel_tol=1e-12)


@pytest.mark.parametrize("n", [2, 5, 16])
def test_orthogonal_identical_pairs_closed_form_and_limit(n):
    # Positive similarity 1, every negative 0: L = log(1 + (2N - 2) exp(-1 / t)) -> 0 as t -> 0.
    z = torch.eye(n, n + 3, dtype=F64)
    previous = math.inf
    for t in (2.0, 0.5, 0.1, 0.05):
        value = float(ntxent_loss(z, z.clone(), temperature=t))
        expected = math.log1p((2 * n - 2) * math.exp(-1 / t))
        # (log-sum-exp minus the positive logit: absolute rounding ~1e-16 of the logits)
        assert math.isclose(value, expected, rel_tol=1e-12, abs_tol=1e-14)
        assert value < previous
        previous = value
    assert 0.0 <= float(ntxent_loss(z, z.clone(), temperature=0.01)) < 1e-14


def test_gradient_zero_rows_and_reduces_loss():
    z_a = _rand(6, 4, seed=3).requires_grad_(True)
    z_b = _rand(6, 4, seed=4)
    z_b[2] = 0.0  # a zero row: similarity 0 to everything, never NaN
    loss = ntxent_loss(z_a, z_b)
    loss.backward()
    assert torch.isfinite(z_a.grad).all() and z_a.grad.abs().sum() > 0
    with torch.no_grad():
        assert ntxent_loss(z_a - 0.05 * z_a.grad, z_b) < loss


def test_low_precision_and_autocast():
    z_a, z_b = _rand(16, 8, seed=5, dtype=torch.float32), _rand(16, 8, seed=6, dtype=torch.float32)
    ref = ntxent_loss(z_a, z_b)
    for dtype in (torch.bfloat16, torch.float16):
        xa = z_a.to(dtype).requires_grad_(True)
        out = ntxent_loss(xa, z_b.to(dtype))
        assert out.dtype == torch.float32
        same_input = ntxent_loss(xa.detach().float(), z_b.to(dtype).float())
        torch.testing.assert_close(out, same_input, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(out, ref, rtol=0.02, atol=0.02)
        out.backward()
        assert xa.grad.dtype == dtype and torch.isfinite(xa.grad.float()).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = NTXentLoss()(z_a, z_b)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def test_gather_flag_without_group_is_plain():
    z_a, z_b = _rand(5, 3, seed=7), _rand(5, 3, seed=8)
    assert torch.equal(ntxent_loss(z_a, z_b, gather_distributed=True), ntxent_loss(z_a, z_b))


def test_bad_arguments_name_the_argument():
    z = _rand(4, 3)
    with pytest.raises(ValueError, match="temperature"):
        ntxent_loss(z, z, temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        NTXentLoss(temperature=-0.1)
    with pytest.raises(TypeError, match="temperature"):
        NTXentLoss(temperature="0.1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="temperature"):
        NTXentLoss(temperature=math.inf)
    with pytest.raises(TypeError, match="gather_distributed"):
        ntxent_loss(z, z, gather_distributed=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="gather_distributed"):
        NTXentLoss(gather_distributed=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="z_b"):
        ntxent_loss(z, z[:3])
    with pytest.raises(ValueError, match="z_a"):
        NTXentLoss()(z[0], z[0])
    with pytest.raises(TypeError, match="z_b"):
        ntxent_loss(z, torch.ones(4, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="z_a"):
        ntxent_loss(z[:0], z[:0])
    with pytest.raises(ValueError, match="2 pairs"):
        ntxent_loss(z[:1], z[:1])


def test_non_finite_input_is_rejected_while_value_checks_are_on():
    z = _rand(4, 3)
    bad = z.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="z_b"):
        ntxent_loss(z, bad)
    with value_checks(False):  # skipped (as under torch.compile): NaN propagates
        assert torch.isnan(ntxent_loss(z, bad))


# ---- two gloo processes ------------------------------------------------------------------


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _worker_ntxent(rank: int, world: int) -> None:
    d_in, d = 5, 4
    for sizes in ((3, 3), (2, 5)):  # equal and unequal local batch sizes
        total = sum(sizes)
        x_a, x_b = _rand(total, d_in, seed=30), _rand(total, d_in, seed=31)
        start = sum(sizes[:rank])
        sl = slice(start, start + sizes[rank])
        # A "model" replicated on every rank, as under DDP.
        weight = _rand(d_in, d, seed=32).requires_grad_(True)
        xa, xb = x_a[sl].clone().requires_grad_(True), x_b[sl].clone()
        loss = NTXentLoss(temperature=0.2, gather_distributed=True)(xa @ weight, xb @ weight)
        loss.backward()
        ddp_grad = weight.grad.clone()
        dist.all_reduce(ddp_grad)  # DDP averages parameter gradients over the ranks
        ddp_grad /= world
        # Single process on the concatenated batch.
        ref_w = weight.detach().clone().requires_grad_(True)
        ref_xa = x_a.clone().requires_grad_(True)
        ref = ntxent_loss(ref_xa @ ref_w, x_b @ ref_w, temperature=0.2)
        ref.backward()
        torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
        assert _rel_err(ddp_grad, ref_w.grad) <= 1e-6
        assert _rel_err(xa.grad, world * ref_xa.grad[sl]) <= 1e-6


@pytest.mark.distributed
def test_gloo_every_rank_gets_global_loss_and_exact_gradients(run_gloo):
    run_gloo(_worker_ntxent)
