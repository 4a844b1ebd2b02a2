"""Frozen-feature extraction for kNN and linear-probe evaluation.

:func:`extract_features` runs an encoder over a loader of ``(images, labels)`` batches
under ``torch.inference_mode`` (optionally in autocast) and gathers float32 CPU features;
:func:`pool_tokens` turns token outputs into one vector per image by averaging the real
(non-padding) tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from jepa_blocks._checks import check_tensor, value_checks_enabled

__all__ = ["extract_features", "pool_tokens"]


def pool_tokens(tokens: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Average the real tokens of each sample.

    Args:
        tokens: Tokens of shape ``(B, N, D)``.
        valid: Optional bool mask of shape ``(B, N)``, ``True`` for real tokens (as in
            ``MaskIndices.valid``); ``None`` averages all ``N`` tokens. Every sample needs
            at least one real token (a value check: skipped when value checks are off).

    Returns:
        Pooled features of shape ``(B, D)`` in the dtype of ``tokens`` (accumulated in
        float32 or wider).

    Example:
        >>> x = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
        >>> pool_tokens(x, torch.tensor([[True, True, False]]))
        tensor([[2., 3.]])
    """
    check_tensor("tokens", tokens, ndim=3, kind="float")
    acc = torch.promote_types(tokens.dtype, torch.float32)
    if valid is None:
        return tokens.to(acc).mean(dim=1).to(tokens.dtype)
    check_tensor("valid", valid, ndim=2, kind="bool")
    if valid.shape != tokens.shape[:2]:
        raise ValueError(
            f"valid must have shape {tuple(tokens.shape[:2])} to match tokens (B, N), got {tuple(valid.shape)}"
        )
    count = valid.sum(dim=1, keepdim=True)  # (B, 1)
    if value_checks_enabled() and bool((count == 0).any()):
        empty = (count.squeeze(1) == 0).nonzero().flatten().tolist()
        raise ValueError(
            f"valid must mark at least one token per sample, samples {empty} have none"
        )
    # where() rather than a product, so NaN/Inf in padded slots cannot leak into the mean.
    summed = torch.where(valid.unsqueeze(-1), tokens.to(acc), 0).sum(dim=1)  # (B, D)
    return (summed / count.to(acc)).to(tokens.dtype)


def _split_batch(batch: Any, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, (str, bytes)) or not isinstance(batch, Sequence) or len(batch) != 2:
        raise TypeError(
            f"loader must yield (images, labels) pairs, batch {index} is {type(batch).__name__}"
            + (f" of length {len(batch)}" if isinstance(batch, Sequence) else "")
        )
    images, labels = batch
    if not isinstance(images, torch.Tensor):
        raise TypeError(
            f"loader batch {index}: images must be a torch.Tensor, got {type(images).__name__}"
        )
    labels = torch.as_tensor(labels)
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"loader batch {index}: labels must have shape ({images.shape[0]},) to match the images, "
            f"got {tuple(labels.shape)}"
        )
    return images, labels


def extract_features(
    encoder_fn: Callable[[torch.Tensor], torch.Tensor],
    loader: Iterable[Any],
    *,
    device: torch.device | str | None = None,
    amp_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode every batch of a loader and collect the features on the CPU.

    The encoder is called under ``torch.inference_mode``; put modules in ``eval()`` mode
    yourself (this function does not touch them).

    Args:
        encoder_fn: Maps images of shape ``(B, ...)`` to features of shape ``(B, D)``
            (pool token outputs first, e.g. with :func:`pool_tokens`).
        loader: Iterable of ``(images, labels)`` with images of shape ``(B, ...)`` and
            labels of shape ``(B,)`` (a tensor or a sequence of ints).
        device: Where images are moved before encoding; ``None`` leaves them where the
            loader put them.
        amp_dtype: ``torch.bfloat16`` or ``torch.float16`` to run the encoder in
            autocast on the images' device; ``None`` runs it as is.

    Returns:
        ``(features, labels)``: float32 CPU features of shape ``(N, D)`` and CPU labels of
        shape ``(N,)``, ``N`` the total number of images, in loader order.

    Example:
        >>> loader = [(torch.ones(2, 3), torch.tensor([0, 1])), (torch.zeros(1, 3), [2])]
        >>> feats, labels = extract_features(lambda x: 2 * x, loader)
        >>> feats.shape, labels.tolist()
        (torch.Size([3, 3]), [0, 1, 2])
    """
    if not callable(encoder_fn):
        raise TypeError(f"encoder_fn must be callable, got {type(encoder_fn).__name__}")
    if amp_dtype is not None and amp_dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(
            f"amp_dtype must be None, torch.bfloat16 or torch.float16, got {amp_dtype!r}"
        )
    target = torch.device(device) if device is not None else None
    feats: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    with torch.inference_mode():
        for i, batch in enumerate(loader):
            images, y = _split_batch(batch, i)
            if target is not None:
                images = images.to(target, non_blocking=True)
            with torch.autocast(
                device_type=images.device.type, dtype=amp_dtype, enabled=amp_dtype is not None
            ):
                out = encoder_fn(images)
            if (
                not isinstance(out, torch.Tensor)
                or out.ndim != 2
                or out.shape[0] != images.shape[0]
            ):
                got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ValueError(
                    f"encoder_fn must return features of shape ({images.shape[0]}, D) for batch {i}, "
                    f"got {got}; pool token outputs first (pool_tokens)"
                )
            feats.append(out.float().cpu())
            labels.append(y.cpu())
    if not feats:
        raise ValueError("loader yielded no batches")
    if len({f.shape[1] for f in feats}) != 1:
        raise ValueError(
            f"encoder_fn returned varying feature widths {sorted({f.shape[1] for f in feats})}"
        )
    return torch.cat(feats), torch.cat(labels)
