"""TimmTokenEncoder: any timm VisionTransformer as a token encoder (no download, CPU only).

The reference for equality is timm's own code: ``forward_features`` for the full image,
and timm's ``_pos_embed`` (called here, in the test, as the oracle; the library never
calls it) followed by a gather of the kept patch tokens and timm's blocks for ``keep``.
"""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

timm = pytest.importorskip("timm")

from jepa_blocks import EMATarget, HierarchicalPredictor, LatentPredictionLoss, MultiBlockMasker  # noqa: E402
from jepa_blocks.encoders import EncoderOutput, TimmTokenEncoder, ViTEncoder  # noqa: E402
from jepa_blocks.masking.indices import mask_to_indices  # noqa: E402
from jepa_blocks.targets import hierarchical_targets  # noqa: E402

# Four timm layouts: CLS with a table row for it; CLS + 4 registers outside the table with
# LayerScale (DINOv2); 4 registers and no CLS (average pooling); CLS + distillation token.
FAMILIES = {
    "vit_tiny_patch16_224": dict(img_size=32, patch_size=4, depth=2),
    "vit_small_patch14_reg4_dinov2": dict(img_size=28, patch_size=7, depth=2, embed_dim=64, num_heads=2),
    "vit_base_patch16_reg4_gap_256": dict(img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2),
    "deit_tiny_distilled_patch16_224": dict(img_size=32, patch_size=8, depth=2),
}
PREFIX = {
    "vit_tiny_patch16_224": 1,
    "vit_small_patch14_reg4_dinov2": 5,
    "vit_base_patch16_reg4_gap_256": 4,
    "deit_tiny_distilled_patch16_224": 2,
}


def _vit(name: str, **extra) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=0, **{**FAMILIES[name], **extra})
    # Random prefix tokens and LayerScale (timm initialises them near 0), so that a wrong
    # position or a missed prefix token shows in the outputs.
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim <= 3 and p.shape[-1] == model.embed_dim and p.ndim != 2:
                p.normal_(0, 0.5)
    return model.eval()


def _reference_keep(model, images, ids):
    """timm's own embedding (with its private _pos_embed, as the oracle), then gather and run."""
    p = model.num_prefix_tokens
    seq = model._pos_embed(model.patch_embed(images))
    x = torch.cat([seq[:, :p], seq[:, p:][:, ids]], dim=1)
    x = model.blocks(model.norm_pre(x))
    return model.norm(x)[:, p:]


@pytest.mark.parametrize("name", FAMILIES)
def test_full_tokens_equal_timm_forward_features(name):
    model = _vit(name)
    enc = TimmTokenEncoder(model).eval()
    size = FAMILIES[name]["img_size"]
    images = torch.randn(2, 3, size, size)
    ref = model.forward_features(images)
    out, prefix = enc(images, return_prefix=True)
    assert enc.num_prefix_tokens == PREFIX[name] == model.num_prefix_tokens
    assert isinstance(out, EncoderOutput) and out.valid is None
    grid = size // FAMILIES[name]["patch_size"]
    assert out.grid_size == (grid, grid) == enc.default_grid
    torch.testing.assert_close(out.tokens, ref[:, PREFIX[name] :], rtol=0, atol=0)
    torch.testing.assert_close(prefix, ref[:, : PREFIX[name]], rtol=0, atol=0)


@pytest.mark.parametrize("name", FAMILIES)
def test_keep_equals_gather_after_positions_then_blocks(name):
    model = _vit(name)
    enc = TimmTokenEncoder(model).eval()
    size = FAMILIES[name]["img_size"]
    n = (size // FAMILIES[name]["patch_size"]) ** 2
    images = torch.randn(1, 3, size, size)
    ids = torch.tensor([n - 1, 0, 3, n // 2])  # any order: slot j holds id ids[j]
    out = enc(images, keep=ids[None])
    torch.testing.assert_close(out.tokens[0], _reference_keep(model, images, ids)[0], atol=1e-5, rtol=1e-5)
    # Dropping is not zeroing or gathering afterwards: attention saw fewer tokens.
    assert not torch.allclose(out.tokens, enc(images).tokens[:, ids], atol=1e-4)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), batch=st.integers(1, 3))
def test_padded_keep_equals_each_sample_alone(seed, batch):
    """MaskIndices padding is hidden from attention: sample i equals its reference alone."""
    model = _vit("vit_small_patch14_reg4_dinov2")
    enc = TimmTokenEncoder(model).eval()
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, 28, 28, generator=g)
    mask = torch.rand(batch, 16, generator=g) < 0.5
    mask[:, 0] = True
    keep = mask_to_indices(mask)
    out = enc(images, keep=keep)
    assert torch.isfinite(out.tokens).all()
    for i in range(batch):
        k = int(keep.counts[i])
        ref = _reference_keep(model, images[i : i + 1], keep.indices[i, :k])
        torch.testing.assert_close(out.tokens[i, :k], ref[0], atol=1e-5, rtol=1e-5)
    if not bool(keep.valid.all()):
        assert torch.equal(out.valid, keep.valid)


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "vit_small_patch14_reg4_dinov2"])
def test_dynamic_image_size_equals_timm(name):
    model = _vit(name, dynamic_img_size=True)
    enc = TimmTokenEncoder(model).eval()
    p = FAMILIES[name]["patch_size"]
    images = torch.randn(2, 3, FAMILIES[name]["img_size"] + 2 * p, FAMILIES[name]["img_size"] - p)
    out = enc(images)
    assert out.grid_size == (images.shape[2] // p, images.shape[3] // p)
    torch.testing.assert_close(out.tokens, model.forward_features(images)[:, PREFIX[name] :], rtol=0, atol=0)


def test_fixed_size_model_rejects_other_sizes():
    enc = TimmTokenEncoder(_vit("vit_tiny_patch16_224"))
    with pytest.raises(ValueError, match="dynamic_img_size"):
        enc(torch.randn(1, 3, 48, 32))


def test_out_layers_are_patch_tokens_before_the_norm():
    model = _vit("vit_small_patch14_reg4_dinov2")
    enc = TimmTokenEncoder(model, out_layers=(0, -1)).eval()
    out = enc(torch.randn(2, 3, 28, 28), keep=torch.tensor([[0, 1, 2], [3, 4, 5]]))
    assert [t.shape for t in out.layers] == [(2, 3, 64)] * 2
    # The norm is per token, so normalising the last block's patch tokens gives the output.
    torch.testing.assert_close(model.norm(out.layers[1]), out.tokens)


def test_parameters_are_the_models_own_under_timm_names():
    model = _vit("vit_small_patch14_reg4_dinov2")
    enc = TimmTokenEncoder(model)
    own = enc.state_dict()
    assert set(own) <= set(model.state_dict())
    assert {"cls_token", "reg_token", "pos_embed", "patch_embed.proj.weight", "norm.weight"} <= set(own)
    assert enc.cls_token is model.cls_token and enc.blocks is model.blocks
    # EMATarget's deepcopy owns separate tensors.
    target = EMATarget(enc, total_steps=10)
    assert target.module.cls_token is not enc.cls_token
    torch.testing.assert_close(target.module.cls_token, enc.cls_token)


def test_one_jepa_step_with_a_timm_encoder():
    """Masker, predictor, EMA target and latent loss with a timm ViT, no glue code."""
    torch.manual_seed(0)
    encoder = TimmTokenEncoder.from_timm(
        "vit_small_patch14_reg4_dinov2", img_size=56, patch_size=7, depth=2, embed_dim=64, num_heads=2
    )
    grid = encoder.default_grid  # (8, 8)
    masker = MultiBlockMasker(grid_size=grid, levels=2)
    target = EMATarget(encoder, total_steps=10, momentum=0.5)
    predictor = HierarchicalPredictor(
        grid_size=grid, embed_dim=encoder.embed_dim, predictor_dim=32, depth=1, num_heads=4, num_levels=2
    )
    criterion = LatentPredictionLoss()
    optimizer = torch.optim.AdamW([*encoder.parameters(), *predictor.parameters()], lr=1e-3)

    images, masks = torch.randn(4, 3, 56, 56), masker(4)
    full = target(images).tokens  # (B, H * W, D), patch tokens only
    targets = hierarchical_targets(full, grid_size=grid, targets=masks.targets)
    context = encoder(images, keep=masks.context).tokens
    preds = predictor(context, context_indices=masks.context, targets=masks.targets)
    loss = criterion(preds, targets, [t.valid for t in masks.targets])
    before = target.module.reg_token.clone()
    optimizer.zero_grad()
    loss.backward()
    assert torch.isfinite(loss)
    assert encoder.reg_token.grad is not None and encoder.reg_token.grad.abs().sum() > 0
    assert encoder.blocks[0].ls1.gamma.grad.abs().sum() > 0
    optimizer.step()
    target.update(encoder)
    assert not torch.equal(target.module.reg_token, before)


def test_grad_checkpointing_same_values_and_grads():
    a = TimmTokenEncoder(_vit("vit_tiny_patch16_224")).train()
    b = copy.deepcopy(a)
    b.set_grad_checkpointing()
    images, keep = torch.randn(2, 3, 32, 32), torch.tensor([[0, 5, 9], [1, 2, 3]])
    ya, yb = a(images, keep=keep).tokens, b(images, keep=keep).tokens
    torch.testing.assert_close(ya, yb)
    ya.square().sum().backward()
    yb.square().sum().backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa.grad, pb.grad, msg=name)


def test_from_timm_loads_a_local_checkpoint(tmp_path):
    source = _vit("vit_tiny_patch16_224")
    path = tmp_path / "vit.pth"
    torch.save(source.state_dict(), path)
    enc = TimmTokenEncoder.from_timm("vit_tiny_patch16_224", checkpoint_path=path, **FAMILIES["vit_tiny_patch16_224"])
    images = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(enc.eval()(images).tokens, source.forward_features(images)[:, 1:])


def test_non_vit_models_are_refused_naming_what_is_supported():
    with pytest.raises(TypeError, match="VisionTransformer.*got ResNet"):
        TimmTokenEncoder(timm.create_model("resnet10t", pretrained=False))
    with pytest.raises(TypeError, match="VisionTransformer.*got Linear"):
        TimmTokenEncoder(torch.nn.Linear(4, 4))
    with pytest.raises(TypeError, match="VisionTransformer"):
        TimmTokenEncoder("vit_tiny_patch16_224")


def test_patch_dropout_is_refused():
    with pytest.raises(ValueError, match="patch_drop_rate"):
        TimmTokenEncoder(timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=1,
                                           patch_drop_rate=0.5))


def test_bad_forward_args():
    enc = TimmTokenEncoder(_vit("vit_tiny_patch16_224"))
    with pytest.raises(ValueError, match="images"):
        enc(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="channels"):
        enc(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="keep"):
        enc(torch.randn(2, 3, 32, 32), keep=torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="keep"):
        enc(torch.randn(1, 3, 32, 32), keep=torch.tensor([[0, 64]]))
    with pytest.raises(ValueError, match="out_layers"):
        enc(torch.randn(1, 3, 32, 32), out_layers=[2])


def test_same_interface_as_vit_encoder():
    """Code written for ViTEncoder's output runs unchanged on the adapter."""
    keep = mask_to_indices(torch.rand(2, 64) < 0.5)
    images = torch.randn(2, 3, 32, 32)
    for enc in (ViTEncoder(img_size=32, patch_size=4, embed_dim=192, depth=1, num_heads=3),
                TimmTokenEncoder(_vit("vit_tiny_patch16_224"))):
        out = enc(images, keep=keep, out_layers=[0])
        assert out.tokens.shape == (2, keep.shape[1], 192) and len(out.layers) == 1
        assert enc.embed_dim == 192 and enc.patch_size == 4 and enc.default_grid == (8, 8)
