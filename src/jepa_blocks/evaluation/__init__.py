"""Evaluation on frozen features: kNN and linear probes, feature extraction, collapse metrics."""

from jepa_blocks.evaluation.features import extract_features, pool_tokens
from jepa_blocks.evaluation.knn import knn_accuracy, knn_classify
from jepa_blocks.evaluation.linear_probe import LinearProbeResult, linear_probe
from jepa_blocks.evaluation.metrics import (
    anisotropy,
    collapse_stats,
    effective_rank,
    feature_std,
    is_collapsed,
    isotropy,
    rank_ratio,
    uniformity,
)

__all__ = [
    "LinearProbeResult",
    "anisotropy",
    "collapse_stats",
    "effective_rank",
    "extract_features",
    "feature_std",
    "is_collapsed",
    "isotropy",
    "knn_accuracy",
    "knn_classify",
    "linear_probe",
    "pool_tokens",
    "rank_ratio",
    "uniformity",
]
