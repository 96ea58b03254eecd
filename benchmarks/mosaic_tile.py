"""One mosaic tile's refinement: its error and its CPU seconds, and where the time goes.

Run ``python -m benchmarks.mosaic_tile`` from the repository root (``--help``
for options). On ``make_mosaic(grid=(2, 2), tile_shape=(T, T), bands=B,
native_factor=4, signatures="mixed", slipped=3, featureless=None, seed=S)``
each tile is refined as ``refine_mosaic``'s task does (``refine_tile`` on its
guide window, ``output_grid="cube"``, NumPy), one after the other in this
process; per tile it prints the stage placement's and the result's TRE over
the tile's footprint (guide pixels, mean and max), the CPU seconds of the
process (``time.process_time``: what the tile costs whatever else runs on a
shared machine) and a digest of the matrix (equal digests: the same matrix
bit for bit). ``--profile N`` prints the N most expensive functions of
tile 0 (``cProfile`` on CPU time). Run it with ``OPENBLAS_NUM_THREADS=1``
to measure what a Dask worker process does (``distributed`` starts its
workers so).
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import io
import pstats
import sys
import time
import warnings

import numpy as np


def main(argv=None) -> int:
    from ggrad_gpu import synthetic
    from ggrad_gpu.metrics import footprint_region, target_registration_error
    from ggrad_gpu.scaleout.mosaic import guide_window, refine_tile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tile", type=int, default=128, help="tile side, pixels (default 128)")
    parser.add_argument("--bands", type=int, default=256, help="bands per tile (default 256)")
    parser.add_argument("--seed", type=int, default=0, help="the phantom's seed (default 0)")
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="print tile 0's N costliest functions")
    args = parser.parse_args(argv)
    mosaic = synthetic.make_mosaic(grid=(2, 2), tile_shape=(args.tile, args.tile), bands=args.bands, native_factor=4,
                                   signatures="mixed", slipped=3, featureless=None, seed=args.seed)
    print("| tile | stage TRE mean, guide px | TRE mean | TRE max | CPU s | matrix digest |")
    print("| ---: | ---: | ---: | ---: | ---: | --- |")
    seconds = []
    for i, tile in enumerate(mosaic.tiles):
        tile = tile.astype(np.float32)
        region, origin = guide_window(mosaic.guide, tile.shape, mosaic.initials[i])
        profile = cProfile.Profile(time.process_time) if (args.profile and i == 0) else None
        start = time.process_time()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            if profile is not None:
                profile.enable()
            outcome = refine_tile(region, tile, mosaic.initials[i], origin, {"backend": "numpy", "output_grid": "cube"})
            if profile is not None:
                profile.disable()
        seconds.append(time.process_time() - start)
        footprint = footprint_region(tile.shape, mosaic.matrices[i], mosaic.guide.shape)
        before, after = (target_registration_error(m, mosaic.matrices[i], mosaic.guide.shape, region=footprint)
                         for m in (mosaic.initials[i], outcome.matrix))
        digest = hashlib.sha1(np.ascontiguousarray(outcome.matrix).tobytes()).hexdigest()[:12]
        print(f"| {i} | {before.mean:.2f} | {after.mean:.4f} | {after.max:.4f} | {seconds[-1]:.2f} | {digest} |",
              flush=True)
        if profile is not None:
            text = io.StringIO()
            pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(args.profile)
            print(text.getvalue(), file=sys.stderr)
    print(f"mean CPU s per tile: {np.mean(seconds):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
