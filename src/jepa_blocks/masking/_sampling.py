"""The random-sampling arguments every masker takes: ``generator=None, device=None``.

One contract for ``MultiBlockMasker``, ``sample_multiblock_masks``, ``sample_crop_boxes``
and ``MultiCropMasker``: sampling draws from ``generator`` on the generator's device (on
CPU from the global torch RNG when it is ``None``), ``device`` only moves the result,
and the same generator state gives the same output.
"""

from __future__ import annotations

from typing import Any

import torch

from jepa_blocks._checks import check_device

__all__ = ["check_sampling"]


def check_sampling(
    generator: Any, device: Any = None
) -> tuple[torch.Generator | None, torch.device, torch.device | None]:
    """Check the sampling arguments of a masker call.

    Args:
        generator: A ``torch.Generator`` or ``None``.
        device: Where the result goes: a ``torch.device``, a device string or ``None``.

    Returns:
        ``(generator, sample_device, device)``: the generator, the device sampling runs on
        (the generator's, CPU for ``None``) and ``device`` as a ``torch.device`` or ``None``.
    """
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator or None, got {type(generator).__name__}"
        )
    if device is not None:
        device = check_device("device", device)
    sample_device = generator.device if generator is not None else torch.device("cpu")
    return generator, sample_device, device
