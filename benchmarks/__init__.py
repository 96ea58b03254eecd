"""ggrad_gpu's benchmarks: pytest-benchmark suites (``python -m pytest benchmarks``) and the
stage runner (``python -m benchmarks``). Not part of the installed package; run from the
repository root."""
