"""Benchmark definitions: each stage of the method, timed on NumPy or CuPy against the plain way.

A *stage* is one public function timed on stored inputs, next to the plain way
a user would do the same job without this package (per-band ``scipy.ndimage``
loops, ``scipy.optimize.nnls`` on the explicit matrix, SimpleITK for the
registration):

========= ============================================ ====================================== ==================
stage     ggrad_gpu call                               plain way                              model
========= ============================================ ====================================== ==================
sobel     ``sobel_magnitude(cube)``                    per-band ``ndimage.sobel``             read + write
pyramid   ``gaussian_pyramid(cube, 4)``                per-band ``gaussian_filter``           read + write/level
gram      ``estimate.level_gram(cube, target)``        per-band Sobel into float64 ``A``,     2 N L^2 flops
                                                       ``A.T @ A``, ``A.T @ b``
nnls      ``nnls_gram(gram, rhs)``                     ``scipy.optimize.nnls(A, b)``          time
combine   ``estimate.combine_bands(cube, x)``          per-band Sobel of the active bands     read + write
warp      ``warp_cube(cube, matrix, shape)``           per-band ``affine_transform``          read + write
register  ``register_affine(grad_x, moved grad_y)``    SimpleITK, mean squares                time
estimate  ``estimate_global_gradient(guide, cube)``    :func:`plain_estimate`                 time
refine    ``refine(guide, native cube, initial=...)``  :func:`plain_refine`                   time
========= ============================================ ====================================== ==================

Sizes are ``rows x cols x bands`` (DESIGN "Grids"): "estimate at 350 x 415 x
1000" is a 350 x 415 x 1000 cube on the guide's grid
(``make_phantom(...).cube_on_guide``); "refine at 350 x 415 x 1000" is a
350 x 415 guide with the native 70 x 83 x 1000 cube.

Protocol, the same on every backend (:func:`measure`): the stage's inputs are
put on the device first and that copy is timed alone (``h2d_s``); the first
call is timed alone (``warmup_s``: CUDA compilation, memory pool growth, page
faults); then each timed round is ``call(); sync()``, the device
synchronised inside the timed call. The plain way runs on the CPU, one timed
round after its warm-up. Rates are quoted against the machine's limits
measured in the same run (:func:`machine`).

Used by ``ggrad bench`` and by the pytest-benchmark suites of the repository's
``benchmarks/`` folder. SimpleITK (``pip install SimpleITK``) is needed only
for the plain way of ``register`` and ``refine``, CuPy only for ``cupy``.

Examples
--------
>>> from ggrad_gpu.cli import bench
>>> bench.parse_sizes("tiny,350x415x200")
[(64, 80, 16), (350, 415, 200)]
"""

from __future__ import annotations

import functools
import math
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import scipy
import scipy.ndimage as ndi
import scipy.optimize

from .._backend import resolve_backend, to_device, to_host
from ..core.estimate import estimate_global_gradient
from ..core.estimate import combine_bands, level_gram
from ..core.filters import sobel_magnitude
from ..core.nnls import nnls_gram
from ..core.pyramid import gaussian_pyramid
from ..core.warp import warp_cube
from ..refinement.driver import refine
from ..registration.metrics import target_registration_error
from ..registration.register import register_affine
from ..synthetic import affine_about_center, make_phantom

__all__ = [
    "PAPER", "SIZES", "STAGES", "Case", "Data", "SitkSettings", "backends_for", "build", "draw_cases",
    "machine", "machine_lines", "markdown_table", "case_lines", "measure", "parse_sizes", "parse_stages",
    "plain_estimate", "plain_refine", "register_sitk", "rows_from_pytest_benchmark", "run",
]

LEVELS = 4
PAPER = (350, 415, 1000)
SIZES = {
    "tiny": ((64, 80, 16),),
    "small": ((350, 415, 200),),
    "paper": (PAPER,),
    "large": ((1024, 1024, 512), (2048, 2048, 256)),
}
# The plain way holds an explicit float64 pixels x bands matrix: up to the paper's size only.
PLAIN_LIMIT = math.prod(PAPER)
PLAIN_ROUNDS = 1  # the plain way takes seconds to minutes a call
# The warp and registration stages' misregistration, about the image centre.
MISREGISTRATION = {"rotation_deg": 1.5, "scale": 1.02, "shift": (6.0, -9.0)}
CASE_SEED = 2024  # draw_cases: refine's misregistrations (benchmarks/RESULTS.md)


# --------------------------------------------------------------------------- selection


def parse_sizes(text: str) -> list[tuple[int, int, int]]:
    """Sizes from a comma list of names (``tiny``, ``small``, ``paper``, ``large``) and ``RxCxB``.

    Examples
    --------
    >>> parse_sizes("tiny, 48x64x8")
    [(64, 80, 16), (48, 64, 8)]
    >>> parse_sizes("10x10x3")
    Traceback (most recent call last):
        ...
    ValueError: sizes need at least 24 x 24 pixels (4 pyramid levels); got '10x10x3'
    """
    sizes = []
    for item in (part.strip().lower() for part in str(text).split(",")):
        if item in SIZES:
            found = SIZES[item]
        else:
            try:
                found = (tuple(int(n) for n in item.split("x")),)
            except ValueError:
                found = ((),)
            if len(found[0]) != 3 or min(found[0]) < 1:
                raise ValueError(f"sizes must be {', '.join(SIZES)} or rows x cols x bands like 350x415x200; "
                                 f"got {item!r}")
            if min(found[0][:2]) < 24:
                raise ValueError(f"sizes need at least 24 x 24 pixels ({LEVELS} pyramid levels); got {item!r}")
        sizes.extend(size for size in found if size not in sizes)
    return sizes


def parse_stages(text: str | None) -> list[str]:
    """Stage names from a comma list (default: all), in :data:`STAGES` order.

    Examples
    --------
    >>> parse_stages("warp, sobel")  # in STAGES order
    ['sobel', 'warp']
    >>> parse_stages(None) == list(STAGES)
    True
    >>> parse_stages("fft")
    Traceback (most recent call last):
        ...
    ValueError: stages must be among sobel, pyramid, gram, nnls, combine, warp, register, estimate, refine; got fft
    """
    if not text:
        return list(STAGES)
    names = {name.strip().lower() for name in text.split(",") if name.strip()}
    unknown = sorted(names - set(STAGES))
    if unknown:
        raise ValueError(f"stages must be among {', '.join(STAGES)}; got {', '.join(unknown)}")
    return [name for name in STAGES if name in names]


def backends_for(choice: str) -> tuple[list[str], str | None]:
    """The backends of ``--backend numpy|cupy|auto|both`` and a note on a skipped CuPy.

    ``cupy`` where CuPy sees no device raises ``ValueError`` (no silent
    fallback); ``both`` then runs NumPy alone and says why.

    Examples
    --------
    >>> backends_for("numpy")
    (['numpy'], None)
    >>> backends, note = backends_for("both")  # NumPy always; CuPy where a device is usable
    >>> backends == ["numpy", "cupy"] or (backends == ["numpy"] and note.startswith("cupy skipped"))
    True
    """
    if choice not in ("numpy", "cupy", "auto", "both"):
        raise ValueError(f"backend must be numpy, cupy, auto or both; got {choice!r}")
    if choice == "numpy":
        return ["numpy"], None
    try:
        resolve_backend("cupy")
    except RuntimeError as exc:
        if choice == "cupy":
            raise ValueError(str(exc)) from None
        return ["numpy"], (f"cupy skipped: {exc}" if choice == "both" else None)
    return (["numpy", "cupy"] if choice == "both" else ["cupy"]), None


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Misregistration:
    """One drawn misregistration of ``make_phantom`` (phantom seed = case number).

    Examples
    --------
    >>> case = Misregistration(seed=3, rotation_deg=1.0, scale=1.01, shear=0.0, shift=(2.0, -4.0))
    >>> phantom = make_phantom(shape=(48, 64), bands=4, **case.phantom_kwargs())
    >>> expected = affine_about_center((48, 64), rotation_deg=1.0, scale=1.01, shift=(2.0, -4.0))
    >>> bool(np.allclose(phantom.misregistration, expected))
    True
    """

    seed: int
    rotation_deg: float
    scale: float
    shear: float
    shift: tuple

    def phantom_kwargs(self) -> dict:
        return {"seed": self.seed, "rotation_deg": self.rotation_deg, "scale": self.scale,
                "shear": self.shear, "shift": self.shift}


def draw_cases(count: int, *, seed: int = CASE_SEED) -> list[Misregistration]:
    """``count`` misregistrations from one seeded generator; the first ``n`` do not depend on ``count``.

    Rotation uniform in [-5, 5] degrees, scale in [0.95, 1.05], shear in
    [-0.02, 0.02], a shift of length uniform in [0, 45] guide pixels in a
    uniformly random direction; case ``i`` uses phantom seed ``i``.

    Examples
    --------
    >>> cases = draw_cases(5)
    >>> cases[:2] == draw_cases(2), [case.seed for case in cases]  # the first cases do not depend on the count
    (True, [0, 1, 2, 3, 4])
    >>> all(abs(c.rotation_deg) <= 5 and 0.95 <= c.scale <= 1.05 and np.hypot(*c.shift) <= 45 for c in cases)
    True
    """
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(count):
        rotation, scale, shear, length, angle = (
            rng.uniform(-5, 5), rng.uniform(0.95, 1.05), rng.uniform(-0.02, 0.02),
            rng.uniform(0, 45), rng.uniform(0, 2 * np.pi),
        )
        shift = (float(length * np.sin(angle)), float(length * np.cos(angle)))
        cases.append(Misregistration(i, float(rotation), float(scale), float(shear), shift))
    return cases


class Data:
    """The host inputs of one size, each built on first use and kept (untimed).

    Parameters
    ----------
    shape : (rows, cols, bands)
    case : int
        Which of :func:`draw_cases` the ``refine`` stage's phantom takes (its
        shift scaled down on guides smaller than 350 x 415; at 350 x 415 x
        1000 these are benchmarks/RESULTS.md's end-to-end cases).

    Examples
    --------
    >>> data = Data((32, 40, 4))
    >>> data.size, data.cube.shape, data.cube.dtype, data.target.shape
    ('32x40x4', (32, 40, 4), dtype('float32'), (32, 40))
    >>> gram, rhs = data.gram  # eq. 5's Gram of level 0, from the cube's and the guide's Sobel magnitudes
    >>> a, b = data.explicit
    >>> bool(np.allclose(gram, a.T @ a, rtol=1e-5)), bool(np.allclose(rhs, a.T @ b, rtol=1e-5))
    (True, True)
    """

    def __init__(self, shape, case: int = 0):
        self.shape, self.case = tuple(int(n) for n in shape), int(case)
        self.size = "x".join(map(str, self.shape))
        self.plain_results: dict = {}  # stage -> the plain way's result, for the agreement checks

    @cached_property
    def phantom(self):
        rows, cols, bands = self.shape
        return make_phantom(shape=(rows, cols), bands=bands, seed=0, signatures="mixed")  # the phantom of RESULTS.md

    @cached_property
    def guide(self):
        return self.phantom.guide

    @cached_property
    def cube(self):
        """The phantom's cube on the guide grid (rows, cols, bands), float32."""
        return np.ascontiguousarray(self.phantom.cube_on_guide, dtype=np.float32)

    @cached_property
    def target(self):
        """The guide's Sobel magnitude (eq. 5's ``b``)."""
        return sobel_magnitude(self.guide)

    @cached_property
    def gram(self):
        return level_gram(self.cube, self.target)

    @cached_property
    def explicit(self):
        """The plain way's float64 ``A`` (pixels x bands) and ``b``."""
        return (sobel_magnitude(self.cube).reshape(-1, self.shape[2]).astype(np.float64),
                self.target.ravel().astype(np.float64))

    @cached_property
    def weights(self):
        return nnls_gram(*self.gram)

    @cached_property
    def truth(self):
        return affine_about_center(self.shape[:2], **MISREGISTRATION)

    @cached_property
    def gradients(self):
        """``grad_x`` and ``grad_y`` moved by :data:`MISREGISTRATION`: ``moving(T p) = grad_y(p)``."""
        estimate = estimate_global_gradient(self.guide, self.cube, levels=LEVELS)
        moving = ndi.affine_transform(estimate.grad_y, np.linalg.inv(self.truth), order=1, mode="nearest")
        return estimate.grad_x, moving

    @cached_property
    def refine_phantom(self):
        rows, cols, bands = self.shape
        drawn = draw_cases(self.case + 1)[self.case].phantom_kwargs()
        factor = min(1.0, rows / PAPER[0], cols / PAPER[1])
        drawn["shift"] = tuple(factor * s for s in drawn["shift"])
        return make_phantom(shape=(rows, cols), bands=bands, signatures="mixed", **drawn)  # RESULTS.md's phantom


# --------------------------------------------------------------------------- stages


@dataclass
class Case:
    """One stage on one size, ready to time.

    ``call(arrays, xp)`` is the ggrad_gpu call on ``arrays`` (the host
    ``arrays`` put on backend ``xp``); ``plain()`` the plain way on the host
    (None, with ``no_plain`` saying why, where it does not run).
    ``bytes_moved`` or ``flops`` is the performance model's count, ``peak``
    and ``plain_peak`` the machine limit each is a fraction of.
    ``compare(ours, plain)`` is their relative difference (``tolerance``:
    what the tests accept); ``describe(result)`` adds facts about a result.

    Examples
    --------
    >>> case = build("sobel", Data((32, 40, 4)))
    >>> case.stage, case.size, case.bytes_moved == 2 * 32 * 40 * 4 * 4  # float32 cube read and written
    ('sobel', '32x40x4', True)
    >>> bool(case.compare(case.call(case.arrays, np), case.plain()) < case.tolerance)
    True
    """

    stage: str
    size: str
    case: int | None
    call: Callable
    arrays: dict
    plain: Callable | None = None
    no_plain: str = ""
    bytes_moved: int | None = None
    flops: int | None = None
    peak: str | None = None
    plain_peak: str | None = None
    compare: Callable | None = None
    tolerance: float | None = None
    describe: Callable | None = None


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


def _sobel(data):
    cube = data.cube

    def plain():
        out = np.empty(cube.shape, np.float32)
        for i in range(cube.shape[2]):
            out[:, :, i] = _plain_band_sobel(cube[:, :, i])
        return out

    return dict(call=lambda a, xp: sobel_magnitude(a["cube"]), arrays={"cube": cube}, plain=plain,
                bytes_moved=2 * cube.nbytes, peak="bandwidth", plain_peak="bandwidth",
                compare=_relative, tolerance=1e-5)


def _pyramid_bytes(shape) -> int:
    rows, cols, bands = shape
    total = 0
    for _ in range(1, LEVELS):  # each level reads the one before and writes itself
        total += 4 * bands * (rows * cols + ((rows + 1) // 2) * ((cols + 1) // 2))
        rows, cols = (rows + 1) // 2, (cols + 1) // 2
    return total


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

    return dict(call=lambda a, xp: gaussian_pyramid(a["cube"], LEVELS), arrays={"cube": cube}, plain=plain,
                bytes_moved=_pyramid_bytes(cube.shape), peak="bandwidth", plain_peak="bandwidth",
                compare=_relative_all, tolerance=1e-5)


def _plain_matrix(cube):
    """Per-band Sobel magnitudes as the columns of a float64 (pixels x bands) matrix."""
    a = np.empty((cube.shape[0] * cube.shape[1], cube.shape[2]))
    for i in range(cube.shape[2]):
        a[:, i] = _plain_band_sobel(cube[:, :, i]).ravel()
    return a


def _gram(data):
    cube, target = data.cube, data.target
    rows, cols, bands = cube.shape

    def plain():
        a, b = _plain_matrix(cube), target.ravel().astype(np.float64)
        with np.errstate(invalid="ignore"):  # OpenBLAS may flag finite input (numpy/numpy#24067)
            return a.T @ a, a.T @ b

    return dict(call=lambda a, xp: level_gram(a["cube"], a["target"]), arrays={"cube": cube, "target": target},
                plain=plain, flops=2 * rows * cols * bands**2, peak="float32", plain_peak="float64",
                compare=_relative_all, tolerance=1e-4)


def _nnls(data):
    gram, rhs = data.gram

    def objective(x):
        a, b = data.explicit
        with np.errstate(invalid="ignore"):
            return float(np.sum((a @ x - b) ** 2))

    def plain():
        a, b = data.explicit
        # SciPy's default maxiter (3 * bands) is too tight for a 1000-band cube.
        return scipy.optimize.nnls(a, b, maxiter=50 * a.shape[1])[0]

    return dict(call=lambda a, xp: nnls_gram(a["gram"], a["rhs"]), arrays={"gram": gram, "rhs": rhs},
                plain=plain, compare=lambda ours, theirs: objective(ours) / objective(theirs) - 1,
                tolerance=1e-5, describe=lambda x: {"active_bands": int((to_host(x) > 0).sum())})


def _combine(data):
    cube, x = data.cube, data.weights
    active = np.flatnonzero(x > 0)

    def plain():
        out = np.zeros(cube.shape[:2])
        for i in active:
            out += x[i] * _plain_band_sobel(cube[:, :, i])
        return out

    return dict(call=lambda a, xp: combine_bands(a["cube"], x), arrays={"cube": cube}, plain=plain,
                # band-last: reading the active bands touches every cache line of the cube
                bytes_moved=cube.nbytes + 4 * cube.shape[0] * cube.shape[1], peak="bandwidth",
                plain_peak="bandwidth", compare=_relative, tolerance=1e-4)


def _warp(data):
    cube, matrix = data.cube, data.truth

    def plain():
        out = np.empty(cube.shape, np.float32)
        for i in range(cube.shape[2]):
            out[:, :, i] = ndi.affine_transform(cube[:, :, i], matrix, order=1, mode="nearest")
        return out

    # Inside the footprint warp_cube clamps at the edges as mode="nearest" does; outside it is NaN.
    return dict(call=lambda a, xp: warp_cube(a["cube"], matrix, cube.shape[:2], order=1), arrays={"cube": cube},
                plain=plain, bytes_moved=2 * cube.nbytes, peak="bandwidth", plain_peak="bandwidth",
                compare=_relative, tolerance=1e-5)


def _tre(matrix, truth, shape) -> dict:
    tre = target_registration_error(np.asarray(matrix), truth, shape)
    return {"tre_px": float(tre.mean), "tre_max_px": float(tre.max)}


def _matrix(result):
    return result if isinstance(result, np.ndarray) else result.matrix


def _register(data):
    fixed, moving = data.gradients
    return dict(call=lambda a, xp: register_affine(a["fixed"], a["moving"]),
                arrays={"fixed": fixed, "moving": moving},
                plain=lambda: register_sitk(fixed, moving, metric="mse")[0],
                describe=lambda out: _tre(_matrix(out), data.truth, fixed.shape))


def _estimate(data):
    guide, cube = data.guide, data.cube

    def compare(ours, theirs):
        return max(_relative(ours.grad_x, theirs["grad_x"]), _relative(ours.grad_y, theirs["grad_y"]))

    def describe(out):
        weights = out["channel_weights"] if isinstance(out, dict) else out.channel_weights
        return {"active_bands": (np.asarray(weights) > 0).sum(axis=1).tolist()}

    return dict(call=lambda a, xp: estimate_global_gradient(a["guide"], a["cube"], levels=LEVELS),
                arrays={"guide": guide, "cube": cube}, plain=lambda: plain_estimate(guide, cube, LEVELS),
                compare=compare, tolerance=1e-3, describe=describe)


def _refine(data):
    phantom = data.refine_phantom

    def call(a, xp):
        with warnings.catch_warnings():  # a kept initial transform warns; describe() reports it
            warnings.simplefilter("ignore", UserWarning)
            return refine(a["guide"], a["cube"], initial=phantom.initial, backend=xp.__name__)

    def describe(out):
        facts = _tre(out.matrix, phantom.matrix, phantom.guide.shape)
        if hasattr(out, "improved"):
            facts["improved"] = bool(out.improved)
        return facts

    return dict(call=call, arrays={"guide": phantom.guide, "cube": phantom.cube},
                plain=lambda: plain_refine(phantom.guide, phantom.cube, phantom.initial), describe=describe)


@dataclass(frozen=True)
class Stage:
    """A benchmarked stage: its name, its title in tables, and how to build its :class:`Case` from :class:`Data`.

    Examples
    --------
    >>> stage = STAGES["warp"]
    >>> stage.name, stage.title, stage.sitk
    ('warp', 'warp_cube, bilinear', False)
    >>> sorted(stage.build(Data((32, 40, 4)))["arrays"])
    ['cube']
    """

    name: str
    title: str
    build: Callable[[Data], dict]
    sitk: bool = False  # the plain way needs SimpleITK


STAGES = {stage.name: stage for stage in (
    Stage("sobel", "Sobel magnitude, all bands", _sobel),
    Stage("pyramid", f"Gaussian pyramid, {LEVELS} levels", _pyramid),
    Stage("gram", "Sobel + Gram A^T A, A^T b (level 0)", _gram),
    Stage("nnls", "NNLS on the level-0 Gram", _nnls),
    Stage("combine", "gradG = A x over the active bands", _combine),
    Stage("warp", "warp_cube, bilinear", _warp),
    Stage("register", "affine registration of grad_y to grad_x", _register, sitk=True),
    Stage("estimate", f"estimate_global_gradient, {LEVELS} levels", _estimate),
    Stage("refine", "refine, native cube 5x coarser", _refine, sitk=True),
)}


def build(stage: str, data: Data) -> Case:
    """The :class:`Case` of ``stage`` on ``data``; its plain way where it can run here.

    Examples
    --------
    >>> case = build("nnls", Data((32, 40, 4)))
    >>> x, reference = case.call(case.arrays, np), case.plain()  # nnls_gram and scipy.optimize.nnls
    >>> abs(case.compare(x, reference)) < case.tolerance
    True
    """
    spec = STAGES[stage]
    case = Case(stage=stage, size=data.size, case=data.case if stage == "refine" else None, **spec.build(data))
    if math.prod(data.shape) > PLAIN_LIMIT:
        case.plain, case.no_plain = None, f"the plain way runs up to {'x'.join(map(str, PAPER))} values only"
    elif spec.sitk and not _has_sitk():
        case.plain, case.no_plain = None, "the plain way needs SimpleITK (pip install SimpleITK)"
    return case


# --------------------------------------------------------------------------- timing


def device_sync(xp) -> Callable[[], None]:
    """A function that waits for the backend's queued work (a no-op for NumPy).

    Examples
    --------
    >>> device_sync(np)() is None  # NumPy has no queue to wait for
    True
    """
    return (lambda: None) if xp is np else xp.cuda.Device().synchronize


def _rounds(call, sync, rounds: int):
    """Seconds of ``rounds`` timed calls (each ending in ``sync()``) and the last call's result.

    The previous result is dropped before each round, so a round never holds two outputs.
    """
    times, out = [], None
    for _ in range(rounds):
        out = None
        sync()
        start = time.perf_counter()
        out = call()
        sync()
        times.append(time.perf_counter() - start)
    return times, out


def measure(case: Case, backend: str, *, repeat: int = 3, warmup: bool = True, timer=None) -> tuple[dict, object]:
    """Time ``case`` on ``backend`` ("numpy", "cupy" or "plain"); return its row and last result.

    ``timer(call, sync, rounds) -> (seconds, last result)`` does the timed
    rounds (default: :func:`time.perf_counter` around each; the pytest
    suites pass one that goes through pytest-benchmark). ``warmup=False``
    skips the separate first call (the caller warmed up on other data).

    Examples
    --------
    >>> row, out = measure(build("sobel", Data((32, 40, 4))), "numpy", repeat=2)
    >>> row["stage"], row["backend"], row["rounds"], row["h2d_s"], out.shape
    ('sobel', 'numpy', 2, None, (32, 40, 4))
    >>> row["median_s"] > 0 and row["warmup_s"] > 0
    True
    """
    timer = timer or _rounds
    if backend not in ("numpy", "cupy", "plain"):
        raise ValueError(f"backend must be numpy, cupy or plain; got {backend!r}")
    if backend == "plain" and case.plain is None:
        raise ValueError(f"stage {case.stage!r} has no plain way here: {case.no_plain}")
    xp = np if backend == "plain" else resolve_backend(backend)
    sync, h2d_s = device_sync(xp), None
    if backend == "plain":
        call, rounds, peak = case.plain, min(repeat, PLAIN_ROUNDS), case.plain_peak
    else:
        sync()
        start = time.perf_counter()
        arrays = {name: to_device(value, xp) for name, value in case.arrays.items()}
        sync()
        h2d_s = time.perf_counter() - start if xp is not np else None
        call, rounds, peak = (lambda: case.call(arrays, xp)), repeat, case.peak
    warmup_s = None
    if warmup:
        sync()
        start = time.perf_counter()
        call()
        sync()
        warmup_s = time.perf_counter() - start
    times, out = timer(call, sync, rounds)
    row = {
        "stage": case.stage, "size": case.size, "case": case.case, "backend": backend,
        "rounds": len(times), "times_s": [float(t) for t in times],
        "median_s": float(statistics.median(times)) if times else None,
        "warmup_s": warmup_s, "h2d_s": h2d_s,
        "h2d_bytes": int(sum(v.nbytes for v in case.arrays.values())) if h2d_s is not None else None,
        "bytes_moved": case.bytes_moved, "flops": case.flops, "peak_kind": peak,
    }
    if case.describe is not None:
        row.update(case.describe(out))
    if xp is not np:
        out = to_host(out) if hasattr(out, "__cuda_array_interface__") else out
        del arrays
        xp.get_default_memory_pool().free_all_blocks()
    return row, out


def add_rates(row: dict, limits: dict | None) -> dict:
    """Fill ``throughput`` (GB/s or GFLOP/s), ``peak`` (same unit) and ``frac_peak`` of a row.

    Examples
    --------
    >>> row = add_rates({"median_s": 0.5, "bytes_moved": 2e9, "peak_kind": "bandwidth"}, {"copy_gbps": 8.0})
    >>> row["throughput"], row["unit"], row["peak"], row["frac_peak"]  # 2 GB in 0.5 s of 8 GB/s
    (4.0, 'GB/s', 8.0, 0.5)
    """
    seconds, row["throughput"], row["frac_peak"] = row.get("median_s"), None, None
    work = row.get("flops") or row.get("bytes_moved")
    if not (seconds and work):
        return row
    row["throughput"] = work / seconds / 1e9
    row["unit"] = "GFLOP/s" if row.get("flops") else "GB/s"
    kind = row.get("peak_kind")
    row["peak"] = None if not (limits and kind) else (
        limits["copy_gbps"] if kind == "bandwidth" else limits["gemm_gflops"].get(kind))
    if row["peak"]:
        row["frac_peak"] = row["throughput"] / row["peak"]
    return row


# --------------------------------------------------------------------------- machine


def _best(call, sync, repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        call()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


@functools.cache
def machine(backend: str, quick: bool = False) -> dict:
    """Name and limits of the device ``backend`` computes on, measured now.

    Copy bandwidth: ``copyto`` of a float32 array, read + write (NumPy copies
    on one thread); GEMM: ``a @ b`` of square float32 and float64 operands,
    ``2 n^3`` flops (all BLAS threads; cuBLAS). On a GPU also its data-sheet
    bandwidth (``2 x memory clock x bus width``). ``quick``: smaller operands.

    Examples
    --------
    >>> limits = machine("numpy", True)  # quick: smaller operands
    >>> limits["device"].startswith("CPU"), sorted(limits["gemm_gflops"]), limits["gemm_n"]
    (True, ['float32', 'float64'], 1024)
    >>> limits["copy_gbps"] > 0
    True
    """
    xp = np if backend in ("numpy", "plain") else resolve_backend("cupy")
    sync = device_sync(xp)
    nbytes = (64 << 20) if quick else (512 << 20)
    source = xp.ones(nbytes // 4, dtype=xp.float32)
    copy = functools.partial(xp.copyto, xp.zeros_like(source), source)
    copy()  # pages touched, kernels loaded
    limits = {"copy_gbps": 2 * nbytes / _best(copy, sync, 5) / 1e9, "gemm_gflops": {}}
    del source, copy
    n = (1024 if quick else 2048) * (1 if xp is np else 4)
    for dtype in ("float32", "float64"):
        a = xp.asarray(np.random.default_rng(0).standard_normal((n, n)), dtype=dtype)
        product = functools.partial(xp.matmul, a, a)
        product()
        limits["gemm_gflops"][dtype] = 2 * n**3 / _best(product, sync, 3) / 1e9
    limits["gemm_n"] = n
    if xp is np:
        model = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
                model = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), model)
        except OSError:
            pass
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        return {"device": f"CPU {model}, {cores} cores", "versions": f"Python {platform.python_version()}, "
                f"NumPy {np.__version__}, SciPy {scipy.__version__}", **limits}
    runtime, index = xp.cuda.runtime, xp.cuda.Device().id
    props = runtime.getDeviceProperties(index)
    name = props.get("name", b"?")
    # CUDA 13 dropped memoryClockRate (kHz) and memoryBusWidth (bits) from the properties.
    clock = props.get("memoryClockRate") or runtime.deviceGetAttribute(36, index)
    bus = props.get("memoryBusWidth") or runtime.deviceGetAttribute(37, index)
    xp.get_default_memory_pool().free_all_blocks()
    return {"device": f"GPU {name.decode() if isinstance(name, bytes) else name}, "
            f"{props.get('totalGlobalMem', 0) / 2**30:.0f} GiB", "spec_gbps": 2 * clock * 1e3 * bus / 8 / 1e9,
            "versions": f"CuPy {xp.__version__}, CUDA runtime {runtime.runtimeGetVersion()}", **limits}


def machine_lines(machines: dict) -> list[str]:
    """One line per device: identity, versions and measured limits.

    Examples
    --------
    >>> cpu = {"device": "CPU Example, 8 cores", "versions": "Python 3.12", "copy_gbps": 20.0,
    ...        "gemm_gflops": {"float32": 400.0, "float64": 200.0}, "gemm_n": 2048}
    >>> machine_lines({"numpy": cpu})
    ['CPU Example, 8 cores; Python 3.12; measured: copy 20.0 GB/s, GEMM float32 400, float64 200 GFLOP/s (n = 2048)']
    """
    lines = []
    for m in machines.values():
        gemm = m["gemm_gflops"]
        spec = f", data sheet {m['spec_gbps']:.0f} GB/s" if m.get("spec_gbps") else ""
        lines.append(f"{m['device']}; {m['versions']}; measured: copy {m['copy_gbps']:.1f} GB/s{spec}, "
                     f"GEMM float32 {gemm['float32']:.0f}, float64 {gemm['float64']:.0f} GFLOP/s (n = {m['gemm_n']})")
    return lines


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


# --------------------------------------------------------------------------- running and tables


def run(sizes, backends, stages, *, repeat: int = 3, plain: bool = True, progress=None) -> dict:
    """Every stage at every size on every backend, the plain way first; return rows and machines.

    A case that fails is recorded as a row with ``error`` and the run goes on
    (e.g. out of device memory at a large size).

    Returns
    -------
    dict
        ``rows`` (one per case, with ``difference`` against the plain way
        where both ran), ``machines`` (:func:`machine` per backend used) and
        ``skipped`` (plain ways that could not run here, with the reason).

    Examples
    --------
    >>> result = run([(32, 40, 4)], ["numpy"], ["sobel"], repeat=1)
    >>> [(row["stage"], row["backend"]) for row in result["rows"]]  # the plain way first
    [('sobel', 'plain'), ('sobel', 'numpy')]
    >>> bool(result["rows"][1]["difference"] < 1e-5), sorted(result["machines"])
    (True, ['numpy'])
    """
    if repeat < 1:
        raise ValueError(f"repeat must be at least 1; got {repeat}")
    say = progress or (lambda line: None)
    quick = max(math.prod(shape) for shape in sizes) * 4 < (64 << 20)
    rows, skipped, machines = [], [], {}
    for shape in sizes:
        data = Data(shape)
        for stage in stages:
            case = build(stage, data)
            runs = list(backends)
            if plain and case.plain is not None:
                runs.insert(0, "plain")
            elif plain:
                skipped.append(f"{stage} {data.size} plain: {case.no_plain}")
            theirs = None
            for backend in runs:
                try:
                    row, out = measure(case, backend, repeat=repeat)
                    if backend == "plain":
                        theirs = out
                    elif theirs is not None and case.compare is not None:
                        row["difference"] = float(case.compare(out, theirs))
                    del out
                except Exception as exc:  # noqa: BLE001 - recorded; the other cases still run
                    row = {"stage": stage, "size": data.size, "case": case.case, "backend": backend,
                           "median_s": None, "error": f"{type(exc).__name__}: {' '.join(str(exc).split())}"}
                device = "numpy" if backend == "plain" else backend  # the plain way runs on the CPU
                machines.setdefault(device, machine(device, quick))
                rows.append(add_rates(row, machines[device]))
                say(f"{stage} {data.size} {backend}: " + (row.get("error") or _seconds(row["median_s"])))
        del data
    return {"rows": rows, "machines": machines, "skipped": skipped}


def rows_from_pytest_benchmark(document: dict) -> tuple[list[dict], dict]:
    """The rows and machines of a pytest-benchmark JSON document written by the benchmarks' suites.

    Each benchmark's ``extra_info`` holds its ``row`` and ``machine``
    (:func:`measure`, :func:`machine`); its timing is pytest-benchmark's
    median. Benchmarks without a row are left out.

    Examples
    --------
    >>> row = {"stage": "sobel", "size": "32x40x4", "backend": "numpy", "median_s": 9.0, "bytes_moved": 4e9,
    ...        "peak_kind": "bandwidth"}
    >>> document = {"benchmarks": [{"extra_info": {"row": row, "machine": {"copy_gbps": 16.0}},
    ...                             "stats": {"median": 0.5}}, {"extra_info": {}}]}
    >>> rows, machines = rows_from_pytest_benchmark(document)
    >>> len(rows), rows[0]["median_s"], rows[0]["throughput"], sorted(machines)  # pytest-benchmark's median
    (1, 0.5, 8.0, ['numpy'])
    """
    rows, machines = [], {}
    for entry in document.get("benchmarks", []):
        extra = entry.get("extra_info", {})
        if "row" not in extra:
            continue
        row = dict(extra["row"])
        row["median_s"] = (entry.get("stats") or {}).get("median", row.get("median_s"))
        if extra.get("machine"):
            machines.setdefault("numpy" if row["backend"] == "plain" else row["backend"], extra["machine"])
        rows.append(add_rates(row, extra.get("machine")))
    return rows, machines


def _seconds(value) -> str:
    if value is None:
        return "-"
    return f"{value * 1e6:.0f} us" if value < 1e-3 else f"{value * 1e3:.1f} ms" if value < 1 else f"{value:.2f} s"


def _grouped(rows) -> list[dict]:
    """One row per (stage, size, backend): over several cases, the mean of their medians."""
    groups: dict = {}
    for row in rows:
        groups.setdefault((row["stage"], row["size"], row["backend"]), []).append(row)
    out = []
    for members in groups.values():
        row = dict(members[0])
        if len(members) > 1:
            medians = [m.get("median_s") for m in members]
            row["median_s"] = statistics.fmean(medians) if None not in medians else None
            row["cases"] = len(members)
            for key in ("warmup_s", "h2d_s", "difference", "tre_px"):
                values = [m[key] for m in members if m.get(key) is not None]
                row[key] = statistics.fmean(values) if len(values) == len(members) else None
        out.append(row)
    medians = {(r["stage"], r["size"], r["backend"]): r.get("median_s") for r in out}
    for row in out:
        for other, key in (("plain", "vs_plain"), ("numpy", "vs_numpy")):
            theirs = medians.get((row["stage"], row["size"], other))
            if row["backend"] not in (other, "plain") and theirs and row.get("median_s"):
                row[key] = theirs / row["median_s"]
    return out


COLUMNS = ("stage", "size", "backend", "time", "warm-up", "h2d", "throughput", "% of peak", "vs plain",
           "vs NumPy", "check")


def _cells(row) -> list[str]:
    size = row["size"] + (f" ({row['cases']} cases)" if row.get("cases") else "")
    if row.get("error"):
        return [row["stage"], size, row["backend"], "FAILED", "", "", row["error"][:60], "", "", "", ""]
    check = []
    if row.get("difference") is not None:
        check.append(f"diff {row['difference']:.0e}")
    if row.get("tre_px") is not None:
        check.append(f"TRE {row['tre_px']:.2f} px")
    rate = row.get("throughput")
    return [row["stage"], size, row["backend"], _seconds(row.get("median_s")), _seconds(row.get("warmup_s")),
            _seconds(row.get("h2d_s")), "-" if rate is None else f"{rate:.3g} {row['unit']}",
            "-" if row.get("frac_peak") is None else f"{100 * row['frac_peak']:.0f} %",
            "-" if row.get("vs_plain") is None else f"{row['vs_plain']:.1f}x",
            "-" if row.get("vs_numpy") is None else f"{row['vs_numpy']:.1f}x", ", ".join(check) or "-"]


def markdown_table(rows) -> str:
    """The rows as one Markdown table, padded to read in a terminal (several cases: their mean).

    Examples
    --------
    >>> rows = [{"stage": "sobel", "size": "32x40x4", "backend": "plain", "median_s": 0.004},
    ...         {"stage": "sobel", "size": "32x40x4", "backend": "numpy", "median_s": 0.001}]
    >>> lines = markdown_table(rows).splitlines()
    >>> len(lines), lines[0].split("|")[1].strip(), lines[3].split("|")[9].strip()  # numpy 4x faster than plain
    (4, 'stage', '4.0x')
    """
    body = [_cells(row) for row in _grouped(rows)]
    widths = [max(len(c) for c in column) for column in zip(COLUMNS, *body, strict=True)]
    numeric = range(3, 10)

    def line(cells):
        return "| " + " | ".join(c.rjust(w) if i in numeric else c.ljust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths, strict=True))) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" if i in numeric else "-" * (w + 2) for i, w in enumerate(widths)) + "|"
    return "\n".join([line(COLUMNS), rule] + [line(cells) for cells in body])


def case_lines(rows) -> list[str]:
    """For stages timed on several cases: each case's times and ratio, then the ratio of the means.

    Examples
    --------
    >>> rows = [{"stage": "refine", "size": "s", "case": case, "backend": backend, "median_s": seconds}
    ...         for case, backend, seconds in [(0, "plain", 4.0), (0, "numpy", 1.0),
    ...                                         (1, "plain", 6.0), (1, "numpy", 2.0)]]
    >>> for line in case_lines(rows):
    ...     print(line)
    refine at s, numpy against the plain way:
      case 0: numpy 1.00 s, plain 4.00 s = 4.0x
      case 1: numpy 2.00 s, plain 6.00 s = 3.0x
      mean over 2 cases: numpy 1.50 s, plain 5.00 s = 3.3x
    """
    lines, by_key = [], {}
    for row in rows:
        if row.get("case") is not None and row.get("median_s"):
            by_key.setdefault((row["stage"], row["size"]), {}).setdefault(row["case"], {})[row["backend"]] = row
    for (stage, size), cases in by_key.items():
        if len(cases) < 2:
            continue
        for backend in ("numpy", "cupy"):
            pairs = {case: (r[backend]["median_s"], r["plain"]["median_s"]) for case, r in sorted(cases.items())
                     if backend in r and "plain" in r}
            if not pairs:
                continue
            lines.append(f"{stage} at {size}, {backend} against the plain way:")
            lines += [f"  case {case}: {backend} {ours:.2f} s, plain {theirs:.2f} s = {theirs / ours:.1f}x"
                      for case, (ours, theirs) in pairs.items()]
            ours, theirs = (statistics.fmean(v) for v in zip(*pairs.values(), strict=True))
            lines.append(f"  mean over {len(pairs)} cases: {backend} {ours:.2f} s, plain {theirs:.2f} s = "
                         f"{theirs / ours:.1f}x")
    return lines


NOTES = """\
time: median of the timed rounds (several cases: the mean of their medians), each ending with a device
synchronisation; warm-up: the first call, timed alone; h2d: the host-to-device copy of the stage's inputs.
throughput: the model's bytes (read + write) or flops (gram: 2 N L^2, the GEMM count) per second; % of peak:
of the same run's measured copy bandwidth or GEMM rate (float32 for ggrad_gpu's Gram, float64 for the plain one).
vs plain: the plain way's time over this row's (per-band scipy.ndimage loops, scipy.optimize.nnls on the
explicit A, SimpleITK); check: relative difference from the plain way's result, or the TRE of the found
transform in pixels."""
