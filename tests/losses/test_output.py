"""One return convention for every loss module: a Tensor, ``return_terms``, ``last_terms``."""

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
)
from jepa_blocks.losses.output import LossModule
from jepa_blocks.quantizers import VectorQuantizer


def _pair(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(12, 6, generator=gen, requires_grad=True), torch.randn(12, 6, generator=gen)


# Every loss module with the inputs of one call and the names of its terms. Modules that
# keep a step counter run in eval mode, so two calls see the same state.
_MODULES = {
    "LatentPredictionLoss": (lambda: LatentPredictionLoss(), lambda a, b: (a[None], b[None]), ["level0"]),
    "VICRegLoss": (lambda: VICRegLoss(), lambda a, b: (a, b), ["invariance", "variance", "covariance"]),
    "SIGRegLoss": (lambda: SIGRegLoss(num_directions=8).eval(), lambda a, b: (a,), ["sigreg"]),
    "LeJEPALoss": (lambda: LeJEPALoss(num_directions=8).eval(), lambda a, b: (torch.stack([a, b]),),
                   ["invariance", "sigreg"]),
    "NTXentLoss": (lambda: NTXentLoss(), lambda a, b: (a, b), ["ntxent"]),
    "InfoNCELoss": (lambda: InfoNCELoss(), lambda a, b: (a, b), ["infonce", "temperature"]),
}


def test_every_loss_module_is_covered():
    modules = {name for name in losses.__all__
               if isinstance(getattr(losses, name), type) and issubclass(getattr(losses, name), torch.nn.Module)}
    assert modules == set(_MODULES)
    assert all(issubclass(getattr(losses, name), LossModule) for name in modules)


@pytest.mark.parametrize("name", sorted(_MODULES))
def test_tensor_by_default_terms_on_request(name):
    build, inputs, names = _MODULES[name]
    criterion = build()
    assert criterion.last_terms == {}
    a, b = _pair()
    loss = criterion(*inputs(a, b))
    assert type(loss) is torch.Tensor and loss.ndim == 0 and loss.requires_grad
    assert list(criterion.last_terms) == names
    assert all(not t.requires_grad and t.ndim == 0 for t in criterion.last_terms.values())
    first = dict(criterion.last_terms)
    out = criterion(*inputs(a, b), return_terms=True)
    assert isinstance(out, LossOutput) and list(out.terms) == names
    torch.testing.assert_close(out.total, loss, rtol=0, atol=0)
    for key in names:
        torch.testing.assert_close(out.terms[key].detach(), first[key], rtol=0, atol=0)
    # Arithmetic and stacking behave as for any torch loss.
    assert torch.equal(torch.stack([loss, 2 * loss]), torch.stack([loss, loss + loss]))
    (0.5 * loss).backward()
    assert a.grad is not None and torch.isfinite(a.grad).all()
    # last_terms follows the latest call.
    criterion(*inputs(a.detach() + 1.0, b), return_terms=False)
    assert any(not torch.equal(criterion.last_terms[k], first[k]) for k in names if k != "temperature")
    with pytest.raises(TypeError, match="return_terms"):
        criterion(*inputs(a, b), return_terms=1)


def test_vector_quantizer_reports_its_terms_the_same_way():
    vq = VectorQuantizer(num_codes=4, dim=3, buffer_size=8)
    z = torch.randn(10, 3, requires_grad=True)
    out = vq(z)
    assert type(out.loss) is torch.Tensor and out.loss.ndim == 0
    assert sorted(vq.last_terms) == ["commitment", "perplexity", "usage"]
    assert torch.equal(vq.last_terms["commitment"], out.loss.detach())
    assert not any(t.requires_grad for t in vq.last_terms.values())
    (0.5 * out.loss).backward()
    assert z.grad is not None
