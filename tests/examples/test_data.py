"""examples/data.py: the library calls it uses do the job of the code they replaced.

The transforms are torchvision ``transforms.v2``; they must give the same tensors as the
``transforms`` (v1) pipeline that every recorded run used, drawing the same random numbers.
The stratified split is ours (it fixes the recorded results' split); it must give every
class the share that scikit-learn's stratified ``train_test_split`` gives.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

pytest.importorskip("torchvision")
pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def data(load_example):
    return load_example("data")


@pytest.fixture(scope="module")
def digits(data):
    return data.digits_dataset()


def _v1_pretrain(img_size, *, crop_scale=(0.3, 1.0), flip=True, color_jitter=0.0, grayscale=0.0):
    """The v1 pipeline the example trainer used before transforms.v2, rebuilt from v1 parts."""
    import warnings

    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    from torchvision import transforms as T

    ops = [T.RandomResizedCrop(img_size, scale=crop_scale, antialias=True)]
    if flip:
        ops.append(T.RandomHorizontalFlip())
    if color_jitter > 0:
        ops.append(T.RandomApply([T.ColorJitter(color_jitter, color_jitter, color_jitter, color_jitter / 4)], p=0.8))
    if grayscale > 0:
        ops.append(T.RandomGrayscale(p=grayscale))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ToTensor may be marked deprecated
        ops += [T.ToTensor(), T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)]
    return T.Compose(ops)


def _run_seeded(transform, img, seed):
    torch.manual_seed(seed)
    random.seed(seed)
    out = transform(img)
    return out, torch.get_rng_state()


@pytest.mark.parametrize(
    "options",
    [{}, {"color_jitter": 0.4, "grayscale": 0.2}, {"crop_scale": (0.6, 1.0), "flip": False}],
    ids=["default", "jitter-grayscale", "no-flip"],
)
def test_pretrain_transform_equals_the_v1_pipeline_bit_for_bit(data, digits, options):
    new, old = data.pretrain_transform(24, **options), _v1_pretrain(24, **options)
    for i in range(0, len(digits), 60):  # 30 images
        img = digits[i][0]
        a, state_a = _run_seeded(new, img, seed=i)
        b, state_b = _run_seeded(old, img, seed=i)
        assert type(a) is torch.Tensor and a.dtype == torch.float32 and a.shape == (3, 24, 24)
        assert torch.equal(state_a, state_b), "v2 drew other random numbers than v1"
        assert torch.equal(a, b), f"image {i}: max difference {(a - b).abs().max().item():.3g}"


def test_multi_view_transform_stacks_independent_views(data, digits):
    views = data.pretrain_transform(24, views=3)
    out, _ = _run_seeded(views, digits[0][0], seed=0)
    assert out.shape == (3, 3, 24, 24)
    assert not torch.equal(out[0], out[1])


def test_eval_transform_equals_the_v1_pipeline_bit_for_bit(data, digits):
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    from torchvision import transforms as T

    old = T.Compose([T.Resize((20, 20), antialias=True), T.ToTensor(),
                     T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])
    new = data.eval_transform(20)
    for i in range(0, len(digits), 90):
        img = digits[i][0]
        assert torch.equal(new(img), old(img))


def test_normalisation_uses_timms_imagenet_statistics(data):
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    assert (data.IMAGENET_MEAN, data.IMAGENET_STD) == (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    # A uniform grey image comes out as (grey - mean) / std per channel.
    from PIL import Image

    out = data.eval_transform(8)(Image.new("RGB", (8, 8), (51, 102, 204)))
    expected = (torch.tensor([51, 102, 204]) / 255 - torch.tensor(IMAGENET_DEFAULT_MEAN)) / torch.tensor(
        IMAGENET_DEFAULT_STD
    )
    torch.testing.assert_close(out.mean(dim=(1, 2)), expected)


# ----------------------------------------------------------------------------- the split


@pytest.mark.parametrize(("val_fraction", "seed"), [(0.2, 0), (0.25, 1), (0.1, 7)])
def test_stratified_split_gives_each_class_scikit_learns_share(data, digits, val_fraction, seed):
    from sklearn.model_selection import train_test_split

    labels = digits.targets
    train, val = data.stratified_split(labels, val_fraction=val_fraction, seed=seed)
    assert train == sorted(train) and val == sorted(val)
    assert sorted(train + val) == list(range(len(labels))), "the split must partition the indices"
    _, sk_val = train_test_split(list(range(len(labels))), test_size=val_fraction, stratify=labels,
                                 random_state=seed)
    ours, theirs = Counter(labels[i] for i in val), Counter(labels[i] for i in sk_val)
    for c in set(labels):
        assert abs(ours[c] - theirs[c]) <= 1, (c, ours[c], theirs[c])
    # Same seed, same split; another seed, another split.
    assert data.stratified_split(labels, val_fraction=val_fraction, seed=seed) == (train, val)
    assert data.stratified_split(labels, val_fraction=val_fraction, seed=seed + 1)[1] != val


def test_stratified_split_fraction_range(data):
    assert data.stratified_split([0, 1, 0, 1], val_fraction=0.0) == ([0, 1, 2, 3], [])
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="val_fraction must be in"):
            data.stratified_split([0, 1], val_fraction=bad)
