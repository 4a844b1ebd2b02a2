"""Value checks (``jepa_blocks._checks``): the switch, the helpers, and tracing.

Checks that read tensor data (NaN/Inf, index ranges) must run by default, follow the
environment variable ``JEPA_BLOCKS_VALUE_CHECKS``, ``set_value_checks`` and the
``value_checks`` context manager (per thread, nested, restored on errors), and never run
while ``torch.compile`` or ``torch.export`` trace (a host sync there is a graph break, or
an export error).
"""

from __future__ import annotations

import doctest
import os
import subprocess
import sys
import threading

import pytest
import torch

import jepa_blocks._checks as checks
from jepa_blocks._checks import (
    VALUE_CHECKS_ENV_VAR,
    check_finite,
    check_index_range,
    check_pair,
    check_tensor,
    match_dtype,
    set_value_checks,
    value_checks,
    value_checks_enabled,
)
from jepa_blocks.losses import latent_prediction_loss, sigreg, vicreg_loss
from jepa_blocks.masking import gather_tokens

NAN = float("nan")


@pytest.fixture(autouse=True)
def _restore_switch():
    yield
    set_value_checks(True)


def test_switch_and_context_manager():
    import jepa_blocks

    assert jepa_blocks.set_value_checks is set_value_checks and jepa_blocks.value_checks is value_checks
    assert value_checks_enabled()
    set_value_checks(False)
    assert not value_checks_enabled()
    set_value_checks(True)
    with value_checks(False):
        assert not value_checks_enabled()
        with value_checks(True):
            assert value_checks_enabled()
        assert not value_checks_enabled()
    assert value_checks_enabled()
    with pytest.raises(KeyError), value_checks(False):  # restored on errors too
        raise KeyError("x")
    assert value_checks_enabled()


def test_context_manager_restores_on_exception_and_nests():
    set_value_checks(False)  # the process-wide default
    with pytest.raises(RuntimeError, match="boom"):
        with value_checks(True):
            assert value_checks_enabled()
            with value_checks(False):
                assert not value_checks_enabled()
                raise RuntimeError("boom")
    assert not value_checks_enabled()  # both blocks undone: back to the default
    with value_checks(True):
        set_value_checks(False)  # a default set inside a block waits for the block's end
        assert value_checks_enabled()
        set_value_checks(True)
    assert value_checks_enabled()
    with value_checks(False), value_checks(False), value_checks(True):  # same value twice
        assert value_checks_enabled()
    assert value_checks_enabled()


def test_context_manager_is_per_thread_and_the_default_is_process_wide():
    seen = {}

    def other(key):
        seen[key] = value_checks_enabled()

    with value_checks(False):
        thread = threading.Thread(target=other, args=("during block",))
        thread.start()
        thread.join()
        assert not value_checks_enabled()
    set_value_checks(False)
    thread = threading.Thread(target=other, args=("default off",))
    thread.start()
    thread.join()
    assert seen == {"during block": True, "default off": False}


def _enabled_in_subprocess(value: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != VALUE_CHECKS_ENV_VAR}
    if value is not None:
        env[VALUE_CHECKS_ENV_VAR] = value
    code = (
        "import jepa_blocks\n"
        "print(jepa_blocks.value_checks_enabled())\n"
        "with jepa_blocks.value_checks(True):\n"
        "    print(jepa_blocks.value_checks_enabled())\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )


def test_environment_variable_sets_the_default():
    """Read at import (a fresh interpreter; the spellings are tested below, in-process)."""
    proc = _enabled_in_subprocess(" Off ")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "True"]  # the context manager still overrides


def test_environment_variable_rejects_other_values():
    proc = _enabled_in_subprocess("maybe")
    assert proc.returncode != 0
    assert "ValueError" in proc.stderr and VALUE_CHECKS_ENV_VAR in proc.stderr
    assert "'maybe'" in proc.stderr


@pytest.mark.parametrize(
    ("value", "expected"),
    [("1", True), ("TRUE", True), ("on", True), ("", True), ("0", False), (" Off ", False)],
)
def test_environment_variable_spellings(value, expected):
    assert checks._default_from_env({VALUE_CHECKS_ENV_VAR: value}) is expected
    assert checks._default_from_env({}) is True
    with pytest.raises(ValueError, match=VALUE_CHECKS_ENV_VAR):
        checks._default_from_env({VALUE_CHECKS_ENV_VAR: "2"})


def test_docstring_examples():
    result = doctest.testmod(checks)
    assert result.attempted > 0 and result.failed == 0


def test_check_pair():
    assert check_pair("r", (0.1, 0.5), min_value=0.0, max_value=1.0) == (0.1, 0.5)
    with pytest.raises(ValueError, match=r"r\[1\] must be < 1.0"):
        check_pair("r", (0.1, 1.0), max_value=1.0, max_inclusive=False)
    with pytest.raises(ValueError, match=r"r\[0\] must be > 0.0"):
        check_pair("r", (0.0, 1.0), min_value=0.0, min_inclusive=False)
    with pytest.raises(ValueError, match="low <= high"):
        check_pair("r", (0.5, 0.1))


@pytest.mark.parametrize("bad", [1, 0, "no", None])
def test_switch_takes_bools_only(bad):
    with pytest.raises(TypeError, match="enabled"):
        set_value_checks(bad)
    with pytest.raises(TypeError, match="enabled"):
        with value_checks(bad):
            pass
    assert value_checks_enabled()


def test_check_tensor_finite_and_check_finite():
    x = torch.tensor([1.0, NAN])
    with pytest.raises(ValueError, match="x must be finite, got NaN or Inf values"):
        check_tensor("x", x, finite=True)
    check_tensor("x", x)  # finite=False (the default) never reads the data
    check_tensor("i", torch.tensor([1, 2]), finite=True)  # integer tensors are always finite
    with value_checks(False):
        assert check_tensor("x", x, finite=True) is x
    # one call, several tensors: the first bad one is named; None entries are skipped
    with pytest.raises(ValueError, match="^b must be finite"):
        check_finite(("a", torch.ones(2)), ("n", None), ("b", torch.tensor([float("inf")])), ("c", x))
    check_finite(("a", torch.ones(2)), ("e", torch.empty(0)))
    # Finite entries whose sum overflows take the exact path and pass; half too.
    check_finite(("big", torch.full((4,), 3e38)), ("h", torch.full((10_000,), 60_000.0).half()))
    with pytest.raises(ValueError, match="big"):
        check_finite(("big", torch.tensor([3e38, 3e38, -float("inf")])))


def test_latent_loss_fast_and_exact_finite_paths():
    pred = torch.full((2, 3, 4), 3e38)  # every slot's feature sum overflows: exact path
    out = latent_prediction_loss(pred, pred.clone(), normalize_targets=False)
    assert out.total.item() == 0.0
    valid = torch.tensor([[True, True, False], [True, False, False]])
    pred[0, 2, 1] = NAN  # padding may hold NaN, also on the exact path
    latent_prediction_loss(pred, pred.clone(), valid, normalize_targets=False)
    pred[1, 0, 3] = -float("inf")
    with pytest.raises(ValueError, match=r"predictions\[0\] must be finite in its valid slots"):
        latent_prediction_loss(pred, torch.zeros(2, 3, 4), valid)


def test_check_index_range():
    check_index_range("ids", torch.tensor([[0, 3]]), 4)
    check_index_range("ids", torch.empty(0, dtype=torch.long), 4)
    with pytest.raises(ValueError, match=r"ids must hold ids in \[0, 4\) of the grid, got range \[-1, 3\]"):
        check_index_range("ids", torch.tensor([3, -1]), 4, what="of the grid")
    with pytest.raises(ValueError, match=r"got range \[0, 4\]"):
        check_index_range("ids", torch.tensor([0, 4]), 4)
    with value_checks(False):
        check_index_range("ids", torch.tensor([0, 4]), 4)


def test_match_dtype_casts_unless_autocast():
    x = torch.ones(2, dtype=torch.float16)
    assert match_dtype(x, torch.float32).dtype == torch.float32
    assert match_dtype(x, torch.float16) is x
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert match_dtype(x, torch.float32) is x  # autocast decides


def test_autocast_query_before_torch_2_4(monkeypatch):
    """torch 2.2 / 2.3: ``is_autocast_enabled()`` takes no device (CUDA), CPU has its own."""
    state = {"cuda": False, "cpu": True}

    def cuda_only():  # the old signature: no argument
        return state["cuda"]

    monkeypatch.setattr(torch, "is_autocast_enabled", cuda_only)
    monkeypatch.setattr(torch, "is_autocast_cpu_enabled", lambda: state["cpu"], raising=False)
    query = checks._autocast_query()
    assert (query("cpu"), query("cuda"), query("mps")) == (True, False, False)
    state.update(cuda=True, cpu=False)
    assert (query("cpu"), query("cuda"), query("mps")) == (False, True, False)


def _losses(x, y, valid, directions, idx):
    total = vicreg_loss(x, y).total
    total = total + latent_prediction_loss(x[None], y[None], valid[None]).total
    total = total + sigreg(x, directions=directions)
    return total + gather_tokens(x[None], idx).sum(), value_checks_enabled()


def test_value_checks_are_off_under_torch_compile():
    """fullgraph=True fails on any host sync (bool(tensor), .item()), so this proves that the
    compiled losses contain none, and that NaN passes through there (checks are off)."""
    compiled = torch.compile(_losses, fullgraph=True, backend="eager")
    x, y = torch.randn(6, 4), torch.randn(6, 4)
    args = (torch.ones(6, dtype=torch.bool), torch.randn(4, 8), torch.tensor([[0, 5]]))
    value, enabled = compiled(x, y, *args)
    assert torch.isfinite(value) and enabled is False
    x[0, 0] = NAN
    value, _ = compiled(x, y, *args)
    assert torch.isnan(value)
    with pytest.raises(ValueError, match="must be finite"):  # eager still checks
        _losses(x, y, *args)


class _Loss(torch.nn.Module):
    def forward(self, x, y, idx):
        return latent_prediction_loss(x, y).total + gather_tokens(x, idx).sum()


def test_value_checks_are_off_under_torch_export(monkeypatch):
    args = (torch.randn(1, 6, 4), torch.randn(1, 6, 4), torch.tensor([[0, 5]]))
    program = torch.export.export(_Loss(), args)
    torch.testing.assert_close(program.module()(*args), _Loss()(*args))
    # Without the tracing guard the data-dependent check breaks the export.
    monkeypatch.setattr(checks, "_is_tracing", lambda: False)
    with pytest.raises(Exception, match="data-dependent"):
        torch.export.export(_Loss(), args)
