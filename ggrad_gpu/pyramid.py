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

from ._backend import array_module, ndimage_module
from ._memory import retry_smaller
from ._validation import check_array, check_levels, float_dtype
from .chunked import blur_decimate_chunked, is_dask_array

__all__ = ["blur_decimate", "gaussian_pyramid", "upsample_level"]

STAGE = "Gaussian pyramid"

_SIGMA = 1.0
_RADIUS = 4  # int(truncate * sigma + 0.5) with SciPy's default truncate=4.0


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


def blur_decimate(x, *, rows: int = 4):
    """One pyramid step: ``gaussian_filter(x, 1, axes=(0, 1))[::2, ::2]``.

    Parameters
    ----------
    x : array, shape (rows, cols[, bands]), floating
    rows : int, default 4
        Output rows per block (bounds the temporaries).

    Notes
    -----
    Each decimating blur along an axis is a banded matrix ``D`` (output x
    input, the reflected edges folded in) applied to the array flattened
    behind that axis: a small matrix product per block of rows, which BLAS
    (or cuBLAS) runs at memory speed on all cores, computing only the rows
    and columns that are kept. The column pass treats each output row,
    ``(cols, bands)`` and contiguous, the same way, so nothing is transposed.
    """
    if is_dask_array(x):
        return blur_decimate_chunked(x)
    xp = array_module(x=x)
    weights = _gaussian_weights(np.float64)
    n_rows, n_cols = x.shape[:2]
    tail = x.shape[2:]
    out_rows, out_cols = (n_rows + 1) // 2, (n_cols + 1) // 2
    out = xp.empty((out_rows, out_cols) + tail, dtype=x.dtype)
    flat = x.reshape(n_rows, -1)
    row_pass = _BandedDecimation(weights, n_rows, x.dtype, xp)
    col_pass = _BandedDecimation(weights, n_cols, x.dtype, xp)

    def block(start, size):
        stop = min(start + size, out_rows)
        half = row_pass.apply(flat, start, stop)  # (stop - start, n_cols * bands)
        # Each row of the block, (cols, bands) contiguous, is decimated along its first axis.
        for offset, row in enumerate(half.reshape((stop - start, n_cols, -1))):
            col_pass.apply(row, 0, out_cols, out=out[start + offset].reshape(out_cols, -1))
        return stop

    # A block that runs out of memory is redone with half the rows (BLAS may
    # then round a few values differently: the rows per product change).
    start = 0
    while start < out_rows:
        start, rows = retry_smaller(functools.partial(block, start), rows, stage=STAGE, unit="rows")
    return out


class _BandedDecimation:
    """``y[i] = sum_t w[t] * x[reflect(2 i + t - R)]`` along axis 0, as banded matrix products."""

    def __init__(self, weights, length: int, dtype, xp, block: int = 16):
        self.weights, self.length, self.dtype, self.xp, self.block = weights, length, dtype, xp, block
        self._cache = {}

    def apply(self, x2d, start: int, stop: int, out=None):
        """Output rows ``start:stop`` of the decimated ``x2d`` (length x columns)."""
        if out is None:
            out = self.xp.empty((stop - start, x2d.shape[1]), dtype=self.dtype)
        for first in range(start, stop, self.block):
            last = min(first + self.block, stop)
            matrix, lo, hi = self._matrix(first, last)
            self.xp.matmul(matrix, x2d[lo:hi], out=out[first - start : last - start])
        return out

    def _matrix(self, first: int, last: int):
        """The band of ``D`` for outputs ``first:last`` and the input rows ``lo:hi`` it reads.

        Interior bands are shift-invariant, so one matrix (one transfer to the
        device) serves them all; the reflected edge bands are cached as well.
        """
        radius = len(self.weights) // 2
        lo, hi = 2 * first - radius, 2 * (last - 1) + radius + 1
        interior = lo >= 0 and hi <= self.length
        key = ("interior", last - first) if interior else (first, last)
        if key not in self._cache:
            index = np.arange(lo, hi) % (2 * self.length)
            index = np.where(index >= self.length, 2 * self.length - 1 - index, index)
            offset = int(index.min())
            matrix = np.zeros((last - first, int(index.max()) + 1 - offset))
            for i in range(last - first):
                for t, w in enumerate(self.weights):
                    matrix[i, index[2 * i + t] - offset] += w
            self._cache[key] = (self.xp.asarray(matrix.astype(self.dtype)), offset)
        matrix, offset = self._cache[key]
        start = lo if interior else offset
        return matrix, start, start + matrix.shape[1]


def upsample_level(image, level: int, shape):
    """Bicubic upsampling of pyramid level ``level`` to the level-0 grid ``shape``.

    Evaluates the level's cubic spline at ``p / 2**level`` for every level-0
    pixel ``p`` (``map_coordinates``, ``order=3``, ``mode="nearest"``), which
    keeps every level aligned with level 0.

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
    """
    check_array(image, "image", (2,), "2-D (rows, cols)")
    xp = array_module(image=image)
    if level == 0 and tuple(shape) == image.shape:
        return image.copy()  # a cubic spline interpolates its samples exactly
    ndi = ndimage_module(xp)
    factor = 0.5**level
    rows = xp.arange(shape[0], dtype=xp.float64) * factor
    cols = xp.arange(shape[1], dtype=xp.float64) * factor
    coords = xp.stack(xp.meshgrid(rows, cols, indexing="ij"))
    return ndi.map_coordinates(image, coords, order=3, mode="nearest").astype(image.dtype, copy=False)
