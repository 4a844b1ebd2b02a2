"""Deploy path of an encoder: a tensor-in, tensor-out view and ``torch.export``.

``ViTEncoder.forward`` returns an ``EncoderOutput`` and accepts ``MaskIndices`` for the
kept tokens, which is what training code wants. A deployed model wants plain tensors:
``EncoderTokens`` wraps an encoder so that ``forward(images[, keep[, valid]])`` returns the
final tokens ``(B, K, D)`` only, and ``export_encoder`` runs ``torch.export.export`` on it
with a dynamic batch dimension (and a dynamic number ``K`` of kept tokens). The exported
program runs without this library and saves with ``torch.export.save``; the same
``ExportedProgram`` goes to ONNX through ``torch.onnx.export(program, dynamo=True)``.

The image height and width are fixed at export time (the patch grid, hence the position
embeddings, depends on them); the batch size and ``K`` are not.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.export import Dim, ExportedProgram

from jepa_blocks._checks import check_bool, check_tensor
from jepa_blocks.masking.indices import MaskIndices

__all__ = ["EncoderTokens", "export_encoder"]


class EncoderTokens(nn.Module):
    """An encoder seen as ``images[, keep[, valid]] -> tokens``, for export and ONNX.

    Args:
        encoder: A ``ViTEncoder`` (any module whose ``forward(images, keep=...)`` returns an
            object with a ``tokens`` attribute works).

    Shapes:
        images ``(B, C, H * p, W * p)``; keep: long ``(B, K)`` token ids (optional);
        valid: bool ``(B, K)`` (optional, with ``keep``) -> tokens ``(B, K, D)``
        (``K = H * W`` without ``keep``).

    Example:
        >>> from jepa_blocks.encoders import ViTEncoder
        >>> enc = ViTEncoder(img_size=32, patch_size=4, embed_dim=32, depth=1, num_heads=4)
        >>> EncoderTokens(enc)(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 64, 32])
    """

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        if not isinstance(encoder, nn.Module):
            raise TypeError(f"encoder must be an nn.Module, got {type(encoder).__name__}")
        self.encoder = encoder

    def forward(
        self,
        images: torch.Tensor,
        keep: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final tokens of the kept patches.

        Args:
            images: Float tensor ``(B, C, H * p, W * p)``.
            keep: Long tensor ``(B, K)`` of token ids on the ``(H, W)`` patch grid, or
                ``None`` for every token.
            valid: Bool tensor ``(B, K)``, ``True`` for real ids of ``keep`` (padded lists,
                as in ``MaskIndices``), or ``None`` when every id is real.

        Returns:
            Tokens of shape ``(B, K, D)``; rows of padded ids hold meaningless values.
        """
        if valid is not None:
            if keep is None:
                raise ValueError("valid must come with keep, got keep=None")
            return self.encoder(images, keep=MaskIndices(keep, valid)).tokens
        return self.encoder(images, keep=keep).tokens


def _widen(example: torch.Tensor, dims: dict[int, Dim] | None) -> torch.Tensor:
    """Repeat ``example`` to size 2 along each of its dynamic dimensions of size 1."""
    for dim in dims or {}:
        if example.shape[dim] == 1:
            example = torch.cat((example, example), dim=dim)
    return example


def export_encoder(
    encoder: nn.Module,
    images: torch.Tensor,
    *,
    keep: MaskIndices | torch.Tensor | None = None,
    dynamic_batch: bool = True,
    dynamic_keep: bool = True,
) -> ExportedProgram:
    """``torch.export`` an encoder (in eval mode) as ``images[, keep[, valid]] -> tokens``.

    The encoder is traced in eval mode (no stochastic depth, no dropout) and put back in
    its previous mode afterwards. The program's inputs follow the example: ``(images,)``
    without ``keep``, ``(images, keep)`` for a long tensor and ``(images, keep, valid)``
    for ``MaskIndices``. Its output is the tensor of final tokens ``(B, K, D)``. Call it
    with ``program.module()(images, ...)``; save it with ``torch.export.save``.

    Args:
        encoder: A ``ViTEncoder`` (see ``EncoderTokens``).
        images: Example batch ``(B, C, H * p, W * p)``; ``H * p`` and ``W * p`` are fixed
            in the program.
        keep: Example kept ids: ``MaskIndices`` or long tensor of shape ``(B, K)``, or
            ``None`` to export the full-image encoder.
        dynamic_batch: Let the batch size vary (``torch.export.Dim``, >= 1); ``False``
            fixes it to the example's.
        dynamic_keep: Let ``K`` vary (only with ``keep``); ``False`` fixes it.

    Returns:
        The ``torch.export.ExportedProgram``.

    Example:
        >>> from jepa_blocks.encoders import ViTEncoder
        >>> enc = ViTEncoder(img_size=32, patch_size=4, embed_dim=32, depth=1, num_heads=4)
        >>> program = export_encoder(enc, torch.randn(2, 3, 32, 32))
        >>> program.module()(torch.randn(5, 3, 32, 32)).shape
        torch.Size([5, 64, 32])
    """
    if not isinstance(encoder, nn.Module):
        raise TypeError(f"encoder must be an nn.Module, got {type(encoder).__name__}")
    check_tensor("images", images, ndim=4, kind="float")
    check_bool("dynamic_batch", dynamic_batch)
    check_bool("dynamic_keep", dynamic_keep)
    batch = Dim("batch", min=1) if dynamic_batch else None
    tokens = Dim("keep", min=1) if dynamic_keep else None
    args: tuple[torch.Tensor, ...] = (images,)
    shapes: list[dict[int, Dim] | None] = [{0: batch} if batch is not None else None]
    if keep is not None:
        ids, valid = (keep.indices, keep.valid) if isinstance(keep, MaskIndices) else (keep, None)
        check_tensor("keep", ids, ndim=2, kind="int")
        if ids.shape[0] != images.shape[0]:
            raise ValueError(
                f"keep must have shape ({images.shape[0]}, K) matching images, "
                f"got {tuple(ids.shape)}"
            )
        ids_dims = {i: d for i, d in ((0, batch), (1, tokens)) if d is not None} or None
        # Compact copies: an example that is a view of a larger tensor (mask_to_indices
        # slices its output) would make the exporter guard on the base tensor's size.
        args += (ids.clone(memory_format=torch.contiguous_format),)
        shapes.append(ids_dims)
        if valid is not None:
            args += (valid.clone(memory_format=torch.contiguous_format),)
            shapes.append(ids_dims)
    # The exporter specialises a dimension of size 1 to the constant 1 (0/1 specialisation),
    # so a dynamic dimension of size 1 is traced on an example repeated to size 2.
    args = tuple(_widen(t, dims) for t, dims in zip(args, shapes, strict=True))
    module = EncoderTokens(encoder)
    was_training = encoder.training
    encoder.eval()
    try:
        return torch.export.export(module, args, dynamic_shapes=tuple(shapes))
    finally:
        encoder.train(was_training)
