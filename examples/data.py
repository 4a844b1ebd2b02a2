"""Datasets for the example scripts: image folders, torchvision sets, embedded digits.

Shared by ``train_hjepa.py`` and ``evaluate.py`` so that both carve the same stratified
validation split from one folder (same seed, same fraction).

Sources, in the order ``load_dataset`` tries them:
- ``"digits"`` (the default when no data is given): scikit-learn's bundled 8x8 handwritten
  digits (1,797 real images, 10 classes), upscaled to 32x32 RGB. Installs with
  scikit-learn, so it needs no download.
- ``"cifar10"``, ``"cifar100"``, ``"stl10"``: torchvision datasets read from ``root`` when
  their files are present; ``download=True`` fetches them (needs internet).
- anything else is read as an ``ImageFolder`` directory (``class/image.png``); labels are
  only used for evaluation.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset, Subset

# timm's ImageNet statistics, under the names the example scripts import.
IMAGENET_MEAN, IMAGENET_STD = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD


class TensorImages(Dataset):
    """Images held in memory as a uint8 tensor ``(N, C, H, W)`` with labels ``(N,)``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform=None) -> None:
        self.images, self.labels, self.transform = images, labels, transform
        self.targets = labels.tolist()
        self.classes = [str(c) for c in sorted(set(self.targets))]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        from torchvision.transforms.v2.functional import to_pil_image

        img = to_pil_image(self.images[i])
        return (self.transform(img) if self.transform else img), int(self.labels[i])


def digits_dataset(size: int = 32) -> TensorImages:
    """scikit-learn's 1,797 digits (8x8, 17 grey levels) as ``size`` px RGB uint8 images."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32) / 16.0  # (N, 8, 8) in [0, 1]
    x = torch.nn.functional.interpolate(x[:, None], size=(size, size), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    return TensorImages(x, torch.tensor(digits.target, dtype=torch.long))


def load_dataset(source: str | None, *, root: str = "data", train: bool = True, download: bool = False):
    """Return a dataset with ``targets`` (labels) and PIL images, without transforms."""
    import torchvision

    if source in (None, "", "digits"):
        return digits_dataset()
    name = source.lower()
    if name in ("cifar10", "cifar100"):
        cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        return cls(root, train=train, download=download)
    if name == "stl10":
        ds = torchvision.datasets.STL10(root, split="train" if train else "test", download=download)
        ds.targets = ds.labels.tolist()
        return ds
    if not os.path.isdir(source):
        raise FileNotFoundError(
            f"--data {source!r} is neither a directory nor one of digits, cifar10, cifar100, stl10"
        )
    return torchvision.datasets.ImageFolder(source)


def stratified_split(labels: Sequence[int], *, val_fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """Indices of a stratified ``(train, val)`` split: ``val_fraction`` of every class.

    Each class, in sorted label order, is shuffled by one ``torch.Generator`` seeded with
    ``seed`` and gives ``round(n_class * val_fraction)`` images to validation. Kept rather
    than scikit-learn's ``train_test_split(stratify=...)`` on purpose: scikit-learn draws
    other indices (and sizes the classes by a global rounding), so it would change the
    split that every recorded result (benchmarks/RESULTS.md, the training guide) was
    measured on, and it refuses ``val_fraction=0``. Both give every class the same share
    to within one image (tested).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    g = torch.Generator().manual_seed(seed)
    labels_t = torch.as_tensor(list(labels))
    train, val = [], []
    for c in labels_t.unique().tolist():
        idx = (labels_t == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)].tolist()
        n_val = round(len(idx) * val_fraction)
        val += idx[:n_val]
        train += idx[n_val:]
    return sorted(train), sorted(val)


class WithTransform(Dataset):
    """A view of ``dataset`` (optionally a subset of indices) with its own transform."""

    def __init__(self, dataset, indices: Sequence[int] | None, transform) -> None:
        self.base = Subset(dataset, list(indices)) if indices is not None else dataset
        self.transform = transform
        labels = dataset.targets
        self.targets = [labels[i] for i in indices] if indices is not None else list(labels)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        img, label = self.base[i]
        if not hasattr(img, "convert"):
            from torchvision.transforms.v2.functional import to_pil_image

            img = to_pil_image(img)
        return self.transform(img.convert("RGB")), label


class MultiView:
    """Apply ``transform`` ``views`` times to one image: a tensor ``(views, C, H, W)``."""

    def __init__(self, transform, views: int) -> None:
        self.transform, self.views = transform, views

    def __call__(self, img):
        return torch.stack([self.transform(img) for _ in range(self.views)])


def _unit_float(image: torch.Tensor) -> torch.Tensor:
    """uint8 ``(C, H, W)`` -> float32 in [0, 1] by division by 255.

    ``v2.ToDtype(torch.float32, scale=True)`` multiplies by ``1 / 255`` instead, which moves
    126 of the 256 grey levels by one float32 ulp: runs would no longer match the recorded
    ones bit for bit, so the division of v1's ``ToTensor`` is kept.
    """
    return image.to(torch.float32).div(255)


def _to_normalised_tensor(v2) -> list:
    """PIL image -> plain float tensor ``(C, H, W)``, normalised with ImageNet statistics."""
    return [v2.PILToTensor(), v2.Lambda(_unit_float), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


def pretrain_transform(img_size: int, *, crop_scale: tuple[float, float] = (0.3, 1.0), flip: bool = True,
                       views: int = 1, color_jitter: float = 0.0, grayscale: float = 0.0):
    """Random resized crop and horizontal flip, optionally colour jitter and grayscale.

    ``color_jitter = s > 0`` applies brightness, contrast and saturation jitter of strength
    ``s`` and hue jitter ``s / 4`` with probability 0.8 (SimCLR's recipe at ``s = 0.4``);
    ``grayscale`` is the probability of a grayscale view. With ``views > 1`` each image
    yields that many independent views, stacked. torchvision ``transforms.v2`` on a PIL
    image; the output is a plain float tensor ``(C, img_size, img_size)`` (``(views, C,
    img_size, img_size)`` with ``views > 1``).
    """
    from torchvision.transforms import v2

    ops = [v2.RandomResizedCrop(img_size, scale=crop_scale, antialias=True)]
    if flip:
        ops.append(v2.RandomHorizontalFlip())
    if color_jitter > 0:
        ops.append(v2.RandomApply([v2.ColorJitter(color_jitter, color_jitter, color_jitter, color_jitter / 4)], p=0.8))
    if grayscale > 0:
        ops.append(v2.RandomGrayscale(p=grayscale))
    transform = v2.Compose(ops + _to_normalised_tensor(v2))
    return MultiView(transform, views) if views > 1 else transform


def eval_transform(img_size: int):
    """Resize (no crop) and normalise, for feature extraction: a float tensor ``(C, img_size, img_size)``."""
    from torchvision.transforms import v2

    return v2.Compose([v2.Resize((img_size, img_size), antialias=True), *_to_normalised_tensor(v2)])


def split_datasets(source: str | None, *, val_fraction: float, seed: int, img_size: int, root: str = "data",
                   download: bool = False, views: int = 1, crop_scale: tuple[float, float] = (0.3, 1.0),
                   color_jitter: float = 0.0, grayscale: float = 0.0):
    """The pretraining set and (train, val) evaluation views of one source.

    A folder (or digits) is split into stratified train/val parts with ``val_fraction``;
    torchvision sets use their official test split for validation.
    """
    base = load_dataset(source, root=root, train=True, download=download)
    if source and source.lower() in ("cifar10", "cifar100", "stl10"):
        test = load_dataset(source, root=root, train=False, download=download)
        train_idx, val_base, val_idx = None, test, None
    else:
        train_idx, val_idx = stratified_split(base.targets, val_fraction=val_fraction, seed=seed)
        val_base = base
    pretrain = WithTransform(base, train_idx, pretrain_transform(img_size, views=views, crop_scale=crop_scale,
                                                                  color_jitter=color_jitter, grayscale=grayscale))
    eval_train = WithTransform(base, train_idx, eval_transform(img_size))
    eval_val = WithTransform(val_base, val_idx, eval_transform(img_size))
    return pretrain, eval_train, eval_val
