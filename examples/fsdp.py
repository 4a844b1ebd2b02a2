"""Parallel wrapping and checkpoint I/O of the example trainer: DDP, or FSDP2 with ``--fsdp``.

The trainer's loop is the same for both; only these builders differ.

* DDP (default under torchrun): the encoder and predictor are wrapped in
  ``DistributedDataParallel``; the EMA target is a plain copy on every rank; rank 0 writes
  ``RUN/last.pt`` with ``save_checkpoint``.
* FSDP2 (``--fsdp``): every ``TransformerBlock`` and then the root of the context encoder,
  of the predictor *and of the EMA target's copy* is sharded in place with
  ``torch.distributed.fsdp.fully_shard`` (parameters become ``DTensor`` shards along dim
  0). The EMA target is built from the unsharded encoder and sharded the same way, so
  ``EMATarget.update`` lerps each rank's target shard towards the same rank's online shard
  (``torch._foreach_lerp_`` over DTensors with equal placements: local, no collective).
  Checkpoints are a ``torch.distributed.checkpoint`` (DCP) directory ``RUN/last.dcp``
  written by every rank (its shards; the unsharded entries once): the models, the EMA
  target and the optimizer (``get_optimizer_state_dict``: keyed by parameter names) as DCP
  tensors, everything else (terms, schedules, loop position) as one pickled blob. It is
  written to ``last.dcp.tmp`` and renamed when complete.
"""

from __future__ import annotations

import io
import os
import shutil

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from jepa_blocks import EMATarget
from jepa_blocks.distributed import unwrap_module
from jepa_blocks.layers import TransformerBlock
from jepa_blocks.training import load_checkpoint, save_checkpoint

SHARDED = ("encoder", "predictor", "target", "optimizer")  # entries saved as DCP tensors


def shard_(module: nn.Module, *, per_block: bool = True) -> nn.Module:
    """FSDP2 in place: each ``TransformerBlock`` (if ``per_block``), then the root (the rest).

    ``per_block=False`` gathers the whole module at its forward: for a module that calls
    its blocks' layers one by one instead of ``block(x)`` (the predictor's
    ``shared_context`` layout), where per-block unshard hooks would never run.
    """
    from torch.distributed.fsdp import fully_shard

    if per_block:
        for block in [m for m in module.modules() if isinstance(m, TransformerBlock)]:
            fully_shard(block)
    fully_shard(module)
    return module


def wrap_models(cfg, encoder: nn.Module, predictor: nn.Module, target: EMATarget, world: int):
    """``(encoder, predictor)`` DDP-wrapped, or FSDP2-sharded in place with ``target.module``.

    Build ``target`` from the encoder before, and the optimizer after, from the unwrapped
    modules (FSDP2 replaces the parameters by their shards).
    """
    if cfg.fsdp:
        if world < 2:
            raise ValueError(f"--fsdp needs torchrun with at least 2 processes, got {world}")
        if getattr(cfg, "resume_fallback", False):
            raise ValueError("--resume-fallback reads .pt checkpoints; --fsdp writes OUT/last.dcp: use one of them")
        shard_(encoder)
        shard_(predictor, per_block=getattr(predictor, "mode", "per_block") == "per_block")
        shard_(target.module)
        # A root run without backward (the target, always under no_grad) keeps its full
        # parameters after forward; reshard them so the EMA update sees the shards.
        target.module.register_forward_hook(lambda module, args, output: module.reshard())
    elif world > 1:
        encoder, predictor = DDP(encoder), DDP(predictor)
    return encoder, predictor


def clip_gradients(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """``clip_grad_norm_`` that also takes FSDP2 shards (DTensor gradients).

    The global norm is ``sqrt(all-reduced sum of the shards' squares + the unsharded
    gradients' squares)`` (unsharded gradients are already the same on every rank, so they
    are counted once); every gradient is scaled by ``min(1, max_norm / (norm + 1e-6))`` as
    torch does. Returns the norm as a plain 0-dim tensor.
    """
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    if not any(isinstance(g, DTensor) for g in grads):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    sharded = torch.zeros((), dtype=torch.float32, device=local[0].device)
    plain = torch.zeros_like(sharded)
    for g, loc in zip(grads, local, strict=True):
        if isinstance(g, DTensor):
            sharded += loc.float().square().sum()
        else:
            plain += loc.float().square().sum()
    dist.all_reduce(sharded)
    norm = (sharded + plain).sqrt()
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    torch._foreach_mul_(local, coef)
    return norm


class LoadedCheckpoint(dict):
    """The entries of a loaded checkpoint, with the ``path`` it came from."""

    def __init__(self, entries: dict, path: str) -> None:
        super().__init__(entries)
        self.path = path


class CheckpointIO:
    """Saving and loading the trainer's state: ``last.pt`` by rank 0 (DDP, one process) or a
    DCP directory ``last.dcp`` by every rank (``--fsdp``).

    Attributes:
        sharded: Whether ``--fsdp`` is on (then every rank saves, evaluates and loads).
        writes: Whether this rank takes part in saving (and evaluating: under FSDP a
            forward is a collective).
        last_path: ``RUN/last.pt`` or ``RUN/last.dcp``.
        optimizer: What the checkpoint's ``"optimizer"`` entry is read from and loaded into:
            the optimizer, or under FSDP a view with parameter-name keys.
    """

    def __init__(self, cfg, *, master: bool, encoder: nn.Module, predictor: nn.Module, target: nn.Module,
                 terms: nn.Module, optimizer) -> None:
        self.sharded = bool(cfg.fsdp)
        self.writes = master or self.sharded
        self.last_path = os.path.join(cfg.out, "last.dcp" if self.sharded else "last.pt")
        self.optimizer = _NamedOptimizerState((encoder, predictor, terms), optimizer) if self.sharded else optimizer
        self._live = {"encoder": unwrap_module(encoder), "predictor": unwrap_module(predictor), "target": target,
                      "optimizer": self.optimizer}

    def save(self, path: str, state: dict) -> None:
        """Write ``state`` (call on every rank that :attr:`writes`)."""
        if not self.sharded:
            save_checkpoint(path, state)
            return
        import torch.distributed.checkpoint as dcp

        buf = io.BytesIO()
        torch.save({k: v for k, v in state.items() if k not in SHARDED}, buf)
        tmp = path + ".tmp"
        if dist.get_rank() == 0 and os.path.exists(tmp):
            shutil.rmtree(tmp)
        dist.barrier()
        dcp.save({**{k: state[k] for k in SHARDED}, "plain": buf.getvalue()}, checkpoint_id=tmp)
        dist.barrier()
        if dist.get_rank() == 0:  # replace the previous checkpoint only once this one is complete
            old = path + ".old"
            if os.path.exists(path):
                os.replace(path, old)
            os.replace(tmp, path)
            if os.path.exists(old):
                shutil.rmtree(old)
        dist.barrier()

    def load(self, path: str, *, map_location) -> LoadedCheckpoint:
        """The checkpoint at ``path``; under FSDP the sharded entries are read into this
        rank's live state dicts (its shards), the rest from the pickled blob."""
        if not self.sharded:
            return load_checkpoint(path, map_location=map_location)
        import torch.distributed.checkpoint as dcp

        state = {**{k: self._live[k].state_dict() for k in SHARDED}, "plain": b""}
        dcp.load(state, checkpoint_id=path)
        plain = torch.load(io.BytesIO(state.pop("plain")), map_location=map_location, weights_only=False)
        return LoadedCheckpoint({**plain, **state}, path)


class _NamedOptimizerState:
    """``state_dict`` / ``load_state_dict`` of an optimizer over FSDP2 shards, keyed by
    parameter names (``torch.distributed.checkpoint.state_dict``), state initialised."""

    def __init__(self, modules: tuple[nn.Module, ...], optimizer) -> None:
        self.model = nn.ModuleList([unwrap_module(m) for m in modules])  # a view: names 0.*, 1.*, ...
        self.optimizer = optimizer

    def state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(self.model, self.optimizer, optim_state_dict=state)
