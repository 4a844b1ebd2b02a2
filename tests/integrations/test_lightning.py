"""The Lightning integration: callbacks, the scheduler as a Lightning LR scheduler, the example.

Skipped where Lightning is not installed (``pip install 'jepa-blocks[lightning]'``),
except the test of the error message when it is missing.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from jepa_blocks.evaluation import embedding_diagnostics, knn_accuracy
from jepa_blocks.targets import EMATarget
from jepa_blocks.training import OptimizerScheduler


def test_missing_lightning_names_the_extra(monkeypatch):
    for name in ("lightning", "lightning.pytorch", "pytorch_lightning"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    monkeypatch.delitem(sys.modules, "jepa_blocks.integrations.lightning", raising=False)
    with pytest.raises(ImportError, match=r"jepa-blocks\[lightning\]"):
        importlib.import_module("jepa_blocks.integrations.lightning")
    monkeypatch.delitem(sys.modules, "jepa_blocks.integrations.lightning", raising=False)
    import jepa_blocks.integrations  # noqa: F401  (imports no framework)


L = pytest.importorskip("lightning")
from jepa_blocks.integrations.lightning import EMATargetCallback, EmbeddingMonitor  # noqa: E402


def _trainer(tmp_path, **kwargs):
    opts = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, default_root_dir=tmp_path)
    return L.Trainer(**{**opts, **kwargs})


def _blobs(n: int, seed: int) -> torch.utils.data.TensorDataset:
    """Two Gaussian classes in 6-D at -3 and +3: cosine kNN after a linear map is near perfect."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.randn(n, 6, generator=g) + 6.0 * y[:, None].float() - 3.0
    return torch.utils.data.TensorDataset(x, y)


class Tiny(L.LightningModule):
    """Linear encoder + head on blobs, an EMA target, and the OptimizerScheduler."""

    def __init__(self, total_steps: int = 6, momentum=(0.9, 0.9)):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Linear(6, 5)
        self.head = nn.Linear(5, 1)
        self.target = EMATarget(self.encoder, total_steps=total_steps, momentum=momentum)
        self.total_steps = total_steps
        self.seen: list[dict[str, torch.Tensor]] = []  # online weights after each optimizer step

    def training_step(self, batch, batch_idx):
        x, y = batch
        return (self.head(self.encoder(x)).squeeze(1) - y.float()).square().mean()

    def configure_optimizers(self):
        opt = torch.optim.AdamW([{"params": self.encoder.parameters(), "weight_decay": 0.1},
                                 {"params": self.head.parameters(), "weight_decay": 0.0}], lr=0.05)
        sched = OptimizerScheduler(opt, total_steps=self.total_steps, warmup_steps=2, lr=(0.01, 0.05, 0.001),
                                   weight_decay=(0.1, 0.3))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class _RecordOnline(L.Callback):
    """Record the online weights whenever an optimizer step was taken (after the EMA callback)."""

    def __init__(self):
        self.last = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self.last:
            self.last = trainer.global_step
            pl_module.seen.append({k: v.detach().clone() for k, v in pl_module.encoder.state_dict().items()})


def _loader(n=32, batch=4, seed=0):
    return torch.utils.data.DataLoader(_blobs(n, seed), batch_size=batch)


def test_optimizer_scheduler_drives_lr_and_wd_under_lightning(tmp_path):
    model = Tiny(total_steps=6)
    trainer = _trainer(tmp_path, max_steps=4)
    trainer.fit(model, _loader())  # Lightning rejected it before it became an LRScheduler
    sched = trainer.lr_scheduler_configs[0].scheduler
    assert isinstance(sched, OptimizerScheduler) and sched.last_epoch == trainer.global_step == 4
    # Re-derived: cosine from the peak after the 2 warmup steps, t = (4 - 2) / (6 - 2).
    lr = 0.001 + (0.05 - 0.001) * 0.5 * (1 + math.cos(math.pi * 0.5))
    wd = 0.3 + (0.1 - 0.3) * 0.5 * (1 + math.cos(math.pi * 4 / 6))
    assert sched.get_last_lr() == pytest.approx([lr, lr])
    groups = trainer.optimizers[0].param_groups
    assert [g["weight_decay"] for g in groups] == pytest.approx([wd, 0.0])


def test_ema_callback_updates_once_per_optimizer_step(tmp_path):
    model = Tiny(total_steps=6)
    init = {k: v.clone() for k, v in model.target.module.state_dict().items()}
    trainer = _trainer(tmp_path, max_steps=3, accumulate_grad_batches=2,
                       callbacks=[EMATargetCallback(), _RecordOnline()])
    trainer.fit(model, _loader())
    assert trainer.global_step == 3 and model.target.step == 3 and len(model.seen) == 3
    # Re-derived: target <- 0.9 target + 0.1 online, after each of the 3 optimizer steps.
    for name, expected in init.items():
        for online in model.seen:
            expected = 0.9 * expected + 0.1 * online[name]
        torch.testing.assert_close(model.target.module.state_dict()[name], expected)


def test_ema_callback_rejects_a_module_without_ema_target(tmp_path):
    model = Tiny()
    model.target = nn.Linear(6, 5)
    with pytest.raises(TypeError, match="target='target'.*EMATarget"):
        _trainer(tmp_path, max_steps=1, callbacks=[EMATargetCallback()]).fit(model, _loader())
    with pytest.raises(TypeError, match="online"):
        EMATargetCallback(online="")


def test_monitor_logs_knn_and_collapse_metrics(tmp_path):
    model = Tiny()
    bank, queries = _loader(40, 8, seed=1), _loader(20, 8, seed=2)
    monitor = EmbeddingMonitor(bank, queries, module="encoder", k=(3, 5))
    trainer = _trainer(tmp_path, max_epochs=2, callbacks=[monitor])
    trainer.fit(model, _loader(16, 8))
    logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("monitor/")}
    assert set(logged) == {"monitor/knn_top1", "monitor/knn_top1_k3", "monitor/knn_top1_k5",
                           "monitor/effective_rank", "monitor/rank_ratio", "monitor/std_mean",
                           "monitor/std_min", "monitor/dead_fraction"}
    # The same numbers as the library functions on the same features, computed here.
    with torch.no_grad():
        xb, yb = model.encoder(bank.dataset.tensors[0]), bank.dataset.tensors[1]
        xq, yq = model.encoder(queries.dataset.tensors[0]), queries.dataset.tensors[1]
    acc = knn_accuracy(xb, yb, xq, yq, k=(3, 5))
    diag = embedding_diagnostics(xq)
    assert logged["monitor/knn_top1"] == pytest.approx(acc[3]) and logged["monitor/knn_top1_k5"] == pytest.approx(acc[5])
    assert acc[3] > 0.9  # separable blobs
    for stat in ("effective_rank", "std_mean", "std_min"):
        assert logged[f"monitor/{stat}"] == pytest.approx(diag[stat], rel=1e-5)
    assert model.encoder.training  # mode restored


def test_monitor_bad_arguments():
    bank = [(torch.randn(4, 6), torch.arange(4) % 2)]
    with pytest.raises(TypeError, match="bank"):
        EmbeddingMonitor(torch.randn(3), bank)
    with pytest.raises(ValueError, match="every_n_epochs"):
        EmbeddingMonitor(bank, bank, every_n_epochs=0)
    with pytest.raises(ValueError, match="temperature"):
        EmbeddingMonitor(bank, bank, temperature=0.0)
    with pytest.raises(TypeError, match="stats"):
        EmbeddingMonitor(bank, bank, stats="effective_rank")


def test_lightning_example_trains_a_few_steps(tmp_path, capsys, monkeypatch):
    pytest.importorskip("torchvision")
    pytest.importorskip("sklearn")
    examples = Path(__file__).resolve().parents[2] / "examples"
    monkeypatch.syspath_prepend(str(examples))
    spec = importlib.util.spec_from_file_location("examples_lightning_hjepa", examples / "lightning_hjepa.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    metrics = example.main(["--max-steps", "4", "--img-size", "24", "--embed-dim", "32", "--depth", "1",
                            "--num-heads", "2", "--pred-dim", "16", "--pred-depth", "1", "--batch-size", "16",
                            "--monitor-size", "60", "--accelerator", "cpu", "--out", str(tmp_path)])
    assert math.isfinite(metrics["train/loss"]) and 0.0 <= metrics["monitor/knn_top1"] <= 1.0
    assert 1.0 <= metrics["monitor/effective_rank"] <= 32.0
    assert (tmp_path / "metrics.csv").exists()
    assert "held-out kNN top-1" in capsys.readouterr().out


def test_ema_callback_continues_on_resume_from_a_lightning_checkpoint(tmp_path):
    # One batch an epoch: whichever batch Lightning replays or skips around a mid-run
    # resume, the resumed fit sees the data of the uninterrupted one.
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = Tiny(total_steps=6)
    _trainer(tmp_path, max_steps=2, enable_checkpointing=True, callbacks=[EMATargetCallback(), ckpt]).fit(
        first, _loader(4, 4))
    resumed = Tiny(total_steps=6)
    trainer = _trainer(tmp_path, max_steps=5, callbacks=[EMATargetCallback()])
    trainer.fit(resumed, _loader(4, 4), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert trainer.global_step == 5 and resumed.target.step == 5  # 2 before, 3 after the resume
    full = Tiny(total_steps=6)
    _trainer(tmp_path, max_steps=5, callbacks=[EMATargetCallback()]).fit(full, _loader(4, 4))
    for name, value in full.target.state_dict().items():
        torch.testing.assert_close(resumed.target.state_dict()[name], value, rtol=0, atol=0)


def test_monitor_runs_at_train_end_when_no_epoch_end_did(tmp_path):
    model = Tiny()
    monitor = EmbeddingMonitor(_loader(40, 8, seed=1), _loader(20, 8, seed=2), k=3, every_n_epochs=5)
    logger = L.pytorch.loggers.CSVLogger(tmp_path, name="", version="")
    trainer = _trainer(tmp_path, max_epochs=1, logger=logger, callbacks=[monitor])
    trainer.fit(model, _loader(16, 8))
    assert not any(k.startswith("monitor/") for k in trainer.callback_metrics)  # no epoch-end run
    assert set(monitor.last) >= {"monitor/knn_top1", "monitor/effective_rank"}
    logger.save()
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0]
    assert "monitor/knn_top1" in header and "monitor/effective_rank" in header
