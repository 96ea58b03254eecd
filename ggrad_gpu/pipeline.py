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
   registration. Pixels the cube does not cover stay out throughout, and so
   do missing ones (NaN or inf in the guide or the cube, ``mask``): filled in
   from their neighbours for the filters, left out of the Gram matrices, the
   level weights and the registration metric.
4. Compose ``matrix = initial @ S @ R @ inv(S)``, check that the match
   improved, and resample the native cube with the result.
"""

from __future__ import annotations

import math
import numbers
import time
import warnings
from dataclasses import dataclass, field, replace

import numpy as np

from . import baselines as _baselines
from ._backend import array_module, block_rows, is_cupy_array, ndimage_module, resolve_backend, to_device, to_host
from ._validation import (
    GRAY_LAYOUT,
    all_finite,
    check_affine,
    check_band_axis,
    check_array,
    check_mask,
    float_dtype,
    max_levels,
    to_gray,
)
from .estimate import FLAT_ULPS, GlobalGradient, _estimate, _filled_validity, _level_lookup, _mask_validity, _upsampled_validity
from .filters import sobel_magnitude
from .level_weights import manual_level_weights
from .pyramid import upsample_level
from .register import AffineRegistration, _register, affine_mse, affine_ncc
from .synthetic import fov_matrix
from .warp import _warp, warp_cube

__all__ = ["Refinement", "refine", "working_grid"]

METHODS = ("gradient", "band_sum", "band_std", "pca")
MAX_SCALE_CHANGE = 1.2  # along any axis, refined against initial
MIN_NCC = 0.2  # below this, grad_x and grad_y share too little structure to trust a registration
MIN_OVERLAP = 16  # valid pixels the registration needs at least (its Gauss-Newton step does)
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
        try:
            shape = tuple(int(n) for n in working_shape)
        except (TypeError, ValueError):
            raise ValueError(
                f"working_shape must be (rows, cols) with positive sizes; got {working_shape!r}"
            ) from None
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
    band_axis: int = -1,
    mask=None,
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
        ``band_axis``). A pixel with NaN or inf in any band is missing for the
        estimation (eq. 5 needs every band), the same way as guide pixels;
        in ``registered`` it stays NaN in the bands where it was not finite.
    initial : array_like, shape (3, 3), optional
        Guide grid to native cube grid (device-based registration), affine
        and invertible. Default: the cube spans the guide's field of view.
    levels : int, default 4
        Pyramid levels of the estimation. The working grid and the grid at the
        cube's resolution must keep the coarsest level at least 3 x 3 pixels;
        the error for too many levels says how many fit.
    weights : "auto" or (alpha, beta)
        Level weights (eq. 9) or manual ones: two length-``levels``
        non-negative sequences, not all zero.
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
    band_axis : int, default -1
        The cube's band axis; it is moved last (``moveaxis``, a view, no
        copy). Where the cube's last two axes fit the guide's shape much
        better than its first two, a warning (or the error that the shape
        causes) suggests ``band_axis=0``.
    mask : array of bool, shape (cube_rows, cube_cols), optional
        Valid cube pixels on the cube's native grid (after ``band_axis``);
        False marks a missing pixel, treated as a NaN in every band.

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
    >>> phantom = synthetic.make_phantom(shape=(120, 140), bands=16, seed=1)
    >>> result = refine(phantom.guide, phantom.cube, initial=phantom.initial, levels=3, backend="numpy")
    >>> result.improved, result.registered.shape
    (True, (120, 140, 16))
    >>> bool(target_registration_error(result.matrix, phantom.matrix, (120, 140)).mean < 0.5)
    True
    """
    timings = {}
    clock = time.perf_counter()
    # ---- the arguments, before any work
    check_array(guide, "guide", (2, 3), GRAY_LAYOUT)
    if guide.ndim == 3 and guide.shape[2] > 4:
        raise ValueError(
            f"guide must be {GRAY_LAYOUT}; got shape {tuple(guide.shape)} "
            f"({guide.shape[2]} channels; is it a cube?)"
        )
    guide_shape = tuple(guide.shape[:2])
    band_axis = check_band_axis(band_axis)
    if getattr(cube, "ndim", None) == 2 and hasattr(cube, "dtype"):
        raise ValueError(
            f"cube must be 3-D (rows, cols, bands); got shape {tuple(cube.shape)} "
            "(a single band? pass cube[..., None])"
        )
    check_array(cube, "cube", (3,), "3-D (rows, cols, bands)")
    cube = array_module(cube=cube).moveaxis(cube, band_axis, -1)  # a view
    if mask is not None:
        mask = check_mask(mask, "mask", cube.shape[:2])
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}")
    if output_grid not in OUTPUT_GRIDS:
        raise ValueError(f"output_grid must be one of {OUTPUT_GRIDS}; got {output_grid!r}")
    if isinstance(order, bool) or not isinstance(order, numbers.Integral) or order not in (1, 3):
        raise ValueError(f"order must be 1 or 3; got {order!r}")
    if psf_sigma is not None and (
        isinstance(psf_sigma, bool) or not isinstance(psf_sigma, numbers.Real)
        or not math.isfinite(psf_sigma) or psf_sigma < 0
    ):
        raise ValueError(f"psf_sigma must be None or a finite number >= 0; got {psf_sigma!r}")
    if progress is not None and not callable(progress):
        raise TypeError(f"progress must be callable or None; got {type(progress).__name__}")
    if isinstance(levels, bool) or not isinstance(levels, numbers.Integral):
        raise TypeError(f"levels must be an integer; got {levels!r}")
    if levels < 1:
        raise ValueError(f"levels must be at least 1; got {levels}")
    levels = int(levels)
    if not (isinstance(weights, str) and weights == "auto"):
        manual_level_weights(weights, levels)  # raises, naming weights
    xp = resolve_backend(backend)
    initial_given = initial is not None
    initial = check_affine(initial, "initial") if initial_given else fov_matrix(guide_shape, cube.shape[:2])
    s, shape, scale = working_grid(guide_shape, initial, working_shape)
    first_step = _cube_resolution_step(initial @ scale)
    hint = _bands_first_hint(cube.shape, guide_shape, initial if initial_given else None) if band_axis == 2 else ""
    _check_grids(levels, guide_shape, cube.shape, shape, _grid(shape, first_step), hint)
    if not bool(_footprint(cube.shape[:2], initial @ scale @ np.diag([first_step, first_step, 1.0]),
                           _grid(shape, first_step), np).any()):
        raise ValueError("initial places the cube outside the guide: no guide pixel maps into the cube")
    if hint:
        warnings.warn(
            f"cube of shape {tuple(cube.shape)} does not fit the guide's {guide_shape[0]} x "
            f"{guide_shape[1]} pixels as (rows, cols, bands){hint}",
            UserWarning,
            stacklevel=2,
        )
    report = progress if progress is not None else (lambda stage: None)

    # ---- the data on the compute device; missing values
    return_device = is_cupy_array(cube)
    guide_d = to_device(guide, xp)
    if guide_d.ndim == 3:
        guide_d = to_gray(guide_d, "guide")
    guide_d = guide_d.astype(float_dtype(guide_d.dtype), copy=False)
    cube_d = to_device(cube, xp)
    # ``cube_out``: NaN wherever a value is missing (for ``registered``);
    # ``cube_est``: missing pixels filled in, dead bands 0 (for the estimates).
    cube_out, native_ok, dead_bands = _missing_cube(cube_d, None if mask is None else to_device(mask, xp), xp)
    cube_est = cube_out
    if native_ok is not None or dead_bands is not None:
        cube_est = xp.where(xp.isnan(cube_out), 0, cube_out)
        if native_ok is not None:
            cube_est = _inpaint(cube_est, native_ok, xp)
    working_guide = _block_average(guide_d, s)
    guide_missing = None if all_finite(working_guide, xp) else ~xp.isfinite(working_guide)
    if guide_missing is not None:
        if bool(guide_missing.all()):
            raise ValueError("guide has no finite pixel (all NaN or inf)")
        working_guide = _inpaint(xp.where(guide_missing, 0, working_guide), ~guide_missing, xp)
    if absorbance:
        working_guide = _optical_density(working_guide, xp)
    # A constant guide (to rounding) has no edges to register on.
    guide_flat = float(working_guide.max() - working_guide.min()) <= (
        FLAT_ULPS * np.finfo(working_guide.dtype).eps * float(xp.abs(working_guide).max())
    )
    timings["prepare"] = time.perf_counter() - clock

    def estimate_at(rotation, step, bands=None):
        """Estimate on the working grid's pyramid level ``log2(step)``, from bands ``bands`` (default all).

        Returns the estimate on the working grid and its :class:`_Validity`.
        """
        report(f"estimate ({'all' if bands is None else len(bands)} bands, grid step {step})")
        to_native = initial @ scale @ rotation
        coarse = _grid(shape, step)
        to_coarse = to_native @ np.diag([step, step, 1.0])  # estimation pixel i sits at working coordinate step * i
        start = time.perf_counter()
        source = cube_est if bands is None else cube_est[:, :, xp.asarray(bands)]
        on_grid = warp_cube(source, to_coarse, coarse, order=1)
        covered = _footprint(cube.shape[:2], to_coarse, coarse, xp)
        on_grid[~covered] = 0
        cube_filled = cube_gap = None
        if native_ok is not None:
            # The Gram matrices leave out every pixel that draws on a missing
            # cube pixel; the registration metric only those that draw mostly
            # on one (its own cell): excluding the whole bilinear reach there
            # costs the metric a fifth of the cube at 5 % missing pixels and
            # makes it noisier than the filled-in values do.
            share = _missing_share(native_ok, to_coarse, coarse, xp)
            cube_filled, cube_gap = (share > 0.01) & covered, (share > 0.5) & covered
        timings["resample"] = timings.get("resample", 0.0) + time.perf_counter() - start
        start = time.perf_counter()
        reference, guide_filled = _matched_guide(working_guide, to_native, psf_sigma, xp, guide_missing)
        reference = reference[::step, ::step]
        if guide_filled is not None:
            guide_filled = guide_filled[::step, ::step]
        filled = _either(cube_filled, guide_filled)
        if method == "gradient":
            result = _estimate(reference, on_grid, levels=levels, weights=weights, mask=covered, filled=filled)
            strict = _mask_validity(covered, levels, on_grid.dtype, xp)
            cube_missing, guide_missing_grid = (
                None if f is None else ~_filled_validity(f, levels, coarse, xp) for f in (cube_gap, guide_filled)
            )
        else:
            result = _baseline_gradient(reference, on_grid, covered if filled is None else covered & ~filled,
                                        method, xp)
            strict, cube_missing, guide_missing_grid = result.valid, None, None
        validity = _Validity(strict, cube_missing, guide_missing_grid).on_working_grid(step, shape, xp)
        result = _to_working_grid(result, step, shape, xp)
        result = replace(result, valid=validity.moving & validity.fixed_or_true(xp))
        if bands is not None:
            every_band = np.zeros((result.channel_weights.shape[0], cube.shape[2]))
            every_band[:, bands] = result.channel_weights
            result = replace(result, channel_weights=every_band)
        timings["estimate"] = timings.get("estimate", 0.0) + time.perf_counter() - start
        return result, validity

    def register(result, validity, rotation, coarse_search):
        report("register" + (" (with coarse search)" if coarse_search else ""))
        start = time.perf_counter()
        if int(result.valid.sum()) < MIN_OVERLAP:
            # Nothing to register on: keep the placement (the guard reports it).
            registration = AffineRegistration(np.eye(3), math.inf, math.inf, 0, False,
                                              message="too few valid pixels to register")
        else:
            registration = _register(
                result.grad_x, result.grad_y, moving_mask=validity.strict, coarse_search=coarse_search,
                fixed_missing=validity.guide_missing, moving_missing=validity.cube_missing,
            )
        timings["register"] = timings.get("register", 0.0) + time.perf_counter() - start
        return registration, rotation @ registration.matrix

    gradient, validity = estimate_at(np.eye(3), first_step)
    first, first_validity = gradient, validity
    registration, rotation = register(gradient, validity, np.eye(3), coarse_search=True)
    if reestimate:
        # Aligned now: estimate on the working grid itself (its accuracy needs
        # it), and no coarse search, which could only jump away. (More rounds
        # add noise, not accuracy.)
        bands = None
        step = _cube_resolution_step(initial @ scale @ rotation)
        if screen_bands and method == "gradient" and step > 1 and levels <= max_levels(_grid(shape, step)):
            # The bands that can matter: those an exact estimate at the cube's
            # resolution, now aligned, gives weight at any level.
            aligned, _ = estimate_at(rotation, step)
            support = np.flatnonzero((aligned.channel_weights > 0).any(axis=0))
            bands = support if support.size else None
        gradient, validity = estimate_at(rotation, 1, bands)
        registration, rotation = register(gradient, validity, rotation, coarse_search=False)

    # The guard: the first estimate's images, before against after.
    start = time.perf_counter()
    images = (first.grad_x, first.grad_y)
    masks = {"fixed_mask": first_validity.fixed, "moving_mask": first_validity.moving}
    overlap = first.valid
    before = affine_mse(*images, np.eye(3), **masks)
    after = affine_mse(*images, rotation, **masks)
    ncc_before = affine_ncc(*images, np.eye(3), **masks)
    ncc_after = affine_ncc(*images, rotation, **masks)
    figures = f"gradient MSE {before:.4g} -> {after:.4g}, NCC {ncc_before:.3f} -> {ncc_after:.3f}"
    if int(overlap.sum()) < MIN_OVERLAP:
        improved, reason = False, (
            "too few valid pixels where the guide and the cube overlap (little overlap, or missing data)"
        )
    elif guide_flat or _is_flat(first.grad_x, overlap, xp):
        improved, reason = False, "the guide has no edges where the cube overlaps it (its gradient image is 0)"
    elif _is_flat(first.grad_y, overlap, xp):
        improved, reason = False, (
            "the cube has no spatial structure that the guide shares (its global gradient image is 0)"
        )
    elif not np.isfinite(rotation).all() or not _plausible(rotation):
        improved, reason = False, f"the refined transform flips or rescales by more than {MAX_SCALE_CHANGE - 1:.0%}"
    elif not (after < before and ncc_after > ncc_before):
        improved, reason = False, "the refinement did not improve the match"
    elif ncc_after < MIN_NCC:
        improved, reason = False, f"the gradient images hardly match (NCC below {MIN_NCC})"
    else:
        improved, reason = True, ""
    if improved:
        matrix = initial @ scale @ rotation @ np.linalg.inv(scale)
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
        out_matrix, out_shape = matrix, guide_shape
    registered = warp_cube(cube_out, out_matrix, out_shape, order=order)
    valid = _footprint(cube.shape[:2], out_matrix, out_shape, xp)
    if cube_out is not cube_d:
        valid &= _has_data(registered, xp)  # missing pixels are not covered
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


@dataclass(frozen=True)
class _Validity:
    """Where an estimate's gradient images hold data, split by cause.

    ``strict``: pixels whose gradients the cube's footprint fully covers
    (from ``mask`` in ``_estimate``); ``cube_missing`` and ``guide_missing``:
    pixels left out for filled-in missing values of the cube (moving image)
    or of the guide (fixed image), or None where there are none.
    """

    strict: object
    cube_missing: object = None
    guide_missing: object = None

    @property
    def moving(self):
        """The cube's valid pixels (the registration's moving mask)."""
        return self.strict if self.cube_missing is None else self.strict & ~self.cube_missing

    @property
    def fixed(self):
        """The guide's valid pixels (the fixed mask), or None if all are."""
        return None if self.guide_missing is None else ~self.guide_missing

    def fixed_or_true(self, xp):
        return True if self.guide_missing is None else ~self.guide_missing

    def on_working_grid(self, step, shape, xp):
        """The maps of an estimate at pixel step ``step``, on the working grid ``shape``.

        The footprint part is eroded as for cubic upsampling
        (``_upsampled_validity``); the scattered missing pixels are only
        carried to the working pixels between them.
        """
        if step == 1:
            return self
        level = int(round(math.log2(step)))
        return _Validity(
            _upsampled_validity(self.strict, level, shape, xp),
            *(None if m is None else _level_lookup(m, level, shape, xp)
              for m in (self.cube_missing, self.guide_missing)),
        )


def _either(a, b):
    """``a | b`` where either may be None."""
    if a is None or b is None:
        return b if a is None else a
    return a | b



def _bands_first_hint(cube_shape, guide_shape, initial=None) -> str:
    """A hint when the cube's last two axes fit the guide far better than its first two.

    The expected aspect ratio (rows / cols) of the cube's grid is the
    guide's, or, with an ``initial`` matrix, that of the region of the cube
    the guide maps to. Bands-first cubes such as (200, 70, 83) or (16, 70,
    83) for a 350 x 415 guide show up as a grid of the wrong shape: the hint
    comes where axes 1 and 2 fit within 15 % and axes 0 and 1 miss by more
    than 25 %.
    """
    if initial is None:
        expected = guide_shape[0] / guide_shape[1]
    else:
        extent = np.abs(initial[:2, :2]) @ np.asarray(guide_shape, dtype=np.float64)
        expected = extent[0] / extent[1]
    rows, cols, bands = cube_shape

    def misfit(ratio):
        return abs(math.log(ratio / expected))

    if misfit(cols / bands) < math.log(1.15) and misfit(rows / cols) > math.log(1.25):
        return "; the bands look like they are first; pass band_axis=0"
    return ""


def _grid(shape, step) -> tuple[int, int]:
    """The working grid's pyramid level with pixel step ``step``."""
    return (shape[0] + step - 1) // step, (shape[1] + step - 1) // step


def _check_grids(levels, guide_shape, cube_shape, working, first, hint) -> None:
    """Raise, naming the parameter, where the grids cannot hold ``levels`` pyramid levels."""
    if max_levels(working) == 0:
        raise ValueError(
            f"guide must be at least 3 x 3 pixels; got {guide_shape[0]} x {guide_shape[1]}"
        )
    if max_levels(first) == 0:
        raise ValueError(
            f"cube of {cube_shape[0]} x {cube_shape[1]} pixels is too small: the estimate at its "
            f"resolution runs on a {first[0]} x {first[1]} grid, which must be at least 3 x 3{hint}"
        )
    maximum = min(max_levels(working), max_levels(first))
    if levels > maximum:
        raise ValueError(
            f"levels={levels} is too many for a guide of {guide_shape[0]} x {guide_shape[1]} and a cube of "
            f"{cube_shape[0]} x {cube_shape[1]} pixels: the estimate at the cube's resolution runs on a "
            f"{first[0]} x {first[1]} grid and the working grid is {working[0]} x {working[1]} "
            f"(at most {maximum} levels){hint}"
        )


def _missing_cube(cube, mask, xp):
    """The cube with NaN where a value is missing, its valid pixels and its dead bands.

    Returns ``(cube, None, None)`` (the input itself) when every value is
    finite and ``mask`` is absent or all True. Otherwise a float copy with NaN
    at non-finite values and at every band of pixels outside ``mask``; the
    boolean map of pixels finite in every band that has any data (None if
    all are); and the bands without any finite value (None if there are
    none), which the estimates leave out.
    """
    if (mask is None or bool(mask.all())) and all_finite(cube, xp):
        return cube, None, None
    values = cube.astype(float_dtype(cube.dtype))  # a copy
    finite = xp.isfinite(values)
    if mask is not None:
        finite &= mask[..., None]
    values[~finite] = xp.nan
    present = finite.any(axis=(0, 1))
    if not bool(present.any()):
        raise ValueError("cube has no finite value (inside mask)")
    ok = (finite | ~present).all(axis=2)
    if not bool(ok.any()):
        raise ValueError("cube has no pixel with a finite value in every band (inside mask)")
    dead = None if bool(present.all()) else ~present
    return values, (None if bool(ok.all()) else ok), dead


def _inpaint(values, ok, xp):
    """``values`` (rows, cols[, bands]) with the pixels where ``ok`` is False filled in, in place.

    Normalised Gaussian convolution at growing scales (sigma 1, 2, 4, ...
    pixels) over the valid pixels and those already filled: a missing pixel
    takes the local mean of its neighbourhood, a hole fills smoothly from
    its border inwards. Whatever is left when the scale exceeds the image
    takes the mean of the valid pixels. Values at missing pixels on entry
    must be finite (e.g. 0).
    """
    ndi = ndimage_module(xp)
    todo = ~ok
    weight = ok.astype(values.dtype)
    tail = (0,) * (values.ndim - 2)
    limit = 2 * max(values.shape[:2])
    sigma = 1.0
    while bool(todo.any()):
        if sigma > limit:
            values[todo] = values[ok].mean(axis=0)
            break
        total_weight = ndi.gaussian_filter(weight, sigma, mode="nearest")
        total = ndi.gaussian_filter(values, (sigma, sigma) + tail, mode="nearest")
        here = todo & (total_weight > 0.05)
        if bool(here.any()):
            share = total_weight[here]
            values[here] = total[here] / (share if values.ndim == 2 else share[:, None])
            weight[here] = 1
            todo &= ~here
        sigma *= 2
    return values


def _missing_share(native_ok, matrix, shape, xp):
    """The share of each grid pixel's bilinear weight that falls on missing cube pixels."""
    missing = (~native_ok).astype(xp.float32)[:, :, None]
    return _warp(missing, matrix, shape, order=1, outside="clamp")[:, :, 0]


def _has_data(registered, xp):
    """Pixels of a resampled cube with a finite value in at least one band (by blocks of rows)."""
    out = xp.empty(registered.shape[:2], dtype=bool)
    rows = block_rows(registered.shape, 1, xp)
    for start in range(0, registered.shape[0], rows):
        out[start : start + rows] = ~xp.isnan(registered[start : start + rows]).all(axis=2)
    return out


def _is_flat(image, valid, xp) -> bool:
    """Whether ``image`` is 0 at every pixel of ``valid``."""
    return not float(xp.abs(xp.where(valid, image, 0)).max()) > 0


def _matched_guide(guide, to_native, psf_sigma, xp, missing=None):
    """The working guide at the cube's resolution: a Gaussian of the spot plus the interpolation.

    ``to_native`` maps working pixels to native cube coordinates. The blur's
    variance adds the spot's (``psf_sigma`` cube pixels) and the bilinear
    interpolation's (1/6 cube pixel^2). Re-sampling the guide through the cube's
    own grid would match even better on paper, but would imprint the grid's
    interpolation pattern on both images and pull the registration back to the
    placement it started from.

    Returns the guide and, where ``missing`` marks filled-in pixels, the
    pixels whose blurred value draws more than a quarter of its weight from
    them (else None).
    """
    if psf_sigma is None:
        return guide, missing
    pixel = 1.0 / math.sqrt(abs(float(np.linalg.det(to_native[:2, :2]))))  # working px per cube px
    sigma = math.sqrt(psf_sigma**2 + 1.0 / 6.0) * pixel
    ndi = ndimage_module(xp)
    blurred = ndi.gaussian_filter(guide, sigma, mode="nearest")
    if missing is None:
        return blurred, None
    return blurred, ndi.gaussian_filter(missing.astype(guide.dtype), sigma, mode="nearest") > 0.25


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
    if bool(valid.any()):
        grad_x = grad_x / max(float(grad_x[valid].mean()), 1e-30)
        grad_y = grad_y / max(float(grad_y[valid].mean()), 1e-30)
    one = np.ones(1)
    return GlobalGradient(grad_x, grad_y, one, one, np.zeros((1, on_grid.shape[2])), grad_x[None], grad_y[None], valid)
