"""The declared torch minimum is true: the code needs no newer torch, and the docs agree.

``pyproject.toml`` declares ``torch>=X.Y``. These tests check that the installed torch
meets it, that README.md states the same minimum, that the examples extra asks for the
torchvision release built for that torch, and that no code in ``src/`` or ``examples/``
calls an API that only a newer torch has (a table of such APIs, matched on code with
comments and strings removed).
"""

from __future__ import annotations

import io
import re
import tokenize
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# APIs newer than the oldest torch this project ever declared (2.2), with the first torch
# release that has them. Regexes run on code only (comments and strings removed).
NEWER_APIS: dict[str, tuple[int, int]] = {
    # torch 2.3
    r"\btorch\.(amp\.)?GradScaler\b": (2, 3),  # device-generic: GradScaler(device)
    r"\bfrom\s+torch(\.amp)?\s+import\s[^\n]*\bGradScaler\b": (2, 3),
    # torch 2.4: the device_type argument of the autocast state queries
    r"\bis_autocast_enabled\(\s*[^)\s]": (2, 4),
    r"\bget_autocast_dtype\(": (2, 4),
    r"\btorch\.amp\.custom_(fwd|bwd)\b": (2, 4),
    r"\btorch\.library\.custom_op\b": (2, 4),
    r"\btorch\.serialization\.add_safe_globals\b": (2, 4),
    r"\bF\.rms_norm\b|\bfunctional\.rms_norm\b|\bnn\.RMSNorm\b": (2, 4),
    # torch 2.5
    r"\bflex_attention\b": (2, 5),
    r"\benable_gqa\s*=": (2, 5),
    # torch 2.6
    r"\btorch\.accelerator\b": (2, 6),
    r"\bget_total_norm\(|\bclip_grads_with_norm_\(": (2, 6),
}


def _major_minor(version: str) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", version)
    assert match, f"not a version: {version!r}"
    return int(match[1]), int(match[2])


def _requirement(requirements: list[str], name: str) -> tuple[int, int]:
    """``(X, Y)`` of the single ``name>=X.Y`` among ``requirements``."""
    found = [r for r in requirements if re.match(rf"{name}\s*[<>=!~;\[]", r) or r == name]
    assert len(found) == 1, f"expected one {name} requirement, got {found}"
    match = re.fullmatch(rf"{name}\s*>=\s*(\d+\.\d+)", found[0].strip())
    assert match, f"{name} requirement must read '{name}>=X.Y', got {found[0]!r}"
    return _major_minor(match[1])


def _pyproject() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _fmt(v: tuple[int, int]) -> str:
    return f"{v[0]}.{v[1]}"


def _torch_minimum() -> tuple[int, int]:
    return _requirement(_pyproject()["project"]["dependencies"], "torch")


def _code_only(source: str) -> str:
    """``source`` with comments and string literals (docstrings included) blanked out."""
    lines = [list(line) for line in source.splitlines(keepends=True)]
    blank = {tokenize.COMMENT, tokenize.STRING, getattr(tokenize, "FSTRING_MIDDLE", tokenize.STRING)}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in blank:
            continue
        (r0, c0), (r1, c1) = tok.start, tok.end  # rows count from 1
        for r in range(r0, r1 + 1):
            line = lines[r - 1]
            start, stop = (c0 if r == r0 else 0), (c1 if r == r1 else len(line))
            line[start:stop] = [ch if ch == "\n" else " " for ch in line[start:stop]]
    return "".join("".join(line) for line in lines)


def test_installed_torch_meets_the_declared_minimum():
    assert _major_minor(torch.__version__) >= _torch_minimum()


def test_readme_states_the_declared_minimum():
    readme = " ".join((ROOT / "README.md").read_text().split())  # the sentence may wrap
    stated = re.findall(r"the package itself accepts `torch>=(\d+\.\d+)`", readme)
    assert stated == [_fmt(_torch_minimum())]


def test_examples_extra_asks_for_the_matching_torchvision():
    # torchvision 0.(N + 15) is the release built for torch 2.N (0.17 <-> 2.2, 0.19 <-> 2.4).
    major, minor = _torch_minimum()
    assert major == 2, "update this mapping for a torch major release"
    vision = _requirement(_pyproject()["project"]["optional-dependencies"]["examples"], "torchvision")
    assert vision == (0, minor + 15)


def test_code_needs_no_newer_torch_than_declared():
    declared = _torch_minimum()
    too_new = []
    for path in sorted([*(ROOT / "src").rglob("*.py"), *(ROOT / "examples").rglob("*.py")]):
        code = _code_only(path.read_text())
        for pattern, needs in NEWER_APIS.items():
            for match in re.finditer(pattern, code):
                if needs > declared:
                    too_new.append(f"{path.relative_to(ROOT)}: {match[0]!r} needs torch>={_fmt(needs)}")
    assert not too_new, f"pyproject declares torch>={_fmt(declared)}, but:\n" + "\n".join(too_new)


@pytest.mark.parametrize(
    ("code", "needs"),
    [
        ("torch.is_autocast_enabled(x.device.type)", (2, 4)),
        ("scaler = torch.amp.GradScaler(device.type, enabled=True)", (2, 3)),
        ("from torch.amp import autocast, GradScaler", (2, 3)),
        ("out = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)", (2, 5)),
    ],
)
def test_the_api_table_catches_newer_calls(code, needs):
    hits = [v for p, v in NEWER_APIS.items() if re.search(p, _code_only(code))]
    assert max(hits) == needs
    # The same names in a comment or a docstring are not calls.
    assert not [p for p in NEWER_APIS if re.search(p, _code_only(f'"""{code}"""  # {code}\n'))]


@pytest.mark.parametrize("code", ["torch.is_autocast_enabled()", "torch.cuda.amp.GradScaler(enabled=True)"])
def test_the_api_table_passes_torch_2_2_calls(code):
    assert not [p for p in NEWER_APIS if re.search(p, _code_only(code))]
