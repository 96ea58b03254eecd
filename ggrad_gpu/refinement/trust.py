"""Trust without ground truth: how far the result could be off (``spread_px``), in guide pixels over the footprint.

On real data there is no known transform, so ``refine(check=True)`` asks the
data again and measures, over the cube's footprint in guide pixels (the
TRE's points and distance, with the result in place of the truth):

- **the result's own fit, block by block**: the final registration's images,
  estimated at the result, cut into blocks (about ``BLOCKS_ACROSS`` across the
  footprint), and the affine fit's covariance from how the blocks' pulls vary
  (:func:`ggrad_gpu.registration.register.displacement_covariance`, a block bootstrap of
  the last Gauss-Newton step in closed form), propagated to the footprint's
  corners: ``FIT_SIGMAS`` standard deviations of the worst corner count as a
  distance. This is the part that sizes a right result's error. On the
  phantoms of the trust sweeps (benchmarks/RESULTS.md, issue 12) that error
  is a bias, not chance: the same case without noise, or with fresh noise,
  errs by nearly the same corner displacements (noise is about a twentieth
  of the mean squared corner error), and registering smoothed images keeps
  it. It comes from where the guide's edges and the cube's fitted edges
  differ, which the residual holds; the blocks measure how much that
  difference can move the fit (as if it were a random field no wider than
  a block). The realised error of one case is one draw of it: this sizes
  the error, it cannot say its sign.
- **starts far enough apart to leave a wrong basin**: the registration is
  started again a sixth of the footprint away along each axis. Perturbed
  starts alone fall back into the same wrong lock; from this far, a start
  either fails to be captured (and lands where the cube explains the guide
  clearly worse: it does not count) or finds a placement that explains it as
  well or better, which means the result is ambiguous (repetitive texture) or
  wrong, and its distance counts;
- **the other coarse-search peaks** of the first registration
  (:mod:`ggrad_gpu.refinement.basins`) that fit about as well as the kept one, finished
  on the result's images from where they were, counted the same way.

"Explains as well" is the fair fit (:func:`ggrad_gpu.refinement.basins.fit_at`) within
``FIT_TOLERANCE`` of the result's. ``spread_px`` is the largest distance that
counts. Refinements on disjoint halves of the bands were counted too until
the measurement above: they see the spectral noise only, which is not what
errs, and a half of a few screened bands went astray by itself (2 px on a
result 0.35 px off, a false alarm); the blocks' residual holds the noise as
well.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from ..core.geometry import pixels_per_cube_pixel
from ..registration.metrics import footprint_region, target_registration_error
from ..registration.register import displacement_covariance, point_variances
from . import basins, passes

__all__ = ["AWAY_LEVEL_PIXELS", "AWAY_SHARE", "BLOCKS_ACROSS", "FIT_SIGMAS", "FIT_TOLERANCE", "MAX_SPREAD_PX",
           "Alternative", "Spread", "FAR_MOVE_CUBE_PX", "MAX_SPREAD_CUBE_PX", "WEAK_FIT", "alternative_distance",
           "assess", "fit_covariance", "fit_spread", "is_far_move", "needs_alternatives", "spread", "spread_limit",
           "verdict_with_spread"]

# An alternative counts when its fair fit is at least the result's less this
# share of what the result leaves unexplained (1 - fit), and at least less 0.01.
FIT_TOLERANCE = 0.25
# Far starts: this share of the footprint's smaller side (working pixels) away.
FAR_START = 1 / 6
# An alternative that ends this close (guide px) is back at the result: its fit is not estimated again.
NEAR_PX = 0.5
# A start still this share of its distance from the result after a coarse level (and twice the
# spread limit) is in another basin: its finer levels, which only polish where it lies, are
# skipped. On a 128 x 128 x 256 tile (4 guide px per tile px) the four far starts ended 110-420
# guide px away after 1.1 s of registration each, most of it on the finest levels.
AWAY_SHARE = 0.5
# ... and more than this many of the level's pixels: a coarse level's optimum can lie a pixel from
# the finest one. A 1024 x 1024 x 256 cube on a 4096 x 4096 guide (4 guide px per working px): a
# coarse peak 1-2 px from the result stopped 8 px away after a coarse level, which its fit (0.996,
# as the result's) counted as a spread of 8 px, and the right result (0.73 px mean) was kept.
AWAY_LEVEL_PIXELS = 2
# The result's own fit: blocks about this many across the footprint's smaller side, at least 8 working px.
BLOCKS_ACROSS = 8
# ... and this many standard deviations of the worst footprint corner count as a distance.
FIT_SIGMAS = 3.0
# A result whose spread exceeds this many guide pixels, or MAX_SPREAD_CUBE_PX cube pixels where
# those are larger, is not returned as refined: it could lie that far elsewhere. Right results on
# the real SEM-EDS pair (P45, 75 x 100 x 92, one guide pixel per cube pixel, mean TRE 0.35-0.40
# px) have a spread of 1.2-1.4 px; those accepted worse than their start before this verdict,
# and the negative control's, 3.8 px or more.
MAX_SPREAD_PX = 2.0
MAX_SPREAD_CUBE_PX = 0.5
# A refinement that moves the footprint further than this many cube pixels is confirmed by the
# alternatives (:func:`assess`) even without ``check``: a tight fit in a wrong basin has a small
# fit spread, and stage placements are rarely this far off (a real 20 x 20 Raman map moved
# 55 guide px from its stage placement, called refined; its alternatives spread 49 px).
FAR_MOVE_CUBE_PX = 4.0
# A result whose fair fit (basins.fit_at) stays below this explains too little of the guide's
# gradient for its own fit's spread to be believed: it is confirmed by the alternatives too. On
# a real TEM-EDS map of 0.4 X-ray counts per pixel (64 x 64, same-scan HAADF image), 4 of 12
# misplaced starts were called refined, 3 of them worse than their start, at fits of 0.37-0.47
# and fit spreads of 1.8-2.0 px; their alternatives spread 16-22 px. Right results on the real
# SEM-EDS maps fit at 0.87-0.92 (unchanged); count-limited phantoms at 50 counts per pixel fit at
# 0.44 and their alternatives agree within 1.5 px (still refined).
WEAK_FIT = 0.6


@dataclass(frozen=True)
class Alternative:
    """One independent refinement: what it was, its distance from the result, its fair fit, whether it counts.

    Examples
    --------
    >>> back = Alternative("far start", distance_px=0.2, fit=0.91, counts=True)  # came back to the result
    >>> away = Alternative("far start", distance_px=44.5, fit=0.35, counts=False)  # another basin, fits worse
    >>> max(a.distance_px for a in (back, away) if a.counts) < NEAR_PX  # what the spread would count
    True
    """

    kind: str
    distance_px: float
    fit: float
    counts: bool


@dataclass(frozen=True)
class Spread:
    """The uncertainty estimate: ``spread_px`` (largest counted distance), the result's fit, every alternative.

    Examples
    --------
    >>> from ggrad_gpu import synthetic
    >>> from ggrad_gpu.refinement.passes import build_problem
    >>> phantom = synthetic.make_phantom(shape=(96, 112), bands=16, seed=1, signatures="mixed", shift=(4, -3))
    >>> problem = build_problem(phantom.guide, phantom.cube, initial=phantom.initial, backend="numpy")
    >>> result = assess(problem, np.linalg.inv(phantom.initial) @ phantom.matrix)  # at the true placement
    >>> isinstance(result, Spread), sorted({a.kind for a in result.alternatives})
    (True, ['far start', 'fit blocks'])
    >>> result.spread_px == max(a.distance_px for a in result.alternatives if a.counts), bool(result.fit > 0.9)
    (True, True)
    """

    spread_px: float
    fit: float
    alternatives: tuple


def spread(problem, placement, *, candidates=(), images=None) -> float:
    """``spread_px`` of a refined ``placement`` (see :func:`assess`).

    Examples
    --------
    >>> from ggrad_gpu import synthetic
    >>> from ggrad_gpu.refinement.passes import build_problem
    >>> phantom = synthetic.make_phantom(shape=(120, 140), bands=16, seed=1, signatures="mixed", shift=(4, -3))
    >>> problem = build_problem(phantom.guide, phantom.cube, initial=phantom.initial, backend="numpy")
    >>> truth = np.linalg.inv(phantom.initial) @ phantom.matrix  # s = 1, no crop: S is the identity
    >>> bool(spread(problem, truth) < 1.5)  # within a third of a cube pixel (5 guide px)
    True
    """
    return assess(problem, placement, candidates=candidates, images=images).spread_px


def assess(problem, placement, *, candidates=(), images=None) -> Spread:
    """How far independent refinements land from ``placement``, in guide pixels over the footprint.

    Parameters
    ----------
    problem : ggrad_gpu.refinement.passes.Problem
        From :func:`ggrad_gpu.refinement.passes.build_problem`.
    placement : numpy.ndarray, shape (3, 3)
        The result to assess, working grid to working grid (``refine``'s
        ``matrix`` is ``initial @ S @ placement @ inv(S)``); any placement,
        e.g. one deliberately started in a wrong basin.
    candidates : sequence of ggrad_gpu.refinement.basins.Candidate, optional
        The first registration's candidates (other coarse peaks).
    images : (Estimate, numpy.ndarray), optional
        The result's images: an estimate made at ``placement @ inv(relative)``
        and ``relative`` (``refine`` passes its last estimate and the
        registration that ended at ``placement``). Default: a fresh estimate
        at ``placement`` (on the working grid, the bands its fit weights).

    Returns
    -------
    Spread

    Examples
    --------
    >>> import numpy as np
    >>> from ggrad_gpu import synthetic
    >>> from ggrad_gpu.refinement.passes import build_problem
    >>> from ggrad_gpu.refinement.trust import assess
    >>> phantom = synthetic.make_phantom(shape=(120, 140), bands=16, seed=1, signatures="mixed", shift=(4, -3))
    >>> problem = build_problem(phantom.guide, phantom.cube, initial=phantom.initial, backend="numpy")
    >>> truth = np.linalg.inv(phantom.initial) @ phantom.matrix  # s = 1, no crop: S is the identity
    >>> bool(assess(problem, truth).spread_px < 1.5)
    True
    """
    fit = basins.fit_at(problem, placement)
    alternatives = []

    def add(kind, other, other_fit):
        counts = other_fit >= fit - max(0.01, FIT_TOLERANCE * (1 - fit))
        alternatives.append(Alternative(kind, alternative_distance(problem, placement, other), other_fit, counts))

    if images is None:
        # The result's own images, estimated where it placed the cube (the
        # alternatives' registrations are relative to where their images were made).
        step = 1 if problem.options.reestimate else problem.grid.cube_step
        bands = basins.screened_bands(problem, placement) if step == 1 else None
        images = passes.estimate_pass(problem, placement, step, bands), np.eye(3)
    estimate, relative = images
    made_at = placement @ np.linalg.inv(relative)
    alternatives.append(Alternative("fit blocks", FIT_SIGMAS * fit_spread(problem, placement, estimate, relative),
                                    fit, True))
    reach = FAR_START * _footprint_side(problem, placement)
    starts = [("far start", np.array([[1.0, 0, dr], [0, 1, dc], [0, 0, 1]]))
              for dr, dc in ((reach, 0), (-reach, 0), (0, reach), (0, -reach))]
    # The other coarse peaks that fit about as well, finished on the result's
    # images: the same basin comes back to the result, another stays away.
    # Their fits are this problem's (remembered where it made them): the first
    # registration may have read other spectra (basins.chosen_intensity).
    starts += [("coarse peak", np.linalg.solve(placement, c.placement)) for c in candidates
               if c.fit >= 0 and basins.fit_at(problem, c.placement) >= fit - max(0.01, FIT_TOLERANCE * (1 - fit))]

    def is_near(other):
        return alternative_distance(problem, placement, other) < NEAR_PX

    limit = spread_limit(problem)

    def finish(start):
        # One back next to the result after a coarse level stays there, and one still far from it stays
        # away: either way its finer levels are skipped.
        away = max(AWAY_SHARE * alternative_distance(problem, placement, placement @ start), 2 * limit)

        def settled(other, level):
            distance = alternative_distance(problem, placement, other)
            return distance < NEAR_PX or distance > max(away, AWAY_LEVEL_PIXELS * 2**level * problem.grid.s)

        _, other = passes.register_pass(problem, estimate, made_at, coarse_search=False, start=relative @ start,
                                        stop=settled)
        return other, fit if is_near(other) else basins.fit_at(problem, other)  # back at the result: its fit

    for kind, start in starts:
        add(kind, *finish(start))
    counted = [a.distance_px for a in alternatives if a.counts and math.isfinite(a.distance_px)]
    return Spread(max(counted, default=0.0), fit, tuple(alternatives))


def spread_limit(problem) -> float:
    """The widest ``spread_px`` a refined result may have: :data:`MAX_SPREAD_PX` guide pixels, or
    :data:`MAX_SPREAD_CUBE_PX` of the cube's pixels where those are larger.

    Examples
    --------
    >>> from ggrad_gpu import synthetic
    >>> from ggrad_gpu.refinement.passes import build_problem
    >>> phantom = synthetic.make_phantom(shape=(96, 112), bands=8, seed=1)  # about 5 guide px per cube px
    >>> round(spread_limit(build_problem(phantom.guide, phantom.cube, initial=phantom.initial)), 2)
    2.42
    """
    return max(MAX_SPREAD_PX, MAX_SPREAD_CUBE_PX * pixels_per_cube_pixel(problem.initial))


def needs_alternatives(problem, placement, fit: float) -> bool:
    """Whether a refined ``placement`` of fair fit ``fit`` must be confirmed by the alternatives.

    A far move (:func:`is_far_move`: a tight fit in a wrong basin has a small
    fit spread), or a weak fit (below :data:`WEAK_FIT`: the fit's own spread
    says little where the cube explains little of the guide).

    Examples
    --------
    >>> from ggrad_gpu import synthetic
    >>> from ggrad_gpu.refinement.passes import build_problem
    >>> phantom = synthetic.make_phantom(shape=(96, 112), bands=8, seed=1)  # about 5 guide px per cube px
    >>> problem = build_problem(phantom.guide, phantom.cube, initial=phantom.initial)
    >>> near = np.array([[1.0, 0, 3], [0, 1, 0], [0, 0, 1]])
    >>> needs_alternatives(problem, near, 0.9), needs_alternatives(problem, near, 0.45)
    (False, True)
    """
    return fit < WEAK_FIT or is_far_move(problem, placement)


def is_far_move(problem, placement) -> bool:
    """Whether ``placement`` moves the footprint more than :data:`FAR_MOVE_CUBE_PX` cube pixels anywhere.

    Examples
    --------
    >>> from ggrad_gpu import synthetic
    >>> from ggrad_gpu.refinement.passes import build_problem
    >>> phantom = synthetic.make_phantom(shape=(96, 112), bands=8, seed=1)  # about 5 guide px per cube px
    >>> problem = build_problem(phantom.guide, phantom.cube, initial=phantom.initial)
    >>> [is_far_move(problem, np.array([[1.0, 0, shift], [0, 1, 0], [0, 0, 1]])) for shift in (10, 30)]
    [False, True]
    """
    return alternative_distance(problem, np.eye(3), placement) > FAR_MOVE_CUBE_PX * pixels_per_cube_pixel(problem.initial)


def verdict_with_spread(verdict, spread_px: float, limit: float = MAX_SPREAD_PX):
    """The guard's ``verdict`` with ``spread_px`` recorded, and refused where the spread is too wide.

    A refined result that could lie more than ``limit`` guide pixels
    elsewhere (:func:`spread_limit`; or whose spread cannot be estimated) is
    not refined: the initial transform is kept, and the reason gives the
    spread.

    Examples
    --------
    >>> from ggrad_gpu.refinement.guard import Verdict
    >>> quality = {"mse_before": 0.2, "mse_after": 0.05, "ncc_before": 0.3, "ncc_after": 0.9}
    >>> verdict_with_spread(Verdict(True, "", quality), 0.4).improved
    True
    >>> refused = verdict_with_spread(Verdict(True, "", quality), 6.5)
    >>> refused.improved, refused.reason, refused.quality["spread_px"]
    (False, 'the result is uncertain: it could lie 6.5 px elsewhere (more than 2 px)', 6.5)
    """
    quality = {**verdict.quality, "spread_px": float(spread_px)}
    if verdict.improved and not spread_px <= limit:
        where = f"{spread_px:.2g} px" if math.isfinite(spread_px) else "an unknown distance"
        reason = f"the result is uncertain: it could lie {where} elsewhere (more than {limit:.3g} px)"
        return replace(verdict, improved=False, reason=reason, quality=quality)
    return replace(verdict, quality=quality)


def alternative_distance(problem, placement, other) -> float:
    """Max over the footprint under ``placement`` of how far ``other`` moves a guide point, in guide pixels.

    Both are working-grid placements of ``problem``; the distance is the TRE
    of ``other``'s guide-to-cube matrix against ``placement``'s, on a grid of
    about 10 x 10 points over the footprint's bounding box.

    Examples
    --------
    >>> from ggrad_gpu import synthetic
    >>> from ggrad_gpu.refinement.passes import build_problem
    >>> phantom = synthetic.make_phantom(shape=(96, 112), bands=8, seed=1)
    >>> problem = build_problem(phantom.guide, phantom.cube, initial=phantom.initial, backend="numpy")
    >>> problem.grid.s  # working pixels are guide pixels
    1
    >>> two_down = np.array([[1.0, 0, 2], [0, 1, 0], [0, 0, 1]])
    >>> [round(alternative_distance(problem, np.eye(3), other), 9) for other in (np.eye(3), two_down)]
    [0.0, 2.0]
    """
    if not np.isfinite(other).all():
        return math.inf
    main, alt = (_guide_matrix(problem, m) for m in (placement, other))
    region = footprint_region(problem.cube.values.shape[:2], main, problem.guide_shape)
    if min(region[2:]) < 1:  # the footprint left the guide: over the whole guide
        region = (0, 0) + tuple(problem.guide_shape)
    spacing = max(1, min(region[2:]) // 10)
    return target_registration_error(alt, main, problem.guide_shape, spacing=spacing, region=region).max


def fit_spread(problem, placement, estimate, relative=None) -> float:
    """One standard deviation of the result's own fit at the footprint's worst corner, in guide pixels.

    The root of the largest per-corner trace of :func:`fit_covariance`. NaN
    where the images have too little overlap.

    Examples
    --------
    >>> from ggrad_gpu import synthetic
    >>> from ggrad_gpu.refinement.passes import build_problem, estimate_pass
    >>> phantom = synthetic.make_phantom(shape=(120, 140), bands=16, seed=1, signatures="mixed")
    >>> problem = build_problem(phantom.guide, phantom.cube, initial=phantom.initial, backend="numpy")
    >>> truth = np.linalg.inv(phantom.initial) @ phantom.matrix  # s = 1, no crop: working = guide grid
    >>> spread = fit_spread(problem, truth, estimate_pass(problem, truth, 1))
    >>> bool(0 < spread < 1)  # at the truth, the fit's own uncertainty is a fraction of a pixel
    True
    """
    # Remembered for these images: refine's default verdict and the confirmation that may follow
    # (assess with refine's images) ask for the same one.
    key = (passes.placement_key(placement), None if relative is None else passes.placement_key(relative))
    last = problem.last_estimate.get("fit spread")
    if last is not None and last[0] is estimate and last[1] == key:
        return last[2]
    spread_px = float(np.sqrt(np.max(point_variances(fit_covariance(problem, placement, estimate, relative)))))
    problem.last_estimate["fit spread"] = (estimate, key, spread_px)
    return spread_px


def fit_covariance(problem, placement, estimate, relative=None) -> np.ndarray:
    """The joint covariance of the footprint's four corners under the result's own fit, in guide pixels squared.

    ``estimate`` is made at ``placement`` (its registration images are
    judged at the identity), or at ``placement @ inv(relative)`` (they are
    judged at ``relative``: ``refine`` passes its last estimate and
    registration, so the default verdict costs no estimate of its own);
    :func:`ggrad_gpu.registration.register.displacement_covariance`
    over blocks of about a ``BLOCKS_ACROSS``-th of the footprint's smaller
    side (at least 8 working px), at the corners of the footprint's bounding
    box (where an affine error is largest), scaled to guide pixels. Shape
    (8, 8), ordered (row, col) of the corners top-left, top-right,
    bottom-left, bottom-right; NaN where the images have too little overlap.

    Examples
    --------
    >>> from ggrad_gpu import synthetic
    >>> from ggrad_gpu.refinement.passes import build_problem, estimate_pass
    >>> phantom = synthetic.make_phantom(shape=(120, 140), bands=16, seed=1, signatures="mixed")
    >>> problem = build_problem(phantom.guide, phantom.cube, initial=phantom.initial, backend="numpy")
    >>> truth = np.linalg.inv(phantom.initial) @ phantom.matrix
    >>> covariance = fit_covariance(problem, truth, estimate_pass(problem, truth, 1))
    >>> covariance.shape, bool(np.allclose(covariance, covariance.T))
    ((8, 8), True)
    """
    fixed, moving, mask = passes.registration_images(problem, estimate)
    if fixed is None:
        return np.full((8, 8), math.nan)
    region = footprint_region(problem.cube.values.shape[:2], _guide_matrix(problem, placement), problem.guide_shape)
    if min(region[2:]) < 1:
        region = (0, 0) + tuple(problem.guide_shape)
    row0, col0, rows, cols = region
    corners = np.array([[row0, col0, 1], [row0, col0 + cols - 1, 1], [row0 + rows - 1, col0, 1],
                        [row0 + rows - 1, col0 + cols - 1, 1]], dtype=np.float64)
    working = np.linalg.solve(problem.grid.to_guide, corners.T)[:2].T
    relative = np.eye(3) if relative is None else np.asarray(relative, dtype=np.float64)
    block = max(8, round(_footprint_side(problem, placement) / BLOCKS_ACROSS))
    covariance = displacement_covariance(fixed, moving, relative, working, moving_mask=mask, block=block)
    return covariance * problem.grid.s**2


def _guide_matrix(problem, placement):
    to_guide = problem.grid.to_guide
    return problem.initial @ to_guide @ placement @ np.linalg.inv(to_guide)


def _footprint_side(problem, placement) -> float:
    """The footprint's smaller side under ``placement``, in working pixels."""
    rows, cols = problem.cube.values.shape[:2]
    corners = np.array([[-0.5, -0.5, rows - 0.5, rows - 0.5], [-0.5, cols - 0.5, -0.5, cols - 0.5], [1, 1, 1, 1]])
    working = np.linalg.solve(problem.initial @ problem.grid.to_guide @ placement, corners)
    extent = working[:2].max(axis=1) - working[:2].min(axis=1)
    return float(extent.min())
