"""Tests for jepa_blocks.training.rng (global RNG state capture and restore)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from jepa_blocks.training import load_checkpoint, rng_state, save_checkpoint, set_rng_state


def _draw():
    return (
        torch.rand(5),
        torch.randint(0, 1000, (3,)),
        [random.random() for _ in range(3)],
        np.random.rand(3),
        np.random.randn(1),  # exercises numpy's cached gaussian
    )


def test_rng_round_trip(tmp_path):
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    np.random.randn(1)  # leave a cached gaussian in the numpy state
    state = rng_state()
    first = _draw()
    save_checkpoint(tmp_path / "rng.pt", {"rng": state})
    _draw()  # move every generator on
    set_rng_state(state)
    torch.testing.assert_close(list(first[:3]), list(_draw()[:3]), rtol=0, atol=0)
    set_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    again = _draw()
    torch.testing.assert_close(list(first[:3]), list(again[:3]), rtol=0, atol=0)
    np.testing.assert_array_equal(first[3], again[3])
    np.testing.assert_array_equal(first[4], again[4])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_rng_round_trip_cuda(tmp_path):
    torch.cuda.manual_seed_all(5)
    state = rng_state()
    assert len(state["cuda"]) == torch.cuda.device_count()
    first = torch.rand(4, device="cuda")
    save_checkpoint(tmp_path / "rng.pt", {"rng": state})
    torch.rand(4, device="cuda")
    set_rng_state(load_checkpoint(tmp_path / "rng.pt", map_location="cuda")["rng"])
    torch.testing.assert_close(torch.rand(4, device="cuda"), first, rtol=0, atol=0)


def test_rng_state_bad_inputs():
    with pytest.raises(TypeError, match="state"):
        set_rng_state([1])
    with pytest.raises(ValueError, match="unknown keys"):
        set_rng_state({"python": random.getstate(), "jax": 1})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_rng_cuda_states_without_cuda_warn():
    state = rng_state()
    assert state["cuda"] == []
    state["cuda"] = [torch.zeros(16, dtype=torch.uint8)]
    with pytest.warns(UserWarning, match="CUDA"):
        set_rng_state(state)
