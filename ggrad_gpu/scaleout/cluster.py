"""Where Dask work runs: in-process threads by default, or a ``dask.distributed`` cluster.

``--workers N`` starts a local cluster of N single-threaded worker processes;
``--scheduler ADDRESS`` connects to a running one. Several GPUs: start ``dask_cuda.LocalCUDACluster()`` (one
worker per GPU) and pass its ``scheduler_address`` as ``--scheduler``; each
worker then computes its chunks on its own device.
"""

from __future__ import annotations

import contextlib

__all__ = ["MALLOC_ENVIRON", "WORKER_CONFIG", "dask_client"]

# Dask's nanny starts its workers with MALLOC_TRIM_THRESHOLD_=65536 (to hand
# freed memory back to the system sooner). Setting it fixes glibc's malloc
# thresholds, so every array over 128 KiB is mapped afresh and faulted in page
# by page: a 128 x 128 x 256 mosaic tile took 7.3 s of CPU with it against
# 3.9 s without (benchmarks/RESULTS.md, issue 13). Unset, glibc's adaptive
# mmap threshold still stops at 32 MiB, and a tile's cube-sized arrays (128
# MiB on the grid at the cube's resolution) were each mapped and faulted in
# afresh: 0.9 of a tile's 4.3 CPU s were the kernel's. `ggrad mosaic`'s local
# cluster therefore keeps them in the heap: one arena (the task runs in a
# worker thread, whose own arena maps whatever exceeds its 64 MiB heaps),
# arrays up to 4 GiB from it, and the freed memory kept for the next tile
# (issue 26: 3.4 CPU s per tile, 0.14 of them the kernel's; the worker's peak
# resident memory 530 MiB against 576). A streamed refine keeps Dask's
# setting: its workers hold cube chunks of tens of MiB, and without the trim
# the 4 GiB cube on 2 workers peaked at 2.56 GiB against 1.55, in the same time.
MALLOC_ENVIRON = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": str(4 << 30),
                  "MALLOC_TRIM_THRESHOLD_": str(8 << 30)}
WORKER_CONFIG = {f"distributed.nanny.pre-spawn-environ.{name}": value for name, value in MALLOC_ENVIRON.items()}


@contextlib.contextmanager
def dask_client(*, workers: int | None = None, scheduler: str | None = None, memory_limit: int | None = None,
                config: dict | None = None):
    """A ``distributed.Client`` for the block (the default scheduler while it runs), or nothing.

    Parameters
    ----------
    workers : int, optional
        Start a ``distributed.LocalCluster`` with this many worker processes
        (single-threaded, no memory limit, Dask's settings but ``config``).
    scheduler : str, optional
        Connect to the scheduler at this address instead.
    memory_limit : int, optional
        Not imposed on the workers (what bounds their memory is the chunk
        size the run chose from it); kept for the caller's record.
    config : dict, optional
        Dask settings while the local cluster starts (e.g.
        :data:`WORKER_CONFIG`, for many small tasks).

    Yields
    ------
    distributed.Client or None
        None when neither is given: Dask's threads in this process do the work.

    Examples
    --------
    >>> with dask_client() as client:  # neither given: Dask's threads in this process
    ...     print(client)
    None
    >>> with dask_client(workers=2, scheduler="tcp://127.0.0.1:8786"):
    ...     pass
    Traceback (most recent call last):
        ...
    ValueError: give --workers or --scheduler, not both
    >>> with dask_client(workers=2) as client:  # doctest: +SKIP
    ...     sorted(client.nthreads().values())  # two single-threaded worker processes
    [1, 1]
    """
    if workers is not None and scheduler is not None:
        raise ValueError("give --workers or --scheduler, not both")
    if workers is None and scheduler is None:
        yield None
        return
    from ..io.libraries import require

    distributed = require("distributed", "distributed", "running on a Dask cluster (--workers, --scheduler)")
    if scheduler is not None:
        with distributed.Client(scheduler) as client:
            yield client
        return
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer; got {workers!r}")
    # No per-worker limit: the chunks bound what a task holds, and a worker
    # over distributed's limit would pause (at 80 %) and stall the run.
    import dask

    with dask.config.set(config or {}), \
            distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, memory_limit=0,
                                     dashboard_address=":0") as cluster, distributed.Client(cluster) as client:
        yield client
