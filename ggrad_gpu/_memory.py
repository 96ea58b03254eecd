"""Memory: block sizes for chunked stages, and the retry with smaller chunks after running out.

Chunked stages size their blocks with :func:`block_rows` (on a GPU, also from
the free device memory) and run each chunk through :func:`retry_smaller`,
which halves the chunk after an out-of-memory error (:func:`is_out_of_memory`)
and names the stage in any CUDA error it lets through.
"""

from __future__ import annotations

import ctypes
import gc
import sys
from collections.abc import Callable
from types import ModuleType
from typing import TypeVar

import numpy as np

__all__ = [
    "CPU_BLOCK_BYTES",
    "block_rows",
    "default_block_bytes",
    "free_device_memory",
    "is_cuda_error",
    "is_out_of_memory",
    "keep_freed_memory",
    "retry_smaller",
    "return_freed_memory",
    "trim_freed_memory",
]

# Default block budgets (bytes of one block of a stage's main array).
CPU_BLOCK_BYTES = 8 << 20
GPU_BLOCK_BYTES = 256 << 20
# On a GPU a block takes at most this share of the memory still available: a
# stage holds several block-sized temporaries at once (the Sobel workspace,
# the warp's taps and weights), and other work may share the device.
GPU_FREE_SHARE = 16

T = TypeVar("T")


def block_rows(shape, itemsize: int, xp: ModuleType, *, target_bytes: int | None = None) -> int:
    """Rows per block so that one block of an array of ``shape`` stays near a budget.

    Blocks keep temporaries bounded (and, on the CPU, cache-sized). The default
    budget (:func:`default_block_bytes`) is 8 MiB on the CPU and 256 MiB on a
    GPU, where larger launches pay, or less where little device memory is free.

    Examples
    --------
    >>> block_rows((1000, 512, 4), 4, np, target_bytes=1 << 20)  # 8 KiB a row: 128 rows in 1 MiB
    128
    >>> block_rows((100, 1024), 8, np)  # within the 8 MiB CPU budget: all the rows
    100
    """
    if target_bytes is None:
        target_bytes = default_block_bytes(xp)
    row_bytes = itemsize * int(np.prod(shape[1:], dtype=np.int64))
    return int(max(1, min(shape[0], target_bytes // max(row_bytes, 1))))


def default_block_bytes(xp: ModuleType) -> int:
    """The default block budget in bytes for arrays of module ``xp``.

    8 MiB on the CPU. On a GPU, 256 MiB, or ``1/16`` of the device memory
    still available (free on the device, cached free in CuPy's pool, and
    within the pool's limit if one is set) where that is less, but at least
    1 MiB; blocks that still do not fit are halved by :func:`retry_smaller`.

    Examples
    --------
    >>> default_block_bytes(np) == CPU_BLOCK_BYTES == 8 << 20
    True
    """
    if xp is np:
        return CPU_BLOCK_BYTES
    available = _device_available_bytes(xp)
    if available is None:
        return GPU_BLOCK_BYTES
    return int(max(1 << 20, min(GPU_BLOCK_BYTES, available // GPU_FREE_SHARE)))


def _device_available_bytes(xp: ModuleType) -> int | None:
    """Bytes the current device can still hand to CuPy, or None for a module without device statistics.

    A CUDA error while asking (a broken context) propagates: it is not a
    reason to guess a budget, and the next kernel would fail anyway.
    """
    runtime = getattr(getattr(xp, "cuda", None), "runtime", None)
    if runtime is None or not hasattr(xp, "get_default_memory_pool"):
        return None
    free, _total = runtime.memGetInfo()
    pool = xp.get_default_memory_pool()
    available = int(free) + int(pool.free_bytes())
    limit = int(pool.get_limit())
    if limit:
        available = min(available, max(limit - int(pool.used_bytes()), 0))
    return available


# Where CUDA libraries report a failed allocation other than by CuPy's
# OutOfMemoryError: cudaMalloc from the runtime or driver, and the workspace
# allocations of cuBLAS, cuSOLVER, cuFFT, cuSPARSE and cuRAND.
_OOM_MARKERS = (
    "cudaErrorMemoryAllocation",
    "CUDA_ERROR_OUT_OF_MEMORY",
    "ALLOC_FAILED",  # CUBLAS_STATUS_ALLOC_FAILED, CUSOLVER_..., CUFFT_..., CUSPARSE_...
    "ALLOCATION_FAILED",  # CURAND_STATUS_ALLOCATION_FAILED
    "out of memory",
)
_CUDA_PACKAGES = ("cupy", "cupy_backends", "cupyx")


def is_cuda_error(exc: BaseException) -> bool:
    """Whether ``exc`` was raised by CuPy's CUDA layer (runtime, driver, cuBLAS, ...).

    Decided from the exception's class (defined in ``cupy``, ``cupy_backends``
    or ``cupyx``), without importing CuPy. Plain Python exceptions that CuPy
    raises for bad arguments (``ValueError``, ``TypeError``) are not CUDA errors.

    Examples
    --------
    >>> CUDARuntimeError = type("CUDARuntimeError", (RuntimeError,), {"__module__": "cupy_backends.cuda.api.runtime"})
    >>> is_cuda_error(CUDARuntimeError("cudaErrorIllegalAddress")), is_cuda_error(ValueError("bad shape"))
    (True, False)
    """
    return any(cls.__module__.split(".")[0] in _CUDA_PACKAGES for cls in type(exc).__mro__)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says that an allocation failed, on the host or on a device.

    True for ``MemoryError`` (NumPy's, and CuPy's
    ``cupy.cuda.memory.OutOfMemoryError``, which derives from it), for any
    CuPy exception class named ``OutOfMemoryError``, and for CUDA errors whose
    message reports a failed allocation (``cudaErrorMemoryAllocation``,
    ``CUBLAS_STATUS_ALLOC_FAILED``, ``CUSOLVER_STATUS_ALLOC_FAILED``, ...).
    Never imports CuPy.

    Examples
    --------
    >>> from ggrad_gpu._memory import is_out_of_memory
    >>> is_out_of_memory(MemoryError()), is_out_of_memory(ValueError("out of memory"))
    (True, False)
    """
    if isinstance(exc, MemoryError):
        return True
    if not is_cuda_error(exc):
        return False
    if any(cls.__name__ == "OutOfMemoryError" for cls in type(exc).__mro__):
        return True
    message = str(exc)
    return any(marker in message for marker in _OOM_MARKERS)


def free_device_memory() -> None:
    """Return unused memory after a failed allocation: collect garbage, empty CuPy's pools.

    CuPy's default device pool and pinned host pool are emptied only if CuPy
    is already imported; this never imports it.

    Examples
    --------
    >>> import weakref
    >>> class Attempt:
    ...     pass
    >>> attempt = Attempt(); attempt.itself = attempt  # a reference cycle, as a failed attempt may leave
    >>> alive = weakref.ref(attempt); del attempt
    >>> free_device_memory(); alive() is None
    True
    """
    gc.collect()  # arrays held by reference cycles of the failed attempt
    cupy = sys.modules.get("cupy")
    if cupy is None:
        return
    # Both of CuPy's default pools: the device pool, and the pinned host pool of staged copies.
    for pool in ("get_default_memory_pool", "get_default_pinned_memory_pool"):
        getter = getattr(cupy, pool, None)
        if getter is not None:
            getter().free_all_blocks()


def retry_smaller(run: Callable[[int], T], size: int, *, stage: str, minimum: int = 1,
                  unit: str = "items", xp: ModuleType | None = None) -> tuple[T, int]:
    """Call ``run(size)``, halving ``size`` after each out-of-memory error.

    Chunked stages run each chunk through this, carrying the returned size on
    to their next chunks, so that data larger than the free memory are
    streamed in smaller chunks instead of failing. ``run`` must be safe to
    call again after a failure (it overwrites what it writes).

    Parameters
    ----------
    run : callable
        ``run(size) -> result``: the work of one chunk of ``size`` units.
    size : int
        The chunk size to try first.
    stage : str
        The stage's name, for error messages.
    minimum : int, default 1
        The smallest size to try.
    unit : str, default "items"
        What ``size`` counts (plural), for error messages, e.g. ``"rows"``.
    xp : module, optional
        The chunk's array module. With CuPy, the device is synchronised
        before a chunk counts as done, so that an asynchronous CUDA error (a
        failed kernel, a library's workspace allocation) is raised, retried
        or named here, in this stage, and not at a later sync in another.

    Returns
    -------
    result
        What ``run`` returned.
    size : int
        The size it succeeded with (``size`` or a halving of it).

    Raises
    ------
    MemoryError
        If ``run(minimum)`` runs out of memory too; the message names the
        stage and the smallest size tried, and the last error is chained.
    RuntimeError
        For any other CUDA error (:func:`is_cuda_error`), named after the
        stage, with the CUDA error chained. Other exceptions pass unchanged.

    Examples
    --------
    >>> from ggrad_gpu._memory import retry_smaller
    >>> def run(size):
    ...     if size > 100:
    ...         raise MemoryError("too big")
    ...     return size * 2
    >>> retry_smaller(run, 1000, stage="demo")
    (124, 62)
    """
    minimum = max(int(minimum), 1)
    size = max(int(size), minimum)
    while True:
        try:
            result = run(size)
            if xp is not None and xp is not np:
                xp.cuda.get_current_stream().synchronize()
            return result, size
        except Exception as exc:
            if not is_out_of_memory(exc):
                if is_cuda_error(exc):
                    raise RuntimeError(f"CUDA error in {stage}: {type(exc).__name__}: {exc}") from exc
                raise
            if size <= minimum:
                unit_text = unit[:-1] if size == 1 and unit.endswith("s") else unit
                raise MemoryError(
                    f"out of memory in {stage}, even with chunks of {size} {unit_text} "
                    f"({type(exc).__name__}: {exc})"
                ) from exc
        # Outside the except clause: the traceback, and with it the failed
        # attempt's frames and their arrays, is released before retrying.
        free_device_memory()
        size = max(minimum, size // 2)


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
_LARGEST_HEAP_BLOCK = 2**31 - 1  # mallopt takes a C int


def _mallopt(settings) -> bool:
    """Set glibc's ``mallopt`` parameters ``(parameter, value)``; whether all were taken (False off glibc)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl without mallopt)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all(mallopt(parameter, int(value)) == 1 for parameter, value in settings)


def _one_heap(threshold: int) -> bool:
    """One arena for every thread; blocks from ``threshold`` bytes mapped apart, free heap beyond it trimmed."""
    return _mallopt(((_M_ARENA_MAX, 1), (_M_MMAP_THRESHOLD, threshold), (_M_TRIM_THRESHOLD, threshold)))


def keep_freed_memory() -> bool:
    """Let this process reuse large freed arrays instead of mapping fresh memory (glibc only).

    glibc maps every array over 32 MiB afresh and unmaps it when freed, so
    each of a refine's cube-sized temporaries is faulted in page by page; on
    a virtual machine the first touch of memory costs far more than writing
    it (``benchmarks.floors`` measures both). With one arena, arrays up to
    2 GiB from the heap and freed memory kept for reuse, repeated refines in
    one process ran 4.0-4.5 s -> 3.2-3.4 s at the paper's geometry, their
    kernel time 0.8-1.4 s -> 0 (one core; the first two refines of a process
    still grow the heap).

    It changes the whole process's allocator for good, so only ggrad's own
    commands call it (``ggrad refine`` in memory, ``demo``, ``bench``), never
    the library's functions; a streamed refine gives freed memory back
    instead (:func:`return_freed_memory`). A Python program can call
    it itself, or start with the environment that ``ggrad mosaic`` gives its
    worker processes for the same reason
    (``ggrad_gpu.scaleout.cluster.MALLOC_ENVIRON``; an environment variable
    may exceed the 2 GiB that ``mallopt``'s C int allows).

    Returns
    -------
    bool
        Whether the C library took the settings (False off glibc).

    Examples
    --------
    >>> from ggrad_gpu._memory import keep_freed_memory
    >>> isinstance(keep_freed_memory(), bool)  # True on glibc
    True
    """
    return _one_heap(_LARGEST_HEAP_BLOCK)


def return_freed_memory(limit: int) -> bool:
    """Let glibc give freed memory back soon, in proportion to a memory ``limit`` (bytes; glibc only).

    A streamed refine holds chunk-sized buffers in Dask's and Zarr's
    threads. By default glibc keeps freed blocks under 32 MiB in one heap
    per thread: a streamed refine under a 0.09 GiB limit grew to 1.1 GiB
    with 0.6 GiB of live arrays. Blocks from ``limit / 32`` (at least 1 MiB)
    get their own mapping, unmapped when freed, free heap space beyond it is
    trimmed, and the threads share one heap. Each fresh mapping is faulted in
    again, which a virtual machine makes slow, so the thresholds grow with
    the limit rather than staying at 1 MiB (under 0.5 GiB, a 0.25 GiB cube
    on a 2048 x 2048 guide: 1 MiB and two heaps, 194 s, peak 0.54 GiB;
    without any setting, 90 s and 0.97 GiB).

    Returns
    -------
    bool
        Whether the C library took the settings (False off glibc).

    Examples
    --------
    >>> from ggrad_gpu._memory import return_freed_memory
    >>> isinstance(return_freed_memory(1 << 30), bool)  # blocks from 32 MiB, on glibc
    True
    """
    return _one_heap(min(_LARGEST_HEAP_BLOCK, max(1 << 20, int(limit) // 32)))


def trim_freed_memory() -> bool:
    """Give the free pages inside glibc's heaps back to the system now (``malloc_trim``; glibc only).

    Freed blocks below the heap's top stay mapped (only the top is trimmed
    as it goes): after a streamed refine, 0.36 GiB of the 0.62 GiB its
    process held had been freed, and the cube-sized write that follows
    would map its own buffers beside them (a 4 GiB cube under a 1 GiB
    limit peaked at 1.43 GiB).

    Returns
    -------
    bool
        Whether any memory went back (False off glibc).

    Examples
    --------
    >>> from ggrad_gpu._memory import trim_freed_memory
    >>> isinstance(trim_freed_memory(), bool)
    True
    """
    try:
        malloc_trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):  # not glibc (Windows takes no None)
        return False
    malloc_trim.argtypes, malloc_trim.restype = (ctypes.c_size_t,), ctypes.c_int
    return bool(malloc_trim(0))
