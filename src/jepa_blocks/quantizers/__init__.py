"""Quantisers: discrete codes over embeddings.

* :mod:`~jepa_blocks.quantizers.vq`: vector quantiser with an EMA codebook, dead-code
  refresh from recent encoder outputs and distributed-safe statistics.
"""

from jepa_blocks.quantizers.vq import (
    VectorQuantizer,
    VQOutput,
    code_perplexity,
    codebook_from_ema,
    codebook_usage,
    nearest_codes,
    squared_distances,
)

__all__ = [
    "VQOutput",
    "VectorQuantizer",
    "code_perplexity",
    "codebook_from_ema",
    "codebook_usage",
    "nearest_codes",
    "squared_distances",
]
