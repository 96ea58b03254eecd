"""``ggrad bench``: each stage of the method timed on NumPy or CuPy, against the machine's own limits.

A *stage* is one public function timed on stored inputs:

========= ============================================ ==================
stage     ggrad_gpu call                               model
========= ============================================ ==================
sobel     ``sobel_magnitude(cube)``                    read + write
pyramid   ``gaussian_pyramid(cube, 4)``                read + write/level
gram      ``estimate.level_gram(cube, target)``        2 N L^2 flops
nnls      ``nnls_gram(gram, rhs)``                     time
combine   ``estimate.combine_bands(cube, x)``          read + write
warp      ``warp_cube(cube, matrix, shape)``           read + write
register  ``register_affine(grad_x, moved grad_y)``    time
estimate  ``estimate_global_gradient(guide, cube)``    time
refine    ``refine(guide, native cube, initial=...)``  time
========= ============================================ ==================

Sizes are ``rows x cols x bands`` (DESIGN "Grids"): "estimate at 350 x 415 x
1000" is a 350 x 415 x 1000 cube on the guide's grid
(``make_phantom(...).cube_on_guide``); "refine at 350 x 415 x 1000" is a
350 x 415 guide with the native 70 x 83 x 1000 cube.

Protocol, the same on every backend (:func:`measure`): the stage's inputs are
put on the device first and that copy is timed alone (``h2d_s``); the first
call is timed alone (``warmup_s``: CUDA compilation, memory pool growth, page
faults); then each timed round is ``call(); sync()``, the device
synchronised inside the timed call. Rates are quoted against the machine's
limits measured in the same run (:func:`machine`): its copy bandwidth and
GEMM rates, the floors a stage's time is compared with.

The plain way of each stage (per-band ``scipy.ndimage`` loops,
``scipy.optimize.nnls`` on the explicit matrix, SimpleITK for the
registration) is the repository's ``benchmarks/reference.py``, not part of
the package: it plugs in through ``build(..., reference=)`` and
``run(..., reference=)``, for the pytest-benchmark suites of ``benchmarks/``.

Examples
--------
>>> from ggrad_gpu.cli import bench
>>> bench.parse_sizes("tiny,350x415x200")
[(64, 80, 16), (350, 415, 200)]
"""

from __future__ import annotations

import functools
import math
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import scipy
import scipy.ndimage as ndi

from .._backend import resolve_backend, to_device, to_host
from .._threads import usable_cores
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
    "LEVELS", "NO_REFERENCE", "PAPER", "SIZES", "STAGES", "Case", "Data", "backends_for", "build", "case_lines",
    "draw_cases", "machine", "machine_lines", "markdown_table", "measure", "parse_sizes", "parse_stages",
    "result_matrix", "rows_from_pytest_benchmark", "run", "tre_facts",
]

LEVELS = 4
PAPER = (350, 415, 1000)
SIZES = {
    "tiny": ((64, 80, 16),),
    "small": ((350, 415, 200),),
    "paper": (PAPER,),
    "large": ((1024, 1024, 512), (2048, 2048, 256)),
}
PLAIN_ROUNDS = 1  # a reference (the plain way) takes seconds to minutes a call ...
# ... but one whose warm-up took less than this gets as many rounds as ggrad_gpu's call: one round of
# a 0.6 s plain Sobel moved its ratio by 20 % from run to run (benchmarks.check flagged that as a drop).
PLAIN_QUICK_S = 2.0
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
    >>> gram.shape, rhs.shape
    ((4, 4), (4,))
    """

    def __init__(self, shape, case: int = 0):
        self.shape, self.case = tuple(int(n) for n in shape), int(case)
        self.size = "x".join(map(str, self.shape))
        self.plain_results: dict = {}  # stage -> a reference's result, for the agreement checks

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
    ``arrays`` put on backend ``xp``); ``plain()`` a reference's way on the
    host, set by :func:`build`'s ``reference`` (None, with ``no_plain``
    saying why, where there is none).
    ``bytes_moved`` or ``flops`` is the performance model's count, ``peak``
    and ``plain_peak`` the machine limit each is a fraction of.
    ``compare(ours, plain)`` is their relative difference (``tolerance``:
    what the tests accept); ``describe(result)`` adds facts about a result.

    Examples
    --------
    >>> case = build("sobel", Data((32, 40, 4)))
    >>> case.stage, case.size, case.bytes_moved == 2 * 32 * 40 * 4 * 4  # float32 cube read and written
    ('sobel', '32x40x4', True)
    >>> case.call(case.arrays, np).shape, case.plain is None
    ((32, 40, 4), True)
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


def _sobel(data):
    cube = data.cube
    return dict(call=lambda a, xp: sobel_magnitude(a["cube"]), arrays={"cube": cube},
                bytes_moved=2 * cube.nbytes, peak="bandwidth")


def _pyramid_bytes(shape) -> int:
    rows, cols, bands = shape
    total = 0
    for _ in range(1, LEVELS):  # each level reads the one before and writes itself
        total += 4 * bands * (rows * cols + ((rows + 1) // 2) * ((cols + 1) // 2))
        rows, cols = (rows + 1) // 2, (cols + 1) // 2
    return total


def _pyramid(data):
    cube = data.cube
    return dict(call=lambda a, xp: gaussian_pyramid(a["cube"], LEVELS), arrays={"cube": cube},
                bytes_moved=_pyramid_bytes(cube.shape), peak="bandwidth")


def _gram(data):
    cube, target = data.cube, data.target
    rows, cols, bands = cube.shape
    return dict(call=lambda a, xp: level_gram(a["cube"], a["target"]), arrays={"cube": cube, "target": target},
                flops=2 * rows * cols * bands**2, peak="float32")


def _nnls(data):
    gram, rhs = data.gram
    return dict(call=lambda a, xp: nnls_gram(a["gram"], a["rhs"]), arrays={"gram": gram, "rhs": rhs},
                describe=lambda x: {"active_bands": int((to_host(x) > 0).sum())})


def _combine(data):
    cube, x = data.cube, data.weights
    return dict(call=lambda a, xp: combine_bands(a["cube"], x), arrays={"cube": cube},
                # band-last: reading the active bands touches every cache line of the cube
                bytes_moved=cube.nbytes + 4 * cube.shape[0] * cube.shape[1], peak="bandwidth")


def _warp(data):
    cube, matrix = data.cube, data.truth
    return dict(call=lambda a, xp: warp_cube(a["cube"], matrix, cube.shape[:2], order=1), arrays={"cube": cube},
                bytes_moved=2 * cube.nbytes, peak="bandwidth")


def tre_facts(matrix, truth, shape) -> dict:
    """``tre_px`` and ``tre_max_px`` of ``matrix`` against ``truth`` (a row's facts).

    Examples
    --------
    >>> tre_facts(np.eye(3), np.eye(3), (10, 10))
    {'tre_px': 0.0, 'tre_max_px': 0.0}
    """
    tre = target_registration_error(np.asarray(matrix), truth, shape)
    return {"tre_px": float(tre.mean), "tre_max_px": float(tre.max)}


def result_matrix(result):
    """The matrix of a result: the array itself, or its ``matrix``.

    Examples
    --------
    >>> result_matrix(np.eye(3)).shape
    (3, 3)
    """
    return result if isinstance(result, np.ndarray) else result.matrix


def _register(data):
    fixed, moving = data.gradients
    return dict(call=lambda a, xp: register_affine(a["fixed"], a["moving"]),
                arrays={"fixed": fixed, "moving": moving},
                describe=lambda out: tre_facts(result_matrix(out), data.truth, fixed.shape))


def _estimate(data):
    guide, cube = data.guide, data.cube

    def describe(out):
        weights = out["channel_weights"] if isinstance(out, dict) else out.channel_weights
        return {"active_bands": (np.asarray(weights) > 0).sum(axis=1).tolist()}

    return dict(call=lambda a, xp: estimate_global_gradient(a["guide"], a["cube"], levels=LEVELS),
                arrays={"guide": guide, "cube": cube}, describe=describe)


def _refine(data):
    phantom = data.refine_phantom

    def call(a, xp):
        with warnings.catch_warnings():  # a kept initial transform warns; describe() reports it
            warnings.simplefilter("ignore", UserWarning)
            return refine(a["guide"], a["cube"], initial=phantom.initial, backend=xp.__name__)

    def describe(out):
        facts = tre_facts(out.matrix, phantom.matrix, phantom.guide.shape)
        if hasattr(out, "improved"):
            facts["improved"] = bool(out.improved)
        return facts

    return dict(call=call, arrays={"guide": phantom.guide, "cube": phantom.cube}, describe=describe)


@dataclass(frozen=True)
class Stage:
    """A benchmarked stage: its name, its title in tables, and how to build its :class:`Case` from :class:`Data`.

    Examples
    --------
    >>> stage = STAGES["warp"]
    >>> stage.name, stage.title
    ('warp', 'warp_cube, bilinear')
    >>> sorted(stage.build(Data((32, 40, 4)))["arrays"])
    ['cube']
    """

    name: str
    title: str
    build: Callable[[Data], dict]


STAGES = {stage.name: stage for stage in (
    Stage("sobel", "Sobel magnitude, all bands", _sobel),
    Stage("pyramid", f"Gaussian pyramid, {LEVELS} levels", _pyramid),
    Stage("gram", "Sobel + Gram A^T A, A^T b (level 0)", _gram),
    Stage("nnls", "NNLS on the level-0 Gram", _nnls),
    Stage("combine", "gradG = A x over the active bands", _combine),
    Stage("warp", "warp_cube, bilinear", _warp),
    Stage("register", "affine registration of grad_y to grad_x", _register),
    Stage("estimate", f"estimate_global_gradient, {LEVELS} levels", _estimate),
    Stage("refine", "refine, native cube 5x coarser", _refine),
)}

NO_REFERENCE = "the plain way is the repository's benchmarks/reference.py"


def build(stage: str, data: Data, reference=None) -> Case:
    """The :class:`Case` of ``stage`` on ``data``; with ``reference``, the plain way too.

    ``reference(stage, data) -> dict`` of :class:`Case` fields (``plain``,
    ``no_plain``, ``plain_peak``, ``compare``, ``tolerance``): the repository's
    ``benchmarks/reference.py`` holds the plain way, which is no part of the
    package.

    Examples
    --------
    >>> case = build("nnls", Data((32, 40, 4)))
    >>> x = case.call(case.arrays, np)
    >>> case.plain is None, case.no_plain == NO_REFERENCE
    (True, True)
    """
    case = Case(stage=stage, size=data.size, case=data.case if stage == "refine" else None,
                **STAGES[stage].build(data))
    if reference is None:
        case.no_plain = NO_REFERENCE
    else:
        for name, value in reference(stage, data).items():
            setattr(case, name, value)
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
    if backend == "plain" and warmup_s is not None and warmup_s < PLAIN_QUICK_S:
        rounds = repeat
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
        return {"device": f"CPU {model}, {usable_cores()} cores", "versions": f"Python {platform.python_version()}, "
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


# --------------------------------------------------------------------------- running and tables


def run(sizes, backends, stages, *, repeat: int = 3, reference=None, progress=None) -> dict:
    """Every stage at every size on every backend (with ``reference``, its plain way first); rows and machines.

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
    >>> [(row["stage"], row["backend"]) for row in result["rows"]], sorted(result["machines"])
    ([('sobel', 'numpy')], ['numpy'])
    """
    if repeat < 1:
        raise ValueError(f"repeat must be at least 1; got {repeat}")
    say = progress or (lambda line: None)
    quick = max(math.prod(shape) for shape in sizes) * 4 < (64 << 20)
    rows, skipped, machines = [], [], {}
    for shape in sizes:
        data = Data(shape)
        for stage in stages:
            case = build(stage, data, reference)
            runs = list(backends)
            if reference is not None and case.plain is not None:
                runs.insert(0, "plain")
            elif reference is not None:
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
vs plain: the plain way's time over this row's, where a run has it (benchmarks/reference.py: per-band
scipy.ndimage loops, scipy.optimize.nnls on the explicit A, SimpleITK); check: relative difference from the
plain way's result, or the TRE of the found transform in pixels."""
