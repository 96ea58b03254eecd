"""Global gradient estimation (paper eqs. 4-9).

For every pyramid level ``k`` the cube's per-band Sobel magnitudes are fitted to
the guide's by non-negative least squares (eq. 5), from Gram matrices
accumulated block by block while the gradients are computed, so the gradient
cube is never held whole. The per-level images are upsampled to the guide grid
and combined with level weights ``alpha`` and ``beta`` (eqs. 6-9).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from .._backend import array_module, to_host
from .._lazy.chunked import checkpoint, combine_bands_chunked, is_dask_array, level_gram_chunked, release_checkpoints
from .._memory import retry_smaller
from .._validation import all_finite, check_array, check_levels, check_mask, float_dtype, power_of_two_scale
from .coverage import Coverage, NoDataError, excluded_levels, fill_gaps, valid_pixels
from .factored import FactoredCube, imagewise, is_factored
from .filters import iter_sobel_blocks, sobel_block_rows, sobel_magnitude
from .level_weights import level_weights_matrix, manual_level_weights, solve_level_weights
from .nnls import GramAccumulator, nnls_gram, rounding_ridge, spurious_blas_flags_ignored
from .pyramid import blur_decimate, gaussian_pyramid, upsample_level

__all__ = ["GlobalGradient", "estimate_global_gradient"]


@dataclass(frozen=True)
class GlobalGradient:
    """Result of :func:`estimate_global_gradient`.

    Attributes
    ----------
    grad_x : array, shape (rows, cols)
        Guide gradient image, ``sum_k alpha_k gradP_k`` (eq. 6).
    grad_y : array, shape (rows, cols)
        Global gradient image of the cube, ``sum_k beta_k gradG_k`` (eq. 7).
    alpha, beta : numpy.ndarray, shape (K,), float64
        Level weights, non-negative, each summing to 1 (eqs. 8-9).
    channel_weights : numpy.ndarray, shape (K, bands), float64
        Per-level NNLS band weights ``x_k`` (eq. 5).
    guide_levels, cube_levels : array, shape (K, rows, cols)
        ``gradP_k`` and ``gradG_k = A_k x_k`` upsampled to the guide grid.
    valid : array of bool, shape (rows, cols), or None
        With a ``coverage``: the pixels that no level leaves out for missing
        data (what entered eq. 9). None without one (every pixel is valid).

    Examples
    --------
    >>> from ggrad_gpu import estimate_global_gradient, synthetic
    >>> phantom = synthetic.make_phantom(shape=(64, 64), bands=8, seed=0)
    >>> result = estimate_global_gradient(phantom.guide, phantom.cube_on_guide, levels=2)
    >>> isinstance(result, GlobalGradient), result.guide_levels.shape, result.valid is None
    (True, (2, 64, 64), True)
    >>> bool((result.channel_weights >= 0).all())  # NNLS band weights
    True
    """

    grad_x: object
    grad_y: object
    alpha: np.ndarray
    beta: np.ndarray
    channel_weights: np.ndarray
    guide_levels: object
    cube_levels: object
    valid: object = None


def estimate_global_gradient(guide, cube, *, levels: int = 4, weights="auto", coverage=None) -> GlobalGradient:
    """Estimate the global gradient image of a cube guided by an image.

    Parameters
    ----------
    guide : array, shape (rows, cols)
        Brightfield (guide) image, NumPy or CuPy.
    cube : array, shape (rows, cols, bands)
        Hyperspectral cube already on the guide's grid, bands last, in the
        same array module as ``guide``; or a
        :class:`ggrad_gpu.core.factored.FactoredCube` of that shape (its
        coefficients in that module), which is never made whole.
    levels : int, default 4
        Gaussian pyramid levels ``K`` (level 0 is the guide grid).
    weights : "auto" or (alpha, beta)
        ``"auto"`` solves eq. 9 exactly; a pair of length-K non-negative
        sequences is used instead, each divided by its sum.
    coverage : array of bool, shape (rows, cols), or Coverage, optional
        Where the cube (and the guide) hold data: a boolean map of the pixels
        the cube covers (nonzero numbers count as True), or a
        :class:`ggrad_gpu.core.coverage.Coverage` that also marks missing cube
        or guide values. Values where there is no data may be anything (NaN
        included): they are replaced by the nearest pixel's with data for the
        filters (:func:`ggrad_gpu.core.coverage.fill_gaps`), and kept out of the
        Gram matrices and of eq. 9 (at coarse levels, every pixel whose blur
        draws more than half its weight from them).

    Returns
    -------
    GlobalGradient
        Images in the inputs' array module; weights as host float64 arrays.

    Raises
    ------
    ValueError, TypeError
        Naming the parameter: ``guide`` or ``cube`` not real arrays of the
        right dimensions, on different grids, or with NaN or inf values
        where ``coverage`` says they hold data (use :func:`ggrad_gpu.refine`
        for missing data); a guide under 3 x 3 pixels or too small for
        ``levels`` (the message gives the most that fit); malformed
        ``weights``; a ``coverage`` of another shape or leaving no pixel.

    Notes
    -----
    Computation is float32 for float32 (or integer, boolean, float16,
    byte-swapped) inputs, float64 if either input is float64; Gram matrices
    are always accumulated in float64. Memory beyond the inputs is the cube's
    pyramid (a third of the cube) plus bounded blocks (and a filled copy of
    the cube where ``coverage`` marks gaps). Bands that are constant to
    rounding get weight 0, as exactly constant ones do; values far from 1
    (beyond 2**30 or below 2**-30) are scaled by powers of two internally,
    which changes no result.

    Examples
    --------
    >>> from ggrad_gpu import estimate_global_gradient, synthetic
    >>> phantom = synthetic.make_phantom(shape=(96, 112), bands=40, seed=1)
    >>> result = estimate_global_gradient(phantom.guide, phantom.cube_on_guide, levels=3)
    >>> result.grad_y.shape, result.channel_weights.shape
    ((96, 112), (3, 40))
    >>> round(float(result.alpha.sum()), 12), round(float(result.beta.sum()), 12)
    (1.0, 1.0)
    """
    check_array(guide, "guide", (2,), "2-D (rows, cols)")
    factored = is_factored(cube)
    if factored:
        check_array(cube.coefficients, "cube.coefficients", (3,), "3-D (rows, cols, rank)")
    else:
        check_array(cube, "cube", (3,), "3-D (rows, cols, bands)")
    if cube.shape[:2] != guide.shape:
        raise ValueError(
            f"cube must be on the guide's grid: cube has {cube.shape[0]} x {cube.shape[1]} pixels, "
            f"guide has {guide.shape[0]} x {guide.shape[1]}"
        )
    coverage = _checked_coverage(coverage, guide.shape)
    xp = array_module(guide=guide, cube=cube.coefficients if factored else cube, **coverage.maps())
    levels = check_levels(levels, guide.shape, image="guide")
    manual = None if isinstance(weights, str) and weights == "auto" else manual_level_weights(weights, levels)
    guide = _filled(guide, coverage.guide_missing, "guide", xp)
    # A lazy cube (a warp of a cube beyond memory) is computed once here, not per reading step below.
    cube = _filled(imagewise(checkpoint, cube), coverage.cube_gaps, "cube", xp)
    gaps = coverage.gaps
    excluded = excluded_levels(gaps, levels)

    dtype = np.promote_types(float_dtype(guide.dtype), float_dtype(cube.dtype))
    guide = guide.astype(dtype, copy=False)
    cube_level = cube.astype(dtype, copy=False)
    scale = _band_scale(cube_level, xp)
    # Values far from 1 would overflow (or underflow) the Gram products: scale
    # the guide and each band by a power of two (exact), and the results back.
    guide_unit = power_of_two_scale(float(xp.abs(guide).max()))
    band_units = np.array([power_of_two_scale(v) for v in scale])
    if guide_unit != 1.0:
        guide = guide * dtype.type(guide_unit)
    if (band_units != 1.0).any():
        cube_level = (cube_level.band_scaled(band_units) if factored
                      else cube_level * xp.asarray(band_units, dtype=dtype))
        scale = scale * band_units
    cube_level = imagewise(checkpoint, cube_level)  # a lazy cube is read once per step below: computed once
    guide_pyramid = gaussian_pyramid(guide, levels)
    shape = guide.shape
    channel_weights = np.zeros((levels, cube.shape[2]))
    guide_levels = xp.empty((levels,) + shape, dtype=dtype)
    cube_levels = xp.empty((levels,) + shape, dtype=dtype)
    for k in range(levels):
        if k > 0:
            cube_level = imagewise(lambda images: checkpoint(blur_decimate(images)), cube_level)
        target = sobel_magnitude(guide_pyramid[k])
        used = None if excluded[k] is None else ~excluded[k]
        gram, rhs = level_gram(cube_level, target, used)
        count = target.size if used is None else int(used.sum())
        x = nnls_gram(*_without_flat_bands(gram, rhs, scale, count, dtype, xp), ridge=rounding_ridge(dtype))
        channel_weights[k] = x * band_units / guide_unit
        guide_levels[k] = upsample_level(target, k, shape)
        cube_levels[k] = upsample_level(combine_bands(cube_level, x), k, shape)
        if guide_unit != 1.0:
            guide_levels[k] /= dtype.type(guide_unit)
            cube_levels[k] /= dtype.type(guide_unit)

    release_checkpoints()  # what follows is 2-D
    valid = valid_pixels(gaps, levels, shape)
    if manual is None:
        alpha, beta = solve_level_weights(level_weights_matrix(guide_levels, cube_levels, valid))
    else:
        alpha, beta = manual
    grad_x = _weighted_sum(guide_levels, alpha, xp)
    grad_y = _weighted_sum(cube_levels, beta, xp)
    return GlobalGradient(grad_x, grad_y, alpha, beta, channel_weights, guide_levels, cube_levels, valid)


def _checked_coverage(coverage, shape) -> Coverage:
    """``coverage`` as a :class:`Coverage` whose maps are boolean, of ``shape``, leaving some pixel."""
    if coverage is not None and not isinstance(coverage, Coverage):
        check_array(coverage, "coverage", (2,), "2-D (rows, cols)")
    coverage = Coverage.of(coverage)
    checked = {name: check_mask(value, f"coverage.{name}" if name != "footprint" else "coverage", shape)
               for name, value in coverage.maps().items()}
    coverage = Coverage(**checked)
    if coverage.gaps is not None and bool(coverage.gaps.all()):
        raise NoDataError("coverage leaves no pixel with data")
    return coverage


def _filled(image, gaps, name, xp):
    """``image`` with stand-ins at ``gaps`` (if any), checked finite everywhere else (naming ``name``)."""
    if is_factored(image):  # the fill is a gather, the same for every band: of the coefficients
        filled = image if gaps is None else image.pixelwise(lambda values: fill_gaps(values, gaps))
        if not (all_finite(filled.coefficients, xp) and all_finite(filled.basis, xp)):
            where = "" if gaps is None else " where coverage says it holds data"
            raise ValueError(f"{name} contains NaN or inf values{where}")
        return filled
    if gaps is not None:
        image = fill_gaps(image, gaps)
    if not all_finite(image, xp):
        where = "" if gaps is None else " where coverage says it holds data"
        raise ValueError(f"{name} contains NaN or inf values{where}")
    return image


# A band whose Sobel magnitudes stay below this many units in the last place
# of its values (RMS) is numerically constant: what it holds is the rounding
# of the warp and the pyramid, which NNLS would otherwise scale up to match
# the guide (its columns are normalised).
FLAT_ULPS = 100


def _band_scale(cube, xp) -> np.ndarray:
    """Each band's largest magnitude, from every 8th row and column (host float64).

    A cheap read of 1/64 of the cube; an underestimate only makes
    :func:`_without_flat_bands` keep more bands.
    """
    if is_factored(cube):
        part = cube.pixelwise(lambda coefficients: coefficients[::8, ::8])
        if is_dask_array(part.coefficients):  # lazy coefficients: only the sample's are read
            part = part.pixelwise(lambda coefficients: coefficients.compute())
        sample = part.dense()
    else:
        sample = cube[::8, ::8]
    return to_host(xp.abs(sample).max(axis=(0, 1))).astype(np.float64)


def _without_flat_bands(gram, rhs, scale, count, dtype, xp):
    """``gram`` and ``rhs`` with the numerically constant bands' rows and columns zeroed.

    Such a band gets weight 0 (as an exactly constant one does); see
    :data:`FLAT_ULPS`.
    """
    threshold = count * (FLAT_ULPS * np.finfo(dtype).eps * scale) ** 2
    flat = np.flatnonzero(to_host(xp.diagonal(gram)) <= threshold)
    if flat.size == 0:
        return gram, rhs
    flat = xp.asarray(flat)
    gram, rhs = gram.copy(), rhs.copy()
    gram[flat, :] = 0
    gram[:, flat] = 0
    rhs[flat] = 0
    return gram, rhs


def level_gram(cube_level, target, mask=None, *, rows=None):
    """``A^T A`` and ``A^T b`` of one level, with ``A`` the per-band Sobel magnitudes.

    Pixels where ``mask`` is False get weight 0. The gradients come in blocks
    of ``rows`` rows (default: :func:`iter_sobel_blocks`'s). Where a block
    runs out of memory, the level is accumulated again with half the rows:
    the sums depend on the blocks in their last bits, so the result is
    exactly the one that ``rows`` set to the size that fitted gives.

    Examples
    --------
    >>> import numpy as np
    >>> from ggrad_gpu.core.filters import sobel_magnitude
    >>> rng = np.random.default_rng(0)
    >>> cube, target = rng.random((10, 8, 3)), rng.random((10, 8))
    >>> gram, rhs = level_gram(cube, target, rows=3)
    >>> a = sobel_magnitude(cube).reshape(-1, 3)  # the per-band gradients, whole
    >>> bool(np.allclose(gram, a.T @ a)), bool(np.allclose(rhs, a.T @ target.ravel()))
    (True, True)
    """
    if is_dask_array(cube_level):
        return level_gram_chunked(cube_level, target, mask, kernel=level_gram)
    if is_factored(cube_level) and is_dask_array(cube_level.coefficients):  # chunks of coefficients
        kernel = functools.partial(_factored_kernel, level_gram, cube_level.basis)
        return level_gram_chunked(cube_level.coefficients, target, mask, kernel=kernel)
    xp = array_module(target=target)
    if rows is None:
        rows = sobel_block_rows(cube_level.shape, cube_level.dtype, xp)

    def accumulate(rows):
        # Products in the data's precision (float32 for float32 cubes: the GEMM rate, twice
        # float64's), each block's summed in float64. Their rounding depends on the blocks, and
        # eq. 5 is often nearly singular (a denoised cube: condition numbers 1e11 to 1e16): the
        # solve's ridge (nnls.rounding_ridge) keeps one answer for every blocking.
        acc = GramAccumulator(cube_level.shape[2], xp, product_dtype=cube_level.dtype)
        for start, stop, gradients in iter_sobel_blocks(cube_level, rows=rows):
            acc.add(gradients, target[start:stop], None if mask is None else mask[start:stop])
        return acc

    acc, _ = retry_smaller(accumulate, rows, stage="Gram matrices (eq. 5)", unit="rows", xp=xp)
    return acc.gram, acc.rhs


def combine_bands(cube_level, x):
    """``gradG = sum_i x_i |grad HS_i|`` over the bands with ``x_i > 0`` only.

    Examples
    --------
    >>> import numpy as np
    >>> from ggrad_gpu.core.filters import sobel_magnitude
    >>> cube = np.random.default_rng(0).random((10, 8, 3))
    >>> x = np.array([0.5, 0.0, 2.0])
    >>> bool(np.allclose(combine_bands(cube, x), sobel_magnitude(cube) @ x))
    True
    """
    if is_dask_array(cube_level):
        return combine_bands_chunked(cube_level, x, kernel=combine_bands)
    if is_factored(cube_level) and is_dask_array(cube_level.coefficients):
        kernel = functools.partial(_factored_kernel, combine_bands, cube_level.basis)
        return combine_bands_chunked(cube_level.coefficients, x, kernel=kernel)
    xp = array_module(cube_level=cube_level.coefficients if is_factored(cube_level) else cube_level)
    active = np.flatnonzero(x > 0)
    out = xp.zeros(cube_level.shape[:2], dtype=cube_level.dtype)
    if active.size == 0:
        return out
    weights = xp.asarray(x[active], dtype=cube_level.dtype)

    def combine(rows):
        # Every block overwrites its rows of ``out``, so a retry starts afresh.
        for start, stop, gradients in iter_sobel_blocks(cube_level, rows=rows, bands=active):
            with spurious_blas_flags_ignored():
                out[start:stop] = gradients @ weights

    rows = sobel_block_rows(cube_level.shape[:2] + (active.size,), cube_level.dtype, xp)
    retry_smaller(combine, rows, stage="gradient combination (gradG = A x, eq. 5)", unit="rows",
                  xp=xp)
    return out


def _factored_kernel(kernel, basis, block, *args):
    """``kernel`` (level_gram, combine_bands) of a chunk of a factored cube's coefficients."""
    return kernel(FactoredCube(block, basis), *args)


def _weighted_sum(levels_stack, weights, xp):
    w = xp.asarray(weights, dtype=levels_stack.dtype)
    return xp.tensordot(w, levels_stack, axes=1)
