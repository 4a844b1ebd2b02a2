"""Attention maps of a ``ViTEncoder`` block, exactly as the block computes them.

:func:`attention_maps` runs the encoder with two hooks on the chosen block's attention
module (``jepa_blocks.layers.Attention``): a forward pre-hook adds
``return_attention=True`` to the module's own call, and a forward hook takes the
probabilities it returns and stops the pass. Nothing is recomputed here: the maps are
the module's, from its explicit path (``softmax(q k^T / sqrt(head_dim))`` with masked keys
at ``-inf``, RoPE included), so ``probs @ v`` is the module's output before its
projection (the tests check this against a plain forward pass on the fused kernel).
:func:`attention_probs` does the same for one module and an input of your own.

JEPA encoders have no CLS token, so there is no "CLS attention" to show. Two CLS-free
views of the ``(N, N)`` map are provided:

* :func:`query_attention`: the attention row of one query patch, where that patch looks;
* :func:`received_attention`: the mean over all queries of the attention each patch
  receives, i.e. which patches the layer relies on. Each head's map sums to 1.

Both return maps on the patch grid, ``(B, heads, H, W)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from jepa_blocks._checks import check_grid, check_int, check_tensor
from jepa_blocks.layers.attention import Attention

__all__ = ["attention_maps", "attention_probs", "query_attention", "received_attention"]


class _Captured(Exception):
    """Raised by the hook to stop the forward pass once the chosen block's maps are known."""


def attention_probs(
    attn: Attention,
    x: torch.Tensor,
    *,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention probabilities of an ``Attention`` module for its input.

    Calls ``attn(x, rope=rope, attn_mask=attn_mask, return_attention=True)``; the module
    checks the arguments.

    Args:
        attn: The attention module (``jepa_blocks.layers.Attention``).
        x: The module's input of shape ``(B, N, D)`` (the block's ``norm1`` output).
        rope: The ``(cos, sin)`` the module receives, each broadcastable to
            ``(B, 1, N, Dh / 2)``, or ``None``.
        attn_mask: The bool mask the module receives, ``(B, 1, 1, N)`` or ``(B, 1, N, N)``
            (``True`` = may attend), or ``None``.

    Returns:
        Probabilities of shape ``(B, heads, N, N)`` in the dtype of ``x`` (rows: queries,
        columns: keys; each row sums to 1), without attention dropout.

    Example:
        >>> from jepa_blocks.layers import Attention
        >>> attention_probs(Attention(16, num_heads=2), torch.randn(3, 5, 16)).shape
        torch.Size([3, 2, 5, 5])
    """
    if not isinstance(attn, Attention):
        raise TypeError(f"attn must be a jepa_blocks Attention module, got {type(attn).__name__}")
    _, probs = attn(x, rope=rope, attn_mask=attn_mask, return_attention=True)
    return probs.to(x.dtype)


def _capture_attention(encoder: nn.Module, images: torch.Tensor, layer: int, keep: Any) -> torch.Tensor:
    """Run ``encoder`` up to block ``layer`` and return that block's attention probabilities."""
    blocks = getattr(encoder, "blocks", None)
    if not isinstance(blocks, (nn.ModuleList, nn.Sequential)) or not len(blocks) or not isinstance(
        getattr(blocks[0], "attn", None), Attention
    ):
        raise TypeError(
            "encoder must have `blocks` whose `attn` is a jepa_blocks Attention (a ViTEncoder), "
            f"got {type(encoder).__name__}"
        )
    depth = len(blocks)
    layer = check_int("layer", layer, min_value=-depth, max_value=depth - 1) % depth
    attn = blocks[layer].attn
    captured: dict[str, torch.Tensor] = {}

    def ask_for_probs(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return args, {**kwargs, "return_attention": True}

    def take_probs(module: nn.Module, args: tuple, output: tuple[torch.Tensor, torch.Tensor]) -> None:
        captured["probs"] = output[1]
        raise _Captured

    handles = [
        attn.register_forward_pre_hook(ask_for_probs, with_kwargs=True),
        attn.register_forward_hook(take_probs),
    ]
    try:
        encoder(images) if keep is None else encoder(images, keep=keep)
    except _Captured:
        pass
    finally:
        for handle in handles:
            handle.remove()
    if "probs" not in captured:
        raise RuntimeError(f"the encoder's forward never called blocks[{layer}].attn")
    return captured["probs"]


def attention_maps(
    encoder: nn.Module,
    images: torch.Tensor,
    *,
    layer: int = -1,
    keep: Any = None,
) -> torch.Tensor:
    """Self-attention probabilities of one block of a ``ViTEncoder``.

    The encoder runs in ``eval()`` mode under ``torch.no_grad()`` (its mode is restored
    afterwards) up to the chosen block, whose attention module returns its probabilities
    (see the module docstring).

    Args:
        encoder: A ``ViTEncoder`` (anything with ``blocks[i].attn`` of type
            ``jepa_blocks.layers.Attention`` whose ``forward(images)`` runs them in
            order).
        images: Float tensor ``(B, C, H * p, W * p)``.
        layer: Block index, negative counts from the end (``-1``: the last block).
        keep: Optional ``keep`` passed to the encoder (a context subset); ``N`` is then the
            number of kept tokens and padded keys get probability 0.

    Returns:
        Float tensor ``(B, heads, N, N)`` in the dtype the block computes in (its
        weights'): ``[b, h, i, j]`` is how much token ``i`` attends to token ``j``
        (``N = H * W`` in row-major grid order without ``keep``).

    Example:
        >>> from jepa_blocks import ViTEncoder
        >>> enc = ViTEncoder(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)
        >>> maps = attention_maps(enc, torch.randn(3, 3, 16, 16))
        >>> maps.shape, bool(torch.allclose(maps.sum(-1), torch.ones(3, 2, 16)))
        (torch.Size([3, 2, 16, 16]), True)
    """
    if not isinstance(encoder, nn.Module):
        raise TypeError(f"encoder must be an nn.Module, got {type(encoder).__name__}")
    check_tensor("images", images, ndim=4, kind="float")
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.no_grad():
            probs = _capture_attention(encoder, images, layer, keep)
    finally:
        encoder.train(was_training)
    return probs


def _check_maps(maps: torch.Tensor, grid_size: int | Sequence[int]) -> tuple[int, int]:
    check_tensor("maps", maps, ndim=4, kind="float")
    h, w = check_grid("grid_size", grid_size)
    if maps.shape[-1] != h * w or maps.shape[-2] != h * w:
        raise ValueError(
            f"maps must have shape (B, heads, {h * w}, {h * w}) for grid_size {(h, w)}, "
            f"got {tuple(maps.shape)}"
        )
    return h, w


def query_attention(
    maps: torch.Tensor, grid_size: int | Sequence[int], *, query: int | Sequence[int]
) -> torch.Tensor:
    """Where one query patch looks: its attention row, on the patch grid.

    Args:
        maps: Probabilities of shape ``(B, heads, N, N)`` over the full grid
            (``N = H * W``), e.g. from :func:`attention_maps`.
        grid_size: The patch grid ``(H, W)``.
        query: The query patch, a row-major token id in ``[0, N)`` or a ``(row, col)``.

    Returns:
        Tensor ``(B, heads, H, W)``; each head's map sums to 1.

    Example:
        >>> maps = torch.full((1, 1, 4, 4), 0.25)
        >>> query_attention(maps, (2, 2), query=(1, 0)).shape
        torch.Size([1, 1, 2, 2])
    """
    h, w = _check_maps(maps, grid_size)
    if isinstance(query, int) and not isinstance(query, bool):
        index = check_int("query", query, min_value=0, max_value=h * w - 1)
    elif isinstance(query, Sequence) and not isinstance(query, (str, bytes)) and len(query) == 2:
        row = check_int("query[0]", query[0], min_value=0, max_value=h - 1)
        col = check_int("query[1]", query[1], min_value=0, max_value=w - 1)
        index = row * w + col
    else:
        raise TypeError(f"query must be a token id or a (row, col) pair, got {query!r}")
    return maps[:, :, index, :].unflatten(-1, (h, w))


def received_attention(maps: torch.Tensor, grid_size: int | Sequence[int]) -> torch.Tensor:
    """Mean attention each patch receives, averaged over all queries, on the patch grid.

    Args:
        maps: Probabilities of shape ``(B, heads, N, N)`` over the full grid
            (``N = H * W``).
        grid_size: The patch grid ``(H, W)``.

    Returns:
        Tensor ``(B, heads, H, W)``: ``mean_i maps[b, h, i, j]`` at the cell of patch
        ``j``; each head's map sums to 1.

    Example:
        >>> maps = torch.eye(4).expand(1, 2, 4, 4)
        >>> received_attention(maps, 2)[0, 0]
        tensor([[0.2500, 0.2500],
                [0.2500, 0.2500]])
    """
    h, w = _check_maps(maps, grid_size)
    return maps.mean(dim=-2).unflatten(-1, (h, w))
