"""Pre-norm transformer block with rotary positions and padded-token masking.

Built from timm layers (``Mlp``, ``DropPath``, ``LayerScale``) with parameter names that
match ``timm.models.vision_transformer.Block`` (``norm1``, ``attn.qkv``, ``attn.proj``,
``ls1.gamma``, ``norm2``, ``mlp.fc1``, ``mlp.fc2``, ``ls2.gamma``), so timm ViT weights
load into it. Two things timm's block does not take are added: per-token rotary
cos/sin (``RoPE2D``) applied to q and k, and a validity mask so padded tokens of a
``MaskIndices`` batch are never attended to.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from timm.layers import DropPath, LayerScale, Mlp
from torch import nn

from jepa_blocks._checks import (
    check_bool,
    check_float,
    check_int,
    check_tensor,
    match_dtype,
    value_checks_enabled,
)
from jepa_blocks.positional.rope2d import apply_rotary

__all__ = ["Attention", "TransformerBlock", "attention_mask_from_valid", "transformer_stack"]


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
        ``jepa_blocks._checks.value_checks_enabled``): then an all-true mask is returned,
        which gives the same attention output.
    """
    if valid is None:
        return None
    check_tensor("valid", valid, ndim=2, kind="bool", allow_empty=True)
    if value_checks_enabled() and bool(valid.all()):
        return None
    keep = valid | ~valid.any(dim=-1, keepdim=True)
    return keep[:, None, None, :]


def _check_tokens(x: torch.Tensor, dim: int) -> torch.Tensor:
    check_tensor("x", x, ndim=3, kind="float", allow_empty=True)
    if x.shape[-1] != dim:
        raise ValueError(f"x must have width dim={dim} last, got shape {tuple(x.shape)}")
    return x


def _check_attn_mask(attn_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Check a boolean mask and let rows that see no key at all see every key.

    Such a row would otherwise give NaN (a softmax over ``-inf`` only, in the explicit
    path) or zeros; its output is meaningless either way and must be masked downstream,
    but it stays finite and so do the gradients. Elementwise, so no host sync.
    """
    if attn_mask is None:
        return None
    check_tensor("attn_mask", attn_mask, ndim=4, kind="bool", allow_empty=True)
    return attn_mask | ~attn_mask.any(dim=-1, keepdim=True)


class Attention(nn.Module):
    """Multi-head self-attention on ``scaled_dot_product_attention``.

    Args:
        dim: Token width ``D``.
        num_heads: Number of heads; must divide ``dim``.
        qkv_bias: Bias in the fused qkv projection.
        attn_drop: Attention-probability dropout (training only).
        proj_drop: Dropout after the output projection.
        fused: Use ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels
            where available). ``False`` computes softmax(q k^T / sqrt(Dh)) v explicitly,
            the reference the fused path is tested against. bf16/fp16 on CPU always take
            the explicit path, which is several times faster there.

    Shapes:
        x: ``(B, N, D)``; rope: ``(cos, sin)`` each broadcastable to ``(B, 1, N, Dh / 2)``;
        attn_mask: bool ``(B, 1, 1, N)`` or ``(B, 1, N, N)``; output: ``(B, N, D)``.

    Example:
        >>> attn = Attention(64, num_heads=4)
        >>> attn(torch.randn(2, 10, 64)).shape
        torch.Size([2, 10, 64])
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
    ) -> torch.Tensor:
        x = match_dtype(_check_tokens(x, self.dim), self.qkv.weight.dtype)
        attn_mask = _check_attn_mask(attn_mask)
        if rope is not None and (not isinstance(rope, tuple) or len(rope) != 2):
            raise TypeError(f"rope must be a (cos, sin) pair of tensors, got {type(rope).__name__}")
        b, n, d = x.shape
        # qkv channel order: (3, heads, head_dim), the same as timm's Attention.
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        drop = self.attn_drop_p if self.training else 0.0
        # On CPU, torch's fused SDPA kernel is 3-4x slower than the explicit form for
        # bf16/fp16 at JEPA sizes (fwd+bwd, e.g. 512 sequences x 55 tokens x head dim 32:
        # 135 ms vs 32 ms; measured with torch 2.14, see benchmarks/RESULTS.md), while
        # it is faster in fp32. So low precision on CPU takes the explicit path.
        low_precision_cpu = q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16)
        if self.fused and not low_precision_cpu:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=drop)
        else:
            scores = (q * self.scale) @ k.transpose(-2, -1)
            if attn_mask is not None:
                scores = scores.masked_fill(~attn_mask, float("-inf"))
            probs = F.dropout(scores.softmax(dim=-1), p=drop, training=self.training)
            out = probs @ v
        out = out.transpose(1, 2).reshape(b, n, d)
        return self.proj_drop(self.proj(out))


class TransformerBlock(nn.Module):
    """Pre-norm ViT block: ``x + ls1(attn(norm1(x)))`` then ``x + ls2(mlp(norm2(x)))``.

    Args:
        dim: Token width ``D``.
        num_heads: Attention heads.
        mlp_ratio: Hidden width of the MLP as a multiple of ``D``.
        qkv_bias: Bias in the qkv projection.
        drop_path: Stochastic-depth rate of both residual branches.
        layer_scale_init: Initial LayerScale value (e.g. ``1e-5``); ``None`` disables it.
        attn_drop: Attention dropout. proj_drop: Dropout after projections.
        norm_layer: Normalisation constructor taking the width.
        act_layer: MLP activation constructor.
        fused_attn: Use SDPA (see ``Attention``).

    Shapes:
        x: ``(B, N, D)`` -> ``(B, N, D)``.

    Example:
        >>> block = TransformerBlock(64, num_heads=4)
        >>> block(torch.randn(2, 10, 64)).shape
        torch.Size([2, 10, 64])
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        layer_scale_init: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: Callable[[int], nn.Module] | None = None,
        act_layer: type[nn.Module] = nn.GELU,
        fused_attn: bool = True,
    ) -> None:
        super().__init__()
        self.dim = check_int("dim", dim, min_value=1)
        norm_layer = norm_layer or (lambda d: nn.LayerNorm(d, eps=1e-6))
        mlp_ratio = check_float("mlp_ratio", mlp_ratio, min_value=0.0, min_inclusive=False)
        fused_attn = check_bool("fused_attn", fused_attn)
        drop_path = check_float("drop_path", drop_path, min_value=0.0, max_value=1.0, max_inclusive=False)
        if layer_scale_init is not None:
            layer_scale_init = check_float("layer_scale_init", layer_scale_init, min_value=0.0, min_inclusive=False)
        self.norm1 = norm_layer(dim)
        self.attn = Attention(
            dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop, fused=fused_attn
        )
        self.ls1 = LayerScale(dim, init_values=layer_scale_init) if layer_scale_init else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.ls2 = LayerScale(dim, init_values=layer_scale_init) if layer_scale_init else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(
        self,
        x: torch.Tensor,
        *,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = match_dtype(_check_tokens(x, self.dim), self.attn.qkv.weight.dtype)
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), rope=rope, attn_mask=attn_mask)))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


def transformer_stack(
    dim: int,
    *,
    depth: int,
    num_heads: int,
    mlp_ratio: float = 4.0,
    qkv_bias: bool = True,
    drop_path_rate: float = 0.0,
    layer_scale_init: float | None = None,
    fused_attn: bool = True,
) -> nn.ModuleList:
    """``depth`` pre-norm blocks with stochastic depth rising linearly from 0 to ``drop_path_rate``."""
    rates = torch.linspace(0.0, drop_path_rate, depth).tolist()
    return nn.ModuleList(
        TransformerBlock(
            dim,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            drop_path=rate,
            layer_scale_init=layer_scale_init,
            fused_attn=fused_attn,
        )
        for rate in rates
    )


def init_transformer_weights(module: nn.Module, *, std: float = 0.02) -> None:
    """I-JEPA initialisation: truncated-normal linear weights, zero biases, unit norms."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        if module.weight is not None:
            nn.init.ones_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def rescale_residual_branches(blocks: nn.ModuleList) -> None:
    """Divide each block's residual output projections by ``sqrt(2 * layer_id)`` (I-JEPA)."""
    with torch.no_grad():
        for layer_id, block in enumerate(blocks, start=1):
            block.attn.proj.weight.div_((2.0 * layer_id) ** 0.5)
            block.mlp.fc2.weight.div_((2.0 * layer_id) ** 0.5)
