"""``refine``: the whole job, from a guide and a native-resolution cube to a refined transform.

``refine`` reads like the algorithm; each step is a function of its own:

1. options and inputs checked (:mod:`ggrad_gpu.refinement.options`), the working grid
   chosen (:func:`ggrad_gpu.core.geometry.working_grid`): the guide's region around
   the cube's footprint plus a capture margin, block-averaged by ``s``;
2. the guide and the cube prepared (:mod:`ggrad_gpu.refinement.preparation`): optical
   density, missing values;
3. :func:`ggrad_gpu.refinement.passes.estimate_pass` at the cube's resolution from the
   initial placement (from a coarser pyramid level on a large footprint:
   :func:`ggrad_gpu.refinement.basins.first_level`), the first registration from several
   coarse-search peaks, the one where the cube explains the guide best kept
   (:mod:`ggrad_gpu.refinement.basins`); then again on the working grid from the
   aligned placement (``reestimate``), from the bands that matter (``screen_bands``);
4. the guard (:func:`ggrad_gpu.refinement.guard.judge`) compares the first estimate's
   images before and after, and the fair fit at both placements;
   with ``check``, :mod:`ggrad_gpu.refinement.trust` estimates the result's uncertainty;
5. :func:`ggrad_gpu.refinement.passes.resample` brings the native cube onto the output grid.

Pixels without data (outside the footprint, missing cube or guide values) are
one :class:`ggrad_gpu.core.coverage.Coverage` throughout.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field, replace

import numpy as np

from .._backend import array_module, is_cupy_array, to_device
from .._pages import small_pages
from .._lazy.chunked import checkpoints, chunk_budget
from ..core.estimate import GlobalGradient
from ..registration.register import AffineRegistration
from . import basins, passes, trust
from .guard import judge
from .options import WORKING_BYTES_PER_PIXEL, RefineOptions

__all__ = ["Refinement", "refine"]


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
        (:func:`ggrad_gpu.refinement.basins.fit_at`: what the guard compares), and
        ``spread_px`` (guide pixels, see ``check``; NaN where the initial
        transform was kept), and ``normalised``: whether the estimates after
        the first registration read each spectrum divided by its total (see
        ``normalise``).
    levels : int
        Pyramid levels the estimates used.
    output_to_guide : numpy.ndarray, shape (3, 3)
        Pixel of ``registered`` to guide coordinate: ``working_to_guide``,
        the identity (``output_grid="guide"``), or the grid at about the
        cube's pixel size (``output_grid="cube"``).

    Examples
    --------
    >>> from ggrad_gpu import synthetic
    >>> phantom = synthetic.make_phantom(shape=(64, 80), bands=8, seed=1, signatures="mixed")
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


@small_pages()  # new arrays fault in on small pages where huge ones would stall (_pages)
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
    normalise: bool = True,
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
        chunk with the same stages (:mod:`ggrad_gpu._lazy.chunked`): the cube is
        never held whole, and ``registered`` and ``valid`` come back lazy for
        the caller to store. A pixel with NaN or inf in any band is missing for the
        estimation (eq. 5 needs every band), the same way as guide pixels;
        in ``registered`` it stays NaN in the bands where it was not finite.
    initial : array_like, shape (3, 3), optional
        Guide grid to native cube grid (device-based registration), affine
        and invertible. Default: the cube spans the guide's field of view.
    levels : int or "auto", default "auto"
        Pyramid levels of the estimation. ``"auto"``: the most (up to 4) that
        keep 24 pixels across the cube's footprint at the coarsest level of the
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
        Every refinement records its uncertainty without ground truth,
        ``quality["spread_px"]`` in guide pixels (:mod:`ggrad_gpu.refinement.trust`):
        by default how far the result's own fit could move the footprint's
        corners, judged from blocks of its last images (three standard
        deviations; no extra estimate). A result whose spread exceeds 2 guide
        pixels or half a cube pixel, whichever is larger
        (:func:`ggrad_gpu.refinement.trust.spread_limit`), is not returned as
        refined: the initial transform is kept and ``message`` says it is
        uncertain. A result that moves the footprint more than 4 cube pixels,
        or whose fair fit is weak (``trust.WEAK_FIT``), is also judged as with
        ``check``. ``check`` also measures how far alternative refinements
        that fit as well land from the result over the cube's footprint
        (starts far enough apart to leave a wrong basin, the other
        coarse-search peaks), the fit blocks from a fresh estimate at the
        result, and judges by the largest. NaN when the initial transform was
        kept. Costs a few more estimates and registrations (about as much
        again as ``refine``).
    denoise : bool, default True
        The estimates (eq. 5) read the cube projected on its principal
        components that stand clear of the spectral noise
        (:func:`ggrad_gpu.core.denoise.signal_subspace`); each band's Sobel
        magnitude turns noise into a floor that biases the registration where
        the spatial information is spread over many weak bands (default
        phantom, 60 bands: max TRE 2.59 px without, 0.94 px with). A cube with
        no noise bulk, a map of fewer than 1024 pixels, and the baseline
        methods are left as they are. ``registered`` always comes from the cube as given.
    normalise : bool, default True
        The estimates may read each pixel's spectrum divided by its total
        (:mod:`ggrad_gpu.core.intensity`), after ``denoise``: a gain common to
        all bands (laser power, focus, thickness, X-ray yield) has edges the
        guide lacks, and eq. 5's non-negative weights cannot cancel them (the
        default phantom with its gain left in, 6 drawn cases: mean TRE 3.67 px
        and one case kept 19 px off, against 0.12 px normalised). They do
        where the normalised spectra explain the guide clearly better at the
        first registration's placement
        (:func:`ggrad_gpu.refinement.basins.chosen_intensity`; one more
        estimate), else they read the spectra as given. Never where some
        spectra have totals near zero (centred data, a few counts per pixel)
        or all are equal, nor for the baseline methods.

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
    options = RefineOptions.from_arguments(locals())  # each of its fields is a keyword of refine
    problem = passes.build_problem(guide, cube, initial=initial, progress=progress, mask=mask, options=options)
    xp, grid, initial, timings = problem.xp, problem.grid, problem.initial, problem.timings
    timings["prepare"] = time.perf_counter() - clock

    held, chunk_bytes = _checkpoint_budget(problem)
    with checkpoints(held, chunk_bytes=chunk_bytes):  # where a lazy cube's intermediate steps are kept
        start = time.perf_counter()
        problem = replace(problem, cube=problem.cube.held_coefficients())  # a large projection's, computed once
        timings["prepare"] += time.perf_counter() - start
        first = basins.first_estimate(problem)
        # The first registration from several coarse peaks, the best fit kept (basins).
        registration, placement, candidates = basins.first_registration(problem, first)
        problem = basins.chosen_intensity(problem, placement)  # normalised spectra from here on, or as given
        last = first
        if reestimate:
            # Aligned now: estimate on the working grid itself (its accuracy needs
            # it), and no coarse search, which could only jump away.
            last = passes.estimate_pass(problem, placement, 1, basins.screened_bands(problem, placement))
            registration, placement = passes.register_pass(problem, last, placement, coarse_search=False)
            last_relative = registration.matrix  # the last images were made one registration before the result
        else:
            last_relative = placement

        start = time.perf_counter()
        fits = (basins.fit_at(problem, np.eye(3)), basins.fit_at(problem, placement))
        verdict = judge(first.gradient.grad_x, first.gradient.grad_y, placement, fixed_valid=first.fixed_valid,
                        moving_valid=first.moving_valid, guide_flat=problem.guide.flat, fits=fits)
        if not verdict.improved:
            verdict = replace(verdict, quality={**verdict.quality, "spread_px": math.nan})
        elif not check:
            # The default verdict weighs the result's own fit, at no estimate of its own (the last
            # pass's images, judged at the last registration).
            fit = trust.fit_spread(problem, placement, last, last_relative)
            verdict = trust.verdict_with_spread(verdict, trust.FIT_SIGMAS * fit, trust.spread_limit(problem))
        timings["guard"] = time.perf_counter() - start
        # A fit can be tight in a wrong basin (met after a far move), and a weak one says little:
        # confirm those as check does.
        confirm = verdict.improved and not check and trust.needs_alternatives(problem, placement, fits[1])
        if (check or confirm) and verdict.improved:
            # ... with ``check``, also the alternatives (far starts, other coarse peaks).
            start = time.perf_counter()
            spread = trust.spread(problem, placement, candidates=candidates, images=(last, last_relative))
            verdict = trust.verdict_with_spread(verdict, spread, trust.spread_limit(problem))
            timings["check"] = time.perf_counter() - start
    if verdict.improved:
        matrix, message = initial @ grid.to_guide @ placement @ np.linalg.inv(grid.to_guide), "refined: "
    else:
        matrix, message = initial, f"kept the initial transform: {verdict.reason} ("
    message += verdict.figures + ("" if verdict.improved else ")")
    if not verdict.improved:
        warnings.warn(message, UserWarning, stacklevel=2)

    registered, valid, output_to_guide = passes.resample(problem, matrix, problem.guide_shape)
    gradient = last.gradient
    if is_cupy_array(cube) == (xp is np):
        # Arrays come back in the input cube's kind, wherever they were computed.
        registered, valid, gradient = (_like(cube, a) for a in (registered, valid, gradient))
    timings["total"] = time.perf_counter() - clock
    quality = {**verdict.quality, "normalised": problem.cube.normalised is not None}
    return Refinement(matrix=matrix, initial=initial, working_to_guide=grid.to_guide, registered=registered,
                      valid=valid, gradient=gradient, registration=registration, improved=verdict.improved,
                      message=message, backend=xp.__name__, timings=timings, quality=quality,
                      levels=problem.levels, output_to_guide=output_to_guide)


def _checkpoint_budget(problem):
    """``checkpoints``' arguments: bytes a lazy cube's steps may hold in memory, and the chunk budget.

    What the working grid's 2-D steps leave of ``memory_limit`` (options.WORKING_BYTES_PER_PIXEL),
    halved: the rest is for the tasks; None without a limit (everything in memory).
    """
    limit = problem.options.memory_limit
    if limit is None:
        return None, None
    held = max(0, limit - WORKING_BYTES_PER_PIXEL * int(np.prod(problem.grid.shape))) // 2
    return held, chunk_budget(limit)


def _like(cube, value):
    """``value`` (an array or a GlobalGradient) in the array kind of ``cube``."""
    if isinstance(value, GlobalGradient):
        images = ("grad_x", "grad_y", "guide_levels", "cube_levels", "valid")
        return replace(value, **{name: None if getattr(value, name) is None else _like(cube, getattr(value, name))
                                 for name in images})
    return to_device(value, array_module(cube=cube))
