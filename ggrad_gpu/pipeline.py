"""``refine``: the whole job, from a guide and a native-resolution cube to a refined transform.

``refine`` reads like the algorithm; each step is a function of its own:

1. options and inputs checked (:mod:`ggrad_gpu.options`), the working grid
   chosen (:func:`ggrad_gpu.geometry.working_grid`): the guide's region around
   the cube's footprint plus a capture margin, block-averaged by ``s``;
2. the guide and the cube prepared (:mod:`ggrad_gpu.preparation`): optical
   density, missing values;
3. :func:`estimate_pass` at the cube's resolution from the initial placement
   (from a coarser pyramid level on a large footprint:
   :func:`ggrad_gpu.basins.first_level`), the first registration from several coarse-search peaks, the one where the
   cube explains the guide best kept (:mod:`ggrad_gpu.basins`); then again on
   the working grid from the aligned placement (``reestimate``), from the
   bands that matter (``screen_bands``);
4. the guard (:func:`ggrad_gpu.guard.judge`) compares the first estimate's
   images before and after, and the fair fit at both placements;
   with ``check``, :mod:`ggrad_gpu.trust` estimates the result's uncertainty;
5. :func:`resample` brings the native cube onto the output grid.

Pixels without data (outside the footprint, missing cube or guide values) are
one :class:`ggrad_gpu.coverage.Coverage` throughout.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field, replace

import numpy as np

from . import baselines, basins, trust
from ._backend import array_module, is_cupy_array, ndimage_module, resolve_backend, to_device
from .coverage import Coverage, fill_gaps, level_on_grid, valid_pixels
from .estimate import GlobalGradient, estimate_global_gradient
from .filters import sobel_magnitude
from .chunked import checkpoints, is_dask_array, keep_source
from .geometry import WorkingGrid, cube_output_grid, cube_resolution_step, footprint_mask
from .guard import MIN_OVERLAP, judge
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
from .pyramid import upsample_level
from .register import AffineRegistration, register_affine
from .warp import warp_cube

__all__ = ["Problem", "Refinement", "build_problem", "estimate_pass", "placement_key", "refine", "register_pass",
           "registration_images", "resample", "screened_bands"]


# The registration trusts grad_y where no level's blur draws more than this
# share of its weight from beyond the footprint. The fits (eq. 5, eq. 9) take
# up to half, where most of a blur still sees data; the registration wants
# images free of the stand-ins, which have no edges and would pull a correct
# placement by a few tenths of a pixel (partial-field phantoms from the right
# placement: mean TRE 0.14 px at a half, 0.10 px at a fifth).
TRUSTED_SHARE = 0.2


@dataclass(frozen=True)
class Refinement:
    """Result of :func:`refine`.

    Attributes
    ----------
    matrix : numpy.ndarray, shape (3, 3)
        Full guide grid to the cube's native grid (the initial one when
        ``improved`` is False).
    initial : numpy.ndarray, shape (3, 3)
        The starting transform.
    working_to_guide : numpy.ndarray, shape (3, 3)
        ``S``: working-grid pixel to guide coordinate (its offset is where
        the working grid's region of the guide starts).
    registered : array, shape (rows, cols, bands)
        The cube resampled with ``matrix`` onto the working grid (or the guide
        grid); NaN where the cube does not reach, and where (per band) it
        only reaches missing values (NaN, inf, or outside ``mask``). Same
        array kind as the input cube.
    valid : array of bool, shape (rows, cols)
        Pixels of ``registered`` the cube covers with data (in at least one
        band).
    gradient : GlobalGradient
        The (last) estimate on the working grid: ``grad_x``, ``grad_y``,
        weights.
    registration : AffineRegistration
        The last registration on the working grid; its ``matrix`` is relative
        to the placement that pass started from (``matrix`` above composes them).
    improved : bool
        Whether the refined transform beats the initial one (the guard's MSE
        and NCC of the gradient images over their overlap, and the fair fit).
    message : str
    backend : str
        "numpy" or "cupy": where it was computed.
    timings : dict
        Seconds per stage.
    quality : dict
        TRE-free figures of the match, before and after: ``mse_before``,
        ``mse_after``, ``ncc_before``, ``ncc_after`` of the first estimate's
        gradient images over their overlap, ``fit_before``, ``fit_after``
        (:func:`ggrad_gpu.basins.fit_at`: what the guard compares), and with
        ``check=True`` ``spread_px`` (guide pixels; NaN where the initial
        transform was kept).
    levels : int
        Pyramid levels the estimates used.
    output_to_guide : numpy.ndarray, shape (3, 3)
        Pixel of ``registered`` to guide coordinate: ``working_to_guide``,
        the identity (``output_grid="guide"``), or the grid at about the
        cube's pixel size (``output_grid="cube"``).

    Examples
    --------
    >>> from ggrad_gpu import synthetic
    >>> phantom = synthetic.make_phantom(shape=(64, 80), bands=8, seed=1)
    >>> result = refine(phantom.guide, phantom.cube, initial=phantom.initial, backend="numpy")
    >>> isinstance(result, Refinement), result.backend, result.registered.shape, result.valid.shape
    (True, 'numpy', (64, 80, 8), (64, 80))
    >>> result.improved, bool(np.allclose(result.output_to_guide, result.working_to_guide))
    (True, True)
    """

    matrix: np.ndarray
    initial: np.ndarray
    working_to_guide: np.ndarray
    registered: object
    valid: object
    gradient: GlobalGradient
    registration: AffineRegistration
    improved: bool
    message: str
    backend: str
    timings: dict = field(default_factory=dict)
    quality: dict = field(default_factory=dict)
    levels: int = 0
    output_to_guide: np.ndarray | None = None


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
    report: object
    guide_shape: tuple = ()
    # Memory of this Problem's own passes (not init fields: a dataclasses.replace
    # copy, which may hold other inputs, starts with empty ones).
    # Fair fits (basins.fit_at) by placement: each costs an estimate, a pass over the cube.
    fits: dict = field(default_factory=dict, init=False, repr=False)
    # The last estimate, by its arguments, and every estimate's band weights
    # ("weights", by the same arguments): the band screening asks for those of
    # the fit at the kept placement, which need not be the last one made.
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


def refine(
    guide,
    cube,
    *,
    initial=None,
    levels="auto",
    weights="auto",
    backend: str = "auto",
    working_shape=None,
    output_grid: str = "working",
    method: str = "gradient",
    reestimate: bool = True,
    screen_bands: bool = True,
    order: int = 1,
    psf_sigma: float | None = 0.5,
    absorbance: bool = True,
    progress=None,
    band_axis: int = -1,
    mask=None,
    memory_limit=None,
    check: bool = False,
    denoise: bool = True,
) -> Refinement:
    """Refine a cube's registration to a guide image.

    Parameters
    ----------
    guide : array, shape (rows, cols) or (rows, cols, 3 or 4)
        Brightfield image (NumPy or CuPy). Colour guides (RGB or RGBA) become
        grayscale with the ITU-R BT.709 weights ``0.2125 R + 0.7154 G +
        0.0721 B``, the alpha channel dropped (as ``ggrad_gpu.io.read_guide``
        does). NaN or inf pixels are missing: they are filled from their
        neighbours for the filters and left out of the Gram matrices, the
        level weights and the registration metric.
    cube : array, shape (cube_rows, cube_cols, bands)
        The hyperspectral cube at its native resolution (bands last, or see
        ``band_axis``). A ``dask.array.Array`` (NumPy chunks; on CuPy each
        chunk moves to the device when a task reads it) is computed chunk by
        chunk with the same stages (:mod:`ggrad_gpu.chunked`): the cube is
        never held whole, and ``registered`` and ``valid`` come back lazy for
        the caller to store. A pixel with NaN or inf in any band is missing for the
        estimation (eq. 5 needs every band), the same way as guide pixels;
        in ``registered`` it stays NaN in the bands where it was not finite.
    initial : array_like, shape (3, 3), optional
        Guide grid to native cube grid (device-based registration), affine
        and invertible. Default: the cube spans the guide's field of view.
    levels : int or "auto", default "auto"
        Pyramid levels of the estimation. ``"auto"``: the most (up to 4) that
        keep 8 pixels across the cube's footprint at the coarsest level of the
        grid at the cube's resolution (fewer for small maps). An explicit
        number must fit the grids (at least 3 x 3 pixels at the coarsest
        level); the error for too many says how many fit.
    weights : "auto" or (alpha, beta)
        Level weights (eq. 9) or manual ones: two length-``levels``
        non-negative sequences, not all zero.
    backend : {"auto", "numpy", "cupy"}
        Where to compute; arrays come back in the input's kind.
    working_shape : (int, int), optional
        Overrides the working grid's size (the block factor is derived from
        it). By default the working grid is the guide's region around the
        cube's footprint under ``initial``, plus a capture margin of 45 guide
        pixels or a third of the footprint's size, whichever is larger
        (clipped to the guide), block-averaged by ``s = ceil(r / 6)`` where a
        cube pixel spans ``r`` guide pixels; ``working_to_guide`` gives it.
    output_grid : {"working", "guide", "cube"}
        Grid of ``registered``: the working grid (the region above), the
        full guide grid, or a grid aligned with the guide at about the cube's
        own pixel size (the guide block-averaged by ``max(1, round(r))`` over
        the refined footprint), which keeps a large cube's output about the
        cube's size. ``output_to_guide`` gives the grid.
    method : {"gradient", "band_sum", "band_std", "pca"}
        ``"gradient"`` is the global gradient estimate; the others replace
        ``grad_y`` by the Sobel magnitude of a baseline image (for comparison).
    reestimate : bool, default True
        The first estimate runs on a grid at the cube's own resolution (a
        pyramid level of the working grid) from the initial placement, and
        its registration brings the cube close. With ``reestimate``, the cube
        is then brought onto the working grid with that transform, the weights
        are estimated again there and the registration is refined once more:
        the estimate from a misplaced cube is what limits the first result.
    screen_bands : bool, default True
        Before the re-estimate on the working grid, estimate once more at the
        cube's resolution from the aligned cube (cheap: a few thousand pixels)
        and re-estimate on the working grid from only the bands that this
        estimate weights at some level; the others get weight 0. The working
        grid's Gram matrices then cost ``(bands kept / bands)**2`` of the full
        ones, typically a hundredth. On the 1000-band phantom sweep it gave
        the same registration error as the full re-estimate (see
        ``benchmarks/RESULTS.md``). ``False`` re-estimates over all bands,
        solving eq. 5 exactly on the working grid.
    order : {1, 3}
        Interpolation of the final resampling.
    psf_sigma : float or None, default 0.5
        The guide is compared with the cube at the cube's resolution: blurred
        by a Gaussian of the spectrometer's spot (this sigma, in cube pixels)
        and of the cube's interpolation onto the working grid. Comparing the
        guide's fine edges with a coarse cube biases the registration by a
        fraction of a pixel or more. ``None`` uses the guide as it is (the
        paper's way).
    absorbance : bool, default True
        Compare the cube with the guide's optical density
        ``-log(I / I_max)`` (Beer-Lambert), which, unlike the transmitted
        intensity, is linear in the components' concentrations as the
        spectra are; blurred edges then peak at the same place in both.
        Set False for guides that are not transmitted light.
    progress : callable, optional
        Called with a short description of each stage as it starts (e.g. to
        drive a progress bar).
    band_axis : int, default -1
        The cube's band axis; it is moved last (``moveaxis``, a view, no
        copy). Where the cube's last two axes fit the guide's shape much
        better than its first two, a warning (or the error that the shape
        causes) suggests ``band_axis=0``.
    mask : array of bool, shape (cube_rows, cube_cols), optional
        Valid cube pixels on the cube's native grid (after ``band_axis``);
        False marks a missing pixel, treated as a NaN in every band.
    memory_limit : int or str, optional
        For a ``dask.array.Array`` cube: bytes (or ``"4GB"``-style) the
        run's intermediate cubes may hold in memory; larger ones go to a
        temporary Zarr store, removed at the end. By default they stay in
        memory (``persist``).
    check : bool, default False
        Also estimate the refinement's own uncertainty without ground truth,
        ``quality["spread_px"]`` in guide pixels (:mod:`ggrad_gpu.trust`):
        how far the result's own fit could move the footprint's corners,
        judged from blocks of its images (three standard deviations), and
        how far alternative refinements that fit as well land from the result
        over the cube's footprint (starts far enough apart to leave a wrong
        basin, the other coarse-search peaks). A spread over 1 px says the result
        cannot be trusted to a pixel. NaN when the initial transform was kept.
        Costs a few more estimates and registrations (about as much again as
        ``refine``).
    denoise : bool, default True
        The estimates (eq. 5) read the cube projected on its principal
        components that stand clear of the spectral noise
        (:func:`ggrad_gpu.denoise.signal_subspace`); each band's Sobel
        magnitude turns noise into a floor that biases the registration where
        the spatial information is spread over many weak bands (default
        phantom, 60 bands: max TRE 2.59 px without, 0.94 px with). A cube with
        no noise bulk, a map of fewer than 1024 pixels, and the baseline
        methods are left as they are. ``registered`` always comes from the cube as given.

    Returns
    -------
    Refinement
        ``matrix`` is always finite. Degenerate data (constant or all-zero
        bands, a guide without edges, a cube without spatial structure, too
        little valid overlap) give ``improved=False``, the initial matrix and
        a ``message`` that says why, with a ``UserWarning``.

    Raises
    ------
    ValueError, TypeError
        For input that cannot be used; the message names the parameter:
        ``guide`` or ``cube`` of the wrong shape, complex, empty or too small
        for ``levels``, a guide or cube without any finite pixel, a ``mask``
        of the wrong shape, an ``initial`` that is not an invertible affine
        matrix or places the cube outside the guide, malformed ``weights``,
        and options outside their choices. Integer, boolean, float16 and
        byte-swapped arrays are converted (to float32; float64 stays float64).

    Examples
    --------
    >>> import numpy as np
    >>> from ggrad_gpu import refine, synthetic
    >>> from ggrad_gpu.metrics import target_registration_error
    >>> phantom = synthetic.make_phantom(shape=(120, 140), bands=16, seed=1, signatures="mixed")
    >>> result = refine(phantom.guide, phantom.cube, initial=phantom.initial, levels=3, backend="numpy")
    >>> result.improved, result.registered.shape
    (True, (120, 140, 16))
    >>> bool(target_registration_error(result.matrix, phantom.matrix, (120, 140)).mean < 0.5)
    True
    """
    clock = time.perf_counter()
    problem = build_problem(guide, cube, initial=initial, levels=levels, weights=weights, backend=backend,
                            working_shape=working_shape, output_grid=output_grid, method=method,
                            reestimate=reestimate, screen_bands=screen_bands, order=order, psf_sigma=psf_sigma,
                            absorbance=absorbance, progress=progress, band_axis=band_axis, mask=mask,
                            memory_limit=memory_limit, denoise=denoise)
    if not isinstance(check, bool):
        raise TypeError(f"check must be True or False; got {check!r}")
    xp, grid, initial, timings = problem.xp, problem.grid, problem.initial, problem.timings
    timings["prepare"] = time.perf_counter() - clock

    with checkpoints(problem.options.memory_limit):  # where a lazy cube's intermediate steps are kept
        first = basins.first_estimate(problem)
        # The first registration from several coarse peaks, the best fit kept (basins).
        registration, placement, candidates = basins.first_registration(problem, first)
        last = first
        if reestimate:
            # Aligned now: estimate on the working grid itself (its accuracy needs
            # it), and no coarse search, which could only jump away.
            last = estimate_pass(problem, placement, 1, screened_bands(problem, placement))
            registration, placement = register_pass(problem, last, placement, coarse_search=False)

        start = time.perf_counter()
        fits = (basins.fit_at(problem, np.eye(3)), basins.fit_at(problem, placement))
        verdict = judge(first.gradient.grad_x, first.gradient.grad_y, placement, fixed_valid=first.fixed_valid,
                        moving_valid=first.moving_valid, guide_flat=problem.guide.flat, fits=fits)
        timings["guard"] = time.perf_counter() - start
        if check:
            start = time.perf_counter()
            spread = trust.spread(problem, placement, candidates=candidates) if verdict.improved else math.nan
            verdict = replace(verdict, quality={**verdict.quality, "spread_px": spread})
            timings["check"] = time.perf_counter() - start
    if verdict.improved:
        matrix, message = initial @ grid.to_guide @ placement @ np.linalg.inv(grid.to_guide), "refined: "
    else:
        matrix, message = initial, f"kept the initial transform: {verdict.reason} ("
    message += verdict.figures + ("" if verdict.improved else ")")
    if not verdict.improved:
        warnings.warn(message, UserWarning, stacklevel=2)

    registered, valid, output_to_guide = resample(problem, matrix, problem.guide_shape)
    gradient = last.gradient
    if is_cupy_array(cube) == (xp is np):
        # Arrays come back in the input cube's kind, wherever they were computed.
        registered, valid, gradient = (_like(cube, a) for a in (registered, valid, gradient))
    timings["total"] = time.perf_counter() - clock
    return Refinement(matrix, initial, grid.to_guide, registered, valid, gradient, registration, verdict.improved,
                      message, xp.__name__, timings, verdict.quality, problem.levels, output_to_guide)


def build_problem(guide, cube, *, initial=None, levels="auto", weights="auto", backend="auto", working_shape=None,
                  output_grid="working", method="gradient", reestimate=True, screen_bands=True, order=1,
                  psf_sigma=0.5, absorbance=True, progress=None, band_axis=-1, mask=None,
                  memory_limit=None, denoise=True) -> Problem:
    """The inputs checked and prepared on the working grid, as :func:`refine` starts (same parameters).

    Examples
    --------
    >>> from ggrad_gpu import synthetic
    >>> from ggrad_gpu.pipeline import build_problem
    >>> phantom = synthetic.make_phantom(shape=(120, 140), bands=16, seed=1)
    >>> problem = build_problem(phantom.guide, phantom.cube, initial=phantom.initial, backend="numpy")
    >>> problem.grid.shape, problem.levels
    ((120, 140), 2)
    """
    options = RefineOptions(levels, weights, output_grid, method, reestimate, screen_bands, order, psf_sigma,
                            absorbance, memory_limit, denoise)
    cube = check_inputs(guide, cube, band_axis)
    if progress is not None and not callable(progress):
        raise TypeError(f"progress must be callable or None; got {type(progress).__name__}")
    xp = resolve_backend(backend)
    guide_shape = tuple(guide.shape[:2])
    initial_given = initial is not None
    initial, mask, grid = check_placement(guide_shape, cube, initial, mask, working_shape, options.memory_limit)
    hint = bands_first_hint(cube.shape, guide_shape, initial if initial_given else None) if band_axis % 3 == 2 else ""
    levels = resolve_levels(options, guide_shape, cube.shape, initial, grid, hint)
    if hint:
        warnings.warn(f"cube of shape {tuple(cube.shape)} does not fit the guide's {guide_shape[0]} x "
                      f"{guide_shape[1]} pixels as (rows, cols, bands){hint}", UserWarning, stacklevel=3)
    return Problem(prepare_guide(guide, grid, xp, absorbance=absorbance),
                   prepare_cube(cube, mask, xp, denoise=options.denoise and options.method == "gradient"), initial,
                   grid, levels, options, xp, {}, progress or (lambda stage: None), guide_shape)


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
    (True, (3, 8))
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


def band_weights(problem: Problem, placement, step: int) -> np.ndarray:
    """The band weights (levels, bands) of :func:`estimate_pass` with every band and level, remembered.

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
    key = (placement_key(placement), int(step), int(problem.levels), None)
    weights = problem.last_estimate.get("weights", {}).get(key)
    if weights is None:
        weights = estimate_pass(problem, placement, step).gradient.channel_weights
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
    problem.report(f"estimate ({'all' if bands is None else len(bands)} bands, grid step {step})")
    start = time.perf_counter()
    to_cube = problem.initial @ grid.to_guide @ placement
    shape = grid.level_shape(step)
    to_level = to_cube @ np.diag([step, step, 1.0])  # level pixel i sits at working coordinate step * i
    values = keep_source(cube.for_estimates)  # a large lazy cube: written once, read by windows
    source = values if bands is None else values[:, :, xp.asarray(bands)]
    on_grid = warp_cube(source, to_level, shape, order=1)
    if cube.dead_bands is not None:
        dead = cube.dead_bands if bands is None else np.flatnonzero(np.isin(bands, cube.dead_bands))
        on_grid = _zeroed_bands(on_grid, dead, xp)
    footprint = footprint_mask(cube.values.shape[:2], to_level, shape, xp)
    # The Gram matrices leave out every pixel that draws on a missing cube
    # pixel; the registration metric only those that draw mostly on one.
    share = None if cube.with_data is None else missing_share(cube.with_data, to_level, shape)
    cube_missing = None if share is None else (share > 0.01) & footprint
    reference, guide_missing = matched_guide(problem.guide.image, problem.guide.missing, to_cube,
                                             options.psf_sigma)
    reference = reference[::step, ::step]
    guide_missing = None if guide_missing is None else guide_missing[::step, ::step]
    problem.timings["resample"] = problem.timings.get("resample", 0.0) + time.perf_counter() - start
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
    problem.timings["estimate"] = problem.timings.get("estimate", 0.0) + time.perf_counter() - start
    return estimate


def register_pass(problem: Problem, estimate: Estimate, placement, *, coarse_search: bool, start=None):
    """Register ``grad_y`` to ``grad_x`` on the working grid; the registration and the new placement.

    Missing samples enter as NaN (the registration's own rule for them);
    the footprint as the moving mask. Too little overlap keeps the placement
    (the guard says why). ``start`` (working grid to working grid, relative
    to ``placement``; default the identity) is where the registration begins.

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
    problem.report("register" + (" (with coarse search)" if coarse_search else ""))
    clock = time.perf_counter()
    fixed, moving, mask = registration_images(problem, estimate)
    if fixed is None:
        registration = AffineRegistration(np.eye(3), math.inf, math.inf, 0, False,
                                          message="too few valid pixels to register")
    else:
        registration = register_affine(fixed, moving, initial=start, moving_mask=mask, coarse_search=coarse_search)
    problem.timings["register"] = problem.timings.get("register", 0.0) + time.perf_counter() - clock
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
    problem.report("resample the cube")
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


def screened_bands(problem: Problem, placement):
    """The bands an exact estimate at the cube's resolution, aligned, weights at any level (None: all).

    The working grid's Gram matrices then cost ``(kept / bands)**2`` of the
    full ones (``screen_bands``).

    Examples
    --------
    >>> from ggrad_gpu import synthetic
    >>> phantom = synthetic.make_phantom(shape=(96, 112), bands=8, seed=1)
    >>> problem = build_problem(phantom.guide, phantom.cube, initial=phantom.initial, backend="numpy")
    >>> bands = screened_bands(problem, np.eye(3))
    >>> aligned = estimate_pass(problem, np.eye(3), problem.grid.cube_step)  # what it screens by
    >>> bool(np.array_equal(bands, np.flatnonzero((aligned.gradient.channel_weights > 0).any(axis=0))))
    True
    >>> screened_bands(replace(problem, options=replace(problem.options, screen_bands=False)), np.eye(3)) is None
    True
    """
    options = problem.options
    step = cube_resolution_step(problem.initial @ problem.grid.to_guide @ placement)
    if not (options.screen_bands and options.method == "gradient" and step > 1):
        return None
    support = np.flatnonzero((band_weights(problem, placement, step) > 0).any(axis=0))
    return support if support.size else None


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


def _zeroed_bands(on_grid, bands, xp):
    """``on_grid`` with ``bands`` set to 0 (in place for an in-memory array; lazily for a dask one)."""
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


def _like(cube, value):
    """``value`` (an array or a GlobalGradient) in the array kind of ``cube``."""
    if isinstance(value, GlobalGradient):
        images = ("grad_x", "grad_y", "guide_levels", "cube_levels", "valid")
        return replace(value, **{name: None if getattr(value, name) is None else _like(cube, getattr(value, name))
                                 for name in images})
    return to_device(value, array_module(cube=cube))
