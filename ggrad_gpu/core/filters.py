"""Sobel gradient magnitude of an image or of every band of a cube at once.

The numbers are ``scipy.ndimage``'s: ``hypot(sobel(x, axis=0), sobel(x, axis=1))``
with kernels ``[-1, 0, 1]`` x ``[1, 2, 1]`` (unnormalised) and ``mode="reflect"``,
applied on the two spatial axes only. ``ndimage.sobel(cube, axis=0)`` on a 3-D
array would also smooth across the band axis; here each band sees itself alone.

The work runs over blocks of rows, as slices of the band-last array, so each
elementwise pass streams contiguous spectra and temporaries stay small. A
block that runs out of memory is redone with half the rows
(:func:`ggrad_gpu._memory.retry_smaller`); every pixel's value is computed
the same way whatever the block, so the results do not change.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import numpy as np

from .._backend import array_module
from .._memory import block_rows, retry_smaller
from .._validation import check_array, float_dtype
from .factored import is_factored
from .nnls import spurious_blas_flags_ignored

__all__ = ["iter_sobel_blocks", "sobel_block_rows", "sobel_magnitude"]

STAGE = "Sobel gradients"


def sobel_magnitude(image_or_cube):
    """Sobel gradient magnitude on the spatial axes.

    Parameters
    ----------
    image_or_cube : array, shape (rows, cols) or (rows, cols, bands)
        NumPy or CuPy array. A cube is filtered band by band in one vectorised
        pass: no smoothing across bands.

    Returns
    -------
    array, same shape and array module as the input
        ``hypot(sobel(x, axis=0), sobel(x, axis=1))`` per band; float32 for
        float32 (and float16, integer, boolean or byte-swapped float32)
        input, float64 for float64. Images as small as 1 x 1 are fine (the
        reflected edges give 0 along an axis of one pixel). NaN and inf
        propagate to the pixels whose 3 x 3 neighbourhood holds them.
        Magnitudes are computed as ``sqrt(a*a + b*b)``, so float32
        gradients beyond about 1e18 overflow to inf and below about 1e-19
        round to 0 (float64: 1e153 and 1e-154).

    Raises
    ------
    ValueError, TypeError
        Naming ``image_or_cube``: not a NumPy or CuPy array, not 2-D or 3-D,
        complex or non-numeric, or empty.

    Examples
    --------
    >>> import numpy as np
    >>> from ggrad_gpu import sobel_magnitude
    >>> step = np.zeros((5, 6), np.float32); step[:, 3:] = 1
    >>> sobel_magnitude(step)[2]
    array([0., 0., 4., 4., 0., 0.], dtype=float32)
    """
    check_array(image_or_cube, "image_or_cube", (2, 3), "2-D (rows, cols) or 3-D (rows, cols, bands)")
    xp = array_module(image_or_cube=image_or_cube)
    dtype = float_dtype(image_or_cube.dtype)
    out = xp.empty(image_or_cube.shape, dtype=dtype)
    workspace, rows = retry_smaller(
        lambda rows: _Workspace(rows, image_or_cube.shape[1], image_or_cube.shape[2:], dtype, xp),
        _cache_rows(image_or_cube.shape, dtype, xp),
        stage=STAGE,
        unit="rows",
    )
    # NaN and inf propagate (inf - inf is NaN), and huge values overflow to
    # inf, as documented: no warning for either.
    with np.errstate(invalid="ignore", over="ignore"):
        _sobel_rows(workspace, image_or_cube, 0, image_or_cube.shape[0], None, out, rows)
    return out


def _cache_rows(shape, dtype, xp) -> int:
    """Rows per filter pass: about 512 KiB on the CPU, 256 MiB on a GPU.

    A pass's four buffers then stay within a core's L2 cache: its four
    element-wise passes ran at 1.6 G values/s on 512 KiB arrays and 0.6 on
    2 MiB ones (one core of the 2-core VM, 2 MiB of L2 each); a mosaic tile,
    2.22-2.30 -> 2.08-2.09 CPU s (``benchmarks.mosaic_tile``).
    """
    return block_rows(shape, dtype.itemsize, xp, target_bytes=(512 << 10) if xp is np else None)


def sobel_block_rows(shape, dtype, xp) -> int:
    """Rows per block of :func:`iter_sobel_blocks`: about 32 MiB on the CPU, 256 MiB on a GPU.

    Examples
    --------
    >>> import numpy as np
    >>> sobel_block_rows((4096, 1024, 4), np.dtype(np.float32), np)  # 32 MiB / 16 KiB per row
    2048
    >>> sobel_block_rows((100, 1024, 4), np.dtype(np.float32), np)  # never more than the rows
    100
    """
    return block_rows(shape, dtype.itemsize, xp, target_bytes=(32 << 20) if xp is np else None)


def _sobel_rows(workspace, x, start, stop, bands, out, step) -> int:
    """Sobel of rows ``start:stop`` of ``x`` into ``out``, ``step`` rows per pass.

    A pass that runs out of memory is redone with half the rows. Returns the
    rows per pass that worked, for the next call.
    """

    def one_pass(sub, rows):
        end = min(sub + rows, stop)
        workspace.sobel(x, sub, end, bands, out=out[sub - start : end - start])
        return end

    sub = start
    while sub < stop:
        sub, step = retry_smaller(functools.partial(one_pass, sub), step, stage=STAGE, unit="rows",
                                  xp=workspace.xp)
    return step


def iter_sobel_blocks(x, *, rows: int | None = None, bands=None) -> Iterator[tuple[int, int, object]]:
    """Yield ``(start, stop, magnitude)`` for consecutive blocks of rows of ``x``.

    ``magnitude`` is the Sobel magnitude of rows ``start:stop`` of ``x`` (2-D or
    band-last 3-D), computed from those rows and one neighbour row on each side.
    Callers that reduce the gradients right away (the Gram accumulation) never
    hold the whole gradient cube.

    Parameters
    ----------
    x : array, shape (rows, cols[, bands])
    rows : int, optional
        Rows per yielded block; by default about 32 MiB of output on the CPU
        and 256 MiB on a GPU. Inside a block, the filter runs over sub-blocks
        of about 512 KiB, small enough for the CPU's cache.
    bands : sequence of int, optional
        Only these bands of a cube (selected block by block, so no copy of the
        selected bands is ever made whole).

    Notes
    -----
    The yielded array is a buffer that the next block overwrites: use it (or
    copy it) before advancing the iterator.

    Examples
    --------
    >>> import numpy as np
    >>> cube = np.random.default_rng(0).random((10, 6, 3))
    >>> blocks = [(start, stop, magnitude.copy()) for start, stop, magnitude in iter_sobel_blocks(cube, rows=4)]
    >>> [(start, stop) for start, stop, _ in blocks]
    [(0, 4), (4, 8), (8, 10)]
    >>> whole = np.concatenate([magnitude for *_, magnitude in blocks])
    >>> bool(np.allclose(whole, sobel_magnitude(cube)))
    True
    """
    factored = is_factored(x)
    xp = array_module(x=x.coefficients if factored else x)
    dtype = float_dtype(x.dtype)
    n_rows = x.shape[0]
    if factored:
        if bands is not None:
            x, bands = x.bands(bands), None  # the basis's columns: no band of the cube is made
        x = x.astype(dtype, copy=False)
    elif bands is not None:
        bands = xp.asarray(bands)  # once, not per block
    tail = x.shape[2:] if bands is None else (len(bands),)
    shape = (n_rows, x.shape[1]) + tail
    if rows is None:
        rows = sobel_block_rows(shape, dtype, xp)
    rows = min(rows, n_rows)

    def allocate(rows):
        # Where the buffers do not fit, blocks get fewer rows (and the caller sees that).
        step = min(rows, _cache_rows(shape, dtype, xp))
        kind = _FactoredWorkspace if factored else _Workspace
        workspace = kind(step, x.shape[1], tail, dtype, xp)
        return workspace, xp.empty((rows, x.shape[1]) + tail, dtype=dtype), step

    (workspace, buffer, step), rows = retry_smaller(allocate, rows, stage=STAGE, unit="rows")
    for start in range(0, n_rows, rows):
        stop = min(start + rows, n_rows)
        step = _sobel_rows(workspace, x, start, stop, bands, buffer, step)
        yield start, stop, buffer[: stop - start]


class _Workspace:
    """Buffers for one block, allocated once and reused by every block.

    Reuse matters on the CPU: fresh multi-megabyte temporaries per block cost
    page faults that add up to a sizeable share of the whole pass.
    """

    def __init__(self, rows, cols, tail, dtype, xp):
        self.xp = xp
        self.padded = xp.empty((rows + 2, cols + 2) + tail, dtype=dtype)
        self.scratch = xp.empty((rows, cols + 2) + tail, dtype=dtype)
        self.grad_rows = xp.empty((rows, cols) + tail, dtype=dtype)
        self.grad_cols = xp.empty((rows, cols) + tail, dtype=dtype)

    def sobel(self, x, start, stop, bands, out):
        """Write the Sobel magnitude of rows ``start:stop`` (and ``bands``) into ``out``."""
        grad_rows, grad_cols = self.gradients(x, start, stop, bands)
        _magnitude(grad_rows, grad_cols, out, self.xp)

    def gradients(self, x, start, stop, bands):
        """The two Sobel derivatives of rows ``start:stop`` (and ``bands``): views of the buffers."""
        n = stop - start
        padded = self._pad(x, start, stop, bands)
        scratch, grad_rows, grad_cols = self.scratch[:n], self.grad_rows[:n], self.grad_cols[:n]
        xp = self.xp
        # Derivative along rows, smoothed along columns: ndimage.sobel(axis=0).
        xp.subtract(padded[2:], padded[:-2], out=scratch)
        xp.add(scratch[:, :-2], scratch[:, 2:], out=grad_rows)
        grad_rows += scratch[:, 1:-1]
        grad_rows += scratch[:, 1:-1]
        # Smoothed along rows, derivative along columns: ndimage.sobel(axis=1).
        xp.add(padded[:-2], padded[2:], out=scratch)
        scratch += padded[1:-1]
        scratch += padded[1:-1]
        xp.subtract(scratch[:, 2:], scratch[:, :-2], out=grad_cols)
        return grad_rows, grad_cols

    def _pad(self, x, start, stop, bands):
        """Rows ``start:stop`` (and ``bands``) with a one-pixel halo on both axes.

        The halo holds the neighbouring rows where they exist and, at the
        image edges, the edge pixel repeated, which is ``mode="reflect"`` for
        a one-pixel halo. One copy, with the cast.
        """
        n_rows = x.shape[0]
        lo, hi = max(start - 1, 0), min(stop + 1, n_rows)
        slab = x[lo:hi] if bands is None else x[lo:hi][..., bands]
        padded = self.padded[: stop - start + 2]
        padded[lo - start + 1 : hi - start + 1, 1:-1] = slab
        if start == 0:
            padded[0, 1:-1] = padded[1, 1:-1]
        if stop == n_rows:
            padded[-1, 1:-1] = padded[-2, 1:-1]
        padded[:, 0] = padded[:, 1]
        padded[:, -1] = padded[:, -2]
        return padded


class _FactoredWorkspace:
    """Buffers for one block of a :class:`ggrad_gpu.core.factored.FactoredCube`.

    The derivatives are linear in each band, so they are taken of the
    coefficient images (a few) and brought to the bands by one product with
    the basis each; only the magnitude runs over every band.
    """

    def __init__(self, rows, cols, tail, dtype, xp):
        self.xp = xp
        self.rows, self.cols, self.dtype = rows, cols, dtype
        self.coefficients = None  # made for the first cube it sees (its rank)
        self.grad_rows = xp.empty((rows * cols,) + tail, dtype=dtype)
        self.grad_cols = xp.empty((rows * cols,) + tail, dtype=dtype)

    def sobel(self, x, start, stop, bands, out):
        """Write the Sobel magnitude of rows ``start:stop`` of the factored ``x`` into ``out``."""
        if self.coefficients is None:
            self.coefficients = _Workspace(self.rows, self.cols, (x.rank,), self.dtype, self.xp)
        pixels = (stop - start) * self.cols
        grad_rows, grad_cols = self.grad_rows[:pixels], self.grad_cols[:pixels]
        rows, cols = self.coefficients.gradients(x.coefficients, start, stop, None)
        xp = self.xp
        with spurious_blas_flags_ignored():
            xp.matmul(rows.reshape(pixels, -1), x.basis, out=grad_rows)
            xp.matmul(cols.reshape(pixels, -1), x.basis, out=grad_cols)
        _magnitude(grad_rows, grad_cols, out.reshape(grad_rows.shape), xp)


def _magnitude(grad_rows, grad_cols, out, xp) -> None:
    """``sqrt(a*a + b*b)`` into ``out``, the two derivatives used as scratch.

    libm's hypot is several times slower on the CPU, and the magnitudes here
    are far from float overflow.
    """
    grad_rows *= grad_rows
    grad_cols *= grad_cols
    grad_rows += grad_cols
    xp.sqrt(grad_rows, out=out)
