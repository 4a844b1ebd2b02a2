"""SIGReg: sketched isotropic Gaussian regularisation (LeJEPA, Balestriero & LeCun 2025).

SIGReg pushes the embedding distribution towards an isotropic standard Gaussian by
testing 1-D random projections with the Epps-Pulley characteristic-function statistic.
For a unit direction ``a`` (a column of the ``(D, K)`` direction matrix) and projections
``p_n = x_n . a`` of the ``N`` samples::

    t_j   = linspace(0, t_max, num_knots)                   knots, spacing dt
    phi_j = exp(-t_j^2 / 2)                                 N(0, 1) characteristic function
    w_j   = c_j * phi_j,  c = (dt, 2dt, ..., 2dt, dt)       trapezoid on [0, t_max], doubled
                                                            for the even integrand
    err_j = (mean_n cos(t_j p_n) - phi_j)^2 + (mean_n sin(t_j p_n))^2
    T_a   = N * sum_j w_j err_j

and SIGReg is the mean of ``T_a`` over the ``K`` directions. ``err_0`` is exactly zero
(``cos 0 = 1 = phi_0``), so the ``t_0 = 0`` knot is skipped.

Implementation notes:

* Everything runs in float32 (float64 inputs stay float64) with autocast disabled, so
  bf16/fp16 inputs work with or without autocast.
* ``exp(i t_j p) = exp(i dt p)^j``: one complex exponential per projection and ``J``
  complex multiplications give every knot, and each knot is summed over the batch as soon
  as it is made. A custom backward recomputes the powers and contracts them with the
  incoming gradient, so no ``(N, K, knots)`` tensor is ever stored (about 5x faster than
  autograd through ``cos``/``sin``).
* Distributed: the per-direction cos/sin *sums* and the sample count are all-reduced with
  a gradient-carrying all-reduce, so every rank gets the statistic of the global batch
  with ``N`` the global batch size. Gradients follow the convention of
  :mod:`jepa_blocks.distributed`: each rank receives ``world_size * dL/dx_local``, which
  DDP's averaging turns into the single-process gradient on the concatenated batch.
* NaN or Inf in ``x`` (or ``directions``) raises ``ValueError`` (a value check).
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from jepa_blocks._checks import (
    check_bool,
    check_finite,
    check_float,
    check_int,
    check_same_device,
    check_tensor,
)
from jepa_blocks._precision import compute_dtype, full_precision
from jepa_blocks._seeding import MASK64, splitmix64
from jepa_blocks.distributed import all_reduce_with_grad, is_distributed
from jepa_blocks.losses._aliases import accepts_aliases
from jepa_blocks.losses.output import LossModule, LossOutput

__all__ = ["SIGRegLoss", "lejepa_loss", "sigreg", "sigreg_directions"]

_NORM_EPS = 1e-12
_GOLDEN = 0x9E3779B97F4A7C15
_CACHE_SIZE = 4  # (seed, step, D, K, device, dtype) keys whose directions are kept
_CACHE: OrderedDict[tuple, tuple[Tensor, Tensor]] = OrderedDict()
_LOCK = threading.Lock()


def _mix_seed(seed: int, step: int) -> int:
    """Map ``(seed, step)`` to one 64-bit generator seed (a SplitMix64 step of
    ``seed * golden + step + c``; the constants keep the sequence of earlier releases)."""
    return splitmix64((seed * _GOLDEN + step + 0x632BE59BD9B4E019 - _GOLDEN) & MASK64)


def _raw_directions(dim: int, num_directions: int, seed: int, step: int) -> Tensor:
    """Un-normalised Gaussian directions ``(D, K)`` in float32 on CPU, a function of
    ``(seed, step)`` only: direction ``k`` is row ``k`` of a ``(K, D)`` draw from a CPU
    generator seeded by ``(seed, step)`` (the result is its transpose, a view), so the
    column norms reduce over contiguous memory."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(_mix_seed(seed, step))
    return torch.randn(num_directions, dim, generator=gen, dtype=torch.float32).T


def _inverse_column_norms(a: Tensor) -> Tensor:
    """``1 / max(||a[:, k]||, eps)`` of shape ``(K,)``: zero columns stay zero, never NaN."""
    sq = torch.linalg.vector_norm(a, dim=0).square()
    return sq.clamp_min(_NORM_EPS**2).rsqrt()


def _unit_directions(*key: Any) -> tuple[Tensor, Tensor]:
    """:func:`_cached_unit_directions` of ``key`` outside any ``torch.compile`` graph. The
    wrapper is made at the first call: ``torch.compiler.disable`` imports ``torch._dynamo``
    (about 340 modules), which ``import jepa_blocks`` must not pay for."""
    return _compiler_disabled(_cached_unit_directions)(*key)


@functools.cache
def _compiler_disabled(fn):
    return torch.compiler.disable(fn)


def _cached_unit_directions(
    dim: int,
    num_directions: int,
    seed: int,
    step: int,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """Directions ``(D, K)`` of ``(seed, step)`` on ``device`` in ``dtype`` and their inverse
    column norms ``(K,)``, cached for the last few keys, so several calls in one step
    (views, micro-batches, global and local crops) draw once. The cached tensors are never
    written to; they are made outside inference mode so that autograd may save them."""
    key = (dim, num_directions, seed, step, torch.device(device), dtype)
    with _LOCK:
        hit = _CACHE.get(key)
        if hit is not None:
            _CACHE.move_to_end(key)
            return hit
    with torch.inference_mode(False), torch.no_grad():
        a = _raw_directions(dim, num_directions, seed, step).to(device=device, dtype=dtype)
        value = (a, _inverse_column_norms(a))
    with _LOCK:
        _CACHE[key] = value
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return value


def sigreg_directions(
    dim: int,
    num_directions: int,
    *,
    seed: int = 0,
    step: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Unit projection directions for SIGReg, a function of ``(seed, step)`` only.

    The Gaussian draw always happens in float32 on CPU from a ``torch.Generator`` seeded
    with a hash of ``(seed, step)``, so it is identical on every rank and every device
    (direction ``k`` is row ``k`` of a ``(K, D)`` draw); it is then cast to ``dtype``, moved to
    ``device`` and its columns are divided by their norms (clamped at 1e-12, so ``D = 1``
    or a zero draw never gives NaN). The last few ``(seed, step, D, K, device, dtype)``
    draws are cached, so the calls of one step draw once.

    Args:
        dim: Embedding dimension ``D``.
        num_directions: Number of directions ``K``.
        seed: Non-negative base seed.
        step: Non-negative training step; a new step gives new directions.
        device: Device of the result (default CPU).
        dtype: Floating dtype of the result.

    Returns:
        Directions of shape ``(D, K)`` with unit-norm columns.
    """
    check_int("dim", dim, min_value=1)
    check_int("num_directions", num_directions, min_value=1)
    check_int("seed", seed, min_value=0)
    check_int("step", step, min_value=0)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    device = torch.device("cpu") if device is None else torch.device(device)
    a, inverse_norms = _unit_directions(dim, num_directions, seed, step, device, dtype)
    return (a * inverse_norms).contiguous()


def _quadrature(
    num_knots: int, t_max: float, dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Weights ``w_j`` and ``phi_j`` of the non-zero knots ``t_1..t_J``, each of shape (J,)."""
    if torch.compiler.is_compiling():  # no Python cache inside a traced graph
        return _make_quadrature(num_knots, t_max, dtype, device)
    return _cached_quadrature(num_knots, t_max, dtype, device)


def _make_quadrature(
    num_knots: int, t_max: float, dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, Tensor]:
    num = num_knots - 1
    dt = t_max / num
    with torch.inference_mode(False), torch.no_grad():
        t = torch.arange(1, num + 1, dtype=torch.float64) * dt
        phi = torch.exp(-0.5 * t * t)
        trap = torch.full((num,), 2.0 * dt, dtype=torch.float64)
        trap[-1] = dt  # the t_0 end (weight dt) multiplies err_0 = 0 and is dropped
        return (trap * phi).to(device, dtype), phi.to(device, dtype)


# Made outside inference mode so that autograd may save them; never written to.
_cached_quadrature = functools.lru_cache(maxsize=16)(_make_quadrature)


def _unit_phasor(theta: Tensor) -> Tensor:
    """``exp(i theta) = cos(theta) + i sin(theta)`` (3 vectorised ops; ``torch.polar`` and a
    complex ``exp`` are 2-10x slower on CPU)."""
    return torch.complex(torch.cos(theta), torch.sin(theta))


class _CharacteristicSums(torch.autograd.Function):
    """Batch sums of ``cos(j theta)`` and ``sin(j theta)`` for ``theta = p * coef``, j = 1..J.

    ``coef`` (K,) is ``dt`` times the inverse direction norms, so ``j theta = t_j p / |a|``
    with the normalisation folded into an (N, K) product instead of a (D, K) one.
    """

    @staticmethod
    def forward(ctx, p: Tensor, coef: Tensor, num: int) -> Tensor:  # type: ignore[override]
        # p: (V, N, K). z1 = exp(i theta); z_j = z1^j = cos(j theta) + i sin(j theta).
        z1 = _unit_phasor(p * coef)
        sums = torch.empty((num, p.shape[0], p.shape[2]), dtype=z1.dtype, device=p.device)
        torch.sum(z1, dim=1, out=sums[0])
        zj = z1.clone() if num > 1 else z1
        for j in range(1, num):
            zj.mul_(z1)
            torch.sum(zj, dim=1, out=sums[j])
        ctx.save_for_backward(p, coef)
        ctx.num = num
        # (J, V, K, 2): [..., 0] = sum_n cos(t_j p_n), [..., 1] = sum_n sin(t_j p_n).
        return torch.view_as_real(sums).clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor | None, None]:  # type: ignore[override]
        p, coef = ctx.saved_tensors
        num = ctx.num
        # d/dtheta sum cos(j theta) = -j sin(j theta), d/dtheta sum sin(j theta) = j cos(j
        # theta), so dL/dp = coef * sum_j Im(z1^j h_j), h_j = j (-g_cos_j + i g_sin_j),
        # evaluated by Horner's rule: z1 (h_1 + z1 (h_2 + ... + z1 h_J)), coef folded into h.
        j = torch.arange(1, num + 1, dtype=p.dtype, device=p.device)
        h = torch.complex(-grad[..., 0], grad[..., 1]) * (j[:, None, None] * coef)  # (J, V, K)
        h = h.unsqueeze(2)  # (J, V, 1, K)
        z1 = _unit_phasor(p * coef)
        acc = z1 * h[num - 1]
        for i in range(num - 2, -1, -1):
            acc.add_(h[i]).mul_(z1)
        grad_p = acc.imag.contiguous()
        grad_coef = None
        if ctx.needs_input_grad[1]:  # directions passed with requires_grad (coef > 0)
            grad_coef = (grad_p * p).sum((0, 1)) / coef
        return grad_p, grad_coef, None


def _chunk_sums(x: Tensor, a: Tensor, scale: Tensor | None, dt: float, num: int) -> Tensor:
    p = torch.matmul(x, a)  # (V, N, K)
    coef = p.new_full((a.shape[1],), dt) if scale is None else scale * dt
    return _CharacteristicSums.apply(p, coef, num)


def _sigreg_value(
    x: Tensor,
    a: Tensor,
    scale: Tensor | None,
    *,
    num_knots: int,
    t_max: float,
    chunk: int | None,
    distributed: bool,
) -> Tensor:
    """SIGReg of ``x`` (V, N, D) along the columns of ``a`` (D, K) times ``scale`` (K,)."""
    num = num_knots - 1
    dt = t_max / num
    k = a.shape[1]
    if chunk is None or chunk >= k:
        sums = _chunk_sums(x, a, scale, dt, num)
    else:
        # Checkpointing each chunk saves nothing but its inputs (x and a view of a) for
        # backward; the chunk's (V, N, chunk) projections are recomputed there.
        use_ckpt = torch.is_grad_enabled() and (x.requires_grad or a.requires_grad)
        parts = []
        for start in range(0, k, chunk):
            a_c = a[:, start : start + chunk]
            s_c = None if scale is None else scale[start : start + chunk]
            if use_ckpt:
                parts.append(checkpoint(_chunk_sums, x, a_c, s_c, dt, num, use_reentrant=False))
            else:
                parts.append(_chunk_sums(x, a_c, s_c, dt, num))
        sums = torch.cat(parts, dim=2)
    n_local = x.shape[1]
    if distributed and is_distributed():
        # One collective for the sums and the sample count (exact in float32 below 2^24).
        packed = torch.cat([sums.reshape(-1), sums.new_full((1,), float(n_local))])
        packed = all_reduce_with_grad(packed)
        sums = packed[:-1].view_as(sums)
        n = packed[-1]
    else:
        n = sums.new_full((), float(n_local))
    w, phi = _quadrature(num_knots, t_max, sums.dtype, sums.device)
    cos_sum, sin_sum = sums.unbind(-1)  # (J, V, K) each
    # N * err_j = ((sum cos - N phi_j)^2 + (sum sin)^2) / N
    dev = (cos_sum - n * phi[:, None, None]).square() + sin_sum.square()
    stat = torch.einsum("j,jvk->vk", w, dev) / n  # (V, K)
    return stat.mean()


def _check_sigreg_args(num_knots: int, t_max: float, chunk: int | None) -> None:
    check_int("num_knots", num_knots, min_value=2)
    check_float("t_max", t_max, min_value=0.0, min_inclusive=False)
    if chunk is not None:
        check_int("chunk", chunk, min_value=1)


def _as_views(x: Tensor) -> Tensor:
    check_tensor("x", x, ndim=(2, 3), kind="float")
    return x if x.ndim == 3 else x.unsqueeze(0)


def sigreg(
    x: Tensor,
    *,
    num_directions: int = 1024,
    num_knots: int = 17,
    t_max: float = 3.0,
    generator: torch.Generator | None = None,
    directions: Tensor | None = None,
    chunk: int | None = None,
    distributed: bool = False,
) -> Tensor:
    """SIGReg statistic of embeddings, averaged over random directions (and views).

    Args:
        x: Embeddings of shape ``(N, D)``, or ``(V, N, D)`` for ``V`` views (the result is
            then the mean of the ``V`` per-view values).
        num_directions: Number ``K`` of random directions (ignored with ``directions``).
        num_knots: Quadrature knots on ``[0, t_max]``, including ``t = 0``; at least 2.
        t_max: Upper end of the frequency range, > 0.
        generator: Generator for the ``randn(D, K)`` draw (on its own device). Without it
            and without ``directions`` the global CPU generator is used.
        directions: Explicit directions of shape ``(D, K)``; columns are normalised to
            unit length (clamped at 1e-12, never NaN). Exclusive with ``generator``. On
            the device of ``x`` (``ValueError`` otherwise).
        chunk: Process the directions ``chunk`` at a time (with activation checkpointing
            when a gradient is needed) to bound memory; the value does not change.
        distributed: All-reduce the statistics over the default process group so that
            every rank returns the value of the global batch (no-op without a group).
            Every rank must use the same directions: pass ``directions`` or a
            ``generator`` seeded identically on every rank.

    Returns:
        Scalar tensor, float32 (float64 for float64 ``x``), >= 0.
    """
    xv = _as_views(x)
    _check_sigreg_args(num_knots, t_max, chunk)
    check_bool("distributed", distributed)
    if directions is not None and generator is not None:
        raise ValueError("pass either generator or directions, not both")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if distributed and directions is None and generator is None:
        raise ValueError(
            "distributed=True needs identical directions on every rank: pass directions, "
            "or a generator seeded identically on every rank"
        )
    dim = xv.shape[-1]
    dtype = compute_dtype(x)
    with full_precision(x.device):
        if directions is not None:
            check_tensor("directions", directions, ndim=2, kind="float")
            check_same_device(("x", x), ("directions", directions))
            if directions.shape[0] != dim:
                raise ValueError(
                    f"directions must have shape (D={dim}, K), got {tuple(directions.shape)}"
                )
            check_finite(("x", x), ("directions", directions))
            a = directions.to(device=x.device, dtype=dtype)
        else:
            check_finite(("x", x))
            check_int("num_directions", num_directions, min_value=1)
            gen_device = generator.device if generator is not None else torch.device("cpu")
            a = torch.randn(
                dim, num_directions, generator=generator, device=gen_device, dtype=torch.float32
            ).to(device=x.device, dtype=dtype)
        return _sigreg_value(
            xv.to(dtype),
            a,
            _inverse_column_norms(a),
            num_knots=num_knots,
            t_max=t_max,
            chunk=chunk,
            distributed=distributed,
        )


def lejepa_loss(prediction_loss: Tensor, sigreg_value: Tensor, *, lam: float = 0.05) -> Tensor:
    """LeJEPA objective ``(1 - lam) * prediction_loss + lam * sigreg_value``.

    Args:
        prediction_loss: Scalar prediction (invariance) loss.
        sigreg_value: Scalar SIGReg value (e.g. the mean over views).
        lam: Trade-off in ``[0, 1]``; LeJEPA uses 0.05 (0.02 in its minimal code).

    Returns:
        Scalar tensor, float32 (float64 if either input is float64; bf16/fp16 inputs are
        upcast first).
    """
    check_tensor("prediction_loss", prediction_loss, ndim=0, kind="float")
    check_tensor("sigreg_value", sigreg_value, ndim=0, kind="float")
    lam = check_float("lam", lam, min_value=0.0, max_value=1.0)
    check_finite(("prediction_loss", prediction_loss), ("sigreg_value", sigreg_value))
    dtype = compute_dtype(prediction_loss, sigreg_value)
    return (1.0 - lam) * prediction_loss.to(dtype) + lam * sigreg_value.to(dtype)


class SIGRegLoss(LossModule):
    """SIGReg regulariser with fresh, rank-consistent directions at every training step.

    The directions depend only on ``(seed, step)`` (see :func:`sigreg_directions`), so
    all ranks draw the same ones without communication. ``step`` is a persistent buffer
    (saved in ``state_dict``, so a resumed run continues the direction sequence). Reading
    it costs one host sync per forward on GPU.

    Who advances ``step``:

    * ``auto_step=True`` (default): every forward in training mode uses ``step`` and then
      adds one; eval mode leaves it fixed. Right for one call per optimizer step; with
      gradient accumulation or several calls per optimizer step each call counts as a
      step (the calls of one step then see different directions).
    * ``auto_step=False``: forward never changes ``step``; call :meth:`advance` once after
      each ``optimizer.step()`` (or :meth:`set_step` with the optimizer step), so every
      call of one optimizer step (micro-batches, views, ranks) uses the same directions,
      as in LeJEPA's ``SIGReg(emb, global_step)``.

    Argument names of lightly's ``SIGReg`` are accepted as aliases: ``num_vectors`` for
    ``num_directions`` and ``knots`` for ``num_knots`` (same meaning and defaults, 1024
    and 17); passing both names raises ``TypeError``. Unlike lightly, which draws from the
    global RNG and broadcasts from rank 0, the directions here are a function of
    ``(seed, step)``.

    Args:
        num_directions: Number ``K`` of random directions per step.
        num_knots: Quadrature knots on ``[0, t_max]``, including ``t = 0``.
        t_max: Upper end of the frequency range.
        seed: Base seed of the direction sequence.
        chunk: Directions processed at a time (checkpointed), ``None`` for all at once.
        gather_distributed: Compute the statistic of the global batch across the default
            process group (see :func:`sigreg`, ``distributed``).
        auto_step: Advance ``step`` after each training-mode forward (see above).

    Example:
        >>> loss_fn = SIGRegLoss(num_directions=64)
        >>> z = torch.randn(32, 16, requires_grad=True)
        >>> loss = loss_fn(z)
        >>> loss.backward()
        >>> int(loss_fn.step), loss.shape, sorted(loss_fn.last_terms)
        (1, torch.Size([]), ['sigreg'])
        >>> manual = SIGRegLoss(num_directions=64, auto_step=False)
        >>> a, b = manual(z), manual(z)         # two calls in one optimizer step
        >>> manual.advance()                    # after optimizer.step()
        >>> bool(a == b), int(manual.step)
        (True, 1)
    """

    step: Tensor

    @accepts_aliases(num_vectors="num_directions", knots="num_knots")
    def __init__(
        self,
        *,
        num_directions: int = 1024,
        num_knots: int = 17,
        t_max: float = 3.0,
        seed: int = 0,
        chunk: int | None = None,
        gather_distributed: bool = False,
        auto_step: bool = True,
    ) -> None:
        super().__init__()
        self.num_directions = check_int("num_directions", num_directions, min_value=1)
        _check_sigreg_args(num_knots, t_max, chunk)
        self.num_knots = num_knots
        self.t_max = float(t_max)
        self.seed = check_int("seed", seed, min_value=0)
        self.chunk = chunk
        self.gather_distributed = check_bool("gather_distributed", gather_distributed)
        self.auto_step = check_bool("auto_step", auto_step)
        self.register_buffer("step", torch.zeros((), dtype=torch.long), persistent=True)

    def set_step(self, step: int) -> None:
        """Set the step whose directions the next forward uses (e.g. the optimizer step).

        Args:
            step: Non-negative step; pass the same value on every rank.
        """
        check_int("step", step, min_value=0)
        with torch.no_grad():
            self.step.fill_(step)

    def advance(self, num_steps: int = 1) -> None:
        """Move to the directions of the next step (call once per ``optimizer.step()``).

        Args:
            num_steps: Steps to advance, >= 0.
        """
        check_int("num_steps", num_steps, min_value=0)
        with torch.no_grad():
            self.step.add_(num_steps)

    def directions(
        self,
        dim: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """Unit directions ``(D, K)`` for the current ``step``."""
        return sigreg_directions(
            dim,
            self.num_directions,
            seed=self.seed,
            step=int(self.step),
            device=device,
            dtype=dtype,
        )

    def forward(self, x: Tensor, *, return_terms: bool = False) -> Tensor | LossOutput:
        """SIGReg of ``x``.

        Args:
            x: Embeddings of shape ``(N, D)``, or ``(V, N, D)`` for ``V`` views or groups:
                the statistic is computed over the ``N`` rows of each group and averaged
                over the groups, as lightly's ``SIGReg`` does with ``(..., N, C)``. For
                ``(B, T, D)`` tokens this means one test per sample over its ``T`` tokens;
                flatten to ``(B * T, D)`` to test all tokens together.
            return_terms: Return ``LossOutput(total, {"sigreg": total})`` instead of the
                Tensor.

        Returns:
            Scalar tensor (float32, or float64 for float64 input); the ``"sigreg"`` term is
            also stored detached in :attr:`last_terms`.
        """
        xv = _as_views(x)
        check_same_device(("x", x), module=self)
        check_finite(("x", x))
        dtype = compute_dtype(x)
        a, inverse_norms = _unit_directions(
            xv.shape[-1], self.num_directions, self.seed, int(self.step), x.device, dtype
        )
        with full_precision(x.device):
            value = _sigreg_value(
                xv.to(dtype),
                a,
                inverse_norms,
                num_knots=self.num_knots,
                t_max=self.t_max,
                chunk=self.chunk,
                distributed=self.gather_distributed,
            )
        if self.training and self.auto_step:
            with torch.no_grad():
                self.step.add_(1)
        return self._output(LossOutput(value, {"sigreg": value}), return_terms)

    def extra_repr(self) -> str:
        return (
            f"num_directions={self.num_directions}, num_knots={self.num_knots}, "
            f"t_max={self.t_max}, seed={self.seed}, chunk={self.chunk}, "
            f"gather_distributed={self.gather_distributed}, auto_step={self.auto_step}"
        )
