"""A cube beyond memory, end to end: ``ggrad refine --memory-limit`` on Zarr cubes larger than the limit.

Run ``python -m benchmarks.out_of_core`` from the repository root (``--help``
for sizes and options). For each size it

1. writes a phantom: a guide of ``GUIDE x GUIDE`` pixels and a Zarr cube
   ``FACTOR`` times coarser with ``BANDS`` bands, built chunk by chunk (the
   cube never exists whole in this process either): the phantom's component
   abundances sampled through its true matrix, mixed with its spectra;
2. reads the whole Zarr cube once and times it (the raw read throughput of
   the same file, the reference for the passes);
3. runs ``ggrad refine GUIDE CUBE --memory-limit LIMIT`` in a subprocess
   (threads, then ``--workers 1`` and ``--workers 2``), sampling the resident
   memory summed over the process and all its children (the Dask workers)
   every 0.1 s;
4. prints one Markdown row per run: peak memory, the time of each pass
   (``transform.json``'s timings and the write of ``registered.zarr``), the
   passes' throughput next to the raw read's, and the TRE against the truth.

The figures in ``benchmarks/RESULTS.md`` come from this script.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.memory import PeakMemory


def write_phantom(folder: Path, guide_side: int, factor: int, bands: int, seed: int = 0, chunk: int = 256):
    """Guide, Zarr cube and the true and initial matrices of a large phantom; returns the truth."""
    import zarr
    from scipy import ndimage

    from ggrad_gpu.synthetic import make_phantom

    spectra_source = make_phantom(shape=(64, 64), bands=bands, seed=seed)  # the spectra only
    scene = make_phantom(shape=(guide_side, guide_side), bands=2, native_factor=factor, seed=seed)
    np.save(folder / "guide.npy", scene.guide)
    np.savetxt(folder / "initial.txt", scene.initial)
    native = (-(-guide_side // factor),) * 2
    spectra = spectra_source.spectra.astype(np.float32)
    components = min(len(spectra), len(scene.abundances))
    to_guide = np.linalg.inv(scene.matrix)
    side = 256
    cube = zarr.create_array(str(folder / "cube.zarr"), shape=native + (bands,), chunks=(chunk, chunk, bands),
                             dtype="float32")
    rng = np.random.default_rng(seed)
    for r0 in range(0, native[0], side):
        rows = np.arange(r0, min(r0 + side, native[0]), dtype=np.float64)
        cols = np.arange(native[1], dtype=np.float64)
        grid_r, grid_c = np.meshgrid(rows, cols, indexing="ij")
        points = to_guide @ np.stack([grid_r.ravel(), grid_c.ravel(), np.ones(grid_r.size)])
        fractions = np.stack([ndimage.map_coordinates(scene.abundances[c], points[:2], order=1, mode="nearest")
                              for c in range(components)], axis=1)
        block = fractions @ spectra[:components]
        block *= 1 + 0.02 * rng.standard_normal(block.shape).astype(np.float32)
        block /= block.mean(axis=1, keepdims=True)  # area normalisation, as the phantom's
        cube[r0:r0 + len(rows)] = block.reshape(len(rows), native[1], bands)
    return scene.matrix, scene.guide.shape


def raw_read(path: Path) -> tuple[float, int]:
    """Seconds to read every chunk of the Zarr array once, and its bytes."""
    import zarr

    array = zarr.open_array(str(path), mode="r")
    start = time.perf_counter()
    for r0 in range(0, array.shape[0], array.chunks[0]):
        array[r0:r0 + array.chunks[0]]
    return time.perf_counter() - start, array.nbytes


def run_refine(folder: Path, out: Path, limit: str, workers: int | None) -> dict:
    """``ggrad refine`` in a subprocess; its peak resident memory (with children), stdout and seconds."""
    import psutil

    command = [sys.executable, "-m", "ggrad_gpu", "refine", str(folder / "guide.npy"), str(folder / "cube.zarr"),
               "-o", str(out), "--initial", str(folder / "initial.txt"), "--memory-limit", limit, "--backend",
               "numpy"] + ([] if workers is None else ["--workers", str(workers)])
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with PeakMemory(psutil.Process(process.pid), interval=0.1) as memory:
        stdout, stderr = process.communicate()
    seconds = time.perf_counter() - start
    if process.returncode not in (0, 1):
        raise RuntimeError(f"ggrad refine failed ({process.returncode}): {stderr[-2000:]}")
    return {"peak": memory.peak, "stdout": stdout, "seconds": seconds}


def row(label, run, out: Path, truth, guide_shape, read_seconds, nbytes) -> str:
    from ggrad_gpu.metrics import footprint_region, target_registration_error

    record = json.loads((out / "transform.json").read_text())
    timings = record["timings_s"]
    match = re.search(r"in ([0-9.]+) s", run["stdout"])
    write = float(match.group(1)) if match else float("nan")
    tre = target_registration_error(np.array(record["matrix"]), truth, guide_shape,
                                    region=footprint_region(record["cube"]["shape"], truth, guide_shape))
    read_rate = nbytes / read_seconds / 2**20
    passes = {"prepare (read, find missing)": timings.get("prepare", 0.0),
              "warp to grids": timings.get("resample", 0.0),
              "pyramid + Sobel + Gram + combine": timings.get("estimate", 0.0),
              "register": timings.get("register", 0.0), "warp + write registered.zarr": write}
    cells = " | ".join(f"{v:.1f}" for v in passes.values())
    return (f"| {label} | {run['peak'] / 2**30:.2f} | {run['seconds']:.0f} | {cells} | "
            f"{nbytes / max(timings.get('prepare', 1e-9), 1e-9) / 2**20:.0f} vs {read_rate:.0f} | "
            f"{tre.mean:.3f} / {tre.max:.3f} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--guide", type=int, default=4096, help="guide side in pixels (default 4096)")
    parser.add_argument("--factors", default="4,2", help="cube coarseness factors (default 4,2: 1 and 4 GiB)")
    parser.add_argument("--bands", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=256, help="the Zarr cube's chunk side (default 256: all bands)")
    parser.add_argument("--limit", default="1GB", help="--memory-limit (default 1GB)")
    parser.add_argument("--workers", default="none,1,2", help="runs: none (threads), or worker counts")
    parser.add_argument("--keep", type=Path, help="keep the data in this folder (default: a temporary one)")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="ggrad-ooc-")) if args.keep is None else args.keep
    print("| cube | peak RSS GiB (all processes) | total s | prepare s | warp to grids s | "
          "pyramid+Sobel+Gram s | register s | warp+write s | prepare MiB/s vs raw Zarr read MiB/s | "
          "TRE mean / max px |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    try:
        for factor in (int(f) for f in args.factors.split(",")):
            folder = root / (f"f{factor}" if args.chunk == 256 else f"f{factor}-c{args.chunk}")
            folder.mkdir(parents=True, exist_ok=True)
            if not (folder / "cube.zarr").exists():
                truth, guide_shape = write_phantom(folder, args.guide, factor, args.bands, chunk=args.chunk)
                np.save(folder / "truth.npy", truth)
            truth, guide_shape = np.load(folder / "truth.npy"), (args.guide, args.guide)
            read_seconds, nbytes = raw_read(folder / "cube.zarr")
            for workers in args.workers.split(","):
                count = None if workers == "none" else int(workers)
                out = folder / f"out-{workers}"
                shutil.rmtree(out, ignore_errors=True)
                run = run_refine(folder, out, args.limit, count)
                side = args.guide // factor
                label = f"{side} x {side} x {args.bands} ({nbytes / 2**30:.1f} GiB), " + (
                    "threads" if count is None else f"{count} worker{'s' if count > 1 else ''}")
                print(row(label, run, out, truth, guide_shape, read_seconds, nbytes), flush=True)
                shutil.rmtree(out, ignore_errors=True)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
