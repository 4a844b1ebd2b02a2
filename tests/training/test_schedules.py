from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from jepa_blocks.training import OptimizerScheduler, cosine_ramp, warmup_cosine

IJEPA_LR = (2e-4, 1e-3, 1e-6)
IJEPA_WD = (0.04, 0.4)


def _ref_warmup_cosine(step, total, warmup, start, peak, final):
    """I-JEPA's WarmupCosineSchedule re-derived: interpolation table, then half cosine."""
    if step >= total:
        return final
    if step < warmup:
        frac = step / warmup
        return (1.0 - frac) * start + frac * peak
    progress = (step - warmup) / max(1, total - warmup)
    return final + (peak - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _ref_cosine_ramp(step, total, start, final):
    progress = min(step, total) / total
    return final + (start - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ---------------------------------------------------------------- pure functions


def test_warmup_cosine_ijepa_values():
    kw = dict(
        total_steps=1000, warmup_steps=100, start_value=2e-4, peak_value=1e-3, final_value=1e-6
    )
    assert warmup_cosine(0, **kw) == pytest.approx(2e-4)
    assert warmup_cosine(50, **kw) == pytest.approx(6e-4)
    assert warmup_cosine(100, **kw) == pytest.approx(1e-3)
    # halfway through the cosine part: midpoint of peak and final
    assert warmup_cosine(550, **kw) == pytest.approx((1e-3 + 1e-6) / 2)
    assert warmup_cosine(1000, **kw) == 1e-6
    assert warmup_cosine(10**6, **kw) == 1e-6
    for step in range(0, 1200, 7):
        assert warmup_cosine(step, **kw) == pytest.approx(
            _ref_warmup_cosine(step, 1000, 100, 2e-4, 1e-3, 1e-6), rel=1e-12, abs=1e-15
        )


def test_warmup_zero_starts_at_peak():
    kw = dict(total_steps=10, warmup_steps=0, start_value=5.0, peak_value=1.0, final_value=0.0)
    assert warmup_cosine(0, **kw) == 1.0
    values = [warmup_cosine(s, **kw) for s in range(12)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))
    assert values[-1] == 0.0


def test_warmup_equal_total():
    kw = dict(total_steps=4, warmup_steps=4, start_value=0.0, peak_value=1.0, final_value=0.5)
    assert [warmup_cosine(s, **kw) for s in range(6)] == [0.0, 0.25, 0.5, 0.75, 0.5, 0.5]


@settings(max_examples=60, deadline=None)
@given(
    total=st.integers(1, 500),
    warmup_frac=st.floats(0.0, 1.0),
    start=st.floats(0.0, 1.0),
    peak_extra=st.floats(0.0, 1.0),
    final_frac=st.floats(0.0, 1.0),
)
def test_warmup_cosine_endpoints_and_monotone(total, warmup_frac, start, peak_extra, final_frac):
    warmup = int(warmup_frac * total)
    peak = start + peak_extra
    final = final_frac * peak
    kw = dict(
        total_steps=total,
        warmup_steps=warmup,
        start_value=start,
        peak_value=peak,
        final_value=final,
    )
    values = [warmup_cosine(s, **kw) for s in range(total + 3)]
    assert values[0] == (start if warmup > 0 else peak)
    if warmup < total:
        assert values[warmup] == pytest.approx(peak)
    assert values[total] == final and values[-1] == final
    # warmup == total: the warmup covers steps 0..total-1, then the value drops to final
    up = values[: warmup + 1] if warmup < total else values[:total]
    down = values[warmup:]
    assert all(a <= b for a, b in zip(up, up[1:], strict=False))
    assert all(a >= b for a, b in zip(down, down[1:], strict=False))
    assert all(min(start, final) <= v <= peak for v in values)


@settings(max_examples=60, deadline=None)
@given(total=st.integers(1, 500), start=st.floats(0.0, 1.0), final=st.floats(0.0, 1.0))
def test_cosine_ramp_endpoints_and_monotone(total, start, final):
    values = [
        cosine_ramp(s, total_steps=total, start_value=start, final_value=final)
        for s in range(total + 3)
    ]
    assert values[0] == start
    assert values[total] == final and values[-1] == final
    pairs = list(zip(values, values[1:], strict=False))
    if final >= start:
        assert all(a <= b for a, b in pairs)
    else:
        assert all(a >= b for a, b in pairs)
    for s in (0, total // 3, total // 2, total):
        assert values[s] == pytest.approx(_ref_cosine_ramp(s, total, start, final), abs=1e-12)


def test_cosine_ramp_ijepa_wd():
    kw = dict(total_steps=100, start_value=0.04, final_value=0.4)
    assert cosine_ramp(0, **kw) == 0.04
    assert cosine_ramp(50, **kw) == pytest.approx(0.22)
    assert cosine_ramp(100, **kw) == 0.4


def test_schedule_bad_inputs():
    kw = dict(start_value=0.0, peak_value=1.0, final_value=0.0)
    with pytest.raises(ValueError, match="warmup_steps"):
        warmup_cosine(0, total_steps=5, warmup_steps=6, **kw)
    with pytest.raises(ValueError, match="total_steps"):
        warmup_cosine(0, total_steps=0, warmup_steps=0, **kw)
    with pytest.raises(ValueError, match="step"):
        warmup_cosine(-1, total_steps=5, warmup_steps=0, **kw)
    with pytest.raises(TypeError, match="step"):
        warmup_cosine(1.5, total_steps=5, warmup_steps=0, **kw)
    with pytest.raises(ValueError, match="peak_value"):
        warmup_cosine(
            0, total_steps=5, warmup_steps=0, start_value=0.0, peak_value=math.nan, final_value=0.0
        )
    with pytest.raises(ValueError, match="total_steps"):
        cosine_ramp(0, total_steps=0, start_value=0.0, final_value=1.0)


# ---------------------------------------------------------------- OptimizerScheduler


def _model_and_opt(lr_scale: float | None = None, wd: float = 0.04):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    decay = {"params": [model[0].weight, model[2].weight], "weight_decay": wd}
    if lr_scale is not None:
        decay["lr_scale"] = lr_scale
    flagged = {"params": [model[0].bias, model[2].bias], "apply_wd": False, "weight_decay": wd}
    zero_wd = {"params": list(model[1].parameters()), "weight_decay": 0.0}
    opt = torch.optim.AdamW([decay, flagged, zero_wd], lr=1.0)
    return model, opt


def _train_step(model, opt, sched):
    # The batch depends only on the step, so an interrupted run sees the same data.
    batch = torch.randn(5, 3, generator=torch.Generator().manual_seed(sched.step_count))
    loss = model(batch).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()


def _hypers(opt):
    return [(g["lr"], g["weight_decay"]) for g in opt.param_groups]


def test_scheduler_writes_schedules_and_respects_no_decay_groups():
    model, opt = _model_and_opt(lr_scale=0.5)
    sched = OptimizerScheduler(
        opt, total_steps=20, warmup_steps=5, lr=IJEPA_LR, weight_decay=IJEPA_WD
    )
    for step in range(25):
        lr = _ref_warmup_cosine(step, 20, 5, *IJEPA_LR)
        wd = _ref_cosine_ramp(step, 20, *IJEPA_WD)
        (lr0, wd0), (lr1, wd1), (lr2, wd2) = _hypers(opt)
        assert (
            lr0 == pytest.approx(0.5 * lr) and lr1 == pytest.approx(lr) and lr2 == pytest.approx(lr)
        )
        assert wd0 == pytest.approx(wd)
        assert wd1 == 0.0 and wd2 == 0.0  # flagged group and group built with wd 0
        cur = sched.current()
        assert cur["step"] == step == sched.step_count
        assert cur["lr"] == pytest.approx(lr) and cur["weight_decay"] == pytest.approx(wd)
        _train_step(model, opt, sched)
    assert [g["apply_wd"] for g in opt.param_groups] == [True, False, False]


def test_scheduler_state_round_trip_resumes_identically():
    # Uninterrupted reference run.
    model_a, opt_a = _model_and_opt()
    sched_a = OptimizerScheduler(
        opt_a, total_steps=12, warmup_steps=3, lr=IJEPA_LR, weight_decay=IJEPA_WD
    )
    ref = []
    for _ in range(12):
        ref.append(_hypers(opt_a))
        _train_step(model_a, opt_a, sched_a)

    # Interrupted run: 5 steps, save, rebuild everything, load, continue.
    model_b, opt_b = _model_and_opt()
    sched_b = OptimizerScheduler(
        opt_b, total_steps=12, warmup_steps=3, lr=IJEPA_LR, weight_decay=IJEPA_WD
    )
    got = []
    for _ in range(5):
        got.append(_hypers(opt_b))
        _train_step(model_b, opt_b, sched_b)
    saved = {
        "model": model_b.state_dict(),
        "opt": opt_b.state_dict(),
        "sched": sched_b.state_dict(),
    }
    assert saved["sched"] == {"step": 5}

    model_c, opt_c = _model_and_opt()
    # A fresh optimizer whose groups lost the wd-0 hint: the saved 'apply_wd' flags win.
    for g in opt_c.param_groups:
        g["weight_decay"] = 0.123
    model_c.load_state_dict(saved["model"])
    opt_c.load_state_dict(saved["opt"])
    sched_c = OptimizerScheduler(
        opt_c, total_steps=12, warmup_steps=3, lr=IJEPA_LR, weight_decay=IJEPA_WD
    )
    sched_c.load_state_dict(saved["sched"])
    for _ in range(7):
        got.append(_hypers(opt_c))
        _train_step(model_c, opt_c, sched_c)
    assert got == ref
    for pa, pc in zip(model_a.parameters(), model_c.parameters(), strict=True):
        torch.testing.assert_close(pa, pc, rtol=0, atol=0)


def test_scheduler_wd_start_zero_survives_resume():
    # Decay ramp starting at 0: after a resume the decayed group has wd 0 in the
    # optimizer, but its apply_wd flag (saved with the optimizer) keeps it decayed.
    model, opt = _model_and_opt()
    sched = OptimizerScheduler(opt, total_steps=10, lr=1e-3, weight_decay=(0.0, 0.1))
    assert opt.param_groups[0]["weight_decay"] == 0.0
    state = opt.state_dict()
    _, opt2 = _model_and_opt()
    opt2.load_state_dict(state)
    sched2 = OptimizerScheduler(opt2, total_steps=10, lr=1e-3, weight_decay=(0.0, 0.1))
    sched2.load_state_dict({"step": 10})
    assert opt2.param_groups[0]["weight_decay"] == pytest.approx(0.1)
    assert opt2.param_groups[1]["weight_decay"] == 0.0
    del sched


def test_scheduler_constant_values_and_no_wd_schedule():
    _, opt = _model_and_opt(wd=0.3)
    sched = OptimizerScheduler(opt, total_steps=3, lr=0.01)
    for _ in range(4):
        assert [g["lr"] for g in opt.param_groups] == [0.01] * 3
        # weight_decay=None leaves the optimizer's values alone
        assert [g["weight_decay"] for g in opt.param_groups] == [0.3, 0.3, 0.0]
        sched.step()
    assert sched.current()["weight_decay"] is None


def test_scheduler_tensor_lr_updated_in_place():
    p = torch.nn.Parameter(torch.zeros(2, 2))
    lr = torch.tensor(1.0)
    opt = torch.optim.Adam([p], lr=lr)
    sched = OptimizerScheduler(opt, total_steps=4, warmup_steps=2, lr=(0.0, 1.0, 0.0))
    sched.step()
    assert opt.param_groups[0]["lr"] is lr
    assert lr.item() == pytest.approx(0.5)


def test_scheduler_bad_inputs():
    _, opt = _model_and_opt()
    with pytest.raises(ValueError, match="warmup_steps"):
        OptimizerScheduler(opt, total_steps=5, warmup_steps=6, lr=IJEPA_LR)
    with pytest.raises(ValueError, match="total_steps"):
        OptimizerScheduler(opt, total_steps=0, lr=IJEPA_LR)
    with pytest.raises(TypeError, match="optimizer"):
        OptimizerScheduler([], total_steps=5, lr=IJEPA_LR)
    with pytest.raises(TypeError, match="lr"):
        OptimizerScheduler(opt, total_steps=5, lr=(1e-3, 1e-4))
    with pytest.raises(ValueError, match=r"lr\[1\]"):
        OptimizerScheduler(opt, total_steps=5, lr=(1e-3, -1.0, 0.0))
    with pytest.raises(TypeError, match="weight_decay"):
        OptimizerScheduler(opt, total_steps=5, lr=1e-3, weight_decay=(0.1, 0.2, 0.3))
    with pytest.raises(ValueError, match="weight_decay"):
        OptimizerScheduler(opt, total_steps=5, lr=1e-3, weight_decay=-0.1)
    opt.param_groups[0]["apply_wd"] = "yes"
    with pytest.raises(TypeError, match="apply_wd"):
        OptimizerScheduler(opt, total_steps=5, lr=1e-3)
    _, opt = _model_and_opt()
    sched = OptimizerScheduler(opt, total_steps=5, lr=1e-3)
    with pytest.raises(ValueError, match="state_dict"):
        sched.load_state_dict({})
    with pytest.raises(ValueError, match="step"):
        sched.load_state_dict({"step": -2})


# ---------------------------------------------------------------- torch LRScheduler API


def test_scheduler_is_a_torch_lr_scheduler_with_get_last_lr():
    from torch.optim.lr_scheduler import LRScheduler

    model, opt = _model_and_opt(lr_scale=0.5)
    sched = OptimizerScheduler(opt, total_steps=9, warmup_steps=3, lr=IJEPA_LR, weight_decay=IJEPA_WD)
    assert isinstance(sched, LRScheduler) and sched.optimizer is opt
    for step in range(12):
        lr = _ref_warmup_cosine(step, 9, 3, *IJEPA_LR)
        assert sched.last_epoch == step
        assert sched.get_last_lr() == pytest.approx([0.5 * lr, lr, lr])
        assert sched.get_last_lr() == [g["lr"] for g in opt.param_groups]
        assert sched.get_lr() == sched.get_last_lr()
        assert opt.param_groups[0]["weight_decay"] == pytest.approx(_ref_cosine_ramp(step, 9, *IJEPA_WD))
        _train_step(model, opt, sched)
    with pytest.raises(TypeError, match="epoch must be None"):
        sched.step(3)


def test_scheduler_in_a_plain_torch_loop_warns_nothing(recwarn):
    # The usual torch loop (optimizer.step() then scheduler.step()) must not trigger
    # LRScheduler's call-order warnings.
    model, opt = _model_and_opt()
    sched = OptimizerScheduler(opt, total_steps=5, lr=1e-3, weight_decay=0.1)
    for _ in range(3):
        _train_step(model, opt, sched)
    assert not [w for w in recwarn if "lr_scheduler" in str(w.message)]
    assert sched.state_dict() == {"step": 3}  # the format of earlier checkpoints
