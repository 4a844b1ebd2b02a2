"""Tests for jepa_blocks.masking.collate (MaskCollator)."""

from __future__ import annotations

import doctest
import pickle

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

import jepa_blocks.masking.collate as collate_module
from jepa_blocks.masking import MaskCollator, MultiBlockMasker, MultiBlockMasks


class _Images(Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.full((3,), float(i))


def _key(masks: MultiBlockMasks) -> tuple:
    """Everything random in a mask set, as plain lists."""
    return (
        masks.context_box.tolist(),
        masks.context.indices.tolist(),
        tuple(b.tolist() for b in masks.target_boxes),
    )


def _epoch(loader: DataLoader) -> list[tuple]:
    out = []
    for x, masks in loader:
        assert isinstance(masks, MultiBlockMasks) and masks.context.shape[0] == x.shape[0]
        out.append((x[:, 0].tolist(), _key(masks)))
    return out


def test_main_process_reproducible_and_advancing():
    masker = MultiBlockMasker(grid_size=8, levels=2)
    samples = [torch.zeros(2), torch.ones(2)]
    a, b = MaskCollator(masker, seed=3), MaskCollator(masker, seed=3)
    seq_a = [_key(a(samples)[1]) for _ in range(3)]
    seq_b = [_key(b(samples)[1]) for _ in range(3)]
    assert seq_a == seq_b
    assert seq_a[0] != seq_a[1] != seq_a[2]  # advanced per call
    assert _key(MaskCollator(masker, seed=4)(samples)[1]) != seq_a[0]
    batch, masks = a(samples)
    assert torch.equal(batch, torch.stack(samples))
    assert masks.targets[1].shape[:2] == (2, 2)


def test_main_process_seed_none_uses_initial_seed_and_keeps_global_rng():
    masker = MultiBlockMasker(grid_size=8)
    torch.manual_seed(123)
    first = _key(MaskCollator(masker)([0, 1])[1])
    torch.manual_seed(123)
    collator = MaskCollator(masker)
    state = torch.get_rng_state()
    assert _key(collator([0, 1])[1]) == first
    assert torch.equal(torch.get_rng_state(), state), "the global RNG must not be consumed"


def test_picklable_and_resumes_stream():
    collator = MaskCollator(MultiBlockMasker(grid_size=8), seed=0)
    collator([0, 1])
    clone = pickle.loads(pickle.dumps(collator))
    assert _key(clone([0, 1])[1]) == _key(collator([0, 1])[1])


def test_custom_collate_fn():
    collator = MaskCollator(MultiBlockMasker(grid_size=8), collate_fn=list, seed=0)
    batch, masks = collator(["a", "b", "c"])
    assert batch == ["a", "b", "c"] and masks.context.shape[0] == 3


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"masker": "masker"}, "masker"),
        ({"collate_fn": 3}, "collate_fn"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_bad_arguments(kwargs, match):
    kwargs = {"masker": MultiBlockMasker(grid_size=8), **kwargs}
    masker = kwargs.pop("masker")
    with pytest.raises(TypeError, match=match):
        MaskCollator(masker, **kwargs)


def test_dataloader_workers_differ_across_workers_and_epochs_and_reproduce():
    collator = MaskCollator(MultiBlockMasker(grid_size=8, levels=2))

    def loader() -> DataLoader:
        return DataLoader(
            _Images(),
            batch_size=2,
            num_workers=2,
            collate_fn=collator,
            generator=torch.Generator().manual_seed(0),
        )

    first = loader()
    epoch1, epoch2 = _epoch(first), _epoch(first)
    again = _epoch(loader())
    # Batches 0 and 2 come from worker 0, batches 1 and 3 from worker 1.
    assert [x for x, _ in epoch1] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    masks1 = [m for _, m in epoch1]
    assert len({str(m) for m in masks1}) == 4, "each worker and call must draw new masks"
    assert masks1[0] != masks1[1], "workers must not repeat each other"
    assert masks1 != [m for _, m in epoch2], "epochs must differ"
    assert epoch1 == again, "same DataLoader seed, same masks"


def test_docstring_examples():
    result = doctest.testmod(
        collate_module, extraglobs={"torch": torch, "MultiBlockMasker": MultiBlockMasker}
    )
    assert result.attempted > 0 and result.failed == 0
