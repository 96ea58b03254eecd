"""Gaussian pyramids of images and cubes, and bicubic upsampling of a level.

A level is the previous one blurred with a Gaussian of sigma 1 on the spatial
axes (``scipy.ndimage.gaussian_filter``'s kernel: radius 4, ``mode="reflect"``)
and decimated by ``[::2, ::2]``, so level-k pixel ``i`` sits at level-0
coordinate ``2**k * i``. Only the kept rows and columns are computed, one block
of output rows at a time, so a cube's blur never materialises a full-size
temporary and never mixes bands. A block that runs out of memory is redone
with half the rows (:func:`ggrad_gpu._memory.retry_smaller`).
"""

from __future__ import annotations

import functools

import numpy as np

from .._backend import array_module, ndimage_module
from .._lazy.chunked import blur_decimate_chunked, is_dask_array
from .._memory import block_rows, default_block_bytes, retry_smaller
from .._validation import check_array, check_levels, float_dtype

__all__ = ["blur_decimate", "gaussian_pyramid", "upsample_level"]

STAGE = "Gaussian pyramid"

_SIGMA = 1.0
_RADIUS = 4  # int(truncate * sigma + 0.5) with SciPy's default truncate=4.0
_SPLINE_PAD = 12  # SciPy's edge padding before a mode="nearest" spline prefilter


def _gaussian_weights(dtype) -> np.ndarray:
    offsets = np.arange(-_RADIUS, _RADIUS + 1, dtype=np.float64)
    weights = np.exp(-0.5 * (offsets / _SIGMA) ** 2)
    return (weights / weights.sum()).astype(dtype)


def gaussian_pyramid(image_or_cube, levels: int) -> list:
    """Gaussian pyramid on the spatial axes, all bands at once.

    Parameters
    ----------
    image_or_cube : array, shape (rows, cols) or (rows, cols, bands)
        NumPy or CuPy array.
    levels : int
        Number of levels, level 0 included; the coarsest must stay at least
        3 x 3 pixels (the error for too many says how many fit).

    Returns
    -------
    list of arrays
        ``levels`` arrays in the input's array module, float32 for float32,
        float16, integer, boolean or byte-swapped float32 input, float64 for
        float64. Level 0 is the input itself when it already has that
        dtype (not a copy). Level ``k`` has shape
        ``(ceil(rows / 2**k), ceil(cols / 2**k)[, bands])``.

    Examples
    --------
    >>> import numpy as np
    >>> from ggrad_gpu import gaussian_pyramid
    >>> [level.shape for level in gaussian_pyramid(np.ones((40, 30, 5)), 3)]
    [(40, 30, 5), (20, 15, 5), (10, 8, 5)]
    """
    check_array(image_or_cube, "image_or_cube", (2, 3), "2-D (rows, cols) or 3-D (rows, cols, bands)")
    levels = check_levels(levels, image_or_cube.shape, image="image_or_cube")
    pyramid = [image_or_cube.astype(float_dtype(image_or_cube.dtype), copy=False)]
    for _ in range(1, levels):
        pyramid.append(blur_decimate(pyramid[-1]))
    return pyramid


def blur_decimate(x, *, rows: int | None = None):
    """One pyramid step: ``gaussian_filter(x, 1, axes=(0, 1))[::2, ::2]``.

    Parameters
    ----------
    x : array, shape (rows, cols[, bands]), floating
    rows : int, optional
        Output rows per block (bounds the temporaries); by default as many as
        keep one block of the row pass's output near a quarter of the block
        budget (:func:`ggrad_gpu._memory.block_rows`), so an image within it
        (on a GPU, 64 MiB) is one block whatever its size.

    Notes
    -----
    Each decimating blur along an axis is a banded matrix ``D`` (output x
    input, the reflected edges folded in). Its interior is one small matrix
    (4 outputs from 15 inputs for rows, 16 from 39 for columns) applied to
    overlapping windows of the input, strided twice its outputs apart, in one
    batched matrix product; the reflected edges are two more small products.
    So each pass is a few products per block however many rows or columns
    the block has (a few launches on a GPU, not one per 16 rows), computing
    only the rows and columns that are kept. The column pass treats the
    block's ``(rows, cols, bands)`` the same way along its middle axis, so
    nothing is transposed. On the CPU each product is split into tiles of
    columns small enough for one BLAS thread, which makes the result
    independent of the thread count.

    Examples
    --------
    >>> import numpy as np
    >>> from ggrad_gpu.core.pyramid import blur_decimate
    >>> blur_decimate(np.ones((9, 6, 2), np.float32)).shape
    (5, 3, 2)
    """
    if is_dask_array(x):
        return blur_decimate_chunked(x, blur_decimate)
    xp = array_module(x=x)
    n_rows, n_cols = x.shape[:2]
    tail = x.shape[2:]
    out_rows, out_cols = (n_rows + 1) // 2, (n_cols + 1) // 2
    out = xp.empty((out_rows, out_cols) + tail, dtype=x.dtype)
    if rows is None:
        # The block's row-pass output (and, on a GPU, the copied windows) a
        # quarter of the budget: 2 MiB on the CPU, cache-sized.
        rows = block_rows((out_rows, n_cols) + tail, x.dtype.itemsize, xp, target_bytes=default_block_bytes(xp) // 4)
        if rows < out_rows:
            # Whole windows of the interior product per block: no edge products inside.
            rows = max(COLUMN_CHUNK, rows // COLUMN_CHUNK * COLUMN_CHUNK)
    flat = x.reshape(1, n_rows, -1)
    weights = _gaussian_weights(np.float64)
    row_pass = _BandedDecimation(weights, n_rows, x.dtype, xp, ROW_CHUNK)
    col_pass = _BandedDecimation(weights, n_cols, x.dtype, xp, COLUMN_CHUNK)
    out3 = out.reshape(out_rows, out_cols, -1)

    def block(start, size):
        stop = min(start + size, out_rows)
        half = row_pass.apply(flat, start, stop)  # (1, stop - start, n_cols * bands)
        col_pass.apply(half.reshape(stop - start, n_cols, -1), 0, out_cols, out=out3[start:stop])
        return stop

    # A block that runs out of memory is redone with half the rows (BLAS may
    # then round a few values differently: the products change shape).
    start = 0
    while start < out_rows:
        start, rows = retry_smaller(functools.partial(block, start), rows, stage=STAGE, unit="rows", xp=xp)
    return out


class _BandedDecimation:
    """``y[i] = sum_t w[t] * x[reflect(2 i + t - R)]`` along axis 1 of an (L, length, C) array."""

    def __init__(self, weights, length: int, dtype, xp, chunk: int):
        self.weights, self.length, self.dtype, self.xp = weights, length, dtype, xp
        self.chunk = chunk  # outputs per window of the batched interior product
        self.radius = len(weights) // 2
        self._cache = {}

    def apply(self, x3, start: int, stop: int, out=None):
        """Outputs ``start:stop`` along axis 1 of ``x3`` (L, length, C), as (L, stop - start, C)."""
        xp = self.xp
        if out is None:
            out = xp.empty((x3.shape[0], stop - start, x3.shape[2]), dtype=self.dtype)
        # Interior outputs read no reflected input: 2 i - R >= 0 and 2 i + R <= length - 1.
        first = min(max(start, -(-self.radius // 2)), stop)
        count = max(0, min(stop, (self.length - 1 - self.radius) // 2 + 1) - first) // self.chunk
        last = first + count * self.chunk
        for lo, hi in ((start, first), (last, stop)):  # the edges (and the interior's remainder)
            if hi > lo:
                matrix, begin = self._edge_matrix(lo, hi)
                self._product(matrix, x3[:, begin : begin + matrix.shape[1]], out[:, lo - start : hi - start])
        if count:
            windows = self._windows(x3, 2 * first - self.radius, count)
            target = out[:, first - start : last - start].reshape(x3.shape[0], count, self.chunk, x3.shape[2])
            self._product(self._interior_matrix(), windows, target)
        return out

    def _product(self, matrix, source, out):
        """``out = matrix @ source`` over the last two axes; on the CPU in tiles of columns.

        Each tile's product stays below OpenBLAS's threading threshold (M N K
        of :data:`SINGLE_THREAD_MNK`), so it runs on one thread: the results do
        not depend on the thread count or the machine's load, bit for bit. On
        a GPU, one product over all columns.
        """
        xp = self.xp
        columns = source.shape[-1]
        tile = 1 << max(6, (SINGLE_THREAD_MNK // (matrix.shape[0] * matrix.shape[1])).bit_length() - 1)
        full = columns // tile * tile if xp is np else 0
        if full:
            xp.matmul(matrix, _tiles(source[..., :full], tile, xp), out=_tiles(out[..., :full], tile, xp))
        if full < columns:
            xp.matmul(matrix, source[..., full:], out=out[..., full:])

    def _windows(self, x3, begin: int, count: int):
        """``count`` overlapping windows of the interior matrix's height, ``2 * chunk`` inputs apart."""
        width = 2 * (self.chunk - 1) + len(self.weights)
        s0, s1, s2 = x3.strides
        view = x3[:, begin:]
        shape = (x3.shape[0], count, width, x3.shape[2])
        return self.xp.lib.stride_tricks.as_strided(view, shape=shape, strides=(s0, 2 * self.chunk * s1, s1, s2))

    def _interior_matrix(self):
        if "interior" not in self._cache:
            width = 2 * (self.chunk - 1) + len(self.weights)
            matrix = np.zeros((self.chunk, width))
            for i in range(self.chunk):
                matrix[i, 2 * i : 2 * i + len(self.weights)] = self.weights
            self._cache["interior"] = self.xp.asarray(matrix.astype(self.dtype))
        return self._cache["interior"]

    def _edge_matrix(self, first: int, last: int):
        """The rows of ``D`` for outputs ``first:last`` and the first input row they read."""
        key = (first, last)
        if key not in self._cache:
            lo, hi = 2 * first - self.radius, 2 * (last - 1) + self.radius + 1
            index = np.arange(lo, hi) % (2 * self.length)
            index = np.where(index >= self.length, 2 * self.length - 1 - index, index)
            offset = int(index.min())
            matrix = np.zeros((last - first, int(index.max()) + 1 - offset))
            for i in range(last - first):
                for t, w in enumerate(self.weights):
                    matrix[i, index[2 * i + t] - offset] += w
            self._cache[key] = (self.xp.asarray(matrix.astype(self.dtype)), offset)
        return self._cache[key]


# Outputs per window of the interior products: 4 rows (15 inputs: little more
# than the 9 taps per output) in the row pass, whose products are long; 16
# columns (39 inputs) in the column pass, whose products are as long as a row's bands.
ROW_CHUNK, COLUMN_CHUNK = 4, 16
# OpenBLAS runs a product of M x K times K x N on one thread below M N K = 65536 x 4.
SINGLE_THREAD_MNK = 65536 * 4


def _tiles(x, tile, xp):
    """``x`` (..., K, C) as (..., C / tile, K, tile): a view, for one batched product over the tiles."""
    *batch, k, columns = x.shape
    *batch_strides, row, column = x.strides
    return xp.lib.stride_tricks.as_strided(x, shape=(*batch, columns // tile, k, tile),
                                           strides=(*batch_strides, tile * column, row, column))


def upsample_level(image, level: int, shape):
    """Bicubic upsampling of pyramid level ``level`` to the level-0 grid ``shape``.

    Evaluates the level's cubic spline at ``p / 2**level`` for every level-0
    pixel ``p`` (``map_coordinates``, ``order=3``, ``mode="nearest"``), which
    keeps every level aligned with level 0. The spline is evaluated as two
    1-D passes (rows, then columns; the pixels of one phase ``p mod 2**level``
    share their weights), with ``map_coordinates``' weights and float64 sums.

    Parameters
    ----------
    image : array, shape (rows_k, cols_k)
    level : int
        The pyramid level ``image`` comes from (level 0 at its own shape
        returns a copy).
    shape : tuple of int
        ``(rows, cols)`` of level 0.

    Returns
    -------
    array, shape ``shape``, in the input's array module and dtype.

    Examples
    --------
    >>> import numpy as np
    >>> from ggrad_gpu import gaussian_pyramid, upsample_level
    >>> coarse = gaussian_pyramid(np.ones((40, 30)), 3)[2]
    >>> up = upsample_level(coarse, 2, (40, 30))
    >>> up.shape, bool(np.allclose(up, 1.0))
    ((40, 30), True)
    """
    check_array(image, "image", (2,), "2-D (rows, cols)")
    xp = array_module(image=image)
    if level == 0 and tuple(shape) == image.shape:
        return image.copy()  # a cubic spline interpolates its samples exactly
    ndi = ndimage_module(xp)
    # The prefilter of map_coordinates(mode="nearest"), done once: the image
    # padded by its edge values, then filtered in float64 (what SciPy and
    # cupyx do inside map_coordinates); the coordinates shift by the pad.
    coefficients = ndi.spline_filter(xp.pad(image, _SPLINE_PAD, mode="edge"), 3, output=xp.float64, mode="nearest")
    separable = _taps_inside(coefficients.shape, level, shape)
    factor = 0.5**level
    cols = xp.arange(shape[1], dtype=xp.float64) * factor + _SPLINE_PAD
    out = xp.empty(tuple(shape), dtype=image.dtype)

    def block(start, size):
        stop = min(start + size, shape[0])
        if separable:
            _separable_spline(coefficients, level, start, stop, out[start:stop], xp)
            return stop
        # The (2, rows, cols) float64 coordinates of a block of rows only.
        rows = xp.arange(start, stop, dtype=xp.float64) * factor + _SPLINE_PAD
        coords = xp.stack(xp.meshgrid(rows, cols, indexing="ij"))
        out[start:stop] = ndi.map_coordinates(coefficients, coords, order=3, mode="nearest", prefilter=False)
        return stop

    rows = block_rows((shape[0], shape[1], 3), 8, xp)  # coordinates (or the row pass) and result, float64
    start = 0
    while start < shape[0]:
        start, rows = retry_smaller(functools.partial(block, start), rows, stage="upsampling", unit="rows", xp=xp)
    return out


def _taps_inside(padded_shape, level: int, shape) -> bool:
    """Whether every level-0 pixel's four spline taps per axis lie inside the padded coefficients.

    Pixel ``p`` reads coefficients ``floor(p / 2**level) + pad - 1`` to ``+ 2``
    (SciPy's taps for a cubic spline); beyond them ``map_coordinates``
    clamps the coordinate, which the separable path does not copy.
    """
    return all((size - 1 >> level) + _SPLINE_PAD + 2 < padded for size, padded in zip(shape, padded_shape))


def _cubic_weights(t: float) -> tuple:
    """The cubic B-spline's weights of the taps ``floor - 1`` to ``floor + 2`` at fraction ``t``, in float64."""
    return ((1 - t) ** 3 / 6, (4 - 6 * t * t + 3 * t**3) / 6, (1 + 3 * t + 3 * t * t - 3 * t**3) / 6, t**3 / 6)


def _separable_spline(coefficients, level: int, start: int, stop: int, out, xp) -> None:
    """Rows ``start:stop`` of ``map_coordinates(coefficients, p / 2**level + pad, order=3, prefilter=False)``.

    The tensor-product spline is evaluated along rows, then along columns,
    in float64 as ``map_coordinates`` does (the sums differ from its order in
    the last bits of float64 only: the float32 results matched bit for bit
    on random levels). Level-0 pixels ``p = 2**level * m + phase`` share
    their weights, so each phase is four shifted slices per axis: a few
    whole-block operations however many pixels, instead of sixteen taps
    gathered per pixel.
    """
    factor = 1 << level
    cols = out.shape[1]
    half = xp.empty((stop - start, coefficients.shape[1]), dtype=xp.float64)
    for phase in range(factor):
        first_row = start + (phase - start) % factor
        count = len(range(first_row, stop, factor))
        if count == 0:
            continue
        weights = _cubic_weights(phase / factor)
        target = half[first_row - start :: factor]
        base = (first_row >> level) + _SPLINE_PAD - 1
        xp.multiply(coefficients[base : base + count], weights[0], out=target)
        for tap in range(1, 4):
            target += coefficients[base + tap : base + tap + count] * weights[tap]
    for phase in range(min(factor, cols)):
        count = len(range(phase, cols, factor))
        weights = _cubic_weights(phase / factor)
        base = _SPLINE_PAD - 1
        total = half[:, base : base + count] * weights[0]
        for tap in range(1, 4):
            total += half[:, base + tap : base + tap + count] * weights[tap]
        out[:, phase::factor] = total
