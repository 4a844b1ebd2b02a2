"""Section 3, ``encoder``: context-encoder forward + backward time against the kept tokens."""

from __future__ import annotations

import torch
from sizes import Results, Sizes
from timing import bf16_autocast, median_ms, num_threads, time_calls

from jepa_blocks import ViTEncoder


def build_encoder(sizes: Sizes, device: torch.device) -> ViTEncoder:
    """The context encoder of the CIFAR preset (``examples/train_hjepa.py``)."""
    return ViTEncoder(
        img_size=sizes.img_size,
        patch_size=sizes.patch_size,
        embed_dim=sizes.embed_dim,
        depth=sizes.depth,
        num_heads=sizes.num_heads,
    ).to(device)


def bench_encoder(sizes: Sizes, device: torch.device, *, threads: int) -> Results:
    """Context-encoder forward + backward time (bf16 autocast) against the kept fraction.

    Keys: ``encoder.keep{P}.ms``, ``encoder.keep{P}.ratio`` (time / time at 100%),
    ``encoder.keep{P}.tokens`` for ``P`` in percent. 100% runs without ``keep`` (no
    gather); the others keep a random, sorted subset of each sample's tokens.
    """
    out: Results = {}
    torch.manual_seed(0)
    enc = build_encoder(sizes, device).train()
    grid = enc.default_grid
    n = grid[0] * grid[1]
    b = sizes.batch
    images = torch.randn(b, 3, sizes.img_size, sizes.img_size, device=device)
    with num_threads(threads):
        for frac in sizes.encoder_keeps:
            k = max(1, round(frac * n))
            keep = None
            if k < n:
                keep = torch.rand(b, n, device=device).argsort(-1)[:, :k].sort(-1).values

            def call(keep: torch.Tensor | None = keep) -> None:
                enc.zero_grad(set_to_none=True)
                with bf16_autocast(device):
                    tokens = enc(images, keep=keep).tokens
                tokens.float().square().mean().backward()

            times = time_calls(
                call, warmup=sizes.encoder_warmup, reps=sizes.encoder_reps, device=device
            )
            pct = round(100 * frac)
            out[f"encoder.keep{pct}.ms"] = median_ms(times)
            out[f"encoder.keep{pct}.tokens"] = k
    full = out.get("encoder.keep100.ms")
    if full:
        for frac in sizes.encoder_keeps:
            pct = round(100 * frac)
            out[f"encoder.keep{pct}.ratio"] = out[f"encoder.keep{pct}.ms"] / full
    return out
