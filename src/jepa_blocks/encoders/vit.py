"""Vision Transformer encoder that processes only the tokens it is asked to keep.

The JEPA context encoder sees a subset of the patches. Dropping the other tokens (rather
than zeroing them) is what makes a context of 25% cost about a quarter of the full
image. Per-sample subsets of different sizes arrive as ``MaskIndices`` padded to the
batch maximum; padded tokens are hidden from attention, so each sample's output equals
running it alone on exactly its kept tokens.

Inputs are validated at ``forward`` / ``forward_tokens``; NaN/Inf images or tokens and
``keep`` ids outside the patch grid raise ``ValueError`` (value checks).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal, NamedTuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from jepa_blocks._checks import (
    check_bool,
    check_choice,
    check_finite,
    check_float,
    check_grid,
    check_int,
    check_same_device,
    check_tensor,
    match_dtype,
)
from jepa_blocks.encoders._keep import keep_indices
from jepa_blocks.grid import token_positions
from jepa_blocks.layers import (
    PatchEmbed,
    attention_mask_from_valid,
    init_transformer_weights,
    rescale_residual_branches,
    transformer_stack,
)
from jepa_blocks.masking.indices import MaskIndices
from jepa_blocks.positional.rope2d import RoPE2D
from jepa_blocks.positional.sincos import sincos_2d

__all__ = ["EncoderOutput", "ViTEncoder"]

#: ViTEncoder arguments that ``from_checkpoint`` never reads from a training config.
_RUNTIME_OPTIONS = ("drop_path_rate", "grad_checkpointing", "fused_attn", "out_layers")


def _strip_wrapper_prefixes(state: Mapping[str, Any]) -> dict[str, Any]:
    """Remove ``module.`` (DDP) and ``_orig_mod.`` (``torch.compile``) prefixes shared by all keys."""
    out = dict(state)
    while out:
        for prefix in ("module.", "_orig_mod."):
            if all(k.startswith(prefix) for k in out):
                out = {k[len(prefix) :]: v for k, v in out.items()}
                break
        else:
            return out
    return out


class EncoderOutput(NamedTuple):
    """What ``ViTEncoder`` returns.

    Attributes:
        tokens: Final tokens after the last norm, shape ``(B, K, D)``; ``K`` is the number
            of kept tokens (``H * W`` without ``keep``).
        layers: Outputs of the blocks listed in ``out_layers`` (before the final norm),
            each of shape ``(B, K, D)``, in the order requested.
        valid: Bool tensor ``(B, K)``, ``True`` for real tokens, or ``None`` when every
            token is real.
        grid_size: The patch grid ``(H, W)`` of the input.
    """

    tokens: torch.Tensor
    layers: list[torch.Tensor]
    valid: torch.Tensor | None
    grid_size: tuple[int, int]


class ViTEncoder(nn.Module):
    """ViT encoder with token dropping, 2D sin-cos or RoPE2D positions, and no CLS token.

    Args:
        img_size: Default image size (an int or ``(H, W)``); other sizes divisible by
            ``patch_size`` work too.
        patch_size: Patch side in pixels.
        in_chans: Image channels.
        embed_dim: Token width ``D``.
        depth: Number of transformer blocks.
        num_heads: Attention heads per block.
        mlp_ratio: MLP hidden width as a multiple of ``D``.
        qkv_bias: Bias in the qkv projections.
        drop_path_rate: Stochastic depth, increasing linearly to this rate at the last block.
        layer_scale_init: LayerScale initial value (e.g. ``1e-5``), ``None`` for none.
        pos_embed: ``"sincos"`` adds fixed 2D sin-cos embeddings before dropping tokens;
            ``"rope"`` rotates q and k by each kept token's true ``(row, col)``.
        rope_theta: RoPE frequency base.
        fused_attn: Use ``scaled_dot_product_attention``.
        grad_checkpointing: Recompute each block in the backward pass (saves memory).
        out_layers: Indices of blocks whose outputs are returned in ``EncoderOutput.layers``
            (negative indices count from the end).

    Shapes:
        images ``(B, C, H * p, W * p)`` -> ``EncoderOutput.tokens`` ``(B, K, D)``.

    Example:
        >>> enc = ViTEncoder(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4)
        >>> keep = torch.tensor([[0, 1, 2, 9], [5, 6, 7, 8]])
        >>> enc(torch.randn(2, 3, 32, 32), keep=keep).tokens.shape
        torch.Size([2, 4, 64])
    """

    def __init__(
        self,
        *,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        layer_scale_init: float | None = None,
        pos_embed: Literal["sincos", "rope"] = "sincos",
        rope_theta: float = 100.0,
        fused_attn: bool = True,
        grad_checkpointing: bool = False,
        out_layers: Sequence[int] = (),
    ) -> None:
        super().__init__()
        img_h, img_w = check_grid("img_size", img_size)
        self.patch_size = check_int("patch_size", patch_size, min_value=1)
        if img_h % patch_size or img_w % patch_size:
            raise ValueError(f"img_size {(img_h, img_w)} must be divisible by patch_size {patch_size}")
        self.embed_dim = check_int("embed_dim", embed_dim, min_value=1)
        self.depth = check_int("depth", depth, min_value=1)
        self.num_heads = check_int("num_heads", num_heads, min_value=1)
        if embed_dim % num_heads:
            raise ValueError(f"num_heads must divide embed_dim, got embed_dim={embed_dim}, num_heads={num_heads}")
        self.pos_embed = check_choice("pos_embed", pos_embed, ("sincos", "rope"))
        if pos_embed == "sincos" and embed_dim % 4:
            raise ValueError(f"embed_dim must be divisible by 4 for sincos positions, got {embed_dim}")
        head_dim = embed_dim // num_heads
        if pos_embed == "rope" and head_dim % 4:
            raise ValueError(f"embed_dim / num_heads must be divisible by 4 for rope, got head dim {head_dim}")
        drop_path_rate = check_float("drop_path_rate", drop_path_rate, min_value=0.0, max_value=1.0, max_inclusive=False)
        rope_theta = check_float("rope_theta", rope_theta, min_value=1.0, min_inclusive=False)
        fused_attn = check_bool("fused_attn", fused_attn)
        self.grad_checkpointing = check_bool("grad_checkpointing", grad_checkpointing)
        self.out_layers = self._check_layers("out_layers", out_layers)
        self.default_grid = (img_h // patch_size, img_w // patch_size)

        self.patch_embed = PatchEmbed(
            img_size=(img_h, img_w),
            patch_size=patch_size,
            in_chans=check_int("in_chans", in_chans, min_value=1),
            embed_dim=embed_dim,
        )
        self.rope = RoPE2D(head_dim=head_dim, theta=rope_theta) if pos_embed == "rope" else None
        self.blocks = transformer_stack(
            embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            drop_path_rate=drop_path_rate,
            layer_scale_init=layer_scale_init,
            fused_attn=fused_attn,
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.apply(init_transformer_weights)
        rescale_residual_branches(self.blocks)

    def _check_layers(self, name: str, layers: Sequence[int]) -> tuple[int, ...]:
        if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence):
            raise TypeError(f"{name} must be a sequence of ints, got {layers!r}")
        out = []
        for i, layer in enumerate(layers):
            layer = check_int(f"{name}[{i}]", layer, min_value=-self.depth, max_value=self.depth - 1)
            out.append(layer % self.depth)
        return tuple(out)

    def grid_size_for(self, images: torch.Tensor) -> tuple[int, int]:
        """Patch grid ``(H, W)`` of an image batch ``(B, C, H * p, W * p)``."""
        h, w = images.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(
                f"images height and width must be divisible by patch_size {self.patch_size}, "
                f"got {(h, w)}"
            )
        return h // self.patch_size, w // self.patch_size

    def forward(
        self,
        images: torch.Tensor,
        *,
        keep: MaskIndices | torch.Tensor | None = None,
        out_layers: Sequence[int] | None = None,
    ) -> EncoderOutput:
        """Encode the kept patches of an image batch.

        Args:
            images: Float tensor ``(B, C, H * p, W * p)``.
            keep: Token ids to keep on the ``(H, W)`` patch grid: ``MaskIndices`` of shape
                ``(B, K)`` (padded lists), a long tensor ``(B, K)`` (all real), or ``None``
                for every token.
            out_layers: Overrides the constructor's ``out_layers`` for this call.

        Returns:
            ``EncoderOutput`` with tokens ``(B, K, D)``.

        Images of another floating dtype than the weights are cast to it (unless autocast
        is on). NaN/Inf images and out-of-range ``keep`` ids raise ``ValueError`` while
        value checks are enabled (see the module docstring).
        """
        check_tensor("images", images, ndim=4, kind="float")
        check_same_device(("images", images), module=self)
        if images.shape[1] != self.patch_embed.proj.in_channels:
            raise ValueError(
                f"images must have {self.patch_embed.proj.in_channels} channels, got shape "
                f"{tuple(images.shape)}"
            )
        grid = self.grid_size_for(images)
        check_finite(("images", images))
        tokens = self.patch_embed(match_dtype(images, self.patch_embed.proj.weight.dtype))
        return self._encode(tokens, grid_size=grid, keep=keep, out_layers=out_layers)

    def forward_tokens(
        self,
        tokens: torch.Tensor,
        *,
        grid_size: int | tuple[int, int],
        keep: MaskIndices | torch.Tensor | None = None,
        out_layers: Sequence[int] | None = None,
    ) -> EncoderOutput:
        """Encode already-embedded patch tokens (any patchifier: conv, tubelets, ...).

        Args:
            tokens: Patch tokens ``(B, H * W, D)`` in row-major grid order, without
                position embeddings.
            grid_size: The patch grid ``(H, W)``.
            keep: As in ``forward``.
            out_layers: As in ``forward``.

        Returns:
            ``EncoderOutput`` with tokens ``(B, K, D)``.
        """
        check_tensor("tokens", tokens, ndim=3, kind="float")
        check_same_device(("tokens", tokens), module=self)
        check_finite(("tokens", tokens))
        return self._encode(tokens, grid_size=grid_size, keep=keep, out_layers=out_layers)

    def _encode(
        self,
        tokens: torch.Tensor,
        *,
        grid_size: int | tuple[int, int],
        keep: MaskIndices | torch.Tensor | None,
        out_layers: Sequence[int] | None,
    ) -> EncoderOutput:
        check_tensor("tokens", tokens, ndim=3, kind="float")
        tokens = match_dtype(tokens, self.norm.weight.dtype)
        h, w = check_grid("grid_size", grid_size)
        b, n, d = tokens.shape
        if n != h * w or d != self.embed_dim:
            raise ValueError(
                f"tokens must have shape (B, {h * w}, {self.embed_dim}) for grid {(h, w)}, "
                f"got {tuple(tokens.shape)}"
            )
        layers = self.out_layers if out_layers is None else self._check_layers("out_layers", out_layers)

        valid = None
        if keep is None:
            ids = torch.arange(n, device=tokens.device).expand(b, n)
        else:
            ids, valid = keep_indices(keep, batch=b, grid=(h, w), module=self)
        if self.rope is None:
            pos = sincos_2d(token_positions(torch.arange(n, device=tokens.device), (h, w)), d)
            tokens = tokens + pos.to(tokens.dtype)
            rope = None
        else:
            positions = token_positions(ids, (h, w)).to(tokens.device)  # (B, K, 2)
            rope = self.rope.cos_sin(positions)
        # keep was range-checked above: gather directly (gather_tokens would check again).
        x = tokens if keep is None else torch.gather(tokens, 1, ids.unsqueeze(-1).expand(-1, -1, d))
        attn_mask = attention_mask_from_valid(valid)

        collected: dict[int, torch.Tensor] = {}
        for i, block in enumerate(self.blocks):
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, rope=rope, attn_mask=attn_mask, use_reentrant=False)
            else:
                x = block(x, rope=rope, attn_mask=attn_mask)
            if i in layers:
                collected[i] = x
        out = [collected[i] for i in layers]
        if attn_mask is None:  # no padding: report every token as real
            valid = None
        return EncoderOutput(self.norm(x), out, valid, (h, w))

    def export(
        self,
        images: torch.Tensor,
        *,
        keep: MaskIndices | torch.Tensor | None = None,
        dynamic_batch: bool = True,
        dynamic_keep: bool = True,
    ) -> torch.export.ExportedProgram:
        """``torch.export`` this encoder for deployment: ``images[, keep[, valid]] -> tokens``.

        See ``jepa_blocks.encoders.export.export_encoder``: traced in eval mode (the mode is
        restored), dynamic batch size (and number of kept tokens), image size fixed to the
        example's; the program returns the final tokens ``(B, K, D)`` as a plain tensor.

        Args:
            images: Example batch ``(B, C, H * p, W * p)``.
            keep: Example kept ids (``MaskIndices`` or long ``(B, K)``), or ``None``.
            dynamic_batch: Let the batch size vary.
            dynamic_keep: Let ``K`` vary (with ``keep``).

        Returns:
            The ``torch.export.ExportedProgram``; run it with ``program.module()(images)``.

        Example:
            >>> enc = ViTEncoder(img_size=32, patch_size=4, embed_dim=32, depth=1, num_heads=4)
            >>> program = enc.export(torch.randn(2, 3, 32, 32))
            >>> program.module()(torch.randn(3, 3, 32, 32)).shape
            torch.Size([3, 64, 32])
        """
        from jepa_blocks.encoders.export import export_encoder

        return export_encoder(
            self, images, keep=keep, dynamic_batch=dynamic_batch, dynamic_keep=dynamic_keep
        )

    @classmethod
    def from_timm(
        cls,
        model: str | nn.Module,
        *,
        img_size: int | tuple[int, int] | None = None,
        patch_size: int | None = None,
        pretrained: bool = False,
        checkpoint_path: str | os.PathLike[str] | None = None,
        pretrained_cfg_overlay: Mapping[str, Any] | None = None,
        timm_kwargs: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> ViTEncoder:
        """Build an encoder with the architecture (and weights) of a timm ViT.

        ``model`` is a timm model name or a timm ``VisionTransformer`` instance. Its
        width, depth, heads, MLP ratio, qkv bias and LayerScale are copied, and so are the
        weights of the patch embedding, the blocks and the final norm when there are
        weights to take: an instance's own weights, ``pretrained=True`` or
        ``checkpoint_path``; otherwise the encoder keeps its own I-JEPA initialisation.
        timm's learned position table and its CLS / register tokens are not used
        (positions here are fixed sin-cos or RoPE); to keep them, wrap the model with
        :class:`~jepa_blocks.encoders.timm_adapter.TimmTokenEncoder` instead. A timm ViT
        with pieces this encoder lacks (qk-norm, a pre-norm, another MLP) raises
        ``ValueError``.

        A name is created with ``timm.create_model(name, pretrained=pretrained,
        img_size=img_size, patch_size=patch_size, num_classes=0)`` (``None`` sizes: the
        name's). ``pretrained=True`` takes the weights from the local cache, else downloads
        them; without a network and without a cached copy it raises ``ConnectionError``
        at once instead of retrying the hub for a minute (see
        ``jepa_blocks.encoders._timm``). The default never downloads.

        Args:
            model: A timm ViT name, e.g. ``"vit_tiny_patch16_224"``, or a timm
                ``VisionTransformer`` instance.
            img_size: Image size for this encoder (default: the timm model's).
            patch_size: Patch size (default: the timm model's; with a name it is passed to
                timm, which resamples pretrained patch weights).
            pretrained: Load timm's pretrained weights (a name only).
            checkpoint_path: A local state dict of the timm architecture (``.pth``,
                ``.safetensors``, ...; a name only), e.g. ``torch.save(vit.state_dict(), path)``.
            pretrained_cfg_overlay: timm's ``pretrained_cfg_overlay`` (a name only), e.g.
                ``dict(file=path)`` with ``pretrained=True`` loads a local file through
                timm's converter for the model.
            timm_kwargs: Other ``timm.create_model`` arguments for a name, e.g.
                ``{"depth": 2}`` to match a file saved from a 2-block model.
            **kwargs (Any): Other ``ViTEncoder`` arguments (``pos_embed``, ``drop_path_rate``,
                ``grad_checkpointing``, ``out_layers``, ``depth``, ...).

        Returns:
            The encoder, in training mode.

        Raises:
            TypeError: ``model`` is neither a name nor a timm Vision Transformer.
            ValueError: Unknown name, an architecture this encoder cannot hold, a file that
                does not fit, or weight options with an instance.
            ConnectionError: ``pretrained=True`` offline without a cached copy.

        Example:
            >>> enc = ViTEncoder.from_timm("vit_tiny_patch16_224", img_size=32, patch_size=4)
            >>> enc.embed_dim, enc.depth
            (192, 12)
        """
        if isinstance(model, str):
            from jepa_blocks.encoders._timm import create_timm_model

            if timm_kwargs is not None and not isinstance(timm_kwargs, Mapping):
                raise TypeError(f"timm_kwargs must be a dict or None, got {type(timm_kwargs).__name__}")
            create_kwargs = {"num_classes": 0, **(timm_kwargs or {})}
            create_kwargs.update((k, v) for k, v in (("img_size", img_size), ("patch_size", patch_size)) if v is not None)
            label = repr(model)
            model = create_timm_model(
                model,
                pretrained=pretrained,
                checkpoint_path=checkpoint_path,
                pretrained_cfg_overlay=pretrained_cfg_overlay,
                **create_kwargs,
            )
            has_weights = pretrained or checkpoint_path is not None
        elif isinstance(model, nn.Module):
            if pretrained or checkpoint_path is not None or pretrained_cfg_overlay is not None or timm_kwargs:
                raise ValueError(
                    "pretrained, checkpoint_path, pretrained_cfg_overlay and timm_kwargs apply to a model name; "
                    f"a {type(model).__name__} instance already has its weights (they are copied)"
                )
            label, has_weights = type(model).__name__, True
        else:
            raise TypeError(
                f"model must be a timm model name or a timm VisionTransformer, got {type(model).__name__} {model!r}"
            )
        blocks = getattr(model, "blocks", None)
        patch_embed = getattr(model, "patch_embed", None)
        if (
            not isinstance(blocks, (nn.Sequential, nn.ModuleList))
            or len(blocks) == 0
            or not hasattr(blocks[0], "attn")
            or not hasattr(getattr(patch_embed, "proj", None), "in_channels")
        ):
            raise TypeError(f"model {label} ({type(model).__name__}) is not a plain timm Vision Transformer")
        first = blocks[0]
        embed_dim = model.embed_dim
        ls = getattr(first, "ls1", None)
        timm_patch = patch_embed.patch_size
        timm_patch = timm_patch[0] if isinstance(timm_patch, (tuple, list)) else timm_patch
        config = dict(
            img_size=img_size if img_size is not None else tuple(patch_embed.img_size),
            patch_size=patch_size if patch_size is not None else int(timm_patch),
            in_chans=patch_embed.proj.in_channels,
            embed_dim=embed_dim,
            depth=len(blocks),
            num_heads=first.attn.num_heads,
            mlp_ratio=first.mlp.fc1.out_features / embed_dim,
            qkv_bias=first.attn.qkv.bias is not None,
            # A trained gamma's first entry (any sign) only seeds an init that its weights replace.
            layer_scale_init=(abs(float(ls.gamma.detach().flatten()[0])) or 1e-5) if hasattr(ls, "gamma") else None,
        )
        config.update(kwargs)
        encoder = cls(**config)
        source = model.state_dict()
        own = encoder.state_dict()
        loaded = {k: v for k, v in source.items() if k in own and own[k].shape == v.shape}
        missing = [k for k in own if k not in loaded]
        if missing:
            raise ValueError(f"timm model {label} lacks weights for {missing[:5]} (architecture differs)")
        # Trunk weights this encoder has no place for change what the blocks compute.
        # (Blocks past this encoder's depth, with depth=... in kwargs, are left out on purpose.)
        extra = [
            k for k in source
            if k.startswith(("blocks.", "patch_embed.", "norm.", "norm_pre.")) and k not in own
            and not (k.startswith("blocks.") and int(k.split(".")[1]) >= encoder.depth)
        ]
        if extra:
            raise ValueError(
                f"timm model {label} has weights ViTEncoder has no place for: {extra[:5]} (e.g. qk-norm, a "
                "pre-norm, another MLP); wrap it with TimmTokenEncoder instead"
            )
        if has_weights:  # otherwise keep our I-JEPA initialisation
            encoder.load_state_dict(loaded)
        return encoder

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | os.PathLike[str] | Mapping[str, Any],
        *,
        which: Literal["target", "online"] = "target",
        weights: bool = True,
        map_location: Any = "cpu",
        **overrides: Any,
    ) -> ViTEncoder:
        """Load the encoder of a training checkpoint (the example trainer's ``last.pt``).

        The checkpoint is a dict with the training ``"config"`` (its ``img_size``,
        ``patch_size``, ``embed_dim``, ``depth``, ``num_heads``, ``pos_embed``, and any other
        ``ViTEncoder`` argument found there, build the encoder), the online encoder's
        ``state_dict`` under ``"encoder"`` and the ``EMATarget``'s under ``"target"``
        (``module.``-prefixed). ``module.`` (DDP) and ``_orig_mod.`` (``torch.compile``)
        prefixes are removed. The training-only options (``drop_path_rate``,
        ``grad_checkpointing``) are not read from the config; pass them in
        ``overrides``.

        Args:
            checkpoint: A file written by ``jepa_blocks.training.save_checkpoint`` (loaded
                with ``load_checkpoint``: verified, ``weights_only``), or the loaded dict.
            which: ``"target"``, the EMA encoder (the usual choice for features), or
                ``"online"``, the context encoder trained by the optimizer.
            weights: Load the weights; ``False`` gives the same architecture at random
                initialisation (a baseline).
            map_location: Where tensors are loaded (a file only).
            **overrides (Any): ``ViTEncoder`` arguments that replace the config's.

        Returns:
            The encoder, in eval mode.

        Raises:
            ValueError: The checkpoint lacks the config or the weights, or they do not fit.

        Example:
            >>> enc = ViTEncoder(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=4)
            >>> ckpt = {"config": {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 1,
            ...                    "num_heads": 4, "pos_embed": "sincos", "lr": 1e-3},
            ...         "encoder": enc.state_dict()}
            >>> loaded = ViTEncoder.from_checkpoint(ckpt, which="online")
            >>> torch.equal(loaded.blocks[0].attn.qkv.weight, enc.blocks[0].attn.qkv.weight)
            True
        """
        which = check_choice("which", which, ("target", "online"))
        weights = check_bool("weights", weights)
        if isinstance(checkpoint, Mapping):
            ckpt, label = checkpoint, "checkpoint"
        elif isinstance(checkpoint, (str, os.PathLike)):
            from jepa_blocks.training.checkpoint import load_checkpoint

            ckpt, label = load_checkpoint(checkpoint, map_location=map_location), f"checkpoint '{checkpoint}'"
        else:
            raise TypeError(f"checkpoint must be a path or a dict, got {type(checkpoint).__name__}")
        config = ckpt.get("config")
        if not isinstance(config, Mapping):
            raise ValueError(f"{label} has no 'config' dict to build the encoder from (keys: {sorted(ckpt)[:10]})")
        names = set(inspect.signature(cls.__init__).parameters) - {"self", *_RUNTIME_OPTIONS}
        arch = {k: v for k, v in config.items() if k in names}
        for key in ("img_size", "patch_size", "embed_dim", "depth", "num_heads"):
            if key not in arch and key not in overrides:
                raise ValueError(f"{label}: config lacks {key!r}; pass it as a keyword argument")
        arch.update(overrides)
        encoder = cls(**arch)
        if weights:
            key = "target" if which == "target" else "encoder"
            state = ckpt.get(key)
            if not isinstance(state, Mapping):
                raise ValueError(f"{label} has no {key!r} state dict (which={which!r}); keys: {sorted(ckpt)[:10]}")
            if which == "target":  # EMATarget.state_dict(): "module.<encoder key>" and "num_steps"
                state = {k[len("module.") :]: v for k, v in state.items() if k.startswith("module.")}
            try:
                encoder.load_state_dict(_strip_wrapper_prefixes(state))
            except RuntimeError as err:
                raise ValueError(f"{label}: the {which} weights do not fit ViTEncoder({arch}): {err}") from err
        return encoder.eval()
