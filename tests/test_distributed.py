"""Tests for jepa_blocks.distributed: identity without a group, 2-process gloo semantics."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from jepa_blocks.distributed import (
    all_reduce_with_grad,
    gather_with_grad,
    is_distributed,
    world_size,
)

# ---- single process ----------------------------------------------------------------------


def test_helpers_without_process_group():
    assert not dist.is_initialized()
    assert world_size() == 1
    assert not is_distributed()


def test_gather_and_all_reduce_are_identity_without_group():
    x = torch.randn(5, 3, requires_grad=True)
    assert gather_with_grad(x) is x
    assert all_reduce_with_grad(x) is x
    (gather_with_grad(x) * 2).sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 2.0))


def test_bad_inputs_name_argument():
    with pytest.raises(TypeError, match="x"):
        gather_with_grad([1.0, 2.0])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="x"):
        gather_with_grad(torch.tensor(1.0))
    with pytest.raises(TypeError, match="x"):
        all_reduce_with_grad(3.0)  # type: ignore[arg-type]


# ---- two gloo processes ------------------------------------------------------------------


_SIZES = (3, 5)  # unequal local batch sizes of rank 0 and rank 1


def _worker_collectives(rank: int, world: int) -> None:
    assert is_distributed() and world_size() == world
    gen = torch.Generator().manual_seed(0)
    full = torch.randn(sum(_SIZES), 4, generator=gen, dtype=torch.float64)
    weights = torch.randn(sum(_SIZES), 4, generator=gen, dtype=torch.float64)
    start = sum(_SIZES[:rank])
    local = full[start : start + _SIZES[rank]].clone().requires_grad_(True)

    # Forward: every rank sees the rank-ordered concatenation.
    gathered = gather_with_grad(local)
    assert gathered.shape == full.shape
    torch.testing.assert_close(gathered, full, rtol=0, atol=0)

    # Backward: grad(local) = world * d(global loss)/d(local) for a non-linear global loss.
    loss = (weights * gathered.square()).sum() + gathered.sum().square()
    loss.backward()
    ref = full.clone().requires_grad_(True)
    ((weights * ref.square()).sum() + ref.sum().square()).backward()
    expected = world * ref.grad[start : start + _SIZES[rank]]
    torch.testing.assert_close(local.grad, expected, rtol=1e-12, atol=1e-12)

    # all_reduce_with_grad: forward sum, backward sum of the ranks' gradients.
    y = torch.full((3,), float(rank + 1), dtype=torch.float64, requires_grad=True)
    s = all_reduce_with_grad(y)
    torch.testing.assert_close(s, torch.full((3,), 3.0, dtype=torch.float64))
    (s * torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)).sum().backward()
    torch.testing.assert_close(y.grad, world * torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))

    # Mismatched trailing shapes fail loudly on every rank.
    bad = torch.zeros(2, 4 + rank)
    try:
        gather_with_grad(bad)
    except ValueError as err:
        assert "same shape" in str(err)
    else:
        raise AssertionError("mismatched trailing shapes were not rejected")


@pytest.mark.slow
def test_gloo_gather_unequal_sizes_and_gradient_convention(run_gloo):
    run_gloo(_worker_collectives)
