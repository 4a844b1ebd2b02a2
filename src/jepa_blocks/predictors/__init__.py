"""Predictors: map context-encoder tokens to predictions of target features."""

from jepa_blocks.predictors.hierarchical import HierarchicalPredictor

__all__ = ["HierarchicalPredictor"]
