"""Every public function of the user-facing namespaces has an example that runs as a doctest.

The examples themselves run with the suite (``--doctest-modules``); this test
keeps a new public function from arriving without one.
"""

import inspect

import pytest

import ggrad_gpu
from ggrad_gpu import baselines, io, metrics, synthetic

NAMESPACES = [ggrad_gpu, io, metrics, synthetic, baselines]


def _public_functions():
    for namespace in NAMESPACES:
        for name in getattr(namespace, "__all__", []):
            obj = getattr(namespace, name)
            if inspect.isfunction(obj):
                yield pytest.param(obj, id=f"{namespace.__name__}.{name}")


@pytest.mark.parametrize("function", list(_public_functions()))
def test_public_function_has_a_numpy_style_docstring_with_an_example(function):
    doc = inspect.getdoc(function) or ""
    assert doc.strip(), "no docstring"
    assert "Examples\n--------" in doc and ">>>" in doc, "no Examples section with a doctest"


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
