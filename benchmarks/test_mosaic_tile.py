"""One mosaic tile as a partial field on a larger guide: refine against the plain way (issue 26).

The tile: tile 0 of ``make_mosaic(grid=(2, 2), tile_shape=(128, 128),
bands=256, native_factor=4, signatures="mixed", slipped=3, featureless=None,
seed=0)`` (float32), a 128 x 128 x 256 map at 4 guide pixels per tile pixel
(a 512 x 512 footprint) on the mosaic's 995 x 995 guide, with its stage
placement as the initial transform (8.3 guide px off on average).

- ``test_tile_refine[numpy|cupy]``: ``refine(guide, tile, initial=...,
  output_grid="cube")`` on the whole guide, what a user calls (it works on the
  guide's region around the footprint). CuPy is marked ``gpu`` and skipped
  where it sees no device.
- ``test_tile_refine[plain]``: the plain way (``benchmarks.reference.plain_refine``:
  SciPy estimate per band, ``scipy.optimize.nnls``, SimpleITK's mean-squares
  affine registration) on the same tile and the same guide region
  (:func:`ggrad_gpu.scaleout.mosaic.guide_window`: the footprint plus the
  capture margin, about 704 x 713 guide px; the plain way on the whole guide
  would place a 995 x 995 x 256 cube). Needs SimpleITK (the ``bench`` extra).

Each records the wall seconds (pytest-benchmark, one round after one untimed
warm-up), the CPU seconds of the process (``time.process_time``: what the tile
costs on a shared machine) and the TRE over the tile's footprint (guide px,
mean and max) in ``extra_info``; the numbers are printed with ``-s``. Run it
one-threaded for a Dask worker's figure (``ggrad mosaic`` workers run one
thread)::

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 python -m pytest benchmarks/test_mosaic_tile.py -s \\
        --benchmark-json=.benchmarks/mosaic_tile.json

``GGRAD_BENCH_TILE`` and ``GGRAD_BENCH_TILE_BANDS`` change the tile's side and
bands (e.g. 32 and 16 for a quick check of the suite).
"""

from __future__ import annotations

import json
import os
import time
import warnings

import numpy as np
import pytest

from benchmarks.conftest import backends
from ggrad_gpu import refine
from ggrad_gpu.metrics import footprint_region, target_registration_error
from ggrad_gpu.scaleout.mosaic import guide_window
from ggrad_gpu.synthetic import make_mosaic

SIDE = int(os.environ.get("GGRAD_BENCH_TILE", "128"))
BANDS = int(os.environ.get("GGRAD_BENCH_TILE_BANDS", "256"))


def pytest_generate_tests(metafunc):
    if "method" in metafunc.fixturenames:
        metafunc.parametrize("method", backends(metafunc.config))


@pytest.fixture(scope="module")
def tile():
    """The guide, tile 0 (float32), its stage placement and its true matrix."""
    mosaic = make_mosaic(grid=(2, 2), tile_shape=(SIDE, SIDE), bands=BANDS, native_factor=4, signatures="mixed",
                         slipped=3, featureless=None, seed=0)
    return mosaic.guide, mosaic.tiles[0].astype(np.float32), mosaic.initials[0], mosaic.matrices[0]


def _refine(method):
    if method == "plain":
        from benchmarks import reference

        if not reference._has_sitk():
            pytest.skip("the plain way needs SimpleITK (pip install '.[bench]')")

        def plain(guide, cube, initial):
            region, origin = guide_window(guide, cube.shape, initial)
            to_guide = np.array([[1.0, 0, origin[0]], [0, 1, origin[1]], [0, 0, 1]])
            result = reference.plain_refine(np.ascontiguousarray(region), cube, initial @ to_guide)
            return result.matrix @ np.linalg.inv(to_guide)

        return plain

    def ours(guide, cube, initial):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # a kept initial transform: the TRE says it
            return refine(guide, cube, initial=initial, backend=method, output_grid="cube").matrix

    return ours


def test_tile_refine(method, tile, benchmark):
    guide, cube, initial, truth = tile
    run = _refine(method)
    run(guide, cube, initial)  # untimed: one-time costs of the process (imports, the device, caches)
    cpu = {}

    def timed():
        start = time.process_time()
        matrix = run(guide, cube, initial)
        cpu["seconds"] = time.process_time() - start
        return matrix

    matrix = benchmark.pedantic(timed, rounds=1, iterations=1, warmup_rounds=0)
    footprint = footprint_region(cube.shape, truth, guide.shape)
    before, after = (target_registration_error(m, truth, guide.shape, region=footprint) for m in (initial, matrix))
    stats = getattr(benchmark, "stats", None)  # None with --benchmark-disable
    figures = {"method": method, "tile": list(cube.shape), "guide": list(guide.shape),
               "seconds": stats.stats.data[0] if stats else None, "cpu_seconds": cpu["seconds"],
               "tre_before": before.mean, "tre_mean": after.mean, "tre_max": after.max}
    benchmark.group = f"mosaic-tile-{SIDE}x{SIDE}x{BANDS}"
    benchmark.extra_info.update(figures)
    print("\n" + json.dumps(figures))
    assert after.mean < before.mean / 3, figures
