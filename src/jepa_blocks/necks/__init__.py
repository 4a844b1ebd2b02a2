"""Necks: turn encoder features into maps for dense heads.

* :mod:`~jepa_blocks.necks.fpn`: top-down feature pyramid (FPN) over multi-level features.
* :mod:`~jepa_blocks.necks.projector`: MLP projector (with global-batch batch norm) between
  pooled embeddings and a view-level loss.
"""

from jepa_blocks.necks.fpn import FPNNeck, tokens_to_map
from jepa_blocks.necks.projector import GlobalBatchNorm1d, MLPProjector, global_batch_norm

__all__ = ["FPNNeck", "GlobalBatchNorm1d", "MLPProjector", "global_batch_norm", "tokens_to_map"]
