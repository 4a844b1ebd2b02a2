"""DINOv2-style multi-crop views, each with its own JEPA multi-block masks.

Per image, ``G`` *global* crops (default 2 at 224 px, scale 0.32-1.0) and ``Lc`` *local*
crops (default 6 at 96 px, scale 0.05-0.32) are cut at random boxes and resized
(RandomResizedCrop); every crop then gets its own multi-block masks from a
``MultiBlockMasker`` built for its patch grid (``size // patch_size`` per side).

The crop boxes and the resizing are in ``jepa_blocks.masking.crops``; flips and colour
augmentation are left to the dataset transform.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import default_collate

from jepa_blocks._checks import check_finite, check_grid, check_int, check_pair, check_tensor
from jepa_blocks.masking._sampling import check_sampling
from jepa_blocks.masking.collate import _SeededCollate
from jepa_blocks.masking.crops import (  # also importable from here
    crop_and_resize,
    sample_crop_boxes,
)
from jepa_blocks.masking.multiblock import MultiBlockMasker, MultiBlockMasks

__all__ = [
    "MultiCropBatch",
    "MultiCropMasker",
    "MultiCropCollator",
    "LOCAL_MASKING_DEFAULTS",
]

# Keyword arguments of MultiBlockMasker that global_masking / local_masking may set.
_MASKER_ARGS = frozenset(inspect.signature(MultiBlockMasker.__init__).parameters) - {
    "self",
    "grid_size",
}
# Local crops have small grids (6 x 6 for 96 px at patch 16): fewer targets, a smaller
# context minimum. Entries of local_masking override these, key by key.
LOCAL_MASKING_DEFAULTS: Mapping[str, Any] = types.MappingProxyType(
    {"num_targets": 2, "min_context_tokens": 4}
)


# ----------------------------------------------------------------------------- batch


@dataclass(frozen=True)
class MultiCropBatch:
    """Multi-crop views of a batch of images, with multi-block masks for every crop.

    Crop ``g`` of image ``b`` is row ``b * G + g`` of the flattened crops and of
    ``global_masks`` (sample-major, as ``global_crops.flatten(0, 1)``); the same for the
    local crops.

    Attributes:
        global_crops: Tensor of shape ``(B, G, C, Sg, Sg)``.
        local_crops: Tensor of shape ``(B, Lc, C, Sl, Sl)`` (``Lc`` may be 0).
        global_boxes: Long tensor of shape ``(B, G, 4)``: each global crop's box in the
            source image, ``(top, left, height, width)`` in pixels.
        local_boxes: Long tensor of shape ``(B, Lc, 4)``.
        global_masks: ``MultiBlockMasks`` for ``B * G`` crops on the ``Sg / p`` grid:
            context ``(B * G, Kc)``, targets ``(B * G, M_l, K_l)`` per level.
        local_masks: ``MultiBlockMasks`` for ``B * Lc`` crops on the ``Sl / p`` grid, or
            ``None`` when ``Lc == 0``.

    Example:
        >>> mc = MultiCropMasker(image_size=32, patch_size=4, global_size=32, local_size=16)
        >>> batch = mc(torch.rand(2, 3, 32, 32), generator=torch.Generator().manual_seed(0))
        >>> tuple(batch.global_crops.shape), tuple(batch.local_crops.shape)
        ((2, 2, 3, 32, 32), (2, 6, 3, 16, 16))
        >>> batch.global_masks.context.shape[0], batch.local_masks.context.shape[0]
        (4, 12)
    """

    global_crops: torch.Tensor
    local_crops: torch.Tensor
    global_boxes: torch.Tensor
    local_boxes: torch.Tensor
    global_masks: MultiBlockMasks
    local_masks: MultiBlockMasks | None

    @property
    def batch_size(self) -> int:
        """Number of source images ``B``."""
        return self.global_crops.shape[0]

    @property
    def num_global(self) -> int:
        """Global crops per image ``G``."""
        return self.global_crops.shape[1]

    @property
    def num_local(self) -> int:
        """Local crops per image ``Lc``."""
        return self.local_crops.shape[1]

    @property
    def global_images(self) -> torch.Tensor:
        """Global crops as one image batch ``(B * G, C, Sg, Sg)``, rows as ``global_masks``."""
        return self.global_crops.flatten(0, 1)

    @property
    def local_images(self) -> torch.Tensor:
        """Local crops as one image batch ``(B * Lc, C, Sl, Sl)``, rows as ``local_masks``."""
        return self.local_crops.flatten(0, 1)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> MultiCropBatch:
        """Move every tensor to ``device``."""

        def move(t):
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return MultiCropBatch(
            global_crops=move(self.global_crops),
            local_crops=move(self.local_crops),
            global_boxes=move(self.global_boxes),
            local_boxes=move(self.local_boxes),
            global_masks=move(self.global_masks),
            local_masks=move(self.local_masks),
        )

    def pin_memory(self) -> MultiCropBatch:
        """Pin every tensor (called by ``DataLoader(pin_memory=True)``)."""
        return MultiCropBatch(
            global_crops=self.global_crops.pin_memory(),
            local_crops=self.local_crops.pin_memory(),
            global_boxes=self.global_boxes.pin_memory(),
            local_boxes=self.local_boxes.pin_memory(),
            global_masks=self.global_masks.pin_memory(),
            local_masks=None if self.local_masks is None else self.local_masks.pin_memory(),
        )


# ----------------------------------------------------------------------------- masker


def _crop_size(name: str, value: Any, patch_size: int) -> int:
    value = check_int(name, value, min_value=patch_size)
    if value % patch_size:
        raise ValueError(f"{name} must be a multiple of patch_size={patch_size}, got {value}")
    return value


def _build_masker(
    name: str, settings: Mapping[str, Any] | None, defaults: Mapping[str, Any], grid: int
) -> MultiBlockMasker:
    if settings is None:
        settings = {}
    if not isinstance(settings, Mapping):
        raise TypeError(
            f"{name} must be a mapping of MultiBlockMasker keyword arguments or None, got "
            f"{type(settings).__name__}"
        )
    unknown = sorted(set(settings) - _MASKER_ARGS)
    if unknown:
        hint = " (grid_size is crop size // patch_size)" if "grid_size" in unknown else ""
        raise TypeError(
            f"{name} got keys {unknown} that MultiBlockMasker does not take{hint}; allowed: "
            f"{sorted(_MASKER_ARGS)}"
        )
    kwargs = {**defaults, **settings}
    try:
        return MultiBlockMasker(grid_size=grid, **kwargs)
    except (TypeError, ValueError) as err:
        # Same exception type, prefixed with the argument and the crop grid it applies to.
        raise type(err)(f"{name} (on the {grid}x{grid} crop grid): {err}") from err


class MultiCropMasker:
    """DINOv2-style multi-crop with JEPA multi-block masks on every crop.

    Each call cuts ``G`` global and ``Lc`` local crops per image (``sample_crop_boxes``,
    ``crop_and_resize``; rules in ``jepa_blocks.masking.crops``) and samples multi-block
    masks for every crop with one ``MultiBlockMasker`` per crop size, built here (so
    impossible mask settings raise at construction, naming ``global_masking`` or
    ``local_masking``).

    What the models need. The encoder takes any grid, so
    ``encoder(batch.global_images, keep=batch.global_masks.context)`` works as for plain
    images. ``HierarchicalPredictor`` is built for one grid: predict the global crops'
    targets with one built with ``grid_size=global_grid`` and
    ``num_levels=len(global_masker.target_specs)``; the local crops need a predictor with
    ``grid_size=local_grid`` (it may share every weight: the predictor's position tables
    are not parameters). Sin-cos and RoPE positions of a local crop are its own patch
    coordinates ``0 .. Sl / p - 1``.

    Args:
        image_size: Source image ``(H, W)`` (or ``n``) in pixels; calls check it.
        patch_size: Encoder patch side in pixels; crop sizes must be multiples of it.
        global_crops: Global crops per image ``G``, ``>= 1``.
        local_crops: Local crops per image ``Lc``, ``>= 0``.
        global_size: Side ``Sg`` of the resized global crops, in pixels.
        local_size: Side ``Sl`` of the resized local crops, in pixels.
        global_scale: ``(low, high)`` image-area fraction of a global crop (DINOv2:
            0.32-1.0).
        local_scale: ``(low, high)`` image-area fraction of a local crop (DINOv2:
            0.05-0.32).
        crop_aspect: ``(low, high)`` crop width / height, both crop kinds.
        global_masking: Keyword arguments for the global crops' ``MultiBlockMasker``
            (``num_targets``, ``target_scale``, ``context_scale``, ``levels``, ...; not
            ``grid_size``, which is ``Sg / p``). ``None``: its defaults (I-JEPA's).
        local_masking: Same for the local crops (grid ``Sl / p``), applied over
            ``LOCAL_MASKING_DEFAULTS`` (``num_targets=2, min_context_tokens=4``) key by
            key. Set ``levels`` here too if the local crops' predictor is hierarchical.

    Call ``masker(images, *, generator=None)`` with ``images`` of shape ``(B, C, H, W)``.
    The generator (default: the global RNG on CPU) draws, in order, the global boxes,
    the local boxes, the global masks and the local masks; same state, same batch. Boxes
    and masks are sampled on the generator's device, then everything is moved to the
    images' device. NaN/Inf images raise ``ValueError`` naming ``images`` while value
    checks are enabled (one pass over the batch; in a ``DataLoader`` worker on the CPU,
    no device sync); with value checks off they pass through to the crops that cover them.

    Returns:
        (MultiCropBatch): crops ``(B, G, C, Sg, Sg)`` and ``(B, Lc, C, Sl, Sl)``, their
        boxes, and masks for ``B * G`` and ``B * Lc`` crops.

    Example:
        >>> mc = MultiCropMasker(image_size=32, patch_size=4, global_size=32,
        ...                      local_size=16, local_crops=4)
        >>> mc.global_grid, mc.local_grid
        ((8, 8), (4, 4))
        >>> batch = mc(torch.rand(3, 3, 32, 32), generator=torch.Generator().manual_seed(0))
        >>> tuple(batch.local_images.shape), tuple(batch.local_masks.targets[0].shape[:2])
        ((12, 3, 16, 16), (12, 2))
    """

    def __init__(
        self,
        *,
        image_size: int | tuple[int, int],
        patch_size: int = 16,
        global_crops: int = 2,
        local_crops: int = 6,
        global_size: int = 224,
        local_size: int = 96,
        global_scale: tuple[float, float] = (0.32, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.32),
        crop_aspect: tuple[float, float] = (3 / 4, 4 / 3),
        global_masking: Mapping[str, Any] | None = None,
        local_masking: Mapping[str, Any] | None = None,
    ) -> None:
        self.image_size = check_grid("image_size", image_size)
        self.patch_size = check_int("patch_size", patch_size, min_value=1)
        self.global_crops = check_int("global_crops", global_crops, min_value=1)
        self.local_crops = check_int("local_crops", local_crops, min_value=0)
        self.global_size = _crop_size("global_size", global_size, self.patch_size)
        self.local_size = _crop_size("local_size", local_size, self.patch_size)
        self.global_scale = check_pair(
            "global_scale", global_scale, min_value=0.0, min_inclusive=False, max_value=1.0
        )
        self.local_scale = check_pair(
            "local_scale", local_scale, min_value=0.0, min_inclusive=False, max_value=1.0
        )
        self.crop_aspect = check_pair(
            "crop_aspect", crop_aspect, min_value=0.0, min_inclusive=False
        )
        self.global_masker = _build_masker(
            "global_masking", global_masking, {}, self.global_size // self.patch_size
        )
        self.local_masker: MultiBlockMasker | None = None
        if self.local_crops:
            self.local_masker = _build_masker(
                "local_masking",
                local_masking,
                LOCAL_MASKING_DEFAULTS,
                self.local_size // self.patch_size,
            )
        elif local_masking is not None:
            raise ValueError("local_masking must be None when local_crops=0")

    @property
    def global_grid(self) -> tuple[int, int]:
        """Patch grid ``(Sg / p, Sg / p)`` of a global crop."""
        return self.global_masker.grid_size

    @property
    def local_grid(self) -> tuple[int, int]:
        """Patch grid ``(Sl / p, Sl / p)`` of a local crop."""
        side = self.local_size // self.patch_size
        return side, side

    def __call__(
        self, images: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> MultiCropBatch:
        """Crop, resize and mask ``images`` of shape ``(B, C, H, W)`` (see the class docstring)."""
        check_tensor("images", images, ndim=4, kind="float")
        if tuple(images.shape[-2:]) != self.image_size:
            raise ValueError(
                f"images must have height and width image_size={self.image_size}, got shape "
                f"{tuple(images.shape)}"
            )
        check_finite(("images", images))  # a value check: NaN pixels would give NaN crops
        generator, _, _ = check_sampling(generator)
        b = images.shape[0]
        common = {"image_size": self.image_size, "aspect": self.crop_aspect, "generator": generator}
        g_boxes = sample_crop_boxes(
            b, num_crops=self.global_crops, scale=self.global_scale, **common
        )
        l_boxes = sample_crop_boxes(b, num_crops=self.local_crops, scale=self.local_scale, **common)
        g_masks = self.global_masker(b * self.global_crops, generator=generator)
        l_masks = None
        if self.local_masker is not None:
            l_masks = self.local_masker(b * self.local_crops, generator=generator)
        batch = MultiCropBatch(
            global_crops=crop_and_resize(images, g_boxes, size=self.global_size),
            local_crops=crop_and_resize(images, l_boxes, size=self.local_size),
            global_boxes=g_boxes,
            local_boxes=l_boxes,
            global_masks=g_masks,
            local_masks=l_masks,
        )
        return batch if g_boxes.device == images.device else batch.to(images.device)

    def __repr__(self) -> str:
        return (
            f"MultiCropMasker(image_size={self.image_size}, patch_size={self.patch_size}, "
            f"global: {self.global_crops} x {self.global_size}px scale {self.global_scale} "
            f"{self.global_masker!r}, local: {self.local_crops} x {self.local_size}px scale "
            f"{self.local_scale} {self.local_masker!r}, crop_aspect={self.crop_aspect})"
        )


# ----------------------------------------------------------------------------- collate


class MultiCropCollator(_SeededCollate):
    """``collate_fn`` for a DataLoader: multi-crop views and masks for every batch.

    Samples are ``(C, H, W)`` image tensors, or tuples whose first item is one (e.g.
    ``(image, label)``). The images are collated, then ``masker`` crops and masks them
    with a generator drawn as ``MaskCollator`` draws its own (different across workers,
    epochs and calls, reproducible from the DataLoader seed or ``seed``, the global RNG
    untouched).

    Args:
        masker: The ``MultiCropMasker`` to apply.
        collate_fn: Collates the list of samples (``default_collate`` by default); must
            give an image tensor ``(B, C, H, W)`` or a sequence starting with one.
        seed: Extra seed mixed into every generator; with ``num_workers=0`` it (or
            ``torch.initial_seed()`` when ``None``) sets the whole stream.

    Returns (per call):
        ``MultiCropBatch`` for tensor samples; for tuple samples a tuple with the images
        replaced by their ``MultiCropBatch``: ``(batch, labels, ...)``.

    Example:
        >>> mc = MultiCropMasker(image_size=32, patch_size=4, global_size=32, local_size=16)
        >>> collator = MultiCropCollator(mc, seed=0)
        >>> batch, labels = collator([(torch.rand(3, 32, 32), 0), (torch.rand(3, 32, 32), 1)])
        >>> tuple(batch.global_crops.shape), labels.tolist()
        ((2, 2, 3, 32, 32), [0, 1])
    """

    def __init__(
        self,
        masker: MultiCropMasker,
        *,
        collate_fn: Callable[[list[Any]], Any] = default_collate,
        seed: int | None = None,
    ) -> None:
        if not isinstance(masker, MultiCropMasker):
            raise TypeError(f"masker must be a MultiCropMasker, got {type(masker).__name__}")
        super().__init__(collate_fn=collate_fn, seed=seed)
        self.masker = masker

    def __call__(self, samples: Sequence[Any]) -> MultiCropBatch | tuple[Any, ...]:
        """Collate ``samples`` and return their multi-crop batch (see the class docstring)."""
        batch = self._collate(samples)
        if isinstance(batch, torch.Tensor):
            images, rest = batch, None
        elif (
            isinstance(batch, Sequence)
            and not isinstance(batch, (str, bytes))
            and len(batch) > 0
            and isinstance(batch[0], torch.Tensor)
        ):
            images, rest = batch[0], tuple(batch[1:])
        else:
            raise TypeError(
                "samples must be (C, H, W) image tensors or tuples whose first item is one; "
                f"collate_fn gave {type(batch).__name__}"
            )
        crops = self.masker(images, generator=self._next_generator())
        return crops if rest is None else (crops, *rest)
