"""Affine registration of two gradient images by mean squared error (paper eq. 10).

``register_affine(fixed, moving)`` finds the matrix ``M`` (fixed grid to moving
grid, pull-back) minimising ``mean((fixed(p) - moving(M p))^2)`` over the pixels
both images cover:

- a coarse translation from masked normalised cross-correlation (FFT) at the
  coarsest pyramid level, so the capture range reaches tens of pixels;
- then, coarse to fine on a Gaussian pyramid (smoothed once more at the coarse
  levels), damped Gauss-Newton steps on the six affine parameters with
  analytic derivatives. The parameters are scaled so that a unit change of
  any of them moves pixels by about one pixel (the linear part is measured at
  the radius of the overlap), and a step is taken only if it lowers the MSE:
  otherwise the damping grows and the step shrinks, so it cannot diverge.
  With large damping the step is scaled gradient descent.

Each evaluation is a few whole-image operations in the images' dtype, one
stacked product summed in float64, and one read of its 10 x 10 result to the
host, where the 6 x 6 step is solved: the same on NumPy and CuPy, with one
device sync per evaluation.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

from .._affine import translation
from .._backend import array_module, ndimage_module, to_host
from .._memory import block_rows
from .._validation import (
    all_finite,
    check_affine,
    check_array,
    check_levels,
    check_mask,
    float_dtype,
    power_of_two_scale,
)
from ..core.coverage import fill_gaps
from ..core.geometry import degeneracy, map_points
from ..core.pyramid import blur_decimate
from .metrics import ncc

__all__ = ["AffineRegistration", "affine_mse", "affine_ncc", "coarse_shifts", "displacement_covariance",
           "displacement_spread", "point_variances", "register_affine"]

# A result that scales by more than this along an axis (relative to the
# initial matrix), or flips, is degenerate: the optimiser shrank the overlap
# to where both images are flat, or the images do not match at all.
MAX_SCALE = 4.0
# Bytes per pixel that one evaluation of the normal equations holds (the ten
# float64 product rows, coordinates, four taps of four channels, the samples):
# its blocks of rows are sized from this with the memory budget.
EVALUATION_BYTES_PER_PIXEL = 256


@dataclass(frozen=True)
class AffineRegistration:
    """Result of :func:`register_affine`.

    Attributes
    ----------
    matrix : numpy.ndarray, shape (3, 3)
        Fixed grid to moving grid (row, col), pull-back convention.
    mse_before, mse_after : float
        MSE at the initial matrix and at ``matrix``, over the overlap.
    iterations : int
        Gauss-Newton iterations over all levels.
    converged : bool
        Whether the finest level stopped on its tolerance, not its iteration bound.
    coarse_shift : tuple of float
        Translation (rows, cols, fixed pixels) found by cross-correlation, added
        before the optimisation.
    message : str
        Empty, or why the result was rejected (a degenerate or non-finite
        matrix: ``matrix`` is then the initial one and ``converged`` False).

    Examples
    --------
    >>> import numpy as np
    >>> import scipy.ndimage as ndi
    >>> fixed = ndi.gaussian_filter(np.random.default_rng(0).random((64, 64)), 3)
    >>> moving = ndi.shift(fixed, (-1.5, 2.0), order=3, mode="nearest")  # moving(p) = fixed(p - shift)
    >>> result = register_affine(fixed, moving)
    >>> isinstance(result, AffineRegistration), result.message, result.mse_after < result.mse_before / 10
    (True, '', True)
    >>> np.round(result.matrix[:2, 2], 1) + 0.0
    array([-1.5,  2. ])
    """

    matrix: np.ndarray
    mse_before: float
    mse_after: float
    iterations: int
    converged: bool
    coarse_shift: tuple = (0.0, 0.0)
    message: str = ""


def register_affine(
    fixed,
    moving,
    *,
    initial=None,
    fixed_mask=None,
    moving_mask=None,
    levels: int | None = None,
    coarse_search: bool = True,
    max_shift: float | None = None,
    max_iter: int = 60,
    tolerance: float = 1e-3,
    stop=None,
) -> AffineRegistration:
    """Affine registration of ``moving`` onto ``fixed`` by mean squared error.

    Parameters
    ----------
    fixed, moving : array, shape (rows, cols)
        Images on grids of any size, at least 2 x 2 pixels (NumPy or CuPy,
        both the same). Integer and byte-swapped images compute in float32,
        float64 ones in float64; values of any magnitude are fine (a common
        power-of-two scale keeps the squares in range). NaN and inf pixels
        are missing samples: they never enter the metric at full
        resolution, and a coarse pyramid pixel counts where at least half of
        its footprint holds data (unlike the masks, which exclude every
        coarse pixel that reaches outside them).
    initial : array_like, shape (3, 3), optional
        Starting matrix (fixed to moving), affine and invertible; identity by
        default.
    fixed_mask, moving_mask : array of bool, optional
        Pixels of each image that may enter the metric (e.g. what a cube
        covers), of that image's shape; nonzero numbers count as True. Points
        mapped outside ``moving``'s field never enter it.
    levels : int, optional
        Pyramid levels; by default as many as keep the coarsest level at
        least 64 pixels across (at most 5): coarser gradient images no longer
        tell the right shift from a wrong one. Given (and above 1), the
        coarsest level of both images must stay at least 3 x 3 pixels.
    coarse_search : bool, default True
        Find a translation by cross-correlation at the coarsest level first.
    max_shift : float, optional
        Largest translation the coarse search considers, in fixed pixels;
        default a third of the smaller image side.
    max_iter : int, default 60
        Gauss-Newton iterations per level.
    tolerance : float, default 1e-3
        Stop a level when a step moves no pixel of the overlap by more than
        this (in that level's pixels).
    stop : callable, optional
        Called as ``stop(matrix, level)`` with the level-0 matrix after each
        level but the finest (``level`` ``k``: pixels of ``2**k`` of the
        images'); True skips the finer levels (e.g. a start that has come
        back next to a known result needs no more precision to say so).

    Returns
    -------
    AffineRegistration
        Its ``matrix`` is always finite. A result that flips or scales by
        more than ``MAX_SCALE`` against ``initial`` is rejected: ``matrix``
        is then ``initial`` and ``message`` says why.

    Raises
    ------
    ValueError, TypeError
        Naming the parameter: images that are not 2-D real arrays or are
        smaller than 2 x 2, images without a finite pixel inside their mask,
        masks of the wrong shape, an ``initial`` that is not an invertible
        affine matrix, and options out of range.

    Examples
    --------
    >>> import numpy as np
    >>> import scipy.ndimage as ndi
    >>> from ggrad_gpu.registration.register import register_affine
    >>> rng = np.random.default_rng(0)
    >>> fixed = ndi.gaussian_filter(rng.random((96, 96)), 3)
    >>> shift = np.array([[1, 0, 2.5], [0, 1, -1.5], [0, 0, 1]])
    >>> moving = ndi.affine_transform(fixed, np.linalg.inv(shift), order=3, mode="nearest")
    >>> result = register_affine(fixed, moving)
    >>> np.round(result.matrix[:2, 2], 1)
    array([ 2.5, -1.5])
    """
    _check_images(fixed, moving, fixed_mask, moving_mask)
    matrix = np.eye(3) if initial is None else check_affine(initial, "initial")
    initial_matrix = matrix.copy()
    _check_options(max_shift, max_iter, tolerance)
    pyramids = _Pyramids(fixed, moving, fixed_mask, moving_mask, levels)
    levels, unit = pyramids.levels, pyramids.unit
    start = pyramids.level(0)
    mse_before = start.mse(matrix) / unit**2

    shift = (0.0, 0.0)
    if coarse_search:
        found = pyramids.shifts(matrix, max_shift, count=1)
        if found:
            shift = found[0]
            matrix = matrix @ translation(*shift)

    iterations, converged = 0, False
    for k in range(levels - 1, -1, -1):
        level = start if k == 0 else pyramids.level(k)
        level_matrix, used, converged = level.optimise(_to_level(matrix, k), max_iter, tolerance)
        matrix = _from_level(level_matrix, k)
        iterations += used
        if k > 0 and stop is not None and stop(matrix, k):
            break
    problem = _degenerate(matrix, initial_matrix)
    if problem:
        # Never a non-finite or degenerate matrix: keep the start, say why.
        message = f"rejected the registration result ({problem}); kept the initial matrix"
        return AffineRegistration(initial_matrix, mse_before, mse_before, iterations, False, (0.0, 0.0), message)
    mse_after = start.mse(matrix) / unit**2
    return AffineRegistration(matrix, mse_before, mse_after, iterations, converged, shift)


def coarse_shifts(fixed, moving, *, fixed_mask=None, moving_mask=None, levels=None, max_shift=None,
                  count: int = 3, separation: float | None = None) -> list:
    """The translations the coarse search of :func:`register_affine` ranks highest, best first.

    ``register_affine`` starts from the best of them. On repetitive texture or
    a small overlap, the best cross-correlation peak can be a wrong basin
    whose affine fit then beats the right one on these images; the runners-up
    are starts for alternative registrations, to be judged on other evidence.

    Parameters
    ----------
    fixed, moving, fixed_mask, moving_mask, levels, max_shift
        As for :func:`register_affine` (identity start).
    count : int, default 3
        Most peaks returned.
    separation : float, optional
        Peaks closer than this (fixed pixels, along both axes) to a better one
        are the same basin; default a quarter of ``max_shift``.

    Returns
    -------
    list of (float, float)
        Shifts ``(rows, cols)`` in fixed pixels, best first; empty where no
        shift correlates better than none.

    Examples
    --------
    >>> import numpy as np
    >>> import scipy.ndimage as ndi
    >>> from ggrad_gpu.registration.register import coarse_shifts
    >>> fixed = ndi.gaussian_filter(np.random.default_rng(0).random((128, 128)), 2)
    >>> moving = np.roll(fixed, (12, -8), axis=(0, 1))
    >>> coarse_shifts(fixed, moving)[0]
    (12.0, -8.0)
    """
    _check_images(fixed, moving, fixed_mask, moving_mask)
    _check_options(max_shift, 1, 1.0)
    if isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < 1:
        raise ValueError(f"count must be an integer >= 1; got {count!r}")
    if separation is not None and not (isinstance(separation, numbers.Real) and separation >= 0):
        raise ValueError(f"separation must be None or a number >= 0; got {separation!r}")
    return _Pyramids(fixed, moving, fixed_mask, moving_mask, levels).shifts(np.eye(3), max_shift, count, separation)


def _check_images(fixed, moving, fixed_mask, moving_mask) -> None:
    """Raise, naming the parameter, for images that are not 2-D or masks of the wrong shape."""
    check_array(fixed, "fixed", (2,), "2-D (rows, cols)", min_size=2)
    check_array(moving, "moving", (2,), "2-D (rows, cols)", min_size=2)
    array_module(fixed=fixed, moving=moving, fixed_mask=fixed_mask, moving_mask=moving_mask)
    for name, mask, image in (("fixed_mask", fixed_mask, fixed), ("moving_mask", moving_mask, moving)):
        if mask is not None:
            check_mask(mask, name, image.shape)


class _Pyramids:
    """Both images prepared for registration: scaled to unit range, their pyramids with coverage."""

    def __init__(self, fixed, moving, fixed_mask, moving_mask, levels):
        xp = array_module(fixed=fixed, moving=moving, fixed_mask=fixed_mask, moving_mask=moving_mask)
        if levels is not None:
            if isinstance(levels, bool) or not isinstance(levels, numbers.Integral):
                raise TypeError(f"levels must be an integer or None; got {levels!r}")
            smaller = tuple(min(a, b) for a, b in zip(fixed.shape, moving.shape))
            levels = 1 if levels == 1 else check_levels(levels, smaller)  # one level needs no pyramid
        dtype = np.promote_types(float_dtype(fixed.dtype), float_dtype(moving.dtype))
        fixed_img, fixed_cov = _prepare(fixed, fixed_mask, dtype, xp)
        moving_img, moving_cov = _prepare(moving, moving_mask, dtype, xp)
        for name, coverage in (("fixed", fixed_cov), ("moving", moving_cov)):
            if not bool(coverage.any()):
                raise ValueError(f"{name} has no usable pixel: all are NaN or inf, or outside {name}_mask")
        # Values far from 1 would overflow (or underflow) the squares: a common
        # power-of-two scale is exact and leaves the minimiser where it was.
        unit = power_of_two_scale(max(float(xp.abs(fixed_img).max()), float(xp.abs(moving_img).max())))
        if unit != 1.0:
            fixed_img, moving_img = fixed_img * unit, moving_img * unit
        if levels is None:
            smallest = min(fixed.shape + moving.shape)
            levels = int(np.clip(np.floor(np.log2(max(smallest, 1) / 64)) + 1, 1, 5))
        fixed_strict = _strict_coverage(fixed, fixed_cov, fixed_mask, xp)
        moving_strict = _strict_coverage(moving, moving_cov, moving_mask, xp)
        self.fixed = _pyramid(fixed_img, fixed_cov, levels, strict=fixed_strict)
        self.moving = _pyramid(moving_img, moving_cov, levels, strict=moving_strict)
        if moving_strict is not moving_cov:
            # The moving image's derivatives read neighbours: give its NaN and
            # inf samples their nearest sample's value (they stay out of the metric).
            self.moving[0] = (fill_gaps(moving_img, moving_cov < 0.5), moving_cov)
        self.xp, self.levels, self.unit, self.shape = xp, levels, unit, tuple(fixed.shape)
        self._levels = {}

    def level(self, k: int) -> "_Level":
        if k not in self._levels:
            self._levels[k] = _Level(self.fixed[k], self.moving[k], self.xp)
        return self._levels[k]

    def shifts(self, matrix, max_shift, count, separation=None) -> list:
        """The best ``count`` coarse translations (fixed pixels) from ``matrix``, separate basins, best first."""
        factor = 2.0 ** (self.levels - 1)
        limit = (min(self.shape) / 3 if max_shift is None else float(max_shift)) / factor
        apart = limit / 4 if separation is None else float(separation) / factor
        found = self.level(self.levels - 1).best_shifts(_to_level(matrix, self.levels - 1), limit, count, apart)
        return [(r * factor, c * factor) for r, c in found]


def _check_options(max_shift, max_iter, tolerance) -> None:
    """Raise, naming the option, for an out-of-range ``max_shift``, ``max_iter`` or ``tolerance``."""
    if max_shift is not None and (
        isinstance(max_shift, bool) or not isinstance(max_shift, numbers.Real)
        or not math.isfinite(max_shift) or max_shift < 0
    ):
        raise ValueError(f"max_shift must be None or a finite number >= 0; got {max_shift!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, numbers.Integral) or max_iter < 0:
        raise ValueError(f"max_iter must be an integer >= 0; got {max_iter!r}")
    if (isinstance(tolerance, bool) or not isinstance(tolerance, numbers.Real)
            or not math.isfinite(tolerance) or tolerance <= 0):
        raise ValueError(f"tolerance must be a finite number > 0; got {tolerance!r}")


def _degenerate(matrix, initial) -> str:
    """Why ``matrix`` is no usable result (empty if it is): not finite, a flip or an extreme scale."""
    if not np.isfinite(matrix).all():
        return "the matrix is not finite"
    return degeneracy(np.linalg.solve(initial, matrix), MAX_SCALE)


def affine_mse(fixed, moving, matrix, *, fixed_mask=None, moving_mask=None) -> float:
    """``mean((fixed(p) - moving(matrix p))^2)`` over the overlap (bilinear ``moving``).

    Examples
    --------
    >>> import numpy as np
    >>> ramp = np.arange(20.0)[:, None] * np.ones((1, 30))  # value = row
    >>> one_row_down = np.array([[1.0, 0, 1], [0, 1, 0], [0, 0, 1]])
    >>> affine_mse(ramp, ramp, np.eye(3)), affine_mse(ramp, ramp, one_row_down)
    (0.0, 1.0)
    """
    return _single_level(fixed, moving, fixed_mask, moving_mask).mse(np.asarray(matrix, np.float64))


def affine_ncc(fixed, moving, matrix, *, fixed_mask=None, moving_mask=None) -> float:
    """Normalised cross-correlation of ``fixed(p)`` and ``moving(matrix p)`` over the overlap.

    Examples
    --------
    >>> import numpy as np
    >>> image = np.random.default_rng(0).random((20, 30))
    >>> round(affine_ncc(image, image, np.eye(3)), 9), round(affine_ncc(image, 1 - image, np.eye(3)), 9)
    (1.0, -1.0)
    """
    return _single_level(fixed, moving, fixed_mask, moving_mask).ncc(np.asarray(matrix, np.float64))


def displacement_spread(fixed, moving, matrix, points, *, fixed_mask=None, moving_mask=None, block: int = 32):
    """How far the MSE fit at ``matrix`` could move ``points``: a block bootstrap of its last step, in closed form.

    The root of the trace of each point's 2 x 2 block of
    :func:`displacement_covariance`.

    Parameters
    ----------
    fixed, moving, matrix, points, fixed_mask, moving_mask, block
        As in :func:`displacement_covariance`.

    Returns
    -------
    numpy.ndarray, shape (n,)
        The standard deviation of each point's place on the moving grid
        (root of the trace of its 2 x 2 covariance), in moving pixels; inf
        where fewer than 8 blocks hold data.

    Examples
    --------
    >>> import numpy as np
    >>> import scipy.ndimage as ndi
    >>> from ggrad_gpu.registration.register import displacement_spread
    >>> rng = np.random.default_rng(0)
    >>> fixed = ndi.gaussian_filter(rng.random((128, 128)), 2)
    >>> noisy = fixed + 0.02 * ndi.gaussian_filter(rng.standard_normal((128, 128)), 2)
    >>> corners = [(0, 0), (127, 127)]
    >>> spread = displacement_spread(fixed, fixed, np.eye(3), corners)
    >>> bool(spread.max() < 1e-6), bool(displacement_spread(fixed, noisy, np.eye(3), corners).max() > 1e-3)
    (True, True)
    """
    covariance = displacement_covariance(fixed, moving, matrix, points, fixed_mask=fixed_mask,
                                         moving_mask=moving_mask, block=block)
    per_point = point_variances(covariance)
    return np.sqrt(np.maximum(per_point, 0.0))


def displacement_covariance(fixed, moving, matrix, points, *, fixed_mask=None, moving_mask=None, block: int = 32):
    """The joint covariance of where the MSE fit at ``matrix`` puts ``points``: a block bootstrap, in closed form.

    The cluster-robust (sandwich) covariance of the six affine parameters,
    ``H^-1 (sum_b g_b g_b^T) H^-1``, with ``H = J^T J`` over the overlap and
    ``g_b = J_b^T r_b`` the MSE gradient of block ``b`` of ``block`` x
    ``block`` fixed pixels, centred over the blocks: how much the
    Gauss-Newton step would change if the blocks were drawn again with
    replacement. The residual ``r`` holds both the noise and every way the
    two images differ (edges they do not share); treated as a random field
    whose correlations do not reach past a block, its effect on the fit is
    what this estimates. Where every part of the images pulls the same way it
    is small; where parts of them disagree, it grows. What every block
    shares is not in it.

    Parameters
    ----------
    fixed, moving : array, shape (rows, cols)
        As in :func:`register_affine` (NaN: missing samples).
    matrix : array_like, shape (3, 3)
        Fixed grid to moving grid, where the fit is judged.
    points : array_like, shape (n, 2)
        Fixed-grid (row, col) points.
    fixed_mask, moving_mask : array of bool, optional
    block : int, default 32

    Returns
    -------
    numpy.ndarray, shape (2 n, 2 n)
        The covariance of the points' places on the moving grid, in moving
        pixels squared, ordered (row_0, col_0, row_1, col_1, ...); inf
        where fewer than 8 blocks hold data.

    Examples
    --------
    >>> import numpy as np
    >>> import scipy.ndimage as ndi
    >>> from ggrad_gpu.registration.register import displacement_covariance
    >>> rng = np.random.default_rng(0)
    >>> fixed = ndi.gaussian_filter(rng.random((128, 128)), 2)
    >>> noisy = fixed + 0.02 * ndi.gaussian_filter(rng.standard_normal((128, 128)), 2)
    >>> covariance = displacement_covariance(fixed, noisy, np.eye(3), [(0, 0), (127, 127)])
    >>> covariance.shape, bool(np.allclose(covariance, covariance.T)), bool(np.linalg.eigvalsh(covariance).min() > -1e-12)
    ((4, 4), True, True)
    """
    if isinstance(block, bool) or not isinstance(block, numbers.Integral) or block < 1:
        raise ValueError(f"block must be a positive integer; got {block!r}")
    level = _Pyramids(fixed, moving, fixed_mask, moving_mask, 1).level(0)
    xp = level.xp
    covered, (warped, g_rows, g_cols) = level._sample(check_affine(matrix, "matrix"), level.moving, level.grad_rows,
                                                      level.grad_cols)
    weight = (covered & level.fixed_valid).astype(xp.float64)
    p_rows = level.p_rows - level.mid[0] + 0 * level.p_cols
    p_cols = level.p_cols - level.mid[1] + 0 * level.p_rows
    jacobian = xp.stack([g_rows * p_rows, g_rows * p_cols, g_cols * p_rows, g_cols * p_cols, g_rows, g_cols],
                        axis=-1).astype(xp.float64).reshape(-1, 6) * weight.reshape(-1, 1)
    residual = ((warped - level.fixed) * weight).astype(xp.float64).reshape(-1)
    rows, cols = weight.shape
    per_row = -(-cols // block)
    labels = ((xp.arange(rows)[:, None] // block) * per_row + xp.arange(cols)[None, :] // block).reshape(-1)
    count = per_row * -(-rows // block)
    pulls = xp.stack([xp.bincount(labels, weights=jacobian[:, i] * residual, minlength=count) for i in range(6)],
                     axis=1)
    # Both small (blocks x 6): to the host first, so the selection is a host boolean index, not a device one.
    pulls = to_host(pulls)[to_host(xp.bincount(labels, weights=weight.reshape(-1), minlength=count)) > 0]
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if pulls.shape[0] < 8:
        return np.full((2 * points.shape[0],) * 2, np.inf)
    pulls = pulls - pulls.mean(axis=0)
    meat = pulls.T @ pulls * pulls.shape[0] / (pulls.shape[0] - 1)
    bread = np.linalg.pinv(to_host(jacobian.T @ jacobian))
    # q moves by dA (p - mid) + d: parameters (dA00, dA01, dA10, dA11, d0, d1).
    design = np.concatenate([np.array([[row, col, 0, 0, 1, 0], [0, 0, row, col, 0, 1]])
                             for row, col in points - np.array(level.mid)])
    return design @ bread @ meat @ bread @ design.T


def point_variances(covariance):
    """The trace of each point's 2 x 2 diagonal block of a (2 n, 2 n) covariance (ordered row, col per point).

    Examples
    --------
    >>> point_variances(np.diag([1.0, 2.0, 3.0, 4.0]))
    array([3., 7.])
    """
    diagonal = np.diag(covariance)
    return diagonal[0::2] + diagonal[1::2]


def _single_level(fixed, moving, fixed_mask, moving_mask):
    xp = array_module(fixed=fixed, moving=moving, fixed_mask=fixed_mask, moving_mask=moving_mask)
    dtype = np.promote_types(float_dtype(fixed.dtype), float_dtype(moving.dtype))
    return _Level(_prepare(fixed, fixed_mask, dtype, xp), _prepare(moving, moving_mask, dtype, xp), xp)


def _prepare(image, mask, dtype, xp):
    """Image with non-finite or masked pixels zeroed, and its coverage (0/1)."""
    image = image.astype(dtype, copy=True)
    coverage = xp.isfinite(image)
    if mask is not None:
        coverage &= mask.astype(bool)
    # copyto with where: no index array and no device sync (a boolean-mask assignment has both).
    xp.copyto(image, 0, where=~coverage)
    return image, coverage.astype(dtype)


def _strict_coverage(original, coverage, mask, xp):
    """The coverage from the mask alone, for :func:`_pyramid`: ``coverage`` itself without missing samples.

    Missing samples are the non-finite pixels of ``original``; ``coverage``
    leaves them out, the strict coverage does not.
    """
    if all_finite(original, xp):
        return coverage
    return xp.ones(coverage.shape, coverage.dtype) if mask is None else mask.astype(bool).astype(coverage.dtype)


def _pyramid(image, coverage, levels, *, strict=None):
    """Pyramid of (image, coverage); coarse levels smoothed once more (sigma 1).

    A coarse pixel counts where its whole footprint is covered. With
    ``strict`` (the coverage without the missing pixels taken out of
    ``coverage``), it counts where its whole footprint is inside ``strict``
    and at least half of it is covered.
    """
    xp = array_module(image=image)
    ndi = ndimage_module(xp)
    out = [(image, coverage)]
    soft = strict is not None and strict is not coverage
    for k in range(1, levels):
        image, coverage = blur_decimate(image), blur_decimate(coverage)
        # Normalised convolution: a partly covered pixel keeps the mean of its covered part.
        weight = ndi.gaussian_filter(coverage, 1.0, mode="nearest")
        smooth = ndi.gaussian_filter(image, 1.0, mode="nearest")
        if soft:
            strict = (blur_decimate(strict) > 0.99).astype(strict.dtype)
            covered = (strict > 0.5) & (coverage > 0.5)
        else:
            covered = coverage > 0.99
        smoothed = xp.where(weight > 1e-3, smooth / xp.maximum(weight, 1e-3), 0)
        out.append((smoothed * covered, covered.astype(image.dtype)))
        image, coverage = out[-1]
    return out


def _to_level(matrix, k):
    """A level-0 matrix expressed between level-k grids (pixel i at 2**k i)."""
    scale = np.diag([2.0**k, 2.0**k, 1.0])
    return np.linalg.inv(scale) @ matrix @ scale


def _from_level(matrix, k):
    scale = np.diag([2.0**k, 2.0**k, 1.0])
    return scale @ matrix @ np.linalg.inv(scale)


class _Level:
    """One pyramid level: the images, their coverage and the moving image's gradient."""

    def __init__(self, fixed, moving, xp):
        self.xp = xp
        self.fixed, self.fixed_cov = fixed
        self.moving, self.moving_cov = moving
        # Central differences of the moving image for the analytic derivative.
        grad_rows = xp.zeros_like(self.moving)
        grad_cols = xp.zeros_like(self.moving)
        grad_rows[1:-1] = 0.5 * (self.moving[2:] - self.moving[:-2])
        grad_cols[:, 1:-1] = 0.5 * (self.moving[:, 2:] - self.moving[:, :-2])
        self.grad_rows, self.grad_cols = grad_rows, grad_cols
        rows, cols = self.fixed.shape
        self.p_rows = xp.arange(rows, dtype=self.fixed.dtype)[:, None]
        self.p_cols = xp.arange(cols, dtype=self.fixed.dtype)[None, :]
        self.fixed_valid = self.fixed_cov > 0.5
        self.mid = ((rows - 1) / 2, (cols - 1) / 2)
        self._sources = {}
        self._buffer = None
        # An evaluation runs over blocks of rows: its per-pixel temporaries
        # (coordinates, taps, the ten float64 product rows: about 250 bytes a
        # pixel) stay within one block, whatever the image's size.
        self.block = block_rows((rows, cols), EVALUATION_BYTES_PER_PIXEL, xp)
        self.support = _support_box(self.moving_cov, xp)

    def _window(self, matrix):
        """Rows and columns of the fixed grid whose samples can land on the moving image's coverage.

        Only those can count (a sample counts where its four neighbours are
        covered); a partial field's footprint is often a third of the grid.
        """
        rows, cols = self.fixed.shape
        if self.support is None:
            return slice(0, rows), slice(0, cols)
        (r0, r1), (c0, c1) = self.support
        corners = np.array([[r0 - 1, r0 - 1, r1 + 1, r1 + 1], [c0 - 1, c1 + 1, c0 - 1, c1 + 1], [1, 1, 1, 1]])
        with np.errstate(all="ignore"):
            points = np.linalg.solve(matrix, corners)[:2]  # matrix maps fixed pixels to moving ones
        if not np.isfinite(points).all():
            return slice(0, rows), slice(0, cols)
        low = np.floor(points.min(axis=1)).astype(int) - 1
        high = np.ceil(points.max(axis=1)).astype(int) + 2
        return (slice(int(np.clip(low[0], 0, rows)), int(np.clip(high[0], 0, rows))),
                slice(int(np.clip(low[1], 0, cols)), int(np.clip(high[1], 0, cols))))

    def _blocks(self, matrix):
        """(rows, cols) slices of one evaluation's blocks at ``matrix``: the window, a block of rows at a time."""
        rows, cols = self._window(matrix)
        return [(slice(start, min(start + self.block, rows.stop)), cols)
                for start in range(rows.start, rows.stop, self.block)]

    def _rows(self, pixels: int):
        """Scratch (10, pixels) float64 for :meth:`_normal_equations`, allocated once per level."""
        if self._buffer is None or self._buffer.shape[1] < pixels:
            self._buffer = self.xp.empty((10, pixels), dtype=self.xp.float64)
        return self._buffer[:, :pixels]

    def _sample(self, matrix, *images, rows=slice(None), cols=slice(None)):
        """Bilinear samples of ``images`` (moving grid) at ``matrix @ p``, and where they are covered.

        Everything stays in the images' dtype (float32 for float32): the
        neighbour's index is floored in floating point and cast afterwards,
        so no integer enters the arithmetic and promotes it to float64. Flat
        indices are ``intp`` (int64), which does not overflow past 2**31 pixels.
        ``rows`` and ``cols`` limit the samples to that window of the fixed grid.
        """
        xp = self.xp
        q_rows, q_cols = map_points(matrix, self.p_rows[rows], self.p_cols[:, cols])
        n_rows, n_cols = self.moving.shape
        inside = (q_rows >= 0) & (q_rows <= n_rows - 1) & (q_cols >= 0) & (q_cols <= n_cols - 1)
        q_rows = xp.clip(q_rows, 0, n_rows - 1)
        q_cols = xp.clip(q_cols, 0, n_cols - 1)
        r0 = xp.minimum(xp.floor(q_rows), max(n_rows - 2, 0))
        c0 = xp.minimum(xp.floor(q_cols), max(n_cols - 2, 0))
        fr, fc = q_rows - r0, q_cols - c0
        fr_, fc_ = 1 - fr, 1 - fc
        # Flat indices of the four neighbours, one gather per neighbour and
        # image from contiguous channel rows (a third of the time of gathering
        # (pixels, channels) rows and interpolating the coverage too).
        top_left = r0.astype(xp.intp) * n_cols + c0.astype(xp.intp)
        right = 1 if n_cols > 1 else 0
        down = n_cols if n_rows > 1 else 0
        index = [top_left, top_left + right, top_left + down, top_left + (down + right)]
        source = self._stacked(images)

        def taps(channel):
            # take: the same values as fancy indexing, a fifth of its time on NumPy.
            return [xp.take(channel, k) for k in index]

        values = []
        for channel in source[:-1]:
            t = taps(channel)
            values.append((t[0] * fc_ + t[1] * fc) * fr_ + (t[2] * fc_ + t[3] * fc) * fr)
        # A point counts when every one of its four neighbours is covered
        # (the coverage is the last row: the product of its four taps).
        t = taps(source[-1])
        covered = inside & (t[0] * t[1] * t[2] * t[3] > 0.5)
        return covered, values

    def _stacked(self, images):
        """``images`` and the moving coverage as (channels, pixels) rows, built once per choice."""
        key = tuple(id(image) for image in images)
        if key not in self._sources:
            channels = list(images) + [self.moving_cov]
            self._sources[key] = self.xp.stack([c.ravel() for c in channels])
        return self._sources[key]

    def _overlap(self, matrix):
        """The warped moving image and the pixels both images cover there."""
        covered, (warped,) = self._sample(matrix, self.moving)
        return warped, covered & self.fixed_valid

    def mse(self, matrix) -> float:
        xp, total, count = self.xp, 0.0, 0.0
        for rows, cols in self._blocks(matrix):  # sums on the device, one read at the end
            covered, (warped,) = self._sample(matrix, self.moving, rows=rows, cols=cols)
            valid = covered & self.fixed_valid[rows, cols]
            diff = xp.where(valid, warped - self.fixed[rows, cols], 0)
            total = total + (diff * diff).sum(dtype=xp.float64)
            count = count + valid.sum()
        total, count = float(total), int(count)
        return float("inf") if count == 0 else total / count

    def ncc(self, matrix) -> float:
        warped, valid = self._overlap(matrix)
        if int(valid.sum()) < 2:
            return 0.0
        return ncc(self.fixed, warped, valid)

    def best_shifts(self, matrix, limit, count, apart):
        """Up to ``count`` shifts ``d`` (rows, cols) at local maxima of the masked NCC of fixed(p) and
        warped(p + d), best first, each more than ``apart`` from a better one along some axis and
        better than no shift."""
        xp = self.xp
        covered, (warped,) = self._sample(matrix, self.moving)
        # The warped image lives on the fixed grid; so does its coverage.
        f_mask = self.fixed_valid.astype(self.fixed.dtype)
        w_mask = covered.astype(self.fixed.dtype)
        scores = _masked_ncc(self.fixed * f_mask, f_mask, warped * w_mask, w_mask, xp)
        rows, cols = scores.shape
        shifts_r = xp.fft.fftfreq(rows, 1 / rows)[:, None]
        shifts_c = xp.fft.fftfreq(cols, 1 / cols)[None, :]
        allowed = (xp.abs(shifts_r) <= limit) & (xp.abs(shifts_c) <= limit)
        scores = xp.where(allowed & xp.isfinite(scores), scores, -xp.inf)
        floor = float(scores[0, 0]) + 1e-6
        # Shift 0 and -1 are neighbours: the FFT order wraps.
        peaks = scores >= ndimage_module(xp).maximum_filter(scores, size=3, mode="wrap")
        order = to_host(xp.argsort(-xp.where(peaks, scores, -xp.inf), axis=None))
        flat, found = to_host(scores).ravel(), []
        shifts_r, shifts_c = to_host(shifts_r).ravel(), to_host(shifts_c).ravel()
        for index in order[: 50 * count]:
            if len(found) == count or not (np.isfinite(flat[index]) and flat[index] > floor):
                break
            r, c = np.unravel_index(index, scores.shape)
            shift = (float(shifts_r[r]), float(shifts_c[c]))
            if all(max(abs(shift[0] - a), abs(shift[1] - b)) > apart for a, b in found):
                found.append(shift)
        return found

    def optimise(self, matrix, max_iter, tolerance):
        """Damped Gauss-Newton on six scaled affine parameters; returns (matrix, iterations, converged)."""
        damping = 1e-3
        current = self._normal_equations(matrix)
        if current is None:
            return matrix, 0, False
        for iteration in range(1, max_iter + 1):
            jtj, jtr, mse, center, radius = current
            while True:
                try:
                    step = np.linalg.solve(jtj + damping * np.diag(np.diag(jtj) + 1e-12), -jtr)
                except np.linalg.LinAlgError:
                    step = np.full(6, np.nan)
                if not np.isfinite(step).all():
                    return matrix, iteration, False  # the normal equations broke down: stop here
                if np.abs(step).max() < tolerance:
                    return matrix, iteration, True  # no step worth taking is left: a minimum
                candidate = _update(matrix, step, center, radius)
                trial = self._normal_equations(candidate) if np.isfinite(candidate).all() else None
                if trial is not None and trial[2] <= mse:
                    break
                damping *= 10
                if damping > 1e8:
                    return matrix, iteration, True  # no downhill step left: a minimum
            matrix, current = candidate, trial
            damping = max(damping / 3, 1e-6)
            if np.abs(step).max() < tolerance:
                return matrix, iteration, True
        return matrix, max_iter, False

    def _normal_equations(self, matrix):
        """``J^T J``, ``J^T r``, MSE, centre and radius of the overlap at ``matrix``.

        One stacked product of ten pixel rows (the six raw Jacobian columns,
        the residual, and the overlap's moments) and one read from the
        device per evaluation; the centring and scaling of the parameters
        are a 6 x 6 change of basis on the host.
        """
        blocks = self._blocks(matrix)
        if not blocks:  # the moving image lies beyond the fixed grid
            return None
        moments = 0
        for rows, cols in blocks:  # summed on the device; one read at the end
            moments = moments + self._block_moments(matrix, rows, cols)
        moments = to_host(moments)  # the one read from the device
        count = float(moments[7, 7])  # weight is 0 or 1: sum(w * w) = sum(w)
        if not count >= 16:
            return None
        center = moments[7, 8:10] / count
        spread = (moments[8, 8] + moments[9, 9]) / count - float(center @ center)
        radius = max(math.sqrt(max(spread, 0.0)), 1.0)
        # Raw columns (g p_r, g p_c, g, ...) to the scaled, centred parameters of _update.
        basis = np.eye(6)
        basis[:4, :4] /= radius
        basis[4, 0] = basis[5, 2] = -center[0] / radius
        basis[4, 1] = basis[5, 3] = -center[1] / radius
        jtj = basis.T @ moments[:6, :6] @ basis / count
        jtr = basis.T @ moments[:6, 6] / count
        mse = float(moments[6, 6]) / count
        if not (np.isfinite(jtj).all() and np.isfinite(jtr).all() and math.isfinite(mse)):
            return None  # overflowing values: no step can be judged here
        return jtj, jtr, mse, (center[0] + self.mid[0], center[1] + self.mid[1]), radius


    def _block_moments(self, matrix, rows, cols):
        """The ten product rows of :meth:`_normal_equations` over the window ``rows, cols``: their 10 x 10 moments."""
        xp = self.xp
        covered, (warped, g_rows, g_cols) = self._sample(matrix, self.moving, self.grad_rows, self.grad_cols,
                                                         rows=rows, cols=cols)
        weight = (covered & self.fixed_valid[rows, cols]).astype(self.fixed.dtype)
        g_rows, g_cols = g_rows * weight, g_cols * weight
        product_rows = self._rows(weight.size)
        # Coordinates about the grid's centre (fixed per level) keep the raw moments small.
        p_rows, p_cols = self.p_rows[rows] - self.mid[0], self.p_cols[:, cols] - self.mid[1]
        products = ((g_rows, p_rows), (g_rows, p_cols), (g_cols, p_rows), (g_cols, p_cols), (g_rows, None),
                    (g_cols, None), (warped - self.fixed[rows, cols], weight), (weight, None), (weight, p_rows),
                    (weight, p_cols))
        for row, (a, b) in zip(product_rows, products):
            if b is None:
                row[...] = a.reshape(-1)
            else:  # the product in float64, without a float64 copy of either factor
                xp.multiply(a, b, out=row.reshape(a.shape[0], -1), dtype=xp.float64)
        return product_rows @ product_rows.T


def _support_box(coverage, xp):
    """``((r0, r1), (c0, c1))``: the rows and columns where ``coverage`` is positive; None where that is all.

    One read from the device per pyramid level.
    """
    rows = np.flatnonzero(to_host((coverage > 0).any(axis=1)))
    cols = np.flatnonzero(to_host((coverage > 0).any(axis=0)))
    if rows.size == 0 or (rows.size == coverage.shape[0] and cols.size == coverage.shape[1]):
        return None
    return (int(rows[0]), int(rows[-1])), (int(cols[0]), int(cols[-1]))


def _update(matrix, step, center, radius):
    """Apply a scaled parameter step: q = (A + dA)(p - c) + (A c + b) + dd."""
    a = matrix[:2, :2]
    b = matrix[:2, 2]
    c = np.asarray(center)
    displacement = a @ c + b + step[4:]
    new_a = a + step[:4].reshape(2, 2) / radius
    out = np.eye(3)
    out[:2, :2] = new_a
    out[:2, 2] = displacement - new_a @ c
    return out


def _masked_ncc(fixed, fixed_mask, moving, moving_mask, xp, overlap_fraction=0.3):
    """Masked normalised cross-correlation for every circular shift (Padfield 2012).

    ``ncc[d]`` compares ``fixed(p)`` with ``moving(p + d)`` over the pixels both
    masks cover; shifts whose overlap is below ``overlap_fraction`` of the
    smaller mask are NaN. Zero padding makes the shifts non-circular.
    """
    rows, cols = fixed.shape
    shape = (2 * rows, 2 * cols)
    fft, ifft = xp.fft.rfft2, xp.fft.irfft2

    def spectrum(x):
        return fft(x.astype(xp.float64), s=shape)

    def correlate(a_spec, b_spec):
        # sum_p a(p) b(p + d)
        return ifft(xp.conj(a_spec) * b_spec, s=shape)

    f, fm, m, mm = spectrum(fixed), spectrum(fixed_mask), spectrum(moving), spectrum(moving_mask)
    overlap = xp.round(correlate(fm, mm))
    sum_f = correlate(f, mm)
    sum_m = correlate(fm, m)
    sum_fm = correlate(f, m)
    sum_ff = correlate(spectrum(fixed * fixed), mm)
    sum_mm = correlate(fm, spectrum(moving * moving))
    safe = xp.maximum(overlap, 1)
    numerator = sum_fm - sum_f * sum_m / safe
    variance = (sum_ff - sum_f**2 / safe) * (sum_mm - sum_m**2 / safe)
    minimum = overlap_fraction * min(float(fixed_mask.sum()), float(moving_mask.sum()))
    ok = (overlap >= minimum) & (variance > 1e-12 * float(xp.abs(variance).max()))
    ncc = xp.where(ok, numerator / xp.sqrt(xp.where(ok, variance, 1)), xp.nan)
    # Keep the shifts of an image-sized window: rows -rows+1..rows-1 and so on.
    keep_r = xp.concatenate([xp.arange(rows), xp.arange(shape[0] - rows + 1, shape[0])])
    keep_c = xp.concatenate([xp.arange(cols), xp.arange(shape[1] - cols + 1, shape[1])])
    return ncc[keep_r[:, None], keep_c[None, :]]
