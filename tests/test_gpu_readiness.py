"""The CuPy path right by construction, checked on the CPU (and on a device where there is one).

What a GPU pays for that a CPU hardly notices, made countable without one:

- **Launches and syncs.** A stand-in ``cupy`` (``counting_namespace.py``: NumPy
  underneath, its arrays a NumPy subclass that the backend layer takes for
  CuPy's) logs every operation and every read to the host. The Gauss-Newton
  loop reads once per evaluation; the pyramid's operations do not grow with
  the image's rows.
- **dtypes.** float32 inputs stay float32 through estimation, the
  registration's sampling and the warp: no float64 array of the data's size
  is made except where the design says (the registration's float64 sums, the
  spline coefficients of the upsampling, per-point coordinates).
- **Memory.** ``refine``'s peak with missing data and with many bands, and
  every stage that allocates in proportion to the cube running through the
  out-of-memory retry under a small block budget.
- **Backend choice.** ``cupy_usable`` runs a kernel and a matrix product:
  stand-ins for a broken install fall back to NumPy with a warning under
  ``"auto"`` and are an error under ``"cupy"``.

The ``gpu`` tests at the end run the same paths on a real device (skipped here).
"""

import sys
import types
import warnings

import numpy as np
import pytest
import scipy.ndimage as ndi

from ggrad_gpu import _backend, _memory, estimate_global_gradient, gaussian_pyramid, refine, register_affine
from ggrad_gpu import warp_cube
from ggrad_gpu._backend import check_cupy, cupy_usable, resolve_backend
from ggrad_gpu.core.pyramid import blur_decimate, upsample_level
from ggrad_gpu.metrics import target_registration_error
from ggrad_gpu.synthetic import make_phantom

import counting_namespace
from counting_namespace import to_stand_in
from helpers import traced

AFFINE = np.array([[0.93, 0.05, 1.7], [-0.04, 0.88, 2.3], [0, 0, 1]])
MiB = 1 << 20


@pytest.fixture
def device(monkeypatch):
    """The counting stand-in for CuPy, installed for one test."""
    return counting_namespace.install(monkeypatch)


def shifted_pair(shape=(96, 96), dtype=np.float32):
    rng = np.random.default_rng(0)
    fixed = ndi.gaussian_filter(rng.random(shape), 3)
    shift = np.array([[1, 0, 2.5], [0, 1, -1.5], [0, 0, 1]])
    moving = ndi.affine_transform(fixed, np.linalg.inv(shift), order=3, mode="nearest")
    return fixed.astype(dtype), moving.astype(dtype), shift


# --- host reads and launches ---------------------------------------------------------------------


def _evaluation_products(device):
    """Indices in ``device.events`` of the Gauss-Newton evaluations' stacked (10 x 10) products."""
    return [i for i, e in enumerate(device.events) if e.kind == "op" and e.name == "matmul" and e.shape == (10, 10)]


def test_gauss_newton_reads_from_the_device_once_per_evaluation(device):
    fixed, moving, shift = shifted_pair()
    result = register_affine(to_stand_in(fixed), to_stand_in(moving), levels=1, coarse_search=False)
    np.testing.assert_allclose(result.matrix[:2, 2], shift[:2, 2], atol=0.05)  # it did register
    products = _evaluation_products(device)
    assert len(products) >= 3, "the loop evaluated too few steps to show anything"
    for first, second in zip(products, products[1:]):
        reads = [e.name for e in device.events[first:second] if e.kind == "read"]
        assert len(reads) == 1, f"{len(reads)} host reads in one Gauss-Newton evaluation: {reads}"


@pytest.mark.parametrize("bands", [(), (5,)])
def test_pyramid_launches_do_not_grow_with_the_rows(device, bands):
    counts = {}
    for rows, cols in ((96, 80), (768, 640)):
        image = to_stand_in(np.random.default_rng(1).random((rows, cols) + bands, dtype=np.float32))
        device.clear()
        blur_decimate(image)
        step = len(device.ops())
        device.clear()
        gaussian_pyramid(image, 3)
        counts[rows] = (step, len(device.ops()), len(device.reads()))
    assert counts[96] == counts[768], counts  # (blur_decimate's ops, the pyramid's ops, host reads)
    assert counts[96][2] == 0


def test_upsampling_launches_do_not_grow_with_the_rows(device):
    counts = []
    for shape in ((96, 80), (768, 640)):
        level = to_stand_in(np.random.default_rng(2).random((shape[0] // 4, shape[1] // 4), dtype=np.float32))
        device.clear()
        upsample_level(level, 2, shape)
        counts.append((len(device.ops()), len(device.reads())))
    assert counts[0] == counts[1], counts


# --- dtypes --------------------------------------------------------------------------------------


def _float64(device, *, minimum):
    """(name, shape) of the float64 arrays of at least ``minimum`` elements made, other than into ``out=``."""
    return sorted({(e.name, e.shape) for e in device.ops()
                   if e.dtype == np.float64 and e.shape is not None and np.prod(e.shape) >= minimum and not e.out})


def test_registration_samples_in_float32(device):
    fixed, moving, _ = shifted_pair()
    register_affine(to_stand_in(fixed), to_stand_in(moving), levels=1, coarse_search=False)
    # Only the float64 scratch of the sums (10 x pixels) is allocated; the
    # products go into it (out=). Bilinear sampling, its coordinates and the
    # Jacobian stay float32.
    assert _float64(device, minimum=fixed.size) == [("empty", (10, fixed.size))]
    float32_images = [e for e in device.ops() if e.dtype == np.float32 and e.shape == fixed.shape]
    assert float32_images  # the sampling ran in float32


def test_warp_keeps_float32_spectra(device):
    cube = np.random.default_rng(3).random((40, 44, 6), dtype=np.float32)
    cube[5, 6, 2] = np.nan
    for order in (1, 3):
        device.clear()
        out = warp_cube(to_stand_in(cube), AFFINE, (36, 40), order=order)
        assert out.dtype == np.float32
        per_band = [e for e in device.ops() if e.dtype == np.float64 and e.shape and e.shape[-1] == cube.shape[2]]
        assert per_band == [], per_band  # coordinates and axis weights may be float64; spectra never


def test_estimate_keeps_float32_images(device):
    phantom = make_phantom(shape=(64, 72), bands=12, seed=1)
    guide, cube = phantom.guide.astype(np.float32), phantom.cube_on_guide.astype(np.float32)
    result = estimate_global_gradient(to_stand_in(guide), to_stand_in(cube), levels=3)
    for name in ("grad_x", "grad_y", "guide_levels", "cube_levels"):
        assert getattr(result, name).dtype == np.float32, name
    # No float64 copy of the cube or of its gradients: nothing float64 with a bands axis.
    assert not [e for e in device.ops() if e.dtype == np.float64 and e.shape and len(e.shape) == 3
                and e.shape[-1] == cube.shape[2]]


# --- memory --------------------------------------------------------------------------------------


def _with_missing_data(phantom, bands):
    cube = phantom.cube.copy()
    rng = np.random.default_rng(0)
    cube[rng.random(cube.shape[:2]) < 0.02] = np.nan  # missing spectra
    cube[rng.integers(0, cube.shape[0], 5), rng.integers(0, cube.shape[1], 5), rng.integers(0, bands, 5)] = np.nan
    mask = np.ones(cube.shape[:2], bool)
    mask[:3, :5] = False
    return cube, mask


@pytest.mark.slow
@pytest.mark.parametrize("shape, bands, multiple", [((192, 224), 64, 2.5), ((96, 112), 1024, 2.0)])
def test_refine_peak_with_missing_data_is_a_stated_multiple(shape, bands, multiple):
    # What refine holds grows with the cube on the working grid (``registered``);
    # NaN, a mask and 1024 bands add no cube-sized copy (1.96 and 1.54 x today).
    phantom = make_phantom(shape=shape, bands=bands, seed=11)
    cube, mask = _with_missing_data(phantom, bands)
    result, peak = traced(lambda: refine(phantom.guide, cube, initial=phantom.initial, levels=3, backend="numpy",
                                         mask=mask))
    assert result.improved, result.message
    registered = result.registered.nbytes
    assert peak <= multiple * registered, f"{peak / MiB:.1f} MiB for a {registered / MiB:.1f} MiB registered cube"


RETRIED = ("ggrad_gpu.core.pyramid", "ggrad_gpu.core.warp", "ggrad_gpu.core.estimate", "ggrad_gpu.core.filters",
           "ggrad_gpu.core.level_weights", "ggrad_gpu.refinement.preparation")
# Every stage whose memory grows with the cube (or the working grid), by its name in errors.
STAGES = {"Gaussian pyramid", "upsampling", "warp_cube", "Sobel gradients", "Gram matrices (eq. 5)",
          "gradient combination (gradG = A x, eq. 5)", "level weights (eq. 9)", "missing cube values",
          "valid pixels"}


@pytest.mark.slow
def test_every_cube_sized_stage_retries_under_a_small_budget(monkeypatch):
    # Each stage's first chunk fails as if out of memory, with a 256 KiB block
    # budget; refine still finishes with the same result.
    phantom = make_phantom(shape=(160, 176), bands=24, seed=5)
    cube, mask = _with_missing_data(phantom, 24)

    def run():
        return refine(phantom.guide, cube, initial=phantom.initial, levels=3, backend="numpy", mask=mask, order=3)

    expected = run()
    failed = set()
    real = _memory.retry_smaller

    def failing_first(call, size, *, stage, **kwargs):
        def attempt(size):
            if stage not in failed:
                failed.add(stage)
                raise MemoryError(f"simulated: the first chunk of {stage}")
            return call(size)

        return real(attempt, size, stage=stage, **kwargs)

    monkeypatch.setattr(_memory, "CPU_BLOCK_BYTES", 256 << 10)
    for module in RETRIED:
        monkeypatch.setattr(f"{module}.retry_smaller", failing_first)
    got = run()
    assert STAGES <= failed, f"never retried: {sorted(STAGES - failed)}"
    assert target_registration_error(got.matrix, expected.matrix, phantom.guide.shape).max < 1e-3
    np.testing.assert_allclose(got.registered, expected.registered, rtol=1e-4, atol=1e-5, equal_nan=True)
    np.testing.assert_array_equal(got.valid, expected.valid)


# --- the backend's usability check ---------------------------------------------------------------


@pytest.fixture
def fresh_usability(monkeypatch):
    """``cupy_usable``'s cache cleared before and after, so a stand-in decides it for one test."""
    cupy_usable.cache_clear()
    yield
    cupy_usable.cache_clear()


def fake_cupy(*, devices=1, kernel_error=None, wrong=False):
    """A stand-in ``cupy`` module with a device count, a kernel that may fail, and a matmul."""
    module = types.ModuleType("cupy")
    module.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=lambda: devices))

    def asarray(x):
        if kernel_error is not None:
            raise kernel_error
        return np.asarray(x) + (1 if wrong else 0)

    module.asarray = asarray
    module.asnumpy = np.asarray
    return module


BROKEN_INSTALLS = {
    "no NVRTC": RuntimeError("CUDA_ERROR_FILE_NOT_FOUND: nvrtc: libnvrtc.so.13: cannot open shared object file"),
    "no cuBLAS": ImportError("libcublas.so.13: cannot open shared object file"),
}


@pytest.mark.parametrize("broken", sorted(BROKEN_INSTALLS))
def test_a_broken_cuda_install_falls_back_under_auto_and_fails_under_cupy(monkeypatch, fresh_usability, broken):
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy(kernel_error=BROKEN_INSTALLS[broken]))
    usable, reason = cupy_usable()
    assert not usable and reason.startswith(_backend.BROKEN) and "ctk" in reason
    with pytest.warns(UserWarning, match='backend="auto" computes with NumPy: CuPy sees a CUDA device'):
        assert resolve_backend("auto") is np
    with pytest.raises(RuntimeError, match='backend="cupy" was requested but CuPy sees a CUDA device'):
        resolve_backend("cupy")


def test_wrong_numbers_from_the_device_are_not_usable(monkeypatch, fresh_usability):
    usable, reason = check_cupy(fake_cupy(wrong=True))
    assert not usable and "wrong numbers" in reason


def test_no_device_falls_back_quietly_under_auto(monkeypatch, fresh_usability):
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy(devices=0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_backend("auto") is np  # a laptop without a GPU: no warning
    with pytest.raises(RuntimeError, match="no CUDA device"):
        resolve_backend("cupy")


def test_a_working_stand_in_passes_the_checks():
    assert check_cupy(fake_cupy()) == (True, "")


def test_device_statistics_errors_propagate():
    class CUDARuntimeError(RuntimeError):
        pass

    CUDARuntimeError.__module__ = "cupy_backends.cuda.api.runtime"

    def broken():
        raise CUDARuntimeError("cudaErrorInvalidDevice: invalid device ordinal")

    xp = types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=types.SimpleNamespace(memGetInfo=broken)),
                               get_default_memory_pool=lambda: None)
    with pytest.raises(CUDARuntimeError):  # no silent guess of a budget
        _memory.default_block_bytes(xp)


def test_retries_synchronise_the_device_so_errors_stay_in_their_stage(device):
    stage_calls = []
    result, size = _memory.retry_smaller(lambda size: stage_calls.append(size) or size, 8, stage="demo", xp=device)
    assert (result, size) == (8, 8)
    assert [e.name for e in device.events if e.kind == "sync"] == ["synchronize"]


def test_device_input_with_the_numpy_backend_comes_back_on_the_device(device):
    # refine hands back arrays of the input's kind (computed on the host here).
    phantom = make_phantom(shape=(60, 70), bands=6, native_factor=2, seed=3)
    result = refine(to_stand_in(phantom.guide), to_stand_in(phantom.cube), initial=phantom.initial, levels=2,
                    backend="numpy")
    assert result.backend == "numpy"
    assert isinstance(result.registered, device.ndarray) and isinstance(result.valid, device.ndarray)
    assert isinstance(result.gradient.grad_y, device.ndarray)


STAND_IN_CASES = {
    "missing data and mask": {"missing": True},
    "order 3": {"order": 3},
    "bands first": {"band_axis": 0},
    "band_std": {"method": "band_std"},
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(STAND_IN_CASES))
def test_refine_runs_through_a_cupy_stand_in(device, fresh_usability, case):
    # backend="cupy" resolves to the stand-in (it passes the usability
    # check), so the whole pipeline computes through the CuPy code paths
    # (GPU block budgets, no CPU tiling, cupyx-named ndimage), on NumPy.
    options = dict(STAND_IN_CASES[case])
    phantom = make_phantom(shape=(120, 136), bands=12, seed=6, native_factor=3)
    cube, mask = _with_missing_data(phantom, 12) if options.pop("missing", False) else (phantom.cube, None)
    if options.get("band_axis") == 0:
        cube = np.ascontiguousarray(np.moveaxis(cube, -1, 0))
    kwargs = dict(initial=phantom.initial, levels=3, mask=mask, **options)
    expected = refine(phantom.guide, cube, backend="numpy", **kwargs)
    device.clear()
    got = refine(to_stand_in(phantom.guide), to_stand_in(cube), backend="cupy",
                 **{**kwargs, "mask": None if mask is None else to_stand_in(mask)})
    assert got.backend == "cupy" and isinstance(got.registered, device.ndarray)
    assert got.improved == expected.improved
    assert target_registration_error(got.matrix, expected.matrix, phantom.guide.shape).max < 1e-3
    np.testing.assert_allclose(got.registered.view(np.ndarray), expected.registered, rtol=1e-4, atol=1e-4,
                               equal_nan=True)
    assert device.masks() == [], "boolean indexing on the device: an index array and a sync each"


# --- on a device ---------------------------------------------------------------------------------


def _cupy():
    usable, reason = cupy_usable()
    if not usable:
        pytest.skip(reason)
    import cupy

    return cupy


@pytest.fixture
def small_gpu_budget(monkeypatch):
    """A 1 MiB block budget on the device (its floor), so that the inputs below cross block seams."""
    monkeypatch.setattr(_memory, "GPU_BLOCK_BYTES", 1 << 20)


@pytest.mark.gpu
def test_gpu_usability_and_backend_resolution():
    cupy = _cupy()
    assert check_cupy(cupy) == (True, "")
    assert resolve_backend("auto") is cupy and resolve_backend("cupy") is cupy
    available = _memory.default_block_bytes(cupy)
    assert isinstance(available, int) and available >= 1 << 20


@pytest.mark.gpu
@pytest.mark.parametrize("order", [1, 3])
def test_gpu_warp_across_block_seams(small_gpu_budget, order):
    cupy = _cupy()
    rng = np.random.default_rng(4)
    cube = rng.random((200, 180, 32), dtype=np.float32)  # 4.4 MiB: several blocks at 1 MiB
    cube[7, 9, 3] = np.nan
    expected = warp_cube(cube, AFFINE, (190, 170), order=order)
    got = warp_cube(cupy.asarray(cube), AFFINE, (190, 170), order=order)
    assert isinstance(got, cupy.ndarray) and got.dtype == np.float32
    np.testing.assert_allclose(got.get(), expected, rtol=2e-6, atol=2e-6, equal_nan=True)


@pytest.mark.gpu
def test_gpu_pyramid_and_estimate_across_block_seams(small_gpu_budget):
    cupy = _cupy()
    phantom = make_phantom(shape=(256, 288), bands=48, seed=2)  # 14 MiB cube
    cube = phantom.cube_on_guide.astype(np.float32)
    for host, device in zip(gaussian_pyramid(cube, 3), gaussian_pyramid(cupy.asarray(cube), 3)):
        np.testing.assert_allclose(device.get(), host, rtol=1e-5, atol=1e-6)
    expected = estimate_global_gradient(phantom.guide, cube, levels=3)
    got = estimate_global_gradient(cupy.asarray(phantom.guide), cupy.asarray(cube), levels=3)
    # float32 Gram products on two BLAS: the weights agree to a thousandth of the largest.
    np.testing.assert_allclose(got.channel_weights, expected.channel_weights,
                               atol=1e-3 * np.abs(expected.channel_weights).max())
    np.testing.assert_allclose(got.grad_y.get(), expected.grad_y, rtol=1e-4, atol=1e-5)


def _missing(cube):
    cube = cube.copy()
    cube[3:5, 4:6] = np.nan
    cube[10, 11, 2] = np.nan
    mask = np.ones(cube.shape[:2], bool)
    mask[-2:, :3] = False
    return cube, mask


GPU_REFINE_CASES = {
    "plain": {},
    "missing data": {"missing": True},
    "order 3": {"order": 3},
    "bands first": {"band_axis": 0},
    "band_sum": {"method": "band_sum"},
    "band_std": {"method": "band_std"},
    "pca": {"method": "pca"},
}


@pytest.mark.gpu
@pytest.mark.parametrize("case", sorted(GPU_REFINE_CASES))
def test_gpu_refine_matches_numpy(small_gpu_budget, case):
    cupy = _cupy()
    options = dict(GPU_REFINE_CASES[case])
    phantom = make_phantom(shape=(150, 170), bands=24, seed=6, native_factor=3)
    cube, mask = _missing(phantom.cube) if options.pop("missing", False) else (phantom.cube, None)
    if options.get("band_axis") == 0:
        cube = np.ascontiguousarray(np.moveaxis(cube, -1, 0))
    kwargs = dict(initial=phantom.initial, levels=3, mask=mask, **options)
    expected = refine(phantom.guide, cube, backend="numpy", **kwargs)
    device_mask = None if mask is None else cupy.asarray(mask)
    got = refine(cupy.asarray(phantom.guide), cupy.asarray(cube), backend="cupy", **{**kwargs, "mask": device_mask})
    assert got.backend == "cupy" and isinstance(got.registered, cupy.ndarray)
    assert got.improved == expected.improved
    assert target_registration_error(got.matrix, expected.matrix, phantom.guide.shape).max < 0.1
    # From NumPy input on the device: NumPy back.
    from_host = refine(phantom.guide, cube, backend="cupy", **kwargs)
    assert isinstance(from_host.registered, np.ndarray) and from_host.backend == "cupy"
