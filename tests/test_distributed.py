"""Tests for jepa_blocks.distributed: identity without a group, 2-process gloo semantics,
and the unwrapping of DDP / FSDP / ``torch.compile`` wrappers.

The losses that gather across ranks are also checked end to end here, through a
DDP-wrapped model (what users see): every rank gets the global-batch value, and after
DDP's gradient averaging the parameter gradients equal one process on the concatenated
batch.
"""

from __future__ import annotations

import importlib
import warnings
from unittest import mock

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from jepa_blocks.distributed import (
    all_reduce_with_grad,
    gather_with_grad,
    is_distributed,
    module_wrappers,
    unwrap_module,
    world_size,
)
from jepa_blocks.losses import LeJEPALoss, SIGRegLoss, VICRegLoss

# By path: ``jepa_blocks.losses.sigreg`` as an attribute is the function, not the module.
sigreg_module = importlib.import_module("jepa_blocks.losses.sigreg")
vicreg_module = importlib.import_module("jepa_blocks.losses.vicreg")
lejepa_module = importlib.import_module("jepa_blocks.losses.lejepa")

F64 = torch.float64

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

    # all_reduce_with_grad: forward sum, backward sum of the ranks' gradients, without the
    # FutureWarning of the deprecated torch.distributed.nn.functional.all_reduce.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = torch.full((3,), float(rank + 1), dtype=torch.float64, requires_grad=True)
        s = all_reduce_with_grad(y)
        torch.testing.assert_close(s, torch.full((3,), 3.0, dtype=torch.float64))
        (s * torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)).sum().backward()
    torch.testing.assert_close(y.grad, world * torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    assert s.grad_fn is not None and y.grad.dtype == torch.float64

    # bf16 keeps its dtype both ways (summed in float32 inside) and the input is untouched.
    h = torch.tensor([1.0, 2.0**-8, -3.0], dtype=torch.bfloat16) * (rank + 1)
    h_in = h.clone().requires_grad_(True)
    hs = all_reduce_with_grad(h_in)
    assert hs.dtype == torch.bfloat16 and torch.equal(h_in.detach(), h)
    torch.testing.assert_close(hs, (h.float() * 3 / (rank + 1)).bfloat16(), rtol=0, atol=0)
    hs.float().sum().backward()
    assert h_in.grad.dtype == torch.bfloat16
    torch.testing.assert_close(h_in.grad, torch.full_like(h, float(world)), rtol=0, atol=0)

    # Mismatched trailing shapes fail loudly on every rank.
    bad = torch.zeros(2, 4 + rank)
    try:
        gather_with_grad(bad)
    except ValueError as err:
        assert "same shape" in str(err)
    else:
        raise AssertionError("mismatched trailing shapes were not rejected")


@pytest.mark.distributed
def test_gloo_gather_unequal_sizes_and_gradient_convention(run_gloo):
    run_gloo(_worker_collectives)


# ---- losses under DDP: every rank the global value, exact DDP gradients -------------------
#
# Comparison made: with local batch sizes _SIZES on the two ranks,
#   value on every rank            == L(concatenated batch), one process     (rel 1e-12)
#   grad of each rank's input      == world * dL/dx_local, one process       (rel 1e-6)
#   grad of DDP's parameters       == dL/dtheta, one process, no DDP         (rel 1e-6)
# The last line is what users see: DDP averages the per-rank gradients, which divides the
# world factor of the second line away.


def _rel_err(a: torch.Tensor | list[torch.Tensor], b: torch.Tensor | list[torch.Tensor]) -> float:
    a = torch.cat([t.reshape(-1) for t in a]) if isinstance(a, list) else a
    b = torch.cat([t.reshape(-1) for t in b]) if isinstance(b, list) else b
    return float((a - b).norm() / b.norm())


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(4, 6).double()


def _vicreg(gather: bool):
    criterion = VICRegLoss(gather_distributed=gather)
    return lambda z: criterion(z[0], z[1])  # z: (2 views, N, D)


def _sigreg(gather: bool):
    criterion = SIGRegLoss(num_directions=16, seed=3, gather_distributed=gather)
    return lambda z: criterion(z[0])  # (N, D) input


def _sigreg_views_chunked(gather: bool):
    return SIGRegLoss(num_directions=16, seed=3, chunk=5, gather_distributed=gather)  # (V, N, D)


def _lejepa_invariance(gather: bool):
    # lam=0: the invariance alone (SIGReg has its own cases above). With unequal local
    # batches a per-rank mean is wrong in value and in DDP's averaged gradients.
    criterion = LeJEPALoss(lam=0.0, num_directions=16, seed=3, num_global_views=1, gather_distributed=gather)
    return criterion  # (V, N, D) input: view 0 global, view 1 local


def _gather_without_grad_sum(x: torch.Tensor) -> torch.Tensor:
    """Right values, but backward keeps only this rank's own gradient (lightly issue 1920)."""
    sizes = [torch.zeros((), dtype=torch.long) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor(x.shape[0]))
    start = int(sum(sizes[: dist.get_rank()]))
    full = gather_with_grad(x.detach())
    return torch.cat([full[:start], x, full[start + x.shape[0] :]])


def _all_reduce_without_grad_sum(x: torch.Tensor) -> torch.Tensor:
    """Right sum, but backward passes this rank's gradient through unsummed."""
    return x + (all_reduce_with_grad(x.detach()) - x.detach())


# name -> (number of views V, loss factory taking gather_distributed, buggy collective patch)
_LOSS_CASES = {
    "vicreg": (2, _vicreg, (vicreg_module, "gather_with_grad", _gather_without_grad_sum)),
    "sigreg": (1, _sigreg, (sigreg_module, "all_reduce_with_grad", _all_reduce_without_grad_sum)),
    "lejepa_invariance": (2, _lejepa_invariance, (lejepa_module, "all_reduce_with_grad", _all_reduce_without_grad_sum)),
    "sigreg_views_chunked": (
        2,
        _sigreg_views_chunked,
        (sigreg_module, "all_reduce_with_grad", _all_reduce_without_grad_sum),
    ),
}


def _worker_loss_under_ddp(rank: int, world: int, case: str) -> None:
    num_views, make_loss, (module, name, buggy) = _LOSS_CASES[case]
    gen = torch.Generator().manual_seed(1)
    full = torch.randn(num_views, sum(_SIZES), 4, generator=gen, dtype=F64) * 1.3 + 0.4
    start = sum(_SIZES[:rank])
    local = slice(start, start + _SIZES[rank])

    # Reference: one process, no DDP, the concatenated batch.
    ref_model = _tiny_model()
    ref_x = full.clone().requires_grad_(True)
    ref_value = make_loss(False)(ref_model(ref_x))
    ref_value.backward()
    ref_grads = [p.grad for p in ref_model.parameters()]

    def ddp_step(loss_fn):
        model = DDP(_tiny_model())
        x = full[:, local].clone().requires_grad_(True)
        value = loss_fn(model(x))
        value.backward()
        return value.detach(), x.grad, [p.grad for p in model.parameters()]

    value, x_grad, grads = ddp_step(make_loss(True))
    values = [torch.empty_like(value) for _ in range(world)]
    dist.all_gather(values, value)
    assert all(torch.equal(v, value) for v in values), values  # bitwise the same on every rank
    assert _rel_err(value, ref_value) <= 1e-12, (value, ref_value)
    assert _rel_err(x_grad, world * ref_x.grad[:, local]) <= 1e-6
    assert _rel_err(grads, ref_grads) <= 1e-6, _rel_err(grads, ref_grads)

    # The same checks catch the known distributed bugs:
    # a) no gathering, a per-rank value (as stable-pretraining's SIGReg returns): the value
    #    is that of the local batch, and DDP's averaged gradients are wrong;
    value, _, grads = ddp_step(make_loss(False))
    assert _rel_err(value, ref_value) > 1e-3
    assert _rel_err(grads, ref_grads) > 0.05
    # b) a collective whose backward drops the sum over ranks (lightly issue 1920): the
    #    value is right but every gradient is 1/world of the true one.
    with mock.patch.object(module, name, buggy):
        value, _, grads = ddp_step(make_loss(True))
    assert _rel_err(value, ref_value) <= 1e-12
    assert abs(_rel_err(grads, ref_grads) - (1 - 1 / world)) <= 1e-6
    assert _rel_err([world * g for g in grads], ref_grads) <= 1e-6


@pytest.mark.distributed
@pytest.mark.parametrize("case", sorted(_LOSS_CASES))
def test_gloo_losses_global_value_and_exact_ddp_gradients(run_gloo, case):
    run_gloo(_worker_loss_under_ddp, case)


# ---- unwrapping -------------------------------------------------------------------------


class _Holder(nn.Module):
    """Holds a child called ``module`` but has parameters of its own: not a wrapper."""

    def __init__(self) -> None:
        super().__init__()
        self.module = nn.Linear(2, 2)
        self.head = nn.Linear(2, 1)


def test_unwrap_module_strips_compile_and_data_parallel_in_any_nesting():
    model = _tiny_model()
    assert unwrap_module(model) is model and module_wrappers(model) == []
    compiled = torch.compile(model)  # nothing is compiled until called
    assert unwrap_module(compiled) is model and module_wrappers(compiled) == [compiled]
    dp = nn.DataParallel(model)  # without GPUs a plain holder of .module
    nested = torch.compile(dp)
    assert module_wrappers(nested) == [nested, dp]
    assert unwrap_module(nested) is model
    assert list(unwrap_module(nested).state_dict()) == list(model.state_dict())  # no prefixes
    holder = _Holder()
    assert unwrap_module(holder) is holder and module_wrappers(holder) == []
    assert unwrap_module(torch.compile(holder)) is holder
    with pytest.raises(TypeError, match="module"):
        unwrap_module("model")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="module"):
        module_wrappers(None)  # type: ignore[arg-type]


def _worker_unwrap(rank: int, world: int) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    model = _tiny_model()
    ddp = DDP(model)
    assert unwrap_module(ddp) is model
    compiled = torch.compile(ddp)
    assert module_wrappers(compiled) == [compiled, ddp] and unwrap_module(compiled) is model
    for use_orig_params in (False, True):
        inner = _tiny_model()
        fsdp = FSDP(inner, device_id=torch.device("cpu"), use_orig_params=use_orig_params)
        assert unwrap_module(fsdp) is inner and module_wrappers(fsdp) == [fsdp]


@pytest.mark.distributed
def test_gloo_unwrap_module_strips_ddp_and_fsdp(run_gloo):
    run_gloo(_worker_unwrap)
