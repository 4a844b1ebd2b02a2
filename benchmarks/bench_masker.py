"""Section 1, ``masker``: masks per second of ``MultiBlockMasker``, alone and in a DataLoader."""

from __future__ import annotations

import time

import torch
from references import REF_IJEPA_MASKS_PER_S
from sizes import Results, Sizes
from timing import median_ms, num_threads, time_calls
from torch.utils.data import DataLoader, TensorDataset

from jepa_blocks import MaskCollator, MultiBlockMasker


def bench_masker(sizes: Sizes, device: torch.device, *, threads: int) -> Results:
    """Masks per second of ``MultiBlockMasker`` (I-JEPA defaults), one thread.

    Keys: ``masker.grid{G}.images_per_s``, ``masker.grid{G}.ms_per_batch``,
    ``masker.grid14.speedup_vs_ijepa``, ``masker.grid8_levels3.images_per_s`` (the 3-level
    H-JEPA masker of the CIFAR preset) and, on CPU, ``masker.collate.images_per_s`` (a
    DataLoader with ``collate_workers`` workers and ``MaskCollator`` over small tensors).
    """
    out: Results = {}
    b = sizes.masker_batch
    configs = [(f"grid{g}", MultiBlockMasker(grid_size=g)) for g in sizes.masker_grids]
    configs.append(("grid8_levels3", MultiBlockMasker(grid_size=8, levels=3)))
    with num_threads(1):
        for name, masker in configs:
            gen = torch.Generator(device=device).manual_seed(0)
            times = time_calls(
                lambda m=masker, g=gen: m(b, generator=g),
                warmup=sizes.masker_warmup,
                reps=sizes.masker_reps,
                device=device,
            )
            ms = median_ms(times)
            out[f"masker.{name}.ms_per_batch"] = ms
            out[f"masker.{name}.images_per_s"] = b / (ms / 1e3)
    if "masker.grid14.images_per_s" in out:
        out["masker.grid14.speedup_vs_ijepa"] = (
            out["masker.grid14.images_per_s"] / REF_IJEPA_MASKS_PER_S
        )
    if device.type == "cpu":
        out.update(_bench_collate(sizes))
    return out


def _bench_collate(sizes: Sizes) -> Results:
    grid = max(sizes.masker_grids)
    b = sizes.masker_batch
    n_batches = sizes.collate_batches + 1  # the first batch (worker start-up) is not timed
    data = TensorDataset(torch.randn(b * n_batches, 16))
    loader = DataLoader(
        data,
        batch_size=b,
        num_workers=sizes.collate_workers,
        collate_fn=MaskCollator(MultiBlockMasker(grid_size=grid), seed=0),
        prefetch_factor=4 if sizes.collate_workers > 0 else None,
    )
    it = iter(loader)
    next(it)
    start = time.perf_counter()
    seen = sum(batch[0][0].shape[0] for batch in it)
    elapsed = time.perf_counter() - start
    return {
        "masker.collate.images_per_s": seen / elapsed,
        "masker.collate.workers": sizes.collate_workers,
        "masker.collate.grid": grid,
    }
