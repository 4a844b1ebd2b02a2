import pytest
import torch

from jepa_blocks.layers import TransformerBlock, transformer_stack


def test_depth_blocks_with_linear_drop_path():
    blocks = transformer_stack(16, depth=4, num_heads=2, drop_path_rate=0.3, layer_scale_init=1e-4)
    assert len(blocks) == 4 and all(isinstance(b, TransformerBlock) for b in blocks)
    rates = [getattr(b.drop_path1, "drop_prob", 0.0) for b in blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert all(float(b.ls1.gamma.detach()[0]) == pytest.approx(1e-4) for b in blocks)
    x = torch.randn(2, 5, 16)
    for b in blocks.eval():
        x = b(x)
    assert x.shape == (2, 5, 16)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [({"depth": 0}, ValueError, "depth"), ({"depth": 2.0}, TypeError, "depth"),
     ({"drop_path_rate": 1.0}, ValueError, "drop_path_rate"), ({"num_heads": 3}, ValueError, "num_heads")],
)
def test_bad_args(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        transformer_stack(16, **{"depth": 2, "num_heads": 2, **kwargs})
