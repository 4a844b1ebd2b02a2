"""A data order that is exact on resume and independent of the number of processes.

Two pieces make a DataLoader reproducible batch by batch:

* :class:`ResumableSampler` shuffles the dataset once per epoch with a generator seeded
  by ``(seed, epoch)``, cuts the permutation into *global* batches (the last incomplete
  one is dropped) and hands rank ``r`` of ``W`` the contiguous ``r``-th share of each
  global batch. Run on one process with the global batch size it yields exactly the
  concatenation of what ``W`` ranks yield. ``start_batch`` skips the batches an
  interrupted run already consumed, without loading them.
* :class:`SeededDataset` receives ``(index, seed)`` keys from that sampler and runs the
  wrapped dataset's ``__getitem__`` (its random augmentations) under
  ``torch.manual_seed(seed)`` inside ``torch.random.fork_rng``: each sample's crop and
  flip depend only on ``(seed, epoch, index)``, never on which worker or rank loads it,
  and the caller's RNG stream is left untouched.

Together: same seed, same global batch size, same samples and augmentations at every
step, whether the run is on 1 or ``W`` processes, with 0 or many workers, uninterrupted or
resumed from any step. The sampler's position is plain integers (``epoch``,
``start_batch``), so a checkpoint stores it as such.

Only ``torch`` RNG calls are covered: transforms drawing from Python's ``random`` (a few
legacy torchvision ones) are seeded too, from the same per-sample seed, while NumPy's
global RNG is not touched.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sized
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

from jepa_blocks._checks import check_bool, check_int
from jepa_blocks._seeding import mix

__all__ = ["ResumableSampler", "SeededDataset", "sample_seed"]


def sample_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (SplitMix64 chain), e.g. ``(seed, epoch, index)``.

    Example:
        >>> sample_seed(0, 1, 2) == sample_seed(0, 1, 2) != sample_seed(0, 2, 1)
        True
    """
    if not parts:
        raise TypeError("parts must hold at least one int, got none")
    for i, p in enumerate(parts):
        check_int(f"parts[{i}]", p)
    return mix(*parts) >> 1  # torch.manual_seed accepts up to 2**63 - 1 without wrapping surprises


class ResumableSampler(Sampler[tuple[int, int]]):
    """Seeded, rank-sharded, resumable sampler yielding ``(index, sample_seed)`` keys.

    Args:
        data_source: The dataset (only its length is used) or its length.
        global_batch_size: Samples per global batch (all ranks together); must be a
            multiple of ``world_size``.
        rank: This process's rank, ``0 <= rank < world_size``.
        world_size: Number of processes sharing each global batch.
        seed: Seed of the per-epoch permutation and of the per-sample seeds.
        shuffle: Permute the dataset each epoch (else the natural order).

    Iterating yields ``(index, sample_seed)`` keys for the
    ``global_batch_size // world_size`` samples of this rank in each remaining global batch
    of the epoch. Wrap the dataset in :class:`SeededDataset` to consume these keys, and give
    the DataLoader ``batch_size=global_batch_size // world_size`` and ``drop_last=True``.

    Example:
        >>> sampler = ResumableSampler(10, global_batch_size=4, seed=0)
        >>> sampler.set_epoch(1, start_batch=1)
        >>> len(sampler), len(list(sampler))
        (4, 4)
    """

    def __init__(
        self,
        data_source: Sized | int,
        *,
        global_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        if isinstance(data_source, int) and not isinstance(data_source, bool):
            n = data_source
        elif isinstance(data_source, Sized) and not isinstance(data_source, (str, bytes)):
            n = len(data_source)
        else:
            raise TypeError(f"data_source must be a sized dataset or an int, got {type(data_source).__name__}")
        self.num_samples = check_int("len(data_source)", n, min_value=1)
        self.world_size = check_int("world_size", world_size, min_value=1)
        self.rank = check_int("rank", rank, min_value=0, max_value=self.world_size - 1)
        self.global_batch_size = check_int("global_batch_size", global_batch_size, min_value=1)
        if self.global_batch_size % self.world_size:
            raise ValueError(
                f"global_batch_size must be a multiple of world_size={self.world_size}, "
                f"got {self.global_batch_size}"
            )
        if self.global_batch_size > self.num_samples:
            raise ValueError(
                f"global_batch_size must be <= the dataset size {self.num_samples}, got {self.global_batch_size}"
            )
        self.seed = check_int("seed", seed)
        self.shuffle = check_bool("shuffle", shuffle)
        self.epoch = 0
        self.start_batch = 0

    @property
    def batches_per_epoch(self) -> int:
        """Number of complete global batches in one epoch."""
        return self.num_samples // self.global_batch_size

    @property
    def local_batch_size(self) -> int:
        """Samples this rank gets per global batch."""
        return self.global_batch_size // self.world_size

    def set_epoch(self, epoch: int, *, start_batch: int = 0) -> None:
        """Select the epoch's permutation and skip its first ``start_batch`` global batches."""
        self.epoch = check_int("epoch", epoch, min_value=0)
        self.start_batch = check_int("start_batch", start_batch, min_value=0, max_value=self.batches_per_epoch)

    def global_batch(self, batch: int) -> list[int]:
        """Dataset indices of global batch ``batch`` of the current epoch (all ranks)."""
        batch = check_int("batch", batch, min_value=0, max_value=self.batches_per_epoch - 1)
        order = self._order()
        return order[batch * self.global_batch_size : (batch + 1) * self.global_batch_size]

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_samples))
        g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch))
        return torch.randperm(self.num_samples, generator=g).tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = self._order()
        lb, gb = self.local_batch_size, self.global_batch_size
        for b in range(self.start_batch, self.batches_per_epoch):
            share = order[b * gb + self.rank * lb : b * gb + (self.rank + 1) * lb]
            for index in share:
                yield index, sample_seed(self.seed, self.epoch, index)

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.local_batch_size

    def __repr__(self) -> str:
        return (
            f"ResumableSampler(num_samples={self.num_samples}, global_batch_size={self.global_batch_size}, "
            f"rank={self.rank}, world_size={self.world_size}, seed={self.seed}, epoch={self.epoch}, "
            f"start_batch={self.start_batch})"
        )


class SeededDataset(Dataset):
    """Runs ``dataset[index]`` under a per-sample seed taken from ``(index, seed)`` keys.

    Args:
        dataset: Any map-style dataset whose ``__getitem__`` may draw from torch's global RNG
            (e.g. torchvision transforms).

    A plain ``int`` key is passed through unseeded, so the wrapper also works with ordinary
    samplers. The caller's RNG state (torch CPU and Python ``random``) is restored after
    every item, so ``num_workers=0`` does not perturb the training process's stream.

    Example:
        >>> ds = SeededDataset([torch.zeros(1)] * 3)
        >>> torch.equal(ds[(1, 123)], ds[1])
        True
    """

    def __init__(self, dataset: Any) -> None:
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError(f"dataset must be a map-style dataset, got {type(dataset).__name__}")
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | tuple[int, int]) -> Any:
        if isinstance(key, tuple):
            if len(key) != 2:
                raise ValueError(f"key must be an int or an (index, seed) pair, got {key!r}")
            index, seed = key
            # torch.manual_seed's range (sample_seed gives [0, 2**63)).
            seed = check_int("key[1] (the seed)", seed, min_value=-(2**63), max_value=2**64 - 1)
            py_state = random.getstate()
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                random.seed(seed)
                try:
                    return self.dataset[index]
                finally:
                    random.setstate(py_state)
        return self.dataset[key]

    def __getattr__(self, name: str) -> Any:  # e.g. .targets and .classes of the wrapped set
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)
