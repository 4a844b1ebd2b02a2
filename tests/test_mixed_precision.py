"""A bf16-autocast H-JEPA training step against the same step in float32 (CPU autocast).

One step of the README composition (EMA target on the full image, context encoder on the
context patches, two-level predictor, latent loss) is run twice on the same weights,
images and masks: once in float32, once under ``torch.autocast("cpu", bfloat16)``.

Tolerances. bf16 keeps 8 significant bits (unit roundoff 2^-9, about 0.2%). Autocast
rounds the output of every matmul and attention to bf16, and a forward + backward pass of
this model chains a few tens of such roundings. Measured over three seeds: loss relative
error <= 1.5e-4 (the loss averages many token errors, so roundings cancel), gradient
cosine similarity >= 0.998 and gradient norm ratio within 4.4% of 1 for every tensor (the
worst are LayerNorm weights and biases, whose gradients are sums over tokens with
cancellation). The bounds leave a wide margin over that noise while still failing on
anything systematic (a dropped or misplaced cast, a wrong mask or scale under autocast,
gradients pointing elsewhere):

* loss: relative error <= 5e-3;
* gradients, for every parameter tensor of the encoder and the predictor: cosine
  similarity >= 0.99 (direction is what the optimizer step uses) and norm ratio within
  10% of 1 (catches a mis-scaled gradient).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from jepa_blocks import (
    EMATarget,
    HierarchicalPredictor,
    LatentPredictionLoss,
    MultiBlockMasker,
    ViTEncoder,
    hierarchical_targets,
)

LOSS_RTOL = 5e-3
GRAD_COSINE = 0.99
GRAD_NORM_RTOL = 0.1


def _step(encoder, predictor, target, images, masks, *, amp: bool):
    """Loss, per-level prediction dtype and parameter gradients of one training step."""
    criterion = LatentPredictionLoss()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        full = target(images).tokens
        targets = hierarchical_targets(full.float(), grid_size=4, targets=masks.targets)
        context = encoder(images, keep=masks.context).tokens
        preds = predictor(context, context_indices=masks.context, targets=masks.targets)
    loss = criterion([p.float() for p in preds], targets, [t.valid for t in masks.targets])
    loss.backward()
    grads = {
        f"{prefix}.{name}": p.grad
        for prefix, module in (("encoder", encoder), ("predictor", predictor))
        for name, p in module.named_parameters()
    }
    return loss.detach(), preds[0].dtype, grads


def test_bf16_autocast_step_matches_float32_step():
    torch.manual_seed(0)
    encoder = ViTEncoder(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)
    predictor = HierarchicalPredictor(
        grid_size=4, embed_dim=32, predictor_dim=32, depth=2, num_heads=2, num_levels=2
    )
    target = EMATarget(encoder, total_steps=10)
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(8, 3, 16, 16, generator=gen)
    masks = MultiBlockMasker(grid_size=4, levels=2, min_context_tokens=4)(8, generator=gen)

    results = {
        amp: _step(copy.deepcopy(encoder), copy.deepcopy(predictor), target, images, masks, amp=amp)
        for amp in (False, True)
    }
    loss32, dtype32, grads32 = results[False]
    loss16, dtype16, grads16 = results[True]
    assert (dtype32, dtype16) == (torch.float32, torch.bfloat16)  # autocast really ran in bf16
    assert loss16.dtype == torch.float32
    assert abs(float(loss16 / loss32) - 1) <= LOSS_RTOL, (float(loss16), float(loss32))
    assert grads32.keys() == grads16.keys()
    for name, g32 in grads32.items():
        g16 = grads16[name]
        assert g32 is not None and g16 is not None and g16.dtype == torch.float32, name
        cosine = float(F.cosine_similarity(g16.flatten(), g32.flatten(), dim=0))
        assert cosine >= GRAD_COSINE, (name, cosine)
        assert abs(float(g16.norm() / g32.norm()) - 1) <= GRAD_NORM_RTOL, name
