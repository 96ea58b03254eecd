"""Global gradient estimation (paper eqs. 4-9).

For every pyramid level ``k`` the cube's per-band Sobel magnitudes are fitted to
the guide's by non-negative least squares (eq. 5), from Gram matrices
accumulated block by block while the gradients are computed, so the gradient
cube is never held whole. The per-level images are upsampled to the guide grid
and combined with level weights ``alpha`` and ``beta`` (eqs. 6-9).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._backend import array_module, ndimage_module, retry_smaller, to_host
from ._validation import check_array, check_finite, check_levels, check_mask, float_dtype, power_of_two_scale
from .filters import _yield_rows, iter_sobel_blocks, sobel_magnitude
from .level_weights import level_weights_matrix, manual_level_weights, solve_level_weights
from .nnls import GramAccumulator, nnls_gram, spurious_blas_flags_ignored
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
        With a ``mask``: the pixels where every level's gradients were
        computed from covered pixels only (what entered eq. 9). None without
        a mask (everything is valid).
    """

    grad_x: object
    grad_y: object
    alpha: np.ndarray
    beta: np.ndarray
    channel_weights: np.ndarray
    guide_levels: object
    cube_levels: object
    valid: object = None


def estimate_global_gradient(guide, cube, *, levels: int = 4, weights="auto", mask=None) -> GlobalGradient:
    """Estimate the global gradient image of a cube guided by an image.

    Parameters
    ----------
    guide : array, shape (rows, cols)
        Brightfield (guide) image, NumPy or CuPy.
    cube : array, shape (rows, cols, bands)
        Hyperspectral cube already on the guide's grid, bands last, in the
        same array module as ``guide``.
    levels : int, default 4
        Gaussian pyramid levels ``K`` (level 0 is the guide grid).
    weights : "auto" or (alpha, beta)
        ``"auto"`` solves eq. 9 exactly; a pair of length-K non-negative
        sequences is used instead, each divided by its sum.
    mask : array of bool, shape (rows, cols), optional
        Pixels the cube covers. Gradients whose filter footprint (pyramid
        blur, Sobel, cubic upsampling) reaches an uncovered pixel are left
        out of the Gram matrices and of eq. 9. Cube values outside the mask
        are ignored and may be NaN. Nonzero numbers count as True.

    Returns
    -------
    GlobalGradient
        Images in the inputs' array module; weights as host float64 arrays.

    Raises
    ------
    ValueError, TypeError
        Naming the parameter: ``guide`` or ``cube`` not real arrays of the
        right dimensions, on different grids, or with NaN or inf values
        (outside a ``mask``, use :func:`ggrad_gpu.refine` for missing data);
        a guide under 3 x 3 pixels or too small for ``levels`` (the message
        gives the most that fit); malformed ``weights``; a ``mask`` of
        another shape or covering no pixel.

    Notes
    -----
    Computation is float32 for float32 (or integer, boolean, float16,
    byte-swapped) inputs, float64 if either input is float64; Gram matrices
    are always accumulated in float64. Memory beyond the inputs is the cube's
    pyramid (a third of the cube) plus bounded blocks. Bands that are
    constant to rounding get weight 0, as exactly constant ones do; values
    far from 1 (beyond 2**30 or below 2**-30) are scaled by powers of two
    internally, which changes no result.

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
    return _estimate(guide, cube, levels=levels, weights=weights, mask=mask)


def _estimate(guide, cube, *, levels, weights, mask=None, filled=None) -> GlobalGradient:
    """:func:`estimate_global_gradient`, and pixels whose values were filled in.

    ``filled`` (boolean, (rows, cols), optional) marks pixels whose guide or
    cube values are stand-ins for missing data (interpolated from their
    neighbours, see ``pipeline._inpaint``). Unlike ``mask``, which excludes
    every gradient whose filter footprint reaches an uncovered pixel, it
    excludes the filled pixels themselves at level 0, and at coarser levels
    the pixels whose pyramid blur is more than half filled values
    (:func:`_filled_levels`): scattered missing pixels then cost only
    themselves, while holes stay out.
    """
    check_array(guide, "guide", (2,), "2-D (rows, cols)")
    check_array(cube, "cube", (3,), "3-D (rows, cols, bands)")
    xp = array_module(guide=guide, cube=cube, mask=mask, filled=filled)
    if cube.shape[:2] != guide.shape:
        raise ValueError(
            f"cube must be on the guide's grid: cube has {cube.shape[0]} x {cube.shape[1]} pixels, "
            f"guide has {guide.shape[0]} x {guide.shape[1]}"
        )
    levels = check_levels(levels, guide.shape, image="guide")
    if not (isinstance(weights, str) and weights == "auto"):
        manual = manual_level_weights(weights, levels)
    else:
        manual = None
    check_finite(guide, "guide", xp)
    if mask is None:
        check_finite(cube, "cube", xp)
        level_masks = [None] * levels
    else:
        cube, level_masks = _apply_mask(cube, mask, levels, xp)
    if filled is not None:
        filled = check_mask(filled, "filled", guide.shape)
    filled_levels = [None] * levels if filled is None else _filled_levels(filled, levels, xp)

    dtype = np.promote_types(float_dtype(guide.dtype), float_dtype(cube.dtype))
    guide = guide.astype(dtype, copy=False)
    cube_level = cube.astype(dtype, copy=False)
    scale = _band_scale(cube_level, mask, xp)
    # Values far from 1 would overflow (or underflow) the Gram products: scale
    # the guide and each band by a power of two (exact), and the results back.
    guide_unit = power_of_two_scale(float(xp.abs(guide).max()))
    band_units = np.array([power_of_two_scale(v) for v in scale])
    if guide_unit != 1.0:
        guide = guide * dtype.type(guide_unit)
    if (band_units != 1.0).any():
        cube_level = cube_level * xp.asarray(band_units, dtype=dtype)
        scale = scale * band_units
    guide_pyramid = gaussian_pyramid(guide, levels)
    shape = guide.shape
    channel_weights = np.zeros((levels, cube.shape[2]))
    guide_levels = xp.empty((levels,) + shape, dtype=dtype)
    cube_levels = xp.empty((levels,) + shape, dtype=dtype)
    valid = None if mask is None and filled is None else xp.ones(shape, dtype=bool)
    for k in range(levels):
        if k > 0:
            cube_level = blur_decimate(cube_level)
        target = sobel_magnitude(guide_pyramid[k])
        used = _and_not(level_masks[k], filled_levels[k], xp)
        gram, rhs = level_gram(cube_level, target, used)
        count = target.size if used is None else int(used.sum())
        x = nnls_gram(*_without_flat_bands(gram, rhs, scale, count, dtype, xp))
        channel_weights[k] = x * band_units / guide_unit
        guide_levels[k] = upsample_level(target, k, shape)
        combined = combine_bands(cube_level, x)
        if mask is not None:
            # Zero, not whatever the uncovered pixels held: the spline prefilter reaches far.
            combined *= level_masks[k]
        cube_levels[k] = upsample_level(combined, k, shape)
        if guide_unit != 1.0:
            guide_levels[k] /= dtype.type(guide_unit)
            cube_levels[k] /= dtype.type(guide_unit)
        if mask is not None:
            valid &= _upsampled_validity(level_masks[k], k, shape, xp)
        if filled is not None:
            valid &= ~_level_lookup(filled_levels[k], k, shape, xp)

    if manual is None:
        alpha, beta = solve_level_weights(level_weights_matrix(guide_levels, cube_levels, valid))
    else:
        alpha, beta = manual
    grad_x = _weighted_sum(guide_levels, alpha, xp)
    grad_y = _weighted_sum(cube_levels, beta, xp)
    return GlobalGradient(grad_x, grad_y, alpha, beta, channel_weights, guide_levels, cube_levels, valid)


def _apply_mask(cube, mask, levels, xp):
    """Check ``mask``, neutralise values outside it, and derive each level's valid gradients.

    Returns the cube (a copy with zeros outside the mask only if it held
    non-finite values there) and, per level, a boolean map of pixels whose
    Sobel magnitude sees covered pixels only.
    """
    check_array(mask, "mask", (2,), "2-D (rows, cols)")
    if getattr(mask, "shape", None) != cube.shape[:2]:
        raise ValueError(
            f"mask must have the cube's {cube.shape[0]} x {cube.shape[1]} pixels; "
            f"got shape {getattr(mask, 'shape', None)}"
        )
    array_module(cube=cube, mask=mask)
    mask = mask.astype(bool)
    if not bool(mask.any()):
        raise ValueError("mask covers no pixel")
    if not (bool(xp.isfinite(cube.min())) and bool(xp.isfinite(cube.max()))):
        bad = ~xp.isfinite(cube).all(axis=2)
        if bool((bad & mask).any()):
            raise ValueError("cube contains NaN or inf values inside mask")
        cube = xp.where(mask[..., None], cube, 0)
    return cube, _coverage_levels(mask, levels, float_dtype(cube.dtype), xp)


def _coverage_levels(mask, levels, dtype, xp):
    """Per level, the pixels whose Sobel magnitude sees pixels inside ``mask`` only."""
    ndi = ndimage_module(xp)
    masks = []
    coverage = mask.astype(dtype)
    for k in range(levels):
        if k > 0:
            # A pyramid pixel is covered when its whole blur footprint is.
            coverage = (blur_decimate(coverage) > 1 - 1e-4).astype(coverage.dtype)
        masks.append(ndi.minimum_filter(coverage, size=3, mode="nearest") > 0.5)  # Sobel's 3 x 3
    return masks


def _mask_validity(mask, levels, dtype, xp):
    """The ``valid`` map :func:`_estimate` derives from ``mask`` alone (for a cube of ``dtype``)."""
    shape = mask.shape
    valid = xp.ones(shape, dtype=bool)
    for k, level_mask in enumerate(_coverage_levels(mask, levels, dtype, xp)):
        valid &= _upsampled_validity(level_mask, k, shape, xp)
    return valid


# A band whose Sobel magnitudes stay below this many units in the last place
# of its values (RMS) is numerically constant: what it holds is the rounding
# of the warp and the pyramid, which NNLS would otherwise scale up to match
# the guide (its columns are normalised).
FLAT_ULPS = 100


def _band_scale(cube, mask, xp) -> np.ndarray:
    """Each band's largest magnitude, from every 8th row and column (host float64).

    A cheap read of 1/64 of the cube; an underestimate only makes
    :func:`_without_flat_bands` keep more bands.
    """
    sample = cube[::8, ::8]
    if mask is not None:
        sample = xp.where(mask[::8, ::8, None].astype(bool), sample, 0)
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


def _filled_levels(filled, levels, xp):
    """Per level, the pixels that :func:`_estimate` leaves out for filled-in values.

    Level 0: the filled pixels. Level ``k``: the pixels whose pyramid blur
    (the same ``blur_decimate`` as the data's) draws more than half its weight
    from filled pixels.
    """
    fraction = filled.astype(xp.float32)
    out = [filled]
    for _ in range(1, levels):
        fraction = blur_decimate(fraction)
        out.append(fraction > 0.5)
    return out


def _filled_validity(filled, levels, shape, xp):
    """Level-0 pixels that no level of :func:`_estimate` leaves out for filled-in values."""
    valid = xp.ones(shape, dtype=bool)
    for k, excluded in enumerate(_filled_levels(filled, levels, xp)):
        valid &= ~_level_lookup(excluded, k, shape, xp)
    return valid


def _level_lookup(level_map, level, shape, xp):
    """A level-``k`` boolean map on the level-0 grid: True where a nearest level pixel is.

    Level-0 pixel ``p`` sits at level coordinate ``p / 2**k``, between level
    pixels ``floor`` and ``floor + 1``; the result is True if either is.
    """
    if level == 0:
        return level_map
    either = level_map.copy()
    either[:-1] |= level_map[1:]
    either[:, :-1] |= either[:, 1:].copy()
    rows = xp.minimum(xp.arange(shape[0]) >> level, level_map.shape[0] - 1)
    cols = xp.minimum(xp.arange(shape[1]) >> level, level_map.shape[1] - 1)
    return either[rows[:, None], cols[None, :]]


def _and_not(mask, excluded, xp):
    """``mask & ~excluded``, where either may be None (nothing masked, nothing excluded)."""
    if excluded is None:
        return mask
    return ~excluded if mask is None else mask & ~excluded


def _upsampled_validity(level_mask, level, shape, xp):
    """Level-0 pixels whose cubic upsampling reads valid level pixels only."""
    ndi = ndimage_module(xp)
    # Cubic interpolation at x reads samples floor(x) - 1 .. floor(x) + 2.
    eroded = ndi.minimum_filter(level_mask.astype(xp.uint8), size=5, mode="nearest").astype(bool)
    rows = xp.minimum(xp.arange(shape[0]) >> level, level_mask.shape[0] - 1)
    cols = xp.minimum(xp.arange(shape[1]) >> level, level_mask.shape[1] - 1)
    return eroded[rows[:, None], cols[None, :]]


def level_gram(cube_level, target, mask=None, *, rows=None):
    """``A^T A`` and ``A^T b`` of one level, with ``A`` the per-band Sobel magnitudes.

    Pixels where ``mask`` is False get weight 0. The gradients come in blocks
    of ``rows`` rows (default: :func:`iter_sobel_blocks`'s). Where a block
    runs out of memory, the level is accumulated again with half the rows:
    the sums depend on the blocks in their last bits, so the result is
    exactly the one that ``rows`` set to the size that fitted gives.
    """
    xp = array_module(cube_level=cube_level)
    if rows is None:
        rows = _yield_rows(cube_level.shape, cube_level.dtype, xp)

    def accumulate(rows):
        # Products in the data's precision (float32 for float32 cubes), sums in float64.
        acc = GramAccumulator(cube_level.shape[2], xp, product_dtype=cube_level.dtype)
        for start, stop, gradients in iter_sobel_blocks(cube_level, rows=rows):
            acc.add(gradients, target[start:stop], None if mask is None else mask[start:stop])
        return acc

    acc, _ = retry_smaller(accumulate, rows, stage="Gram matrices (eq. 5)", unit="rows")
    return acc.gram, acc.rhs


def combine_bands(cube_level, x):
    """``gradG = sum_i x_i |grad HS_i|`` over the bands with ``x_i > 0`` only."""
    xp = array_module(cube_level=cube_level)
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

    rows = _yield_rows(cube_level.shape[:2] + (active.size,), cube_level.dtype, xp)
    retry_smaller(combine, rows, stage="gradient combination (gradG = A x, eq. 5)", unit="rows")
    return out


def _weighted_sum(levels_stack, weights, xp):
    w = xp.asarray(weights, dtype=levels_stack.dtype)
    return xp.tensordot(w, levels_stack, axes=1)
