"""``python -m benchmarks.floors``: each stage of a default refine beside the floor that bounds it (issue 26, item 1).

Two cases, NumPy, default options:

- ``paper``: the paper's geometry, a 350 x 415 guide and the native
  70 x 83 x 1000 cube (``ggrad bench``'s refine phantom, case 0);
- ``tile``: one 128 x 128 x 256 tile at 4 guide px per tile px, its footprint
  (512 x 512 guide px) in the middle of a 900 x 900 guide.

Per stage (``Refinement.timings``: wall seconds; ``guard`` includes the
estimates of its two fits, whose time is also in ``resample`` and
``estimate``) the work the stage did is counted while it runs, and its floor
is that work at this machine's rates measured in the same run:

- the GEMM rate of a float32 ``a.T @ a`` (a SYRK, ``N L^2`` flops, the count
  of DESIGN's Performance model) on blocks of the size eq. 5's products use,
  for the Gram products (``GramAccumulator.add``: rows x (bands + 1)^2), the
  denoising's projection (``4 N L k``, or ``2 N L k`` for its coefficients
  where the projection stays factored) and a factored cube's derivatives
  (``4 N r L`` per level, ``r`` coefficients);
- the memory bandwidth of a large array copy (read + write, ``ggrad bench``'s
  ``machine``), for the warps (the cube read, the output written), the
  estimates' pyramid and Sobel passes (each level of the cube read twice and
  written once; a factored cube's coefficients so, and its bands' magnitudes
  written and read once) and the denoising (the cube read and written).

The floor is a lower bound (every byte at copy speed, every flop at GEMM
speed, nothing overlapped); ``x floor`` is the stage's time over it. Timings
are only meaningful on a quiet machine: the script prints the 1-minute load
average before and after and warns at 0.5 or more.

    python -m benchmarks.floors                 # both cases, best of 3 refines each
    python -m benchmarks.floors --case paper --repeat 5
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import warnings

import numpy as np

QUIET_LOAD = 0.5


class Counter:
    """Work counted per stage while a refine runs: flops at GEMM speed, bytes at copy speed."""

    def __init__(self):
        self.stage = "other"
        self.flops: dict = {}
        self.bytes: dict = {}

    def add(self, flops=0.0, nbytes=0.0, stage=None):
        stage = stage or self.stage
        self.flops[stage] = self.flops.get(stage, 0.0) + float(flops)
        self.bytes[stage] = self.bytes.get(stage, 0.0) + float(nbytes)

    @contextlib.contextmanager
    def inside(self, stage):
        before, self.stage = self.stage, stage
        try:
            yield
        finally:
            self.stage = before


@contextlib.contextmanager
def counting(counter: Counter):
    """Wrap the stages' workhorses so that ``counter`` sees their work (restored on exit)."""
    from ggrad_gpu.core import denoise, nnls
    from ggrad_gpu.core.factored import is_factored
    from ggrad_gpu.refinement import passes, preparation

    saved = []

    def patch(module, name, wrapper):
        original = getattr(module, name)
        saved.append((module, name, original))
        setattr(module, name, wrapper(original))

    def gram_add(original):
        def add(self, columns, target, weights=None):
            bands = self.gram.shape[0]
            counter.add(flops=(columns.size // bands) * (bands + 1) ** 2, stage="estimate")
            return original(self, columns, target, weights)
        return add

    def estimate_bytes(original):
        def call(guide, cube, *args, **kwargs):
            levels = kwargs.get("levels", 4)
            if is_factored(cube):
                # The coefficients' pyramid (each level read twice, written once); per level, the
                # bands' two derivatives as products with the basis, their magnitudes written once
                # and read once (by the Gram products).
                pixels = sum(cube.shape[0] * cube.shape[1] / 4**k for k in range(levels))
                bands, itemsize = cube.shape[2], cube.dtype.itemsize
                counter.add(flops=4 * pixels * cube.rank * bands,
                            nbytes=3 * pixels * cube.rank * itemsize + 2 * pixels * bands * itemsize,
                            stage="estimate")
            else:
                pyramid = sum(cube.nbytes / 4**k for k in range(levels))
                counter.add(nbytes=3 * pyramid, stage="estimate")  # each level read twice, written once
            return original(guide, cube, *args, **kwargs)
        return call

    def warp_bytes(original):
        def call(cube, matrix, output_shape, *args, **kwargs):
            out = original(cube, matrix, output_shape, *args, **kwargs)
            source = cube.nbytes if hasattr(cube, "nbytes") else 0
            counter.add(nbytes=source + getattr(out, "nbytes", 0),
                        stage=counter.stage if counter.stage in ("warp", "prepare") else "resample")
            return out
        return call

    def factor_work(original):
        def call(self, cube, **kwargs):
            live, _, _, basis = self.fit
            pixels = cube.shape[0] * cube.shape[1]
            counter.add(flops=2 * pixels * len(live) * basis.shape[1], nbytes=cube.nbytes, stage="prepare")
            return original(self, cube, **kwargs)
        return call

    def project_work(original):
        def call(block, live, mean, scale, basis):
            pixels = block.shape[0] * block.shape[1]
            counter.add(flops=4 * pixels * len(live) * basis.shape[1], nbytes=2 * block.nbytes, stage="prepare")
            return original(block, live, mean, scale, basis)
        return call

    def within(stage):
        def wrapper(original):
            def call(*args, **kwargs):
                with counter.inside(stage):
                    return original(*args, **kwargs)
            return call
        return wrapper

    patch(nnls.GramAccumulator, "add", gram_add)
    patch(passes, "estimate_global_gradient", estimate_bytes)
    patch(passes, "warp_cube", warp_bytes)
    patch(preparation, "warp_cube", warp_bytes)
    patch(denoise, "_project", project_work)
    patch(denoise.Subspace, "factored", factor_work)
    patch(passes, "resample", within("warp"))
    patch(passes, "build_problem", within("prepare"))
    try:
        yield counter
    finally:
        for module, name, original in reversed(saved):
            setattr(module, name, original)


def syrk_rate(bands: int, seconds: float = 1.0) -> float:
    """float32 ``a.T @ a`` flops per second (``N L^2``) on eq. 5's blocks of ``bands + 1`` columns."""
    from ggrad_gpu._memory import block_rows

    rows = block_rows((1 << 30, bands + 1), 4, np)
    a = np.random.default_rng(0).random((rows, bands + 1), dtype=np.float32)
    _ = a.T @ a
    best, spent = np.inf, 0.0
    while spent < seconds:
        start = time.perf_counter()
        _ = a.T @ a
        elapsed = time.perf_counter() - start
        best, spent = min(best, elapsed), spent + elapsed
    return rows * (bands + 1) ** 2 / best


def cases(which: str):
    """(name, guide, cube, initial) of the selected cases, built untimed."""
    from ggrad_gpu import synthetic
    from ggrad_gpu.cli import bench

    out = []
    if which in ("paper", "both"):
        phantom = bench.Data(bench.PAPER).refine_phantom
        out.append(("refine, paper's geometry: 350 x 415 guide, 70 x 83 x 1000 cube", phantom))
    if which in ("tile", "both"):
        phantom = synthetic.make_phantom(shape=(900, 900), bands=256, native_factor=4, footprint=(194, 194, 512, 512),
                                         signatures="mixed", seed=0)
        out.append(("one tile: 900 x 900 guide, 128 x 128 x 256 tile at 4 guide px per tile px", phantom))
    return [(name, p.guide, np.asarray(p.cube, dtype=np.float32), p.initial) for name, p in out]


# "check" (the alternatives of a far move or a weak fit) runs estimates and registrations of its
# own: its wall time overlaps theirs, which "estimate" and "register" also count.
STAGES = ("prepare", "resample", "estimate", "register", "guard", "check", "warp")


def fresh_memory_rates(nbytes: int) -> tuple[float, float]:
    """Bytes per second of filling a new array of ``nbytes``: the first time in this process, and again.

    The final resample writes a new array of the output's size; on a virtual
    machine the first touch of memory the process has not used yet can cost
    far more than the write itself (the host maps its pages), a cost a
    one-shot refine pays and a warmed-up benchmark round does not.
    """
    rates = []
    for _ in range(2):
        start = time.perf_counter()
        array = np.empty(nbytes // 4, dtype=np.float32)
        array.fill(1.0)
        rates.append(nbytes / (time.perf_counter() - start))
        del array
    return rates[0], rates[1]


def profile(guide, cube, initial, repeat: int):
    """The best of ``repeat`` default refines (by total): its timings and the work counted per stage."""
    from ggrad_gpu import refine

    def once():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return refine(guide, cube, initial=initial, backend="numpy")

    once()  # warm-up: imports, caches, page faults
    best = None
    for _ in range(repeat):
        counter = Counter()
        with counting(counter):
            result = once()
        if best is None or result.timings["total"] < best[0].timings["total"]:
            best = (result, counter)
    return best


def table(result, counter, rate, bandwidth) -> str:
    lines = ["| stage | time | Gram/GEMM work | bytes moved | floor | x floor |",
             "|---|---:|---:|---:|---:|---:|"]
    for stage in STAGES + ("total",):
        seconds = result.timings.get(stage)
        if seconds is None:
            continue
        if stage == "total":
            flops, nbytes = sum(counter.flops.values()), sum(counter.bytes.values())
        else:
            flops, nbytes = counter.flops.get(stage, 0.0), counter.bytes.get(stage, 0.0)
        floor = flops / rate + nbytes / bandwidth
        lines.append(f"| {stage} | {seconds:.3f} s | {flops / 1e9:.2f} GFLOP | {nbytes / 2**30:.2f} GiB | "
                     + (f"{floor:.3f} s | {seconds / floor:.1f}x |" if floor > 0 else "- | - |"))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.floors", description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=("paper", "tile", "both"), default="both")
    parser.add_argument("--repeat", type=int, default=3, help="refines timed per case (the best kept)")
    args = parser.parse_args(argv)
    from ggrad_gpu.cli import bench

    load = os.getloadavg()[0]
    if load >= QUIET_LOAD:
        print(f"WARNING: the 1-minute load average is {load:.2f} (>= {QUIET_LOAD}): these timings mean little",
              file=sys.stderr)
    first_touch, again = fresh_memory_rates(350 * 415 * 1000 * 4)  # the paper's registered cube, float32
    selected = cases(args.case)
    limits = bench.machine("numpy")
    bandwidth = limits["copy_gbps"] * 1e9
    print(f"benchmarks.floors; load average {load:.2f} before")
    print("- " + "\n- ".join(bench.machine_lines({"numpy": limits})))
    print(f"- a new 580 MB array filled: {first_touch / 1e9:.1f} GB/s the first time in this process, "
          f"{again / 1e9:.1f} GB/s again (the final resample's output is such an array)")
    for name, guide, cube, initial in selected:
        rate = syrk_rate(cube.shape[2])
        result, counter = profile(guide, cube, initial, args.repeat)
        print(f"\n{name} (best of {args.repeat}; floors: float32 a.T @ a {rate / 1e9:.0f} GFLOP/s on "
              f"{cube.shape[2] + 1} columns, copy {bandwidth / 1e9:.1f} GB/s; {result.message.split(':')[0]})")
        print(table(result, counter, rate, bandwidth))
    after = os.getloadavg()[0]
    print(f"\nload average {after:.2f} after" + (" (WARNING: not quiet)" if max(load, after) >= QUIET_LOAD else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
