"""SplitMix64 seed mixing, and the per-call generator stream of the DataLoader collators.

The mask collators, the resumable sampler and the vector quantizer's codebook draws all
mix their seeds here.
"""

from __future__ import annotations

import torch
from torch.utils.data import get_worker_info

__all__ = ["SeedStream", "mix", "splitmix64"]

MASK64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    """One SplitMix64 step: a bijective, well-mixed map of 64-bit ints."""
    z = (x + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def mix(*parts: int) -> int:
    """A 64-bit seed from integers: a SplitMix64 chain over ``parts`` (order matters)."""
    h = 0
    for p in parts:
        h = splitmix64(h ^ (int(p) & MASK64))
    return h


class SeedStream:
    """A fresh ``torch.Generator`` per call, seeded by ``mix(stream, seed or 0, count)``.

    * ``stream``: in a DataLoader worker, ``get_worker_info().seed`` (``base_seed +
      worker_id``; the DataLoader draws a new ``base_seed`` every epoch); in the main
      process, ``seed``, or ``torch.initial_seed()`` read when the stream is built;
    * ``count``: the calls made so far on that stream (reset when the worker seed changes).

    So generators differ across workers, epochs and calls, never touch the global RNG,
    and repeat with the same DataLoader seed (or the same ``seed`` in the main process).
    The stream's position is plain attributes: it pickles with its owner.

    Args:
        seed: An int already checked by the caller, or ``None``.
    """

    def __init__(self, seed: int | None) -> None:
        self._extra = seed if seed is not None else 0
        self._main_seed = seed if seed is not None else torch.initial_seed()
        self._main_calls = 0
        self._worker_seed: int | None = None
        self._worker_calls = 0

    def next_generator(self) -> torch.Generator:
        """The CPU generator of the next call on this process's stream."""
        info = get_worker_info()
        if info is None:
            stream, count = self._main_seed, self._main_calls
            self._main_calls += 1
        else:
            if info.seed != self._worker_seed:  # new worker or new epoch
                self._worker_seed, self._worker_calls = info.seed, 0
            stream, count = info.seed, self._worker_calls
            self._worker_calls += 1
        return torch.Generator().manual_seed(mix(stream, self._extra, count))
