import pytest
import torch

from jepa_blocks.layers import PatchEmbed


def test_same_init_state_dict_and_output_as_timm():
    timm_layers = pytest.importorskip("timm.layers")
    torch.manual_seed(0)
    ours = PatchEmbed(img_size=(16, 24), patch_size=4, in_chans=3, embed_dim=8)
    torch.manual_seed(0)
    theirs = timm_layers.PatchEmbed(img_size=(16, 24), patch_size=4, in_chans=3, embed_dim=8, strict_img_size=False)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for name, value in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[name], value, rtol=0, atol=0, msg=name)
    assert (ours.grid_size, ours.num_patches, ours.patch_size) == (theirs.grid_size, theirs.num_patches, (4, 4))
    for size in ((16, 24), (8, 12)):  # other sizes too, as timm with strict_img_size=False
        images = torch.randn(2, 3, *size)
        torch.testing.assert_close(ours(images), theirs(images), rtol=0, atol=0)


def test_row_major_token_order():
    embed = PatchEmbed(img_size=8, patch_size=4, in_chans=1, embed_dim=1, bias=False)
    with torch.no_grad():
        embed.proj.weight.fill_(1.0)
    images = torch.zeros(1, 1, 8, 8)
    images[0, 0, 4:, :4] = 1.0  # the patch at (row 1, col 0): token 1 * 2 + 0
    assert embed(images)[0, :, 0].tolist() == [0.0, 0.0, 16.0, 0.0]


def test_bad_images():
    embed = PatchEmbed(img_size=8, patch_size=4, embed_dim=4)
    with pytest.raises(ValueError, match="divisible"):
        embed(torch.randn(1, 3, 10, 8))
    with pytest.raises(ValueError, match="images"):
        embed(torch.randn(3, 8, 8))
