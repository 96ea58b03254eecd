"""Threads for host (NumPy) work that releases the GIL: as many as the BLAS pool may use now.

NumPy's element-wise loops are single-threaded, and so are SciPy's sparse
products; both release the GIL on large arrays, so a stage can split its
output between threads. The count follows the BLAS thread pool's current
limit, which is what a caller lowers to share the cores
(``ggrad_gpu.scaleout.tasks`` runs mosaic tiles side by side with
``threadpoolctl.threadpool_limits``), so a stage never takes more cores than
its BLAS products would.

Only stages that run apart from BLAS products gain: OpenBLAS's worker
threads spin for a while after each product, so the Sobel passes of the Gram
accumulation, split between two threads, ran no faster between its products
(86-97 ms against 95 ms a level, 428 x 428 x 256; 58 ms against 88 ms
alone).
"""

from __future__ import annotations

import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait

import numpy as np

__all__ = ["MIN_THREAD_VALUES", "host_runs", "host_threads", "parallel", "spans", "usable_cores"]

# Values (of a stage's output or input) a thread gets at least: below this, handing it over costs more than it saves.
MIN_THREAD_VALUES = 1 << 20

_pool_lock = threading.Lock()
_pool = None  # one pool for the process, made on first use, as many threads as cores


def _forget_pool_in_child() -> None:
    """A forked child has none of its parent's threads: it makes a pool of its own on first use."""
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):  # a fork copies the pool object but not its threads: it would wait for ever
    os.register_at_fork(after_in_child=_forget_pool_in_child)


@functools.cache
def _blas_pools():
    """threadpoolctl's controller of the loaded BLAS libraries (built once: a scan of the loaded libraries)."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # an optional speed-up: one thread without it
        return None
    return ThreadpoolController().select(user_api="blas")


def usable_cores() -> int:
    """The cores this process may run on (its affinity where the system says, else the machine's count).

    Examples
    --------
    >>> 1 <= usable_cores() <= (os.cpu_count() or 1)
    True
    """
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else max(1, os.cpu_count() or 1)


def host_threads() -> int:
    """Threads a host stage may use now: the BLAS pool's current limit, within this process's cores.

    Examples
    --------
    >>> from threadpoolctl import threadpool_limits
    >>> with threadpool_limits(limits=1, user_api="blas"):
    ...     host_threads()
    1
    >>> 1 <= host_threads() <= (os.cpu_count() or 1)
    True
    """
    pools = _blas_pools()
    if pools is None or not pools.lib_controllers:
        return 1
    limit = max(int(pool.num_threads) for pool in pools.lib_controllers)
    return max(1, min(limit, usable_cores()))


def spans(count: int, parts: int, *, minimum: int = 1) -> list[tuple[int, int]]:
    """``count`` items split into at most ``parts`` contiguous ``(start, stop)`` runs of at least ``minimum``.

    Examples
    --------
    >>> spans(10, 3)
    [(0, 4), (4, 7), (7, 10)]
    >>> spans(10, 4, minimum=5)  # too few items for four runs of five
    [(0, 5), (5, 10)]
    >>> spans(0, 2)
    []
    """
    parts = max(1, min(int(parts), int(count) // max(1, int(minimum))))
    if count <= 0:
        return []
    base, extra = divmod(int(count), parts)
    bounds = [0]
    for index in range(parts):
        bounds.append(bounds[-1] + base + (index < extra))
    return list(zip(bounds[:-1], bounds[1:]))


def host_runs(count: int, item_values: int, xp) -> list[tuple[int, int]]:
    """``count`` items of ``item_values`` values each, in runs for :func:`parallel`.

    On the host, one run per thread of :func:`host_threads`, each of at
    least :data:`MIN_THREAD_VALUES` values; on a device (``xp`` not NumPy),
    one run.

    Examples
    --------
    >>> host_runs(10, 1 << 20, np) == spans(10, host_threads())
    True
    >>> host_runs(10, 1 << 20, None), host_runs(10, 8, np)  # another array module; too little work to share
    ([(0, 10)], [(0, 10)])
    """
    threads = host_threads() if xp is np else 1
    return spans(count, threads, minimum=max(1, MIN_THREAD_VALUES // max(int(item_values), 1)))


def parallel(function, items) -> list:
    """``[function(item) for item in items]``, the items after the first in the process's pool, in order.

    The calling thread runs the first item itself, so one item costs no
    thread at all. ``function`` must not call :func:`parallel` (a pool thread
    waiting on the pool could wait for ever); the stages here do not.

    Examples
    --------
    >>> parallel(abs, [-2, 3, -4])
    [2, 3, 4]
    """
    global _pool
    items = list(items)
    if len(items) <= 1:
        return [function(item) for item in items]
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=usable_cores(), thread_name_prefix="ggrad-host")
    others = [_pool.submit(function, item) for item in items[1:]]
    try:
        first = function(items[0])
    finally:
        wait(others)  # every item is done (or failed) before anything is returned or raised
    return [first] + [future.result() for future in others]

