"""Cubes beyond memory: the cube-sized stages on ``dask.array``, chunk by chunk.

The stages that touch the cube (:func:`ggrad_gpu.warp_cube`,
:func:`ggrad_gpu.core.coverage.fill_gaps`, :func:`ggrad_gpu.core.pyramid.blur_decimate`,
:func:`ggrad_gpu.core.estimate.level_gram`, :func:`ggrad_gpu.core.estimate.combine_bands`)
hand a ``dask.array.Array`` and their own in-memory function (the ``kernel``:
this layer imports no stage) to the functions here, which run that function on
each chunk with the halo it needs on the two spatial axes (never on the band
axis) and stitch the results: one implementation of the algorithm, applied per
chunk. What comes out of a level is small (Gram matrices, 2-D images) and is
computed; cube-sized results stay lazy, and :func:`checkpoint` stores one that
later steps read several times (in memory when it fits the budget, else in a
temporary Zarr store).

Nothing here imports dask unless a dask array is handed in.

Why not ``dask_image.ndinterp.affine_transform``: it interpolates along the
band axis too (a 3-D transform, with a 3-D spline prefilter at order 3), and
spreads a NaN of one band into the others; DESIGN's Warp needs per-band 2-D
interpolation with NaN beyond the footprint. ``dask_image.ndfilters.sobel``
works on one axis at a time and smooths along every other axis, the band axis
included (SciPy's ``sobel``); the estimate needs the magnitude on the spatial
axes only, summed into Gram matrices without holding the gradients.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import sys

import numpy as np

from .._affine import translation
from .scratch import make_folder, release_folder

__all__ = [
    "CHUNK_BYTES",
    "blur_decimate_chunked",
    "checkpoint",
    "block_chunk_bytes",
    "checkpoints",
    "chunk_budget",
    "combine_bands_chunked",
    "fill_gaps_chunked",
    "held_once",
    "is_dask_array",
    "keep_source",
    "level_gram_chunked",
    "prepare_lazy_cube",
    "read_window",
    "release_checkpoints",
    "spatial_chunks",
    "stored_path",
    "warp_cube_chunked",
    "warp_source_windows",
]

# Bytes of one cube chunk (all bands) when a stage chooses the chunks: a task
# holds a few chunk-sized temporaries (the halo copy, the Sobel workspace, the
# warp's taps), so a worker thread stays within a few times this.
CHUNK_BYTES = 32 << 20
# Pyramid blur radius (pyramid._RADIUS), rounded up to even so that every
# chunk starts on a kept (even) row and column.
_BLUR_HALO = 4
# Source pixels read beyond a warp block's reach: the bilinear taps need 1;
# the cubic prefilter's influence decays by 0.268 per pixel (0.268**16 < 1e-9).
_WARP_PAD = {1: 2, 3: 16}


def is_dask_array(x) -> bool:
    """Whether ``x`` is a ``dask.array.Array``, without importing dask.

    Examples
    --------
    >>> import dask.array as da
    >>> is_dask_array(np.zeros(3)), is_dask_array(da.zeros(3))
    (False, True)
    """
    module = sys.modules.get("dask.array")
    return module is not None and isinstance(x, module.Array)


def spatial_chunks(shape, itemsize: int, *, chunk_bytes: int = CHUNK_BYTES, multiple: int = 1):
    """Square spatial chunks ``(rows, cols)`` of all bands within ``chunk_bytes``, multiples of ``multiple``.

    Examples
    --------
    >>> spatial_chunks((1000, 800, 100), 4, chunk_bytes=1_000_000)  # 400 bytes a pixel: 50 x 50
    (50, 50)
    >>> spatial_chunks((1000, 800, 100), 4, chunk_bytes=1_000_000, multiple=16)
    (48, 48)
    >>> spatial_chunks((30, 800, 100), 4, chunk_bytes=1_000_000)  # never more than the array
    (30, 50)
    """
    bands = int(np.prod(shape[2:], dtype=np.int64)) if len(shape) > 2 else 1
    side = max(multiple, int(math.sqrt(chunk_bytes / max(1, bands * itemsize))) // multiple * multiple)
    return min(side, shape[0]), min(side, shape[1])


# --------------------------------------------------------------------------- materialising once

@dataclasses.dataclass
class _Scratch:
    """What a :func:`checkpoints` block keeps: its temporary folder and stores, its memory limit, its arrays."""

    stores: list  # the temporary folder (made when the first array goes to disk), then each store in it
    limit: int | None
    chunk_bytes: int = 0  # the block's chunk budget (chunk_budget)
    done: dict = dataclasses.field(default_factory=dict)  # checkpoint: held arrays by name
    sources: dict = dataclasses.field(default_factory=dict)  # keep_source: the stored sources by name


_SCRATCH = contextvars.ContextVar("ggrad_gpu_chunked_scratch", default=None)
_LOCKS: dict = {}  # each block's temporary folder: its held lock (scratch.make_folder)


@contextlib.contextmanager
def checkpoints(memory_limit: int | None = None, *, chunk_bytes: int | None = None):
    """Where :func:`checkpoint` keeps arrays while the block runs; removed afterwards.

    Arrays stay in memory (``persist``) while all those the block holds
    together come to at most ``memory_limit`` bytes; the others go to a
    temporary Zarr store, deleted on exit. Without ``memory_limit``,
    everything is persisted in memory. ``chunk_bytes`` (default
    :func:`chunk_budget` of the limit) sizes the chunks the stages choose in
    the block (:func:`block_chunk_bytes`): what a task holds is a few of them.

    Examples
    --------
    >>> import dask.array as da
    >>> x = da.arange(12, chunks=4) * 2  # 96 bytes
    >>> with checkpoints(memory_limit=64):  # more than a quarter of the limit: a temporary Zarr store
    ...     on_disk = checkpoint(x)
    ...     total = int(on_disk.sum().compute())
    >>> total, on_disk.name.startswith("from-zarr")
    (132, True)
    """
    stores = []  # the temporary folder, made when the first array goes to disk
    chunk_bytes = chunk_budget(memory_limit) if chunk_bytes is None else int(chunk_bytes)
    token = _SCRATCH.set(_Scratch(stores, memory_limit, chunk_bytes))
    try:
        yield
    finally:
        _SCRATCH.reset(token)
        for name in [name for name, path in _STORED.items() if stores and path.startswith(stores[0])]:
            del _STORED[name]
        for folder in stores[:1]:
            release_folder(folder, _LOCKS.pop(folder, None))


def checkpoint(x):
    """``x`` computed once, for steps that read it several times (identity for in-memory arrays).

    An array that is already a checkpoint of the current block is returned as it is.

    Examples
    --------
    >>> import dask.array as da
    >>> x = da.arange(12, chunks=4) * 2
    >>> with checkpoints():  # no limit: persisted in memory
    ...     kept = checkpoint(x)
    ...     again = checkpoint(kept)
    >>> again is kept, len(kept.__dask_graph__()), int(kept.sum().compute())  # one task per computed chunk
    (True, 3, 132)
    >>> checkpoint(np.ones(2))  # an in-memory array is its own checkpoint
    array([1., 1.])
    """
    if not is_dask_array(x):
        return x
    scratch = _SCRATCH.get()
    if scratch is None:
        return _persisted(x)
    if x.name in scratch.done:
        return x
    held = sum(a.nbytes for a in scratch.done.values() if stored_path(a) is None)
    kept = _persisted(x) if _fits_memory(x, scratch.limit, held) else _stored(x, scratch.stores)
    scratch.done[kept.name] = kept  # held (until release_checkpoints): on a cluster, its data stay while later steps read them
    return kept


def _fits_memory(x, limit, held: int = 0) -> bool:
    """Whether the block keeps ``x`` in memory: no limit, or ``x`` and the ``held`` bytes within it."""
    return limit is None or x.nbytes + held <= limit


def chunk_budget(memory_limit: int | None) -> int:
    """Bytes of one stage chunk under ``memory_limit``: 1/32 of it, between 1 MiB and :data:`CHUNK_BYTES`.

    A task holds a few chunk-sized temporaries (the source window, the halo
    copy, the Sobel workspace, the result), and a thread runs one task.

    Examples
    --------
    >>> chunk_budget(None) == CHUNK_BYTES, chunk_budget(256 << 20) >> 20, chunk_budget(1 << 20) >> 20
    (True, 8, 1)
    """
    if memory_limit is None:
        return CHUNK_BYTES
    return int(min(CHUNK_BYTES, max(1 << 20, memory_limit // 32)))


def block_chunk_bytes() -> int:
    """The chunk budget of the current :func:`checkpoints` block (:data:`CHUNK_BYTES` outside one).

    Examples
    --------
    >>> with checkpoints(memory_limit=64 << 20):
    ...     block_chunk_bytes() >> 20
    2
    >>> block_chunk_bytes() == CHUNK_BYTES
    True
    """
    scratch = _SCRATCH.get()
    return CHUNK_BYTES if scratch is None else scratch.chunk_bytes


def _stored(x, stores):
    """``x`` written to a new store in the block's temporary folder and read back lazily from it."""
    import dask.array as da

    if not stores:  # locked while the block runs: a later run removes it if this one is killed
        folder, _LOCKS[folder] = make_folder()
        stores.append(folder)
    stores.append(f"{stores[0]}/step-{len(stores)}.zarr")
    x.to_zarr(stores[-1], compressors=None)  # scratch, read back at once: compression only costs time
    kept = da.from_zarr(stores[-1])
    _STORED[kept.name] = stores[-1]
    return kept


# The chunks of a source kept on disk (keep_source): a warp block reads its window from the store, and
# whatever chunks the window touches are read whole.
SOURCE_CHUNK_BYTES = 8 << 20


def keep_source(x):
    """The cube as the estimates read it, kept on disk for the whole :func:`checkpoints` block if it is large.

    Every estimate warps the cube to a new placement. Through dask, each
    warp block loads the source chunks its window touches whole, with what
    they are computed from (the store's chunks, decompressed, and the
    denoising projection), and the scheduler holds rows of them: a 4 GiB
    cube in 64 MiB chunks took 2.4 GiB to warp. A dask ``x`` larger than a
    quarter of the block's memory limit is written once to a temporary store
    in chunks of ``SOURCE_CHUNK_BYTES`` (bands whole), which
    :func:`warp_cube_chunked` reads window by window;
    :func:`release_checkpoints` leaves it. Anything else is returned as it is.

    Examples
    --------
    >>> import dask.array as da
    >>> x = da.ones((64, 64, 4), chunks=(32, 32, 4))  # 128 KiB
    >>> with checkpoints(memory_limit=1 << 16):
    ...     kept = keep_source(x)
    ...     release_checkpoints()
    ...     again = keep_source(x)  # the same store: written once in the block
    ...     on_disk = stored_path(kept) is not None
    >>> again is kept, on_disk, keep_source(x) is x  # outside a block: as it is
    (True, True, True)
    """
    scratch = _SCRATCH.get()
    if not is_dask_array(x) or scratch is None:
        return x
    if scratch.limit is None or x.nbytes <= scratch.limit // 4:
        return x
    return _kept_on_disk(x, scratch)


def held_once(x):
    """``x`` computed once for the :func:`checkpoints` block: in memory, or on disk where it is large.

    In memory (a NumPy or CuPy array) where it takes at most an eighth of
    the block's memory limit, or without a limit; else written once to a
    temporary store as :func:`keep_source` keeps a cube, and read back by
    windows. For what many steps read, each at another place: a dask ``x``
    left lazy is computed again by every step.

    Examples
    --------
    >>> import dask.array as da
    >>> x = da.ones((64, 64, 4), chunks=(32, 32, 4))  # 128 KiB
    >>> with checkpoints(memory_limit=1 << 20):
    ...     in_memory = held_once(x)
    >>> with checkpoints(memory_limit=1 << 19):
    ...     on_disk = stored_path(held_once(x)) is not None
    >>> type(in_memory).__name__, on_disk
    ('ndarray', True)
    """
    if not is_dask_array(x):
        return x
    scratch = _SCRATCH.get()
    if scratch is None or scratch.limit is None or x.nbytes <= scratch.limit // 8:
        return x.compute()
    return _kept_on_disk(x, scratch)


def _kept_on_disk(x, scratch):
    """``x`` in a temporary store of the block, in chunks of ``SOURCE_CHUNK_BYTES`` (bands whole), written once."""
    if x.name not in scratch.sources:
        rows, cols = spatial_chunks(x.shape, x.dtype.itemsize, chunk_bytes=SOURCE_CHUNK_BYTES)
        # Each new chunk a piece of one of x's (a side that divides x's chunks): with sides that do
        # not, a new chunk draws on up to four of x's and the scheduler holds rows of them (a 4 GiB
        # cube in 64 MiB chunks peaked at 3.0 GiB while being copied).
        split = {0: _dividing_side(x.chunks[0], rows), 1: _dividing_side(x.chunks[1], cols), 2: -1}
        scratch.sources[x.name] = _stored(x.rechunk(split), scratch.stores)
    return scratch.sources[x.name]


def _dividing_side(chunks, target: int) -> int:
    """The largest side up to ``target`` that divides every chunk but the last; the chunk itself if none is near.

    Examples
    --------
    >>> _dividing_side((256, 256, 100), 90), _dividing_side((250, 250), 90), _dividing_side((257, 257), 90)
    (64, 50, 257)
    """
    size = chunks[0]
    if any(chunk != size for chunk in chunks[:-1]) or size <= target:
        return size
    side = max(d for d in range(1, target + 1) if size % d == 0)
    return side if 2 * side >= target else size


# The Zarr store behind each checkpoint kept on disk, by dask name: a stage
# with a halo reads its windows from the store (only what it needs) rather
# than through dask's neighbour chunks, which it would load whole.
_STORED: dict = {}


def stored_path(x) -> str | None:
    """The temporary Zarr store behind ``x`` if ``x`` is a checkpoint kept on disk, else None.

    Examples
    --------
    >>> import dask.array as da
    >>> x = da.ones((40, 40, 3), chunks=(16, 16, 3))
    >>> with checkpoints(memory_limit=1):  # nothing fits in memory: every checkpoint goes to disk
    ...     kept = checkpoint(x)
    ...     stored_path(kept).endswith(".zarr"), stored_path(x)
    (True, None)
    """
    return _STORED.get(getattr(x, "name", None))


def read_window(path, rows, cols):
    """Rows ``rows[0]:rows[1]`` and columns ``cols`` of a Zarr array, reflected beyond its edges.

    ``path`` is the array's store path, the opened array, or a
    :class:`~ggrad_gpu._lazy.window_cache.WindowCache` over it. Over store
    chunks beyond :data:`LARGE_STORE_CHUNK` the window is read one chunk at a
    time, so that one decoded chunk is held at once. Reflection as SciPy's ``mode="reflect"`` (``d c b a | a b c d``);
    ranges may reach up to the array's size beyond either edge.

    Examples
    --------
    >>> import tempfile, zarr
    >>> path = tempfile.mkdtemp() + "/a.zarr"
    >>> zarr.create_array(path, shape=(3, 4), dtype="int32")[:] = np.arange(12).reshape(3, 4)
    >>> read_window(path, (-2, 2), (2, 6))  # two rows above the edge, two columns beyond the right
    array([[6, 7, 7, 6],
           [2, 3, 3, 2],
           [2, 3, 3, 2],
           [6, 7, 7, 6]], dtype=int32)
    """
    import zarr

    from .window_cache import WindowCache

    array = zarr.open_array(path, mode="r") if isinstance(path, str) else path
    (r0, r1), (c0, c1) = rows, cols
    n, m = array.shape[:2]
    a0, a1, b0, b1 = max(r0, 0), min(r1, n), max(c0, 0), min(c1, m)
    pad = ((a0 - r0, r1 - a1), (b0 - c0, c1 - b1)) + ((0, 0),) * (len(array.shape) - 2)
    if isinstance(array, WindowCache):
        window = array.read(a0, a1, b0, b1)
    else:
        window = _read_by_chunks(array, a0, a1, b0, b1)
    return np.pad(window, pad, mode="symmetric") if any(any(p) for p in pad) else window


# A window over store chunks larger than this is read one chunk at a time: Zarr decodes every
# chunk a selection touches at once, whole (a window over four 64 MiB chunks held 256 MiB).
LARGE_STORE_CHUNK = 4 << 20


def _read_by_chunks(array, a0, a1, b0, b1):
    """``array[a0:a1, b0:b1]``; over large store chunks, read one chunk after another (the same values)."""
    chunk_rows, chunk_cols = array.chunks[:2]
    chunk_bytes = int(np.prod(array.chunks, dtype=np.int64)) * array.dtype.itemsize
    row_cuts = list(range((a0 // chunk_rows + 1) * chunk_rows, a1, chunk_rows))
    col_cuts = list(range((b0 // chunk_cols + 1) * chunk_cols, b1, chunk_cols))
    if chunk_bytes <= LARGE_STORE_CHUNK or not (row_cuts or col_cuts):
        return array[a0:a1, b0:b1]
    out = np.empty((a1 - a0, b1 - b0) + array.shape[2:], dtype=array.dtype)
    for u0, u1 in zip([a0] + row_cuts, row_cuts + [a1]):
        for v0, v1 in zip([b0] + col_cuts, col_cuts + [b1]):
            out[u0 - a0:u1 - a0, v0 - b0:v1 - b0] = array[u0:u1, v0:v1]
    return out


def release_checkpoints() -> None:
    """Let go of the current block's checkpoints (the steps that read them are done).

    Examples
    --------
    >>> import dask.array as da
    >>> with checkpoints():
    ...     kept = checkpoint(da.ones(4, chunks=2))
    ...     release_checkpoints()  # later steps no longer need it
    ...     fresh = checkpoint(kept)  # no longer held, so kept again
    >>> fresh is kept, float(fresh.sum().compute())
    (False, 4.0)
    """
    scratch = _SCRATCH.get()
    if scratch is not None:
        scratch.done.clear()


def _persisted(x):
    """``x.persist()``, finished before it returns.

    On a ``distributed`` cluster ``persist`` returns at once; the steps that
    follow replace the array they read, and its data would be released while
    the next checkpoint still needs it.
    """
    kept = x.persist()
    distributed = sys.modules.get("distributed")
    if distributed is not None:
        try:
            distributed.default_client()
        except ValueError:  # no client: the local scheduler has finished already
            return kept
        distributed.wait(kept)
    return kept


# --------------------------------------------------------------------------- the cube


def prepare_lazy_cube(cube, mask, xp, *, samples=()):
    """A dask cube's ``(values, with_data, dead_bands, sampled)``; the first three as ``prepare_cube`` gives them.

    One pass over the cube finds the bands with data and, per pixel, how
    many bands are finite; ``values`` stays lazy (NaN at missing values, on
    the device chunk by chunk when ``xp`` is CuPy), the maps are computed.
    ``samples``: ``(rows, cols)`` indices read in the same pass, ``sampled``
    being ``values`` at each (in memory; the same numbers as
    ``values[index].compute()``).

    Examples
    --------
    >>> import dask.array as da
    >>> cube = np.ones((4, 4, 3)); cube[0, 0, 1] = np.nan; cube[..., 2] = np.nan  # band 2 is empty
    >>> values, with_data, dead, (corner,) = prepare_lazy_cube(da.from_array(cube, chunks=2), None, np,
    ...                                                        samples=[(slice(0, 2), slice(0, 1))])
    >>> is_dask_array(values), dead.tolist(), int(with_data.sum())  # pixel (0, 0) lacks band 1
    (True, [2], 15)
    >>> corner[:, 0]
    array([[ 1., nan, nan],
           [ 1.,  1., nan]])
    """
    import dask
    import dask.array as da

    from .._backend import to_device
    from .._validation import float_dtype

    if xp is not np:  # each chunk moves to the device when a task reads it
        cube = cube.map_blocks(xp.asarray, dtype=cube.dtype, meta=xp.empty((0, 0, 0), dtype=cube.dtype))
    finite = da.isfinite(cube)
    if mask is not None:
        finite = finite & da.from_array(np.asarray(mask), chunks=cube.chunks[:2])[:, :, None]
    present, count, *sampled = dask.compute(finite.any(axis=(0, 1)), finite.sum(axis=2, dtype=np.int32),
                                            *[cube[index] for index in samples])
    present = np.asarray(present) if xp is np else present.get()
    if not present.any():
        raise ValueError("cube has no finite value (inside mask)")
    with_data = count == int(present.sum())
    if bool(present.all()) and bool(with_data.all()):
        return cube, None, None, sampled
    if not bool(with_data.any()):
        raise ValueError("cube has no pixel with a finite value in every band (inside mask)")
    dtype = float_dtype(cube.dtype)
    values = da.where(finite, cube.astype(dtype), np.nan)
    # The samples as ``values`` has them: the same elementwise where, on the pixels read.
    sampled = [_where_finite(part, None if mask is None else np.asarray(mask)[index], dtype, xp)
               for part, index in zip(sampled, samples)]
    dead = np.flatnonzero(~present)
    return values, to_device(with_data, xp) if not bool(with_data.all()) else None, dead if dead.size else None, sampled


def _where_finite(part, mask, dtype, xp):
    finite = xp.isfinite(part)
    if mask is not None:
        finite &= xp.asarray(mask)[:, :, None]
    return xp.where(finite, part.astype(dtype), np.nan)


# --------------------------------------------------------------------------- warp


def warp_cube_chunked(cube, matrix, output_shape, *, order: int, kernel, chunks=None, store=None):
    """:func:`ggrad_gpu.warp_cube` of a dask cube: one task per output block, reading the source window it needs.

    Each output block reads the cube's window that its pixels map into, plus
    a pad (:data:`_WARP_PAD`), clipped to the cube, and warps it with the
    matrix shifted to the window: where the window is clipped its edge is the
    cube's, so footprint and edge clamping are the whole cube's. At order 3
    the spline prefilter runs over the window; the pad keeps its difference
    from the whole cube's below 1e-9 of the values. ``kernel`` is the in-memory
    :func:`ggrad_gpu.warp_cube`, run on each window (the stage hands itself in: this
    layer imports no stage). ``store``: a Zarr array (or its path) that holds
    ``cube`` as it is; each block then reads its window from it
    (:func:`read_window`, one large store chunk at a time), not through
    dask's chunks, which it would load whole and at once.

    Examples
    --------
    >>> import dask.array as da
    >>> from ggrad_gpu import warp_cube
    >>> cube = np.random.default_rng(0).random((10, 10, 2))
    >>> matrix = np.array([[0.9, 0.1, 0.5], [-0.1, 0.9, 1.0], [0, 0, 1]])
    >>> lazy = warp_cube_chunked(da.from_array(cube, chunks=(4, 4, 2)), matrix, (12, 12), order=1, kernel=warp_cube,
    ...                          chunks=(5, 5))
    >>> bool(np.allclose(lazy.compute(), warp_cube(cube, matrix, (12, 12)), equal_nan=True))
    True
    """
    import dask
    import dask.array as da

    bands = cube.shape[2]
    dtype = np.dtype(np.float64 if cube.dtype == np.float64 else np.float32)
    if chunks is None:
        chunks = spatial_chunks(tuple(output_shape) + (bands,), dtype.itemsize, chunk_bytes=block_chunk_bytes())
        # Each block reads the source window it maps into: where the matrix shrinks the cube (a
        # coarse level), that window is larger than the block by the scale; keep it to the budget.
        # (A 2048 x 2048 x 256 cube warped to 512 x 512: 512 MiB windows for 32 MiB blocks.)
        shrink = math.sqrt(abs(float(np.linalg.det(np.asarray(matrix, dtype=np.float64)[:2, :2]))))
        if shrink > 1:
            chunks = tuple(max(1, int(side / shrink)) for side in chunks)
    meta = cube._meta
    path = stored_path(cube) if store is None else store  # on disk: each block reads its window from the store
    windows = warp_source_windows(matrix, output_shape, chunks, cube.shape, order)
    rows = []
    for i, r0 in enumerate(range(0, output_shape[0], chunks[0])):
        r1 = min(r0 + chunks[0], output_shape[0])
        row = []
        for j, c0 in enumerate(range(0, output_shape[1], chunks[1])):
            c1 = min(c0 + chunks[1], output_shape[1])
            window = windows[i, j]
            if window is None:  # the block maps outside the cube: NaN, read nothing
                row.append(da.full((r1 - r0, c1 - c0, bands), np.nan, dtype=dtype, chunks=(r1 - r0, c1 - c0, bands)))
                continue
            (w0, w1), (v0, v1) = window
            shifted = translation(-w0, -v0) @ matrix @ translation(r0, c0)
            if path is None:
                task = dask.delayed(kernel, pure=True)(cube[w0:w1, v0:v1], shifted, (r1 - r0, c1 - c0),
                                                          order=order)
            else:
                task = dask.delayed(_warp_window, pure=True)(path, (w0, w1), (v0, v1), meta, shifted,
                                                             (r1 - r0, c1 - c0), order, kernel)
            row.append(da.from_delayed(task, (r1 - r0, c1 - c0, bands), dtype=dtype, meta=meta))
        rows.append(row)
    return _stitched(rows)


def warp_source_windows(matrix, output_shape, chunks, cube_shape, order: int) -> dict:
    """The cube's window that each output block of :func:`warp_cube_chunked` reads.

    Returns
    -------
    dict
        ``(block_row, block_col) -> [(w0, w1), (v0, v1)]``, the rows and
        columns of the cube (clipped to it), or None where the block maps
        outside the cube.

    Examples
    --------
    >>> windows = warp_source_windows(np.eye(3), (10, 10), (5, 5), (8, 8, 2), order=1)
    >>> windows[0, 0], windows[1, 1]  # the pad of 2 beyond each block; block (1, 1) reads the cube's last rows
    ([(0, 7), (0, 7)], [(3, 8), (3, 8)])
    """
    windows = {}
    for i, r0 in enumerate(range(0, output_shape[0], chunks[0])):
        r1 = min(r0 + chunks[0], output_shape[0])
        for j, c0 in enumerate(range(0, output_shape[1], chunks[1])):
            c1 = min(c0 + chunks[1], output_shape[1])
            windows[i, j] = _source_window(matrix, (r0, r1, c0, c1), cube_shape, _WARP_PAD[order])
    return windows


def _warp_window(path, rows, cols, meta, matrix, shape, order, kernel):
    return kernel(_like(meta, read_window(path, rows, cols)), matrix, shape, order=order)


def _stitched(rows):
    """One cube from a grid of blocks (``rows`` of lists of 3-D arrays), bands whole in every block."""
    import dask.array as da

    return da.block([[[block] for block in row] for row in rows])


def _source_window(matrix, block, cube_shape, pad: int):
    """Rows and columns of the cube that the output block ``(r0, r1, c0, c1)`` reads, or None."""
    r0, r1, c0, c1 = block
    corners = np.array([[r0, c0, 1], [r0, c1 - 1, 1], [r1 - 1, c0, 1], [r1 - 1, c1 - 1, 1]], dtype=np.float64).T
    points = (np.asarray(matrix, dtype=np.float64) @ corners)[:2]
    window = []
    for axis in (0, 1):
        n = cube_shape[axis]
        low, high = points[axis].min(), points[axis].max()
        if high < -0.5 or low > n - 0.5:
            return None
        window.append((max(0, math.floor(low) - pad), min(n, math.ceil(high) + pad + 1)))
    return window


# --------------------------------------------------------------------------- gaps


def fill_gaps_chunked(values, gaps):
    """:func:`ggrad_gpu.core.coverage.fill_gaps` of a dask array: nearest-pixel indices on the host, gathered per chunk.

    ``gaps`` marks some pixels and leaves some (``fill_gaps`` checks it first).

    Examples
    --------
    >>> import dask.array as da
    >>> from ggrad_gpu.core.coverage import fill_gaps
    >>> values = np.random.default_rng(0).random((6, 6, 2)); gaps = np.zeros((6, 6), bool); gaps[:3, :3] = True
    >>> lazy = fill_gaps_chunked(da.from_array(values, chunks=(2, 2, 2)), gaps)
    >>> bool(np.array_equal(lazy.compute(), fill_gaps(values, gaps)))
    True
    """
    import dask
    import dask.array as da
    from scipy import ndimage

    gaps = np.asarray(gaps)
    nearest = ndimage.distance_transform_edt(gaps, return_distances=False, return_indices=True)
    rows = []
    for r0, r1 in _bounds(values.chunks[0]):
        row = []
        for c0, c1 in _bounds(values.chunks[1]):
            here = (slice(r0, r1), slice(c0, c1))
            if not gaps[here].any():
                row.append(values[here])
                continue
            source_rows, source_cols = nearest[0][here], nearest[1][here]
            w0, w1 = int(source_rows.min()), int(source_rows.max()) + 1
            v0, v1 = int(source_cols.min()), int(source_cols.max()) + 1
            task = dask.delayed(_gather, pure=True)(values[w0:w1, v0:v1], source_rows - w0, source_cols - v0)
            row.append(da.from_delayed(task, (r1 - r0, c1 - c0) + values.shape[2:], dtype=values.dtype,
                                       meta=values._meta))
        rows.append(row)
    return _stitched(rows)


def _gather(window, rows, cols):
    return window[_like(window, rows), _like(window, cols)]


def _like(array, index):
    """``index`` (host) in the array module of ``array``."""
    from .._backend import array_module

    return array_module(array=array).asarray(index)


def _bounds(chunks):
    """``(start, stop)`` of each chunk along an axis."""
    edges = np.cumsum((0,) + tuple(chunks))
    return list(zip(edges[:-1].tolist(), edges[1:].tolist()))


# --------------------------------------------------------------------------- pyramid


def blur_decimate_chunked(x, kernel):
    """:func:`ggrad_gpu.core.pyramid.blur_decimate` of a dask array, chunk by chunk with a halo.

    Chunks are made even along the spatial axes (so each starts on a kept
    pixel) and at least twice the halo; the halo at the array's edges
    reflects as SciPy's ``mode="reflect"`` does (``d c b a | a b c d``).
    ``kernel`` is the in-memory :func:`ggrad_gpu.core.pyramid.blur_decimate`.

    Examples
    --------
    >>> import dask.array as da
    >>> from ggrad_gpu.core.pyramid import blur_decimate
    >>> x = np.random.default_rng(0).random((40, 36, 2))
    >>> lazy = blur_decimate_chunked(da.from_array(x, chunks=(10, 10, 2)), blur_decimate)
    >>> lazy.shape, bool(np.allclose(lazy.compute(), blur_decimate(x)))
    ((20, 18, 2), True)
    """
    import dask.array as da

    path = stored_path(x)
    if path is not None and min(x.shape[:2]) >= 2 * _BLUR_HALO:
        return _blur_decimate_stored(x, path, kernel)
    x = x.rechunk({0: _even_chunks(x.chunks[0]), 1: _even_chunks(x.chunks[1])})
    halo = _BLUR_HALO
    depth = {0: halo, 1: halo} | {axis: 0 for axis in range(2, x.ndim)}
    boundary = {0: "reflect", 1: "reflect"} | {axis: "none" for axis in range(2, x.ndim)}
    padded = da.overlap.overlap(x, depth=depth, boundary=boundary, allow_rechunk=False)
    chunks = tuple(tuple(-(-c // 2) for c in x.chunks[axis]) for axis in (0, 1)) + x.chunks[2:]
    return padded.map_blocks(_blur_decimate_inner, kernel, halo // 2, chunks=chunks, dtype=x.dtype)


def _blur_decimate_stored(x, path, kernel):
    """:func:`blur_decimate_chunked` of a checkpoint on disk: each block reads its window with the halo from the store.

    Through dask's overlap, every block would load its eight neighbour
    chunks whole for a few rows of each, and the scheduler holds rows of them
    (a 4 GiB level took 2.4 GiB to decimate; its windows read from the store,
    0.9 GiB).
    """
    import dask
    import dask.array as da

    halo, rows = _BLUR_HALO, []
    for r0, r1 in _bounds(_even_chunks(x.chunks[0])):
        row = []
        for c0, c1 in _bounds(_even_chunks(x.chunks[1])):
            task = dask.delayed(_blur_decimate_window, pure=True)(path, (r0 - halo, r1 + halo), (c0 - halo, c1 + halo),
                                                                   x._meta, kernel)
            row.append(da.from_delayed(task, (-(-(r1 - r0) // 2), -(-(c1 - c0) // 2)) + x.shape[2:], dtype=x.dtype,
                                       meta=x._meta))
        rows.append(row)
    return da.block(rows) if x.ndim == 2 else _stitched(rows)


def _blur_decimate_window(path, rows, cols, meta, blur_decimate):
    trim = _BLUR_HALO // 2
    return blur_decimate(_like(meta, read_window(path, rows, cols)))[trim:-trim, trim:-trim]


def _blur_decimate_inner(block, blur_decimate, trim):
    return blur_decimate(block)[trim:-trim, trim:-trim]


def _even_chunks(chunks, minimum: int = 2 * _BLUR_HALO):
    """Chunk sizes along one axis: even, at least ``minimum``, the remainder merged into the last."""
    total = int(sum(chunks))
    size = max(minimum, int(max(chunks)) // 2 * 2)
    if total <= size:
        return (total,)
    sizes = [size] * (total // size)
    rest = total - size * len(sizes)
    if rest >= minimum:
        sizes.append(rest)
    else:
        sizes[-1] += rest
    return tuple(sizes)


# --------------------------------------------------------------------------- eq. 5


def level_gram_chunked(cube_level, target, mask=None, *, kernel):
    """:func:`ggrad_gpu.core.estimate.level_gram` of a dask level: per-chunk float64 sums, added in a tree.

    Each chunk's Sobel gradients see a one-pixel halo (reflected at the
    array's edges, as SciPy's ``mode="reflect"``), and only the chunk's own
    pixels enter its sums; the result equals the in-memory one up to the
    order of the float64 additions. ``kernel`` is the in-memory
    :func:`ggrad_gpu.core.estimate.level_gram`.

    Examples
    --------
    >>> import dask.array as da
    >>> from ggrad_gpu.core.estimate import level_gram
    >>> rng = np.random.default_rng(0)
    >>> cube, target = rng.random((12, 10, 3)), rng.random((12, 10))
    >>> gram, rhs = level_gram_chunked(da.from_array(cube, chunks=(5, 5, 3)), target, kernel=level_gram)
    >>> expected = level_gram(cube, target)
    >>> bool(np.allclose(gram, expected[0])), bool(np.allclose(rhs, expected[1]))
    (True, True)
    """
    import dask

    padded = _padded(cube_level, 1)
    target_padded = _padded(target, 1)
    parts = []
    for (r0, r1), (c0, c1) in _chunk_bounds(cube_level):
        here = (slice(r0, r1 + 2), slice(c0, c1 + 2))
        own = None if mask is None else mask[r0:r1, c0:c1]
        parts.append(dask.delayed(_gram_inner, pure=True, nout=2)(padded[here], target_padded[here], own, kernel))
    gram, rhs = dask.compute(_tree_sum([p[0] for p in parts]), _tree_sum([p[1] for p in parts]))
    return gram, rhs


def _gram_inner(block, target, mask, level_gram):
    """One chunk's sums: its Sobel over the block with its halo, its own pixels only."""
    from .._backend import array_module

    xp = array_module(block=block)
    own = xp.zeros(block.shape[:2], dtype=bool)
    own[1:-1, 1:-1] = True if mask is None else xp.asarray(mask)
    return level_gram(block, target, own)


def combine_bands_chunked(cube_level, x, *, kernel):
    """:func:`ggrad_gpu.core.estimate.combine_bands` of a dask level: computed, as a 2-D array of its chunks' kind.

    Examples
    --------
    >>> import dask.array as da
    >>> from ggrad_gpu.core.estimate import combine_bands
    >>> cube, x = np.random.default_rng(0).random((12, 10, 3)), np.array([1.0, 0.0, 0.5])
    >>> out = combine_bands_chunked(da.from_array(cube, chunks=(5, 5, 3)), x, kernel=combine_bands)
    >>> type(out).__name__, bool(np.allclose(out, combine_bands(cube, x)))
    ('ndarray', True)
    """
    import dask
    import dask.array as da

    padded = _padded(cube_level, 1)
    rows = []
    for (r0, r1), row in _rows_of_chunks(cube_level):
        blocks = []
        for c0, c1 in row:
            task = dask.delayed(_combine_inner, pure=True)(padded[r0:r1 + 2, c0:c1 + 2], x, kernel)
            blocks.append(da.from_delayed(task, (r1 - r0, c1 - c0), dtype=cube_level.dtype,
                                          meta=cube_level._meta.sum(axis=2)))
        rows.append(blocks)
    (out,) = dask.compute(da.block(rows))
    return out


def _combine_inner(block, x, combine_bands):
    return combine_bands(block, x)[1:-1, 1:-1]


def _padded(array, halo: int):
    """``array`` with a halo on the spatial axes reflected as SciPy's ``mode="reflect"`` (``d c b a | a b c d``).

    Lazy for a dask array (sliced per chunk), else padded in its own module.
    """
    pad = ((halo, halo), (halo, halo)) + ((0, 0),) * (array.ndim - 2)
    if is_dask_array(array):
        import dask.array as da

        return da.pad(array, pad, mode="symmetric")
    from .._backend import array_module

    return array_module(array=array).pad(array, pad, mode="symmetric")


def _chunk_bounds(cube):
    return [(rows, cols) for rows in _bounds(cube.chunks[0]) for cols in _bounds(cube.chunks[1])]


def _rows_of_chunks(cube):
    return [(rows, _bounds(cube.chunks[1])) for rows in _bounds(cube.chunks[0])]


def _tree_sum(parts):
    """The sum of delayed values, added pairwise (a tree: no task holds more than two partial sums)."""
    import dask

    while len(parts) > 1:
        pairs = [dask.delayed(np.add, pure=True)(a, b) for a, b in zip(parts[::2], parts[1::2])]
        parts = pairs + ([parts[-1]] if len(parts) % 2 else [])
    return parts[0]
