import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from jepa_blocks.evaluation import knn_accuracy, knn_classify


def brute_force_knn(train, labels, query, k, temperature, center=False):
    """Independent reference: per-query Python loops over the bank, float64."""
    train = train.double()
    query = query.double()
    if center:
        mean = [
            sum(train[i, d].item() for i in range(len(train))) / len(train)
            for d in range(train.shape[1])
        ]
        mean = torch.tensor(mean, dtype=torch.float64)
        train, query = train - mean, query - mean
    preds = []
    for q in query:
        sims = []
        for i, x in enumerate(train):
            cos = float((q * x).sum() / (q.norm() * x.norm()))
            sims.append((cos, i))
        sims.sort(key=lambda s: -s[0])
        votes = {}
        for cos, i in sims[: min(k, len(train))]:
            c = int(labels[i])
            votes[c] = votes.get(c, 0.0) + math.exp(cos / temperature)
        best = max(votes.values())
        preds.append(min(c for c, v in votes.items() if v == best))
    return torch.tensor(preds)


def _data(seed, n=40, m=15, d=6, c=4):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, d, generator=g),
        torch.randint(0, c, (n,), generator=g),
        torch.randn(m, d, generator=g),
        torch.randint(0, c, (m,), generator=g),
    )


def test_hand_built_example():
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6], [-1.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 2])
    query = torch.tensor([[1.0, 0.1]])
    # cosines to the query: 0.995, 0.0995, 0.856, -0.995 -> neighbours in order 0, 2, 1, 3.
    sharp = knn_classify(train, labels, query, k=(1, 2, 3), temperature=0.07)
    assert {k: v.item() for k, v in sharp.items()} == {
        1: 0,
        2: 0,
        3: 0,
    }  # exp(14.2) > exp(12.2) + exp(1.4)
    # A huge temperature makes the vote a plain majority: two of three neighbours are class 1.
    flat = knn_classify(train, labels, query, k=3, temperature=1e4)
    assert flat[3].item() == 1
    assert knn_classify(train, labels, query, k=4, temperature=1e4)[4].item() == 1


@pytest.mark.parametrize("center", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force(seed, center):
    train, labels, query, _ = _data(seed)
    ks = (1, 3, 10, 40, 100)
    out = knn_classify(train, labels, query, k=ks, temperature=0.1, center=center, num_classes=4)
    for k in ks:
        ref = brute_force_knn(train, labels, query, k, 0.1, center=center)
        assert torch.equal(out[k], ref), k


@settings(max_examples=15, deadline=None)
@given(chunk=st.integers(1, 20), seed=st.integers(0, 100))
def test_chunk_size_does_not_change_results(chunk, seed):
    train, labels, query, qlabels = _data(seed)
    ref = knn_classify(train, labels, query, k=(1, 5, 20), chunk_size=1024)
    out = knn_classify(train, labels, query, k=(1, 5, 20), chunk_size=chunk)
    for k in ref:
        assert torch.equal(ref[k], out[k])


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 100))
def test_invariant_to_bank_order(seed):
    train, labels, query, _ = _data(seed)
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    a = knn_classify(train, labels, query, k=(1, 7))
    b = knn_classify(train[perm], labels[perm], query, k=(1, 7))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_center_removes_a_shared_offset():
    train, labels, query, _ = _data(3)
    offset = torch.full((6,), 50.0)
    a = knn_classify(train, labels, query, k=(1, 5), center=True)
    b = knn_classify(train + offset, labels, query + offset, k=(1, 5), center=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Without centring the offset dominates every cosine and the predictions change.
    c = knn_classify(train + offset, labels, query + offset, k=(1, 5), center=False)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_k1_on_train_is_perfect():
    train, labels, _, _ = _data(4, n=60)
    assert knn_accuracy(train, labels, train, labels, k=1) == {1: 1.0}


def test_k_larger_than_bank_is_clipped():
    train, labels, query, qlabels = _data(5, n=12)
    out = knn_classify(train, labels, query, k=(12, 500))
    assert set(out) == {12, 500}
    assert torch.equal(out[12], out[500])


def test_accuracy_matches_predictions_and_range():
    train, labels, query, qlabels = _data(6)
    preds = knn_classify(train, labels, query, k=(1, 5), num_classes=4)
    acc = knn_accuracy(train, labels, query, qlabels, k=(1, 5), num_classes=4)
    for k in (1, 5):
        assert 0.0 <= acc[k] <= 1.0
        assert acc[k] == pytest.approx((preds[k] == qlabels).double().mean().item())


def test_float64_and_default_ks():
    train, labels, query, _ = _data(7, n=300)
    out = knn_classify(train.double(), labels, query.double())
    assert set(out) == {10, 20, 200}
    assert out[10].dtype == torch.long and out[10].shape == (15,)


@pytest.mark.parametrize(
    ("kwargs", "err", "match"),
    [
        ({"train_labels": torch.tensor([0, 1, -1] + [0] * 37)}, ValueError, "train_labels"),
        ({"train_labels": torch.zeros(39, dtype=torch.long)}, ValueError, "train_labels"),
        ({"train_labels": torch.zeros(40)}, TypeError, "train_labels"),
        ({"num_classes": 2}, ValueError, "train_labels"),
        ({"query_features": torch.randn(5, 7)}, ValueError, "query_features"),
        ({"query_features": torch.randn(5)}, ValueError, "query_features"),
        ({"train_features": torch.randint(0, 3, (40, 6))}, TypeError, "train_features"),
        ({"train_features": torch.full((40, 6), float("nan"))}, ValueError, "train_features"),
        ({"k": 0}, ValueError, "k"),
        ({"k": ()}, TypeError, "k"),
        ({"k": (5, 0)}, ValueError, r"k\[1\]"),
        ({"temperature": 0.0}, ValueError, "temperature"),
        ({"chunk_size": 0}, ValueError, "chunk_size"),
        ({"num_classes": 0}, ValueError, "num_classes"),
    ],
)
def test_bad_inputs(kwargs, err, match):
    train, labels, query, _ = _data(0)
    args = {"train_features": train, "train_labels": labels, "query_features": query}
    args.update(kwargs)
    with pytest.raises(err, match=match):
        knn_classify(**args)


def test_bad_query_labels():
    train, labels, query, qlabels = _data(0)
    with pytest.raises(ValueError, match="query_labels"):
        knn_accuracy(train, labels, query, qlabels[:-1])
    with pytest.raises(ValueError, match="query_labels"):
        knn_accuracy(train, labels, query, qlabels + 10, num_classes=4)
    with pytest.raises(ValueError, match="query_labels"):
        knn_accuracy(train, labels, query, qlabels - 10)


def test_docstring_examples_run():
    import doctest
    import importlib

    module = importlib.import_module("jepa_blocks.evaluation.knn")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
