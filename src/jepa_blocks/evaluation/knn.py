"""Weighted k-nearest-neighbour classification on frozen features (the DINO / InstDisc rule).

For a query ``q`` and a bank of train features ``x_1 .. x_N`` with labels ``y_1 .. y_N``:

1. Features are L2-normalised (after subtracting the train mean when ``center=True``), so
   the similarity ``s_i = <q, x_i>`` is the cosine similarity, in ``[-1, 1]``.
2. The ``k`` most similar train features vote for their label with weight
   ``exp(s_i / T)`` (Wu et al. 2018, "Unsupervised Feature Learning via Non-Parametric
   Instance Discrimination"; DINO's ``knn_classifier`` with ``T = 0.07``).
3. The predicted label is the class with the largest total vote; ties go to the smallest
   class id.

Queries are processed ``chunk_size`` at a time, so memory stays ``O(chunk_size * N)``.
Centring subtracts the *train* mean from both banks; it removes a component shared by all
features, which dominates the cosine similarity when the features suffer dimensional
collapse (see REFERENCES, "What a plain I-JEPA reaches").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from jepa_blocks._checks import (
    check_bool,
    check_finite,
    check_float,
    check_int,
    check_tensor,
    value_checks_enabled,
)

__all__ = ["knn_accuracy", "knn_classify"]


def _check_ks(k: int | Sequence[int]) -> list[int]:
    if isinstance(k, int) and not isinstance(k, bool):
        return [check_int("k", k, min_value=1)]
    if isinstance(k, (str, bytes)) or not isinstance(k, Sequence) or len(k) == 0:
        raise TypeError(f"k must be a positive int or a non-empty sequence of them, got {k!r}")
    ks = [check_int(f"k[{i}]", v, min_value=1) for i, v in enumerate(k)]
    return list(dict.fromkeys(ks))  # drop duplicates, keep the caller's order


def _check_labels(name: str, labels: torch.Tensor, n: int, num_classes: int) -> None:
    check_tensor(name, labels, ndim=1, kind="int")
    if labels.shape[0] != n:
        raise ValueError(
            f"{name} must have shape ({n},) to match the features, got {tuple(labels.shape)}"
        )
    if not value_checks_enabled():
        return
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(
            f"{name} must lie in [0, num_classes={num_classes}), got values in [{lo}, {hi}]"
        )


def _check_features(name: str, x: torch.Tensor) -> None:
    check_tensor(name, x, ndim=2, kind="float")
    if x.shape[1] == 0:
        raise ValueError(
            f"{name} must have at least one feature column, got shape {tuple(x.shape)}"
        )
    check_finite((name, x))  # a value check (host sync), see jepa_blocks._checks


def _prepare(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    query_labels: torch.Tensor | None,
    k: int | Sequence[int],
    temperature: float,
    num_classes: int | None,
    center: bool,
    chunk_size: int,
) -> tuple[list[int], float, int, bool, int]:
    _check_features("train_features", train_features)
    _check_features("query_features", query_features)
    if query_features.shape[1] != train_features.shape[1]:
        raise ValueError(
            "query_features must have the same feature dimension as train_features "
            f"({train_features.shape[1]}), got shape {tuple(query_features.shape)}"
        )
    ks = _check_ks(k)
    temperature = check_float("temperature", temperature, min_value=0.0, min_inclusive=False)
    center = check_bool("center", center)
    chunk_size = check_int("chunk_size", chunk_size, min_value=1)
    check_tensor("train_labels", train_labels, ndim=1, kind="int")
    if num_classes is None:
        hi = int(train_labels.max())
        if query_labels is not None:
            check_tensor("query_labels", query_labels, ndim=1, kind="int")
            hi = max(hi, int(query_labels.max()))
        num_classes = max(hi + 1, 1)
    else:
        num_classes = check_int("num_classes", num_classes, min_value=1)
    _check_labels("train_labels", train_labels, train_features.shape[0], num_classes)
    if query_labels is not None:
        _check_labels("query_labels", query_labels, query_features.shape[0], num_classes)
    return ks, temperature, num_classes, center, chunk_size


def _knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    ks: list[int],
    temperature: float,
    num_classes: int,
    center: bool,
    chunk_size: int,
) -> dict[int, torch.Tensor]:
    device = train_features.device
    dtype = (
        torch.float64
        if torch.float64 in (train_features.dtype, query_features.dtype)
        else torch.float32
    )
    bank = train_features.to(dtype)
    mean = bank.mean(dim=0, keepdim=True) if center else None
    if mean is not None:
        bank = bank - mean
    bank = F.normalize(bank, dim=1)  # (N, D)
    labels = train_labels.to(device=device, dtype=torch.long)
    n = bank.shape[0]
    k_max = min(max(ks), n)
    preds: dict[int, list[torch.Tensor]] = {kk: [] for kk in ks}
    for start in range(0, query_features.shape[0], chunk_size):
        q = query_features[start : start + chunk_size].to(device=device, dtype=dtype)
        if mean is not None:
            q = q - mean
        q = F.normalize(q, dim=1)  # (C, D)
        sim = q @ bank.T  # (C, N) cosine similarities
        top_sim, top_idx = sim.topk(k_max, dim=1)  # (C, k_max), most similar first
        # exp(s / T) up to a per-query factor exp(-s_max / T): the same argmax, no overflow.
        weights = ((top_sim - top_sim[:, :1]) / temperature).exp()  # (C, k_max)
        top_labels = labels[top_idx]  # (C, k_max)
        for kk in ks:
            kc = min(kk, n)
            votes = torch.zeros(q.shape[0], num_classes, dtype=dtype, device=device)
            votes.scatter_add_(1, top_labels[:, :kc], weights[:, :kc])  # (C, num_classes)
            preds[kk].append(votes.argmax(dim=1))  # first maximum: smallest class id on ties
    return {kk: torch.cat(v) for kk, v in preds.items()}


def knn_classify(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    *,
    k: int | Sequence[int] = (10, 20, 200),
    temperature: float = 0.07,
    num_classes: int | None = None,
    center: bool = False,
    chunk_size: int = 1024,
) -> dict[int, torch.Tensor]:
    """Predict query labels by temperature-weighted cosine kNN voting.

    Args:
        train_features: Bank features of shape ``(N, D)``.
        train_labels: Bank labels of shape ``(N,)``, integers in ``[0, num_classes)``.
        query_features: Query features of shape ``(M, D)``.
        k: Number of neighbours, or several (one prediction per value). A ``k`` larger
            than ``N`` uses all ``N`` bank entries; the result is still keyed by the
            requested ``k``.
        temperature: ``T`` in the vote weight ``exp(cos_sim / T)``; must be > 0.
        num_classes: Number of classes; ``None`` infers ``max(train_labels) + 1``.
        center: Subtract the train-feature mean from both banks before normalising.
        chunk_size: Queries scored per step (memory ``O(chunk_size * N)``).

    Returns:
        ``{k: labels}`` with long labels of shape ``(M,)`` on ``train_features.device``.

    Example:
        >>> train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
        >>> labels = torch.tensor([0, 0, 1])
        >>> knn_classify(train, labels, torch.tensor([[0.1, 1.0]]), k=1)[1]
        tensor([1])
    """
    ks, temperature, num_classes, center, chunk_size = _prepare(
        train_features,
        train_labels,
        query_features,
        None,
        k,
        temperature,
        num_classes,
        center,
        chunk_size,
    )
    return _knn_predict(
        train_features,
        train_labels,
        query_features,
        ks,
        temperature,
        num_classes,
        center,
        chunk_size,
    )


def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    query_labels: torch.Tensor,
    *,
    k: int | Sequence[int] = (10, 20, 200),
    temperature: float = 0.07,
    num_classes: int | None = None,
    center: bool = False,
    chunk_size: int = 1024,
) -> dict[int, float]:
    """Top-1 accuracy of :func:`knn_classify` for each ``k``.

    Args:
        train_features: Bank features of shape ``(N, D)``.
        train_labels: Bank labels of shape ``(N,)``.
        query_features: Query features of shape ``(M, D)``.
        query_labels: True query labels of shape ``(M,)``.
        k: As in :func:`knn_classify`.
        temperature: As in :func:`knn_classify`.
        num_classes: As in :func:`knn_classify`; ``None`` infers
            ``max(train_labels, query_labels) + 1``.
        center: As in :func:`knn_classify`.
        chunk_size: As in :func:`knn_classify`.

    Returns:
        ``{k: accuracy}`` with accuracies as fractions in ``[0, 1]``.

    Example:
        >>> x = torch.eye(3)
        >>> knn_accuracy(x, torch.tensor([0, 1, 2]), x, torch.tensor([0, 1, 2]), k=1)
        {1: 1.0}
    """
    ks, temperature, num_classes, center, chunk_size = _prepare(
        train_features,
        train_labels,
        query_features,
        query_labels,
        k,
        temperature,
        num_classes,
        center,
        chunk_size,
    )
    preds = _knn_predict(
        train_features,
        train_labels,
        query_features,
        ks,
        temperature,
        num_classes,
        center,
        chunk_size,
    )
    target = query_labels.to(device=train_features.device, dtype=torch.long)
    return {kk: (p == target).double().mean().item() for kk, p in preds.items()}
