"""Fixtures shared by the example-script tests: a tiny image folder and tiny trainer flags."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"

TINY_ARGS = ["--img-size", "24", "--patch-size", "4", "--embed-dim", "32", "--depth", "2", "--num-heads", "2",
             "--pred-dim", "16", "--pred-depth", "1", "--pred-heads", "2", "--levels", "2", "--batch-size", "8",
             "--workers", "0", "--val-fraction", "0.25", "--warmup-steps", "1", "--log-every", "1",
             "--monitor-every", "2", "--eval-every", "2", "--amp", "off"]


def load_example_module(name: str):
    """Import ``examples/<name>.py`` as a fresh module."""
    sys.path.insert(0, str(EXAMPLES))
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def load_example():
    """``load_example("train_hjepa")`` imports an example script as a module."""
    return load_example_module


@pytest.fixture(scope="session")
def tiny_args() -> list[str]:
    """Trainer flags for a model and data small enough for a few-second CPU run."""
    return list(TINY_ARGS)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """Two classes of 24x24 PNGs (14 each): bright-left vs bright-right images with noise."""
    pytest.importorskip("torchvision")
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    g = torch.Generator().manual_seed(0)
    for c, name in enumerate(("left", "right")):
        (root / name).mkdir()
        for i in range(14):
            img = torch.rand(24, 24, 3, generator=g) * 0.4
            img[:, (0 if c == 0 else 12) : (12 if c == 0 else 24)] += 0.5
            Image.fromarray((img.clamp(0, 1) * 255).byte().numpy()).save(root / name / f"{i}.png")
    return root
