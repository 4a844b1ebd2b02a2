from __future__ import annotations

import doctest
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import jepa_blocks.targets.hierarchy as hierarchy_module
from jepa_blocks.masking.indices import MaskIndices, mask_to_indices
from jepa_blocks.targets.hierarchy import hierarchical_targets


def loop_pool(x, grid, level):
    """Level-``level`` cell features by an explicit average over each footprint (B, h_l * w_l, D)."""
    h, w = grid
    f = 2**level
    lh, lw = math.ceil(h / f), math.ceil(w / f)
    out = torch.zeros(x.shape[0], lh * lw, x.shape[2], dtype=x.dtype)
    for r in range(lh):
        for c in range(lw):
            cells = [i * w + j for i in range(r * f, min(r * f + f, h)) for j in range(c * f, min(c * f + f, w))]
            out[:, r * lw + c] = sum(x[:, k] for k in cells) / len(cells)
    return out


def loop_gather(pooled, ids):
    """out[b, ..., k] = pooled[b, ids[b, ..., k]] by a loop over samples and slots."""
    out = torch.zeros(*ids.shape, pooled.shape[-1], dtype=pooled.dtype)
    for b in range(ids.shape[0]):
        for pos in torch.cartesian_prod(*[torch.arange(s) for s in ids.shape[1:]]).reshape(-1, ids.ndim - 1):
            key = (b, *pos.tolist())
            out[key] = pooled[b, int(ids[key])]
    return out


def random_targets(grid, num_levels, batch, gen, flat=()):
    out = []
    for lvl in range(num_levels):
        f = 2**lvl
        n = math.ceil(grid[0] / f) * math.ceil(grid[1] / f)
        shape = (batch,) if lvl in flat else (batch, 2)
        out.append(mask_to_indices(torch.rand(*shape, n, generator=gen) < 0.5))
    return out


@pytest.mark.parametrize("grid,num_levels", [((4, 4), 3), ((7, 7), 3), ((6, 8), 4), ((5, 3), 2)])
def test_pooled_targets_match_loop(grid, num_levels):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, grid[0] * grid[1], 5, generator=gen, dtype=torch.float64)
    targets = random_targets(grid, num_levels, 2, gen, flat=(1,))
    out = hierarchical_targets(x, grid_size=grid, targets=targets)
    assert len(out) == num_levels
    for lvl, (o, t) in enumerate(zip(out, targets, strict=True)):
        assert o.shape == (*t.shape, 5)
        torch.testing.assert_close(o, loop_gather(loop_pool(x, grid, lvl), t.indices))


def test_level_zero_is_plain_gather():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 36, 4, generator=gen)
    ids = torch.tensor([[0, 5, 35], [1, 2, 3], [7, 7, 8]])
    (out,) = hierarchical_targets(x, grid_size=6, targets=ids)
    for b in range(3):
        for k in range(3):
            assert torch.equal(out[b, k], x[b, ids[b, k]])


def test_pooled_known_values():
    # 3 x 3 grid, token value = its id: level 1 cells cover {0,1,3,4}, {2,5}, {6,7}, {8}.
    x = torch.arange(9.0).reshape(1, 9, 1)
    ids = torch.tensor([[0, 1, 2, 3]])
    _, out = hierarchical_targets(x, grid_size=3, targets=[ids[:, :1], ids])
    assert out.flatten().tolist() == [2.0, 3.5, 6.5, 8.0]
    # Level 2 of 3 x 3 is one cell: the mean of everything.
    out2 = hierarchical_targets(x, grid_size=3, targets=[ids[:, :1], ids[:, :1], ids[:, :1]])[2]
    assert out2.flatten().tolist() == [4.0]


@settings(max_examples=20, deadline=None)
@given(h=st.integers(1, 9), w=st.integers(1, 9), level=st.integers(0, 4), seed=st.integers(0, 2**16))
def test_pooled_property(h, w, level, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, h * w, 3, generator=gen, dtype=torch.float64)
    f = 2**level
    n = math.ceil(h / f) * math.ceil(w / f)
    ids = torch.randint(0, n, (2, 3), generator=gen)
    dummy = [torch.zeros(2, 1, dtype=torch.long)] * level
    out = hierarchical_targets(x, grid_size=(h, w), targets=[*dummy, ids])[level]
    torch.testing.assert_close(out, loop_gather(loop_pool(x, (h, w), level), ids))


def test_layers_source_uses_each_level_layer():
    grid = (7, 6)
    gen = torch.Generator().manual_seed(2)
    feats = [torch.randn(2, 42, d, generator=gen, dtype=torch.float64) for d in (3, 4, 5)]
    targets = random_targets(grid, 3, 2, gen, flat=(2,))
    out = hierarchical_targets(feats, grid_size=grid, targets=targets, source="layers")
    for lvl, (o, t) in enumerate(zip(out, targets, strict=True)):
        assert o.shape == (*t.shape, (3, 4, 5)[lvl])
        torch.testing.assert_close(o, loop_gather(loop_pool(feats[lvl], grid, lvl), t.indices))
    # Changing layer 1 changes level 1 only.
    feats2 = [feats[0], feats[1] + 1.0, feats[2]]
    out2 = hierarchical_targets(feats2, grid_size=grid, targets=targets, source="layers")
    assert torch.equal(out2[0], out[0]) and torch.equal(out2[2], out[2])
    torch.testing.assert_close(out2[1], out[1] + 1.0)


def test_not_detached():
    x = torch.randn(1, 16, 2, requires_grad=True)
    targets = [torch.tensor([[0, 3]]), torch.tensor([[3]])]
    out = hierarchical_targets(x, grid_size=4, targets=targets)
    sum(o.sum() for o in out).backward()
    expected = torch.zeros(16)
    expected[[0, 3]] += 1.0
    expected[[10, 11, 14, 15]] += 0.25  # level-1 cell 3 = rows 2-3, cols 2-3
    torch.testing.assert_close(x.grad[0, :, 0], expected)


def test_bad_inputs():
    x = torch.randn(2, 16, 3)
    t = [mask_to_indices(torch.rand(2, 2, 16) < 0.5), mask_to_indices(torch.rand(2, 4) < 0.5)]
    with pytest.raises(ValueError, match="source"):
        hierarchical_targets(x, grid_size=4, targets=t, source="mean")
    with pytest.raises(TypeError, match="features"):
        hierarchical_targets([x, x], grid_size=4, targets=t)
    with pytest.raises(TypeError, match="features"):
        hierarchical_targets(x, grid_size=4, targets=t, source="layers")
    with pytest.raises(ValueError, match="features"):
        hierarchical_targets([x], grid_size=4, targets=t, source="layers")
    with pytest.raises(ValueError, match=r"features\[1\]"):
        hierarchical_targets([x, x[:1]], grid_size=4, targets=t, source="layers")
    with pytest.raises(ValueError, match="features"):
        hierarchical_targets(x, grid_size=(4, 5), targets=t)
    with pytest.raises(ValueError, match="features"):
        hierarchical_targets(x[0], grid_size=4, targets=t)
    with pytest.raises(TypeError, match="features"):
        hierarchical_targets(x.long(), grid_size=4, targets=t)
    with pytest.raises(ValueError, match="grid_size"):
        hierarchical_targets(x, grid_size=(0, 4), targets=t)
    with pytest.raises(ValueError, match=r"targets\[1\]"):
        hierarchical_targets(x, grid_size=4, targets=[t[0], torch.tensor([[4], [0]])])  # 2 x 2 grid
    with pytest.raises(ValueError, match=r"targets\[0\]"):
        hierarchical_targets(x, grid_size=4, targets=[t[0].indices[:1], t[1]])
    with pytest.raises(ValueError, match=r"targets\[0\]"):
        hierarchical_targets(x, grid_size=4, targets=[torch.zeros(2, 1, 1, 1, dtype=torch.long)])
    with pytest.raises(TypeError, match=r"targets\[1\]"):
        hierarchical_targets(x, grid_size=4, targets=[t[0], [0, 1]])
    with pytest.raises(TypeError, match="targets"):
        hierarchical_targets(x, grid_size=4, targets="ids")
    with pytest.raises(ValueError, match="targets"):
        hierarchical_targets(x, grid_size=4, targets=[])


def test_single_mask_indices_is_one_level():
    x = torch.randn(2, 16, 3)
    m = MaskIndices(torch.tensor([[1, 2], [3, 0]]), torch.tensor([[True, True], [True, False]]))
    (out,) = hierarchical_targets(x, grid_size=4, targets=m)
    assert out.shape == (2, 2, 3)


def test_doctest_example_runs():
    assert doctest.testmod(hierarchy_module).failed == 0
