"""ggrad_gpu's benchmarks, run from the repository root (not part of the installed package).

- ``test_stages.py``, ``test_end_to_end.py``: pytest-benchmark suites over the
  stage definitions of ``ggrad_gpu.cli.bench`` (``ggrad bench`` times the same
  cases without pytest); options in ``conftest.py``.
- ``python -m benchmarks JSON ...``: their JSON as the ``stages.md`` table.
- ``python -m benchmarks.check``: a quick stage table against the plain way, each ratio beside the
  one recorded last (``check.json``, ``--record``), a drop over 15 % flagged; refuses on a loaded
  machine (issue 26).
- ``python -m benchmarks.floors``: each stage of a default refine (the paper's geometry; one tile
  on a larger guide) beside its floor, GEMM rate and copy bandwidth measured in the same run.
- ``accuracy/``: scripts that measure refine's accuracy against SimpleITK peers.
- ``RESULTS.md``: the figures measured so far.
"""
