"""Synthetic phantoms with a known misregistration, for tests, demos and benchmarks.

In the spirit of the paper's polymer samples: a few components, each with a
Raman-like spectrum (Lorentzian peaks on a fluorescence background), fill
smooth domains on a substrate and form small particles. By default
(``signatures="separate"``) each component has peaks of its own at
wavenumbers where the others are flat, so each band shows the boundaries of
one component and no single band sees them all, as the paper's Sections 1-2
describe; ``signatures="mixed"`` is the earlier phantom (no substrate,
particles of the last component, every band telling most components apart). The brightfield
guide renders the components by optical density, with illumination fall-off,
fine texture the spectrometer cannot resolve, and noise. The cube is measured
at a lower native resolution through a blurred spot, with a smooth gain
(focus, laser power) and noise, then normalised per pixel as standard
preprocessing does, which removes the gain and makes the plain band sum
(paper eq. 2) useless. Everything is deterministic from ``seed``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import scipy.ndimage as ndi

from ._validation import LUMA_WEIGHTS
from .core.coverage import fill_gaps
from .core.geometry import fov_matrix
from .core.warp import warp_cube

__all__ = [
    "HED_FROM_RGB",
    "MosaicPhantom",
    "Phantom",
    "RGB_FROM_HED",
    "affine_about_center",
    "fov_matrix",
    "make_lattice_phantom",
    "make_mosaic",
    "make_phantom",
    "make_tissue_phantom",
    "separate_stains",
]

NORMALISATIONS = ("area", "vector", "snv", None)
SIGNATURES = ("separate", "mixed")
# The area of a component's own peaks, relative to the unit mean of its spectrum before
# normalisation: peaks about twice the background, tails lost in the noise.
_PEAK_AREA = 0.2
# Where no component's field exceeds this many standard deviations, the substrate shows.
_SUBSTRATE_LEVEL = 0.4

# Colour deconvolution (Ruifrok & Johnston, Anal. Quant. Cytol. Histol. 23(4),
# 291-299, 2001): rows are the unit optical-density vectors (R, G, B) of
# haematoxylin, eosin and DAB, so that ``od = stains @ RGB_FROM_HED``.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)


@dataclass(frozen=True)
class Phantom:
    """A synthetic guide and cube with the true registration.

    Attributes
    ----------
    guide : numpy.ndarray, shape (rows, cols), float32
        Brightfield image.
    cube : numpy.ndarray, shape (native_rows, native_cols, bands), float32
        Normalised spectra at the native resolution.
    matrix : numpy.ndarray, shape (3, 3)
        True guide-to-native-cube matrix (DESIGN convention, pull-back).
    initial : numpy.ndarray, shape (3, 3)
        The device-based transform: the cube spans the guide's field of view.
    misregistration : numpy.ndarray, shape (3, 3)
        Guide-frame affine with ``matrix = initial @ misregistration``.
    wavenumbers : numpy.ndarray, shape (bands,)
        Band centres in cm^-1.
    spectra : numpy.ndarray, shape (components, bands)
        Pure component spectra before noise and normalisation (from
        :func:`make_phantom` with ``signatures="separate"``, one more: the
        substrate's, last).
    abundances : numpy.ndarray, shape (components, rows, cols)
        True component fractions on the guide grid (the same rows as
        ``spectra``).

    Examples
    --------
    >>> phantom = make_phantom(shape=(60, 80), bands=8, seed=3)
    >>> isinstance(phantom, Phantom), bool(np.allclose(phantom.matrix, phantom.initial @ phantom.misregistration))
    (True, True)
    >>> phantom.cube_on_guide.shape, bool(np.isfinite(phantom.cube_on_guide).all())
    ((60, 80, 8), True)
    >>> bool(np.allclose(phantom.abundances.sum(axis=0), 1, atol=1e-5))  # fractions of each guide pixel
    True
    """

    guide: np.ndarray
    cube: np.ndarray
    matrix: np.ndarray
    initial: np.ndarray
    misregistration: np.ndarray
    wavenumbers: np.ndarray
    spectra: np.ndarray
    abundances: np.ndarray

    @cached_property
    def cube_on_guide(self) -> np.ndarray:
        """The native cube resampled onto the guide grid with the true matrix.

        Bilinear; guide pixels the cube does not reach take the nearest edge
        spectrum, so the array is finite everywhere (for estimation tests).
        Shape (rows, cols, bands), float32.
        """
        on_guide = warp_cube(self.cube, self.matrix, self.guide.shape, order=1)
        outside = np.isnan(on_guide[:, :, 0])
        return fill_gaps(on_guide, outside) if outside.any() else on_guide


def affine_about_center(shape, *, rotation_deg=0.0, scale=1.0, shear=0.0, shift=(0.0, 0.0)) -> np.ndarray:
    """A (row, col) affine that rotates, scales and shears about the image centre, then shifts.

    Parameters
    ----------
    shape : tuple of int
        ``(rows, cols)`` of the grid whose centre is the pivot.
    rotation_deg : float
    scale : float or (float, float)
        Isotropic, or per (row, col) axis.
    shear : float
        Row coordinate gains ``shear`` times the column coordinate.
    shift : (float, float)
        Translation in (row, col) pixels.

    Examples
    --------
    >>> import numpy as np
    >>> from ggrad_gpu.synthetic import affine_about_center
    >>> matrix = affine_about_center((11, 21), rotation_deg=30.0)
    >>> np.round(matrix @ [5.0, 10.0, 1.0], 12).tolist()  # the centre stays put
    [5.0, 10.0, 1.0]
    """
    theta = np.deg2rad(rotation_deg)
    rotation = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    linear = rotation @ np.array([[1.0, shear], [0.0, 1.0]]) @ np.diag(np.broadcast_to(scale, 2))
    center = (np.asarray(shape[:2], dtype=np.float64) - 1) / 2
    matrix = np.eye(3)
    matrix[:2, :2] = linear
    matrix[:2, 2] = center - linear @ center + np.asarray(shift, dtype=np.float64)
    return matrix


def make_phantom(
    *,
    shape=(350, 415),
    bands: int = 1000,
    components: int = 3,
    native_factor: int = 5,
    rotation_deg: float = 1.5,
    scale: float = 1.02,
    shear: float = 0.0,
    shift=(6.0, -9.0),
    noise: float = 0.02,
    guide_noise: float = 0.01,
    particles: int | None = None,
    normalisation: str | None = "area",
    seed: int = 0,
    footprint=None,
    signatures: str = "separate",
) -> Phantom:
    """Build a phantom guide and cube with a known affine misregistration.

    Parameters
    ----------
    shape : (int, int), default (350, 415)
        Guide shape; the paper's working size.
    bands : int, default 1000
        Spectral bands (wavenumbers 400-1800 cm^-1).
    components : int, default 3
        Chemical components (at least 2), besides the substrate (see
        ``signatures``).
    native_factor : int, default 5
        Guide pixels per cube pixel: the cube is ``ceil(shape / native_factor)``
        (or ``ceil(footprint size / native_factor)``).
    rotation_deg, scale, shear, shift
        The misregistration, about the centre of the guide (or of the
        footprint; see :func:`affine_about_center`):
        ``matrix = initial @ misregistration``.
    noise : float, default 0.02
        Spectral noise, relative to the mean spectrum intensity.
    guide_noise : float, default 0.01
        Guide noise, relative to full illumination.
    particles : int, optional
        Number of small particles; by default one per 4000 guide pixels.
    normalisation : {"area", "vector", "snv", None}, default "area"
        Per-pixel spectral normalisation: unit mean, unit Euclidean norm, or
        standard normal variate.
    seed : int, default 0
    footprint : (row0, col0, rows, cols), optional
        The window of the guide that the cube covers under ``initial`` (a map
        in a larger white-light image); by default the whole guide.
    signatures : {"separate", "mixed"}, default "separate"
        How the components' spectra differ. ``"separate"``: one fluorescence
        background common to all, and each component's own Raman peaks at
        wavenumbers no other component has (equal peak areas), so a band shows
        only the boundaries of the component whose peak it holds and no single
        band sees them all, as in the paper's polymer samples (Sections 1-2:
        the spatial information is spread over the spectral channels).
        The components' domains lie on a substrate (a further component with
        no peaks of its own, nearly clear in the guide; ``spectra`` and
        ``abundances`` then have ``components + 1`` rows, the substrate last),
        and the particles belong to each component in turn.
        ``"mixed"``: the earlier phantom, each spectrum its own background and
        peaks anywhere, so that most bands tell every component apart and one
        well-chosen band sees nearly every boundary; no substrate, and the
        particles are the last component's.

    Returns
    -------
    Phantom

    Examples
    --------
    >>> from ggrad_gpu.synthetic import make_phantom
    >>> phantom = make_phantom(shape=(60, 80), bands=32, seed=3)
    >>> phantom.guide.shape, phantom.cube.shape
    ((60, 80), (12, 16, 32))
    >>> small = make_phantom(shape=(120, 150), bands=8, footprint=(40, 50, 30, 40), seed=3)
    >>> small.cube.shape
    (6, 8, 8)
    """
    if normalisation not in NORMALISATIONS:
        raise ValueError(f"normalisation must be one of {NORMALISATIONS}; got {normalisation!r}")
    if signatures not in SIGNATURES:
        raise ValueError(f"signatures must be one of {SIGNATURES}; got {signatures!r}")
    if components < 2:
        raise ValueError(f"components must be at least 2; got {components}")
    if bands < 1:
        raise ValueError(f"bands must be positive; got {bands}")
    if native_factor < 1:
        raise ValueError(f"native_factor must be a positive integer; got {native_factor}")
    rows, cols = (int(n) for n in shape)
    if min(rows, cols) < 8:
        raise ValueError(f"shape must be at least 8 x 8; got {shape}")
    rng = np.random.default_rng(seed)
    # The scene extends beyond the guide so that every cube pixel sees sample.
    native_shape, initial, misregistration, matrix, pad = _geometry(
        (rows, cols), native_factor, footprint=footprint, rotation_deg=rotation_deg, scale=scale, shear=shear,
        shift=shift,
    )
    scene_shape = (rows + 2 * pad, cols + 2 * pad)
    if particles is None:
        particles = max(1, rows * cols // 4000)
    # The sample's structure is at the scale of the region mapped: a tenth of
    # the footprint's smaller side (of the guide's, where the cube spans it).
    scene = _abundances(scene_shape, components, particles, rng,
                        domain_size=None if footprint is None else min(_footprint(footprint, (rows, cols))[2:]) / 10,
                        substrate=signatures == "separate")

    return _assemble(
        scene, pad, (rows, cols), (native_shape, initial, misregistration, matrix), native_factor, bands,
        lambda visible: _brightfield(visible, guide_noise, rng, substrate=signatures == "separate"), noise,
        normalisation, rng, signatures,
    )


def make_lattice_phantom(
    *,
    shape=(240, 280),
    period: int = 40,
    bands: int = 32,
    native_factor: int = 4,
    jitter: float = 0.0,
    rotation_deg: float = 0.0,
    scale: float = 1.0,
    shear: float = 0.0,
    shift=(0.0, 0.0),
    noise: float = 0.02,
    guide_noise: float = 0.01,
    seed: int = 0,
) -> Phantom:
    """A phantom of repetitive texture: discs on a square lattice, on a substrate.

    Every lattice step looks alike, so a registration started a step away
    from the truth locks there (a wrong basin that fits as well as the
    right one): the test case for an uncertainty estimate, which must flag it.

    Parameters
    ----------
    shape : (int, int), default (240, 280)
        Guide shape; the cube spans it under ``initial``.
    period : int, default 40
        Lattice step in guide pixels (the discs' radius is a quarter of it).
    bands, native_factor, rotation_deg, scale, shear, shift, noise, guide_noise, seed
        As for :func:`make_phantom` (spectra ``signatures="separate"``: the
        discs' component and the substrate).
    jitter : float, default 0.0
        Each disc moves by up to this share of ``period`` along each axis
        (drawn from ``seed``); 0 is a perfect lattice.

    Returns
    -------
    Phantom

    Examples
    --------
    >>> from ggrad_gpu.synthetic import make_lattice_phantom
    >>> phantom = make_lattice_phantom(shape=(80, 96), period=16, bands=8, shift=(16, 0))
    >>> phantom.guide.shape, phantom.cube.shape, phantom.abundances.shape
    ((80, 96), (20, 24, 8), (2, 80, 96))
    """
    if not 4 <= int(period) <= min(shape):
        raise ValueError(f"period must be from 4 to the guide's smaller side; got {period!r}")
    if bands < 1:
        raise ValueError(f"bands must be positive; got {bands}")
    if native_factor < 1:
        raise ValueError(f"native_factor must be a positive integer; got {native_factor}")
    if not 0 <= jitter < 0.25:
        raise ValueError(f"jitter must be in [0, 0.25); got {jitter!r}")
    rows, cols = (int(n) for n in shape)
    rng = np.random.default_rng(seed)
    native_shape, initial, misregistration, matrix, pad = _geometry(
        (rows, cols), native_factor, rotation_deg=rotation_deg, scale=scale, shear=shear, shift=shift
    )
    scene_shape = (rows + 2 * pad, cols + 2 * pad)
    # Disc centres on the lattice through the guide's origin, each moved by its jitter.
    cells = [np.arange(-pad - period, n + pad + period, period) for n in (rows, cols)]
    centres = np.stack(np.meshgrid(*cells, indexing="ij"), axis=-1).reshape(-1, 2).astype(np.float64)
    centres += jitter * period * rng.uniform(-1, 1, size=centres.shape) + pad
    rr, cc = np.mgrid[: scene_shape[0], : scene_shape[1]]
    nearest = np.full(scene_shape, np.inf)
    for r, c in centres:  # a few hundred discs; a loop over discs, not bands
        nearest = np.minimum(nearest, np.hypot(rr - r, cc - c))
    discs = ndi.gaussian_filter((nearest <= period / 4).astype(np.float64), 1.0)
    scene = np.stack([discs, 1.0 - discs])
    return _assemble(
        scene, pad, (rows, cols), (native_shape, initial, misregistration, matrix), native_factor, bands,
        lambda visible: _brightfield(visible, guide_noise, rng, substrate=True), noise, "area", rng, "separate",
    )


def _geometry(shape, native_factor, footprint=None, **misregistration):
    """Native shape, initial, misregistration and true matrices, and the scene padding.

    The padding lets every cube pixel, placed by the true matrix, see the scene.
    """
    rows, cols = shape
    row0, col0, height, width = _footprint(footprint, shape)
    native_shape = (-(-height // native_factor), -(-width // native_factor))
    to_window = np.array([[1.0, 0, -row0], [0, 1, -col0], [0, 0, 1]])
    initial = fov_matrix((height, width), native_shape) @ to_window
    misregistration = (np.linalg.inv(to_window) @ affine_about_center((height, width), **misregistration)
                       @ to_window)
    matrix = initial @ misregistration
    corners = np.array([[0, 0, 1], [0, native_shape[1], 1], [native_shape[0], 0, 1],
                        [native_shape[0], native_shape[1], 1]], dtype=np.float64).T - [[0.5], [0.5], [0]]
    reach = np.linalg.solve(matrix, corners)[:2]
    pad = int(np.ceil(max(0.0, -reach.min(), (reach[0] - rows).max(), (reach[1] - cols).max()))) + 4 * native_factor
    return native_shape, initial, misregistration, matrix, pad


def _footprint(footprint, shape) -> tuple[int, int, int, int]:
    """``footprint`` checked: a window of at least 8 x 8 guide pixels inside ``shape``."""
    if footprint is None:
        return 0, 0, shape[0], shape[1]
    try:
        row0, col0, height, width = (int(v) for v in footprint)
    except (TypeError, ValueError):
        raise ValueError(f"footprint must be (row0, col0, rows, cols); got {footprint!r}") from None
    if min(row0, col0) < 0 or min(height, width) < 8 or row0 + height > shape[0] or col0 + width > shape[1]:
        raise ValueError(f"footprint must be a window of at least 8 x 8 pixels inside the guide {shape}; "
                         f"got {footprint!r}")
    return row0, col0, height, width


def _assemble(scene, pad, shape, geometry, native_factor, bands, render_guide, noise, normalisation, rng,
              signatures="mixed"):
    """Spectra, guide and measured cube of a scene, as a :class:`Phantom`.

    ``render_guide`` turns the guide's window of the scene (components, rows,
    cols) into the guide image; it is called between drawing the spectra and
    measuring the cube, which fixes the order of the random draws.
    """
    rows, cols = shape
    native_shape, initial, misregistration, matrix = geometry
    visible = scene[:, pad : pad + rows, pad : pad + cols]
    wavenumbers = np.linspace(400.0, 1800.0, bands)
    spectra = _raman_spectra(wavenumbers, scene.shape[0], rng, signatures)
    guide = render_guide(visible)
    cube = _measure_cube(scene, pad, matrix, native_shape, native_factor, spectra, noise, normalisation, rng)
    return Phantom(
        guide=guide,
        cube=cube,
        matrix=matrix,
        initial=initial,
        misregistration=misregistration,
        wavenumbers=wavenumbers,
        spectra=spectra,
        abundances=visible.astype(np.float32),
    )


def _smooth_field(shape, sigma, rng):
    """Gaussian-filtered white noise (periodic), unit variance; by FFT, so wide sigmas stay cheap."""
    spectrum = ndi.fourier_gaussian(np.fft.rfft2(rng.standard_normal(shape)), sigma, n=shape[1])
    field = np.fft.irfft2(spectrum, s=shape)
    return field / field.std()


def _abundances(shape, components, particles, rng, domain_size=None, substrate=False):
    """Component fractions (components, rows, cols): smooth domains plus particles.

    Domains are about ``domain_size`` pixels across (default a tenth of the
    smaller side). With ``substrate``, a further last component fills the
    space between the others' domains (where no field exceeds
    ``_SUBSTRATE_LEVEL``): with three components, each covers a fifth
    to a third of the area and the substrate the rest.
    """
    domain_size = max(4.0, min(shape) / 10 if domain_size is None else domain_size)
    logits = 12.0 * np.stack([_smooth_field(shape, domain_size, rng) for _ in range(components)])
    if substrate:
        logits = np.concatenate([logits, np.full((1,) + tuple(shape), 12.0 * _SUBSTRATE_LEVEL)])
    # Soft arg-max over the domain fields: smooth boundaries a few pixels wide.
    fractions = np.exp(logits - logits.max(axis=0))
    fractions /= fractions.sum(axis=0)
    # Small round particles with soft edges: of the last component, or with
    # ``substrate`` of each component in turn.
    owners = 1 if not substrate else components
    particle = np.zeros((owners,) + tuple(shape))
    for i, (r, c, radius) in enumerate(zip(
        rng.uniform(0, shape[0], particles), rng.uniform(0, shape[1], particles), rng.uniform(2.0, 6.0, particles)
    )):
        r0, r1 = max(int(r - radius) - 2, 0), min(int(r + radius) + 3, shape[0])
        c0, c1 = max(int(c - radius) - 2, 0), min(int(c + radius) + 3, shape[1])
        rr, cc = np.mgrid[r0:r1, c0:c1]
        disc = np.clip(radius + 0.5 - np.hypot(rr - r, cc - c), 0.0, 1.0)
        target = particle[i % owners, r0:r1, c0:c1]
        if owners > 1:  # a particle covers only what the other owners' particles leave
            disc = disc * (1 - particle[:, r0:r1, c0:c1].sum(axis=0) + target)
        np.maximum(target, disc, out=target)
    fractions *= 1 - particle.sum(axis=0)
    fractions[components - owners : components] += particle
    return fractions


def _raman_spectra(wavenumbers, components, rng, signatures="mixed"):
    """Component spectra, each of unit mean: see :func:`make_phantom`'s ``signatures``."""
    if signatures == "separate":
        return _separate_spectra(wavenumbers, components, rng)
    return _mixed_spectra(wavenumbers, components, rng)


def _separate_spectra(wavenumbers, components, rng):
    """Spectra that differ only at each component's own peaks; the last is the substrate's.

    One fluorescence background is common to all; each component but the last
    adds 2 to 4 Lorentzian peaks in wavenumber slots no other component uses,
    scaled to the same total area, and the last (the substrate) adds the same
    area evenly, so that after normalisation the spectra still agree
    everywhere but at the peaks (and their tails). A band at a component's
    peak shows that component's boundaries and not the others': the spatial
    information is spread over the bands.
    """
    span = wavenumbers[-1] - wavenumbers[0]
    centre = rng.uniform(wavenumbers[0], wavenumbers[-1])
    background = rng.uniform(0.5, 1.0) * np.exp(-0.5 * ((wavenumbers - centre) / (0.6 * span)) ** 2)
    # Slots of about 70 cm^-1 (20 over 400-1800 cm^-1; more for many
    # components), dealt out without replacement: 2 to 4 per component.
    slots = rng.permutation(max(20, 4 * (components - 1)))
    edges = np.linspace(wavenumbers[0], wavenumbers[-1], slots.size + 1)
    spacing = span / max(wavenumbers.size - 1, 1)
    spectra = np.empty((components, wavenumbers.size))
    spectra[-1] = background + _PEAK_AREA  # the substrate: no peaks of its own, the same area
    taken = 0
    for i in range(components - 1):
        count = int(rng.integers(2, 5))
        peaks = np.zeros_like(wavenumbers)
        for slot in slots[taken : taken + count]:
            low, high = edges[slot], edges[slot + 1]
            position = rng.uniform(low + 0.3 * (high - low), high - 0.3 * (high - low))
            width = max(rng.uniform(4.0, 10.0), 0.75 * spacing)  # seen by a band however few bands
            peaks += rng.uniform(0.5, 1.5) / (1 + ((wavenumbers - position) / width) ** 2)
        taken += count
        spectra[i] = background + _PEAK_AREA * peaks / peaks.mean()
    return spectra / spectra.mean(axis=1, keepdims=True)


def _mixed_spectra(wavenumbers, components, rng):
    """Distinct spectra: Lorentzian peaks on a broad fluorescence background, each its own."""
    span = wavenumbers[-1] - wavenumbers[0]
    spectra = np.empty((components, wavenumbers.size))
    for i in range(components):
        centre = rng.uniform(wavenumbers[0], wavenumbers[-1])
        background = rng.uniform(0.2, 1.0) * np.exp(-0.5 * ((wavenumbers - centre) / (0.6 * span)) ** 2)
        peaks = np.zeros_like(wavenumbers)
        for _ in range(rng.integers(4, 9)):
            position = rng.uniform(wavenumbers[0], wavenumbers[-1])
            width = rng.uniform(5.0, 20.0)
            peaks += rng.uniform(0.5, 3.0) / (1 + ((wavenumbers - position) / width) ** 2)
        spectra[i] = background + peaks
    # Equal area: the mixtures' totals then depend on the gain alone, which
    # normalisation removes (unequal totals would also skew blurred edges).
    return spectra / spectra.mean(axis=1, keepdims=True)


def _brightfield(fractions, noise, rng, substrate=False):
    """Transmitted light: Beer-Lambert by optical density, vignetting, texture, noise.

    With ``substrate`` the last component is a nearly clear substrate.
    """
    components, rows, cols = fractions.shape
    if substrate:
        density = np.append(rng.permutation(np.linspace(0.4, 1.2, components - 1)), 0.1)
    else:
        density = rng.permutation(np.linspace(0.15, 1.2, components))
    transmitted = np.exp(-np.tensordot(density, fractions, axes=1))
    rr, cc = np.mgrid[:rows, :cols]
    radius = np.hypot((rr - rows / 2) / rows, (cc - cols / 2) / cols)
    illumination = 1.0 - 0.6 * radius**2
    texture = 1.0 + 0.03 * _smooth_field((rows, cols), 0.8, rng)
    guide = illumination * transmitted * texture + noise * rng.standard_normal((rows, cols))
    return guide.astype(np.float32)


def _measure_cube(scene, pad, matrix, native_shape, factor, spectra, noise, normalisation, rng):
    """Spectra at the native pixels: blurred spot, gain, noise, normalisation."""
    spot = ndi.gaussian_filter(scene, (0, 0.5 * factor, 0.5 * factor), mode="nearest")
    qr, qc = np.mgrid[: native_shape[0], : native_shape[1]].astype(np.float64)
    points = np.linalg.solve(matrix, np.stack([qr.ravel(), qc.ravel(), np.ones(qr.size)]))[:2] + pad
    fractions = np.stack([ndi.map_coordinates(s, points, order=1, mode="nearest") for s in spot], axis=1)
    gain = 1.0 + 0.3 * _smooth_field(native_shape, 3.0, rng).ravel()[:, None]
    gain = np.clip(gain, 0.3, None)
    clean = gain * (fractions @ spectra)
    measured = clean + noise * clean.mean() * rng.standard_normal(clean.shape)
    measured = _normalise(measured, normalisation)
    return measured.reshape(native_shape + (spectra.shape[1],)).astype(np.float32)


def _normalise(spectra, normalisation):
    if normalisation == "area":
        return spectra / spectra.mean(axis=1, keepdims=True)
    if normalisation == "vector":
        return spectra / np.linalg.norm(spectra, axis=1, keepdims=True)
    if normalisation == "snv":
        return (spectra - spectra.mean(axis=1, keepdims=True)) / spectra.std(axis=1, keepdims=True)
    return spectra


def separate_stains(rgb) -> np.ndarray:
    """Colour deconvolution of a brightfield RGB image into H, E and DAB amounts.

    The optical density ``od = -log10(rgb)`` (per channel, with ``rgb`` scaled
    to ``[0, 1]`` and clipped at ``1 / 255`` to stay away from ``log(0)``) is
    taken as a non-negative mix of the three stains' unit density vectors
    (Ruifrok & Johnston 2001), ``od = stains @ RGB_FROM_HED``, and solved
    with the inverse matrix ``HED_FROM_RGB``. No clipping is done here.

    Parameters
    ----------
    rgb : numpy.ndarray, shape (rows, cols, 3)
        Transmitted-light RGB: unsigned integers (full range of the dtype is
        white) or floats in ``[0, 1]``.

    Returns
    -------
    numpy.ndarray, shape (rows, cols, 3), float64
        Stain amounts (haematoxylin, eosin, DAB) in optical-density units
        (log10); slightly negative where the colour falls outside the stains'
        cone.

    Examples
    --------
    >>> import numpy as np
    >>> from ggrad_gpu.synthetic import RGB_FROM_HED, separate_stains
    >>> pure_dab = 10.0 ** -(0.5 * RGB_FROM_HED[2])
    >>> np.round(separate_stains(pure_dab[None, None]), 6)[0, 0] + 0.0
    array([0. , 0. , 0.5])
    """
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"rgb must be 3-D (rows, cols, 3); got shape {rgb.shape}")
    if np.issubdtype(rgb.dtype, np.integer):
        if rgb.min() < 0:
            raise ValueError(f"rgb must not be negative; got minimum {rgb.min()}")
        light = rgb / float(np.iinfo(rgb.dtype).max)
    elif np.issubdtype(rgb.dtype, np.floating):
        light = rgb.astype(np.float64)
        if not np.isfinite(light).all() or light.min() < 0 or light.max() > 1:
            raise ValueError(
                f"rgb floats must be finite and lie in [0, 1]; got range [{light.min()}, {light.max()}]"
            )
    else:
        raise TypeError(f"rgb must be an integer or float array; got dtype {rgb.dtype}")
    density = -np.log10(np.clip(light, 1.0 / 255.0, 1.0))
    return density @ HED_FROM_RGB


def _tissue_fractions(rgb):
    """Component fractions (4, rows, cols): H, E, DAB and the unstained rest.

    The stain amounts are clipped at zero and divided by the 99.5th percentile
    of their total (the "fully stained" density); where they still add up to
    more than one they are scaled down to one, and the unstained component
    takes what is left.
    """
    stains = np.clip(separate_stains(rgb), 0.0, None)
    total = stains.sum(axis=2)
    full = float(np.percentile(total, 99.5))
    if not full > 0:
        raise ValueError("rgb shows no stain (its optical density is zero everywhere)")
    stains /= full
    stains /= np.maximum(stains.sum(axis=2, keepdims=True), 1.0)
    rest = np.clip(1.0 - stains.sum(axis=2, keepdims=True), 0.0, None)  # no -1e-16 from rounding
    return np.moveaxis(np.concatenate([stains, rest], axis=2), 2, 0)


def make_tissue_phantom(
    rgb,
    *,
    shape=(350, 415),
    bands: int = 200,
    native_factor: int = 5,
    rotation_deg: float = 1.5,
    scale: float = 1.02,
    shear: float = 0.0,
    shift=(6.0, -9.0),
    noise: float = 0.02,
    normalisation: str | None = "area",
    seed: int = 0,
) -> Phantom:
    """A SEMI-synthetic phantom from a real brightfield RGB micrograph.

    The spatial structure is real, the spectra are synthetic. The guide is the
    grey-level (luminance) image of the micrograph's central ``shape`` crop,
    left as measured (no noise is added; the micrograph has its own). The
    "chemistry" comes from colour deconvolution of the RGB with the
    haematoxylin-eosin-DAB stain matrix of Ruifrok & Johnston
    (:func:`separate_stains`): four components, H, E, DAB and the unstained
    rest (see below), each given a distinct synthetic Raman-like spectrum.
    The cube is measured from these fractions as in :func:`make_phantom`: at
    ``native_factor`` times lower resolution through the known affine
    misregistration, with a blurred spot, a smooth gain, noise and per-pixel
    normalisation. Where the misregistered cube looks beyond the micrograph,
    the fractions are mirrored (reflect padding), so every cube pixel sees
    tissue.

    The fractions: the stain amounts, clipped at zero, are divided by the
    99.5th percentile of their sum over the micrograph; where they still add
    up to more than one they are scaled down to one; the unstained component
    is ``1 - sum``. So the fractions are non-negative and sum to one.

    Parameters
    ----------
    rgb : numpy.ndarray, shape (img_rows, img_cols, 3)
        Transmitted-light RGB micrograph: unsigned integers or floats in
        ``[0, 1]``.
    shape : (int, int), default (350, 415)
        The guide: the central crop of this shape (the paper's working size;
        at most the micrograph's size). The crop's offset is
        ``((img_rows - rows) // 2, (img_cols - cols) // 2)``.
    bands : int, default 200
        Spectral bands (wavenumbers 400-1800 cm^-1).
    native_factor : int, default 5
        Guide pixels per cube pixel: the cube is ``ceil(shape / native_factor)``.
    rotation_deg, scale, shear, shift
        The misregistration, about the guide centre (see
        :func:`affine_about_center`): ``matrix = initial @ misregistration``.
    noise : float, default 0.02
        Spectral noise, relative to the mean spectrum intensity.
    normalisation : {"area", "vector", "snv", None}, default "area"
        Per-pixel spectral normalisation.
    seed : int, default 0
        The spectra, the gain and the noise; everything is deterministic from it.

    Returns
    -------
    Phantom
        ``spectra`` is (4, bands) and ``abundances`` (4, rows, cols), in the
        order H, E, DAB, unstained.

    Examples
    --------
    >>> import numpy as np
    >>> from ggrad_gpu.synthetic import make_tissue_phantom
    >>> rgb = np.random.default_rng(0).integers(40, 256, size=(80, 90, 3), dtype=np.uint8)
    >>> phantom = make_tissue_phantom(rgb, shape=(60, 70), bands=16)
    >>> phantom.guide.shape, phantom.cube.shape, phantom.abundances.shape
    ((60, 70), (12, 14, 16), (4, 60, 70))
    """
    if normalisation not in NORMALISATIONS:
        raise ValueError(f"normalisation must be one of {NORMALISATIONS}; got {normalisation!r}")
    if bands < 1:
        raise ValueError(f"bands must be positive; got {bands}")
    if native_factor < 1:
        raise ValueError(f"native_factor must be a positive integer; got {native_factor}")
    fractions_image = _tissue_fractions(rgb)  # also checks rgb
    rgb = np.asarray(rgb)
    light = rgb / float(np.iinfo(rgb.dtype).max) if np.issubdtype(rgb.dtype, np.integer) else rgb.astype(np.float64)
    image_shape = rgb.shape[:2]
    rows, cols = (int(n) for n in shape)
    if not (8 <= rows <= image_shape[0] and 8 <= cols <= image_shape[1]):
        raise ValueError(f"shape must be at least 8 x 8 and at most the image's {image_shape}; got {shape}")
    top, left = (image_shape[0] - rows) // 2, (image_shape[1] - cols) // 2

    rng = np.random.default_rng(seed)
    # The scene: the guide at offset (pad, pad), mirrored beyond the micrograph
    # so that every cube pixel sees tissue (as in make_phantom).
    native_shape, initial, misregistration, matrix, pad = _geometry(
        (rows, cols), native_factor, rotation_deg=rotation_deg, scale=scale, shear=shear, shift=shift
    )
    extra = max(0, pad - min(top, left, image_shape[0] - rows - top, image_shape[1] - cols - left))
    mirrored = np.pad(fractions_image, ((0, 0), (extra, extra), (extra, extra)), mode="reflect")
    r0, c0 = top + extra - pad, left + extra - pad
    scene = mirrored[:, r0 : r0 + rows + 2 * pad, c0 : c0 + cols + 2 * pad]

    crop = light[top : top + rows, left : left + cols]
    luminance = (crop @ np.array(LUMA_WEIGHTS)).astype(np.float32)  # ITU-R BT.709
    return _assemble(
        scene, pad, (rows, cols), (native_shape, initial, misregistration, matrix), native_factor, bands,
        lambda visible: luminance, noise, normalisation, rng,
    )


@dataclass(frozen=True)
class MosaicPhantom:
    """A synthetic guide and a grid of tiles with the true placement of each.

    Attributes
    ----------
    guide : numpy.ndarray, shape (rows, cols), float32
        Brightfield image of the whole mosaic.
    tiles : list of numpy.ndarray, each (tile_rows, tile_cols, bands), float32
        The tiles' cubes at their native resolution, row by row of the grid.
    matrices : numpy.ndarray, shape (tiles, 3, 3)
        True guide-to-tile matrices.
    initials : numpy.ndarray, shape (tiles, 3, 3)
        The stage's placement: ``matrices[i] @ stage_error @ jitter_i`` (and
        the slip, for the slipped tile), with ``jitter_i`` a guide-frame shift.
    stage_error : numpy.ndarray, shape (3, 3)
        The systematic guide-frame error shared by every tile (rotation,
        scale and shift about the guide's centre); the stage model's
        correction is about its inverse.
    jitter : numpy.ndarray, shape (tiles, 2)
        Each tile's own shift, in guide pixels (row, col); the slipped tile's
        includes its slip.
    footprints : list of (row0, col0, rows, cols)
        Each tile's true window of the guide.
    grid : (int, int)
        Tiles per column and per row.
    slipped, featureless : int or None
        Index of the tile with a large error of its own (on strong
        structure), and of the tile over a sample without structure.
    wavenumbers : numpy.ndarray, shape (bands,)

    Examples
    --------
    >>> from ggrad_gpu.core.geometry import footprint_box
    >>> mosaic = make_mosaic(grid=(2, 2), tile_shape=(16, 16), slipped=None, featureless=None)
    >>> isinstance(mosaic, MosaicPhantom), len(mosaic.tiles), mosaic.tiles[0].shape, mosaic.footprints[0]
    (True, 4, (16, 16, 8), (24, 24, 64, 64))
    >>> low, high = footprint_box((16, 16), mosaic.matrices[0])  # 16 tile pixels of 4 guide pixels each
    >>> np.round(low, 6).tolist(), np.round(high, 6).tolist()
    ([23.5, 23.5], [87.5, 87.5])
    """

    guide: np.ndarray
    tiles: list
    matrices: np.ndarray
    initials: np.ndarray
    stage_error: np.ndarray
    jitter: np.ndarray
    footprints: list
    grid: tuple
    slipped: int | None
    featureless: int | None
    wavenumbers: np.ndarray


def make_mosaic(
    *,
    grid=(3, 4),
    tile_shape=(32, 32),
    bands: int = 8,
    native_factor: int = 4,
    overlap: float = 0.15,
    rotation_deg: float = 0.4,
    scale: float = 1.01,
    shift=(3.0, -4.0),
    jitter: float = 1.0,
    slip=(12.0, -9.0),
    slipped: int | None = 5,
    featureless: int | None = 6,
    components: int = 3,
    noise: float = 0.02,
    guide_noise: float = 0.01,
    normalisation: str | None = "area",
    signatures: str = "separate",
    seed: int = 0,
) -> MosaicPhantom:
    """Build a phantom mosaic: one guide, a grid of overlapping tiles, the truth per tile.

    The sample and the tiles' measurement are those of :func:`make_phantom`
    (domains a tenth of a tile's footprint across, particles, the same
    spectra and noise); each tile sees its own window of one scene. The
    stage places every tile with a shared error (``rotation_deg``,
    ``scale``, ``shift`` about the guide's centre) and a random shift of its
    own (``jitter``); one tile has slipped by ``slip`` more, and under one
    tile the sample is only substrate (the last component with
    ``signatures="mixed"``), so neither the tile nor the guide there has
    structure.

    Parameters
    ----------
    grid : (int, int), default (3, 4)
        Tiles per column and per row.
    tile_shape : (int, int), default (32, 32)
        Each tile's native pixels.
    bands : int, default 8
    native_factor : int, default 4
        Guide pixels per tile pixel.
    overlap : float, default 0.15
        Share of a tile's side that its neighbour also covers, in [0, 0.5).
    rotation_deg, scale, shift
        The stage's systematic error (see :func:`affine_about_center`).
    jitter : float, default 1.0
        Standard deviation of each tile's own shift, guide pixels per axis.
    slip : (float, float), default (12.0, -9.0)
        The slipped tile's further shift, guide pixels.
    slipped, featureless : int or None, default 5 and 6
        Indices (row by row) of the slipped and of the featureless tile;
        None for none. They must differ.
    components, noise, guide_noise, normalisation, signatures, seed
        As in :func:`make_phantom`.

    Returns
    -------
    MosaicPhantom

    Examples
    --------
    >>> from ggrad_gpu.synthetic import make_mosaic
    >>> mosaic = make_mosaic(grid=(2, 3), tile_shape=(16, 20), bands=4, slipped=1, featureless=None)
    >>> mosaic.guide.shape, len(mosaic.tiles), mosaic.tiles[0].shape
    ((166, 264), 6, (16, 20, 4))
    >>> mosaic.footprints[1]
    (24, 92, 64, 80)
    """
    grid_rows, grid_cols = (int(n) for n in grid)
    count = grid_rows * grid_cols
    if min(grid_rows, grid_cols) < 1:
        raise ValueError(f"grid must be two positive tile counts; got {grid!r}")
    if not 0 <= overlap < 0.5:
        raise ValueError(f"overlap must lie in [0, 0.5); got {overlap!r}")
    for name, index in (("slipped", slipped), ("featureless", featureless)):
        if index is not None and not 0 <= index < count:
            raise ValueError(f"{name} must be a tile index below {count} or None; got {index!r}")
    if slipped is not None and slipped == featureless:
        raise ValueError(f"slipped and featureless must be different tiles; got {slipped} for both")
    if signatures not in SIGNATURES:
        raise ValueError(f"signatures must be one of {SIGNATURES}; got {signatures!r}")
    rng = np.random.default_rng(seed)
    tile_shape = tuple(int(n) for n in tile_shape)
    side = np.array(tile_shape) * native_factor
    step = np.maximum(1, np.round(side * (1 - overlap)).astype(int))
    margin = 6 * native_factor  # room for the stage's errors inside the guide
    rows, cols = (int(n) for n in 2 * margin + step * (np.array(grid) - 1) + side)
    footprints = [(int(margin + r * step[0]), int(margin + c * step[1]), int(side[0]), int(side[1]))
                  for r in range(grid_rows) for c in range(grid_cols)]
    pad = 4 * native_factor + 2
    substrate = signatures == "separate"
    scene = _abundances((rows + 2 * pad, cols + 2 * pad), components, max(1, rows * cols // 4000), rng,
                        domain_size=min(side) / 10, substrate=substrate)
    if featureless is not None:
        scene = _without_structure(scene, footprints[featureless], pad, native_factor)
    wavenumbers = np.linspace(400.0, 1800.0, bands)
    spectra = _raman_spectra(wavenumbers, scene.shape[0], rng, signatures)
    guide = _brightfield(scene[:, pad : pad + rows, pad : pad + cols], guide_noise, rng, substrate=substrate)
    matrices = np.stack([fov_matrix(side, tile_shape) @ np.array([[1.0, 0, -r0], [0, 1, -c0], [0, 0, 1]])
                         for r0, c0, _, _ in footprints])
    tiles = [_measure_cube(scene, pad, m, tile_shape, native_factor, spectra, noise, normalisation, rng)
             for m in matrices]
    stage_error = affine_about_center((rows, cols), rotation_deg=rotation_deg, scale=scale, shift=shift)
    shifts = jitter * rng.standard_normal((count, 2))
    if slipped is not None:
        shifts[slipped] += slip
    initials = np.stack([m @ stage_error @ affine_about_center((rows, cols), shift=s)
                         for m, s in zip(matrices, shifts)])
    return MosaicPhantom(guide, tiles, matrices, initials, stage_error, shifts, footprints,
                         (grid_rows, grid_cols), slipped, featureless, wavenumbers)


def _without_structure(scene, footprint, pad, native_factor):
    """``scene`` with only the background component (the last, or the only) under ``footprint``.

    The window grows by the tile's blurred spot and a soft edge, so that
    neither the tile nor the guide under it shows any boundary.
    """
    row0, col0, height, width = footprint
    grow = 2 * native_factor
    window = np.zeros(scene.shape[1:])
    window[pad + row0 - grow : pad + row0 + height + grow, pad + col0 - grow : pad + col0 + width + grow] = 1
    window = ndi.gaussian_filter(window, native_factor)
    window = np.clip(2 * window, 0, 1)  # flat over the grown window, a soft edge beyond it
    background = np.zeros_like(scene)
    background[-1] = 1
    return scene * (1 - window) + background * window
