import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from jepa_blocks.evaluation import few_shot_accuracy, sample_episodes
from jepa_blocks.evaluation.fewshot import _episode_accuracy


@st.composite
def episode_setup(draw):
    num_classes = draw(st.integers(2, 6))
    n_way = draw(st.integers(2, num_classes))
    k_shot = draw(st.integers(1, 4))
    n_query = draw(st.integers(1, 4))
    extra = draw(st.lists(st.integers(0, 5), min_size=num_classes, max_size=num_classes))
    ids = draw(st.lists(st.integers(-3, 50), min_size=num_classes, max_size=num_classes, unique=True))
    labels = [c for c, e in zip(ids, extra, strict=True) for _ in range(k_shot + n_query + e)]
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(draw(st.integers(0, 99))))
    labels = torch.tensor(labels)[perm]
    return labels, n_way, k_shot, n_query, draw(st.integers(1, 12)), draw(st.integers(0, 2**31))


@settings(max_examples=40, deadline=None)
@given(episode_setup())
def test_episodes_are_valid_and_deterministic(setup):
    labels, n_way, k_shot, n_query, num, seed = setup
    ep = sample_episodes(labels, n_way=n_way, k_shot=k_shot, n_query=n_query, num_episodes=num,
                         generator=torch.Generator().manual_seed(seed))
    assert ep.classes.shape == (num, n_way)
    assert ep.support.shape == (num, n_way, k_shot) and ep.query.shape == (num, n_way, n_query)
    for e in range(num):
        assert len(set(ep.classes[e].tolist())) == n_way  # distinct classes
        both = torch.cat([ep.support[e].flatten(), ep.query[e].flatten()]).tolist()
        assert len(set(both)) == len(both)  # support and query disjoint, no repeats
        for j in range(n_way):
            c = ep.classes[e, j].item()
            assert (labels[ep.support[e, j]] == c).all() and (labels[ep.query[e, j]] == c).all()
    again = sample_episodes(labels, n_way=n_way, k_shot=k_shot, n_query=n_query, num_episodes=num,
                            generator=torch.Generator().manual_seed(seed))
    for a, b in zip(ep, again, strict=True):
        assert torch.equal(a, b)


def test_episodes_cover_all_classes_and_samples():
    labels = torch.arange(40) % 4
    ep = sample_episodes(labels, n_way=2, k_shot=1, n_query=2, num_episodes=400)
    assert set(ep.classes.flatten().tolist()) == {0, 1, 2, 3}
    assert set(torch.cat([ep.support.flatten(), ep.query.flatten()]).tolist()) == set(range(40))


def loop_accuracy(x, labels, episodes, metric, center):
    """Independent reference: Python loops per episode and query, float64."""
    x = x.double()
    if center:
        x = x - x.mean(0)
    accs = []
    for e in range(episodes.query.shape[0]):
        protos = []
        for j in range(episodes.classes.shape[1]):
            sup = [x[i] / x[i].norm() if metric == "cosine" else x[i] for i in episodes.support[e, j].tolist()]
            protos.append(sum(sup) / len(sup))
        correct = total = 0
        for j in range(episodes.classes.shape[1]):
            for i in episodes.query[e, j].tolist():
                if metric == "cosine":
                    s = [float(x[i] @ p / (x[i].norm() * p.norm())) for p in protos]
                else:
                    s = [-float(((x[i] - p) ** 2).sum()) for p in protos]
                correct += int(max(range(len(s)), key=lambda w: (s[w], -w)) == j)
                total += 1
        accs.append(correct / total)
    mean = sum(accs) / len(accs)
    std = math.sqrt(sum((a - mean) ** 2 for a in accs) / len(accs))
    return mean, 1.96 * std / math.sqrt(len(accs))


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("center", [True, False])
def test_accuracy_matches_loop_reference(metric, center):
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(36) % 4
    x = torch.randn(36, 5, generator=g, dtype=torch.float64) + 0.8 * torch.randn(4, 5, generator=g,
                                                                                dtype=torch.float64)[labels]
    res = few_shot_accuracy(x, labels, n_way=3, k_shot=(2, 1), n_query=3, num_episodes=25, metric=metric,
                            center=center, seed=7)
    assert list(res) == [2, 1]
    for k in (1, 2):
        ep = sample_episodes(labels, n_way=3, k_shot=k, n_query=3, num_episodes=25,
                             generator=torch.Generator().manual_seed(7))
        mean, ci = loop_accuracy(x, labels, ep, metric, center)
        assert res[k]["mean"] == pytest.approx(mean, abs=1e-12)
        assert res[k]["ci95"] == pytest.approx(ci, abs=1e-12)
        assert 0.0 < mean < 1.0  # a non-trivial case


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_separable_features_score_one(metric):
    labels = torch.arange(100) % 10
    x = 10 * torch.eye(10)[labels] + 0.01 * torch.randn(100, 10, generator=torch.Generator().manual_seed(0))
    res = few_shot_accuracy(x, labels, n_way=5, k_shot=(1, 3), n_query=5, num_episodes=50, metric=metric)
    for k in (1, 3):
        assert res[k] == {"mean": 1.0, "ci95": 0.0, "std": 0.0}


def test_random_features_score_chance_and_ci_shrinks():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(2000) % 20
    x = torch.randn(2000, 32, generator=g)
    small = few_shot_accuracy(x, labels, n_way=4, k_shot=1, n_query=5, num_episodes=50)[1]
    big = few_shot_accuracy(x, labels, n_way=4, k_shot=1, n_query=5, num_episodes=2000)[1]
    assert big["mean"] == pytest.approx(0.25, abs=4 * big["ci95"] + 0.005)
    assert abs(big["mean"] - 0.25) < 0.02
    assert big["ci95"] < small["ci95"] / 4  # ~ 1 / sqrt(E): sqrt(40) = 6.3 times smaller


def test_seed_controls_result():
    labels = torch.arange(60) % 3
    x = torch.randn(60, 4, generator=torch.Generator().manual_seed(0))
    kw = dict(n_way=2, k_shot=1, n_query=3, num_episodes=30)
    assert few_shot_accuracy(x, labels, **kw, seed=3) == few_shot_accuracy(x, labels, **kw, seed=3)
    assert few_shot_accuracy(x, labels, **kw, seed=3) != few_shot_accuracy(x, labels, **kw, seed=4)


def test_chunked_scoring_matches_single_chunk(monkeypatch):
    import jepa_blocks.evaluation.fewshot as fs

    labels = torch.arange(90) % 6
    x = fs.F.normalize(torch.randn(90, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    ep = sample_episodes(labels, n_way=4, k_shot=2, n_query=3, num_episodes=37)
    whole = _episode_accuracy(x, ep, "cosine")
    monkeypatch.setattr(fs, "_CHUNK_ELEMENTS", 1)  # one episode per chunk
    assert torch.equal(_episode_accuracy(x, ep, "cosine"), whole)
    chunked = sample_episodes(labels, n_way=4, k_shot=2, n_query=3, num_episodes=37)
    assert chunked.support.shape == ep.support.shape


def test_bad_inputs_name_the_argument():
    labels = torch.arange(20) % 4  # 5 samples per class
    x = torch.randn(20, 3)
    with pytest.raises(ValueError, match="n_way"):
        few_shot_accuracy(x, labels, n_way=5, k_shot=1, n_query=1)
    with pytest.raises(ValueError, match="k_shot"):
        few_shot_accuracy(x, labels, n_way=2, k_shot=(1, 3), n_query=3)
    with pytest.raises(ValueError, match="n_query"):
        sample_episodes(labels, n_way=2, k_shot=1, n_query=5, num_episodes=1)
    with pytest.raises(ValueError, match="n_way"):
        sample_episodes(labels, n_way=1, k_shot=1, n_query=1, num_episodes=1)
    with pytest.raises(TypeError, match="k_shot"):
        few_shot_accuracy(x, labels, n_way=2, k_shot=[], n_query=1)
    with pytest.raises(ValueError, match="k_shot"):
        few_shot_accuracy(x, labels, n_way=2, k_shot=0, n_query=1)
    with pytest.raises(ValueError, match="metric"):
        few_shot_accuracy(x, labels, n_way=2, k_shot=1, n_query=1, metric="dot")
    with pytest.raises(ValueError, match="labels"):
        few_shot_accuracy(x, labels[:10], n_way=2, k_shot=1, n_query=1)
    with pytest.raises(TypeError, match="labels"):
        few_shot_accuracy(x, labels.float(), n_way=2, k_shot=1, n_query=1)
    with pytest.raises(ValueError, match="features"):
        few_shot_accuracy(torch.full((20, 3), float("nan")), labels, n_way=2, k_shot=1, n_query=1)
    with pytest.raises(ValueError, match="num_episodes"):
        few_shot_accuracy(x, labels, n_way=2, k_shot=1, n_query=1, num_episodes=0)
    with pytest.raises(TypeError, match="generator"):
        sample_episodes(labels, n_way=2, k_shot=1, n_query=1, num_episodes=1, generator=0)
