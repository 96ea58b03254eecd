"""Peers of :func:`ggrad_gpu.refine` for the benchmarks, registered with SimpleITK.

Two ways a user would refine a cube's placement on a brightfield guide without
this package:

- :func:`plain_way`: the paper's method written with SciPy and SimpleITK. Put
  the native cube on the guide grid with the initial transform, estimate
  ``grad_x`` and ``grad_y`` with :func:`benchmarks.reference.plain_estimate`
  (per-band SciPy loops, ``scipy.optimize.nnls``), then register ``grad_y``
  (moving) to ``grad_x`` (fixed) with SimpleITK's affine registration and the
  mean-squares metric (paper eq. 10).
- :func:`mattes_pca`: what a user would otherwise do: Mattes mutual
  information between the guide (fixed) and the cube's first principal
  component image on the guide grid (moving).

Both use the same SimpleITK recipe (:class:`SitkSettings`): regular-step
gradient descent with parameter scales from physical shift, a 3-level
pyramid (shrink 4, 2, 1; smoothing 2, 1, 0), linear interpolation and an
identity affine transform centred on the image to start from.

Matrices
--------
SimpleITK's transform maps a *fixed* physical point to the *moving* physical
point (the pull-back direction of ggrad_gpu's matrices), but in ``(x, y) =
(col, row)`` order and about a centre. Images here have origin 0, spacing 1 and
the identity direction, so a pixel's physical point is ``(col, row)``;
:func:`sitk_to_matrix` and :func:`matrix_to_sitk` swap the axes and fold the
centre into the translation. The result ``R`` maps the guide grid to the
guide grid ("fixed grid to moving grid", as ``register_affine``), and the full
guide-to-native matrix is ``initial @ R`` (DESIGN "Matrices" at ``s = 1``).

SimpleITK is imported when first needed, so this module imports without it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import scipy.ndimage as ndi

from benchmarks.reference import plain_estimate
from ggrad_gpu import warp_cube
from ggrad_gpu.baselines import first_principal_component

__all__ = [
    "Case",
    "PeerResult",
    "SitkSettings",
    "draw_cases",
    "fill_outside",
    "image_center",
    "markdown_table",
    "matrix_to_sitk",
    "mattes_pca",
    "place_cube",
    "plain_way",
    "refine_summary_lines",
    "register_sitk",
    "sitk",
    "sitk_to_matrix",
    "summarise",
    "sweep_summary_lines",
]

# (row, col) <-> (x, y): this permutation is its own inverse.
_SWAP = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])


def sitk():
    """The SimpleITK module (imported on first use)."""
    import SimpleITK

    return SimpleITK


@dataclass(frozen=True)
class SitkSettings:
    """The SimpleITK registration recipe shared by both peers.

    Attributes
    ----------
    learning_rate : float
        Regular-step gradient descent's first step length (physical units =
        guide pixels, with physical-shift scales).
    min_step : float
        Step length at which the optimizer stops.
    iterations : int
        Iteration bound per pyramid level.
    relaxation : float
        Step length factor when the gradient direction reverses.
    gradient_tolerance : float
        Gradient magnitude at which the optimizer stops. Effectively off: the
        mean squares of two gradient images is about 1e-2, its gradient far
        below SimpleITK's usual 1e-8, which stopped the descent early (at the
        same optimum on the cases tried, but by the wrong rule); the step
        length decides instead.
    shrink_factors, smoothing_sigmas : tuple of int
        The pyramid; sigmas in physical units, which are guide pixels here
        (spacing 1), applied before shrinking.
    bins : int
        Mattes mutual information histogram bins.
    sampling : float
        Fraction of fixed pixels the Mattes metric samples (random, seeded).
    seed : int
        Sampling seed.
    threads : int or None
        SimpleITK worker threads (None: its default).
    """

    learning_rate: float = 2.0
    min_step: float = 1e-4
    iterations: int = 300
    relaxation: float = 0.5
    gradient_tolerance: float = 1e-20
    shrink_factors: tuple = (4, 2, 1)
    smoothing_sigmas: tuple = (2, 1, 0)
    bins: int = 50
    sampling: float = 0.3
    seed: int = 12345
    threads: int | None = None


@dataclass(frozen=True)
class PeerResult:
    """What a peer hands back.

    Attributes
    ----------
    matrix : numpy.ndarray, shape (3, 3)
        Guide grid to the cube's native grid: ``initial @ registration``.
    registration : numpy.ndarray, shape (3, 3)
        SimpleITK's result as a (row, col) matrix, guide grid to guide grid.
    stop : str
        SimpleITK's optimizer stop condition.
    iterations : int
        Iterations of the last (finest) level.
    metric : float
        Final metric value.
    timings : dict
        Seconds per stage (``place``, ``estimate`` or ``pca``, ``register``).
    images : tuple of numpy.ndarray
        The ``(fixed, moving)`` images handed to SimpleITK (for checks).
    """

    matrix: np.ndarray
    registration: np.ndarray
    stop: str
    iterations: int
    metric: float
    timings: dict = field(default_factory=dict)
    images: tuple = field(default=(), repr=False)


# --------------------------------------------------------------------------- matrices


def sitk_to_matrix(transform) -> np.ndarray:
    """A 2-D SimpleITK affine-like transform as a 3x3 (row, col) pull-back matrix.

    SimpleITK computes ``T(x) = A (x - c) + c + t`` on ``(x, y) = (col, row)``
    points; the result maps fixed-grid ``(row, col, 1)`` to moving-grid
    ``(row, col, 1)`` for images with origin 0, spacing 1, identity direction.
    Accepts an ``AffineTransform``, the other 2-D linear transforms
    (``Euler2DTransform``, ``Similarity2DTransform``, ``TranslationTransform``)
    and composites of them.
    """
    s = sitk()
    transform = transform.Downcast()  # a composite's parts come back as plain Transform
    if isinstance(transform, s.CompositeTransform):
        # A composite applies its last-added transform first: T = T_0 o T_1 o ...
        matrix = np.eye(3)
        for i in range(transform.GetNumberOfTransforms()):
            matrix = matrix @ sitk_to_matrix(transform.GetNthTransform(i))
        return matrix
    xy = np.eye(3)
    if isinstance(transform, s.TranslationTransform):
        xy[:2, 2] = transform.GetOffset()
    else:
        # Affine, Euler, similarity...: T(x) = A (x - c) + c + t.
        a = np.array(transform.GetMatrix(), dtype=np.float64).reshape(2, 2)
        center = np.array(transform.GetCenter(), dtype=np.float64)
        translation = np.array(transform.GetTranslation(), dtype=np.float64)
        xy[:2, :2] = a
        xy[:2, 2] = center + translation - a @ center
    return _SWAP @ xy @ _SWAP


def matrix_to_sitk(matrix, center=(0.0, 0.0)):
    """A 3x3 (row, col) pull-back matrix as a SimpleITK ``AffineTransform``.

    ``center`` is the transform's centre in physical ``(x, y) = (col, row)``
    points; it changes the parameterisation (and so the optimizer's path),
    not the mapping. Inverse of :func:`sitk_to_matrix`.
    """
    s = sitk()
    xy = _SWAP @ np.asarray(matrix, dtype=np.float64) @ _SWAP
    a = xy[:2, :2]
    center = np.asarray(center, dtype=np.float64)
    affine = s.AffineTransform(2)
    affine.SetMatrix(tuple(float(v) for v in a.ravel()))
    affine.SetCenter(tuple(float(v) for v in center))
    affine.SetTranslation(tuple(float(v) for v in xy[:2, 2] - center + a @ center))
    return affine


def image_center(shape) -> tuple[float, float]:
    """The physical ``(x, y)`` centre of a ``(rows, cols)`` image (origin 0, spacing 1)."""
    return ((shape[1] - 1) / 2.0, (shape[0] - 1) / 2.0)


# --------------------------------------------------------------------------- registration


def register_sitk(fixed, moving, *, metric: str = "mse", initial=None, settings: SitkSettings | None = None):
    """Affine registration of ``moving`` onto ``fixed`` with SimpleITK.

    Parameters
    ----------
    fixed, moving : numpy.ndarray, shape (rows, cols)
        Finite images (origin 0, spacing 1).
    metric : {"mse", "mattes"}
        Mean squares, or Mattes mutual information (``settings.bins`` bins,
        random sampling of ``settings.sampling`` of the pixels, seeded).
    initial : array_like, shape (3, 3), optional
        Starting (row, col) matrix, fixed grid to moving grid; default the
        identity. The transform is centred on the fixed image either way.
    settings : SitkSettings, optional

    Returns
    -------
    matrix : numpy.ndarray, shape (3, 3)
        Fixed grid to moving grid, (row, col).
    info : dict
        ``stop`` (the optimizer's stop condition), ``iterations`` (of the last
        level) and ``metric`` (its final value).
    """
    s = sitk()
    settings = SitkSettings() if settings is None else settings
    fixed_image = s.GetImageFromArray(np.ascontiguousarray(fixed, dtype=np.float32))
    moving_image = s.GetImageFromArray(np.ascontiguousarray(moving, dtype=np.float32))
    if initial is None:
        # An identity affine centred on the fixed image (the images share a grid:
        # the initializer's translation between geometric centres is zero).
        transform = s.CenteredTransformInitializer(
            fixed_image, moving_image, s.AffineTransform(2), s.CenteredTransformInitializerFilter.GEOMETRY
        )
        transform = s.AffineTransform(transform)
    else:
        transform = matrix_to_sitk(initial, center=image_center(fixed.shape))

    method = s.ImageRegistrationMethod()
    if settings.threads is not None:
        method.SetNumberOfThreads(settings.threads)
    if metric == "mse":
        method.SetMetricAsMeanSquares()
    elif metric == "mattes":
        method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=settings.bins)
        method.SetMetricSamplingStrategy(method.RANDOM)
        method.SetMetricSamplingPercentage(settings.sampling, settings.seed)
    else:
        raise ValueError(f"metric must be 'mse' or 'mattes'; got {metric!r}")
    method.SetInterpolator(s.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=settings.learning_rate,
        minStep=settings.min_step,
        numberOfIterations=settings.iterations,
        relaxationFactor=settings.relaxation,
        gradientMagnitudeTolerance=settings.gradient_tolerance,
    )
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel(shrinkFactors=list(settings.shrink_factors))
    method.SetSmoothingSigmasPerLevel(smoothingSigmas=list(settings.smoothing_sigmas))
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    method.SetInitialTransform(transform, inPlace=True)
    method.Execute(fixed_image, moving_image)
    info = {
        "stop": method.GetOptimizerStopConditionDescription(),
        "iterations": int(method.GetOptimizerIteration()),
        "metric": float(method.GetMetricValue()),
    }
    return sitk_to_matrix(transform), info


# --------------------------------------------------------------------------- the peers


def fill_outside(array, invalid):
    """Give every ``invalid`` pixel the value of the nearest valid pixel (0 if none is valid).

    ``array`` is ``(rows, cols)`` or ``(rows, cols, bands)``; ``invalid`` is a
    ``(rows, cols)`` boolean map.
    """
    if not invalid.any():
        return array
    if invalid.all():
        return np.zeros_like(array)
    nearest = ndi.distance_transform_edt(invalid, return_distances=False, return_indices=True)
    return array[tuple(nearest)]


def place_cube(cube, initial, guide_shape):
    """The native cube on the guide grid through ``initial``, NaN-free.

    ``ggrad_gpu.warp_cube`` (bilinear; NaN outside the footprint), then every
    uncovered pixel takes its nearest covered pixel's spectrum. Returns
    ``(cube_on_guide, covered)``.
    """
    on_guide = warp_cube(cube, initial, tuple(guide_shape), order=1)
    covered = np.isfinite(on_guide).all(axis=2)
    return fill_outside(on_guide, ~covered), covered


def plain_way(guide, cube, initial, *, levels: int = 4, settings: SitkSettings | None = None,
              start=None) -> PeerResult:
    """The paper's method without ggrad_gpu: SciPy estimate, SimpleITK mean-squares registration.

    Parameters
    ----------
    guide : numpy.ndarray, shape (rows, cols)
    cube : numpy.ndarray, shape (native_rows, native_cols, bands)
        The native cube.
    initial : array_like, shape (3, 3)
        Guide grid to native cube (device-based registration).
    levels : int, default 4
    settings : SitkSettings, optional
    start : array_like, shape (3, 3), optional
        Start SimpleITK from this guide-to-guide matrix instead of the
        identity (for sanity checks, e.g. the true misregistration).
    """
    initial = np.asarray(initial, dtype=np.float64)
    timings = {}
    clock = time.perf_counter()
    on_guide, _ = place_cube(cube, initial, guide.shape)
    timings["place"] = time.perf_counter() - clock
    clock = time.perf_counter()
    estimate = plain_estimate(guide, on_guide, levels)
    timings["estimate"] = time.perf_counter() - clock
    clock = time.perf_counter()
    registration, info = register_sitk(estimate["grad_x"], estimate["grad_y"], metric="mse",
                                       initial=start, settings=settings)
    timings["register"] = time.perf_counter() - clock
    return PeerResult(initial @ registration, registration, info["stop"], info["iterations"], info["metric"],
                      timings, (estimate["grad_x"], estimate["grad_y"]))


def mattes_pca(guide, cube, initial, *, settings: SitkSettings | None = None, start=None) -> PeerResult:
    """Mattes mutual information of the guide and the cube's first principal component.

    The cube goes onto the guide grid as in :func:`plain_way`; its first
    principal component score image (over the covered pixels, NaN elsewhere
    then filled with the nearest covered value) is the moving image, the
    guide the fixed one. Parameters as :func:`plain_way`.
    """
    initial = np.asarray(initial, dtype=np.float64)
    timings = {}
    clock = time.perf_counter()
    on_guide = warp_cube(cube, initial, tuple(guide.shape), order=1)
    covered = np.isfinite(on_guide).all(axis=2)
    timings["place"] = time.perf_counter() - clock
    clock = time.perf_counter()
    scores = first_principal_component(on_guide, mask=covered)
    scores = fill_outside(scores, ~covered)
    timings["pca"] = time.perf_counter() - clock
    clock = time.perf_counter()
    registration, info = register_sitk(guide, scores, metric="mattes", initial=start, settings=settings)
    timings["register"] = time.perf_counter() - clock
    return PeerResult(initial @ registration, registration, info["stop"], info["iterations"], info["metric"],
                      timings, (np.asarray(guide), scores))


# --------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """One benchmark case: the phantom's seed and its misregistration."""

    seed: int
    rotation_deg: float
    scale: float
    shear: float
    shift: tuple

    def phantom_kwargs(self) -> dict:
        """Keyword arguments of :func:`ggrad_gpu.synthetic.make_phantom` (bands aside)."""
        return {"seed": self.seed, "rotation_deg": self.rotation_deg, "scale": self.scale,
                "shear": self.shear, "shift": self.shift}


def draw_cases(count: int, *, seed: int = 2024, first_phantom_seed: int = 0) -> list[Case]:
    """``count`` misregistrations drawn deterministically from one seeded generator.

    Rotation uniform in [-5, 5] degrees, scale in [0.95, 1.05], shear in
    [-0.02, 0.02], shift of length uniform in [0, 45] guide pixels in a
    uniformly random direction. Case ``i`` uses phantom seed
    ``first_phantom_seed + i``; the first ``n`` cases do not depend on ``count``.
    """
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(count):
        rotation, scale, shear, length, angle = (
            rng.uniform(-5, 5), rng.uniform(0.95, 1.05), rng.uniform(-0.02, 0.02),
            rng.uniform(0, 45), rng.uniform(0, 2 * np.pi),
        )
        shift = (float(length * np.sin(angle)), float(length * np.cos(angle)))
        cases.append(Case(first_phantom_seed + i, float(rotation), float(scale), float(shear), shift))
    return cases


# --------------------------------------------------------------------------- report

FAIL_PX = 1.0  # a case fails when its max TRE exceeds this many guide pixels
FAR_PX = 25.0  # the registration issue's "shifts over 25 px": a case's shift length beyond this


def summarise(rows: list[dict], methods, *, reference: str = "ggrad", fail_px: float = FAIL_PX,
              far_px: float | None = None) -> dict:
    """Per-method figures of a sweep and the cases the reference fails but a peer does not.

    Parameters
    ----------
    rows : list of dict
        One per case: ``{"case": int, method: {"tre_mean", "tre_max", "seconds"}, ...}``,
        and ``"shift_px"`` (the length of the case's shift) when ``far_px`` is given.
    methods : sequence of str
        The methods to report, in table order.
    far_px : float, optional
        Also count each method's failures among the cases whose shift is
        longer than this (guide pixels).

    Returns
    -------
    dict
        ``table``: one dict per method (``method``, ``mean_tre``, ``median_tre``,
        ``worst_max_tre``, ``failures``, ``failed_cases``, ``seconds_per_case``;
        with ``far_px``, also ``far_failures``, ``far_failed_cases`` and
        ``far_total``, the number of such cases);
        ``reference_fails_peer_succeeds``: per peer, the case numbers;
        ``fail_px``, ``far_px`` and ``far_cases`` (the case numbers beyond ``far_px``).
    """
    far = [] if far_px is None else [row["case"] for row in rows if row["shift_px"] > far_px]
    table = []
    for method in methods:
        means = np.array([row[method]["tre_mean"] for row in rows])
        maxes = np.array([row[method]["tre_max"] for row in rows])
        seconds = [row[method]["seconds"] for row in rows if row[method].get("seconds") is not None]
        failed = [row["case"] for row in rows if row[method]["tre_max"] > fail_px]
        entry = {
            "method": method,
            "mean_tre": float(means.mean()),
            "median_tre": float(np.median(means)),
            "worst_max_tre": float(maxes.max()),
            "failures": len(failed),
            "failed_cases": failed,
            "seconds_per_case": float(np.mean(seconds)) if seconds else None,
        }
        if far_px is not None:
            far_failed = [case for case in failed if case in far]
            entry.update(far_failures=len(far_failed), far_failed_cases=far_failed, far_total=len(far))
        table.append(entry)
    lost = {}
    for method in methods:
        if method == reference or reference not in rows[0]:
            continue
        lost[method] = [row["case"] for row in rows
                        if row[reference]["tre_max"] > fail_px and row[method]["tre_max"] <= fail_px]
    return {"table": table, "reference_fails_peer_succeeds": lost, "fail_px": fail_px,
            "far_px": far_px, "far_cases": far}


def markdown_table(table: list[dict], labels: dict | None = None, *, far_px: float | None = None,
                   lost: dict | None = None, seconds: bool = True) -> list[str]:
    """The sweep's Markdown table: method | mean TRE | median | worst max | failures | s/case.

    With ``far_px`` (entries from :func:`summarise` with the same ``far_px``),
    a column of failures among the cases shifted further, as ``failures /
    cases``; with ``lost`` (``reference_fails_peer_succeeds``), a column of the
    cases the reference fails and the row's method does not ("-" for the
    reference itself and for methods not in ``lost``); ``seconds=False``
    leaves out the time per case.
    """
    labels = labels or {}
    header = ["method", "mean TRE (px)", "median (px)", "worst max (px)", "failures"]
    if far_px is not None:
        header.append(f"failures, shift > {far_px:g} px")
    if lost is not None:
        header.append("ggrad fails, this succeeds")
    if seconds:
        header.append("s/case")
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    for entry in table:
        cells = [labels.get(entry["method"], entry["method"]), f"{entry['mean_tre']:.3f}",
                 f"{entry['median_tre']:.3f}", f"{entry['worst_max_tre']:.3f}", str(entry["failures"])]
        if far_px is not None:
            cells.append(f"{entry['far_failures']} / {entry['far_total']}")
        if lost is not None:
            cases = lost.get(entry["method"])
            cells.append("-" if cases is None else str(len(cases)))
        if seconds:
            cells.append("-" if entry["seconds_per_case"] is None else f"{entry['seconds_per_case']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def sweep_summary_lines(sweep: dict) -> list[str]:
    """End-of-run lines of one accuracy sweep of ``test_refine.py`` (its ``summary`` entry)."""
    lines = [
        f"{sweep['title']}: {sweep['cases']} {sweep['data']}, {sweep['shape'][0]} x {sweep['shape'][1]} guide,"
        f" {sweep['native'][0]} x {sweep['native'][1]} x {sweep['bands']} cube; failure = max TRE > "
        f"{sweep['fail_px']:g} px"
    ]
    lines.extend(sweep["markdown"])
    for method, cases in sweep["reference_fails_peer_succeeds"].items():
        lines.append(f"ggrad fails, {method} succeeds: {cases if cases else 'none'}")
    if sweep.get("far_px") is not None:
        lines.append(f"cases with shift > {sweep['far_px']:g} px: {sweep['far_cases']}")
    for entry in sweep["table"]:
        if entry["failed_cases"]:
            far = entry.get("far_failed_cases")
            lines.append(f"{entry['method']} fails: {entry['failed_cases']}"
                         + ("" if far is None else f" (shift > {sweep['far_px']:g} px: {far})"))
    if sweep.get("kept_initial"):
        lines.append(f"refine kept the initial transform (improved=False): {sweep['kept_initial']}")
    sanity = sweep.get("sanity")
    if sanity:
        exact = sanity["exact"]
        checked = sweep.get("conversion_checked", list(exact))
        worst = max(exact[name]["tre_max"] for name in checked)
        lines.append(
            f"SimpleITK conversion check (known answer, case {sweep['first_case']}): worst max TRE {worst:.3f} px;"
            " started at the truth on the real images the peers end at "
            + ", ".join(f"{name} {tre['tre_mean']:.2f} / {tre['tre_max']:.2f} px (mean / max)"
                        for name, tre in sanity["real_from_truth"].items())
        )
        unchecked = [name for name in exact if name not in checked]
        if unchecked:
            lines.append("  known answer, not a conversion check: " + ", ".join(
                f"{name} {exact[name]['tre_mean']:.2f} / {exact[name]['tre_max']:.2f} px" for name in unchecked))
    return lines


def refine_summary_lines(summary: dict) -> list[str]:
    """End-of-run lines of ``test_refine.py``: the sweeps' tables and the speed ratio."""
    lines = []
    for key in ("refine_sweep", "refine_tissue_sweep"):
        if summary.get(key):
            lines.extend(sweep_summary_lines(summary[key]))
    speed = summary.get("refine_speed")
    if speed:
        shape = speed["shape"]
        lines.append(f"refine end to end at {shape[0]} x {shape[1]} guide, {shape[2]} x {shape[3]} x {shape[4]} cube:")
        ggrad_total = plain_total = 0.0
        complete = 0
        for case in sorted(speed["cases"]):
            entry = speed["cases"][case]
            ours, theirs = entry.get("ggrad"), entry.get("plain")
            parts = [f"  case {case}:"]
            if ours is not None:
                parts.append(f"ggrad {ours:.2f} s")
            if theirs is not None:
                parts.append(f"plain {theirs:.2f} s")
            if ours and theirs:
                parts.append(f"= {theirs / ours:.1f}x")
                ggrad_total += ours
                plain_total += theirs
                complete += 1
            lines.append(" ".join(parts))
        if complete:
            lines.append(
                f"  mean over {complete} cases: plain {plain_total / complete:.2f} s / ggrad {ggrad_total / complete:.2f} s"
                f" = {plain_total / ggrad_total:.1f}x"
            )
    return lines
