"""Scaled dot-product attention with an optional return of its probabilities.

One implementation serves every attention of the library: the self-attention of the
encoder and predictor blocks (:class:`Attention`), the cross-attention of
``jepa_blocks.pooling.AttentionPool`` and the maps of
``jepa_blocks.evaluation.attention_maps``. :func:`dot_product_attention` is the pure
function on per-head ``q, k, v``; :class:`Attention` wraps it with the fused qkv and
output projections (parameter names of timm's ``Attention``: ``qkv``, ``proj``).

Two paths compute the same thing:

* fused: ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels where
  available), used unless the probabilities are asked for;
* explicit: ``softmax(q k^T / sqrt(Dh)) v`` written out, the reference the fused path is
  tested against. It is also taken for bf16/fp16 on CPU (several times faster there) and
  whenever ``return_attention=True``.

Masks are boolean, ``True`` = may be attended to. A query row that may see no key at all
is let see every key instead, in both paths, so it stays finite (no softmax over ``-inf``
only, no NaN in the gradients); its output is meaningless and must be masked downstream.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from jepa_blocks._checks import (
    check_bool,
    check_float,
    check_int,
    check_tensor,
    has_data,
    match_dtype,
    value_checks_enabled,
)
from jepa_blocks.positional.rope2d import apply_rotary

__all__ = ["Attention", "attention_mask_from_valid", "dot_product_attention"]


def attention_mask_from_valid(valid: torch.Tensor | None) -> torch.Tensor | None:
    """Boolean SDPA mask that hides padded keys.

    Args:
        valid: Bool tensor of shape ``(B, N)``, ``True`` for real tokens, or ``None``.

    Returns:
        ``None`` when ``valid`` is ``None`` or every token is real, else a bool tensor of
        shape ``(B, 1, 1, N)`` (``True`` = may be attended to). A sample without any real
        token attends to all of its (padding) tokens so that its rows stay finite; its
        outputs are meaningless and must be masked downstream. Detecting "every token is
        real" reads ``valid`` (one host sync), so it is skipped where value checks are off
        (while ``torch.compile`` / ``torch.export`` trace, or turned off by the user; see
        ``jepa_blocks.value_checks_enabled``): then an all-true mask is returned,
        which gives the same attention output.

    Example:
        >>> attention_mask_from_valid(torch.tensor([[True, False], [True, True]])).shape
        torch.Size([2, 1, 1, 2])
    """
    if valid is None:
        return None
    check_tensor("valid", valid, ndim=2, kind="bool", allow_empty=True)
    if value_checks_enabled() and has_data(valid) and bool(valid.all()):
        return None
    keep = valid | ~valid.any(dim=-1, keepdim=True)
    return keep[:, None, None, :]


def _check_attn_mask(attn_mask: torch.Tensor | None, shape: tuple[int, int, int, int]) -> None:
    """A bool mask of rank 4 that broadcasts to the scores ``shape = (B, heads, Nq, Nk)``."""
    if attn_mask is None:
        return
    check_tensor("attn_mask", attn_mask, ndim=4, kind="bool", allow_empty=True)
    b, h, nq, nk = shape
    m = attn_mask.shape
    if m[0] not in (1, b) or m[1] not in (1, h) or m[2] not in (1, nq) or m[3] != nk:
        raise ValueError(
            f"attn_mask must broadcast to the scores ({b}, {h}, {nq}, {nk}) (B, heads, Nq, Nk) "
            f"with its last dim equal to Nk, e.g. ({b}, 1, 1, {nk}) or ({b}, 1, {nq}, {nk}), "
            f"got {tuple(m)}"
        )


def _dot_product_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None,
    dropout_p: float,
    fused: bool,
    return_attention: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Unchecked core of :func:`dot_product_attention`; returns ``(out, probs or None)``."""
    if attn_mask is not None:
        # A row that sees no key sees every key instead: finite in both paths, and
        # elementwise, so no host sync.
        attn_mask = attn_mask | ~attn_mask.any(dim=-1, keepdim=True)
    # On CPU, torch's fused SDPA kernel is 3-4x slower than the explicit form for
    # bf16/fp16 at JEPA sizes (fwd+bwd, e.g. 512 sequences x 55 tokens x head dim 32:
    # 135 ms vs 32 ms; measured with torch 2.14, see benchmarks/RESULTS.md), while
    # it is faster in fp32. So low precision on CPU takes the explicit path.
    low_precision_cpu = q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16)
    if fused and not low_precision_cpu and not return_attention:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p), None
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (B, h, Nq, Nk)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    probs = scores.softmax(dim=-1)
    out = F.dropout(probs, p=dropout_p, training=dropout_p > 0) @ v
    return out, (probs if return_attention else None)


def dot_product_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    fused: bool = True,
    return_attention: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``softmax(q k^T / sqrt(Dh)) v`` per head, with masked keys left out of the softmax.

    Args:
        q: Queries of shape ``(B, heads, Nq, Dh)``.
        k: Keys of shape ``(B, heads, Nk, Dh)``.
        v: Values of shape ``(B, heads, Nk, Dv)``.
        attn_mask: Bool mask broadcastable to ``(B, heads, Nq, Nk)`` with last dim ``Nk``
            (``True`` = may attend), e.g. ``(B, 1, 1, Nk)`` from
            :func:`attention_mask_from_valid`, or ``None``. A query row that may see no key
            sees every key instead (finite, meaningless: mask it downstream).
        dropout_p: Dropout on the probabilities, in ``[0, 1)``; pass ``0.0`` in eval mode.
        fused: Use ``F.scaled_dot_product_attention`` where it pays (not for bf16/fp16 on
            CPU, and not when the probabilities are returned); ``False`` always computes
            the explicit form.
        return_attention: Also return the probabilities (the explicit path then runs).

    Returns:
        ``out`` of shape ``(B, heads, Nq, Dv)`` in the dtype of ``q``; with
        ``return_attention=True`` the pair ``(out, probs)`` where ``probs`` has shape
        ``(B, heads, Nq, Nk)``, each row summing to 1, taken before the dropout.

    Example:
        >>> q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 4, 7, 8), torch.randn(2, 4, 7, 3)
        >>> out, probs = dot_product_attention(q, k, v, return_attention=True)
        >>> out.shape, probs.shape
        (torch.Size([2, 4, 5, 3]), torch.Size([2, 4, 5, 7]))
    """
    check_tensor("q", q, ndim=4, kind="float", allow_empty=True)
    check_tensor("k", k, ndim=4, kind="float", allow_empty=True)
    check_tensor("v", v, ndim=4, kind="float", allow_empty=True)
    b, h, nq, dh = q.shape
    if k.shape[:2] != (b, h) or k.shape[-1] != dh:
        raise ValueError(f"k must have shape ({b}, {h}, Nk, {dh}) to match q, got {tuple(k.shape)}")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(
            f"v must have shape {tuple(k.shape[:3])} + (Dv,) to match k (B, heads, Nk), got {tuple(v.shape)}"
        )
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    _check_attn_mask(attn_mask, (b, h, nq, k.shape[2]))
    dropout_p = check_float("dropout_p", dropout_p, min_value=0.0, max_value=1.0, max_inclusive=False)
    fused = check_bool("fused", fused)
    return_attention = check_bool("return_attention", return_attention)
    out, probs = _dot_product_attention(
        q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, fused=fused, return_attention=return_attention
    )
    return (out, probs) if return_attention else out


def _check_tokens(x: torch.Tensor, dim: int) -> torch.Tensor:
    check_tensor("x", x, ndim=3, kind="float", allow_empty=True)
    if x.shape[-1] != dim:
        raise ValueError(f"x must have width dim={dim} last, got shape {tuple(x.shape)}")
    return x


class Attention(nn.Module):
    """Multi-head self-attention with rotary positions, a padding mask and optional maps.

    Args:
        dim: Token width ``D``.
        num_heads: Number of heads; must divide ``dim``.
        qkv_bias: Bias in the fused qkv projection.
        attn_drop: Attention-probability dropout (training only).
        proj_drop: Dropout after the output projection.
        fused: Use ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels
            where available). ``False`` computes softmax(q k^T / sqrt(Dh)) v explicitly,
            the reference the fused path is tested against. bf16/fp16 on CPU always take
            the explicit path, which is several times faster there (see
            :func:`dot_product_attention`).

    Shapes:
        x: ``(B, N, D)``; rope: ``(cos, sin)`` each broadcastable to ``(B, 1, N, Dh / 2)``;
        attn_mask: bool ``(B, 1, 1, N)`` or ``(B, 1, N, N)``; output: ``(B, N, D)``, and
        with ``return_attention=True`` also the probabilities ``(B, heads, N, N)``.

    Example:
        >>> attn = Attention(64, num_heads=4)
        >>> attn(torch.randn(2, 10, 64)).shape
        torch.Size([2, 10, 64])
        >>> out, probs = attn(torch.randn(2, 10, 64), return_attention=True)
        >>> probs.shape
        torch.Size([2, 4, 10, 10])
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int = 8,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        fused: bool = True,
    ) -> None:
        super().__init__()
        dim = check_int("dim", dim, min_value=1)
        num_heads = check_int("num_heads", num_heads, min_value=1)
        if dim % num_heads:
            raise ValueError(f"num_heads must divide dim, got dim={dim}, num_heads={num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.fused = check_bool("fused", fused)
        self.attn_drop_p = check_float("attn_drop", attn_drop, min_value=0.0, max_value=1.0, max_inclusive=False)
        self.qkv = nn.Linear(dim, dim * 3, bias=check_bool("qkv_bias", qkv_bias))
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(check_float("proj_drop", proj_drop, min_value=0.0, max_value=1.0, max_inclusive=False))

    def forward(
        self,
        x: torch.Tensor,
        *,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        attn_mask: torch.Tensor | None = None,
        return_attention: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Attend over the tokens of each sequence.

        Args:
            x: Tokens of shape ``(B, N, D)``; another floating dtype than the weights is
                cast to it (unless autocast is on).
            rope: Optional ``(cos, sin)`` from ``RoPE2D.cos_sin``, each broadcastable to
                ``(B, 1, N, Dh / 2)``; q and k are rotated by them.
            attn_mask: Optional bool mask ``(B, 1, 1, N)`` or ``(B, 1, N, N)``, ``True`` =
                may attend (see :func:`attention_mask_from_valid`).
            return_attention: Also return the attention probabilities (computed by the
                explicit path, before the attention dropout).

        Returns:
            Tokens of shape ``(B, N, D)``, or ``(tokens, probs)`` with probs of shape
            ``(B, heads, N, N)`` (rows: queries, columns: keys; each row sums to 1).
        """
        x = match_dtype(_check_tokens(x, self.dim), self.qkv.weight.dtype)
        if rope is not None and (not isinstance(rope, tuple) or len(rope) != 2):
            raise TypeError(f"rope must be a (cos, sin) pair of tensors, got {type(rope).__name__}")
        return_attention = check_bool("return_attention", return_attention)
        b, n, d = x.shape
        _check_attn_mask(attn_mask, (b, self.num_heads, n, n))
        # qkv channel order: (3, heads, head_dim), the same as timm's Attention.
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        out, probs = _dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=self.attn_drop_p if self.training else 0.0,
            fused=self.fused,
            return_attention=return_attention,
        )
        out = self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, d)))
        return (out, probs) if return_attention else out

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, fused={self.fused}"
