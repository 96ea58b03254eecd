"""The walk-through notebooks run headless at small sizes, so they cannot rot.

Each notebook asserts what it shows in its own cells (TRE before and after,
weights that sum to one, ...); an assertion or any other error in a cell fails
the run here. The stored outputs come from ``python notebooks/execute.py``.
"""

import importlib.util
import shutil
from pathlib import Path

import pytest

from helpers import has_module

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
# Figures each notebook draws at least (issue: six or more across the walk-throughs).
FIGURES = {"01_quickstart.ipynb": 4, "02_your_data.ipynb": 2, "03_mosaics_and_gpus.ipynb": 2}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (has_module("nbclient") and has_module("ipykernel")),
                       reason="the notebooks extra (nbclient, ipykernel) is not installed"),
]


def _executor():
    spec = importlib.util.spec_from_file_location("notebook_execute", NOTEBOOKS / "execute.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _figures(notebook) -> int:
    return sum("image/png" in output.get("data", {})
               for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs)


def test_every_notebook_is_listed():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(FIGURES)


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_notebook_runs_headless_and_draws_its_figures(name, tmp_path):
    copy = tmp_path / name  # the stored notebook is never rewritten by the tests
    shutil.copy(NOTEBOOKS / name, copy)
    notebook = _executor().execute(copy, small=True)
    errors = [output for cell in notebook.cells if cell.cell_type == "code"
              for output in cell.outputs if output.output_type == "error"]
    assert not errors
    assert _figures(notebook) >= FIGURES[name]


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_stored_notebook_holds_its_outputs(name):
    import nbformat

    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.execution_count for cell in code), "re-run python notebooks/execute.py"
    assert _figures(notebook) >= FIGURES[name]
