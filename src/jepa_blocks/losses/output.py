"""The return type shared by losses that report their terms."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

__all__ = ["LossOutput"]


class LossOutput(NamedTuple):
    """A loss value together with its named (unweighted) terms.

    Unpacks like a pair: ``loss, terms = criterion(...)``.

    Attributes:
        total: Scalar tensor to call ``backward()`` on.
        terms: Scalar tensors by name, for logging; they share the graph of ``total``.

    Example:
        >>> import torch
        >>> out = LossOutput(torch.tensor(1.5), {"a": torch.tensor(1.5)})
        >>> loss, terms = out
        >>> float(loss), sorted(terms)
        (1.5, ['a'])
    """

    total: Tensor
    terms: dict[str, Tensor]
