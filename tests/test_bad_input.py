"""Bad input is rejected quickly with a TypeError/ValueError that names the argument.

Every public constructor and call of ``jepa_blocks`` (masking, encoders, predictors,
targets, losses, positional, necks, evaluation, training, grid, distributed) is fed values
drawn by hypothesis from the bad categories that fit the argument: wrong type (strings for
numbers, bools for ints, ints for bools, ``None``), out of range (zero, negative, scales
outside (0, 1], inverted ranges, non-finite floats), wrong tensor rank, mismatched sizes,
empty batches, integer dtypes where floats are required, NaN/Inf tensors, ids outside the
grid, grids too small or too large for the request. Each call must raise the expected
exception type, whose message contains the argument's name, within a second; it runs in
a daemon thread so that a hang fails the test instead of the run.

Batches of one and half-precision inputs must *work* (``test_batch_of_one_and_half_work``).
"""

from __future__ import annotations

import functools
import math
import re
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import timm
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from jepa_blocks import value_checks
from jepa_blocks.distributed import all_reduce_with_grad, gather_with_grad
from jepa_blocks.encoders import EncoderTokens, TimmTokenEncoder, ViTEncoder, export_encoder
from jepa_blocks.evaluation import (
    anisotropy,
    attention_maps,
    attention_probs,
    codebook_usage,
    collapse_stats,
    effective_rank,
    embedding_diagnostics,
    extract_features,
    feature_std,
    few_shot_accuracy,
    finetune,
    finetune_param_groups,
    is_collapsed,
    isotropy,
    knn_accuracy,
    knn_classify,
    linear_probe,
    pool_tokens,
    query_attention,
    rank_ratio,
    received_attention,
    sample_episodes,
    uniformity,
)
from jepa_blocks.grid import level_footprint, level_grid_size, pool_grid_tokens, token_positions
from jepa_blocks.layers import (
    Attention,
    DropPath,
    LayerScale,
    Mlp,
    PatchEmbed,
    TransformerBlock,
    attention_mask_from_valid,
    dot_product_attention,
    drop_path,
    init_transformer_weights,
    rescale_residual_branches,
    sample_seeded_drop_path,
    transformer_stack,
)
from jepa_blocks.losses import (
    InfoNCELoss,
    LatentPredictionLoss,
    LeJEPALoss,
    NTXentLoss,
    SIGRegLoss,
    VICRegLoss,
    covariance_loss,
    info_nce_loss,
    invariance_loss,
    latent_prediction_loss,
    lejepa_loss,
    lejepa_view_loss,
    ntxent_loss,
    sigreg,
    sigreg_directions,
    variance_loss,
    vicreg_loss,
)
from jepa_blocks.masking import (
    MaskCollator,
    MaskIndices,
    MultiBlockMasker,
    MultiCropCollator,
    MultiCropMasker,
    TargetSpec,
    block_shape,
    crop_and_resize,
    gather_tokens,
    mask_to_indices,
    sample_crop_boxes,
    sample_multiblock_masks,
)
from jepa_blocks.necks import (
    FPNNeck,
    GlobalBatchNorm1d,
    MLPProjector,
    global_batch_norm,
    tokens_to_map,
)
from jepa_blocks.pooling import AttentionPool, attention_pool
from jepa_blocks.positional import RoPE2D, apply_rotary, rope_2d_angles, sincos_2d, sincos_2d_table
from jepa_blocks.predictors import HierarchicalPredictor
from jepa_blocks.quantizers import (
    VectorQuantizer,
    code_perplexity,
    codebook_from_ema,
    nearest_codes,
    squared_distances,
)
from jepa_blocks.targets import EMATarget, ema_update_, hierarchical_targets, momentum_schedule
from jepa_blocks.training import (
    BestCheckpoints,
    NonFiniteGuard,
    OptimizerScheduler,
    ResumableSampler,
    SeededDataset,
    cosine_ramp,
    is_no_decay,
    load_checkpoint,
    load_latest_good,
    param_groups_for_weight_decay,
    sample_seed,
    save_checkpoint,
    set_rng_state,
    warmup_cosine,
)

NAN, INF = float("nan"), float("inf")
_TMP = tempfile.TemporaryDirectory(prefix="jb-bad-input-")  # removed at interpreter exit
_TMP_DIR = _TMP.name
_TMP_FILE = f"{_TMP.name}/never-written.pt"
LIMIT_S = 1.0  # every rejection must come back within this
HANG_S = 20.0  # a call still running after this is reported as a hang

FAST = settings(
    max_examples=10,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def expect_error(exc: type[Exception], name: str, fn: Callable[[], Any]) -> None:
    """``fn()`` raises ``exc`` naming ``name`` within ``LIMIT_S`` (run in a thread: hangs fail).

    The limit applies to the CPU time of the calling thread (``time.thread_time``), so a
    busy machine does not make a fast rejection look slow; a call blocked without using
    the CPU is caught by the wall-clock ``HANG_S``.
    """
    outcome: dict[str, Any] = {}

    def target() -> None:
        start = time.thread_time()
        try:
            fn()
        except BaseException as err:  # noqa: BLE001 - reported below
            outcome["error"] = err
        outcome["cpu_s"] = time.thread_time() - start

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(HANG_S)
    if worker.is_alive():
        pytest.fail(f"the call hung: still running after {HANG_S} s (expected {exc.__name__} naming {name!r})")
    err = outcome.get("error")
    if err is None:
        pytest.fail(f"no error raised (expected {exc.__name__} naming {name!r})")
    if not isinstance(err, exc):
        raise AssertionError(f"expected {exc.__name__} naming {name!r}, got {type(err).__name__}: {err}") from err
    assert re.search(re.escape(name), str(err)), f"message does not name {name!r}: {err}"
    elapsed = outcome["cpu_s"]
    assert elapsed < LIMIT_S, f"took {elapsed:.2f} s of CPU to reject (limit {LIMIT_S} s): {err}"


# ----------------------------------------------------------------------------- strategies
# Each strategy draws ``(bad value, expected exception type)``.

_NOT_A_NUMBER = st.one_of(
    st.text(max_size=3),  # strings for numbers, "1" included
    st.none(),
    st.lists(st.integers(0, 3), max_size=2),
    st.just(torch.tensor(1.0)),
    st.just(1 + 2j),
)


def bad_int(min_value: int | None = None, max_value: int | None = None, *, none_ok: bool = False) -> st.SearchStrategy:
    """Non-ints (bools, floats, strings, None...) -> TypeError; out of range -> ValueError."""
    wrong = st.one_of(st.booleans(), st.floats(allow_nan=True), _NOT_A_NUMBER)
    if none_ok:
        wrong = wrong.filter(lambda v: v is not None)
    cats = [wrong.map(lambda v: (v, TypeError))]
    if min_value is not None:
        cats.append(st.integers(min_value - 10**6, min_value - 1).map(lambda v: (v, ValueError)))
    if max_value is not None:
        cats.append(st.integers(max_value + 1, max_value + 10**9).map(lambda v: (v, ValueError)))
    return st.one_of(cats)


def bad_float(
    min_value: float | None = None,
    max_value: float | None = None,
    *,
    min_inclusive: bool = True,
    max_inclusive: bool = True,
    none_ok: bool = False,
) -> st.SearchStrategy:
    """Bools, strings, None... -> TypeError; NaN, Inf, out of range -> ValueError."""
    wrong = st.one_of(st.booleans(), _NOT_A_NUMBER)
    if none_ok:
        wrong = wrong.filter(lambda v: v is not None)
    cats = [
        wrong.map(lambda v: (v, TypeError)),
        st.sampled_from([NAN, INF, -INF]).map(lambda v: (v, ValueError)),
    ]
    if min_value is not None:
        below = st.floats(min_value - 1e6, min_value, exclude_max=min_inclusive, allow_nan=False)
        cats.append(below.map(lambda v: (v, ValueError)))
    if max_value is not None:
        above = st.floats(max_value, max_value + 1e6, exclude_min=max_inclusive, allow_nan=False)
        cats.append(above.map(lambda v: (v, ValueError)))
    return st.one_of(cats)


def bad_bool() -> st.SearchStrategy:
    """Anything but a bool (0 and 1 included) -> TypeError."""
    return st.one_of(st.integers(0, 1), st.text(max_size=3), st.none(), st.just(torch.tensor(True))).map(
        lambda v: (v, TypeError)
    )


def bad_choice(choices: tuple[str, ...]) -> st.SearchStrategy:
    """Other strings -> ValueError; non-strings -> TypeError."""
    other = st.text(max_size=6).filter(lambda s: s not in choices)
    return st.one_of(
        other.map(lambda v: (v, ValueError)),
        st.one_of(st.integers(), st.none(), st.booleans()).map(lambda v: (v, TypeError)),
    )


def bad_pair(
    low: float | None = None,
    high: float | None = None,
    *,
    low_exclusive: bool = False,
    scalar_ok: bool = False,
) -> st.SearchStrategy:
    """A (low, high) range: wrong shapes/types -> TypeError; inverted or out of range -> ValueError.

    ``scalar_ok``: a single number is a valid value too (not drawn as a wrong type).
    """
    finite = st.floats(-1e6, 1e6, allow_nan=False)
    in_range = st.floats(
        low if low is not None else -1e6,
        high if high is not None else 1e6,
        exclude_min=low_exclusive,
        allow_nan=False,
    )
    inverted = st.tuples(in_range, in_range).filter(lambda p: p[0] != p[1]).map(lambda p: (max(p), min(p)))
    cats = [
        st.one_of(
            st.text(max_size=3),
            st.none(),
            st.nothing() if scalar_ok else finite,
            st.booleans(),
            st.tuples(finite, finite, finite),
            st.tuples(st.text(max_size=2), finite),
        ).map(lambda v: (v, TypeError)),
        inverted.map(lambda v: (v, ValueError)),
        st.tuples(st.sampled_from([NAN, INF]), in_range).map(lambda v: (v, ValueError)),
    ]
    if low is not None:
        below = st.floats(low - 1e3, low, exclude_max=not low_exclusive, allow_nan=False)
        cats.append(st.tuples(below, in_range).map(lambda v: (v, ValueError)))
    if high is not None:
        above = st.floats(high, high + 1e3, exclude_min=True, allow_nan=False)
        cats.append(st.tuples(in_range, above).map(lambda v: (v, ValueError)))
    return st.one_of(cats)


def bad_grid(*, max_tokens: int | None = None, none_ok: bool = False) -> st.SearchStrategy:
    """Grids: non-int sides, bools, strings, wrong lengths -> TypeError; sides < 1 -> ValueError."""
    cats = [
        st.one_of(
            st.text(max_size=3),
            st.nothing() if none_ok else st.none(),
            st.booleans(),
            st.floats(1, 10),
            st.tuples(st.integers(1, 8)),
            st.tuples(st.integers(1, 8), st.integers(1, 8), st.integers(1, 8)),
            st.tuples(st.integers(1, 8), st.booleans()),
            st.tuples(st.floats(1, 8), st.integers(1, 8)),
        ).map(lambda v: (v, TypeError)),
        st.one_of(st.integers(-5, 0), st.tuples(st.integers(-5, 0), st.integers(1, 8))).map(lambda v: (v, ValueError)),
    ]
    if max_tokens is not None:
        side = math.isqrt(max_tokens) + 1
        huge = st.one_of(st.integers(side, 10**12), st.tuples(st.just(1), st.integers(max_tokens + 1, 10**12)))
        cats.append(huge.map(lambda v: (v, ValueError)))
    return st.one_of(cats)


@st.composite
def bad_float_tensor(
    draw: st.DrawFn,
    shape: tuple[int, ...],
    *,
    finite: bool = True,
    empty_ok: bool = False,
    size_dims: tuple[int, ...] | None = None,
    bad_ranks: tuple[int, ...] | None = None,
    dtype_checked: bool = True,
    none_ok: bool = False,
) -> tuple[Any, type[Exception]]:
    """A tensor argument that should be ``float`` of ``shape``, made bad in one way.

    Categories: not a tensor (TypeError), integer or bool dtype (TypeError, when
    ``dtype_checked``), a wrong rank from ``bad_ranks`` (ValueError; default one less and
    one more than ``shape``), a larger size along one of ``size_dims`` (ValueError; default
    every dim but the batch, ``()`` for none), an empty batch (ValueError, unless
    ``empty_ok``), a NaN or Inf entry (ValueError, when ``finite``).
    """
    size_dims = tuple(range(1, len(shape))) if size_dims is None else size_dims
    bad_ranks = (len(shape) - 1, len(shape) + 1) if bad_ranks is None else bad_ranks
    cats = ["not_tensor", "rank"]
    if dtype_checked:
        cats.append("int_dtype")
    if size_dims:
        cats.append("size")
    if not empty_ok:
        cats.append("empty")
    if finite:
        cats.append("nonfinite")
    cat = draw(st.sampled_from(cats))
    good = torch.randn(shape)
    if cat == "not_tensor":
        others = ["x", 1.0] if none_ok else ["x", 1.0, None]
        return draw(st.sampled_from(others)), TypeError
    if cat == "int_dtype":
        return good.to(draw(st.sampled_from([torch.long, torch.int32, torch.uint8, torch.bool]))), TypeError
    if cat == "rank":
        n = draw(st.sampled_from([r for r in bad_ranks if r >= 0]))
        if n < len(shape):
            return good.reshape(-1, *shape[len(shape) - n + 1 :]) if n else good.flatten()[0], ValueError
        return good.reshape((1,) * (n - len(shape)) + tuple(shape)), ValueError
    if cat == "size":
        dim = draw(st.sampled_from(size_dims))
        new = list(shape)
        new[dim] = shape[dim] + draw(st.integers(1, 3))
        return torch.randn(new), ValueError
    if cat == "empty":
        new = list(shape)
        new[0] = 0
        return torch.randn(new), ValueError
    bad = good.clone()
    flat = bad.view(-1)
    flat[draw(st.integers(0, flat.numel() - 1))] = draw(st.sampled_from([NAN, INF, -INF]))
    return bad, ValueError


@st.composite
def bad_ids(draw: st.DrawFn, shape: tuple[int, ...], high: int) -> tuple[Any, type[Exception]]:
    """An id tensor of ``shape`` with values in ``[0, high)``, made bad: float/bool dtype,
    not a tensor (TypeError), an id < 0 or >= high, or a wrong rank (ValueError)."""
    cat = draw(st.sampled_from(["float", "not_tensor", "negative", "too_large", "rank"]))
    good = torch.randint(0, high, shape)
    if cat == "float":
        return good.to(draw(st.sampled_from([torch.float32, torch.bool]))), TypeError
    if cat == "not_tensor":
        return draw(st.one_of(st.just(good.tolist()), st.text(max_size=2))), TypeError
    if cat == "rank":
        return good.reshape(-1), ValueError
    bad = good.clone().view(-1)
    pos = draw(st.integers(0, bad.numel() - 1))
    bad[pos] = -draw(st.integers(1, 5)) if cat == "negative" else high + draw(st.integers(0, 5))
    return bad.view(shape), ValueError


# ----------------------------------------------------------------------------- fixtures (tiny)


def _enc(**kw: Any) -> ViTEncoder:
    return ViTEncoder(**{"img_size": 16, "patch_size": 4, "embed_dim": 16, "depth": 1, "num_heads": 2, **kw})


def _pred(**kw: Any) -> HierarchicalPredictor:
    base = {
        "grid_size": 4,
        "embed_dim": 16,
        "predictor_dim": 8,
        "depth": 1,
        "num_heads": 2,
        "num_levels": 2,
    }
    return HierarchicalPredictor(**{**base, **kw})


def _masker(**kw: Any) -> MultiBlockMasker:
    return MultiBlockMasker(**{"grid_size": 8, **kw})


def _knn(**kw: Any) -> Any:
    g = torch.Generator().manual_seed(0)
    base = {
        "train_features": torch.randn(6, 3, generator=g),
        "train_labels": torch.tensor([0, 1, 0, 1, 0, 1]),
        "query_features": torch.randn(4, 3, generator=g),
        "query_labels": torch.tensor([0, 1, 1, 0]),
        "k": 2,
    }
    return knn_accuracy(**{**base, **kw})


def _probe(**kw: Any) -> Any:
    g = torch.Generator().manual_seed(0)
    base = {
        "train_features": torch.randn(6, 3, generator=g),
        "train_labels": torch.tensor([0, 1, 0, 1, 0, 1]),
        "test_features": torch.randn(4, 3, generator=g),
        "test_labels": torch.tensor([0, 1, 1, 0]),
        "max_iter": 5,
    }
    return linear_probe(**{**base, **kw})


@functools.cache
def _fitted_probe() -> Any:
    return _probe()


def _latent(**kw: Any) -> Any:
    base = {"predictions": torch.randn(2, 3, 4), "targets": torch.randn(2, 3, 4), "valid": None}
    return latent_prediction_loss(**{**base, **kw})


def _sched(**kw: Any) -> OptimizerScheduler:
    opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    return OptimizerScheduler(opt, **{"total_steps": 10, "lr": 1e-3, **kw})


@dataclass(frozen=True)
class Case:
    """One argument of one public call: ``call(value)`` with a bad value for ``name``."""

    id: str
    name: str
    call: Callable[[Any], Any]
    bad: st.SearchStrategy


def _kw(fn: Callable[..., Any], name: str, **fixed: Any) -> Callable[[Any], Any]:
    return lambda v: fn(**{**fixed, name: v})


def _ctor_cases(prefix: str, fn: Callable[..., Any], params: dict[str, st.SearchStrategy], **fixed: Any) -> list[Case]:
    return [Case(f"{prefix}-{name}", name, _kw(fn, name, **fixed), bad) for name, bad in params.items()]


PAIR_SCALE = bad_pair(0.0, 1.0, low_exclusive=True)
PAIR_ASPECT = bad_pair(0.0, None, low_exclusive=True)

CASES: list[Case] = []

# ---- masking
CASES += _ctor_cases(
    "TargetSpec",
    TargetSpec,
    {"num_blocks": bad_int(1), "scale": PAIR_SCALE, "aspect_ratio": PAIR_ASPECT},
)
CASES += _ctor_cases(
    "MultiBlockMasker",
    _masker,
    {
        "grid_size": bad_grid(max_tokens=2**20),
        "num_targets": bad_int(1, 64),  # more targets than the 8x8 grid has cells
        "target_scale": PAIR_SCALE,
        "target_aspect_ratio": PAIR_ASPECT,
        "context_scale": PAIR_SCALE,
        "context_aspect_ratio": PAIR_ASPECT,
        "min_target_tokens": bad_int(1, 64),
        "min_context_tokens": bad_int(1, 64),
        "levels": bad_int(1, 4),  # 5 levels of 8x8 leave no context
        "truncate": bad_bool(),
        "max_resample_rounds": bad_int(0, 100),
    },
)
CASES += [
    Case(
        "MultiBlockMasker-small-grid",
        "grid_size",
        lambda v: MultiBlockMasker(grid_size=v),
        st.sampled_from([1, 2, 3, (1, 8), (3, 3)]).map(lambda g: (g, ValueError)),
    ),
    Case("MultiBlockMasker.__call__-batch_size", "batch_size", lambda v: _masker()(v), bad_int(1)),
    Case(
        "MultiBlockMasker.__call__-generator",
        "generator",
        lambda v: _masker()(2, generator=v),
        st.one_of(st.integers(), st.text(max_size=2)).map(lambda v: (v, TypeError)),
    ),
    Case(
        "sample_multiblock_masks-batch_size",
        "batch_size",
        lambda v: sample_multiblock_masks(v, grid_size=8),
        bad_int(1),
    ),
    Case(
        "sample_multiblock_masks-grid_size",
        "grid_size",
        lambda v: sample_multiblock_masks(2, grid_size=v),
        bad_grid(max_tokens=2**20),
    ),
    Case(
        "block_shape-scale",
        "scale",
        lambda v: block_shape(v, torch.tensor(1.0), 8),
        st.one_of(
            st.sampled_from([0.0, -0.5, 1.5, NAN]).map(lambda v: (torch.tensor([0.5, v]), ValueError)),
            st.one_of(st.text(max_size=2), st.none(), st.booleans()).map(lambda v: (v, TypeError)),
        ),
    ),
    Case(
        "block_shape-aspect_ratio",
        "aspect_ratio",
        lambda v: block_shape(torch.tensor(0.5), v, 8),
        st.one_of(
            st.sampled_from([0.0, -1.0, INF, NAN]).map(lambda v: (torch.tensor([1.0, v]), ValueError)),
            st.one_of(st.text(max_size=2), st.none()).map(lambda v: (v, TypeError)),
        ),
    ),
    Case(
        "block_shape-grid_size",
        "grid_size",
        lambda v: block_shape(torch.tensor(0.5), torch.tensor(1.0), v),
        bad_grid(),
    ),
    Case(
        "MaskCollator-masker",
        "masker",
        lambda v: MaskCollator(v),
        st.one_of(st.none(), st.text(max_size=2), st.just(sample_multiblock_masks)).map(lambda v: (v, TypeError)),
    ),
    Case(
        "MaskCollator-seed",
        "seed",
        lambda v: MaskCollator(_masker(), seed=v),
        bad_int(none_ok=True),
    ),
    Case(
        "MaskCollator-collate_fn",
        "collate_fn",
        lambda v: MaskCollator(_masker(), collate_fn=v),
        st.one_of(st.none(), st.integers()).map(lambda v: (v, TypeError)),
    ),
    Case(
        "MaskCollator.__call__-samples",
        "samples",
        lambda v: MaskCollator(_masker(), seed=0)(v),
        st.sampled_from([[], ()]).map(lambda v: (v, ValueError)),
    ),
    Case(
        "MaskIndices-indices",
        "indices",
        lambda v: MaskIndices(v, torch.ones(2, 3, dtype=torch.bool)),
        st.one_of(
            st.just(torch.zeros(2, 3)).map(lambda v: (v, TypeError)),
            st.just(torch.zeros(2, 4, dtype=torch.long)).map(lambda v: (v, ValueError)),
            st.just([[0, 1, 2]]).map(lambda v: (v, TypeError)),
        ),
    ),
    Case(
        "MaskIndices-valid",
        "valid",
        lambda v: MaskIndices(torch.zeros(2, 3, dtype=torch.long), v),
        st.one_of(st.just(torch.ones(2, 3)), st.just(torch.ones(2, 3, dtype=torch.long)), st.none()).map(
            lambda v: (v, TypeError)
        ),
    ),
    Case(
        "MaskIndices.to_bool_mask-indices",
        "indices",
        lambda v: MaskIndices(v, torch.ones_like(v, dtype=torch.bool)).to_bool_mask(5),
        st.sampled_from([5, 9, -1]).map(lambda i: (torch.tensor([[0, i]]), ValueError)),
    ),
    Case(
        "MaskIndices.to_bool_mask-num_tokens",
        "num_tokens",
        lambda v: mask_to_indices(torch.ones(1, 3, dtype=torch.bool)).to_bool_mask(v),
        bad_int(1),
    ),
    Case(
        "mask_to_indices-mask",
        "mask",
        lambda v: mask_to_indices(v),
        st.one_of(
            st.just(torch.ones(2, 3)).map(lambda v: (v, TypeError)),
            st.just(torch.ones(2, 3, dtype=torch.long)).map(lambda v: (v, TypeError)),
            st.just(torch.tensor(True)).map(lambda v: (v, ValueError)),
        ),
    ),
    Case(
        "mask_to_indices-pad_to",
        "pad_to",
        lambda v: mask_to_indices(torch.ones(2, 3, dtype=torch.bool), pad_to=v),
        st.one_of(bad_int(0, none_ok=True), st.integers(0, 2).map(lambda v: (v, ValueError))),
    ),
    Case(
        "gather_tokens-x",
        "x",
        lambda v: gather_tokens(v, torch.zeros(2, 1, dtype=torch.long)),
        bad_float_tensor((2, 3, 4), finite=False, size_dims=(), dtype_checked=False),
    ),
    Case(
        "gather_tokens-indices",
        "indices",
        lambda v: gather_tokens(torch.randn(2, 3, 4), v),
        st.one_of(bad_ids((2, 2), 3), st.just((torch.zeros(3, 1, dtype=torch.long), ValueError))),
    ),
    Case(
        "MultiBlockMasks.target_union-level",
        "level",
        lambda v: _masker(levels=2, min_context_tokens=1)(1).target_union(v),
        bad_int(0, 1),
    ),
]

# ---- grid
CASES += [
    Case("level_grid_size-grid_size", "grid_size", lambda v: level_grid_size(v, 1), bad_grid()),
    Case("level_grid_size-level", "level", lambda v: level_grid_size(4, v), bad_int(0)),
    Case(
        "token_positions-indices",
        "indices",
        lambda v: token_positions(v, 4),
        st.one_of(st.just(torch.zeros(3)), st.just(torch.zeros(3, dtype=torch.bool)), st.just([1, 2])).map(
            lambda v: (v, TypeError)
        ),
    ),
    Case(
        "token_positions-grid_size",
        "grid_size",
        lambda v: token_positions(torch.arange(3), v),
        bad_grid(),
    ),
    Case(
        "token_positions-level",
        "level",
        lambda v: token_positions(torch.arange(3), 4, level=v),
        bad_int(0),
    ),
    Case(
        "level_footprint-indices",
        "indices",
        lambda v: level_footprint(v, 4, level=1),
        st.one_of(
            st.just(torch.ones(2, 4)).map(lambda v: (v, TypeError)),
            st.just(torch.ones(2, 5, dtype=torch.bool)).map(lambda v: (v, ValueError)),
        ),
    ),
    Case(
        "pool_grid_tokens-x",
        "x",
        lambda v: pool_grid_tokens(v, 4, level=1),
        bad_float_tensor((2, 16, 3), finite=False, size_dims=(1,)),
    ),
    Case(
        "pool_grid_tokens-level",
        "level",
        lambda v: pool_grid_tokens(torch.randn(1, 16, 2), 4, level=v),
        bad_int(0),
    ),
]

# ---- encoders
CASES += _ctor_cases(
    "ViTEncoder",
    _enc,
    {
        "img_size": bad_grid(),
        "patch_size": bad_int(1),
        "in_chans": bad_int(1),
        "embed_dim": bad_int(1),
        "depth": bad_int(1),
        "num_heads": bad_int(1),
        "mlp_ratio": bad_float(0.0, min_inclusive=False),
        "qkv_bias": bad_bool(),
        "drop_path_rate": bad_float(0.0, 1.0, max_inclusive=False),
        "layer_scale_init": bad_float(0.0, min_inclusive=False, none_ok=True),
        "pos_embed": bad_choice(("sincos", "rope")),
        "rope_theta": bad_float(1.0, min_inclusive=False),
        "fused_attn": bad_bool(),
        "grad_checkpointing": bad_bool(),
        "out_layers": st.one_of(
            st.just("0").map(lambda v: (v, TypeError)),
            st.sampled_from([(1,), (-2,), (0, 5)]).map(lambda v: (v, ValueError)),
            st.just((True,)).map(lambda v: (v, TypeError)),
        ),
    },
)
CASES += [
    Case(
        "ViTEncoder-patch_size-too-large",
        "patch_size",
        lambda v: _enc(patch_size=v),
        st.sampled_from([3, 5, 32]).map(lambda v: (v, ValueError)),
    ),  # grid too small / not divisible
    Case(
        "ViTEncoder-num_heads-divides",
        "num_heads",
        lambda v: _enc(num_heads=v),
        st.sampled_from([3, 5, 32]).map(lambda v: (v, ValueError)),
    ),
    Case(
        "ViTEncoder.from_timm-name",
        "name",
        lambda v: ViTEncoder.from_timm(v, img_size=32, patch_size=4),
        st.one_of(
            st.integers().map(lambda v: (v, TypeError)),
            st.just("not_a_timm_model_xyz").map(lambda v: (v, ValueError)),
        ),
    ),
    Case("ViTEncoder.forward-images", "images", lambda v: _enc()(v), bad_float_tensor((2, 3, 16, 16))),
    Case(
        "ViTEncoder.forward-images-size",
        "images",
        lambda v: _enc()(torch.randn(1, 3, v, 16)),
        st.sampled_from([2, 6, 15]).map(lambda v: (v, ValueError)),
    ),
    Case(
        "ViTEncoder.forward-keep",
        "keep",
        lambda v: _enc()(torch.randn(2, 3, 16, 16), keep=v),
        st.one_of(bad_ids((2, 3), 16), st.just((torch.zeros(3, 2, dtype=torch.long), ValueError))),
    ),
    Case(
        "ViTEncoder.forward-out_layers",
        "out_layers",
        lambda v: _enc()(torch.randn(1, 3, 16, 16), out_layers=v),
        st.one_of(st.just("0").map(lambda v: (v, TypeError)), st.just((3,)).map(lambda v: (v, ValueError))),
    ),
    Case(
        "ViTEncoder.forward_tokens-tokens",
        "tokens",
        lambda v: _enc().forward_tokens(v, grid_size=4),
        bad_float_tensor((2, 16, 16)),
    ),
    Case(
        "ViTEncoder.forward_tokens-grid_size",
        "grid_size",
        lambda v: _enc().forward_tokens(torch.randn(1, 16, 16), grid_size=v),
        bad_grid(),
    ),
    Case("Attention-dim", "dim", lambda v: Attention(v, num_heads=1), bad_int(1)),
]
CASES += _ctor_cases(
    "Attention",
    Attention,
    {
        "num_heads": bad_int(1),
        "qkv_bias": bad_bool(),
        "attn_drop": bad_float(0.0, 1.0, max_inclusive=False),
        "proj_drop": bad_float(0.0, 1.0, max_inclusive=False),
        "fused": bad_bool(),
    },
    dim=8,
)
CASES += [
    Case(
        "Attention.forward-x",
        "x",
        lambda v: Attention(8, num_heads=2)(v),
        bad_float_tensor((2, 3, 8), finite=False, empty_ok=True, size_dims=(2,)),
    ),
    Case(
        "Attention.forward-attn_mask",
        "attn_mask",
        lambda v: Attention(8, num_heads=2)(torch.randn(2, 3, 8), attn_mask=v),
        st.one_of(
            st.sampled_from([torch.ones(2, 1, 1, 3), torch.ones(2, 1, 1, 3, dtype=torch.long)]).map(
                lambda v: (v, TypeError)
            ),
            st.just(torch.ones(2, 3, dtype=torch.bool)).map(lambda v: (v, ValueError)),
        ),
    ),
    Case(
        "Attention.forward-rope",
        "rope",
        lambda v: Attention(8, num_heads=2)(torch.randn(2, 3, 8), rope=v),
        st.one_of(st.just(torch.ones(3, 2)), st.just((torch.ones(3, 2),))).map(lambda v: (v, TypeError)),
    ),
    Case(
        "Attention.forward-return_attention",
        "return_attention",
        lambda v: Attention(8, num_heads=2)(torch.randn(2, 3, 8), return_attention=v),
        bad_bool(),
    ),
    Case(
        "Attention.forward-attn_mask-shape",
        "attn_mask",
        lambda v: Attention(8, num_heads=2)(torch.randn(2, 3, 8), attn_mask=v),
        st.sampled_from(
            [torch.ones(2, 1, 1, 4, dtype=torch.bool), torch.ones(3, 1, 1, 3, dtype=torch.bool),
             torch.ones(2, 3, 1, 3, dtype=torch.bool), torch.ones(2, 1, 2, 3, dtype=torch.bool)]
        ).map(lambda v: (v, ValueError)),
    ),
    Case("TransformerBlock-dim", "dim", lambda v: TransformerBlock(v, num_heads=1), bad_int(1)),
]
CASES += _ctor_cases(
    "TransformerBlock",
    lambda dim, **kw: TransformerBlock(dim, **{"num_heads": 2, **kw}),
    {
        "num_heads": bad_int(1),
        "mlp_ratio": bad_float(0.0, min_inclusive=False),
        "qkv_bias": bad_bool(),
        "drop_path": bad_float(0.0, 1.0, max_inclusive=False),
        "layer_scale_init": bad_float(0.0, min_inclusive=False, none_ok=True),
        "attn_drop": bad_float(0.0, 1.0, max_inclusive=False),
        "proj_drop": bad_float(0.0, 1.0, max_inclusive=False),
        "fused_attn": bad_bool(),
    },
    dim=8,
)
CASES += [
    Case(
        "TransformerBlock.forward-x",
        "x",
        lambda v: TransformerBlock(8, num_heads=2)(v),
        bad_float_tensor((2, 3, 8), finite=False, empty_ok=True, size_dims=(2,)),
    ),
    Case(
        "attention_mask_from_valid-valid",
        "valid",
        attention_mask_from_valid,
        st.one_of(
            st.sampled_from([torch.ones(2, 3), torch.ones(2, 3, dtype=torch.long), "x"]).map(lambda v: (v, TypeError)),
            st.just(torch.ones(3, dtype=torch.bool)).map(lambda v: (v, ValueError)),
        ),
    ),
]
_Q, _K, _V = torch.randn(2, 2, 3, 4), torch.randn(2, 2, 5, 4), torch.randn(2, 2, 5, 6)
CASES += _ctor_cases(
    "dot_product_attention",
    lambda **kw: dot_product_attention(**{"q": _Q, "k": _K, "v": _V, **kw}),
    {
        # q's size is what k and v are checked against: only its rank, dtype and type here.
        "q": bad_float_tensor((2, 2, 3, 4), finite=False, empty_ok=True, size_dims=()),
        "k": bad_float_tensor((2, 2, 5, 4), finite=False, empty_ok=True, size_dims=(1, 3)),
        "v": bad_float_tensor((2, 2, 5, 6), finite=False, empty_ok=True, size_dims=(2,)),
        "attn_mask": st.one_of(
            st.sampled_from([torch.ones(2, 1, 1, 5), torch.ones(2, 1, 1, 5, dtype=torch.long), "x"]).map(
                lambda v: (v, TypeError)
            ),
            st.sampled_from(
                [
                    torch.ones(2, 5, dtype=torch.bool),
                    torch.ones(2, 1, 1, 4, dtype=torch.bool),
                    torch.ones(3, 1, 1, 5, dtype=torch.bool),
                    torch.ones(2, 3, 1, 5, dtype=torch.bool),
                    torch.ones(2, 1, 2, 5, dtype=torch.bool),
                ]
            ).map(lambda v: (v, ValueError)),
        ),
        "dropout_p": bad_float(0.0, 1.0, max_inclusive=False),
        "fused": bad_bool(),
        "return_attention": bad_bool(),
    },
)
CASES += _ctor_cases(
    "transformer_stack",
    lambda **kw: transformer_stack(**{"dim": 8, "depth": 2, "num_heads": 2, **kw}),
    {
        "dim": bad_int(1),
        "depth": bad_int(1),
        "num_heads": bad_int(1),
        "mlp_ratio": bad_float(0.0, min_inclusive=False),
        "qkv_bias": bad_bool(),
        "drop_path_rate": bad_float(0.0, 1.0, max_inclusive=False),
        "layer_scale_init": bad_float(0.0, min_inclusive=False, none_ok=True),
        "fused_attn": bad_bool(),
    },
)
CASES += _ctor_cases(
    "init_transformer_weights",
    lambda **kw: init_transformer_weights(**{"module": nn.Linear(2, 2), **kw}),
    {
        "module": st.sampled_from(["x", None, 3, [nn.Linear(2, 2)]]).map(lambda v: (v, TypeError)),
        "std": bad_float(0.0, min_inclusive=False),
    },
)
CASES += [
    Case(
        "rescale_residual_branches-blocks",
        "blocks",
        rescale_residual_branches,
        st.sampled_from(["x", None, 3, nn.Linear(2, 2), [nn.Linear(2, 2)], [TransformerBlock(8, num_heads=2), "x"]]).map(
            lambda v: (v, TypeError)
        ),
    ),
]

# ---- predictors
CASES += _ctor_cases(
    "HierarchicalPredictor",
    _pred,
    {
        "grid_size": bad_grid(none_ok=True),  # None: no default grid (given at forward)
        "embed_dim": bad_int(1),
        "predictor_dim": bad_int(1),
        "depth": bad_int(1),
        "num_heads": bad_int(1),
        "num_levels": bad_int(1, 3),  # a 4x4 grid has 3 levels (4x4, 2x2, 1x1)
        "out_dim": st.one_of(
            st.sampled_from([0, -3, (8,), (8, 8, 8), (8, 0)]).map(lambda v: (v, ValueError)),
            st.sampled_from(["8", 8.0, True, (8, "8")]).map(lambda v: (v, TypeError)),
        ),
        "mlp_ratio": bad_float(0.0, min_inclusive=False),
        "qkv_bias": bad_bool(),
        "drop_path_rate": bad_float(0.0, 1.0, max_inclusive=False),
        "layer_scale_init": bad_float(0.0, min_inclusive=False, none_ok=True),
        "pos_embed": bad_choice(("sincos", "rope")),
        "rope_theta": bad_float(1.0, min_inclusive=False),
        "fused_attn": bad_bool(),
        "grad_checkpointing": bad_bool(),
    },
)
_CTX_IDS = torch.arange(5).expand(2, 5)
_T0 = torch.tensor([[0, 1]]).expand(2, 1, 2)
_T1 = torch.tensor([[0]]).expand(2, 1, 1)
CASES += [
    Case(
        "HierarchicalPredictor.forward-context",
        "context",
        lambda v: _pred()(v, context_indices=_CTX_IDS, targets=[_T0, _T1]),
        bad_float_tensor((2, 5, 16)),
    ),
    Case(
        "HierarchicalPredictor.forward-context_indices",
        "context_indices",
        lambda v: _pred()(torch.randn(2, 5, 16), context_indices=v, targets=[_T0, _T1]),
        bad_ids((2, 5), 16),
    ),
    Case(
        "HierarchicalPredictor.forward-targets[1]",
        "targets[1]",
        lambda v: _pred()(torch.randn(2, 5, 16), context_indices=_CTX_IDS, targets=[_T0, v]),
        st.one_of(
            bad_ids((2, 1, 2), 4),
            st.just((torch.zeros(3, 1, 1, dtype=torch.long), ValueError)),
        ),
    ),
    Case(
        "HierarchicalPredictor.forward-targets",
        "targets",
        lambda v: _pred()(torch.randn(2, 5, 16), context_indices=_CTX_IDS, targets=v),
        st.one_of(
            st.sampled_from([[_T0], [_T0, _T1, _T1]]).map(lambda v: (v, ValueError)),
            st.sampled_from(["x", None, _T0]).map(lambda v: (v, TypeError)),
        ),
    ),
    Case(
        "HierarchicalPredictor.forward-grid_size",
        "grid_size",
        lambda v: _pred()(torch.randn(2, 5, 16), context_indices=_CTX_IDS, targets=[_T0, _T1], grid_size=v),
        st.one_of(
            bad_grid(none_ok=True),
            st.sampled_from([1, (1, 1)]).map(lambda v: (v, ValueError)),  # 1 level < num_levels=2
        ),
    ),
    Case(
        "HierarchicalPredictor.forward-num_levels",
        "num_levels",
        lambda v: _pred()(torch.randn(2, 5, 16), context_indices=_CTX_IDS, targets=[_T0, _T1], num_levels=v),
        bad_int(1, 2, none_ok=True),  # None: every level
    ),
    Case(
        "HierarchicalPredictor.forward-no-grid_size",
        "grid_size",
        lambda v: _pred(grid_size=None)(torch.randn(2, 5, 16), context_indices=_CTX_IDS, targets=[_T0, _T1], grid_size=v),
        st.just((None, ValueError)),
    ),
    Case(
        "HierarchicalPredictor.set_grad_checkpointing-enable",
        "enable",
        lambda v: _pred().set_grad_checkpointing(v),
        bad_bool(),
    ),
]

# ---- targets
_LIN = nn.Linear(3, 2)
CASES += [
    Case(
        "EMATarget-online",
        "online",
        lambda v: EMATarget(v, total_steps=10),
        st.one_of(st.none(), st.text(max_size=2), st.just(torch.ones(2))).map(lambda v: (v, TypeError)),
    ),
]
CASES += _ctor_cases(
    "EMATarget",
    lambda **kw: EMATarget(_LIN, **{"total_steps": 10, **kw}),
    {
        "total_steps": bad_int(1),
        "momentum": st.one_of(
            bad_pair(0.0, 1.0, scalar_ok=True),
            bad_float(0.0, 1.0).filter(lambda p: p[1] is ValueError),
        ),
        "schedule": bad_choice(("linear", "cosine")),
        "update_every": bad_int(1),
        "compensate": bad_bool(),
        "check_finite": bad_bool(),
    },
)
CASES += [
    Case(
        "EMATarget.update-online",
        "online",
        lambda v: EMATarget(_LIN, total_steps=10).update(v),
        st.one_of(
            st.sampled_from([None, "x"]).map(lambda v: (v, TypeError)),
            st.sampled_from([nn.Linear(3, 3), nn.Linear(3, 2, bias=False)]).map(lambda v: (v, ValueError)),
        ),
    ),
]
CASES += _ctor_cases(
    "momentum_schedule",
    lambda **kw: momentum_schedule(**{"step": 0, "total_steps": 10, **kw}),
    {
        "step": bad_int(0),
        "total_steps": bad_int(1),
        "start": bad_float(0.0, 1.0),
        "end": bad_float(0.0, 1.0),
        "schedule": bad_choice(("linear", "cosine")),
    },
)
CASES += [
    Case(
        "momentum_schedule-start>end",
        "start",
        lambda v: momentum_schedule(0, total_steps=3, start=v, end=0.5),
        st.floats(0.51, 1.0).map(lambda v: (v, ValueError)),
    ),
    Case(
        "ema_update_-momentum",
        "momentum",
        lambda v: ema_update_([torch.ones(2)], [torch.ones(2)], v),
        bad_float(0.0, 1.0),
    ),
    Case(
        "ema_update_-online_params",
        "online_params",
        lambda v: ema_update_([torch.ones(2)], v, 0.9),
        st.one_of(
            st.sampled_from([[torch.ones(3)], [], [torch.ones(2), torch.ones(2)]]).map(lambda v: (v, ValueError)),
            st.sampled_from([torch.ones(2), ["x"], None]).map(lambda v: (v, TypeError)),
        ),
    ),
    Case(
        "hierarchical_targets-features",
        "features",
        lambda v: hierarchical_targets(v, grid_size=4, targets=torch.zeros(2, 1, dtype=torch.long)),
        bad_float_tensor((2, 16, 3), finite=False, size_dims=(1,)),
    ),
    Case(
        "hierarchical_targets-targets",
        "targets",
        lambda v: hierarchical_targets(
            torch.randn(2, 16, 3), grid_size=4, targets=[torch.zeros(2, 1, dtype=torch.long), v]
        ),
        bad_ids((2, 1, 2), 4),
    ),
    Case(
        "hierarchical_targets-grid_size",
        "grid_size",
        lambda v: hierarchical_targets(torch.randn(2, 16, 3), grid_size=v, targets=torch.zeros(2, 1, dtype=torch.long)),
        st.one_of(bad_grid(), st.sampled_from([3, (2, 4), 5]).map(lambda v: (v, ValueError))),
    ),
    Case(
        "hierarchical_targets-source",
        "source",
        lambda v: hierarchical_targets(
            torch.randn(2, 16, 3),
            grid_size=4,
            targets=torch.zeros(2, 1, dtype=torch.long),
            source=v,
        ),
        bad_choice(("pooled", "layers")),
    ),
]

# ---- losses
CASES += _ctor_cases(
    "latent_prediction_loss",
    _latent,
    {
        "predictions": bad_float_tensor((2, 3, 4)),
        "targets": bad_float_tensor((2, 3, 4)),
        "valid": st.one_of(
            st.sampled_from([torch.ones(2, 3), torch.ones(2, 3, dtype=torch.long)]).map(lambda v: (v, TypeError)),
            st.sampled_from([torch.ones(2, 4, dtype=torch.bool), [None, None]]).map(lambda v: (v, ValueError)),
        ),
        "loss_type": bad_choice(("smooth_l1", "l1", "l2")),
        "beta": bad_float(0.0),
        "normalize_targets": bad_bool(),
        "level_weights": st.one_of(
            st.sampled_from(["1", 1.0, None]).map(lambda v: (v, TypeError)),
            st.sampled_from([(), (-1.0,), (NAN,)]).map(lambda v: (v, ValueError)),
        ),
    },
)
CASES += _ctor_cases(
    "LatentPredictionLoss",
    LatentPredictionLoss,
    {
        "loss_type": bad_choice(("smooth_l1", "l1", "l2")),
        "beta": bad_float(0.0),
        "normalize_targets": bad_bool(),
        "level_weights": st.sampled_from([(), (-1.0,)]).map(lambda v: (v, ValueError)),
    },
)
CASES += [
    Case(
        "LatentPredictionLoss.forward-predictions",
        "predictions",
        lambda v: LatentPredictionLoss()(v, torch.randn(2, 3, 4)),
        bad_float_tensor((2, 3, 4)),
    ),
    Case(
        "LatentPredictionLoss.forward-targets",
        "targets",
        lambda v: LatentPredictionLoss()([torch.randn(2, 3, 4)], v),
        st.sampled_from([[], [torch.randn(2, 3, 4)] * 2]).map(lambda v: (v, ValueError)),
    ),
]
CASES += _ctor_cases(
    "SIGRegLoss",
    SIGRegLoss,
    {
        "num_directions": bad_int(1),
        "num_knots": bad_int(2),
        "t_max": bad_float(0.0, min_inclusive=False),
        "seed": bad_int(0),
        "chunk": bad_int(1, none_ok=True),
        "gather_distributed": bad_bool(),
    },
)
CASES += _ctor_cases(
    "LeJEPALoss",
    LeJEPALoss,
    {
        "lam": bad_float(0.0, 1.0),
        "num_global_views": bad_int(1, none_ok=True),
        "num_directions": bad_int(1),
        "seed": bad_int(0),
        "gather_distributed": bad_bool(),
    },
)
CASES += [
    Case(
        "LeJEPALoss.forward-z",
        "z",
        lambda v: LeJEPALoss(num_directions=8)(v),
        bad_float_tensor((2, 6, 4), size_dims=(), bad_ranks=(2, 4)),
    ),
    Case(
        "lejepa_view_loss-num_global_views",
        "num_global_views",
        lambda v: lejepa_view_loss(torch.randn(3, 6, 4), sigreg=SIGRegLoss(num_directions=8), num_global_views=v),
        bad_int(1, 3, none_ok=True),
    ),
    Case(
        "lejepa_view_loss-lam",
        "lam",
        lambda v: lejepa_view_loss(torch.randn(2, 6, 4), sigreg=SIGRegLoss(num_directions=8), lam=v),
        bad_float(0.0, 1.0),
    ),
    Case(
        "lejepa_view_loss-gather_distributed",
        "gather_distributed",
        lambda v: lejepa_view_loss(torch.randn(2, 6, 4), sigreg=SIGRegLoss(num_directions=8), gather_distributed=v),
        bad_bool(),
    ),
]
CASES += [
    Case(
        "SIGRegLoss.forward-x",
        "x",
        lambda v: SIGRegLoss(num_directions=8)(v),
        bad_float_tensor((6, 4), size_dims=(), bad_ranks=(1, 4)),
    ),
]
CASES += _ctor_cases(
    "sigreg",
    lambda **kw: sigreg(**{"x": torch.randn(6, 4), "num_directions": 8, **kw}),
    {
        "x": bad_float_tensor((6, 4), size_dims=(), bad_ranks=(1, 4)),
        "num_directions": bad_int(1),
        "num_knots": bad_int(2),
        "t_max": bad_float(0.0, min_inclusive=False),
        "chunk": bad_int(1, none_ok=True),
        "distributed": bad_bool(),
        "directions": bad_float_tensor((4, 8), size_dims=(0,), none_ok=True),
        "generator": st.sampled_from([1, "g"]).map(lambda v: (v, TypeError)),
    },
)
CASES += _ctor_cases(
    "sigreg_directions",
    lambda **kw: sigreg_directions(**{"dim": 4, "num_directions": 3, **kw}),
    {
        "dim": bad_int(1),
        "num_directions": bad_int(1),
        "seed": bad_int(0),
        "step": bad_int(0),
        "dtype": st.sampled_from([torch.long, torch.bool, "float32", None]).map(lambda v: (v, TypeError)),
    },
)
CASES += _ctor_cases(
    "lejepa_loss",
    lambda **kw: lejepa_loss(**{"prediction_loss": torch.tensor(1.0), "sigreg_value": torch.tensor(2.0), **kw}),
    {
        "prediction_loss": st.one_of(
            st.sampled_from([torch.tensor(NAN), torch.tensor(INF), torch.ones(2)]).map(lambda v: (v, ValueError)),
            st.sampled_from([1.0, torch.tensor(1)]).map(lambda v: (v, TypeError)),
        ),
        "sigreg_value": st.sampled_from([torch.tensor(NAN), torch.ones(1)]).map(lambda v: (v, ValueError)),
        "lam": bad_float(0.0, 1.0),
    },
)
CASES += _ctor_cases(
    "VICRegLoss",
    VICRegLoss,
    {
        "lambda_param": bad_float(0.0),
        "mu_param": bad_float(0.0),
        "nu_param": bad_float(0.0),
        "gather_distributed": bad_bool(),
        "eps": bad_float(0.0),
    },
)
CASES += [
    Case(
        "VICRegLoss.forward-z_a",
        "z_a",
        lambda v: VICRegLoss()(v, torch.randn(6, 4)),
        bad_float_tensor((6, 4)),
    ),
    Case(
        "VICRegLoss.forward-z_b",
        "z_b",
        lambda v: VICRegLoss()(torch.randn(6, 4), v),
        bad_float_tensor((6, 4)),
    ),
    Case(
        "VICRegLoss.forward-batch-of-one",
        "z_a",
        lambda v: VICRegLoss()(v, v),
        st.just((torch.randn(1, 4), ValueError)),
    ),
]
CASES += _ctor_cases(
    "vicreg_loss",
    lambda **kw: vicreg_loss(**{"x": torch.randn(6, 4), "y": torch.randn(6, 4), **kw}),
    {
        "x": bad_float_tensor((6, 4)),
        "y": bad_float_tensor((6, 4)),
        "lambda_param": bad_float(0.0),
        "mu_param": bad_float(0.0),
        "nu_param": bad_float(0.0),
        "eps": bad_float(0.0),
        "gather_distributed": bad_bool(),
    },
)
CASES += [
    Case(
        "invariance_loss-y",
        "y",
        lambda v: invariance_loss(torch.randn(6, 4), v),
        bad_float_tensor((6, 4)),
    ),
    Case("variance_loss-x", "x", lambda v: variance_loss(v), bad_float_tensor((6, 4), size_dims=())),
    Case(
        "variance_loss-eps",
        "eps",
        lambda v: variance_loss(torch.randn(6, 4), eps=v),
        bad_float(0.0),
    ),
    Case(
        "covariance_loss-x",
        "x",
        lambda v: covariance_loss(v),
        bad_float_tensor((6, 4), size_dims=()),
    ),
]

# ---- positional
CASES += [
    Case(
        "RoPE2D-head_dim",
        "head_dim",
        lambda v: RoPE2D(head_dim=v),
        st.one_of(bad_int(4), st.sampled_from([6, 10, 18]).map(lambda v: (v, ValueError))),
    ),
    Case(
        "RoPE2D-theta",
        "theta",
        lambda v: RoPE2D(head_dim=8, theta=v),
        bad_float(1.0, min_inclusive=False),
    ),
    Case(
        "RoPE2D.forward-q",
        "q",
        lambda v: RoPE2D(head_dim=8)(v, torch.randn(2, 2, 3, 8), positions=torch.randn(3, 2)),
        bad_float_tensor((2, 2, 3, 8), finite=False, size_dims=(3,)),
    ),
    Case(
        "RoPE2D.forward-positions",
        "positions",
        lambda v: RoPE2D(head_dim=8)(torch.randn(2, 2, 3, 8), torch.randn(2, 2, 3, 8), positions=v),
        bad_float_tensor((3, 2), size_dims=(0, 1), bad_ranks=(1, 4)),
    ),
    Case(
        "RoPE2D.cos_sin-positions",
        "positions",
        lambda v: RoPE2D(head_dim=8).cos_sin(v),
        st.sampled_from([torch.randn(3, 3), torch.randn(3), "x"]).map(
            lambda v: (v, TypeError if isinstance(v, str) else ValueError)
        ),
    ),
    Case(
        "apply_rotary-x",
        "x",
        lambda v: apply_rotary(v, torch.randn(3, 4), torch.randn(3, 4)),
        st.one_of(
            st.sampled_from([torch.randn(2, 3, 7), torch.randn(8)]).map(lambda v: (v, ValueError)),
            st.sampled_from([torch.ones(2, 3, 8, dtype=torch.long), "x"]).map(lambda v: (v, TypeError)),
        ),
    ),
    Case(
        "apply_rotary-cos",
        "cos",
        lambda v: apply_rotary(torch.randn(2, 3, 8), v, torch.randn(3, 4)),
        st.one_of(
            st.sampled_from([torch.randn(3, 3), torch.randn(4, 4), torch.randn(5, 2, 3, 4)]).map(
                lambda v: (v, ValueError)
            ),
            st.sampled_from([torch.ones(3, 4, dtype=torch.long), None]).map(lambda v: (v, TypeError)),
        ),
    ),
    Case(
        "rope_2d_angles-head_dim",
        "head_dim",
        lambda v: rope_2d_angles(torch.randn(3, 2), v),
        st.one_of(bad_int(4), st.sampled_from([6, 14]).map(lambda v: (v, ValueError))),
    ),
    Case(
        "rope_2d_angles-positions",
        "positions",
        lambda v: rope_2d_angles(v, 8),
        st.sampled_from([torch.randn(3, 3), torch.randn(2)]).map(lambda v: (v, ValueError)),
    ),
    Case(
        "sincos_2d-positions",
        "positions",
        lambda v: sincos_2d(v, 8),
        st.one_of(
            st.sampled_from([torch.randn(3, 3), torch.randn(3)]).map(lambda v: (v, ValueError)),
            st.sampled_from(["x", [[0.0, 1.0]]]).map(lambda v: (v, TypeError)),
        ),
    ),
    Case(
        "sincos_2d-dim",
        "dim",
        lambda v: sincos_2d(torch.randn(3, 2), v),
        st.one_of(bad_int(4), st.sampled_from([6, 10]).map(lambda v: (v, ValueError))),
    ),
    Case(
        "sincos_2d-base",
        "base",
        lambda v: sincos_2d(torch.randn(3, 2), 8, base=v),
        bad_float(1.0, min_inclusive=False),
    ),
    Case("sincos_2d_table-grid_size", "grid_size", lambda v: sincos_2d_table(v, 8), bad_grid()),
]

# ---- necks
CASES += _ctor_cases(
    "MLPProjector",
    lambda **kw: MLPProjector(**{"in_dim": 4, **kw}),
    {
        "in_dim": bad_int(1),
        "out_dim": bad_int(1),
        "norm": bad_choice(("batch", "layer", "none")),
        "distributed": bad_bool(),
        "eps": bad_float(0.0, min_inclusive=False),
    },
)
CASES += [
    Case("MLPProjector.forward-x", "x", lambda v: MLPProjector(in_dim=4, out_dim=2)(v),
         bad_float_tensor((6, 4), size_dims=(1,), bad_ranks=(1,))),
    Case("GlobalBatchNorm1d-distributed", "distributed", lambda v: GlobalBatchNorm1d(4, distributed=v), bad_bool()),
    Case("GlobalBatchNorm1d.forward-x", "x", lambda v: GlobalBatchNorm1d(4)(v),
         bad_float_tensor((6, 4), size_dims=(), bad_ranks=(1, 3))),
    Case("global_batch_norm-x", "x", lambda v: global_batch_norm(v),
         bad_float_tensor((6, 4), size_dims=(), bad_ranks=(1, 3))),
]
CASES += _ctor_cases(
    "FPNNeck",
    lambda **kw: FPNNeck(**{"in_channels": [4, 8], "out_channels": 4, **kw}),
    {
        "in_channels": st.one_of(
            st.sampled_from([[], [0], [4, -1]]).map(lambda v: (v, ValueError)),
            st.sampled_from([4, "4", [True], [4.0], None]).map(lambda v: (v, TypeError)),
        ),
        "out_channels": bad_int(1),
        "fusion": bad_choice(("add", "concat")),
        "upsample_mode": bad_choice(("nearest", "bilinear")),
    },
)
_FPN_FEATS = (torch.randn(2, 4, 4, 4), torch.randn(2, 8, 2, 2))
CASES += [
    Case(
        "FPNNeck.forward-features[0]",
        "features[0]",
        lambda v: FPNNeck(in_channels=[4, 8], out_channels=4)([v, _FPN_FEATS[1]]),
        bad_float_tensor((2, 4, 4, 4), size_dims=(1,), bad_ranks=(2, 5)),
    ),
    Case(
        "FPNNeck.forward-features[1]",
        "features[1]",
        lambda v: FPNNeck(in_channels=[4, 8], out_channels=4)([_FPN_FEATS[0], v]),
        st.sampled_from(
            [
                torch.randn(2, 7, 2, 2),
                torch.randn(3, 8, 2, 2),
                torch.randn(2, 8, 8, 8),
                torch.randn(2, 5, 8),
            ]
        ).map(lambda v: (v, ValueError)),
    ),
    Case(
        "FPNNeck.forward-features",
        "features",
        lambda v: FPNNeck(in_channels=[4, 8], out_channels=4)(v),
        st.one_of(
            st.sampled_from([[], [_FPN_FEATS[0]]]).map(lambda v: (v, ValueError)),
            st.sampled_from([_FPN_FEATS[0], None]).map(lambda v: (v, TypeError)),
        ),
    ),
    Case(
        "FPNNeck.forward-grid_sizes",
        "grid_sizes",
        lambda v: FPNNeck(in_channels=[4, 8], out_channels=4)(
            [torch.randn(2, 16, 4), torch.randn(2, 4, 8)], grid_sizes=v
        ),
        st.one_of(
            st.sampled_from([[(3, 3), None], [None], [(4, 4), (3, 1)]]).map(lambda v: (v, ValueError)),
            st.sampled_from(["x", 4]).map(lambda v: (v, TypeError)),
        ),
    ),
    Case(
        "tokens_to_map-x",
        "x",
        lambda v: tokens_to_map(v),
        st.sampled_from([torch.randn(2, 5, 3), torch.randn(4, 3)]).map(lambda v: (v, ValueError)),
    ),
    Case(
        "tokens_to_map-grid_size",
        "grid_size",
        lambda v: tokens_to_map(torch.randn(2, 6, 3), v),
        st.one_of(
            bad_grid(none_ok=True),
            st.sampled_from([(2, 2), 3, (6, 2)]).map(lambda v: (v, ValueError)),
        ),
    ),
]

# ---- evaluation
CASES += _ctor_cases(
    "knn_accuracy",
    _knn,
    {
        "train_features": bad_float_tensor((6, 3)),
        "query_features": bad_float_tensor((4, 3)),
        "train_labels": st.one_of(
            st.sampled_from([torch.zeros(6), torch.zeros(6, dtype=torch.bool)]).map(lambda v: (v, TypeError)),
            st.sampled_from([torch.zeros(5, dtype=torch.long), -torch.ones(6, dtype=torch.long)]).map(
                lambda v: (v, ValueError)
            ),
        ),
        "query_labels": st.sampled_from([torch.zeros(3, dtype=torch.long)]).map(lambda v: (v, ValueError)),
        "k": st.one_of(
            st.sampled_from([0, -1, (5, 0)]).map(lambda v: (v, ValueError)),
            st.sampled_from([True, 2.5, "3", None, (), (2, "3"), torch.tensor(2)]).map(lambda v: (v, TypeError)),
        ),
        "temperature": bad_float(0.0, min_inclusive=False),
        "num_classes": bad_int(2, none_ok=True),
        "center": bad_bool(),
        "chunk_size": bad_int(1),
    },
)
CASES += [
    Case(
        "knn_classify-train_labels",
        "train_labels",
        lambda v: knn_classify(torch.randn(6, 3), v, torch.randn(2, 3), k=2),
        st.sampled_from([torch.zeros(6), "x"]).map(lambda v: (v, TypeError)),
    ),
]
CASES += _ctor_cases(
    "linear_probe",
    _probe,
    {
        "train_features": bad_float_tensor((6, 3)),
        "test_labels": st.one_of(
            st.sampled_from([torch.zeros(4), None]).map(lambda v: (v, TypeError)),
            st.sampled_from([torch.zeros(3, dtype=torch.long), -torch.ones(4, dtype=torch.long)]).map(
                lambda v: (v, ValueError)
            ),
        ),
        "num_classes": bad_int(2, none_ok=True),
        "weight_decay": bad_float(0.0),
        "weight_decays": st.one_of(
            st.sampled_from([(), "0.1", 0.1]).map(lambda v: (v, TypeError)),
            st.sampled_from([(-1.0,), (NAN,)]).map(lambda v: (v, ValueError)),
        ),
        "val_fraction": bad_float(0.0, 1.0, min_inclusive=False, max_inclusive=False),
        "max_iter": bad_int(1),
        "standardize": bad_bool(),
        "seed": bad_int(),
    },
)
CASES += [
    Case(
        "LinearProbeResult.predict-features",
        "features",
        lambda v: _fitted_probe().predict(v),
        bad_float_tensor((4, 3), finite=False),
    ),
]
for _fn in (
    effective_rank,
    rank_ratio,
    feature_std,
    collapse_stats,
    anisotropy,
    isotropy,
    uniformity,
):
    CASES.append(
        Case(
            f"{_fn.__name__}-z",
            "z",
            _fn,
            st.one_of(
                bad_float_tensor((5, 3), size_dims=()),
                st.just((torch.randn(1, 3), ValueError)),  # one sample: no spread to measure
            ),
        )
    )
CASES += [
    Case(
        "collapse_stats-dead_threshold",
        "dead_threshold",
        lambda v: collapse_stats(torch.randn(5, 3), dead_threshold=v),
        bad_float(0.0),
    ),
    Case(
        "isotropy-method",
        "method",
        lambda v: isotropy(torch.randn(5, 3), method=v),
        bad_choice(("ratio", "entropy")),
    ),
    Case(
        "uniformity-t",
        "t",
        lambda v: uniformity(torch.randn(5, 3), t=v),
        bad_float(0.0, min_inclusive=False),
    ),
    Case(
        "uniformity-max_samples",
        "max_samples",
        lambda v: uniformity(torch.randn(5, 3), max_samples=v),
        bad_int(2),
    ),
    Case(
        "is_collapsed-stats",
        "stats",
        lambda v: is_collapsed(v),
        st.one_of(
            st.sampled_from([None, "x", [1.0]]).map(lambda v: (v, TypeError)),
            st.just({"std_mean": 1.0}).map(lambda v: (v, ValueError)),
        ),
    ),
    Case(
        "is_collapsed-std_threshold",
        "std_threshold",
        lambda v: is_collapsed(collapse_stats(torch.randn(5, 3)), std_threshold=v),
        bad_float(0.0),
    ),
    Case(
        "pool_tokens-tokens",
        "tokens",
        lambda v: pool_tokens(v),
        bad_float_tensor((2, 3, 4), finite=False, size_dims=()),
    ),
    Case(
        "pool_tokens-valid",
        "valid",
        lambda v: pool_tokens(torch.randn(2, 3, 4), v),
        st.one_of(
            st.sampled_from([torch.ones(2, 3), torch.ones(2, 3, dtype=torch.long)]).map(lambda v: (v, TypeError)),
            st.sampled_from([torch.ones(2, 4, dtype=torch.bool), torch.zeros(2, 3, dtype=torch.bool)]).map(
                lambda v: (v, ValueError)
            ),
        ),
    ),
    Case(
        "extract_features-encoder_fn",
        "encoder_fn",
        lambda v: extract_features(v, [(torch.ones(2, 3), [0, 1])]),
        st.sampled_from([None, "f", 3]).map(lambda v: (v, TypeError)),
    ),
    Case(
        "extract_features-loader",
        "loader",
        lambda v: extract_features(lambda x: x, v),
        st.one_of(
            st.just([]).map(lambda v: (v, ValueError)),
            st.sampled_from([[torch.ones(2, 3)], [(torch.ones(2, 3),)], ["ab"]]).map(lambda v: (v, TypeError)),
        ),
    ),
    Case(
        "extract_features-encoder_fn-output",
        "encoder_fn",
        lambda v: extract_features(v, [(torch.ones(2, 3), [0, 1])]),
        st.sampled_from([lambda x: x[0], lambda x: x[:1], lambda x: x[:, :, None], lambda x: "x"]).map(
            lambda v: (v, ValueError)
        ),
    ),
    Case(
        "extract_features-amp_dtype",
        "amp_dtype",
        lambda v: extract_features(lambda x: x, [(torch.ones(2, 3), [0, 1])], amp_dtype=v),
        st.sampled_from([torch.float32, torch.long, "bf16"]).map(lambda v: (v, ValueError)),
    ),
]

# ---- training
CASES += _ctor_cases(
    "warmup_cosine",
    lambda **kw: warmup_cosine(
        **{
            "step": 0,
            "total_steps": 10,
            "warmup_steps": 2,
            "start_value": 0.0,
            "peak_value": 1.0,
            "final_value": 0.1,
            **kw,
        }
    ),
    {
        "step": bad_int(0),
        "total_steps": bad_int(2),  # < warmup_steps = 2 is out of range too
        "warmup_steps": bad_int(0, 10),
        "start_value": bad_float(),
        "peak_value": bad_float(),
        "final_value": bad_float(),
    },
)
CASES += _ctor_cases(
    "cosine_ramp",
    lambda **kw: cosine_ramp(**{"step": 0, "total_steps": 10, "start_value": 0.0, "final_value": 1.0, **kw}),
    {
        "step": bad_int(0),
        "total_steps": bad_int(1),
        "start_value": bad_float(),
        "final_value": bad_float(),
    },
)
CASES += _ctor_cases(
    "OptimizerScheduler",
    _sched,
    {
        "total_steps": bad_int(1),
        "lr": st.one_of(
            st.sampled_from(["1e-3", None, True, (1.0, 2.0)]).map(lambda v: (v, TypeError)),
            st.sampled_from([-1.0, NAN, (0.0, -1.0, 0.0)]).map(lambda v: (v, ValueError)),
        ),
        "weight_decay": st.one_of(
            st.sampled_from(["0.1", True, (0.1,)]).map(lambda v: (v, TypeError)),
            st.sampled_from([-0.1, (0.1, INF)]).map(lambda v: (v, ValueError)),
        ),
        "warmup_steps": bad_int(0, 10),
    },
)
CASES += [
    Case(
        "OptimizerScheduler-optimizer",
        "optimizer",
        lambda v: OptimizerScheduler(v, total_steps=3, lr=1e-3),
        st.sampled_from([None, nn.Linear(2, 2), "sgd"]).map(lambda v: (v, TypeError)),
    ),
    Case(
        "OptimizerScheduler.load_state_dict-state_dict",
        "state_dict",
        lambda v: _sched().load_state_dict(v),
        st.one_of(
            st.sampled_from([{}, None, "x", {"steps": 1}]).map(lambda v: (v, ValueError)),
            st.sampled_from([{"step": -1}]).map(lambda v: (v, ValueError)),
            st.sampled_from([{"step": "1"}, {"step": 1.5}]).map(lambda v: (v, TypeError)),
        ),
    ),
    Case(
        "is_no_decay-name",
        "name",
        lambda v: is_no_decay(v, torch.ones(2, 2)),
        st.sampled_from([None, 3, b"x"]).map(lambda v: (v, TypeError)),
    ),
    Case(
        "is_no_decay-param",
        "param",
        lambda v: is_no_decay("w", v),
        st.sampled_from([None, "w", [1.0]]).map(lambda v: (v, TypeError)),
    ),
    Case(
        "is_no_decay-no_decay_names",
        "no_decay_names",
        lambda v: is_no_decay("w", torch.ones(2, 2), v),
        st.just(("token", TypeError)),
    ),
    Case(
        "param_groups_for_weight_decay-weight_decay",
        "weight_decay",
        lambda v: param_groups_for_weight_decay(nn.Linear(2, 2), weight_decay=v),
        bad_float(0.0),
    ),
    Case(
        "param_groups_for_weight_decay-sources",
        "sources",
        lambda v: param_groups_for_weight_decay(*v, weight_decay=0.1),
        st.one_of(
            st.just(()).map(lambda v: (v, ValueError)),
            st.sampled_from([("x",), (torch.ones(2),), (nn.Linear(2, 2).parameters(),)]).map(lambda v: (v, TypeError)),
        ),
    ),
    Case(
        "param_groups_for_weight_decay-no_decay_names",
        "no_decay_names",
        lambda v: param_groups_for_weight_decay(nn.Linear(2, 2), weight_decay=0.1, no_decay_names=v),
        st.sampled_from(["bias", [""], [3], None]).map(lambda v: (v, TypeError)),
    ),
    Case(
        "save_checkpoint-path",
        "path",
        lambda v: save_checkpoint(v, {}),
        st.sampled_from([None, 3, ["a"]]).map(lambda v: (v, TypeError)),
    ),
    Case(
        "save_checkpoint-state",
        "state",
        lambda v: save_checkpoint(_TMP_FILE, v),
        st.sampled_from([None, [1], "x"]).map(lambda v: (v, TypeError)),
    ),
    Case(
        "save_checkpoint-keep_previous",
        "keep_previous",
        lambda v: save_checkpoint(_TMP_FILE, {}, keep_previous=v),
        bad_bool(),
    ),
    Case(
        "load_checkpoint-path",
        "path",
        lambda v: load_checkpoint(v),
        st.sampled_from([None, 3]).map(lambda v: (v, TypeError)),
    ),
    Case("BestCheckpoints-keep", "keep", lambda v: BestCheckpoints(_TMP_DIR, keep=v), bad_int(1)),
    Case(
        "load_latest_good-directory",
        "directory",
        lambda v: load_latest_good(v),
        st.one_of(
            st.sampled_from([None, 3, ["a"]]).map(lambda v: (v, TypeError)),
            # CheckpointError is a ValueError: a missing folder, a file instead of a folder
            st.sampled_from([f"{_TMP_DIR}/missing-run", __file__]).map(lambda v: (v, ValueError)),
        ),
    ),
    Case(
        "load_latest_good-last_name",
        "last_name",
        lambda v: load_latest_good(_TMP_DIR, last_name=v),
        st.one_of(
            st.sampled_from([None, 3, b"last.pt"]).map(lambda v: (v, TypeError)),
            st.sampled_from(["", "../last.pt", "sub/last.pt", f"{_TMP_DIR}/last.pt"]).map(lambda v: (v, ValueError)),
        ),
    ),
    Case(
        "load_latest_good-pattern",
        "pattern",
        lambda v: load_latest_good(_TMP_DIR, pattern=v),
        st.one_of(
            st.sampled_from([None, 3]).map(lambda v: (v, TypeError)),
            st.sampled_from(["", "/tmp/*.pt"]).map(lambda v: (v, ValueError)),
        ),
    ),
    Case(
        "load_latest_good-weights_only",
        "weights_only",
        lambda v: load_latest_good(_TMP_DIR, weights_only=v),
        bad_bool(),
    ),
    Case(
        "BestCheckpoints-mode",
        "mode",
        lambda v: BestCheckpoints(_TMP_DIR, mode=v),
        bad_choice(("max", "min")),
    ),
    Case(
        "BestCheckpoints-metric_name",
        "metric_name",
        lambda v: BestCheckpoints(_TMP_DIR, metric_name=v),
        st.one_of(
            st.sampled_from(["a/b", "", "a b", "x.y"]).map(lambda v: (v, ValueError)),
            st.sampled_from([None, 3]).map(lambda v: (v, TypeError)),
        ),
    ),
    Case(
        "BestCheckpoints.update-metric",
        "metric",
        lambda v: BestCheckpoints(_TMP_DIR).update(1, v, {}),
        bad_float(),
    ),
    Case(
        "BestCheckpoints.update-step",
        "step",
        lambda v: BestCheckpoints(_TMP_DIR).update(v, 0.5, {}),
        bad_int(0),
    ),
    Case(
        "set_rng_state-state",
        "state",
        lambda v: set_rng_state(v),
        st.one_of(
            st.sampled_from([None, "x", [1]]).map(lambda v: (v, TypeError)),
            st.just({"bogus": 1}).map(lambda v: (v, ValueError)),
        ),
    ),
]

# ---- distributed (single process: the argument checks still run)
CASES += [
    Case(
        "gather_with_grad-x",
        "x",
        gather_with_grad,
        st.sampled_from(["x", 3, None]).map(lambda v: (v, TypeError)),
    ),
    Case(
        "all_reduce_with_grad-x",
        "x",
        all_reduce_with_grad,
        st.sampled_from(["x", [1.0], None]).map(lambda v: (v, TypeError)),
    ),
    Case("DropPath-drop_prob", "drop_prob", _kw(DropPath, "drop_prob"), bad_float(0.0, 1.0, max_inclusive=False)),
    Case("drop_path-drop_prob", "drop_prob", _kw(drop_path, "drop_prob", x=torch.ones(4, 2)),
         bad_float(0.0, 1.0, max_inclusive=False)),
    Case(
        "drop_path-sample_seeds",
        "sample_seeds",
        _kw(drop_path, "sample_seeds", x=torch.ones(4, 2), drop_prob=0.1),
        st.sampled_from([("x", TypeError), (torch.ones(4), TypeError), (torch.arange(3), ValueError),
                         (torch.zeros(2, 2, dtype=torch.long), ValueError)]),
    ),
    Case(
        "sample_seeded_drop_path-sample_seeds",
        "sample_seeds",
        lambda v: sample_seeded_drop_path(DropPath(drop_prob=0.1), v).__enter__(),
        st.sampled_from([("x", TypeError), (torch.ones(3), TypeError), (torch.zeros(2, 2, dtype=torch.long),
                                                                        ValueError)]),
    ),
]

# ---- timm-compatible layers and the timm ViT adapter
# Layer factories (act_layer, norm_layer) that are not callable or build no nn.Module.
_BAD_FACTORY = st.sampled_from(["x", 3, int, lambda *a: "not a module"]).map(lambda v: (v, TypeError))
CASES += _ctor_cases(
    "Mlp",
    Mlp,
    {
        "in_features": bad_int(1),
        "hidden_features": bad_int(1, none_ok=True),  # 0 and False too: no silent default
        "out_features": bad_int(1, none_ok=True),
        "act_layer": st.one_of(_BAD_FACTORY, st.just((None, TypeError))),
        "norm_layer": _BAD_FACTORY,
        "bias": bad_bool(),
        "drop": bad_float(0.0, 1.0),
    },
    in_features=4,
)
CASES += _ctor_cases(
    "LayerScale",
    LayerScale,
    {"dim": bad_int(1), "init_values": bad_float(), "inplace": bad_bool()},
    dim=4,
)
CASES += _ctor_cases(
    "PatchEmbed",
    PatchEmbed,
    {
        "img_size": bad_grid(),
        "patch_size": bad_int(1),
        "in_chans": bad_int(1),
        "embed_dim": bad_int(1),
        "norm_layer": _BAD_FACTORY,
        "bias": bad_bool(),
    },
    img_size=8,
    patch_size=4,
    embed_dim=4,
)
_ANY_RANK = {"finite": False, "empty_ok": True, "bad_ranks": (0,)}  # (..., D): only a scalar is a bad rank
CASES += [
    Case("Mlp.forward-x", "x", lambda v: Mlp(4)(v), bad_float_tensor((2, 3, 4), size_dims=(2,), **_ANY_RANK)),
    Case("LayerScale.forward-x", "x", lambda v: LayerScale(4)(v), bad_float_tensor((2, 3, 4), size_dims=(2,), **_ANY_RANK)),
    Case(
        "PatchEmbed-img_size-divisible",
        "img_size",
        lambda v: PatchEmbed(img_size=v, patch_size=4),
        st.sampled_from([2, 6, (8, 10)]).map(lambda v: (v, ValueError)),
    ),
    Case(
        "PatchEmbed-patch_size-too-large",
        "patch_size",
        lambda v: PatchEmbed(img_size=8, patch_size=v),
        st.sampled_from([3, 5, 16]).map(lambda v: (v, ValueError)),
    ),
    Case(
        "PatchEmbed.forward-images",
        "images",
        lambda v: PatchEmbed(img_size=8, patch_size=4, embed_dim=4)(v),
        bad_float_tensor((2, 3, 8, 8), finite=False, size_dims=(1,)),  # dim 1: channels
    ),
    Case(
        "PatchEmbed.forward-images-size",
        "images",
        lambda v: PatchEmbed(img_size=8, patch_size=4, embed_dim=4)(torch.randn(1, 3, v, 8)),
        st.sampled_from([2, 6, 9]).map(lambda v: (v, ValueError)),
    ),
]


@functools.cache
def _timm_vit(**kw: Any) -> nn.Module:
    """A tiny timm ViT (4x4 grid of 4-pixel patches, one block), built without download."""
    base = {"img_size": 16, "patch_size": 4, "embed_dim": 16, "depth": 1, "num_heads": 2, "num_classes": 0}
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**base, **kw})


@functools.cache
def _timm_enc() -> TimmTokenEncoder:
    return TimmTokenEncoder(_timm_vit())


_FAKE_VIT = nn.Module()  # a ViT's attributes, but not a timm VisionTransformer
_FAKE_VIT.patch_embed = PatchEmbed(img_size=16, patch_size=4, embed_dim=16)
_FAKE_VIT.blocks = nn.ModuleList([TransformerBlock(16, num_heads=2)])
_FAKE_VIT.embed_dim = 16
CASES += _ctor_cases(
    "TimmTokenEncoder",
    lambda **kw: TimmTokenEncoder(**{"model": _timm_vit(), **kw}),
    {
        "model": st.sampled_from(["vit", None, nn.Linear(2, 2), _FAKE_VIT, _enc()]).map(lambda v: (v, TypeError)),
        "out_layers": st.one_of(
            st.sampled_from(["0", 0, (True,), (0.0,)]).map(lambda v: (v, TypeError)),
            st.sampled_from([(1,), (-2,), (0, 5)]).map(lambda v: (v, ValueError)),  # depth 1
        ),
    },
)
CASES += [
    Case(
        "TimmTokenEncoder-model-patch_drop",  # timm's random patch dropout breaks keep's order
        "model",
        lambda v: TimmTokenEncoder(_timm_vit(patch_drop_rate=v)),
        st.sampled_from([0.25, 0.5]).map(lambda v: (v, ValueError)),
    ),
    Case(
        "TimmTokenEncoder.from_timm-name",
        "name",
        lambda v: TimmTokenEncoder.from_timm(v, img_size=16, patch_size=4),
        st.one_of(
            st.sampled_from([3, None]).map(lambda v: (v, TypeError)),
            st.just("not_a_timm_model_xyz").map(lambda v: (v, ValueError)),
        ),
    ),
    Case("TimmTokenEncoder.forward-images", "images", lambda v: _timm_enc()(v), bad_float_tensor((2, 3, 16, 16))),
    Case(
        "TimmTokenEncoder.forward-keep",
        "keep",
        lambda v: _timm_enc()(torch.randn(2, 3, 16, 16), keep=v),
        st.one_of(bad_ids((2, 3), 16), st.just((torch.zeros(3, 2, dtype=torch.long), ValueError))),
    ),
    Case(
        "TimmTokenEncoder.forward-out_layers",
        "out_layers",
        lambda v: _timm_enc()(torch.randn(1, 3, 16, 16), out_layers=v),
        st.one_of(st.just("0").map(lambda v: (v, TypeError)), st.just((3,)).map(lambda v: (v, ValueError))),
    ),
    Case(
        "TimmTokenEncoder.forward-return_prefix",
        "return_prefix",
        lambda v: _timm_enc()(torch.randn(1, 3, 16, 16), return_prefix=v),
        bad_bool(),
    ),
    Case(
        "TimmTokenEncoder.set_grad_checkpointing-enable",
        "enable",
        lambda v: TimmTokenEncoder(_timm_vit()).set_grad_checkpointing(v),
        bad_bool(),
    ),
]


# ---- blocks added later: multi-crop, contrastive losses, quantizers, pooling, few-shot,
# fine-tuning, attention maps, diagnostics, resumable data order, non-finite guard, export


def _bad_seed() -> st.SearchStrategy:
    """Seeds go to ``torch.Generator.manual_seed``, which takes ints in [-2**63, 2**64)."""
    return bad_int(-(2**63), 2**64 - 1)


def _bad_device() -> st.SearchStrategy:
    return st.one_of(
        st.sampled_from(["foo", "cuda:-1", "cpu:x"]).map(lambda v: (v, ValueError)),
        st.sampled_from([1.5, [1], True]).map(lambda v: (v, TypeError)),
    )


def _mc(**kw: Any) -> MultiCropMasker:
    base = {"image_size": 32, "patch_size": 4, "global_size": 32, "local_size": 16, "local_crops": 2}
    return MultiCropMasker(**{**base, **kw})


@functools.cache
def _mc_default() -> MultiCropMasker:
    return _mc()


@functools.cache
def _vit() -> ViTEncoder:
    return _enc()


@functools.cache
def _masks3() -> Any:
    return _masker()(3, generator=torch.Generator().manual_seed(0))


_BOXES = torch.tensor([[[0, 0, 4, 4]], [[2, 1, 6, 7]]])  # (2, 1, 4) inside an 8x8 image
_MASKING_BAD = st.one_of(
    st.sampled_from([[1], "x", 3]).map(lambda v: (v, TypeError)),
    st.sampled_from([{"grid_size": 4}, {"bogus": 1}]).map(lambda v: (v, TypeError)),
    st.sampled_from([{"num_targets": 0}, {"levels": 9}, {"target_scale": (0.5, 0.1)}]).map(lambda v: (v, ValueError)),
)
CASES += _ctor_cases(
    "MultiCropMasker",
    _mc,
    {
        "image_size": bad_grid(),
        "patch_size": bad_int(1),
        "global_crops": bad_int(1),
        "local_crops": bad_int(0),
        "global_size": st.one_of(bad_int(4), st.sampled_from([6, 30, 33]).map(lambda v: (v, ValueError))),
        "local_size": st.one_of(bad_int(4), st.sampled_from([2, 10, 17]).map(lambda v: (v, ValueError))),
        "global_scale": PAIR_SCALE,
        "local_scale": PAIR_SCALE,
        "crop_aspect": PAIR_ASPECT,
        "global_masking": _MASKING_BAD,
        "local_masking": _MASKING_BAD,
    },
)
CASES += [
    Case(
        "MultiCropMasker-local_masking-without-local-crops",
        "local_masking",
        lambda v: _mc(local_crops=0, local_masking=v),
        st.sampled_from([{}, {"num_targets": 1}]).map(lambda v: (v, ValueError)),
    ),
    Case(
        "MultiCropMasker.__call__-images",
        "images",
        lambda v: _mc_default()(v),
        bad_float_tensor((2, 3, 32, 32), finite=False, size_dims=(2, 3)),
    ),
    Case(
        "MultiCropMasker.__call__-generator",
        "generator",
        lambda v: _mc_default()(torch.rand(1, 3, 32, 32), generator=v),
        st.one_of(st.integers(), st.text(max_size=2), st.just(torch.ones(1))).map(lambda v: (v, TypeError)),
    ),
    Case(
        "MultiCropCollator-masker",
        "masker",
        lambda v: MultiCropCollator(v),
        st.one_of(st.none(), st.text(max_size=2), st.sampled_from([_masker(), 3])).map(lambda v: (v, TypeError)),
    ),
    Case("MultiCropCollator-seed", "seed", lambda v: MultiCropCollator(_mc_default(), seed=v), bad_int(none_ok=True)),
    Case(
        "MultiCropCollator-collate_fn",
        "collate_fn",
        lambda v: MultiCropCollator(_mc_default(), collate_fn=v),
        st.one_of(st.none(), st.integers()).map(lambda v: (v, TypeError)),
    ),
    Case(
        "MultiCropCollator.__call__-samples",
        "samples",
        lambda v: MultiCropCollator(_mc_default(), seed=0)(v),
        st.one_of(
            st.sampled_from([[], ()]).map(lambda v: (v, ValueError)),
            st.sampled_from([None, 3, "ab", ["ab"]]).map(lambda v: (v, TypeError)),
        ),
    ),
    Case(
        "MultiCropCollator.__call__-samples-images",
        "images",  # what the collated samples are checked as
        lambda v: MultiCropCollator(_mc_default(), seed=0)([v]),
        st.one_of(
            st.sampled_from([torch.rand(3, 16, 16), torch.rand(3, 32, 31)]).map(lambda v: (v, ValueError)),
            st.just(torch.zeros(3, 32, 32, dtype=torch.uint8)).map(lambda v: (v, TypeError)),
        ),
    ),
]
CASES += _ctor_cases(
    "sample_crop_boxes",
    lambda **kw: sample_crop_boxes(**{"batch_size": 2, "image_size": 8, "num_crops": 2, **kw}),
    {
        "batch_size": bad_int(1),
        "image_size": bad_grid(),
        "num_crops": bad_int(0),
        "scale": PAIR_SCALE,
        "aspect": PAIR_ASPECT,
        "generator": st.sampled_from([1, "g", torch.ones(1)]).map(lambda v: (v, TypeError)),
        "device": _bad_device(),
    },
)
CASES += _ctor_cases(
    "crop_and_resize",
    lambda **kw: crop_and_resize(**{"images": torch.rand(2, 3, 8, 8), "boxes": _BOXES, "size": 4, **kw}),
    {
        "images": bad_float_tensor((2, 3, 8, 8), finite=False, size_dims=()),
        "boxes": st.one_of(
            st.sampled_from([_BOXES.float(), _BOXES.bool(), "x", _BOXES.tolist()]).map(lambda v: (v, TypeError)),
            st.sampled_from(
                [
                    _BOXES[0],  # rank 2
                    _BOXES[:1],  # batch 1 for 2 images
                    torch.cat([_BOXES, _BOXES[..., :1]], dim=-1),  # 5 numbers per box
                    torch.tensor([[[0, 0, 4, 4]], [[-1, 0, 2, 2]]]),  # negative top
                    torch.tensor([[[0, 0, 4, 4]], [[4, 0, 5, 2]]]),  # past the bottom
                    torch.tensor([[[0, 0, 4, 4]], [[0, 0, 0, 2]]]),  # zero height
                    torch.tensor([[[0, 7, 4, 2]], [[0, 0, 4, 4]]]),  # past the right edge
                ]
            ).map(lambda v: (v, ValueError)),
        ),
        "size": bad_grid(),
    },
)

# ---- contrastive losses
_Z = torch.randn(6, 4)
for _name, _fn in (
    ("NTXentLoss.forward", lambda **kw: NTXentLoss()(**kw)),
    ("ntxent_loss", ntxent_loss),
):
    CASES += _ctor_cases(
        _name,
        lambda _fn=_fn, **kw: _fn(**{"z_a": _Z, "z_b": _Z.flip(0), **kw}),
        {"z_a": bad_float_tensor((6, 4)), "z_b": bad_float_tensor((6, 4))},
    )
    CASES.append(
        Case(
            f"{_name}-batch-of-one",
            "z_a",
            lambda v, _fn=_fn: _fn(z_a=v, z_b=v),  # one pair has no negative
            st.just((torch.randn(1, 4), ValueError)),
        )
    )
_TEMPERATURE = bad_float(0.0, min_inclusive=False)
CASES += _ctor_cases(
    "NTXentLoss",
    NTXentLoss,
    {"temperature": _TEMPERATURE, "gather_distributed": bad_bool()},
)
CASES += _ctor_cases(
    "ntxent_loss",
    lambda **kw: ntxent_loss(_Z, _Z.flip(0), **kw),
    {"temperature": _TEMPERATURE, "gather_distributed": bad_bool()},
)
for _name, _fn in (
    ("InfoNCELoss.forward", lambda **kw: InfoNCELoss()(**kw)),
    ("info_nce_loss", info_nce_loss),
):
    CASES += _ctor_cases(
        _name,
        lambda _fn=_fn, **kw: _fn(**{"query": _Z, "key": _Z.flip(0), **kw}),
        {"query": bad_float_tensor((6, 4)), "key": bad_float_tensor((6, 4))},
    )
    CASES.append(
        Case(
            f"{_name}-batch-of-one",
            "query",
            lambda v, _fn=_fn: _fn(query=v, key=v),
            st.just((torch.randn(1, 4), ValueError)),
        )
    )
CASES += _ctor_cases(
    "info_nce_loss",
    lambda **kw: info_nce_loss(_Z, _Z.flip(0), **kw),
    {
        "temperature": st.one_of(
            _TEMPERATURE.filter(lambda p: not isinstance(p[0], torch.Tensor)),  # 0-dim float tensors are valid
            st.sampled_from([torch.tensor(1), torch.tensor(True)]).map(lambda v: (v, TypeError)),
            st.sampled_from([torch.tensor([0.1]), torch.tensor(NAN), torch.tensor(-0.1), torch.tensor(0.0)]).map(
                lambda v: (v, ValueError)
            ),
        ),
        "symmetric": bad_bool(),
        "gather_distributed": bad_bool(),
    },
)
CASES += _ctor_cases(
    "InfoNCELoss",
    InfoNCELoss,
    {
        "init_temperature": bad_float(0.05, 0.2, min_inclusive=False, max_inclusive=False),
        "temperature_range": st.one_of(
            bad_pair(0.0, None, low_exclusive=True),
            st.sampled_from([(0.1, 0.1), (0.0, 0.2)]).map(lambda v: (v, ValueError)),
        ),
        "learnable": bad_bool(),
        "symmetric": bad_bool(),
        "gather_distributed": bad_bool(),
    },
)

# ---- quantizers
_CODEBOOK = torch.randn(4, 3)
CASES += _ctor_cases(
    "VectorQuantizer",
    lambda **kw: VectorQuantizer(**{"num_codes": 4, "dim": 3, "buffer_size": 8, **kw}),
    {
        "num_codes": bad_int(1, 2**24),
        "dim": bad_int(1),
        "decay": bad_float(0.0, 1.0, max_inclusive=False),
        "commitment_weight": bad_float(0.0),
        "dead_code_threshold": bad_float(0.0),
        "refresh_every": bad_int(1),
        "buffer_size": bad_int(1),
        "eps": bad_float(0.0, min_inclusive=False),
        "gather_distributed": bad_bool(),
        "init": bad_choice(("data", "normal")),
        "seed": bad_int(0),
    },
)
CASES += [
    Case(
        "VectorQuantizer.forward-z",
        "z",
        lambda v: VectorQuantizer(num_codes=4, dim=3, buffer_size=8)(v),
        bad_float_tensor((2, 5, 3), size_dims=(2,), bad_ranks=(0,)),
    ),
    Case(
        "VectorQuantizer.forward-z-eval",
        "z",
        lambda v: VectorQuantizer(num_codes=4, dim=3, buffer_size=8).eval()(v),
        bad_float_tensor((5, 3), size_dims=(1,), bad_ranks=(0,)),
    ),
    Case(
        "VectorQuantizer.set_codebook_-codebook",
        "codebook",
        lambda v: VectorQuantizer(num_codes=4, dim=3, buffer_size=8).set_codebook_(v),
        bad_float_tensor((4, 3), size_dims=(0, 1)),
    ),
]
for _fn in (squared_distances, nearest_codes):
    CASES += _ctor_cases(
        _fn.__name__,
        lambda _fn=_fn, **kw: _fn(**{"z": torch.randn(5, 3), "codebook": _CODEBOOK, **kw}),
        {
            "z": bad_float_tensor((5, 3), empty_ok=True),
            "codebook": bad_float_tensor((4, 3), size_dims=(1,)),
        },
    )
CASES += [
    Case(
        "nearest_codes-chunk_size",
        "chunk_size",
        lambda v: nearest_codes(torch.randn(5, 3), _CODEBOOK, chunk_size=v),
        bad_int(1, none_ok=True),
    ),
]
CASES += _ctor_cases(
    "codebook_from_ema",
    lambda **kw: codebook_from_ema(**{"cluster_size": torch.ones(4), "embed_sum": _CODEBOOK, **kw}),
    {
        "cluster_size": st.one_of(
            bad_float_tensor((4,), size_dims=(0,), bad_ranks=(0, 2)),
            st.sampled_from([torch.tensor([1.0, -1.0, 1.0, 1.0]), torch.zeros(4)]).map(lambda v: (v, ValueError)),
        ),
        "embed_sum": bad_float_tensor((4, 3), size_dims=(0,)),
        "eps": bad_float(0.0, min_inclusive=False),
    },
)
CASES += [
    Case(
        "code_perplexity-counts",
        "counts",
        code_perplexity,
        st.one_of(
            st.sampled_from(["x", [1, 2], torch.tensor([1j, 2.0])]).map(lambda v: (v, TypeError)),
            st.sampled_from(
                [
                    torch.tensor([-1.0, 2.0]),
                    torch.tensor([NAN, 2.0]),
                    torch.tensor([INF, 2.0]),
                    torch.ones(2, 2),
                    torch.tensor(3.0),
                    torch.ones(0),
                ]
            ).map(lambda v: (v, ValueError)),
        ),
    ),
]

# ---- pooling
CASES += _ctor_cases(
    "AttentionPool",
    lambda **kw: AttentionPool(**{"dim": 8, "num_heads": 2, **kw}),
    {
        "dim": bad_int(1),
        "num_queries": bad_int(1),
        "num_heads": st.one_of(bad_int(1), st.sampled_from([3, 5, 16]).map(lambda v: (v, ValueError))),
        "out_dim": bad_int(1, none_ok=True),
        "qkv_bias": bad_bool(),
        "norm": bad_bool(),
        "allow_empty": bad_bool(),
        "init_std": bad_float(0.0, min_inclusive=False),
    },
)
_VALID_BAD = st.one_of(
    st.sampled_from([torch.ones(2, 3), torch.ones(2, 3, dtype=torch.long), "x"]).map(lambda v: (v, TypeError)),
    st.sampled_from(
        [
            torch.ones(2, 4, dtype=torch.bool),
            torch.ones(3, dtype=torch.bool),
            torch.tensor([[True, False, False], [False, False, False]]),  # sample 1 has no token
        ]
    ).map(lambda v: (v, ValueError)),
)
CASES += [
    Case(
        "AttentionPool.forward-x",
        "x",
        lambda v: AttentionPool(dim=8, num_heads=2)(v),
        bad_float_tensor((2, 3, 8), size_dims=(2,)),
    ),
    Case(
        "AttentionPool.forward-valid",
        "valid",
        lambda v: AttentionPool(dim=8, num_heads=2)(torch.randn(2, 3, 8), v),
        _VALID_BAD,
    ),
]
CASES += _ctor_cases(
    "attention_pool",
    lambda **kw: attention_pool(
        **{"queries": torch.randn(2, 8), "keys": torch.randn(2, 3, 8), "values": torch.randn(2, 3, 6), **kw}
    ),
    {
        "queries": st.one_of(
            bad_float_tensor((2, 8), size_dims=(1,), bad_ranks=(1, 4)),
            st.just((torch.randn(3, 2, 8), ValueError)),  # batch 3 for keys of batch 2
        ),
        "keys": bad_float_tensor((2, 3, 8), size_dims=(1, 2)),
        "values": bad_float_tensor((2, 3, 6), size_dims=(1,)),
        "valid": _VALID_BAD,
        "num_heads": st.one_of(bad_int(1), st.sampled_from([4, 5]).map(lambda v: (v, ValueError))),
        "allow_empty": bad_bool(),
    },
)

# ---- evaluation: few-shot, fine-tuning, attention maps, diagnostics
_LABELS = torch.arange(12) % 3  # 3 classes of 4 samples
_LABELS_BAD = st.one_of(
    st.sampled_from([_LABELS.float(), _LABELS.bool(), "x", _LABELS.tolist()]).map(lambda v: (v, TypeError)),
    st.sampled_from([_LABELS[None], _LABELS[:0]]).map(lambda v: (v, ValueError)),
)
CASES += _ctor_cases(
    "sample_episodes",
    lambda **kw: sample_episodes(
        **{"labels": _LABELS, "n_way": 2, "k_shot": 1, "n_query": 1, "num_episodes": 2, **kw}
    ),
    {
        "labels": _LABELS_BAD,
        "n_way": bad_int(2, 3),  # more ways than the 3 classes
        "k_shot": bad_int(1, 3),  # k_shot + n_query > 4 samples per class
        "n_query": bad_int(1, 3),
        "num_episodes": bad_int(1),
        "generator": st.sampled_from([3, "g", torch.ones(1)]).map(lambda v: (v, TypeError)),
    },
)
CASES += _ctor_cases(
    "few_shot_accuracy",
    lambda **kw: few_shot_accuracy(
        **{
            "features": torch.randn(12, 3),
            "labels": _LABELS,
            "n_way": 2,
            "k_shot": 1,
            "n_query": 1,
            "num_episodes": 2,
            **kw,
        }
    ),
    {
        "features": bad_float_tensor((12, 3), size_dims=(0,)),
        "labels": st.one_of(_LABELS_BAD, st.just((_LABELS[:11], ValueError))),
        "k_shot": st.one_of(
            bad_int(1, 3).filter(lambda p: not isinstance(p[0], list)),  # a list of shots is valid
            st.sampled_from([(), [], (1, "2"), (1, True), (1, None)]).map(lambda v: (v, TypeError)),
            st.sampled_from([(1, 0), (1, 9), [-1]]).map(lambda v: (v, ValueError)),
        ),
        "n_way": bad_int(2, 3),
        "n_query": bad_int(1, 3),
        "num_episodes": bad_int(1),
        "metric": bad_choice(("cosine", "euclidean")),
        "center": bad_bool(),
        "seed": _bad_seed(),
    },
)
CASES += _ctor_cases(
    "finetune_param_groups",
    lambda **kw: finetune_param_groups(
        **{
            "encoder": _vit(),
            "head": nn.Linear(16, 2),
            "encoder_lr": 1e-3,
            "head_lr": 1e-2,
            "weight_decay": 0.05,
            **kw,
        }
    ),
    {
        "encoder": st.sampled_from(["x", None, torch.ones(2)]).map(lambda v: (v, TypeError)),
        "head": st.one_of(
            st.sampled_from(["x", None, torch.ones(2)]).map(lambda v: (v, TypeError)),
            st.builds(lambda: _vit().norm).map(lambda v: (v, ValueError)),  # shared with the encoder
        ),
        "encoder_lr": bad_float(0.0),
        "head_lr": bad_float(0.0, min_inclusive=False),
        "weight_decay": bad_float(0.0),
        "layer_decay": bad_float(0.0, 1.0, min_inclusive=False, none_ok=True),
    },
)
CASES += [
    Case(
        "finetune_param_groups-layer_decay-no-blocks",
        "layer_decay",
        lambda v: finetune_param_groups(
            nn.Linear(2, 2), nn.Linear(2, 2), encoder_lr=1.0, head_lr=1.0, weight_decay=0.0, layer_decay=v
        ),
        st.floats(0.1, 1.0).map(lambda v: (v, ValueError)),
    ),
]
_FT_X = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
_FT_LOADER = [(_FT_X[:4], torch.tensor([0, 1, 0, 1])), (_FT_X[4:], torch.tensor([1, 0, 1, 0]))]


def _ft(**kw: Any) -> Any:
    base = {
        "encoder": nn.Linear(2, 4),
        "train_loader": _FT_LOADER,
        "val_loader": _FT_LOADER,
        "num_classes": 2,
        "pool": "none",
        "epochs": 1,
    }
    return finetune(**{**base, **kw})


def _ft_batches(labels: Any) -> list[tuple[torch.Tensor, Any]]:
    return [(_FT_X[:4], labels)]


_FT_LABELS_BAD = st.one_of(
    st.sampled_from([torch.tensor([0.0, 1.0, 0.0, 1.0]), torch.tensor([True, False, True, False])]).map(
        lambda v: (_ft_batches(v), TypeError)
    ),
    st.sampled_from([torch.tensor([0, 1, 2, 1]), torch.tensor([0, -1, 0, 1])]).map(
        lambda v: (_ft_batches(v), ValueError)
    ),
    st.just(([(_FT_X[:0], torch.zeros(0, dtype=torch.long))], ValueError)),  # an empty batch
)
CASES += _ctor_cases(
    "finetune",
    _ft,
    {
        "encoder": st.sampled_from(["x", None, lambda x: x]).map(lambda v: (v, TypeError)),
        "train_loader": st.one_of(
            _FT_LABELS_BAD,
            st.just([]).map(lambda v: (v, ValueError)),
            st.sampled_from([iter(_FT_LOADER), None, 3]).map(lambda v: (v, TypeError)),
        ),
        "val_loader": st.one_of(_FT_LABELS_BAD, st.just([]).map(lambda v: (v, ValueError))),
        "num_classes": bad_int(2, none_ok=True),
        "head": st.sampled_from(["x", 3, lambda x: x]).map(lambda v: (v, TypeError)),
        "epochs": bad_int(1),
        "encoder_lr": bad_float(0.0),
        "head_lr": bad_float(0.0, min_inclusive=False),
        "weight_decay": bad_float(0.0),
        "layer_decay": st.one_of(
            bad_float(0.0, 1.0, min_inclusive=False, none_ok=True),
            st.just((0.5, ValueError)),  # a Linear encoder has no blocks to decay
        ),
        "warmup_epochs": bad_float(0.0, 1.0),  # <= epochs = 1
        "label_smoothing": bad_float(0.0, 1.0, max_inclusive=False),
        "clip_grad": bad_float(0.0, min_inclusive=False, none_ok=True),
        "pool": bad_choice(("mean", "none")),
        "device": _bad_device(),
        "amp_dtype": st.sampled_from([torch.float32, torch.long, "bf16"]).map(lambda v: (v, ValueError)),
        "inplace": bad_bool(),
        "seed": _bad_seed(),
    },
)
CASES += [
    Case(
        "finetune-num_classes-missing",
        "num_classes",
        lambda v: _ft(num_classes=v),
        st.just((None, ValueError)),  # no head to size without it
    ),
    Case(
        "finetune-train_loader-batches",
        "loader",  # shared batch check of the evaluation loaders
        lambda v: _ft(train_loader=v),
        st.sampled_from([["ab"], [(_FT_X[:4],)], [("x", torch.zeros(4, dtype=torch.long))]]).map(
            lambda v: (v, TypeError)
        ),
    ),
]
_NO_BLOCKS = nn.Module()
_NO_BLOCKS.blocks = nn.ModuleList()
CASES += _ctor_cases(
    "attention_maps",
    lambda **kw: attention_maps(**{"encoder": _vit(), "images": torch.randn(2, 3, 16, 16), **kw}),
    {
        "encoder": st.sampled_from(["x", None, nn.Linear(2, 2), _NO_BLOCKS]).map(lambda v: (v, TypeError)),
        "images": bad_float_tensor((2, 3, 16, 16)),
        "layer": bad_int(-1, 0),  # depth 1
        "keep": st.one_of(bad_ids((2, 3), 16), st.just((torch.zeros(3, 2, dtype=torch.long), ValueError))),
    },
)
_ATTN = Attention(16, num_heads=2)
CASES += _ctor_cases(
    "attention_probs",
    lambda **kw: attention_probs(**{"attn": _ATTN, "x": torch.randn(2, 5, 16), **kw}),
    {
        "attn": st.sampled_from(["x", None, nn.Linear(16, 48)]).map(lambda v: (v, TypeError)),
        "x": bad_float_tensor((2, 5, 16), finite=False, empty_ok=True, size_dims=(2,)),
        "rope": st.sampled_from([torch.ones(5, 4), (torch.ones(5, 4),), "x"]).map(lambda v: (v, TypeError)),
        "attn_mask": st.one_of(
            st.sampled_from([torch.ones(2, 1, 1, 5), torch.ones(2, 1, 1, 5, dtype=torch.long)]).map(
                lambda v: (v, TypeError)
            ),
            st.sampled_from(
                [
                    torch.ones(2, 5, dtype=torch.bool),
                    torch.ones(2, 1, 1, 6, dtype=torch.bool),
                    torch.ones(3, 1, 1, 5, dtype=torch.bool),
                    torch.ones(2, 1, 4, 5, dtype=torch.bool),
                ]
            ).map(lambda v: (v, ValueError)),
        ),
    },
)
_MAPS = torch.rand(1, 2, 16, 16)
_MAP_GRID_BAD = st.one_of(bad_grid(), st.sampled_from([3, (4, 5), (16, 2)]).map(lambda v: (v, ValueError)))
CASES += _ctor_cases(
    "query_attention",
    lambda **kw: query_attention(**{"maps": _MAPS, "grid_size": 4, "query": 5, **kw}),
    {
        "maps": bad_float_tensor((1, 2, 16, 16), finite=False, size_dims=(2, 3)),
        "grid_size": _MAP_GRID_BAD,
        "query": st.one_of(
            # a list of two ints is a valid (row, col)
            bad_int(0, 15).filter(lambda p: not (isinstance(p[0], list) and len(p[0]) == 2)),
            st.sampled_from([(0, 4), (-1, 0), (4, 0)]).map(lambda v: (v, ValueError)),
            st.sampled_from([(1,), (1.0, 2), ("1", 2), (1, 2, 3)]).map(lambda v: (v, TypeError)),
        ),
    },
)
CASES += _ctor_cases(
    "received_attention",
    lambda **kw: received_attention(**{"maps": _MAPS, "grid_size": 4, **kw}),
    {
        "maps": bad_float_tensor((1, 2, 16, 16), finite=False, size_dims=(2, 3)),
        "grid_size": _MAP_GRID_BAD,
    },
)
CASES += _ctor_cases(
    "codebook_usage",
    lambda **kw: codebook_usage(**{"codes": torch.tensor([0, 1, 3]), "num_codes": 4, **kw}),
    {
        "codes": st.one_of(
            st.sampled_from([torch.tensor([0.0, 1.0]), torch.tensor([True]), "x", [0, 1]]).map(
                lambda v: (v, TypeError)
            ),
            st.sampled_from([torch.tensor([0, 4]), torch.tensor([[-1, 0]])]).map(lambda v: (v, ValueError)),
        ),
        "num_codes": st.one_of(bad_int(1), st.just((3, ValueError))),  # code 3 is not in [0, 3)
    },
)
CASES += _ctor_cases(
    "embedding_diagnostics",
    lambda **kw: embedding_diagnostics(**{"z": torch.randn(6, 3), **kw}),
    {
        "z": st.one_of(bad_float_tensor((6, 3), size_dims=()), st.just((torch.randn(1, 3), ValueError))),
        "codes": st.just((torch.tensor([0, 1]), ValueError)),  # without num_codes
        "num_codes": st.just((4, ValueError)),  # without codes
        "max_samples": bad_int(2),
        "seed": _bad_seed(),
        "isotropy_method": bad_choice(("ratio", "entropy")),
        "uniformity_t": bad_float(0.0, min_inclusive=False),
        "dead_threshold": bad_float(0.0),
    },
)
CASES += [
    Case(
        "embedding_diagnostics-codes-with-num_codes",
        "codes",
        lambda v: embedding_diagnostics(torch.randn(6, 3), codes=v, num_codes=4),
        st.one_of(
            st.sampled_from([torch.tensor([0, 4]), torch.tensor([-2])]).map(lambda v: (v, ValueError)),
            st.sampled_from([torch.tensor([0.0]), torch.tensor([True]), "x"]).map(lambda v: (v, TypeError)),
        ),
    ),
    Case(
        "embedding_diagnostics-num_codes-type",
        "num_codes",
        lambda v: embedding_diagnostics(torch.randn(6, 3), codes=torch.tensor([0, 1]), num_codes=v),
        bad_int(2, none_ok=True),  # 1 code cannot hold the id 1
    ),
]

# ---- training: resumable data order, non-finite guard
CASES += _ctor_cases(
    "ResumableSampler",
    lambda **kw: ResumableSampler(**{"data_source": 10, "global_batch_size": 2, **kw}),
    {
        "data_source": st.one_of(
            st.sampled_from(["x", None, 1.5, True]).map(lambda v: (v, TypeError)),
            st.sampled_from([0, -3, []]).map(lambda v: (v, ValueError)),
        ),
        "global_batch_size": bad_int(1, 10),  # more than the 10 samples
        "rank": bad_int(0, 0),  # world_size 1
        "world_size": st.one_of(bad_int(1), st.sampled_from([3, 4]).map(lambda v: (v, ValueError))),
        "seed": bad_int(),
        "shuffle": bad_bool(),
    },
)
CASES += [
    Case(
        "ResumableSampler-global_batch_size-multiple",
        "global_batch_size",
        lambda v: ResumableSampler(10, global_batch_size=v, world_size=2),
        st.sampled_from([1, 3, 5]).map(lambda v: (v, ValueError)),
    ),
    Case(
        "ResumableSampler.set_epoch-epoch",
        "epoch",
        lambda v: ResumableSampler(10, global_batch_size=2).set_epoch(v),
        bad_int(0),
    ),
    Case(
        "ResumableSampler.set_epoch-start_batch",
        "start_batch",
        lambda v: ResumableSampler(10, global_batch_size=2).set_epoch(0, start_batch=v),
        bad_int(0, 5),  # 5 batches per epoch
    ),
    Case(
        "ResumableSampler.global_batch-batch",
        "batch",
        lambda v: ResumableSampler(10, global_batch_size=2).global_batch(v),
        bad_int(0, 4),
    ),
    Case(
        "SeededDataset-dataset",
        "dataset",
        SeededDataset,
        st.sampled_from([3, None, 1.5, iter([1])]).map(lambda v: (v, TypeError)),
    ),
    Case(
        "SeededDataset.__getitem__-key",
        "key",
        lambda v: SeededDataset([torch.zeros(1)] * 3)[v],
        st.one_of(
            st.sampled_from([(0, "a"), (0, 1.5), (0, None), (0, True)]).map(lambda v: (v, TypeError)),
            st.sampled_from([(), (0,), (0, 1, 2), (0, 2**64), (0, -(2**63) - 1)]).map(lambda v: (v, ValueError)),
        ),
    ),
    Case(
        "sample_seed-parts",
        "parts",
        lambda v: sample_seed(*v),
        st.sampled_from([(), ("a",), (1.5,), (None,), (True,), (1, torch.tensor(2)), (1, "2")]).map(
            lambda v: (v, TypeError)
        ),
    ),
    Case("NonFiniteGuard-patience", "patience", lambda v: NonFiniteGuard(patience=v), bad_int(1)),
    Case(
        "NonFiniteGuard.check-loss",
        "loss",
        lambda v: NonFiniteGuard().check(v),
        st.one_of(
            st.sampled_from([1.0, None, "x", [1.0]]).map(lambda v: (v, TypeError)),
            st.just((torch.ones(0), ValueError)),
        ),
    ),
    Case(
        "NonFiniteGuard.check-grad_norms",
        "grad_norms",
        lambda v: NonFiniteGuard().check(torch.tensor(1.0), *v),
        st.sampled_from([("x",), (None,), (True,), ([1.0],), (1.0, "2")]).map(lambda v: (v, TypeError)),
    ),
    Case(
        "NonFiniteGuard.check-step",
        "step",
        lambda v: NonFiniteGuard().check(torch.tensor(1.0), step=v),
        bad_int(none_ok=True),
    ),
    Case(
        "NonFiniteGuard.load_state_dict-state",
        "state",
        lambda v: NonFiniteGuard().load_state_dict(v),
        st.one_of(
            st.sampled_from([None, "x", [1]]).map(lambda v: (v, TypeError)),
            st.sampled_from([{}, {"skipped": 0}]).map(lambda v: (v, ValueError)),
            st.sampled_from(
                [
                    {"skipped": -1, "consecutive": 0, "last_skipped_step": None},
                    {"skipped": 0, "consecutive": -2, "last_skipped_step": 3},
                ]
            ).map(lambda v: (v, ValueError)),
            st.sampled_from(
                [
                    {"skipped": "1", "consecutive": 0, "last_skipped_step": None},
                    {"skipped": 0, "consecutive": 0, "last_skipped_step": "3"},
                    {"skipped": 0, "consecutive": 1.0, "last_skipped_step": None},
                ]
            ).map(lambda v: (v, TypeError)),
        ),
    ),
]

# ---- masks of a global batch, split by rank
CASES += [
    Case("MultiBlockMasks.rows-start", "start", lambda v: _masks3().rows(v, 3), bad_int(0, 2)),
    Case("MultiBlockMasks.rows-stop", "stop", lambda v: _masks3().rows(0, v), bad_int(1, 3)),
    Case(
        "MultiBlockMasks.rows-inverted",
        "stop",
        lambda v: _masks3().rows(2, v),
        st.sampled_from([0, 1, 2]).map(lambda v: (v, ValueError)),  # stop <= start
    ),
]

# ---- encoders: the tensor-only view and torch.export
CASES += [
    Case(
        "EncoderTokens-encoder",
        "encoder",
        EncoderTokens,
        st.sampled_from(["x", None, 3, lambda x: x]).map(lambda v: (v, TypeError)),
    ),
    Case(
        "EncoderTokens.forward-images",
        "images",
        lambda v: EncoderTokens(_vit())(v),
        bad_float_tensor((2, 3, 16, 16)),
    ),
    Case(
        "EncoderTokens.forward-keep",
        "keep",
        lambda v: EncoderTokens(_vit())(torch.randn(2, 3, 16, 16), v),
        st.one_of(bad_ids((2, 3), 16), st.just((torch.zeros(3, 2, dtype=torch.long), ValueError))),
    ),
    Case(
        "EncoderTokens.forward-valid",
        "valid",
        lambda v: EncoderTokens(_vit())(torch.randn(2, 3, 16, 16), torch.zeros(2, 3, dtype=torch.long), v),
        st.one_of(
            st.sampled_from([torch.ones(2, 3), torch.ones(2, 3, dtype=torch.long), "x"]).map(
                lambda v: (v, TypeError)
            ),
            st.sampled_from([torch.ones(2, 4, dtype=torch.bool), torch.ones(3, dtype=torch.bool)]).map(
                lambda v: (v, ValueError)
            ),
        ),
    ),
    Case(
        "EncoderTokens.forward-valid-without-keep",
        "valid",
        lambda v: EncoderTokens(_vit())(torch.randn(2, 3, 16, 16), None, v),
        st.just((torch.ones(2, 3, dtype=torch.bool), ValueError)),
    ),
]
CASES += _ctor_cases(
    "export_encoder",
    lambda **kw: export_encoder(**{"encoder": _vit(), "images": torch.randn(2, 3, 16, 16), **kw}),
    {
        "encoder": st.sampled_from(["x", None, lambda x: x]).map(lambda v: (v, TypeError)),
        # only what is checked before tracing starts (tracing is slow to start)
        "images": bad_float_tensor((2, 3, 16, 16), finite=False, size_dims=()),
        "keep": st.one_of(
            st.sampled_from(["x", torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.bool)]).map(
                lambda v: (v, TypeError)
            ),
            st.sampled_from([torch.zeros(3, 2, dtype=torch.long), torch.zeros(6, dtype=torch.long)]).map(
                lambda v: (v, ValueError)
            ),
        ),
        "dynamic_batch": bad_bool(),
        "dynamic_keep": bad_bool(),
    },
)

# ---- devices: a tensor on another device than the module (or than the call's other
# tensors) is rejected by a metadata check naming it and both devices. Without a GPU, the
# meta device stands in for "another device": a CPU module gets a meta tensor, a module
# moved to meta gets a CPU tensor.
_META = torch.device("meta")
_POOL_X = torch.randn(2, 3, 8)
_ROWS = torch.randn(6, 4)


def _on_meta(module: nn.Module) -> nn.Module:
    return module.to(_META)


def _vq() -> VectorQuantizer:
    return VectorQuantizer(num_codes=4, dim=4, buffer_size=8)


def _fpn() -> FPNNeck:
    return FPNNeck(in_channels=[4, 8], out_channels=4)


def _rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor) -> Any:
    return RoPE2D(head_dim=8)(q, k, positions=positions)


_ROPE_Q = torch.randn(1, 2, 3, 8)
_PRED_ARGS = {"context_indices": _CTX_IDS, "targets": [_T0, _T1]}
# (id, argument name, call, the argument on the wrong device)
WRONG_DEVICE: list[tuple[str, str, Callable[[Any], Any], torch.Tensor]] = [
    ("ViTEncoder.forward-images-device", "images", lambda v: _vit()(v), torch.randn(2, 3, 16, 16, device=_META)),
    ("ViTEncoder.forward-images-module-device", "images", lambda v: _on_meta(_enc())(v), torch.randn(2, 3, 16, 16)),
    (
        "ViTEncoder.forward-keep-device",
        "keep",
        lambda v: _vit()(torch.randn(2, 3, 16, 16), keep=v),
        torch.zeros(2, 3, dtype=torch.long, device=_META),
    ),
    (
        "ViTEncoder.forward_tokens-tokens-device",
        "tokens",
        lambda v: _vit().forward_tokens(v, grid_size=4),
        torch.randn(2, 16, 16, device=_META),
    ),
    ("HierarchicalPredictor.forward-context-device", "context", lambda v: _pred()(v, **_PRED_ARGS),
     torch.randn(2, 5, 16, device=_META)),
    ("HierarchicalPredictor.forward-context-module-device", "context", lambda v: _on_meta(_pred())(v, **_PRED_ARGS),
     torch.randn(2, 5, 16)),
    ("RoPE2D.forward-positions-device", "positions", lambda v: _rope(_ROPE_Q, _ROPE_Q, v), torch.randn(3, 2, device=_META)),
    ("RoPE2D.forward-k-device", "k", lambda v: _rope(_ROPE_Q, v, torch.randn(3, 2)), _ROPE_Q.to(_META)),
    ("FPNNeck.forward-features[1]-device", "features[1]", lambda v: _fpn()([_FPN_FEATS[0], v]),
     _FPN_FEATS[1].to(_META)),
    ("FPNNeck.forward-features[0]-module-device", "features[0]", lambda v: _on_meta(_fpn())([v, _FPN_FEATS[1]]),
     _FPN_FEATS[0]),
    ("AttentionPool.forward-x-device", "x", lambda v: AttentionPool(dim=8, num_heads=2)(v), _POOL_X.to(_META)),
    ("AttentionPool.forward-x-module-device", "x", lambda v: _on_meta(AttentionPool(dim=8, num_heads=2))(v), _POOL_X),
    ("AttentionPool.forward-valid-device", "valid", lambda v: AttentionPool(dim=8, num_heads=2)(_POOL_X, v),
     torch.ones(2, 3, dtype=torch.bool, device=_META)),
    ("attention_pool-keys-device", "keys", lambda v: attention_pool(torch.randn(2, 8), v, _POOL_X, num_heads=2),
     _POOL_X.to(_META)),
    ("vicreg_loss-y-device", "y", lambda v: vicreg_loss(_ROWS, v), _ROWS.to(_META)),
    ("VICRegLoss.forward-z_b-device", "z_b", lambda v: VICRegLoss()(_ROWS, v), _ROWS.to(_META)),
    ("latent_prediction_loss-targets[0]-device", "targets[0]", lambda v: latent_prediction_loss(_POOL_X, v),
     _POOL_X.to(_META)),
    ("latent_prediction_loss-valid[0]-device", "valid[0]", lambda v: latent_prediction_loss(_POOL_X, _POOL_X, v),
     torch.ones(2, 3, dtype=torch.bool, device=_META)),
    ("LatentPredictionLoss.forward-targets[1]-device", "targets[1]",
     lambda v: LatentPredictionLoss()([_POOL_X] * 2, [_POOL_X, v]), _POOL_X.to(_META)),
    ("sigreg-directions-device", "directions", lambda v: sigreg(_ROWS, directions=v), torch.randn(4, 8, device=_META)),
    ("SIGRegLoss.forward-x-device", "x", lambda v: SIGRegLoss(num_directions=8)(v), _ROWS.to(_META)),
    ("SIGRegLoss.forward-x-module-device", "x", lambda v: _on_meta(SIGRegLoss(num_directions=8))(v), _ROWS),
    ("VectorQuantizer.forward-z-device", "z", lambda v: _vq()(v), _ROWS.to(_META)),
    ("VectorQuantizer.eval-z-device", "z", lambda v: _vq().eval()(v), _ROWS.to(_META)),
    ("VectorQuantizer.forward-z-module-device", "z", lambda v: _on_meta(_vq())(v), _ROWS),
    ("nearest_codes-codebook-device", "codebook", lambda v: nearest_codes(_ROWS, v), torch.randn(3, 4, device=_META)),
    ("squared_distances-codebook-device", "codebook", lambda v: squared_distances(_ROWS, v),
     torch.randn(3, 4, device=_META)),
]
CASES += [Case(c, name, call, st.just((value, ValueError))) for c, name, call, value in WRONG_DEVICE]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
@FAST
@given(data=st.data())
def test_bad_argument_is_rejected_naming_it(case: Case, data: st.DataObject) -> None:
    value, exc = data.draw(case.bad, label=case.name)
    expect_error(exc, case.name, lambda: case.call(value))


@pytest.mark.parametrize(("case", "name", "call", "value"), WRONG_DEVICE, ids=[c for c, *_ in WRONG_DEVICE])
def test_wrong_device_names_both_devices(case, name, call, value) -> None:
    """The device rejection (a metadata check) names the argument and both devices."""
    with pytest.raises(ValueError, match=re.escape(name)) as info:
        call(value)
    assert "meta" in str(info.value) and "cpu" in str(info.value), info.value


def test_every_public_name_is_exercised() -> None:
    """A new public name of a subpackage needs cases in CASES, or an entry below saying why not."""
    import importlib
    import pkgutil

    import jepa_blocks

    covered = {c.id.split("-")[0].split(".")[0] for c in CASES}
    missing = []
    for info in pkgutil.iter_modules(jepa_blocks.__path__):
        if info.ispkg and not info.name.startswith("_"):
            module = importlib.import_module(f"jepa_blocks.{info.name}")
            missing += [f"{info.name}.{n}" for n in module.__all__ if n not in covered | _EXEMPT]
    uncovered = sorted(set(missing) - set(_NOT_YET_COVERED.split()))
    assert not uncovered, f"public names without bad-input cases in tests/test_bad_input.py: {uncovered}"


# Data containers, constants and calls without arguments to get wrong.
_EXEMPT = {
    "EncoderOutput",
    "LossOutput",
    "LossType",
    "Checkpoint",
    "CheckpointError",
    "FORMAT_VERSION",
    "DEFAULT_NO_DECAY_NAMES",
    "rng_state",
    "MultiCropBatch",
    "Episodes",
    "FinetuneResult",
    "VQOutput",
    "NonFiniteLossError",
    "UnverifiedCheckpointWarning",  # a warning class: nothing to call with bad input
}

# Blocks that other work added while these tests were written: they check their own bad
# input in their own test files; add their cases here and drop them from this list.
_NOT_YET_COVERED = ""


# ----------------------------------------------------------------------------- non-finite input


def _nan_at(shape: tuple[int, ...], value: float = NAN) -> torch.Tensor:
    x = torch.randn(shape)
    x.view(-1)[x.numel() // 2] = value
    return x


_F = torch.randn(6, 4)
NONFINITE: list[tuple[str, str, Callable[[torch.Tensor], Any], tuple[int, ...]]] = [
    # (id, argument name, call, shape of the argument)
    (
        "latent_prediction_loss",
        "predictions[0]",
        lambda v: latent_prediction_loss(v, torch.randn(2, 3, 4)),
        (2, 3, 4),
    ),
    (
        "latent_prediction_loss",
        "targets[0]",
        lambda v: latent_prediction_loss(torch.randn(2, 3, 4), v),
        (2, 3, 4),
    ),
    (
        "LatentPredictionLoss",
        "targets[1]",
        lambda v: LatentPredictionLoss()([torch.randn(2, 3, 4)] * 2, [torch.randn(2, 3, 4), v]),
        (2, 3, 4),
    ),
    ("sigreg", "x", lambda v: sigreg(v, num_directions=8), (6, 4)),
    ("sigreg", "directions", lambda v: sigreg(_F, directions=v), (4, 8)),
    ("SIGRegLoss", "x", lambda v: SIGRegLoss(num_directions=8)(v), (2, 6, 4)),
    ("lejepa_loss", "sigreg_value", lambda v: lejepa_loss(torch.tensor(1.0), v.sum()), (1,)),
    ("vicreg_loss", "y", lambda v: vicreg_loss(_F, v), (6, 4)),
    ("VICRegLoss", "z_a", lambda v: VICRegLoss()(v, _F), (6, 4)),
    ("invariance_loss", "x", lambda v: invariance_loss(v, _F), (6, 4)),
    ("variance_loss", "x", variance_loss, (6, 4)),
    ("covariance_loss", "x", covariance_loss, (6, 4)),
    ("ViTEncoder", "images", lambda v: _enc()(v), (2, 3, 16, 16)),
    (
        "ViTEncoder.forward_tokens",
        "tokens",
        lambda v: _enc().forward_tokens(v, grid_size=4),
        (2, 16, 16),
    ),
    (
        "HierarchicalPredictor",
        "context",
        lambda v: _pred()(v, context_indices=_CTX_IDS, targets=[_T0, _T1]),
        (2, 5, 16),
    ),
    (
        "FPNNeck",
        "features[1]",
        lambda v: FPNNeck(in_channels=[4, 8], out_channels=4)([_FPN_FEATS[0], v]),
        (2, 8, 2, 2),
    ),
    (
        "RoPE2D",
        "positions",
        lambda v: RoPE2D(head_dim=8)(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8), positions=v),
        (3, 2),
    ),
    ("effective_rank", "z", effective_rank, (6, 4)),
    ("knn_accuracy", "query_features", lambda v: _knn(query_features=v), (4, 3)),
    ("linear_probe", "test_features", lambda v: _probe(test_features=v), (4, 3)),
    ("ntxent_loss", "z_b", lambda v: ntxent_loss(_F, v), (6, 4)),
    ("NTXentLoss", "z_a", lambda v: NTXentLoss()(v, _F), (6, 4)),
    ("info_nce_loss", "key", lambda v: info_nce_loss(_F, v), (6, 4)),
    ("InfoNCELoss", "query", lambda v: InfoNCELoss()(v, _F), (6, 4)),
    ("VectorQuantizer", "z", lambda v: VectorQuantizer(num_codes=4, dim=4, buffer_size=8)(v), (6, 4)),
    ("VectorQuantizer.eval", "z", lambda v: VectorQuantizer(num_codes=4, dim=4, buffer_size=8).eval()(v), (6, 4)),
    ("nearest_codes", "z", lambda v: nearest_codes(v, _F), (3, 4)),
    ("squared_distances", "codebook", lambda v: squared_distances(_F, v), (3, 4)),
    ("codebook_from_ema", "embed_sum", lambda v: codebook_from_ema(torch.ones(6), v), (6, 4)),
    ("codebook_from_ema", "cluster_size", lambda v: codebook_from_ema(v.abs(), _F), (6,)),
    ("code_perplexity", "counts", lambda v: code_perplexity(v.abs()), (6,)),
    ("few_shot_accuracy", "features", lambda v: few_shot_accuracy(v, _LABELS, n_way=2, k_shot=1, num_episodes=2, n_query=1), (12, 3)),
    ("embedding_diagnostics", "z", embedding_diagnostics, (6, 4)),
    ("attention_maps", "images", lambda v: attention_maps(_vit(), v), (1, 3, 16, 16)),
    ("AttentionPool", "x", lambda v: AttentionPool(dim=4, num_heads=2)(v[None]), (6, 4)),
    (
        "AttentionPool-padded",  # NaN in a *real* token, other tokens padded
        "x",
        lambda v: AttentionPool(dim=4, num_heads=2)(v[None], torch.arange(6)[None] != 0),
        (6, 4),
    ),
    ("attention_pool", "values", lambda v: attention_pool(_F[:2], _F[None], v[None], num_heads=2), (6, 4)),
    ("attention_pool", "queries", lambda v: attention_pool(v, _F[None], _F[None], num_heads=2), (2, 4)),
    ("MultiCropMasker", "images", lambda v: _mc()(v), (2, 3, 32, 32)),
]


@pytest.mark.parametrize("value", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize(("call", "name", "fn", "shape"), NONFINITE, ids=[f"{c}-{n}" for c, n, _, _ in NONFINITE])
def test_nonfinite_input_is_rejected_while_value_checks_are_on(call, name, fn, shape, value) -> None:
    x = _nan_at(shape, value)
    expect_error(ValueError, name, lambda: fn(x))
    with value_checks(False):  # the switch skips the check (and its host sync)
        try:
            fn(x)
        except ValueError as err:
            assert "finite" not in str(err), err
        except RuntimeError:  # e.g. an SVD that does not converge on NaN: not a value check
            pass


# Finite inputs so large that the float32 arithmetic inside overflows (squares, 4th
# powers): rejected naming the argument while value checks are on, never a silent NaN/Inf.
OVERFLOW: list[tuple[str, str, Callable[[torch.Tensor], Any], tuple[int, ...]]] = [
    ("vicreg_loss", "x", lambda v: vicreg_loss(v, _F), (6, 4)),
    ("VICRegLoss", "z_a", lambda v: VICRegLoss()(v, _F), (6, 4)),
    ("invariance_loss", "x", lambda v: invariance_loss(v, _F), (6, 4)),
    ("covariance_loss", "x", covariance_loss, (6, 4)),
    ("VectorQuantizer", "z", lambda v: VectorQuantizer(num_codes=4, dim=4, buffer_size=8)(v), (6, 4)),
    ("VectorQuantizer.eval", "z", lambda v: VectorQuantizer(num_codes=4, dim=4, buffer_size=8).eval()(v), (6, 4)),
    ("nearest_codes", "z", lambda v: nearest_codes(v, _F), (3, 4)),
    ("squared_distances", "codebook", lambda v: squared_distances(_F, v), (3, 4)),
]


@pytest.mark.parametrize("scale", [1e30, -1e30, 3e38], ids=["1e30", "-1e30", "3e38"])
@pytest.mark.parametrize(("call", "name", "fn", "shape"), OVERFLOW, ids=[f"{c}-{n}" for c, n, _, _ in OVERFLOW])
def test_overflowing_finite_input_is_rejected_while_value_checks_are_on(call, name, fn, shape, scale) -> None:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * abs(scale)
    x = x.clamp(-3e38, 3e38).mul(math.copysign(1.0, scale))
    assert torch.isfinite(x).all()
    expect_error(ValueError, name, lambda: fn(x))
    with value_checks(False):  # the check (and its host sync) is skipped: documented overflow
        fn(x)


def test_ema_target_refuses_nonfinite_online_weights() -> None:
    """The EMA target is what the non-finite step guard protects: never poisoned, checked
    whatever the value-check setting (see tests/targets/test_ema.py for the details)."""
    online = nn.Linear(3, 2)
    target = EMATarget(online, total_steps=10)
    with torch.no_grad():
        online.weight[0, 1] = NAN
    for checks in (True, False):
        with value_checks(checks):
            expect_error(ValueError, "online", lambda: target.update(online))
    assert torch.isfinite(target.module.weight).all() and target.step == 0


def test_padding_may_hold_nan_in_the_latent_loss() -> None:
    """Only *valid* slots must be finite: padded slots are documented to be ignored."""
    pred, target = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    valid = torch.tensor([[True, True, False], [True, False, False]])
    junk = torch.where(valid[..., None], pred, torch.full_like(pred, NAN))
    assert torch.isfinite(latent_prediction_loss(junk, target, valid).total)
    junk[0, 0, 1] = INF
    expect_error(ValueError, "predictions[0]", lambda: latent_prediction_loss(junk, target, valid))


# ----------------------------------------------------------------------------- what must work


def _finite(*tensors: torch.Tensor) -> bool:
    return all(bool(torch.isfinite(t.float()).all()) for t in tensors)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_batch_of_one_and_half_work(dtype: torch.dtype) -> None:
    """Batches of one work wherever one sample is meaningful, and half inputs are accepted
    by every forward (modules cast them to their weights' dtype; losses compute in float32)."""
    torch.manual_seed(0)
    enc = _enc()
    out = enc(torch.randn(1, 3, 16, 16).to(dtype), keep=torch.tensor([[0, 5, 9]]))
    assert out.tokens.shape == (1, 3, 16) and _finite(out.tokens)
    assert _finite(enc.forward_tokens(torch.randn(1, 16, 16).to(dtype), grid_size=4).tokens)
    pred = _pred()
    preds = pred(torch.randn(1, 5, 16).to(dtype), context_indices=_CTX_IDS[:1], targets=[_T0[:1], _T1[:1]])
    assert [tuple(p.shape) for p in preds] == [(1, 1, 2, 16), (1, 1, 1, 16)] and _finite(*preds)
    assert _finite(Attention(8, num_heads=2)(torch.randn(1, 3, 8).to(dtype)))
    assert _finite(TransformerBlock(8, num_heads=2)(torch.randn(1, 3, 8).to(dtype)))
    maps = FPNNeck(in_channels=[4, 8], out_channels=4)([t[:1].to(dtype) for t in _FPN_FEATS])
    assert [tuple(m.shape) for m in maps] == [(1, 4, 4, 4), (1, 4, 2, 2)] and _finite(*maps)
    q, k = RoPE2D(head_dim=8)(
        torch.randn(1, 2, 3, 8).to(dtype),
        torch.randn(1, 2, 3, 8).to(dtype),
        positions=torch.randn(3, 2).to(dtype),
    )
    assert q.dtype == dtype and _finite(q, k)
    masks = _masker()(1)
    assert masks.context.shape[0] == 1 and masks.targets[0].shape[0] == 1
    x = torch.randn(1, 3, 4).to(dtype)
    assert _finite(latent_prediction_loss(x, x.flip(-1)).total)
    assert _finite(sigreg(torch.randn(1, 8).to(dtype), num_directions=4))
    assert _finite(SIGRegLoss(num_directions=4)(torch.randn(1, 8).to(dtype)))
    assert _finite(vicreg_loss(torch.randn(2, 4).to(dtype), torch.randn(2, 4).to(dtype)).total)
    feats = torch.randn(1, 16, 4).to(dtype)
    assert _finite(*hierarchical_targets(feats, grid_size=4, targets=torch.tensor([[3]])))
    assert _finite(pool_tokens(feats))
    assert _finite(torch.tensor(effective_rank(torch.randn(2, 3).to(dtype))))
    acc = knn_accuracy(
        torch.randn(1, 3).to(dtype),
        torch.tensor([0]),
        torch.randn(2, 3).to(dtype),
        torch.tensor([0, 0]),
        k=5,
    )
    assert acc == {5: 1.0}


def test_codebook_usage_skips_its_range_check_without_value_checks() -> None:
    """The range check is a host sync, skipped with value checks off (and under tracing);
    ids outside ``[0, K)`` then count for nothing, so the fraction stays right and in [0, 1]."""
    codes = torch.tensor([[0, 2, 2], [7, -1, 4]])
    expect_error(ValueError, "codes", lambda: codebook_usage(codes, num_codes=4))
    with value_checks(False):
        assert codebook_usage(codes, num_codes=4) == 0.5  # ids 0 and 2 of 4
        assert codebook_usage(torch.tensor([9, -3]), num_codes=4) == 0.0
    assert codebook_usage(torch.tensor([3, 0, 3], dtype=torch.int32), num_codes=4) == 0.5
    assert codebook_usage(torch.zeros(0, dtype=torch.long), num_codes=4) == 0.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_newer_blocks_take_a_batch_of_one_and_half(dtype: torch.dtype) -> None:
    """The same for the blocks added later; contrastive losses need 2 pairs (cases above)."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    batch = _mc_default()(torch.rand(1, 3, 32, 32).to(dtype), generator=gen)
    assert batch.global_crops.shape == (1, 2, 3, 32, 32) and batch.global_crops.dtype == dtype
    assert batch.local_masks.context.shape[0] == 2 and _finite(batch.global_crops, batch.local_crops)
    crops = crop_and_resize(torch.rand(1, 3, 8, 8).to(dtype), _BOXES[:1], size=4)
    assert crops.shape == (1, 1, 3, 4, 4) and crops.dtype == dtype and _finite(crops)
    x = torch.randn(2, 8).to(dtype)
    assert _finite(ntxent_loss(x, x.flip(0)), info_nce_loss(x, x.flip(0)), InfoNCELoss()(x, x.flip(0)))
    out = VectorQuantizer(num_codes=4, dim=8, buffer_size=8)(torch.randn(1, 8).to(dtype))
    assert out.quantized.dtype == dtype and out.codes.shape == (1,) and _finite(out.quantized, out.loss)
    assert nearest_codes(torch.randn(1, 8).to(dtype), torch.randn(4, 8)).shape == (1,)
    pooled = AttentionPool(dim=8, num_heads=2)(torch.randn(1, 3, 8).to(dtype), torch.tensor([[True, False, True]]))
    assert pooled.shape == (1, 1, 8) and _finite(pooled)
    keys = torch.randn(1, 3, 8).to(dtype)
    assert attention_pool(torch.randn(2, 8).to(dtype), keys, keys, num_heads=2).dtype == dtype
    maps = attention_maps(_vit(), torch.randn(1, 3, 16, 16).to(dtype))
    assert maps.shape == (1, 2, 16, 16) and _finite(maps)
    probs = attention_probs(_ATTN, torch.randn(1, 5, 16).to(dtype))
    assert probs.dtype == dtype and _finite(probs)
    assert _finite(query_attention(maps.to(dtype), 4, query=(1, 2)), received_attention(maps.to(dtype), 4))
    assert _finite(EncoderTokens(_vit())(torch.randn(1, 3, 16, 16).to(dtype), torch.tensor([[0, 5]])))
    stats = embedding_diagnostics(torch.randn(2, 4).to(dtype), codes=torch.tensor([1]), num_codes=4)
    assert stats["codebook_usage"] == 0.25 and math.isfinite(stats["effective_rank"])
    acc = few_shot_accuracy(torch.randn(12, 3).to(dtype), _LABELS, n_way=2, k_shot=1, n_query=1, num_episodes=2)
    assert 0.0 <= acc[1]["mean"] <= 1.0
    assert NonFiniteGuard().check(torch.tensor(1.0, dtype=dtype), torch.tensor(2.0, dtype=dtype))
    one = [(_FT_X[:1], torch.tensor([1]))]  # batches of one sample
    assert 0.0 <= _ft(train_loader=one, val_loader=one).top1 <= 1.0
    assert _masks3().rows(2, 3).context.shape[0] == 1
