"""No block returns NaN silently for finite input: values *and* gradients stay finite.

The degenerate inputs that break naive implementations: total collapse (all rows equal),
constant or zero features, batches of one or two, zero-norm projection directions,
``eps = 0`` at collapse, index lists that are all padding, layer-normalising constant
targets, the effective rank of a constant matrix, and attention rows that may see no key.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from jepa_blocks import value_checks
from jepa_blocks.encoders import ViTEncoder
from jepa_blocks.evaluation import (
    anisotropy,
    collapse_stats,
    effective_rank,
    feature_std,
    isotropy,
    knn_accuracy,
    linear_probe,
    pool_tokens,
    rank_ratio,
    uniformity,
)
from jepa_blocks.layers import Attention, TransformerBlock, attention_mask_from_valid
from jepa_blocks.losses import (
    LatentPredictionLoss,
    SIGRegLoss,
    VICRegLoss,
    covariance_loss,
    latent_prediction_loss,
    sigreg,
    sigreg_directions,
    variance_loss,
    vicreg_loss,
)
from jepa_blocks.masking import MaskIndices
from jepa_blocks.predictors import HierarchicalPredictor
from jepa_blocks.quantizers import VectorQuantizer, nearest_codes, squared_distances
from jepa_blocks.quantizers.vq import _max_abs_entry

FAST = settings(max_examples=10, deadline=None, derandomize=True)


def assert_finite_with_grad(value: torch.Tensor, *inputs: torch.Tensor) -> None:
    """``value`` is finite, and so is the gradient of its sum w.r.t. every input."""
    assert torch.isfinite(value).all(), value
    grads = torch.autograd.grad(value.sum(), inputs, allow_unused=True, retain_graph=True)
    for x, g in zip(inputs, grads, strict=True):
        assert g is not None, "no gradient reached an input"
        assert torch.isfinite(g).all(), f"non-finite gradient for input of shape {tuple(x.shape)}"


def collapsed(n: int, d: int, value: float = 1.0) -> torch.Tensor:
    """``n`` identical rows: total collapse."""
    return torch.full((n, d), value).requires_grad_()


COLLAPSES = [
    pytest.param(lambda: collapsed(8, 5), id="all-ones"),
    pytest.param(lambda: collapsed(8, 5, 0.0), id="all-zeros"),
    pytest.param(lambda: collapsed(8, 5, -3e3), id="all-large"),
    pytest.param(lambda: collapsed(2, 5, 0.7), id="batch-of-2"),
    pytest.param(lambda: torch.randn(8, 1).requires_grad_(), id="one-dim"),
    pytest.param(lambda: (torch.randn(8, 1) * torch.ones(1, 5)).requires_grad_(), id="rank-one"),
    pytest.param(lambda: torch.full((8, 5), 1e-30).requires_grad_(), id="tiny"),
]


# ----------------------------------------------------------------------------- SIGReg


@pytest.mark.parametrize("make", COLLAPSES)
def test_sigreg_finite_at_collapse(make):
    x = make()
    assert_finite_with_grad(sigreg(x, num_directions=16), x)
    assert_finite_with_grad(SIGRegLoss(num_directions=16, chunk=5)(x), x)
    views = torch.stack([x.detach(), x.detach() + 1.0]).requires_grad_()
    assert_finite_with_grad(sigreg(views, num_directions=16), views)


def test_sigreg_batch_of_one_and_zero_norm_directions():
    x = torch.randn(1, 4, requires_grad=True)
    assert_finite_with_grad(sigreg(x, num_directions=8), x)
    # A zero column (and a denormal one) among the directions: clamped norms, never 0/0.
    directions = torch.randn(4, 6)
    directions[:, 1] = 0.0
    directions[:, 4] = 1e-40
    directions.requires_grad_()
    x = torch.randn(16, 4, requires_grad=True)
    assert_finite_with_grad(sigreg(x, directions=directions), x, directions)
    # D = 1 (every direction is +-1) and the (seed, step) directions.
    x1 = torch.randn(16, 1, requires_grad=True)
    assert_finite_with_grad(sigreg(x1, directions=sigreg_directions(1, 8)), x1)
    assert torch.isfinite(sigreg_directions(1, 8)).all()
    assert torch.isfinite(sigreg_directions(3, 1000, seed=5, step=7)).all()


@FAST
@given(
    n=st.integers(1, 6),
    d=st.integers(1, 5),
    scale=st.sampled_from([0.0, 1e-20, 1e-3, 1.0, 1e3]),
    knots=st.integers(2, 9),
    t_max=st.floats(0.1, 10.0),
)
def test_sigreg_finite_for_any_finite_input(n, d, scale, knots, t_max):
    x = (torch.randn(n, d, generator=torch.Generator().manual_seed(n * 7 + d)) * scale).requires_grad_()
    assert_finite_with_grad(sigreg(x, num_directions=8, num_knots=knots, t_max=t_max), x)


# ----------------------------------------------------------------------------- VICReg


@pytest.mark.parametrize("eps", [0.0, 1e-12, 1e-4])
@pytest.mark.parametrize("make", COLLAPSES)
def test_vicreg_finite_at_collapse_for_any_eps(make, eps):
    """eps = 0 at collapse used to give NaN gradients (sqrt'(0) * 0)."""
    x, y = make(), make()
    total, terms = vicreg_loss(x, y, eps=eps)
    assert_finite_with_grad(total, x, y)
    assert all(torch.isfinite(t) for t in terms.values())
    assert_finite_with_grad(VICRegLoss(eps=eps)(x, y), x, y)
    assert_finite_with_grad(variance_loss(x, eps=eps), x)
    assert_finite_with_grad(covariance_loss(x), x)


@FAST
@given(
    n=st.integers(2, 6),
    d=st.integers(1, 5),
    scale=st.sampled_from([0.0, 1e-20, 1e-3, 1.0, 1e3]),
    eps=st.sampled_from([0.0, 1e-4]),
    repeat_rows=st.booleans(),
)
def test_vicreg_finite_for_any_finite_input(n, d, scale, eps, repeat_rows):
    g = torch.Generator().manual_seed(n * 11 + d)
    x = torch.randn(n, d, generator=g) * scale
    if repeat_rows:
        x = x[:1].expand(n, d).clone()
    x.requires_grad_()
    y = (torch.randn(n, d, generator=g) * scale).requires_grad_()
    assert_finite_with_grad(vicreg_loss(x, y, eps=eps).total, x, y)


@pytest.mark.parametrize("scale", [1e6, 1e10])
def test_vicreg_large_inputs_finite_or_rejected_never_silent(scale):
    """Large finite inputs: a finite loss (no false alarm of the overflow check) while the
    float32 arithmetic holds, else a ValueError naming the inputs; never a silent NaN/Inf.
    The covariance term scales as the 4th power: 1e6 fits float32, 1e10 does not."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(6, 4, generator=g) * scale).requires_grad_()
    y = (torch.randn(6, 4, generator=g) * scale).requires_grad_()
    if scale < 1e8:
        assert_finite_with_grad(vicreg_loss(x, y).total, x, y)
        return
    with pytest.raises(ValueError, match=r"x and y must be small enough .* VICReg loss"):
        vicreg_loss(x, y)
    with pytest.raises(ValueError, match=r"z_a and z_b must be small enough"):
        VICRegLoss()(x, y)
    with value_checks(False):  # documented: the overflow then passes through
        assert not torch.isfinite(vicreg_loss(x, y).total)


# ----------------------------------------------------------------------------- quantizer


@pytest.mark.parametrize("dim", [1, 4, 96])
def test_vector_quantizer_finite_up_to_its_magnitude_bound(dim):
    """Entries at the bound the value check enforces (float32 sqrt(max / n) / 2 for sums of
    n squares: n = D for distances, M D for the loss; every entry there, the worst case)
    give finite distances, nearest codes and a finite loss; a little beyond, ValueError."""
    bound = _max_abs_entry(dim) * 0.999
    g = torch.Generator().manual_seed(dim)
    signs = torch.randint(0, 2, (6, dim), generator=g).float() * 2 - 1
    z = signs * bound
    codebook = torch.cat([-z[:2], z[2:4]])  # the largest possible distance, and 0
    dist = squared_distances(z, codebook)
    assert torch.isfinite(dist).all()
    ref = (z.double()[:, None] - codebook.double()[None]).square().sum(-1)  # float64, direct
    # The expansion |z|^2 + |e|^2 - 2 z.e cancels: errors are relative to the largest term.
    torch.testing.assert_close(dist.double(), ref, rtol=1e-5, atol=1e-5 * float(ref.max()))
    codes = nearest_codes(z, codebook)
    assert torch.equal(ref.gather(1, codes[:, None])[:, 0], ref.min(1).values)
    with pytest.raises(ValueError, match="z must have entries of magnitude"):
        nearest_codes(z * 1.01 / 0.999, codebook)
    vq_bound = _max_abs_entry(z.numel()) * 0.999
    z, codebook = z * (vq_bound / bound), codebook * (vq_bound / bound)
    vq = VectorQuantizer(num_codes=4, dim=dim, buffer_size=8, init="normal")
    vq.set_codebook_(codebook)
    for mode in (vq.eval(), vq.train()):
        out = mode(z.requires_grad_())
        assert_finite_with_grad(out.loss, z)
        assert torch.isfinite(out.quantized).all() and torch.isfinite(vq.codebook).all()
    with pytest.raises(ValueError, match="z must have entries of magnitude"):
        vq(z.detach() * 1.01 / 0.999)


# ----------------------------------------------------------------------------- latent loss


@pytest.mark.parametrize("loss_type", ["smooth_l1", "l1", "l2"])
@pytest.mark.parametrize("normalize_targets", [True, False])
def test_latent_loss_all_padding_and_constant_targets(loss_type, normalize_targets):
    kw = {"loss_type": loss_type, "normalize_targets": normalize_targets}
    pred = torch.randn(2, 3, 4, 8, requires_grad=True)
    target = torch.randn(2, 3, 4, 8, requires_grad=True)
    # Every slot of every block is padding: the loss is 0, not 0/0.
    none = torch.zeros(2, 3, 4, dtype=torch.bool)
    out = latent_prediction_loss(pred, target, none, **kw)
    assert out.total.item() == 0.0
    assert_finite_with_grad(out.total, pred, target)
    # One level all padding, the other not.
    out = LatentPredictionLoss(**kw, level_weights=(1.0, 1.0))([pred, pred], [target, target], [none, None],
                                                               return_terms=True)
    assert out.terms["level0"].item() == 0.0
    assert_finite_with_grad(out.total, pred, target)
    # Constant targets: layer norm of a row with zero variance (eps keeps it finite).
    flat = torch.full((2, 3, 4, 8), 5.0, requires_grad=True)
    assert_finite_with_grad(latent_prediction_loss(pred, flat, **kw).total, pred, flat)
    # Feature width 1: the layer norm of one value.
    p1, t1 = torch.randn(2, 4, 1, requires_grad=True), torch.randn(2, 4, 1, requires_grad=True)
    assert_finite_with_grad(latent_prediction_loss(p1, t1, **kw).total, p1, t1)


@pytest.mark.parametrize("beta", [0.0, 1e-12, 1.0])
def test_latent_loss_smooth_l1_beta_and_exact_predictions(beta):
    """beta = 0 turns smooth-L1 into L1; zero error must still give finite gradients."""
    target = torch.randn(2, 5, 8)
    pred = target.clone().requires_grad_()
    assert_finite_with_grad(latent_prediction_loss(pred, target, beta=beta).total, pred)


# ----------------------------------------------------------------------------- attention


@pytest.mark.parametrize("fused", [True, False])
def test_attention_with_a_row_that_sees_no_key(fused):
    attn = Attention(8, num_heads=2, fused=fused)
    x = torch.randn(2, 4, 8, requires_grad=True)
    mask = torch.ones(2, 1, 4, 4, dtype=torch.bool)
    mask[0, :, 2] = False  # query 2 of sample 0 may attend to nothing
    mask[1] = False  # sample 1: no query sees anything
    assert_finite_with_grad(attn(x, attn_mask=mask), x)
    block = TransformerBlock(8, num_heads=2, fused_attn=fused)
    assert_finite_with_grad(block(x, attn_mask=mask), x)


def test_fully_padded_samples_through_encoder_and_predictor():
    valid = torch.tensor([[True, True, False], [False, False, False]])  # sample 1: all padding
    mask = attention_mask_from_valid(valid)
    assert mask is not None and bool(mask[1].all())  # attends to its padding, stays finite
    enc = ViTEncoder(img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2, pos_embed="rope")
    images = torch.randn(2, 3, 16, 16, requires_grad=True)
    out = enc(images, keep=MaskIndices(torch.tensor([[0, 5, 0], [0, 0, 0]]), valid))
    assert_finite_with_grad(out.tokens, images)

    pred = HierarchicalPredictor(grid_size=4, embed_dim=16, predictor_dim=8, depth=1, num_heads=2)
    context = torch.randn(2, 3, 16, requires_grad=True)
    ctx = MaskIndices(torch.tensor([[0, 5, 0], [0, 0, 0]]), valid)
    targets = MaskIndices(torch.tensor([[[1, 2]], [[0, 0]]]), torch.tensor([[[True, True]], [[False, False]]]))
    (prediction,) = pred(context, context_indices=ctx, targets=targets)
    assert_finite_with_grad(prediction, context)
    loss = latent_prediction_loss(prediction, torch.randn(2, 1, 2, 16), targets.valid)
    assert_finite_with_grad(loss.total, context)


# ----------------------------------------------------------------------------- diagnostics


@pytest.mark.parametrize("value", [0.0, 1.0, -7e3])
def test_metrics_of_a_constant_matrix(value):
    z = torch.full((6, 4), value)
    assert effective_rank(z) == 1.0
    assert rank_ratio(z) == 0.25
    assert isotropy(z) == 0.0 and isotropy(z, method="entropy") == 0.0
    assert torch.isfinite(feature_std(z)).all()
    for metric in (uniformity(z), anisotropy(z), *collapse_stats(z).values()):
        assert metric == metric and abs(metric) != float("inf"), metric  # not NaN, not Inf


def test_pooling_knn_and_probe_on_constant_features():
    tokens = torch.zeros(2, 3, 4, requires_grad=True)
    assert_finite_with_grad(pool_tokens(tokens, torch.tensor([[True, False, False], [True] * 3])), tokens)
    feats, labels = torch.zeros(6, 3), torch.tensor([0, 1, 0, 1, 0, 1])
    acc = knn_accuracy(feats, labels, feats, labels, k=3, center=True)
    assert 0.0 <= acc[3] <= 1.0
    res = linear_probe(feats, labels, feats, labels, max_iter=20)
    assert 0.0 <= res.top1 <= 1.0 and torch.isfinite(res.classifier.weight).all()
