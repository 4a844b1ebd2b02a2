"""The two-layer MLP of a ViT block, with timm's parameter names.

``fc1 -> act -> drop1 -> norm -> fc2 -> drop2``, the layout (and the construction order,
hence the initial weights under a fixed seed) of ``timm.layers.Mlp``, so the state dicts
are interchangeable (``mlp.fc1.weight`` ...). Written here so that importing the library
does not import timm (which imports torchvision's models: about 2 s).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from jepa_blocks._checks import check_bool, check_float, check_int, check_tensor

__all__ = ["Mlp"]


class Mlp(nn.Module):
    """Linear, activation, dropout, linear, dropout (``timm.layers.Mlp`` without conv/GLU options).

    Args:
        in_features: Input width ``D``.
        hidden_features: Hidden width (default ``D``).
        out_features: Output width (default ``D``).
        act_layer: Activation constructor, called without arguments.
        norm_layer: Optional normalisation of the hidden activations, called with the
            hidden width (``nn.Identity`` when ``None``).
        bias: Biases in both linear layers.
        drop: Dropout after the activation and after ``fc2``.

    Shapes:
        x: ``(..., D)`` -> ``(..., out_features)``.

    Example:
        >>> mlp = Mlp(64, hidden_features=256)
        >>> mlp(torch.randn(2, 10, 64)).shape
        torch.Size([2, 10, 64])
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: type[nn.Module] = nn.GELU,
        norm_layer: type[nn.Module] | None = None,
        bias: bool = True,
        drop: float = 0.0,
    ) -> None:
        super().__init__()
        in_features = check_int("in_features", in_features, min_value=1)
        # ``is None``, not ``or``: 0 and False are errors, not "use the default".
        hidden = in_features if hidden_features is None else hidden_features
        hidden_features = check_int("hidden_features", hidden, min_value=1)
        out = in_features if out_features is None else out_features
        out_features = check_int("out_features", out, min_value=1)
        bias = check_bool("bias", bias)
        drop = check_float("drop", drop, min_value=0.0, max_value=1.0)
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = _build_layer("act_layer", act_layer)
        self.drop1 = nn.Dropout(drop)
        self.norm = _build_layer("norm_layer", norm_layer, hidden_features) if norm_layer is not None else nn.Identity()
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the MLP to ``x`` ``(..., D)``; returns ``(..., out_features)``."""
        check_tensor("x", x, kind="float", allow_empty=True)
        if x.ndim == 0 or x.shape[-1] != self.fc1.in_features:
            raise ValueError(f"x must have shape (..., {self.fc1.in_features}), got {tuple(x.shape)}")
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


def _build_layer(name: str, factory: Any, *args: int) -> nn.Module:
    """``factory(*args)``, checked to be an ``nn.Module`` (``TypeError`` naming ``name`` if not)."""
    if not callable(factory):
        raise TypeError(f"{name} must be a callable that returns an nn.Module, got {factory!r}")
    layer = factory(*args)
    if not isinstance(layer, nn.Module):
        raise TypeError(f"{name} must return an nn.Module, got {type(layer).__name__} from {factory!r}")
    return layer
