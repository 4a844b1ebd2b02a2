import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from jepa_blocks.encoders import ViTEncoder
from jepa_blocks.masking.indices import mask_to_indices


def _small(**kw):
    cfg = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=4)
    cfg.update(kw)
    return ViTEncoder(**cfg).eval()


@pytest.mark.parametrize("pos_embed", ["sincos", "rope"])
def test_dropping_equals_running_on_gathered_tokens(pos_embed):
    """keep= must remove tokens (not zero them): same as encoding the gathered tokens."""
    torch.manual_seed(0)
    enc = _small(pos_embed=pos_embed)
    images = torch.randn(3, 3, 16, 16)
    keep = mask_to_indices(torch.rand(3, 16) < 0.5)
    out = enc(images, keep=keep)
    for i in range(3):
        n = int(keep.counts[i])
        ids = keep.indices[i, :n]
        # Independent path: embed, add positions, gather, then run the blocks by hand.
        tokens = enc.patch_embed(images[i : i + 1])
        if pos_embed == "sincos":
            from jepa_blocks.positional import sincos_2d_table

            tokens = tokens + sincos_2d_table((4, 4), 32)
            rope = None
        else:
            pos = torch.stack((ids // 4, ids % 4), -1).float()
            rope = enc.rope.cos_sin(pos)
        x = tokens[:, ids]
        for block in enc.blocks:
            x = block(x, rope=rope)
        torch.testing.assert_close(out.tokens[i, :n], enc.norm(x)[0], atol=1e-5, rtol=1e-5)
        assert out.valid is not None and out.valid[i].sum() == n


def test_zeroing_is_not_dropping():
    torch.manual_seed(0)
    enc = _small()
    images = torch.randn(1, 3, 16, 16)
    keep = torch.tensor([[0, 5, 10, 15]])
    dropped = enc(images, keep=keep).tokens
    full = enc(images).tokens[:, keep[0]]
    assert not torch.allclose(dropped, full, atol=1e-4)


@pytest.mark.parametrize("pos_embed", ["sincos", "rope"])
def test_fused_attention_matches_manual(pos_embed):
    torch.manual_seed(0)
    enc = _small(pos_embed=pos_embed)
    images = torch.randn(2, 3, 16, 16)
    keep = mask_to_indices(torch.rand(2, 16) < 0.6)
    fused = enc(images, keep=keep).tokens
    for block in enc.blocks:
        block.attn.fused = False
    manual = enc(images, keep=keep).tokens
    torch.testing.assert_close(fused, manual, atol=1e-5, rtol=1e-5)


def test_out_layers_and_full_grid():
    enc = _small(depth=3, out_layers=(0, -1))
    out = enc(torch.randn(2, 3, 16, 16))
    assert out.tokens.shape == (2, 16, 32)
    assert [t.shape for t in out.layers] == [(2, 16, 32)] * 2
    assert out.valid is None and out.grid_size == (4, 4)
    torch.testing.assert_close(enc.norm(out.layers[1]), out.tokens)
    assert len(enc(torch.randn(1, 3, 16, 16), out_layers=[1]).layers) == 1


def test_other_image_sizes_and_rect_grid():
    enc = _small(pos_embed="rope")
    out = enc(torch.randn(1, 3, 24, 16))
    assert out.grid_size == (6, 4) and out.tokens.shape == (1, 24, 32)


def test_gradient_checkpointing_same_values_and_grads():
    torch.manual_seed(0)
    a = _small(drop_path_rate=0.0).train()
    b = _small(grad_checkpointing=True).train()
    b.load_state_dict(a.state_dict())
    images = torch.randn(2, 3, 16, 16)
    keep = torch.tensor([[0, 1, 2], [3, 4, 5]])
    ya, yb = a(images, keep=keep).tokens, b(images, keep=keep).tokens
    torch.testing.assert_close(ya, yb)
    ya.square().sum().backward()
    yb.square().sum().backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa.grad, pb.grad, msg=n)


def test_layer_scale_and_bf16_autocast():
    enc = _small(layer_scale_init=1e-5)
    assert enc.blocks[0].ls1.gamma.shape == (32,)
    images, keep = torch.randn(2, 3, 16, 16), torch.tensor([[0, 1], [2, 3]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = enc(images, keep=keep).tokens
    ref = enc(images, keep=keep).tokens
    assert torch.isfinite(low).all()
    torch.testing.assert_close(low.float(), ref, atol=0.1, rtol=0.05)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16), batch=st.integers(1, 4))
def test_padding_never_leaks_between_samples(seed, batch):
    g = torch.Generator().manual_seed(seed)
    enc = _small()
    images = torch.randn(batch, 3, 16, 16, generator=g)
    mask = torch.rand(batch, 16, generator=g) < 0.5
    mask[:, 0] = True
    keep = mask_to_indices(mask)
    out = enc(images, keep=keep)
    assert torch.isfinite(out.tokens).all()
    for i in range(batch):
        n = int(keep.counts[i])
        alone = enc(images[i : i + 1], keep=keep.indices[i : i + 1, :n]).tokens
        torch.testing.assert_close(out.tokens[i, :n], alone[0], atol=1e-5, rtol=1e-5)


def test_from_timm_copies_architecture():
    enc = ViTEncoder.from_timm("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=2)
    assert (enc.embed_dim, enc.depth, enc.num_heads, enc.patch_size) == (192, 2, 3, 4)
    assert enc(torch.randn(1, 3, 32, 32)).tokens.shape == (1, 64, 192)


def test_from_timm_bad_name():
    with pytest.raises(ValueError, match="name"):
        ViTEncoder.from_timm("not_a_model_xyz", img_size=32, patch_size=4)
    with pytest.raises(TypeError, match="name"):
        ViTEncoder.from_timm(3, img_size=32, patch_size=4)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"img_size": 18}, "img_size"),
        ({"patch_size": 0}, "patch_size"),
        ({"embed_dim": 30, "num_heads": 4}, "num_heads"),
        ({"pos_embed": "learned"}, "pos_embed"),
        ({"embed_dim": 24, "num_heads": 4, "pos_embed": "rope"}, "head dim"),
        ({"depth": 0}, "depth"),
        ({"drop_path_rate": 1.5}, "drop_path_rate"),
        ({"out_layers": [5]}, "out_layers"),
        ({"grad_checkpointing": 1}, "grad_checkpointing"),
    ],
)
def test_bad_constructor_args(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        _small(**kwargs)


def test_bad_forward_args():
    enc = _small()
    with pytest.raises(ValueError, match="images"):
        enc(torch.randn(3, 16, 16))
    with pytest.raises(TypeError, match="images"):
        enc(torch.zeros(1, 3, 16, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="images"):
        enc(torch.randn(1, 3, 18, 16))
    with pytest.raises(ValueError, match="channels"):
        enc(torch.randn(1, 1, 16, 16))
    with pytest.raises(ValueError, match="keep"):
        enc(torch.randn(2, 3, 16, 16), keep=torch.tensor([[0, 1]]))
    with pytest.raises(TypeError, match="keep"):
        enc(torch.randn(1, 3, 16, 16), keep=torch.tensor([[0.0, 1.0]]))
    with pytest.raises(ValueError, match="keep"):
        enc(torch.randn(1, 3, 16, 16), keep=torch.tensor([[0, 16]]))
    with pytest.raises(ValueError, match="tokens"):
        enc.forward_tokens(torch.randn(1, 10, 32), grid_size=(4, 4))


# ----------------------------------------------------------------------------- from_timm


def _timm_tiny(**kw):
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, **kw)


def _same_trunk(enc, vit):
    for name, value in enc.state_dict().items():
        torch.testing.assert_close(value, vit.state_dict()[name], rtol=0, atol=0, msg=name)


def test_from_timm_instance_copies_architecture_and_weights():
    vit = _timm_tiny(depth=2, init_values=1e-3, num_classes=0)
    enc = ViTEncoder.from_timm(vit)
    assert (enc.embed_dim, enc.depth, enc.patch_size, enc.default_grid) == (192, 2, 4, (8, 8))
    _same_trunk(enc, vit)
    x = torch.randn(2, 5, 192)  # a block computes what timm's block computes
    torch.testing.assert_close(enc.blocks[1](x), vit.blocks[1](x))
    with pytest.raises(ValueError, match="instance"):
        ViTEncoder.from_timm(vit, pretrained=True)


def test_from_timm_refuses_what_it_cannot_hold():
    import timm

    with pytest.raises(ValueError, match="qk-norm"):
        ViTEncoder.from_timm(_timm_tiny(depth=1, qk_norm=True))
    with pytest.raises(TypeError, match="Vision Transformer"):
        ViTEncoder.from_timm(timm.create_model("resnet10t", pretrained=False))


def test_from_timm_checkpoint_path_loads_a_local_file(tmp_path):
    vit = _timm_tiny()  # full depth, with its classifier head: the head is ignored
    path = tmp_path / "vit.pth"
    torch.save(vit.state_dict(), path)
    enc = ViTEncoder.from_timm("vit_tiny_patch16_224", img_size=32, patch_size=4, checkpoint_path=path)
    _same_trunk(enc, vit)
    # Without weights the encoder keeps its own initialisation.
    fresh = ViTEncoder.from_timm("vit_tiny_patch16_224", img_size=32, patch_size=4)
    assert not torch.equal(fresh.blocks[0].attn.qkv.weight, vit.blocks[0].attn.qkv.weight)


def test_from_timm_timm_kwargs_reach_timm(tmp_path):
    vit = _timm_tiny(depth=2)
    path = tmp_path / "two_blocks.pth"
    torch.save(vit.state_dict(), path)
    enc = ViTEncoder.from_timm("vit_tiny_patch16_224", img_size=32, patch_size=4, checkpoint_path=path,
                               timm_kwargs={"depth": 2})
    assert enc.depth == 2
    _same_trunk(enc, vit)
    with pytest.raises(ValueError, match="timm_kwargs"):
        ViTEncoder.from_timm(vit, timm_kwargs={"depth": 2})


def test_from_timm_checkpoint_path_must_fit(tmp_path):
    path = tmp_path / "small.pth"
    torch.save(_timm_tiny(depth=2).state_dict(), path)  # 2 blocks for a 12-block model
    with pytest.raises(ValueError, match="checkpoint_path.*missing"):
        ViTEncoder.from_timm("vit_tiny_patch16_224", img_size=32, patch_size=4, checkpoint_path=path)
    with pytest.raises(ValueError, match="checkpoint_path"):
        ViTEncoder.from_timm("vit_tiny_patch16_224", img_size=32, patch_size=4, checkpoint_path=tmp_path / "no.pth")
    with pytest.raises(ValueError, match="either"):
        ViTEncoder.from_timm("vit_tiny_patch16_224", img_size=32, patch_size=4, checkpoint_path=path, pretrained=True)


def test_from_timm_pretrained_cfg_overlay_file_uses_timms_loader(tmp_path):
    """timm's pretrained path with a local file (``pretrained_cfg_overlay=dict(file=...)``)."""
    vit = _timm_tiny()
    path = tmp_path / "vit.pth"
    torch.save(vit.state_dict(), path)
    enc = ViTEncoder.from_timm(
        "vit_tiny_patch16_224", img_size=32, patch_size=4, pretrained=True, pretrained_cfg_overlay={"file": str(path)}
    )
    _same_trunk(enc, vit)


# ----------------------------------------------------------------------------- from_checkpoint


def _trainer_layout(tmp_path, *, ddp_prefix=False):
    """A file with the layout of examples/train_hjepa.py's last.pt."""
    from jepa_blocks import EMATarget
    from jepa_blocks.training import save_checkpoint

    config = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=4, pos_embed="rope",
                  drop_path=0.1, lr=1e-3, pred_dim=16)
    torch.manual_seed(0)
    online = ViTEncoder(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=4, pos_embed="rope")
    target = EMATarget(online, total_steps=10)
    with torch.no_grad():  # the online encoder moves on after the copy: the two differ
        for p in online.parameters():
            p.add_(torch.randn_like(p))
    encoder_state = online.state_dict()
    if ddp_prefix:
        encoder_state = {f"module.{k}": v for k, v in encoder_state.items()}
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"encoder": encoder_state, "target": target.state_dict(), "config": config, "step": 3})
    return path, online, target.module


@pytest.mark.parametrize("ddp_prefix", [False, True])
def test_from_checkpoint_loads_target_and_online(tmp_path, ddp_prefix):
    path, online, ema = _trainer_layout(tmp_path, ddp_prefix=ddp_prefix)
    target = ViTEncoder.from_checkpoint(path)
    assert not target.training and target.pos_embed == "rope" and target.depth == 2
    assert target.blocks[1].drop_path1.__class__.__name__ == "Identity"  # training-only drop_path not read
    _same_state(target, ema)
    _same_state(ViTEncoder.from_checkpoint(path, which="online"), online)
    images = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(target(images).tokens, ema(images).tokens)


def _same_state(a, b):
    for name, value in a.state_dict().items():
        torch.testing.assert_close(value, b.state_dict()[name], rtol=0, atol=0, msg=name)


def test_from_checkpoint_random_init_and_overrides(tmp_path):
    path, _, ema = _trainer_layout(tmp_path)
    torch.manual_seed(1)
    random = ViTEncoder.from_checkpoint(path, weights=False)
    torch.manual_seed(1)
    same_init = ViTEncoder(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=4, pos_embed="rope")
    _same_state(random, same_init)
    assert not torch.equal(random.blocks[0].attn.qkv.weight, ema.blocks[0].attn.qkv.weight)
    assert ViTEncoder.from_checkpoint(path, out_layers=(0,)).out_layers == (0,)


def test_from_checkpoint_bad_input(tmp_path):
    path, _, _ = _trainer_layout(tmp_path)
    with pytest.raises(ValueError, match="which"):
        ViTEncoder.from_checkpoint(path, which="context")
    with pytest.raises(ValueError, match="config"):
        ViTEncoder.from_checkpoint({"encoder": {}})
    with pytest.raises(ValueError, match="'target'"):
        ViTEncoder.from_checkpoint({"config": {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 1,
                                               "num_heads": 4}})
    with pytest.raises(ValueError, match="do not fit"):
        ViTEncoder.from_checkpoint(path, depth=3)
    with pytest.raises(TypeError, match="checkpoint"):
        ViTEncoder.from_checkpoint(3)
