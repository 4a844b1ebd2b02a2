import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from jepa_blocks.layers import (
    Attention,
    TransformerBlock,
    attention_mask_from_valid,
    dot_product_attention,
)
from jepa_blocks.positional import RoPE2D


def test_manual_attention_equals_formula():
    torch.manual_seed(0)
    attn = Attention(16, num_heads=2, fused=False)
    x = torch.randn(2, 5, 16)
    q, k, v = attn.qkv(x).reshape(2, 5, 3, 2, 8).permute(2, 0, 3, 1, 4)
    ref = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, -1) @ v
    ref = attn.proj(ref.transpose(1, 2).reshape(2, 5, 16))
    torch.testing.assert_close(attn(x), ref)


def test_masked_keys_are_ignored_fused_and_manual():
    torch.manual_seed(0)
    for fused in (True, False):
        block = TransformerBlock(16, num_heads=2, fused_attn=fused)
        x = torch.randn(1, 6, 16)
        valid = torch.tensor([[True, True, True, True, False, False]])
        mask = attention_mask_from_valid(valid)
        y1 = block(x, attn_mask=mask)
        x2 = x.clone()
        x2[:, 4:] = 100.0
        y2 = block(x2, attn_mask=mask)
        torch.testing.assert_close(y1[:, :4], y2[:, :4])
        torch.testing.assert_close(y1[:, :4], block(x[:, :4]))


def test_mask_helper():
    assert attention_mask_from_valid(None) is None
    assert attention_mask_from_valid(torch.ones(2, 3, dtype=torch.bool)) is None
    m = attention_mask_from_valid(torch.tensor([[True, False], [False, False]]))
    assert m.shape == (2, 1, 1, 2)
    assert m[1].all()  # an all-padding row stays finite


@pytest.mark.parametrize(
    "kwargs, match",
    [({"num_heads": 3}, "num_heads"), ({"num_heads": 2, "attn_drop": 1.0}, "attn_drop"),
     ({"num_heads": 2, "fused": "yes"}, "fused")],
)
def test_bad_args(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        Attention(16, **kwargs)


# --------------------------------------------------------------------------- returned probabilities


def _rope_and_mask(b, n, head_dim, gen):
    positions = torch.randn(b, n, 2, generator=gen) * 3
    rope = RoPE2D(head_dim=head_dim).cos_sin(positions)
    valid = torch.rand(b, n, generator=gen) < 0.6
    valid[:, 0] = True
    return rope, attention_mask_from_valid(valid)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("with_rope_and_mask", [False, True])
def test_return_attention_gives_the_same_output_and_the_probabilities(fused, with_rope_and_mask):
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    attn = Attention(16, num_heads=2, fused=fused).double()
    x = torch.randn(3, 7, 16, dtype=torch.float64, generator=gen)
    kw = {}
    if with_rope_and_mask:
        rope, mask = _rope_and_mask(3, 7, 8, gen)
        kw = {"rope": rope, "attn_mask": mask}
    plain = attn(x, **kw)
    out, probs = attn(x, **kw, return_attention=True)
    torch.testing.assert_close(out, plain, rtol=0, atol=1e-12)
    assert probs.shape == (3, 2, 7, 7) and probs.dtype == torch.float64
    torch.testing.assert_close(probs.sum(-1), torch.ones(3, 2, 7, dtype=torch.float64))
    if with_rope_and_mask:
        assert (probs.masked_select(~kw["attn_mask"].expand_as(probs)) == 0).all()
    # probs @ v is the module's output before its projection.
    seen = {}
    handle = attn.proj.register_forward_pre_hook(lambda m, a: seen.update(pre=a[0]))
    attn(x, **kw)
    handle.remove()
    v = attn.qkv(x).reshape(3, 7, 3, 2, 8).permute(2, 0, 3, 1, 4)[2]
    torch.testing.assert_close((probs @ v).transpose(1, 2).reshape(3, 7, 16), seen["pre"], rtol=0, atol=1e-12)


def test_returned_probabilities_are_taken_before_dropout():
    torch.manual_seed(0)
    attn = Attention(8, num_heads=2, attn_drop=0.5).train()
    _, probs = attn(torch.randn(2, 6, 8), return_attention=True)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 2, 6))
    assert attn.training


def test_bf16_on_cpu_takes_the_explicit_path(monkeypatch):
    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    attn = Attention(8, num_heads=2)
    x = torch.randn(2, 5, 8)
    attn(x)
    assert calls == [1]  # fp32: fused
    attn.to(torch.bfloat16)(x.bfloat16())
    attn(x.bfloat16(), return_attention=True)
    assert calls == [1]  # bf16 on CPU and asked-for probabilities: explicit


@pytest.mark.parametrize("fused", [True, False])
def test_query_row_without_visible_key_stays_finite(fused):
    torch.manual_seed(0)
    attn = Attention(8, num_heads=2, fused=fused)
    x = torch.randn(2, 4, 8, requires_grad=True)
    mask = torch.ones(2, 1, 4, 4, dtype=torch.bool)
    mask[0, 0, 1] = False  # query 1 of sample 0 may see no key
    out, probs = attn(x, attn_mask=mask, return_attention=True)
    assert torch.isfinite(out).all() and torch.isfinite(probs).all()
    _, unmasked = attn(x, return_attention=True)
    torch.testing.assert_close(probs[0, :, 1], unmasked[0, :, 1])  # sees every key instead
    torch.testing.assert_close(attn(x, attn_mask=mask), out)
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


# --------------------------------------------------------------------------- the pure function


@settings(max_examples=20, deadline=None)
@given(
    b=st.integers(1, 3), h=st.integers(1, 3), nq=st.integers(1, 6), nk=st.integers(1, 6),
    dh=st.sampled_from([2, 4, 8]), dv=st.integers(1, 5), seed=st.integers(0, 2**16),
)
def test_fused_matches_explicit_and_the_formula(b, h, nq, nk, dh, dv, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, nq, dh, dtype=torch.float64, generator=gen)
    k = torch.randn(b, h, nk, dh, dtype=torch.float64, generator=gen)
    v = torch.randn(b, h, nk, dv, dtype=torch.float64, generator=gen)
    mask = torch.rand(b, 1, nq, nk, generator=gen) < 0.7
    fused = dot_product_attention(q, k, v, attn_mask=mask)
    explicit, probs = dot_product_attention(q, k, v, attn_mask=mask, fused=False, return_attention=True)
    torch.testing.assert_close(fused, explicit)
    # Reference: rows without a visible key see every key.
    seen = mask | ~mask.any(-1, keepdim=True)
    scores = (q @ k.transpose(-1, -2) / dh**0.5).masked_fill(~seen, float("-inf"))
    torch.testing.assert_close(probs, scores.softmax(-1))
    torch.testing.assert_close(explicit, scores.softmax(-1) @ v)


def test_dot_product_attention_bad_shapes_name_the_argument():
    q, k, v = torch.randn(2, 2, 3, 4), torch.randn(2, 2, 5, 4), torch.randn(2, 2, 5, 6)
    with pytest.raises(ValueError, match="k"):
        dot_product_attention(q, k[..., :3], v)
    with pytest.raises(ValueError, match="v"):
        dot_product_attention(q, k, v[:, :, :4])
    with pytest.raises(ValueError, match="attn_mask"):
        dot_product_attention(q, k, v, attn_mask=torch.ones(2, 1, 3, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="q, k and v"):
        dot_product_attention(q.double(), k, v)
    with pytest.raises(ValueError, match="dropout_p"):
        dot_product_attention(q, k, v, dropout_p=1.0)
