import pytest
import torch

from jepa_blocks.evaluation import LinearProbeResult, linear_probe


def blobs(seed, n_per_class=100, dim=16, classes=3, spread=8.0, noise_seed=None):
    """Gaussian class blobs; the centres depend on seed only, the samples on noise_seed."""
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(seed)) * spread
    g = torch.Generator().manual_seed(seed if noise_seed is None else noise_seed)
    y = torch.arange(classes).repeat_interleave(n_per_class)
    x = centres[y] + torch.randn(len(y), dim, generator=g)
    perm = torch.randperm(len(y), generator=g)
    return x[perm], y[perm]


def test_separable_data_is_solved():
    x, y = blobs(0)
    xt, yt = blobs(0, n_per_class=50, noise_seed=100)  # same classes, fresh samples
    res = linear_probe(x, y, xt, yt)
    assert isinstance(res, LinearProbeResult)
    assert res.top1 >= 0.99 and res.train_top1 >= 0.99
    assert res.classifier.weight.shape == (3, 16)
    assert torch.equal(res.predict(xt), res.classifier((xt - res.mean) / res.std).argmax(1))


def test_random_labels_give_chance_on_test():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(400, 32, generator=g), torch.randint(0, 10, (400,), generator=g)
    xt, yt = torch.randn(2000, 32, generator=g), torch.randint(0, 10, (2000,), generator=g)
    res = linear_probe(x, y, xt, yt, weight_decay=1e-3)
    assert abs(res.top1 - 0.1) < 0.04
    assert res.train_top1 > 0.2  # it can memorise part of the train set, not generalise


def test_solution_is_stationary_point_of_published_objective():
    # Gradient of mean CE + wd/2 ||W||^2, written out: (softmax - onehot)^T x / N + wd W.
    x, y = blobs(2, spread=1.0)
    wd = 1e-2
    res = linear_probe(x, y, x, y, weight_decay=wd)
    xs = (x - res.mean) / res.std
    w, b = res.classifier.weight, res.classifier.bias
    p = torch.softmax(xs @ w.T + b, dim=1)
    err = p - torch.nn.functional.one_hot(y, 3).float()
    grad_w = err.T @ xs / len(y) + wd * w
    grad_b = err.mean(dim=0)
    assert grad_w.abs().max() < 1e-4 and grad_b.abs().max() < 1e-4


def test_standardisation_uses_train_statistics_only():
    x, y = blobs(3)
    xt, yt = blobs(4)
    res = linear_probe(x, y, xt, yt)
    torch.testing.assert_close(res.mean, x.mean(0))
    torch.testing.assert_close(res.std, x.std(0, correction=0))
    # Changing the test set (scale, shift, labels) changes nothing that was fitted.
    res2 = linear_probe(x, y, xt * 100 + 5, yt.flip(0))
    assert torch.equal(res.mean, res2.mean) and torch.equal(res.std, res2.std)
    assert torch.equal(res.classifier.weight, res2.classifier.weight)


def test_no_standardisation_and_constant_columns():
    x, y = blobs(5)
    res = linear_probe(x, y, x, y, standardize=False)
    assert torch.equal(res.mean, torch.zeros(16)) and torch.equal(res.std, torch.ones(16))
    xc = torch.cat([x, torch.full((len(x), 1), 3.0)], dim=1)
    res = linear_probe(xc, y, xc, y)
    assert res.std[-1] == 1.0 and torch.isfinite(res.classifier.weight).all()
    assert res.top1 >= 0.99


def test_deterministic_and_sweep_is_honest():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(300, 8, generator=g)
    y = (x[:, 0] + 0.8 * torch.randn(300, generator=g) > 0).long()
    xt = torch.randn(200, 8, generator=g)
    yt = (xt[:, 0] > 0).long()
    wds = (1e-4, 1e-2, 1.0)
    a = linear_probe(x, y, xt, yt, weight_decays=wds, seed=3)
    b = linear_probe(x, y, xt, yt, weight_decays=wds, seed=3)
    assert a.weight_decay == b.weight_decay and a.val_top1 == b.val_top1
    assert torch.equal(a.classifier.weight, b.classifier.weight)
    assert set(a.val_top1) == set(wds) and a.weight_decay in wds
    assert a.val_top1[a.weight_decay] == max(a.val_top1.values())
    # The choice never looks at the test set: flipping the test labels changes only top1.
    c = linear_probe(x, y, xt, 1 - yt, weight_decays=wds, seed=3)
    assert c.weight_decay == a.weight_decay and c.val_top1 == a.val_top1
    assert c.top1 == pytest.approx(1 - a.top1)
    # Without a sweep the given weight decay is used.
    assert linear_probe(x, y, xt, yt, weight_decay=0.5).weight_decay == 0.5


def test_float64_and_num_classes():
    x, y = blobs(7)
    res = linear_probe(x.double(), y, x.double(), y, num_classes=5)
    assert res.classifier.weight.dtype == torch.float64 and res.classifier.weight.shape == (5, 16)
    assert res.mean.dtype == torch.float64


@pytest.mark.parametrize(
    ("kwargs", "err", "match"),
    [
        ({"train_labels": torch.zeros(299, dtype=torch.long)}, ValueError, "train_labels"),
        ({"train_labels": torch.zeros(300)}, TypeError, "train_labels"),
        ({"test_labels": torch.full((300,), -1)}, ValueError, "test_labels"),
        ({"num_classes": 2}, ValueError, "train_labels"),
        ({"test_features": torch.randn(300, 5)}, ValueError, "test_features"),
        ({"train_features": torch.randn(300)}, ValueError, "train_features"),
        ({"train_features": torch.full((300, 16), float("inf"))}, ValueError, "train_features"),
        ({"weight_decay": -1.0}, ValueError, "weight_decay"),
        ({"weight_decays": ()}, TypeError, "weight_decays"),
        ({"weight_decays": (1e-3, -1.0)}, ValueError, r"weight_decays\[1\]"),
        ({"val_fraction": 1.0}, ValueError, "val_fraction"),
        ({"max_iter": 0}, ValueError, "max_iter"),
        ({"standardize": 1}, TypeError, "standardize"),
    ],
)
def test_bad_inputs(kwargs, err, match):
    x, y = blobs(0)
    args = {"train_features": x, "train_labels": y, "test_features": x, "test_labels": y}
    args.update(kwargs)
    with pytest.raises(err, match=match):
        linear_probe(**args)


def test_sweep_needs_both_splits():
    x, y = blobs(0, n_per_class=1)
    with pytest.raises(ValueError, match="val_fraction"):
        linear_probe(x, y, x, y, weight_decays=(1e-3,), val_fraction=0.01)


def test_predict_checks_width():
    x, y = blobs(0)
    res = linear_probe(x, y, x, y)
    with pytest.raises(ValueError, match="features"):
        res.predict(torch.randn(4, 3))


def test_docstring_examples_run():
    import doctest
    import importlib

    module = importlib.import_module("jepa_blocks.evaluation.linear_probe")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("weight_decay", [1e-2, 1e-3])
def test_parity_with_scikit_learn_logistic_regression(weight_decay):
    """Our float64 L-BFGS probe and scikit-learn's LogisticRegression(lbfgs) minimise the same
    strictly convex objective (C = 1 / (weight_decay * N), multinomial, unpenalised bias), on
    the same standardised features: the same optimum, so the same test predictions."""
    datasets = pytest.importorskip("sklearn.datasets")
    lm = pytest.importorskip("sklearn.linear_model")
    digits = datasets.load_digits()  # bundled with scikit-learn: 1,797 8x8 images, 10 classes
    x = torch.tensor(digits.data, dtype=torch.float64)
    y = torch.tensor(digits.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1200], perm[1200:]
    ours = linear_probe(x[train], y[train], x[test], y[test], weight_decay=weight_decay, max_iter=1000)

    # Standardised independently of the probe: train mean and population std, constant
    # pixels (always 0 in digits' border) left unscaled.
    mean, std = x[train].mean(0), x[train].std(0, correction=0)
    std = torch.where(std > 0, std, torch.ones_like(std))
    xs_train, xs_test = ((x[train] - mean) / std).numpy(), ((x[test] - mean) / std).numpy()
    ref = lm.LogisticRegression(C=1.0 / (weight_decay * len(train)), solver="lbfgs", max_iter=5000, tol=1e-10)
    ref.fit(xs_train, y[train].numpy())
    ref_top1 = float((ref.predict(xs_test) == y[test].numpy()).mean())

    assert abs(ours.top1 - ref_top1) <= 1.0 / len(test) + 1e-12  # at most one test image apart
    agree = (ours.predict(x[test]).numpy() == ref.predict(xs_test)).mean()
    assert agree >= 0.995
    # The optimum itself: weights equal; biases equal up to the softmax's common shift.
    torch.testing.assert_close(ours.classifier.weight.double(), torch.from_numpy(ref.coef_), rtol=0, atol=2e-3)
    b_ours = ours.classifier.bias.double()
    b_ref = torch.from_numpy(ref.intercept_)
    torch.testing.assert_close(b_ours - b_ours.mean(), b_ref - b_ref.mean(), rtol=0, atol=2e-3)
