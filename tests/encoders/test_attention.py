import pytest
import torch

from jepa_blocks.encoders import Attention, TransformerBlock, attention_mask_from_valid


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


def test_timm_block_weights_load():
    from timm.models.vision_transformer import Block

    ours = TransformerBlock(32, num_heads=4, layer_scale_init=1e-3)
    theirs = Block(32, num_heads=4, qkv_bias=True, init_values=1e-3)
    missing, unexpected = ours.load_state_dict(theirs.state_dict(), strict=False)
    assert not missing and not unexpected
    x = torch.randn(2, 7, 32)
    torch.testing.assert_close(ours(x), theirs(x))


@pytest.mark.parametrize(
    "kwargs, match",
    [({"num_heads": 3}, "num_heads"), ({"num_heads": 2, "attn_drop": 1.0}, "attn_drop"),
     ({"num_heads": 2, "fused": "yes"}, "fused")],
)
def test_bad_args(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        Attention(16, **kwargs)
