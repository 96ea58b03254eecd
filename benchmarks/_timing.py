"""Timing helpers shared by the stage benchmarks and their runner.

The protocol, the same on every backend:

- inputs are on the backend before anything is timed; their host-to-device
  copy is timed on its own (:func:`to_backend`), device synchronised on both
  sides;
- the first call (CUDA kernel compilation or loading, cuBLAS handles, memory
  pool growth; page faults on the CPU) is timed on its own: the *warm-up*;
- every timed round is ``call(); sync()`` after a ``sync()`` outside the
  timer, so a round holds exactly the work it launched, wherever it ran.

Times are host wall-clock (:func:`time.perf_counter`), which is what a caller
waits for; on a GPU the closing synchronisation makes that the device's time
plus the host's launch overhead (which matters for the small, host-driven
stages: NNLS, the level-weight QP, the registration's iterations).
NumPy's ``sync`` does nothing. CuPy is imported only when a CuPy backend is
asked for.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["device_sync", "rates", "repeat", "summarise_times", "time_call", "to_backend"]


def _no_sync() -> None:
    return None


def device_sync(xp) -> Callable[[], None]:
    """A function that waits for the backend's queued work: a no-op for NumPy."""
    if xp is np:
        return _no_sync
    import cupy

    device = cupy.cuda.Device()  # the current device, the one the arrays live on
    return device.synchronize


def to_backend(host_array, xp, sync: Callable[[], None]):
    """``host_array`` on backend ``xp`` and the seconds its transfer took.

    NumPy: the array itself and 0. CuPy: ``cupy.asarray`` from the (pageable)
    host array, timed between two device synchronisations.
    """
    if xp is np:
        return host_array, 0.0
    sync()
    start = time.perf_counter()
    device_array = xp.asarray(host_array)
    sync()
    return device_array, time.perf_counter() - start


def time_call(call: Callable[[], object], sync: Callable[[], None]) -> tuple[float, object]:
    """Seconds of one ``call()`` up to the end of its device work, and its result."""
    sync()
    start = time.perf_counter()
    out = call()
    sync()
    return time.perf_counter() - start, out


def repeat(call: Callable[[], object], sync: Callable[[], None], rounds: int) -> list[float]:
    """Seconds of ``rounds`` timed calls (after any warm-up the caller did)."""
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1; got {rounds}")
    times = []
    for _ in range(rounds):
        seconds, out = time_call(call, sync)
        del out  # free each round's output before the next (device memory)
        times.append(seconds)
    return times


def summarise_times(times: Sequence[float]) -> dict:
    """Median, min, mean and max of the timed rounds (None for each when there are none)."""
    if not times:
        return {"median_s": None, "min_s": None, "mean_s": None, "max_s": None}
    return {
        "median_s": float(statistics.median(times)),
        "min_s": float(min(times)),
        "mean_s": float(statistics.fmean(times)),
        "max_s": float(max(times)),
    }


def rates(seconds, *, bytes_moved=None, flops=None, peak=None, spec=None) -> dict:
    """Achieved rates of a stage and their fractions of the machine's limits.

    Parameters
    ----------
    seconds : float or None
        Time of one call (the median); None gives no rates.
    bytes_moved, flops : int, optional
        The stage's traffic and arithmetic in the performance model.
    peak : float, optional
        The limit the stage is compared with, in the unit of its rate (GB/s
        for a memory-bound stage, GFLOP/s for one counted in flops).
    spec : float, optional
        A data-sheet limit in the same unit (the GPU's memory bandwidth from
        its clock and bus width), for a second fraction.
    """
    out = {"gbps": None, "gflops": None, "frac_peak": None, "frac_spec": None}
    if not seconds or seconds <= 0:
        return out
    if bytes_moved:
        out["gbps"] = bytes_moved / seconds / 1e9
    if flops:
        out["gflops"] = flops / seconds / 1e9
    achieved = out["gflops"] if flops else out["gbps"]
    if achieved is not None and peak:
        out["frac_peak"] = achieved / peak
    if achieved is not None and spec:
        out["frac_spec"] = achieved / spec
    return out
