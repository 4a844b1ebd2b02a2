"""What a lightly user writes, run as is: the losses behave like torch (and lightly) losses.

Each test is a short script in a lightly user's style: build the loss with lightly's
argument names, call it on model outputs, do arithmetic on the result, backward, step.
"""

from __future__ import annotations

import pytest
import torch

from jepa_blocks.losses import LeJEPALoss, NTXentLoss, SIGRegLoss, VICRegLoss


def test_lightly_style_training_step():
    torch.manual_seed(0)
    backbone = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16))
    optimizer = torch.optim.SGD(backbone.parameters(), lr=0.01)
    vicreg = VICRegLoss(lambda_param=25.0, mu_param=25.0, nu_param=1.0, gather_distributed=False, eps=1e-4)
    ntxent = NTXentLoss(temperature=0.5, gather_distributed=False)
    sigreg = SIGRegLoss(num_vectors=256, knots=17)

    x = torch.randn(16, 32)
    x0, x1 = x + 0.1 * torch.randn_like(x), x + 0.1 * torch.randn_like(x)  # two "augmentations"
    z0, z1 = backbone(x0), backbone(x1)

    loss = VICRegLoss()(z0, z1)
    loss.backward(retain_graph=True)                 # a Tensor, not a tuple
    half, double = 0.5 * loss, 2 * loss
    assert isinstance(double, torch.Tensor) and torch.equal(double, loss + loss)
    assert torch.equal(half * 4, double)

    losses = torch.stack([vicreg(z0, z1), ntxent(z0, z1), sigreg(torch.cat([z0, z1]))])
    assert losses.shape == (3,)
    total = losses @ torch.tensor([1.0, 0.5, 0.05])
    optimizer.zero_grad()
    total.backward()
    optimizer.step()
    assert all(p.grad is not None for p in backbone.parameters())
    print({k: float(v) for k, v in vicreg.last_terms.items()})  # the named terms, for logging


def test_lightly_vicreg_on_tokens():
    tokens_a = torch.randn(8, 5, 16, requires_grad=True)  # (B, T, D), as lightly accepts
    tokens_b = torch.randn(8, 5, 16)
    loss = VICRegLoss()(tokens_a, tokens_b)
    loss.backward()
    per_token = torch.stack([VICRegLoss()(tokens_a[:, t], tokens_b[:, t]) for t in range(5)]).mean()
    torch.testing.assert_close(loss, per_token)


def test_lightly_lejepa_names():
    criterion = LeJEPALoss(lambda_param=0.05, sigreg_num_vectors=64, sigreg_knots=17, sigreg_t_max=3.0)
    global_proj = torch.randn(2, 32, 16, requires_grad=True)  # (V_global, N, D)
    local_proj = torch.randn(4, 32, 16, requires_grad=True)   # (V_local, N, D)
    loss = criterion(global_proj, local_views=local_proj)
    (1.0 * loss).backward()
    assert global_proj.grad is not None and local_proj.grad is not None
    with pytest.raises(TypeError, match="lambda_param"):
        LeJEPALoss(lam=0.05, lambda_param=0.05)
