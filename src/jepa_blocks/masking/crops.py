"""Random resized crops: box sampling and batched bilinear crop-and-resize.

Crop box rule (``sample_crop_boxes``). On an ``H x W`` image, per sample and per crop, a
scale ``s`` is drawn uniformly from ``scale`` and, independently, a uniform ``u``; the
area is ``A = s * H * W`` and the aspect ``r`` is width / height (torchvision's
``ratio``). A ``w x h`` rectangle of area ``A`` fits the image iff
``A / H**2 <= r <= W**2 / A``, so both ends of the log-aspect range are first clamped
into that interval, then ``u`` is mapped onto the clamped range::

    lo, hi = clamp(log(aspect), log(A / H**2), log(W**2 / A))      (each end)
    r      = exp(lo + u * (hi - lo))
    w      = clamp(floor(sqrt(A * r) + 0.5), 1, W)                 (round half up)
    h      = clamp(floor(sqrt(A / r) + 0.5), 1, H)
    top  uniform in {0, ..., H - h},   left uniform in {0, ..., W - w}   (inclusive)

computed in float64. Consequences, each tested:

* scale: ``h`` and ``w`` are the real ``sqrt(A / r)`` and ``sqrt(A * r)`` rounded, so
  ``h * w`` equals ``s * H * W`` up to that rounding (each side within 1/2 pixel, except
  that a side below 1/2 pixel becomes 1);
* aspect: ``r`` lies in ``aspect`` whenever some crop of area ``A`` with an aspect in
  range fits the image (always, if ``aspect`` contains ``W / H``); otherwise the fitting
  aspect nearest the range is used (the crop spans the full height or width). For a given
  scale the aspect is log-uniform over the in-range aspects that fit, as after
  torchvision's re-draws; but torchvision re-draws the scale too (at most 10 times, then
  falls back to a centre crop that keeps the aspect, not the scale), we keep the scale
  and draw once, vectorised;
* placement: every pixel, last row and column included, can be in a crop.

Resizing (``crop_and_resize``): bilinear, exactly ``F.interpolate(crop, size,
mode="bilinear", align_corners=False)`` of the slice ``image[:, top:top+h, left:left+w]``
(neighbours outside the box are never read), for all crops at once through one
``grid_sample``. No antialiasing: a crop shrunk by more than about 2x aliases, as
``F.interpolate(..., antialias=False)`` does (torchvision's tensor ``resized_crop``
antialiases by default).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange

from jepa_blocks._checks import (
    check_grid,
    check_int,
    check_pair,
    check_tensor,
    value_checks_enabled,
)
from jepa_blocks.masking._sampling import check_sampling

__all__ = ["sample_crop_boxes", "crop_and_resize"]


# ----------------------------------------------------------------------------- boxes


def _boxes_from_uniform(
    u: torch.Tensor,
    image_size: tuple[int, int],
    scale: tuple[float, float],
    aspect: tuple[float, float],
) -> torch.Tensor:
    """The box rule of the module docstring on given uniforms.

    Args:
        u: Float64 tensor of shape ``(..., 4)`` in ``[0, 1)``: (scale, aspect, top, left).
        image_size: ``(H, W)`` in pixels.
        scale: ``(low, high)`` area fraction.
        aspect: ``(low, high)`` width / height.

    Returns:
        Long tensor of shape ``(..., 4)``: ``(top, left, height, width)``.
    """
    hh, ww = image_size
    area = (scale[0] + (scale[1] - scale[0]) * u[..., 0]) * float(hh * ww)
    fit_lo = torch.log(area / float(hh * hh))  # aspect of a full-height crop of this area
    fit_hi = torch.log(float(ww * ww) / area)  # aspect of a full-width crop; fit_lo <= fit_hi
    lo = torch.minimum(torch.maximum(torch.full_like(area, math.log(aspect[0])), fit_lo), fit_hi)
    hi = torch.minimum(torch.maximum(torch.full_like(area, math.log(aspect[1])), fit_lo), fit_hi)
    r = torch.exp(lo + (hi - lo) * u[..., 1])
    w = torch.floor(torch.sqrt(area * r) + 0.5).long().clamp(1, ww)
    h = torch.floor(torch.sqrt(area / r) + 0.5).long().clamp(1, hh)
    # floor(u * (number of placements)) is uniform over {0, ..., H - h}; the minimum only
    # guards against u * n rounding up to n.
    top = torch.minimum(torch.floor(u[..., 2] * (hh - h + 1)).long(), hh - h)
    left = torch.minimum(torch.floor(u[..., 3] * (ww - w + 1)).long(), ww - w)
    return torch.stack((top, left, h, w), dim=-1)


def sample_crop_boxes(
    batch_size: int,
    *,
    image_size: int | tuple[int, int],
    num_crops: int,
    scale: tuple[float, float] = (0.08, 1.0),
    aspect: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Random resized-crop boxes, drawn independently per sample and per crop.

    The rule (scale, log-aspect clamped to what fits, rounding, inclusive placement) is
    in the module docstring. Sampling runs on the generator's device (CPU when
    ``generator`` is ``None``, using the global torch RNG); ``device`` moves the result.

    Args:
        batch_size: Number of images ``B``.
        image_size: Image ``(H, W)`` in pixels, or ``n`` for ``(n, n)``.
        num_crops: Crops ``n`` per image (``0`` gives an empty ``(B, 0, 4)`` tensor).
        scale: ``(low, high)`` fraction of the image area per crop, in ``(0, 1]``.
        aspect: ``(low, high)`` crop width / height (torchvision's ``ratio``), ``> 0``;
            drawn log-uniformly.
        generator: Random generator; same state, same boxes.
        device: Where to put the result.

    Returns:
        Long tensor of shape ``(B, n, 4)``: ``(top, left, height, width)`` in pixels, with
        ``0 <= top <= H - height`` and ``0 <= left <= W - width``.
    """
    batch_size = check_int("batch_size", batch_size, min_value=1)
    size = check_grid("image_size", image_size)
    num_crops = check_int("num_crops", num_crops, min_value=0)
    scale = check_pair("scale", scale, min_value=0.0, min_inclusive=False, max_value=1.0)
    aspect = check_pair("aspect", aspect, min_value=0.0, min_inclusive=False)
    generator, sample_device, device = check_sampling(generator, device)
    u = torch.rand(
        batch_size, num_crops, 4, generator=generator, device=sample_device, dtype=torch.float64
    )
    boxes = _boxes_from_uniform(u, size, scale, aspect)
    return boxes if device is None else boxes.to(device)


# ----------------------------------------------------------------------------- resizing


def _source_coords(start: torch.Tensor, length: torch.Tensor, out: int) -> torch.Tensor:
    """Pixel coordinate read by each output pixel, as ``F.interpolate`` (bilinear,
    ``align_corners=False``) on the slice ``[start, start + length)`` computes it:
    ``(i + 1/2) * length / out - 1/2``, clamped to ``[0, length - 1]`` (never outside)."""
    i = torch.arange(out, device=start.device, dtype=start.dtype) + 0.5
    src = i * (length / out).unsqueeze(-1) - 0.5  # (..., out)
    src = torch.minimum(src.clamp(min=0.0), (length - 1).unsqueeze(-1))
    return start.unsqueeze(-1) + src


def crop_and_resize(
    images: torch.Tensor, boxes: torch.Tensor, *, size: int | tuple[int, int]
) -> torch.Tensor:
    """Cut ``n`` boxes out of every image and resize each to ``size`` (bilinear).

    Equal to ``F.interpolate(images[b, None, :, top:top+h, left:left+w], size,
    mode="bilinear", align_corners=False)`` per box (up to float rounding), computed for
    every box at once with one ``grid_sample``; no antialiasing (see the module
    docstring). Half-precision images are sampled in float32 and cast back. Differentiable
    with respect to ``images``.

    Args:
        images: Float tensor of shape ``(B, C, H, W)``.
        boxes: Integer tensor of shape ``(B, n, 4)``: ``(top, left, height, width)`` in
            pixels, inside the image (as ``sample_crop_boxes`` returns them).
        size: Output ``S`` (square) or ``(Sh, Sw)``.

    Returns:
        Tensor of shape ``(B, n, C, Sh, Sw)``, dtype and device of ``images``.
    """
    check_tensor("images", images, ndim=4, kind="float")
    check_tensor("boxes", boxes, ndim=3, kind="int", allow_empty=True)
    sh, sw = check_grid("size", size)
    b, c, hh, ww = images.shape
    if boxes.shape[0] != b or boxes.shape[2] != 4:
        raise ValueError(
            f"boxes must have shape (B, n, 4) = ({b}, n, 4) for images of batch {b}, got "
            f"{tuple(boxes.shape)}"
        )
    n = boxes.shape[1]
    if value_checks_enabled() and boxes.numel():
        top, left, h, w = boxes.unbind(-1)
        inside = (top >= 0) & (left >= 0) & (h >= 1) & (w >= 1) & (top + h <= hh) & (left + w <= ww)
        if not bool(inside.all()):
            bad = boxes[~inside][0].tolist()
            raise ValueError(
                f"boxes must lie inside the {hh}x{ww} image with height and width >= 1, got "
                f"(top, left, height, width) = {tuple(bad)}"
            )
    if n == 0:
        return images.new_empty(b, 0, c, sh, sw)
    dtype = images.dtype if images.dtype in (torch.float32, torch.float64) else torch.float32
    top, left, h, w = boxes.to(device=images.device, dtype=dtype).unbind(-1)  # (B, n) each
    ys = _source_coords(top, h, sh)  # (B, n, Sh) pixel rows
    xs = _source_coords(left, w, sw)  # (B, n, Sw) pixel columns
    # grid_sample with align_corners=True maps -1 and 1 to the centres of the first and
    # last pixel. Grid point [b, k * Sh + i, j] = (x, y) = (xs[b, k, j], ys[b, k, i]): the
    # crops of one image are stacked along the output height, so no image is copied.
    gy = ys * (2.0 / max(hh - 1, 1)) - 1.0
    gx = xs * (2.0 / max(ww - 1, 1)) - 1.0
    grid = torch.stack(
        (gx.unsqueeze(2).expand(b, n, sh, sw), gy.unsqueeze(3).expand(b, n, sh, sw)), dim=-1
    )
    out = F.grid_sample(
        images.to(dtype),
        grid.reshape(b, n * sh, sw, 2),
        mode="bilinear",
        padding_mode="border",
        align_corners=True,
    )  # (B, C, n * Sh, Sw)
    return rearrange(out, "b c (n h) w -> b n c h w", n=n).to(images.dtype)
