"""Lightning callbacks: the EMA-target update and an online kNN / collapse monitor.

Needs Lightning (``pip install 'jepa-blocks[lightning]'``, ``lightning>=2.0``; the older
``pytorch_lightning`` package works too). Nothing else in jepa-blocks imports Lightning.

* :class:`EMATargetCallback` calls :meth:`EMATarget.update
  <jepa_blocks.targets.ema.EMATarget.update>` once per optimizer step (not per
  micro-batch under ``accumulate_grad_batches``), after the step, and logs the momentum.
* :class:`EmbeddingMonitor` encodes a labelled bank and a held-out query set at the end of
  every ``every_n_epochs``-th training epoch, and logs the kNN top-1 accuracy of the
  queries (:func:`~jepa_blocks.evaluation.knn.knn_accuracy`) and collapse diagnostics of
  their embeddings (:func:`~jepa_blocks.evaluation.diagnostics.embedding_diagnostics`:
  effective rank, per-dimension std, ...) through the LightningModule's ``log``.

:class:`~jepa_blocks.training.schedules.OptimizerScheduler` is a torch ``LRScheduler``:
return it from ``configure_optimizers`` with ``"interval": "step"``.

Example:
    A LightningModule holding ``self.encoder`` (a :class:`~jepa_blocks.ViTEncoder`) and
    ``self.target = EMATarget(self.encoder, total_steps=...)``::

        trainer = lightning.Trainer(max_steps=1000, callbacks=[
            EMATargetCallback(),  # target.update(encoder) after each optimizer step
            EmbeddingMonitor(bank_loader, val_loader, module="target"),
        ])
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

try:
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover - depends on the environment
    try:
        import pytorch_lightning as pl
    except ImportError as err:
        raise ImportError(
            "jepa_blocks.integrations.lightning needs Lightning, which is not installed: "
            "pip install 'jepa-blocks[lightning]' (or pip install 'lightning>=2.0')"
        ) from err

from jepa_blocks._checks import check_bool, check_int
from jepa_blocks.evaluation.diagnostics import embedding_diagnostics
from jepa_blocks.evaluation.features import extract_features, pool_tokens
from jepa_blocks.evaluation.knn import knn_accuracy
from jepa_blocks.targets.ema import EMATarget

__all__ = ["EMATargetCallback", "EmbeddingMonitor", "default_embed"]


def _module_attr(pl_module: Any, name: str, what: str) -> nn.Module:
    module = getattr(pl_module, name, None)
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"{what}={name!r}: the LightningModule must have an nn.Module attribute "
            f"{name!r}, got {type(module).__name__}"
        )
    return module


def _check_name(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise TypeError(f"{name} must be a non-empty str (an attribute name), got {value!r}")
    return value


class EMATargetCallback(pl.Callback):
    """Update an :class:`~jepa_blocks.targets.ema.EMATarget` after every optimizer step.

    At the end of each training batch it compares ``trainer.global_step`` (optimizer
    steps taken) with the value at the previous update and calls
    ``target.update(online)`` once if a step was taken. With
    ``accumulate_grad_batches=k`` that is once every ``k`` batches, after the optimizer
    step, as the EMA schedule expects; a resumed fit continues from the restored
    ``global_step`` (the EMATarget's own ``num_steps`` travels in the module's
    ``state_dict``). The momentum used is logged as ``log_name`` (``None``: not logged).

    Args:
        target: Name of the LightningModule attribute holding the ``EMATarget``.
        online: Name of the attribute holding the online encoder it follows.
        log_name: Metric name of the momentum, or ``None``.

    Example:
        >>> cb = EMATargetCallback(target="target", online="encoder")
    """

    def __init__(
        self, *, target: str = "target", online: str = "encoder", log_name: str | None = "ema_momentum"
    ) -> None:
        super().__init__()
        self.target = _check_name("target", target)
        self.online = _check_name("online", online)
        if log_name is not None:
            _check_name("log_name", log_name)
        self.log_name = log_name
        self._last_step: int | None = None

    def _modules(self, pl_module: Any) -> tuple[EMATarget, nn.Module]:
        target = _module_attr(pl_module, self.target, "target")
        if not isinstance(target, EMATarget):
            raise TypeError(
                f"target={self.target!r}: expected an EMATarget, got {type(target).__name__}"
            )
        return target, _module_attr(pl_module, self.online, "online")

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._modules(pl_module)  # fail early with a clear message
        self._last_step = trainer.global_step

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._last_step is None:
            self._last_step = trainer.global_step
        if trainer.global_step == self._last_step:  # accumulating: no optimizer step yet
            return
        self._last_step = trainer.global_step
        target, online = self._modules(pl_module)
        momentum = target.momentum
        target.update(online)
        if self.log_name is not None:
            pl_module.log(self.log_name, momentum, on_step=True, on_epoch=False)


def default_embed(module: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Features of shape ``(B, D)`` from an encoder's output for ``images`` ``(B, ...)``.

    An output with ``.tokens`` (an :class:`~jepa_blocks.EncoderOutput`) or a ``(B, N, D)``
    tensor is mean-pooled over tokens (:func:`~jepa_blocks.evaluation.features.pool_tokens`);
    a ``(B, D)`` tensor is used as is. Computed in float32.
    """
    out = module(images)
    tokens = getattr(out, "tokens", out)
    if not isinstance(tokens, torch.Tensor) or tokens.ndim not in (2, 3):
        raise TypeError(
            "default_embed expects the module to return (B, D) or (B, N, D) features or an "
            f"output with .tokens; got {type(out).__name__}; pass embed=..."
        )
    tokens = tokens.float()
    return tokens if tokens.ndim == 2 else pool_tokens(tokens)


class EmbeddingMonitor(pl.Callback):
    """Online kNN accuracy and collapse diagnostics at the end of training epochs.

    Every ``every_n_epochs`` training epochs, ``module`` (an attribute of the
    LightningModule, e.g. the online ``"encoder"`` or the EMA ``"target"``) encodes
    ``bank`` and ``queries`` in eval mode under ``torch.inference_mode`` (its mode is
    restored afterwards), and the callback logs through ``pl_module.log``:

    * ``{prefix}knn_top1`` (and ``{prefix}knn_top1_k{k}`` for every ``k`` when several
      are given): :func:`~jepa_blocks.evaluation.knn.knn_accuracy` of the queries
      against the bank;
    * ``{prefix}<stat>`` for each of ``stats``, from
      :func:`~jepa_blocks.evaluation.diagnostics.embedding_diagnostics` of the query
      embeddings (default: ``effective_rank``, ``rank_ratio``, ``std_mean``,
      ``std_min``, ``dead_fraction``).

    Keep the two sets small (a few thousand images): under DDP every rank encodes them
    all and logs the same values.

    Args:
        bank: Iterable of ``(images, labels)`` batches, images of shape ``(B, ...)``,
            labels of shape ``(B,)``: the labelled kNN bank.
        queries: Same format: the held-out set whose accuracy is logged.
        module: Name of the LightningModule attribute that encodes.
        embed: ``embed(module, images) -> (B, D)`` features; default
            :func:`default_embed` (mean-pooled tokens).
        k: Neighbours of the kNN vote, one int or several.
        temperature: kNN vote temperature, ``> 0``.
        every_n_epochs: Run at the end of every this many training epochs, ``>= 1``.
        on_train_end: Also run once when training ends if no run happened at its last
            optimizer step (e.g. ``every_n_epochs > 1``); those values go to the
            trainer's loggers directly (``log`` is not allowed there). The latest
            values are always in ``monitor.last``.
        stats: Keys of ``embedding_diagnostics`` to log.
        prefix: Prefix of the metric names.

    Example:
        >>> bank = [(torch.randn(8, 4), torch.arange(8) % 2)]
        >>> monitor = EmbeddingMonitor(bank, bank, module="encoder", k=3)
    """

    def __init__(
        self,
        bank: Iterable[Any],
        queries: Iterable[Any],
        *,
        module: str = "encoder",
        embed: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
        k: int | Sequence[int] = 20,
        temperature: float = 0.07,
        every_n_epochs: int = 1,
        on_train_end: bool = True,
        stats: Sequence[str] = ("effective_rank", "rank_ratio", "std_mean", "std_min", "dead_fraction"),
        prefix: str = "monitor/",
    ) -> None:
        super().__init__()
        for name, loader in (("bank", bank), ("queries", queries)):
            if isinstance(loader, (torch.Tensor, str, bytes)) or not isinstance(loader, Iterable):
                raise TypeError(
                    f"{name} must be an iterable of (images, labels) batches such as a "
                    f"DataLoader, got {type(loader).__name__}"
                )
        self.bank, self.queries = bank, queries
        self.module = _check_name("module", module)
        if embed is not None and not callable(embed):
            raise TypeError(f"embed must be callable, got {type(embed).__name__}")
        self.embed = embed or default_embed
        self.k = [check_int("k", k, min_value=1)] if isinstance(k, int) else [
            check_int(f"k[{i}]", v, min_value=1) for i, v in enumerate(k)
        ]
        if not self.k:
            raise ValueError("k must hold at least one value, got an empty sequence")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"temperature must be a float > 0, got {temperature!r}")
        self.temperature = float(temperature)
        self.every_n_epochs = check_int("every_n_epochs", every_n_epochs, min_value=1)
        self.run_on_train_end = check_bool("on_train_end", on_train_end)
        if isinstance(stats, (str, bytes)):
            raise TypeError(f"stats must be a sequence of str, got {stats!r}")
        self.stats = [_check_name(f"stats[{i}]", s) for i, s in enumerate(stats)]
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
        self.prefix = prefix
        self.last: dict[str, float] = {}
        self._last_run_step: int | None = None

    @torch.no_grad()
    def compute(self, pl_module: Any) -> dict[str, float]:
        """Encode both sets with the module and return the metrics (without logging)."""
        module = _module_attr(pl_module, self.module, "module")
        was_training = module.training
        module.eval()
        try:
            def fn(images: torch.Tensor) -> torch.Tensor:
                return self.embed(module, images)

            xb, yb = extract_features(fn, self.bank, device=pl_module.device)
            xq, yq = extract_features(fn, self.queries, device=pl_module.device)
        finally:
            module.train(was_training)
        acc = knn_accuracy(xb, yb, xq, yq, k=self.k, temperature=self.temperature)
        diag = embedding_diagnostics(xq)
        unknown = [s for s in self.stats if s not in diag]
        if unknown:
            raise ValueError(f"stats {unknown} are not keys of embedding_diagnostics: {sorted(diag)}")
        p = self.prefix
        metrics = {f"{p}knn_top1": acc[self.k[0]]}
        if len(self.k) > 1:
            metrics.update({f"{p}knn_top1_k{k}": acc[k] for k in self.k})
        metrics.update({f"{p}{s}": float(diag[s]) for s in self.stats})
        return metrics

    def _run(self, trainer: Any, pl_module: Any, *, log: bool) -> None:
        self.last = self.compute(pl_module)
        self._last_run_step = trainer.global_step
        if log:
            for name, value in self.last.items():
                pl_module.log(name, value, on_step=False, on_epoch=True)
        else:  # on_train_end may not log through the module: hand it to the loggers
            for logger in trainer.loggers:
                logger.log_metrics(self.last, step=trainer.global_step)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._run(trainer, pl_module, log=True)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.run_on_train_end and self._last_run_step != trainer.global_step:
            self._run(trainer, pl_module, log=False)
