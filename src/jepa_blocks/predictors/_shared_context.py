"""Shared-context attention: every target block sees one context, computed once per sample.

The per-block layout of I-JEPA runs ``[context ; block queries]`` once per target block,
so the context tokens go through the predictor ``M`` times. Here a sample is one sequence::

    [ c_0 .. c_{Nc-1} | block 0 of group 0 | block 1 of group 0 | .. | block 0 of group 1 | .. ]
      context tokens    K_0 queries          K_0 queries               K_1 queries

where a *group* holds ``M_g`` blocks of ``K_g`` query slots each (the predictor uses one
group per hierarchy level). Attention is restricted, not a full ``N x N`` mask:

* a context token attends to the context tokens only, so its output never depends on the
  queries (and is computed once);
* a query of block ``j`` attends to the context tokens and to the queries of block ``j``
  only, so each block's predictions are independent of every other block.

Per-token layers (norms, qkv, MLP, drop path) run once over the whole ``(B, N, P)``
sequence; only attention is split: one self-attention over the context, and per group a
batched attention of ``(B, h, M_g, K_g)`` queries over ``[context keys ; own block keys]``.
No ``(N, N)`` score matrix is formed: the scores are ``(Nc, Nc)`` for the context and
``(K_g, Nc + K_g)`` per block.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from jepa_blocks._checks import value_checks_enabled
from jepa_blocks.layers.attention import _dot_product_attention
from jepa_blocks.layers.block import TransformerBlock
from jepa_blocks.positional.rope2d import apply_rotary

__all__ = ["block_key_mask", "block_attention", "shared_context_block"]


def block_key_mask(context_valid: torch.Tensor, block_valid: torch.Tensor) -> torch.Tensor | None:
    """Key mask of a group of blocks: which of ``[context ; own block]`` a query may see.

    Args:
        context_valid: Bool ``(B, Nc)``, ``True`` for real context tokens.
        block_valid: Bool ``(B, M, K)``, ``True`` for real query slots of each block.

    Returns:
        ``None`` if every key is real (checked only where value checks are on, one host
        sync; otherwise a full mask is returned, which gives the same result), else bool
        ``(B, 1, M, 1, Nc + K)``, ``True`` = may attend. A block with no real key at all
        sees every key instead (finite, meaningless outputs: mask them downstream).
    """
    b, m, k = block_valid.shape
    keys = torch.cat((context_valid[:, None, :].expand(b, m, -1), block_valid), dim=-1)
    if value_checks_enabled() and bool(keys.all()):
        return None
    keys = keys | ~keys.any(dim=-1, keepdim=True)
    return keys[:, None, :, None, :]


def block_attention(
    q: torch.Tensor,
    context_k: torch.Tensor,
    context_v: torch.Tensor,
    block_k: torch.Tensor,
    block_v: torch.Tensor,
    *,
    key_mask: torch.Tensor | None,
    dropout_p: float,
    fused: bool,
) -> torch.Tensor:
    """Each block's queries attend to the shared context keys and to their own block's keys.

    For block ``j`` this is ``softmax(q_j [kc ; k_j]^T / sqrt(Dh)) [vc ; v_j]``, the
    attention of the per-block sequence restricted to its query rows.

    Args:
        q: Queries ``(B, h, M, K, Dh)``.
        context_k: Context keys ``(B, h, Nc, Dh)``; context_v: values ``(B, h, Nc, Dh)``.
        block_k: Block keys ``(B, h, M, K, Dh)``; block_v: values ``(B, h, M, K, Dh)``.
        key_mask: ``None`` or bool ``(B, 1, M, 1, Nc + K)`` from :func:`block_key_mask`.
        dropout_p: Dropout on the probabilities (``0.0`` in eval mode).
        fused: ``True``: ``scaled_dot_product_attention`` over the context keys and values
            broadcast to every block (a copy of ``(B, h, M, Nc + K, Dh)``), unless the
            tensors are bf16/fp16 on CPU (explicit there, as in
            ``jepa_blocks.layers.attention``). ``False``: the explicit form, with the
            ``(B, h, M * K, Nc)`` context scores from one matmul (no copy of the context).

    Returns:
        ``(B, h, M, K, Dh)``.
    """
    b, h, m, k, dh = q.shape
    nc = context_k.shape[2]
    low_precision_cpu = q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16)
    if fused and not low_precision_cpu:
        keys = torch.cat((context_k[:, :, None].expand(b, h, m, nc, dh), block_k), dim=3)
        values = torch.cat((context_v[:, :, None].expand(b, h, m, nc, dh), block_v), dim=3)
        out, _ = _dot_product_attention(
            q.flatten(1, 2), keys.flatten(1, 2), values.flatten(1, 2),
            attn_mask=None if key_mask is None else key_mask.expand(b, h, m, 1, nc + k).flatten(1, 2),
            dropout_p=dropout_p, fused=True, return_attention=False,
        )  # heads and blocks merged into one batch dim: (B, h * M, K, Dh)
        return out.unflatten(1, (h, m))
    q = q * dh**-0.5
    # Scores of block j's queries: [q_j kc^T | q_j k_j^T], (B, h, M, K, Nc + K).
    context_scores = (q.flatten(2, 3) @ context_k.transpose(-2, -1)).unflatten(2, (m, k))
    scores = torch.cat((context_scores, q @ block_k.transpose(-2, -1)), dim=-1)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask, float("-inf"))
    probs = F.dropout(scores.softmax(dim=-1), p=dropout_p, training=dropout_p > 0)
    context_probs, own_probs = probs.split((nc, k), dim=-1)
    out = (context_probs.flatten(2, 3) @ context_v).unflatten(2, (m, k))
    return out + own_probs @ block_v


def shared_context_block(
    block: TransformerBlock,
    x: torch.Tensor,
    *,
    num_context: int,
    groups: Sequence[tuple[int, int]],
    rope: tuple[torch.Tensor, torch.Tensor] | None,
    context_mask: torch.Tensor | None,
    key_masks: Sequence[torch.Tensor | None],
    keep_context: bool = True,
) -> torch.Tensor:
    """One pre-norm ``TransformerBlock`` over a shared-context sequence (module docstring).

    Computes what ``block(x)`` computes (same weights, norms, LayerScale, drop path: one
    draw per sample for the whole sequence), with the attention restricted as described in
    the module docstring.

    Args:
        block: The transformer block whose weights are used.
        x: Tokens ``(B, Nc + sum_g M_g * K_g, P)``: the context, then each group's blocks.
        num_context: ``Nc``.
        groups: ``(M_g, K_g)`` per group, in sequence order.
        rope: ``None`` or ``(cos, sin)`` each broadcastable to ``(B, 1, N, Dh / 2)``.
        context_mask: ``None`` or bool ``(B, 1, 1, Nc)`` hiding padded context keys.
        key_masks: Per group, ``None`` or the mask of :func:`block_key_mask`.
        keep_context: ``False`` returns the query tokens only (the last block: the
            context outputs would not be read), skipping their attention and MLP.

    Returns:
        ``(B, N, P)``, or ``(B, N - Nc, P)`` with ``keep_context=False``.
    """
    attn = block.attn
    b, n, d = x.shape
    nc, heads, dh = num_context, attn.num_heads, attn.head_dim
    dropout_p = attn.attn_drop_p if attn.training else 0.0
    # qkv channel order (3, heads, head_dim), as in Attention.forward.
    qkv = attn.qkv(block.norm1(x)).reshape(b, n, 3, heads, dh).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # (B, h, N, Dh) each
    if rope is not None:
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
    context_k, context_v = k[:, :, :nc], v[:, :, :nc]
    outs = []
    if keep_context:
        out, _ = _dot_product_attention(
            q[:, :, :nc], context_k, context_v, attn_mask=context_mask, dropout_p=dropout_p,
            fused=attn.fused, return_attention=False,
        )
        outs.append(out)
    start = nc
    for (m, kk), key_mask in zip(groups, key_masks, strict=True):
        span = slice(start, start + m * kk)
        start += m * kk
        if m * kk == 0:
            continue
        q_g, k_g, v_g = (t[:, :, span].unflatten(2, (m, kk)) for t in (q, k, v))
        out = block_attention(
            q_g, context_k, context_v, k_g, v_g, key_mask=key_mask, dropout_p=dropout_p,
            fused=attn.fused,
        )
        outs.append(out.flatten(2, 3))
    out = torch.cat(outs, dim=2)  # (B, h, N', Dh), N' = N or N - Nc
    n_out = out.shape[2]
    out = attn.proj_drop(attn.proj(out.transpose(1, 2).reshape(b, n_out, d)))
    if not keep_context:
        x = x[:, nc:]
    x = x + block.drop_path1(block.ls1(out))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
