"""``refine``: the whole job, from a guide and a native-resolution cube to a refined transform.

1. Choose the working grid (DESIGN "Grids"): the guide block-averaged by an
   integer factor ``s`` so that a cube pixel spans at most about six working
   pixels.
2. Compare the cube with the guide at the cube's resolution: the guide as
   optical density (Beer-Lambert), blurred like the cube's spot and
   interpolation.
3. From the initial (device-based) placement, estimate the global gradient
   on a grid at the cube's resolution and register ``grad_y`` to ``grad_x``
   (coarse FFT search, then Gauss-Newton); then bring the cube onto the
   working grid with that transform, estimate again there and refine the
   registration. Pixels the cube does not cover stay out throughout.
4. Compose ``matrix = initial @ S @ R @ inv(S)``, check that the match
   improved, and resample the native cube with the result.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field, replace

import numpy as np

from . import baselines as _baselines
from ._backend import is_cupy_array, ndimage_module, resolve_backend, to_device, to_host
from ._validation import check_array, check_finite, check_levels, check_matrix, float_dtype
from .estimate import GlobalGradient, _upsampled_validity, estimate_global_gradient
from .pyramid import upsample_level
from .filters import sobel_magnitude
from .register import AffineRegistration, affine_mse, affine_ncc, register_affine
from .synthetic import fov_matrix
from .warp import warp_cube

__all__ = ["Refinement", "refine", "working_grid"]

METHODS = ("gradient", "band_sum", "band_std", "pca")
MAX_SCALE_CHANGE = 1.2  # along any axis, refined against initial
MIN_NCC = 0.2  # below this, grad_x and grad_y share too little structure to trust a registration
OUTPUT_GRIDS = ("working", "guide")


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
        ``S``: working-grid pixel to guide coordinate.
    registered : array, shape (rows, cols, bands)
        The cube resampled with ``matrix`` onto the working grid (or the guide
        grid); NaN where the cube does not reach. Same array kind as the input
        cube.
    valid : array of bool, shape (rows, cols)
        Pixels of ``registered`` the cube covers.
    gradient : GlobalGradient
        The (last) estimate on the working grid: ``grad_x``, ``grad_y``,
        weights.
    registration : AffineRegistration
        The last registration on the working grid; its ``matrix`` is relative
        to the placement that pass started from (``matrix`` above composes them).
    improved : bool
        Whether the refined transform beats the initial one (MSE of the
        gradient images over their overlap).
    message : str
    backend : str
        "numpy" or "cupy": where it was computed.
    timings : dict
        Seconds per stage.
    quality : dict
        TRE-free figures of the match, before and after: ``mse_before``,
        ``mse_after``, ``ncc_before``, ``ncc_after`` of the first estimate's
        gradient images over their overlap (what the guard compares).
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


def working_grid(guide_shape, initial, working_shape=None) -> tuple[int, tuple[int, int], np.ndarray]:
    """The working grid's factor ``s``, shape and ``S`` matrix (DESIGN "Grids").

    ``s = max(1, ceil(r / 6))`` with ``r = 1 / sqrt(|det(initial[:2, :2])|)``
    guide pixels per cube pixel, unless ``working_shape`` gives it.
    """
    rows, cols = guide_shape
    if working_shape is None:
        det = abs(float(np.linalg.det(initial[:2, :2])))
        if det <= 0:
            raise ValueError("initial must be invertible (its 2 x 2 linear part has determinant 0)")
        ratio = 1.0 / math.sqrt(det)
        s = max(1, math.ceil(ratio / 6 - 1e-9))
    else:
        shape = tuple(int(n) for n in working_shape)
        if len(shape) != 2 or min(shape) < 1:
            raise ValueError(f"working_shape must be (rows, cols) with positive sizes; got {working_shape}")
        s = max(1, min(rows // shape[0], cols // shape[1]))
    s = min(s, max(1, min(rows, cols) // 8))
    scale = np.array([[s, 0, (s - 1) / 2], [0, s, (s - 1) / 2], [0, 0, 1.0]])
    return s, (rows // s, cols // s), scale


def refine(
    guide,
    cube,
    *,
    initial=None,
    levels: int = 4,
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
) -> Refinement:
    """Refine a cube's registration to a guide image.

    Parameters
    ----------
    guide : array, shape (rows, cols)
        Brightfield image (NumPy or CuPy).
    cube : array, shape (cube_rows, cube_cols, bands)
        The hyperspectral cube at its native resolution.
    initial : array_like, shape (3, 3), optional
        Guide grid to native cube grid (device-based registration). Default:
        the cube spans the guide's field of view.
    levels : int, default 4
        Pyramid levels of the estimation.
    weights : "auto" or (alpha, beta)
        Level weights (eq. 9) or manual ones.
    backend : {"auto", "numpy", "cupy"}
        Where to compute; arrays come back in the input's kind.
    working_shape : (int, int), optional
        Overrides the working grid's size (the block factor is derived from it).
    output_grid : {"working", "guide"}
        Grid of ``registered``.
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

    Returns
    -------
    Refinement
    """
    timings = {}
    clock = time.perf_counter()
    report = progress if progress is not None else (lambda stage: None)
    check_array(guide, "guide", (2,), "2-D (rows, cols)")
    check_array(cube, "cube", (3,), "3-D (rows, cols, bands)")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}")
    if output_grid not in OUTPUT_GRIDS:
        raise ValueError(f"output_grid must be one of {OUTPUT_GRIDS}; got {output_grid!r}")
    return_device = is_cupy_array(cube)
    xp = resolve_backend(backend)
    guide_d = to_device(guide, xp).astype(float_dtype(guide.dtype), copy=False)
    cube_d = to_device(cube, xp)
    check_finite(guide_d, "guide", xp)
    initial = fov_matrix(guide.shape, cube.shape[:2]) if initial is None else check_matrix(initial, "initial")
    s, shape, scale = working_grid(guide.shape, initial, working_shape)
    check_levels(levels, shape)
    working_guide = _block_average(guide_d, s)
    if absorbance:
        working_guide = _optical_density(working_guide, xp)
    timings["prepare"] = time.perf_counter() - clock

    def estimate_at(rotation, step, bands=None):
        """Estimate on the working grid's pyramid level ``log2(step)``, from bands ``bands`` (default all)."""
        report(f"estimate ({'all' if bands is None else len(bands)} bands, grid step {step})")
        to_native = initial @ scale @ rotation
        coarse = ((shape[0] + step - 1) // step, (shape[1] + step - 1) // step)
        to_coarse = np.diag([step, step, 1.0])  # estimation pixel i sits at working coordinate step * i
        start = time.perf_counter()
        source = cube_d if bands is None else cube_d[:, :, xp.asarray(bands)]
        on_grid = warp_cube(source, to_native @ to_coarse, coarse, order=1)
        covered = _footprint(cube.shape[:2], to_native @ to_coarse, coarse, xp)
        on_grid[~covered] = 0
        timings["resample"] = timings.get("resample", 0.0) + time.perf_counter() - start
        start = time.perf_counter()
        reference = _matched_guide(working_guide, to_native, psf_sigma, xp)[::step, ::step]
        if method == "gradient":
            result = estimate_global_gradient(reference, on_grid, levels=levels, weights=weights, mask=covered)
        else:
            result = _baseline_gradient(reference, on_grid, covered, method, xp)
        result = _to_working_grid(result, step, shape, xp)
        if bands is not None:
            every_band = np.zeros((result.channel_weights.shape[0], cube.shape[2]))
            every_band[:, bands] = result.channel_weights
            result = replace(result, channel_weights=every_band)
        timings["estimate"] = timings.get("estimate", 0.0) + time.perf_counter() - start
        return result

    def register(result, rotation, coarse_search):
        report("register" + (" (with coarse search)" if coarse_search else ""))
        start = time.perf_counter()
        registration = register_affine(
            result.grad_x, result.grad_y, moving_mask=result.valid, coarse_search=coarse_search
        )
        timings["register"] = timings.get("register", 0.0) + time.perf_counter() - start
        return registration, rotation @ registration.matrix

    gradient = estimate_at(np.eye(3), _cube_resolution_step(initial @ scale))
    first = gradient
    registration, rotation = register(gradient, np.eye(3), coarse_search=True)
    if reestimate:
        # Aligned now: estimate on the working grid itself (its accuracy needs
        # it), and no coarse search, which could only jump away. (More rounds
        # add noise, not accuracy.)
        bands = None
        step = _cube_resolution_step(initial @ scale @ rotation)
        if screen_bands and method == "gradient" and step > 1:
            # The bands that can matter: those an exact estimate at the cube's
            # resolution, now aligned, gives weight at any level.
            aligned = estimate_at(rotation, step)
            support = np.flatnonzero((aligned.channel_weights > 0).any(axis=0))
            bands = support if support.size else None
        gradient = estimate_at(rotation, 1, bands)
        registration, rotation = register(gradient, rotation, coarse_search=False)

    # The guard: the first estimate's images, before against after.
    start = time.perf_counter()
    images = (first.grad_x, first.grad_y)
    before = affine_mse(*images, np.eye(3), moving_mask=first.valid)
    after = affine_mse(*images, rotation, moving_mask=first.valid)
    ncc_before = affine_ncc(*images, np.eye(3), moving_mask=first.valid)
    ncc_after = affine_ncc(*images, rotation, moving_mask=first.valid)
    figures = f"gradient MSE {before:.4g} -> {after:.4g}, NCC {ncc_before:.3f} -> {ncc_after:.3f}"
    if not _plausible(rotation):
        improved, reason = False, f"the refined transform flips or rescales by more than {MAX_SCALE_CHANGE - 1:.0%}"
    elif not (after < before and ncc_after > ncc_before):
        improved, reason = False, "the refinement did not improve the match"
    elif ncc_after < MIN_NCC:
        improved, reason = False, f"the gradient images hardly match (NCC below {MIN_NCC})"
    else:
        improved, reason = True, ""
    refined = initial @ scale @ rotation @ np.linalg.inv(scale)
    if improved:
        matrix = refined
        message = f"refined: {figures}"
    else:
        matrix = initial
        message = f"kept the initial transform: {reason} ({figures})"
        warnings.warn(message, UserWarning, stacklevel=2)
    timings["guard"] = time.perf_counter() - start

    report("resample the cube")
    start = time.perf_counter()
    if output_grid == "working":
        out_matrix, out_shape = matrix @ scale, shape
    else:
        out_matrix, out_shape = matrix, guide.shape
    registered = warp_cube(cube_d, out_matrix, out_shape, order=order)
    valid = _footprint(cube.shape[:2], out_matrix, out_shape, xp)
    if not return_device:
        # NumPy in, NumPy out, wherever it was computed.
        registered, valid = to_host(registered), to_host(valid)
        gradient = replace(
            gradient,
            **{name: None if getattr(gradient, name) is None else to_host(getattr(gradient, name))
               for name in ("grad_x", "grad_y", "guide_levels", "cube_levels", "valid")},
        )
    timings["warp"] = time.perf_counter() - start
    timings["total"] = time.perf_counter() - clock
    return Refinement(
        matrix=matrix,
        initial=initial,
        working_to_guide=scale,
        registered=registered,
        valid=valid,
        gradient=gradient,
        registration=registration,
        improved=improved,
        message=message,
        backend=xp.__name__,
        timings=timings,
        quality={"mse_before": before, "mse_after": after, "ncc_before": ncc_before, "ncc_after": ncc_after},
    )


def _matched_guide(guide, to_native, psf_sigma, xp):
    """The working guide at the cube's resolution: a Gaussian of the spot plus the interpolation.

    ``to_native`` maps working pixels to native cube coordinates. The blur's
    variance adds the spot's (``psf_sigma`` cube pixels) and the bilinear
    interpolation's (1/6 cube pixel^2). Re-sampling the guide through the cube's
    own grid would match even better on paper, but would imprint the grid's
    interpolation pattern on both images and pull the registration back to the
    placement it started from.
    """
    if psf_sigma is None:
        return guide
    pixel = 1.0 / math.sqrt(abs(float(np.linalg.det(to_native[:2, :2]))))  # working px per cube px
    sigma = math.sqrt(psf_sigma**2 + 1.0 / 6.0) * pixel
    return ndimage_module(xp).gaussian_filter(guide, sigma, mode="nearest")


def _optical_density(image, xp):
    """``-log(I / I_max)`` with ``I_max`` a high percentile, clipped away from log(0)."""
    top = float(xp.percentile(image, 99.9))
    if not top > 0:
        raise ValueError("guide must have positive intensities to convert to absorbance (absorbance=False otherwise)")
    return -xp.log(xp.clip(image / top, 1e-3, None))


def _block_average(image, s):
    """Mean of ``s x s`` blocks over the first ``s * (rows // s)`` rows and columns."""
    if s == 1:
        return image
    rows, cols = image.shape[0] // s, image.shape[1] // s
    return image[: rows * s, : cols * s].reshape(rows, s, cols, s).mean(axis=(1, 3))


def _footprint(cube_shape, matrix, shape, xp):
    """Output pixels whose mapped point lies in the cube's footprint (-0.5 .. size - 0.5)."""
    rows = xp.arange(shape[0], dtype=xp.float64)[:, None]
    cols = xp.arange(shape[1], dtype=xp.float64)[None, :]
    m = [[float(v) for v in row] for row in matrix[:2]]
    q_rows = m[0][0] * rows + m[0][1] * cols + m[0][2]
    q_cols = m[1][0] * rows + m[1][1] * cols + m[1][2]
    return (
        (q_rows >= -0.5) & (q_rows <= cube_shape[0] - 0.5) & (q_cols >= -0.5) & (q_cols <= cube_shape[1] - 0.5)
    )


def _cube_resolution_step(to_native) -> int:
    """Pixel step ``2**k`` of the working grid's pyramid level ``k`` at the cube's resolution.

    Levels finer than the cube resolves carry no information of the cube's
    (its values there are interpolated) but cost the most: the first estimate
    runs on the finest level whose pixels still sample the cube at least
    every 0.8 cube pixels.
    """
    pixel = 1.0 / math.sqrt(abs(float(np.linalg.det(to_native[:2, :2]))))  # working px per cube px
    return 2 ** max(0, int(math.floor(math.log2(max(pixel / 1.25, 1.0)))))


def _to_working_grid(result, step, shape, xp):
    """``grad_x``, ``grad_y`` and ``valid`` of an estimate on the coarse grid, on the working grid."""
    if step == 1:
        return result
    level = int(round(math.log2(step)))
    grad_x = upsample_level(result.grad_x, level, shape)
    grad_y = upsample_level(result.grad_y, level, shape)
    valid = xp.ones(result.grad_x.shape, dtype=bool) if result.valid is None else result.valid
    return replace(result, grad_x=grad_x, grad_y=grad_y, valid=_upsampled_validity(valid, level, shape, xp))


def _plausible(rotation) -> bool:
    """Reject outcomes no refinement of a device placement should give: a flip,
    or a change of scale along any axis beyond 20 %.

    Stage errors are shifts, small rotations and a few per cent of scale; a
    larger change is the optimiser shrinking the overlap to where both images
    are flat.
    """
    det = float(np.linalg.det(rotation[:2, :2]))
    singular = np.linalg.svd(rotation[:2, :2], compute_uv=False)
    return det > 0 and singular.min() > 1 / MAX_SCALE_CHANGE and singular.max() < MAX_SCALE_CHANGE


def _baseline_gradient(guide, on_grid, covered, method, xp):
    """A GlobalGradient-shaped result whose ``grad_y`` is a baseline image's Sobel magnitude."""
    image = _baselines.BASELINES[method](on_grid, mask=covered)
    image = xp.where(covered, xp.nan_to_num(image), 0)
    grad_x = sobel_magnitude(guide)
    grad_y = sobel_magnitude(image.astype(grad_x.dtype))
    valid = ndimage_module(xp).minimum_filter(covered.astype(xp.uint8), size=3, mode="nearest").astype(bool)
    # The MSE needs comparable scales: each gradient image at unit mean over the overlap.
    grad_x = grad_x / max(float(grad_x[valid].mean()), 1e-30)
    grad_y = grad_y / max(float(grad_y[valid].mean()), 1e-30)
    one = np.ones(1)
    return GlobalGradient(grad_x, grad_y, one, one, np.zeros((1, on_grid.shape[2])), grad_x[None], grad_y[None], valid)
