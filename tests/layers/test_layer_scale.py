import pytest
import torch

from jepa_blocks.layers import LayerScale


def test_same_state_dict_and_output_as_timm():
    timm_layers = pytest.importorskip("timm.layers")
    ours, theirs = LayerScale(8, init_values=0.3), timm_layers.LayerScale(8, init_values=0.3)
    assert ours.state_dict().keys() == theirs.state_dict().keys() == {"gamma"}
    torch.testing.assert_close(ours.gamma, theirs.gamma, rtol=0, atol=0)
    x = torch.randn(2, 3, 8)
    torch.testing.assert_close(ours(x), x * 0.3)
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)


def test_inplace_multiplies_the_input():
    x = torch.ones(2, 4)
    out = LayerScale(4, init_values=2.0, inplace=True).requires_grad_(False)(x)
    assert out.data_ptr() == x.data_ptr() and torch.equal(x, torch.full((2, 4), 2.0))


def test_bad_arguments():
    with pytest.raises(ValueError, match="dim"):
        LayerScale(0)
    with pytest.raises(TypeError, match="inplace"):
        LayerScale(4, inplace=1)
