"""Tiled mosaics at two sizes: tiles per second and peak memory over all processes, beside raw Zarr I/O.

Run ``python -m benchmarks.mosaic_memory`` from the repository root (``--help``
for sizes and options). For each mosaic size (``--grids``, n x n tiles) it

1. writes the phantom, ``make_mosaic(grid=(n, n), tile_shape=(T, T),
   bands=B, native_factor=4, signatures="mixed")``, in a subprocess of its
   own: the guide and each tile as npy files;
2. for each worker count (``--workers``) runs, in a fresh subprocess,
   ``refine_mosaic`` on a ``distributed.LocalCluster`` of that many worker
   processes (one thread each, started and ``ggrad_gpu`` imported on them
   before the clock), the tiles read by the tasks (``mosaic_cli.TileFile``,
   memory-mapped) and the guide by region, then ``fuse_mosaic`` of the tiles
   at the refined placement through the same cluster, then the raw Zarr
   write and read of the fused values (same shape, chunks and codecs) in the
   same process;
3. prints one Markdown row per run: tiles per second, the CPU seconds per
   tile summed over the run's process and all its children (what a tile
   costs whatever else runs on the machine), the peak resident memory
   summed over the same processes (nannies and workers, sampled every 50
   ms; shared pages count once per process, so an upper bound), the fusion
   and the raw Zarr write and read in MB/s, and the load average of the
   machine before and after the run (the machine may be shared: the
   seconds are then upper bounds).

The tiles in flight are capped at the worker threads (``refine_mosaic``'s
default) and each task reads its tile and its guide region when it starts,
so the peak memory should not grow with the number of tiles.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.memory import PeakMemory


def write_mosaic(folder, grid: int, side: int, bands: int) -> None:
    """The phantom mosaic as npy files, and its true and initial matrices (``truth.npz``)."""
    from ggrad_gpu.synthetic import make_mosaic

    folder = Path(folder)
    mosaic = make_mosaic(grid=(grid, grid), tile_shape=(side, side), bands=bands, native_factor=4,
                         signatures="mixed", slipped=min(5, grid * grid - 1), featureless=min(6, grid * grid - 2))
    np.save(folder / "guide.npy", mosaic.guide)
    for i, tile in enumerate(mosaic.tiles):
        np.save(folder / f"tile{i}.npy", tile.astype(np.float32))
    np.savez(folder / "truth.npz", matrices=mosaic.matrices, initials=mosaic.initials)


def run(folder, workers: int) -> dict:
    """refine_mosaic and fuse_mosaic on a local cluster, then raw Zarr I/O; the figures as a dict."""
    import dask
    import distributed
    import zarr

    from ggrad_gpu.scaleout.cluster import WORKER_CONFIG
    from ggrad_gpu.scaleout.fusion import fuse_mosaic, mosaic_grid
    from ggrad_gpu.io.guide_regions import open_guide_regions
    from ggrad_gpu.scaleout.mosaic import refine_mosaic
    from ggrad_gpu.cli.mosaic import TileFile

    folder = Path(folder)
    initials = np.load(folder / "truth.npz")["initials"]
    tiles = [TileFile(folder / f"tile{i}.npy") for i in range(len(initials))]
    guide = open_guide_regions(folder / "guide.npy")
    out = Path(tempfile.mkdtemp(prefix="run-", dir=folder))
    # The workers as ggrad mosaic --workers starts them (cluster.WORKER_CONFIG).
    with dask.config.set(WORKER_CONFIG), \
            distributed.LocalCluster(n_workers=workers, threads_per_worker=1, dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        client.run(lambda: __import__("ggrad_gpu.scaleout.mosaic"))  # imports off the clock
        with PeakMemory() as refine_memory:
            start = time.perf_counter()
            result = refine_mosaic(guide, tiles, initials=initials, backend="numpy", client=client)
            refine_seconds = time.perf_counter() - start
        kept = [i for i, s in enumerate(result.status) if s != "failed"]
        grid = mosaic_grid([tiles[i].shape for i in kept], result.matrices[kept], guide.shape)
        with PeakMemory() as fusion_memory:
            start = time.perf_counter()
            path = fuse_mosaic(out / "mosaic.zarr", [tiles[i] for i in kept], result.matrices[kept], grid,
                               client=client)
            fusion_seconds = time.perf_counter() - start
    fused = zarr.open_array(str(path), mode="r")
    values = fused[:]
    raw = zarr.create_array(str(out / "raw.zarr"), shape=fused.shape, chunks=fused.chunks, dtype=fused.dtype,
                            fill_value=np.nan, compressors=fused.compressors, config={"write_empty_chunks": True})
    start = time.perf_counter()
    raw[:] = values
    write_seconds = time.perf_counter() - start
    start = time.perf_counter()
    again = zarr.open_array(str(out / "raw.zarr"), mode="r")[:]
    read_seconds = time.perf_counter() - start
    assert again.tobytes() == values.tobytes()
    megabytes = values.nbytes / 1e6
    return {"tiles": len(tiles), "workers": workers, "tile_shape": list(tiles[0].shape),
            "refine_seconds": refine_seconds, "tiles_per_s": len(tiles) / refine_seconds,
            "cpu_s_per_tile": refine_memory.cpu_seconds / len(tiles),
            "refine_peak_gib": refine_memory.peak / 2**30, "fusion_peak_gib": fusion_memory.peak / 2**30,
            "status": {s: result.status.count(s) for s in set(result.status)}, "mosaic_shape": list(fused.shape),
            "fusion_mb_per_s": megabytes / fusion_seconds, "raw_write_mb_per_s": megabytes / write_seconds,
            "raw_read_mb_per_s": megabytes / read_seconds}


def _subprocess(code: str) -> str:
    """Run ``code`` in a fresh Python with this repository first on the path; its stdout."""
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).resolve().parents[1])] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the benchmark's subprocess failed ({done.returncode}): {done.stderr[-3000:]}")
    return done.stdout


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grids", default="4,8", help="mosaic sizes, n for n x n tiles (default 4,8)")
    parser.add_argument("--workers", default="1,2", help="worker process counts (default 1,2)")
    parser.add_argument("--tile", type=int, default=128, help="tile side, pixels (default 128)")
    parser.add_argument("--bands", type=int, default=256, help="bands per tile (default 256)")
    parser.add_argument("--keep", type=Path, help="keep the data in this folder (default: a temporary one)")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="ggrad-mosaic-")) if args.keep is None else args.keep
    print("| tiles | workers | seconds | tiles / s | CPU s / tile (all processes) | peak RSS GiB, refine (all processes) | "
          "peak RSS GiB, fusion | fusion MB/s | raw Zarr write MB/s | raw Zarr read MB/s | load average before / after |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    try:
        for grid in (int(n) for n in args.grids.split(",")):
            folder = root / f"grid{grid}"
            folder.mkdir(parents=True, exist_ok=True)
            _subprocess(f"from benchmarks.mosaic_memory import write_mosaic; "
                        f"write_mosaic({str(folder)!r}, {grid}, {args.tile}, {args.bands})")
            for workers in (int(n) for n in args.workers.split(",")):
                before = os.getloadavg()[0]
                figures = json.loads(_subprocess(f"import json; from benchmarks.mosaic_memory import run; "
                                                 f"print(json.dumps(run({str(folder)!r}, {workers})))"))
                after = os.getloadavg()[0]
                print(f"| {grid} x {grid} of {' x '.join(map(str, figures['tile_shape']))} | {workers} | "
                      f"{figures['refine_seconds']:.1f} | {figures['tiles_per_s']:.3f} | {figures['cpu_s_per_tile']:.2f} | "
                      f"{figures['refine_peak_gib']:.2f} | {figures['fusion_peak_gib']:.2f} | "
                      f"{figures['fusion_mb_per_s']:.1f} | {figures['raw_write_mb_per_s']:.1f} | "
                      f"{figures['raw_read_mb_per_s']:.1f} | {before:.1f} / {after:.1f} |", flush=True)
                print(json.dumps(figures), file=sys.stderr, flush=True)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
