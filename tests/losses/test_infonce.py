"""Tests for jepa_blocks.losses.infonce."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st

from jepa_blocks._checks import value_checks
from jepa_blocks.losses import InfoNCELoss, LossOutput, info_nce_loss

F64 = torch.float64


def _rand(*shape, seed=0, dtype=F64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _cos(u: list[float], v: list[float]) -> float:
    nu = math.sqrt(sum(x * x for x in u))
    nv = math.sqrt(sum(x * x for x in v))
    if nu == 0.0 or nv == 0.0:
        return 0.0
    return sum(x * y for x, y in zip(u, v, strict=True)) / (nu * nv)


def _one_direction(anchors: list[list[float]], candidates: list[list[float]], t: float) -> float:
    """mean_i -log softmax_j(cos(a_i, c_j) / t)[i], with an explicit max-shifted sum."""
    total = 0.0
    for i, anchor in enumerate(anchors):
        logits = [_cos(anchor, c) / t for c in candidates]
        top = max(logits)
        log_den = top + math.log(sum(math.exp(v - top) for v in logits))
        total += log_den - logits[i]
    return total / len(anchors)


def _published(q: torch.Tensor, k: torch.Tensor, t: float, symmetric: bool) -> float:
    ql, kl = q.tolist(), k.tolist()
    forward = _one_direction(ql, kl, t)
    if not symmetric:
        return forward
    return 0.5 * (forward + _one_direction(kl, ql, t))


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(2, 7),
    d=st.integers(1, 6),
    t=st.floats(0.05, 2.0),
    symmetric=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_matches_published_formula(n, d, t, symmetric, seed):
    q = _rand(n, d, seed=seed) * 3.0
    k = q + 0.8 * _rand(n, d, seed=seed + 1)
    got = info_nce_loss(q, k, temperature=t, symmetric=symmetric)
    assert got.dtype == F64
    assert math.isclose(float(got), _published(q, k, t, symmetric), rel_tol=1e-10, abs_tol=1e-12)
    # A tensor temperature gives the same value.
    as_tensor = info_nce_loss(q, k, temperature=torch.tensor(t, dtype=F64), symmetric=symmetric)
    torch.testing.assert_close(as_tensor, got, rtol=1e-14, atol=0.0)


@settings(max_examples=12, deadline=None)
@given(n=st.integers(2, 9), d=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_pair_permutation_scaling_and_symmetry(n, d, seed):
    q, k = _rand(n, d, seed=seed), _rand(n, d, seed=seed + 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    scale = _rand(n, 1, seed=seed + 2).abs() + 0.1
    for sym in (False, True):
        ref = info_nce_loss(q, k, symmetric=sym)
        for qq, kk in ((q[perm], k[perm]), (q * scale, k)):
            torch.testing.assert_close(
                info_nce_loss(qq, kk, symmetric=sym), ref, rtol=1e-12, atol=1e-12
            )
    both = 0.5 * (info_nce_loss(q, k) + info_nce_loss(k, q))
    torch.testing.assert_close(info_nce_loss(q, k, symmetric=True), both, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(info_nce_loss(k, q, symmetric=True), both, rtol=1e-12, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(2, 9),
    d=st.integers(1, 6),
    t=st.floats(0.05, 2.0),
    symmetric=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_bounds(n, d, t, symmetric, seed):
    q, k = _rand(n, d, seed=seed), _rand(n, d, seed=seed + 1)
    value = float(info_nce_loss(q, k, temperature=t, symmetric=symmetric))
    lower = math.log1p((n - 1) * math.exp(-2 / t))
    upper = math.log1p((n - 1) * math.exp(2 / t))
    assert 0.0 <= lower <= value + 1e-12
    assert value <= upper + 1e-9


@pytest.mark.parametrize("n", [2, 5, 16])
def test_chance_level_and_separated_pairs(n):
    # All rows alike: uniform softmax over N keys, L = log N (the InfoNCE MI bound is 0).
    same = _rand(1, 4, seed=n).expand(n, 4)
    for sym in (False, True):
        value = float(info_nce_loss(same, same, temperature=0.3, symmetric=sym))
        assert math.isclose(value, math.log(n), rel_tol=1e-12)
    # Identical, mutually orthogonal pairs: L = log(1 + (N - 1) exp(-1 / t)) -> 0 as t -> 0.
    eye = torch.eye(n, n + 2, dtype=F64)
    previous = math.inf
    for t in (2.0, 0.5, 0.1, 0.05):
        value = float(info_nce_loss(eye, eye.clone(), temperature=t))
        expected = math.log1p((n - 1) * math.exp(-1 / t))
        assert math.isclose(value, expected, rel_tol=1e-12, abs_tol=1e-14)
        assert value < previous
        previous = value


@settings(max_examples=30, deadline=None)
@given(
    lo=st.floats(1e-3, 1.0),
    width=st.floats(1e-3, 2.0),
    frac=st.floats(0.01, 0.99),
)
def test_initial_temperature_and_range(lo, width, frac):
    hi = lo + width
    init = lo + frac * width
    module = InfoNCELoss(init_temperature=init, temperature_range=(lo, hi))
    assert lo <= module.temperature <= hi
    assert math.isclose(module.temperature, init, rel_tol=1e-5, abs_tol=1e-7)


def _drive(module: InfoNCELoss, optimizer, direction: str, steps: int) -> list[float]:
    """Push the temperature with the loss itself and an explicit linear pull."""
    q = _rand(8, 4, seed=1, dtype=torch.float32)
    # Aligned pairs want a low temperature, anti-aligned pairs a high one.
    k = q.clone() if direction == "down" else -q
    pull = 1e6 if direction == "down" else -1e6
    seen = []
    for _ in range(steps):
        loss, terms = module(q, k, return_terms=True)
        optimizer.zero_grad()
        (loss + pull * module.temperature_tensor()).backward()
        optimizer.step()
        t_term = float(terms["temperature"])
        lo32, hi32 = (float(torch.tensor(v, dtype=torch.float32)) for v in module.temperature_range)
        assert lo32 <= t_term <= hi32  # the value used in the loss (float32)
        seen.append(module.temperature)
    return seen


@pytest.mark.parametrize("direction", ["down", "up"])
@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_temperature_never_leaves_range(direction, opt):
    lo, hi = 0.05, 0.2
    module = InfoNCELoss(init_temperature=0.07, temperature_range=(lo, hi))
    params = list(module.parameters())
    optimizer = (
        torch.optim.SGD(params, lr=1e6) if opt == "sgd" else torch.optim.Adam(params, lr=1e3)
    )
    seen = _drive(module, optimizer, direction, steps=30)
    assert all(lo <= t <= hi for t in seen)
    assert math.isfinite(float(module.temperature_logit.detach()))
    target = lo if direction == "down" else hi
    assert abs(seen[-1] - target) < 1e-3 * (hi - lo)  # the push did reach the bound


def test_gradient_reaches_temperature_chain_rule():
    lo, hi = 0.05, 0.2
    module = InfoNCELoss(init_temperature=0.11, temperature_range=(lo, hi)).double()
    q, k = _rand(6, 5, seed=2), _rand(6, 5, seed=3)
    loss, terms = module(q, k, return_terms=True)
    loss.backward()
    grad = module.temperature_logit.grad
    assert grad is not None and float(grad) != 0.0
    # dL/dtheta = dL/dt * (hi - lo) * s (1 - s), with dL/dt from the functional form.
    t = torch.tensor(float(terms["temperature"]), dtype=F64, requires_grad=True)
    info_nce_loss(q, k, temperature=t, symmetric=True).backward()
    s = torch.sigmoid(module.temperature_logit.detach())
    expected = t.grad * (hi - lo) * s * (1 - s)
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=0.0)
    out = module(q, k, return_terms=True)
    assert isinstance(out, LossOutput) and not out.terms["temperature"].requires_grad


def test_fixed_temperature_and_state_dict():
    fixed = InfoNCELoss(init_temperature=0.1, learnable=False)
    assert list(fixed.parameters()) == []
    assert "temperature_logit" in fixed.state_dict()
    assert math.isclose(fixed.temperature, 0.1, rel_tol=1e-6)
    q, k = _rand(5, 3, seed=4, dtype=torch.float32), _rand(5, 3, seed=5, dtype=torch.float32)
    loss, terms = fixed(q, k, return_terms=True)
    torch.testing.assert_close(loss, info_nce_loss(q, k, temperature=0.1, symmetric=True))
    # A learnable module restores a trained temperature from a state_dict.
    trained = InfoNCELoss()
    with torch.no_grad():
        trained.temperature_logit.fill_(1.3)
    restored = InfoNCELoss()
    restored.load_state_dict(trained.state_dict())
    assert restored.temperature == trained.temperature != InfoNCELoss().temperature


def test_low_precision_and_autocast():
    q, k = _rand(16, 8, seed=6, dtype=torch.float32), _rand(16, 8, seed=7, dtype=torch.float32)
    module = InfoNCELoss()
    ref = module(q, k)
    for dtype in (torch.bfloat16, torch.float16):
        qb = q.to(dtype).requires_grad_(True)
        out, terms = module(qb, k.to(dtype), return_terms=True)
        assert out.dtype == torch.float32 and terms["temperature"].dtype == torch.float32
        torch.testing.assert_close(
            out, module(qb.detach().float(), k.to(dtype).float()), rtol=1e-6, atol=1e-6
        )
        torch.testing.assert_close(out, ref, rtol=0.02, atol=0.02)
        out.backward()
        assert qb.grad.dtype == dtype and torch.isfinite(qb.grad.float()).all()
        fn = info_nce_loss(q.to(dtype), k.to(dtype), temperature=0.1)
        assert fn.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(q, k)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def test_gather_flag_without_group_is_plain():
    q, k = _rand(5, 3, seed=8), _rand(5, 3, seed=9)
    for sym in (False, True):
        assert torch.equal(
            info_nce_loss(q, k, symmetric=sym, gather_distributed=True),
            info_nce_loss(q, k, symmetric=sym),
        )


def test_bad_arguments_name_the_argument():
    z = _rand(4, 3)
    with pytest.raises(ValueError, match="temperature"):
        info_nce_loss(z, z, temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        info_nce_loss(z, z, temperature=torch.ones(2))
    with pytest.raises(TypeError, match="temperature"):
        info_nce_loss(z, z, temperature=torch.tensor(1))
    for bad_t in (-0.1, 0.0, math.inf):
        with pytest.raises(ValueError, match="temperature"):
            info_nce_loss(z, z, temperature=torch.tensor(bad_t, dtype=F64))
    with pytest.raises(TypeError, match="symmetric"):
        info_nce_loss(z, z, symmetric="yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="gather_distributed"):
        info_nce_loss(z, z, gather_distributed=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="key"):
        info_nce_loss(z, z[:, :2])
    with pytest.raises(ValueError, match="query"):
        InfoNCELoss()(z[0], z[0])
    with pytest.raises(TypeError, match="key"):
        InfoNCELoss()(z, torch.ones(4, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="2 pairs"):
        info_nce_loss(z[:1], z[:1])
    for bad_range in ((0.0, 0.1), (0.2, 0.1), (0.1, 0.1), (-0.1, 0.1)):
        with pytest.raises(ValueError, match="temperature_range"):
            InfoNCELoss(init_temperature=0.07, temperature_range=bad_range)
    with pytest.raises(TypeError, match="temperature_range"):
        InfoNCELoss(temperature_range=0.1)  # type: ignore[arg-type]
    for bad_init in (0.05, 0.2, 0.01, 0.5):
        with pytest.raises(ValueError, match="init_temperature"):
            InfoNCELoss(init_temperature=bad_init, temperature_range=(0.05, 0.2))
    with pytest.raises(TypeError, match="learnable"):
        InfoNCELoss(learnable=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="symmetric"):
        InfoNCELoss(symmetric=None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="gather_distributed"):
        InfoNCELoss(gather_distributed="no")  # type: ignore[arg-type]


def test_non_finite_input_is_rejected_while_value_checks_are_on():
    z = _rand(4, 3)
    bad = z.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="key"):
        info_nce_loss(z, bad)
    with value_checks(False):  # skipped (as under torch.compile): NaN propagates
        assert torch.isnan(info_nce_loss(z, bad))


# ---- two gloo processes ------------------------------------------------------------------


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _worker_infonce(rank: int, world: int) -> None:
    d_in, d = 5, 4
    for sizes in ((3, 3), (2, 5)):  # equal and unequal local batch sizes
        for symmetric in (False, True):
            total = sum(sizes)
            x_q, x_k = _rand(total, d_in, seed=40), _rand(total, d_in, seed=41)
            start = sum(sizes[:rank])
            sl = slice(start, start + sizes[rank])
            # Replicated "model" and loss module (identical on every rank, as under DDP).
            weight = _rand(d_in, d, seed=42).requires_grad_(True)
            module = InfoNCELoss(
                init_temperature=0.09, symmetric=symmetric, gather_distributed=True
            ).double()
            xq = x_q[sl].clone().requires_grad_(True)
            loss = module(xq @ weight, x_k[sl] @ weight)
            loss.backward()
            grads = {"weight": weight.grad.clone(), "theta": module.temperature_logit.grad.clone()}
            # The temperature gradient is already the global one on every rank.
            ref_module = InfoNCELoss(init_temperature=0.09, symmetric=symmetric).double()
            ref_w = weight.detach().clone().requires_grad_(True)
            ref_xq = x_q.clone().requires_grad_(True)
            ref = ref_module(ref_xq @ ref_w, x_k @ ref_w)
            ref.backward()
            torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
            assert _rel_err(grads["theta"], ref_module.temperature_logit.grad) <= 1e-6
            for name, ref_grad in (
                ("weight", ref_w.grad),
                ("theta", ref_module.temperature_logit.grad),
            ):
                ddp = grads[name].clone()
                dist.all_reduce(ddp)  # DDP averages parameter gradients over the ranks
                ddp /= world
                assert _rel_err(ddp, ref_grad) <= 1e-6, name
            assert _rel_err(xq.grad, world * ref_xq.grad[sl]) <= 1e-6
            # The functional form with a plain float temperature agrees as well.
            value = info_nce_loss(
                x_q[sl] @ weight.detach(),
                x_k[sl] @ weight.detach(),
                temperature=0.09,
                symmetric=symmetric,
                gather_distributed=True,
            )
            plain = info_nce_loss(
                x_q @ ref_w.detach(), x_k @ ref_w.detach(), temperature=0.09, symmetric=symmetric
            )
            torch.testing.assert_close(value, plain, rtol=1e-12, atol=1e-12)


@pytest.mark.distributed
def test_gloo_every_rank_gets_global_loss_and_exact_gradients(run_gloo):
    run_gloo(_worker_infonce)
