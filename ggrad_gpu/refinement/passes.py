"""The passes of a refinement over one :class:`Problem`: estimate, register, resample.

:func:`build_problem` checks the options and inputs (:mod:`ggrad_gpu.refinement.options`)
and prepares the guide and the cube on the working grid
(:mod:`ggrad_gpu.refinement.preparation`); :func:`estimate_pass` estimates the global
gradient at a pyramid level of the working grid from a placement;
:func:`register_pass` registers its images; :func:`band_weights` remembers each
estimate's band weights; :func:`resample` brings the native cube onto the output grid. The
driver (:func:`ggrad_gpu.refinement.driver.refine`), the basins
(:mod:`ggrad_gpu.refinement.basins`) and the trust estimate
(:mod:`ggrad_gpu.refinement.trust`) call these; this module calls none of them.

Pixels without data (outside the footprint, missing cube or guide values) are
one :class:`ggrad_gpu.core.coverage.Coverage` throughout.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field, replace

import numpy as np

from .._backend import array_module, ndimage_module, resolve_backend
from .._lazy.chunked import is_dask_array
from ..core import baselines
from ..core.coverage import Coverage, fill_gaps, level_on_grid, valid_pixels
from ..core.estimate import GlobalGradient, estimate_global_gradient
from ..core.factored import imagewise, is_factored
from ..core.filters import sobel_magnitude
from ..core.geometry import WorkingGrid, cube_output_grid, footprint_mask, pixels_per_cube_pixel
from ..core.pyramid import upsample_level
from ..core.warp import warp_cube
from ..registration.register import AffineRegistration, register_affine
from .guard import MIN_OVERLAP
from .options import RefineOptions, bands_first_hint, check_inputs, check_placement, resolve_levels
from .preparation import (
    PreparedCube,
    PreparedGuide,
    has_data,
    matched_guide,
    missing_share,
    prepare_cube,
    prepare_guide,
)

__all__ = ["MIN_COARSE_SIDE", "Estimate", "Problem", "band_weights", "build_problem", "coarsened_psf", "coarsening",
           "estimate_pass", "placement_key", "register_pass", "registration_images", "resample"]


# The registration trusts grad_y where no level's blur draws more than this
# share of its weight from beyond the footprint. The fits (eq. 5, eq. 9) take
# up to half, where most of a blur still sees data; the registration wants
# images free of the stand-ins, which have no edges and would pull a correct
# placement by a few tenths of a pixel (partial-field phantoms from the right
# placement: mean TRE 0.14 px at a half, 0.10 px at a fifth).
TRUSTED_SHARE = 0.2


@dataclass(frozen=True)
class Problem:
    """Everything the passes share: the prepared inputs on the working grid and the options.

    Examples
    --------
    >>> from ggrad_gpu import synthetic
    >>> phantom = synthetic.make_phantom(shape=(96, 112), bands=8, seed=1)
    >>> problem = build_problem(phantom.guide, phantom.cube, initial=phantom.initial, backend="numpy")
    >>> isinstance(problem, Problem), problem.xp is np, problem.guide.image.shape == problem.grid.shape
    (True, True, True)
    >>> problem.cube.values is phantom.cube, problem.guide_shape  # nothing missing: the cube itself
    (True, (96, 112))
    """

    guide: PreparedGuide
    cube: PreparedCube
    initial: np.ndarray
    grid: WorkingGrid
    levels: int
    options: RefineOptions
    xp: object
    timings: dict
    progress: object  # called with each stage's description as it starts
    guide_shape: tuple = ()
    # Memory of this Problem's own passes (not init fields: a dataclasses.replace
    # copy, which may hold other inputs, starts with empty ones).
    # Fair fits (basins.fit_at) by placement: each costs an estimate, a pass over the cube.
    fits: dict = field(default_factory=dict, init=False, repr=False)
    # The last estimate, by its arguments, and every estimate's band weights
    # ("weights", by the same arguments): the band screening asks for those of
    # the fit at the kept placement, which need not be the last one made. Also
    # the last fit spread ("fit spread", trust.fit_spread) with its estimate.
    last_estimate: dict = field(default_factory=dict, init=False, repr=False)


@dataclass(frozen=True)
class Estimate:
    """An estimate on the working grid and the coverage of its images there.

    Examples
    --------
    >>> from ggrad_gpu import synthetic
    >>> phantom = synthetic.make_phantom(shape=(96, 112), bands=8, seed=1)
    >>> problem = build_problem(phantom.guide, phantom.cube, initial=phantom.initial, backend="numpy")
    >>> estimate = estimate_pass(problem, np.eye(3), problem.grid.cube_step)
    >>> isinstance(estimate, Estimate), estimate.fixed_valid is None  # no guide pixel is missing
    (True, True)
    """

    gradient: GlobalGradient
    coverage: Coverage

    @property
    def moving_valid(self):
        """Pixels where ``grad_y`` holds the cube's data."""
        cube_gaps = self.coverage.cube_gaps
        return None if cube_gaps is None else ~cube_gaps

    @property
    def fixed_valid(self):
        """Pixels where ``grad_x`` holds the guide's data."""
        missing = self.coverage.guide_missing
        return None if missing is None else ~missing


def build_problem(guide, cube, *, initial=None, progress=None, mask=None, options: RefineOptions | None = None,
                  **choices) -> Problem:
    """The inputs checked and prepared on the working grid, as :func:`refine` starts.

    ``options`` (a :class:`~ggrad_gpu.refinement.options.RefineOptions`), or
    ``choices``: its fields as keywords, as :func:`refine` takes them.

    Examples
    --------
    >>> from ggrad_gpu import synthetic
    >>> from ggrad_gpu.refinement.passes import build_problem
    >>> phantom = synthetic.make_phantom(shape=(120, 140), bands=16, seed=1)
    >>> problem = build_problem(phantom.guide, phantom.cube, initial=phantom.initial, backend="numpy")
    >>> problem.grid.shape, problem.levels  # a 24 x 28 map: one level (geometry.MIN_LEVEL_PIXELS)
    ((120, 140), 1)
    """
    if options is None:
        options = RefineOptions(**choices)
    elif choices:
        raise TypeError(f"build_problem takes options or choices, not both; got options and {sorted(choices)}")
    band_axis = options.band_axis
    cube = check_inputs(guide, cube, band_axis)
    if progress is not None and not callable(progress):
        raise TypeError(f"progress must be callable or None; got {type(progress).__name__}")
    xp = resolve_backend(options.backend)
    guide_shape = tuple(guide.shape[:2])
    initial_given = initial is not None
    initial, mask, grid = check_placement(guide_shape, cube, initial, mask, options.working_shape,
                                          options.memory_limit)
    hint = bands_first_hint(cube.shape, guide_shape, initial if initial_given else None) if band_axis % 3 == 2 else ""
    levels = resolve_levels(options, guide_shape, cube.shape, initial, grid, hint)
    if hint:
        warnings.warn(f"cube of shape {tuple(cube.shape)} does not fit the guide's {guide_shape[0]} x "
                      f"{guide_shape[1]} pixels as (rows, cols, bands){hint}", UserWarning, stacklevel=3)
    return Problem(guide=prepare_guide(guide, grid, xp, absorbance=options.absorbance),
                   cube=prepare_cube(cube, mask, xp, denoise=options.denoise and options.method == "gradient",
                                     normalise=options.normalise and options.method == "gradient",
                                     memory_limit=options.memory_limit),
                   initial=initial, grid=grid, levels=levels, options=options, xp=xp, timings={},
                   progress=progress or (lambda stage: None), guide_shape=guide_shape)


def estimate_pass(problem: Problem, placement, step: int, bands=None, levels=None) -> Estimate:
    """Estimate on the working grid's pyramid level with pixel step ``step``, brought to the working grid.

    Parameters
    ----------
    problem : Problem
    placement : numpy.ndarray, shape (3, 3)
        Working grid to working grid: where the cube is placed so far
        (``initial @ S @ placement`` maps working pixels to the cube).
    step : int
        ``2**k``: estimate on level ``k`` of the working grid (the cube's
        resolution for the first estimate, 1 for the re-estimate).
    bands : numpy.ndarray of int, optional
        Only these bands (the others get weight 0).
    levels : int, optional
        Pyramid levels (default ``problem.levels``).

    Examples
    --------
    >>> from ggrad_gpu import synthetic
    >>> phantom = synthetic.make_phantom(shape=(96, 112), bands=8, seed=1)
    >>> problem = build_problem(phantom.guide, phantom.cube, initial=phantom.initial, backend="numpy")
    >>> problem.grid.cube_step  # 5 guide pixels per cube pixel: the first estimate runs on every 2nd pixel
    2
    >>> estimate = estimate_pass(problem, np.eye(3), problem.grid.cube_step)
    >>> estimate.gradient.grad_y.shape == problem.grid.shape, estimate.gradient.channel_weights.shape
    (True, (2, 8))
    >>> estimate_pass(problem, np.eye(3), problem.grid.cube_step) is estimate  # the same pass again: remembered
    True
    >>> estimate_pass(replace(problem), np.eye(3), problem.grid.cube_step) is estimate  # a copy makes its own
    False
    """
    xp, grid, options, cube = problem.xp, problem.grid, problem.options, problem.cube
    levels = problem.levels if levels is None else levels
    key = (placement_key(placement), int(step), int(levels), None if bands is None else np.asarray(bands).tobytes())
    last_key, last = problem.last_estimate.get("last", (None, None))
    if last_key == key:
        return last
    estimate = _estimate(problem, placement, step, bands, levels)
    problem.last_estimate["last"] = (key, estimate)
    problem.last_estimate.setdefault("weights", {})[key] = estimate.gradient.channel_weights
    return estimate


def band_weights(problem: Problem, placement, step: int, levels=None) -> np.ndarray:
    """The band weights (levels, bands) of :func:`estimate_pass` with every band, remembered.

    Only the weights are kept of each estimate (a small array), so an
    estimate made earlier for a fit is not made again for its weights.

    Examples
    --------
    >>> from ggrad_gpu import synthetic
    >>> phantom = synthetic.make_phantom(shape=(96, 112), bands=8, seed=1)
    >>> problem = build_problem(phantom.guide, phantom.cube, initial=phantom.initial, backend="numpy")
    >>> made = estimate_pass(problem, np.eye(3), problem.grid.cube_step).gradient.channel_weights
    >>> _ = estimate_pass(problem, np.diag([1.0, 1.0, 1.0]) + np.eye(3, k=2), problem.grid.cube_step)  # another
    >>> band_weights(problem, np.eye(3), problem.grid.cube_step) is made  # remembered, not estimated again
    True
    """
    levels = problem.levels if levels is None else levels
    key = (placement_key(placement), int(step), int(levels), None)
    weights = problem.last_estimate.get("weights", {}).get(key)
    if weights is None:
        weights = estimate_pass(problem, placement, step, levels=levels).gradient.channel_weights
    return weights


def placement_key(placement) -> bytes:
    """A placement as a key of the passes' memory (:attr:`Problem.fits`, the last estimate).

    Examples
    --------
    >>> placement_key(np.eye(3)) == placement_key(np.eye(3, dtype=np.float32)), len(placement_key(np.eye(3)))
    (True, 72)
    """
    return np.asarray(placement, dtype=np.float64).tobytes()


def _estimate(problem: Problem, placement, step: int, bands, levels: int) -> Estimate:
    """:func:`estimate_pass`'s work, without its memory of the last estimate."""
    xp, grid, options, cube = problem.xp, problem.grid, problem.options, problem.cube
    problem.progress(f"estimate ({'all' if bands is None else len(bands)} bands, grid step {step})")
    start = time.perf_counter()
    to_cube = problem.initial @ grid.to_guide @ placement
    shape = grid.level_shape(step)
    to_level = to_cube @ np.diag([step, step, 1.0])  # level pixel i sits at working coordinate step * i
    times = coarsening(problem, step)
    values = cube.coarsened(times)  # made once; a large lazy cube's kept on disk and read by windows
    to_source = np.diag([0.5**times, 0.5**times, 1.0]) @ to_level  # its level-j pixel i sits at 2**j * i
    on_grid = _warped(values, bands, to_source, shape, xp)
    if cube.dead_bands is not None:
        dead = cube.dead_bands if bands is None else np.flatnonzero(np.isin(bands, cube.dead_bands))
        on_grid = _zeroed_bands(on_grid, dead, xp)
    footprint = footprint_mask(cube.values.shape[:2], to_level, shape, xp)
    if times:  # a coarse level's footprint ends up to 2**(times - 1) cube px short of the cube's
        footprint &= footprint_mask(values.shape[:2], to_source, shape, xp)
    # The Gram matrices leave out every pixel that draws on a missing cube
    # pixel; the registration metric only those that draw mostly on one.
    share = None if cube.with_data is None else missing_share(cube.with_data, to_level, shape)
    cube_missing = None if share is None else (share > 0.01) & footprint
    reference, guide_missing = matched_guide(problem.guide.image, problem.guide.missing, to_cube,
                                             coarsened_psf(options.psf_sigma, times))
    reference = reference[::step, ::step]
    guide_missing = None if guide_missing is None else guide_missing[::step, ::step]
    _add_seconds(problem, "resample", time.perf_counter() - start)
    start = time.perf_counter()
    coverage = Coverage(None if bool(footprint.all()) else footprint, cube_missing, guide_missing)
    if options.method == "gradient":
        gradient = estimate_global_gradient(reference, on_grid, levels=levels,
                                            weights=options.weights, coverage=coverage)
    else:
        gradient = _baseline_gradient(reference, on_grid, coverage, options.method)
    # What the registration may trust: the footprint's pixels whose blur at no
    # level draws much on stand-ins, and the cube's pixels that draw mostly on
    # missing ones.
    trusted = Coverage(
        _inner(valid_pixels(_invert(coverage.footprint), levels, shape, share=TRUSTED_SHARE)),
        None if share is None else (share > 0.5) & footprint,
        guide_missing,
    )
    estimate = _on_working_grid(gradient, trusted, step, grid.shape)
    if bands is not None:
        every_band = np.zeros((gradient.channel_weights.shape[0], cube.values.shape[2]))
        every_band[:, bands] = gradient.channel_weights
        estimate = replace(estimate, gradient=replace(estimate.gradient, channel_weights=every_band))
    _add_seconds(problem, "estimate", time.perf_counter() - start)
    return estimate


# A cube's pyramid level is read only while it keeps at least this many pixels across.
MIN_COARSE_SIDE = 16


def coarsening(problem: Problem, step: int) -> int:
    """The level of the cube's pyramid that an estimate on pixel step ``step`` reads (0: the cube itself).

    Where the estimate's pixels lie 2 or more cube pixels apart (the grids
    that choose among basins, :func:`ggrad_gpu.refinement.basins.basin_level`,
    on a cube of more than their pixels), its bilinear samples of the cube
    itself would alias what lies between them, and on a cube beyond memory
    every such estimate is a pass over the whole cube. The cube's pyramid
    level ``j`` with samples 1 to 2 of its pixels apart is blurred for them,
    and made once (:meth:`PreparedCube.coarsened`). A cube with missing
    values is always read itself (the blur would spread them).

    Examples
    --------
    >>> from types import SimpleNamespace
    >>> from ggrad_gpu.core.geometry import working_grid
    >>> grid = working_grid((2048, 2048), (1024, 1024), np.diag([0.5, 0.5, 1.0]))  # 2 working px per cube px
    >>> problem = SimpleNamespace(grid=grid, initial=np.diag([0.5, 0.5, 1.0]),
    ...                           cube=SimpleNamespace(with_data=None, values=np.empty((1024, 1024, 1))))
    >>> [coarsening(problem, step) for step in (1, 2, 4, 8)]  # samples 0.5, 1, 2 and 4 cube px apart
    [0, 0, 1, 2]
    """
    if problem.cube.with_data is not None:
        return 0
    spacing = step / pixels_per_cube_pixel(problem.initial @ problem.grid.to_guide)
    times = int(math.floor(math.log2(spacing))) if spacing >= 2 else 0
    side = min(problem.cube.values.shape[:2])
    while times and side >> times < MIN_COARSE_SIDE:
        times -= 1
    return times


def coarsened_psf(psf_sigma, times: int):
    """``psf_sigma`` (cube px) for a guide compared with the cube's pyramid level ``times`` (:func:`coarsening`).

    The level's blurs (variance ``(4**j - 1) / 3`` cube px squared) and
    its coarser bilinear interpolation (``4**j / 6`` in place of ``1 / 6``)
    added to the spot's; None (the guide as it is) stays None.

    Examples
    --------
    >>> coarsened_psf(0.5, 0), round(coarsened_psf(0.5, 1)**2, 6), coarsened_psf(None, 2)
    (0.5, 1.75, None)
    """
    if psf_sigma is None or times == 0:
        return psf_sigma
    return math.sqrt(psf_sigma**2 + (4**times - 1) / 2)


def _add_seconds(problem: Problem, stage: str, seconds: float) -> None:
    """Add a pass's ``seconds`` to ``problem.timings[stage]``."""
    problem.timings[stage] = problem.timings.get(stage, 0.0) + seconds


def register_pass(problem: Problem, estimate: Estimate, placement, *, coarse_search: bool, start=None, stop=None):
    """Register ``grad_y`` to ``grad_x`` on the working grid; the registration and the new placement.

    Missing samples enter as NaN (the registration's own rule for them);
    the footprint as the moving mask. Too little overlap keeps the placement
    (the guard says why). ``start`` (working grid to working grid, relative
    to ``placement``; default the identity) is where the registration begins;
    ``stop`` (``register_affine``'s) is given the new placement.

    Examples
    --------
    >>> from ggrad_gpu import synthetic
    >>> from ggrad_gpu.metrics import target_registration_error
    >>> phantom = synthetic.make_phantom(shape=(96, 112), bands=8, seed=1)
    >>> problem = build_problem(phantom.guide, phantom.cube, initial=phantom.initial, backend="numpy")
    >>> estimate = estimate_pass(problem, np.eye(3), problem.grid.cube_step)
    >>> registration, placement = register_pass(problem, estimate, np.eye(3), coarse_search=True)
    >>> to_guide = problem.grid.to_guide
    >>> refined = problem.initial @ to_guide @ placement @ np.linalg.inv(to_guide)  # guide to cube
    >>> before = target_registration_error(phantom.initial, phantom.matrix, (96, 112)).mean
    >>> after = target_registration_error(refined, phantom.matrix, (96, 112)).mean
    >>> bool(after < before / 3)
    True
    """
    problem.progress("register" + (" (with coarse search)" if coarse_search else ""))
    clock = time.perf_counter()
    fixed, moving, mask = registration_images(problem, estimate)
    if fixed is None:
        registration = AffineRegistration(np.eye(3), math.inf, math.inf, 0, False,
                                          message="too few valid pixels to register")
    else:
        placed = None if stop is None else lambda matrix, level: stop(placement @ matrix, level)
        registration = register_affine(fixed, moving, initial=start, moving_mask=mask, coarse_search=coarse_search,
                                       stop=placed)
    _add_seconds(problem, "register", time.perf_counter() - clock)
    return registration, placement @ registration.matrix


def registration_images(problem: Problem, estimate: Estimate):
    """``grad_x`` and ``grad_y`` with NaN at missing samples, and the footprint; three Nones if too few overlap.

    Examples
    --------
    >>> from ggrad_gpu import synthetic
    >>> phantom = synthetic.make_phantom(shape=(96, 112), bands=8, seed=1)
    >>> problem = build_problem(phantom.guide, phantom.cube, initial=phantom.initial, backend="numpy")
    >>> estimate = estimate_pass(problem, np.eye(3), problem.grid.cube_step)
    >>> fixed, moving, footprint = registration_images(problem, estimate)
    >>> fixed is estimate.gradient.grad_x, moving.shape, footprint is None  # nothing missing, the cube spans the grid
    (True, (96, 112), True)
    """
    xp = problem.xp
    gradient, coverage = estimate.gradient, estimate.coverage
    overlap = estimate.moving_valid
    if overlap is not None and int(overlap.sum()) < MIN_OVERLAP:
        return None, None, None
    fixed, moving = gradient.grad_x, gradient.grad_y
    if coverage.guide_missing is not None:
        fixed = xp.where(coverage.guide_missing, xp.nan, fixed)
    if coverage.cube_missing is not None:
        moving = xp.where(coverage.cube_missing, xp.nan, moving)
    return fixed, moving, coverage.footprint


def resample(problem: Problem, matrix, guide_shape):
    """The native cube on the output grid through ``matrix`` (guide to cube).

    Returns ``(registered, valid, output_to_guide)``: the resampled cube, its
    pixels with data, and the output grid's pixel-to-guide matrix.

    Examples
    --------
    >>> from ggrad_gpu import synthetic
    >>> phantom = synthetic.make_phantom(shape=(96, 112), bands=8, seed=1)
    >>> problem = build_problem(phantom.guide, phantom.cube, initial=phantom.initial, backend="numpy")
    >>> registered, valid, to_guide = resample(problem, phantom.matrix, (96, 112))
    >>> registered.shape, bool(np.array_equal(to_guide, problem.grid.to_guide))
    ((96, 112, 8), True)
    >>> expected = warp_cube(phantom.cube, phantom.matrix @ to_guide, problem.grid.shape)
    >>> bool(np.allclose(registered, expected, equal_nan=True)), bool(valid.any())
    (True, True)
    """
    problem.progress("resample the cube")
    start = time.perf_counter()
    grid = problem.options.output_grid
    if grid == "working":
        to_guide, out_shape = problem.grid.to_guide, problem.grid.shape
    elif grid == "cube":
        to_guide, out_shape = cube_output_grid(guide_shape, problem.cube.values.shape, matrix)
    else:
        to_guide, out_shape = np.eye(3), guide_shape
    out_matrix = matrix @ to_guide
    values = problem.cube.values
    registered = warp_cube(values, out_matrix, out_shape, order=problem.options.order)
    valid = footprint_mask(values.shape[:2], out_matrix, out_shape, problem.xp)
    if problem.cube.with_data is not None or problem.cube.dead_bands is not None:
        valid = valid & has_data(registered)  # missing pixels are not covered
    problem.timings["warp"] = time.perf_counter() - start
    return registered, valid, to_guide


def _on_working_grid(gradient: GlobalGradient, coverage: Coverage, step: int, shape) -> Estimate:
    """An estimate on the level with pixel step ``step`` and its coverage, on the working grid ``shape``."""
    if step > 1:
        level = int(round(math.log2(step)))
        gradient = replace(gradient, grad_x=upsample_level(gradient.grad_x, level, shape),
                           grad_y=upsample_level(gradient.grad_y, level, shape))
        # Each map as the pixels it excludes, carried to the working grid.
        excluded = (None if m is None else level_on_grid(m, level, shape)
                    for m in (_invert(coverage.footprint), coverage.cube_missing, coverage.guide_missing))
        outside, cube_missing, guide_missing = excluded
        coverage = Coverage(_invert(outside), cube_missing, guide_missing)
    estimate = Estimate(gradient, coverage)
    valid = estimate.moving_valid
    if estimate.fixed_valid is not None:
        valid = estimate.fixed_valid if valid is None else valid & estimate.fixed_valid
    return replace(estimate, gradient=replace(gradient, valid=valid))


def _warped(values, bands, matrix, shape, xp):
    """``values`` (or its ``bands``) warped by ``matrix`` onto ``shape``: factored where that is smaller.

    A :class:`ggrad_gpu.core.factored.FactoredCube` stays factored (its
    coefficient images warped) while it has fewer coefficients than the
    bands read; else the bands are made from it first, at its own
    resolution.
    """
    if is_factored(values):
        source = values if bands is None else values.bands(bands)
        if source.rank < source.shape[2]:
            return imagewise(lambda images: warp_cube(images, matrix, shape, order=1), source)
        values, bands = source.dense(), None
    source = values if bands is None else values[:, :, xp.asarray(bands)]
    return warp_cube(source, matrix, shape, order=1)


def _zeroed_bands(on_grid, bands, xp):
    """``on_grid`` with ``bands`` set to 0 (in place for an in-memory array; lazily for a dask one)."""
    if is_factored(on_grid):
        zero = np.ones(on_grid.shape[2])
        zero[bands] = 0.0
        return on_grid.band_scaled(zero)
    if is_dask_array(on_grid):
        zero = np.zeros(on_grid.shape[2], dtype=bool)
        zero[bands] = True
        return on_grid.map_blocks(_where_zero, zero, dtype=on_grid.dtype)
    on_grid[:, :, xp.asarray(bands)] = 0
    return on_grid


def _where_zero(block, zero):
    xp = array_module(block=block)
    return xp.where(xp.asarray(zero), block.dtype.type(0), block)


def _inner(valid):
    """``valid`` less the pixels next to its edge, whose Sobel reads the stand-ins beyond it."""
    if valid is None:
        return None
    xp = array_module(valid=valid)
    return ndimage_module(xp).binary_erosion(valid, xp.ones((3, 3), dtype=bool), border_value=1)


def _invert(mask):
    return None if mask is None else ~mask


def _baseline_gradient(guide, on_grid, coverage: Coverage, method):
    """A one-level GlobalGradient whose ``grad_y`` is a baseline image's Sobel magnitude."""
    xp = array_module(guide=guide, on_grid=on_grid)
    gaps = coverage.gaps
    covered = xp.ones(guide.shape, dtype=bool) if gaps is None else ~gaps
    image = baselines.BASELINES[method](on_grid, mask=covered)
    image = fill_gaps(xp.nan_to_num(image), ~covered)
    grad_x = sobel_magnitude(guide)
    grad_y = sobel_magnitude(image.astype(grad_x.dtype))
    valid = ndimage_module(xp).minimum_filter(covered.astype(xp.uint8), size=3, mode="nearest").astype(bool)
    # The MSE needs comparable scales: each gradient image at unit mean over the overlap.
    count = float(valid.sum())
    if count > 0:  # means by masked sums: no boolean indexing (an index array and a sync on CuPy)
        grad_x = grad_x / max(float(xp.where(valid, grad_x, 0).sum()) / count, 1e-30)
        grad_y = grad_y / max(float(xp.where(valid, grad_y, 0).sum()) / count, 1e-30)
    one = np.ones(1)
    return GlobalGradient(grad_x, grad_y, one, one, np.zeros((1, on_grid.shape[2])), grad_x[None], grad_y[None], valid)
