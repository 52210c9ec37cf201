"""The package's seams: no import cycle (function-local imports included), no reach-in through
``sys.modules``/``importlib``, no private name used outside its module (a private module's names stay
in its package). Read from the source with ``ast``; nothing is imported."""
from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "gig_fast"


def _modules() -> dict[str, Path]:
    """Dotted module name → file, for every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _known(name: str) -> str | None:
    """The longest prefix of ``name`` that is a module of the package (None: outside it)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(importer: str, path: Path):
    """``(lineno, imported module, imported name or None)`` for every import statement of a file,
    function-local ones included; relative imports resolved against ``importer``."""
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, None
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = importer if is_pkg else importer.rpartition(".")[0]
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            for alias in node.names:
                yield node.lineno, mod, alias.name


def _graph() -> dict[str, set[str]]:
    """Import edges between the package's modules. A module importing a package that contains it (its
    parents) is not an edge: Python has always started those first."""
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for name, path in MODULES.items():
        for _, mod, what in _imports(name, path):
            for target in ({_known(mod)} | ({_known(f"{mod}.{what}")} if what else set())) - {None}:
                if target != name and not name.startswith(target + "."):
                    graph[name].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_import_graph_has_no_cycle():
    cycles = _cycles(_graph())
    assert not cycles, f"import cycles (function-local imports count): {cycles}"


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def _sources() -> list[tuple[str, Path]]:
    """Every Python file of the package, the tests and the benchmarks, with its module name."""
    files = [(name, path) for name, path in MODULES.items()]
    for folder in ("tests", "benchmarks"):
        files += [(f"{folder}.{p.stem}", p) for p in sorted((ROOT / folder).glob("*.py"))]
    return files


def _reach_ins(path: Path) -> list[str]:
    bad = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Subscript) and ast.unparse(node.value) == "sys.modules":
            bad.append(f"{path}:{node.lineno}: sys.modules[...] reaches into a module; import it or use its API")
        if isinstance(node, ast.Call) and ast.unparse(node.func) in ("importlib.import_module", "import_module"):
            arg = node.args[0] if node.args else None
            if isinstance(arg, ast.Constant) and str(arg.value).startswith("gig_fast"):
                bad.append(f"{path}:{node.lineno}: importlib reaches into {arg.value}; import it or use its API")
    return bad


def test_no_reach_in_through_sys_modules_or_importlib():
    bad = [msg for _, path in _sources() for msg in _reach_ins(path)]
    assert not bad, "\n".join(bad)


def _private_violation(importer: str, mod: str, what: str | None) -> str | None:
    """Why ``from mod import what`` (or ``import mod``) in ``importer`` breaks the privacy rule, or None."""
    target = _known(mod)
    if target is None:
        return None
    # a private module (a part starting with "_") stays inside the package that holds it
    parts = target.split(".")
    for i, part in enumerate(parts):
        if part.startswith("_") and part != "__init__":
            owner = ".".join(parts[:i])
            if importer != owner and not importer.startswith(owner + "."):
                return f"imports the private module {'.'.join(parts[:i + 1])} from outside {owner}"
    if what and what.startswith("_") and not what.startswith("__") and f"{target}.{what}" not in MODULES:
        return f"imports the private name {what} of {target}"
    return None


def test_no_private_name_is_imported_from_another_module():
    bad = [f"{path}:{line}: {why}" for name, path in _sources() for line, mod, what in _imports(name, path)
           if (why := _private_violation(name, mod, what))]
    assert not bad, "\n".join(bad)


def test_the_checks_catch_what_they_should(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import sys, importlib\nm = sys.modules['gig_fast.ops.sparse_code']\n"
                   "n = importlib.import_module('gig_fast.ops.sparse_code')\n")
    assert len(_reach_ins(bad)) == 2
    assert _private_violation("tests.test_x", "gig_fast.ops.sparse_code", "_sparse_code_op")
    assert _private_violation("gig_fast.concepts.core", "gig_fast.ops.checks", None) is None
    assert _private_violation("gig_fast.pipeline.runner", "gig_fast._extensions", "has_triton") is None
    assert _private_violation("tests.test_x", "gig_fast._extensions", "has_triton")
    assert _private_violation("gig_fast.ops.registry", "gig_fast", "_extensions") is None


# -- the product speaks of the product ------------------------------------------------------------
# Words about how the work was organised (who asked, in which round) say nothing to a reader of the
# product: a case is named by what it is ("the GPU bisecting case: K = 8,192 over 200,000 × 1,024").
# Written so that this file's own source does not match them.
ORGANISATION_WORDS = re.compile(
    r"\bsessions? \d|\bin session\b|\bissues? ?#?\d|\bhelper[ ]runs?\b|\bCI[ ]replicas?\b|\bgoal[']s\b"
    r"|\bengine[e]rs?\b|\bwork[t]rees?\b", re.IGNORECASE)
# Files outside the repository (the project's design is docs/design.md, in it).
OUTSIDE_FILES = re.compile(r"\bDESIGN\.md\b|\.\./shared/")
# A machine's absolute paths (results and logs are written relative to the repository, or as <root>).
MACHINE_PATHS = re.compile(r"(?<![\w.$}-])/(?:work|tmp|root|home)/")
# The one deliberate absolute path: builds of every checkout on a machine share one lock file.
ALLOWED_LINES = {("Makefile", "LOCK = flock /" + "tmp/gig_fast_build.lock")}


def _tracked_text_files() -> list[Path]:
    """The files git tracks in the checkout that are text (binary files: a NUL byte in the first 8 KiB)."""
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    files = []
    for name in out.decode().split("\0"):
        path = ROOT / name
        if name and path.is_file() and b"\0" not in path.read_bytes()[:8192]:
            files.append(path)
    return files


def _organisation_problems(path: Path, rel: str) -> list[str]:
    bad = []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if (rel, line.strip()) in ALLOWED_LINES:
            continue
        for pattern, what in ((ORGANISATION_WORDS, "words about how the work was organised"),
                              (MACHINE_PATHS, "a machine's absolute path"),
                              (OUTSIDE_FILES, "a file outside the repository")):
            m = pattern.search(line)
            if m:
                bad.append(f"{rel}:{n}: {what}: {m.group(0)!r} in {line.strip()[:120]!r}")
    return bad


def test_tracked_files_speak_of_the_product_only():
    bad = [msg for path in _tracked_text_files() for msg in _organisation_problems(path, path.relative_to(ROOT).as_posix())]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("line, flagged", [
    ("measured in sess" + "ion 5", True), ("(issue " + "25's case)", True), ("see issue" + " #10", True),
    ("a helper " + "run", True), ("beside a CI " + "replica", True), ("the go" + "al's cases", True),
    ("four other engin" + "eers", True), ('"package": "/' + 'work/wt/bench/gig_fast"', True),
    ("--out /" + "tmp/store_bench", True),
    ("the GPU bisecting case: K = 8,192 over 200,000 × 1,024", False), ("TMP=${TMPDIR:-/tmp}", False),
    ('"package": "<root>/gig_fast"', False), ("an HTTP session", False), ("issues/123 on GitHub", False),
    ("/pytorch/aten/src/ATen/SparseCsrTensorImpl.cpp", False), ("the concept's score", False),
    ("along X(α) (DESI" + "GN.md §1.5)", True), ("see ../sha" + "red/paper", True), ("docs/design.md §1.5", False)])
def test_the_organisation_check_catches_what_it_should(tmp_path, line, flagged):
    path = tmp_path / "doc.md"
    path.write_text(f"first line\n{line}\n", encoding="utf-8")
    assert bool(_organisation_problems(path, "doc.md")) == flagged


# -- the layers (docs/architecture.md) ------------------------------------------------------------
# Top to bottom; a module belongs to the layer of the longest prefix that names it. A module may import
# modules of its own layer and of the layers below, never of a layer above (function-local imports
# count). Keep this list and docs/architecture.md in step.
LAYERS = [
    ("public surface", ("gig_fast",)),
    ("command line", ("gig_fast.cli",)),
    ("HTTP server", ("gig_fast.serve",)),
    ("validation", ("gig_fast.validation",)),
    ("test runs", ("gig_fast.testing.runs",)),
    ("report", ("gig_fast.report",)),
    ("results reader", ("gig_fast.api", "gig_fast.export")),
    ("pipeline", ("gig_fast.pipeline",)),
    ("renderers and stores", ("gig_fast.explorer", "gig_fast.image_store", "gig_fast.testing")),
    ("method", ("gig_fast.concepts", "gig_fast.gig", "gig_fast.srd", "gig_fast.slicing", "gig_fast.models",
                "gig_fast.data", "gig_fast.interventions")),
    ("run folder", ("gig_fast.run_folder",)),
    ("ops", ("gig_fast.ops", "gig_fast.kernels", "gig_fast._extensions")),
]
# Known breaks of the rule, each to be removed by the change that fixes it (none now).
KNOWN_UPWARD: set[tuple[str, str]] = set()


def _layer(module: str, layers=LAYERS) -> int:
    """The index (0 = top) of the layer that holds ``module``: the longest prefix listed."""
    best, depth = None, -1
    for i, (_, prefixes) in enumerate(layers):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and p.count(".") > depth:
                best, depth = i, p.count(".")
    if best is None:
        raise KeyError(f"{module} is in no layer: add it to LAYERS and docs/architecture.md")
    return best


def _upward_imports(graph: dict[str, set[str]], layers=LAYERS, known=frozenset()) -> list[str]:
    """``importer -> imported`` for every import of a module of a higher layer, outside ``known``."""
    names = [name for name, _ in layers]
    return [f"{a} ({names[_layer(a, layers)]}) imports {b} ({names[_layer(b, layers)]})"
            for a in sorted(graph) for b in sorted(graph[a])
            if _layer(b, layers) < _layer(a, layers) and (a, b) not in known]


def test_every_module_has_a_layer():
    for module in MODULES:
        _layer(module)


def test_no_module_imports_a_higher_layer():
    bad = _upward_imports(_graph(), known=KNOWN_UPWARD)
    assert not bad, "imports against the layer rule (docs/architecture.md):\n" + "\n".join(bad)


def test_the_known_exceptions_are_still_needed():
    """An exception that the code no longer needs is removed from the list, so it cannot hide a new one."""
    graph = _graph()
    stale = [f"{a} -> {b}" for a, b in KNOWN_UPWARD if b not in graph.get(a, set())]
    assert not stale, f"remove these from KNOWN_UPWARD: {stale}"


def test_the_layer_check_catches_an_upward_import():
    layers = [("top", ("p.top",)), ("mid", ("p.mid",)), ("low", ("p.low", "p.mid.low_part"))]
    graph = {"p.top": {"p.mid"}, "p.mid": {"p.low", "p.top"}, "p.low": set(), "p.mid.low_part": {"p.mid"}}
    assert _upward_imports(graph, layers) == ["p.mid (mid) imports p.top (top)",
                                              "p.mid.low_part (low) imports p.mid (mid)"]
    assert _upward_imports(graph, layers, known={("p.mid", "p.top"), ("p.mid.low_part", "p.mid")}) == []
    with pytest.raises(KeyError, match="in no layer"):
        _layer("q.other", layers)


# -- the run folder's layout is spelled in one module ---------------------------------------------
# gig_fast/run_folder.py names every file and folder of a run's output folder; the pipeline writes and
# the reader reads through those names, so a layout change is one edit. A module that spells one of
# them out again (outside docstrings), or builds a chunk file's or the work folder's name itself, fails.
RUN_FOLDER = PACKAGE / "run_folder.py"
CHUNK_OR_WORK_NAME = re.compile(r"^chunk_(?:[{*\d]|$)|^work-")


def _layout_names() -> set[str]:
    """The string constants of run_folder.py that name a file or folder with a dot or an underscore
    (``graph.json``, ``concept_samples`` …; plain words such as ``codes`` are dict keys elsewhere too)."""
    names = set()
    for node in ast.parse(RUN_FOLDER.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign):
            values = node.value.elts if isinstance(node.value, ast.Tuple) else [node.value]
            for v in values:
                if isinstance(v, ast.Constant) and isinstance(v.value, str) and ("." in v.value or "_" in v.value):
                    names.add(v.value)
    return names


def _layout_spelled(path: Path, rel: str, names: set[str]) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [f"{rel}:{node.lineno}: {node.value!r} spells the run folder's layout: use gig_fast.run_folder"
            for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
            and (node.value in names or CHUNK_OR_WORK_NAME.search(node.value))]


def test_the_run_folder_layout_is_spelled_in_run_folder_only():
    names = _layout_names()
    assert {"graph.json", "metrics.json", "report.html", "concept_samples"} <= names
    bad = [msg for path in MODULES.values() if path != RUN_FOLDER
           for msg in _layout_spelled(path, path.relative_to(ROOT).as_posix(), names)]
    assert not bad, "\n".join(bad)


def test_the_layout_check_catches_a_spelled_path(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('"""graph.json in a docstring is fine."""\nx = out / "metrics.json"\ny = f"chunk_{ci:05d}.npz"\n'
                   'z = out / "work-abc"\nw = cfg.chunk_images\nv = "chunk_images"\n', encoding="utf-8")
    assert [m.split(": ")[:2] for m in _layout_spelled(bad, "bad.py", _layout_names())] == [
        ["bad.py:2", "'metrics.json' spells the run folder's layout"], ["bad.py:3", "'chunk_' spells the run folder's layout"],
        ["bad.py:4", "'work-abc' spells the run folder's layout"]]


# -- names that say one thing each ----------------------------------------------------------------
def _repeated_names(paths: list[Path]) -> dict[str, list[str]]:
    """File names that more than one module has, except ``__init__.py`` and an op's backends: a file of
    ``gig_fast/kernels/`` named as the op of ``gig_fast/ops/`` it implements."""
    ops = {p.name for p in paths if p.parent.name == "ops"}
    seen: dict[str, list[str]] = {}
    for p in paths:
        if p.name != "__init__.py":
            seen.setdefault(p.name, []).append(p.relative_to(ROOT).as_posix() if p.is_relative_to(ROOT) else str(p))
    return {name: where for name, where in seen.items() if len(where) > 1
            and not (name in ops and all(Path(w).parent.name in ("ops", "kernels") for w in where))}


def test_no_two_modules_share_a_name():
    repeated = _repeated_names(list(MODULES.values()))
    assert not repeated, f"modules of the same name (give each a name that says its job): {repeated}"


def test_the_name_check_catches_a_repeated_name():
    paths = [ROOT / p for p in ("gig_fast/ops/sparse_code.py", "gig_fast/kernels/sparse_code.py", "gig_fast/a/run.py",
                                "gig_fast/b/run.py", "gig_fast/a/__init__.py", "gig_fast/b/__init__.py")]
    assert _repeated_names(paths) == {"run.py": ["gig_fast/a/run.py", "gig_fast/b/run.py"]}


def _unshipped(package_dirs: list[Path], shipped: set[str]) -> list[str]:
    """Dotted names of the folders with an ``__init__.py`` that the wheel would leave out."""
    names = [".".join(d.relative_to(ROOT).parts) for d in package_dirs]
    return sorted(n for n in names if n not in shipped)


def test_every_package_folder_is_in_the_wheel():
    # an installed (non-editable) copy that lacks a subpackage fails at `import gig_fast`, which an
    # in-place checkout never shows
    import tomllib

    import setuptools

    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    shipped = set(setuptools.find_packages(str(ROOT), include=find["include"]))
    package_dirs = [p.parent for p in PACKAGE.rglob("__init__.py")]
    assert "gig_fast.gig" in shipped
    assert not _unshipped(package_dirs, shipped), f"package folders the wheel leaves out: {_unshipped(package_dirs, shipped)}"
    assert _unshipped([PACKAGE / "gig", PACKAGE / "ops"], {"gig_fast.ops"}) == ["gig_fast.gig"]
