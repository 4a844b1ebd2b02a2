import pytest
import torch

from jepa_blocks.layers import Mlp


def test_same_init_state_dict_and_output_as_timm():
    timm_layers = pytest.importorskip("timm.layers")
    torch.manual_seed(0)
    ours = Mlp(16, hidden_features=40, out_features=8)
    torch.manual_seed(0)
    theirs = timm_layers.Mlp(16, hidden_features=40, out_features=8)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for name, value in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[name], value, rtol=0, atol=0, msg=name)
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)


def test_formula_and_norm_layer():
    mlp = Mlp(4, hidden_features=6, act_layer=torch.nn.ReLU, norm_layer=torch.nn.LayerNorm)
    x = torch.randn(2, 4)
    hidden = torch.nn.functional.layer_norm(torch.relu(x @ mlp.fc1.weight.T + mlp.fc1.bias), (6,),
                                            mlp.norm.weight, mlp.norm.bias)
    torch.testing.assert_close(mlp(x), hidden @ mlp.fc2.weight.T + mlp.fc2.bias)


@pytest.mark.parametrize("kwargs, match", [({"in_features": 0}, "in_features"), ({"drop": 1.5}, "drop"),
                                           ({"hidden_features": 2.5}, "hidden_features")])
def test_bad_arguments(kwargs, match):
    with pytest.raises((TypeError, ValueError), match=match):
        Mlp(**{"in_features": 4, **kwargs})
