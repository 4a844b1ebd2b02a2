"""Shared test fixtures: single-threaded torch, a two-process gloo runner (losses, distributed collectives)."""

from __future__ import annotations

import datetime
import multiprocessing
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=30),
    )
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def _run_gloo(fn, *args, world: int = 2, timeout: float = 60.0) -> None:
    # fork: the workers inherit the test module, so nothing has to be importable by name
    # (pytest runs with --import-mode=importlib) and no second torch import is paid.
    ctx = mp.start_processes(
        _entry,
        args=(world, _free_port(), fn, args),
        nprocs=world,
        join=False,
        start_method="fork",
    )
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=0.5):  # re-raises a worker's exception with its traceback
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                if proc.is_alive():
                    proc.terminate()
            pytest.fail(f"gloo workers did not finish within {timeout} s")


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Run the suite single-threaded: its tensors are tiny, and on a 2-core machine OpenMP
    wake-ups of two threads made small kernels ~10x slower than one thread (softmax of an
    8x8 input: ~30 ms vs ~1 ms under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def run_gloo():
    """``run_gloo(fn, *args)`` runs ``fn(rank, world, *args)`` on 2 gloo processes."""
    if not dist.is_available() or "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("needs torch.distributed and the fork start method")
    return _run_gloo
