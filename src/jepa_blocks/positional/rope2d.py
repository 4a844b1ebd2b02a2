"""Axial 2D rotary position embedding (RoPE) at explicit per-token positions.

Each token carries its own ``(row, col)``, so a context encoder that dropped tokens, or a
predictor whose queries sit at target positions, keeps the true geometry: the attention
score between two tokens depends only on their offset ``(dr, dc)``.

Channel order within one head of width ``Dh`` (divisible by 4, ``F = Dh // 4``)::

    channels (2i, 2i + 1), i < F       : rotated by row * w_i       (first half: row)
    channels (2i, 2i + 1), F <= i < 2F : rotated by col * w_{i - F} (second half: column)

with ``w_i = theta ** (-i / F)``. Adjacent channels form a pair (interleaved layout, as in
the RoFormer paper). V-JEPA 2 tiles its sin/cos with ``repeat`` instead of
``repeat_interleave`` so that a channel pair is rotated by two different angles, which
breaks the relative-position property (its PR 15); the tests here check the property.

``RoPE2D.forward`` rejects NaN/Inf positions with ``ValueError`` (a value check), and
``k`` or ``positions`` on another device than ``q`` (a metadata check). NaN in ``q`` and
``k`` passes through unchecked (to the rows that hold it only), and
:func:`rope_2d_angles` / :meth:`RoPE2D.cos_sin`, which encoders call on every forward
with positions they built themselves, never sync.
"""

from __future__ import annotations

import torch
from torch import nn

from jepa_blocks._checks import (
    check_finite,
    check_float,
    check_int,
    check_same_device,
    check_tensor,
)

__all__ = ["rope_2d_angles", "apply_rotary", "RoPE2D"]


def rope_2d_angles(positions: torch.Tensor, head_dim: int, *, theta: float = 100.0) -> torch.Tensor:
    """Rotation angle of every channel pair.

    Args:
        positions: Float tensor of shape ``(..., N, 2)`` holding ``(row, col)`` per token.
        head_dim: Per-head width ``Dh``, divisible by 4.
        theta: Frequency base; the slowest pair turns by ``theta ** (-(F - 1) / F)`` per
            patch. 100 suits patch grids up to a few hundred cells per side.

    Returns:
        Float tensor of shape ``(..., N, Dh // 2)``: pair ``i`` uses ``angles[..., i]``.
    """
    check_tensor("positions", positions, ndim=range(2, 6), allow_empty=True)
    if positions.shape[-1] != 2:
        raise ValueError(f"positions must have shape (..., N, 2), got {tuple(positions.shape)}")
    head_dim = check_int("head_dim", head_dim, min_value=4)
    if head_dim % 4:
        raise ValueError(f"head_dim must be divisible by 4, got {head_dim}")
    theta = check_float("theta", theta, min_value=1.0, min_inclusive=False)
    dtype = torch.float64 if positions.dtype == torch.float64 else torch.float32
    f = head_dim // 4
    freqs = theta ** (-torch.arange(f, dtype=dtype, device=positions.device) / f)  # (F,)
    angles = positions.to(dtype).unsqueeze(-1) * freqs  # (..., N, 2, F): row freqs, col freqs
    return angles.flatten(-2)  # (..., N, 2F): the F row pairs first, then the F column pairs


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of ``x`` by precomputed angles.

    Pair ``i`` is ``(x[..., 2i], x[..., 2i + 1])`` and becomes
    ``(x0 cos_i - x1 sin_i, x0 sin_i + x1 cos_i)``.

    Args:
        x: Tensor of shape ``(B, heads, N, Dh)`` (or any ``(..., N, Dh)``).
        cos: Cosines of shape broadcastable to ``(..., N, Dh // 2)``.
        sin: Sines, same shape as ``cos``.

    Returns:
        Tensor shaped like ``x`` in the dtype of ``x``.
    """
    check_tensor("x", x, ndim=range(2, 9), kind="float", allow_empty=True)
    if x.shape[-1] % 2:
        raise ValueError(f"x must have an even last dimension (channel pairs), got shape {tuple(x.shape)}")
    pairs = (*x.shape[:-1], x.shape[-1] // 2)
    for name, t in (("cos", cos), ("sin", sin)):
        check_tensor(name, t, kind="float", allow_empty=True)
        try:
            fits = torch.broadcast_shapes(t.shape, pairs) == pairs
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(
                f"{name} must broadcast to {pairs} (x without its last dim, then Dh // 2), "
                f"got shape {tuple(t.shape)}"
            )
    x_pairs = x.unflatten(-1, (-1, 2))  # (..., N, Dh/2, 2)
    x0, x1 = x_pairs.unbind(-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2)


class RoPE2D(nn.Module):
    """Axial 2D rotary embedding applied to queries and keys at explicit positions.

    Args:
        head_dim: Per-head width ``Dh`` of the queries and keys, divisible by 4.
        theta: Frequency base (see ``rope_2d_angles``).

    Shapes:
        q, k: ``(B, heads, N, Dh)``; positions: ``(B, N, 2)`` or ``(N, 2)`` as
        ``(row, col)`` floats (fractional positions are allowed).

    Example:
        >>> rope = RoPE2D(head_dim=16)
        >>> q = k = torch.randn(2, 4, 9, 16)
        >>> pos = torch.stack(torch.meshgrid(torch.arange(3.), torch.arange(3.), indexing="ij"), -1).reshape(9, 2)
        >>> q2, k2 = rope(q, k, positions=pos)
        >>> q2.shape
        torch.Size([2, 4, 9, 16])
    """

    def __init__(self, *, head_dim: int, theta: float = 100.0) -> None:
        super().__init__()
        self.head_dim = check_int("head_dim", head_dim, min_value=4)
        if head_dim % 4:
            raise ValueError(f"head_dim must be divisible by 4, got {head_dim}")
        self.theta = check_float("theta", theta, min_value=1.0, min_inclusive=False)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cosines and sines for ``apply_rotary``, computed once and shared by all layers.

        Args:
            positions: ``(B, N, 2)`` or ``(N, 2)``.

        Returns:
            ``(cos, sin)``, each of shape ``(B, 1, N, Dh // 2)`` (or ``(1, N, Dh // 2)``),
            broadcasting over heads.
        """
        angles = rope_2d_angles(positions, self.head_dim, theta=self.theta).unsqueeze(-3)
        return angles.cos(), angles.sin()

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, *, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate ``q`` and ``k`` by their tokens' positions.

        Args:
            q: Queries of shape ``(B, heads, N, Dh)``.
            k: Keys of shape ``(B, heads, N, Dh)``.
            positions: ``(B, N, 2)`` or ``(N, 2)`` ``(row, col)`` per token.

        Returns:
            Rotated ``(q, k)`` with the input shapes and dtypes.
        """
        for name, t in (("q", q), ("k", k)):
            check_tensor(name, t, ndim=4, kind="float")
            if t.shape[-1] != self.head_dim:
                raise ValueError(f"{name} must have head_dim {self.head_dim} last, got shape {tuple(t.shape)}")
        check_tensor("positions", positions, ndim=(2, 3), kind="float")
        check_same_device(("q", q), ("k", k), ("positions", positions))
        if positions.shape[-2] != q.shape[-2] or positions.shape[-2] != k.shape[-2]:
            raise ValueError(
                f"positions must have N = {q.shape[-2]} rows matching q and k, got shape "
                f"{tuple(positions.shape)}"
            )
        if positions.ndim == 3 and positions.shape[0] not in (1, q.shape[0]):
            raise ValueError(
                f"positions batch {positions.shape[0]} does not match q batch {q.shape[0]}"
            )
        if positions.ndim == 3 and positions.shape[0] not in (1, k.shape[0]):
            raise ValueError(
                f"positions batch {positions.shape[0]} does not match k batch {k.shape[0]}"
            )
        check_finite(("positions", positions))
        cos, sin = self.cos_sin(positions)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, theta={self.theta}"
