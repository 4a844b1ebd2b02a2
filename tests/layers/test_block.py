import torch

from jepa_blocks.layers import TransformerBlock


def test_timm_block_weights_load():
    from timm.models.vision_transformer import Block

    ours = TransformerBlock(32, num_heads=4, layer_scale_init=1e-3)
    theirs = Block(32, num_heads=4, qkv_bias=True, init_values=1e-3)
    missing, unexpected = ours.load_state_dict(theirs.state_dict(), strict=False)
    assert not missing and not unexpected
    x = torch.randn(2, 7, 32)
    torch.testing.assert_close(ours(x), theirs(x))


def test_old_import_path_is_the_same_object():
    from jepa_blocks import encoders, layers
    from jepa_blocks.encoders import attention as old

    assert old.TransformerBlock is layers.TransformerBlock
    assert old.Attention is layers.Attention is encoders.Attention
    assert old.transformer_stack is layers.transformer_stack
    assert old.init_transformer_weights is layers.init_transformer_weights
