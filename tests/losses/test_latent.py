"""Tests for jepa_blocks.losses.latent."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from jepa_blocks.losses import LatentPredictionLoss, LossOutput, latent_prediction_loss

F64 = torch.float64


def _rand(*shape, seed=0, dtype=F64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _valid(shape, seed=0, p=0.6):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=gen) < p


def _reference(pred, target, valid, loss_type="smooth_l1", beta=1.0, normalize=True):
    """torch's functional losses on the valid tokens only, gathered with a boolean index."""
    if normalize:
        mu = target.mean(-1, keepdim=True)
        var = target.var(-1, unbiased=False, keepdim=True)
        target = (target - mu) / torch.sqrt(var + 1e-5)
    if valid is not None:
        pred, target = pred[valid], target[valid]  # (num_valid, D)
    if pred.numel() == 0:
        return torch.zeros((), dtype=pred.dtype)
    if loss_type == "smooth_l1":
        return F.smooth_l1_loss(pred, target, beta=beta)
    if loss_type == "l1":
        return F.l1_loss(pred, target)
    return F.mse_loss(pred, target)


@pytest.mark.parametrize("loss_type", ["smooth_l1", "l1", "l2"])
@pytest.mark.parametrize("shape", [(3, 5, 4), (2, 3, 6, 4)])
def test_each_loss_type_equals_torch_on_valid_tokens(loss_type, shape):
    pred, target = _rand(*shape, seed=1) * 2, _rand(*shape, seed=2)
    valid = _valid(shape[:-1], seed=3)
    for normalize in (True, False):
        out = latent_prediction_loss(
            pred, target, valid, loss_type=loss_type, beta=0.5, normalize_targets=normalize
        )
        ref = _reference(pred, target, valid, loss_type, beta=0.5, normalize=normalize)
        torch.testing.assert_close(out.total, ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out.terms["level0"], ref, rtol=1e-12, atol=1e-12)
    no_mask = latent_prediction_loss(pred, target, None, loss_type=loss_type)
    torch.testing.assert_close(no_mask.total, _reference(pred, target, None, loss_type))


def test_zero_for_equal_inputs():
    target = _rand(2, 7, 8, seed=4)
    valid = _valid((2, 7), seed=5)
    out = latent_prediction_loss(target, target.clone(), valid, normalize_targets=False)
    assert out.total == 0
    normed = F.layer_norm(target, (8,))
    out = latent_prediction_loss(normed, target, valid, loss_type="l2")
    torch.testing.assert_close(out.total, torch.zeros((), dtype=F64), rtol=0, atol=1e-20)


def test_level_weights_and_terms():
    preds = [_rand(2, 6, 4, seed=10), _rand(2, 3, 4, seed=11), _rand(2, 2, 4, seed=12)]
    targs = [_rand(2, 6, 4, seed=20), _rand(2, 3, 4, seed=21), _rand(2, 2, 4, seed=22)]
    valid = [_valid((2, 6), seed=30), None, _valid((2, 2), seed=31, p=0.9)]
    out = latent_prediction_loss(preds, targs, valid)
    assert isinstance(out, LossOutput) and list(out.terms) == ["level0", "level1", "level2"]
    for lvl in range(3):
        ref = _reference(preds[lvl], targs[lvl], valid[lvl])
        torch.testing.assert_close(out.terms[f"level{lvl}"], ref, rtol=1e-12, atol=1e-12)
    t = out.terms
    torch.testing.assert_close(out.total, t["level0"] + 0.7 * t["level1"] + 0.5 * t["level2"])
    custom = latent_prediction_loss(preds[:2], targs[:2], valid[:2], level_weights=(0.0, 2.0, 9.0))
    torch.testing.assert_close(custom.total, 2.0 * t["level1"])
    module = LatentPredictionLoss(level_weights=(1.0, 0.7, 0.5))
    loss, terms = module(preds, targs, valid, return_terms=True)
    torch.testing.assert_close(loss, out.total, rtol=0, atol=0)


@settings(max_examples=20, deadline=None)
@given(b=st.integers(1, 3), k=st.integers(1, 6), d=st.integers(1, 5), seed=st.integers(0, 9999))
def test_padding_is_ignored(b, k, d, seed):
    pred, target = _rand(b, k, d, seed=seed), _rand(b, k, d, seed=seed + 1)
    valid = _valid((b, k), seed=seed + 2)
    base = latent_prediction_loss(pred, target, valid).total
    torch.testing.assert_close(base, _reference(pred, target, valid), rtol=1e-12, atol=1e-12)
    # Garbage (even NaN / inf) in padded slots changes neither value nor gradient.
    junk_p = torch.where(valid[..., None], pred, torch.full_like(pred, float("nan")))
    junk_t = torch.where(valid[..., None], target, torch.full_like(target, float("inf")))
    junk_p.requires_grad_(True)
    changed = latent_prediction_loss(junk_p, junk_t, valid).total
    assert torch.equal(changed, base)
    changed.backward()
    assert torch.isfinite(junk_p.grad).all()
    assert (junk_p.grad[~valid] == 0).all()


def test_no_valid_token_gives_zero_without_nan():
    pred = _rand(2, 3, 4, seed=40).requires_grad_(True)
    valid = torch.zeros(2, 3, dtype=torch.bool)
    out = latent_prediction_loss([pred, pred], [pred.detach(), pred.detach() + 1], [valid, None])
    assert out.terms["level0"] == 0 and torch.isfinite(out.total)
    out.total.backward()
    assert torch.isfinite(pred.grad).all()


def test_gradient_zero_on_padded_slots_and_targets_not_detached():
    pred = _rand(2, 5, 4, seed=41).requires_grad_(True)
    target = _rand(2, 5, 4, seed=42).requires_grad_(True)
    valid = _valid((2, 5), seed=43)
    latent_prediction_loss(pred, target, valid).total.backward()
    assert (pred.grad[~valid] == 0).all() and (pred.grad[valid] != 0).any()
    assert target.grad is not None and (target.grad[~valid] == 0).all()


def test_low_precision_and_autocast():
    pred32, targ32 = (
        _rand(2, 6, 8, seed=50, dtype=torch.float32),
        _rand(2, 6, 8, seed=51, dtype=torch.float32),
    )
    valid = _valid((2, 6), seed=52)
    ref = latent_prediction_loss(pred32, targ32, valid).total
    for dtype in (torch.bfloat16, torch.float16):
        pred = pred32.to(dtype).requires_grad_(True)
        out = latent_prediction_loss(pred, targ32.to(dtype), valid).total
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, ref, rtol=0.02, atol=0.02)
        out.backward()
        assert pred.grad.dtype == dtype
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = latent_prediction_loss(pred32, targ32, valid).total
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref)
    assert latent_prediction_loss(pred32.double(), targ32.double()).total.dtype == F64


def test_bad_inputs_name_the_argument():
    p, t = _rand(2, 3, 4), _rand(2, 3, 4)
    with pytest.raises(ValueError, match="predictions"):
        latent_prediction_loss([], [])
    with pytest.raises(TypeError, match="predictions"):
        latent_prediction_loss("abc", t)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="targets"):
        latent_prediction_loss([p, p], [t])
    with pytest.raises(ValueError, match=r"targets\[0\]"):
        latent_prediction_loss(p, t[:, :2])
    with pytest.raises(ValueError, match=r"predictions\[0\]"):
        latent_prediction_loss(p[0, 0], t[0, 0])
    with pytest.raises(TypeError, match=r"targets\[0\]"):
        latent_prediction_loss(p, t.long())
    with pytest.raises(ValueError, match=r"valid\[0\]"):
        latent_prediction_loss(p, t, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"valid\[0\]"):
        latent_prediction_loss(p, t, torch.ones(2, 3))
    with pytest.raises(ValueError, match="valid"):
        latent_prediction_loss([p, p], [t, t], [None])
    with pytest.raises(TypeError, match="valid"):
        latent_prediction_loss(p, t, 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="level_weights"):
        latent_prediction_loss([p, p], [t, t], level_weights=(1.0,))
    with pytest.raises(ValueError, match=r"level_weights\[1\]"):
        latent_prediction_loss(p, t, level_weights=(1.0, -0.5))
    with pytest.raises(ValueError, match="loss_type"):
        latent_prediction_loss(p, t, loss_type="huber")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="beta"):
        latent_prediction_loss(p, t, beta=-1.0)
    with pytest.raises(ValueError, match="level_weights"):
        LatentPredictionLoss(level_weights=())
    with pytest.raises(TypeError, match="normalize_targets"):
        LatentPredictionLoss(normalize_targets=1)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- distributed


def _latent_inputs() -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Two levels of a global batch of 5 samples whose valid-token counts differ a lot."""
    g = torch.Generator().manual_seed(3)
    preds = [torch.randn(5, 2, 6, 4, generator=g, dtype=torch.float64) for _ in range(2)]
    targets = [torch.randn(5, 2, 6, 4, generator=g, dtype=torch.float64) for _ in range(2)]
    valid = [torch.rand(5, 2, 6, generator=g) < torch.linspace(0.1, 0.9, 5)[:, None, None] for _ in range(2)]
    return preds, targets, valid


def _latent_rank(rank: int, world: int) -> None:
    import torch.distributed as dist

    preds, targets, valid = _latent_inputs()
    rows = slice(0, 2) if rank == 0 else slice(2, 5)  # unequal local batches: 2 and 3 samples
    local = [p[rows].clone().requires_grad_(True) for p in preds]
    total, terms = latent_prediction_loss(local, [t[rows] for t in targets], [v[rows] for v in valid],
                                          gather_distributed=True)
    total.backward()
    full = [p.clone().requires_grad_(True) for p in preds]
    ref_total, ref_terms = latent_prediction_loss(full, targets, valid)
    ref_total.backward()
    # Every rank: the global-batch value.
    assert total.item() == pytest.approx(ref_total.item(), rel=1e-12)
    assert [t.item() for t in terms.values()] == pytest.approx([t.item() for t in ref_terms.values()], rel=1e-12)
    for lvl in range(2):
        # DDP averages over ranks, so a rank's share of the parameter gradient is grad / world:
        # equal to the single-process gradient of its rows.
        torch.testing.assert_close(local[lvl].grad / world, full[lvl].grad[rows], rtol=1e-6, atol=1e-12)
    # Without gathering, each rank averages its own tokens, and the ranks' mean differs.
    plain = latent_prediction_loss([p[rows] for p in preds], [t[rows] for t in targets], [v[rows] for v in valid])
    mean_of_means = plain.total.clone()
    dist.all_reduce(mean_of_means)
    assert (mean_of_means / world).item() != pytest.approx(ref_total.item(), rel=1e-3)


@pytest.mark.distributed
def test_gather_distributed_gives_global_mean_and_single_process_gradients(run_gloo):
    run_gloo(_latent_rank)
