"""MLPProjector and GlobalBatchNorm1d: shapes, parity with nn.BatchNorm1d, global statistics under DDP."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from jepa_blocks.necks import GlobalBatchNorm1d, MLPProjector, global_batch_norm


def test_global_batch_norm_equals_torch_batch_norm_in_one_process():
    torch.manual_seed(0)
    x = torch.randn(32, 8, dtype=torch.float64) * 3 + 1
    ours, ref = GlobalBatchNorm1d(8).double(), nn.BatchNorm1d(8).double()
    with torch.no_grad():
        ours.weight.uniform_(0.5, 2)
        ours.bias.normal_()
    ref.load_state_dict(ours.state_dict())
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), ref(xb)
    torch.testing.assert_close(ya, yb)
    (ya.sin().sum()).backward()
    (yb.sin().sum()).backward()
    torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    torch.testing.assert_close(ours.running_var, ref.running_var)  # unbiased, as torch keeps it
    ours.eval(), ref.eval()
    torch.testing.assert_close(ours(x), ref(x))


def test_global_batch_norm_formula():
    x = torch.randn(10, 3, dtype=torch.float64)
    y, mean, var = global_batch_norm(x, eps=0.0)
    torch.testing.assert_close(y, (x - x.mean(0)) / x.std(0, unbiased=False))
    torch.testing.assert_close(var, x.var(0, unbiased=True))


@pytest.mark.parametrize("norm", ["batch", "layer", "none"])
def test_projector_shapes_and_layers(norm):
    proj = MLPProjector(in_dim=12, hidden_dims=(16, 8), out_dim=4, norm=norm)
    assert proj(torch.randn(5, 12)).shape == (5, 4)
    assert proj(torch.randn(3, 5, 12)).shape == (3, 5, 4)  # leading dims flattened and restored
    linears = [m for m in proj.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(12, 16), (16, 8), (8, 4)]
    assert MLPProjector(in_dim=3, hidden_dims=(), out_dim=2)(torch.randn(4, 3)).shape == (4, 2)


def test_projector_views_share_batch_statistics():
    """(V, N, D) input: one batch norm over all V * N rows, as LeJEPA's projector sees them."""
    torch.manual_seed(0)
    proj = MLPProjector(in_dim=6, hidden_dims=(8,), out_dim=3)
    z = torch.randn(2, 10, 6)
    torch.testing.assert_close(proj(z), proj(z.flatten(0, 1)).unflatten(0, (2, 10)))


def _ddp_bn(rank: int, world: int, x: torch.Tensor) -> None:
    sizes = [3, 5]  # unequal local batches
    start = sum(sizes[:rank])
    bn = GlobalBatchNorm1d(4, distributed=True).double()
    xl = x[start:start + sizes[rank]].clone().requires_grad_()
    y = bn(xl)
    y.sin().sum().backward()
    ref = GlobalBatchNorm1d(4).double()  # one process, the concatenated batch
    xr = x.clone().requires_grad_()
    yr = ref(xr)
    yr.sin().sum().backward()
    rows = slice(start, start + sizes[rank])
    torch.testing.assert_close(y.detach(), yr.detach()[rows])
    # jepa_blocks.distributed's convention: each rank gets world_size * dL/dx_local of the
    # DDP loss L = mean over ranks of the local losses, i.e. d(sum of local losses)/dx.
    torch.testing.assert_close(xl.grad, xr.grad[rows])
    torch.testing.assert_close(bn.running_var, ref.running_var)
    torch.testing.assert_close(bn.running_mean, ref.running_mean)


@pytest.mark.distributed
def test_global_batch_norm_under_ddp_equals_one_process(run_gloo):
    torch.manual_seed(1)
    run_gloo(_ddp_bn, torch.randn(8, 4, dtype=torch.float64))
