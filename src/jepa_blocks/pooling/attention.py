"""Attention pooling: learned queries cross-attend over a padded set of tokens.

The pooler of V-JEPA's attentive probe (Bardes et al. 2024), CAE's and AIM's attentive
heads: ``Q`` learned query vectors attend, with multi-head cross-attention, over the
layer-normalised tokens of each sample; an output projection maps the result to
``out_dim``. Unlike a mean (:func:`jepa_blocks.evaluation.pool_tokens`), the pooled
vector can weight tokens by content, at the cost of ``4 D^2 + D out_dim`` parameters.

Padded tokens (``valid == False``, as in ``MaskIndices.valid``) are zeroed before any
arithmetic and hidden from the attention, so their values (NaN included) never reach
the output or the gradients. NaN/Inf in *real* tokens (and in queries) raise
``ValueError`` while value checks are enabled (one host sync); with value checks off they
pass through to the output of their sample. Tensors on another device than the module's
parameters (or than ``keys``) raise ``ValueError``. The result is invariant to the order
of the tokens. The
attention itself is the library's one implementation,
:func:`jepa_blocks.layers.attention.dot_product_attention` (fused SDPA, or the explicit
form for bf16/fp16 on CPU).
"""

from __future__ import annotations

import torch
from torch import nn

from jepa_blocks._checks import (
    check_bool,
    check_finite,
    check_float,
    check_int,
    check_same_device,
    check_tensor,
    has_data,
    match_dtype,
    value_checks_enabled,
)
from jepa_blocks.layers.attention import attention_mask_from_valid, dot_product_attention
from jepa_blocks.layers.init import init_transformer_weights

__all__ = ["AttentionPool", "attention_pool"]


def _check_valid(valid: torch.Tensor | None, batch: int, n: int, *, allow_empty: bool) -> None:
    if valid is None:
        return
    check_tensor("valid", valid, ndim=2, kind="bool")
    if tuple(valid.shape) != (batch, n):
        raise ValueError(
            f"valid must have shape ({batch}, {n}) to match the tokens (B, N), got {tuple(valid.shape)}"
        )
    if not allow_empty and value_checks_enabled() and has_data(valid):
        empty = ~valid.any(dim=1)
        if bool(empty.any()):
            raise ValueError(
                f"valid must mark at least one real token per sample, samples "
                f"{empty.nonzero().flatten().tolist()} have none (pass allow_empty=True to pool "
                "them to zeros)"
            )


def _attention_pool(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    valid: torch.Tensor | None,
    num_heads: int,
) -> torch.Tensor:
    """Unchecked core of :func:`attention_pool`; same arguments and result."""
    b = keys.shape[0]
    if valid is not None:
        # Zero padded keys/values so that NaN/Inf there cannot leak through 0 * NaN. The
        # mask (B, 1, 1, N) lets a sample without any real token attend uniformly to its
        # (zero) values: its output is then exactly 0, with no NaN from an empty softmax.
        pad = ~valid.unsqueeze(-1)
        keys, values = keys.masked_fill(pad, 0), values.masked_fill(pad, 0)
    attn_mask = attention_mask_from_valid(valid)  # None when nothing is padded
    if queries.ndim == 2:
        queries = queries.unsqueeze(0).expand(b, -1, -1)
    # Head split: channel c of a width-C vector belongs to head c // (C / heads).
    q = queries.unflatten(-1, (num_heads, -1)).transpose(1, 2)  # (B, h, Q, D/h)
    k = keys.unflatten(-1, (num_heads, -1)).transpose(1, 2)  # (B, h, N, D/h)
    v = values.unflatten(-1, (num_heads, -1)).transpose(1, 2)  # (B, h, N, Dv/h)
    out = dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, h, Q, Dv/h)
    return out.transpose(1, 2).flatten(2)  # (B, Q, Dv)


def attention_pool(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    valid: torch.Tensor | None = None,
    *,
    num_heads: int = 1,
    allow_empty: bool = False,
) -> torch.Tensor:
    """Multi-head cross-attention of ``Q`` queries over a padded set of ``N`` items.

    For each head ``h`` (a contiguous slice of ``D / num_heads`` channels) and sample
    ``b``: ``out[b, :, h] = softmax(q_h k_h^T / sqrt(D / num_heads)) v_h`` with padded
    items left out of the softmax. No projections: :class:`AttentionPool` adds them.

    Args:
        queries: Queries of shape ``(Q, D)`` (shared by the batch) or ``(B, Q, D)``.
        keys: Keys of shape ``(B, N, D)``.
        values: Values of shape ``(B, N, Dv)``.
        valid: Optional bool mask of shape ``(B, N)``, ``True`` for real items; ``None``
            means every item is real.
        num_heads: Number of heads; must divide ``D`` and ``Dv``.
        allow_empty: Whether a sample may have no real item; such samples pool to exactly
            zero. ``False`` (default) raises a ``ValueError`` naming ``valid`` for such a
            sample (a value check).

    NaN/Inf in the queries or in real (valid) keys/values raise ``ValueError`` naming
    the argument (a value check); padded items may hold anything. All tensors must be on
    the device of ``keys`` (``ValueError`` otherwise).

    Returns:
        Pooled values of shape ``(B, Q, Dv)`` in the dtype of the inputs.

    Example:
        >>> keys = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [9.0, 9.0]]])
        >>> valid = torch.tensor([[True, True, False]])
        >>> attention_pool(torch.zeros(1, 2), keys, keys, valid)  # equal scores: the mean
        tensor([[[0.5000, 0.5000]]])
    """
    check_tensor("queries", queries, ndim=(2, 3), kind="float")
    check_tensor("keys", keys, ndim=3, kind="float")
    check_tensor("values", values, ndim=3, kind="float")
    check_same_device(("keys", keys), ("queries", queries), ("values", values), ("valid", valid))
    num_heads = check_int("num_heads", num_heads, min_value=1)
    allow_empty = check_bool("allow_empty", allow_empty)
    b, n, d = keys.shape
    if values.shape[:2] != keys.shape[:2]:
        raise ValueError(
            f"values must have shape ({b}, {n}, Dv) to match keys (B, N, D), got {tuple(values.shape)}"
        )
    if queries.shape[-1] != d or (queries.ndim == 3 and queries.shape[0] != b):
        want = f"(Q, {d}) or ({b}, Q, {d})"
        raise ValueError(
            f"queries must have shape {want} to match keys, got {tuple(queries.shape)}"
        )
    if not queries.dtype == keys.dtype == values.dtype:
        raise TypeError(
            f"queries, keys and values must share one dtype, got {queries.dtype}, {keys.dtype}, {values.dtype}"
        )
    if d % num_heads or values.shape[-1] % num_heads:
        raise ValueError(
            f"num_heads must divide the key width {d} and the value width {values.shape[-1]}, got {num_heads}"
        )
    _check_valid(valid, b, n, allow_empty=allow_empty)
    if value_checks_enabled():  # real items only: padded ones may hold NaN
        pad = None if valid is None else ~valid.unsqueeze(-1)
        check_finite(
            ("queries", queries),
            ("keys", keys if pad is None else keys.masked_fill(pad, 0)),
            ("values", values if pad is None else values.masked_fill(pad, 0)),
        )
    return _attention_pool(queries, keys, values, valid, num_heads)


class AttentionPool(nn.Module):
    """Learned-query attention pooling of a token set (V-JEPA's attentive probe pooler).

    ``x`` is zeroed at padded items, layer-normalised (``norm=True``) and projected to
    keys and values; ``num_queries`` learned queries, projected too, attend over them
    with :func:`attention_pool`; a linear layer maps each result to ``out_dim``. The
    output always has a query axis, also for ``num_queries == 1`` (take ``out[:, 0]``
    for ``(B, out_dim)``, or ``out.flatten(1)`` to concatenate several queries), so its
    rank never depends on a hyperparameter. For a parameter-free average of the real
    tokens use :func:`jepa_blocks.evaluation.pool_tokens` instead.

    Args:
        dim: Token width ``D``.
        num_queries: Number of learned queries ``Q``.
        num_heads: Attention heads; must divide ``dim``.
        out_dim: Output width; ``None`` keeps ``dim``.
        qkv_bias: Bias in the query and key/value projections.
        norm: LayerNorm (eps ``1e-6``) on the tokens before the key/value projection.
        allow_empty: Whether a sample may have no real token; such samples pool to exactly
            zero. With ``False`` (default) they raise a ``ValueError`` naming ``valid``
            (a value check).
        init_std: Std of the truncated-normal init of the queries and linear weights
            (biases start at zero, as in I-JEPA / V-JEPA). The queries are the parameter
            ``query_tokens`` of shape ``(Q, D)``; like V-JEPA's, that name keeps them out
            of weight decay in ``param_groups_for_weight_decay``.

    Shapes:
        x: ``(B, N, D)``; valid: bool ``(B, N)``, ``True`` for real tokens, or ``None``;
        output: ``(B, Q, out_dim)``.

    Example:
        >>> pool = AttentionPool(dim=64, num_queries=2, num_heads=4, out_dim=32)
        >>> x, valid = torch.randn(3, 10, 64), torch.arange(10) < torch.tensor([[10], [4], [1]])
        >>> pool(x, valid).shape
        torch.Size([3, 2, 32])
    """

    def __init__(
        self,
        *,
        dim: int,
        num_queries: int = 1,
        num_heads: int = 8,
        out_dim: int | None = None,
        qkv_bias: bool = True,
        norm: bool = True,
        allow_empty: bool = False,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        dim = check_int("dim", dim, min_value=1)
        num_queries = check_int("num_queries", num_queries, min_value=1)
        num_heads = check_int("num_heads", num_heads, min_value=1)
        if dim % num_heads:
            raise ValueError(f"num_heads must divide dim, got dim={dim}, num_heads={num_heads}")
        out_dim = dim if out_dim is None else check_int("out_dim", out_dim, min_value=1)
        qkv_bias = check_bool("qkv_bias", qkv_bias)
        self.dim, self.num_queries = dim, num_queries
        self.num_heads, self.out_dim = num_heads, out_dim
        self.allow_empty = check_bool("allow_empty", allow_empty)
        init_std = check_float("init_std", init_std, min_value=0.0, min_inclusive=False)
        self.query_tokens = nn.Parameter(torch.empty(num_queries, dim))  # (Q, D)
        self.norm = nn.LayerNorm(dim, eps=1e-6) if check_bool("norm", norm) else nn.Identity()
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)  # channel order: (k | v), D each
        self.proj = nn.Linear(dim, out_dim)
        nn.init.trunc_normal_(self.query_tokens, std=init_std)
        self.apply(lambda m: init_transformer_weights(m, std=init_std))

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Pool each sample's real tokens.

        Args:
            x: Tokens of shape ``(B, N, D)``.
            valid: Optional bool mask of shape ``(B, N)``, ``True`` for real tokens.

        Returns:
            Pooled features of shape ``(B, Q, out_dim)``.

        NaN/Inf in real tokens raise ``ValueError`` naming ``x`` while value checks are
        enabled; ``x`` and ``valid`` must be on the module's device (``ValueError``).
        """
        check_tensor("x", x, ndim=3, kind="float")
        check_same_device(("x", x), ("valid", valid), module=self)
        if x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape (B, N, {self.dim}), got {tuple(x.shape)}")
        _check_valid(valid, x.shape[0], x.shape[1], allow_empty=self.allow_empty)
        x = match_dtype(x, self.kv.weight.dtype)  # half input to a float32 module: cast
        if valid is not None:
            # Before the LayerNorm: NaN/Inf in padded slots would otherwise reach the
            # weight gradients of the projections through 0 * NaN.
            x = x.masked_fill(~valid.unsqueeze(-1), 0)
        check_finite(("x", x))  # real tokens only (a value check)
        k, v = self.kv(self.norm(x)).chunk(2, dim=-1)  # (B, N, D) each
        q = self.q(self.query_tokens).to(k.dtype)  # (Q, D); same dtype as k under autocast
        out = self.proj(_attention_pool(q, k, v, valid, self.num_heads))  # (B, Q, out_dim)
        if valid is not None:
            out = torch.where(valid.any(dim=1)[:, None, None], out, 0)  # empty samples: 0
        return out

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_queries={self.num_queries}, num_heads={self.num_heads}, "
            f"out_dim={self.out_dim}, allow_empty={self.allow_empty}"
        )
