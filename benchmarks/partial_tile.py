"""One tile on a larger guide with default options: its error, its seconds and where they go.

Run ``python -m benchmarks.partial_tile`` from the repository root (``--help``
for options). The case of the speed issue's held-out tile: a ``T x T x B``
cube at 4 guide px per cube px (``make_phantom(shape=(G, G), bands=B,
native_factor=4, footprint=((G - 4T) // 2, (G - 4T) // 2, 4T, 4T),
signatures="mixed", seed=S)``), a partial field of a ``G x G`` guide, refined
by ``refine(guide, cube, initial=...)`` with nothing else, ``--repeat`` times
in this process. Each run prints its wall seconds, ``refine``'s own stage
timings (``Refinement.timings``: they overlap where one stage runs
another's work, e.g. ``check`` holds estimates and registrations) and the TRE
over the footprint. Time it on a quiet machine (``uptime`` load under 0.5).
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import numpy as np


def main(argv=None) -> int:
    from ggrad_gpu import refine, synthetic
    from ggrad_gpu.metrics import target_registration_error

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tile", type=int, default=128, help="tile side, cube pixels (default 128)")
    parser.add_argument("--bands", type=int, default=256, help="bands (default 256)")
    parser.add_argument("--guide", type=int, default=900, help="guide side, pixels (default 900)")
    parser.add_argument("--seed", type=int, default=0, help="the phantom's seed (default 0)")
    parser.add_argument("--repeat", type=int, default=3, help="runs in this process (default 3)")
    args = parser.parse_args(argv)
    side = 4 * args.tile
    if side > args.guide:
        parser.error(f"--guide {args.guide} is smaller than the tile's footprint ({side} guide px)")
    corner = (args.guide - side) // 2
    region = (corner, corner, side, side)
    phantom = synthetic.make_phantom(shape=(args.guide, args.guide), bands=args.bands, native_factor=4,
                                     footprint=region, signatures="mixed", seed=args.seed)
    cube = np.asarray(phantom.cube, dtype=np.float32)
    start_tre = target_registration_error(phantom.initial, phantom.matrix, phantom.guide.shape, region=region)
    print(f"{args.tile} x {args.tile} x {args.bands} tile on a {args.guide} x {args.guide} guide; "
          f"load average {os.getloadavg()[0]:.2f}; start TRE {start_tre.mean:.2f} / {start_tre.max:.2f} px")
    for _ in range(args.repeat):
        clock = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            result = refine(phantom.guide, cube, initial=phantom.initial)
        seconds = time.perf_counter() - clock
        tre = target_registration_error(result.matrix, phantom.matrix, phantom.guide.shape, region=region)
        stages = ", ".join(f"{name} {value:.2f}" for name, value in result.timings.items() if name != "total")
        print(f"{seconds:.2f} s ({stages}); TRE {tre.mean:.3f} / {tre.max:.3f} px; "
              f"{'refined' if result.improved else 'kept'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
