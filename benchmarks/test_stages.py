"""Per-stage benchmarks on NumPy, CuPy and the plain SciPy way (pytest-benchmark).

The stages, their inputs and their performance model are defined once in
:mod:`benchmarks._stages` and shared with the runner (``python -m benchmarks``,
which prints them as one table). Here each case is one test,
``test_stage[<size>-<backend>-<stage>]``, in the pytest-benchmark group
``<stage>-<size>``, so a stage's backends are compared side by side.

Selection (options of ``benchmarks/conftest.py``, or environment variables):

- ``--bench-sizes`` / ``GGRAD_BENCH_SIZES``: ``small`` (default: 350x415x200
  and 350x415x1000), ``all`` (adds 1024x1024x512 and 2048x2048x256) or a
  comma list of ``RxCxB``;
- ``--bench-backends`` / ``GGRAD_BENCH_BACKENDS``: among ``numpy,cupy,scipy``
  (default all; CuPy cases are marked ``gpu`` and skipped where CuPy sees no
  device; the plain SciPy cases exist only up to the small sizes);
- ``--bench-rounds`` / ``GGRAD_BENCH_ROUNDS``: timed rounds (default 3).

Protocol (:mod:`benchmarks._timing`): inputs are on the device before timing,
their host-to-device copy timed alone (``extra_info["h2d_s"]``); the first call
is timed alone (``extra_info["warmup_s"]``); each timed round ends with a
device synchronisation. ``extra_info`` also holds the model's
``bytes_moved`` or ``flops``, the achieved ``gbps`` or ``gflops`` and
``frac_peak`` of the machine's measured limit (:mod:`benchmarks._peaks`),
and, once both have run, ``speedup_vs_numpy`` (CuPy) and
``speedup_vs_scipy``.

Run from the repository root, e.g.
``python -m pytest benchmarks/test_stages.py -k 350x415x200``.
"""

from __future__ import annotations

import os

import pytest

from benchmarks._peaks import environment
from benchmarks._runner import WorkspaceCache, add_speedups, run_case
from benchmarks._stages import STAGES, parse_backends, parse_sizes, plan
from benchmarks.conftest import env_int
from ggrad_gpu._backend import cupy_usable

DEFAULT_ROUNDS = 3
# Row fields copied into pytest-benchmark's extra_info (the timings are its own).
EXTRA = (
    "size", "backend", "data", "warmup_s", "h2d_s", "h2d_bytes", "bytes_moved", "flops", "model",
    "peak_kind", "peak", "peak_unit", "spec", "gbps", "gflops", "frac_peak", "frac_spec", "info",
)


def _setting(config, option: str, variable: str):
    value = config.getoption(option, default=None)
    return value if value not in (None, "") else (os.environ.get(variable) or None)


def _selection(config):
    try:
        sizes = parse_sizes(_setting(config, "bench_sizes", "GGRAD_BENCH_SIZES"))
        backends = parse_backends(_setting(config, "bench_backends", "GGRAD_BENCH_BACKENDS"))
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None
    return sizes, backends


def pytest_generate_tests(metafunc):
    """One case per (size, backend, stage), size-major so data are built once per size."""
    if "stage_plan" not in metafunc.fixturenames:
        return
    sizes, backends = _selection(metafunc.config)
    params = []
    for item in plan(sizes, backends, list(STAGES)):
        marks = [pytest.mark.gpu] if item.backend == "cupy" else []
        if item.skip:
            marks.append(pytest.mark.skip(reason=item.skip))
        params.append(pytest.param(item, id=item.id, marks=marks))
    metafunc.parametrize("stage_plan", params)


@pytest.fixture(scope="session")
def stage_rounds(request) -> int:
    rounds = request.config.getoption("bench_rounds", default=None)
    if rounds is None:
        rounds = env_int("GGRAD_BENCH_ROUNDS", DEFAULT_ROUNDS)
    if rounds < 1:
        raise pytest.UsageError(f"--bench-rounds must be at least 1; got {rounds}")
    return rounds


@pytest.fixture(scope="session")
def machine(request) -> dict:
    """Identity and measured limits of the CPU (and of the GPU where CuPy cases run)."""
    _, backends = _selection(request.config)
    return environment(gpu="cupy" in backends and cupy_usable()[0])


@pytest.fixture(scope="module")
def workspaces():
    cache = WorkspaceCache()
    yield cache
    cache.release()


@pytest.fixture(scope="module")
def finished():
    """Rows of this module's finished cases with their extra_info, for the speed-ups."""
    return []


def test_stage(benchmark, stage_plan, stage_rounds, machine, workspaces, finished):
    """Time one stage at one size on one backend."""
    stage = STAGES[stage_plan.stage]
    benchmark.group = f"{stage.name}-{stage_plan.size}"

    def timer(call, sync, rounds):
        def timed():
            call()
            sync()  # inside the timed round: the device's work is part of it

        benchmark.pedantic(timed, setup=sync, rounds=rounds, warmup_rounds=0, iterations=1)
        stats = getattr(benchmark, "stats", None)  # None with --benchmark-disable
        return list(stats.stats.data) if stats else []

    row = run_case(stage, workspaces.get(stage_plan), stage_plan.backend, stage_rounds, machine, timer=timer)
    benchmark.extra_info.update({key: row[key] for key in EXTRA})
    finished.append((row, benchmark.extra_info))
    add_speedups([r for r, _ in finished])
    for r, extra in finished:
        extra.update(speedup_vs_numpy=r["speedup_vs_numpy"], speedup_vs_scipy=r["speedup_vs_scipy"])
