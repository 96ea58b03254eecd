"""Independent tasks on Dask, with a cap on how many are in flight.

In-process threads by default (Dask's threaded scheduler, as many threads as
the cap); with a ``distributed.Client``, on its cluster, submitting a new
task only as one finishes (the lesson of multiview-stitcher's MemoryError
when every pair ran at once), so that at most ``max_in_flight`` tasks'
inputs and results are held at a time. Dask is imported only when called.

Threads in this process share its BLAS: while they run, each task gets the
machine's cores divided by the tasks in flight (``threadpoolctl``), not every
core each (2 tasks of 2 BLAS threads on 2 cores ran 4 threads). Dask's
worker processes start with one BLAS thread each (its nanny's default).
"""

from __future__ import annotations

import os
import threading

from .._threads import usable_cores

__all__ = ["blas_threads", "default_in_flight", "run_tasks"]


def default_in_flight(client=None) -> int:
    """Tasks in flight by default: the cluster's worker threads, or this machine's cores.

    Examples
    --------
    >>> class Cluster:  # stands in for a distributed.Client: two workers
    ...     def nthreads(self):
    ...         return {"tcp://a": 2, "tcp://b": 4}
    >>> default_in_flight(Cluster())
    6
    >>> default_in_flight() == (os.cpu_count() or 1)
    True
    """
    if client is not None:
        threads = sum(client.nthreads().values())
        return max(1, int(threads))
    return max(1, os.cpu_count() or 1)


def blas_threads(in_flight: int) -> int:
    """BLAS threads for each of ``in_flight`` tasks running at once on this machine's cores (at least 1).

    Examples
    --------
    >>> blas_threads(1) == usable_cores(), blas_threads(10 * usable_cores())
    (True, 1)
    """
    return max(1, usable_cores() // max(1, int(in_flight)))


def run_tasks(function, arguments, *, client=None, max_in_flight=None, on_done=None) -> list:
    """``[function(*args) for args in arguments]``, each call a Dask task; the results in order.

    Parameters
    ----------
    function : callable
        Must be importable by name where it runs (for a cluster of processes).
    arguments : sequence of tuple
        One tuple of positional arguments per task.
    client : distributed.Client, optional
        Run on its cluster; default Dask's threaded scheduler in this process.
    max_in_flight : int, optional
        Tasks running or waiting at once (default :func:`default_in_flight`).
    on_done : callable, optional
        Called with ``(index, result)`` as each task finishes (in the
        caller's thread with a client; in a worker thread, one at a time,
        without one).

    Examples
    --------
    >>> from ggrad_gpu.scaleout.tasks import run_tasks
    >>> run_tasks(pow, [(2, 3), (3, 2)], max_in_flight=1)
    [8, 9]
    """
    arguments = list(arguments)
    cap = default_in_flight(client) if max_in_flight is None else int(max_in_flight)
    if cap < 1:
        raise ValueError(f"max_in_flight must be a positive integer; got {max_in_flight!r}")
    if client is None:
        return _threaded(function, arguments, cap, on_done)
    return _on_cluster(function, arguments, client, cap, on_done)


def _threaded(function, arguments, cap, on_done):
    import dask
    from threadpoolctl import threadpool_limits

    lock = threading.Lock()

    def task(index, args):
        result = function(*args)
        if on_done is not None:
            with lock:
                on_done(index, result)
        return result

    tasks = [dask.delayed(task, pure=False)(index, args) for index, args in enumerate(arguments)]
    with threadpool_limits(limits=blas_threads(min(cap, len(tasks))), user_api="blas"):
        return list(dask.compute(*tasks, scheduler="threads", num_workers=cap))


def _on_cluster(function, arguments, client, cap, on_done):
    from distributed import as_completed

    results = [None] * len(arguments)
    index_of = {}

    def submit(index):
        future = client.submit(function, *arguments[index], pure=False)
        index_of[future.key] = index
        return future

    running = as_completed([submit(i) for i in range(min(cap, len(arguments)))])
    following = min(cap, len(arguments))
    for future in running:
        index = index_of.pop(future.key)
        results[index] = future.result()
        future.release()
        if on_done is not None:
            on_done(index, results[index])
        if following < len(arguments):
            running.add(submit(following))
            following += 1
    return results
