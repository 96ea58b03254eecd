"""Options and fixtures of the pytest-benchmark suites; the cases are ``ggrad_gpu.cli.bench``'s.

Run from the repository root (``python -m pytest`` alone collects ``tests`` and
the package only)::

    python -m pytest benchmarks/test_stages.py --benchmark-json=.benchmarks/stages.json
    python -m pytest benchmarks/test_end_to_end.py --benchmark-json=.benchmarks/end_to_end.json
    python -m benchmarks .benchmarks/stages.json .benchmarks/end_to_end.json   # -> benchmarks/stages.md

CuPy cases carry the ``gpu`` mark and are skipped where CuPy sees no device;
the plain way's ``register`` and ``refine`` need SimpleITK (``pip install
".[bench]"``) and are skipped without it.
"""

from __future__ import annotations

import pytest

from ggrad_gpu import resolve_backend
from ggrad_gpu.cli import bench

collect_ignore = ["__main__.py", "accuracy"]  # the runner and the accuracy scripts are not tests


def pytest_addoption(parser):
    group = parser.getgroup("ggrad_gpu benchmarks")
    group.addoption("--bench-sizes", default="small",
                    help="test_stages.py: comma list of tiny, small, paper, large or RxCxB (default: small)")
    group.addoption("--bench-stages", default=None, help="test_stages.py: comma list of stages (default: all)")
    group.addoption("--bench-backends", default="numpy,cupy,plain",
                    help="comma list of numpy, cupy, plain (default: all three)")
    group.addoption("--bench-repeat", type=int, default=3, help="test_stages.py: timed rounds (default: 3)")
    group.addoption("--bench-cases", type=int, default=5,
                    help="test_end_to_end.py: refine cases at 350 x 415 x 1000 (default: 5, as in RESULTS.md)")


def _cupy_missing() -> str | None:
    try:
        resolve_backend("cupy")
    except RuntimeError as exc:
        return str(exc)
    return None


def backends(config) -> list[pytest.param]:
    """``--bench-backends`` as parameters, the plain way first; CuPy marked ``gpu`` and skipped where unusable."""
    names = [name.strip() for name in config.getoption("bench_backends").split(",") if name.strip()]
    unknown = sorted(set(names) - {"numpy", "cupy", "plain"})
    if unknown:
        raise pytest.UsageError(f"--bench-backends must be among numpy, cupy, plain; got {', '.join(unknown)}")
    params = []
    for name in ("plain", "numpy", "cupy"):
        if name in names:
            missing = _cupy_missing() if name == "cupy" else None
            marks = [pytest.mark.gpu, pytest.mark.skipif(missing is not None, reason=missing or "")] \
                if name == "cupy" else []
            params.append(pytest.param(name, marks=marks, id=name))
    return params


@pytest.fixture(scope="session")
def machines():
    """``machine(device)``: the device's measured limits, measured once per session."""
    return lambda backend: bench.machine("numpy" if backend == "plain" else backend)


@pytest.fixture
def timed(benchmark, machines):
    """``timed(case, backend, **options)``: :func:`ggrad_gpu.cli.bench.measure` through pytest-benchmark.

    The group is ``<stage>-<size>``, so a stage's backends sit side by side;
    ``extra_info`` holds the row (warm-up, transfer, bytes or flops) and the
    machine, which ``python -m benchmarks`` turns into the table.
    """

    def timer(call, sync, rounds):
        result = {}

        def setup():
            result.clear()  # the previous round's output is freed before the next
            sync()

        def round_():
            result["out"] = call()
            sync()  # inside the timed call: the device's work is part of it

        benchmark.pedantic(round_, setup=setup, rounds=rounds, warmup_rounds=0, iterations=1)
        stats = getattr(benchmark, "stats", None)  # None with --benchmark-disable
        return (list(stats.stats.data) if stats else []), result.get("out")

    def run(case, backend, **options):
        benchmark.group = f"{case.stage}-{case.size}"
        row, out = bench.measure(case, backend, timer=timer, **options)
        benchmark.extra_info.update(row=row, machine=machines(backend))
        return row, out

    return run
