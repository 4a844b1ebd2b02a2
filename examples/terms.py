"""Optional objectives of the H-JEPA trainer, as pluggable terms.

The trainer always minimises the multi-level latent prediction loss. Every other
objective is a *term*: an ``nn.Module`` built from the config that receives the step's
tensors (a :class:`StepBatch`) and returns a ``LossOutput`` whose ``total`` is the
*weighted* value added to the loss and whose ``terms`` are named scalars for logging.
A term owns its state (a projector, an EMA copy of a pool, a codebook, a temperature):
it is saved with the checkpoint through ``state_dict``.

The interface, all optional except ``forward``:

* ``forward(batch) -> LossOutput`` -- once per micro-batch, inside the step's graph;
* ``after_step(momentum)`` -- after the optimizer step and the EMA update (EMA copies
  follow the target encoder's momentum here);
* ``log_values() -> dict`` -- extra values for the log line (not per micro-batch).

Adding a term: write its class here and add one line to ``TERMS``: the name and a
builder ``(cfg, ctx) -> term or None`` (``None`` when the config does not ask for it).
Trainable terms are optimised with the encoder; their gradients are averaged over the
ranks by the trainer, so a term needs no DDP wrapper.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from jepa_blocks import (
    MultiBlockMasker,
    SIGRegLoss,
    VICRegLoss,
    hierarchical_targets,
)
from jepa_blocks.distributed import all_reduce_with_grad
from jepa_blocks.evaluation import pool_tokens
from jepa_blocks.losses import InfoNCELoss, LossOutput, NTXentLoss
from jepa_blocks.losses.lejepa import LeJEPALoss
from jepa_blocks.masking.multicrop import LOCAL_MASKING_DEFAULTS, crop_and_resize, sample_crop_boxes
from jepa_blocks.necks import MLPProjector
from jepa_blocks.pooling import AttentionPool
from jepa_blocks.quantizers import VectorQuantizer
from jepa_blocks.targets import ema_update_
from jepa_blocks.training import sample_seed

# -----------------------------------------------------------------------------
# What a term receives


@dataclass
class StepBatch:
    """One micro-batch's tensors and models, as the core loop computed them.

    Attributes:
        images: Views of shape ``(B, V, C, H, W)``; the first ``jepa_views`` are the masked
            JEPA views.
        context: The context encoder's output on the masked JEPA views, rows sample-major
            ``(B * jepa_views, Kc, D)``.
        target: The EMA target's output on the same views, all patches ``(B * jepa_views, N, D)``.
        encoder, predictor: The online modules (DDP-wrapped under torchrun).
        target_encoder: The ``EMATarget``.
        latent_loss: The core latent loss module (local crops reuse it).
        autocast: The step's autocast context (re-enterable).
        rows: Rows of the global batch held by this micro-batch (rank and accumulation aware).
        global_batch: Samples per global batch.
        seed: ``(seed, epoch, batch)`` mixed: the seed of every draw a term makes this step.
    """

    images: torch.Tensor
    context: object
    target: object
    encoder: nn.Module
    predictor: nn.Module
    target_encoder: nn.Module
    latent_loss: nn.Module
    autocast: Callable
    rows: slice
    global_batch: int
    seed: int
    jepa_views: int = 1
    _cache: dict = field(default_factory=dict)

    def generator(self, tag: int) -> torch.Generator:
        """A CPU generator of this step for the draw named ``tag`` (same on every rank)."""
        return torch.Generator().manual_seed(sample_seed(self.seed, tag))

    def _of_view(self, rows: torch.Tensor | None, view: int) -> torch.Tensor | None:
        """Rows of JEPA view ``view`` from a sample-major ``(B * jepa_views, ...)`` tensor."""
        return None if rows is None else rows.unflatten(0, (self.images.shape[0], self.jepa_views))[:, view]

    def pooled_context(self, view: int, pool: nn.Module) -> torch.Tensor:
        """``pool`` of the context tokens of JEPA view ``view``: ``(B, D)``, computed once per
        micro-batch (terms sharing the pool share the result and its graph)."""
        key = ("context", view, id(pool))
        if key not in self._cache:
            self._cache[key] = pool(self._of_view(self.context.tokens, view), self._of_view(self.context.valid, view))
        return self._cache[key]

    def target_of_view(self, view: int):
        """EMA target tokens (all patches) of view ``view``, computed once per micro-batch."""
        if view < self.jepa_views:
            return self._of_view(self.target.tokens, view)
        if ("target", view) not in self._cache:
            with self.autocast(), torch.no_grad():
                self._cache[("target", view)] = self.target_encoder(self.images[:, view]).tokens
        return self._cache[("target", view)]


def standardize(x: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """``(x - mean) / (std + eps)`` per feature, with the *global* batch's statistics.

    Under DDP the sums are all-reduced with gradients, so every rank standardises as one
    process would on the concatenated batch.
    """
    n = all_reduce_with_grad(x.new_tensor(float(x.shape[0])))
    mean = all_reduce_with_grad(x.sum(0)) / n
    var = all_reduce_with_grad(((x - mean) ** 2).sum(0)) / (n - 1)
    return (x - mean) / (var.sqrt() + eps)


# -----------------------------------------------------------------------------
# Pooling shared by the terms on pooled features


class FeaturePool(nn.Module):
    """Pooled ``(B, D)`` float32 features: the mean of the real tokens, or a learned-query
    ``AttentionPool`` whose EMA copy (same momentum as the target encoder) pools the target
    side, keeping JEPA's stop-gradient."""

    def __init__(self, kind: str, dim: int, num_heads: int) -> None:
        super().__init__()
        self.kind = kind
        if kind == "attention":
            self.online = AttentionPool(dim=dim, num_heads=num_heads)
            self.ema = copy.deepcopy(self.online).requires_grad_(False)

    def forward(self, tokens: torch.Tensor, valid: torch.Tensor | None = None, *, target: bool = False):
        if self.kind == "mean":
            return pool_tokens(tokens.float(), valid)
        return (self.ema if target else self.online)(tokens.float(), valid)[:, 0]

    def after_step(self, momentum: float) -> None:
        if self.kind == "attention":
            ema_update_(list(self.ema.parameters()), list(self.online.parameters()), momentum)


# -----------------------------------------------------------------------------
# The terms


class PooledRegulariser(nn.Module):
    """``--reg sigreg|vicreg|ntxent|infonce``: a term on pooled context features.

    SIGReg acts on the standardised pooled context features of the JEPA view; the pair
    terms (VICReg, NT-Xent, InfoNCE) match them to the pooled EMA-target features of the
    second view (of the same view when there is one view).
    """

    def __init__(self, kind: str, weight: float, pool: FeaturePool, distributed: bool) -> None:
        super().__init__()
        self.kind, self.weight, self.pool = kind, weight, pool
        self.loss = {
            "sigreg": lambda: SIGRegLoss(num_directions=256, gather_distributed=distributed, auto_step=False),
            "vicreg": lambda: VICRegLoss(gather_distributed=distributed),
            "ntxent": lambda: NTXentLoss(temperature=0.1, gather_distributed=distributed),  # C-JEPA-style
            "infonce": lambda: InfoNCELoss(gather_distributed=distributed),  # temperature in [0.05, 0.2]
        }[kind]()

    def forward(self, batch: StepBatch) -> LossOutput:
        pooled = batch.pooled_context(0, self.pool)
        logs = {}
        if self.kind == "sigreg":
            value = self.loss(standardize(pooled))
        else:
            view = 1 if batch.images.shape[1] > 1 else 0
            with torch.no_grad():
                other = self.pool(batch.target_of_view(view), target=True)
            value = self.loss(pooled, other)
            if "temperature" in self.loss.last_terms:
                logs["temperature"] = self.loss.last_terms["temperature"]
        return LossOutput(self.weight * value, {"reg": value.detach(), **logs})

    def after_step(self, momentum: float) -> None:
        if self.kind == "sigreg":
            self.loss.advance()  # new SIGReg directions once per optimizer step


class CodebookTerm(nn.Module):
    """``--vq-codes N``: a VQ codebook over the layer-normed pooled context features (the
    encoder cannot lower the commitment loss by shrinking its features)."""

    def __init__(self, cfg, pool: FeaturePool, distributed: bool) -> None:
        super().__init__()
        self.pool = pool
        self.vq = VectorQuantizer(num_codes=cfg.vq_codes, dim=cfg.embed_dim, refresh_every=cfg.vq_refresh_every,
                                  gather_distributed=distributed, seed=cfg.seed)

    def forward(self, batch: StepBatch) -> LossOutput:
        pooled = batch.pooled_context(0, self.pool)
        out = self.vq(torch.nn.functional.layer_norm(pooled, pooled.shape[-1:]))
        return LossOutput(out.loss, {"vq_commit": out.loss.detach(), "vq_perplexity": out.perplexity,
                                     "vq_usage": out.usage})

    def log_values(self) -> dict:
        return {"vq_usage_window": self.vq.usage()}


def check_local_size(cfg) -> None:
    """``--local-size`` must be a multiple of ``--patch-size`` no larger than the image."""
    if cfg.local_size % cfg.patch_size or not cfg.patch_size <= cfg.local_size <= cfg.img_size:
        raise ValueError(f"--local-size must be a multiple of --patch-size {cfg.patch_size} in "
                         f"[{cfg.patch_size}, {cfg.img_size}], got {cfg.local_size}")


class LocalCrops(nn.Module):
    """``--local-crops N``: multi-crop JEPA. ``N`` small crops per image, each with its own
    multi-block masks, predicted by the same predictor on the crops' smaller grid.

    Boxes and masks are drawn for the whole global batch from the step's seed and each
    micro-batch takes its rows, so any number of ranks sees what one process sees.
    """

    def __init__(self, cfg) -> None:
        super().__init__()
        check_local_size(cfg)
        if cfg.local_levels > cfg.levels:
            raise ValueError(f"--local-levels must be <= --levels {cfg.levels}, got {cfg.local_levels}")
        self.num, self.size, self.scale = cfg.local_crops, cfg.local_size, cfg.local_scale
        self.img_size, self.weight, self.levels = cfg.img_size, cfg.local_weight, cfg.local_levels
        self.masker = MultiBlockMasker(grid_size=cfg.local_size // cfg.patch_size,
                                       **{**LOCAL_MASKING_DEFAULTS, "levels": cfg.local_levels},
                                       target_scale=cfg.target_scale, context_scale=cfg.context_scale)

    def forward(self, batch: StepBatch) -> LossOutput:
        n, rows = self.num, batch.rows
        gen = batch.generator(0x6C6F63616C)
        boxes = sample_crop_boxes(batch.global_batch, image_size=self.img_size, num_crops=n, scale=self.scale,
                                  generator=gen)[rows]
        images = batch.images[:, 0]
        crops = crop_and_resize(images, boxes.to(images.device), size=self.size).flatten(0, 1)
        masks = self.masker(batch.global_batch * n, generator=gen).rows(rows.start * n, rows.stop * n)
        masks = masks.to(images.device)
        with batch.autocast():
            with torch.no_grad():
                full = batch.target_encoder(crops)
                targets = hierarchical_targets(full.tokens.float(), grid_size=full.grid_size, targets=masks.targets)
            ctx = batch.encoder(crops, keep=masks.context)
            preds = batch.predictor(ctx.tokens, context_indices=masks.context, targets=masks.targets,
                                    grid_size=ctx.grid_size, num_levels=self.levels)
        loss, _ = batch.latent_loss([p.float() for p in preds], targets, [t.valid for t in masks.targets],
                                    return_terms=True)
        return LossOutput(self.weight * loss, {"local": loss.detach()})


class ViewInvariance(nn.Module):
    """``--reg lejepa``: LeJEPA's view objective on the pooled online features of every view.

    Each view's pooled features (the masked context of the JEPA views; a full forward of the
    other views) go through a small projector; the term is
    ``(1 - lam) * mean_v ||z_v - mean_v(z)||^2 + lam * mean_v SIGReg(z_v)``
    (:class:`jepa_blocks.losses.lejepa.LeJEPALoss`), scaled by ``--reg-weight``.
    """

    def __init__(self, cfg, pool: FeaturePool, distributed: bool) -> None:
        super().__init__()
        if cfg.views < 2:
            raise ValueError(f"--reg lejepa needs --views >= 2, got {cfg.views}")
        self.pool, self.weight = pool, cfg.reg_weight or 1.0
        if tuple(cfg.proj_dims) == (0,):  # no projector: the term acts on the pooled features themselves
            self.projector = nn.Identity()
        elif min(cfg.proj_dims) < 1:
            raise ValueError(f"--proj-dims must be positive widths, or the single value 0 (no projector), "
                             f"got {tuple(cfg.proj_dims)}")
        else:
            self.projector = MLPProjector(in_dim=cfg.embed_dim, hidden_dims=cfg.proj_dims[:-1],
                                          out_dim=cfg.proj_dims[-1], distributed=distributed)
        self.loss = LeJEPALoss(lam=cfg.lejepa_lambda, seed=cfg.seed, gather_distributed=distributed, auto_step=False)
        self.local_views = cfg.lejepa_local_views
        if self.local_views:
            check_local_size(cfg)
            self.local_size, self.local_scale, self.img_size = cfg.local_size, cfg.local_scale, cfg.img_size

    def local_crops(self, batch: StepBatch) -> torch.Tensor:
        """``--lejepa-local-views L`` small crops per image, ``(B, L, C, s, s)``: crop ``j``
        is cut from augmented view ``j mod V``; the boxes are drawn for the global batch from
        the step's seed, so any number of ranks sees what one process sees."""
        b, v = batch.images.shape[:2]
        boxes = sample_crop_boxes(batch.global_batch, image_size=self.img_size, num_crops=self.local_views,
                                  scale=self.local_scale, generator=batch.generator(0x6C6A6C6F63))
        boxes = boxes[batch.rows].to(batch.images.device)
        crops = [crop_and_resize(batch.images[:, j % v], boxes[:, j : j + 1], size=self.local_size)
                 for j in range(self.local_views)]
        return torch.cat(crops, dim=1)

    def forward(self, batch: StepBatch) -> LossOutput:
        b, v = batch.images.shape[:2]
        pooled = [batch.pooled_context(i, self.pool) for i in range(batch.jepa_views)]
        if v > batch.jepa_views:
            with batch.autocast():
                rest = batch.encoder(batch.images[:, batch.jepa_views:].flatten(0, 1)).tokens
            pooled += list(self.pool(rest).unflatten(0, (b, v - batch.jepa_views)).unbind(1))
        n_local = 0
        if self.local_views:
            crops = self.local_crops(batch)  # (B, L, C, s, s)
            n_local = crops.shape[1]
            with batch.autocast():
                tokens = batch.encoder(crops.flatten(0, 1)).tokens
            pooled += list(self.pool(tokens).unflatten(0, (b, n_local)).unbind(1))
        z = self.projector(torch.cat(pooled)).unflatten(0, (v + n_local, b))  # (V + L, B, P)
        out = self.loss(z[:v], local_views=z[v:] if n_local else None, return_terms=True)
        return LossOutput(self.weight * out.total, {"reg": out.total.detach(),
                                                    **{k: t.detach() for k, t in out.terms.items()}})

    def after_step(self, momentum: float) -> None:
        self.loss.sigreg.advance()  # new SIGReg directions once per optimizer step


# -----------------------------------------------------------------------------
# Registry: name -> builder(cfg, ctx) returning the term or None


@dataclass
class BuildContext:
    """What builders may use besides the config: the shared pool and the process count."""

    pool: FeaturePool
    distributed: bool


TERMS: dict[str, Callable] = {
    "reg": lambda cfg, ctx: (PooledRegulariser(cfg.reg, cfg.reg_weight or REG_WEIGHTS[cfg.reg], ctx.pool,
                                               ctx.distributed) if cfg.reg in REG_WEIGHTS else None),
    "lejepa": lambda cfg, ctx: ViewInvariance(cfg, ctx.pool, ctx.distributed) if cfg.reg == "lejepa" else None,
    "vq": lambda cfg, ctx: CodebookTerm(cfg, ctx.pool, ctx.distributed) if cfg.vq_codes else None,
    "local": lambda cfg, ctx: LocalCrops(cfg) if cfg.local_crops else None,
}
# Default weights of the pooled regularisers (--reg-weight 0 picks these).
REG_WEIGHTS = {"sigreg": 0.005, "vicreg": 0.01, "ntxent": 0.05, "infonce": 0.05}
REG_CHOICES = ("none", *REG_WEIGHTS, "lejepa")


class TermSet(nn.Module):
    """The active terms of a run (and the pool they share), summed into one ``LossOutput``."""

    def __init__(self, cfg, *, distributed: bool) -> None:
        super().__init__()
        pooled_terms = cfg.reg != "none" or cfg.vq_codes  # no unused attention pool otherwise
        self.pool = FeaturePool(cfg.pool if pooled_terms else "mean", cfg.embed_dim, cfg.num_heads)
        ctx = BuildContext(self.pool, distributed)
        built = {name: build(cfg, ctx) for name, build in TERMS.items()}
        self.terms = nn.ModuleDict({k: t for k, t in built.items() if t is not None})

    def forward(self, batch: StepBatch) -> LossOutput:
        total, logs = 0.0, {}
        for term in self.terms.values():
            out = term(batch)
            total = total + out.total
            logs.update(out.terms)
        return LossOutput(total, logs)

    def after_step(self, momentum: float) -> None:
        self.pool.after_step(momentum)
        for term in self.terms.values():
            if hasattr(term, "after_step"):
                term.after_step(momentum)

    def log_values(self) -> dict:
        return functools.reduce(lambda acc, t: {**acc, **t.log_values()},
                                (t for t in self.terms.values() if hasattr(t, "log_values")), {})
