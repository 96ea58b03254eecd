"""Single-image representations of a cube: the baselines the paper compares against.

Each function maps a cube ``(rows, cols, bands)`` to one image ``(rows, cols)``
that an intensity-based registration can use in place of the global gradient:

- :func:`band_sum`, the sum over bands (paper eq. 2, Allouche et al.);
- :func:`band_std`, the per-pixel standard deviation over bands with
  ``ddof=1`` (paper eq. 3, Penaranda et al.);
- :func:`first_principal_component`, the score image of the first principal
  component of the pixels' spectra (Gowen et al. binarise it).

:data:`BASELINES` maps the names a ``method=`` option takes to the functions.
All three share the signature ``f(cube, *, mask=None) -> image`` and follow
their input (NumPy in, NumPy out; CuPy in, CuPy out). float64 input gives a
float64 image; anything else (float32, integers) gives float32. Sums are
accumulated in float64 either way.

Missing values
--------------
A non-finite value (NaN, or +-inf as left by a division by zero) is a missing
measurement; ``mask`` (boolean, ``(rows, cols)``, True where a pixel is used)
drops whole pixels. Outside ``mask`` every output is NaN. Inside it:

- ``band_sum`` sums the finite bands and rescales by ``bands / n_finite``, so a
  pixel that lacks a few bands stays on the scale of complete pixels (for a
  complete pixel the factor is exactly 1); NaN where no band is finite.
- ``band_std`` is the standard deviation of the finite bands (``ddof=1``); NaN
  where fewer than two bands are finite.
- ``first_principal_component`` uses only pixels that are finite in every band;
  any other pixel is left out of the mean and the covariance and scores NaN.

The cube is read in blocks of rows, so temporaries stay bounded (about 8 MiB a
block on the CPU, 256 MiB on a GPU) whatever the cube's size.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg

from .._backend import array_module, to_host
from .._memory import block_rows
from .._validation import check_array, float_dtype, power_of_two_scale
from .nnls import GramAccumulator, spurious_blas_flags_ignored

__all__ = ["BASELINES", "band_std", "band_sum", "first_principal_component"]

_CUBE_LAYOUT = "3-D (rows, cols, bands)"


def band_sum(cube, *, mask=None):
    """Sum over the bands of every pixel (paper eq. 2).

    Parameters
    ----------
    cube : array, shape (rows, cols, bands)
        NumPy or CuPy array.
    mask : bool array, shape (rows, cols), optional
        True where a pixel is used; pixels where it is False are NaN in the
        output. Same array module as ``cube``.

    Returns
    -------
    array, shape (rows, cols), same array module as ``cube``
        float32, or float64 for a float64 cube. Non-finite values are missing:
        the sum over the finite bands times ``bands / n_finite`` (see the
        module's notes), NaN where no band is finite.

    Notes
    -----
    After a per-pixel area normalisation (unit mean spectrum, common Raman
    preprocessing) the band sum is the same constant in every pixel and holds
    no spatial information at all.

    Examples
    --------
    >>> import numpy as np
    >>> from ggrad_gpu.synthetic import make_phantom
    >>> from ggrad_gpu.baselines import band_sum
    >>> cube = make_phantom(shape=(40, 48), bands=12, seed=0).cube
    >>> image = band_sum(cube)
    >>> image.shape, image.dtype
    ((8, 10), dtype('float32'))
    >>> bool(np.allclose(image, 12.0))  # area-normalised spectra: a flat image
    True
    """
    xp, dtype, mask = _prepare(cube, mask)
    bands = cube.shape[2]
    out = xp.empty(cube.shape[:2], dtype=dtype)
    for start, stop, block, valid in _blocks(cube, mask, dtype, xp):
        finite = _finite_values(block, valid, xp)
        total = xp.where(finite, block, 0).sum(axis=2, dtype=xp.float64)
        count = finite.sum(axis=2)
        # bands / count is exactly 1.0 for a complete pixel: its sum is untouched.
        scaled = total * (bands / xp.maximum(count, 1))
        out[start:stop] = xp.where(count > 0, scaled, xp.nan)
    return out


def band_std(cube, *, mask=None):
    """Standard deviation over the bands of every pixel, ``ddof=1`` (paper eq. 3).

    ``sqrt(sum_i (cube[..., i] - mean)**2 / (bands - 1))`` with ``mean`` the
    pixel's mean spectrum value, computed in two passes in float64.

    Parameters
    ----------
    cube : array, shape (rows, cols, bands)
        NumPy or CuPy array with at least 2 bands.
    mask : bool array, shape (rows, cols), optional
        True where a pixel is used; pixels where it is False are NaN in the
        output. Same array module as ``cube``.

    Returns
    -------
    array, shape (rows, cols), same array module as ``cube``
        float32, or float64 for a float64 cube. Non-finite values are missing:
        the standard deviation of the finite bands, NaN where fewer than two
        bands are finite.

    Raises
    ------
    ValueError
        If ``cube`` has a single band (``ddof=1`` needs two).

    Notes
    -----
    Penaranda et al. registered the complement of this image; the complement
    only flips the sign of its gradients, so this function returns the
    standard deviation itself.

    Examples
    --------
    >>> import numpy as np
    >>> from ggrad_gpu.synthetic import make_phantom
    >>> from ggrad_gpu.baselines import band_std
    >>> cube = make_phantom(shape=(40, 48), bands=12, seed=0).cube
    >>> image = band_std(cube)
    >>> image.shape, image.dtype
    ((8, 10), dtype('float32'))
    >>> bool(np.allclose(image, cube.std(axis=2, ddof=1), rtol=1e-5))
    True
    """
    xp, dtype, mask = _prepare(cube, mask)
    if cube.shape[2] < 2:
        raise ValueError(
            "cube must have at least 2 bands for a standard deviation with ddof=1; "
            f"got shape {tuple(cube.shape)}"
        )
    out = xp.empty(cube.shape[:2], dtype=dtype)
    for start, stop, block, valid in _blocks(cube, mask, dtype, xp):
        finite = _finite_values(block, valid, xp)
        count = finite.sum(axis=2)
        mean = xp.where(finite, block, 0).sum(axis=2, dtype=xp.float64) / xp.maximum(count, 1)
        deviation = xp.where(finite, block - mean[..., None], 0.0)
        xp.multiply(deviation, deviation, out=deviation)
        variance = deviation.sum(axis=2) / xp.maximum(count - 1, 1)
        out[start:stop] = xp.where(count > 1, xp.sqrt(variance), xp.nan)
    return out


def first_principal_component(cube, *, mask=None):
    """Score image of the first principal component of the pixels' spectra.

    The spectra of the valid pixels (finite in every band and inside
    ``mask``) are centred by their mean spectrum; the loading is the leading
    eigenvector of their ``(bands, bands)`` covariance, and every valid
    pixel's score is its centred spectrum's projection on it.

    Parameters
    ----------
    cube : array, shape (rows, cols, bands)
        NumPy or CuPy array.
    mask : bool array, shape (rows, cols), optional
        True where a pixel is used. Pixels where it is False are left out of
        the mean and the covariance and score NaN. Same array module as
        ``cube``.

    Returns
    -------
    array, shape (rows, cols), same array module as ``cube``
        float32, or float64 for a float64 cube; NaN outside ``mask`` and at
        pixels with a non-finite value in any band.

    Raises
    ------
    ValueError
        If fewer than 2 pixels are valid.

    Notes
    -----
    The covariance is accumulated over blocks of rows with
    :class:`ggrad_gpu.core.nnls.GramAccumulator` (products in the compute dtype,
    sums in float64, memory bounded by the block), then the leading
    eigenvector is found on the host in float64 (``scipy.linalg.eigh``).
    Rounding the float64 mean spectrum to float32 for centring is corrected
    exactly, in the covariance and in the scores.

    The sign of a principal component is arbitrary; here it is fixed so that
    the loading entry of largest magnitude is positive (the first such band
    on ties). A rule tied to the band sum would be undefined on
    area-normalised spectra, whose centred spectra all sum to zero.

    Examples
    --------
    >>> import numpy as np
    >>> from ggrad_gpu.synthetic import make_phantom
    >>> from ggrad_gpu.baselines import first_principal_component
    >>> cube = make_phantom(shape=(40, 48), bands=12, seed=0).cube
    >>> scores = first_principal_component(cube)
    >>> scores.shape, scores.dtype
    ((8, 10), dtype('float32'))
    >>> bool(abs(float(scores.mean())) < 1e-5)  # scores of centred spectra
    True
    """
    xp, dtype, mask = _prepare(cube, mask)
    bands = cube.shape[2]

    # Pass 1: the mean spectrum of the valid pixels, in float64.
    total = xp.zeros(bands, dtype=xp.float64)
    count = xp.zeros((), dtype=xp.int64)
    peak = xp.zeros((), dtype=dtype)
    for _, _, block, valid in _blocks(cube, mask, dtype, xp):
        valid = _valid_pixels(block, valid, xp)
        kept = xp.where(valid[..., None], block, 0)
        total += kept.sum(axis=(0, 1), dtype=xp.float64)
        peak = xp.maximum(peak, xp.abs(kept).max())
        count += valid.sum()
    pixels = int(count)
    if pixels < 2:
        raise ValueError(
            "cube must have at least 2 valid pixels (finite in every band and inside mask) "
            f"for a principal component; got {pixels} of {cube.shape[0] * cube.shape[1]}"
        )
    # Values far from 1 would overflow (or underflow) the products: work in a
    # power-of-two unit (exact), and scale the scores back.
    unit = power_of_two_scale(float(peak))
    mean = total / pixels * unit
    centre = mean.astype(dtype)

    # Pass 2: the Gram matrix of the spectra centred by ``centre``; invalid
    # pixels are rows of zeros. The target is 1 at valid pixels, so ``rhs`` is
    # the sum of the centred rows, which corrects for ``centre != mean``.
    acc = GramAccumulator(bands, xp, product_dtype=dtype)
    for _, _, block, valid in _blocks(cube, mask, dtype, xp):
        valid = _valid_pixels(block, valid, xp)
        block = block if unit == 1.0 else block * dtype.type(unit)
        acc.add(xp.where(valid[..., None], block - centre, 0), valid)
    gram, row_sum = to_host(acc.gram), to_host(acc.rhs)
    shift = to_host(mean) - to_host(centre).astype(np.float64)  # mean - centre
    scatter = gram - np.outer(shift, row_sum) - np.outer(row_sum, shift) + pixels * np.outer(shift, shift)
    loading = _leading_eigenvector(scatter / (pixels - 1))
    loading_dev = xp.asarray(loading.astype(dtype))
    # Centring by ``centre`` offsets every score by (mean - centre) . loading.
    offset = float(shift @ loading)

    # Pass 3: the scores.
    out = xp.empty(cube.shape[:2], dtype=dtype)
    for start, stop, block, valid in _blocks(cube, mask, dtype, xp):
        valid = _valid_pixels(block, valid, xp)
        block = block if unit == 1.0 else block * dtype.type(unit)
        with spurious_blas_flags_ignored():
            scores = xp.where(valid[..., None], block - centre, 0) @ loading_dev
        scores -= offset
        if unit != 1.0:
            scores /= dtype.type(unit)
        out[start:stop] = xp.where(valid, scores, xp.nan)
    return out


BASELINES = {
    "band_sum": band_sum,
    "band_std": band_std,
    "pca": first_principal_component,
}
"""The baselines by the name a ``method=`` option takes: ``f(cube, *, mask=None) -> image``."""


def _prepare(cube, mask):
    """Check ``cube`` and ``mask``; return the array module, compute dtype and mask."""
    check_array(cube, "cube", (3,), _CUBE_LAYOUT)
    xp = array_module(cube=cube, mask=mask)
    if mask is not None:
        check_array(mask, "mask", (2,), "2-D (rows, cols)")
        if mask.dtype != np.bool_:
            raise TypeError(
                f"mask must be a boolean array (True where a pixel is used); got dtype {mask.dtype}"
            )
        if tuple(mask.shape) != tuple(cube.shape[:2]):
            raise ValueError(
                f"mask must have shape (rows, cols) = {tuple(cube.shape[:2])} to match cube; "
                f"got shape {tuple(mask.shape)}"
            )
    return xp, float_dtype(cube.dtype), mask


def _block_rows(shape, itemsize, xp) -> int:
    """Rows of the cube read at once (a function so that tests can shrink it)."""
    return block_rows(shape, itemsize, xp)


def _blocks(cube, mask, dtype, xp):
    """Yield ``(start, stop, block, valid)``: rows of ``cube`` in ``dtype`` and of ``mask``."""
    rows = _block_rows(cube.shape, max(dtype.itemsize, 8), xp)
    for start in range(0, cube.shape[0], rows):
        stop = min(start + rows, cube.shape[0])
        block = cube[start:stop].astype(dtype, copy=False)
        yield start, stop, block, None if mask is None else mask[start:stop]


def _finite_values(block, valid, xp):
    """Values of ``block`` (rows, cols, bands) that are finite and at a pixel inside ``valid``."""
    finite = xp.isfinite(block)
    if valid is not None:
        finite &= valid[..., None]
    return finite


def _valid_pixels(block, valid, xp):
    """Pixels of ``block`` finite in every band (and inside ``valid``)."""
    finite = xp.isfinite(block).all(axis=2)
    return finite if valid is None else finite & valid


def _leading_eigenvector(covariance: np.ndarray) -> np.ndarray:
    """Unit eigenvector of the largest eigenvalue, largest-magnitude entry positive."""
    bands = covariance.shape[0]
    _, vectors = scipy.linalg.eigh(covariance, subset_by_index=[bands - 1, bands - 1])
    vector = vectors[:, 0]
    if vector[np.argmax(np.abs(vector))] < 0:
        vector = -vector
    return vector
