"""Padded per-sample token index sets: the mask format every block accepts.

Masks differ in size from sample to sample. Instead of cutting every mask to the batch
minimum (I-JEPA's collator drops ~40% of the context that way, always the bottom-right
patches: facebookresearch/ijepa issue 60) we pad each index list to the batch maximum and
carry a boolean validity mask beside it.

Layout of one index list (last dimension, length ``K``)::

    indices: [i_0, i_1, ..., i_{n-1}, 0, 0, ..., 0]      ascending token ids, then padding
    valid:   [T,   T,   ..., T,       F, F, ..., F]      n = number of real tokens

Token ids are row-major positions on the patch grid, ``id = row * W + col``. Padding
entries hold ``0`` so that gathering with them is always in range; their results must be
ignored through ``valid``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from jepa_blocks._checks import check_index_range, check_int, check_tensor

__all__ = ["MaskIndices", "mask_to_indices", "gather_tokens"]


@dataclass(frozen=True)
class MaskIndices:
    """A batch of padded token-index lists with their validity mask.

    Attributes:
        indices: Long tensor of shape ``(..., K)``: token ids, ascending within the valid
            prefix, ``0`` in padding slots.
        valid: Bool tensor of shape ``(..., K)``: ``True`` for real tokens. Real tokens
            always come first.

    Example:
        >>> m = mask_to_indices(torch.tensor([[True, False, True], [False, True, False]]))
        >>> m.indices.tolist(), m.valid.tolist()
        ([[0, 2], [1, 0]], [[True, True], [True, False]])
    """

    indices: torch.Tensor
    valid: torch.Tensor

    def __post_init__(self) -> None:
        check_tensor("indices", self.indices, ndim=range(1, 8), kind="int", allow_empty=True)
        check_tensor("valid", self.valid, kind="bool", allow_empty=True)
        if self.indices.shape != self.valid.shape:
            raise ValueError(
                "indices and valid must have the same shape, got "
                f"{tuple(self.indices.shape)} and {tuple(self.valid.shape)}"
            )

    @property
    def shape(self) -> torch.Size:
        """Shape ``(..., K)`` of the index tensor."""
        return self.indices.shape

    @property
    def counts(self) -> torch.Tensor:
        """Number of real tokens per list, long tensor of shape ``(...)``."""
        return self.valid.sum(-1)

    @property
    def all_valid(self) -> bool:
        """Whether no list carries padding (then ``valid`` can be ignored)."""
        return bool(self.valid.all())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> MaskIndices:
        """Move both tensors to ``device``."""
        return MaskIndices(
            self.indices.to(device, non_blocking=non_blocking),
            self.valid.to(device, non_blocking=non_blocking),
        )

    def pin_memory(self) -> MaskIndices:
        """Pin both tensors (called by ``DataLoader(pin_memory=True)``)."""
        return MaskIndices(self.indices.pin_memory(), self.valid.pin_memory())

    def flatten(self) -> MaskIndices:
        """Merge all leading dimensions: ``(B, M, K) -> (B * M, K)``."""
        k = self.indices.shape[-1]
        return MaskIndices(self.indices.reshape(-1, k), self.valid.reshape(-1, k))

    def to_bool_mask(self, num_tokens: int) -> torch.Tensor:
        """Dense form: bool tensor of shape ``(..., num_tokens)``, ``True`` at real ids."""
        check_int("num_tokens", num_tokens, min_value=1)
        check_index_range("indices", self.indices, num_tokens, what=f"for num_tokens={num_tokens}")
        dense = torch.zeros(
            *self.indices.shape[:-1], num_tokens, dtype=torch.bool, device=self.indices.device
        )
        # Padding slots point at id 0 with value False: scatter_reduce "amax" keeps a True
        # written by a real slot for id 0.
        return dense.scatter_reduce(-1, self.indices, self.valid, reduce="amax")


def mask_to_indices(mask: torch.Tensor, *, pad_to: int | None = None) -> MaskIndices:
    """Turn a dense boolean token mask into padded ascending index lists.

    Args:
        mask: Bool tensor of shape ``(..., N)``; ``True`` marks a selected token.
        pad_to: Length ``K`` of the output lists. Defaults to the largest count in the
            batch; must be at least that count (nothing is ever truncated here).

    Returns:
        ``MaskIndices`` with tensors of shape ``(..., K)``.
    """
    check_tensor("mask", mask, ndim=range(1, 8), kind="bool", allow_empty=True)
    counts = mask.sum(-1)
    max_count = int(counts.max()) if counts.numel() else 0
    if pad_to is None:
        k = max_count
    else:
        k = check_int("pad_to", pad_to, min_value=0)
        if k < max_count:
            raise ValueError(f"pad_to must be >= the largest mask count {max_count}, got {k}")
    n = mask.shape[-1]
    lead = mask.shape[:-1]
    flat = mask.reshape(math.prod(lead), n)
    # The selected token with rank r in its row (r = running count - 1, so ascending
    # ids get ascending slots) is written to slot r; unselected tokens all go to an
    # extra dump column k, dropped afterwards. No sort needed: O(N) per row.
    rank = torch.cumsum(flat, dim=-1).sub_(1)
    slot = torch.where(flat, rank, torch.full_like(rank, k))
    ids = torch.arange(n, device=mask.device).expand_as(slot)
    out = torch.zeros(flat.shape[0], k + 1, dtype=torch.long, device=mask.device)
    out.scatter_(1, slot, ids)
    indices = out[:, :k].reshape(*lead, k)
    valid = torch.arange(k, device=mask.device) < counts.unsqueeze(-1)
    return MaskIndices(indices, valid)


def gather_tokens(x: torch.Tensor, indices: torch.Tensor | MaskIndices) -> torch.Tensor:
    """Select tokens by id, per sample.

    Args:
        x: Tokens of shape ``(B, N, D)``.
        indices: Long tensor or ``MaskIndices`` of shape ``(B, K)`` or ``(B, M, K)`` with
            ids in ``[0, N)`` (checked while value checks are enabled: one host sync).

    Returns:
        Tokens of shape ``(B, K, D)`` or ``(B, M, K, D)``. Padding slots hold the token at
        id 0; mask them with ``valid``.
    """
    check_tensor("x", x, ndim=3)
    idx = indices.indices if isinstance(indices, MaskIndices) else indices
    check_tensor("indices", idx, ndim=(2, 3), kind="int", allow_empty=True)
    if idx.shape[0] != x.shape[0]:
        raise ValueError(
            f"indices batch size {idx.shape[0]} does not match x batch size {x.shape[0]}"
        )
    b, n, d = x.shape
    # A value check (one host sync; skipped under compile or when value checks are off).
    check_index_range("indices", idx, n, what=f"for x with {n} tokens")
    flat = idx.reshape(b, -1)
    out = torch.gather(x, 1, flat.unsqueeze(-1).expand(-1, -1, d))
    return out.reshape(*idx.shape, d)
