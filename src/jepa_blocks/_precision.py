"""Computation precision shared by the losses and the quantiser: float32 inside, float64
kept for exact tests, autocast off."""

from __future__ import annotations

import contextlib

import torch

__all__ = ["compute_dtype", "full_precision"]


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """``float64`` if any input is float64, else ``float32`` (bf16/fp16 are upcast)."""
    if any(t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def full_precision(device: torch.device) -> contextlib.AbstractContextManager:
    """A context that disables autocast on ``device`` so float32 matmuls stay float32."""
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except RuntimeError:  # a device type without autocast support: nothing to disable
        return contextlib.nullcontext()
