"""examples/plot_run.py draws readable curves from a run's metrics.jsonl.

Each test writes a metrics.jsonl shaped like the trainer's into tmp_path, reads it with
``read_metrics`` and inspects the matplotlib Figure that ``curves_figure`` returns. The
end-to-end run of the script on a trained run is in test_examples.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("torchvision")  # plot_run imports the examples' data helpers
from matplotlib.colors import to_rgba  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def plot(load_example):
    return load_example("plot_run")


def _train(step: int, **extra) -> dict:
    """A training record like train_hjepa.py's, with lr and momentum schedules."""
    return {"step": step, "epoch": 0, "loss": 1.0 / step, "lr": 1e-4 * step, "wd": 0.04,
            "momentum": 0.996 + 1e-4 * step, "grad_norm": 3.0, "images_per_s": 500.0,
            "time_min": 0.1 * step, **extra}


def _write(tmp_path: Path, records: list[dict], tail: str = "") -> Path:
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return path


def _axes(fig, title: str):
    (ax,) = [a for a in fig.axes if a.get_title() == title]
    return ax


def _labels(ax) -> list[str]:
    return [ln.get_label() for ln in ax.get_lines()]


def _line(fig, label: str):
    (line,) = [ln for ax in fig.axes for ln in ax.get_lines() if ln.get_label() == label]
    return line


def _notes(ax) -> list[str]:
    return [t.get_text() for t in ax.texts]


def test_lr_and_momentum_have_distinct_colours_and_a_legend(plot, tmp_path):
    fig = plot.curves_figure(plot.read_metrics(_write(tmp_path, [_train(s) for s in range(1, 6)])))
    lr, momentum = _line(fig, "learning rate"), _line(fig, "EMA momentum")
    assert lr.axes is not momentum.axes  # twin axes: lr left, momentum right
    assert to_rgba(lr.get_color()) != to_rgba(momentum.get_color())
    legends = [ax.get_legend() for ax in (lr.axes, momentum.axes) if ax.get_legend() is not None]
    assert len(legends) == 1
    assert [t.get_text() for t in legends[0].get_texts()] == ["learning rate", "EMA momentum"]
    # Each y-axis label is drawn in its line's colour, so the twin axes read unambiguously.
    assert to_rgba(lr.axes.yaxis.label.get_color()) == to_rgba(lr.get_color())
    assert to_rgba(momentum.axes.yaxis.label.get_color()) == to_rgba(momentum.get_color())


def test_empty_validation_panel_says_so(plot, tmp_path):
    fig = plot.curves_figure(plot.read_metrics(_write(tmp_path, [_train(s) for s in range(1, 4)])))
    ax = _axes(fig, "validation kNN (k=20)")
    assert ax.get_lines() == []
    assert "no validation records yet" in _notes(ax)


def test_knn_is_drawn_in_percent_as_labelled(plot, tmp_path):
    # metrics.jsonl stores knn_top1 as a fraction in [0, 1] (knn_accuracy's return value).
    val = [{"step": 2, "val": True, "encoder": "context", "time_min": 0.2, "knn_top1": 0.25},
           {"step": 4, "val": True, "encoder": "context", "time_min": 0.4, "knn_top1": 0.625}]
    records = [_train(1), _train(2), val[0], _train(3), _train(4), val[1]]
    fig = plot.curves_figure(plot.read_metrics(_write(tmp_path, records)))
    ax = _axes(fig, "validation kNN (k=20)")
    (line,) = ax.get_lines()
    assert list(line.get_xdata()) == [0.2, 0.4]
    assert list(line.get_ydata()) == [25.0, 62.5]
    assert "(%)" in ax.get_ylabel()
    assert _notes(ax) == []


def test_regulariser_terms_get_their_own_panel(plot, tmp_path):
    # Plain term names as train_hjepa.py logs them; the unweighted "reg" is 100x the loss.
    records = [_train(s, level0=0.4 / s, level1=0.3 / s, reg=100.0 / s, temperature=0.07,
                      vq_perplexity=30.0, vq_usage=0.5) for s in range(1, 6)]
    fig = plot.curves_figure(plot.read_metrics(_write(tmp_path, records)))
    loss_ax = _axes(fig, "loss")
    assert _labels(loss_ax) == ["total"]
    assert loss_ax.get_yscale() == "log"
    assert loss_ax.get_ylim()[1] < 10  # not stretched to the regulariser's values
    terms_ax = _axes(fig, "loss terms (unweighted, as logged)")
    # Every loss term, and nothing that is a schedule, bookkeeping or a diagnostic.
    assert sorted(_labels(terms_ax)) == ["level0", "level1", "reg"]
    assert terms_ax.get_legend() is not None


def test_terms_logged_under_a_prefix(plot, tmp_path):
    # A trainer that logs its terms as "terms/<name>": latent joins the total, the rest
    # (whatever their names) go to the terms panel.
    records = [_train(s, **{"terms/latent": 0.8 / s, "terms/sigreg": 40.0, "terms/local": 0.5,
                            "vq_perplexity": 12.0}) for s in range(1, 6)]
    fig = plot.curves_figure(plot.read_metrics(_write(tmp_path, records)))
    assert _labels(_axes(fig, "loss")) == ["total", "latent"]
    assert _labels(_axes(fig, "loss terms (unweighted, as logged)")) == ["sigreg", "local"]


def test_skipped_steps_monitor_records_and_a_line_being_written(plot, tmp_path):
    records = [_train(1), {"step": 1, "skipped_nonfinite": True, "loss": float("nan"), "grad_norm": 1.0,
                           "consecutive": 1, "skipped_total": 1},
               {"step": 2, "monitor": True, "feat_effective_rank": 3.0}, _train(2)]
    path = _write(tmp_path, records, tail='{"step": 3, "lo')  # the trainer is mid-write
    loaded = plot.read_metrics(path)
    assert len(loaded) == 4
    fig = plot.curves_figure(loaded)
    loss_ax = _axes(fig, "loss (1 non-finite steps skipped)")
    (total,) = loss_ax.get_lines()
    assert list(total.get_xdata()) == [0.1, 0.2]
    assert "no loss terms logged" in _notes(_axes(fig, "loss terms (unweighted, as logged)"))


def test_corrupt_middle_line_is_an_error(plot, tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(_train(1)) + "\nnot json\n" + json.dumps(_train(2)) + "\n")
    with pytest.raises(ValueError, match="line 2"):
        plot.read_metrics(path)


def test_cli_curves_only(plot, tmp_path):
    _write(tmp_path, [_train(s) for s in range(1, 4)])
    written = plot.main(["--run", str(tmp_path), "--curves-only"])
    assert written == [str(tmp_path / "plots" / "curves.png")]
    assert Path(written[0]).read_bytes()[:8] == PNG
    with pytest.raises(SystemExit):  # the full set needs last.pt: a clear error, not a traceback
        plot.main(["--run", str(tmp_path)])
