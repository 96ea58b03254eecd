"""The fused mosaic: tiles resampled onto one grid and blended, chunk by chunk, into Zarr.

The *mosaic grid* is aligned with the guide: the guide block-averaged by
``k = max(1, round(median r))`` over the tiles (``r`` guide pixels per tile
pixel), over the tiles' footprints rounded out to whole blocks; pixel ``m``
sits at guide coordinate ``mosaic_to_guide @ m`` (DESIGN "Mosaics"). Each
output chunk reads only the tiles whose footprint reaches it, resamples
each with :func:`ggrad_gpu.warp_cube` and blends them as a weighted mean:
a tile's weight at a point is its distance to the nearest edge of its
footprint in tile pixels (``-0.5 .. size - 0.5``), so it falls linearly to 0
at the edge; a band missing (NaN) in one tile leaves the others' values.
NaN where no tile reaches.

:func:`fuse_mosaic` writes ``mosaic.zarr`` (one Zarr v3 array, bands last,
chunks of ``chunk x chunk x bands``) resumably: its attributes hold a
fingerprint of the inputs and ``complete``, set last
(:class:`ggrad_gpu.io.resumable.ResumableArray`: each chunk marked done once
written); a rerun with the same fingerprint writes only the chunks not
marked and ends bitwise identical to an uninterrupted run; a store with
another fingerprint is refused without ``force``. Chunks are Dask tasks
(:mod:`ggrad_gpu.scaleout.tasks`).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.geometry import affine_coordinates, footprint_box, pixels_per_cube_pixel
from ..core.warp import warp_cube
from .tasks import run_tasks

__all__ = ["CHUNK", "MosaicGrid", "feather_weights", "chunk_count", "fuse_chunk", "fuse_mosaic", "mosaic_array",
           "inputs_fingerprint",
           "mosaic_grid", "tiles_reaching", "write_chunk", "write_ome_zarr"]

# Rows and columns of an output chunk (all bands): about 256 x 256 (DESIGN).
CHUNK = 256


@dataclass(frozen=True)
class MosaicGrid:
    """The mosaic's pixel grid on the guide.

    Attributes
    ----------
    factor : int
        ``k``: guide pixels per mosaic pixel along each axis.
    to_guide : numpy.ndarray, shape (3, 3)
        ``mosaic_to_guide``: mosaic pixel to guide coordinate,
        ``[[k, 0, r0 + (k-1)/2], [0, k, c0 + (k-1)/2], [0, 0, 1]]``.
    shape : (int, int)
        Mosaic pixels (rows, cols).

    Examples
    --------
    >>> tiles = [np.full((8, 8, 2), 1.0), np.full((8, 8, 2), 3.0)]
    >>> matrices = [np.eye(3), np.array([[1.0, 0, 0], [0, 1, -6], [0, 0, 1]])]  # the second 6 columns on
    >>> grid = mosaic_grid([t.shape for t in tiles], matrices)
    >>> grid.factor, grid.shape
    (1, (8, 14))
    >>> grid.record(bands=2)["shape"]
    [8, 14, 2]
    """

    factor: int
    to_guide: np.ndarray
    shape: tuple

    def record(self, bands: int) -> dict:
        """``tiles.json``'s ``"mosaic"`` entry."""
        return {"grid_factor": self.factor, "mosaic_to_guide": self.to_guide.tolist(),
                "shape": [self.shape[0], self.shape[1], int(bands)]}


def mosaic_grid(tile_shapes, matrices, guide_shape=None) -> MosaicGrid:
    """The mosaic grid over the tiles' footprints (clipped to ``guide_shape`` when given).

    Blocks of ``k x k`` guide pixels, block ``j`` starting at guide pixel
    ``j * k`` on each axis, from the first to the last whose centre lies
    inside the union of the footprints' bounding boxes.

    Examples
    --------
    >>> import numpy as np
    >>> from ggrad_gpu.scaleout.fusion import mosaic_grid
    >>> tile = np.array([[0.25, 0, -4.375], [0, 0.25, -10.375], [0, 0, 1]])  # 4 guide px per tile px
    >>> grid = mosaic_grid([(8, 8, 3)], [tile])
    >>> grid.factor, grid.shape, grid.to_guide[:2, 2].tolist()
    (4, (8, 8), [17.5, 41.5])
    """
    if len(tile_shapes) == 0:
        raise ValueError("tile_shapes must hold at least one tile; got none")
    factor = max(1, int(round(float(np.median([pixels_per_cube_pixel(m) for m in matrices])))))
    boxes = [footprint_box(shape[:2], m) for shape, m in zip(tile_shapes, matrices)]
    low = np.min([b[0] for b in boxes], axis=0)
    high = np.max([b[1] for b in boxes], axis=0)
    # Whole blocks of k guide pixels (block j starts at guide pixel j * k) whose
    # centre lies inside the footprints' edges: a centre on an edge has weight 0.
    centre = (factor - 1) / 2
    start = (np.floor((low - centre) / factor).astype(int) + 1) * factor
    stop = np.ceil((high - centre) / factor).astype(int) * factor
    if guide_shape is not None:
        start = np.maximum(start, 0)
        stop = np.minimum(stop, (np.asarray(guide_shape[:2]) // factor) * factor)
    if (stop <= start).any():
        raise ValueError("matrices place every tile outside the guide")
    shape = tuple(int(n) for n in (stop - start) // factor)
    to_guide = np.array([[factor, 0, start[0] + (factor - 1) / 2], [0, factor, start[1] + (factor - 1) / 2],
                         [0, 0, 1.0]])
    return MosaicGrid(factor, to_guide, shape)


def feather_weights(matrix, tile_shape, output_shape) -> np.ndarray:
    """Blending weights of a tile on an output grid: distance to its footprint's edge, tile pixels.

    ``matrix`` maps the output grid to the tile; 0 at and beyond the edge
    (``-0.5`` and ``size - 0.5`` on each axis), rising by 1 per tile pixel
    inwards. Shape ``output_shape``, float64.

    Examples
    --------
    >>> import numpy as np
    >>> from ggrad_gpu.scaleout.fusion import feather_weights
    >>> feather_weights(np.eye(3), (3, 4), (3, 5))
    array([[0.5, 0.5, 0.5, 0.5, 0. ],
           [0.5, 1.5, 1.5, 0.5, 0. ],
           [0.5, 0.5, 0.5, 0.5, 0. ]])
    """
    q_rows, q_cols = affine_coordinates(matrix, output_shape, np)
    h, w = tile_shape[0] - 0.5, tile_shape[1] - 0.5
    edge = np.minimum(np.minimum(q_rows + 0.5, h - q_rows), np.minimum(q_cols + 0.5, w - q_cols))
    return np.clip(edge, 0.0, None)


def tiles_reaching(tile_shapes, matrices, grid: MosaicGrid, rows, cols) -> list:
    """Indices of the tiles whose footprint reaches the mosaic window ``rows x cols`` (two ranges).

    Examples
    --------
    >>> tiles = [np.full((8, 8, 2), 1.0), np.full((8, 8, 2), 3.0)]
    >>> matrices = [np.eye(3), np.array([[1.0, 0, 0], [0, 1, -6], [0, 0, 1]])]
    >>> grid = mosaic_grid([t.shape for t in tiles], matrices)
    >>> shapes = [t.shape for t in tiles]
    >>> [tiles_reaching(shapes, matrices, grid, (0, 8), cols) for cols in [(0, 4), (4, 10), (10, 14)]]
    [[0], [0, 1], [1]]
    """
    reaching = []
    for i, (shape, matrix) in enumerate(zip(tile_shapes, matrices)):
        low, high = footprint_box(shape[:2], np.asarray(matrix) @ grid.to_guide)
        if low[0] < rows[1] and high[0] > rows[0] - 1 and low[1] < cols[1] and high[1] > cols[0] - 1:
            reaching.append(i)
    return reaching


def fuse_chunk(tiles, matrices, grid: MosaicGrid, rows, cols) -> np.ndarray:
    """The blended mosaic over the window ``rows = (start, stop)``, ``cols = (start, stop)``.

    Parameters
    ----------
    tiles : sequence of array-like, each (tile_rows, tile_cols, bands)
        The tiles that may reach the window (others only cost a check).
    matrices : sequence of array_like, shape (3, 3)
        Guide to tile, one per tile.
    grid : MosaicGrid

    Returns
    -------
    numpy.ndarray, shape (rows, cols, bands), float32
        The feather-weighted mean of the tiles' values (float32 sums, in the
        tiles' order, each tile resampled only over the part of the window
        its footprint reaches); NaN where no tile has a value.

    Examples
    --------
    >>> tiles = [np.full((8, 8, 2), 1.0), np.full((8, 8, 2), 3.0)]
    >>> matrices = [np.eye(3), np.array([[1.0, 0, 0], [0, 1, -6], [0, 0, 1]])]  # overlap: columns 6 and 7
    >>> grid = mosaic_grid([t.shape for t in tiles], matrices)
    >>> fused = fuse_chunk(tiles, matrices, grid, (0, 8), (0, 14))
    >>> fused.shape, fused.dtype
    ((8, 14, 2), dtype('float32'))
    >>> fused[4, :, 0].tolist()  # column 6: weights 1.5 and 0.5, (1.5 * 1 + 0.5 * 3) / 2; column 7 the reverse
    [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.5, 2.5, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0]
    """
    shape = (rows[1] - rows[0], cols[1] - cols[0])
    window = grid.to_guide @ np.array([[1.0, 0, rows[0]], [0, 1, cols[0]], [0, 0, 1]])
    total = weight = None
    for i in tiles_reaching([t.shape for t in tiles], matrices, grid, rows, cols):
        to_tile = np.asarray(matrices[i], dtype=np.float64) @ window
        cube = np.asarray(tiles[i])
        # Only the part of the window the tile's footprint reaches is resampled.
        low, high = footprint_box(cube.shape[:2], to_tile)
        r0, c0 = (max(0, int(np.floor(v))) for v in low)
        r1, c1 = min(shape[0], int(np.ceil(high[0])) + 1), min(shape[1], int(np.ceil(high[1])) + 1)
        if r1 <= r0 or c1 <= c0:
            continue
        part = to_tile @ np.array([[1.0, 0, r0], [0, 1, c0], [0, 0, 1]])
        values = warp_cube(cube, part, (r1 - r0, c1 - c0))
        feather = feather_weights(part, cube.shape, (r1 - r0, c1 - c0)).astype(np.float32)
        if total is None:
            total = np.zeros(shape + (cube.shape[2],), dtype=np.float32)
            weight = np.zeros(shape, dtype=np.float32)
        # A tile without NaN is NaN only beyond its footprint, where its weight
        # is 0: its weight is one per pixel, the same in every band. A tile
        # with gaps weighs each band where it has a value, so from then on
        # the weights are per band (summed in the same order: the same bits).
        gaps = bool(np.isnan(cube.min()))
        if gaps and weight.ndim == 2:
            weight = np.repeat(weight[:, :, None], cube.shape[2], axis=2)
        np.multiply(values, feather[:, :, None], out=values)
        if gaps:
            present = ~np.isnan(values)
            values[~present] = 0
            weight[r0:r1, c0:c1] += present * feather[:, :, None]
        else:
            values[feather == 0] = 0  # NaN beyond the footprint, times 0
            weight[r0:r1, c0:c1] += feather if weight.ndim == 2 else feather[:, :, None]
        total[r0:r1, c0:c1] += values
    if total is None:
        bands = np.asarray(tiles[0]).shape[2] if len(tiles) else 0
        return np.full(shape + (bands,), np.nan, dtype=np.float32)
    with np.errstate(invalid="ignore"):  # 0 / 0 where no tile has a value: NaN
        return np.divide(total, weight if weight.ndim == 3 else weight[:, :, None], out=total)


def mosaic_array(tiles, matrices, grid: MosaicGrid, *, chunk: int = CHUNK):
    """The fused mosaic as a lazy ``dask.array`` (one :func:`fuse_chunk` per block), float32.

    Each block reads only the tiles that reach it; ``compute()`` it for a
    small mosaic, or let :func:`fuse_mosaic` write it.

    Examples
    --------
    >>> tiles = [np.full((8, 8, 2), 1.0), np.full((8, 8, 2), 3.0)]
    >>> matrices = [np.eye(3), np.array([[1.0, 0, 0], [0, 1, -6], [0, 0, 1]])]
    >>> grid = mosaic_grid([t.shape for t in tiles], matrices)
    >>> lazy = mosaic_array(tiles, matrices, grid, chunk=5)
    >>> lazy.chunks
    ((5, 3), (5, 5, 4), (2,))
    >>> bool(np.array_equal(lazy.compute(), fuse_chunk(tiles, matrices, grid, (0, 8), (0, 14))))
    True
    """
    import dask.array as da

    bands = _bands(tiles)
    chunks = (_splits(grid.shape[0], chunk), _splits(grid.shape[1], chunk), (bands,))

    def block(block_info=None):
        (r0, r1), (c0, c1), _ = block_info[None]["array-location"]
        return fuse_chunk(tiles, matrices, grid, (r0, r1), (c0, c1))

    return da.map_blocks(block, chunks=chunks, dtype=np.float32, meta=np.empty((0, 0, 0), np.float32))


def inputs_fingerprint(tiles, matrices, grid: MosaicGrid, *, chunk: int = CHUNK, extra=None) -> str:
    """A digest of what the mosaic is made of: the tiles' values, the matrices, the grid, ``extra``.

    The tiles' values enter as a digest each; the rest as :func:`ggrad_gpu.io.fingerprint` takes it.

    Examples
    --------
    >>> tiles = [np.full((8, 8, 2), 1.0), np.full((8, 8, 2), 3.0)]
    >>> matrices = [np.eye(3), np.array([[1.0, 0, 0], [0, 1, -6], [0, 0, 1]])]
    >>> grid = mosaic_grid([t.shape for t in tiles], matrices)
    >>> stamp = inputs_fingerprint(tiles, matrices, grid)
    >>> len(stamp), stamp == inputs_fingerprint([t.copy() for t in tiles], matrices, grid)
    (64, True)
    >>> tiles[1][0, 0, 0] = 4.0  # one value changed: another mosaic
    >>> stamp == inputs_fingerprint(tiles, matrices, grid)
    False
    """
    from ..io.resumable import fingerprint

    return fingerprint(matrices=np.round(np.asarray(matrices, dtype=np.float64), 12).tolist(),
                       grid=grid.record(_bands(tiles)), chunk=chunk, extra=extra,
                       tiles=[_values_digest(tile) for tile in tiles])  # one tile in memory at a time


def _values_digest(tile) -> list:
    values = np.ascontiguousarray(np.asarray(tile))
    return [list(values.shape), str(values.dtype), hashlib.blake2b(values.data, digest_size=16).hexdigest()]


def fuse_mosaic(path, tiles, matrices, grid: MosaicGrid, *, chunk: int = CHUNK, band_centres=None,
                fingerprint=None, force: bool = False, client=None, max_in_flight=None, progress=None) -> Path:
    """Write the fused mosaic to the Zarr v3 array ``path``, resumably (see the module's docstring).

    Parameters
    ----------
    path : path-like
        The store (e.g. ``OUTDIR/mosaic.zarr``).
    tiles : sequence of array-like, each (tile_rows, tile_cols, bands)
        The tiles to blend (leave failed ones out); read with
        :func:`numpy.asarray` by each chunk's task that they reach.
    matrices : sequence of array_like, shape (3, 3)
        Guide to tile, one per tile.
    grid : MosaicGrid
    chunk : int, default ``CHUNK``
    band_centres : array_like, optional
        Written to the attributes (``None`` where unknown).
    fingerprint : str, optional
        Identifies the inputs and settings; default :func:`inputs_fingerprint`
        (which reads every tile once).
    force : bool
        Replace a store written from other inputs.
    client, max_in_flight
        As in :func:`ggrad_gpu.scaleout.tasks.run_tasks`.
    progress : callable, optional
        Called with ``(done, total)`` chunks as each chunk is written.

    Returns
    -------
    pathlib.Path

    Raises
    ------
    FileExistsError
        If ``path`` holds something else (another fingerprint, not a Zarr
        array) and ``force`` is False.

    Examples
    --------
    >>> import tempfile, zarr
    >>> tiles = [np.full((8, 8, 2), 1.0), np.full((8, 8, 2), 3.0)]
    >>> matrices = [np.eye(3), np.array([[1.0, 0, 0], [0, 1, -6], [0, 0, 1]])]
    >>> grid = mosaic_grid([t.shape for t in tiles], matrices)
    >>> folder = tempfile.TemporaryDirectory()
    >>> path = fuse_mosaic(Path(folder.name) / "mosaic.zarr", tiles, matrices, grid, chunk=5)
    >>> store = zarr.open_array(str(path), mode="r")
    >>> store.shape, store.attrs["complete"], store.attrs["grid_factor"]
    ((8, 14, 2), True, 1)
    >>> bool(np.array_equal(store[:], fuse_chunk(tiles, matrices, grid, (0, 8), (0, 14))))
    True
    >>> folder.cleanup()
    """
    from ..io.resumable import ResumableArray

    path = Path(path)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive integer; got {chunk!r}")
    bands = _bands(tiles)
    stamp = inputs_fingerprint(tiles, matrices, grid, chunk=chunk) if fingerprint is None else str(fingerprint)
    centres = None if band_centres is None else [float(v) for v in band_centres]
    store = ResumableArray.open(path, shape=grid.shape + (bands,), chunks=(chunk, chunk, bands), dtype="float32",
                                fingerprint=stamp, force=force,
                                attributes={"mosaic_to_guide": grid.to_guide.tolist(), "band_centres": centres,
                                            "grid_factor": grid.factor})
    arguments = []
    for index in store.pending():
        rows, cols, _ = store.region(index)
        rows, cols = (rows.start, rows.stop), (cols.start, cols.stop)
        reaching = tiles_reaching([t.shape for t in tiles], matrices, grid, rows, cols)
        arguments.append((str(path), index, [tiles[i] for i in reaching], [np.asarray(matrices[i]) for i in reaching],
                          grid, rows, cols, bands))
    done = [0]

    def count(position, result):
        done[0] += 1
        if progress is not None:
            progress(done[0], len(arguments))

    run_tasks(write_chunk, arguments, client=client, max_in_flight=max_in_flight, on_done=count)
    if not store.complete:
        store.finish()  # complete: true, last
    return path


def write_chunk(path, index, tiles, matrices, grid: MosaicGrid, rows, cols, bands) -> tuple:
    """Fuse one chunk and write it into the resumable store at ``path``; a task of :func:`fuse_mosaic`.

    Examples
    --------
    >>> import tempfile
    >>> from ggrad_gpu.io.resumable import ResumableArray
    >>> tiles = [np.full((8, 8, 2), 1.0), np.full((8, 8, 2), 3.0)]
    >>> matrices = [np.eye(3), np.array([[1.0, 0, 0], [0, 1, -6], [0, 0, 1]])]
    >>> grid = mosaic_grid([t.shape for t in tiles], matrices)
    >>> folder = tempfile.TemporaryDirectory()
    >>> path = Path(folder.name) / "mosaic.zarr"
    >>> store = ResumableArray.open(path, shape=(8, 14, 2), chunks=(5, 5, 2), dtype="float32", fingerprint="demo")
    >>> write_chunk(path, (0, 1, 0), tiles, matrices, grid, (0, 5), (5, 10), 2)
    (0, 1, 0)
    >>> len(store.pending()), store.array[4, 5:10, 0].tolist()  # 5 chunks left; this one written
    (5, [1.0, 1.5, 2.5, 3.0, 3.0])
    >>> folder.cleanup()
    """
    import zarr

    from ..io.resumable import ResumableArray

    values = fuse_chunk(tiles, matrices, grid, rows, cols) if tiles else \
        np.full((rows[1] - rows[0], cols[1] - cols[0], bands), np.nan, dtype=np.float32)
    ResumableArray(Path(path), zarr.open_array(str(path), mode="r+")).write(index, values)
    return index


def write_ome_zarr(mosaic_path, path, *, overwrite: bool = False) -> Path:
    """Write a complete ``mosaic.zarr`` again as OME-Zarr (NGFF 0.5, ``(c, y, x)``), for napari.

    All or nothing (:func:`ggrad_gpu.io.atomic_write`); a pyramid halving
    ``y`` and ``x`` down to about 256 pixels, written with ``ome-zarr`` from the
    store chunk by chunk (``dask.array``). The group's attributes also hold
    ``mosaic_to_guide`` and ``band_centres``.

    Raises
    ------
    ValueError
        If ``mosaic_path`` is not complete.
    FileExistsError
        If ``path`` exists and ``overwrite`` is False.

    Examples
    --------
    >>> import tempfile, zarr
    >>> tiles = [np.full((8, 8, 2), 1.0), np.full((8, 8, 2), 3.0)]
    >>> matrices = [np.eye(3), np.array([[1.0, 0, 0], [0, 1, -6], [0, 0, 1]])]
    >>> grid = mosaic_grid([t.shape for t in tiles], matrices)
    >>> folder = tempfile.TemporaryDirectory()
    >>> mosaic = fuse_mosaic(Path(folder.name) / "mosaic.zarr", tiles, matrices, grid, chunk=5)
    >>> path = write_ome_zarr(mosaic, Path(folder.name) / "mosaic.ome.zarr")
    >>> group = zarr.open_group(str(path), mode="r")
    >>> [axis["name"] for axis in group.attrs["ome"]["multiscales"][0]["axes"]]
    ['c', 'y', 'x']
    >>> bool(np.array_equal(group["s0"][:], np.moveaxis(zarr.open_array(str(mosaic))[:], 2, 0)))
    True
    >>> folder.cleanup()
    """
    import dask.array as da
    import zarr
    from ome_zarr.writer import write_image

    from ..io import atomic_write

    source = zarr.open_array(str(mosaic_path), mode="r")
    if source.attrs.get("complete") is not True:
        raise ValueError(f"mosaic_path {mosaic_path} is not complete; finish it first")
    image = da.from_zarr(source).transpose(2, 0, 1)
    factors, size = [], max(source.shape[:2])
    while size / 2 ** (len(factors) + 1) >= 256:
        factors.append(2 ** (len(factors) + 1))
    with atomic_write(path, overwrite=overwrite) as temporary:
        group = zarr.open_group(str(temporary), mode="w")
        write_image(image, group, axes="cyx", scale_factors=tuple(factors),
                    storage_options={"chunks": (source.shape[2],) + tuple(source.chunks[:2])})
        group.attrs.update({"ggrad_gpu": {key: source.attrs.get(key) for key in ("mosaic_to_guide", "band_centres")}})
    return Path(path)


def _bands(tiles) -> int:
    counts = {int(t.shape[2]) for t in tiles}
    if len(counts) != 1:
        raise ValueError(f"tiles must all have the same number of bands; got {sorted(counts)}")
    return counts.pop()


def _splits(size: int, chunk: int) -> tuple:
    return tuple(min(chunk, size - start) for start in range(0, size, chunk)) or (0,)


def chunk_count(grid: MosaicGrid, chunk: int = CHUNK) -> int:
    """Chunks of the store: ``ceil(rows / chunk) * ceil(cols / chunk)``.

    Examples
    --------
    >>> chunk_count(MosaicGrid(1, np.eye(3), (8, 14)), chunk=5)  # ceil(8 / 5) * ceil(14 / 5)
    6
    """
    return math.ceil(grid.shape[0] / chunk) * math.ceil(grid.shape[1] / chunk)
