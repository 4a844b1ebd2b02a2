import pytest
import torch
import torch.nn.functional as F
from torch import nn

from jepa_blocks import ViTEncoder
from jepa_blocks.evaluation import (
    attention_maps,
    attention_probs,
    query_attention,
    received_attention,
)
from jepa_blocks.masking.indices import mask_to_indices


def _encoder(pos_embed="sincos", fused=True, dtype=torch.float32):
    torch.manual_seed(0)
    enc = ViTEncoder(img_size=(12, 16), patch_size=4, embed_dim=32, depth=3, num_heads=2,
                     pos_embed=pos_embed, fused_attn=fused)
    return enc.to(dtype)


def _module_io(enc, images, layer, keep=None):
    """What the block's attention receives and its output before the projection."""
    seen = {}
    attn = enc.blocks[layer].attn
    h1 = attn.register_forward_pre_hook(lambda m, a, kw: seen.update(x=a[0]), with_kwargs=True)
    h2 = attn.proj.register_forward_pre_hook(lambda m, a: seen.update(pre_proj=a[0]))
    with torch.no_grad():
        enc.eval()(images, keep=keep)
    h1.remove()
    h2.remove()
    return attn, seen["x"], seen["pre_proj"]


def _values(attn, x):
    """v from the fused qkv weight, re-derived: output channels [2D, 3D), split by head."""
    b, n, d = x.shape
    w, bias = attn.qkv.weight[2 * d : 3 * d], attn.qkv.bias[2 * d : 3 * d]
    return F.linear(x, w, bias).reshape(b, n, attn.num_heads, attn.head_dim).transpose(1, 2)


@pytest.mark.parametrize("pos_embed", ["sincos", "rope"])
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("layer", [0, -1])
def test_probs_times_values_reproduce_the_module(pos_embed, fused, layer):
    enc = _encoder(pos_embed, fused)
    images = torch.randn(2, 3, 12, 16, generator=torch.Generator().manual_seed(1))
    maps = attention_maps(enc, images, layer=layer)
    attn, x, pre_proj = _module_io(enc, images, layer)
    assert maps.shape == (2, 2, 12, 12)
    out = (maps @ _values(attn, x)).transpose(1, 2).reshape(2, 12, 32)
    torch.testing.assert_close(out, pre_proj, atol=1e-5, rtol=0)


def test_parity_in_float64_and_with_padded_keep():
    enc = _encoder("rope", True, torch.float64)
    images = torch.randn(2, 3, 12, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[0, [0, 3, 5, 6, 11]] = True
    mask[1, [2, 7, 9]] = True
    keep = mask_to_indices(mask)  # sample 1 padded from 3 to 5 tokens
    maps = attention_maps(enc, images, layer=1, keep=keep)
    attn, x, pre_proj = _module_io(enc, images, 1, keep)
    out = (maps @ _values(attn, x)).transpose(1, 2).reshape(2, 5, 32)
    torch.testing.assert_close(out, pre_proj, atol=1e-12, rtol=0)
    assert (maps[1, :, :, 3:] == 0).all()  # padded keys get no attention
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, 2, 5, dtype=torch.float64))


def test_rows_sum_to_one_and_grid_views():
    enc = _encoder()
    maps = attention_maps(enc, torch.randn(3, 3, 12, 16))
    torch.testing.assert_close(maps.sum(-1), torch.ones(3, 2, 12))
    assert (maps >= 0).all()
    q = query_attention(maps, (3, 4), query=(1, 2))
    assert q.shape == (3, 2, 3, 4)
    torch.testing.assert_close(q.flatten(2), maps[:, :, 6])
    torch.testing.assert_close(query_attention(maps, (3, 4), query=6), q)
    r = received_attention(maps, (3, 4))
    assert r.shape == (3, 2, 3, 4)
    torch.testing.assert_close(r.sum((-2, -1)), torch.ones(3, 2))
    manual = sum(maps[:, :, i] for i in range(12)) / 12
    torch.testing.assert_close(r.flatten(2), manual)


def test_mode_restored_and_no_graph():
    enc = _encoder().train()
    maps = attention_maps(enc, torch.randn(1, 3, 12, 16))
    assert enc.training and not maps.requires_grad


def test_bad_inputs_name_the_argument():
    enc = _encoder()
    images = torch.randn(1, 3, 12, 16)
    with pytest.raises(ValueError, match="layer"):
        attention_maps(enc, images, layer=3)
    with pytest.raises(TypeError, match="encoder"):
        attention_maps(nn.Linear(2, 2), images)
    with pytest.raises(ValueError, match="images"):
        attention_maps(enc, images[0])
    maps = attention_maps(enc, images)
    with pytest.raises(ValueError, match="maps"):
        received_attention(maps, (4, 4))
    with pytest.raises(ValueError, match="query"):
        query_attention(maps, (3, 4), query=12)
    with pytest.raises(ValueError, match=r"query\[1\]"):
        query_attention(maps, (3, 4), query=(0, 4))
    with pytest.raises(TypeError, match="query"):
        query_attention(maps, (3, 4), query="a")


def test_maps_come_from_the_module_itself():
    """The chosen block's attention runs once, asked for its probabilities; later blocks never run."""
    enc = _encoder("rope")
    images = torch.randn(2, 3, 12, 16)
    calls = []
    hooks = [
        # Runs before attention_maps' own hook: records whether the probabilities came back.
        block.attn.register_forward_hook(lambda m, a, out, i=i: calls.append((i, isinstance(out, tuple))))
        for i, block in enumerate(enc.blocks)
    ]
    maps = attention_maps(enc, images, layer=1)
    for h in hooks:
        h.remove()
    assert calls == [(0, False), (1, True)]
    # Same as calling the module with return_attention=True on its own input.
    seen = {}
    attn = enc.blocks[1].attn
    h = attn.register_forward_pre_hook(lambda m, a, kw: seen.update(x=a[0], kw=kw), with_kwargs=True)
    with torch.no_grad():
        enc.eval()(images)
        h.remove()
        _, probs = attn(seen["x"], **seen["kw"], return_attention=True)
    torch.testing.assert_close(maps, probs, rtol=0, atol=0)
    torch.testing.assert_close(attention_probs(attn, seen["x"], **seen["kw"]), probs.detach(), rtol=0, atol=0)
