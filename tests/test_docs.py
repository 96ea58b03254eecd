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
