"""Every public function and class of every module has an example that runs as a doctest.

The examples themselves run with the suite (``--doctest-modules``); this test
keeps a new public function or class from arriving without one. Public: a
name without a leading underscore, defined in the module it is found in (not
imported there), in every module of the package, the private modules
(``_backend``, ``_validation``...) included.
"""

import doctest
import functools
import importlib
import inspect
import pkgutil

import pytest

import ggrad_gpu

# Importing ``ggrad_gpu.__main__`` runs the command line: it holds no definitions.
NOT_IMPORTED = {"ggrad_gpu.__main__"}


def _modules():
    names = [ggrad_gpu.__name__] + [info.name for info in pkgutil.walk_packages(ggrad_gpu.__path__, "ggrad_gpu.")]
    return [importlib.import_module(name) for name in names if name not in NOT_IMPORTED]


def _defined_here(module, obj) -> bool:
    """A function (decorated ones too: ``functools.cache``, ``contextmanager``) or class of ``module``'s own."""
    kind = inspect.isclass(obj) or inspect.isfunction(inspect.unwrap(obj))
    return kind and getattr(obj, "__module__", None) == module.__name__


def _public_definitions():
    for module in _modules():
        for name, obj in vars(module).items():
            if not name.startswith("_") and _defined_here(module, obj):
                yield pytest.param(module, name, id=f"{module.__name__}.{name}")


def test_the_walk_finds_the_package():
    found = {(module.__name__, name) for module, name in (param.values for param in _public_definitions())}
    # One of each kind: a function, a class, a decorated function, one in a private module, one in io.
    for expected in [("ggrad_gpu.refinement.driver", "refine"), ("ggrad_gpu.core.estimate", "GlobalGradient"),
                     ("ggrad_gpu.cli.bench", "machine"), ("ggrad_gpu._validation", "check_array"),
                     ("ggrad_gpu.io.cubes", "read_cube")]:
        assert expected in found
    assert ("ggrad_gpu.refinement.passes", "estimate_global_gradient") not in found  # imported there, not defined


@functools.cache
def _doctests(module) -> dict:
    return {test.name: test for test in doctest.DocTestFinder().find(module)}


@pytest.mark.parametrize("module, name", list(_public_definitions()))
def test_public_definition_has_a_numpy_style_docstring_with_an_example_that_runs(module, name):
    obj = getattr(module, name)
    doc = inspect.getdoc(obj) or ""
    assert doc.strip(), "no docstring"
    assert "Examples\n--------" in doc and ">>>" in doc, "no Examples section with a doctest"
    # The examples are collected as a doctest of this module (so the suite runs them), and at
    # least one of them is not skipped.
    examples = _doctests(module)[f"{module.__name__}.{name}"].examples
    assert any(not example.options.get(doctest.SKIP) for example in examples), "every example is skipped"


def _readme_commands():
    """The commands of the README's first shell block (its two commands)."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_readme_commands_are_the_ones_ci_and_the_tests_run():
    from pathlib import Path

    install_and_demo, install_and_test = _readme_commands()
    assert install_and_demo == "pip install . && ggrad demo"
    assert install_and_test == 'pip install ".[test]" && python -m pytest'
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    assert install_and_test in ci  # CI runs the README's test command itself
    # ggrad demo (the first command's job) runs in tests/test_cli.py::test_demo_prints_the_error_and_writes_a_report
    source = (Path(__file__).resolve().parent / "test_cli.py").read_text()
    assert 'main(["demo"' in source or "main(['demo'" in source
