"""The return convention of the loss modules: a plain Tensor, the named terms on request.

Every loss module of :mod:`jepa_blocks.losses` (and the commitment loss of
:class:`~jepa_blocks.quantizers.VectorQuantizer`) follows one convention, so a loss
behaves like a ``torch.nn`` loss::

    loss = criterion(a, b)                         # a 0-dim Tensor: .backward(), 0.5 * loss,
                                                   # torch.stack([loss, other]) all work
    loss, terms = criterion(a, b, return_terms=True)   # LossOutput(total, terms)
    criterion.last_terms                           # {"name": detached 0-dim Tensor, ...}

``terms`` are the unweighted named parts of the loss (they share the graph of ``total``);
``last_terms`` holds the same values detached, refreshed at every call (no host sync:
they stay tensors on the loss's device; call ``float()`` when logging). The functional
forms keep their return types: the multi-term ones (``latent_prediction_loss``,
``vicreg_loss``, ``lejepa_view_loss``) return :class:`LossOutput`, the single-term ones
(``sigreg``, ``ntxent_loss``, ``info_nce_loss``) a Tensor.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor, nn

from jepa_blocks._checks import check_bool

__all__ = ["LossModule", "LossOutput"]


class LossOutput(NamedTuple):
    """A loss value together with its named (unweighted) terms.

    Unpacks like a pair: ``loss, terms = criterion(..., return_terms=True)``.

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


class LossModule(nn.Module):
    """Base of the loss modules: the convention of the module docstring.

    A subclass computes a :class:`LossOutput` and ends its ``forward`` with
    ``return self._output(out, return_terms)``.

    Attributes:
        last_terms: The named terms of the latest call, detached 0-dim tensors (empty
            before the first call).

    Example:
        >>> import torch
        >>> class Half(LossModule):
        ...     def forward(self, x, *, return_terms=False):
        ...         value = 0.5 * x.square().mean()
        ...         return self._output(LossOutput(value, {"half": value}), return_terms)
        >>> criterion = Half()
        >>> loss = criterion(torch.ones(3))
        >>> float(loss), {k: float(v) for k, v in criterion.last_terms.items()}
        (0.5, {'half': 0.5})
        >>> loss, terms = criterion(torch.ones(3), return_terms=True)
    """

    last_terms: dict[str, Tensor]

    def __init__(self) -> None:
        super().__init__()
        self.last_terms = {}

    def _output(self, out: LossOutput, return_terms: bool) -> Tensor | LossOutput:
        """Record ``out.terms`` (detached) in :attr:`last_terms`; return ``out`` or its total."""
        check_bool("return_terms", return_terms)
        self.last_terms = {name: value.detach() for name, value in out.terms.items()}
        return out if return_terms else out.total
