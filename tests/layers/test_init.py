import math

import pytest
import torch
from torch import nn

from jepa_blocks.layers import (
    init_transformer_weights,
    rescale_residual_branches,
    transformer_stack,
)


def test_linear_and_norm_init():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.LayerNorm(256), nn.Linear(256, 8, bias=False))
    nn.init.constant_(model[1].weight, 3.0)
    model.apply(lambda m: init_transformer_weights(m, std=0.05))
    assert abs(float(model[0].weight.detach().std()) / 0.05 - 1) < 0.05
    assert (model[0].bias == 0).all() and (model[1].weight == 1).all() and (model[1].bias == 0).all()
    assert model[0].weight.abs().max() <= 2.0  # truncated at +-2 (torch's default bounds)


def test_rescale_divides_by_sqrt_two_layer_id():
    torch.manual_seed(0)
    blocks = transformer_stack(8, depth=3, num_heads=2)
    before = [(b.attn.proj.weight.clone(), b.mlp.fc2.weight.clone()) for b in blocks]
    rescale_residual_branches(blocks)
    for layer_id, (b, (proj, fc2)) in enumerate(zip(blocks, before, strict=True), start=1):
        torch.testing.assert_close(b.attn.proj.weight, proj / math.sqrt(2 * layer_id))
        torch.testing.assert_close(b.mlp.fc2.weight, fc2 / math.sqrt(2 * layer_id))


def test_bad_args():
    with pytest.raises(TypeError, match="module"):
        init_transformer_weights("linear")
    with pytest.raises(ValueError, match="std"):
        init_transformer_weights(nn.Linear(2, 2), std=0.0)
    with pytest.raises(TypeError, match="blocks"):
        rescale_residual_branches(nn.Linear(2, 2))
    with pytest.raises(TypeError, match=r"blocks\[0\]"):
        rescale_residual_branches([nn.Linear(2, 2)])
