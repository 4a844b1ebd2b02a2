"""ResumableSampler and SeededDataset: exact resume and rank independence of the data order."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from jepa_blocks.training import ResumableSampler, SeededDataset, sample_seed


class _Noisy:
    """A dataset whose items draw from torch's and Python's global RNGs (like augmentations)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor([float(i), torch.rand(()).item(), random.random()])


@settings(max_examples=40, deadline=None)
@given(n=st.integers(4, 60), world=st.sampled_from([1, 2, 3, 4]), per_rank=st.integers(1, 5),
       seed=st.integers(0, 2**31), epoch=st.integers(0, 5))
def test_ranks_partition_each_global_batch_of_a_single_process(n, world, per_rank, seed, epoch):
    gb = world * per_rank
    if gb > n:
        return
    single = ResumableSampler(n, global_batch_size=gb, seed=seed)
    single.set_epoch(epoch)
    ranks = [ResumableSampler(n, global_batch_size=gb, rank=r, world_size=world, seed=seed) for r in range(world)]
    for s in ranks:
        s.set_epoch(epoch)
    streams = [list(s) for s in ranks]
    ref = list(single)
    assert len(ref) == (n // gb) * gb == len(single)
    for b in range(n // gb):  # global batch b = concatenation of the ranks' shares, in rank order
        joined = [key for r in range(world) for key in streams[r][b * per_rank : (b + 1) * per_rank]]
        assert joined == ref[b * gb : (b + 1) * gb]
        assert [k[0] for k in joined] == single.global_batch(b)
    indices = [k[0] for k in ref]
    assert len(set(indices)) == len(indices)  # no repeats within an epoch
    assert all(k[1] == sample_seed(seed, epoch, k[0]) for k in ref)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(6, 50), gb=st.integers(1, 6), start=st.integers(0, 8), seed=st.integers(0, 1000))
def test_start_batch_skips_exactly_the_consumed_batches(n, gb, start, seed):
    s = ResumableSampler(n, global_batch_size=gb, seed=seed)
    start = min(start, s.batches_per_epoch)
    s.set_epoch(2)
    full = list(s)
    s.set_epoch(2, start_batch=start)
    assert list(s) == full[start * gb :] and len(s) == len(full) - start * gb


def test_epochs_reshuffle_and_seed_matters():
    a = ResumableSampler(50, global_batch_size=5, seed=0)
    orders = []
    for e in range(3):
        a.set_epoch(e)
        orders.append([k[0] for k in a])
    assert orders[0] != orders[1] != orders[2]
    b = ResumableSampler(50, global_batch_size=5, seed=1)
    b.set_epoch(0)
    assert [k[0] for k in b] != orders[0]
    c = ResumableSampler(50, global_batch_size=5, shuffle=False)
    assert [k[0] for k in c] == list(range(50))


def test_seeded_items_do_not_depend_on_workers_or_position_and_keep_caller_rng():
    ds = SeededDataset(_Noisy(12))
    sampler = ResumableSampler(ds, global_batch_size=4, seed=3)
    sampler.set_epoch(1)
    keys = list(sampler)
    torch.manual_seed(0)
    random.seed(0)
    before = (torch.rand(()), random.random())
    torch.manual_seed(0)
    random.seed(0)
    items = [ds[k] for k in keys]
    after = (torch.rand(()), random.random())
    assert (before[0].item(), before[1]) == (after[0].item(), after[1])  # caller streams untouched
    reversed_items = [ds[k] for k in reversed(keys)][::-1]  # order of loading is irrelevant
    assert all(torch.equal(x, y) for x, y in zip(items, reversed_items, strict=True))
    loader = DataLoader(ds, batch_size=4, sampler=sampler, num_workers=2)
    batches = torch.cat(list(loader))
    assert torch.equal(batches, torch.stack(items))  # worker processes draw the same values
    assert ds[keys[0]][1] != ds[(keys[0][0], keys[0][1] + 1)][1]  # the seed drives the draw


def test_seeded_dataset_passes_plain_indices_and_attributes():
    base = _Noisy(3)
    base.targets = [0, 1, 0]
    ds = SeededDataset(base)
    assert len(ds) == 3 and ds.targets == [0, 1, 0] and ds[2][0].item() == 2.0


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="global_batch_size"):
        ResumableSampler(10, global_batch_size=3, world_size=2)
    with pytest.raises(ValueError, match="global_batch_size"):
        ResumableSampler(4, global_batch_size=8)
    with pytest.raises(ValueError, match="rank"):
        ResumableSampler(10, global_batch_size=2, rank=2, world_size=2)
    with pytest.raises(TypeError, match="data_source"):
        ResumableSampler("abc", global_batch_size=2)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="seed"):
        ResumableSampler(10, global_batch_size=2, seed=1.5)  # type: ignore[arg-type]
    s = ResumableSampler(10, global_batch_size=2)
    with pytest.raises(ValueError, match="start_batch"):
        s.set_epoch(0, start_batch=6)
    with pytest.raises(ValueError, match="epoch"):
        s.set_epoch(-1)
    with pytest.raises(ValueError, match="key"):
        SeededDataset(_Noisy(3))[(1, 2, 3)]
    with pytest.raises(TypeError, match="dataset"):
        SeededDataset(5)  # type: ignore[arg-type]
