"""The declared torch minimum is true: the code needs no newer torch, and the docs agree.

``pyproject.toml`` declares ``torch>=X.Y``. These tests check that the installed torch
meets it, that README.md states the same minimum, that the examples extra asks for the
torchvision release built for that torch, and that no code in ``src/`` or ``examples/``
calls an API that only a newer torch has (a table of such APIs, matched on code with
comments and strings removed).
"""

from __future__ import annotations

import copy
import io
import re
import sys
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


# ----------------------------------------------------------------------------- metadata
# The package index page shows the README and these fields; the version is written once,
# in jepa_blocks.__version__.


def _mkdocs_setting(key: str) -> str:
    match = re.search(rf"^{key}:\s*(\S+)\s*$", (ROOT / "mkdocs.yml").read_text(), flags=re.M)
    assert match, f"mkdocs.yml has no {key}"
    return match[1]


def test_version_is_written_once_in_the_package():
    import jepa_blocks

    pyproject = _pyproject()
    assert "version" not in pyproject["project"], "the version is read from jepa_blocks.__version__"
    assert "version" in pyproject["project"]["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "jepa_blocks.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+([ab]|rc|\.dev)?\d*", jepa_blocks.__version__)


def test_project_urls_agree_with_the_docs_config_and_the_readme():
    urls = _pyproject()["project"]["urls"]
    readme = (ROOT / "README.md").read_text()
    site, repo = _mkdocs_setting("site_url"), _mkdocs_setting("repo_url")
    assert urls["Documentation"].rstrip("/") == site.rstrip("/")
    assert urls["Source"] == repo
    assert urls["Issues"] == f"{repo}/issues"
    for name in ("Documentation", "Source", "Issues"):
        assert urls[name].startswith("https://")
        assert urls[name] in readme, f"README.md does not give the {name} URL"


def test_classifiers_state_the_status_and_the_supported_pythons():
    project = _pyproject()["project"]
    classifiers = project["classifiers"]
    assert len([c for c in classifiers if c.startswith("Development Status :: ")]) == 1
    listed = sorted(_major_minor(c.rsplit(" :: ", 1)[1])
                    for c in classifiers if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c))
    minimum = _major_minor(re.fullmatch(r">=\s*(\d+\.\d+)", project["requires-python"])[1])
    assert listed and listed[0] == minimum, f"requires-python >={_fmt(minimum)}, classifiers {listed}"
    assert listed == [(3, m) for m in range(minimum[1], listed[-1][1] + 1)], "a gap in the Python versions"


def test_readme_states_the_ci_pins():
    pins = dict(re.findall(r"^([\w-]+)==(\S+)$", (ROOT / "constraints-ci.txt").read_text(), flags=re.M))
    assert set(pins) == {"torch", "torchvision"}, pins
    assert _major_minor(pins["torch"]) >= _torch_minimum()
    torch_minor = _major_minor(pins["torch"])[1]
    assert _major_minor(pins["torchvision"]) == (0, torch_minor + 15), "the pins are not a release pair"
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert f"pins torch {pins['torch']} and torchvision {pins['torchvision']}" in readme


# ----------------------------------------------------------------------------- extras
# A module that the tests, the examples or the docs build import without a guard must be
# installed by `pip install ".[test]"` (the README test command), not merely linger on the
# machine: matplotlib did not (issue 14). Guarded imports (pytest.importorskip, or inside a
# try that catches ImportError) may come from another extra. The packages below are
# optional on purpose: the tests that need them skip without them (the ONNX export test,
# the Lightning integration and its example), and tomli is Python 3.10's tomllib.
OPTIONAL_IMPORTS = {"onnx", "onnxscript", "onnxruntime", "tomli", "lightning", "pytorch_lightning", "wandb"}
_GUARDS = {"ImportError", "ModuleNotFoundError", "Exception"}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_closure(project: dict, extras: list[str]) -> set[str]:
    """Canonical names of every distribution that ``pip install ".[extras]"`` installs.

    The project's own extras are expanded from ``project`` (the pyproject table); other
    distributions' requirements are read from their installed metadata.
    """
    import importlib.metadata as md

    from packaging.requirements import Requirement

    own = _canonical(project["name"])
    todo = [Requirement(r) for r in project["dependencies"]]
    todo += [Requirement(r) for e in extras for r in project["optional-dependencies"][e]]
    seen: set[tuple[str, frozenset]] = set()
    while todo:
        req = todo.pop()
        name = _canonical(req.name)
        if (name, frozenset(req.extras)) in seen:
            continue
        seen.add((name, frozenset(req.extras)))
        if name == own:
            todo += [Requirement(r) for e in req.extras for r in project["optional-dependencies"][e]]
            continue
        try:
            requires = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        for sub in map(Requirement, requires):
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in (req.extras or {""})):
                todo.append(sub)
    return {name for name, _ in seen}


def _third_party_imports(paths: list[Path]) -> dict[str, bool]:
    """``{top-level module: imported without a guard somewhere}`` over ``paths``."""
    import ast

    local = {p.stem for d in ("examples", "benchmarks", "tests", "docs") for p in (ROOT / d).rglob("*.py")}
    local |= {"jepa_blocks", "examples", "benchmarks", "tests", "docs", "__future__"}
    found: dict[str, bool] = {}

    def add(module: str, guarded: bool) -> None:
        top = module.split(".")[0]
        if top and top not in local and top not in sys.stdlib_module_names:
            found[top] = found.get(top, False) or not guarded

    def visit(node, guarded: bool) -> None:
        if isinstance(node, ast.Try) and any(
            h.type is None or any(isinstance(n, ast.Name) and n.id in _GUARDS for n in ast.walk(h.type))
            for h in node.handlers
        ):
            for child in node.body:
                visit(child, True)
            for child in [*node.handlers, *node.orelse, *node.finalbody]:
                visit(child, guarded)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, guarded)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            add(node.module, guarded)
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "importorskip"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            add(node.args[0].value, True)
        for child in ast.iter_child_nodes(node):
            visit(child, guarded)

    for path in paths:
        visit(ast.parse(path.read_text(), filename=str(path)), False)
    return found


def _unmet_imports(project: dict) -> list[str]:
    import importlib.metadata as md

    sources = [*(ROOT / "tests").rglob("*.py"), *(ROOT / "examples").glob("*.py"),
               *(ROOT / "benchmarks").glob("*.py"), *(ROOT / "docs").glob("*.py")]
    test_closure = _requirement_closure(project, ["test"])
    any_extra = _requirement_closure(project, list(project["optional-dependencies"]))
    providers = md.packages_distributions()
    unmet = []
    for module, hard in sorted(_third_party_imports(sources).items()):
        dists = {_canonical(d) for d in providers.get(module, [])}
        if dists & test_closure or module in OPTIONAL_IMPORTS:
            continue
        if hard:
            unmet.append(f"{module} (imported without a guard; from {sorted(dists) or 'nothing installed'})")
        elif dists and not dists & any_extra:
            unmet.append(f"{module} (optional, but in no extra: from {sorted(dists)})")
    return unmet


def test_the_test_extra_installs_what_the_tests_examples_and_docs_import():
    pytest.importorskip("packaging")
    unmet = _unmet_imports(_pyproject()["project"])
    assert not unmet, 'not installed by pip install ".[test]":\n' + "\n".join(unmet)


def test_the_import_check_sees_a_missing_extra():
    """The check above fails for the test extra of issue 14, which left matplotlib out."""
    pytest.importorskip("packaging")
    pytest.importorskip("matplotlib")
    project = copy.deepcopy(_pyproject()["project"])
    project["optional-dependencies"]["test"] = [
        "pytest>=7.4", "hypothesis>=6.90", "mkdocs-material>=9.5", "mkdocstrings[python]>=0.25"
    ]
    assert any(u.startswith("matplotlib ") for u in _unmet_imports(project))


# ----------------------------------------------------------------------------- CI script
# .ci/run must install into a new virtual environment, so that what the install misses
# fails CI as it would fail a user. Run here against stand-ins for python3, pip and python
# that log their calls: the logic, not a real install (that takes CI a minute).


def _stub(path: Path, text: str) -> None:
    path.write_text("#!/bin/sh\n" + text)
    path.chmod(0o755)


@pytest.mark.parametrize(
    ("pip_status", "pytest_status", "ci_status"),
    [(0, 0, 0), (0, 1, 1), (0, 5, 1), (1, 0, 1)],
    ids=["pass", "tests-fail", "no-tests", "install-fails"],
)
def test_ci_runs_the_readme_command_in_a_new_virtual_environment(tmp_path, pip_status, pytest_status, ci_status):
    import shutil
    import subprocess

    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    repo, stubs, scratch = tmp_path / "repo", tmp_path / "stubs", tmp_path / "tmp"
    for d in (repo / ".ci", stubs, scratch):
        d.mkdir(parents=True)
    shutil.copy(ROOT / ".ci" / "run", repo / ".ci" / "run")
    log = tmp_path / "calls.log"
    # Inside the environment: pip and python log "<name> <their path> <arguments>".
    _stub(stubs / "venv-pip", f'echo "pip $0 $*" >> "{log}"\nexit {pip_status}\n')
    _stub(stubs / "venv-python", f'echo "python $0 $*" >> "{log}"\nexit {pytest_status}\n')
    # Outside it, pip and python only log (a wrong script never installs into this machine).
    for name in ("pip", "pip3", "python"):
        _stub(stubs / name, f'echo "{name} outside the environment $*" >> "{log}"\nexit 97\n')
    # `python3 -m venv DIR` makes DIR/bin/{{activate,pip,python}}.
    _stub(stubs / "python3", f"""echo "python3 $*" >> "{log}"
for dir; do :; done
mkdir -p "$dir/bin"
cp "{stubs}/venv-pip" "$dir/bin/pip"
cp "{stubs}/venv-python" "$dir/bin/python"
printf 'PATH="%s/bin:$PATH"; export PATH\\n' "$dir" > "$dir/bin/activate"
""")
    proc = subprocess.run(
        [bash, str(repo / ".ci" / "run")], cwd=tmp_path, capture_output=True, text=True, timeout=60,
        env={"PATH": f"{stubs}:/usr/bin:/bin", "TMPDIR": str(scratch), "HOME": str(tmp_path)},
    )
    assert proc.returncode == ci_status, proc.stdout + proc.stderr
    calls = log.read_text().splitlines()
    make, venv = calls[0].rsplit(" ", 1)
    assert make == "python3 -m venv", "a plain new environment (no --system-site-packages)"
    assert Path(venv).parent == scratch, "the environment lives outside the work tree"
    assert not Path(venv).exists(), "the environment is removed when CI ends"
    expected = [f"pip {venv}/bin/pip install -q -c constraints-ci.txt -e .[test]"]
    if pip_status == 0:
        expected.append(f"python {venv}/bin/python -m pytest -q")
    assert calls[1:] == expected, "pip and pytest must be the new environment's"


# ----------------------------------------------------------------------------- sdist and wheel
# The sdist is the whole project (MANIFEST.in); the wheel is the package alone. Built with
# setuptools' PEP 517 hooks, without network: the sdist from a copy of the work tree's
# files (tracked or not ignored: a fresh clone with the uncommitted work, and no stale
# egg-info, whose SOURCES.txt setuptools would add), with planted run leftovers that git
# ignores; the wheel from the unpacked sdist, as `python -m build` does. About 5 s.
PLANTED = ["examples/runs/planted/last.pt", "tests/__pycache__/planted.cpython-311.pyc",
           "docs/site/planted.html", "benchmarks/.hypothesis/planted"]

_BUILD = "import sys\nfrom setuptools import build_meta\ngetattr(build_meta, 'build_' + sys.argv[1])(sys.argv[2])\n"


def _git_files(*args: str) -> list[str]:
    import subprocess

    proc = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip("not a git work tree (an unpacked sdist has no git)")
    return proc.stdout.splitlines()


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    """``{"sdist": [paths inside the sdist's folder], "wheel": [names], "metadata": Message}``."""
    import email
    import shutil
    import subprocess
    import tarfile
    import zipfile

    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    _git_files("rev-parse", "--show-toplevel")
    setuptools = pytest.importorskip("setuptools")
    assert _major_minor(setuptools.__version__) >= (77, 0), "the test extra asks for setuptools>=77"
    tree, out = tmp_path_factory.mktemp("tree"), tmp_path_factory.mktemp("dist")
    for name in _git_files("ls-files", "--cached", "--others", "--exclude-standard"):
        if (ROOT / name).is_file():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, tree / name)
    for name in PLANTED:
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_text("left by a run\n")
    subprocess.run([sys.executable, "-c", _BUILD, "sdist", str(out)], cwd=tree, check=True,
                   capture_output=True, timeout=300)
    [sdist] = out.glob("*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = [m.name for m in tar.getmembers() if m.isfile()]
        tar.extractall(out / "unpacked", filter="data")
    [top] = {n.split("/", 1)[0] for n in names}
    subprocess.run([sys.executable, "-c", _BUILD, "wheel", str(out)], cwd=out / "unpacked" / top, check=True,
                   capture_output=True, timeout=300)
    [wheel] = out.glob("*.whl")
    with zipfile.ZipFile(wheel) as zf:
        wheel_names = zf.namelist()
        [meta] = [n for n in wheel_names if n.endswith(".dist-info/METADATA")]
        metadata = email.message_from_bytes(zf.read(meta))
    return {"sdist": sorted(n.split("/", 1)[1] for n in names), "wheel": wheel_names, "metadata": metadata}


def test_sdist_holds_every_tracked_file(built):
    tracked = [p for p in _git_files("ls-files") if (ROOT / p).is_file() and p != ".gitignore"]
    missing = sorted(set(tracked) - set(built["sdist"]))
    assert not missing, f"{len(missing)} tracked files are not in the sdist: {missing[:20]}"
    for must in ("tests/conftest.py", "tests/examples/conftest.py", "examples/train_hjepa.py", "docs/index.md",
                 "mkdocs.yml", "constraints-ci.txt", ".ci/run", "benchmarks/RESULTS.md"):
        assert must in built["sdist"]


def test_sdist_holds_nothing_that_git_ignores(built):
    assert not set(PLANTED) & set(built["sdist"])
    own = {"PKG-INFO", "setup.cfg"}  # written by the sdist build, as is src/<name>.egg-info/
    candidates = [p for p in built["sdist"] if p not in own and ".egg-info/" not in p]
    import subprocess

    # check-ignore exits 0 when it prints ignored paths, 1 when there are none.
    proc = subprocess.run(["git", "check-ignore", "--stdin"], cwd=ROOT, input="\n".join(candidates),
                          capture_output=True, text=True)
    assert proc.returncode in (0, 1), proc.stderr
    ignored = proc.stdout.split()
    assert not ignored, f"the sdist holds files that .gitignore ignores: {ignored[:20]}"
    assert not [p for p in built["sdist"] if ".egg-info/" in p and not p.startswith("src/jepa_blocks.egg-info/")]


def test_wheel_holds_the_package_alone(built):
    import jepa_blocks

    dist_info = f"jepa_blocks-{jepa_blocks.__version__}.dist-info/"
    stray = [n for n in built["wheel"] if not n.startswith(("jepa_blocks/", dist_info))]
    assert not stray, f"the wheel holds more than the package: {stray[:20]}"
    package = ROOT / "src" / "jepa_blocks"
    sources = {f"jepa_blocks/{p.relative_to(package).as_posix()}" for p in package.rglob("*.py")
               if "__pycache__" not in p.parts}
    assert sources <= set(built["wheel"]), sorted(sources - set(built["wheel"]))[:20]
    assert "jepa_blocks/py.typed" in built["wheel"]


def test_wheel_metadata_carries_the_version_urls_and_classifiers(built):
    import jepa_blocks

    meta = built["metadata"]
    assert meta["Version"] == jepa_blocks.__version__
    urls = dict(u.split(", ", 1) for u in meta.get_all("Project-URL"))
    assert urls == _pyproject()["project"]["urls"]
    assert any(c.startswith("Development Status :: ") for c in meta.get_all("Classifier"))
    assert meta["Requires-Python"] == _pyproject()["project"]["requires-python"]
    assert "pip install jepa-blocks" in meta.get_payload(), "the index page (the README) shows the install"
