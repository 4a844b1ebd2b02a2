"""The printed report of a benchmark run: one table per section and device."""

from __future__ import annotations

import math
from collections.abc import Callable

from bench_train_step import PHASES, format_predictor_modes
from references import REF_IJEPA_MASKS_PER_S, TARGETS
from sizes import Results, Sizes

__all__ = ["format_report"]


def _fmt(v: object, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{digits}g}"
    return str(v)


def format_report(results: Results, sizes: Sizes, threads: int) -> str:
    """Human-readable tables of the results (both devices if present)."""
    formatters = {
        "import": _format_import,
        "masker": _format_masker,
        "losses": _format_losses,
        "encoder": _format_encoder,
        "train_step": _format_step,
    }
    lines: list[str] = []
    for prefix in ("", "cuda."):
        keys = [
            k for k in results if k.startswith(prefix) and (prefix or not k.startswith("cuda."))
        ]
        if not keys:
            continue
        r = {k[len(prefix) :]: results[k] for k in keys}
        dev = "CUDA" if prefix else f"CPU, {threads} threads"
        lines.append(f"#### {dev} ({sizes.name} sizes)")
        for name, fmt in formatters.items():
            if f"{name}.error" in r:
                lines.append(f"\n== {name}: FAILED: {r[f'{name}.error']}")
            elif any(k.startswith(name + ".") for k in r):
                lines += fmt(r, sizes)
        lines.append("")
    return "\n".join(lines)


def _format_import(r: Results, sizes: Sizes) -> list[str]:
    return [
        f"\n== import: median of {r.get('import.reps')} fresh processes (start-up included) ==",
        f"  import jepa_blocks {_fmt(r.get('import.jepa_blocks_s'))} s, import torch "
        f"{_fmt(r.get('import.torch_s'))} s (ratio {_fmt(r.get('import.ratio'), 3)}), "
        f"bare interpreter {_fmt(r.get('import.python_s'))} s",
    ]


def _format_masker(r: Results, sizes: Sizes) -> list[str]:
    lines = [f"\n== masker: batch {sizes.masker_batch}, one thread, I-JEPA defaults =="]
    for g in (*(f"grid{g}" for g in sizes.masker_grids), "grid8_levels3"):
        if f"masker.{g}.images_per_s" in r:
            lines.append(
                f"  {g:<14} {_fmt(r[f'masker.{g}.images_per_s']):>10} masks/s  "
                f"({_fmt(r[f'masker.{g}.ms_per_batch'])} ms/batch)"
            )
    if "masker.grid14.speedup_vs_ijepa" in r:
        lines.append(
            f"  grid14 vs I-JEPA collator ({REF_IJEPA_MASKS_PER_S:,.0f}/s): "
            f"x{_fmt(r['masker.grid14.speedup_vs_ijepa'])}   target "
            f"{TARGETS['masker.grid14.images_per_s']}/s"
        )
    if "masker.collate.images_per_s" in r:
        lines.append(
            f"  DataLoader + MaskCollator, {r['masker.collate.workers']} workers, grid "
            f"{r['masker.collate.grid']}: {_fmt(r['masker.collate.images_per_s'])} images/s"
        )
    return lines


def _format_encoder(r: Results, sizes: Sizes) -> list[str]:
    lines = [f"\n== encoder: fwd+bwd, batch {sizes.batch}, bf16 autocast =="]
    for frac in sizes.encoder_keeps:
        p = round(100 * frac)
        if f"encoder.keep{p}.ms" in r:
            lines.append(
                f"  keep {p:>3}% ({r[f'encoder.keep{p}.tokens']:>4} tokens): "
                f"{_fmt(r[f'encoder.keep{p}.ms']):>8} ms   "
                f"ratio {_fmt(r.get(f'encoder.keep{p}.ratio'))}"
            )
    lines.append(f"  target: keep25 ratio {TARGETS['encoder.keep25.ratio']}")
    return lines


def _format_losses(r: Results, sizes: Sizes) -> list[str]:
    dims = sizes.loss_dims
    head = f"  {'':<34}" + "".join(f"{'D=' + str(d):>9}" for d in dims)
    lines = [f"\n== losses: fwd+bwd, N={sizes.loss_n}, median ms (peak MiB) ==", head]

    def row(label: str, fmt: Callable[[int], str]) -> None:
        lines.append(f"  {label:<34}" + "".join(f"{fmt(d):>9}" for d in dims))

    for k in sizes.sigreg_ks:
        base = f"losses.sigreg.k{k}.d"
        row(f"SIGReg K={k} ours ms", lambda d, b=base: _fmt(r.get(f"{b}{d}.ms")))
        row("  baseline (same run) ms", lambda d, b=base: _fmt(r.get(f"{b}{d}.baseline_ms")))
        row("  ours / baseline", lambda d, b=base: _fmt(r.get(f"{b}{d}.ratio_same_run"), 2))
        row("  LeJEPA stored ms", lambda d, b=base: _fmt(r.get(f"{b}{d}.ref_ms")))
        row("  ours / LeJEPA stored", lambda d, b=base: _fmt(r.get(f"{b}{d}.ratio"), 2))
        row("  ours / lightly stored", lambda d, b=base: _fmt(r.get(f"{b}{d}.ratio_lightly"), 2))
        row("  peak MiB ours", lambda d, b=base: _fmt(r.get(f"{b}{d}.peak_mb")))
        row("  peak MiB baseline", lambda d, b=base: _fmt(r.get(f"{b}{d}.baseline_peak_mb")))
    base = "losses.vicreg.d"
    row("VICReg 2 views ours ms", lambda d: _fmt(r.get(f"{base}{d}.ms")))
    row("  baseline (same run) ms", lambda d: _fmt(r.get(f"{base}{d}.baseline_ms")))
    row("  ours / baseline", lambda d: _fmt(r.get(f"{base}{d}.ratio_same_run"), 2))
    row("  official stored ms", lambda d: _fmt(r.get(f"{base}{d}.ref_ms")))
    row("  ours / official stored", lambda d: _fmt(r.get(f"{base}{d}.ratio"), 2))
    row("  ours / lightly stored", lambda d: _fmt(r.get(f"{base}{d}.ratio_lightly"), 2))
    row("  peak MiB ours", lambda d: _fmt(r.get(f"{base}{d}.peak_mb")))
    row("  peak MiB baseline", lambda d: _fmt(r.get(f"{base}{d}.baseline_peak_mb")))
    for key in r:
        if ".chunk" in key and key.endswith(".ms"):
            stem = key[: -len(".ms")]
            lines.append(
                f"  {stem[len('losses.') :]}: {_fmt(r[key])} ms (unchunked "
                f"{_fmt(r.get(stem + '.unchunked_ms'))}), peak {_fmt(r.get(stem + '.peak_mb'))} "
                f"MiB (unchunked {_fmt(r.get(stem + '.unchunked_peak_mb'))}), value rel. diff "
                f"{_fmt(r.get(stem + '.rel_diff'), 2)}"
            )
    lines.append(
        f"  worst ratio SIGReg vs stored {_fmt(r.get('losses.sigreg.ratio'), 2)} "
        f"(target {TARGETS['losses.sigreg.ratio']}), same run "
        f"{_fmt(r.get('losses.sigreg.ratio_same_run'), 2)}; VICReg vs stored "
        f"{_fmt(r.get('losses.vicreg.ratio'), 2)} (target {TARGETS['losses.vicreg.ratio']}), "
        f"same run {_fmt(r.get('losses.vicreg.ratio_same_run'), 2)}"
    )
    lines.append(
        f"  value check vs baseline (float64): SIGReg rel. diff "
        f"{_fmt(r.get('losses.sigreg.baseline_rel_diff'), 2)}, VICReg "
        f"{_fmt(r.get('losses.vicreg.baseline_rel_diff'), 2)}"
    )
    return lines


def _format_step(r: Results, sizes: Sizes) -> list[str]:
    lines = [
        f"\n== train_step: H-JEPA, batch {sizes.batch}, {sizes.levels} levels, bf16 autocast ==",
        f"  {_fmt(r['train_step.images_per_s'])} images/s ({_fmt(r['train_step.ms'])} ms/step)",
        "  phases (ms): "
        + ", ".join(f"{p} {_fmt(r.get(f'train_step.phase.{p}.ms'))}" for p in PHASES),
        f"  {_fmt(r['train_step.gflop_per_step'])} GFLOP/step -> "
        f"{_fmt(r['train_step.achieved_gflops'])} GFLOP/s; matmul {r['train_step.matmul_n']}^3: "
        f"fp32 {_fmt(r['train_step.matmul_fp32_gflops'])}, bf16 "
        f"{_fmt(r['train_step.matmul_bf16_gflops'])} GFLOP/s",
        f"  MFU {_fmt(r['train_step.mfu'], 2)} against the {r.get('train_step.mfu_reference')} "
        f"(the step runs in bf16 autocast)"
        + (
            f"; {_fmt(r['train_step.mfu_peak'], 2)} against the data-sheet bf16 peak "
            f"{_fmt(r['train_step.peak_bf16_tflops'])} TFLOP/s"
            if r.get("train_step.mfu_peak") is not None
            else ""
        )
        + f"; bf16 work / fp32 matmul rate {_fmt(r['train_step.mfu_fp32'], 2)} (not a utilisation)",
        f"  peak {_fmt(r['train_step.peak_mb'])} MiB above the "
        f"{_fmt(r['train_step.static_mb'])} MiB of weights, grads, AdamW state and EMA copy",
    ]
    if "train_step.compile_speedup" in r:
        if r.get("train_step.compile_error"):
            lines.append(f"  torch.compile: skipped ({r['train_step.compile_error']})")
        else:
            lines.append(
                f"  torch.compile: {_fmt(r['train_step.compile_images_per_s'])} images/s, "
                f"speed-up x{_fmt(r['train_step.compile_speedup'], 3)} (warm-up incl. "
                f"compilation {_fmt(r['train_step.compile_warmup_s'])} s)"
            )
    if "train_step.modes.speedup.step" in r:
        lines += format_predictor_modes(r, sizes)
    return lines
