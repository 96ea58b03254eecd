"""Inputs made ready for ``refine``: the guide on the working grid, the cube with its missing values.

The guide becomes the working grid's image (its region block-averaged by
``s``), as optical density where it is transmitted light, and, for each
estimate, blurred to the cube's resolution. The cube keeps its native grid;
missing values (NaN, inf, outside ``mask``) become NaN, and a map of the
pixels with data says where the estimates may trust it.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, replace

import numpy as np

from .._backend import array_module, ndimage_module, to_device, to_host
from .._lazy.chunked import held_once, is_dask_array, keep_source, prepare_lazy_cube
from .._memory import block_rows, retry_smaller
from .._validation import all_finite, float_dtype, to_gray
from ..core.coverage import fill_gaps
from ..core.denoise import signal_subspace, subspace_samples
from ..core.factored import FactoredCube, imagewise, is_factored
from ..core.geometry import WorkingGrid, block_mean, pixels_per_cube_pixel
from ..core.intensity import intensity_scale, normalised
from ..core.pyramid import blur_decimate
from ..core.warp import warp_cube

__all__ = [
    "PreparedCube",
    "PreparedGuide",
    "has_data",
    "matched_guide",
    "missing_share",
    "optical_density",
    "prepare_cube",
    "prepare_guide",
]

# A guide constant to this many units in the last place has no edges to register on.
FLAT_ULPS = 100


@dataclass(frozen=True)
class PreparedGuide:
    """The guide on the working grid.

    Attributes
    ----------
    image : array, shape grid.shape
        Block-averaged region of the guide (optical density with
        ``absorbance``), missing pixels filled in.
    missing : array of bool or None
        Working pixels whose guide values were missing (None: none were).
    flat : bool
        Whether the image is constant to rounding (no edges at all).

    Examples
    --------
    >>> guide = np.full((8, 8), 100.0); guide[:, 4:] = 50.0; guide[0, 0] = np.nan
    >>> grid = WorkingGrid(s=2, origin=(0, 0), shape=(4, 4), to_guide=np.eye(3), cube_step=1)
    >>> prepared = prepare_guide(guide, grid, np, absorbance=False)
    >>> isinstance(prepared, PreparedGuide), prepared.image.shape, bool(prepared.flat)
    (True, (4, 4), False)
    >>> prepared.missing.astype(int)[0], float(prepared.image[0, 0])  # the NaN block, filled from its neighbour
    (array([1, 0, 0, 0]), 100.0)
    """

    image: object
    missing: object
    flat: bool


@dataclass(frozen=True)
class PreparedCube:
    """The native cube with its missing values.

    Attributes
    ----------
    values : array, shape (rows, cols, bands)
        The cube itself when every value is usable, else a float copy with NaN
        at every missing value (and at every band of pixels outside ``mask``).
    with_data : array of bool or None
        Native pixels finite in every band that has data (None: all are).
    dead_bands : numpy.ndarray of int or None
        Bands without any finite value (None: there are none); the estimates
        read them as 0, ``registered`` keeps them NaN.
    denoised : array, FactoredCube or None
        ``values`` projected on their signal subspace
        (:func:`ggrad_gpu.core.denoise.signal_subspace`), which the
        estimates read instead; None: they read ``values``. An in-memory
        cube without missing values keeps it factored where it has few
        components for its bands (:meth:`ggrad_gpu.core.denoise.Subspace.factored`).
    normalised : array, FactoredCube or None
        What the estimates read otherwise, divided per pixel by its
        spectrum's total (:mod:`ggrad_gpu.core.intensity`); the estimates
        then read it instead.

    Examples
    --------
    >>> cube = np.ones((3, 3, 2)); cube[..., 1] = np.nan  # band 1 holds no value at all
    >>> prepared = prepare_cube(cube, None, np)
    >>> isinstance(prepared, PreparedCube), prepared.dead_bands.tolist(), prepared.with_data is None
    (True, [1], True)
    """

    values: object
    with_data: object = None
    dead_bands: np.ndarray | None = None
    denoised: object = None
    normalised: object = None
    # coarsened's levels, made once (not an init field: a replace() copy reads other values).
    coarse: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    # A lazy factored projection whose coefficients are still read from the cube (until
    # held_coefficients), and whether the estimates then read them normalised (if that fits).
    unheld: bool = False
    pending_normalise: bool = False

    @property
    def for_estimates(self):
        """What the estimates read: ``normalised``, else ``denoised``, else ``values``."""
        if self.normalised is not None:
            return self.normalised
        return self.values if self.denoised is None else self.denoised

    def coarsened(self, times: int):
        """``for_estimates`` at level ``times`` of its Gaussian pyramid, made once.

        Level pixel ``i`` sits at native coordinate ``2**times * i``
        (:mod:`ggrad_gpu.core.pyramid`). A lazy cube's level is computed once:
        in memory where it is small, else into a temporary store
        (:func:`ggrad_gpu._lazy.chunked.held_once`).

        Examples
        --------
        >>> from ggrad_gpu.core.pyramid import gaussian_pyramid
        >>> cube = np.random.default_rng(0).random((32, 24, 3)).astype(np.float32)
        >>> prepared = prepare_cube(cube, None, np)
        >>> bool(np.array_equal(prepared.coarsened(2), gaussian_pyramid(cube, 3)[2]))
        True
        >>> prepared.coarsened(2) is prepared.coarsened(2), prepared.coarsened(0) is cube
        (True, True)
        """
        if times == 0:
            return keep_source(self.for_estimates)
        if times not in self.coarse:
            level = keep_source(self.for_estimates)  # a large lazy cube: its stored copy, read once more
            for _ in range(times):
                level = imagewise(blur_decimate, level)
            self.coarse[times] = imagewise(held_once, level)
        return self.coarse[times]

    def held_coefficients(self) -> "PreparedCube":
        """This cube with a lazy factored projection's coefficients held, and normalised if asked.

        For ``refine``'s :func:`ggrad_gpu._lazy.chunked.checkpoints` block:
        the coefficients are computed once from the cube (one pass) and kept
        in memory or in a temporary store (:func:`ggrad_gpu._lazy.chunked.held_once`),
        read as chunks; the totals that decide the normalisation
        (:func:`ggrad_gpu.core.intensity.intensity_scale`) come from them, and
        the normalised spectra are them times each pixel's factor, chunk by
        chunk. Anything else is returned as it is.
        """
        if not self.unheld:
            return self
        factored = self.denoised
        base = held_once(factored.coefficients)
        if not is_dask_array(base):
            base = _as_chunks(base, self.values.chunks[:2])
        held = replace(self, denoised=FactoredCube(base, factored.basis), unheld=False, pending_normalise=False)
        if not self.pending_normalise:
            return held
        return _normalised(held, intensity_scale(None, held.with_data, totals=held.denoised.totals()))

    def as_given(self) -> "PreparedCube":
        """This cube without its normalised spectra: the estimates read ``denoised`` (or ``values``)."""
        return replace(self, normalised=None)


def prepare_guide(guide, grid: WorkingGrid, xp, *, absorbance: bool) -> PreparedGuide:
    """The guide's region of ``grid``, block-averaged by ``grid.s``, on module ``xp``.

    Only the region is moved to the device. Missing pixels (NaN, inf) are
    filled from their nearest neighbour with data; with ``absorbance`` the
    image becomes its optical density (:func:`optical_density`).

    Examples
    --------
    >>> guide = np.full((8, 8), 100.0); guide[:, 4:] = 50.0
    >>> grid = WorkingGrid(s=2, origin=(0, 0), shape=(4, 4), to_guide=np.eye(3), cube_step=1)
    >>> np.round(prepare_guide(guide, grid, np, absorbance=True).image[0], 3) + 0.0  # half the light: log(2)
    array([0.   , 0.   , 0.693, 0.693])
    """
    rows, cols = grid.guide_region()
    region = to_device(guide[rows, cols], xp)
    if region.ndim == 3:
        region = to_gray(region, "guide")
    region = region.astype(float_dtype(region.dtype), copy=False)
    image = block_mean(region, grid.s)
    missing = None if all_finite(image, xp) else ~xp.isfinite(image)
    if missing is not None:
        if bool(missing.all()):
            raise ValueError("guide has no finite pixel (all NaN or inf) where the cube lies")
        image = fill_gaps(image, missing)
    if absorbance:
        image = optical_density(image)
    spread = float(image.max() - image.min())
    flat = spread <= FLAT_ULPS * np.finfo(image.dtype).eps * float(xp.abs(image).max())
    return PreparedGuide(image, missing, flat)


def prepare_cube(cube, mask, xp, *, denoise: bool = False, normalise: bool = False,
                 memory_limit=None) -> PreparedCube:
    """The native cube on ``xp`` with NaN at missing values, and its pixels with data.

    With ``denoise``, also the cube projected on its signal subspace for the
    estimates (:func:`ggrad_gpu.core.denoise.signal_subspace`); with
    ``normalise``, what the estimates read is divided per pixel by its
    spectrum's total (:mod:`ggrad_gpu.core.intensity`). Raises ValueError,
    naming ``cube``, when no pixel has data. A dask cube stays lazy
    (:func:`ggrad_gpu._lazy.chunked.prepare_lazy_cube`); a factored
    projection's coefficients are computed here and held in memory where
    they take at most an eighth of ``memory_limit`` (bytes; None: no limit),
    else they stay lazy (``unheld``) until ``refine`` holds them
    (:meth:`PreparedCube.held_coefficients`) and decides the normalisation.

    Examples
    --------
    >>> cube = np.ones((3, 3, 2))
    >>> prepare_cube(cube, None, np).values is cube  # nothing missing: the cube itself
    True
    >>> cube[0, 0, 0] = np.nan
    >>> mask = np.ones((3, 3), bool); mask[2, 2] = False
    >>> prepared = prepare_cube(cube, mask, np)
    >>> prepared.with_data.astype(int)
    array([[0, 1, 1],
           [1, 1, 1],
           [1, 1, 0]])
    >>> bool(np.isnan(prepared.values[2, 2]).all()), bool(np.isfinite(cube[2, 2]).all())  # a copy: cube unchanged
    (True, True)
    """
    samples = None
    if is_dask_array(cube):
        # The denoising's samples read in the same pass as the missing values (one read of the store, not two).
        values, with_data, dead_bands, samples = prepare_lazy_cube(
            cube, mask, xp, samples=subspace_samples(cube.shape) if denoise else ())
        prepared = PreparedCube(values, with_data, dead_bands)
    else:
        prepared = _prepared_in_memory(cube, mask, xp)
    totals = None
    lazy = is_dask_array(prepared.values)
    if denoise:
        subspace = signal_subspace(prepared.values, project=prepared.with_data is not None, samples=samples or None)
        if subspace.rank is not None:
            denoised, unheld = subspace.values, False
            if denoised is None:  # complete: kept factored where that is smaller
                denoised, unheld = _factored(subspace, prepared, memory_limit)
            if denoised is None:
                denoised = subspace.projected(prepared.values)
            if unheld:  # read from the cube until refine holds them: the totals come from what is held
                return replace(prepared, denoised=denoised, unheld=True, pending_normalise=normalise)
            prepared = replace(prepared, denoised=denoised)
            if is_factored(denoised):
                totals = denoised.totals() if normalise else None
            elif normalise and lazy:  # a lazy projection's totals, no band projected
                totals = subspace.totals(prepared.values)
    scale = intensity_scale(prepared.for_estimates, prepared.with_data, totals=totals) if normalise else None
    return _normalised(prepared, scale)


def _normalised(prepared, scale):
    """``prepared`` with its normalised spectra for the estimates (``scale`` per pixel), or as it is (None)."""
    if scale is None:
        return prepared
    estimated = prepared.for_estimates
    scaled = estimated.pixel_scaled(scale) if is_factored(estimated) else normalised(estimated, scale)
    return replace(prepared, normalised=scaled)


def _factored(subspace, prepared, memory_limit):
    """The projection of ``prepared.values`` factored (:meth:`Subspace.factored`), or None; and whether unheld.

    A lazy cube's coefficients are computed here (one pass) where they take
    at most an eighth of ``memory_limit``, and read as chunks; else they
    stay lazy (unheld: True) until :meth:`PreparedCube.held_coefficients`.
    """
    factored = subspace.factored(prepared.values, dead_bands=prepared.dead_bands)
    if factored is None or not is_dask_array(factored.coefficients):
        return factored, False
    if memory_limit is not None and factored.coefficients.nbytes > memory_limit // 8:
        return factored, True
    chunks = prepared.values.chunks[:2]
    return factored.pixelwise(lambda coefficients: _as_chunks(coefficients.compute(), chunks)), False


def _as_chunks(coefficients, chunks):
    """In-memory ``coefficients`` read as a dask array in ``chunks`` (rows, cols), all of them whole."""
    import dask.array as da

    return da.from_array(coefficients, chunks=chunks + (-1,))


def _prepared_in_memory(cube, mask, xp) -> PreparedCube:
    cube = to_device(cube, xp)
    if cube.shape[2] > 1 and cube.strides[2] != cube.itemsize:
        # A bands-first cube (band_axis=0 moves the axis as a view): made
        # band-last once here, not by every warp of it.
        cube = xp.ascontiguousarray(cube)
    mask = None if mask is None else to_device(mask, xp)
    if (mask is None or bool(mask.all())) and all_finite(cube, xp):
        return PreparedCube(cube)
    values = cube.astype(float_dtype(cube.dtype))  # a copy: the caller's cube is never changed
    present = _mark_missing(values, mask, xp)
    if not bool(present.any()):
        raise ValueError("cube has no finite value (inside mask)")
    with_data = xp.empty(values.shape[:2], dtype=bool)

    def pixels_with_data(start, size):
        stop = min(start + size, values.shape[0])
        with_data[start:stop] = (xp.isfinite(values[start:stop]) | ~present).all(axis=2)
        return stop

    _by_rows(pixels_with_data, values.shape, xp)
    if not bool(with_data.any()):
        raise ValueError("cube has no pixel with a finite value in every band (inside mask)")
    dead = np.flatnonzero(~to_host(present))
    return PreparedCube(values, None if bool(with_data.all()) else with_data, dead if dead.size else None)


def _mark_missing(values, mask, xp):
    """Set NaN in place at ``values``' non-finite values and outside ``mask``; which bands have data.

    Block by block of rows, with ``copyto``: the boolean maps are a block's,
    never the cube's, and no index array is built.
    """
    present = xp.zeros(values.shape[2], dtype=bool)

    def mark(start, size):
        # Idempotent, so a block that runs out of memory is simply redone smaller.
        stop = min(start + size, values.shape[0])
        block = values[start:stop]
        finite = xp.isfinite(block)
        if mask is not None:
            finite &= mask[start:stop, :, None]
        xp.copyto(block, xp.nan, where=~finite)
        present[...] |= finite.any(axis=(0, 1))
        return stop

    _by_rows(mark, values.shape, xp)
    return present


def _by_rows(run, shape, xp, *, stage: str = "missing cube values") -> None:
    """``run(start, rows)`` over blocks of rows (two boolean maps of a block near the budget), retried smaller."""
    rows = block_rows(shape, 2, xp)
    start = 0
    while start < shape[0]:
        start, rows = retry_smaller(functools.partial(run, start), rows, stage=stage, unit="rows", xp=xp)


def optical_density(image):
    """``-log(I / I_max)`` with ``I_max`` a high percentile, clipped away from log(0).

    Examples
    --------
    >>> image = np.full((10, 100), 100.0); image[0, :2] = [50.0, 10.0]  # I_max = 100
    >>> np.round(optical_density(image)[0, :3], 3) + 0.0  # log(2), log(10), 0
    array([0.693, 2.303, 0.   ])
    """
    xp = array_module(image=image)
    top = float(xp.percentile(image, 99.9))
    if not top > 0:
        raise ValueError("guide must have positive intensities to convert to absorbance (absorbance=False otherwise)")
    return -xp.log(xp.clip(image / top, 1e-3, None))


def matched_guide(image, missing, to_cube, psf_sigma):
    """The working guide at the cube's resolution: a Gaussian of the spot plus the interpolation.

    ``to_cube`` maps working pixels to native cube coordinates. The blur's
    variance adds the spot's (``psf_sigma`` cube pixels) and the bilinear
    interpolation's (1/6 cube pixel^2). Re-sampling the guide through the
    cube's own grid would match even better on paper, but would imprint the
    grid's interpolation pattern on both images and pull the registration
    back to the placement it started from.

    Returns the guide and, where ``missing`` marks filled-in pixels, the
    pixels whose blurred value draws more than a quarter of its weight from
    them (else None). With ``psf_sigma`` None, the guide as it is.

    Examples
    --------
    >>> import scipy.ndimage as ndi
    >>> image = np.zeros((16, 16)); image[:, 8:] = 1.0
    >>> to_cube = np.diag([0.5, 0.5, 1.0])  # 2 working pixels per cube pixel
    >>> blurred, missing = matched_guide(image, None, to_cube, 0.5)
    >>> sigma = np.sqrt(0.5**2 + 1 / 6) * 2
    >>> bool(np.allclose(blurred, ndi.gaussian_filter(image, sigma, mode="nearest"))), missing is None
    (True, True)
    >>> matched_guide(image, None, to_cube, None)[0] is image
    True
    """
    if psf_sigma is None:
        return image, missing
    xp = array_module(image=image)
    sigma = math.sqrt(psf_sigma**2 + 1.0 / 6.0) * pixels_per_cube_pixel(to_cube)
    ndi = ndimage_module(xp)
    blurred = ndi.gaussian_filter(image, sigma, mode="nearest")
    if missing is None:
        return blurred, None
    return blurred, ndi.gaussian_filter(missing.astype(image.dtype), sigma, mode="nearest") > 0.25


def missing_share(with_data, matrix, shape):
    """The share of each grid pixel's bilinear weight that falls on native pixels without data.

    NaN outside the cube's footprint.

    Examples
    --------
    >>> with_data = np.ones((4, 4), bool); with_data[1, 1] = False
    >>> half_a_row = np.array([[1.0, 0, 0.5], [0, 1, 0], [0, 0, 1]])  # grid row r samples cube row r + 0.5
    >>> missing_share(with_data, half_a_row, (5, 4))[:, 1].tolist()  # row 4 lies beyond the footprint
    [0.5, 0.5, 0.0, 0.0, nan]
    """
    xp = array_module(with_data=with_data)
    missing = (~with_data).astype(xp.float32)[:, :, None]
    return warp_cube(missing, matrix, shape, order=1)[:, :, 0]


def has_data(registered):
    """Pixels of a resampled cube with a value (not NaN) in at least one band (by blocks of rows, retried smaller).

    Examples
    --------
    >>> registered = np.full((2, 3, 2), np.nan); registered[0, 0, 1] = 1.0; registered[1, 2] = 2.0
    >>> has_data(registered)
    array([[ True, False, False],
           [False, False,  True]])
    """
    if is_dask_array(registered):
        return ~registered.map_blocks(_all_nan, drop_axis=2, dtype=bool)
    xp = array_module(registered=registered)
    out = xp.empty(registered.shape[:2], dtype=bool)

    def rows_with_data(start, size):
        stop = min(start + size, registered.shape[0])
        out[start:stop] = ~xp.isnan(registered[start:stop]).all(axis=2)
        return stop

    _by_rows(rows_with_data, registered.shape, xp, stage="valid pixels")
    return out


def _all_nan(block):
    return array_module(block=block).isnan(block).all(axis=2)
