"""Tests for jepa_blocks.quantizers.vq: assignment, straight-through gradient, EMA parity,
dead-code refresh, usage, resume, bf16, bad inputs and 2-rank gloo parity."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st

from jepa_blocks.quantizers import (
    VectorQuantizer,
    VQOutput,
    code_perplexity,
    codebook_from_ema,
    codebook_usage,
    nearest_codes,
    squared_distances,
)

F64 = torch.float64


def _vq(num_codes: int, dim: int, *, torch_seed: int = 0, **kwargs) -> VectorQuantizer:
    torch.manual_seed(torch_seed)  # the random normal initial codebook
    return VectorQuantizer(num_codes=num_codes, dim=dim, **kwargs).double()


def _randn(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _assert_nearest(z: torch.Tensor, codebook: torch.Tensor, codes: torch.Tensor) -> None:
    """codes are argmins of the brute-force cdist (up to float64 rounding on near-ties)."""
    d = torch.cdist(z.reshape(-1, z.shape[-1]), codebook).square()
    picked = d.gather(1, codes.reshape(-1, 1)).squeeze(1)
    assert torch.all(picked <= d.min(1).values + 1e-9)


def _state(vq: VectorQuantizer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in vq.state_dict().items()}


def _assert_state_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


# ---- assignment ---------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    lead=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    k=st.integers(1, 12),
    d=st.integers(1, 6),
    seed=st.integers(0, 10_000),
    training=st.booleans(),
)
def test_quantized_rows_are_codebook_rows_and_codes_are_argmin(lead, k, d, seed, training):
    vq = _vq(k, d, torch_seed=seed, init="normal").train(training)
    z = _randn(*lead, d, seed=seed + 1, scale=2.0)
    before = vq.codebook.clone()
    out = vq(z)
    assert isinstance(out, VQOutput)
    assert out.codes.shape == tuple(lead) and out.codes.dtype == torch.long
    assert out.quantized.shape == z.shape and out.quantized.dtype == z.dtype
    # The output uses the codebook of before this step's update, row for row and exactly.
    torch.testing.assert_close(out.quantized, before[out.codes], rtol=0, atol=0)
    _assert_nearest(z, before, out.codes)
    assert vq.step == int(training)


@settings(max_examples=15, deadline=None)
@given(m=st.integers(0, 30), k=st.integers(1, 9), d=st.integers(1, 5), seed=st.integers(0, 999))
def test_nearest_codes_chunked_equals_unchunked_and_distances_match_cdist(m, k, d, seed):
    z, codebook = _randn(m, d, seed=seed), _randn(k, d, seed=seed + 1)
    codes = nearest_codes(z, codebook)
    for chunk in (1, 3, 7):
        assert torch.equal(nearest_codes(z, codebook, chunk_size=chunk), codes)
    _assert_nearest(z, codebook, codes)
    torch.testing.assert_close(squared_distances(z, codebook), torch.cdist(z, codebook).square())


def test_nearest_codes_float32_and_bf16_inputs_are_computed_in_float32():
    codebook = torch.tensor([[0.0, 0.0], [1.0, 1.0], [-3.0, 2.0]])
    z = torch.tensor([[0.9, 0.8], [0.1, -0.2], [-2.0, 2.5]])
    assert nearest_codes(z, codebook).tolist() == [1, 0, 2]
    assert nearest_codes(z.bfloat16(), codebook.bfloat16()).tolist() == [1, 0, 2]
    assert squared_distances(z.bfloat16(), codebook).dtype == torch.float32


# ---- gradient and loss ----------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False])
def test_straight_through_gradient_is_identity_plus_commitment_grad(training):
    beta = 0.7
    vq = _vq(5, 3, commitment_weight=beta, init="normal").train(training)
    z = _randn(2, 4, 3, seed=1).requires_grad_(True)
    weights = _randn(2, 4, 3, seed=2)
    q = vq.codebook[nearest_codes(z.detach().reshape(-1, 3), vq.codebook)].reshape(2, 4, 3)
    out = vq(z)
    ((weights * out.quantized).sum() + out.loss).backward()
    expected = weights + 2.0 * beta * (z.detach() - q) / z.numel()
    torch.testing.assert_close(z.grad, expected, rtol=1e-12, atol=1e-12)
    assert not vq.codebook.requires_grad and not list(vq.parameters())


def test_commitment_loss_matches_a_loop():
    beta = 0.25
    vq = _vq(6, 4, commitment_weight=beta, init="normal").eval()
    z = _randn(3, 5, 4, seed=3)
    out = vq(z)
    rows = z.reshape(-1, 4).tolist()
    book = vq.codebook.tolist()
    total = 0.0
    for row in rows:
        dists = [sum((a - b) ** 2 for a, b in zip(row, e, strict=True)) for e in book]
        total += min(dists)  # ||z - q||^2 with q the nearest row
    torch.testing.assert_close(out.loss, torch.tensor(beta * total / (len(rows) * 4), dtype=F64))
    assert _vq(6, 4, init="normal").float().eval()(z.float()).loss.dtype == torch.float32


def test_perplexity_and_batch_usage():
    vq = _vq(4, 2, init="normal").eval()
    vq.set_codebook_(torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]], dtype=F64))
    z = torch.tensor([[0.1, 0.0], [0.0, 0.2], [9.0, 0.5], [0.0, 0.1]], dtype=F64)  # codes 0,0,1,0
    out = vq(z)
    assert out.codes.tolist() == [0, 0, 1, 0]
    p = [0.75, 0.25]
    torch.testing.assert_close(
        out.perplexity, torch.tensor(math.exp(-sum(x * math.log(x) for x in p)), dtype=F64)
    )
    torch.testing.assert_close(out.usage, torch.tensor(0.5, dtype=F64))
    torch.testing.assert_close(code_perplexity(torch.tensor([3, 3, 3])), torch.tensor(3.0))
    torch.testing.assert_close(code_perplexity(torch.tensor([0.0, 7.0])), torch.tensor(1.0))
    torch.testing.assert_close(code_perplexity(torch.zeros(4)), torch.tensor(1.0))


# ---- EMA codebook ---------------------------------------------------------------------------


def _reference_ema(codebook, batches, *, decay, eps):
    """van den Oord et al. (2017) appendix A.1 with Sonnet-style Laplace smoothing, as loops."""
    k, d = len(codebook), len(codebook[0])
    e = [list(row) for row in codebook]
    big_n = [1.0] * k  # initial counts 1 and sums equal to the codebook
    m = [list(row) for row in codebook]
    history = []
    for batch in batches:
        n_k, s_k = [0.0] * k, [[0.0] * d for _ in range(k)]
        for row in batch:
            dists = [sum((a - b) ** 2 for a, b in zip(row, ek, strict=True)) for ek in e]
            j = dists.index(min(dists))
            n_k[j] += 1
            s_k[j] = [a + b for a, b in zip(s_k[j], row, strict=True)]
        for j in range(k):
            big_n[j] = decay * big_n[j] + (1 - decay) * n_k[j]
            m[j] = [decay * a + (1 - decay) * b for a, b in zip(m[j], s_k[j], strict=True)]
        total = sum(big_n)
        e = [[v / ((big_n[j] + eps) / (total + k * eps) * total) for v in m[j]] for j in range(k)]
        history.append(([x for x in big_n], [list(r) for r in m], [list(r) for r in e]))
    return history


@pytest.mark.parametrize("decay, eps", [(0.95, 1e-5), (0.5, 0.1), (0.0, 1e-3)])
def test_ema_update_matches_a_loop_rederivation(decay, eps):
    k, d = 5, 3
    vq = _vq(k, d, decay=decay, eps=eps, init="normal", refresh_every=10**6)
    start = _randn(k, d, seed=4)
    vq.set_codebook_(start)
    batches = [_randn(7, d, seed=10 + t, scale=1.5) for t in range(4)]
    history = _reference_ema(start.tolist(), [b.tolist() for b in batches], decay=decay, eps=eps)
    for batch, (big_n, m, e) in zip(batches, history, strict=True):
        vq(batch)
        torch.testing.assert_close(
            vq.cluster_size, torch.tensor(big_n, dtype=F64), rtol=1e-12, atol=1e-12
        )
        torch.testing.assert_close(vq.embed_sum, torch.tensor(m, dtype=F64), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(vq.codebook, torch.tensor(e, dtype=F64), rtol=1e-12, atol=1e-12)
    assert vq.step == 4


def test_codebook_from_ema_formula():
    n = torch.tensor([2.0, 0.0, 6.0], dtype=F64)
    m = torch.tensor([[2.0], [0.5], [3.0]], dtype=F64)
    eps = 0.1
    smoothed = [(x + eps) / (8.0 + 3 * eps) * 8.0 for x in n.tolist()]
    expected = torch.tensor(
        [[2.0 / smoothed[0]], [0.5 / smoothed[1]], [3.0 / smoothed[2]]], dtype=F64
    )
    torch.testing.assert_close(codebook_from_ema(n, m, eps=eps), expected)
    # Equal counts: smoothing changes nothing.
    torch.testing.assert_close(
        codebook_from_ema(torch.full((3,), 4.0), torch.ones(3, 2)), torch.full((3, 2), 0.25)
    )


def test_data_init_draws_codes_from_the_first_batch():
    vq = _vq(6, 3, init="data")
    assert not bool(vq.initialized)
    z = _randn(20, 3, seed=5)
    out = vq(z)
    rows = {tuple(r) for r in z.tolist()}
    picked = {tuple(r) for r in out.quantized.tolist()}
    assert picked <= rows and len(picked) == 6  # six distinct batch rows; each maps to itself
    assert bool(vq.initialized)


def test_eval_mode_does_not_change_any_state():
    vq = _vq(6, 3, init="data", refresh_every=1)
    vq(_randn(10, 3, seed=6))
    state = _state(vq)
    vq.eval()
    for t in range(3):
        vq(_randn(4, 3, seed=7 + t))
    _assert_state_equal(_state(vq), state)
    assert vq.step == 1


def test_training_under_no_grad_still_updates():
    vq = _vq(4, 2, init="normal")
    before = vq.codebook.clone()
    with torch.no_grad():
        vq(_randn(8, 2, seed=8))
    assert not torch.equal(vq.codebook, before) and vq.step == 1


# ---- dead-code refresh ----------------------------------------------------------------------


def _two_clusters(n: int, seed: int) -> torch.Tensor:
    centres = torch.tensor([[0.0, 0.0], [5.0, 5.0]], dtype=F64)
    gen = torch.Generator().manual_seed(seed)
    which = torch.arange(n) % 2
    return centres[which] + 0.3 * torch.randn(n, 2, generator=gen, dtype=F64)


def test_dead_codes_are_refreshed_from_recent_rows_and_then_used():
    vq = _vq(
        6, 2, decay=0.5, dead_code_threshold=0.5, refresh_every=4, buffer_size=16, init="normal"
    )
    far = torch.tensor(
        [[100.0, 100.0], [100.0, -100.0], [-100.0, 100.0], [-100.0, -100.0]], dtype=F64
    )
    vq.set_codebook_(torch.cat([torch.tensor([[0.0, 0.0], [5.0, 5.0]], dtype=F64), far]))
    batches = [_two_clusters(6, seed=20 + t) for t in range(4)]
    for batch in batches[:3]:
        assert set(vq(batch).codes.tolist()) <= {0, 1}
    # Dead but not yet refreshed: only shrunk a little by the Laplace smoothing.
    torch.testing.assert_close(vq.codebook[2:], far, rtol=1e-3, atol=0)
    assert int(vq.num_refreshed) == 0

    vq(batches[3])  # step 4: refresh
    assert int(vq.num_refreshed) == 4
    recent = torch.cat(batches)[-16:]  # the ring buffer holds the last 16 rows
    torch.testing.assert_close(vq.recent_z.sort(0).values, recent.sort(0).values, rtol=0, atol=0)
    new_rows = vq.codebook[2:].tolist()
    assert all(row in recent.tolist() for row in new_rows)  # exact copies of recent inputs
    assert len({tuple(r) for r in new_rows}) == 4  # distinct rows
    assert vq.codebook[:2].sub(torch.tensor([[0.0, 0.0], [5.0, 5.0]], dtype=F64)).abs().max() < 1.0
    # Reset to the mean count of just before the refresh (dead codes had N = 0.5**4).
    mean_before = (vq.cluster_size[0] + vq.cluster_size[1] + 4 * 0.5**4) / 6
    torch.testing.assert_close(vq.cluster_size[2:], mean_before.expand(4))
    torch.testing.assert_close(vq.embed_sum[2:], vq.codebook[2:] * vq.cluster_size[2:, None])

    out = vq(recent)  # the refreshed codes now win their own rows
    assert {2, 3, 4, 5} <= set(out.codes.tolist())


def test_refresh_with_more_dead_codes_than_buffered_rows_refreshes_the_lowest_ids():
    vq = _vq(
        6, 2, decay=0.5, dead_code_threshold=0.5, refresh_every=2, buffer_size=2, init="normal"
    )
    book = torch.tensor([[0.0, 0.0]] + [[50.0 + i, 50.0] for i in range(5)], dtype=F64)
    vq.set_codebook_(book)
    vq(_randn(3, 2, seed=30, scale=0.1))
    vq(_randn(3, 2, seed=31, scale=0.1))
    assert int(vq.num_refreshed) == 2
    assert vq.codebook[1:3].abs().max() < 1.0  # codes 1, 2 took the two buffered rows
    torch.testing.assert_close(vq.codebook[3:], book[3:], rtol=1e-3, atol=0)


def test_zero_threshold_disables_refresh():
    vq = _vq(6, 2, dead_code_threshold=0.0, refresh_every=1, init="normal")
    vq.set_codebook_(torch.tensor([[0.0, 0.0]] + [[50.0 + i, 50.0] for i in range(5)], dtype=F64))
    for t in range(3):
        vq(_randn(3, 2, seed=40 + t, scale=0.1))
    assert int(vq.num_refreshed) == 0


# ---- usage ------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    batches=st.lists(st.lists(st.integers(0, 5), min_size=1, max_size=8), min_size=1, max_size=6),
    buffer_size=st.integers(1, 12),
)
def test_usage_is_the_fraction_of_codes_in_the_last_rows(batches, buffer_size):
    k = 6
    vq = _vq(k, k, buffer_size=buffer_size, refresh_every=10**6, init="normal")
    vq.set_codebook_(10.0 * torch.eye(k, dtype=F64))
    assert vq.usage() == 0.0
    sequence: list[int] = []
    for ids in batches:
        out = vq(10.0 * torch.eye(k, dtype=F64)[ids])
        assert out.codes.tolist() == ids
        assert out.usage.item() == pytest.approx(len(set(ids)) / k)
        sequence += ids
        assert vq.usage() == pytest.approx(len(set(sequence[-buffer_size:])) / k)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 40).flatmap(
        lambda k: st.tuples(st.just(k), st.lists(st.integers(0, k - 1), max_size=60))
    ),
    st.sampled_from([torch.int64, torch.int32, torch.uint8]),
)
def test_codebook_usage_is_the_fraction_of_distinct_codes(case, dtype):
    k, ids = case
    codes = torch.tensor(ids, dtype=dtype)
    usage = codebook_usage(codes, num_codes=k)
    assert usage == len(set(ids)) / k
    assert 0.0 <= usage <= 1.0
    # Shape does not matter, and repeating codes changes nothing.
    if ids:
        assert codebook_usage(codes.repeat(3).reshape(3, -1), num_codes=k) == usage


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 30), st.lists(st.integers(-50, 80), min_size=1, max_size=20))
def test_codebook_usage_rejects_codes_out_of_range(k, ids):
    codes = torch.tensor(ids)
    if all(0 <= i < k for i in ids):
        assert codebook_usage(codes, num_codes=k) == len(set(ids)) / k
    else:
        with pytest.raises(ValueError, match="codes"):
            codebook_usage(codes, num_codes=k)


def test_codebook_usage_bad_types_name_the_argument():
    with pytest.raises(TypeError, match="codes"):
        codebook_usage(torch.tensor([0.0, 1.0]), num_codes=4)
    with pytest.raises(TypeError, match="codes"):
        codebook_usage([0, 1], num_codes=4)
    with pytest.raises(ValueError, match="num_codes"):
        codebook_usage(torch.tensor([0]), num_codes=0)
    with pytest.raises(TypeError, match="num_codes"):
        codebook_usage(torch.tensor([0]), num_codes=4.0)
    assert codebook_usage(torch.zeros(0, dtype=torch.long), num_codes=4) == 0.0
    assert codebook_usage(torch.arange(4), num_codes=4) == 1.0


# ---- resume -----------------------------------------------------------------------------------


def test_state_dict_round_trip_continues_identically():
    kwargs = dict(
        decay=0.6, dead_code_threshold=0.3, refresh_every=4, buffer_size=9, init="data", seed=3
    )
    a = _vq(12, 2, torch_seed=0, **kwargs)
    batches = [_two_clusters(7, seed=50 + t) for t in range(11)]
    for batch in batches[:5]:
        a(batch)
    b = _vq(12, 2, torch_seed=1, **kwargs)  # different random init, overwritten by the load
    b.load_state_dict(a.state_dict())
    assert b.step == 5 and b.usage() == a.usage()
    for batch in batches[5:]:  # includes the refresh at step 8
        oa, ob = a(batch), b(batch)
        for field in ("quantized", "codes", "loss", "perplexity", "usage"):
            torch.testing.assert_close(getattr(oa, field), getattr(ob, field), rtol=0, atol=0)
    _assert_state_equal(_state(a), _state(b))
    assert int(a.num_refreshed) > 0  # the refresh after the resume was exercised


# ---- precision ----------------------------------------------------------------------------


def test_bf16_autocast_input_with_float32_statistics():
    torch.manual_seed(0)
    vq = VectorQuantizer(num_codes=8, dim=4, init="normal")
    ref = copy.deepcopy(vq)
    lin = torch.nn.Linear(4, 4)
    x = torch.randn(6, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = lin(x)
        out = vq(z)
    assert z.dtype == torch.bfloat16 and out.quantized.dtype == torch.bfloat16
    assert out.loss.dtype == torch.float32 and out.perplexity.dtype == torch.float32
    for name in ("codebook", "cluster_size", "embed_sum", "recent_z"):
        assert getattr(vq, name).dtype == torch.float32
    # Same result as feeding the (exactly) upcast values in float32 without autocast.
    ref_out = ref(z.float())
    assert torch.equal(out.codes, ref_out.codes)
    torch.testing.assert_close(out.loss, ref_out.loss, rtol=0, atol=0)
    torch.testing.assert_close(vq.codebook, ref.codebook, rtol=0, atol=0)
    out.loss.backward()
    assert lin.weight.grad is not None and torch.isfinite(lin.weight.grad).all()


def test_bf16_module_is_refused():
    vq = VectorQuantizer(num_codes=4, dim=2).to(torch.bfloat16)
    with pytest.raises(TypeError, match="float32"):
        vq(torch.randn(3, 2))


# ---- bad inputs ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, exc, name",
    [
        (dict(num_codes=0), ValueError, "num_codes"),
        (dict(num_codes=2**24 + 1), ValueError, "num_codes"),
        (dict(num_codes=2.0), TypeError, "num_codes"),
        (dict(dim=0), ValueError, "dim"),
        (dict(decay=1.0), ValueError, "decay"),
        (dict(decay=-0.1), ValueError, "decay"),
        (dict(commitment_weight=-1.0), ValueError, "commitment_weight"),
        (dict(dead_code_threshold=-0.1), ValueError, "dead_code_threshold"),
        (dict(refresh_every=0), ValueError, "refresh_every"),
        (dict(buffer_size=0), ValueError, "buffer_size"),
        (dict(eps=0.0), ValueError, "eps"),
        (dict(gather_distributed=1), TypeError, "gather_distributed"),
        (dict(init="kmeans"), ValueError, "init"),
        (dict(seed=-1), ValueError, "seed"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, exc, name):
    full = dict(num_codes=4, dim=2) | kwargs
    with pytest.raises(exc, match=name):
        VectorQuantizer(**full)


def test_hyperparameters_are_keyword_only():
    with pytest.raises(TypeError):
        VectorQuantizer(4, 2)  # type: ignore[misc]


def test_bad_inputs_name_the_argument():
    vq = VectorQuantizer(num_codes=4, dim=3)
    with pytest.raises(ValueError, match="z"):
        vq(torch.randn(2, 4))
    with pytest.raises(TypeError, match="z"):
        vq(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="z"):
        vq(torch.zeros(0, 3))
    with pytest.raises(TypeError, match="z"):
        vq([[0.0, 0.0, 0.0]])  # type: ignore[arg-type]
    bad = torch.randn(2, 3)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="z"):
        vq(bad)
    assert vq.step == 0 and not bool(vq.initialized)  # nothing was updated
    with pytest.raises(ValueError, match="z"):
        vq.eval()(bad)
    with pytest.raises(ValueError, match="codebook"):
        vq.set_codebook_(torch.randn(4, 2))
    with pytest.raises(ValueError, match="chunk_size"):
        nearest_codes(torch.randn(2, 3), torch.randn(4, 3), chunk_size=0)
    with pytest.raises(ValueError, match="z"):
        nearest_codes(torch.randn(2, 2), torch.randn(4, 3))
    with pytest.raises(ValueError, match="embed_sum"):
        codebook_from_ema(torch.ones(3), torch.ones(4, 2))
    with pytest.raises(ValueError, match="eps"):
        codebook_from_ema(torch.ones(3), torch.ones(3, 2), eps=0.0)


# ---- two gloo processes -----------------------------------------------------------------------

_LOCAL = (5, 7)  # unequal local batch sizes; 12 global rows > buffer_size 10
_DIST_KW = dict(
    decay=0.7, dead_code_threshold=0.4, refresh_every=3, buffer_size=10, init="data", seed=11
)


def _global_batch(step: int) -> torch.Tensor:
    # Three tight clusters: with 8 codes several die and get refreshed.
    gen = torch.Generator().manual_seed(100 + step)
    centres = torch.tensor([[0.0, 0.0, 0.0], [4.0, 0.0, 1.0], [0.0, 4.0, -1.0]], dtype=F64)
    which = torch.randint(3, (sum(_LOCAL),), generator=gen)
    return centres[which] + 0.2 * torch.randn(sum(_LOCAL), 3, generator=gen, dtype=F64)


def _worker_vq(rank: int, world: int) -> None:
    vq = _vq(8, 3, torch_seed=rank, gather_distributed=True, **_DIST_KW)  # different random inits
    ref = _vq(8, 3, torch_seed=5, **_DIST_KW)  # single process on the concatenation
    start = sum(_LOCAL[:rank])
    for step in range(7):  # refreshes at steps 3 and 6
        full = _global_batch(step)
        out = vq(full[start : start + _LOCAL[rank]])
        ref_out = ref(full)
        assert torch.equal(out.codes, ref_out.codes[start : start + _LOCAL[rank]])
        torch.testing.assert_close(out.perplexity, ref_out.perplexity, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out.usage, ref_out.usage, rtol=0, atol=0)
        for name in ("codebook", "cluster_size", "embed_sum", "recent_z"):
            torch.testing.assert_close(
                getattr(vq, name), getattr(ref, name), rtol=1e-12, atol=1e-12
            )
        for name in ("recent_codes", "num_seen", "num_steps", "num_refreshed"):
            assert torch.equal(getattr(vq, name), getattr(ref, name)), name
    assert int(vq.num_refreshed) > 0 and vq.usage() == ref.usage()

    # Identical, bit for bit, on every rank.
    for name in ("codebook", "cluster_size", "embed_sum", "recent_z"):
        mine = getattr(vq, name).contiguous()
        parts = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(parts, mine)
        assert all(torch.equal(p, parts[0]) for p in parts), name

    # A NaN on one rank raises on every rank (no rank is left waiting in a collective).
    z = torch.randn(3, 3, dtype=F64)
    if rank == 1:
        z[0, 0] = float("nan")
    state = _state(vq)
    with pytest.raises(ValueError, match=r"z must be finite.*\[1\]"):
        vq(z)
    _assert_state_equal(_state(vq), state)
    # So does a finite entry too large for the sums of squares (float64: beyond ~1e153).
    z = torch.randn(3, 3, dtype=F64)
    if rank == 0:
        z[1, 2] = -1e200
    with pytest.raises(ValueError, match=r"z must be finite with entries of magnitude.*\[0\]"):
        vq(z)
    _assert_state_equal(_state(vq), state)


@pytest.mark.distributed
def test_gloo_codebooks_identical_across_ranks_and_equal_to_single_process(run_gloo):
    run_gloo(_worker_vq)
