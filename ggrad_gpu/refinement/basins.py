"""Capture across basins: the first registration from several coarse-search peaks, judged by a fair fit.

The first estimate's weights (eq. 5) are fitted with the cube where the
device placed it, so its ``grad_y`` is a compromise that can favour a wrong
placement: on repetitive texture or a small map, the best cross-correlation
peak of these images can be a wrong basin, and the affine fit there then
beats the right placement on the very images it was found on (a 20 x 20 map
on 100 x 100 guide pixels, default phantom, seed 2: gradient NCC 0.674 at a
lock 51 px away against 0.660 at the truth). Neither the registration nor a
guard on these images can tell the two apart.

What tells them apart is the estimate itself: placed at a candidate, the
cube's bands are fitted to the guide's gradients afresh (eq. 5 at the cube's
resolution, cheap), and the NCC of ``grad_x`` and that ``grad_y`` over the
footprint, :func:`fit_at`, says how well the cube explains the guide there
(0.995 at the truth, 0.715 at the wrong lock, 0.063 at the device placement
in that case). Every placement gets its own best weights, so the comparison
favours none. :func:`first_registration` registers as before (the best coarse
peak, then Gauss-Newton on the first estimate's images) and, besides, from
each of the best few coarse peaks with the weights estimated afresh there,
and keeps the candidate with the best fit.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .._affine import translation
from ..core.coverage import NoDataError
from ..core.geometry import cube_resolution_step, degeneracy
from ..registration.metrics import ncc
from ..registration.register import AffineRegistration, coarse_shifts
from . import passes
from .guard import MAX_SCALE_CHANGE

__all__ = ["BASIN_PIXELS", "CANDIDATES", "FIT_PITCH", "NORMALISED_MARGIN", "Candidate", "basin_level",
           "chosen_intensity", "first_estimate", "first_level", "fit_at", "fit_level", "first_registration",
           "screened_bands"]

# Coarse peaks tried besides the device placement. Each costs one
# registration of the first estimate's images and one estimate at the cube's
# resolution (basin_level).
CANDIDATES = 3
# Pixels of the grid that the candidates' estimates and the fits run on, at
# most: they only choose among basins (the re-estimate on the working grid
# sets the accuracy), and on a streamed cube each one is a pass over it.
BASIN_PIXELS = 512 * 512
# The normalised spectra must explain the guide by this much more (fair fit at the first
# registration's placement) to be read instead of the spectra as given. At the true placement,
# where the totals vary by a gain the guide lacks, they lead by 0.25-0.37 (the default phantom with
# its gain left in, 6 drawn cases; counts at 50 per pixel: 0.27); where the totals are part of the
# contrast they lead by at most 0.016 or trail (the P45 hypermap; the two-modality phantom's second
# cube, which registered better as given: 0.12-0.13 against 0.25-0.39 px mean).
NORMALISED_MARGIN = 0.05
# The fair fits sample the cube once per cube pixel (the first estimate and the candidates' at
# least every 0.8 cube pixel, as cube_resolution_step gives): they only compare placements. A
# 128 x 128 x 256 tile at 4 guide px per tile px: 0.45 s per fit on every 2nd pixel, 4x fewer
# pixels here. On the count-limited phantom (4 guide px per cube px, 50 counts per pixel, 16
# starts) the fits at this pitch gave the same results; the first estimate and the candidates'
# at this pitch lost 2 of 16 starts.
FIT_PITCH = 1.0


@dataclass(frozen=True)
class Candidate:
    """A first registration, the placement it gives and the fair fit there (-1 where implausible).

    Examples
    --------
    >>> from ggrad_gpu import synthetic
    >>> from ggrad_gpu.refinement.passes import build_problem, estimate_pass
    >>> phantom = synthetic.make_phantom(shape=(96, 112), bands=8, seed=1)
    >>> problem = build_problem(phantom.guide, phantom.cube, initial=phantom.initial, backend="numpy")
    >>> first = estimate_pass(problem, np.eye(3), problem.grid.cube_step)
    >>> _, placement, candidates = first_registration(problem, first)
    >>> all(isinstance(c, Candidate) for c in candidates), bool(np.allclose(candidates[0].placement, placement))
    (True, True)
    >>> bool(np.isclose(candidates[0].fit, fit_at(problem, placement)))  # the fair fit where it places the cube
    True
    """

    registration: AffineRegistration
    placement: np.ndarray
    fit: float


def fit_at(problem, placement) -> float:
    """How well the cube explains the guide at ``placement``: NCC of a fresh estimate's images.

    Parameters
    ----------
    problem : ggrad_gpu.refinement.passes.Problem
    placement : numpy.ndarray, shape (3, 3)
        Working grid to working grid (as in :func:`ggrad_gpu.refinement.passes.estimate_pass`).

    Returns
    -------
    float
        The NCC of ``grad_x`` and ``grad_y`` over the pixels both hold,
        with the weights estimated (eq. 5, 9) at ``placement`` on the grid
        level that samples the cube once per cube pixel (coarser for a
        large footprint: :func:`fit_level`); 0.0 where nothing overlaps or
        the matrix is not finite.

    Examples
    --------
    >>> import numpy as np
    >>> from ggrad_gpu import synthetic
    >>> from ggrad_gpu.refinement.passes import build_problem
    >>> from ggrad_gpu.refinement.basins import fit_at
    >>> phantom = synthetic.make_phantom(shape=(120, 140), bands=16, seed=1, signatures="mixed", shift=(6, -4))
    >>> problem = build_problem(phantom.guide, phantom.cube, initial=phantom.initial, backend="numpy")
    >>> truth = np.linalg.inv(phantom.initial) @ phantom.matrix  # s = 1, no crop: S is the identity
    >>> bool(fit_at(problem, truth) > fit_at(problem, np.eye(3)) + 0.2)
    True
    """
    if not np.isfinite(placement).all():
        return 0.0
    key = passes.placement_key(placement)
    if key not in problem.fits:  # each fit costs an estimate: a pass over the cube
        step, levels = fit_level(problem)
        try:
            problem.fits[key] = _fit(passes.estimate_pass(problem, placement, step, levels=levels), step)
        except NoDataError:  # every pixel there draws on missing data: it fits nothing
            problem.fits[key] = 0.0
    return problem.fits[key]


def chosen_intensity(problem, placement):
    """``problem``, or its copy that reads the spectra as given, whichever explains the guide better.

    Where the cube has normalised spectra (``refine(normalise=True)``,
    :mod:`ggrad_gpu.core.intensity`), their fair fit at ``placement`` (the
    first registration's, made with them) must beat that of the spectra as
    given by :data:`NORMALISED_MARGIN`; otherwise the estimates that follow
    read the spectra as given. At the device placement, misplaced by tens of
    pixels, both fit too little to tell (leads of 0.04-0.16 where they are
    0.25-0.37 at the truth). One more estimate, only for a cube whose totals
    differ.

    Examples
    --------
    >>> from ggrad_gpu import synthetic
    >>> from ggrad_gpu.refinement.passes import build_problem
    >>> phantom = synthetic.make_phantom(shape=(200, 240), bands=40, native_factor=4, normalisation=None, seed=1)
    >>> problem = build_problem(phantom.guide, phantom.cube, initial=phantom.initial, backend="numpy")
    >>> truth = np.linalg.inv(phantom.initial) @ phantom.matrix  # s = 1, no crop: S is the identity
    >>> chosen = chosen_intensity(problem, truth)  # a gain the guide lacks: the normalised spectra fit better
    >>> chosen.cube.normalised is problem.cube.normalised, chosen.fits == problem.fits
    (True, True)
    >>> normalised = synthetic.make_phantom(shape=(200, 240), bands=40, native_factor=4, seed=1)
    >>> problem = build_problem(normalised.guide, normalised.cube, initial=normalised.initial, backend="numpy")
    >>> problem.cube.normalised is None and chosen_intensity(problem, truth) is problem  # equal totals: no choice
    True
    """
    if problem.cube.normalised is None:
        return problem
    as_given = replace(problem, cube=problem.cube.as_given())
    if not fit_at(problem, placement) > fit_at(as_given, placement) + NORMALISED_MARGIN:
        return as_given
    # The projection as given is read no more: let it go, keeping what the passes remember.
    lean = replace(problem, cube=replace(problem.cube, denoised=None))
    lean.fits.update(problem.fits)
    lean.last_estimate.update(problem.last_estimate)
    return lean

def screened_bands(problem, placement):
    """The bands the fair fit at ``placement`` weights at any level (None: every band).

    The re-estimate on the working grid then reads only these: its Gram
    matrices cost ``(kept / bands)**2`` of the full ones (``screen_bands``).
    The weights are those of :func:`fit_at`'s estimate, which the guard makes
    at the result anyway, so screening costs no estimate of its own. An
    estimate of every band at the cube's own resolution, as the screening
    made before, cost 0.5-0.9 s at the paper's geometry (1000 bands) and
    gave the same results to 0.005 px (the default phantom's sweeps: 4 drawn
    cases of 1000 bands, 10 of 100).

    Examples
    --------
    >>> from dataclasses import replace
    >>> from ggrad_gpu import synthetic
    >>> from ggrad_gpu.refinement.passes import band_weights, build_problem
    >>> phantom = synthetic.make_phantom(shape=(96, 112), bands=8, seed=1)
    >>> problem = build_problem(phantom.guide, phantom.cube, initial=phantom.initial, backend="numpy")
    >>> bands = screened_bands(problem, np.eye(3))
    >>> fitted = band_weights(problem, np.eye(3), *fit_level(problem))  # the fit's weights: remembered
    >>> bool(np.array_equal(bands, np.flatnonzero((fitted > 0).any(axis=0))))
    True
    >>> screened_bands(replace(problem, options=replace(problem.options, screen_bands=False)), np.eye(3)) is None
    True
    """
    options = problem.options
    step = cube_resolution_step(problem.initial @ problem.grid.to_guide @ placement)
    if not (options.screen_bands and options.method == "gradient" and step > 1):
        return None
    fit_at(problem, placement)  # its estimate's weights are remembered
    support = np.flatnonzero((passes.band_weights(problem, placement, *fit_level(problem)) > 0).any(axis=0))
    return support if support.size else None


def basin_level(problem) -> tuple[int, int]:
    """Pixel step and pyramid levels of the estimates that choose among basins.

    The estimate at the cube's resolution (``problem.grid.cube_step``,
    ``problem.levels``), its finest levels dropped while its grid has more
    than :data:`BASIN_PIXELS` pixels: the same pyramid from a coarser level
    on, never coarser than its coarsest level.

    Examples
    --------
    >>> from types import SimpleNamespace
    >>> from ggrad_gpu.core.geometry import working_grid
    >>> import numpy as np
    >>> grid = working_grid((2048, 2048), (1024, 1024), np.diag([0.5, 0.5, 1.0]))
    >>> grid.shape, grid.cube_step
    ((2048, 2048), 1)
    >>> auto = SimpleNamespace(auto_weights=True)
    >>> basin_level(SimpleNamespace(grid=grid, levels=5, options=auto))  # 512 x 512 pixels at step 4
    (4, 3)
    >>> basin_level(SimpleNamespace(grid=grid, levels=2, options=auto))  # no coarser than the coarsest level
    (2, 1)
    """
    step, levels = problem.grid.cube_step, problem.levels
    if not problem.options.auto_weights:  # the user's weights name every level
        return step, levels
    while levels > 1 and int(np.prod(problem.grid.level_shape(step))) > BASIN_PIXELS:
        step, levels = 2 * step, levels - 1
    return step, levels


def fit_level(problem) -> tuple[int, int]:
    """Pixel step and pyramid levels of the fair fits (:func:`fit_at`).

    :func:`basin_level`, from a coarser level on while that level still
    samples the cube once per cube pixel (:data:`FIT_PITCH`), with as many
    levels fewer: the same coarsest level.

    Examples
    --------
    >>> from types import SimpleNamespace
    >>> from ggrad_gpu.core.geometry import working_grid
    >>> import numpy as np
    >>> grid = working_grid((900, 900), (128, 128), np.diag([0.25, 0.25, 1.0]))  # 4 guide px per cube px
    >>> problem = SimpleNamespace(grid=grid, levels=3, initial=np.diag([0.25, 0.25, 1.0]),
    ...                           options=SimpleNamespace(auto_weights=True))
    >>> basin_level(problem), fit_level(problem)  # every 2nd pixel, then every 4th (one per cube pixel)
    ((2, 3), (4, 2))
    """
    step, levels = basin_level(problem)
    coarsest = cube_resolution_step(problem.initial @ problem.grid.to_guide, pitch=FIT_PITCH)
    while levels > 1 and step < coarsest:
        step, levels = 2 * step, levels - 1
    return step, levels


def first_level(problem) -> tuple[int, int]:
    """Pixel step and pyramid levels of the first estimate, from the device placement.

    :func:`basin_level` when a re-estimate on the working grid follows (it
    sets the accuracy; the first estimate only starts the search), else the
    cube's resolution with every level.

    Examples
    --------
    >>> from types import SimpleNamespace
    >>> from ggrad_gpu.core.geometry import working_grid
    >>> import numpy as np
    >>> grid = working_grid((2048, 2048), (1024, 1024), np.diag([0.5, 0.5, 1.0]))
    >>> first_level(SimpleNamespace(grid=grid, levels=5, options=SimpleNamespace(auto_weights=True, reestimate=True)))
    (4, 3)
    >>> first_level(SimpleNamespace(grid=grid, levels=5, options=SimpleNamespace(auto_weights=True, reestimate=False)))
    (1, 5)
    """
    if problem.options.reestimate:
        return basin_level(problem)
    return problem.grid.cube_step, problem.levels


def first_estimate(problem):
    """The first estimate, from the device placement, at :func:`first_level`.

    Examples
    --------
    >>> from ggrad_gpu import synthetic
    >>> from ggrad_gpu.refinement.passes import build_problem
    >>> phantom = synthetic.make_phantom(shape=(120, 140), bands=16, seed=1)
    >>> problem = build_problem(phantom.guide, phantom.cube, initial=phantom.initial, backend="numpy")
    >>> estimate = first_estimate(problem)  # a small footprint: the cube's resolution, every level
    >>> first_level(problem) == (problem.grid.cube_step, problem.levels), len(estimate.gradient.alpha)
    (True, 1)
    >>> estimate.gradient.grad_y.shape == problem.grid.shape
    True
    """
    step, levels = first_level(problem)
    return passes.estimate_pass(problem, np.eye(3), step, levels=levels)


def _fit(estimate, step: int) -> float:
    """The fair fit of an estimate at the cube's resolution (pixel step ``step``); see :func:`fit_at`."""
    gradient = estimate.gradient
    valid = gradient.valid
    pixels = (gradient.grad_x.size if valid is None else int(valid.sum())) / step**2
    if pixels < 2:
        return 0.0
    correlation = ncc(gradient.grad_x, gradient.grad_y, valid)
    # Adjusted R^2: a placement that leaves fewer pixels for as many weights
    # (a footprint shrunk by a scale change, a small map with many bands)
    # fits better by chance alone; n counts pixels at the cube's resolution.
    weights = int((gradient.channel_weights > 0).sum()) + 2 * len(gradient.alpha)
    unexplained = (1 - correlation**2) * (pixels - 1) / max(pixels - weights - 1, 1)
    return float(np.sign(correlation) * np.sqrt(max(1 - unexplained, 0.0)))


def first_registration(problem, first):
    """The first registration: from the device placement and the best coarse peaks, the best fit kept.

    Parameters
    ----------
    problem : ggrad_gpu.refinement.passes.Problem
    first : ggrad_gpu.refinement.passes.Estimate
        The first estimate (:func:`first_estimate`).

    Returns
    -------
    registration : AffineRegistration
    placement : numpy.ndarray, shape (3, 3)
    candidates : list of Candidate
        Every candidate tried, the kept one first.

    Examples
    --------
    >>> from ggrad_gpu import synthetic
    >>> from ggrad_gpu.metrics import target_registration_error
    >>> from ggrad_gpu.refinement.passes import build_problem, estimate_pass
    >>> phantom = synthetic.make_phantom(shape=(96, 112), bands=8, seed=1)
    >>> problem = build_problem(phantom.guide, phantom.cube, initial=phantom.initial, backend="numpy")
    >>> first = estimate_pass(problem, np.eye(3), problem.grid.cube_step)
    >>> registration, placement, candidates = first_registration(problem, first)
    >>> max(c.fit for c in candidates) == candidates[0].fit  # the best fit kept, first
    True
    >>> to_guide = problem.grid.to_guide
    >>> refined = problem.initial @ to_guide @ placement @ np.linalg.inv(to_guide)
    >>> before = target_registration_error(phantom.initial, phantom.matrix, (96, 112)).mean
    >>> bool(target_registration_error(refined, phantom.matrix, (96, 112)).mean < before / 3)
    True
    """
    if first_level(problem) == fit_level(problem):  # the estimate fit_at makes there
        problem.fits.setdefault(passes.placement_key(np.eye(3)), _fit(first, fit_level(problem)[0]))
    step, levels = basin_level(problem)
    # The plain way: the best coarse peak of the first estimate's images, then Gauss-Newton on them.
    tries = [(first, np.eye(3), True)]
    fixed, moving, mask = passes.registration_images(problem, first)
    if fixed is not None:
        try:
            shifts = coarse_shifts(fixed, moving, moving_mask=mask, count=CANDIDATES)
        except ValueError:  # no usable pixel: the plain way says why
            shifts = []
        # From each peak, with the bands fitted afresh there: the first
        # estimate's weights, fitted with the cube misplaced, can pull
        # Gauss-Newton away from a peak next to the truth.
        tries += [(None, translation(*shift), False) for shift in shifts]

    def attempt(try_):
        estimate, start, search = try_
        if estimate is None:
            try:
                estimate = passes.estimate_pass(problem, start, step, levels=levels)
            except NoDataError:  # a peak that moves the cube off every pixel with data
                return None
        return passes.register_pass(problem, estimate, start, coarse_search=search)

    # The tries, then the fits of the basins they found.
    found = []
    for result in map(attempt, tries):
        if result is not None and not any(np.allclose(result[1], other, atol=0.5) for _, other in found):
            found.append(result)  # a basin not met before

    def fair_fit(placement):
        return -1.0 if degeneracy(placement, MAX_SCALE_CHANGE) else fit_at(problem, placement)

    fits = [fair_fit(placement) for _, placement in found]
    candidates = [Candidate(registration, placement, fit) for (registration, placement), fit in zip(found, fits)]
    candidates.sort(key=lambda c: -c.fit)
    best = candidates[0]
    return best.registration, best.placement, candidates
