"""The plain way: each benchmarked stage done as a user would without ggrad_gpu, and SimpleITK's registration.

The references the benchmarks compare ggrad_gpu against, kept out of the
installed package (``ggrad bench`` times the package's stages against the
machine's limits only): per-band ``scipy.ndimage`` loops, ``scipy.optimize.nnls``
on the explicit matrix, SLSQP for eq. 9 (:func:`plain_estimate`), SimpleITK's
mean-squares affine registration (:func:`register_sitk`) and the whole job
(:func:`plain_refine`).

:func:`attach` is the ``reference`` hook of ``ggrad_gpu.cli.bench.build`` and
``run``: the plain way of a stage, how its result is compared with ggrad_gpu's
and the tolerance the tests accept; :func:`build` and :func:`run` pass it.

Examples
--------
>>> case = build("nnls", Data((32, 40, 4)))
>>> x, reference = case.call(case.arrays, np), case.plain()  # nnls_gram and scipy.optimize.nnls
>>> abs(case.compare(x, reference)) < case.tolerance
True
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import scipy.ndimage as ndi
import scipy.optimize

from ggrad_gpu import estimate_global_gradient, warp_cube
from ggrad_gpu._backend import to_host
from ggrad_gpu.cli import bench
from ggrad_gpu.cli.bench import LEVELS, PAPER, Data
from ggrad_gpu.core.filters import sobel_magnitude
from ggrad_gpu.metrics import target_registration_error
from ggrad_gpu.synthetic import affine_about_center, make_phantom

# The plain way holds an explicit float64 pixels x bands matrix: up to the paper's size only.
PLAIN_LIMIT = math.prod(PAPER)
# The stages whose plain way is SimpleITK's registration.
SITK_STAGES = ("register", "refine")


def build(stage: str, data: Data) -> bench.Case:
    """``bench.build`` with the plain way (:func:`attach`)."""
    return bench.build(stage, data, reference=attach)


def run(sizes, backends, stages, **options) -> dict:
    """``bench.run`` with the plain way first (:func:`attach`)."""
    return bench.run(sizes, backends, stages, reference=attach, **options)


def attach(stage: str, data: Data) -> dict:
    """The plain way's fields of a stage's ``bench.Case`` (``plain`` None, with ``no_plain``, where it cannot run)."""
    fields_ = PLAIN[stage](data)
    if math.prod(data.shape) > PLAIN_LIMIT:
        fields_.update(plain=None, no_plain=f"the plain way runs up to {'x'.join(map(str, PAPER))} values only")
    elif stage in SITK_STAGES and not _has_sitk():
        fields_.update(plain=None, no_plain="the plain way needs SimpleITK (pip install SimpleITK)")
    return fields_


def explicit(data: Data):
    """The plain way's float64 ``A`` (pixels x bands) and ``b`` of a size, built once.

    >>> data = Data((32, 40, 4)); a, b = explicit(data); gram, rhs = data.gram
    >>> bool(np.allclose(gram, a.T @ a, rtol=1e-5)), bool(np.allclose(rhs, a.T @ b, rtol=1e-5))
    (True, True)
    """
    if "explicit" not in data.plain_results:
        data.plain_results["explicit"] = (
            sobel_magnitude(data.cube).reshape(-1, data.shape[2]).astype(np.float64),
            data.target.ravel().astype(np.float64))
    return data.plain_results["explicit"]


# --------------------------------------------------------------------------- per stage


def _relative(ours, plain) -> float:
    """``max |ours - plain| / max |plain|`` over the values finite in both."""
    ours, plain = np.asarray(to_host(ours), np.float64), np.asarray(plain, np.float64)
    both = np.isfinite(ours) & np.isfinite(plain)
    return float(np.abs(ours - plain)[both].max() / max(np.abs(plain[both]).max(), 1e-300))



def _relative_all(ours, plain) -> float:
    """The largest :func:`_relative` over matching arrays of two sequences."""
    return max(_relative(o, t) for o, t in zip(ours, plain, strict=True))



def _plain_band_sobel(band):
    return np.hypot(ndi.sobel(band, 0), ndi.sobel(band, 1))



def _plain_matrix(cube):
    """Per-band Sobel magnitudes as the columns of a float64 (pixels x bands) matrix."""
    a = np.empty((cube.shape[0] * cube.shape[1], cube.shape[2]))
    for i in range(cube.shape[2]):
        a[:, i] = _plain_band_sobel(cube[:, :, i]).ravel()
    return a


def _sobel(data):
    cube = data.cube

    def plain():
        out = np.empty(cube.shape, np.float32)
        for i in range(cube.shape[2]):
            out[:, :, i] = _plain_band_sobel(cube[:, :, i])
        return out

    return dict(plain=plain, plain_peak="bandwidth", compare=_relative, tolerance=1e-5)


def _pyramid(data):
    cube = data.cube

    def plain():
        levels = [cube] + [None] * (LEVELS - 1)
        for i in range(cube.shape[2]):
            band = cube[:, :, i]
            for k in range(1, LEVELS):
                band = ndi.gaussian_filter(band, 1)[::2, ::2]
                if levels[k] is None:
                    levels[k] = np.empty(band.shape + cube.shape[2:], np.float32)
                levels[k][:, :, i] = band
        return levels

    return dict(plain=plain, plain_peak="bandwidth", compare=_relative_all, tolerance=1e-5)


def _gram(data):
    cube, target = data.cube, data.target

    def plain():
        a, b = _plain_matrix(cube), target.ravel().astype(np.float64)
        with np.errstate(invalid="ignore"):  # OpenBLAS may flag finite input (numpy/numpy#24067)
            return a.T @ a, a.T @ b

    return dict(plain=plain, plain_peak="float64", compare=_relative_all, tolerance=1e-4)


def _nnls(data):
    def objective(x):
        a, b = explicit(data)
        with np.errstate(invalid="ignore"):
            return float(np.sum((a @ x - b) ** 2))

    def plain():
        a, b = explicit(data)
        # SciPy's default maxiter (3 * bands) is too tight for a 1000-band cube.
        return scipy.optimize.nnls(a, b, maxiter=50 * a.shape[1])[0]

    return dict(plain=plain, compare=lambda ours, theirs: objective(ours) / objective(theirs) - 1, tolerance=1e-5)


def _combine(data):
    cube, x = data.cube, data.weights
    active = np.flatnonzero(x > 0)

    def plain():
        out = np.zeros(cube.shape[:2])
        for i in active:
            out += x[i] * _plain_band_sobel(cube[:, :, i])
        return out

    return dict(plain=plain, plain_peak="bandwidth", compare=_relative, tolerance=1e-4)


def _warp(data):
    cube, matrix = data.cube, data.truth

    def plain():
        out = np.empty(cube.shape, np.float32)
        for i in range(cube.shape[2]):
            out[:, :, i] = ndi.affine_transform(cube[:, :, i], matrix, order=1, mode="nearest")
        return out

    # Inside the footprint warp_cube clamps at the edges as mode="nearest" does; outside it is NaN.
    return dict(plain=plain, plain_peak="bandwidth", compare=_relative, tolerance=1e-5)


def _register(data):
    fixed, moving = data.gradients
    return dict(plain=lambda: register_sitk(fixed, moving, metric="mse")[0])


def _estimate(data):
    guide, cube = data.guide, data.cube

    def compare(ours, theirs):
        return max(_relative(ours.grad_x, theirs["grad_x"]), _relative(ours.grad_y, theirs["grad_y"]))

    return dict(plain=lambda: plain_estimate(guide, cube, LEVELS), compare=compare, tolerance=1e-3)


def _refine(data):
    phantom = data.refine_phantom
    return dict(plain=lambda: plain_refine(phantom.guide, phantom.cube, phantom.initial))


PLAIN = {"sobel": _sobel, "pyramid": _pyramid, "gram": _gram, "nnls": _nnls, "combine": _combine, "warp": _warp,
         "register": _register, "estimate": _estimate, "refine": _refine}


# --------------------------------------------------------------------------- the plain way


def plain_estimate(guide, cube, levels: int = LEVELS) -> dict:
    """The global gradient estimate written without ggrad_gpu (what benchmarks/RESULTS.md calls the plain way).

    Python loops over bands calling ``scipy.ndimage`` for the pyramid and the
    Sobel magnitudes, the explicit float64 ``(pixels x bands)`` matrix
    ``A_k`` of every level, ``scipy.optimize.nnls`` on it, ``map_coordinates``
    upsampling and SLSQP for the level weights (eq. 9).

    Returns
    -------
    dict
        ``grad_x``, ``grad_y`` (rows, cols); ``alpha``, ``beta`` (levels,);
        ``channel_weights`` (levels, bands); ``objective`` (levels,)
        ``||A_k x_k - b_k||^2``; ``timings`` (seconds: ``pyramid_sobel_matrix``,
        ``nnls``, ``rest``).

    Examples
    --------
    >>> data = Data((32, 40, 4))
    >>> plain = plain_estimate(data.guide, data.cube, levels=2)
    >>> ours = estimate_global_gradient(data.guide, data.cube, levels=2)
    >>> plain["channel_weights"].shape, round(float(plain["alpha"].sum()), 9)
    ((2, 4), 1.0)
    >>> bool(np.allclose(plain["grad_y"], ours.grad_y, rtol=0, atol=1e-4 * np.abs(ours.grad_y).max()))
    True
    """
    guide, cube = np.asarray(guide), np.asarray(cube)
    shape, bands = guide.shape, cube.shape[2]
    timings = {"pyramid_sobel_matrix": 0.0, "nnls": 0.0, "rest": 0.0}
    weights, objective = np.zeros((levels, bands)), np.zeros(levels)
    guide_levels, cube_levels = np.empty((levels,) + shape), np.empty((levels,) + shape)
    guide_level, band_images = guide, [cube[:, :, i] for i in range(bands)]
    for k in range(levels):
        start = time.perf_counter()
        if k > 0:
            guide_level = ndi.gaussian_filter(guide_level, 1)[::2, ::2]
            band_images = [ndi.gaussian_filter(band, 1)[::2, ::2] for band in band_images]
        target = _plain_band_sobel(guide_level)
        b = target.ravel().astype(np.float64)
        a = np.empty((b.size, bands))
        for i, band in enumerate(band_images):
            a[:, i] = _plain_band_sobel(band).ravel()
        timings["pyramid_sobel_matrix"] += time.perf_counter() - start
        start = time.perf_counter()
        x = scipy.optimize.nnls(a, b, maxiter=50 * bands)[0]  # the default 3 * bands is too tight
        timings["nnls"] += time.perf_counter() - start
        start = time.perf_counter()
        with np.errstate(invalid="ignore"):
            fitted = a @ x
        weights[k], objective[k] = x, np.sum((fitted - b) ** 2)
        guide_levels[k] = _upsample(target, k, shape)
        cube_levels[k] = _upsample(fitted.reshape(target.shape), k, shape)
        timings["rest"] += time.perf_counter() - start
        del a  # the next level's matrix must not coexist with this one
    start = time.perf_counter()
    alpha, beta = _slsqp_level_weights(guide_levels, cube_levels)
    grad_x, grad_y = np.tensordot(alpha, guide_levels, axes=1), np.tensordot(beta, cube_levels, axes=1)
    timings["rest"] += time.perf_counter() - start
    return {"grad_x": grad_x, "grad_y": grad_y, "alpha": alpha, "beta": beta, "channel_weights": weights,
            "objective": objective, "timings": timings}


def _upsample(image, level: int, shape):
    """Level ``level``'s cubic spline at ``p / 2**level`` for every level-0 pixel ``p``."""
    coords = np.mgrid[: shape[0], : shape[1]].astype(np.float64) * 0.5**level
    return ndi.map_coordinates(np.asarray(image, dtype=np.float64), coords, order=3, mode="nearest")


def _slsqp_level_weights(guide_levels, cube_levels):
    """Eq. 9 by SLSQP: ``min z^T Q z`` with ``z = [alpha, beta]`` on two simplices."""
    k = guide_levels.shape[0]
    m = np.concatenate([guide_levels.reshape(k, -1), -cube_levels.reshape(k, -1)])
    q = m @ m.T / m.shape[1]
    ones = np.repeat(np.eye(2), k, axis=1)  # row g sums group g of z
    result = scipy.optimize.minimize(
        lambda z: z @ q @ z, np.full(2 * k, 1.0 / k), jac=lambda z: 2 * q @ z, method="SLSQP",
        bounds=[(0.0, 1.0)] * (2 * k),
        constraints=[{"type": "eq", "fun": lambda z: ones @ z - 1, "jac": lambda z: ones}],
        options={"ftol": 1e-14, "maxiter": 1000},  # the default ftol stops visibly short of the optimum
    )
    if not result.success:
        raise RuntimeError(f"SLSQP failed on the level weights: {result.message}")
    z = np.clip(result.x, 0.0, None)
    return z[:k] / z[:k].sum(), z[k:] / z[k:].sum()


def fill_outside(array, invalid):
    """Every ``invalid`` pixel (a (rows, cols) map) takes the value of the nearest valid one (0 if none).

    Examples
    --------
    >>> fill_outside(np.array([[1.0, 2.0, 3.0]]), np.array([[False, True, True]]))
    array([[1., 1., 1.]])
    >>> fill_outside(np.array([[1.0, 2.0]]), np.array([[True, True]]))  # no valid pixel: zeros
    array([[0., 0.]])
    """
    if not invalid.any():
        return array
    if invalid.all():
        return np.zeros_like(array)
    return array[tuple(ndi.distance_transform_edt(invalid, return_distances=False, return_indices=True))]


@dataclass(frozen=True)
class PlainRefinement:
    """The plain way's result: ``matrix = initial @ registration`` (guide grid to native cube).

    Examples
    --------
    >>> initial, registration = np.diag([0.2, 0.2, 1.0]), np.array([[1.0, 0, 2.0], [0, 1, -1.0], [0, 0, 1]])
    >>> result = PlainRefinement(initial @ registration, registration, {"stop": "example"})
    >>> result.matrix[:2, 2].tolist(), result.timings, result.images
    ([0.4, -0.2], {}, ())
    """

    matrix: np.ndarray
    registration: np.ndarray
    info: dict
    timings: dict = field(default_factory=dict)
    images: tuple = field(default=(), repr=False)  # (fixed, moving) handed to SimpleITK


def plain_refine(guide, cube, initial, *, levels: int = LEVELS, settings=None, start=None) -> PlainRefinement:
    """The paper's method without ggrad_gpu: SciPy estimate, SimpleITK mean-squares registration.

    The native cube goes onto the guide grid through ``initial``
    (``warp_cube``, bilinear; uncovered pixels take the nearest covered
    spectrum), :func:`plain_estimate` gives ``grad_x`` and ``grad_y``, and
    :func:`register_sitk` registers ``grad_y`` (moving) to ``grad_x``
    (fixed), from the identity or from ``start`` (guide grid to guide grid).

    Examples
    --------
    >>> from ggrad_gpu.metrics import target_registration_error
    >>> phantom = make_phantom(shape=(64, 80), bands=8, seed=0, shift=(3.0, -2.0))
    >>> result = plain_refine(phantom.guide, phantom.cube, phantom.initial)
    >>> before = target_registration_error(phantom.initial, phantom.matrix, phantom.guide.shape).mean
    >>> after = target_registration_error(result.matrix, phantom.matrix, phantom.guide.shape).mean
    >>> bool(after < before), sorted(result.timings)
    (True, ['estimate', 'place', 'register'])
    """
    initial = np.asarray(initial, dtype=np.float64)
    timings, clock = {}, time.perf_counter()
    on_guide = warp_cube(cube, initial, tuple(guide.shape), order=1)
    on_guide = fill_outside(on_guide, ~np.isfinite(on_guide).all(axis=2))
    timings["place"], clock = time.perf_counter() - clock, time.perf_counter()
    estimate = plain_estimate(guide, on_guide, levels)
    timings["estimate"], clock = time.perf_counter() - clock, time.perf_counter()
    registration, info = register_sitk(estimate["grad_x"], estimate["grad_y"], metric="mse", initial=start,
                                       settings=settings)
    timings["register"] = time.perf_counter() - clock
    return PlainRefinement(initial @ registration, registration, info, timings,
                           (estimate["grad_x"], estimate["grad_y"]))


# --------------------------------------------------------------------------- SimpleITK

# (row, col) <-> (x, y): this permutation is its own inverse.
_SWAP = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])


def _has_sitk() -> bool:
    try:
        import SimpleITK  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class SitkSettings:
    """The SimpleITK registration recipe of the plain way (and of the accuracy scripts' peers).

    Regular-step gradient descent (first step ``learning_rate`` guide pixels
    with physical-shift scales, down to ``min_step``, ``iterations`` per
    level, ``relaxation`` on a reversal; the gradient tolerance effectively
    off, as the mean squares of gradient images is about 1e-2), a pyramid
    (``shrink_factors``, ``smoothing_sigmas`` in pixels), linear
    interpolation; Mattes mutual information with ``bins`` bins on a seeded
    random ``sampling`` of the pixels.

    Examples
    --------
    >>> import dataclasses
    >>> settings = dataclasses.replace(SitkSettings(), iterations=50, threads=1)
    >>> settings.iterations, settings.shrink_factors, settings.smoothing_sigmas
    (50, (4, 2, 1), (2, 1, 0))
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


def sitk_to_matrix(transform) -> np.ndarray:
    """A 2-D SimpleITK transform (affine, Euler, similarity, translation, composite) as a (row, col) matrix.

    SimpleITK maps a fixed physical point to a moving one, ``T(x) = A (x - c)
    + c + t`` on ``(x, y) = (col, row)``; with origin 0, spacing 1 and the
    identity direction the result maps the fixed grid to the moving grid.

    Examples
    --------
    >>> import SimpleITK as sitk
    >>> sitk_to_matrix(sitk.TranslationTransform(2, (3.0, -1.0)))  # x = +3 columns, y = -1 row
    array([[ 1.,  0., -1.],
           [ 0.,  1.,  3.],
           [ 0.,  0.,  1.]])
    """
    import SimpleITK as sitk

    transform = transform.Downcast()
    if isinstance(transform, sitk.CompositeTransform):  # applies its last-added transform first
        matrix = np.eye(3)
        for i in range(transform.GetNumberOfTransforms()):
            matrix = matrix @ sitk_to_matrix(transform.GetNthTransform(i))
        return matrix
    xy = np.eye(3)
    if isinstance(transform, sitk.TranslationTransform):
        xy[:2, 2] = transform.GetOffset()
    else:
        a = np.array(transform.GetMatrix(), dtype=np.float64).reshape(2, 2)
        center = np.array(transform.GetCenter(), dtype=np.float64)
        xy[:2, :2] = a
        xy[:2, 2] = center + np.array(transform.GetTranslation(), dtype=np.float64) - a @ center
    return _SWAP @ xy @ _SWAP


def matrix_to_sitk(matrix, center=(0.0, 0.0)):
    """A (row, col) matrix as a SimpleITK ``AffineTransform`` about ``center`` ((x, y)); inverse of
    :func:`sitk_to_matrix`.

    Examples
    --------
    >>> matrix = affine_about_center((40, 60), rotation_deg=10.0, shift=(2.0, -3.0))
    >>> transform = matrix_to_sitk(matrix, center=image_center((40, 60)))
    >>> bool(np.allclose(sitk_to_matrix(transform), matrix))
    True
    >>> row, col = (matrix @ [5.0, 7.0, 1.0])[:2]  # the same point, in SimpleITK's (x, y) order
    >>> bool(np.allclose(transform.TransformPoint((7.0, 5.0)), (col, row)))
    True
    """
    import SimpleITK as sitk

    xy = _SWAP @ np.asarray(matrix, dtype=np.float64) @ _SWAP
    a, center = xy[:2, :2], np.asarray(center, dtype=np.float64)
    affine = sitk.AffineTransform(2)
    affine.SetMatrix(tuple(float(v) for v in a.ravel()))
    affine.SetCenter(tuple(float(v) for v in center))
    affine.SetTranslation(tuple(float(v) for v in xy[:2, 2] - center + a @ center))
    return affine


def image_center(shape) -> tuple[float, float]:
    """The physical ``(x, y)`` centre of a ``(rows, cols)`` image (origin 0, spacing 1).

    Examples
    --------
    >>> image_center((5, 9))  # (x, y) = (col, row)
    (4.0, 2.0)
    """
    return ((shape[1] - 1) / 2.0, (shape[0] - 1) / 2.0)


def register_sitk(fixed, moving, *, metric: str = "mse", initial=None, settings: SitkSettings | None = None):
    """Affine registration of ``moving`` onto ``fixed`` with SimpleITK (the plain way's eq. 10).

    Parameters
    ----------
    fixed, moving : numpy.ndarray, shape (rows, cols)
    metric : {"mse", "mattes"}
    initial : array_like, shape (3, 3), optional
        Start (fixed grid to moving grid); default the identity, centred on ``fixed``.
    settings : SitkSettings, optional

    Returns
    -------
    matrix : numpy.ndarray, shape (3, 3)
        Fixed grid to moving grid, (row, col).
    info : dict
        ``stop`` (the optimizer's stop condition), ``iterations`` (finest level), ``metric``.

    Examples
    --------
    >>> fixed = ndi.gaussian_filter(np.random.default_rng(0).random((64, 64)), 3)
    >>> moving = ndi.shift(fixed, (-1.5, 2.0), order=3, mode="nearest")  # moving(p) = fixed(p + (1.5, -2))
    >>> matrix, info = register_sitk(fixed, moving, settings=SitkSettings(threads=1))
    >>> np.round(matrix[:2, 2], 1) + 0.0, sorted(info)
    (array([-1.5,  2. ]), ['iterations', 'metric', 'stop'])
    """
    import SimpleITK as sitk

    settings = settings or SitkSettings()
    fixed_image = sitk.GetImageFromArray(np.ascontiguousarray(fixed, dtype=np.float32))
    moving_image = sitk.GetImageFromArray(np.ascontiguousarray(moving, dtype=np.float32))
    if initial is None:
        transform = sitk.AffineTransform(sitk.CenteredTransformInitializer(
            fixed_image, moving_image, sitk.AffineTransform(2), sitk.CenteredTransformInitializerFilter.GEOMETRY))
    else:
        transform = matrix_to_sitk(initial, center=image_center(np.shape(fixed)))
    method = sitk.ImageRegistrationMethod()
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
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=settings.learning_rate, minStep=settings.min_step, numberOfIterations=settings.iterations,
        relaxationFactor=settings.relaxation, gradientMagnitudeTolerance=settings.gradient_tolerance)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel(shrinkFactors=list(settings.shrink_factors))
    method.SetSmoothingSigmasPerLevel(smoothingSigmas=list(settings.smoothing_sigmas))
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    method.SetInitialTransform(transform, inPlace=True)
    method.Execute(fixed_image, moving_image)
    info = {"stop": method.GetOptimizerStopConditionDescription(),
            "iterations": int(method.GetOptimizerIteration()), "metric": float(method.GetMetricValue())}
    return sitk_to_matrix(transform), info


