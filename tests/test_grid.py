import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from jepa_blocks.grid import level_footprint, level_grid_size, pool_grid_tokens, token_positions


@settings(max_examples=40, deadline=None)
@given(h=st.integers(1, 20), w=st.integers(1, 20), level=st.integers(0, 3))
def test_pooling_matches_loop_average(h, w, level):
    x = torch.randn(2, h * w, 3, dtype=torch.float64)
    pooled = pool_grid_tokens(x, (h, w), level=level)
    lh, lw = level_grid_size((h, w), level)
    assert pooled.shape == (2, lh * lw, 3)
    f = 2**level
    grid = x.reshape(2, h, w, 3)
    for r in range(lh):
        for c in range(lw):
            cell = grid[:, r * f : (r + 1) * f, c * f : (c + 1) * f].reshape(2, -1, 3).mean(1)
            torch.testing.assert_close(pooled[:, r * lw + c], cell)


@settings(max_examples=40, deadline=None)
@given(h=st.integers(1, 20), w=st.integers(1, 20), level=st.integers(0, 3))
def test_positions_are_footprint_centres(h, w, level):
    lh, lw = level_grid_size((h, w), level)
    ids = torch.arange(lh * lw)
    pos = token_positions(ids, (h, w), level=level)
    dense = torch.eye(lh * lw, dtype=torch.bool)
    fine = level_footprint(dense, (h, w), level=level).reshape(-1, h, w)
    rows = torch.arange(h, dtype=torch.float32)[:, None].expand(h, w)
    cols = torch.arange(w, dtype=torch.float32)[None, :].expand(h, w)
    for i in range(lh * lw):
        assert fine[i].any()
        assert pos[i, 0] == pytest.approx(float(rows[fine[i]].min() + rows[fine[i]].max()) / 2)
        assert pos[i, 1] == pytest.approx(float(cols[fine[i]].min() + cols[fine[i]].max()) / 2)
    assert fine.sum(0).eq(1).all()  # the level cells tile the grid exactly


def test_bad_args():
    with pytest.raises(ValueError, match="x"):
        pool_grid_tokens(torch.randn(1, 10, 2), (3, 3), level=1)
    with pytest.raises(ValueError, match="level"):
        level_grid_size(4, -1)
    with pytest.raises(ValueError, match="indices"):
        level_footprint(torch.ones(1, 5, dtype=torch.bool), 4, level=1)
