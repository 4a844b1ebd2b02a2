"""End-to-end fine-tuning of an encoder with a classification head.

:func:`finetune` trains a (copy of an) encoder and a linear head with cross-entropy, the
recipe of MAE / I-JEPA fine-tuning reduced to its core:

* AdamW with **separate learning rates** for the encoder (``encoder_lr``) and the head
  (``head_lr``); optional **layer-wise learning-rate decay** (BEiT / MAE): the encoder
  parameters of depth ``l`` (``0`` = patch embedding, ``1 .. L`` = ``blocks[l - 1]``,
  ``L + 1`` = everything after the blocks, e.g. the final norm) get
  ``encoder_lr * layer_decay ** (L + 1 - l)``;
* weight decay on weight matrices only (see
  :func:`~jepa_blocks.training.param_groups.is_no_decay`), never on the head's bias;
* a per-step schedule: linear warmup from 0 over ``warmup_epochs``, then a cosine decay to
  0 (:class:`~jepa_blocks.training.schedules.OptimizerScheduler`; each group's peak is its
  own learning rate);
* token outputs are average-pooled (``pool="mean"``, JEPA encoders have no CLS token);
* after every epoch the val loader is scored (top-1, ``eval()`` mode, no gradients).

The encoder passed in is deep-copied unless ``inplace=True``, and every parameter of the
trained copy is made trainable (an EMA target's module arrives frozen). The global RNG is
forked and seeded with ``seed`` for the run (head initialisation, dropout, the shuffling of
a ``DataLoader`` without its own generator), so two runs with the same seed and loaders
give the same weights, and the caller's RNG state is left as it was.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sized
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from jepa_blocks._checks import (
    check_bool,
    check_choice,
    check_device,
    check_float,
    check_index_range,
    check_int,
)
from jepa_blocks.evaluation.features import _split_batch, pool_tokens
from jepa_blocks.training.param_groups import is_no_decay
from jepa_blocks.training.schedules import OptimizerScheduler

__all__ = ["FinetuneResult", "finetune", "finetune_param_groups"]


@dataclass
class FinetuneResult:
    """Outcome of :func:`finetune`.

    Attributes:
        top1: Val top-1 accuracy after the last epoch, a fraction in ``[0, 1]`` (the last
            epoch, not the best: choosing the best epoch on the val set would overfit it).
        history: One record per epoch: ``{"epoch", "train_loss", "train_top1",
            "val_top1", "encoder_lr", "head_lr"}`` (the learning rates of the epoch's last
            step, before layer decay).
        encoder: The fine-tuned encoder (the copy, or the original with ``inplace=True``).
        head: The trained head, mapping pooled features ``(B, D)`` to logits ``(B, C)``.

    Example:
        >>> enc = nn.Sequential(nn.Linear(2, 8), nn.ReLU())
        >>> x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
        >>> loader = [(x[i:i + 16], (x[i:i + 16, 0] > 0).long()) for i in range(0, 64, 16)]
        >>> res = finetune(enc, loader, loader, num_classes=2, pool="none", epochs=20,
        ...                encoder_lr=1e-2, head_lr=1e-2, warmup_epochs=0)
        >>> res.top1 > 0.9, len(res.history), res.encoder is enc
        (True, 20, False)
    """

    top1: float
    history: list[dict[str, float]] = field(default_factory=list)
    encoder: nn.Module | None = None
    head: nn.Module | None = None


def _layer_id(name: str, depth: int) -> int:
    """Depth of an encoder parameter for layer decay: 0 stem, i + 1 for blocks.i, depth + 1 after."""
    parts = name.split(".")
    if parts[0] == "blocks" and len(parts) > 1 and parts[1].isdigit():
        return int(parts[1]) + 1
    if parts[0] in ("patch_embed", "pos_embed", "cls_token", "mask_token", "rope"):
        return 0
    return depth + 1


def finetune_param_groups(
    encoder: nn.Module,
    head: nn.Module,
    *,
    encoder_lr: float,
    head_lr: float,
    weight_decay: float,
    layer_decay: float | None = None,
) -> list[dict[str, Any]]:
    """AdamW parameter groups with separate encoder / head learning rates.

    Each group carries ``"lr"`` (its peak learning rate), ``"lr_scale"`` (the same value:
    :class:`~jepa_blocks.training.schedules.OptimizerScheduler` multiplies it by a
    schedule that peaks at 1), ``"weight_decay"``, ``"apply_wd"`` and a ``"name"``
    (``"encoder.layer{l}.decay"``, ``"encoder.layer{l}.no_decay"``, ``"head.decay"``,
    ``"head.no_decay"``). Empty groups are left out.

    Args:
        encoder: The encoder; with ``layer_decay`` it needs a ``blocks`` sequence.
        head: The classification head.
        encoder_lr: Peak learning rate of the encoder, ``>= 0`` (0 keeps it fixed).
        head_lr: Peak learning rate of the head, ``> 0``.
        weight_decay: AdamW weight decay of weight matrices, ``>= 0``.
        layer_decay: Layer-wise decay factor in ``(0, 1]``, or ``None`` for none.

    Returns:
        A list of parameter-group dicts for ``torch.optim.AdamW``.
    """
    if not isinstance(encoder, nn.Module):
        raise TypeError(f"encoder must be an nn.Module, got {type(encoder).__name__}")
    if not isinstance(head, nn.Module):
        raise TypeError(f"head must be an nn.Module, got {type(head).__name__}")
    encoder_lr = check_float("encoder_lr", encoder_lr, min_value=0.0)
    head_lr = check_float("head_lr", head_lr, min_value=0.0, min_inclusive=False)
    weight_decay = check_float("weight_decay", weight_decay, min_value=0.0)
    depth = 0
    if layer_decay is not None:
        layer_decay = check_float("layer_decay", layer_decay, min_value=0.0, max_value=1.0, min_inclusive=False)
        blocks = getattr(encoder, "blocks", None)
        if not isinstance(blocks, (nn.ModuleList, nn.Sequential)):
            raise ValueError(
                f"layer_decay needs an encoder with a `blocks` ModuleList (a ViT), got {type(encoder).__name__}; "
                "pass layer_decay=None"
            )
        depth = len(blocks)
    groups: dict[str, dict[str, Any]] = {}

    def add(name: str, param: torch.Tensor, lr: float, no_decay: bool) -> None:
        key = f"{name}.{'no_decay' if no_decay else 'decay'}"
        group = groups.setdefault(
            key,
            {"params": [], "lr": lr, "lr_scale": lr, "weight_decay": 0.0 if no_decay else weight_decay,
             "apply_wd": not no_decay, "name": key},
        )
        group["params"].append(param)

    seen: set[int] = set()
    for name, param in encoder.named_parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        layer = _layer_id(name, depth) if layer_decay is not None else 0
        scale = layer_decay ** (depth + 1 - layer) if layer_decay is not None else 1.0
        add(f"encoder.layer{layer}", param, encoder_lr * scale, is_no_decay(name, param))
    for name, param in head.named_parameters():
        if id(param) in seen:
            raise ValueError(f"head shares parameter {name!r} with the encoder")
        seen.add(id(param))
        add("head", param, head_lr, is_no_decay(name, param))
    return list(groups.values())


def _features(encoder: nn.Module, images: torch.Tensor, pool: str) -> torch.Tensor:
    """Pooled features ``(B, D)`` from the encoder's output on images ``(B, ...)``."""
    out = encoder(images)
    tokens = getattr(out, "tokens", out)
    valid = getattr(out, "valid", None)
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(
            f"encoder must return a tensor or an object with a `tokens` tensor, got {type(out).__name__}"
        )
    if pool == "mean":
        if tokens.ndim != 3:
            raise ValueError(
                f"pool='mean' needs encoder tokens of shape (B, N, D), got {tuple(tokens.shape)}; "
                "use pool='none' for an encoder that returns (B, D) features"
            )
        return pool_tokens(tokens, valid)
    if tokens.ndim != 2:
        raise ValueError(
            f"pool='none' needs encoder features of shape (B, D), got {tuple(tokens.shape)}; "
            "use pool='mean' for token outputs"
        )
    return tokens


def _check_labels(labels: torch.Tensor, num_classes: int, loader: str, index: int) -> None:
    """Integer class ids in ``[0, num_classes)`` for a non-empty batch (one host sync)."""
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"{loader} batch {index}: labels must be integer class ids, got dtype {labels.dtype}")
    if labels.numel() == 0:
        raise ValueError(f"{loader} batch {index} is empty: every batch needs at least one sample")
    check_index_range(f"{loader} batch {index}: labels", labels, num_classes, what="(the head's classes)")


@torch.no_grad()
def _evaluate(encoder, head, loader, pool, device, amp_dtype) -> float:
    encoder.eval()
    head.eval()
    correct = total = 0
    for i, batch in enumerate(loader):
        images, labels = _split_batch(batch, i)
        images, labels = images.to(device), labels.to(device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = head(_features(encoder, images, pool))
        _check_labels(labels, logits.shape[-1], "val_loader", i)
        correct += int((logits.argmax(dim=1) == labels).sum())
        total += labels.shape[0]
    if total == 0:
        raise ValueError("val_loader yielded no samples")
    return correct / total


def _num_batches(loader: Iterable[Any]) -> int:
    if not isinstance(loader, Sized):
        raise TypeError(
            f"train_loader must have a len() (a DataLoader or a list of batches), got {type(loader).__name__}"
        )
    n = len(loader)
    if n == 0:
        raise ValueError("train_loader must yield at least one batch, got len 0")
    return n


def finetune(
    encoder: nn.Module,
    train_loader: Iterable[Any],
    val_loader: Iterable[Any],
    *,
    num_classes: int | None = None,
    head: nn.Module | None = None,
    epochs: int = 10,
    encoder_lr: float = 1e-4,
    head_lr: float = 1e-3,
    weight_decay: float = 0.05,
    layer_decay: float | None = None,
    warmup_epochs: float = 1.0,
    label_smoothing: float = 0.0,
    clip_grad: float | None = None,
    pool: Literal["mean", "none"] = "mean",
    device: torch.device | str | None = None,
    amp_dtype: torch.dtype | None = None,
    inplace: bool = False,
    seed: int = 0,
) -> FinetuneResult:
    """Fine-tune an encoder and a classification head with cross-entropy.

    Args:
        encoder: Maps images ``(B, C, H, W)`` to tokens ``(B, N, D)`` (a tensor or an
            output with a ``tokens`` field, such as ``ViTEncoder``'s) or, with
            ``pool="none"``, to features ``(B, D)``.
        train_loader: Sized iterable of ``(images, labels)`` batches (a ``DataLoader``),
            labels of shape ``(B,)`` in ``[0, num_classes)``; its length sets the schedule.
        val_loader: Iterable of ``(images, labels)`` batches scored after every epoch.
        num_classes: Classes of the default head ``nn.Linear(D, num_classes)``; needed
            when ``head`` is None.
        head: Your own head mapping ``(B, D)`` to logits ``(B, num_classes)``; used as
            is (not copied). ``None`` builds a linear head (weights ~ N(0, 0.01^2)
            truncated, zero bias; ``D`` from ``encoder.embed_dim`` or one forward pass).
        epochs: Passes over ``train_loader``, ``>= 1``.
        encoder_lr: Peak learning rate of the encoder, ``>= 0``; 0 keeps its weights
            exactly as they were (a linear probe trained by SGD, with dropout active).
        head_lr: Peak learning rate of the head, ``> 0``.
        weight_decay: AdamW weight decay of weight matrices.
        layer_decay: Layer-wise learning-rate decay in ``(0, 1]`` (MAE uses 0.65-0.75)
            for encoders with ``blocks``; ``None`` for none.
        warmup_epochs: Linear warmup length in epochs (fractions allowed), ``<= epochs``.
        label_smoothing: Cross-entropy label smoothing in ``[0, 1)``.
        clip_grad: Max global gradient norm, or ``None`` for no clipping.
        pool: ``"mean"`` averages the encoder's tokens; ``"none"`` takes its ``(B, D)``
            output as is.
        device: Where to train; ``None`` uses the encoder's parameter device.
        amp_dtype: ``torch.bfloat16`` or ``torch.float16`` for autocast (float16 adds a
            gradient scaler), ``None`` for full precision.
        inplace: Train ``encoder`` itself instead of a deep copy.
        seed: Seed of the forked global RNG during the run.

    Returns:
        A :class:`FinetuneResult`.
    """
    if not isinstance(encoder, nn.Module):
        raise TypeError(f"encoder must be an nn.Module, got {type(encoder).__name__}")
    if head is not None and not isinstance(head, nn.Module):
        raise TypeError(f"head must be an nn.Module or None, got {type(head).__name__}")
    if head is None and num_classes is None:
        raise ValueError("num_classes must be given when head is None (it sizes the default linear head)")
    if num_classes is not None:
        num_classes = check_int("num_classes", num_classes, min_value=2)
    epochs = check_int("epochs", epochs, min_value=1)
    check_float("encoder_lr", encoder_lr, min_value=0.0)
    check_float("head_lr", head_lr, min_value=0.0, min_inclusive=False)
    warmup_epochs = check_float("warmup_epochs", warmup_epochs, min_value=0.0, max_value=float(epochs))
    label_smoothing = check_float("label_smoothing", label_smoothing, min_value=0.0, max_value=1.0,
                                  max_inclusive=False)
    if clip_grad is not None:
        clip_grad = check_float("clip_grad", clip_grad, min_value=0.0, min_inclusive=False)
    pool = check_choice("pool", pool, ("mean", "none"))
    if amp_dtype is not None and amp_dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"amp_dtype must be None, torch.bfloat16 or torch.float16, got {amp_dtype!r}")
    inplace = check_bool("inplace", inplace)
    seed = check_int("seed", seed, min_value=-(2**63), max_value=2**64 - 1)  # manual_seed's range
    steps_per_epoch = _num_batches(train_loader)
    if device is None:
        first = next(encoder.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    device = check_device("device", device)

    fork_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        # 1. The model: a trainable copy of the encoder and a head.
        model = encoder if inplace else copy.deepcopy(encoder)
        model.requires_grad_(True).to(device)
        if head is None:
            dim = getattr(model, "embed_dim", None)
            if not isinstance(dim, int):
                images, _ = _split_batch(next(iter(train_loader)), 0)
                with torch.no_grad():
                    dim = _features(model.eval(), images.to(device), pool).shape[1]
            head = nn.Linear(dim, num_classes)
            nn.init.trunc_normal_(head.weight, std=0.01)
            nn.init.zeros_(head.bias)
        head.to(device)

        # 2. Optimiser with separate encoder / head groups; per-step warmup + cosine.
        groups = finetune_param_groups(model, head, encoder_lr=encoder_lr, head_lr=head_lr,
                                       weight_decay=check_float("weight_decay", weight_decay, min_value=0.0),
                                       layer_decay=layer_decay)
        optimizer = torch.optim.AdamW(groups)
        total = epochs * steps_per_epoch
        scheduler = OptimizerScheduler(optimizer, total_steps=total, lr=(0.0, 1.0, 0.0),
                                       warmup_steps=min(total, round(warmup_epochs * steps_per_epoch)))
        scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
        params = [p for g in groups for p in g["params"]]

        # 3. The loop: cross-entropy on every batch, val top-1 after every epoch.
        history: list[dict[str, float]] = []
        for epoch in range(epochs):
            model.train()
            head.train()
            loss_sum, correct, seen = 0.0, 0, 0
            for i, batch in enumerate(train_loader):
                images, labels = _split_batch(batch, i)
                images, labels = images.to(device), labels.to(device)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    logits = head(_features(model, images, pool))
                _check_labels(labels, logits.shape[-1], "train_loader", i)
                loss = F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"fine-tuning loss is {loss.item()} at epoch {epoch}, batch {i}; lower encoder_lr/head_lr"
                    )
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if epoch == 0 and i == 0 and encoder_lr > 0 and all(p.grad is None for p in model.parameters()):
                    raise ValueError(
                        "encoder received no gradient: its forward runs without autograd (pass an "
                        "EMATarget's .module, not the EMATarget itself)"
                    )
                if clip_grad is not None:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(params, clip_grad)
                scaler.step(optimizer)
                scaler.update()
                lrs = scheduler.current()["lr"]
                scheduler.step()
                loss_sum += loss.item() * labels.shape[0]
                correct += int((logits.argmax(dim=1) == labels).sum())
                seen += labels.shape[0]
            if seen == 0:
                raise ValueError(f"train_loader yielded no samples in epoch {epoch}")
            val_top1 = _evaluate(model, head, val_loader, pool, device, amp_dtype)
            history.append({"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_top1": correct / seen,
                            "val_top1": val_top1, "encoder_lr": encoder_lr * lrs, "head_lr": head_lr * lrs})
    model.eval()
    head.eval()
    return FinetuneResult(top1=history[-1]["val_top1"], history=history, encoder=model, head=head)
