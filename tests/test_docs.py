"""The README's and the docs' code runs, and the README's two commands stay the ones CI uses.

Every ```python block of README.md and docs/**/*.md is executed. The blocks of one page
run in order in one namespace, so a later block can use the names of an earlier one. A
block is skipped only when the line before its fence is ``<!-- no-test -->``. Shell
blocks are never executed. A README section that a page includes with ``--8<--`` runs
once, as README code. The docstring examples shown in the API reference run too.
"""

from __future__ import annotations

import doctest
import importlib
import os
import pkgutil
import re
import sys
from pathlib import Path

import pytest

import jepa_blocks

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]
SKIP_MARKER = "<!-- no-test -->"
# A fenced block, possibly indented (inside an admonition or a list item).
FENCE = re.compile(
    r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$",
    flags=re.M | re.S,
)



def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def python_blocks(text: str) -> list[tuple[int, str, bool]]:
    """``(first line number, code, skipped)`` of every python block of a Markdown page."""
    out = []
    for m in FENCE.finditer(text):
        if m.group("lang") != "python":
            continue
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1].strip()
        indent = m.group("indent")
        lines = [line[len(indent) :] if line.startswith(indent) else line.lstrip()
                 for line in m.group("body").splitlines()]
        first_line = text.count("\n", 0, m.start("body")) + 1
        out.append((first_line, "\n".join(lines) + "\n", before == SKIP_MARKER))
    return out


def _page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


# ----------------------------------------------------------------------------- README


def test_readme_has_exactly_two_commands_and_ci_uses_the_test_one():
    commands = [b.strip() for b in _blocks("bash")]
    assert len(commands) == 2, commands
    test_command = commands[1]
    assert "pytest" in test_command
    ci = (ROOT / ".ci" / "run").read_text()
    normalised = ci.replace("pip install -q ", "pip install ")
    assert test_command in normalised, "the .ci/run script must call the README test command"


def test_readme_links_the_docs_and_how_to_serve_them():
    assert "mkdocs serve" in README
    assert 'pip install -e ".[docs]"' in README


def test_readme_and_docs_home_show_the_index_install_and_the_source_install():
    home = (DOCS / "index.md").read_text()
    for page in (README, home):
        assert re.search(r"^pip install jepa-blocks\b", page, flags=re.M)
        assert "git clone https://github.com/jepa-blocks/jepa-blocks" in page
        assert "--no-binary :all: jepa-blocks" in page  # the sdist, which holds examples/


def test_readme_links_are_absolute():
    """The README is the package index page, where relative links lead nowhere."""
    prose = re.sub(r"`[^`\n]*`", "", FENCE.sub("", README))  # links, not code
    targets = re.findall(r"\]\(([^)\s]+)\)", prose) + re.findall(r"<(\w+://[^>\s]+)>", prose)
    targets += re.findall(r'(?:src|href)="([^"]+)"', prose)
    assert targets, "the README links nothing"
    relative = [t for t in targets if not re.match(r"https?://|mailto:|#", t)]
    assert not relative, f"relative links in README.md (broken on the package index): {relative}"


# ----------------------------------------------------------------------------- code blocks


def test_block_extraction_handles_markers_and_indentation():
    page = (
        "text\n```python\nx = 1\n```\n<!-- no-test -->\n```python\nraise SystemExit\n```\n"
        "!!! note\n    ```python\n    y = x + 1\n    ```\n```bash\nexit 1\n```\n"
    )
    blocks = python_blocks(page)
    assert [(code, skipped) for _, code, skipped in blocks] == [
        ("x = 1\n", False),
        ("raise SystemExit\n", True),
        ("y = x + 1\n", False),
    ]
    assert [line for line, _, _ in blocks] == [3, 7, 11]


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p.read_text())], ids=_page_id)
def test_python_blocks_run(page: Path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # blocks that write files write them here
    namespace = {"__name__": f"__docs_{page.stem}__"}
    for line, code, skipped in python_blocks(page.read_text()):
        if skipped:
            continue
        # Pad so that tracebacks point at the page's own line numbers.
        source = "\n" * (line - 1) + code
        exec(compile(source, str(page.relative_to(ROOT)), "exec"), namespace)


def test_skip_marker_is_used_sparingly():
    skipped = [(_page_id(p), line) for p in PAGES for line, _, s in python_blocks(p.read_text()) if s]
    total = sum(len(python_blocks(p.read_text())) for p in PAGES)
    assert len(skipped) <= max(2, total // 10), skipped


# ----------------------------------------------------------------------------- site structure


def test_every_page_is_in_the_nav():
    config = (ROOT / "mkdocs.yml").read_text()
    for page in DOCS.rglob("*.md"):
        assert str(page.relative_to(DOCS)) in config, f"{page} is not listed in mkdocs.yml nav"


def test_figures_exist_are_small_and_come_from_the_script():
    script = (DOCS / "make_figures.py").read_text()
    referenced = {
        name for page in DOCS.rglob("*.md") for name in re.findall(r"assets/([\w.-]+\.png)", page.read_text())
    }
    assert referenced, "the docs show no figures"
    for name in referenced:
        assert (DOCS / "assets" / name).is_file(), f"missing figure {name}: run python docs/make_figures.py"
    for png in (DOCS / "assets").glob("*.png"):
        assert png.stat().st_size < 200 * 1024, f"{png.name} is over 200 KB"
        assert f'"{png.name}"' in script, f"{png.name} is not generated by docs/make_figures.py"


def test_snippet_targets_exist():
    """``--8<-- "file"`` and ``--8<-- "file:section"`` includes resolve (mkdocs --strict too)."""
    for page in DOCS.rglob("*.md"):
        for target in re.findall(r'^--8<-- "([^"]+)"', page.read_text(), flags=re.M):
            path, _, section = target.partition(":")
            assert (ROOT / path).is_file(), f"{page.name} includes missing file {path}"
            if section and not section.isdigit():
                text = (ROOT / path).read_text()
                for edge in ("start", "end"):
                    assert f"--8<-- [{edge}:{section}]" in text, f"{path} lacks section {section}"


# ----------------------------------------------------------------------------- API examples


def _public_modules() -> list[str]:
    names = [jepa_blocks.__name__]
    for info in pkgutil.walk_packages(jepa_blocks.__path__, prefix="jepa_blocks."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            names.append(info.name)
    return names


@pytest.mark.parametrize("module_name", _public_modules())
def test_docstring_examples_run(module_name: str):
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:  # an integration whose optional framework is not installed
        if module_name.startswith("jepa_blocks.integrations."):
            pytest.skip(str(err))
        raise
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} docstring example(s) of {module_name} failed"


def test_mkdocs_build_strict(tmp_path):
    """The site builds with ``mkdocs build --strict`` (warnings are errors)."""
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    import subprocess

    # No --quiet: it raises the log level above WARNING, so strict mode never sees warnings.
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},  # mkdocs-material's end-of-life banner
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "WARNING" not in proc.stderr, proc.stderr[-3000:]
    site = tmp_path / "site"
    assert (site / "index.html").exists()
    # The build helpers of docs/ (griffe extension, figure script) are not published.
    assert not sorted(site.rglob("*.py")), sorted(str(p.relative_to(site)) for p in site.rglob("*.py"))
    _check_signatures_are_wrapped(site)


def _check_signatures_are_wrapped(site: Path) -> None:
    """Signatures longer than mkdocs.yml's ``line_length`` are formatted over several lines.

    mkdocstrings wraps them only when a formatter (ruff or black) is installed; without
    one it prints each signature on one line, however long.
    """
    import html

    match = re.search(r"^\s*line_length:\s*(\d+)", (ROOT / "mkdocs.yml").read_text(), flags=re.M)
    assert match, "mkdocs.yml sets no line_length for the signatures"
    line_length = int(match[1])
    signatures = [
        html.unescape(re.sub(r"<[^>]+>", "", body))
        for page in site.glob("api/**/*.html")
        for body in re.findall(r'<div class="doc-signature highlight"><pre>(.*?)</pre>', page.read_text(), re.S)
    ]
    assert len(signatures) >= 10, "the API pages show no separate signatures"
    long = [s.strip() for s in signatures if len(" ".join(s.split())) > line_length]
    assert long, f"no signature is longer than {line_length} characters: the check checks nothing"
    one_line = [s for s in long if "\n" not in s]
    assert not one_line, f"{len(one_line)} long signatures are not wrapped (is ruff installed?): {one_line[:2]}"
