"""Evaluation: kNN, linear probes, few-shot episodes and fine-tuning, collapse metrics, attention maps."""

from jepa_blocks.evaluation.attention_maps import (
    attention_maps,
    attention_probs,
    query_attention,
    received_attention,
)
from jepa_blocks.evaluation.diagnostics import codebook_usage, embedding_diagnostics
from jepa_blocks.evaluation.features import extract_features, pool_tokens
from jepa_blocks.evaluation.fewshot import Episodes, few_shot_accuracy, sample_episodes
from jepa_blocks.evaluation.finetune import FinetuneResult, finetune, finetune_param_groups
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
    "Episodes",
    "FinetuneResult",
    "LinearProbeResult",
    "anisotropy",
    "attention_maps",
    "attention_probs",
    "codebook_usage",
    "collapse_stats",
    "effective_rank",
    "embedding_diagnostics",
    "extract_features",
    "feature_std",
    "few_shot_accuracy",
    "finetune",
    "finetune_param_groups",
    "is_collapsed",
    "isotropy",
    "knn_accuracy",
    "knn_classify",
    "linear_probe",
    "pool_tokens",
    "query_attention",
    "rank_ratio",
    "received_attention",
    "sample_episodes",
    "uniformity",
]
