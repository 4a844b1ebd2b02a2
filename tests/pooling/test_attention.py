import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from jepa_blocks._checks import value_checks
from jepa_blocks.evaluation import pool_tokens
from jepa_blocks.pooling import AttentionPool, attention_pool

FAST = settings(max_examples=25, deadline=None)


@st.composite
def pool_cases(draw, max_batch=3, max_items=6):
    """(module in float64 with random weights, x (B, N, D), valid (B, N) with >= 1 real per row)."""
    heads = draw(st.integers(1, 3))
    dim = heads * draw(st.integers(1, 3))
    b, n = draw(st.integers(1, max_batch)), draw(st.integers(1, max_items))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    valid = torch.rand(b, n, generator=g) < draw(st.floats(0.2, 1.0))
    valid[torch.arange(b), torch.randint(0, n, (b,), generator=g)] = True
    x = torch.randn(b, n, dim, dtype=torch.float64, generator=g)
    pool = random_pool(
        dim=dim,
        num_heads=heads,
        num_queries=draw(st.integers(1, 3)),
        out_dim=draw(st.sampled_from([None, 1, 5])),
        norm=draw(st.booleans()),
        qkv_bias=draw(st.booleans()),
        seed=seed,
    )
    return pool, x, valid


def random_pool(seed=0, **kwargs):
    """An AttentionPool in float64 with O(1) random parameters (the default init is tiny)."""
    pool = AttentionPool(**kwargs).double()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in pool.parameters():
            p.copy_(torch.randn(p.shape, dtype=p.dtype, generator=g))
    return pool


def reference_pool(pool, x, valid):
    """softmax(q k^T / sqrt(Dh)) v per head, written out with loops over samples, heads, items."""
    d, h = pool.dim, pool.num_heads
    dh = d // h
    wk, wv = pool.kv.weight[:d], pool.kv.weight[d:]
    bk = pool.kv.bias[:d] if pool.kv.bias is not None else torch.zeros(d, dtype=x.dtype)
    bv = pool.kv.bias[d:] if pool.kv.bias is not None else torch.zeros(d, dtype=x.dtype)
    bq = pool.q.bias if pool.q.bias is not None else torch.zeros(d, dtype=x.dtype)
    out = torch.zeros(x.shape[0], pool.num_queries, pool.out_dim, dtype=x.dtype)
    for b in range(x.shape[0]):
        items = [x[b, i] for i in range(x.shape[1]) if valid[b, i]]
        if isinstance(pool.norm, torch.nn.LayerNorm):
            normed = []
            for t in items:
                mu = sum(t.tolist()) / d
                var = sum((c - mu) ** 2 for c in t.tolist()) / d  # biased, as LayerNorm
                normed.append(
                    (t - mu) / math.sqrt(var + pool.norm.eps) * pool.norm.weight + pool.norm.bias
                )
            items = normed
        keys = [wk @ t + bk for t in items]
        vals = [wv @ t + bv for t in items]
        for qi in range(pool.num_queries):
            q = pool.q.weight @ pool.query_tokens[qi] + bq
            mixed = torch.zeros(d, dtype=x.dtype)
            for head in range(h):
                sl = slice(head * dh, (head + 1) * dh)
                scores = [float(q[sl] @ k[sl]) / math.sqrt(dh) for k in keys]
                top = max(scores)
                weights = [math.exp(s - top) for s in scores]
                total = sum(weights)
                for w, v in zip(weights, vals, strict=True):
                    mixed[sl] += w / total * v[sl]
            out[b, qi] = pool.proj.weight @ mixed + pool.proj.bias
    return out


# --- parity with the formula --------------------------------------------------------


@FAST
@given(pool_cases())
def test_matches_loop_reference(case):
    pool, x, valid = case
    with torch.no_grad():
        got = pool(x, valid)
        want = reference_pool(pool, x, valid)
    assert got.shape == (x.shape[0], pool.num_queries, pool.out_dim)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_functional_without_valid_equals_all_valid_and_equal_scores_give_the_mean():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 6, generator=g, dtype=torch.float64) for n in (3, 5, 5))
    all_real = torch.ones(2, 5, dtype=torch.bool)
    assert torch.equal(
        attention_pool(q, k, v, num_heads=2), attention_pool(q, k, v, all_real, num_heads=2)
    )
    # Zero queries give equal scores: attention pooling reduces to pool_tokens' mean.
    valid = torch.tensor([[True, False, True, True, False], [False, False, False, False, True]])
    pooled = attention_pool(torch.zeros(4, 6, dtype=torch.float64), k, v, valid, num_heads=3)
    for qi in range(4):
        torch.testing.assert_close(pooled[:, qi], pool_tokens(v, valid))


# --- padding and order ---------------------------------------------------------------


@FAST
@given(pool_cases(), st.sampled_from([float("nan"), float("inf"), -1e30, 7.0]))
def test_padded_values_are_ignored_bitwise(case, fill):
    pool, x, valid = case
    garbage = x.clone()
    garbage[~valid] = fill
    garbage[~valid] *= torch.arange(1, int((~valid).sum()) + 1, dtype=x.dtype)[:, None]
    with torch.no_grad():
        assert torch.equal(pool(x, valid), pool(garbage, valid))


@FAST
@given(pool_cases(), st.integers(1, 4), st.integers(0, 2**16))
def test_extra_padding_anywhere_changes_nothing(case, extra, seed):
    pool, x, valid = case
    b, n, d = x.shape
    g = torch.Generator().manual_seed(seed)
    # Insert `extra` padded items (random values) at random positions of every sample.
    order = torch.stack([torch.randperm(n + extra, generator=g) for _ in range(b)])
    x_big = torch.cat([x, 1e3 * torch.randn(b, extra, d, generator=g, dtype=x.dtype)], dim=1)
    valid_big = torch.cat([valid, torch.zeros(b, extra, dtype=torch.bool)], dim=1)
    x_big = torch.gather(x_big, 1, order[..., None].expand(-1, -1, d))
    valid_big = torch.gather(valid_big, 1, order)
    with torch.no_grad():
        torch.testing.assert_close(pool(x_big, valid_big), pool(x, valid), rtol=1e-6, atol=1e-6)


@FAST
@given(pool_cases(), st.integers(0, 2**16))
def test_permutation_invariant_over_items(case, seed):
    pool, x, valid = case
    g = torch.Generator().manual_seed(seed)
    order = torch.stack([torch.randperm(x.shape[1], generator=g) for _ in range(x.shape[0])])
    x_perm = torch.gather(x, 1, order[..., None].expand(-1, -1, x.shape[2]))
    with torch.no_grad():
        torch.testing.assert_close(pool(x_perm, torch.gather(valid, 1, order)), pool(x, valid))
        torch.testing.assert_close(pool(x_perm), pool(x))  # without a mask as well


def test_samples_are_pooled_independently():
    pool = random_pool(dim=8, num_heads=2, num_queries=2)
    x = torch.randn(4, 5, 8, dtype=torch.float64)
    valid = torch.rand(4, 5) < 0.7
    valid[:, 0] = True
    with torch.no_grad():
        full = pool(x, valid)
        for i in range(4):  # batch of 1 per sample
            torch.testing.assert_close(pool(x[i : i + 1], valid[i : i + 1]), full[i : i + 1])


# --- shapes, gradients, precision ------------------------------------------------------


@pytest.mark.parametrize("num_queries, out_dim", [(1, None), (3, None), (4, 7)])
def test_shapes_and_distinct_queries(num_queries, out_dim):
    pool = AttentionPool(dim=12, num_queries=num_queries, num_heads=3, out_dim=out_dim)
    out = pool(torch.randn(2, 9, 12))
    assert out.shape == (2, num_queries, out_dim or 12)
    assert pool(torch.randn(1, 1, 12)).shape == (1, num_queries, out_dim or 12)
    if num_queries > 1:
        assert not torch.allclose(out[:, 0], out[:, 1])


def test_gradients_reach_queries_and_all_parameters_but_not_padding():
    pool = AttentionPool(dim=8, num_queries=2, num_heads=2)
    x = torch.randn(3, 6, 8, requires_grad=True)
    valid = torch.tensor(
        [[True] * 6, [True, True, False, False, False, False], [False] * 5 + [True]]
    )
    with torch.no_grad():
        x[~valid] = float("nan")  # NaN in padded slots must not poison any gradient
    pool(x, valid).square().sum().backward()
    for name, p in pool.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert torch.isfinite(x.grad).all()
    assert (x.grad[~valid] == 0).all() and (x.grad[valid].abs().sum(-1) > 0).all()


def test_bf16_autocast_close_to_fp32():
    torch.manual_seed(0)
    pool = AttentionPool(dim=32, num_queries=2, num_heads=4, out_dim=16, init_std=0.2)
    x = torch.randn(4, 20, 32)
    valid = torch.arange(20) < torch.tensor([[20], [11], [3], [1]])
    ref = pool(x, valid)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = pool(x, valid)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), ref, rtol=0.05, atol=0.05 * ref.abs().max().item())


# --- samples without real tokens, bad arguments -----------------------------------------


def test_empty_sample_raises_or_pools_to_zero():
    x = torch.randn(3, 4, 8)
    valid = torch.tensor([[True] * 4, [False] * 4, [True, False, False, False]])
    with pytest.raises(ValueError, match=r"valid.*\[1\]"):
        AttentionPool(dim=8, num_heads=2)(x, valid)
    with pytest.raises(ValueError, match="valid"):
        attention_pool(x, x, x, valid)
    pool = AttentionPool(dim=8, num_heads=2, allow_empty=True)
    with torch.no_grad():
        pool.proj.bias.fill_(1.0)  # zero even where the projection alone would not give 0
    out = pool(x, valid)
    assert (out[1] == 0).all() and (out[0] != 0).any() and torch.isfinite(out).all()
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in pool.parameters())
    assert (attention_pool(x, x, x, valid, allow_empty=True)[1] == 0).all()
    with value_checks(False):  # as under torch.compile: no host sync, zeros instead
        assert (AttentionPool(dim=8, num_heads=2)(x, valid)[1] == 0).all()


@pytest.mark.parametrize(
    "kwargs, exc, name",
    [
        (dict(dim=0), ValueError, "dim"),
        (dict(dim=8.0), TypeError, "dim"),
        (dict(dim=8, num_queries=0), ValueError, "num_queries"),
        (dict(dim=8, num_heads=3), ValueError, "num_heads"),
        (dict(dim=8, num_heads=0), ValueError, "num_heads"),
        (dict(dim=8, out_dim=0), ValueError, "out_dim"),
        (dict(dim=8, qkv_bias=1), TypeError, "qkv_bias"),
        (dict(dim=8, norm="yes"), TypeError, "norm"),
        (dict(dim=8, allow_empty=None), TypeError, "allow_empty"),
        (dict(dim=8, init_std=0.0), ValueError, "init_std"),
    ],
)
def test_bad_constructor_arguments_name_the_argument(kwargs, exc, name):
    with pytest.raises(exc, match=name):
        AttentionPool(**kwargs)


def test_bad_forward_inputs_name_the_argument():
    pool = AttentionPool(dim=8, num_heads=2)
    x = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match="x"):
        pool(torch.randn(2, 8))
    with pytest.raises(ValueError, match="x"):
        pool(torch.randn(2, 5, 6))
    with pytest.raises(TypeError, match="x"):
        pool(torch.ones(2, 5, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="x"):
        pool(torch.randn(2, 0, 8))
    with pytest.raises(TypeError, match="valid"):
        pool(x, torch.ones(2, 5))
    with pytest.raises(ValueError, match="valid"):
        pool(x, torch.ones(2, 4, dtype=torch.bool))


def test_bad_functional_inputs_name_the_argument():
    q, k, v = torch.randn(2, 1, 6), torch.randn(2, 5, 6), torch.randn(2, 5, 4)
    with pytest.raises(ValueError, match="queries"):
        attention_pool(torch.randn(2, 1, 5), k, v)
    with pytest.raises(ValueError, match="queries"):
        attention_pool(torch.randn(3, 1, 6), k, v)
    with pytest.raises(ValueError, match="values"):
        attention_pool(q, k, torch.randn(2, 4, 4))
    with pytest.raises(ValueError, match="num_heads"):
        attention_pool(q, k, v, num_heads=3)  # divides 6 but not 4
    with pytest.raises(TypeError, match="dtype"):
        attention_pool(q.double(), k, v)
    with pytest.raises(TypeError, match="allow_empty"):
        attention_pool(q, k, v, allow_empty=0)


def test_nan_in_a_real_token_is_rejected_or_stays_in_its_sample():
    """NaN/Inf in a real token: ValueError naming x while value checks are on; with them
    off it reaches only the output of its own sample (documented pass-through)."""
    pool = AttentionPool(dim=8, num_heads=2)
    x = torch.randn(2, 4, 8)
    valid = torch.tensor([[True, True, False, False], [True] * 4])
    x[0, 1, 3] = float("nan")
    with pytest.raises(ValueError, match="x must be finite"):
        pool(x, valid)
    with pytest.raises(ValueError, match="values must be finite"):
        attention_pool(torch.randn(1, 8), torch.randn(2, 4, 8), x, valid, num_heads=2)
    with value_checks(False):
        out = pool(x, valid)
    assert torch.isnan(out[0]).all() and torch.isfinite(out[1]).all()
    x[0, 1, 3] = 0.0
    x[0, 2:] = float("inf")  # padded: ignored, no error
    assert torch.isfinite(pool(x, valid)).all()


def test_meta_module_and_meta_inputs_propagate_shapes():
    """The device check compares devices only: a module and inputs all on ``meta`` (shape
    propagation, memory planning) run, and the value checks skip the data-less tensors."""
    pool = AttentionPool(dim=8, num_queries=2, num_heads=2, out_dim=4).to("meta")
    x = torch.empty(3, 5, 8, device="meta")
    valid = torch.ones(3, 5, dtype=torch.bool, device="meta")
    out = pool(x, valid)
    assert out.device.type == "meta" and out.shape == (3, 2, 4)
    with pytest.raises(ValueError, match=r"valid must be on the device .*\(meta\), got a tensor on cpu"):
        pool(x, torch.ones(3, 5, dtype=torch.bool))
