"""Execute the walk-through notebooks and store their outputs: ``python notebooks/execute.py [NOTEBOOK ...]``.

With no arguments every ``notebooks/*.ipynb`` runs, in order, in its own folder.
The test suite runs the same notebooks through :func:`execute` on copies, at
small sizes (``GGRAD_NOTEBOOK_SMALL=1``), so they cannot rot. Needs the
``notebooks`` extra (``pip install ".[notebooks]"``).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def execute(path, *, small: bool = False, timeout: int = 600):
    """Run every cell of the notebook at ``path`` and return it with its outputs.

    Parameters
    ----------
    path : str or Path
        The notebook; it runs in its own folder.
    small : bool
        Run at the small sizes the test suite uses (``GGRAD_NOTEBOOK_SMALL=1``).
    timeout : int
        Seconds a cell may take.
    """
    import nbformat
    from nbclient import NotebookClient

    path = Path(path)
    notebook = nbformat.read(path, as_version=4)
    previous = os.environ.get("GGRAD_NOTEBOOK_SMALL")
    os.environ["GGRAD_NOTEBOOK_SMALL"] = "1" if small else "0"
    try:
        NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                       resources={"metadata": {"path": str(path.parent)}}).execute()
    finally:
        if previous is None:
            del os.environ["GGRAD_NOTEBOOK_SMALL"]
        else:
            os.environ["GGRAD_NOTEBOOK_SMALL"] = previous
    return notebook


def store(notebook, path) -> None:
    """Write ``notebook`` to ``path`` all at once (a temporary file, then a rename)."""
    import nbformat

    path = Path(path)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".ipynb", delete=False, encoding="utf-8") as f:
        nbformat.write(notebook, f)
    os.chmod(f.name, path.stat().st_mode & 0o777 if path.exists() else 0o644)
    os.replace(f.name, path)


def main(argv=None) -> int:
    paths = [Path(p) for p in (sys.argv[1:] if argv is None else argv)] or sorted(HERE.glob("*.ipynb"))
    for path in paths:
        print(f"executing {path.name} ...", flush=True)
        store(execute(path), path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
