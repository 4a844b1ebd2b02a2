"""Problem sizes and repetition counts of a benchmark run: the full, quick and tiny presets."""

from __future__ import annotations

from dataclasses import dataclass

from references import REF_DIMS


@dataclass(frozen=True)
class Sizes:
    """Problem sizes and repetition counts of one benchmark run."""

    name: str = "full"
    # import time: fresh processes per statement
    import_reps: int = 5
    # masker
    masker_batch: int = 256
    masker_grids: tuple[int, ...] = (8, 14)
    masker_warmup: int = 10
    masker_reps: int = 100
    collate_batches: int = 24
    collate_workers: int = 2
    # losses
    loss_n: int = 256
    loss_dims: tuple[int, ...] = REF_DIMS
    sigreg_ks: tuple[int, ...] = (256, 1024)
    sigreg_chunk: int = 256
    # (N, D) of the chunk comparison; K = max(sigreg_ks). At N = 256 the (D, K) directions
    # dominate the memory; at large N the (N, K) projections do, which chunking bounds.
    sigreg_chunk_cases: tuple[tuple[int, int], ...] = ((256, 2048), (4096, 512))
    loss_warmup: int = 3
    loss_reps: int = 10
    # model: the CIFAR preset of examples/train_hjepa.py
    img_size: int = 32
    patch_size: int = 4
    embed_dim: int = 192
    depth: int = 6
    num_heads: int = 3
    pred_dim: int = 96
    pred_depth: int = 3
    pred_heads: int = 3
    levels: int = 3
    batch: int = 128
    # encoder
    encoder_keeps: tuple[float, ...] = (1.0, 0.75, 0.5, 0.25)
    encoder_warmup: int = 2
    encoder_reps: int = 5
    # train step
    step_warmup: int = 3
    step_reps: int = 8
    matmul_n: int = 2048
    matmul_n_cuda: int = 8192
    matmul_reps: int = 5
    compile_warmup: int = 6  # recompilations for new mask sizes settle after ~5 steps
    compile_timeout_s: float = 420.0


PRESETS: dict[str, Sizes] = {
    "full": Sizes(),
    "quick": Sizes(
        name="quick",
        import_reps=3,
        masker_reps=30,
        collate_batches=8,
        loss_dims=(192, 2048),
        loss_warmup=1,
        loss_reps=3,
        encoder_keeps=(1.0, 0.25),
        encoder_warmup=1,
        encoder_reps=2,
        step_warmup=1,
        step_reps=2,
        matmul_n=1024,
        matmul_reps=3,
        compile_warmup=3,
        compile_timeout_s=180.0,
    ),
    # For the tests: every code path, tiny tensors.
    "tiny": Sizes(
        name="tiny",
        import_reps=1,
        masker_batch=8,
        masker_warmup=1,
        masker_reps=2,
        collate_batches=3,
        loss_n=16,
        loss_dims=(8, 16),
        sigreg_ks=(16, 32),
        sigreg_chunk=8,
        sigreg_chunk_cases=((16, 16), (64, 8)),
        loss_warmup=1,
        loss_reps=2,
        embed_dim=16,
        depth=1,
        num_heads=2,
        pred_dim=8,
        pred_depth=1,
        pred_heads=2,
        levels=2,
        batch=4,
        encoder_keeps=(1.0, 0.5),
        encoder_warmup=0,
        encoder_reps=1,
        step_warmup=1,
        step_reps=1,
        matmul_n=64,
        matmul_n_cuda=256,
        matmul_reps=1,
        compile_warmup=1,
        compile_timeout_s=60.0,
    ),
}

# One benchmark run's figures: flat ``section.what.unit`` keys.
Results = dict[str, float | int | str | None]
