"""``ggrad refine`` for a cube beyond memory: refine chunk by chunk, write ``registered.zarr`` resumably.

When the cube is larger than ``--memory-limit``, the CLI reads it lazily
(:func:`ggrad_gpu.io.read_cube` with ``lazy=True``), refines it with the same
stages chunk by chunk (:mod:`ggrad_gpu._lazy.chunked`), and writes the output folder
in place rather than all at once (DESIGN "Resumable output"):

1. ``transform.json``, ``weights.json`` and ``report.png`` first, each file
   atomic, with the run's fingerprint (inputs and settings) in
   ``transform.json``;
2. ``registered.zarr`` chunk by chunk (:class:`ggrad_gpu.io.resumable.ResumableArray`),
   ``complete`` set last.

The same command run again after an interruption finds the fingerprint,
reuses the transform without refining again and writes only the chunks still
missing; the store ends bit for bit as an uninterrupted run writes it. Other
inputs or settings never overwrite the folder without ``--force``.
"""

from __future__ import annotations

import gc
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._lazy.chunked import chunk_budget, warp_cube_chunked, warp_source_windows
from .._lazy.window_cache import WindowCache
from .._memory import trim_freed_memory
from .._threads import usable_cores
from .._version import __version__
from ..core.warp import warp_cube
from ..refinement.options import WORKING_BYTES_PER_PIXEL, resume_settings

__all__ = ["MEMORY_SHARE", "StreamPlan", "default_memory_limit", "in_memory_bytes", "stream_plan",
           "stream_refine"]

# Share of the machine's memory that the CLI lets a cube take before streaming it.
MEMORY_SHARE = 4
# Registered chunk side (DESIGN: chunks of about 256 x 256 x all bands).
CHUNK_SIDE = 256
OUTPUTS = ("registered.zarr", "transform.json", "weights.json", "report.png")
# Chunk-sized buffers a registered chunk holds from its task to its write (the
# source window, the interpolation's taps, the result, its encoded copy):
# about 3 measured (a batch of 4 chunks of 62 MB added 751 MiB).
WRITE_CHUNK_COST = 3
# Chunk-sized buffers a computed chunk holds while its write (the result and
# its encoded copy) runs beside the next chunk's computation.
WRITTEN_CHUNK_COST = 2
# The write's window cache (WindowCache), in the store's chunks: on the 4 GiB
# cube (64 chunks of 64 MiB) under 1 GiB, 4 and 6 took the write from 56 s to
# 25.5 and 22 s, and the run's peak to 1.01 and 1.20 GiB (the refine's own
# peak is 0.97-1.02): 4 keep the peak where the refine puts it.
CACHE_STORE_CHUNKS = 4
# A task's peak in its chunks (the store's chunk decoded, the window or projection it is copied
# to, the result, a temporary): what a thread holds at once.
TASK_CHUNKS = 4
# Bytes per guide pixel held for the whole run: the guide as read (float32); its prepared copies
# are on the working grid, which is coarsened to fit the limit (options.WORKING_BYTES_PER_PIXEL).
GUIDE_BYTES_PER_PIXEL = 4


@dataclass(frozen=True)
class StreamPlan:
    """How a streamed refine spends ``--memory-limit``: threads, chunk sizes, and the least limit that works.

    ``threads``: tasks run at once (Dask's local threads); ``chunk_bytes``:
    the stages' chunks; ``store_chunk_bytes``: one chunk of the cube's store
    (decoded whole to read any part of it); ``minimum``: the smallest limit
    with which a run fits (the guide and one task); ``guide_bytes``: the
    guide, held for the whole run.

    Examples
    --------
    >>> plan = StreamPlan(limit=1 << 30, threads=1, chunk_bytes=32 << 20, store_chunk_bytes=64 << 20,
    ...                   minimum=320 << 20)
    >>> plan.limit >= plan.minimum  # the limit is enough (check_memory_limit refuses otherwise)
    True
    >>> plan.task_bytes >> 20  # no guide counted: half the limit for the one thread
    512
    """

    limit: int
    threads: int
    chunk_bytes: int
    store_chunk_bytes: int
    minimum: int
    guide_bytes: int = 0

    @property
    def task_bytes(self) -> int:
        """What each thread's task may hold: half of what the guide leaves (the working grid's steps the rest)."""
        return max(0, (self.limit - self.guide_bytes) // 2 // self.threads)

    def write_plan(self, chunk_bytes: int, *, cpus: int | None = None) -> tuple[int, int]:
        """Threads for the write of ``registered.zarr`` (chunks of ``chunk_bytes``), and its window cache's bytes.

        By the write, the refinement's images are freed and the guide is
        what is left. Each thread holds the store chunk it decodes and
        :data:`WRITE_CHUNK_COST` chunks of its own while it computes, and
        :data:`WRITTEN_CHUNK_COST` more while that chunk is written beside
        the next. There are as many threads as leave room for a cache of
        :data:`CACHE_STORE_CHUNKS` store chunks (at least one thread), and the
        cache takes at most that.

        Examples
        --------
        >>> plan = StreamPlan(limit=1 << 30, threads=1, chunk_bytes=32 << 20, store_chunk_bytes=64 << 20,
        ...                   minimum=320 << 20, guide_bytes=64 << 20)
        >>> threads, cache = plan.write_plan(64 << 20, cpus=2)
        >>> threads, cache >> 20  # a second thread would leave no room for the cache
        (1, 256)
        >>> plan = StreamPlan(limit=400 << 20, threads=1, chunk_bytes=32 << 20, store_chunk_bytes=64 << 20,
        ...                   minimum=320 << 20, guide_bytes=64 << 20)
        >>> plan.write_plan(64 << 20, cpus=2)  # the task alone fills the limit: one thread, no cache
        (1, 0)
        """
        free = self.limit - self.guide_bytes
        task = self.store_chunk_bytes + (WRITE_CHUNK_COST + WRITTEN_CHUNK_COST) * chunk_bytes
        cache = CACHE_STORE_CHUNKS * self.store_chunk_bytes
        cpus = usable_cores() if cpus is None else cpus
        threads = int(max(1, min(cpus, (free - cache) // max(task, 1))))
        return threads, int(min(cache, max(0, free - threads * task)))


def stream_plan(limit: int, cube, guide_shape, *, store_chunks=None, cpus: int | None = None) -> StreamPlan:
    """The :class:`StreamPlan` of a streamed refine of ``cube`` (a dask array) on a guide of ``guide_shape``.

    Examples
    --------
    >>> import dask.array as da
    >>> cube = da.zeros((2048, 2048, 256), dtype=np.float32, chunks=(256, 256, 256))  # 64 MiB chunks
    >>> plan = stream_plan(1 << 30, cube, (4096, 4096), cpus=2)
    >>> plan.threads, plan.chunk_bytes >> 20, plan.store_chunk_bytes >> 20, round(plan.minimum / 2**20)
    (1, 32, 64, 320)
    >>> stream_plan(256 << 20, cube, (1024, 1024), store_chunks=(64, 64, 256), cpus=2).minimum >> 20
    20
    """
    itemsize = np.dtype(cube.dtype).itemsize
    chunks = store_chunks if store_chunks is not None else tuple(max(c) for c in cube.chunks)
    store_chunk = int(np.prod([min(a, b) for a, b in zip(chunks, cube.shape)], dtype=np.int64)) * itemsize
    chunk_bytes = chunk_budget(limit)
    task = TASK_CHUNKS * max(chunk_bytes, store_chunk)
    fixed = GUIDE_BYTES_PER_PIXEL * int(np.prod(guide_shape[:2]))
    # The floor: the guide, held whole, and one task over the store's chunks, each decoded whole
    # to read any part of it (the working grid coarsens to fit what is left).
    minimum = fixed + TASK_CHUNKS * store_chunk
    # Tasks take at most half of what the guide leaves; the working grid's 2-D steps the rest.
    cpus = usable_cores() if cpus is None else cpus
    threads = int(max(1, min(cpus, (limit - fixed) // 2 // max(task, 1))))
    return StreamPlan(int(limit), threads, chunk_bytes, store_chunk, int(minimum), fixed)


def check_memory_limit(plan: StreamPlan) -> None:
    """Raise ValueError naming ``--memory-limit`` and the smallest limit that works, where the plan's is below it.

    Examples
    --------
    >>> check_memory_limit(StreamPlan(100 << 20, 1, 3 << 20, 64 << 20, 300 << 20))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
        ...
    ValueError: --memory-limit 0.098 GiB is too small to stream this cube: ... at least --memory-limit 0.30GiB ...
    """
    if plan.limit >= plan.minimum:
        return
    need = math.ceil(plan.minimum / 2**30 * 100) / 100
    raise ValueError(
        f"--memory-limit {plan.limit / 2**30:.3f} GiB is too small to stream this cube: the guide and one task "
        f"reading the store's chunks of {plan.store_chunk_bytes / 2**20:.0f} MiB need "
        f"at least --memory-limit {need:.2f}GiB ({plan.minimum} bytes); give that or more, or store the cube "
        f"in smaller chunks")


def in_memory_bytes(cube_shape, guide_shape, itemsize: int = 4) -> int:
    """What refining a cube of ``cube_shape`` in memory holds at least: the cube and its registered copy.

    The registered cube lies on the working grid, up to the guide's size:
    a 512 x 512 x 256 cube (0.25 GiB) on a 2048 x 2048 guide makes a 4 GiB
    output, and refining it in memory peaked at 5 GiB under
    ``--memory-limit 0.5GiB``, which only looked at the cube file. The
    guide's size is an upper bound (a partial field's working grid is its
    footprint and margin), so a run it sends to streaming could sometimes
    have fitted; never the other way round.

    Examples
    --------
    >>> in_memory_bytes((512, 512, 256), (2048, 2048)) / 2**30
    4.25
    """
    rows, cols, bands = (int(n) for n in cube_shape)
    registered = int(np.prod(guide_shape[:2], dtype=np.int64)) * bands * itemsize
    return rows * cols * bands * itemsize + registered


def default_memory_limit() -> int:
    """A quarter of the machine's physical memory, in bytes (4 GiB where the platform does not say).

    Examples
    --------
    >>> limit = default_memory_limit()
    >>> limit == (os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4 if hasattr(os, "sysconf") else 4 << 30)
    True
    """
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // MEMORY_SHARE
    except (AttributeError, ValueError, OSError):
        return 4 << 30


def stream_refine(guide, cube_data, output, *, options, guide_path, initial_path, initial, band_axis=None,
                  force: bool = False, quiet: bool = False, run_refine, say) -> tuple:
    """Refine a lazy cube and write the output folder in place, resumably.

    Parameters
    ----------
    guide : numpy.ndarray
        The guide image.
    cube_data : ggrad_gpu.io.CubeData
        The cube, ``data`` a dask array.
    output : path-like
        The output folder (made, or continued).
    options : ggrad_gpu.refinement.options.RefineOptions
        ``refine``'s options; ``memory_limit`` (bytes, required) also bounds
        the chunks computed at once. The fingerprint holds every option that
        :func:`~ggrad_gpu.refinement.options.resume_settings` gives.
    guide_path, initial_path : path-like
        The files they came from (``initial_path`` None for the default).
    initial
        As :func:`ggrad_gpu.refine` takes it.
    band_axis : int or list, optional
        The band axis the cube was read with (part of the fingerprint).
    force : bool
        Replace the outputs of another run in ``output``.
    quiet : bool
        No progress bar.
    run_refine : callable
        ``run_refine(guide, cube, initial=..., **options.keywords()) -> Refinement``
        (:func:`ggrad_gpu.refine`, or the CLI's, with its progress bar).
    say : callable
        Prints a progress line (or nothing, with ``--quiet``).

    Returns
    -------
    (str, bool)
        The refinement's message and whether it improved on the initial
        transform.

    Examples
    --------
    >>> import tempfile, zarr
    >>> from ggrad_gpu import io, refine
    >>> from ggrad_gpu.refinement.options import RefineOptions
    >>> from ggrad_gpu.synthetic import make_phantom
    >>> folder = tempfile.TemporaryDirectory(); root = Path(folder.name)
    >>> phantom = make_phantom(shape=(64, 80), bands=8, seed=0, signatures="mixed")
    >>> np.save(root / "guide.npy", phantom.guide); cube_path = io.write_cube(root / "cube.zarr", phantom.cube)
    >>> options = RefineOptions(output_grid="cube", memory_limit=1 << 20)
    >>> cube_data = io.read_cube(root / "cube.zarr", lazy=True)  # a dask array, never read whole
    >>> message, improved = stream_refine(phantom.guide, cube_data, root / "out", options=options,
    ...                                   guide_path=root / "guide.npy", initial_path=None, initial=phantom.initial,
    ...                                   quiet=True, run_refine=refine, say=lambda line: None)
    >>> improved, sorted(path.name for path in (root / "out").iterdir())
    (True, ['registered.zarr', 'report.png', 'transform.json', 'weights.json'])
    >>> store = zarr.open_array(str(root / "out" / "registered.zarr"), mode="r")
    >>> store.shape, store.attrs["complete"]  # output_grid "cube": about the cube's own 12 x 14 pixels
    ((12, 15, 8), True)
    >>> folder.cleanup()
    """
    import dask

    out = Path(output)
    grid, memory_limit = options.output_grid, options.memory_limit
    if memory_limit is None:
        raise ValueError("stream_refine needs options.memory_limit: the bytes the run may hold")
    store = _zarr_source(cube_data, band_axis)
    plan = stream_plan(memory_limit, cube_data.data, guide.shape, store_chunks=None if store is None else store.chunks)
    check_memory_limit(plan)
    # Dask's local threads (where no cluster runs the work): as many as the limit holds tasks.
    with dask.config.set(num_workers=plan.threads):
        return _stream(guide, cube_data, out, options, plan, store, guide_path=guide_path,
                       initial_path=initial_path, initial=initial, band_axis=band_axis, force=force, quiet=quiet,
                       run_refine=run_refine, say=say)


def _zarr_source(cube_data, band_axis):
    """The Zarr array that holds ``cube_data.data`` as it is (bands last), or None for other formats."""
    if cube_data.format != "zarr" or band_axis not in (None, -1, 2):
        return None
    import zarr

    array = zarr.open_array(store=str(cube_data.path), path=cube_data.dataset or "", mode="r")
    same = tuple(array.shape) == tuple(cube_data.data.shape) and array.dtype == cube_data.data.dtype
    return array if same else None


def _stream(guide, cube_data, out, options, plan, store, *, guide_path, initial_path, initial, band_axis, force,
            quiet, run_refine, say):
    """:func:`stream_refine`'s work, under its plan."""
    import dask

    from ..io import ResumableArray, file_signature, fingerprint, read_transform

    grid = options.output_grid
    signature = fingerprint(
        guide=file_signature(guide_path), cube=file_signature(cube_data.path), dataset=cube_data.dataset,
        initial=None if initial_path is None else file_signature(initial_path), band_axis=band_axis,
        options=resume_settings(options), version=__version__,
    )
    record = _resumable_record(out, signature, force=force)
    if record is None:
        refinement = run_refine(guide, cube_data.data, initial=initial, **options.keywords())
        source = "default" if initial_path is None else "file"
        record = _write_small_outputs(out, refinement, guide, cube_data, guide_path, signature, source)
        # Free the refinement's images and the report (matplotlib's reference
        # cycles wait for the collector) before the cube-sized write.
        del refinement
        gc.collect()
        trim_freed_memory()
        say(f"refined: the transform is in {out / 'transform.json'}; now writing registered.zarr")
    else:
        say(f"continuing {out}: the transform of the interrupted run is reused")
    matrix = read_transform(out / "transform.json")
    to_guide = np.asarray(record["output_grid"]["output_to_guide"], dtype=np.float64)
    shape = tuple(record["output_grid"]["shape"])
    bands = cube_data.data.shape[2]
    dtype = np.float64 if cube_data.data.dtype == np.float64 else np.float32
    # A write task holds the store chunk it decodes and WRITE_CHUNK_COST chunks of its own.
    task = max(0, plan.task_bytes - (plan.store_chunk_bytes if store is not None else 0))
    side = max(16, min(CHUNK_SIDE, int(np.sqrt(task / WRITE_CHUNK_COST / (bands * np.dtype(dtype).itemsize)))))
    output = ResumableArray.open(
        out / "registered.zarr", shape=shape + (bands,), chunks=(side, side, bands), dtype=dtype,
        fingerprint=signature, attributes=_store_attributes(matrix, to_guide, grid, cube_data),
    )
    pending = output.pending()
    threads, cache_bytes = plan.write_plan(side * side * bands * np.dtype(dtype).itemsize)
    if store is not None:
        # Each store chunk decoded as few times as the cache allows, rather than by every window it meets.
        windows = warp_source_windows(matrix @ to_guide, shape, (side, side), cube_data.data.shape, order=1)
        reads = [windows[index[:2]] for index in pending if windows[index[:2]] is not None]
        store = WindowCache(store, [rows + cols for rows, cols in reads], cache_bytes)
    registered = warp_cube_chunked(cube_data.data, matrix @ to_guide, shape, order=1, kernel=warp_cube,
                                   chunks=(side, side), store=store)
    start, count = time.perf_counter(), len(pending)
    with dask.config.set(num_workers=threads):
        _write_chunks(output, registered, pending, threads, quiet=quiet)
    output.finish()
    seconds = time.perf_counter() - start
    say(f"registered.zarr: warped and wrote {count} chunks of {side} x {side} x {bands} in {seconds:.1f} s")
    return record["message"], bool(record["improved"])


def _resumable_record(out: Path, signature: str, *, force: bool):
    """The ``transform.json`` of an interrupted run with this fingerprint, or None; the folder made ready.

    Raises FileExistsError when ``out`` holds anything else and ``force`` is
    False; ``force`` redoes the run (even one with this fingerprint).
    """
    from ..io.folders import remove_outputs, reusable_record

    record = reusable_record(out / "transform.json", signature, force=force, outputs=OUTPUTS)
    if force:
        record = None
        if out.is_dir():
            remove_outputs(out, OUTPUTS)
    out.mkdir(exist_ok=True)
    return record


def _write_small_outputs(out: Path, refinement, guide, cube_data, guide_path, signature, initial_source) -> dict:
    """``transform.json`` (with the fingerprint), ``weights.json`` and ``report.png``, each atomic."""
    from ..io import transform_record, weights_record, write_json
    from ..io.atomic import atomic_write, write_figure
    from ..plotting.report import report_figure

    centres, unit = cube_data.band_centres, cube_data.band_unit
    figure = report_figure(refinement, guide, cube_data.data, band_centres=centres, band_unit=unit)
    with atomic_write(out / "report.png", overwrite=True) as temp:
        write_figure(figure, temp)
    write_json(out / "weights.json", weights_record(refinement.gradient, band_centres=centres, band_unit=unit),
               overwrite=True)
    record = transform_record(
        refinement, guide={"shape": [int(n) for n in guide.shape], "source": str(guide_path)},
        cube={"shape": [int(n) for n in cube_data.data.shape], "source": str(cube_data.path),
              "format": cube_data.format},
        initial_source=initial_source,
    )
    record.update(fingerprint=signature, streamed=True)
    write_json(out / "transform.json", record, overwrite=True)  # last: its fingerprint marks the transform done
    return json.loads((out / "transform.json").read_text())


def _store_attributes(matrix, to_guide, grid: str, cube_data) -> dict:
    centres = None if cube_data.band_centres is None else [float(v) for v in cube_data.band_centres]
    return {"matrix": np.asarray(matrix).tolist(), "output_to_guide": np.asarray(to_guide).tolist(),
            "output_grid": grid, "band_centres": centres, "band_unit": cube_data.band_unit}


def _write_chunks(store, registered, pending, threads: int, *, quiet: bool) -> None:
    """Compute and write the chunks ``pending``, a batch at a time, each batch written while the next computes.

    A batch is one chunk per thread: more than the threads compute at once
    only wait longer for their writes (a batch of 4 chunks of 64 MiB on one
    thread took a 4 GiB cube's run under a 1 GiB limit to a peak of 1.42 GiB).
    The writes (Zstd encoding, the file) run in their own threads, beside
    the next batch's reads and warps; a chunk's mark follows its write.
    """
    from concurrent.futures import ThreadPoolExecutor

    import dask
    from tqdm.auto import tqdm

    total = len(store.chunk_indices())
    with tqdm(total=total, initial=total - len(pending), desc="registered.zarr", unit=" chunk",
              disable=True if quiet else None, file=sys.stderr) as bar, \
            ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ggrad-write") as writer:
        writing, tasks = [], registered.to_delayed()  # a block's task gives it as made (an Array's would copy it)
        for start in range(0, len(pending), threads):
            indices = pending[start:start + threads]
            blocks = dask.compute(*[tasks[index[:2]][0] for index in indices])
            for future in writing:
                future.result()
                bar.update()
            writing = [writer.submit(store.write, index, block) for index, block in zip(indices, blocks)]
            del blocks
        for future in writing:
            future.result()
            bar.update()
