"""ggrad_gpu's benchmarks, run from the repository root (not part of the installed package).

- ``test_stages.py``, ``test_end_to_end.py``: pytest-benchmark suites over the
  stage definitions of ``ggrad_gpu.cli.bench`` (``ggrad bench`` times the same
  cases without pytest); options in ``conftest.py``.
- ``python -m benchmarks JSON ...``: their JSON as the ``stages.md`` table.
- ``accuracy/``: scripts that measure refine's accuracy against SimpleITK peers.
- ``RESULTS.md``: the figures measured so far.
"""
