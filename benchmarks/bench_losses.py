"""Section 2, ``losses``: SIGReg and VICReg forward + backward against the reference costs."""

from __future__ import annotations

from collections.abc import Callable

import torch
from baselines import sigreg_baseline, vicreg_baseline
from references import (
    REF_SIGREG_LIGHTLY_MS,
    REF_SIGREG_MS,
    REF_VICREG_LIGHTLY_MS,
    REF_VICREG_MS,
)
from sizes import Results, Sizes
from timing import median_ms, num_threads, peak_memory_mb, time_calls

from jepa_blocks import SIGRegLoss, VICRegLoss, sigreg


def _fwd_bwd(loss_fn: Callable[[], torch.Tensor], leaves: list[torch.Tensor]) -> Callable[[], None]:
    def call() -> None:
        for t in leaves:
            t.grad = None
        loss_fn().backward()

    return call


def _relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def bench_losses(sizes: Sizes, device: torch.device, *, threads: int) -> Results:
    """Forward + backward time and peak memory of SIGReg and VICReg, N = ``loss_n``.

    Per ``K`` and ``D``: ``losses.sigreg.k{K}.d{D}.{ms,peak_mb}`` (ours),
    ``...baseline_ms``, ``...baseline_peak_mb`` (LeJEPA-structured re-implementation,
    same run), ``...ratio_same_run`` (ours / baseline), ``...ref_ms`` and ``...ratio``
    (ours / stored LeJEPA figure, when one exists) and ``...lightly_ref_ms``,
    ``...ratio_lightly``. VICReg likewise under ``losses.vicreg.d{D}``. Chunked SIGReg at
    the largest ``K`` for each ``(N, D)`` of ``sigreg_chunk_cases``:
    ``losses.sigreg.k{K}.d{D}.n{N}.chunk{C}.{ms,peak_mb,value}``, the same with an
    ``unchunked_`` prefix, ``peak_ratio`` (chunked / unchunked) and ``rel_diff`` (relative
    difference of the values, same directions). Summaries: ``losses.sigreg.ratio`` and ``losses.vicreg.ratio`` (worst
    stored-reference ratio), ``...ratio_same_run`` (worst same-run ratio), and
    ``losses.sigreg.baseline_rel_diff`` / ``losses.vicreg.baseline_rel_diff`` (value of
    ours against the baseline on the same input and directions: both compute the same
    statistic).
    """
    out: Results = {}
    n = sizes.loss_n
    g = torch.Generator(device="cpu").manual_seed(0)
    with num_threads(threads):
        for d in sizes.loss_dims:
            x = torch.randn(n, d, generator=g).to(device).requires_grad_()
            y = (x.detach() + 0.5 * torch.randn(n, d, generator=g).to(device)).requires_grad_()
            for k in sizes.sigreg_ks:
                out.update(_bench_sigreg(x, k, sizes, device))
            out.update(_bench_vicreg(x, y, sizes, device))

        # Value checks: ours and the baseline compute the same statistic.
        d = max(sizes.loss_dims)
        k = max(sizes.sigreg_ks)
        x = torch.randn(n, d, generator=g, dtype=torch.float64).to(device)
        y = x + 0.5 * torch.randn(n, d, generator=g, dtype=torch.float64).to(device)
        a = torch.randn(d, k, generator=g, dtype=torch.float64).to(device)
        out["losses.sigreg.baseline_rel_diff"] = _relative(
            float(sigreg(x, directions=a)), float(sigreg_baseline(x, directions=a))
        )
        out["losses.vicreg.baseline_rel_diff"] = _relative(
            float(VICRegLoss()(x, y)), float(vicreg_baseline(x, y))
        )
        for n_c, d_c in sizes.sigreg_chunk_cases:
            out.update(_bench_sigreg_chunk(sizes, device, n_c, d_c, k, g))

    for name in ("sigreg", "vicreg"):
        for kind in ("ratio", "ratio_same_run"):
            found = [
                v
                for key, v in out.items()
                if key.startswith(f"losses.{name}.")
                and key.endswith(f".{kind}")
                and ".chunk" not in key
            ]
            if found:
                out[f"losses.{name}.{kind}"] = max(found)
    return out


def _bench_sigreg(x: torch.Tensor, k: int, sizes: Sizes, device: torch.device) -> Results:
    d = x.shape[1]
    key = f"losses.sigreg.k{k}.d{d}"
    ours = SIGRegLoss(num_directions=k).to(device)  # train mode: new directions every call
    gen = torch.Generator(device=device).manual_seed(1)
    cases = {
        "": _fwd_bwd(lambda: ours(x), [x]),
        "baseline_": _fwd_bwd(lambda: sigreg_baseline(x, num_directions=k, generator=gen), [x]),
    }
    out = _time_cases(key, cases, sizes, device)
    _add_ratios(out, key, REF_SIGREG_MS.get(k, {}).get(d), "ref", "ratio")
    _add_ratios(out, key, REF_SIGREG_LIGHTLY_MS.get(k, {}).get(d), "lightly_ref", "ratio_lightly")
    return out


def _bench_vicreg(x: torch.Tensor, y: torch.Tensor, sizes: Sizes, device: torch.device) -> Results:
    d = x.shape[1]
    key = f"losses.vicreg.d{d}"
    ours = VICRegLoss().to(device)
    cases = {
        "": _fwd_bwd(lambda: ours(x, y), [x, y]),
        "baseline_": _fwd_bwd(lambda: vicreg_baseline(x, y), [x, y]),
    }
    out = _time_cases(key, cases, sizes, device)
    _add_ratios(out, key, REF_VICREG_MS.get(d), "ref", "ratio")
    _add_ratios(out, key, REF_VICREG_LIGHTLY_MS.get(d), "lightly_ref", "ratio_lightly")
    return out


def _time_cases(
    key: str, cases: dict[str, Callable[[], None]], sizes: Sizes, device: torch.device
) -> Results:
    out: Results = {}
    for prefix, call in cases.items():
        times = time_calls(call, warmup=sizes.loss_warmup, reps=sizes.loss_reps, device=device)
        out[f"{key}.{prefix}ms"] = median_ms(times)
        out[f"{key}.{prefix}peak_mb"] = peak_memory_mb(call, device)
    out[f"{key}.ratio_same_run"] = out[f"{key}.ms"] / out[f"{key}.baseline_ms"]
    return out


def _add_ratios(out: Results, key: str, ref: float | None, ref_name: str, ratio_name: str) -> None:
    if ref is not None:
        out[f"{key}.{ref_name}_ms"] = ref
        out[f"{key}.{ratio_name}"] = out[f"{key}.ms"] / ref


def _bench_sigreg_chunk(
    sizes: Sizes, device: torch.device, n: int, d: int, k: int, g: torch.Generator
) -> Results:
    """Chunked SIGReg against unchunked with the same directions (eval mode: step fixed)."""
    c = sizes.sigreg_chunk
    key = f"losses.sigreg.k{k}.d{d}.n{n}.chunk{c}"
    x = torch.randn(n, d, generator=g).to(device).requires_grad_()
    out: Results = {}
    for prefix, chunk in (("", c), ("unchunked_", None)):
        loss_fn = SIGRegLoss(num_directions=k, chunk=chunk).to(device).eval()
        call = _fwd_bwd(lambda loss_fn=loss_fn: loss_fn(x), [x])
        times = time_calls(call, warmup=sizes.loss_warmup, reps=sizes.loss_reps, device=device)
        out[f"{key}.{prefix}ms"] = median_ms(times)
        out[f"{key}.{prefix}peak_mb"] = peak_memory_mb(call, device)
        with torch.no_grad():
            out[f"{key}.{prefix}value"] = float(loss_fn(x))
    if out[f"{key}.peak_mb"] is not None and out[f"{key}.unchunked_peak_mb"]:
        out[f"{key}.peak_ratio"] = out[f"{key}.peak_mb"] / out[f"{key}.unchunked_peak_mb"]
    out[f"{key}.rel_diff"] = _relative(out[f"{key}.value"], out[f"{key}.unchunked_value"])
    return out
