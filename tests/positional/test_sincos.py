import math

import pytest
import torch

from jepa_blocks.positional import sincos_2d, sincos_2d_table


def test_table_matches_published_formula():
    # MAE/I-JEPA construction with the row in the first half: written out per channel.
    h, w, dim = 3, 5, 16
    table = sincos_2d_table((h, w), dim)
    f = dim // 4
    for r in range(h):
        for c in range(w):
            row = table[r * w + c]
            for i in range(f):
                omega = 1.0 / 10000 ** (i / f)
                assert row[i].item() == pytest.approx(math.sin(r * omega), abs=1e-6)
                assert row[f + i].item() == pytest.approx(math.cos(r * omega), abs=1e-6)
                assert row[2 * f + i].item() == pytest.approx(math.sin(c * omega), abs=1e-6)
                assert row[3 * f + i].item() == pytest.approx(math.cos(c * omega), abs=1e-6)


def test_fractional_positions_and_shapes():
    pos = torch.tensor([[[0.5, 1.5], [2.0, 0.0]]])
    out = sincos_2d(pos, 8)
    assert out.shape == (1, 2, 8)
    torch.testing.assert_close(out[0, 1], sincos_2d_table((3, 3), 8)[6])


def test_distinct_positions_distinct_embeddings():
    table = sincos_2d_table(14, 64)
    d = torch.cdist(table, table)
    assert (d + torch.eye(196) * 10).min() > 1e-3


@pytest.mark.parametrize("dim", [6, 2])
def test_bad_dim(dim):
    with pytest.raises(ValueError, match="dim"):
        sincos_2d(torch.zeros(2, 2), dim)


def test_bad_positions():
    with pytest.raises(ValueError, match="positions"):
        sincos_2d(torch.zeros(2, 3), 8)
    with pytest.raises(TypeError, match="grid_size"):
        sincos_2d_table("a", 8)
