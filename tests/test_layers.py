"""The package's layers hold: no import cycle between modules, and each module imports only its layer or below.

Every import counts, those inside functions included (a function-level import
still ties the two modules together), relative ones resolved. An import of
``pkg.mod`` is an edge to that module; ``from pkg import name`` is an edge to
the module ``pkg.name`` where there is one, else to ``pkg`` (its ``__init__``).

The layers, bottom first (docs/ARCHITECTURE.md); a module may import its own
group and any group on a lower line, never a group beside it on the same line:

    base          _affine, _backend, _memory, _pages, _threads, _validation, _version, _lazy (dask dispatch, scratch)
    core | io     the paper's stages | files in and out (a leaf: it draws nothing)
    registration | synthetic
    refinement
    plotting      figures, returned to the caller
    scaleout      mosaics, streamed cubes, fusion, Dask
    cli           the ggrad command and its output folders
    api           ggrad_gpu/__init__.py, __main__.py
"""

import ast
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ggrad_gpu"

LAYERS = [
    {"base"},
    {"core", "io"},
    {"registration", "synthetic"},
    {"refinement"},
    {"plotting"},
    {"scaleout"},
    {"cli"},
    {"api"},
]
BASE = {"_affine", "_backend", "_memory", "_pages", "_threads", "_validation", "_version", "_lazy"}


def group_of(module: str) -> str:
    """The layer group of a module of the package (``ggrad_gpu.core.warp`` -> ``core``)."""
    parts = module.split(".")
    if len(parts) == 1 or parts[1] == "__main__":
        return "api"
    return "base" if parts[1] in BASE else parts[1]


def rank(group: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if group in layer)


def read_package(package: Path) -> dict:
    """``{module name: (source, is_package)}`` for every ``.py`` file under ``package``."""
    modules = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (path.read_text(), is_package)
    return modules


def import_edges(modules: dict) -> tuple[dict, list]:
    """``({module: {modules it imports}}, [imports of the package that name no module])``."""
    root = next(iter(modules)).split(".")[0]
    edges, unresolved = defaultdict(set), []
    for name, (source, is_package) in modules.items():
        here = name if is_package else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] != root:
                        continue
                    if alias.name in modules:
                        edges[name].add(alias.name)
                    else:
                        unresolved.append(f"{name}: import {alias.name}")
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    source_module = ".".join(base + ([node.module] if node.module else []))
                else:
                    source_module = node.module or ""
                if source_module.split(".")[0] != root:
                    continue
                if source_module not in modules:
                    unresolved.append(f"{name}: from {source_module} import ...")
                    continue
                for alias in node.names:
                    target = f"{source_module}.{alias.name}"
                    edges[name].add(target if target in modules else source_module)
    for name in edges:
        edges[name].discard(name)
    return dict(edges), unresolved


def cycles(edges: dict) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in edges.get(node, ()):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                other = stack.pop()
                on_stack.discard(other)
                component.append(other)
                if other == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(set(edges) | {m for targets in edges.values() for m in targets}):
        if node not in index:
            visit(node)
    return sorted(found)


def layer_violations(edges: dict) -> list[str]:
    """``importer -> imported`` for every import of a higher layer, or of a group beside the importer's."""
    found = []
    for name, targets in sorted(edges.items()):
        mine = group_of(name)
        for target in sorted(targets):
            theirs = group_of(target)
            if theirs != mine and rank(theirs) >= rank(mine):
                found.append(f"{name} ({mine}) -> {target} ({theirs})")
    return found


def _write(root: Path, files: dict) -> Path:
    package = root / "ggrad_gpu"
    for relative, text in files.items():
        path = package / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return package


def test_the_checker_finds_a_cycle_and_a_layer_violation(tmp_path):
    package = _write(tmp_path, {
        "__init__.py": "from .core.warp import warp_cube\n",
        "core/__init__.py": "",
        "core/warp.py": "def warp_cube():\n    from ..refinement import passes  # inside a function: still an edge\n",
        "core/filters.py": "from .. import io\n",  # io sits beside core
        "io/__init__.py": "",
        "refinement/__init__.py": "",
        "refinement/passes.py": "from ..core import warp\nimport ggrad_gpu.core.filters\n",
    })
    edges, unresolved = import_edges(read_package(package))
    assert unresolved == []
    assert edges["ggrad_gpu.refinement.passes"] == {"ggrad_gpu.core.warp", "ggrad_gpu.core.filters"}
    assert cycles(edges) == [["ggrad_gpu.core.warp", "ggrad_gpu.refinement.passes"]]
    assert layer_violations(edges) == [
        "ggrad_gpu.core.filters (core) -> ggrad_gpu.io (io)",
        "ggrad_gpu.core.warp (core) -> ggrad_gpu.refinement.passes (refinement)",
    ]


def test_the_checker_passes_a_clean_package_and_reports_unknown_modules(tmp_path):
    package = _write(tmp_path, {
        "__init__.py": "from .refinement.passes import run\n",
        "_backend.py": "",
        "core/__init__.py": "from .warp import warp_cube\n",
        "core/warp.py": "from .._backend import x\n",
        "refinement/__init__.py": "",
        "refinement/passes.py": "from ..core import warp_cube\nfrom ..pipeline import old\n",
    })
    edges, unresolved = import_edges(read_package(package))
    assert cycles(edges) == [] and layer_violations(edges) == []
    assert unresolved == ["ggrad_gpu.refinement.passes: from ggrad_gpu.pipeline import ..."]


PACKAGE_EDGES, UNRESOLVED = import_edges(read_package(PACKAGE))


def test_every_import_of_the_package_names_a_module():
    assert UNRESOLVED == []


def test_no_import_cycle():
    assert cycles(PACKAGE_EDGES) == []


def test_each_module_imports_only_its_layer_or_below():
    assert layer_violations(PACKAGE_EDGES) == []


@pytest.mark.parametrize("group", sorted(set().union(*LAYERS) - {"api", "synthetic"}))
def test_each_subpackage_lists_its_public_api(group):
    """Each subpackage's ``__init__`` says what it holds (a docstring) and lists ``__all__``."""
    init = (PACKAGE / group / "__init__.py") if group != "base" else PACKAGE / "_lazy" / "__init__.py"
    tree = ast.parse(init.read_text())
    assert ast.get_docstring(tree), init
    assert any(isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "__all__" for t in node.targets)
               for node in tree.body), init


def test_every_module_belongs_to_a_layer():
    names = read_package(PACKAGE)
    assert [name for name in names if not any(group_of(name) in layer for layer in LAYERS)] == []


def test_the_package_imports_no_benchmark_reference():
    """SimpleITK and the plain way are benchmark references: they live in benchmarks/, not in the package."""
    found = []
    for name, (source, _) in read_package(PACKAGE).items():
        for node in ast.walk(ast.parse(source)):
            imported = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            found += [f"{name}: {module}" for module in imported
                      if module.split(".")[0] in ("SimpleITK", "benchmarks")]
    assert found == []


def test_plotting_draws_and_io_writes():
    """plotting returns figures and writes nothing (no import of io); io draws nothing (no import of plotting)."""
    plotting = {name: targets for name, targets in PACKAGE_EDGES.items() if group_of(name) == "plotting"}
    io = {name: targets for name, targets in PACKAGE_EDGES.items() if group_of(name) == "io"}
    assert [(n, t) for n, targets in plotting.items() for t in targets if group_of(t) == "io"] == []
    assert [(n, t) for n, targets in io.items() for t in targets if group_of(t) == "plotting"] == []
