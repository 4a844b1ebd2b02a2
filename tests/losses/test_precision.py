"""Every loss computes in float32 whatever the input precision (jepa_blocks._precision).

For each public loss, bf16 / fp16 inputs must give *bitwise* the float32 value (and terms)
of the same inputs upcast to float32 first, and the input gradients must be the float32
gradients rounded once to the input dtype. A loss that kept any intermediate (a sum, a
matmul, a normalisation) in low precision would differ in the last bits at least. Under
``torch.autocast`` the losses must also ignore the autocast dtype.
"""

from __future__ import annotations

import pytest
import torch

import jepa_blocks.losses as losses
from jepa_blocks.losses import (
    InfoNCELoss,
    LatentPredictionLoss,
    LeJEPALoss,
    LossOutput,
    NTXentLoss,
    SIGRegLoss,
    VICRegLoss,
    covariance_loss,
    info_nce_loss,
    invariance_loss,
    latent_prediction_loss,
    lejepa_loss,
    lejepa_view_loss,
    ntxent_loss,
    sigreg,
    variance_loss,
    vicreg_loss,
)

_VALID = torch.rand(4, 6, generator=torch.Generator().manual_seed(0)) > 0.3
_DIRECTIONS = torch.randn(16, 32, generator=torch.Generator().manual_seed(1))
_PAIR = ((64, 16), (64, 16))

# name -> (loss of the input tensors, input shapes). Modules are built per call, in eval
# mode where they keep a step counter, so every call sees the same state.
_CASES = {
    "latent_prediction_loss": (
        lambda p, t: latent_prediction_loss(p, t, _VALID),
        ((4, 6, 8), (4, 6, 8)),
    ),
    "LatentPredictionLoss": (
        lambda p0, t0, p1, t1: LatentPredictionLoss(loss_type="l2")([p0, p1], [t0, t1], return_terms=True),
        ((4, 6, 8), (4, 6, 8), (4, 3, 8), (4, 3, 8)),
    ),
    "vicreg_loss": (vicreg_loss, _PAIR),
    "VICRegLoss": (lambda a, b: VICRegLoss()(a, b, return_terms=True), ((16, 40), (16, 40))),  # Gram path N < D
    "invariance_loss": (invariance_loss, _PAIR),
    "variance_loss": (variance_loss, ((64, 16),)),
    "covariance_loss": (covariance_loss, ((64, 16),)),
    "sigreg": (lambda x: sigreg(x, directions=_DIRECTIONS), ((64, 16),)),
    "SIGRegLoss": (
        lambda x: SIGRegLoss(num_directions=32, chunk=10).eval()(x),
        ((2, 64, 16),),
    ),
    "lejepa_loss": (lejepa_loss, ((), ())),
    "lejepa_view_loss": (lambda z: lejepa_view_loss(z, sigreg=SIGRegLoss(num_directions=32).eval()).total,
                         ((2, 64, 16),)),
    "LeJEPALoss": (lambda z: LeJEPALoss(num_directions=32).eval()(z, return_terms=True), ((3, 64, 16),)),
    "ntxent_loss": (ntxent_loss, _PAIR),
    "NTXentLoss": (lambda a, b: NTXentLoss(temperature=0.2)(a, b), _PAIR),
    "info_nce_loss": (lambda q, k: info_nce_loss(q, k, symmetric=True), _PAIR),
    "InfoNCELoss": (lambda q, k: InfoNCELoss()(q, k, return_terms=True), _PAIR),
}

# Public names of jepa_blocks.losses that are not losses.
_NOT_LOSSES = {"LossOutput", "LossType", "sigreg_directions"}


def _scalars(out) -> dict[str, torch.Tensor]:
    """The total and every term of a loss result, by name."""
    if isinstance(out, LossOutput):
        return {"total": out.total, **out.terms}
    return {"total": out}


def _inputs(shapes, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    # Offsets and scales away from N(0, 1) so that every term is non-trivial.
    return [torch.randn(s, generator=gen) * 1.7 + 0.3 for s in shapes]


def test_every_public_loss_is_covered():
    public = set(losses.__all__) - _NOT_LOSSES
    assert public <= set(_CASES), f"add a precision case for {sorted(public - set(_CASES))}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", sorted(_CASES))
def test_low_precision_inputs_compute_in_float32(name, dtype):
    fn, shapes = _CASES[name]
    low = [x.to(dtype).requires_grad_(True) for x in _inputs(shapes)]
    upcast = [x.detach().float().requires_grad_(True) for x in low]
    out_low, out_ref = _scalars(fn(*low)), _scalars(fn(*upcast))
    assert out_low.keys() == out_ref.keys()
    for key, value in out_low.items():
        assert value.dtype == torch.float32, (key, value.dtype)
        assert torch.equal(value, out_ref[key]), (key, value, out_ref[key])
    out_low["total"].backward()
    out_ref["total"].backward()
    for x, ref in zip(low, upcast, strict=True):
        assert x.grad is not None and x.grad.dtype == dtype
        assert torch.equal(x.grad, ref.grad.to(dtype))


@pytest.mark.parametrize("name", sorted(_CASES))
def test_autocast_is_ignored(name):
    fn, shapes = _CASES[name]
    x = _inputs(shapes, seed=1)
    ref = _scalars(fn(*x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _scalars(fn(*x))
    for key, value in out.items():
        assert value.dtype == torch.float32 and torch.equal(value, ref[key]), key
