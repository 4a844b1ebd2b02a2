"""Tests for jepa_blocks.masking.indices (MaskIndices, mask_to_indices, gather_tokens)."""

from __future__ import annotations

import doctest

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import jepa_blocks.masking.indices as indices_module
from jepa_blocks.masking import MaskIndices, gather_tokens, mask_to_indices


@st.composite
def bool_masks(draw, max_lead=2):
    lead = draw(st.lists(st.integers(1, 4), min_size=1, max_size=max_lead))
    n = draw(st.integers(1, 20))
    seed = draw(st.integers(0, 2**31))
    p = draw(st.floats(0.0, 1.0))
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*lead, n, generator=g) < p


@settings(max_examples=100, deadline=None)
@given(bool_masks(), st.integers(0, 5))
def test_mask_to_indices_layout(mask, extra):
    n = mask.shape[-1]
    flat = mask.reshape(-1, n)
    max_count = int(flat.sum(-1).max())
    for pad_to in (None, max_count + extra):
        m = mask_to_indices(mask, pad_to=pad_to)
        k = max_count if pad_to is None else pad_to
        assert m.shape == (*mask.shape[:-1], k)
        rows = flat.shape[0]
        idx, val = m.indices.reshape(rows, k), m.valid.reshape(rows, k)
        for row in range(rows):
            expect = [i for i in range(n) if flat[row, i]]  # ascending by construction
            count = len(expect)
            assert idx[row, :count].tolist() == expect
            assert val[row, :count].all() and not val[row, count:].any()
            assert (idx[row, count:] == 0).all()
        # Round trip through the dense form.
        assert torch.equal(m.to_bool_mask(n), mask)
        assert torch.equal(m.counts, mask.sum(-1))


def test_mask_to_indices_pad_to_too_small_raises():
    mask = torch.tensor([[True, True, False]])
    with pytest.raises(ValueError, match="pad_to"):
        mask_to_indices(mask, pad_to=1)
    with pytest.raises(TypeError, match="mask"):
        mask_to_indices(torch.ones(2, 3))


def test_to_bool_mask_keeps_id_zero_next_to_padding():
    m = MaskIndices(
        torch.tensor([[0, 2, 0], [1, 0, 0]]), torch.tensor([[1, 1, 0], [1, 0, 0]]).bool()
    )
    assert m.to_bool_mask(3).tolist() == [[True, False, True], [False, True, False]]
    with pytest.raises(ValueError, match="num_tokens"):
        m.to_bool_mask(0)


def test_mask_indices_helpers_and_validation():
    m = mask_to_indices(torch.tensor([[[True, False], [True, True]]]))
    assert m.shape == (1, 2, 2) and m.counts.tolist() == [[1, 2]] and not m.all_valid
    assert m.flatten().shape == (2, 2)
    assert m.to("cpu").indices.device.type == "cpu"
    assert mask_to_indices(torch.ones(2, 3, dtype=torch.bool)).all_valid
    with pytest.raises(ValueError, match="same shape"):
        MaskIndices(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 2, dtype=torch.bool))
    with pytest.raises(TypeError, match="indices"):
        MaskIndices(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="valid"):
        MaskIndices(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3))


@settings(max_examples=50, deadline=None)
@given(
    st.integers(1, 4),
    st.integers(1, 10),
    st.integers(1, 5),
    st.integers(1, 3),
    st.integers(0, 2**31),
)
def test_gather_tokens_matches_loop(b, n, k, m, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, 3, generator=g, dtype=torch.float64)
    idx2 = torch.randint(0, n, (b, k), generator=g)
    idx3 = torch.randint(0, n, (b, m, k), generator=g)
    out2 = gather_tokens(x, idx2)
    out3 = gather_tokens(x, MaskIndices(idx3, torch.ones_like(idx3, dtype=torch.bool)))
    for i in range(b):
        for j in range(k):
            assert torch.equal(out2[i, j], x[i, idx2[i, j]])
            for t in range(m):
                assert torch.equal(out3[i, t, j], x[i, idx3[i, t, j]])


def test_gather_tokens_bad_inputs():
    x = torch.randn(2, 4, 3)
    with pytest.raises(ValueError, match="indices"):
        gather_tokens(x, torch.tensor([[0, 4], [0, 1]]))
    with pytest.raises(ValueError, match="batch size"):
        gather_tokens(x, torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="indices"):
        gather_tokens(x, torch.zeros(2, 2))
    with pytest.raises(ValueError, match="x"):
        gather_tokens(torch.randn(4, 3), torch.zeros(2, 2, dtype=torch.long))


def test_docstring_examples():
    result = doctest.testmod(indices_module, extraglobs={"torch": torch})
    assert result.attempted > 0 and result.failed == 0
