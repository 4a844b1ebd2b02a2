"""DropPath: timm's draws without seeds; with per-sample seeds, a sample's keep decision
depends on the sample only (not on its batch, rank or micro-batch); the tensor SplitMix64
equals the Python one."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from timm.layers import DropPath as TimmDropPath
from torch import nn

from jepa_blocks._seeding import MASK64, mix, splitmix64
from jepa_blocks.layers import DropPath, TransformerBlock, drop_path, sample_seeded_drop_path
from jepa_blocks.layers.drop_path import splitmix64_tensor


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def test_splitmix64_tensor_equals_python_ints():
    rng = random.Random(0)
    values = [0, 1, (1 << 63) - 1, 1 << 63, MASK64] + [rng.getrandbits(64) for _ in range(2000)]
    out = splitmix64_tensor(torch.tensor([_signed(v) for v in values], dtype=torch.int64))
    assert out.tolist() == [_signed(splitmix64(v)) for v in values]


def test_seeded_rows_follow_the_documented_formula():
    # Re-derived with Python ints: row r of sample r // k is kept iff
    # top24(mix(seed, r % k, salt, call)) / 2**24 >= p.
    seeds, k, salt, call, p = [5, -7, 1 << 40], 3, 12345, 2, 0.4
    x = torch.ones(len(seeds) * k, 2)
    out = drop_path(x, drop_prob=p, sample_seeds=torch.tensor(seeds), salt=salt, call=call)
    expected = []
    for r in range(len(seeds) * k):
        h = mix(seeds[r // k] & MASK64, r % k, salt, call)
        expected.append(1 / (1 - p) if (h >> 40) / 2**24 >= p else 0.0)
    torch.testing.assert_close(out[:, 0], torch.tensor(expected), rtol=1e-6, atol=0)


def test_without_seeds_equals_timm():
    x = torch.randn(32, 5, 8)
    for p, scale in ((0.3, True), (0.5, False)):
        torch.manual_seed(3)
        ours = DropPath(drop_prob=p, scale_by_keep=scale)(x)
        torch.manual_seed(3)
        theirs = TimmDropPath(p, scale_by_keep=scale)(x)
        assert torch.equal(ours, theirs)
    assert DropPath(drop_prob=0.3).state_dict() == {} and TimmDropPath(0.3).state_dict() == {}
    layer = DropPath(drop_prob=0.3).eval()
    assert torch.equal(layer(x), x)


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(2, 12),
    views=st.integers(1, 3),
    start=st.integers(0, 11),
    stop=st.integers(1, 12),
    p=st.floats(0.05, 0.9),
)
def test_a_samples_draw_does_not_depend_on_its_batch(n, views, start, stop, p):
    # The "global batch" of n samples, and a micro-batch / rank share [start, stop) of it.
    start, stop = min(start, n - 1), max(min(stop, n), min(start, n - 1) + 1)
    seeds = torch.randint(-(2**62), 2**62, (n,), generator=torch.Generator().manual_seed(n))
    x = torch.randn(n * views, 4)
    whole = drop_path(x, drop_prob=p, sample_seeds=seeds, salt=9)
    part = drop_path(x[start * views : stop * views], drop_prob=p, sample_seeds=seeds[start:stop], salt=9)
    assert torch.equal(whole[start * views : stop * views], part)
    torch.manual_seed(0)  # the global RNG plays no part
    again = drop_path(x, drop_prob=p, sample_seeds=seeds, salt=9)
    assert torch.equal(whole, again)


def test_keep_rate_and_independence_of_layers_and_calls():
    seeds = torch.arange(20000)
    x = torch.ones(20000, 1)
    a = drop_path(x, drop_prob=0.3, sample_seeds=seeds, salt=1) > 0
    b = drop_path(x, drop_prob=0.3, sample_seeds=seeds, salt=2) > 0
    c = drop_path(x, drop_prob=0.3, sample_seeds=seeds, salt=1, call=1) > 0
    for m in (a, b, c):
        assert abs(m.float().mean().item() - 0.7) < 0.015
    for u, v in ((a, b), (a, c)):  # independent draws: P(both kept) = 0.49
        assert abs((u & v).float().mean().item() - 0.49) < 0.015


def test_context_seeds_every_layer_by_name_and_call_and_resets():
    torch.manual_seed(0)
    block = TransformerBlock(16, num_heads=2, drop_path=0.5)
    assert isinstance(block.drop_path1, DropPath)
    x = torch.randn(6, 3, 16)
    seeds = torch.arange(100, 106)
    with sample_seeded_drop_path(block, seeds):
        first = block(x)
        second = block(x)  # a second call draws anew (call counter)
        assert block.drop_path1.calls == 2
    assert not torch.equal(first, second)
    assert block.drop_path1.sample_seeds is None and block.drop_path1.calls == 0
    # Wrapped or not (DDP / compile prefixes), the same salts; a share of the samples alone
    # gets the same rows.
    wrapper = nn.Module()
    wrapper.module = block
    with sample_seeded_drop_path(wrapper, seeds[2:5]):
        share = block(x[2:5])
    torch.testing.assert_close(share, first[2:5], rtol=0, atol=0)


def test_bad_inputs_name_the_argument():
    x = torch.ones(4, 2)
    with pytest.raises(ValueError, match="drop_prob"):
        DropPath(drop_prob=1.0)
    with pytest.raises(TypeError, match="sample_seeds"):
        drop_path(x, drop_prob=0.1, sample_seeds=torch.ones(4))
    with pytest.raises(ValueError, match="multiple"):
        drop_path(x, drop_prob=0.1, sample_seeds=torch.arange(3))
    with pytest.raises(ValueError, match="call"):
        drop_path(x, drop_prob=0.1, sample_seeds=torch.arange(4), call=-1)
    with pytest.raises(TypeError, match="sample_seeds"):
        with sample_seeded_drop_path(DropPath(drop_prob=0.1), torch.ones(2)):
            pass
    with pytest.raises(TypeError, match="z"):
        splitmix64_tensor(torch.ones(2, dtype=torch.int32))
