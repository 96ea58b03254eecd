"""The package's layout keeps its promises: no private name crosses a module boundary, short functions.

Modules whose own name starts with an underscore (``_backend``, ``_validation``)
are internal to the package; the names they define for other modules are
public (no leading underscore), like everyone else's.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ggrad_gpu"
MODULES = sorted(PACKAGE.rglob("*.py"))


def _module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    """The absolute module an ``ImportFrom`` reads from."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_crossings(path: Path, package: Path = PACKAGE) -> list[str]:
    """``module: name`` for every private name this module takes from another package module."""
    module = _module_name(path, package)

    def is_module(dotted: str) -> bool:
        return (package.parent / (dotted.replace(".", "/") + ".py")).exists()

    tree = ast.parse(path.read_text())
    found, aliases = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            source = _resolve(module, node, path.name == "__init__.py")
            if not source.startswith("ggrad_gpu"):
                continue
            for alias in node.names:
                target = f"{source}.{alias.name}"
                if _private(alias.name) and not is_module(target):
                    found.append(f"{module}: from {source} import {alias.name}")
                aliases[alias.asname or alias.name] = target
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("ggrad_gpu"):
                    aliases[alias.asname or alias.name.split(".")[0]] = alias.name
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and _private(node.attr):
            target = aliases.get(node.value.id)
            if target is not None and is_module(target):
                found.append(f"{module}: {node.value.id}.{node.attr}")
    return found


def test_the_checker_finds_a_crossing(tmp_path):
    package = tmp_path / "ggrad_gpu"
    package.mkdir()
    source = "from .estimate import _private_helper\nfrom . import warp, _backend\nwarp._sampler\n"
    (package / "pipeline.py").write_text(source)
    (package / "warp.py").write_text("")
    (package / "_backend.py").write_text("")
    crossings = private_crossings(package / "pipeline.py", package)
    assert crossings == ["ggrad_gpu.pipeline: from ggrad_gpu.estimate import _private_helper",
                         "ggrad_gpu.pipeline: warp._sampler"]


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_private_name_crosses_a_module_boundary(path):
    assert private_crossings(path) == []


def _code_lines(source: str, node) -> int:
    """Lines of code of a function: no blank lines, comments or docstring."""
    body = node.body
    docstring = None
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        docstring = range(body[0].lineno, body[0].end_lineno + 1)
    count = 0
    for number, line in enumerate(source.splitlines()[node.lineno - 1 : node.end_lineno], start=node.lineno):
        text = line.strip()
        if text and not text.startswith("#") and (docstring is None or number not in docstring):
            count += 1
    return count


def test_functions_are_short_and_refine_reads_like_the_algorithm():
    lengths = {}
    for path in MODULES:
        source = path.read_text()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lengths[f"{_module_name(path)}.{node.name}"] = _code_lines(source, node)
    assert lengths["ggrad_gpu.refinement.driver.refine"] <= 80
    assert {name: n for name, n in lengths.items() if n > 100} == {}
