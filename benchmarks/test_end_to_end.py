"""refine at 350 x 415 x 1000 against the plain way, end to end (benchmarks/RESULTS.md: "10.7x").

The paper's geometry: a 350 x 415 guide and the native 70 x 83 x 1000 cube of
``make_phantom(bands=1000, signatures="mixed", **draw_cases(n)[k].phantom_kwargs())`` for cases
``k = 0 .. --bench-cases - 1`` (default 5). ggrad_gpu is
``refine(guide, cube, initial=phantom.initial, backend=...)``; the plain way
is ``benchmarks.reference.plain_refine``: the cube placed on the guide grid with
the initial transform, the estimate with per-band SciPy loops and
``scipy.optimize.nnls`` (``plain_estimate``), SimpleITK's mean-squares affine
registration of grad_y to grad_x (``register_sitk``, ``SitkSettings()``).
Every method first runs once on the tiny size (one-time costs of a process),
then each case once, one round.

``python -m pytest benchmarks/test_end_to_end.py --benchmark-json=.benchmarks/end_to_end.json``
then ``python -m benchmarks .benchmarks/end_to_end.json`` prints each case's
ratio and the ratio of the mean times.
"""

from __future__ import annotations

import pytest

from benchmarks import reference
from benchmarks.conftest import backends
from ggrad_gpu.cli import bench


def pytest_generate_tests(metafunc):
    if "item" not in metafunc.fixturenames:
        return
    cases = metafunc.config.getoption("bench_cases")
    if cases < 1:
        raise pytest.UsageError(f"--bench-cases must be at least 1; got {cases}")
    # Each case: ggrad_gpu first, then the plain way.
    order = sorted(backends(metafunc.config), key=lambda backend: backend.id == "plain")
    metafunc.parametrize("item", [pytest.param((k, b.values[0]), marks=b.marks, id=f"case{k}-{b.id}")
                                  for k in range(cases) for b in order])


@pytest.fixture(scope="session")
def warmed_up():
    """Each method once on the tiny size, untimed; returns the cases' data, built on demand and kept."""
    tiny = bench.Data(bench.SIZES["tiny"][0])
    warm = set()
    held = {}

    def get(case, backend):
        if backend not in warm:
            tiny_case = reference.build("refine", tiny)
            if backend != "plain" or tiny_case.plain is not None:
                bench.measure(tiny_case, backend, repeat=1, warmup=False)
            warm.add(backend)
        if case not in held:
            held[case] = bench.Data(bench.PAPER, case=case)
        return held[case]

    return get


def test_refine_end_to_end(item, warmed_up, timed):
    case_number, backend = item
    case = reference.build("refine", warmed_up(case_number, backend))
    if backend == "plain" and case.plain is None:
        pytest.skip(case.no_plain)
    timed(case, backend, repeat=1, warmup=False)
