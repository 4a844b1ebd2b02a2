"""DataLoader collate function that samples multi-block masks beside each batch.

Randomness. Every call draws from its own ``torch.Generator`` (``_seeding.SeedStream``),
seeded by mixing (SplitMix64) three parts:

* the stream: in a DataLoader worker, ``torch.utils.data.get_worker_info().seed``
  (``base_seed + worker_id``; the DataLoader draws a new ``base_seed`` every epoch from
  its ``generator`` or the global RNG); in the main process (``num_workers=0``), ``seed``,
  or ``torch.initial_seed()`` read when the collator is built;
* ``seed`` (``0`` when ``None``), so two collators with different seeds differ;
* a call counter of that stream (reset when the worker seed changes).

So masks differ across workers and epochs, never touch the global RNG, and are
reproducible: same DataLoader seed (or same ``seed`` with ``num_workers=0``), same masks.
``MultiCropCollator`` draws its generators the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import default_collate

from jepa_blocks._checks import check_int
from jepa_blocks._seeding import SeedStream
from jepa_blocks.masking.multiblock import MultiBlockMasker, MultiBlockMasks

__all__ = ["MaskCollator"]


class _SeededCollate:
    """What the mask collators share: ``collate_fn``, ``seed`` and the seed stream."""

    masker: Any

    def __init__(self, *, collate_fn: Callable[[list[Any]], Any], seed: int | None) -> None:
        if not callable(collate_fn):
            raise TypeError(f"collate_fn must be callable, got {type(collate_fn).__name__}")
        if seed is not None:
            seed = check_int("seed", seed)
        self.collate_fn = collate_fn
        self.seed = seed
        self._stream = SeedStream(seed)

    def _collate(self, samples: Sequence[Any]) -> Any:
        """``collate_fn(samples)``, after checking that ``samples`` is a non-empty list."""
        if not hasattr(samples, "__len__") or isinstance(samples, (str, bytes)):
            raise TypeError(f"samples must be a list of samples, got {type(samples).__name__}")
        if len(samples) == 0:
            raise ValueError("samples must hold at least one sample, got an empty batch")
        return self.collate_fn(samples)

    def _next_generator(self) -> torch.Generator:
        return self._stream.next_generator()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.masker!r}, collate_fn={self.collate_fn!r}, "
            f"seed={self.seed})"
        )


class MaskCollator(_SeededCollate):
    """``collate_fn`` returning ``(collated_batch, masks)`` for a DataLoader.

    Args:
        masker: The ``MultiBlockMasker`` that samples one mask set per batch.
        collate_fn: Collates the list of samples (``default_collate`` by default).
        seed: Extra seed mixed into every generator; with ``num_workers=0`` it (or
            ``torch.initial_seed()`` when ``None``) sets the whole stream.

    Returns (per call):
        ``(collate_fn(samples), masks)`` with ``masks`` a ``MultiBlockMasks`` for
        ``B = len(samples)``: context ``(B, Kc)``, targets ``(B, M_l, K_l)`` per level.

    Example:
        >>> collator = MaskCollator(MultiBlockMasker(grid_size=4, min_context_tokens=1), seed=0)
        >>> x, masks = collator([torch.zeros(3), torch.ones(3)])
        >>> x.shape, masks.context.shape[0]
        (torch.Size([2, 3]), 2)
    """

    def __init__(
        self,
        masker: MultiBlockMasker,
        *,
        collate_fn: Callable[[list[Any]], Any] = default_collate,
        seed: int | None = None,
    ) -> None:
        if not isinstance(masker, MultiBlockMasker):
            raise TypeError(f"masker must be a MultiBlockMasker, got {type(masker).__name__}")
        super().__init__(collate_fn=collate_fn, seed=seed)
        self.masker = masker

    def __call__(self, samples: Sequence[Any]) -> tuple[Any, MultiBlockMasks]:
        """Collate ``samples`` and sample masks for ``len(samples)`` of them."""
        batch = self._collate(samples)
        return batch, self.masker(len(samples), generator=self._next_generator())
