"""Stored reference figures of the official implementations, and the targets we set.

Measured with the official code (LeJEPA eddffdd, lightly e8d317f, VICReg 4e12602, I-JEPA
52c1ae9) on a machine like the target one: 2 CPU cores, torch 2.14.1, November 2026.
Losses: N = 256, forward + backward, milliseconds.
"""

from __future__ import annotations

REF_DIMS = (192, 384, 768, 1024, 2048)
REF_SIGREG_MS = {
    1024: dict(zip(REF_DIMS, (34.9, 44.1, 50.4, 56.9, 62.4), strict=True)),
    256: dict(zip(REF_DIMS, (6.5, 8.1, 8.3, 9.1, 11.4), strict=True)),
}
REF_SIGREG_LIGHTLY_MS = {1024: dict(zip(REF_DIMS, (35.3, 37.1, 41.5, 48.4, 60.2), strict=True))}
REF_VICREG_MS = dict(zip(REF_DIMS, (2.0, 4.4, 13.9, 24.4, 121.6), strict=True))
REF_VICREG_LIGHTLY_MS = dict(zip(REF_DIMS, (3.2, 7.3, 23.3, 41.0, 260.7), strict=True))
REF_IJEPA_MASKS_PER_S = 5300.0  # official I-JEPA collator, batch 256, 14x14 grid

TARGETS = {
    "masker.grid14.images_per_s": ">= 100000",
    "losses.sigreg.k1024.d2048.ms": "<= 50",
    "losses.sigreg.ratio": "<= 0.8 (worst D, K vs stored LeJEPA)",
    "losses.vicreg.ratio": "<= 1.0 (worst D vs stored official)",
    "encoder.keep25.ratio": "<= 0.35",
}
