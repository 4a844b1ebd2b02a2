"""Pooling a token set into one or a few vectors per sample: learned-query attention pooling.

The parameter-free alternative, the mean of the real tokens, is
:func:`jepa_blocks.evaluation.pool_tokens`.
"""

from jepa_blocks.pooling.attention import AttentionPool, attention_pool

__all__ = ["AttentionPool", "attention_pool"]
