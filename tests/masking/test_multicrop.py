"""Tests for jepa_blocks.masking.multicrop and .crops (multi-crop views with multi-block masks)."""

from __future__ import annotations

import doctest
import math
import pickle
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, Dataset

import jepa_blocks.masking.multicrop as multicrop_module
from jepa_blocks.masking import (
    MultiBlockMasks,
    MultiCropBatch,
    MultiCropCollator,
    MultiCropMasker,
    crop_and_resize,
    sample_crop_boxes,
)
from jepa_blocks.masking.crops import _boxes_from_uniform


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- box rule


def reference_box(u, hh, ww, scale, aspect):
    """The documented rule, written independently: plain floats, aspect clamped in the
    linear domain, log-uniform draw as a power. Returns the box and the real (h, w)."""
    area = (scale[0] + (scale[1] - scale[0]) * u[0]) * hh * ww
    fit_lo, fit_hi = area / hh**2, ww**2 / area  # aspects of full-height / full-width crops
    lo = min(max(aspect[0], fit_lo), fit_hi)
    hi = min(max(aspect[1], fit_lo), fit_hi)
    r = lo * (hi / lo) ** u[1]
    h_real, w_real = math.sqrt(area / r), math.sqrt(area * r)
    h = sorted((1, int(h_real + 0.5), hh))[1]
    w = sorted((1, int(w_real + 0.5), ww))[1]
    top, left = int(u[2] * (hh - h + 1)), int(u[3] * (ww - w + 1))
    return (top, left, h, w), (h_real, w_real)


def near_half(x: float) -> bool:
    return abs(x - math.floor(x) - 0.5) < 1e-9


pairs = st.tuples(st.floats(0.01, 1.0), st.floats(0.0, 1.0)).map(
    lambda t: (t[0], t[0] + (1.0 - t[0]) * t[1])
)
aspects = st.tuples(st.floats(0.2, 3.0), st.floats(1.0, 4.0)).map(lambda t: (t[0], t[0] * t[1]))


@settings(max_examples=100, deadline=None)
@given(
    st.integers(1, 300),
    st.integers(1, 300),
    pairs,
    aspects,
    st.lists(st.floats(0.0, 1.0, exclude_max=True), min_size=4, max_size=4),
)
def test_box_rule_matches_reference(hh, ww, scale, aspect, u):
    got = _boxes_from_uniform(
        torch.tensor(u, dtype=torch.float64), (hh, ww), scale, aspect
    ).tolist()
    want, (h_real, w_real) = reference_box(u, hh, ww, scale, aspect)
    # float64 log/exp vs power may differ in the last bit: only a tie may round apart.
    assume(not near_half(h_real) and not near_half(w_real))
    assert got == list(want)


def test_box_rule_examples():
    u = torch.tensor([0.0, 0.5, 0.0, 0.0], dtype=torch.float64)
    # 100x100, scale 0.25, aspect 1 (log-midpoint of (0.5, 2)): 50x50.
    assert _boxes_from_uniform(u, (100, 100), (0.25, 0.25), (0.5, 2.0)).tolist() == [0, 0, 50, 50]
    # Scale 1 keeps the scale: whatever the aspect range, the crop is the whole image.
    assert _boxes_from_uniform(u, (10, 10), (1.0, 1.0), (2.0, 3.0)).tolist() == [0, 0, 10, 10]
    assert _boxes_from_uniform(u, (10, 20), (1.0, 1.0), (0.75, 4 / 3)).tolist() == [0, 0, 10, 20]
    # Aspect 4 (w / h) of area 64 on 100x100 is 4 x 16: width first.
    assert _boxes_from_uniform(u, (100, 100), (0.0064,) * 2, (4.0, 4.0)).tolist() == [0, 0, 4, 16]
    # Tiny crops are clamped to one pixel; u -> 1 places the box at the far edge.
    last = torch.tensor([0.0, 0.0, 1 - 1e-16, 1 - 1e-16], dtype=torch.float64)
    assert _boxes_from_uniform(last, (5, 7), (0.001, 0.001), (1.0, 1.0)).tolist() == [4, 6, 1, 1]


def check_box_properties(boxes, hh, ww, scale, aspect=None, eps=1e-9):
    """Bounds, and scale / aspect up to the 1/2-pixel rounding (sides of 1 may come from
    anything in (0, 1.5)). ``aspect=None`` skips the aspect check."""
    top, left, h, w = (boxes[..., i].double() for i in range(4))
    assert boxes.dtype == torch.long
    assert (h >= 1).all() and (w >= 1).all()
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= hh).all() and (left + w <= ww).all()
    h_lo, w_lo = torch.where(h > 1, h - 0.5, 0.0), torch.where(w > 1, w - 0.5, 0.0)
    h_hi, w_hi = h + 0.5, w + 0.5
    n = hh * ww
    assert (h_lo * w_lo <= scale[1] * n * (1 + eps)).all(), "crop too large for the scale"
    assert (h_hi * w_hi >= scale[0] * n * (1 - eps)).all(), "crop too small for the scale"
    if aspect is not None:
        assert (w_lo / h_hi <= aspect[1] * (1 + eps)).all(), "crop too wide"
        assert (w_hi / h_lo >= aspect[0] * (1 - eps)).all(), "crop too tall"


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 80),
    st.integers(1, 80),
    pairs,
    st.tuples(st.floats(0.3, 1.0), st.floats(1.0, 3.0)),
    st.integers(0, 2**31),
)
def test_sample_crop_boxes_properties(hh, ww, scale, spread, seed):
    # An aspect range containing W / H: every scale has a fitting in-range aspect.
    aspect = (ww / hh * spread[0], ww / hh * spread[1])
    boxes = sample_crop_boxes(
        4, image_size=(hh, ww), num_crops=5, scale=scale, aspect=aspect, generator=gen(seed)
    )
    assert boxes.shape == (4, 5, 4)
    check_box_properties(boxes, hh, ww, scale, aspect)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 60), st.integers(1, 60), pairs, aspects, st.integers(0, 2**31))
def test_sample_crop_boxes_keep_scale_for_any_aspect_range(hh, ww, scale, aspect, seed):
    boxes = sample_crop_boxes(
        3, image_size=(hh, ww), num_crops=4, scale=scale, aspect=aspect, generator=gen(seed)
    )
    check_box_properties(boxes, hh, ww, scale)


def test_checker_can_fail():
    box = torch.tensor([[[0, 0, 5, 5]]])
    check_box_properties(box, 10, 10, (0.25, 0.25), (1.0, 1.0))
    with pytest.raises(AssertionError, match="large"):
        check_box_properties(box, 10, 10, (0.1, 0.1))
    with pytest.raises(AssertionError, match="wide"):
        check_box_properties(torch.tensor([[[0, 0, 4, 8]]]), 10, 10, (0.3, 0.3), (0.5, 1.5))
    with pytest.raises(AssertionError):
        check_box_properties(torch.tensor([[[6, 0, 5, 5]]]), 10, 10, (0.25, 0.25))


def test_distribution_independent_scale_and_log_aspect():
    # 1000 px: rounding is negligible, every (scale, aspect) pair fits.
    boxes = (
        sample_crop_boxes(
            2000,
            image_size=1000,
            num_crops=10,
            scale=(0.1, 0.5),
            aspect=(0.5, 2.0),
            generator=gen(1),
        )
        .reshape(-1, 4)
        .double()
    )
    h, w = boxes[:, 2], boxes[:, 3]
    s = h * w / 1e6
    log_r = torch.log(w / h)
    assert 0.099 < s.min() < 0.102 and 0.498 < s.max() < 0.501
    assert abs(s.mean().item() - 0.3) < 0.004
    assert abs(((s < 0.2).double().mean() - 0.25).item()) < 0.015  # uniform in scale
    assert abs(log_r.mean().item()) < 0.01
    assert abs(((log_r < -math.log(2) / 2).double().mean() - 0.25).item()) < 0.015  # log-uniform
    corr = torch.corrcoef(torch.stack((s, log_r)))[0, 1].item()
    assert abs(corr) < 0.03, "scale and aspect must be independent draws (I-JEPA ties them)"


@pytest.mark.parametrize("size, scale", [((7, 5), (0.05, 0.2)), ((10, 10), (0.8, 0.9))])
def test_every_pixel_reachable(size, scale):
    hh, ww = size
    boxes = sample_crop_boxes(
        1500, image_size=size, num_crops=2, scale=scale, generator=gen(2)
    ).reshape(-1, 4)
    cover = np.zeros(size, dtype=int)
    for top, left, h, w in boxes.tolist():
        cover[top : top + h, left : left + w] += 1
    assert (cover > 0).all(), cover
    top, left, h, w = boxes.unbind(-1)
    assert ((top + h == hh) & (h < hh)).any() and ((left + w == ww) & (w < ww)).any()
    assert ((top == 0) & (h < hh)).any() and ((left == 0) & (w < ww)).any()


def test_sample_crop_boxes_determinism_and_variety():
    kwargs = {"image_size": (40, 30), "num_crops": 3, "scale": (0.1, 0.6)}
    a = sample_crop_boxes(8, generator=gen(5), **kwargs)
    assert torch.equal(a, sample_crop_boxes(8, generator=gen(5), **kwargs))
    assert not torch.equal(a, sample_crop_boxes(8, generator=gen(6), **kwargs))
    assert len({tuple(b) for b in a.reshape(-1, 4).tolist()}) > 20, "samples and crops must differ"
    torch.manual_seed(0)
    state = torch.get_rng_state()
    sample_crop_boxes(2, image_size=8, num_crops=1, generator=gen(0))
    assert torch.equal(torch.get_rng_state(), state), "a generator must not touch the global RNG"
    assert sample_crop_boxes(2, image_size=8, num_crops=0).shape == (2, 0, 4)
    assert sample_crop_boxes(2, image_size=8, num_crops=1, device="cpu").device.type == "cpu"


# ----------------------------------------------------------------------------- resizing


def reference_crops(images, boxes, size):
    """Slice + F.interpolate, one box at a time."""
    out = []
    for b in range(images.shape[0]):
        row = []
        for top, left, h, w in boxes[b].tolist():
            crop = images[b : b + 1, :, top : top + h, left : left + w]
            row.append(F.interpolate(crop, size=size, mode="bilinear", align_corners=False)[0])
        out.append(torch.stack(row))
    return torch.stack(out)


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 20),
    st.integers(1, 20),
    st.integers(1, 24),
    st.integers(1, 24),
    pairs,
    st.integers(0, 2**31),
)
def test_crop_and_resize_matches_slice_and_interpolate(hh, ww, sh, sw, scale, seed):
    g = gen(seed)
    images = torch.rand(2, 2, hh, ww, dtype=torch.float64, generator=g)
    boxes = sample_crop_boxes(2, image_size=(hh, ww), num_crops=3, scale=scale, generator=g)
    out = crop_and_resize(images, boxes, size=(sh, sw))
    assert out.shape == (2, 3, 2, sh, sw) and out.dtype == torch.float64
    torch.testing.assert_close(out, reference_crops(images, boxes, (sh, sw)), rtol=0, atol=1e-10)


def test_crop_and_resize_matches_torchvision_resized_crop():
    tvf = pytest.importorskip("torchvision.transforms.v2.functional")
    images = torch.rand(1, 3, 40, 48, generator=gen(3))
    # Down-scaling boxes without antialiasing; up-scaling boxes (antialias has no effect).
    cases = [
        ((0, 0, 40, 48), (24, 24), False),
        ((5, 7, 30, 20), (16, 12), False),
        ((39, 47, 1, 1), (3, 3), True),
        ((3, 9, 10, 14), (24, 24), True),
        ((0, 20, 40, 28), (40, 28), True),
    ]
    for box, size, antialias in cases:
        out = crop_and_resize(images, torch.tensor([[box]]), size=size)[0, 0]
        want = tvf.resized_crop(images[0], *box, list(size), antialias=antialias)
        torch.testing.assert_close(out, want, rtol=0, atol=1e-5)


def test_crop_and_resize_identity_dtypes_and_grad():
    images = torch.rand(2, 3, 9, 7, dtype=torch.float64, requires_grad=True)
    whole = torch.tensor([[0, 0, 9, 7]]).expand(2, 1, 4)
    out = crop_and_resize(images, whole, size=(9, 7))
    # Equal up to grid_sample's coordinate normalisation round trip.
    torch.testing.assert_close(out[:, 0], images, rtol=0, atol=1e-12)
    out.sum().backward()
    torch.testing.assert_close(images.grad, torch.ones_like(images))
    x = torch.rand(2, 3, 16, 16)
    boxes = sample_crop_boxes(2, image_size=16, num_crops=2, generator=gen(0))
    full = crop_and_resize(x, boxes, size=8)
    half = crop_and_resize(x.bfloat16(), boxes, size=8)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), full, rtol=0, atol=1e-2)
    assert crop_and_resize(x, boxes[:, :0], size=8).shape == (2, 0, 3, 8, 8)


# ----------------------------------------------------------------------------- masker


def check_crop_masks(masks: MultiBlockMasks, grid: tuple[int, int], rows: int) -> None:
    """Context and targets of each crop: inside the crop's grid, targets full rectangles
    matching their boxes, context disjoint from every level's level-0 footprint."""
    gh, gw = grid
    assert masks.grid_size == grid and masks.context.shape[0] == rows
    ctx_ids = masks.context.indices
    assert ((ctx_ids >= 0) & (ctx_ids < gh * gw)).all()
    for r in range(rows):
        ctx = np.zeros(grid, dtype=bool)
        for i in ctx_ids[r][masks.context.valid[r]].tolist():
            ctx[i // gw, i % gw] = True
        covered = np.zeros(grid, dtype=bool)
        for lvl, (t, boxes) in enumerate(zip(masks.targets, masks.target_boxes, strict=True)):
            lh, lw = masks.level_grids[lvl]
            f = 2**lvl
            for j, (top, left, h, w) in enumerate(boxes[r].tolist()):
                assert 0 <= top <= lh - h and 0 <= left <= lw - w
                ids = t.indices[r, j][t.valid[r, j]].tolist()
                want = [(top + y) * lw + left + x for y in range(h) for x in range(w)]
                assert ids == want
                covered[top * f : (top + h) * f, left * f : (left + w) * f] = True
        assert ctx.any() and not (ctx & covered).any(), "context overlaps a target"


small = {"image_size": 32, "patch_size": 4, "global_size": 32, "local_size": 16}


@settings(max_examples=12, deadline=None)
@given(
    st.integers(1, 3),
    st.integers(1, 3),
    st.integers(0, 3),
    st.integers(1, 3),
    st.integers(1, 2),
    st.integers(0, 2**31),
)
def test_masker_crops_and_masks(batch, n_global, n_local, g_levels, l_levels, seed):
    mc = MultiCropMasker(
        **small,
        global_crops=n_global,
        local_crops=n_local,
        global_masking={"levels": g_levels},
        local_masking={"levels": l_levels} if n_local else None,
    )
    images = torch.rand(batch, 3, 32, 32, dtype=torch.float64, generator=gen(seed))
    out = mc(images, generator=gen(seed))
    assert isinstance(out, MultiCropBatch)
    assert out.global_crops.shape == (batch, n_global, 3, 32, 32)
    assert out.local_crops.shape == (batch, n_local, 3, 16, 16)
    assert (out.batch_size, out.num_global, out.num_local) == (batch, n_global, n_local)
    assert out.global_images.shape == (batch * n_global, 3, 32, 32)
    assert out.local_images.shape == (batch * n_local, 3, 16, 16)
    # The crops are exactly the boxes, resized.
    torch.testing.assert_close(out.global_crops, crop_and_resize(images, out.global_boxes, size=32))
    torch.testing.assert_close(out.local_crops, crop_and_resize(images, out.local_boxes, size=16))
    check_box_properties(out.global_boxes, 32, 32, mc.global_scale, mc.crop_aspect)
    check_box_properties(out.local_boxes, 32, 32, mc.local_scale, mc.crop_aspect)
    check_crop_masks(out.global_masks, (8, 8), batch * n_global)
    assert out.global_masks.num_levels == g_levels
    if n_local:
        check_crop_masks(out.local_masks, (4, 4), batch * n_local)
        assert out.local_masks.num_levels == l_levels
        assert out.local_masks.targets[0].shape[1] == 2  # local default: 2 targets
    else:
        assert out.local_masks is None and mc.local_masker is None


def test_masker_determinism_and_variety():
    mc = MultiCropMasker(**small)
    x = torch.rand(1, 3, 32, 32).expand(4, 3, 32, 32)  # identical images
    a, b = mc(x, generator=gen(0)), mc(x, generator=gen(0))
    c = mc(x, generator=gen(1))
    for name in ("global_crops", "local_crops", "global_boxes", "local_boxes"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert torch.equal(a.global_masks.context.indices, b.global_masks.context.indices)
    assert not torch.equal(a.global_boxes, c.global_boxes)
    # Same image, different crops and masks per sample and per crop.
    assert len({tuple(r) for r in a.local_boxes.reshape(-1, 4).tolist()}) > 12
    assert not torch.equal(a.global_crops[0], a.global_crops[1])
    ctx = a.global_masks.context_box.tolist()
    tgt = a.global_masks.target_boxes[0].tolist()
    assert len({str(t) for t in tgt}) == 8 and len(ctx) == 8


def test_masker_defaults_are_feasible_for_224():
    mc = MultiCropMasker(image_size=224)
    assert (mc.global_grid, mc.local_grid) == ((14, 14), (6, 6))
    assert [s.num_blocks for s in mc.local_masker.target_specs] == [2]
    # Hierarchical settings on both grids build too.
    hier = MultiCropMasker(
        image_size=224, global_masking={"levels": 3}, local_masking={"levels": 3}
    )
    assert hier.local_masker.level_grids == ((6, 6), (3, 3), (2, 2))
    out = hier(torch.rand(2, 3, 224, 224), generator=gen(0))
    assert out.global_crops.shape == (2, 2, 3, 224, 224) and out.local_crops.shape == (
        2,
        6,
        3,
        96,
        96,
    )
    check_crop_masks(out.local_masks, (6, 6), 12)
    assert "MultiCropMasker(image_size=(224, 224)" in repr(mc)


def test_batch_to_and_no_local_crops():
    mc = MultiCropMasker(**small, local_crops=0)
    out = mc(torch.rand(2, 3, 32, 32))
    assert out.local_crops.shape == (2, 0, 3, 16, 16) and out.local_masks is None
    moved = out.to("cpu")
    assert isinstance(moved, MultiCropBatch) and moved.local_masks is None
    assert moved.global_masks.context.indices.device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_images_and_pin_memory():
    mc = MultiCropMasker(**small)
    out = mc(torch.rand(2, 3, 32, 32, device="cuda"), generator=gen(0))
    assert out.global_crops.is_cuda and out.global_masks.context.indices.is_cuda
    assert out.local_boxes.is_cuda
    cpu = mc(torch.rand(2, 3, 32, 32)).pin_memory()
    assert cpu.global_crops.is_pinned() and cpu.local_masks.context.indices.is_pinned()
    on_gpu = mc(torch.rand(2, 3, 32, 32, device="cuda"), generator=torch.Generator("cuda"))
    check_crop_masks(on_gpu.global_masks.to("cpu"), (8, 8), 4)


def test_encoder_and_predictors_consume_the_batch():
    """The wiring documented for the trainer: encoder with keep=context on each crop kind,
    one predictor per crop grid sharing every weight."""
    from jepa_blocks import HierarchicalPredictor, ViTEncoder, hierarchical_targets

    mc = MultiCropMasker(
        **small, local_crops=2, global_masking={"levels": 2}, local_masking={"levels": 2}
    )
    batch = mc(torch.rand(2, 3, 32, 32), generator=gen(0))
    enc = ViTEncoder(img_size=32, patch_size=4, embed_dim=32, depth=1, num_heads=2)
    kw = {"embed_dim": 32, "predictor_dim": 16, "depth": 1, "num_heads": 2, "num_levels": 2}
    pred_g = HierarchicalPredictor(grid_size=mc.global_grid, **kw)
    pred_l = HierarchicalPredictor(grid_size=mc.local_grid, **kw)
    for name in ("predictor_embed", "mask_tokens", "blocks", "norm", "heads"):
        setattr(pred_l, name, getattr(pred_g, name))  # tie: position tables are not weights
    assert set(pred_l.state_dict()) == set(pred_g.state_dict())
    loss = 0.0
    for images, masks, pred in (
        (batch.global_images, batch.global_masks, pred_g),
        (batch.local_images, batch.local_masks, pred_l),
    ):
        with torch.no_grad():
            full = enc(images)
            targets = hierarchical_targets(
                full.tokens, grid_size=full.grid_size, targets=masks.targets
            )
        ctx = enc(images, keep=masks.context)
        preds = pred(ctx.tokens, context_indices=masks.context, targets=masks.targets)
        for p, t, m in zip(preds, targets, masks.targets, strict=True):
            assert p.shape == t.shape
            loss = loss + ((p - t) ** 2).mean(-1)[m.valid].mean()
    loss.backward()
    assert pred_g.mask_tokens.grad is not None and pred_l.mask_tokens is pred_g.mask_tokens


# ----------------------------------------------------------------------------- collate


class _Labelled(Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int):
        return torch.full((3, 32, 32), float(i)), i


def _key(batch: MultiCropBatch) -> tuple:
    return (
        batch.global_boxes.tolist(),
        batch.local_boxes.tolist(),
        batch.global_masks.context.indices.tolist(),
    )


def test_collator_reproducible_advancing_and_keeps_labels():
    mc = MultiCropMasker(**small)
    samples = [_Labelled()[i] for i in range(3)]
    a, b = MultiCropCollator(mc, seed=3), MultiCropCollator(mc, seed=3)
    seq_a = [_key(a(samples)[0]) for _ in range(3)]
    assert seq_a == [_key(b(samples)[0]) for _ in range(3)]
    assert seq_a[0] != seq_a[1] != seq_a[2]
    assert _key(MultiCropCollator(mc, seed=4)(samples)[0]) != seq_a[0]
    batch, labels = a(samples)
    assert labels.tolist() == [0, 1, 2] and batch.global_crops.shape == (3, 2, 3, 32, 32)
    # A crop of a constant image is that constant: image i stays in row i.
    assert torch.equal(batch.local_crops[:, :, 0, 0, 0], torch.arange(3.0)[:, None].expand(3, 6))
    only = a([s[0] for s in samples])
    assert isinstance(only, MultiCropBatch)
    # Resumes its stream after pickling (DataLoader workers get a copy).
    clone = pickle.loads(pickle.dumps(a))
    assert _key(clone(samples)[0]) == _key(a(samples)[0])
    torch.manual_seed(0)
    state = torch.get_rng_state()
    MultiCropCollator(mc, seed=0)(samples)
    assert torch.equal(torch.get_rng_state(), state)
    assert "MultiCropCollator(MultiCropMasker" in repr(a)


def test_collator_in_dataloader_workers():
    collator = MultiCropCollator(MultiCropMasker(**small, local_crops=2))
    loader = DataLoader(
        _Labelled(), batch_size=2, num_workers=2, collate_fn=collator, generator=gen(0)
    )
    epoch1 = [(labels.tolist(), _key(batch)) for batch, labels in loader]
    epoch2 = [(labels.tolist(), _key(batch)) for batch, labels in loader]
    assert [lab for lab, _ in epoch1] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert epoch1[0][1] != epoch1[1][1], "workers must not repeat each other"
    assert epoch1 != epoch2, "epochs must differ"


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"image_size": "32"}, "image_size"),
        ({"image_size": 0}, "image_size"),
        ({"patch_size": 0}, "patch_size"),
        ({"patch_size": 4.0}, "patch_size"),
        ({"global_crops": 0}, "global_crops"),
        ({"local_crops": -1}, "local_crops"),
        ({"global_size": 30}, "global_size must be a multiple of patch_size=4"),
        ({"local_size": 2}, "local_size"),
        ({"local_size": "16"}, "local_size"),
        ({"global_scale": (0.5, 0.2)}, "global_scale"),
        ({"global_scale": (0.3, 1.5)}, "global_scale"),
        ({"local_scale": (0.0, 0.3)}, "local_scale"),
        ({"local_scale": 0.3}, "local_scale"),
        ({"crop_aspect": (0.0, 1.0)}, "crop_aspect"),
        ({"crop_aspect": (2.0, 1.0)}, "crop_aspect"),
        ({"global_masking": "levels=2"}, "global_masking must be a mapping"),
        ({"global_masking": {"grid_size": 8}}, r"global_masking.*grid_size is crop size"),
        ({"global_masking": {"num_targts": 4}}, r"global_masking got keys \['num_targts'\]"),
        ({"global_masking": {"num_targets": 0}}, r"global_masking .*num_targets must be >= 1"),
        ({"local_masking": {"min_context_tokens": 17}}, r"local_masking \(on the 4x4.*min_context"),
        ({"local_masking": {"levels": 4}}, r"local_masking .*min_context"),
        ({"local_crops": 0, "local_masking": {"levels": 2}}, "local_masking must be None"),
    ],
)
def test_bad_masker_arguments(kwargs, match):
    start = time.perf_counter()
    with pytest.raises((ValueError, TypeError), match=match):
        MultiCropMasker(**{**small, **kwargs})
    assert time.perf_counter() - start < 1.0


def test_bad_call_arguments():
    mc = MultiCropMasker(**small)
    with pytest.raises(ValueError, match="images must have height and width image_size"):
        mc(torch.rand(2, 3, 32, 24))
    with pytest.raises(ValueError, match="images"):
        mc(torch.rand(3, 32, 32))
    with pytest.raises(TypeError, match="images"):
        mc(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(TypeError, match="generator"):
        mc(torch.rand(2, 3, 32, 32), generator=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 2.0}, "batch_size"),
        ({"image_size": (0, 4)}, "image_size"),
        ({"num_crops": -1}, "num_crops"),
        ({"scale": (0.5, 0.1)}, "scale"),
        ({"scale": (0.1, 2.0)}, "scale"),
        ({"aspect": (-1.0, 1.0)}, "aspect"),
        ({"aspect": (1.0, float("inf"))}, "aspect"),
        ({"generator": "g"}, "generator"),
    ],
)
def test_bad_sample_crop_boxes_arguments(kwargs, match):
    kwargs = {"batch_size": 2, "image_size": 8, "num_crops": 2, **kwargs}
    with pytest.raises((ValueError, TypeError), match=match):
        sample_crop_boxes(kwargs.pop("batch_size"), **kwargs)


@pytest.mark.parametrize(
    "images, boxes, size, match",
    [
        (torch.rand(3, 8, 8), torch.zeros(1, 1, 4, dtype=torch.long), 4, "images"),
        (
            torch.zeros(1, 3, 8, 8, dtype=torch.long),
            torch.zeros(1, 1, 4, dtype=torch.long),
            4,
            "images",
        ),
        (torch.rand(1, 3, 8, 8), torch.zeros(1, 1, 4), 4, "boxes"),
        (torch.rand(1, 3, 8, 8), torch.zeros(2, 1, 4, dtype=torch.long), 4, "boxes"),
        (torch.rand(1, 3, 8, 8), torch.zeros(1, 1, 3, dtype=torch.long), 4, "boxes"),
        (torch.rand(1, 3, 8, 8), torch.tensor([[[4, 0, 5, 2]]]), 4, "boxes must lie inside"),
        (torch.rand(1, 3, 8, 8), torch.tensor([[[0, 0, 0, 2]]]), 4, "boxes must lie inside"),
        (torch.rand(1, 3, 8, 8), torch.tensor([[[0, 0, 2, 2]]]), 0, "size"),
        (torch.rand(1, 3, 8, 8), torch.tensor([[[0, 0, 2, 2]]]), (4, 4, 4), "size"),
    ],
)
def test_bad_crop_and_resize_arguments(images, boxes, size, match):
    with pytest.raises((ValueError, TypeError), match=match):
        crop_and_resize(images, boxes, size=size)


def test_bad_collator_arguments():
    mc = MultiCropMasker(**small)
    with pytest.raises(TypeError, match="masker"):
        MultiCropCollator("masker")
    with pytest.raises(TypeError, match="collate_fn"):
        MultiCropCollator(mc, collate_fn=3)
    with pytest.raises(TypeError, match="seed"):
        MultiCropCollator(mc, seed=1.5)
    with pytest.raises(TypeError, match="samples must be"):
        MultiCropCollator(mc, collate_fn=list, seed=0)(["a", "b"])


def test_docstring_examples():
    result = doctest.testmod(multicrop_module, extraglobs={"torch": torch})
    assert result.attempted > 0 and result.failed == 0
