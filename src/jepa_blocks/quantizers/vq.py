"""Vector quantiser with an EMA codebook, dead-code refresh and distributed-safe statistics.

Each row ``z_i`` of the input (any leading shape, feature dim ``D`` last) is replaced by its
nearest codebook row ``e_k``, ``k = argmin_k ||z_i - e_k||^2`` (van den Oord et al. 2017,
"Neural Discrete Representation Learning"). The codebook is not learnt by gradient: as in
the paper's appendix and VQ-VAE-2 (Razavi et al. 2019) it follows exponential moving
averages of the per-code assignment counts ``N_k`` and row sums ``m_k``::

    N_k <- decay * N_k + (1 - decay) * n_k        n_k = #rows assigned to code k
    m_k <- decay * m_k + (1 - decay) * s_k        s_k = sum of those rows
    e_k  = m_k / N~_k,   N~_k = (N_k + eps) / (n + K eps) * n,   n = sum_k N_k

(``N~`` is the Laplace-smoothed count, which keeps ``e_k`` finite for unused codes). The
encoder sees the straight-through estimate ``q = e_k`` forward, identity backward, and a
commitment loss ``beta * mean ||z - sg(e_k)||^2`` pulls it towards its codes.

Codes whose EMA count falls far below the mean are *dead*: every ``refresh_every``
training steps they are re-initialised from rows of a ring buffer of recent encoder outputs
(random restarts as in Jukebox, Dhariwal et al. 2020), so the whole codebook stays in use.

Large inputs: squared distances sum ``D`` squares of differences of entries, and the
commitment loss sums ``M D`` of them for ``M`` rows, so in float32 entries beyond
``sqrt(max_float / n) / 2`` (``n = D`` for the distances, ``M D`` for the loss; ``~9e17``
for ``n = 96``) can overflow to Inf (and ``Inf - Inf`` to NaN in the argmin), which
silently picks wrong codes and an infinite loss. While value checks are on, the NaN/Inf
check of the inputs also rejects entries above that bound (``ValueError`` naming the
argument, in the same single host sync); with value checks off such inputs pass through
unchecked. Tensors on another device than the codebook raise ``ValueError``.

Pure functions first (:func:`squared_distances`, :func:`nearest_codes`,
:func:`codebook_from_ema`, :func:`code_perplexity`, :func:`codebook_usage`), then
:class:`VectorQuantizer`, which owns the codebook, the EMA statistics, the ring buffer and
the step counter as buffers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from jepa_blocks._checks import (
    check_bool,
    check_choice,
    check_finite,
    check_float,
    check_index_range,
    check_int,
    check_same_device,
    check_tensor,
    has_data,
    value_checks_enabled,
)
from jepa_blocks._precision import compute_dtype, full_precision
from jepa_blocks._seeding import mix
from jepa_blocks.distributed import is_distributed

__all__ = [
    "VQOutput",
    "VectorQuantizer",
    "code_perplexity",
    "codebook_from_ema",
    "codebook_usage",
    "nearest_codes",
    "squared_distances",
]

_INITS = ("data", "normal")
# Codes travel through the fused all-reduce as floats: exact up to 2**24.
_MAX_CODES = 2**24
# Distance block budget (elements of one (rows, K) block) for the chunked argmin.
_BLOCK_ELEMENTS = 2**22


def _max_abs_entry(count: int, dtype: torch.dtype = torch.float32) -> float:
    """Largest entry magnitude the quantiser accepts: ``sqrt(finfo(dtype).max / count) / 2``.

    Below it, a sum of ``count`` squared differences of such entries (a squared distance
    ``||z - e||^2`` for ``count = D``, the commitment loss's sum for ``count = M D``), and
    every score of the argmin, stays finite in ``dtype``.

    Args:
        count: Number of squares summed, ``>= 1``.
        dtype: Computation dtype (``float32``, or ``float64`` for float64 inputs).
    """
    return math.sqrt(torch.finfo(dtype).max / max(count, 1)) / 2


def _check_magnitude(*items: tuple[str, Tensor], count: int, dtype: torch.dtype) -> None:
    """Finite, and below :func:`_max_abs_entry` (a value check: one host sync)."""
    limit = _max_abs_entry(count, dtype)
    reason = f"sums of {count} squares overflow {dtype} beyond sqrt(max / {count}) / 2"
    check_finite(*items, max_abs=limit, reason=reason)


def _check_rows_and_codebook(z: Tensor, codebook: Tensor) -> None:
    check_tensor("z", z, ndim=2, kind="float", allow_empty=True)
    check_tensor("codebook", codebook, ndim=2, kind="float")
    check_same_device(("z", z), ("codebook", codebook))
    if z.shape[1] != codebook.shape[1]:
        raise ValueError(
            f"z must have the codebook's feature dim {codebook.shape[1]} in dim 1, "
            f"got shape {tuple(z.shape)}"
        )
    dtype = compute_dtype(z, codebook)
    _check_magnitude(("z", z), ("codebook", codebook), count=z.shape[1], dtype=dtype)


def squared_distances(z: Tensor, codebook: Tensor) -> Tensor:
    """Squared Euclidean distances ``||z_i||^2 - 2 z_i . e_k + ||e_k||^2``, clamped at 0.

    Computed in float32 (float64 if an input is float64) with autocast disabled, so bf16
    inputs under autocast are upcast rather than multiplied in bf16.

    Args:
        z: Rows of shape (M, D).
        codebook: Codebook of shape (K, D).

    Returns:
        Distances of shape (M, K), float32 or float64.
    """
    _check_rows_and_codebook(z, codebook)
    dtype = compute_dtype(z, codebook)
    with full_precision(z.device):
        z, codebook = z.to(dtype), codebook.to(dtype)
        z_sq = z.square().sum(1, keepdim=True)
        e_sq = codebook.square().sum(1)
        return torch.addmm(e_sq, z, codebook.T, alpha=-2.0).add_(z_sq).clamp_min_(0.0)


def _nearest(z: Tensor, codebook: Tensor, chunk_size: int) -> Tensor:
    """Chunked argmin of ``||e_k||^2 - 2 z . e_k``; inputs already checked and same dtype."""
    e_sq = codebook.square().sum(1)
    out = torch.empty(z.shape[0], dtype=torch.long, device=z.device)
    for start in range(0, z.shape[0], chunk_size):
        block = z[start : start + chunk_size]
        # ||z||^2 is the same for every code of a row: leaving it out does not change the
        # argmin and avoids cancellation when ||z|| is large compared with the gaps.
        scores = torch.addmm(e_sq, block, codebook.T, alpha=-2.0)
        out[start : start + chunk_size] = scores.argmin(1)
    return out


def nearest_codes(z: Tensor, codebook: Tensor, *, chunk_size: int | None = None) -> Tensor:
    """Index of the nearest codebook row of every row of ``z`` (first index on ties).

    Minimises ``||e_k||^2 - 2 z_i . e_k``, i.e. ``||z_i - e_k||^2`` without the constant
    ``||z_i||^2``, in float32 (float64 if an input is float64) with autocast disabled,
    ``chunk_size`` rows at a time so the (rows, K) score block stays small.

    Args:
        z: Rows of shape (M, D).
        codebook: Codebook of shape (K, D).
        chunk_size: Rows per distance block, ``>= 1``; default ``max(1, 2**22 // K)``.

    Returns:
        Code ids of shape (M,), long, in ``[0, K)``.

    Example:
        >>> codebook = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
        >>> nearest_codes(torch.tensor([[0.9, 0.8], [0.1, -0.2]]), codebook)
        tensor([1, 0])
    """
    _check_rows_and_codebook(z, codebook)
    k = codebook.shape[0]
    if chunk_size is None:
        chunk_size = max(1, _BLOCK_ELEMENTS // k)
    chunk_size = check_int("chunk_size", chunk_size, min_value=1)
    dtype = compute_dtype(z, codebook)
    with full_precision(z.device):
        return _nearest(z.to(dtype), codebook.to(dtype), chunk_size)


def _smoothed_codebook(cluster_size: Tensor, embed_sum: Tensor, eps: float) -> Tensor:
    k = cluster_size.shape[0]
    n = cluster_size.sum()
    smoothed = (cluster_size + eps) / (n + k * eps) * n
    return embed_sum / smoothed.unsqueeze(1)


def codebook_from_ema(cluster_size: Tensor, embed_sum: Tensor, *, eps: float = 1e-5) -> Tensor:
    """Codebook ``e_k = m_k / N~_k`` from EMA statistics with Laplace-smoothed counts.

    ``N~_k = (N_k + eps) / (n + K eps) * n`` with ``n = sum_k N_k``: the counts keep their
    total but none is zero, so an unused code stays finite (it shrinks towards the origin
    as its ``m_k`` and ``N_k`` decay). Equal counts are left unchanged.

    Args:
        cluster_size: EMA assignment counts ``N`` of shape (K,), ``>= 0``, positive sum.
        embed_sum: EMA row sums ``m`` of shape (K, D).
        eps: Smoothing constant, ``> 0``.

    Returns:
        Codebook of shape (K, D), dtype of ``embed_sum``.

    Example:
        >>> codebook_from_ema(torch.tensor([2.0, 2.0]), torch.tensor([[2.0], [4.0]]))
        tensor([[1.],
                [2.]])
    """
    check_tensor("cluster_size", cluster_size, ndim=1, kind="float")
    check_tensor("embed_sum", embed_sum, ndim=2, kind="float")
    if embed_sum.shape[0] != cluster_size.shape[0]:
        raise ValueError(
            f"embed_sum must have {cluster_size.shape[0]} rows like cluster_size, "
            f"got shape {tuple(embed_sum.shape)}"
        )
    eps = check_float("eps", eps, min_value=0.0, min_inclusive=False)
    check_finite(("cluster_size", cluster_size), ("embed_sum", embed_sum))
    if value_checks_enabled() and has_data(cluster_size):
        lo, total = torch.stack([cluster_size.min(), cluster_size.sum()]).tolist()
        if lo < 0 or total <= 0:
            raise ValueError(
                f"cluster_size must be >= 0 with a positive sum, got min {lo} and sum {total}"
            )
    return _smoothed_codebook(cluster_size, embed_sum, eps)


def _code_counts(codes: Tensor, k: int, dtype: torch.dtype) -> Tensor:
    """Per-code counts (K,) of a 1-D id tensor (``index_add_``: unlike ``bincount``, no sync)."""
    ones = torch.ones(codes.shape[0], dtype=dtype, device=codes.device)
    return torch.zeros(k, dtype=dtype, device=codes.device).index_add_(0, codes, ones)


def _perplexity(counts: Tensor) -> Tensor:
    p = counts / counts.sum().clamp_min(torch.finfo(counts.dtype).tiny)
    return torch.exp(-torch.special.xlogy(p, p).sum())


def code_perplexity(counts: Tensor) -> Tensor:
    """Perplexity ``exp(-sum_k p_k log p_k)`` of the code distribution ``p = counts / sum``.

    Ranges from 1 (one code used) to K (all codes used equally often); 1 for all-zero
    counts.

    Args:
        counts: Per-code counts of shape (K,), ``>= 0``.

    Returns:
        0-dim tensor, float32 (float64 for float64 counts).

    Example:
        >>> code_perplexity(torch.tensor([5, 5, 0, 0]))
        tensor(2.)
    """
    check_tensor("counts", counts, ndim=1)
    if counts.is_complex():
        raise TypeError(f"counts must be a real tensor, got dtype {counts.dtype}")
    counts = counts.to(compute_dtype(counts))
    check_finite(("counts", counts))
    if value_checks_enabled() and has_data(counts) and bool(counts.min() < 0):
        raise ValueError(f"counts must be >= 0, got min {counts.min().item()}")
    return _perplexity(counts)


def codebook_usage(codes: Tensor, *, num_codes: int) -> float:
    """Fraction of the ``num_codes`` codebook entries that occur at least once in ``codes``.

    Args:
        codes: Integer code ids of any shape ``(...)``, each in ``[0, num_codes)`` (a value
            check: one host sync; without it, ids outside the range are not counted).
        num_codes: Codebook size ``K``.

    Returns:
        ``|unique(codes)| / K``, in ``[0, 1]`` (``0`` for an empty ``codes``).

    Example:
        >>> codebook_usage(torch.tensor([0, 1, 1, 3]), num_codes=8)
        0.375
    """
    num_codes = check_int("num_codes", num_codes, min_value=1)
    check_tensor("codes", codes, kind="int", allow_empty=True)
    if codes.numel() == 0:
        return 0.0
    flat = codes.reshape(-1).long()
    check_index_range("codes", flat, num_codes, what=f"(num_codes={num_codes})")
    # Ids outside [0, K) (possible only with value checks off) land in an extra slot that
    # is not counted, so the result stays in [0, 1].
    slot = torch.where((flat >= 0) & (flat < num_codes), flat, num_codes)
    seen = torch.zeros(num_codes + 1, dtype=torch.bool, device=flat.device).index_fill_(0, slot, True)
    return float(seen[:num_codes].sum()) / num_codes


@dataclass
class VQOutput:
    """What :class:`VectorQuantizer` returns.

    Attributes:
        quantized: Codebook rows of shape (..., D) in the input's dtype, with the
            straight-through gradient (identity to ``z``).
        codes: Code ids of shape (...), long.
        loss: Commitment loss ``commitment_weight * mean (z - sg(q))^2``, 0-dim, float32
            (float64 for a float64 codebook).
        perplexity: Perplexity of this step's code counts, 0-dim, detached.
        usage: Fraction of the K codes used by this step's rows, 0-dim, detached.
    """

    quantized: Tensor
    codes: Tensor
    loss: Tensor
    perplexity: Tensor
    usage: Tensor


class VectorQuantizer(nn.Module):
    """Nearest-codebook-row quantiser with an EMA codebook and dead-code refresh.

    ``forward(z)`` maps every row of ``z`` (feature dim last) to its nearest codebook row
    and returns a :class:`VQOutput` (straight-through ``quantized``, ``codes``, commitment
    ``loss``, ``perplexity``, batch ``usage``). The codebook has no gradient: in training
    mode each forward updates it from EMAs of the assignment counts and row sums (see the
    module docstring), under ``no_grad`` and in float32 even under autocast. Eval mode never
    changes any state.

    One training forward is one *step* (``num_steps``): with gradient accumulation count
    micro-batches. Each step also pushes its last rows into a ring buffer of
    ``buffer_size`` recent encoder outputs and their codes; :meth:`usage` is the fraction of
    codes used by those rows. Every ``refresh_every`` steps, codes whose EMA count is below
    ``dead_code_threshold`` times the mean count are *dead*: each is replaced by a distinct
    random row of the ring buffer and its statistics restart as an average code
    (``N_k = mean N``, ``m_k = N_k e_k``). If there are more dead codes than buffered rows,
    the lowest-index dead codes are refreshed and the rest wait for the next refresh.

    ``init='data'`` draws the initial codebook from random rows of the first training
    batch (its last ``buffer_size`` rows; duplicates if it has fewer than ``num_codes`` rows,
    which the refresh later replaces); until then, and for ``init='normal'``, the codebook is
    standard normal. :meth:`set_codebook_` sets it explicitly (e.g. from k-means).

    Distributed: with ``gather_distributed=True`` and an initialised process group every
    training step sums the per-code counts and row sums over the ranks (one all-reduce of
    ``K (D + 1)`` numbers, fused with the ``min(global rows, buffer_size) (D + 1)`` numbers
    of the ring buffer's new rows, plus a tiny all-gather of the local row counts), so all
    ranks keep identical codebooks and ring buffers, equal to one process fed the
    rank-ordered concatenation; refresh rows come from a generator seeded with the step.
    Local batch sizes may differ. Every rank must then call the training forward the same
    number of times. Perplexity and usage are global in training mode, local in eval mode;
    the loss is the local mean. The module has no parameters: keep it outside DDP (else
    DDP broadcasts its buffers every forward). Not for ``torch.compile``.

    All state is in buffers (``state_dict``): ``codebook``, ``cluster_size``, ``embed_sum``,
    ``num_steps``, ``recent_z``, ``recent_codes``, ``num_seen``, ``num_refreshed``,
    ``initialized``, so a resumed run continues exactly. Keep the buffers float32 (or
    float64): converting the module to bf16 / fp16 is refused at forward; use autocast.

    Args:
        num_codes: Codebook size K, in ``[1, 2**24]``.
        dim: Feature dim D of the rows.
        decay: EMA decay of the statistics, in ``[0, 1)``.
        commitment_weight: Weight ``beta`` of the commitment loss, ``>= 0``.
        dead_code_threshold: A code is dead when ``N_k < dead_code_threshold * mean(N)``,
            ``>= 0`` (``0`` disables the refresh). The default 0.01 marks codes unused for
            the last ~90 steps at ``decay = 0.95``.
        refresh_every: Steps between dead-code refreshes, ``>= 1``.
        buffer_size: Rows kept in the ring buffer of recent encoder outputs, ``>= 1``: the
            pool of refresh rows and the window of :meth:`usage`.
        eps: Laplace smoothing constant of the counts, ``> 0``.
        gather_distributed: Sum the statistics over the default process group.
        init: ``'data'`` or ``'normal'``, see above.
        seed: Seed mixed with the step for the data init and refresh draws.

    Example:
        >>> vq = VectorQuantizer(num_codes=16, dim=8)
        >>> out = vq(torch.randn(4, 10, 8))  # training mode: one EMA step
        >>> out.quantized.shape, out.codes.shape, out.loss.dtype, vq.step
        (torch.Size([4, 10, 8]), torch.Size([4, 10]), torch.float32, 1)
        >>> out = vq.eval()(torch.randn(4, 10, 8))  # eval: no state change
        >>> bool((vq.codebook[out.codes] == out.quantized).all()), vq.step
        (True, 1)
    """

    codebook: Tensor
    cluster_size: Tensor
    embed_sum: Tensor
    num_steps: Tensor
    recent_z: Tensor
    recent_codes: Tensor
    num_seen: Tensor
    num_refreshed: Tensor
    initialized: Tensor

    def __init__(
        self,
        *,
        num_codes: int,
        dim: int,
        decay: float = 0.95,
        commitment_weight: float = 0.15,
        dead_code_threshold: float = 0.01,
        refresh_every: int = 3000,
        buffer_size: int = 4096,
        eps: float = 1e-5,
        gather_distributed: bool = False,
        init: Literal["data", "normal"] = "data",
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.num_codes = check_int("num_codes", num_codes, min_value=1, max_value=_MAX_CODES)
        self.dim = check_int("dim", dim, min_value=1)
        self.decay = check_float("decay", decay, min_value=0.0, max_value=1.0, max_inclusive=False)
        self.commitment_weight = check_float("commitment_weight", commitment_weight, min_value=0.0)
        self.dead_code_threshold = check_float(
            "dead_code_threshold", dead_code_threshold, min_value=0.0
        )
        self.refresh_every = check_int("refresh_every", refresh_every, min_value=1)
        self.buffer_size = check_int("buffer_size", buffer_size, min_value=1)
        self.eps = check_float("eps", eps, min_value=0.0, min_inclusive=False)
        self.gather_distributed = check_bool("gather_distributed", gather_distributed)
        self.init = check_choice("init", init, _INITS)
        self.seed = check_int("seed", seed, min_value=0)

        k, d, r = self.num_codes, self.dim, self.buffer_size
        codebook = torch.randn(k, d)
        self.register_buffer("codebook", codebook)
        # N_k = 1 and m_k = e_k: equal counts, so the smoothed codebook m / N~ is e exactly.
        self.register_buffer("cluster_size", torch.ones(k))
        self.register_buffer("embed_sum", codebook.clone())
        self.register_buffer("num_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("recent_z", torch.zeros(r, d))
        self.register_buffer("recent_codes", torch.zeros(r, dtype=torch.long))
        self.register_buffer("num_seen", torch.zeros((), dtype=torch.long))
        self.register_buffer("num_refreshed", torch.zeros((), dtype=torch.long))
        self.register_buffer("initialized", torch.tensor(self.init == "normal"))
        # Host mirrors of the counters so that a training step needs no device sync;
        # None means "re-read from the buffer" (after load_state_dict).
        self._host_steps: int | None = 0
        self._host_seen: int | None = 0
        self._host_initialized: bool | None = self.init == "normal"
        # The loss convention of jepa_blocks.losses: named terms of the last call, detached.
        self.last_terms: dict[str, Tensor] = {}

    # ---------------------------------------------------------------- counters

    @property
    def step(self) -> int:
        """Training forward steps taken so far."""
        if self._host_steps is None:
            self._host_steps = int(self.num_steps.item())
        return self._host_steps

    def _seen(self) -> int:
        if self._host_seen is None:
            self._host_seen = int(self.num_seen.item())
        return self._host_seen

    def _is_initialized(self) -> bool:
        if self._host_initialized is None:
            self._host_initialized = bool(self.initialized.item())
        return self._host_initialized

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._host_steps = self._host_seen = self._host_initialized = None

    # ---------------------------------------------------------------- public helpers

    def usage(self) -> float:
        """Fraction of the codes used by the last ``buffer_size`` training rows (0 before any).

        :func:`codebook_usage` of the ring buffer's codes (one host sync); identical on all
        ranks with ``gather_distributed``.
        """
        valid = min(self._seen(), self.buffer_size)
        return codebook_usage(self.recent_codes[:valid], num_codes=self.num_codes)

    @torch.no_grad()
    def set_codebook_(self, codebook: Tensor) -> None:
        """Set the codebook and restart its statistics (``N_k = 1``, ``m_k = e_k``).

        Marks the codebook initialised, so ``init='data'`` no longer replaces it.

        Args:
            codebook: New codebook of shape (K, D).
        """
        check_tensor("codebook", codebook, ndim=2, kind="float")
        if tuple(codebook.shape) != (self.num_codes, self.dim):
            raise ValueError(
                f"codebook must have shape ({self.num_codes}, {self.dim}), "
                f"got {tuple(codebook.shape)}"
            )
        check_same_device(("codebook", codebook), module=self)
        _check_magnitude(("codebook", codebook), count=self.dim, dtype=self.codebook.dtype)
        self.codebook.copy_(codebook)
        self.cluster_size.fill_(1.0)
        self.embed_sum.copy_(self.codebook)
        self.initialized.fill_(True)
        self._host_initialized = True

    # ---------------------------------------------------------------- forward

    def forward(self, z: Tensor) -> VQOutput:
        """Quantise ``z``; in training mode also update the codebook.

        Args:
            z: Encoder outputs of shape (..., D), floating point (bf16 under autocast is
                fine), not empty.

        Returns:
            A :class:`VQOutput`: ``quantized`` (..., D), ``codes`` (...), ``loss``,
            ``perplexity`` and ``usage`` (0-dim).
        """
        check_tensor("z", z, ndim=range(1, 33), kind="float")
        check_same_device(("z", z), module=self)
        if z.shape[-1] != self.dim:
            raise ValueError(f"z must have feature dim {self.dim} last, got shape {tuple(z.shape)}")
        if self.codebook.dtype not in (torch.float32, torch.float64):
            raise TypeError(
                "VectorQuantizer buffers must stay float32 or float64, got codebook dtype "
                f"{self.codebook.dtype}; use autocast instead of converting the module"
            )
        dtype = self.codebook.dtype
        lead = z.shape[:-1]
        with full_precision(z.device):
            rows = z.reshape(-1, self.dim).to(dtype)  # (M, D), keeps the graph to z
            flat = rows.detach()
            sizes: list[int] | None = None
            if self.training:
                sizes = self._check_and_exchange_sizes(flat)
                if not self._is_initialized():
                    self._init_from_data(flat, sizes)
            else:
                _check_magnitude(("z", flat), count=flat.numel(), dtype=dtype)
            codes = _nearest(flat, self.codebook, max(1, _BLOCK_ELEMENTS // self.num_codes))
            q = self.codebook[codes]  # (M, D): a copy, unaffected by the update below
            loss = self.commitment_weight * (rows - q).square().mean()
            if self.training:
                counts = self._update(flat, codes, sizes)
            else:
                counts = _code_counts(codes, self.num_codes, dtype)
            perplexity = _perplexity(counts)
            usage = (counts > 0).to(dtype).mean()
        # Straight-through: the value is q exactly (z - z.detach() == 0), the gradient is 1.
        quantized = q.to(z.dtype).reshape(z.shape) + (z - z.detach())
        self.last_terms = {"commitment": loss.detach(), "perplexity": perplexity, "usage": usage}
        return VQOutput(
            quantized=quantized,
            codes=codes.reshape(lead),
            loss=loss,
            perplexity=perplexity,
            usage=usage,
        )

    # ---------------------------------------------------------------- training internals

    def _gathering(self) -> bool:
        return self.gather_distributed and is_distributed()

    def _check_and_exchange_sizes(self, flat: Tensor) -> list[int] | None:
        """Finiteness and magnitude check; with gathering, every rank's row count (``None``
        otherwise).

        With gathering the non-finite flags travel with the sizes, so that all ranks raise
        together instead of the healthy ones waiting in the next collective.
        """
        if not self._gathering():
            _check_magnitude(("z", flat), count=flat.numel(), dtype=flat.dtype)
            return None
        limit = _max_abs_entry(flat.numel(), flat.dtype)
        bad = 0
        if value_checks_enabled() and flat.numel():
            low, high = torch.aminmax(flat)  # NaN if an entry is NaN, compares False
            bad = (~(torch.maximum(-low, high) <= limit)).long()
        payload = torch.stack(
            [
                torch.tensor(flat.shape[0], device=flat.device),
                torch.as_tensor(bad, device=flat.device),
            ]
        ).long()
        parts = [torch.empty_like(payload) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, payload)
        table = torch.stack(parts).tolist()
        bad_ranks = [r for r, (_, b) in enumerate(table) if b]
        if bad_ranks:
            raise ValueError(
                f"z must be finite with entries of magnitude <= {limit:.3g} (sums of squares "
                f"overflow beyond), got NaN, Inf or larger values on rank(s) {bad_ranks}"
            )
        return [int(m) for m, _ in table]

    def _tail_block(self, rows: Tensor, sizes: list[int], keep: int) -> Tensor:
        """This rank's share of the last ``keep`` rows of the rank-ordered concatenation.

        Returns a zero block of shape (min(M, keep), C) holding this rank's rows at their
        global positions; summing the blocks over the ranks gives the global tail exactly
        (each position is written by one rank, the others add 0).
        """
        rank = dist.get_rank()
        total = sum(sizes)
        n = min(total, keep)
        first = total - n  # global index of the first kept row
        offset = sum(sizes[:rank])
        block = rows.new_zeros(n, rows.shape[1])
        lo = max(offset, first)  # global range of this rank's kept rows: [lo, offset + m)
        hi = offset + sizes[rank]
        if hi > lo:
            block[lo - first : hi - first] = rows[lo - offset : hi - offset]
        return block

    def _init_from_data(self, flat: Tensor, sizes: list[int] | None) -> None:
        if sizes is None:
            tail = flat[-self.buffer_size :]
        else:
            tail = self._tail_block(flat, sizes, self.buffer_size)
            dist.all_reduce(tail)
        n, k = tail.shape[0], self.num_codes
        gen = torch.Generator().manual_seed(mix(self.seed, self.step, 0))
        if n >= k:
            pick = torch.randperm(n, generator=gen)[:k]
        else:
            pick = torch.randint(n, (k,), generator=gen)
        self.set_codebook_(tail[pick.to(tail.device)])

    @torch.no_grad()
    def _update(self, flat: Tensor, codes: Tensor, sizes: list[int] | None) -> Tensor:
        """One EMA step, ring-buffer push and (maybe) refresh; returns the (global) counts."""
        k, d, r = self.num_codes, self.dim, self.buffer_size
        dtype = flat.dtype
        counts = _code_counts(codes, k, dtype)  # (K,)
        sums = torch.zeros(k, d, dtype=dtype, device=flat.device).index_add_(0, codes, flat)
        # Ring-buffer rows carry their code as an extra float column (exact below 2**24).
        rows = torch.cat([flat, codes.to(dtype).unsqueeze(1)], dim=1)  # (M, D + 1)
        if sizes is None:
            tail = rows[-r:]
        else:
            # One fused all-reduce: [counts (K) | sums (K*D) | ring tail (n*(D+1))].
            tail = self._tail_block(rows, sizes, r)
            fused = torch.cat([counts, sums.reshape(-1), tail.reshape(-1)])
            dist.all_reduce(fused)
            counts = fused[:k]
            sums = fused[k : k + k * d].reshape(k, d)
            tail = fused[k + k * d :].reshape(-1, d + 1)

        # 1. EMA of counts and sums, then the Laplace-smoothed codebook.
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1.0 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1.0 - self.decay)
        self.codebook.copy_(_smoothed_codebook(self.cluster_size, self.embed_sum, self.eps))

        # 2. Push the step's last rows into the ring buffer (slot = row number mod R).
        seen = self._seen()
        n = tail.shape[0]
        slots = (seen + torch.arange(n, device=flat.device)) % r
        self.recent_z[slots] = tail[:, :d]
        self.recent_codes[slots] = tail[:, d].long()
        self.num_seen.add_(n)
        self._host_seen = seen + n

        # 3. Count the step; refresh dead codes every refresh_every steps.
        step = self.step + 1
        self.num_steps.add_(1)
        self._host_steps = step
        if step % self.refresh_every == 0 and self.dead_code_threshold > 0:
            self._refresh(step)
        return counts

    def _refresh(self, step: int) -> None:
        """Re-initialise dead codes from distinct random ring-buffer rows (same on all ranks)."""
        mean = self.cluster_size.mean()
        dead = torch.nonzero(self.cluster_size < self.dead_code_threshold * mean).squeeze(1)
        valid = min(self._seen(), self.buffer_size)
        count = min(dead.numel(), valid)
        if count == 0:
            return
        gen = torch.Generator().manual_seed(mix(self.seed, step, 1))
        pick = torch.randperm(valid, generator=gen)[:count].to(self.recent_z.device)
        dead = dead[:count]
        new_rows = self.recent_z[pick]
        self.codebook[dead] = new_rows
        self.cluster_size[dead] = mean
        self.embed_sum[dead] = new_rows * mean
        self.num_refreshed.add_(count)

    def extra_repr(self) -> str:
        return (
            f"num_codes={self.num_codes}, dim={self.dim}, decay={self.decay}, "
            f"commitment_weight={self.commitment_weight}, "
            f"dead_code_threshold={self.dead_code_threshold}, refresh_every={self.refresh_every}, "
            f"buffer_size={self.buffer_size}, gather_distributed={self.gather_distributed}, "
            f"init={self.init!r}"
        )
