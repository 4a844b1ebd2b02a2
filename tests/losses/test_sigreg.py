"""Tests for jepa_blocks.losses.sigreg (LeJEPA's SIGReg)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from jepa_blocks.losses import SIGRegLoss, lejepa_loss, sigreg, sigreg_directions

F64 = torch.float64


# ---- independent references --------------------------------------------------------------


def _knots_and_weights(num_knots: int = 17, t_max: float = 3.0):
    """Knots t_j and weights w_j written out with a loop (t_0 included)."""
    dt = t_max / (num_knots - 1)
    ts, ws = [], []
    for j in range(num_knots):
        t = j * dt
        trap = dt if j in (0, num_knots - 1) else 2 * dt
        ts.append(t)
        ws.append(trap * math.exp(-t * t / 2))
    return ts, ws


def _slow_sigreg(x: torch.Tensor, a: torch.Tensor, num_knots: int = 17, t_max: float = 3.0):
    """Direct formula with autograd through cos/sin, every knot included, x (N, D)."""
    ts, ws = _knots_and_weights(num_knots, t_max)
    a = a / a.norm(dim=0, keepdim=True)
    p = x @ a
    n = x.shape[0]
    total = 0.0
    for t, w in zip(ts, ws, strict=True):
        err = (torch.cos(t * p).mean(0) - math.exp(-t * t / 2)) ** 2 + torch.sin(t * p).mean(0) ** 2
        total = total + n * w * err
    return total.mean()


def _exact_statistic(p: torch.Tensor) -> torch.Tensor:
    """Closed-form Epps-Pulley statistic (integral over all t), p (N,) -> scalar."""
    n = p.shape[0]
    diff = p[:, None] - p[None, :]
    term1 = math.sqrt(2 * math.pi) / n**2 * torch.exp(-(diff**2) / 2).sum()
    term2 = 2 * math.sqrt(math.pi) / n * torch.exp(-(p**2) / 4).sum()
    return n * (term1 - term2 + math.sqrt(2 * math.pi / 3))


def _unit(a: torch.Tensor) -> torch.Tensor:
    return a / a.norm(dim=0, keepdim=True)


def _rand(*shape, seed=0, dtype=F64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---- values and invariants ---------------------------------------------------------------


def test_matches_direct_formula_and_gradcheck():
    x = _rand(20, 5, seed=1).requires_grad_(True)
    a = _rand(5, 7, seed=2)
    value = sigreg(x, directions=a)
    ref = _slow_sigreg(x, a)
    torch.testing.assert_close(value, ref, rtol=1e-12, atol=1e-12)
    (g,) = torch.autograd.grad(value, x)
    (g_ref,) = torch.autograd.grad(ref, x)
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)
    x3 = _rand(2, 6, 3, seed=3).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: sigreg(z, directions=_rand(3, 4, seed=4)), (x3,))


@settings(max_examples=15, deadline=None)
@given(
    n=st.integers(1, 12),
    d=st.integers(1, 6),
    scale=st.floats(0.01, 10.0),
    seed=st.integers(0, 2**16),
)
def test_invariants_hypothesis(n, d, scale, seed):
    x = _rand(n, d, seed=seed) * scale
    a = _rand(d, 8, seed=seed + 1)
    value = sigreg(x, directions=a)
    assert value >= 0
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(sigreg(x[perm], directions=a), value, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sigreg(-x, directions=a), value, rtol=1e-12, atol=1e-12)
    doubled = sigreg(torch.cat([x, x]), directions=a)
    torch.testing.assert_close(doubled, 2 * value, rtol=1e-12, atol=1e-12)
    q, _ = torch.linalg.qr(_rand(d, d, seed=seed + 2))
    torch.testing.assert_close(sigreg(x @ q, directions=a), sigreg(x, directions=q @ a))


@settings(max_examples=10, deadline=None)
@given(
    n=st.integers(1, 16), d=st.integers(1, 8), scale=st.floats(0.1, 30.0), seed=st.integers(0, 999)
)
def test_per_sample_gradient_bound(n, d, scale, seed):
    # |dT_a/dp_n| <= 2 sum_j w_j t_j (1 + phi_j) = 5.931 and directions have unit norm.
    ts, ws = _knots_and_weights()
    bound = sum(2 * w * t * (1 + math.exp(-t * t / 2)) for t, w in zip(ts, ws, strict=True))
    assert abs(bound - 5.931) < 1e-3
    x = (_rand(n, d, seed=seed) * scale).requires_grad_(True)
    sigreg(x, directions=_rand(d, 16, seed=seed + 1)).backward()
    assert x.grad.norm(dim=1).max() <= bound + 1e-9


def test_views_are_averaged():
    x = _rand(3, 10, 4, seed=5)
    a = _rand(4, 9, seed=6)
    per_view = torch.stack([sigreg(v, directions=a) for v in x])
    torch.testing.assert_close(sigreg(x, directions=a), per_view.mean(), rtol=1e-12, atol=1e-12)


def test_collapse_value_and_zero_gradient():
    ts, ws = _knots_and_weights()
    per_sample = sum(w * (1 - math.exp(-t * t / 2)) ** 2 for t, w in zip(ts, ws, strict=True))
    assert abs(per_sample - 0.40205) < 1e-5
    n = 256
    x = torch.zeros(n, 8, dtype=F64, requires_grad=True)
    value = sigreg(x, generator=torch.Generator().manual_seed(0), num_directions=32)
    torch.testing.assert_close(value, torch.tensor(n * per_sample, dtype=F64), rtol=1e-12, atol=0)
    value.backward()
    assert torch.count_nonzero(x.grad) == 0
    # The exact statistic at collapse is 104.68 at N = 256 (quadrature: 102.92).
    exact = _exact_statistic(torch.zeros(n, dtype=F64))
    assert abs(float(exact) - 104.68) < 0.01 and abs(float(value.detach()) - 102.92) < 0.01


def test_isotropic_gaussian_mean():
    # Expected value under N(0, I): sum_j w_j (1 - phi_j^2) = 1.0525 for any N, D, K.
    ts, ws = _knots_and_weights()
    expected = sum(w * (1 - math.exp(-t * t)) for t, w in zip(ts, ws, strict=True))
    assert abs(expected - 1.0525) < 1e-4
    values = [
        float(
            sigreg(
                _rand(256, 32, seed=s, dtype=torch.float32),
                generator=torch.Generator().manual_seed(s),
            )
        )
        for s in range(4)
    ]
    for v in values:  # sd ~0.05 at K = 1024
        assert abs(v - expected) < 0.25
    assert abs(sum(values) / len(values) - expected) < 0.12


def test_quadrature_close_to_exact_oracle():
    x = _rand(128, 6, seed=7)
    a = _unit(_rand(6, 12, seed=8))
    quad = sigreg(x, directions=a)
    exact = torch.stack([_exact_statistic(x @ a[:, k]) for k in range(a.shape[1])]).mean()
    assert abs(float(quad / exact) - 1) < 0.03
    # A single direction, N(0, 1) sample: quadrature slightly below the exact integral.
    p = _rand(256, 1, seed=9)
    quad1 = float(sigreg(p, directions=torch.ones(1, 1, dtype=F64)))
    exact1 = float(_exact_statistic(p[:, 0]))
    assert quad1 < exact1 and abs(quad1 / exact1 - 1) < 0.03


def test_non_gaussian_is_penalised_at_small_dim():
    gen = torch.Generator().manual_seed(10)
    rademacher = torch.randint(0, 2, (512, 2), generator=gen).to(F64) * 2 - 1
    gaussian = _rand(512, 2, seed=11)
    a = _rand(2, 64, seed=12)
    assert sigreg(rademacher, directions=a) > 5 * sigreg(gaussian, directions=a)


def test_scaling_is_minimised_near_one():
    x = _rand(4096, 4, seed=13)
    a = _rand(4, 64, seed=14)
    at_one = sigreg(x, directions=a)
    assert at_one < sigreg(0.7 * x, directions=a)
    assert at_one < sigreg(1.4 * x, directions=a)


def test_low_precision_inputs():
    x32 = _rand(64, 16, seed=15, dtype=torch.float32)
    gen = torch.Generator
    ref = sigreg(x32, generator=gen().manual_seed(0), num_directions=128)
    for dtype in (torch.bfloat16, torch.float16):
        x = x32.to(dtype).requires_grad_(True)
        value = sigreg(x, generator=gen().manual_seed(0), num_directions=128)
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, ref, rtol=0.05, atol=0.02)
        same_input = sigreg(x.detach().float(), generator=gen().manual_seed(0), num_directions=128)
        torch.testing.assert_close(value, same_input, rtol=1e-6, atol=1e-6)
        value.backward()
        assert x.grad.dtype == dtype and torch.isfinite(x.grad.float()).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = sigreg(x32, generator=gen().manual_seed(0), num_directions=128)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, ref, rtol=1e-5, atol=1e-6)


def test_float64_stays_float64():
    assert sigreg(_rand(8, 3), num_directions=4).dtype == F64
    assert SIGRegLoss(num_directions=4)(_rand(8, 3)).dtype == F64


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-6), (F64, 1e-12)])
def test_chunked_equals_unchunked(dtype, rtol):
    x = _rand(2, 50, 12, seed=16, dtype=dtype).requires_grad_(True)
    a = _rand(12, 100, seed=17, dtype=dtype)
    full = sigreg(x, directions=a)
    (g_full,) = torch.autograd.grad(full, x)
    for chunk in (1, 7, 64, 100, 1000):
        part = sigreg(x, directions=a, chunk=chunk)
        (g_part,) = torch.autograd.grad(part, x)
        torch.testing.assert_close(part, full, rtol=rtol, atol=0)
        assert float((g_part - g_full).norm() / g_full.norm()) <= 10 * rtol
    with torch.no_grad():
        torch.testing.assert_close(sigreg(x, directions=a, chunk=9), full, rtol=rtol, atol=0)


def test_chunk_saves_no_projections_for_backward():
    # Without chunk the (V, N, K) projections are saved; with chunk, checkpointing keeps
    # none of the per-chunk (V, N, chunk) projections either.
    def saved_numels(**kwargs):
        sizes = []

        def pack(t):
            sizes.append(t.numel())
            return t

        x = _rand(2, 64, 8, seed=30, dtype=torch.float32).requires_grad_(True)
        a = _rand(8, 256, seed=31, dtype=torch.float32)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            value = sigreg(x, directions=a, **kwargs)
        value.backward()
        return sizes

    assert 2 * 64 * 256 in saved_numels()
    chunked = saved_numels(chunk=32)
    assert 2 * 64 * 256 not in chunked and 2 * 64 * 32 not in chunked


def test_dimension_one_and_zero_direction_never_nan():
    x = _rand(32, 1, seed=18, dtype=torch.float32).requires_grad_(True)
    a = sigreg_directions(1, 64, seed=3)
    torch.testing.assert_close(a.abs(), torch.ones_like(a))
    for value in (
        SIGRegLoss(num_directions=64)(x),
        sigreg(x.bfloat16(), num_directions=64),
        sigreg(x, directions=torch.zeros(1, 4)),
    ):
        value.backward()
        assert torch.isfinite(value) and torch.isfinite(x.grad).all()


# ---- directions and the module ---------------------------------------------------------


def test_directions_depend_on_seed_and_step_only():
    a = sigreg_directions(16, 32, seed=1, step=5)
    assert a.shape == (16, 32) and a.dtype == torch.float32
    torch.testing.assert_close(a.norm(dim=0), torch.ones(32))
    assert torch.equal(a, sigreg_directions(16, 32, seed=1, step=5))
    assert not torch.equal(a, sigreg_directions(16, 32, seed=1, step=6))
    assert not torch.equal(a, sigreg_directions(16, 32, seed=2, step=5))
    assert not torch.equal(
        sigreg_directions(16, 32, seed=0, step=1), sigreg_directions(16, 32, seed=1, step=0)
    )
    a64 = sigreg_directions(16, 32, seed=1, step=5, dtype=F64)
    torch.testing.assert_close(a64.float(), a)


def test_module_step_advances_and_round_trips():
    loss = SIGRegLoss(num_directions=16, seed=3)
    x = _rand(20, 6, seed=19)
    v0 = loss(x)
    assert int(loss.step) == 1
    torch.testing.assert_close(
        v0, sigreg(x, directions=sigreg_directions(6, 16, seed=3, step=0, dtype=F64))
    )
    v1 = loss(x)
    assert int(loss.step) == 2 and not torch.allclose(v0, v1)
    loss.eval()
    v2 = loss(x)
    assert int(loss.step) == 2 and torch.equal(v2, loss(x))
    state = loss.state_dict()
    assert "step" in state
    other = SIGRegLoss(num_directions=16, seed=3).eval()
    other.load_state_dict(state)
    assert int(other.step) == 2 and torch.equal(other(x), v2)
    torch.testing.assert_close(
        loss.directions(6, dtype=F64), sigreg_directions(6, 16, seed=3, step=2, dtype=F64)
    )


def test_explicit_step_counts_optimizer_steps_not_calls():
    """Two calls in one optimizer step (micro-batches, views) use the same directions, and
    the step moves only when told: once per optimizer step."""
    x = _rand(20, 6, seed=19)
    loss = SIGRegLoss(num_directions=16, seed=3, auto_step=False)
    for opt_step in range(3):
        a, b = loss(x), loss(x[:10])
        assert int(loss.step) == opt_step
        directions = sigreg_directions(6, 16, seed=3, step=opt_step, dtype=F64)
        torch.testing.assert_close(a, sigreg(x, directions=directions))
        torch.testing.assert_close(b, sigreg(x[:10], directions=directions))
        loss.advance()
    assert int(loss.step) == 3
    loss.set_step(7)
    torch.testing.assert_close(
        loss(x), sigreg(x, directions=sigreg_directions(6, 16, seed=3, step=7, dtype=F64))
    )
    loss.advance(2)
    assert int(loss.step) == 9 and "auto_step=False" in repr(loss)
    # set_step gives the auto-stepping module the same sequence as the manual one.
    auto = SIGRegLoss(num_directions=16, seed=3)
    auto.set_step(9)
    assert torch.equal(auto(x), loss(x)) and int(auto.step) == 10
    with pytest.raises(ValueError, match="step"):
        loss.set_step(-1)
    with pytest.raises(ValueError, match="num_steps"):
        loss.advance(-1)
    with pytest.raises(TypeError, match="auto_step"):
        SIGRegLoss(auto_step=1)  # type: ignore[arg-type]


def test_lightly_argument_names_are_aliases():
    a = SIGRegLoss(num_vectors=12, knots=9)
    assert (a.num_directions, a.num_knots) == (12, 9)
    x = _rand(16, 4, seed=3)
    assert torch.equal(a.eval()(x), SIGRegLoss(num_directions=12, num_knots=9).eval()(x))
    with pytest.raises(TypeError, match="num_directions.*num_vectors"):
        SIGRegLoss(num_directions=12, num_vectors=12)
    with pytest.raises(TypeError, match="num_knots.*knots"):
        SIGRegLoss(knots=17, num_knots=17)
    with pytest.raises(ValueError, match="num_knots"):  # aliases are range-checked as ours
        SIGRegLoss(knots=1)


def test_module_returns_tensor_and_terms():
    loss = SIGRegLoss(num_directions=8).eval()
    x = _rand(16, 4, seed=4)
    value = loss(x)
    assert isinstance(value, torch.Tensor) and value.ndim == 0
    assert torch.equal(loss.last_terms["sigreg"], value)
    total, terms = loss(x, return_terms=True)
    assert torch.equal(total, value) and torch.equal(terms["sigreg"], value)


def test_module_views_and_chunk():
    x = _rand(2, 24, 5, seed=20).requires_grad_(True)
    plain = SIGRegLoss(num_directions=40).eval()(x)
    chunked = SIGRegLoss(num_directions=40, chunk=16).eval()(x)
    torch.testing.assert_close(chunked, plain, rtol=1e-12, atol=0)


def test_distributed_flag_without_group_is_plain():
    x = _rand(16, 4, seed=21)
    gen = torch.Generator
    a = sigreg(x, generator=gen().manual_seed(1), num_directions=8, distributed=True)
    b = sigreg(x, generator=gen().manual_seed(1), num_directions=8)
    assert torch.equal(a, b)
    m = SIGRegLoss(num_directions=8, gather_distributed=True).eval()
    assert torch.equal(m(x), SIGRegLoss(num_directions=8).eval()(x))


def test_lejepa_loss():
    pred, reg = torch.tensor(2.0), torch.tensor(10.0)
    torch.testing.assert_close(lejepa_loss(pred, reg), torch.tensor(0.95 * 2 + 0.05 * 10))
    torch.testing.assert_close(lejepa_loss(pred, reg, lam=0.0), pred)
    torch.testing.assert_close(lejepa_loss(pred, reg, lam=1.0), reg)
    with pytest.raises(ValueError, match="lam"):
        lejepa_loss(pred, reg, lam=1.5)
    with pytest.raises(ValueError, match="prediction_loss"):
        lejepa_loss(torch.ones(2), reg)
    with pytest.raises(TypeError, match="sigreg_value"):
        lejepa_loss(pred, 1.0)  # type: ignore[arg-type]


def test_bad_inputs_name_the_argument():
    x = _rand(8, 4)
    with pytest.raises(ValueError, match="x"):
        sigreg(torch.randn(8))
    with pytest.raises(TypeError, match="x"):
        sigreg(torch.ones(8, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="x"):
        sigreg(torch.ones(0, 4))
    with pytest.raises(ValueError, match="num_knots"):
        sigreg(x, num_knots=1)
    with pytest.raises(ValueError, match="t_max"):
        sigreg(x, t_max=0.0)
    with pytest.raises(ValueError, match="num_directions"):
        sigreg(x, num_directions=0)
    with pytest.raises(ValueError, match="chunk"):
        sigreg(x, chunk=0)
    with pytest.raises(ValueError, match="directions"):
        sigreg(x, directions=torch.randn(5, 3))
    with pytest.raises(ValueError, match="directions"):
        sigreg(x, directions=torch.randn(4))
    with pytest.raises(ValueError, match="generator"):
        sigreg(x, directions=torch.randn(4, 3), generator=torch.Generator())
    with pytest.raises(TypeError, match="generator"):
        sigreg(x, generator=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="generator"):
        sigreg(x, distributed=True)
    with pytest.raises(TypeError, match="distributed"):
        sigreg(x, distributed=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="seed"):
        SIGRegLoss(seed=-1)
    with pytest.raises(ValueError, match="num_directions"):
        SIGRegLoss(num_directions=0)
    with pytest.raises(TypeError, match="gather_distributed"):
        SIGRegLoss(gather_distributed="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="x"):
        SIGRegLoss()(torch.randn(2, 3, 4, 5))
    with pytest.raises(ValueError, match="dim"):
        sigreg_directions(0, 4)
    with pytest.raises(ValueError, match="step"):
        sigreg_directions(3, 4, step=-1)


# ---- two gloo processes ------------------------------------------------------------------


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _worker_sigreg(rank: int, world: int) -> None:
    d, k = 5, 24
    a = _rand(d, k, seed=100)
    for sizes in ((6, 6), (4, 9)):
        full = _rand(sum(sizes), d, seed=101) * 1.5 + 0.3  # non-Gaussian: non-zero grads
        start = sum(sizes[:rank])
        local = full[start : start + sizes[rank]].clone().requires_grad_(True)
        value = sigreg(local, directions=a, distributed=True)
        value.backward()
        ref_x = full.clone().requires_grad_(True)
        ref = sigreg(ref_x, directions=a)
        ref.backward()
        torch.testing.assert_close(value, ref, rtol=1e-12, atol=0)
        expected = world * ref_x.grad[start : start + sizes[rank]]
        assert _rel_err(local.grad, expected) <= 1e-6, (sizes, _rel_err(local.grad, expected))

    # The module with views, a chunk and unequal local sizes, against one process.
    sizes = (3, 7)
    full = _rand(2, sum(sizes), d, seed=102) + 0.5
    start = sum(sizes[:rank])
    local = full[:, start : start + sizes[rank]].clone().requires_grad_(True)
    value = SIGRegLoss(num_directions=k, seed=4, chunk=10, gather_distributed=True)(local)
    value.backward()
    ref_x = full.clone().requires_grad_(True)
    ref = SIGRegLoss(num_directions=k, seed=4)(ref_x)
    ref.backward()
    torch.testing.assert_close(value, ref, rtol=1e-12, atol=0)
    expected = world * ref_x.grad[:, start : start + sizes[rank]]
    assert _rel_err(local.grad, expected) <= 1e-6


@pytest.mark.distributed
def test_gloo_global_value_and_ddp_gradients(run_gloo):
    run_gloo(_worker_sigreg)


# ---- the direction draw and its cache (issue 15) ------------------------------------------

sigreg_impl = __import__("jepa_blocks.losses.sigreg", fromlist=["_raw_directions"])


def test_direction_draw_is_standard_normal():
    a = sigreg_impl._raw_directions(512, 512, 0, 0).flatten().double()
    n = a.numel()
    # mean, variance and kurtosis of 262,144 N(0, 1) draws, 6 standard errors
    assert abs(float(a.mean())) < 6 / math.sqrt(n)
    assert abs(float(a.var()) - 1) < 6 * math.sqrt(2 / n)
    assert abs(float((a**4).mean()) - 3) < 6 * math.sqrt(96 / n)
    # unit directions: the mean |cos| between two of them is about sqrt(2 / (pi D))
    u = sigreg_directions(512, 64, seed=0, step=0)
    cos = (u.T @ u)[~torch.eye(64, dtype=torch.bool)].abs().mean()
    assert abs(float(cos) - math.sqrt(2 / (math.pi * 512))) < 0.005


def test_directions_cached_per_step(monkeypatch):
    calls = []
    real = sigreg_impl._raw_directions
    monkeypatch.setattr(
        sigreg_impl, "_raw_directions", lambda *args: calls.append(args) or real(*args)
    )
    sigreg_impl._CACHE.clear()
    loss = SIGRegLoss(num_directions=8, seed=5, auto_step=False)
    x = _rand(2, 12, 4, seed=30)
    first = loss(x)
    again = [loss(x[0]), loss(x[1]), sigreg_directions(4, 8, seed=5, step=0, dtype=F64)]
    assert len(calls) == 1  # one draw for the calls of one step
    torch.testing.assert_close(first, (again[0] + again[1]) / 2)
    loss.advance()
    loss(x)
    assert len(calls) == 2  # a new step draws new directions
    assert len(sigreg_impl._CACHE) <= sigreg_impl._CACHE_SIZE


def test_directions_cached_in_inference_mode_work_with_autograd():
    sigreg_impl._CACHE.clear()
    loss = SIGRegLoss(num_directions=8, seed=6, auto_step=False)
    x = _rand(12, 4, seed=31, dtype=torch.float32)
    with torch.inference_mode():
        loss(x)  # fills the cache inside inference mode
    z = x.clone().requires_grad_(True)
    loss(z).backward()  # the cached directions are saved for backward
    assert z.grad is not None and torch.isfinite(z.grad).all()


def test_gradient_reaches_explicit_directions():
    # The normalisation is folded into the projections; its gradient must still reach a.
    x = _rand(10, 3, seed=32)
    a = _rand(3, 5, seed=33).requires_grad_(True)
    sigreg(x, directions=a).backward()
    a_ref = a.detach().clone().requires_grad_(True)
    _slow_sigreg(x, a_ref).backward()
    torch.testing.assert_close(a.grad, a_ref.grad, rtol=1e-9, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda d: sigreg(x[:6], directions=d), (_rand(3, 4, seed=34).requires_grad_(True),)
    )
