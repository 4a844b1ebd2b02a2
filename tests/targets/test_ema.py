from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from jepa_blocks.distributed import unwrap_module
from jepa_blocks.targets import EMATarget, ema_update_, momentum_schedule
from jepa_blocks.targets.ema import _lerp_params
from jepa_blocks.training import cosine_ramp, warmup_cosine


def _mlp(dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).to(dtype)


def _bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 2)).double()


def _perturb(module: nn.Module, scale: float = 1.0) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))


def _params(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _linear_m(step: int, total: int, start: float = 0.996, end: float = 1.0) -> float:
    """I-JEPA's ramp written independently: linspace-like, clamped at the end."""
    frac = step / total if step < total else 1.0
    return start * (1 - frac) + end * frac


def _cosine_m(step: int, total: int, start: float = 0.996, end: float = 1.0) -> float:
    frac = min(step, total) / total
    return end - (end - start) * (math.cos(math.pi * frac) + 1) / 2


class FakeDDP(nn.Module):
    def __init__(self, m: nn.Module) -> None:
        super().__init__()
        self.module = m

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


class FakeCompiled(nn.Module):
    def __init__(self, m: nn.Module) -> None:
        super().__init__()
        self._orig_mod = m


# ---------------------------------------------------------------- schedule


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_schedule_endpoints(schedule):
    assert momentum_schedule(0, total_steps=100, schedule=schedule) == 0.996
    assert momentum_schedule(100, total_steps=100, schedule=schedule) == 1.0
    assert momentum_schedule(10_000, total_steps=100, schedule=schedule) == 1.0
    assert momentum_schedule(50, total_steps=100, schedule=schedule) == pytest.approx(0.998)
    assert momentum_schedule(0, total_steps=1, start=0.5, end=0.9, schedule=schedule) == 0.5
    assert momentum_schedule(1, total_steps=1, start=0.5, end=0.9, schedule=schedule) == 0.9


def test_schedule_matches_formulas():
    total = 37
    for s in range(0, 2 * total):
        assert momentum_schedule(s, total_steps=total) == pytest.approx(
            _linear_m(s, total), rel=0, abs=1e-15
        )
        assert momentum_schedule(s, total_steps=total, schedule="cosine") == pytest.approx(
            _cosine_m(s, total), rel=0, abs=1e-15
        )
    # Cosine starts slower than linear and ends faster.
    assert momentum_schedule(5, total_steps=total, schedule="cosine") < _linear_m(5, total)
    assert momentum_schedule(30, total_steps=total, schedule="cosine") > _linear_m(30, total)


@settings(max_examples=60, deadline=None)
@given(
    bounds=st.tuples(st.floats(0, 1), st.floats(0, 1)).map(sorted),
    total=st.integers(1, 10**6),
    a=st.floats(0, 2),
    b=st.floats(0, 2),
    schedule=st.sampled_from(["linear", "cosine"]),
)
def test_schedule_monotone_and_bounded(bounds, total, a, b, schedule):
    start, end = bounds
    s1, s2 = sorted((int(a * total), int(b * total)))
    m1 = momentum_schedule(s1, total_steps=total, start=start, end=end, schedule=schedule)
    m2 = momentum_schedule(s2, total_steps=total, start=start, end=end, schedule=schedule)
    assert start <= m1 <= m2 <= end
    m3 = momentum_schedule(s1 + 1, total_steps=total, start=start, end=end, schedule=schedule)
    assert m1 <= m3


@settings(max_examples=60, deadline=None)
@given(
    bounds=st.tuples(st.floats(0, 1), st.floats(0, 1)).map(sorted),
    total=st.integers(1, 10**6),
    a=st.floats(0, 1.1),
)
def test_schedule_ramps_are_the_training_schedules_ramps(bounds, total, a):
    """One ramp for momentum, learning rate and weight decay: equal to the last bit."""
    start, end = bounds
    step = int(a * total)
    cosine = momentum_schedule(step, total_steps=total, start=start, end=end, schedule="cosine")
    assert cosine == cosine_ramp(step, total_steps=total, start_value=start, final_value=end)
    linear = momentum_schedule(step, total_steps=total, start=start, end=end)
    warmup_only = warmup_cosine(
        step, total_steps=total, warmup_steps=total, start_value=start, peak_value=end,
        final_value=end,
    )
    assert linear == warmup_only


# ---------------------------------------------------------------- ema_update_


def test_ema_update_formula_and_extremes():
    torch.manual_seed(0)
    t = [torch.randn(3, 4, dtype=torch.float64), torch.randn(5, dtype=torch.float64)]
    o = [torch.randn(3, 4, dtype=torch.float64), torch.randn(5, dtype=torch.float64)]
    before = [x.clone() for x in t]
    ema_update_(t, o, 0.9)
    for x, b, y in zip(t, before, o, strict=True):
        torch.testing.assert_close(x, 0.9 * b + 0.1 * y, rtol=1e-15, atol=1e-15)
    kept = [x.clone() for x in t]
    ema_update_(t, o, 1.0)
    for x, k in zip(t, kept, strict=True):
        assert torch.equal(x, k)
    ema_update_(t, o, 0.0)
    for x, y in zip(t, o, strict=True):
        assert torch.equal(x, y)


def test_ema_update_mixed_dtype_uses_loop():
    torch.manual_seed(0)
    t = [torch.randn(6, dtype=torch.float64), torch.randn(2, dtype=torch.float32)]
    o = [torch.randn(6, dtype=torch.float32), torch.randn(2, dtype=torch.float32)]
    before = [x.clone() for x in t]
    ema_update_(t, o, 0.75)
    torch.testing.assert_close(t[0], 0.75 * before[0] + 0.25 * o[0].double())
    torch.testing.assert_close(t[1], 0.75 * before[1] + 0.25 * o[1])
    assert t[0].dtype == torch.float64


def test_foreach_path_equals_loop_path():
    torch.manual_seed(0)
    t = [torch.randn(7, 3), torch.randn(11), torch.randn(2, 2, 2)]
    o = [torch.randn_like(x) for x in t]
    fast = [x.clone() for x in t]
    _lerp_params(fast, o, 0.3)
    for x, y, f in zip(t, o, fast, strict=True):
        assert torch.equal(x.clone().lerp_(y, 0.3), f)


def test_ema_update_bad_args():
    t = [torch.zeros(3)]
    with pytest.raises(ValueError, match="online_params"):
        ema_update_(t, [torch.zeros(3), torch.zeros(3)], 0.9)
    with pytest.raises(ValueError, match=r"online_params\[0\]"):
        ema_update_(t, [torch.zeros(4)], 0.9)
    with pytest.raises(ValueError, match="momentum"):
        ema_update_(t, [torch.zeros(3)], 1.5)
    with pytest.raises(TypeError, match="target_params"):
        ema_update_(torch.zeros(3), [torch.zeros(3)], 0.9)
    with pytest.raises(TypeError, match=r"online_params\[0\]"):
        ema_update_(t, [3.0], 0.9)


# ---------------------------------------------------------------- EMATarget


def test_update_matches_formula_over_steps():
    online = _mlp()
    total = 10
    ema = EMATarget(online, total_steps=total)
    expected = _params(online)
    for s in range(4):
        _perturb(online)
        m = _linear_m(s, total)
        assert ema.momentum == pytest.approx(m, abs=1e-15)
        before = _params(ema.module)
        ema.update(online)
        for n, p in ema.module.named_parameters():
            o = dict(online.named_parameters())[n].detach()
            torch.testing.assert_close(p, m * before[n] + (1 - m) * o, rtol=1e-14, atol=1e-15)
            expected[n] = m * expected[n] + (1 - m) * o
        assert ema.step == s + 1
    for n, p in ema.module.named_parameters():
        torch.testing.assert_close(p, expected[n], rtol=1e-13, atol=1e-14)


def test_momentum_one_leaves_target_unchanged():
    online = _bn_model()
    for momentum in (1.0, (1.0, 1.0)):
        ema = EMATarget(online, total_steps=5, momentum=momentum)
        before = _params(ema.module)
        _perturb(online)
        for _ in range(3):
            ema.update(online)
        for n, p in ema.module.named_parameters():
            assert torch.equal(p, before[n])
    # Past the end of a ramp to 1.0 the target is frozen too.
    ema = EMATarget(online, total_steps=2)
    ema.update(online)
    ema.update(online)
    before = _params(ema.module)
    _perturb(online)
    ema.update(online)
    assert all(torch.equal(p, before[n]) for n, p in ema.module.named_parameters())


def test_state_dict_round_trip_continues_identically():
    online = _mlp()
    a = EMATarget(online, total_steps=8, schedule="cosine")
    for _ in range(3):
        _perturb(online)
        a.update(online)
    sd = a.state_dict()
    assert int(sd["num_steps"]) == 3

    b = EMATarget(_mlp(seed=1), total_steps=8, schedule="cosine")
    assert b.step == 0
    b.load_state_dict(sd)
    assert b.step == 3 and b.momentum == a.momentum
    for (_, p), (_, q) in zip(
        a.module.named_parameters(), b.module.named_parameters(), strict=True
    ):
        assert torch.equal(p, q)
    for _ in range(2):
        _perturb(online)
        a.update(online)
        b.update(online)
    assert a.step == b.step == 5
    for (_, p), (_, q) in zip(
        a.module.named_parameters(), b.module.named_parameters(), strict=True
    ):
        assert torch.equal(p, q)

    # Loading through a parent module also re-reads the step.
    parent = nn.ModuleDict({"ema": EMATarget(_mlp(), total_steps=8, schedule="cosine")})
    parent.load_state_dict({f"ema.{k}": v for k, v in a.state_dict().items()})
    assert parent["ema"].step == 5


def test_no_gradients_reach_target():
    online = _mlp()
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    online(x).sum().backward()  # online now holds .grad
    ema = EMATarget(online, total_steps=10)
    assert all(not p.requires_grad and p.grad is None for p in ema.parameters())
    y = ema(x)
    assert y.grad_fn is None and not y.requires_grad

    before = _params(ema.module)
    opt = torch.optim.SGD(online.parameters(), lr=0.1)
    loss = ((online(x) - ema(x)) ** 2).mean()
    loss.backward()
    opt.step()
    assert all(p.grad is None for p in ema.parameters())
    assert all(torch.equal(p, before[n]) for n, p in ema.module.named_parameters())
    assert not all(torch.equal(p, before[n]) for n, p in online.named_parameters())


def test_copy_always_runs_in_eval_mode():
    """Was: the copy followed the online module's mode, so dropout / drop-path ran in the
    target and the regression targets were random (the trainer never called .eval())."""
    online = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5))
    ema = EMATarget(online, total_steps=3)
    assert ema.training and not ema.module.training  # the flag follows, the copy does not
    ema.train()
    nn.Sequential(ema).train()  # a parent's .train() neither
    assert not ema.module.training and online.training
    ema.eval()
    assert not ema.training and not ema.module.training


def test_drop_path_encoder_gives_deterministic_targets():
    from jepa_blocks import ViTEncoder

    torch.manual_seed(0)
    online = ViTEncoder(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, drop_path_rate=0.5).train()
    ema = EMATarget(online, total_steps=3).train()
    x = torch.randn(4, 3, 16, 16)
    assert torch.equal(ema(x).tokens, ema(x).tokens)
    assert not torch.equal(online(x).tokens, online(x).tokens)  # the online encoder does drop paths


def test_buffers_copied():
    online = _bn_model()
    ema = EMATarget(online, total_steps=10)
    online.train()
    online(torch.randn(16, 4, dtype=torch.float64) * 3 + 1)
    assert not torch.equal(online[1].running_mean, ema.module[1].running_mean)
    ema.update(online)
    for (n, b), (_, ob) in zip(ema.module.named_buffers(), online.named_buffers(), strict=True):
        assert torch.equal(b, ob), n
    assert int(ema.module[1].num_batches_tracked) == 1
    # Buffers are copies, not aliases.
    online(torch.randn(16, 4, dtype=torch.float64))
    assert not torch.equal(online[1].running_mean, ema.module[1].running_mean)


def test_wrappers_unwrapped():
    online = _mlp()
    ema = EMATarget(FakeDDP(online), total_steps=10)
    assert "module.0.weight" in ema.state_dict()  # not module.module.0.weight
    reference = EMATarget(online, total_steps=10)
    _perturb(online)
    ema.update(FakeDDP(online))
    reference.update(online)
    for (_, p), (_, q) in zip(
        ema.module.named_parameters(), reference.module.named_parameters(), strict=True
    ):
        assert torch.equal(p, q)
    ema.update(FakeCompiled(FakeDDP(online)))
    assert ema.step == 2
    assert unwrap_module(FakeCompiled(online)) is online


def test_module_with_own_params_not_unwrapped():
    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.module = nn.Linear(2, 2)
            self.head = nn.Linear(2, 1)

    h = Holder()
    assert unwrap_module(h) is h
    ema = EMATarget(h, total_steps=3)
    with pytest.raises(ValueError, match="online"):
        ema.update(h.module)


def test_update_every_k():
    online = _bn_model()
    total, k = 20, 3
    ema = EMATarget(online, total_steps=total, update_every=k)
    assert ema.momentum == pytest.approx(_linear_m(k - 1, total), abs=1e-15)
    start = _params(ema.module)
    bn_start = ema.module[1].running_mean.clone()
    _perturb(online)
    online(torch.randn(8, 4, dtype=torch.float64))
    for _ in range(k - 1):
        ema.update(online)
        assert all(torch.equal(p, start[n]) for n, p in ema.module.named_parameters())
        assert torch.equal(ema.module[1].running_mean, bn_start)
    ema.update(online)
    m = _linear_m(k - 1, total)
    o = _params(online)
    for n, p in ema.module.named_parameters():
        torch.testing.assert_close(p, m * start[n] + (1 - m) * o[n], rtol=1e-14, atol=1e-15)
    assert torch.equal(ema.module[1].running_mean, online[1].running_mean)
    assert ema.step == k
    assert ema.momentum == pytest.approx(_linear_m(2 * k - 1, total), abs=1e-15)


def test_update_every_compensate():
    online = _mlp()
    ema = EMATarget(online, total_steps=10, update_every=2, compensate=True)
    m = _linear_m(1, 10) ** 2
    assert ema.momentum == pytest.approx(m, abs=1e-15)
    start = _params(ema.module)
    _perturb(online)
    ema.update(online)
    ema.update(online)
    o = _params(online)
    for n, p in ema.module.named_parameters():
        torch.testing.assert_close(p, m * start[n] + (1 - m) * o[n], rtol=1e-14, atol=1e-15)


def test_to_dtype_then_update_with_other_dtype_online():
    online = _mlp(torch.float32)
    ema = EMATarget(online, total_steps=10).to(torch.float64)
    assert ema.num_steps.dtype == torch.long
    assert all(p.dtype == torch.float64 for p in ema.parameters())
    start = _params(ema.module)
    _perturb(online)
    ema.update(online)
    o = _params(online)
    for n, p in ema.module.named_parameters():
        torch.testing.assert_close(p, 0.996 * start[n] + 0.004 * o[n].double())


def test_copy_keeps_device_and_dtype():
    online = _mlp(torch.float32)
    ema = EMATarget(online, total_steps=10)
    for p, q in zip(ema.parameters(), online.parameters(), strict=True):
        assert p.dtype == q.dtype and p.device == q.device
        assert p.data_ptr() != q.data_ptr()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_update_and_cpu_ema():
    online = _mlp(torch.float32).cuda()
    ema = EMATarget(online, total_steps=10)
    assert all(p.is_cuda for p in ema.parameters()) and ema.num_steps.is_cuda
    cpu_ema = copy.deepcopy(ema).cpu()  # an EMA kept on the host: cross-device loop path
    start = _params(ema.module)
    _perturb(online)
    ema.update(online)
    cpu_ema.update(online)
    o = _params(online)
    for n, p in ema.module.named_parameters():
        torch.testing.assert_close(p, 0.996 * start[n] + 0.004 * o[n])
    for (_, p), (_, q) in zip(
        ema.module.named_parameters(), cpu_ema.module.named_parameters(), strict=True
    ):
        torch.testing.assert_close(p.cpu(), q)
    assert int(ema.num_steps) == 1 and ema.step == 1


def test_bad_args():
    online = _mlp()
    with pytest.raises(ValueError, match="total_steps"):
        EMATarget(online, total_steps=0)
    with pytest.raises(TypeError, match="total_steps"):
        EMATarget(online, total_steps=2.5)
    for bad in ((1.1, 1.0), (-0.1, 1.0), (0.999, 0.99), 1.5):
        with pytest.raises(ValueError, match="momentum"):
            EMATarget(online, total_steps=5, momentum=bad)
    with pytest.raises(TypeError, match="momentum"):
        EMATarget(online, total_steps=5, momentum="0.99")
    with pytest.raises(ValueError, match="schedule"):
        EMATarget(online, total_steps=5, schedule="exp")
    with pytest.raises(ValueError, match="update_every"):
        EMATarget(online, total_steps=5, update_every=0)
    with pytest.raises(TypeError, match="compensate"):
        EMATarget(online, total_steps=5, compensate=1)
    with pytest.raises(TypeError, match="online"):
        EMATarget(lambda x: x, total_steps=5)

    ema = EMATarget(online, total_steps=5)
    with pytest.raises(TypeError, match="online"):
        ema.update(list(online.parameters()))
    with pytest.raises(ValueError, match=r"online.*shape"):
        ema.update(nn.Sequential(nn.Linear(4, 9), nn.ReLU(), nn.Linear(9, 3)).double())
    with pytest.raises(ValueError, match=r"online.*missing"):
        ema.update(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 3)).double())
    with pytest.raises(ValueError, match=r"online.*buffer"):
        ema.update(_with_buffer())
    assert ema.step == 0  # failed updates do not count


# ---------------------------------------------------------------- non-finite online weights


def _state(ema: EMATarget) -> dict[str, torch.Tensor]:
    return {n: t.clone() for n, t in ema.state_dict().items()}


def _assert_same_state(ema: EMATarget, before: dict[str, torch.Tensor]) -> None:
    after = ema.state_dict()
    assert set(after) == set(before)
    for name, t in before.items():
        assert torch.equal(after[name], t), name  # NaN-free before, so equal means untouched


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", ["parameter", "buffer"])
@pytest.mark.parametrize("value_checks_on", [True, False])
def test_update_refuses_nonfinite_online_weights(bad, where, value_checks_on):
    """A NaN/Inf online weight raises naming it and leaves the target (weights, buffers,
    step count) untouched, whatever the value-check setting: the target is what the
    trainer's non-finite step guard protects."""
    from jepa_blocks import value_checks

    online = _bn_model()
    ema = EMATarget(online, total_steps=10, momentum=0.5)
    ema.update(online)  # one good update first
    before = _state(ema)
    _perturb(online)
    with torch.no_grad():
        if where == "parameter":
            online[2].weight[1, 3] = bad
        else:
            online[1].running_var[2] = bad
    name = "'2.weight'" if where == "parameter" else "'1.running_var'"
    with value_checks(value_checks_on), pytest.raises(ValueError, match=rf"online.*{where} {name}"):
        ema.update(online)
    _assert_same_state(ema, before)
    assert ema.step == 1
    # Repaired online weights update as if the refused call had not happened.
    with torch.no_grad():
        online[2].weight[1, 3] = 0.25
        online[1].running_var[2] = 1.5
    twin = copy.deepcopy(ema)
    ema.update(online)
    expected = {n: 0.5 * t + 0.5 * _params(online)[n] for n, t in _params(twin.module).items()}
    for n, p in ema.module.named_parameters():
        torch.testing.assert_close(p, expected[n], rtol=0, atol=1e-15)
    assert ema.step == 2 and torch.isfinite(ema.module[1].running_var).all()


def test_nonfinite_check_runs_only_when_the_update_absorbs():
    """Calls that do not move the target (update_every, momentum 1 for the parameters)
    only count the step; buffers are still copied at momentum 1, so they are checked."""
    online = _bn_model()
    ema = EMATarget(online, total_steps=10, update_every=2)
    with torch.no_grad():
        online[0].weight[0, 0] = float("nan")
    ema.update(online)  # call 1 of 2: counts, absorbs nothing
    assert ema.step == 1 and torch.isfinite(ema.module[0].weight).all()
    with pytest.raises(ValueError, match="online parameter '0.weight'"):
        ema.update(online)
    frozen = EMATarget(_bn_model(), total_steps=10, momentum=1.0)
    frozen.update(online)  # momentum 1: the NaN parameter is not averaged in
    assert frozen.step == 1 and torch.isfinite(frozen.module[0].weight).all()
    with torch.no_grad():
        online[1].running_mean[0] = float("inf")
    with pytest.raises(ValueError, match="online buffer '1.running_mean'"):
        frozen.update(online)


def test_check_finite_false_absorbs_as_documented():
    online = _mlp()
    ema = EMATarget(online, total_steps=10, momentum=0.5, check_finite=False)
    with torch.no_grad():
        online[0].bias[0] = float("nan")
    ema.update(online)
    assert torch.isnan(ema.module[0].bias[0]) and ema.step == 1
    with pytest.raises(TypeError, match="check_finite"):
        EMATarget(online, total_steps=10, check_finite=1)


def test_nonfinite_check_with_mixed_dtypes_and_empty_tensors():
    """Grouped per (device, dtype) for the fused reduction: a bf16 parameter next to
    float64 ones and an empty parameter are all handled; the first bad one is named."""
    online = nn.Sequential(nn.Linear(4, 8).double(), nn.Linear(8, 3).bfloat16())
    online.register_parameter("empty", nn.Parameter(torch.zeros(0)))
    ema = EMATarget(online, total_steps=10)
    ema.update(online)
    with torch.no_grad():
        online[1].bias[2] = float("inf")
    with pytest.raises(ValueError, match="online parameter '1.bias'"):
        ema.update(online)
    with torch.no_grad():
        online[0].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="online parameter '0.weight'"):
        ema.update(online)
    assert ema.step == 1


def _with_buffer() -> nn.Module:
    m = _mlp()
    m.register_buffer("extra", torch.zeros(1))
    return m


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"step": -1, "total_steps": 5}, "step"),
        ({"step": 0, "total_steps": 0}, "total_steps"),
        ({"step": 0, "total_steps": 5, "start": 0.9, "end": 0.8}, "start"),
        ({"step": 0, "total_steps": 5, "start": 1.2}, "start"),
        ({"step": 0, "total_steps": 5, "end": float("nan")}, "end"),
        ({"step": 0, "total_steps": 5, "schedule": "step"}, "schedule"),
    ],
)
def test_schedule_bad_args(kwargs, name):
    step = kwargs.pop("step")
    with pytest.raises(ValueError, match=name):
        momentum_schedule(step, **kwargs)


# ---------------------------------------------------------------- DDP, 2 gloo processes


def _all_equal_across_ranks(t: torch.Tensor) -> bool:
    gathered = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, t.contiguous())
    return all(torch.equal(g, t) for g in gathered)


def _worker_ema_under_ddp(rank: int, world: int) -> None:
    torch.manual_seed(rank)  # different init per rank: DDP broadcasts rank 0's weights
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2)).double()
    online = DDP(model)
    ema = EMATarget(online, total_steps=10, momentum=(0.5, 1.0))
    opt = torch.optim.SGD(online.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(100 + rank)  # different local data, sizes 5 and 6
    for step in range(3):
        x = torch.randn(5 + rank, 4, generator=gen, dtype=torch.float64) * 2 + rank
        ema(x)  # the target's own forward (train mode: updates its BatchNorm statistics)
        loss = online(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update(online if step < 2 else FakeCompiled(online))  # DDP found inside wrappers
    state = ema.state_dict()  # parameters, buffers (BatchNorm statistics) and num_steps
    assert {"module.1.running_mean", "module.1.num_batches_tracked", "num_steps"} <= set(state)
    diverged = [name for name, t in state.items() if not _all_equal_across_ranks(t)]
    assert not diverged, f"rank {rank}: EMA state differs across ranks in {diverged}"
    assert ema.step == 3 and int(ema.num_steps) == 3
    # The target really moved: neither the initial weights nor the online ones.
    assert not torch.equal(ema.module[0].weight, model[0].weight)


@pytest.mark.distributed
def test_gloo_ddp_ema_identical_on_every_rank(run_gloo):
    run_gloo(_worker_ema_under_ddp)


def _worker_nonfinite_buffer_on_one_rank(rank: int, world: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 2)).double()
    online = DDP(model)
    ema = EMATarget(online, total_steps=10)
    before = {n: t.clone() for n, t in ema.state_dict().items()}
    if rank == 1:  # only this rank's local BatchNorm statistics went bad
        with torch.no_grad():
            model[1].running_var[0] = float("nan")
    # Every rank raises (none waits in the buffer broadcast); no target changes.
    with pytest.raises(ValueError, match="running_var" if rank == 1 else "another rank"):
        ema.update(online)
    assert all(torch.equal(ema.state_dict()[n], t) for n, t in before.items())


@pytest.mark.distributed
def test_gloo_ddp_nonfinite_buffer_on_one_rank_raises_on_every_rank(run_gloo):
    run_gloo(_worker_nonfinite_buffer_on_one_rank)
