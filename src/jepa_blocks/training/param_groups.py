"""Split parameters into a weight-decayed and a not-decayed optimizer group.

I-JEPA (like most ViT recipes) applies weight decay only to the weight matrices of
linear and convolution layers. Biases, every other 1-D parameter (norm scales and
shifts, LayerScale gammas) and learned tokens or embeddings that stand for inputs
(mask tokens, class tokens, position embeddings) are left undecayed: shrinking them
towards zero only removes information.

The no-decay groups carry ``"apply_wd": False``, so that
:class:`~jepa_blocks.training.schedules.OptimizerScheduler` keeps their weight decay at
0 while it ramps the decayed group.

On a timm ViT the split equals timm's ``param_groups_weight_decay(model,
no_weight_decay_list=model.no_weight_decay())`` (tested). It is kept rather than replaced
by timm's because it (1) recognises learned input tokens by name in any module (the
predictors' ``mask_tokens`` / ``level_tokens`` matrices, which timm decays unless each
model lists them), (2) takes several modules and counts shared parameters once, and (3)
keeps the decayed group, flagged ``apply_wd``, when the weight decay starts at 0 (timm
then puts every parameter in its no-decay group, and a ramp could not reach them).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from jepa_blocks._checks import check_float

__all__ = ["DEFAULT_NO_DECAY_NAMES", "param_groups_for_weight_decay", "is_no_decay"]

#: Name fragments of parameters that are never decayed, whatever their shape.
DEFAULT_NO_DECAY_NAMES: tuple[str, ...] = ("token", "pos_embed")


def _leaf_name(name: str) -> str:
    """The parameter's own attribute name: the last dotted component that is not an index.

    ``"blocks.0.attn.qkv.weight"`` -> ``"weight"``; ``"mask_tokens"`` -> ``"mask_tokens"``;
    ``"level_tokens.2"`` (an ``nn.ParameterList`` item) -> ``"level_tokens"``.
    """
    parts = name.split(".")
    for part in reversed(parts):
        if not part.isdigit():
            return part
    return parts[-1]


def is_no_decay(
    name: str, param: torch.Tensor, no_decay_names: Sequence[str] = DEFAULT_NO_DECAY_NAMES
) -> bool:
    """Whether a parameter belongs to the no-weight-decay group.

    True for every parameter with fewer than 2 dimensions (biases, norm weights,
    LayerScale gammas, scalars) and for parameters whose own name (the last dotted
    component that is not a list index) contains one of ``no_decay_names``. Matching the
    own name, not the whole path, keeps e.g. ``mixer.mlp_tokens.fc1.weight`` decayed
    while ``mask_token``, ``cls_token``, ``mask_tokens`` and ``decoder_pos_embed`` are not.

    Args:
        name: Dotted parameter name as given by ``named_parameters()``.
        param: The parameter.
        no_decay_names: Name fragments that force no decay.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    if not isinstance(param, torch.Tensor):
        raise TypeError(f"param must be a torch.Tensor, got {type(param).__name__}")
    if isinstance(no_decay_names, (str, bytes)):  # "token" would match single letters
        raise TypeError(f"no_decay_names must be a sequence of strings, got {no_decay_names!r}")
    if param.ndim < 2:
        return True
    leaf = _leaf_name(name)
    return any(fragment in leaf for fragment in no_decay_names)


def _named_params(source: Any, index: int) -> Iterable[tuple[str, torch.Tensor]]:
    if isinstance(source, nn.Module):
        # remove_duplicate=True (the default) already drops shared parameters inside one module.
        return source.named_parameters()
    if isinstance(source, torch.Tensor) or isinstance(source, (str, bytes)):
        raise TypeError(
            f"sources[{index}] must be an nn.Module or an iterable of (name, parameter) "
            f"pairs such as module.named_parameters(), got {type(source).__name__}"
        )
    try:
        items = list(source)
    except TypeError:
        raise TypeError(
            f"sources[{index}] must be an nn.Module or an iterable of (name, parameter) "
            f"pairs such as module.named_parameters(), got {type(source).__name__}"
        ) from None
    for j, item in enumerate(items):
        ok = (
            isinstance(item, tuple)
            and len(item) == 2
            and isinstance(item[0], str)
            and isinstance(item[1], torch.Tensor)
        )
        if not ok:
            raise TypeError(
                f"sources[{index}] must yield (name, parameter) pairs (use "
                f"module.named_parameters(), not module.parameters()); item {j} is "
                f"{type(item).__name__}"
            )
    return items


def param_groups_for_weight_decay(
    *sources: nn.Module | Iterable[tuple[str, torch.Tensor]],
    weight_decay: float,
    no_decay_names: Sequence[str] = DEFAULT_NO_DECAY_NAMES,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups with and without weight decay.

    Only parameters with ``requires_grad`` are returned. A parameter reached twice (the
    same module passed twice, a parameter shared between modules, tied weights) is put
    in one group once (classified by the first name it was seen with). See :func:`is_no_decay`
    for the split.

    Args:
        *sources: Modules and/or iterables of ``(name, parameter)`` pairs (e.g.
            ``model.named_parameters()``), in the order their parameters should appear.
        weight_decay: Weight decay of the decayed group, ``>= 0`` (the start value when an
            :class:`~jepa_blocks.training.schedules.OptimizerScheduler` ramps it).
        no_decay_names: Name fragments that force no decay (matched against each
            parameter's own name); default ``("token", "pos_embed")``.

    Returns:
        Up to two groups, empty groups left out, in this order:
        ``{"params": [...], "weight_decay": weight_decay, "apply_wd": True}`` and
        ``{"params": [...], "weight_decay": 0.0, "apply_wd": False}``. Parameters keep
        the order in which they were first seen. Pass the list to any ``torch.optim``
        optimizer; add keys such as ``"lr_scale"`` to a group as needed. (No
        ``"param_names"`` key: recent torch refuses to mix named and unnamed groups, which
        would break adding a group of your own.)

    Raises:
        ValueError: If no source holds a trainable parameter.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8))
        >>> groups = param_groups_for_weight_decay(model, weight_decay=0.05)
        >>> [(len(g["params"]), g["weight_decay"], g["apply_wd"]) for g in groups]
        [(1, 0.05, True), (3, 0.0, False)]
        >>> opt = torch.optim.AdamW(groups, lr=1e-3)
    """
    weight_decay = check_float("weight_decay", weight_decay, min_value=0.0)
    if isinstance(no_decay_names, (str, bytes)) or not isinstance(no_decay_names, Sequence):
        raise TypeError(f"no_decay_names must be a sequence of strings, got {no_decay_names!r}")
    for i, fragment in enumerate(no_decay_names):
        if not isinstance(fragment, str) or not fragment:
            raise TypeError(f"no_decay_names[{i}] must be a non-empty str, got {fragment!r}")
    if not sources:
        raise ValueError("sources must hold at least one module or named-parameter iterable")

    seen: set[int] = set()
    decay: list[torch.Tensor] = []
    no_decay: list[torch.Tensor] = []
    for index, source in enumerate(sources):
        for name, param in _named_params(source, index):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            (no_decay if is_no_decay(name, param, no_decay_names) else decay).append(param)
    if not seen:
        raise ValueError("sources hold no parameter with requires_grad=True")

    groups: list[dict[str, Any]] = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay, "apply_wd": True})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "apply_wd": False})
    return groups
