from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from jepa_blocks.necks import FPNNeck, tokens_to_map

SIZE_CASES = [
    [(8, 8), (4, 4), (2, 2)],
    [(7, 7), (4, 4), (2, 2)],
    [(14, 14), (14, 14), (14, 14)],
    [(6, 10), (3, 5)],
    [(5, 3)],
    [(9, 7), (9, 7), (5, 4), (1, 1)],
]


def _features(sizes, channels, batch=2, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(batch, c, h, w, generator=g, dtype=dtype)
        for (h, w), c in zip(sizes, channels, strict=True)
    ]


def _as_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H * W, C) in row-major order, written with loops over pixels."""
    b, c, h, w = x.shape
    out = torch.empty(b, h * w, c, dtype=x.dtype)
    for r in range(h):
        for col in range(w):
            out[:, r * w + col, :] = x[:, :, r, col]
    return out


def _identity_neck(channels: int, levels: int, **kwargs) -> FPNNeck:
    """Lateral convs = identity, output convs = centre-tap identity, no biases."""
    neck = FPNNeck(in_channels=[channels] * levels, out_channels=channels, **kwargs).double()
    eye = torch.eye(channels, dtype=torch.float64)
    with torch.no_grad():
        for conv in neck.lateral:
            conv.weight.copy_(eye[:, :, None, None])
            conv.bias.zero_()
        for conv in neck.output:
            conv.weight.zero_()
            conv.weight[:, :, 1, 1] = eye
            conv.bias.zero_()
        if neck.fuse is not None:
            for conv in neck.fuse:
                conv.weight.copy_(torch.cat([eye, eye], dim=1)[:, :, None, None])
                conv.bias.zero_()
    return neck


@pytest.mark.parametrize("sizes", SIZE_CASES)
@pytest.mark.parametrize("fusion", ["add", "concat"])
@pytest.mark.parametrize("upsample_mode", ["nearest", "bilinear"])
def test_shapes(sizes, fusion, upsample_mode):
    channels = [3 + 2 * i for i in range(len(sizes))]
    neck = FPNNeck(
        in_channels=channels, out_channels=5, fusion=fusion, upsample_mode=upsample_mode
    ).double()
    for batch in (1, 3):
        out = neck(_features(sizes, channels, batch=batch))
        assert [tuple(y.shape) for y in out] == [(batch, 5, h, w) for h, w in sizes]


@pytest.mark.parametrize("sizes", SIZE_CASES)
@pytest.mark.parametrize("fusion", ["add", "concat"])
def test_tokens_and_maps_agree(sizes, fusion):
    channels = [4] * len(sizes)
    torch.manual_seed(0)
    neck = FPNNeck(in_channels=channels, out_channels=6, fusion=fusion).double()
    maps = _features(sizes, channels)
    tokens = [_as_tokens(x) for x in maps]
    ref = neck(maps)
    for got in (
        neck(tokens, grid_sizes=sizes),
        neck([tokens[0]] + maps[1:], grid_sizes=[sizes[0]] + [None] * (len(sizes) - 1)),
    ):
        for a, b in zip(ref, got, strict=True):
            torch.testing.assert_close(a, b)
    if all(h == w for h, w in sizes):  # square grids are inferred
        for a, b in zip(ref, neck(tokens), strict=True):
            torch.testing.assert_close(a, b)


@settings(max_examples=15, deadline=None)
@given(
    h0=st.integers(1, 12),
    w0=st.integers(1, 12),
    shrink=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3)), min_size=0, max_size=3),
    batch=st.integers(1, 2),
)
def test_shapes_property(h0, w0, shrink, batch):
    sizes = [(h0, w0)]
    for dh, dw in shrink:
        h, w = sizes[-1]
        sizes.append((max(1, h - dh), max(1, w - dw)))
    channels = [2] * len(sizes)
    neck = FPNNeck(in_channels=channels, out_channels=3, upsample_mode="bilinear").double()
    maps = _features(sizes, channels, batch=batch)
    out = neck(maps)
    assert [tuple(y.shape) for y in out] == [(batch, 3, h, w) for h, w in sizes]
    for a, b in zip(out, neck([_as_tokens(x) for x in maps], grid_sizes=sizes), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("fusion", ["add", "concat"])
def test_gradients_reach_every_input(fusion):
    sizes = [(7, 7), (4, 4), (2, 2)]
    channels = [3, 5, 7]
    neck = FPNNeck(in_channels=channels, out_channels=4, fusion=fusion).double()
    maps = [x.requires_grad_() for x in _features(sizes, channels)]
    tokens = _as_tokens(maps[2].detach()).requires_grad_()
    out = neck([maps[0], maps[1], tokens])
    sum(y.square().sum() for y in out).backward()
    for x in (maps[0], maps[1], tokens):
        assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in neck.parameters())


def _nearest_top_down(xs):
    """Expected output of an identity FPN with nearest upsampling, computed pixel by pixel.

    Nearest resizing from n_in to n_out maps output index r to floor(r * n_in / n_out); the
    running map is resized level by level, so index maps compose.
    """
    outs = []
    for i in range(len(xs)):
        b, c, h, w = xs[i].shape
        out = torch.zeros(b, c, h, w, dtype=xs[i].dtype)
        for r in range(h):
            for col in range(w):
                rr, cc = r, col
                for j in range(i, len(xs)):
                    if j > i:
                        rr = rr * xs[j].shape[2] // xs[j - 1].shape[2]
                        cc = cc * xs[j].shape[3] // xs[j - 1].shape[3]
                    out[:, :, r, col] += xs[j][:, :, rr, cc]
        outs.append(out)
    return outs


@pytest.mark.parametrize(
    "sizes", [[(8, 8), (4, 4), (2, 2)], [(7, 7), (4, 4), (2, 2)], [(6, 5), (6, 5), (3, 2)]]
)
@pytest.mark.parametrize("fusion", ["add", "concat"])
def test_hand_computed_top_down_sum(sizes, fusion):
    xs = _features(sizes, [3] * len(sizes))
    neck = _identity_neck(3, len(sizes), fusion=fusion)
    expected = _nearest_top_down(xs)
    for got, want in zip(neck(xs), expected, strict=True):
        torch.testing.assert_close(got, want)
    # Power-of-two grids: nearest 2x upsampling is repeat_interleave, in closed form.
    if sizes[0] == (8, 8):
        want0 = xs[0] + xs[1].repeat_interleave(2, 2).repeat_interleave(2, 3)
        want0 = want0 + xs[2].repeat_interleave(4, 2).repeat_interleave(4, 3)
        torch.testing.assert_close(neck(xs)[0], want0)


def test_bilinear_identity_neck_on_constant_maps():
    sizes = [(7, 7), (4, 4), (2, 2)]
    consts = [1.5, -2.0, 0.25]
    xs = [
        torch.full((2, 3, h, w), c, dtype=torch.float64)
        for (h, w), c in zip(sizes, consts, strict=True)
    ]
    neck = _identity_neck(3, 3, upsample_mode="bilinear")
    for i, y in enumerate(neck(xs)):
        torch.testing.assert_close(y, torch.full_like(y, sum(consts[i:])))


def test_equal_resolutions_sum_all_coarser_levels():
    xs = _features([(5, 5)] * 4, [3] * 4)
    for mode in ("nearest", "bilinear"):
        out = _identity_neck(3, 4, upsample_mode=mode)(xs)
        for i, y in enumerate(out):
            torch.testing.assert_close(y, sum(xs[i:]))


def test_tokens_to_map_row_major():
    x = torch.arange(2 * 6 * 3, dtype=torch.float32).reshape(2, 6, 3)
    m = tokens_to_map(x, (2, 3))
    assert m.shape == (2, 3, 2, 3)
    for r in range(2):
        for c in range(3):
            assert torch.equal(m[:, :, r, c], x[:, r * 3 + c, :])
    assert tokens_to_map(torch.zeros(1, 9, 2)).shape == (1, 2, 3, 3)
    with pytest.raises(ValueError, match="grid_size"):
        tokens_to_map(torch.zeros(1, 6, 2))
    with pytest.raises(ValueError, match="grid_size"):
        tokens_to_map(torch.zeros(1, 6, 2), (2, 2))
    with pytest.raises(ValueError, match="x"):
        tokens_to_map(torch.zeros(6, 2))


def test_bad_inputs():
    neck = FPNNeck(in_channels=[4, 6], out_channels=3)
    a, b = torch.randn(2, 4, 4, 4), torch.randn(2, 6, 2, 2)
    with pytest.raises(ValueError, match="features"):
        neck([a])
    with pytest.raises(TypeError, match="features"):
        neck(a)
    with pytest.raises(ValueError, match=r"features\[1\].*6 channels"):
        neck([a, torch.randn(2, 5, 2, 2)])
    with pytest.raises(ValueError, match=r"features\[0\].*4 channels"):
        neck([torch.randn(2, 16, 5), b])  # tokens with wrong channel count
    with pytest.raises(ValueError, match=r"grid_sizes"):
        neck([torch.randn(2, 12, 4), b])  # 12 tokens, not square
    with pytest.raises(ValueError, match=r"grid_sizes\[0\]"):
        neck([torch.randn(2, 12, 4), b], grid_sizes=[(3, 3), None])
    with pytest.raises(ValueError, match=r"grid_sizes\[1\]"):
        neck([a, b], grid_sizes=[None, (3, 3)])
    with pytest.raises(ValueError, match="grid_sizes"):
        neck([a, b], grid_sizes=[(4, 4)])
    with pytest.raises(ValueError, match=r"features\[0\]"):
        neck([torch.randn(2, 4), b])
    with pytest.raises(ValueError, match=r"features\[1\]"):
        neck([a, torch.randn(1, 2, 6, 2, 2)])
    with pytest.raises(TypeError, match=r"features\[0\]"):
        neck([torch.ones(2, 4, 4, 4, dtype=torch.long), b])
    with pytest.raises(ValueError, match=r"features\[1\].*batch"):
        neck([a, torch.randn(3, 6, 2, 2)])
    with pytest.raises(ValueError, match="finest to the coarsest"):
        neck([torch.randn(2, 4, 2, 2), torch.randn(2, 6, 4, 4)])
    ok = neck([torch.randn(2, 12, 4), b], grid_sizes=[(3, 4), None])
    assert [tuple(y.shape) for y in ok] == [(2, 3, 3, 4), (2, 3, 2, 2)]


@pytest.mark.parametrize(
    ("kwargs", "err", "name"),
    [
        ({"in_channels": []}, ValueError, "in_channels"),
        ({"in_channels": 4}, TypeError, "in_channels"),
        ({"in_channels": [4, 0]}, ValueError, r"in_channels\[1\]"),
        ({"in_channels": [4], "out_channels": 0}, ValueError, "out_channels"),
        ({"in_channels": [4], "fusion": "mul"}, ValueError, "fusion"),
        ({"in_channels": [4], "upsample_mode": "bicubic"}, ValueError, "upsample_mode"),
    ],
)
def test_bad_hyperparameters(kwargs, err, name):
    with pytest.raises(err, match=name):
        FPNNeck(**kwargs)


def test_modules_and_repr():
    neck = FPNNeck(in_channels=[8, 16, 32], out_channels=4, fusion="concat")
    assert neck.num_levels == 3 and len(neck.fuse) == 2
    assert isinstance(neck.output[0], nn.Conv2d) and neck.output[0].kernel_size == (3, 3)
    assert "concat" in repr(neck)
    assert FPNNeck(in_channels=[8]).fuse is None


def test_device_mismatch_is_rejected_and_meta_propagates_shapes():
    """Features on another device than the weights raise naming the level and both
    devices (a metadata check); all on ``meta``, the neck propagates shapes."""
    neck = FPNNeck(in_channels=[4, 8], out_channels=4)
    feats = [torch.randn(2, 4, 4, 4), torch.randn(2, 8, 2, 2)]
    with pytest.raises(ValueError, match=r"features\[1\] must be on .*\(cpu\), got a tensor on meta"):
        neck([feats[0], feats[1].to("meta")])
    neck = neck.to("meta")
    with pytest.raises(ValueError, match=r"features\[0\] must be on .*\(meta\), got a tensor on cpu"):
        neck(feats)
    maps = neck([f.to("meta") for f in feats])
    assert [tuple(m.shape) for m in maps] == [(2, 4, 4, 4), (2, 4, 2, 2)]
