"""Per-pixel intensity normalisation for the estimates: each spectrum divided by its total.

A gain common to every band of a pixel (laser power, focus, sample thickness,
detector live time, X-ray yield) draws its edges into every band's Sobel
magnitude, and eq. 5's non-negative weights cannot cancel them: they stay in
the global gradient as edges the guide does not have, and bias the
registration. Count cubes show it most: the default phantom as Poisson counts
(240 x 280 guide, 60 x 70 x 60 cube) with its smooth gain left in refined to
a mean TRE of 0.55-0.89 px noise-free and 1.2-1.4 px at 50 counts per pixel,
against 0.06-0.10 px and 0.62-0.90 px with each denoised spectrum divided by
its total (the paper's maps were normalised before registration, section 5.1).
Where the totals are themselves contrast the guide shares (phases of unequal
X-ray yield), dividing them out loses it: ``refine`` keeps the normalised
spectra only where they explain the guide clearly better
(:func:`ggrad_gpu.refinement.basins.chosen_intensity`).

Only where every spectrum has a clear positive total: centred data (SNV,
baseline-corrected maps of a blank substrate) and sparse counts (a few per
pixel) have totals near zero, and dividing by those amplifies noise.
:func:`intensity_scale` returns None for them, and the cube is used as it is.
Only the estimates read the normalised cube; ``registered`` is resampled from
the cube as given.
"""

from __future__ import annotations

import numpy as np

from .._backend import array_module, to_host
from .._lazy.chunked import is_dask_array
from .._validation import float_dtype

__all__ = ["EQUAL_TOTALS", "MIN_TOTAL_SHARE", "intensity_scale", "normalised"]

# A spectrum's total must be at least this share of the median total at the 1st percentile of the
# pixels with data, or the cube is not normalised (4 counts per pixel in 100: 1st percentile 0.125
# of the median at 8 counts per pixel, 0.35 at 50; the real P45 hypermap 0.54, Renishaw maps 0.79-0.85).
MIN_TOTAL_SHARE = 0.2
# Totals within this share of their median are equal already (a cube normalised by area).
EQUAL_TOTALS = 1e-3
# Pixels at the 1st percentile are what the rule reads: a few dead or empty pixels do not decide.
LOW_PERCENTILE = 1.0


def intensity_scale(cube, with_data=None, *, totals=None):
    """The factor that brings each pixel's spectrum total to the median total, or None.

    Parameters
    ----------
    cube : array, shape (rows, cols, bands)
        NumPy, CuPy or dask; NaN at missing values (left out of the totals).
    with_data : array of bool, shape (rows, cols), optional
        Pixels with data (None: all); the others get factor 1.
    totals : array, shape (rows, cols), optional
        The totals themselves, where they cost less another way (a lazy
        projection's: :meth:`ggrad_gpu.core.denoise.Subspace.totals`);
        ``cube`` is then not read.

    Returns
    -------
    array, shape (rows, cols), or None
        ``median / total`` per pixel, in the cube's array module (computed,
        for a dask cube); None where the 1st percentile of the totals is under
        :data:`MIN_TOTAL_SHARE` of their median (or the median is not
        positive), and where every total is within :data:`EQUAL_TOTALS` of
        the median (normalised already).

    Examples
    --------
    >>> gain = np.array([[1.0, 2.0], [0.5, 1.0]])
    >>> cube = gain[:, :, None] * np.array([1.0, 3.0])  # one spectrum at four gains
    >>> intensity_scale(cube).tolist()
    [[1.0, 0.5], [2.0, 1.0]]
    >>> cube[0, 0] = 0.0  # a pixel without counts: totals are not clearly positive
    >>> intensity_scale(cube) is None
    True
    """
    if totals is not None:
        totals = totals.compute() if is_dask_array(totals) else totals  # one read of what they come from
        xp = array_module(totals=totals)
    elif is_dask_array(cube):
        import dask.array as da

        totals = da.nansum(cube, axis=2, dtype=np.float64).compute()  # one read of the cube
        xp = array_module(totals=totals)
    else:
        xp = array_module(cube=cube)
        totals = xp.nansum(cube, axis=2, dtype=xp.float64)
    valid = xp.isfinite(totals) if with_data is None else (xp.asarray(with_data) & xp.isfinite(totals))
    sample = to_host(totals)[to_host(valid)]  # on the host: one copy of a 2-D map, no device index array
    if sample.size == 0:
        return None
    median = float(np.median(sample))
    if not median > 0 or float(np.percentile(sample, LOW_PERCENTILE)) < MIN_TOTAL_SHARE * median:
        return None
    if float(np.abs(sample / median - 1).max()) <= EQUAL_TOTALS:  # already normalised: nothing to do
        return None
    safe = xp.where(valid, totals, median)
    return (median / safe).astype(np.float64)


def normalised(cube, scale):
    """``cube`` with each pixel's spectrum multiplied by ``scale`` (from :func:`intensity_scale`).

    A new array (lazy for a dask cube) in the cube's float dtype (float32
    for integer counts).

    Examples
    --------
    >>> cube = np.ones((1, 2, 3)); cube[0, 1] = 2.0
    >>> normalised(cube, intensity_scale(cube))[0].tolist()
    [[1.5, 1.5, 1.5], [1.5, 1.5, 1.5]]
    >>> cube.tolist()[0][1]  # a copy: the cube is unchanged
    [2.0, 2.0, 2.0]
    """
    dtype = float_dtype(cube.dtype)  # integer counts become floats
    if is_dask_array(cube):
        return cube.map_blocks(_scaled_block, np.asarray(to_host(scale)), dtype=dtype)
    return cube.astype(dtype, copy=False) * scale.astype(dtype)[:, :, None]


def _scaled_block(block, scale, block_info=None):
    """A dask block of the cube times its rows' and columns' part of the host ``scale``."""
    (row0, row1), (col0, col1), _ = block_info[0]["array-location"]
    xp = array_module(block=block)
    dtype = float_dtype(block.dtype)
    return block.astype(dtype, copy=False) * xp.asarray(scale[row0:row1, col0:col1, None], dtype=dtype)
