"""The trainer's interface and helpers: flags, terms, time budget, value checks, progress.

Each test here failed on the trainer before its rewrite (issue "The trainer in one clean
shape"): --help without defaults, unchecked --amp/--reg values, a crash when resuming a
time-budget run, value checks switched inside the loop and not restored, silence when the
output is not a terminal, and no way to add a term without editing the loop.
"""

from __future__ import annotations

import json

import pytest
import torch

import jepa_blocks
from jepa_blocks.losses import LossOutput

pytest.importorskip("torchvision")
RUN = ["--eval-every", "100", "--no-final-eval", "--monitor-every", "0"]


def test_help_lists_every_flag_with_default_and_choices(load_example, capsys):
    train = load_example("train_hjepa")
    with pytest.raises(SystemExit):
        train.parse_config(["--help"])
    text = capsys.readouterr().out
    assert "(default: 0.001)" in text  # --lr of the cifar preset
    assert "{auto,bf16,fp16,off}" in text and "{none,sigreg,vicreg,ntxent,infonce,lejepa}" in text
    import dataclasses
    for f in dataclasses.fields(train.Config):
        assert "--" + f.name.replace("_", "-") in text
        assert f.metadata.get("help"), f"{f.name} has no help text"


@pytest.mark.parametrize("bad", [["--amp", "maybe"], ["--reg", "foo"], ["--pool", "max"],
                                 ["--views", "2", "--jepa-views", "3"]])
def test_bad_flag_values_are_argparse_errors(bad, load_example, capsys):
    train = load_example("train_hjepa")
    with pytest.raises(SystemExit) as err:
        train.parse_config(bad)
    assert err.value.code == 2 and "error:" in capsys.readouterr().err


def test_config_fields_are_all_read(load_example):
    """No dead fields: every Config field name appears in the scripts beyond its definition."""
    import pathlib
    train = load_example("train_hjepa")
    examples = pathlib.Path(train.__file__).parent
    code = "".join((examples / f).read_text() for f in ("train_hjepa.py", "terms.py", "runtime.py", "data.py"))
    import dataclasses
    for f in dataclasses.fields(train.Config):
        if f.name != "preset":  # read by parse_config before the Config exists
            assert code.count(f"cfg.{f.name}") >= 1, f"Config.{f.name} is never read"


def test_time_budget_never_refits_the_warmup(load_example):
    runtime = load_example("runtime")
    budget = runtime.TimeBudget(minutes=1.0, warmup_steps=200, cap=10_000, calibrate=2, every=2)
    budget.spent_s = 0.0
    fits = [budget.fit(s) for s in range(1, 12)]
    assert all(f is None or f >= 201 for f in fits)  # never below the warmup, which it never changes
    assert runtime.TimeBudget(minutes=0, warmup_steps=5, cap=10).fit(30) is None


def test_time_budget_run_resumes(image_folder, tiny_args, load_example, tmp_path, monkeypatch):
    """Was: ValueError warmup_steps must be <= total_steps on --resume of a time-budget run,
    and the refit shrank a running warmup (the learning rate jumped up)."""
    train = load_example("train_hjepa")

    class SimulatedClock(train.TimeBudget):
        """Each optimizer step takes 0.25 s of simulated time, whatever the machine's load."""

        def __init__(self, **kwargs):
            super().__init__(**kwargs, calibrate=2, every=2)
            self.steps = 0

        def fit(self, step):
            self.steps += 1
            return super().fit(step)

        def elapsed(self):
            return self.spent_s + 0.25 * self.steps

    monkeypatch.setattr(train, "TimeBudget", SimulatedClock)
    common = [*tiny_args, *RUN, "--data", str(image_folder), "--out", str(tmp_path), "--warmup-steps", "1000",
              "--epochs", "1000", "--log-every", "1"]
    first = train.main([*common, "--time-budget-min", "0.05"])
    assert first["steps"] == 12  # 3 s of 0.25 s steps; refitted every 2 steps after the 4th
    result = train.main([*common, "--time-budget-min", "0.1", "--resume"])
    assert result["steps"] == 24
    lrs = [json.loads(line)["lr"] for line in open(tmp_path / "metrics.jsonl") if '"lr"' in line]
    steps = [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl") if '"lr"' in line]
    assert steps == list(range(1, result["steps"] + 1))
    slopes = [b - a for a, b in zip(lrs[:-1], lrs[1:], strict=True)]
    assert min(slopes) > 0 and max(slopes) <= 1.01 * min(slopes), "warmup must be one straight line"


def test_value_checks_decided_once_and_restored(image_folder, tiny_args, load_example, tmp_path, monkeypatch):
    train = load_example("train_hjepa")
    seen = []
    forward = train.ViTEncoder.forward

    def spy(self, *args, **kwargs):
        seen.append(jepa_blocks.value_checks_enabled())
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(train.ViTEncoder, "forward", spy)
    base = train.LatentPredictionLoss

    class Boom(base):
        def forward(self, *args, **kwargs):
            raise RuntimeError("boom")

    assert jepa_blocks.value_checks_enabled()
    train.main([*tiny_args, *RUN, "--data", str(image_folder), "--out", str(tmp_path / "a"), "--max-steps", "2",
                "--value-checks", "off"])
    assert seen and not any(seen) and jepa_blocks.value_checks_enabled()
    monkeypatch.setattr(train, "LatentPredictionLoss", Boom)
    with pytest.raises(RuntimeError, match="boom"):
        train.main([*tiny_args, *RUN, "--data", str(image_folder), "--out", str(tmp_path / "b"),
                    "--value-checks", "off"])
    assert jepa_blocks.value_checks_enabled()  # restored although the run raised


def test_plain_progress_lines_when_not_a_terminal(image_folder, tiny_args, load_example, tmp_path, capsys):
    train = load_example("train_hjepa")
    train.main([*tiny_args, *RUN, "--data", str(image_folder), "--out", str(tmp_path), "--max-steps", "4",
                "--print-every", "2"])
    out = capsys.readouterr().out
    assert [line.split()[1] for line in out.splitlines() if line.startswith("step ")] == ["1/4", "2/4", "4/4"]


def test_a_new_term_plugs_in_with_one_registry_line(image_folder, tiny_args, load_example, tmp_path, monkeypatch):
    train = load_example("train_hjepa")
    terms = load_example("terms")

    class TokenNorm(torch.nn.Module):
        """A toy term: the mean squared context token, weight 0.1."""

        def forward(self, batch):
            value = batch.context.tokens.float().square().mean()
            return LossOutput(0.1 * value, {"token_norm": value.detach()})

    monkeypatch.setitem(terms.TERMS, "token_norm", lambda cfg, ctx: TokenNorm())
    monkeypatch.setattr(train, "TermSet", terms.TermSet)
    train.main([*tiny_args, *RUN, "--data", str(image_folder), "--out", str(tmp_path), "--max-steps", "2"])
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert all(r["token_norm"] > 0 for r in records if "loss" in r)


@pytest.mark.parametrize(("reg", "key"), [("sigreg", "terms.reg.loss.step"),
                                          ("lejepa", "terms.lejepa.loss.sigreg.step")])
def test_sigreg_directions_advance_once_per_optimizer_step(reg, key, image_folder, tiny_args, load_example,
                                                           tmp_path):
    """With 2 micro-batches per step the SIGReg step still counts optimizer steps (it
    counted micro-batch calls before issue 13), so both micro-batches share directions."""
    from jepa_blocks.training import load_checkpoint

    train = load_example("train_hjepa")
    views = ["--views", "2"] if reg == "lejepa" else []
    train.main([*tiny_args, *RUN, *views, "--data", str(image_folder), "--out", str(tmp_path), "--max-steps", "3",
                "--accum-steps", "2", "--reg", reg])
    assert int(load_checkpoint(tmp_path / "last.pt")["terms"][key]) == 3


def _lejepa_term(terms, **overrides):
    """A ``ViewInvariance`` (``--reg lejepa``) of width 8 built from the config fields it reads."""
    import types

    cfg = dict(views=2, reg_weight=1.0, embed_dim=8, proj_dims=(16, 8), lejepa_lambda=0.05, seed=0,
               lejepa_local_views=0)
    return terms.ViewInvariance(types.SimpleNamespace(**{**cfg, **overrides}), terms.FeaturePool("mean", 8, 2),
                                distributed=False)


def test_lejepa_term_without_projector_acts_on_the_pooled_features(load_example):
    """``--proj-dims 0``: no projector, LeJEPA's view term on the pooled features themselves."""
    terms = load_example("terms")
    term = _lejepa_term(terms, proj_dims=(0,))
    assert isinstance(term.projector, torch.nn.Identity) and not list(term.parameters())
    z = torch.randn(6, 8)
    assert torch.equal(term.projector(z), z)
    for bad in ((0, 64), (512, -1)):
        with pytest.raises(ValueError, match="--proj-dims"):
            _lejepa_term(terms, proj_dims=bad)


def test_lejepa_local_views_are_drawn_for_the_global_batch(load_example):
    """``--lejepa-local-views L``: crop ``j`` comes from view ``j mod V``, and a micro-batch
    holding rows 2:4 of a global batch of 4 gets exactly those rows' crops."""
    import types

    from jepa_blocks.masking.multicrop import crop_and_resize, sample_crop_boxes

    terms = load_example("terms")
    local = dict(lejepa_local_views=3, local_size=8, local_scale=(0.1, 0.5), img_size=16, patch_size=4)
    term = _lejepa_term(terms, **local)
    images = torch.randn(4, 2, 3, 16, 16)

    def batch(rows):
        return types.SimpleNamespace(images=images[rows], rows=rows, global_batch=4,
                                     generator=lambda tag: torch.Generator().manual_seed(tag))

    full = term.local_crops(batch(slice(0, 4)))
    assert full.shape == (4, 3, 3, 8, 8)
    assert torch.equal(term.local_crops(batch(slice(2, 4))), full[2:4])
    boxes = sample_crop_boxes(4, image_size=16, num_crops=3, scale=(0.1, 0.5),
                              generator=torch.Generator().manual_seed(0x6C6A6C6F63))
    for j in range(3):
        expected = crop_and_resize(images[:, j % 2], boxes[:, j : j + 1], size=8)[:, 0]
        torch.testing.assert_close(full[:, j], expected)
    with pytest.raises(ValueError, match="--local-size"):
        _lejepa_term(terms, **{**local, "local_size": 6})


def test_trainer_runs_the_lejepa_term_with_local_views(image_folder, tiny_args, load_example, tmp_path):
    train = load_example("train_hjepa")
    train.main([*tiny_args, *RUN, "--data", str(image_folder), "--out", str(tmp_path), "--max-steps", "2",
                "--reg", "lejepa", "--views", "2", "--lejepa-local-views", "2", "--local-size", "8"])
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert all(r["invariance"] > 0 and r["sigreg"] > 0 for r in records if "loss" in r)


def test_mask_truncate_gives_unpadded_masks_and_trains(image_folder, tiny_args, load_example, tmp_path):
    """``--mask-truncate``: I-JEPA's masks, every list cut to the batch's smallest (no padding)."""
    train = load_example("train_hjepa")
    for flag, truncated in (([], False), (["--mask-truncate"], True)):
        cfg = train.parse_config([*tiny_args, *flag])
        _, _, masker = train.build_models(cfg, torch.device("cpu"))
        masks = masker(16, generator=torch.Generator().manual_seed(0))
        lists = [masks.context, *masks.targets]
        assert all(bool(m.valid.all()) for m in lists) == truncated
    train.main([*tiny_args, *RUN, "--data", str(image_folder), "--out", str(tmp_path), "--max-steps", "2",
                "--mask-truncate"])
    assert json.load(open(tmp_path / "config.json"))["mask_truncate"] is True
