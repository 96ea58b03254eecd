"""CPU seconds of each ``ggrad bench`` stage: a before/after comparison that a busy machine barely moves.

Wall-clock times swing several-fold when other processes share the cores; the
CPU time of one thread (``time.process_time`` with ``OPENBLAS_NUM_THREADS=1``)
moves far less. Prints ``{stage: best seconds}`` as JSON for one size::

    OPENBLAS_NUM_THREADS=1 python benchmarks/cpu_time.py --size small --repeat 5

Run it from two checkouts alternately (A B A B ...) and take the best per stage.
"""

import argparse
import json
import time
import warnings

from ggrad_gpu.cli import bench


def cpu_timer(call, sync, rounds):
    """``bench.measure``'s timer with process time instead of wall time."""
    times, out = [], None
    for _ in range(rounds):
        out = None
        start = time.process_time()
        out = call()
        times.append(time.process_time() - start)
    return times, out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", help="a size of ggrad bench (default: small)")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    data = bench.Data(bench.parse_sizes(args.size)[0])
    best = {}
    for stage in bench.STAGES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a kept initial transform warns; only the time matters here
            row, _ = bench.measure(bench.build(stage, data), "numpy", repeat=args.repeat, timer=cpu_timer)
        best[stage] = min(row["times_s"])
    print(json.dumps(best))


if __name__ == "__main__":
    main()
