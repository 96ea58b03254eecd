"""The stage benchmarks, defined once for the pytest suite and the runner.

A *stage* is one step of the method, timed on its own from stored inputs:

============= ================================================== =========================
stage         timed call                                         model
============= ================================================== =========================
sobel         ``sobel_magnitude(cube)`` (all bands)              read + write
pyramid       ``gaussian_pyramid(cube, 4)``                      read + write per level
gram          ``A^T A``, ``A^T b`` of the Sobel output: float32  2 N L^2 flops (GEMM count)
              products of row blocks summed in float64
              (``GramAccumulator``, as the estimate does it)
nnls          ``nnls_gram`` on the level-0 Gram of the cube      time only
level_weights ``solve_level_weights`` on eq. 9's Q from an       time only
              estimate of the cube
register      ``register_affine(grad_x, moved grad_y)``          time only
warp          ``warp_cube(cube, affine, (rows, cols))``, order 1 read + write
refine        ``refine(guide, native cube, initial=...)``        time only
============= ================================================== =========================

Each runs on the backends asked for: ``numpy``, ``cupy`` (where
``ggrad_gpu._backend.cupy_usable()``), and ``scipy``, the plain way a user
writes the same step with SciPy (per-band ``ndimage`` loops, a float64
``X.T @ X``, ``scipy.optimize.nnls``), only up to the small sizes and only for
the stages that have one.

Sizes are ``rows x cols x bands`` of the guide-grid cube (float32). For
``refine`` the same size means DESIGN's geometry: a ``rows x cols`` guide and
a native cube 5x coarser (``make_phantom(shape=(rows, cols), bands=bands)``).
Up to the paper's 350 x 415 x 1000 the guide-grid data are the phantom's
(``phantom.guide``, ``phantom.cube_on_guide``); larger cubes are built
directly (:func:`smooth_scene`: a few smooth abundance maps times random
spectra, plus noise), which costs a fraction of resampling a phantom.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from ggrad_gpu import (
    estimate_global_gradient,
    gaussian_pyramid,
    nnls_gram,
    refine,
    register_affine,
    sobel_magnitude,
    warp_cube,
)
from ggrad_gpu._backend import block_rows, cupy_usable, to_host
from ggrad_gpu.level_weights import level_weights_matrix, solve_level_weights
from ggrad_gpu.metrics import target_registration_error
from ggrad_gpu.nnls import GramAccumulator, spurious_blas_flags_ignored
from ggrad_gpu.synthetic import affine_about_center, make_phantom

from ._timing import device_sync, to_backend

__all__ = [
    "ALL_SIZES",
    "BACKENDS",
    "SMALL_SIZES",
    "STAGES",
    "BenchData",
    "Case",
    "Plan",
    "Stage",
    "Workspace",
    "parse_backends",
    "parse_sizes",
    "parse_stages",
    "plan",
    "size_id",
    "smooth_scene",
]

LEVELS = 4
NATIVE_FACTOR = 5  # guide pixels per native cube pixel (DESIGN "Grids", the paper's geometry)
SMALL_SIZES = ((350, 415, 200), (350, 415, 1000))
ALL_SIZES = SMALL_SIZES + ((1024, 1024, 512), (2048, 2048, 256))
# The largest size whose guide-grid data come from make_phantom, and up to which the
# plain SciPy reference runs (seconds to a minute per call there).
PHANTOM_LIMIT = (350, 415, 1000)
BACKENDS = ("numpy", "scipy", "cupy")  # scipy: the plain reference, on the CPU
# The misregistration the warp and registration stages apply (DESIGN-like: rotation,
# scale, shift in pixels, about the image centre).
MISREGISTRATION = {"rotation_deg": 1.5, "scale": 1.02, "shift": (6.0, -9.0)}
SIZES_ENV = "GGRAD_BENCH_SIZES"


# --------------------------------------------------------------------------- parsing


def size_id(shape) -> str:
    """``"350x415x200"`` for ``(350, 415, 200)``."""
    return "x".join(str(int(n)) for n in shape)


def parse_sizes(text: str | None) -> list[tuple[int, int, int]]:
    """Sizes from ``"small"`` (default), ``"all"`` or ``"RxCxB[,RxCxB...]"``.

    ``None`` or an empty string reads ``GGRAD_BENCH_SIZES``, else ``"small"``.
    """
    if not text:
        text = os.environ.get(SIZES_ENV, "") or "small"
    text = text.strip().lower()
    if text == "small":
        return list(SMALL_SIZES)
    if text == "all":
        return list(ALL_SIZES)
    sizes = []
    for item in text.split(","):
        item = item.strip()
        if item in ("small", "all"):
            sizes.extend(s for s in (SMALL_SIZES if item == "small" else ALL_SIZES) if s not in sizes)
            continue
        parts = item.split("x")
        try:
            shape = tuple(int(p) for p in parts)
        except ValueError:
            shape = ()
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"sizes must be 'small', 'all' or rows x cols x bands like 350x415x200; got {item!r}")
        if min(shape[:2]) < 16:
            raise ValueError(f"sizes need at least 16 x 16 pixels for {LEVELS} pyramid levels; got {item!r}")
        if shape not in sizes:
            sizes.append(shape)
    return sizes


def parse_backends(text: str | None) -> list[str]:
    """Backends from ``"numpy,cupy,scipy"`` (default: all three), in canonical order."""
    if not text:
        return list(BACKENDS)
    names = [name.strip().lower() for name in text.split(",") if name.strip()]
    unknown = sorted(set(names) - set(BACKENDS))
    if unknown:
        raise ValueError(f"backends must be among {', '.join(BACKENDS)}; got {', '.join(unknown)}")
    return [name for name in BACKENDS if name in names]


def parse_stages(text: str | None) -> list[str]:
    """Stage names from ``"sobel,gram,..."`` (default: all), in canonical order."""
    if not text:
        return list(STAGES)
    names = [name.strip().lower() for name in text.split(",") if name.strip()]
    unknown = sorted(set(names) - set(STAGES))
    if unknown:
        raise ValueError(f"stages must be among {', '.join(STAGES)}; got {', '.join(unknown)}")
    return [name for name in STAGES if name in names]


# --------------------------------------------------------------------------- data


def _smooth_fields(count, shape, sigma, rng):
    """``count`` Gaussian-filtered white-noise fields (periodic, by FFT), unit variance."""
    import scipy.ndimage as ndi

    fields = np.empty((count,) + tuple(shape), dtype=np.float32)
    for i in range(count):
        spectrum = ndi.fourier_gaussian(np.fft.rfft2(rng.standard_normal(shape)), sigma, n=shape[1])
        field_ = np.fft.irfft2(spectrum, s=shape)
        fields[i] = field_ / field_.std()
    return fields


def _spectra(bands, components, rng):
    """Positive Raman-like spectra: a broad background and a few Lorentzian peaks."""
    x = np.linspace(0.0, 1.0, bands)
    spectra = np.empty((components, bands))
    for i in range(components):
        spectra[i] = rng.uniform(0.2, 1.0) * np.exp(-0.5 * ((x - rng.uniform()) / 0.6) ** 2)
        for _ in range(rng.integers(4, 9)):
            spectra[i] += rng.uniform(0.5, 3.0) / (1 + ((x - rng.uniform()) / rng.uniform(0.004, 0.015)) ** 2)
    return (spectra / spectra.mean(axis=1, keepdims=True)).astype(np.float32)


def smooth_scene(shape, *, components: int = 4, noise: float = 0.02, seed: int = 0):
    """A guide and a guide-grid cube built directly: smooth abundance maps times spectra.

    Parameters
    ----------
    shape : (rows, cols, bands)
    components : int
        Abundance maps: a soft arg-max over smooth random fields (domains with
        boundaries a few pixels wide), each with its own spectrum.
    noise : float
        Gaussian noise relative to the mean intensity.

    Returns
    -------
    guide : numpy.ndarray, (rows, cols) float32
        Brightfield-like: ``exp(-density . abundances)`` with noise.
    cube : numpy.ndarray, (rows, cols, bands) float32
    """
    rows, cols, bands = (int(n) for n in shape)
    rng = np.random.default_rng(seed)
    logits = 8.0 * _smooth_fields(components, (rows, cols), max(3.0, min(rows, cols) / 12), rng)
    logits -= logits.max(axis=0)
    np.exp(logits, out=logits)
    logits /= logits.sum(axis=0)
    fractions = logits  # (components, rows, cols), sums to 1
    density = rng.permutation(np.linspace(0.15, 1.2, components)).astype(np.float32)
    guide = np.exp(-np.tensordot(density, fractions, axes=1))
    guide += 0.01 * rng.standard_normal((rows, cols), dtype=np.float32)
    spectra = _spectra(bands, components, rng)
    cube = np.empty((rows, cols, bands), dtype=np.float32)
    step = max(1, (64 << 20) // (cols * bands * 4))  # ~64 MiB of cube per block
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        block = cube[start:stop]
        np.matmul(fractions[:, start:stop].transpose(1, 2, 0), spectra, out=block)
        block += noise * rng.standard_normal(block.shape, dtype=np.float32)
    return guide.astype(np.float32), cube


class BenchData:
    """The host data of one size, built lazily (a stage builds only what it reads).

    Attributes
    ----------
    shape : (rows, cols, bands)
    guide, cube : numpy.ndarray
        The guide (rows, cols) and the cube on its grid (rows, cols, bands), float32.
    phantom : ggrad_gpu.synthetic.Phantom
        ``make_phantom(shape=(rows, cols), bands=bands, seed=0)``: guide, native
        cube (5x coarser), ``initial`` and the true ``matrix``, for ``refine``.
    source : str
        Where ``guide`` and ``cube`` come from.
    """

    def __init__(self, shape, seed: int = 0):
        self.shape = tuple(int(n) for n in shape)
        self.seed = seed
        self.from_phantom = self.shape[0] * self.shape[1] <= PHANTOM_LIMIT[0] * PHANTOM_LIMIT[1] and math.prod(
            self.shape
        ) <= math.prod(PHANTOM_LIMIT)
        self.source = "make_phantom(...).cube_on_guide" if self.from_phantom else "smooth_scene (built directly)"

    @cached_property
    def phantom(self):
        rows, cols, bands = self.shape
        return make_phantom(shape=(rows, cols), bands=bands, native_factor=NATIVE_FACTOR, seed=self.seed)

    @cached_property
    def _scene(self):
        if self.from_phantom:
            return self.phantom.guide, np.ascontiguousarray(self.phantom.cube_on_guide, dtype=np.float32)
        return smooth_scene(self.shape, seed=self.seed)

    @property
    def guide(self):
        return self._scene[0]

    @property
    def cube(self):
        return self._scene[1]

    @property
    def native_guide(self):
        return self.phantom.guide

    @property
    def native_cube(self):
        return self.phantom.cube

    @property
    def reference_allowed(self) -> bool:
        """Whether the plain SciPy reference runs at this size (up to the small sizes)."""
        return self.from_phantom


class Workspace:
    """One size's data on one backend, with the inputs derived from it, cached.

    A stage's ``h2d_s`` is the host-to-device copy of its timed inputs:
    host data reach the device through :meth:`array` (copied and timed once,
    then charged to every stage that times with them); an input the stage
    derives on the device (the Sobel output for the Gram, the Gram for NNLS)
    is charged what copying an equal host array takes (:meth:`charge`, timed
    once per input), i.e. what it would cost to bring it over had it been
    computed on the host. Derived inputs are built by :meth:`cached`,
    untimed, once per workspace. On NumPy every transfer is 0.
    """

    def __init__(self, data: BenchData, backend: str):
        self.data = data
        self.backend = "numpy" if backend == "scipy" else backend
        if self.backend == "cupy":
            usable, reason = cupy_usable()
            if not usable:
                raise RuntimeError(f"the cupy backend is not usable here: {reason}")
            import cupy

            self.xp = cupy
        else:
            self.xp = np
        self.sync = device_sync(self.xp)
        self._arrays: dict[str, object] = {}
        self._transfers: dict[str, tuple[float, int]] = {}
        self._cache: dict[str, object] = {}
        self._used: set[str] = set()

    def begin(self) -> None:
        """Start a stage: forget which inputs the previous one was charged for."""
        self._used = set()

    def array(self, name: str, host=None, *, charge: bool = True):
        """The host array ``name`` (an attribute of the data, or ``host``) on the backend.

        ``charge=False`` for arrays read only to derive a stage's inputs.
        """
        if name not in self._arrays:
            if host is None:
                host = getattr(self.data, name)
            self._arrays[name], seconds = to_backend(host, self.xp, self.sync)
            self._transfers[name] = (seconds, int(host.nbytes) if self.xp is not np else 0)
        if charge:
            self._used.add(name)
        return self._arrays[name]

    def charge(self, name: str, value):
        """Charge the current stage the transfer of ``value`` (derived on the backend); return it."""
        if name not in self._transfers:
            if self.xp is np:
                self._transfers[name] = (0.0, 0)
            else:
                host = to_host(value)
                copy, seconds = to_backend(host, self.xp, self.sync)
                self._transfers[name] = (seconds, int(host.nbytes))
                del copy, host
        self._used.add(name)
        return value

    def transfer(self) -> tuple[float, int]:
        """Seconds and bytes of the host-to-device copies charged to the current stage."""
        seconds = sum(self._transfers[name][0] for name in self._used)
        nbytes = sum(self._transfers[name][1] for name in self._used)
        return seconds, nbytes

    def cached(self, key: str, build: Callable[[], object]):
        """``build()``, once per workspace (untimed setup)."""
        if key not in self._cache:
            self._cache[key] = build()
            self.sync()
        return self._cache[key]

    def release(self) -> None:
        """Drop every array of this workspace (and CuPy's cached blocks)."""
        self._arrays.clear()
        self._cache.clear()
        if self.xp is not np:
            self.sync()
            self.xp.get_default_memory_pool().free_all_blocks()
            self.xp.get_default_pinned_memory_pool().free_all_blocks()


# --------------------------------------------------------------------------- stages


@dataclass
class Case:
    """A stage ready to time on one backend.

    Attributes
    ----------
    call : callable
        The timed call (no arguments; the runner synchronises the device after it).
    bytes_moved, flops : int, optional
        The performance model's traffic and arithmetic (DESIGN "Performance model").
    peak : {"bandwidth", "float32", "float64"} or None
        Which machine limit the achieved rate is a fraction of.
    model : str
        How ``bytes_moved`` or ``flops`` is counted.
    info : dict
        Facts about the inputs (JSON-able).
    describe : callable, optional
        ``describe(output) -> dict``: facts about the result of the warm-up call.
    """

    call: Callable[[], object]
    bytes_moved: int | None = None
    flops: int | None = None
    peak: str | None = None
    model: str = "time only"
    info: dict = field(default_factory=dict)
    describe: Callable[[object], dict] | None = None


@dataclass(frozen=True)
class Stage:
    """One benchmarked stage: its ggrad_gpu case and, optionally, the plain SciPy one."""

    name: str
    title: str
    setup: Callable[[Workspace], Case]
    reference: Callable[[Workspace], Case] | None = None
    reference_max_rounds: int | None = None  # the plain way can take many seconds per call

    def case(self, workspace: Workspace, backend: str) -> Case:
        if backend == "scipy":
            if self.reference is None:
                raise ValueError(f"stage {self.name!r} has no SciPy reference")
            return self.reference(workspace)
        return self.setup(workspace)


def _bytes(shape, itemsize=4) -> int:
    return int(math.prod(shape)) * itemsize


def _target(ws: Workspace):
    """The guide's level-0 Sobel magnitude on the backend (eq. 5's b)."""
    return ws.cached("target", lambda: sobel_magnitude(ws.array("guide", charge=False)))


def _gradients(ws: Workspace):
    """The cube's level-0 Sobel magnitudes on the backend (eq. 5's A, as a cube)."""
    return ws.cached("gradients", lambda: sobel_magnitude(ws.array("cube", charge=False)))


def _plain_matrix(ws: Workspace):
    """The plain way's explicit float64 ``A`` (pixels x bands) and ``b`` (host)."""
    gradients, target = _gradients(ws), _target(ws)
    bands = gradients.shape[2]
    return ws.cached(
        "plain_matrix",
        lambda: (np.asarray(gradients, dtype=np.float64).reshape(-1, bands), np.asarray(target, np.float64).ravel()),
    )


def accumulate_gram(gradients, target, xp):
    """``A^T A`` and ``A^T b`` of band-last gradients, as ``estimate_global_gradient`` sums them.

    float32 products of row blocks (about 32 MiB on the CPU, 256 MiB on a
    GPU, like the estimate's Sobel blocks), summed in float64.
    """
    rows, cols, bands = gradients.shape
    acc = GramAccumulator(bands, xp, product_dtype=gradients.dtype)
    step = block_rows(gradients.shape, gradients.dtype.itemsize, xp, target_bytes=(32 << 20) if xp is np else None)
    for start in range(0, rows, step):
        acc.add(gradients[start : start + step], target[start : start + step])
    return acc.gram, acc.rhs


def _gram(ws: Workspace):
    gradients, target = _gradients(ws), _target(ws)
    return ws.cached("gram", lambda: accumulate_gram(gradients, target, ws.xp))


def _estimate(ws: Workspace):
    return ws.cached(
        "estimate",
        lambda: estimate_global_gradient(
            ws.array("guide", charge=False), ws.array("cube", charge=False), levels=LEVELS
        ),
    )


def _misregistration(shape) -> np.ndarray:
    return affine_about_center(shape[:2], **MISREGISTRATION)


# sobel ----------------------------------------------------------------------


def _sobel(ws):
    cube = ws.array("cube")
    return Case(
        call=lambda: sobel_magnitude(cube),
        bytes_moved=2 * cube.nbytes,
        peak="bandwidth",
        model="read cube + write magnitudes",
    )


def _sobel_plain(ws):
    import scipy.ndimage as ndi

    cube = ws.data.cube
    out = np.empty(cube.shape, dtype=np.float32)

    def call():
        for i in range(cube.shape[2]):
            band = cube[:, :, i]
            out[:, :, i] = np.hypot(ndi.sobel(band, 0), ndi.sobel(band, 1))
        return out

    return Case(call=call, bytes_moved=2 * cube.nbytes, peak="bandwidth", model="read cube + write magnitudes")


# pyramid --------------------------------------------------------------------


def _pyramid_bytes(shape, levels=LEVELS) -> int:
    """Each level after the first reads the previous one and writes itself."""
    total, (rows, cols, bands) = 0, shape
    for _ in range(1, levels):
        smaller = ((rows + 1) // 2, (cols + 1) // 2, bands)
        total += _bytes((rows, cols, bands)) + _bytes(smaller)
        rows, cols = smaller[:2]
    return total


def _pyramid(ws):
    cube = ws.array("cube")
    return Case(
        call=lambda: gaussian_pyramid(cube, LEVELS),
        bytes_moved=_pyramid_bytes(cube.shape),
        peak="bandwidth",
        model=f"read + write per level, {LEVELS} levels",
    )


def _pyramid_plain(ws):
    import scipy.ndimage as ndi

    cube = ws.data.cube
    shapes, (rows, cols, bands) = [], cube.shape
    for _ in range(1, LEVELS):
        rows, cols = (rows + 1) // 2, (cols + 1) // 2
        shapes.append((rows, cols, bands))
    outs = [np.empty(s, dtype=np.float32) for s in shapes]

    def call():
        for i in range(bands):
            band = cube[:, :, i]
            for out in outs:
                band = ndi.gaussian_filter(band, 1)[::2, ::2]
                out[:, :, i] = band
        return outs

    return Case(
        call=call, bytes_moved=_pyramid_bytes(cube.shape), peak="bandwidth", model=f"read + write per level, {LEVELS} levels"
    )


# gram -----------------------------------------------------------------------


def _gram_flops(shape) -> int:
    rows, cols, bands = shape
    return 2 * rows * cols * bands**2


def _gram_case(ws):
    gradients, target = ws.charge("gradients", _gradients(ws)), ws.charge("target", _target(ws))
    return Case(
        call=lambda: accumulate_gram(gradients, target, ws.xp),
        flops=_gram_flops(gradients.shape),
        peak="float32",
        model="2 N L^2 (A^T A counted as a GEMM); float32 products, float64 sums",
    )


def _gram_plain(ws):
    a, b = _plain_matrix(ws)

    def call():
        with spurious_blas_flags_ignored():
            return a.T @ a, a.T @ b

    return Case(call=call, flops=_gram_flops(ws.data.shape), peak="float64", model="2 N L^2, X.T @ X in float64")


# nnls -----------------------------------------------------------------------


def _active(x) -> dict:
    return {"active_bands": int((np.asarray(x) > 0).sum())}


def _nnls(ws):
    gram, rhs = _gram(ws)
    gram, rhs = ws.charge("gram", gram), ws.charge("rhs", rhs)
    return Case(call=lambda: nnls_gram(gram, rhs), info={"bands": int(gram.shape[0])}, describe=_active)


def _nnls_plain(ws):
    import scipy.optimize

    a, b = _plain_matrix(ws)
    # SciPy's default maxiter (3 * bands) is too tight for a 1000-band cube (benchmarks/reference.py).
    return Case(
        call=lambda: scipy.optimize.nnls(a, b, maxiter=50 * a.shape[1])[0],
        info={"bands": int(a.shape[1]), "matrix": "explicit float64 A (pixels x bands)"},
        describe=_active,
    )


# level weights --------------------------------------------------------------


def _level_weights(ws):
    estimate = _estimate(ws)
    q = ws.cached("q", lambda: level_weights_matrix(estimate.guide_levels, estimate.cube_levels))

    def describe(out):
        alpha, beta = out
        return {"alpha": [round(float(v), 6) for v in alpha], "beta": [round(float(v), 6) for v in beta]}

    return Case(call=lambda: solve_level_weights(q), info={"q_shape": list(q.shape)}, describe=describe)


# registration ---------------------------------------------------------------


def _register(ws):
    estimate = _estimate(ws)
    truth = _misregistration(estimate.grad_x.shape)

    def moved():
        # moving(T p) = grad_y(p): register_affine(grad_x, moving) should find T.
        import scipy.ndimage as ndi

        return ndi.affine_transform(to_host(estimate.grad_y), np.linalg.inv(truth), order=1, mode="nearest")

    fixed = ws.array("grad_x", ws.cached("grad_x_host", lambda: to_host(estimate.grad_x)))
    moving = ws.array("moving", ws.cached("moving_host", moved))

    def describe(out):
        tre = target_registration_error(out.matrix, truth, fixed.shape)
        return {
            "iterations": int(out.iterations),
            "converged": bool(out.converged),
            "tre_mean_px": float(tre.mean),
            "tre_max_px": float(tre.max),
        }

    return Case(
        call=lambda: register_affine(fixed, moving),
        info={"image": list(fixed.shape), "truth": "rotation 1.5 deg, scale 1.02, shift (6, -9) px"},
        describe=describe,
    )


# warp -----------------------------------------------------------------------


def _warp(ws):
    cube = ws.array("cube")
    matrix = _misregistration(cube.shape)
    return Case(
        call=lambda: warp_cube(cube, matrix, cube.shape[:2], order=1),
        bytes_moved=2 * cube.nbytes,
        peak="bandwidth",
        model="read cube + write output (same shape), order 1",
    )


def _warp_plain(ws):
    import scipy.ndimage as ndi

    cube = ws.data.cube
    matrix = _misregistration(cube.shape)
    out = np.empty(cube.shape, dtype=np.float32)

    def call():
        for i in range(cube.shape[2]):
            out[:, :, i] = ndi.affine_transform(cube[:, :, i], matrix, order=1, mode="nearest")
        return out

    return Case(
        call=call, bytes_moved=2 * cube.nbytes, peak="bandwidth", model="read cube + write output (same shape), order 1"
    )


# refine ---------------------------------------------------------------------


class _Refine:
    """``refine`` as a user calls it, with the guard's warning recorded, not raised.

    Pyramid levels start at 4; a guide too small for them (smoke-test sizes)
    is retried with fewer on the first call, which is the untimed warm-up.
    """

    def __init__(self, guide, cube, initial, backend):
        self.guide, self.cube, self.initial, self.backend = guide, cube, initial, backend
        self.levels = LEVELS
        self.messages: list[str] = []

    def __call__(self):
        while True:
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    result = refine(self.guide, self.cube, initial=self.initial, levels=self.levels, backend=self.backend)
            except ValueError as exc:
                if self.levels > 1 and "levels=" in str(exc):
                    self.levels -= 1
                    continue
                raise
            self.messages = [str(w.message) for w in caught]
            return result


def _refine(ws):
    data = ws.data
    guide, cube = ws.array("native_guide"), ws.array("native_cube")
    call = _Refine(guide, cube, data.phantom.initial, ws.backend)

    def describe(out):
        tre = target_registration_error(out.matrix, data.phantom.matrix, data.native_guide.shape)
        tre0 = target_registration_error(data.phantom.initial, data.phantom.matrix, data.native_guide.shape)
        return {
            "levels": call.levels,
            "improved": bool(out.improved),
            "tre_mean_px": float(tre.mean),
            "tre_initial_mean_px": float(tre0.mean),
            "working_shape": list(out.registered.shape[:2]),
            "stage_s": {name: round(float(t), 4) for name, t in out.timings.items()},
            "warnings": call.messages,
        }

    return Case(
        call=call,
        info={"guide": list(data.native_guide.shape), "native_cube": list(data.native_cube.shape)},
        describe=describe,
    )


STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in (
        Stage("sobel", "Sobel magnitude, all bands", _sobel, _sobel_plain),
        Stage("pyramid", f"Gaussian pyramid, {LEVELS} levels", _pyramid, _pyramid_plain),
        Stage("gram", "Gram A^T A, A^T b of the Sobel output", _gram_case, _gram_plain),
        Stage("nnls", "NNLS on the level-0 Gram", _nnls, _nnls_plain, reference_max_rounds=1),
        Stage("level_weights", "level-weight QP (eq. 9)", _level_weights),
        Stage("register", "affine registration of grad_y to grad_x", _register),
        Stage("warp", "warp_cube, bilinear", _warp, _warp_plain, reference_max_rounds=1),
        Stage("refine", "refine end to end (native cube 5x coarser)", _refine),
    )
}


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Plan:
    """One benchmark to run: a stage at a size on a backend, or why it is skipped."""

    stage: str
    shape: tuple
    backend: str
    skip: str | None = None

    @property
    def size(self) -> str:
        return size_id(self.shape)

    @property
    def id(self) -> str:
        return f"{self.size}-{self.backend}-{self.stage}"


def plan(sizes, backends, stages) -> list[Plan]:
    """Every (size, backend, stage) to run, size-major then backend, so a size's data
    and a backend's workspace are built once. The plain reference appears only at
    sizes up to the small ones and for stages that have one; CuPy entries carry a
    ``skip`` reason where CuPy is not usable."""
    usable, reason = cupy_usable() if "cupy" in backends else (True, "")
    plans = []
    for shape in sizes:
        reference_ok = BenchData(shape).reference_allowed
        for backend in backends:
            for name in stages:
                if backend == "scipy" and (STAGES[name].reference is None or not reference_ok):
                    continue
                skip = reason if backend == "cupy" and not usable else None
                plans.append(Plan(name, tuple(shape), backend, skip))
    return plans
