"""Training utilities: schedules, optimizer parameter groups, crash-safe checkpoints.

* :mod:`~jepa_blocks.training.schedules`: warmup-cosine learning rate, cosine weight-decay
  ramp, and :class:`OptimizerScheduler`, which writes both into an optimizer.
* :mod:`~jepa_blocks.training.param_groups`: decayed / not-decayed parameter groups.
* :mod:`~jepa_blocks.training.checkpoint`: atomic save, checked load (CRC-32 of every
  record) and :func:`load_latest_good`, the fallback to the newest undamaged checkpoint.
* :mod:`~jepa_blocks.training.best_checkpoints`: keep the best ``N`` checkpoints by a metric.
* :mod:`~jepa_blocks.training.rng`: capture and restore every global RNG, for an exact resume.
* :mod:`~jepa_blocks.training.resumable`: a seeded, rank-sharded sampler and per-sample
  seeding, for a data order that is exact on resume and under DDP.
* :mod:`~jepa_blocks.training.nonfinite`: skip NaN/Inf steps, stop after too many.
"""

from jepa_blocks.training.best_checkpoints import BestCheckpoints
from jepa_blocks.training.checkpoint import (
    FORMAT_VERSION,
    Checkpoint,
    CheckpointError,
    UnverifiedCheckpointWarning,
    load_checkpoint,
    load_latest_good,
    save_checkpoint,
)
from jepa_blocks.training.nonfinite import NonFiniteGuard, NonFiniteLossError
from jepa_blocks.training.param_groups import (
    DEFAULT_NO_DECAY_NAMES,
    is_no_decay,
    param_groups_for_weight_decay,
)
from jepa_blocks.training.resumable import ResumableSampler, SeededDataset, sample_seed
from jepa_blocks.training.rng import rng_state, set_rng_state
from jepa_blocks.training.schedules import OptimizerScheduler, cosine_ramp, warmup_cosine

__all__ = [
    "BestCheckpoints",
    "Checkpoint",
    "CheckpointError",
    "DEFAULT_NO_DECAY_NAMES",
    "FORMAT_VERSION",
    "NonFiniteGuard",
    "NonFiniteLossError",
    "OptimizerScheduler",
    "ResumableSampler",
    "SeededDataset",
    "UnverifiedCheckpointWarning",
    "cosine_ramp",
    "is_no_decay",
    "load_checkpoint",
    "load_latest_good",
    "param_groups_for_weight_decay",
    "rng_state",
    "sample_seed",
    "save_checkpoint",
    "set_rng_state",
    "warmup_cosine",
]
