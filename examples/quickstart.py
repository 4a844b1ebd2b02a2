"""The README's H-JEPA training step, run for a few steps on random images.

    python examples/quickstart.py

It composes the blocks exactly as the README shows (masker, context encoder with token
dropping, two-level predictor, EMA target, latent loss) and prints the loss per step.
For real training on image folders use ``examples/train_hjepa.py``.
"""

from __future__ import annotations

import torch

from jepa_blocks import (
    EMATarget,
    HierarchicalPredictor,
    LatentPredictionLoss,
    MultiBlockMasker,
    ViTEncoder,
    hierarchical_targets,
)


def main(steps: int = 5, batch_size: int = 16) -> list[float]:
    torch.manual_seed(0)
    masker = MultiBlockMasker(grid_size=8, levels=2)  # 32 px images, patch 4
    encoder = ViTEncoder(img_size=32, patch_size=4, embed_dim=192, depth=4, num_heads=3)
    predictor = HierarchicalPredictor(
        grid_size=8, embed_dim=192, predictor_dim=96, depth=2, num_heads=3, num_levels=2
    )
    target = EMATarget(encoder, total_steps=steps)
    criterion = LatentPredictionLoss()
    optimizer = torch.optim.AdamW([*encoder.parameters(), *predictor.parameters()], lr=1e-3)

    losses = []
    for step in range(steps):
        images = torch.randn(batch_size, 3, 32, 32)
        masks = masker(batch_size)
        full = target(images).tokens  # (B, 64, 192): all patches, no grad
        targets = hierarchical_targets(full, grid_size=8, targets=masks.targets)
        context = encoder(images, keep=masks.context).tokens  # (B, Kc, 192)
        preds = predictor(context, context_indices=masks.context, targets=masks.targets)
        loss = criterion(preds, targets, [t.valid for t in masks.targets])  # a Tensor
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        target.update(encoder)
        levels = " ".join(f"{k}={v.item():.4f}" for k, v in criterion.last_terms.items())
        print(f"step {step}: loss {loss.item():.4f} ({levels}), momentum {target.momentum:.4f}")
        losses.append(loss.item())
    return losses


if __name__ == "__main__":
    main()
