"""NonFiniteGuard: skip decisions, counters, patience, state and agreement across ranks."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from jepa_blocks.training import NonFiniteGuard, NonFiniteLossError


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.sampled_from([0.5, -2.0, math.nan, math.inf, -math.inf]), min_size=1, max_size=12),
       patience=st.integers(1, 4))
def test_counts_match_a_reference_and_raise_after_patience(values, patience):
    guard = NonFiniteGuard(patience=patience)
    skipped = run = 0
    for step, v in enumerate(values):
        finite = math.isfinite(v)
        skipped += not finite
        run = 0 if finite else run + 1
        if run >= patience:
            with pytest.raises(NonFiniteLossError, match=f"{run} consecutive"):
                guard.check(torch.tensor(v), step=step)
            return
        assert guard.check(torch.tensor(v), step=step) is finite
        assert (guard.skipped, guard.consecutive) == (skipped, run)


def test_gradient_norms_are_checked_too():
    guard = NonFiniteGuard()
    assert guard.check(torch.tensor(1.0), torch.tensor(2.0), 3.0)
    assert not guard.check(torch.tensor(1.0), torch.tensor(float("nan")))
    assert not guard.check(torch.tensor([1.0, float("inf")]))


def test_state_dict_round_trip():
    guard = NonFiniteGuard(patience=3)
    guard.check(torch.tensor(float("nan")), step=7)
    other = NonFiniteGuard(patience=3)
    other.load_state_dict(guard.state_dict())
    assert other.state_dict() == {"skipped": 1, "consecutive": 1, "last_skipped_step": 7}
    other.check(torch.tensor(float("nan")))
    with pytest.raises(NonFiniteLossError):
        other.check(torch.tensor(float("nan")))


def test_bad_arguments():
    with pytest.raises(ValueError, match="patience"):
        NonFiniteGuard(patience=0)
    with pytest.raises(TypeError, match="patience"):
        NonFiniteGuard(patience=2.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="loss"):
        NonFiniteGuard().check(1.0)  # type: ignore[arg-type]


def _ranks_agree(rank: int, world: int) -> None:
    guard = NonFiniteGuard(patience=5)
    loss = torch.tensor(float("nan") if rank == 1 else 1.0)  # only rank 1 sees a NaN
    assert guard.check(loss) is False  # ... and every rank skips, so the replicas stay equal
    assert guard.check(torch.tensor(1.0)) is True


@pytest.mark.distributed
def test_every_rank_takes_the_same_decision(run_gloo):
    run_gloo(_ranks_agree)
