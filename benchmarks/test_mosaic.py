"""Tiled mosaics: tiles per second with 1 and 2 Dask workers, peak memory over all processes, fusion throughput.

The mosaic: ``make_mosaic(grid=(n, n), tile_shape=(128, 128), bands=256,
native_factor=4, signatures="mixed")`` (n = 4 by default; a 1865 x 1865
guide), its tiles written as float32 npy files and read by the tasks
(``mosaic_cli.TileFile``, memory-mapped), the guide read by region
(``io.guide_regions``), as ``ggrad mosaic`` does.

- ``test_refine_tiles[workers]``: ``refine_mosaic(..., client=...)`` on a
  ``distributed.LocalCluster`` of 1 or 2 worker processes (one thread each;
  started, and ggrad_gpu imported on them, before the clock starts): tiles per
  second, and the peak of the resident memory summed over this process and all
  of its children (the nannies and workers), sampled every 50 ms (shared pages
  count once per process, so the sum is an upper bound).
- ``test_fusion_throughput``: ``fuse_mosaic`` of the tiles at their true
  placement into a new ``mosaic.zarr`` (threads, the default), in bytes of
  mosaic written per second, next to the raw Zarr write of the same values
  into a store of the same chunks and codecs (``store[:] = values``),
  measured in the same run.

Run from the repository root (figures in ``benchmarks/RESULTS.md``)::

    python -m pytest benchmarks/test_mosaic.py -s --benchmark-json=.benchmarks/mosaic.json

``GGRAD_BENCH_MOSAIC_GRID=8`` runs the 8 x 8 mosaic (about 1 GiB of tiles on disk);
``GGRAD_BENCH_MOSAIC_TILE`` and ``GGRAD_BENCH_MOSAIC_BANDS`` change the tiles' side and bands.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest

distributed = pytest.importorskip("distributed")
zarr = pytest.importorskip("zarr")
psutil = pytest.importorskip("psutil")

import dask  # noqa: E402

from benchmarks.memory import PeakMemory  # noqa: E402
from ggrad_gpu.cli.mosaic import TileFile  # noqa: E402
from ggrad_gpu.io.guide_regions import open_guide_regions  # noqa: E402
from ggrad_gpu.scaleout.cluster import WORKER_CONFIG  # noqa: E402
from ggrad_gpu.scaleout.fusion import fuse_mosaic, mosaic_grid  # noqa: E402
from ggrad_gpu.scaleout.mosaic import refine_mosaic  # noqa: E402
from ggrad_gpu.synthetic import make_mosaic  # noqa: E402

GRID = int(os.environ.get("GGRAD_BENCH_MOSAIC_GRID", "4"))
SIDE = int(os.environ.get("GGRAD_BENCH_MOSAIC_TILE", "128"))  # smaller for a quick check of the suite
TILE, BANDS, FACTOR = (SIDE, SIDE), int(os.environ.get("GGRAD_BENCH_MOSAIC_BANDS", "256")), 4


@pytest.fixture(scope="module")
def on_disk(tmp_path_factory):
    """The mosaic's guide and tiles as npy files; the true and initial matrices."""
    folder = tmp_path_factory.mktemp("mosaic-bench")
    mosaic = make_mosaic(grid=(GRID, GRID), tile_shape=TILE, bands=BANDS, native_factor=FACTOR, signatures="mixed",
                         slipped=min(5, GRID * GRID - 1), featureless=min(6, GRID * GRID - 2))
    np.save(folder / "guide.npy", mosaic.guide)
    for i, tile in enumerate(mosaic.tiles):
        np.save(folder / f"tile{i}.npy", tile.astype(np.float32))
    tiles = [TileFile(folder / f"tile{i}.npy") for i in range(len(mosaic.tiles))]
    return folder, open_guide_regions(folder / "guide.npy"), tiles, mosaic.matrices, mosaic.initials


def _seconds(benchmark, fallback):
    stats = getattr(benchmark, "stats", None)  # None with --benchmark-disable
    return stats.stats.data[0] if stats else fallback


@pytest.mark.parametrize("workers", [1, 2])
def test_refine_tiles(workers, on_disk, benchmark):
    _, guide, tiles, _, initials = on_disk
    # The workers as ggrad mosaic --workers starts them (cluster.WORKER_CONFIG).
    with dask.config.set(WORKER_CONFIG), \
            distributed.LocalCluster(n_workers=workers, threads_per_worker=1, dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        client.run(lambda: __import__("ggrad_gpu.scaleout.mosaic"))  # imports off the clock
        with PeakMemory() as memory:
            start = time.perf_counter()
            result = benchmark.pedantic(refine_mosaic, args=(guide, tiles), rounds=1, iterations=1,
                                        kwargs={"initials": initials, "backend": "numpy", "client": client})
            seconds = _seconds(benchmark, time.perf_counter() - start)
    figures = {"tiles": len(tiles), "workers": workers, "seconds": seconds, "tiles_per_s": len(tiles) / seconds,
               "peak_rss_bytes": memory.peak, "status": list(result.status)}
    benchmark.group = f"mosaic-refine-{GRID}x{GRID}"
    benchmark.extra_info.update(figures)
    print("\n" + json.dumps({k: v for k, v in figures.items() if k != "status"}), {s: result.status.count(s)
                                                                                    for s in set(result.status)})


def test_fusion_throughput(on_disk, benchmark, tmp_path):
    _, guide, tiles, matrices, _ = on_disk
    grid = mosaic_grid([t.shape for t in tiles], matrices, guide.shape)
    with PeakMemory() as memory:
        start = time.perf_counter()
        path = benchmark.pedantic(fuse_mosaic, args=(tmp_path / "mosaic.zarr", tiles, matrices, grid), rounds=1,
                                  iterations=1)
        fusion_seconds = _seconds(benchmark, time.perf_counter() - start)
    fused = zarr.open_array(str(path), mode="r")
    values = fused[:]
    raw = zarr.create_array(str(tmp_path / "raw.zarr"), shape=fused.shape, chunks=fused.chunks, dtype=fused.dtype,
                            fill_value=np.nan, compressors=fused.compressors, config={"write_empty_chunks": True})
    start = time.perf_counter()
    raw[:] = values
    raw_seconds = time.perf_counter() - start
    figures = {"mosaic_shape": list(fused.shape), "bytes": int(values.nbytes), "fusion_seconds": fusion_seconds,
               "fusion_bytes_per_s": values.nbytes / fusion_seconds, "raw_zarr_seconds": raw_seconds,
               "raw_zarr_bytes_per_s": values.nbytes / raw_seconds, "ratio": raw_seconds / fusion_seconds,
               "peak_rss_bytes": memory.peak}
    benchmark.group = f"mosaic-fusion-{GRID}x{GRID}"
    benchmark.extra_info.update(figures)
    print("\n" + json.dumps(figures))
