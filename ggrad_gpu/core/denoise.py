"""Spectral denoising for the estimates: the cube projected on its signal subspace.

Eq. 5 fits the guide's gradients with the Sobel magnitudes of the bands, and
a band's magnitude turns its spectral noise into a positive floor that is
largest where the band's own edges are weak. Where the spatial information is
spread thinly over many bands (each component's own peaks, the default
phantom), the fit leans on many weak, noisy bands, and the floor biases the
registration: from the true placement, three draws of the default phantom
(60 bands) registered to max TRE 2.9, 1.3 and 1.3 px, against 0.4-0.5 px with
the same phantoms noise-free, and 0.9, 0.6, 0.4 px with the cube projected on
its first four principal components.

:func:`signal_subspace` keeps the principal components of the bands (each
band scaled by its noise, estimated from the spatial residual against its
four neighbours) whose variance stands clear of the noise's: above
``RANK_MARGIN`` times the Marchenko-Pastur edge ``sigma**2 (1 + sqrt(m/n))**2``,
with ``sigma**2`` the median eigenvalue, or, over many bands, the mean of
the eigenvalues below the ``COMPONENTS`` largest (most components of a cube
with far fewer chemical components than bands are noise). Only the estimates read the
projected cube; ``registered`` is resampled from the cube as given.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace

import numpy as np

from .._backend import array_module, to_device, to_host
from .._lazy.chunked import is_dask_array
from .._threads import host_runs, parallel
from .._validation import all_finite, float_dtype
from .factored import FactoredCube

__all__ = ["BULK_LIMIT", "COMPONENTS", "FACTORED_SHARE", "FULL_EIGEN", "ITERATIONS", "MIN_PIXELS", "MIN_SIDE", "NOISE_PIXELS",
           "PIXELS_PER_BAND", "PROJECT_BYTES", "RANK_MARGIN", "SAMPLE_PIXELS", "Subspace", "band_noise", "signal_subspace",
           "subspace_samples"]

# A component counts as signal above this multiple of the noise edge.
RANK_MARGIN = 1.5
# Sampled pixels with data and bands with noise both at least this many, or the cube is left as it is:
# most eigenvalues must lie in the noise's bulk.
MIN_SIDE = 16
# A map with fewer pixels is left as it is unless it has at least PIXELS_PER_BAND times as many
# pixels as bands with noise: with fewer pixels than bands, the sample covariance has no noise bulk to
# read the noise from, and its subspace is too uncertain to trust (a real 20 x 20 Raman map of 1015
# bands, 5 components kept, moved 15 px from its stage placement with them and the guard accepted
# it; without, the refinement is rejected as implausible). A small map with a few bands is
# projected: its bands' Sobel noise floor is what biased it (20 x 20 x 80 phantom maps on 100 x 100
# guide pixels, 8 draws: max TRE 0.44-0.77 px projected, 0.42-1.56 px as they are).
MIN_PIXELS = 1024
PIXELS_PER_BAND = 2
# The noise-scaled bulk level above which the bulk is not noise (the spatial estimate says unit
# variance; it reads about 1 to 1.5 on the phantoms): the cube is left as it is.
BULK_LIMIT = 4.0
# The noise and the subspace are estimated on regular subgrids of at most about this many pixels
# (every k-th row and column; in memory and lazily the same pixels, so the same numbers).
NOISE_PIXELS = 8192
SAMPLE_PIXELS = 8192
# At most this many components are kept (and computed); the noise level is the mean of the rest.
COMPONENTS = 32
# Up to this many bands (or sampled pixels, the smaller), the Gram matrix is decomposed whole;
# beyond, its largest components come from this many subspace iterations.
FULL_EIGEN = 256
ITERATIONS = 4
# A projected cube is factored (FactoredCube) only where it has at most one coefficient per this
# many bands: each estimate's per-band work is then a product of that few images.
FACTORED_SHARE = 4
# Bytes of pixels projected at once (each pixel's product is its own row: the
# same values in any run length).
PROJECT_BYTES = 8 << 20


@dataclass(frozen=True)
class Subspace:
    """Result of :func:`signal_subspace`: the projected cube and the number of components kept.

    ``rank`` is None where the cube was left as it is (too small, no noise
    bulk, or no component above the noise); ``values`` is then the input.

    Examples
    --------
    >>> import numpy as np
    >>> small = np.ones((8, 8, 20))  # under MIN_PIXELS: left as it is
    >>> kept = signal_subspace(small)
    >>> isinstance(kept, Subspace), kept.rank, kept.values is small
    (True, None, True)
    """

    values: object
    rank: int | None
    # The projection (live bands, mean, noise scale, basis), for totals(); None where values is the input.
    fit: tuple | None = None

    def projected(self, cube):
        """``cube`` (the input the subspace was fitted to) projected on it: ``values``, lazily for a dask cube."""
        if self.fit is None:
            return cube
        if is_dask_array(cube):
            return cube.rechunk({2: -1}).map_blocks(_project, *self.fit, dtype=cube.dtype)
        return _project(cube, *self.fit)

    def factored(self, cube, *, dead_bands=None):
        """``values`` as a :class:`ggrad_gpu.core.factored.FactoredCube` of ``cube``, or None.

        ``cube`` is the input the subspace was fitted to, with every value
        finite outside ``dead_bands`` (bands without any; they become 0, as
        the estimates read them). The coefficients are each pixel's
        projection on the components and a 1 for the mean, and each band
        without noise (kept as it is) is a coefficient of its own; lazy for
        a dask ``cube`` (one product per chunk, bands whole). None where the
        cube was left as it is, or where that makes more than
        ``bands / FACTORED_SHARE`` coefficients (the bands are then cheaper
        as they are).

        Examples
        --------
        >>> import numpy as np
        >>> import scipy.ndimage as ndi
        >>> rng = np.random.default_rng(0)
        >>> clean = ndi.gaussian_filter(rng.random((40, 40, 2)), (2, 2, 0)) @ rng.random((2, 50))
        >>> noisy = (clean + 0.01 * rng.standard_normal(clean.shape)).astype(np.float32)
        >>> subspace = signal_subspace(noisy)
        >>> factored = subspace.factored(noisy)
        >>> factored.rank, bool(np.allclose(factored.dense(), subspace.values, atol=1e-5))
        (3, True)
        """
        if self.fit is None:
            return None
        live, mean, scale, basis = self.fit
        bands = cube.shape[2]
        kept = np.setdiff1d(np.arange(bands), to_host(live))  # bands without noise: as they are
        if dead_bands is not None:
            kept = np.setdiff1d(kept, dead_bands)
        components = basis.shape[1]
        rank = components + 1 + kept.size
        if rank * FACTORED_SHARE > bands:
            return None
        lazy = is_dask_array(cube)
        xp = array_module(cube=cube._meta if lazy else cube)
        dtype = float_dtype(cube.dtype)
        rows = np.zeros((rank, bands))
        rows[:components, to_host(live)] = (to_host(basis) * to_host(scale)[:, None]).T
        rows[components, to_host(live)] = to_host(mean)
        rows[components + 1 + np.arange(kept.size), kept] = 1
        fit = (live, mean, scale, basis, kept)
        if lazy:
            coefficients = cube.rechunk({2: -1}).map_blocks(_coefficients, *fit, chunks=cube.chunks[:2] + ((rank,),),
                                                            dtype=dtype)
        else:
            coefficients = _coefficients(cube, *fit)
        return FactoredCube(coefficients, to_device(rows, xp).astype(dtype))

    def totals(self, cube):
        """Each pixel's total over the bands of ``values`` (NaN left out), from ``cube`` by one product.

        ``cube`` is the input the subspace was fitted to. The projection is
        affine, so a pixel's total is ``cube @ w + c``: one pass over a lazy
        ``cube`` with a product of one column, not one that projects every
        band. Float64, lazy for a dask ``cube``. A pixel with a missing live
        band (which ``values`` keeps as it is) gets the total of its
        projection with the missing values as 0.

        Examples
        --------
        >>> import numpy as np
        >>> import scipy.ndimage as ndi
        >>> rng = np.random.default_rng(0)
        >>> clean = ndi.gaussian_filter(rng.random((40, 40, 2)), (2, 2, 0)) @ rng.random((2, 50))
        >>> noisy = clean + 0.01 * rng.standard_normal(clean.shape)
        >>> subspace = signal_subspace(noisy)
        >>> bool(np.allclose(subspace.totals(noisy), subspace.values.sum(axis=2)))
        True
        """
        if self.fit is None:
            weights, offset = np.ones(cube.shape[2]), 0.0
        else:
            live, mean, scale, basis = (to_host(a).astype(np.float64) for a in self.fit)
            live = live.astype(np.intp)
            weights = np.ones(cube.shape[2])
            weights[live] = basis @ (basis.T @ scale) / scale  # d total / d value of each live band
            offset = float(mean.sum() - mean @ weights[live])
        if is_dask_array(cube):
            return cube.rechunk({2: -1}).map_blocks(_block_totals, weights, offset, drop_axis=2, dtype=np.float64)
        return _block_totals(cube, weights, offset)


def _block_totals(block, weights, offset):
    """``block @ weights + offset`` per pixel, NaN as 0, in float64 (the products in the block's precision)."""
    xp = array_module(block=block)
    dtype = float_dtype(block.dtype)
    values = xp.nan_to_num(block.astype(dtype, copy=False))
    return (values @ to_device(weights, xp).astype(dtype)).astype(xp.float64) + offset


def band_noise(cube, *, stride: int = 1):
    """Each band's noise standard deviation, from the residual against its four neighbours.

    Parameters
    ----------
    cube : array, shape (rows, cols, bands)
        At least 3 x 3 pixels; NaN values are left out. A dask cube reads
        only the sampled pixels and their neighbours.
    stride : int, default 1
        The residual at every ``stride``-th interior row and column.

    Returns
    -------
    numpy.ndarray or cupy.ndarray, shape (bands,)
        ``1.4826 * MAD / sqrt(1.25)`` of ``x - mean(4 neighbours)`` per band
        (the residual of white noise has variance ``1.25 sigma**2``); NaN
        for a band without a finite residual.

    Examples
    --------
    >>> import numpy as np
    >>> from ggrad_gpu.core.denoise import band_noise
    >>> noise = np.random.default_rng(0).standard_normal((64, 64, 2)) * np.array([0.5, 2.0])
    >>> np.round(band_noise(noise), 1)
    array([0.5, 2. ])
    """
    return _noise(*_read(*_neighbours(cube, stride)))


def _neighbours(cube, stride):
    """The sampled interior pixels of ``cube`` and their four neighbours: five strided slices."""
    return [cube[index] for index in _neighbour_indices(cube.shape, stride)]


def _neighbour_indices(shape, stride):
    rows, cols = shape[:2]
    return [(slice(r0, rows - 2 + r0, stride), slice(c0, cols - 2 + c0, stride))
            for r0, c0 in ((1, 1), (0, 1), (2, 1), (1, 0), (1, 2))]


def subspace_samples(shape) -> list:
    """The slices of a cube of ``shape`` that :func:`signal_subspace` reads; none for a map it leaves as it is.

    Each is a ``(rows, cols)`` index: the noise's five strided slices
    (sampled pixels and their four neighbours), then the sample of spectra
    the components are fitted to. A streamed cube's preparation reads them
    in its own pass over the store and hands them to :func:`signal_subspace`
    (``samples``), rather than reading the store once more.

    Examples
    --------
    >>> from ggrad_gpu.core.denoise import subspace_samples
    >>> samples = subspace_samples((200, 300, 40))
    >>> len(samples), samples[-1]  # five for the noise, then every 3rd pixel of every 3rd row
    (6, (slice(None, None, 3), slice(None, None, 3)))
    >>> subspace_samples((2, 50, 20))  # no interior pixel: left as it is
    []
    """
    rows, cols = shape[:2]
    if rows < 3 or cols < 3 or rows * cols < min(MIN_PIXELS, PIXELS_PER_BAND * MIN_SIDE):
        return []
    stride = max(1, math.ceil(math.sqrt(rows * cols / SAMPLE_PIXELS)))
    noise_stride = max(1, math.ceil(math.sqrt(rows * cols / NOISE_PIXELS)))
    return _neighbour_indices(shape, noise_stride) + [(slice(None, None, stride), slice(None, None, stride))]


def _noise(centre, up, down, left, right):
    """:func:`band_noise` from the five slices of :func:`_neighbours`, in memory."""
    xp = array_module(centre=centre)
    centre = centre.astype(float_dtype(centre.dtype))  # float32 stays float32: a noise level needs no more
    residual = (centre - 0.25 * (up + down + left + right)).reshape(-1, centre.shape[2])
    # Band-major, so that each band's selection runs over contiguous memory (partitioning down
    # the columns of the pixel-major array took 4x as long); the medians are the same values.
    residual = xp.ascontiguousarray(residual.T)
    # nanmedian sorts band by band; the plain median sorts all at once.
    median = xp.median if all_finite(residual, xp) else xp.nanmedian

    def deviation(bands):
        part = residual[bands[0] : bands[1]]
        with warnings.catch_warnings():  # a band without data has no median: NaN, as documented
            warnings.filterwarnings("ignore", "All-NaN slice", RuntimeWarning)
            middle = median(part, axis=1)
            return median(xp.abs(part - middle[:, None]), axis=1)

    # Each band's median alone: on the host, runs of bands in threads (the selection releases the GIL).
    spread = xp.concatenate(parallel(deviation, host_runs(residual.shape[0], residual.shape[1], xp)))
    return 1.4826 * spread.astype(xp.float64) / math.sqrt(1.25)


def signal_subspace(cube, *, project: bool = True, samples=None) -> Subspace:
    """The cube projected on the principal components that stand clear of its noise.

    Parameters
    ----------
    cube : array, shape (rows, cols, bands)
        NumPy, CuPy or a dask array; NaN at missing values.
    project : bool, default True
        False: only the subspace is found (``values`` is None where ``rank``
        is not), for :meth:`Subspace.factored`.
    samples : list of arrays, optional
        ``cube`` at each index of :func:`subspace_samples`, already read (a
        streamed cube's pass over its store reads them beside its own
        statistics); by default they are read here.

    Returns
    -------
    Subspace
        ``values`` in the cube's array kind and dtype (lazy for a dask
        cube); the cube itself for a map of fewer than ``MIN_PIXELS``
        pixels. Pixels with a missing value in a band with noise, and bands
        without noise (constant, or without data), keep their values.

    Examples
    --------
    >>> import numpy as np
    >>> import scipy.ndimage as ndi
    >>> from ggrad_gpu.core.denoise import signal_subspace
    >>> rng = np.random.default_rng(0)
    >>> abundances = ndi.gaussian_filter(rng.random((40, 40, 2)), (2, 2, 0))
    >>> clean = abundances @ rng.random((2, 50))  # two components in 50 bands
    >>> noisy = clean + 0.01 * rng.standard_normal(clean.shape)
    >>> result = signal_subspace(noisy)
    >>> result.rank, bool((result.values - clean).std() < 0.5 * (noisy - clean).std())
    (2, True)
    """
    rows, cols, bands = cube.shape
    indices = subspace_samples(cube.shape)
    if not indices:
        return Subspace(cube, None)
    # The noise's slices and the sample in one read: a strided slice of a chunked store touches
    # every chunk, so six reads were six passes over a streamed cube (96 s of 4 GiB, now one pass).
    if samples is None:
        samples = _read(*[cube[index] for index in indices])
    elif len(samples) != len(indices):
        raise ValueError(f"samples must hold the cube at the {len(indices)} indices of subspace_samples; "
                         f"got {len(samples)} arrays")
    *neighbours, sample = samples
    sigma = _noise(*neighbours)
    xp = array_module(sigma=sigma)
    live = np.flatnonzero(to_host(xp.isfinite(sigma) & (sigma > 0)))
    if live.size < MIN_SIDE or rows * cols < min(MIN_PIXELS, PIXELS_PER_BAND * live.size):
        return Subspace(cube, None)
    scale = sigma[xp.asarray(live)]
    sample = sample.reshape(-1, bands)[:, xp.asarray(live)].astype(xp.float64)
    sample = sample[xp.isfinite(sample).all(axis=1)]
    if sample.shape[0] < MIN_SIDE:
        return Subspace(cube, None)
    mean = sample.mean(axis=0)
    basis = _components((sample - mean) / scale)
    if basis is None:
        return Subspace(cube, None)
    fit = (live, mean, scale, basis)
    subspace = Subspace(None, int(basis.shape[1]), fit)
    return replace(subspace, values=subspace.projected(cube)) if project else subspace


def _read(*parts):
    """Slices of the cube in memory; dask ones computed together, so each chunk is read once."""
    if any(is_dask_array(part) for part in parts):
        import dask

        return list(dask.compute(*parts))
    return list(parts)


def _project(block, live, mean, scale, basis):
    """``block`` with its ``live`` bands projected on ``basis`` (noise-scaled), where all of them are finite."""
    xp = array_module(block=block)
    pixels = block.reshape(-1, block.shape[2])
    live, mean, scale, basis = _fit_on(block, live, mean, scale, basis)
    out = pixels.copy()
    for rows, chosen, coefficients in _runs(pixels, live, mean, scale, basis):
        projected = coefficients @ basis.T * scale + mean
        projected = xp.where(xp.isfinite(projected).all(axis=1, keepdims=True), projected, chosen)
        out[rows, live] = projected.astype(out.dtype)
    return out.reshape(block.shape)


def _coefficients(block, live, mean, scale, basis, kept):
    """``block``'s coefficients of :meth:`Subspace.factored`: its projection, a 1, its ``kept`` bands."""
    xp = array_module(block=block)
    pixels = block.reshape(-1, block.shape[2])
    live, mean, scale, basis = _fit_on(block, live, mean, scale, basis)
    components = basis.shape[1]
    out = xp.empty((pixels.shape[0], components + 1 + kept.size), dtype=mean.dtype)
    out[:, components] = 1
    for rows, _, coefficients in _runs(pixels, live, mean, scale, basis):
        out[rows, :components] = coefficients
    if kept.size:
        out[:, components + 1:] = pixels[:, to_device(kept, xp)]
    return out.reshape(block.shape[:2] + (out.shape[1],))


def _fit_on(block, live, mean, scale, basis):
    """The projection's arrays on ``block``'s device, in its float dtype (float32 stays float32)."""
    xp = array_module(block=block)
    dtype = float_dtype(block.dtype)
    return (to_device(live, xp),) + tuple(to_device(a, xp).astype(dtype) for a in (mean, scale, basis))


def _runs(pixels, live, mean, scale, basis):
    """``(rows, chosen, coefficients)`` for runs of ``pixels``: their live bands and those bands' coefficients.

    In runs of pixels through one buffer, so the temporaries stay near
    PROJECT_BYTES, not several copies of the block (a 64 MiB chunk of a
    streamed cube held ~6). The noise scale is folded into the basis,
    ``((x - mean) / scale) @ basis == (x - mean) @ (basis / scale)``, so a
    run costs one subtraction and one product, and where every band is live
    no gather (a 64 MiB chunk, 28 components: 181 -> 24 ms on one core).
    """
    xp = array_module(pixels=pixels)
    scaled_basis = basis / scale[:, None]
    step = max(1, PROJECT_BYTES // (pixels.shape[1] * mean.dtype.itemsize))
    buffer = xp.empty((min(step, pixels.shape[0]), live.size), dtype=mean.dtype)
    for start in range(0, pixels.shape[0], step):
        rows = slice(start, start + step)
        chosen = _live_bands(pixels, rows, live)
        centred = xp.subtract(chosen, mean, out=buffer[: chosen.shape[0]])
        yield rows, chosen, centred @ scaled_basis


def _live_bands(pixels, rows, live):
    """``pixels[rows, live]``; a view, not a gather, where every band is live (``live`` is sorted and unique)."""
    return pixels[rows] if live.size == pixels.shape[1] else pixels[rows, live]


def _components(scaled):
    """The band-space basis (bands x k) of the components above the noise edge; None if none or no bulk.

    The noise level ``sigma**2`` is the median eigenvalue where the Gram
    matrix of the smaller side is small enough to decompose whole
    (``FULL_EIGEN``); else only the ``COMPONENTS`` largest are computed
    (subspace iteration) and it is the mean of the others (the mean of the
    Marchenko-Pastur bulk is ``sigma**2``), so many bands cost products,
    not an eigensolver.
    """
    xp = array_module(scaled=scaled)
    count, bands = scaled.shape
    small, large = min(count, bands), max(count, bands)
    # The smaller Gram matrix: its eigenvalues are the nonzero ones of both. Products in float32
    # where the data are: the threshold needs no more.
    sample = scaled.astype(xp.float32)
    gram = (sample.T @ sample if bands <= count else sample @ sample.T).astype(xp.float64) / large
    if small <= FULL_EIGEN:
        values, vectors = xp.linalg.eigh(gram)
        order = xp.arange(small - 1, max(small - 1 - COMPONENTS, -1), -1)
        bulk = float(np.median(to_host(values)))
        eigenvalues, vectors = to_host(values[order]), vectors[:, order]
    else:
        top = min(COMPONENTS, small // 8)
        eigenvalues, vectors = _largest(gram, top)
        bulk = (float(xp.trace(gram)) - float(eigenvalues.sum())) / (small - top)
    if not 0 < bulk <= BULK_LIMIT:
        return None
    keep = np.flatnonzero(eigenvalues > RANK_MARGIN * bulk * (1 + math.sqrt(small / large)) ** 2)
    if keep.size == 0:
        return None
    vectors = vectors[:, xp.asarray(keep)]
    if bands > count:  # pixel-space vectors: their band-space twins, normalised
        vectors = scaled.T @ vectors
        vectors = vectors / xp.linalg.norm(vectors, axis=0)
    return vectors


def _largest(gram, count):
    """The ``count`` largest eigenvalues (host, descending) of a symmetric ``gram`` and their vectors.

    Subspace iteration with a few spare vectors, then Rayleigh-Ritz; the
    start is seeded, so the result is the same run to run.
    """
    xp = array_module(gram=gram)
    start = np.random.default_rng(0).standard_normal((gram.shape[0], count + 8))
    basis, _ = xp.linalg.qr(gram @ to_device(start, xp))
    for _ in range(ITERATIONS):
        basis, _ = xp.linalg.qr(gram @ basis)
    values, small_vectors = xp.linalg.eigh(basis.T @ gram @ basis)
    order = xp.arange(count + 7, 7, -1)
    return to_host(values[order]), basis @ small_vectors[:, order]
