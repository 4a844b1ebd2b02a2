"""Any timm ``VisionTransformer`` as a JEPA token encoder: token dropping, padding, no glue.

``TimmTokenEncoder(model)`` takes the pieces of a timm Vision Transformer (``vit_*``,
``deit*``, ``*_dinov2``, ``*_reg4_*``, ...; with or without a CLS token, registers, a
distillation token, LayerScale, a pre-norm) and runs them the way ``ViTEncoder`` runs its
own, with the same call and the same ``EncoderOutput``. It needs none of timm's private
methods (``_pos_embed``):

1. ``patch_embed`` turns the image into patch tokens ``(B, H * W, D)`` (row-major grid).
2. Positions: timm's learned table is added to the patch tokens, and to the prefix tokens
   (CLS, distillation, registers) where the table has rows for them (``no_embed_class``
   False); with ``dynamic_img_size=True`` the table is resampled to the image's grid
   (``timm.layers.resample_abs_pos_embed``), otherwise the image must have the model's size.
3. ``keep`` ids gather the patch tokens *after* positions were added, so every kept token
   carries the position of its id; the prefix tokens are always kept and never dropped.
4. ``norm_pre``, the blocks (padded slots of a ``MaskIndices`` are hidden from attention
   through the blocks' ``attn_mask``) and the final ``norm``.

Outputs are the patch tokens only, ``(B, K, D)`` in ``keep``'s order: the predictor, the
target helpers and the losses expect one token per patch id. The prefix tokens after the
final norm come with ``return_prefix=True``. The classifier side (``fc_norm``,
``attn_pool``, ``head``) is not used. Without ``keep`` the tokens equal timm's
``forward_features(images)[:, num_prefix_tokens:]``.

The adapter holds the model's own modules and parameters (not copies) under timm's names,
so its ``state_dict`` keys are a subset of the timm model's and training it trains them;
``copy.deepcopy`` (as ``EMATarget`` does) copies them.
"""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from jepa_blocks._checks import (
    check_bool,
    check_finite,
    check_int,
    check_tensor,
    match_dtype,
)
from jepa_blocks.encoders._keep import keep_indices
from jepa_blocks.encoders.vit import EncoderOutput
from jepa_blocks.layers.attention import attention_mask_from_valid
from jepa_blocks.masking.indices import MaskIndices

__all__ = ["TimmTokenEncoder"]

_SUPPORTED = (
    "timm.models.vision_transformer.VisionTransformer and its subclasses (vit_*, deit*, "
    "*_dinov2, *_reg4_*, ...; CLS, distillation and register tokens, LayerScale, learned or "
    "no position table)"
)
_PREFIX_NAMES = ("cls_token", "dist_token", "reg_token")  # timm's order in the sequence


def _vision_transformer_class() -> type | None:
    """timm's ``VisionTransformer`` class if timm's ViT module is loaded (a timm ViT exists)."""
    module = sys.modules.get("timm.models.vision_transformer")
    return getattr(module, "VisionTransformer", None)


class TimmTokenEncoder(nn.Module):
    """A timm Vision Transformer as a token encoder with ``keep=`` dropping and padding masks.

    Args:
        model: A timm ``VisionTransformer`` (``timm.create_model("vit_...")``); its modules
            are shared, not copied. ``patch_drop_rate`` must be 0 (tokens are dropped
            with ``keep``).
        out_layers: Indices of blocks whose patch tokens (before the final norm) are
            returned in ``EncoderOutput.layers`` (negative indices count from the end).

    Attributes:
        embed_dim: Token width ``D``.
        depth: Number of blocks.
        patch_size: Patch side in pixels.
        num_prefix_tokens: CLS, distillation and register tokens ``P``.
        default_grid: Patch grid ``(H, W)`` of the model's image size.
        dynamic_img_size: Other image sizes are accepted (the table is resampled).

    Shapes:
        images ``(B, C, H * p, W * p)`` -> ``EncoderOutput.tokens`` ``(B, K, D)`` (``K =
        H * W`` without ``keep``); prefix tokens ``(B, P, D)`` with ``return_prefix=True``.

    Raises:
        TypeError: ``model`` is not a timm Vision Transformer (the message names what is
            supported).

    Example:
        >>> import timm
        >>> vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=2)
        >>> enc = TimmTokenEncoder(vit)
        >>> keep = torch.tensor([[0, 1, 2, 9], [5, 6, 7, 8]])
        >>> enc(torch.randn(2, 3, 32, 32), keep=keep).tokens.shape
        torch.Size([2, 4, 192])
    """

    def __init__(self, model: nn.Module, *, out_layers: Sequence[int] = ()) -> None:
        super().__init__()
        vit_class = _vision_transformer_class()
        if not isinstance(model, nn.Module) or vit_class is None or not isinstance(model, vit_class):
            raise TypeError(f"model must be a timm Vision Transformer ({_SUPPORTED}), got {type(model).__name__}")
        patch_drop = getattr(model, "patch_drop", None)
        if patch_drop is not None and not isinstance(patch_drop, nn.Identity):
            raise ValueError(
                "model must be created with patch_drop_rate=0: TimmTokenEncoder drops tokens "
                "itself (keep=), and timm's random patch dropout would break the slot-to-id order"
            )
        prefix = [(n, getattr(model, n, None)) for n in _PREFIX_NAMES]
        num_prefix = sum(t.shape[1] for _, t in prefix if t is not None)
        if num_prefix != getattr(model, "num_prefix_tokens", num_prefix):
            raise TypeError(
                f"model has num_prefix_tokens={model.num_prefix_tokens} but its "
                f"{[n for n, t in prefix if t is not None]} hold {num_prefix} tokens: an unsupported "
                f"layout; supported: {_SUPPORTED}"
            )
        # The model's own modules and parameters under timm's names (shared, not copied).
        self.patch_embed = model.patch_embed
        for name, token in prefix:
            self.register_parameter(name, token)
        pos_embed = getattr(model, "pos_embed", None)
        if pos_embed is None or isinstance(pos_embed, nn.Parameter):
            self.register_parameter("pos_embed", pos_embed)
        else:  # a fixed table kept as a buffer
            self.register_buffer("pos_embed", pos_embed)
        self.pos_drop = model.pos_drop
        self.norm_pre = model.norm_pre
        self.blocks = model.blocks
        self.norm = model.norm

        self.embed_dim = int(model.embed_dim)
        self.depth = len(model.blocks)
        self.num_prefix_tokens = num_prefix
        self.no_embed_class = bool(getattr(model, "no_embed_class", False))
        self.dynamic_img_size = bool(getattr(model, "dynamic_img_size", False))
        self.grad_checkpointing = bool(getattr(model, "grad_checkpointing", False))
        patch = self.patch_embed.patch_size
        self.patch_size = int(patch[0]) if isinstance(patch, (tuple, list)) and patch[0] == patch[-1] else patch
        self.img_size = tuple(self.patch_embed.img_size) if self.patch_embed.img_size is not None else None
        self.default_grid = tuple(self.patch_embed.grid_size) if self.patch_embed.grid_size is not None else None
        self._blocks_take_mask = all(
            "attn_mask" in inspect.signature(block.forward).parameters for block in self.blocks
        )
        self.out_layers = self._check_layers("out_layers", out_layers)

    @classmethod
    def from_timm(
        cls,
        name: str,
        *,
        pretrained: bool = False,
        checkpoint_path: str | os.PathLike[str] | None = None,
        pretrained_cfg_overlay: Mapping[str, Any] | None = None,
        out_layers: Sequence[int] = (),
        **timm_kwargs: Any,
    ) -> TimmTokenEncoder:
        """Create a timm ViT by name (without classifier) and wrap it.

        Args:
            name: A timm ViT name, e.g. ``"vit_small_patch14_reg4_dinov2"``.
            pretrained: Load timm's pretrained weights (cached, else downloaded). Without a
                network and without a cached copy this raises ``ConnectionError`` at once.
            checkpoint_path: A local state dict of this architecture, loaded after creation
                (see ``jepa_blocks.encoders._timm.create_timm_model``).
            pretrained_cfg_overlay: timm's overlay, e.g. ``dict(file=path)``.
            out_layers: As in the constructor.
            **timm_kwargs (Any): Other ``timm.create_model`` arguments (``img_size``,
                ``patch_size``, ``dynamic_img_size``, ``drop_path_rate``, ...).

        Returns:
            The encoder, in training mode.

        Example:
            >>> enc = TimmTokenEncoder.from_timm("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=1)
            >>> enc.embed_dim, enc.default_grid, enc.num_prefix_tokens
            (192, (8, 8), 1)
        """
        from jepa_blocks.encoders._timm import create_timm_model

        timm_kwargs.setdefault("num_classes", 0)
        model = create_timm_model(
            name,
            pretrained=pretrained,
            checkpoint_path=checkpoint_path,
            pretrained_cfg_overlay=pretrained_cfg_overlay,
            **timm_kwargs,
        )
        return cls(model, out_layers=out_layers)

    def _check_layers(self, name: str, layers: Sequence[int]) -> tuple[int, ...]:
        if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence):
            raise TypeError(f"{name} must be a sequence of ints, got {layers!r}")
        return tuple(
            check_int(f"{name}[{i}]", layer, min_value=-self.depth, max_value=self.depth - 1) % self.depth
            for i, layer in enumerate(layers)
        )

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass (saves memory) while training."""
        self.grad_checkpointing = check_bool("enable", enable)

    def grid_size_for(self, images: torch.Tensor) -> tuple[int, int]:
        """Patch grid ``(H, W)`` of an image batch ``(B, C, H * p, W * p)`` for this model."""
        h, w = images.shape[-2:]
        if not self.dynamic_img_size:
            if self.img_size is not None and (h, w) != self.img_size:
                raise ValueError(
                    f"images must be {self.img_size[0]}x{self.img_size[1]} for this timm model (create it with "
                    f"dynamic_img_size=True for other sizes), got {h}x{w}"
                )
            return self.default_grid
        ph, pw = self.patch_embed.patch_size
        if not getattr(self.patch_embed, "dynamic_img_pad", False) and (h % ph or w % pw):
            raise ValueError(f"images height and width must be divisible by patch size {(ph, pw)}, got {(h, w)}")
        return -(-h // ph), -(-w // pw)

    def _prefix_tokens(self, batch: int) -> list[torch.Tensor]:
        return [t.expand(batch, -1, -1) for t in (self.cls_token, self.dist_token, self.reg_token) if t is not None]

    def _position_table(self, grid: tuple[int, int]) -> torch.Tensor | None:
        """timm's table ``(1, [P +] H * W, D)``, resampled to ``grid`` when it differs."""
        if self.pos_embed is None or grid == self.default_grid:
            return self.pos_embed
        from timm.layers import resample_abs_pos_embed

        return resample_abs_pos_embed(
            self.pos_embed,
            new_size=list(grid),
            old_size=list(self.default_grid),
            num_prefix_tokens=0 if self.no_embed_class else self.num_prefix_tokens,
        )

    def forward(
        self,
        images: torch.Tensor,
        *,
        keep: MaskIndices | torch.Tensor | None = None,
        out_layers: Sequence[int] | None = None,
        return_prefix: bool = False,
    ) -> EncoderOutput | tuple[EncoderOutput, torch.Tensor]:
        """Encode the kept patches of an image batch.

        Args:
            images: Float tensor ``(B, C, H * p, W * p)``.
            keep: Patch ids to keep on the ``(H, W)`` grid: ``MaskIndices`` ``(B, K)``
                (padded lists), a long tensor ``(B, K)`` (all real), or ``None`` for all.
            out_layers: Overrides the constructor's ``out_layers`` for this call.
            return_prefix: Also return the prefix tokens (CLS, distillation, registers)
                after the final norm, ``(B, P, D)``.

        Returns:
            ``EncoderOutput`` with patch tokens ``(B, K, D)``, or ``(EncoderOutput,
            prefix)`` with ``return_prefix=True``.
        """
        check_tensor("images", images, ndim=4, kind="float")
        in_chans = getattr(getattr(self.patch_embed, "proj", None), "in_channels", None)
        if in_chans is not None and images.shape[1] != in_chans:
            raise ValueError(f"images must have {in_chans} channels, got shape {tuple(images.shape)}")
        check_bool("return_prefix", return_prefix)
        grid = self.grid_size_for(images)
        check_finite(("images", images))
        layers = self.out_layers if out_layers is None else self._check_layers("out_layers", out_layers)
        x = self.patch_embed(match_dtype(images, next(self.patch_embed.parameters()).dtype))
        b = x.shape[0]
        x = x.reshape(b, -1, x.shape[-1])  # (B, H * W, D); dynamic-size models return (B, H, W, D)
        n, d = x.shape[1], x.shape[2]
        if n != grid[0] * grid[1]:
            raise ValueError(f"patch_embed gave {n} tokens for the {grid[0]}x{grid[1]} grid of images {tuple(images.shape)}")

        # 1. Positions on every token (the prefix too where the table has rows for it).
        prefix = self._prefix_tokens(b)
        num_prefix = self.num_prefix_tokens
        pos = self._position_table(grid)
        if pos is not None and self.no_embed_class:
            x = x + pos
        seq = torch.cat([*prefix, x], dim=1) if prefix else x
        if pos is not None and not self.no_embed_class:
            seq = seq + pos
        seq = self.pos_drop(seq)

        # 2. Keep: gather the patch tokens (after their positions), prefix tokens always stay.
        valid = None
        if keep is not None:
            ids, valid = keep_indices(keep, batch=b, grid=grid, module=self)
            patches = torch.gather(seq[:, num_prefix:], 1, ids.unsqueeze(-1).expand(-1, -1, d))
            seq = torch.cat([seq[:, :num_prefix], patches], dim=1)
        attn_mask = None
        if valid is not None:
            full_valid = torch.cat([valid.new_ones(b, num_prefix), valid], dim=1)
            attn_mask = attention_mask_from_valid(full_valid)
            if attn_mask is not None and not self._blocks_take_mask:
                raise ValueError(
                    "keep has padded slots, but this timm version's blocks take no attn_mask: "
                    "pass keep with the same number of ids per sample, or upgrade timm"
                )

        # 3. Blocks and the final norm.
        x = self.norm_pre(seq)
        collected: dict[int, torch.Tensor] = {}
        for i, block in enumerate(self.blocks):
            kwargs = {} if attn_mask is None else {"attn_mask": attn_mask}
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False, **kwargs)
            else:
                x = block(x, **kwargs)
            if i in layers:
                collected[i] = x[:, num_prefix:]
        x = self.norm(x)
        out = EncoderOutput(x[:, num_prefix:], [collected[i] for i in layers], None if attn_mask is None else valid,
                            grid)
        return (out, x[:, :num_prefix]) if return_prefix else out
