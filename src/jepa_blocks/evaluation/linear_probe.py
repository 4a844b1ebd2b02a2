"""Linear probe: multinomial logistic regression on frozen features.

The probe minimises the L2-regularised mean cross-entropy

    L(W, b) = mean_i CE(W x_i + b, y_i) + (weight_decay / 2) * ||W||_F^2

(the bias is not penalised) over features standardised with the *train* mean and std.
The problem is convex (strictly so for ``weight_decay > 0``), so we solve it full-batch
in float64 with L-BFGS and a strong-Wolfe line search from a zero initialisation, as
scikit-learn's ``LogisticRegression(solver="lbfgs")`` does (``C = 1 / (weight_decay * N)``
gives the same optimum): no learning rate or epoch count to tune, the same answer on every
run, and well under a second for 4k x 192 features on 2 CPU cores. ``max_iter``
bounds the work, so an unregularised probe on separable data stops instead of running off.

An optional sweep over ``weight_decays`` fits on a random ``1 - val_fraction`` of the
train set, picks the value with the best accuracy on the held-out rest (ties go to the
larger, more regularised value), then refits on the whole train set. The test set is
only ever used for the final number.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from jepa_blocks._checks import (
    check_bool,
    check_finite,
    check_float,
    check_int,
    check_tensor,
    value_checks_enabled,
)

__all__ = ["LinearProbeResult", "linear_probe"]


@dataclass
class LinearProbeResult:
    """Outcome of :func:`linear_probe`.

    Attributes:
        top1: Test accuracy, a fraction in ``[0, 1]``.
        train_top1: Accuracy on the (whole) train set.
        classifier: The fitted ``nn.Linear(D, num_classes)``; it expects standardised
            features ``(x - mean) / std``.
        mean: Train feature mean of shape ``(D,)`` (zeros when ``standardize=False``).
        std: Train feature std of shape ``(D,)`` (ones when ``standardize=False``;
            constant dimensions get 1).
        weight_decay: The L2 coefficient of the final fit (the sweep's choice, if any).
        val_top1: Held-out accuracy of each swept weight decay, ``{wd: acc}``; ``None``
            without a sweep.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(64, 4, generator=g)
        >>> y = (x[:, 0] > 0).long()
        >>> res = linear_probe(x, y, x, y)
        >>> res.top1 > 0.9, res.predict(x).shape
        (True, torch.Size([64]))
    """

    top1: float
    train_top1: float
    classifier: nn.Linear
    mean: torch.Tensor
    std: torch.Tensor
    weight_decay: float
    val_top1: dict[float, float] | None = None

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """Predicted labels of shape ``(M,)`` for features of shape ``(M, D)``."""
        check_tensor("features", features, ndim=2, kind="float")
        if features.shape[1] != self.mean.shape[0]:
            raise ValueError(
                f"features must have {self.mean.shape[0]} columns, got shape {tuple(features.shape)}"
            )
        x = (features.to(self.mean) - self.mean) / self.std
        with torch.no_grad():
            return self.classifier(x).argmax(dim=1)


def _standardizer(x: torch.Tensor, standardize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of shape (D,) from x (N, D); constant dims keep std 1."""
    if not standardize:
        return torch.zeros_like(x[0]), torch.ones_like(x[0])
    mean = x.mean(dim=0)
    std = x.std(dim=0, correction=0)
    constant = std <= 1e-7 * mean.abs().clamp_min(1.0)
    return mean, torch.where(constant, torch.ones_like(std), std)


def _fit(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float, max_iter: int
) -> nn.Linear:
    """Full-batch L-BFGS on standardised x (N, D) and labels y (N,)."""
    linear = nn.Linear(x.shape[1], num_classes, device=x.device, dtype=x.dtype)
    with torch.no_grad():
        linear.weight.zero_()
        linear.bias.zero_()
    opt = torch.optim.LBFGS(
        linear.parameters(),
        lr=1.0,
        max_iter=max_iter,
        max_eval=2 * max_iter,
        tolerance_grad=1e-6,
        tolerance_change=1e-10,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(linear(x), y)
        if weight_decay > 0:
            loss = loss + 0.5 * weight_decay * linear.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    linear.requires_grad_(False)
    return linear


def _accuracy(linear: nn.Linear, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (linear(x).argmax(dim=1) == y).double().mean().item()


def _check_xy(name_x: str, x: torch.Tensor, name_y: str, y: torch.Tensor) -> None:
    check_tensor(name_x, x, ndim=2, kind="float")
    if x.shape[1] == 0:
        raise ValueError(
            f"{name_x} must have at least one feature column, got shape {tuple(x.shape)}"
        )
    check_finite((name_x, x))  # a value check (host sync), see jepa_blocks._checks
    check_tensor(name_y, y, ndim=1, kind="int")
    if y.shape[0] != x.shape[0]:
        raise ValueError(
            f"{name_y} must have shape ({x.shape[0]},) to match {name_x}, got {tuple(y.shape)}"
        )


def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    num_classes: int | None = None,
    weight_decay: float = 1e-2,
    weight_decays: Sequence[float] | None = None,
    val_fraction: float = 0.2,
    max_iter: int = 500,
    standardize: bool = True,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> LinearProbeResult:
    """Fit a logistic-regression probe on train features and score it on test features.

    Args:
        train_features: Train features of shape ``(N, D)``.
        train_labels: Train labels of shape ``(N,)``, integers in ``[0, num_classes)``.
        test_features: Test features of shape ``(M, D)``.
        test_labels: Test labels of shape ``(M,)``.
        num_classes: Number of classes; ``None`` infers ``max(train, test labels) + 1``.
        weight_decay: L2 coefficient (on the mean loss) when no sweep is asked for. The
            default 1e-2 (scikit-learn ``C`` ~ 0.025 at N = 4k) beat 1e-3 and 1e-4 on
            weak features of 4k CIFAR-10 images; sweep for strong features.
        weight_decays: Values to sweep on a held-out part of the train set; overrides
            ``weight_decay``.
        val_fraction: Fraction of the train set held out by the sweep, in ``(0, 1)``.
        max_iter: Maximum L-BFGS iterations per fit.
        standardize: Standardise features with the train mean and std.
        seed: Seed of the sweep's train/held-out split (the fit itself is deterministic).
        device: Where to fit; ``None`` uses ``train_features.device``.

    Returns:
        A :class:`LinearProbeResult`; ``classifier``, ``mean`` and ``std`` live on
        ``device`` in float32 (float64 for float64 train features).
    """
    _check_xy("train_features", train_features, "train_labels", train_labels)
    _check_xy("test_features", test_features, "test_labels", test_labels)
    if test_features.shape[1] != train_features.shape[1]:
        raise ValueError(
            f"test_features must have {train_features.shape[1]} columns like train_features, "
            f"got shape {tuple(test_features.shape)}"
        )
    if num_classes is None:
        num_classes = max(int(train_labels.max()), int(test_labels.max())) + 1
    num_classes = check_int("num_classes", num_classes, min_value=1)
    for name, y in (("train_labels", train_labels), ("test_labels", test_labels)):
        if not value_checks_enabled():
            break
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(
                f"{name} must lie in [0, num_classes={num_classes}), got values in [{lo}, {hi}]"
            )
    weight_decay = check_float("weight_decay", weight_decay, min_value=0.0)
    if weight_decays is not None:
        if (
            isinstance(weight_decays, (str, bytes))
            or not isinstance(weight_decays, Sequence)
            or not weight_decays
        ):
            raise TypeError(
                f"weight_decays must be a non-empty sequence of floats, got {weight_decays!r}"
            )
        wds = [
            check_float(f"weight_decays[{i}]", w, min_value=0.0)
            for i, w in enumerate(weight_decays)
        ]
    val_fraction = check_float(
        "val_fraction",
        val_fraction,
        min_value=0.0,
        max_value=1.0,
        min_inclusive=False,
        max_inclusive=False,
    )
    max_iter = check_int("max_iter", max_iter, min_value=1)
    standardize = check_bool("standardize", standardize)
    seed = check_int("seed", seed)
    device = torch.device(device) if device is not None else train_features.device
    out_dtype = torch.float64 if train_features.dtype == torch.float64 else torch.float32
    # Solve in float64 (MPS has none): float32 line searches stall ~1% short of the optimum.
    dtype = torch.float32 if device.type == "mps" else torch.float64

    x_train = train_features.to(device=device, dtype=dtype)
    y_train = train_labels.to(device=device, dtype=torch.long)
    n = x_train.shape[0]

    # 1. Optional sweep: fit on a random part of train, choose on the held-out rest.
    val_top1 = None
    if weight_decays is not None:
        n_val = round(val_fraction * n)
        if n_val < 1 or n - n_val < 1:
            raise ValueError(
                f"val_fraction={val_fraction} leaves an empty fit or held-out split of {n} train samples"
            )
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(device)
        fit_idx, val_idx = perm[n_val:], perm[:n_val]
        mean, std = _standardizer(x_train[fit_idx], standardize)
        x_fit, x_val = (x_train[fit_idx] - mean) / std, (x_train[val_idx] - mean) / std
        val_top1 = {}
        for wd in wds:
            clf = _fit(x_fit, y_train[fit_idx], num_classes, wd, max_iter)
            val_top1[wd] = _accuracy(clf, x_val, y_train[val_idx])
        # Best held-out accuracy; among equals the largest weight decay.
        weight_decay = max(val_top1, key=lambda w: (val_top1[w], w))

    # 2. Final fit on the whole train set, standardised with its own statistics.
    mean, std = _standardizer(x_train, standardize)
    x_std = (x_train - mean) / std
    clf = _fit(x_std, y_train, num_classes, weight_decay, max_iter)

    # 3. Score once on the test set.
    x_test = (test_features.to(device=device, dtype=dtype) - mean) / std
    top1 = _accuracy(clf, x_test, test_labels.to(device=device, dtype=torch.long))
    return LinearProbeResult(
        top1=top1,
        train_top1=_accuracy(clf, x_std, y_train),
        classifier=clf.to(out_dtype),
        mean=mean.to(out_dtype),
        std=std.to(out_dtype),
        weight_decay=weight_decay,
        val_top1=val_top1,
    )
