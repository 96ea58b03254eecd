"""Each stage of ``ggrad_gpu.cli.bench`` on NumPy, CuPy and the plain way, through pytest-benchmark.

One test per (size, stage, backend), ``test_stage[<size>-<stage>-<backend>]``,
in group ``<stage>-<size>``; the plain way runs first, so each ggrad_gpu row
also records its relative ``difference`` from the plain way's result.
Selection: ``--bench-sizes`` (default ``small``: 350x415x200), ``--bench-stages``,
``--bench-backends``, ``--bench-repeat`` (see ``conftest.py``). E.g.
``python -m pytest benchmarks/test_stages.py --bench-sizes paper --bench-stages estimate``
is "estimate at 350 x 415 x 1000" against the plain way.
"""

from __future__ import annotations

import pytest

from benchmarks import reference
from benchmarks.conftest import backends
from ggrad_gpu.cli import bench


def pytest_generate_tests(metafunc):
    if "item" not in metafunc.fixturenames:
        return
    config = metafunc.config
    try:
        sizes = bench.parse_sizes(config.getoption("bench_sizes"))
        stages = bench.parse_stages(config.getoption("bench_stages"))
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None
    params = [pytest.param((shape, stage, backend.values[0]), marks=backend.marks,
                           id=f"{'x'.join(map(str, shape))}-{stage}-{backend.id}")
              for shape in sizes for stage in stages for backend in backends(config)]
    metafunc.parametrize("item", params)


@pytest.fixture(scope="module")
def data_for():
    """The host data of one size at a time (a new size drops the last one's arrays)."""
    held = {}

    def get(shape):
        if shape not in held:
            held.clear()
            held[shape] = bench.Data(shape)
        return held[shape]

    return get


def test_stage(item, data_for, timed, request):
    shape, stage, backend = item
    data = data_for(shape)
    case = reference.build(stage, data)
    if backend == "plain" and case.plain is None:
        pytest.skip(case.no_plain)
    row, out = timed(case, backend, repeat=request.config.getoption("bench_repeat"))
    if backend == "plain":
        data.plain_results[stage] = out
    elif stage in data.plain_results and case.compare is not None:
        row["difference"] = float(case.compare(out, data.plain_results[stage]))
