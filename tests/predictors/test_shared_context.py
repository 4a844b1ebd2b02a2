"""Shared-context attention (jepa_blocks.predictors._shared_context) against a plain
transformer block with an explicit (N, N) mask over the whole shared-context sequence."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from jepa_blocks._checks import value_checks
from jepa_blocks.layers import TransformerBlock
from jepa_blocks.positional.rope2d import RoPE2D
from jepa_blocks.predictors._shared_context import (
    block_attention,
    block_key_mask,
    shared_context_block,
)


def full_mask(context_valid, block_valids):
    """(B, 1, N, N) bool mask of the layout [context | group 0 blocks | group 1 blocks ...],
    written out cell by cell: context rows see real context keys; a query row of a block sees
    the real context keys and the real keys of its own block; a row with no key sees all."""
    b, nc = context_valid.shape
    spans = []  # (start, stop, valid of this block (B, K))
    start = nc
    for valid in block_valids:
        for j in range(valid.shape[1]):
            spans.append((start, start + valid.shape[2], valid[:, j]))
            start += valid.shape[2]
    n = start
    key_valid = torch.cat([context_valid, *(v.flatten(1) for v in block_valids)], dim=1)  # (B, N)
    mask = torch.zeros(b, n, n, dtype=torch.bool)
    mask[:, :nc, :nc] = True
    for s0, s1, _ in spans:
        mask[:, s0:s1, :nc] = True
        mask[:, s0:s1, s0:s1] = True
    mask &= key_valid[:, None, :]
    mask |= ~mask.any(-1, keepdim=True)
    return mask[:, None]


def random_layout(gen, b, nc, groups, p=0.7):
    context_valid = torch.rand(b, nc, generator=gen) < p
    block_valids = [torch.rand(b, m, k, generator=gen) < p for m, k in groups]
    return context_valid, block_valids


def rope_for(seq_len, b, head_dim, gen):
    pos = torch.randint(0, 8, (b, seq_len, 2), generator=gen).double()
    return RoPE2D(head_dim=head_dim).cos_sin(pos)  # (B, 1, N, Dh / 2) each


@pytest.mark.parametrize("use_rope", [False, True])
@pytest.mark.parametrize("train", [False, True])
def test_block_equals_transformer_block_with_full_mask(use_rope, train):
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    block = TransformerBlock(16, num_heads=2, drop_path=0.4 if train else 0.0,
                             layer_scale_init=0.5).double().train(train)
    b, nc, groups = 3, 5, [(2, 4), (3, 2), (1, 1)]
    context_valid, block_valids = random_layout(gen, b, nc, groups)
    n = nc + sum(m * k for m, k in groups)
    x = torch.randn(b, n, 16, generator=gen, dtype=torch.float64)
    rope = rope_for(n, b, 8, gen) if use_rope else None
    torch.manual_seed(7)  # same drop-path draws (one per sample and branch) in both calls
    ref = block(x, rope=rope, attn_mask=full_mask(context_valid, block_valids))
    for fused in (True, False):
        block.attn.fused = fused
        torch.manual_seed(7)
        out = shared_context_block(
            block, x, num_context=nc, groups=groups, rope=rope,
            context_mask=context_valid[:, None, None, :] | ~context_valid.any(-1)[:, None, None, None],
            key_masks=[block_key_mask(context_valid, v) for v in block_valids],
        )
        torch.testing.assert_close(out, ref)
        # Without the context rows (the predictor's last block): the same query rows.
        torch.manual_seed(7)
        queries = shared_context_block(
            block, x, num_context=nc, groups=groups, rope=rope,
            context_mask=None if context_valid.all() else context_valid[:, None, None, :],
            key_masks=[block_key_mask(context_valid, v) for v in block_valids],
            keep_context=False,
        )
        torch.testing.assert_close(queries, ref[:, nc:])


@settings(max_examples=25, deadline=None)
@given(
    b=st.integers(1, 3),
    heads=st.integers(1, 3),
    nc=st.integers(1, 6),
    m=st.integers(1, 4),
    k=st.integers(1, 5),
    p=st.sampled_from([0.0, 0.3, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_block_attention_matches_per_block_softmax(b, heads, nc, m, k, p, seed):
    """Fused and explicit paths against a loop over blocks: softmax over [kc ; k_j]."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    dh = 4
    q, kb, vb = rnd(b, heads, m, k, dh), rnd(b, heads, m, k, dh), rnd(b, heads, m, k, dh)
    kc, vc = rnd(b, heads, nc, dh), rnd(b, heads, nc, dh)
    context_valid, (block_valid,) = random_layout(gen, b, nc, [(m, k)], p=p)
    key_mask = block_key_mask(context_valid, block_valid)
    ref = torch.empty_like(q)
    for j in range(m):
        keys = torch.cat((kc, kb[:, :, j]), dim=2)  # (B, h, Nc + K, Dh)
        values = torch.cat((vc, vb[:, :, j]), dim=2)
        valid = torch.cat((context_valid, block_valid[:, j]), dim=1)  # (B, Nc + K)
        valid = valid | ~valid.any(-1, keepdim=True)  # no real key: every key
        scores = q[:, :, j] @ keys.transpose(-2, -1) / dh**0.5
        scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
        ref[:, :, j] = scores.softmax(-1) @ values
    for fused in (True, False):
        out = block_attention(q, kc, vc, kb, vb, key_mask=key_mask, dropout_p=0.0, fused=fused)
        torch.testing.assert_close(out, ref)


def test_block_attention_bf16_cpu_close_to_fp32():
    gen = torch.Generator().manual_seed(1)
    q, kb, vb = (torch.randn(2, 2, 3, 4, 8, generator=gen) for _ in range(3))
    kc, vc = (torch.randn(2, 2, 6, 8, generator=gen) for _ in range(2))
    context_valid, (block_valid,) = random_layout(gen, 2, 6, [(3, 4)])
    mask = block_key_mask(context_valid, block_valid)
    ref = block_attention(q, kc, vc, kb, vb, key_mask=mask, dropout_p=0.0, fused=True)
    low = block_attention(*(t.bfloat16() for t in (q, kc, vc, kb, vb)), key_mask=mask,
                          dropout_p=0.0, fused=True)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), ref, rtol=0.05, atol=0.05)


def test_block_key_mask_shape_and_all_valid_shortcut():
    context_valid = torch.tensor([[True, True, False], [True, True, True]])
    block_valid = torch.tensor([[[True, False], [False, False]], [[True, True], [True, True]]])
    mask = block_key_mask(context_valid, block_valid)
    assert mask.shape == (2, 1, 2, 1, 5)
    assert mask[0, 0, 0, 0].tolist() == [True, True, False, True, False]
    assert mask[0, 0, 1, 0].tolist() == [True, True, False, False, False]
    none_real = block_key_mask(torch.zeros(1, 2, dtype=torch.bool), torch.zeros(1, 1, 2, dtype=torch.bool))
    assert none_real.all()  # no real key at all: every key (finite outputs)
    ones = torch.ones(2, 3, dtype=torch.bool), torch.ones(2, 2, 2, dtype=torch.bool)
    assert block_key_mask(*ones) is None
    with value_checks(False):  # no host sync: a full mask, same result
        assert block_key_mask(*ones).all()
