"""Out-of-memory handling: chunked stages retry with smaller chunks, errors name the stage.

On the CPU an out-of-memory error is simulated: ``numpy.empty`` (which the
stages allocate their blocks with) is patched to refuse large allocations, or
a chunk function is wrapped to fail above a size. The errors raised are
NumPy's ``MemoryError`` and stand-ins for CuPy's exception classes (same names
and module paths), so the CuPy branches run without CuPy. The ``gpu`` test
exhausts a real CuPy memory-pool limit.
"""

import sys
from types import SimpleNamespace

import numpy as np
import pytest

from ggrad_gpu import _backend, estimate, filters, pyramid, warp
from ggrad_gpu import estimate_global_gradient, gaussian_pyramid, sobel_magnitude, warp_cube
from ggrad_gpu._backend import cupy_usable, is_cuda_error, is_out_of_memory, retry_smaller
from ggrad_gpu.filters import iter_sobel_blocks
from ggrad_gpu.nnls import GramAccumulator
from ggrad_gpu.pyramid import blur_decimate


def cupy_exception(name, module, base=Exception):
    """An exception class that looks like CuPy's ``module.name``, without CuPy."""
    cls = type(name, (base,), {})
    cls.__module__ = module
    return cls


CupyOutOfMemory = cupy_exception("OutOfMemoryError", "cupy.cuda.memory")  # not a MemoryError here
CUDARuntimeError = cupy_exception("CUDARuntimeError", "cupy_backends.cuda.api.runtime", RuntimeError)
CUBLASError = cupy_exception("CUBLASError", "cupy_backends.cuda.libs.cublas", RuntimeError)
CUSOLVERError = cupy_exception("CUSOLVERError", "cupy_backends.cuda.libs.cusolver", RuntimeError)

OOM_ERRORS = {
    "numpy": lambda: MemoryError("simulated: unable to allocate"),
    "cupy-pool": lambda: CupyOutOfMemory("Out of memory allocating 1,024 bytes (allocated so far: 0 bytes)."),
    "cuda-runtime": lambda: CUDARuntimeError("cudaErrorMemoryAllocation: out of memory"),
    "cublas": lambda: CUBLASError("CUBLAS_STATUS_ALLOC_FAILED"),
}


class LimitedEmpty:
    """``numpy.empty`` that refuses allocations above ``limit`` bytes.

    Shapes in ``allowed`` (a stage's whole output, which no chunking can
    shrink) are always granted. ``refused`` counts the refusals.
    """

    def __init__(self, limit, allowed=(), error=OOM_ERRORS["numpy"]):
        self.limit, self.allowed, self.error = limit, {tuple(s) for s in allowed}, error
        self.refused = 0
        self.original = np.empty

    def __call__(self, shape, dtype=float, *args, **kwargs):
        shape_tuple = (shape,) if np.isscalar(shape) else tuple(shape)
        nbytes = int(np.prod(shape_tuple, dtype=np.int64)) * np.dtype(dtype).itemsize
        if nbytes > self.limit and shape_tuple not in self.allowed:
            self.refused += 1
            raise self.error()
        return self.original(shape, dtype, *args, **kwargs)


def random_cube(shape, seed=0):
    return np.random.default_rng(seed).random(shape).astype(np.float32)


AFFINE = np.array([[0.93, 0.05, 1.7], [-0.04, 0.88, 2.3], [0, 0, 1]])


# --- recognising errors ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(OOM_ERRORS))
def test_out_of_memory_errors_are_recognised(kind):
    assert is_out_of_memory(OOM_ERRORS[kind]())


def test_other_errors_are_not_out_of_memory():
    assert not is_out_of_memory(CUDARuntimeError("cudaErrorIllegalAddress: an illegal memory access"))
    assert not is_out_of_memory(CUBLASError("CUBLAS_STATUS_EXECUTION_FAILED"))
    assert not is_out_of_memory(ValueError("out of memory"))  # not from CUDA
    assert is_out_of_memory(CUSOLVERError("CUSOLVER_STATUS_ALLOC_FAILED"))
    assert is_cuda_error(CUBLASError("x")) and is_cuda_error(CupyOutOfMemory("x"))
    assert not is_cuda_error(MemoryError()) and not is_cuda_error(RuntimeError("CUDA"))


# --- retry_smaller -----------------------------------------------------------------------------


def test_retry_smaller_halves_until_it_fits():
    tried = []

    def run(size):
        tried.append(size)
        if size > 10:
            raise CUBLASError("CUBLAS_STATUS_ALLOC_FAILED")
        return "done"

    assert retry_smaller(run, 100, stage="demo") == ("done", 6)
    assert tried == [100, 50, 25, 12, 6]


def test_retry_smaller_gives_up_at_the_minimum_naming_the_stage():
    tried = []

    def run(size):
        tried.append(size)
        raise CupyOutOfMemory("Out of memory allocating 512 bytes")

    with pytest.raises(MemoryError, match=r"out of memory in demo stage, even with chunks of 4 rows") as info:
        retry_smaller(run, 37, stage="demo stage", minimum=4, unit="rows")
    assert tried == [37, 18, 9, 4]
    assert isinstance(info.value.__cause__, CupyOutOfMemory)
    with pytest.raises(MemoryError, match="even with chunks of 1 row "):
        retry_smaller(run, 1, stage="demo", unit="rows")


def test_retry_smaller_names_the_stage_in_other_cuda_errors():
    error = CUDARuntimeError("cudaErrorIllegalAddress: an illegal memory access was encountered")

    def run(size):
        raise error

    with pytest.raises(RuntimeError, match="CUDA error in demo: CUDARuntimeError: cudaErrorIllegalAddress") as info:
        retry_smaller(run, 8, stage="demo")
    assert info.value.__cause__ is error


def test_retry_smaller_lets_other_errors_through_unchanged():
    def run(size):
        raise ValueError("bad input")

    with pytest.raises(ValueError, match="bad input"):
        retry_smaller(run, 8, stage="demo")


def test_retry_frees_the_cupy_pool_when_cupy_is_loaded(monkeypatch):
    class Pool:
        freed = 0

        def free_all_blocks(self):
            Pool.freed += 1

    class FakeCupy:
        ndarray = type("ndarray", (), {})

        @staticmethod
        def get_default_memory_pool():
            return Pool()

    monkeypatch.setitem(sys.modules, "cupy", FakeCupy)
    sizes = iter([MemoryError(), MemoryError(), None])

    def run(size):
        error = next(sizes)
        if error is not None:
            raise error
        return size

    assert retry_smaller(run, 16, stage="demo") == (4, 4)
    assert Pool.freed == 2


# --- stages under a simulated memory limit -----------------------------------------------------


@pytest.mark.parametrize("order", [1, 3])
@pytest.mark.parametrize("kind", sorted(OOM_ERRORS))
def test_warp_completes_in_smaller_chunks_with_the_same_result(monkeypatch, order, kind):
    cube = random_cube((20, 24, 6), seed=1)
    cube[3, 4, 2] = np.nan
    shape = (30, 26)
    whole = warp_cube(cube, AFFINE, shape, order=order)
    # The whole output is granted; the cubic prefilter's coefficients fit for
    # one band only, and blocks of pixels hold at most 64 pixels' taps.
    limit = LimitedEmpty(2000, allowed=[shape + (6,)], error=OOM_ERRORS[kind])
    if order == 3:
        limit.limit = (20 + 24) * (24 + 24) * 4  # the padded coefficients of one band
    monkeypatch.setattr(np, "empty", limit)
    chunked = warp_cube(cube, AFFINE, shape, order=order)
    monkeypatch.undo()
    assert limit.refused > 0
    np.testing.assert_array_equal(chunked, whole)


def test_warp_halves_pixel_blocks_then_band_chunks(monkeypatch):
    cube = random_cube((15, 17, 8), seed=2)
    shape = (21, 19)
    whole = warp_cube(cube, AFFINE, shape, order=3)
    blocks, chunks = [], []
    call, init = warp._Sampler.__call__, warp._Sampler.__init__

    def limited_init(self, values, *args):
        chunks.append(values.shape[2])
        if values.shape[2] > 3:
            raise CupyOutOfMemory("chunk set-up")
        init(self, values, *args)

    def limited_call(self, q_rows, q_cols, outside, out):
        blocks.append(q_rows.shape[0])
        if q_rows.shape[0] > 50:
            raise CUDARuntimeError("cudaErrorMemoryAllocation: out of memory")
        call(self, q_rows, q_cols, outside, out)

    monkeypatch.setattr(warp._Sampler, "__init__", limited_init)
    monkeypatch.setattr(warp._Sampler, "__call__", limited_call)
    chunked = warp_cube(cube, AFFINE, shape, order=3)
    np.testing.assert_array_equal(chunked, whole)
    assert chunks[:3] == [8, 4, 2] and max(chunks[3:]) <= 2
    assert max(blocks) > 50 and max(blocks[-10:]) <= 50  # later blocks keep the size that fitted


def test_warp_out_of_memory_even_at_one_band_names_the_stage(monkeypatch):
    cube = random_cube((10, 12, 3))
    monkeypatch.setattr(np, "empty", LimitedEmpty(0, allowed=[(9, 11, 3)]))
    with pytest.raises(MemoryError, match=r"out of memory in warp_cube, even with chunks of 1 band "):
        warp_cube(cube, AFFINE, (9, 11), order=3)


def test_warp_cuda_error_names_the_stage(monkeypatch):
    def failing_call(self, *args, **kwargs):
        raise CUDARuntimeError("cudaErrorLaunchFailure: unspecified launch failure")

    monkeypatch.setattr(warp._Sampler, "__call__", failing_call)
    with pytest.raises(RuntimeError, match="CUDA error in warp_cube: CUDARuntimeError: cudaErrorLaunchFailure"):
        warp_cube(random_cube((6, 7, 2)), np.eye(3), (5, 5))


@pytest.mark.parametrize("kind", ["numpy", "cupy-pool"])
def test_sobel_completes_in_smaller_blocks_with_the_same_result(monkeypatch, kind):
    cube = random_cube((33, 20, 5), seed=3)
    whole = sobel_magnitude(cube)
    # The output is granted; the workspace fits for 3 rows at most (1 halo row
    # on each side): 33 rows -> 16 -> 8 -> 4 -> 2.
    limit = LimitedEmpty(5 * 22 * 5 * 4, allowed=[cube.shape], error=OOM_ERRORS[kind])
    monkeypatch.setattr(np, "empty", limit)
    blocked = sobel_magnitude(cube)
    monkeypatch.undo()
    assert limit.refused > 0
    np.testing.assert_array_equal(blocked, whole)


def test_sobel_blocks_keep_their_rows_when_a_pass_runs_out_of_memory(monkeypatch):
    cube = random_cube((40, 11, 4), seed=4)
    expected = [(start, stop, block.copy()) for start, stop, block in iter_sobel_blocks(cube, rows=16)]
    sobel = filters._Workspace.sobel
    passes = []

    def limited_sobel(self, x, start, stop, bands, out):
        passes.append(stop - start)
        if stop - start > 3:
            raise MemoryError("simulated")
        sobel(self, x, start, stop, bands, out)

    monkeypatch.setattr(filters._Workspace, "sobel", limited_sobel)
    got = [(start, stop, block.copy()) for start, stop, block in iter_sobel_blocks(cube, rows=16)]
    assert [g[:2] for g in got] == [e[:2] for e in expected]  # the yielded blocks did not change
    for (_, _, block), (_, _, reference) in zip(got, expected):
        np.testing.assert_array_equal(block, reference)
    assert max(passes) == 16 and passes[-1] <= 3


def test_sobel_out_of_memory_even_at_one_row_names_the_stage(monkeypatch):
    image = random_cube((12, 9))
    monkeypatch.setattr(np, "empty", LimitedEmpty(0, allowed=[image.shape]))
    with pytest.raises(MemoryError, match=r"out of memory in Sobel gradients, even with chunks of 1 row "):
        sobel_magnitude(image)


def _gram_inputs(seed=5):
    cube = random_cube((48, 30, 12), seed=seed)
    target = sobel_magnitude(random_cube((48, 30), seed=seed + 1))
    mask = np.ones(cube.shape[:2], bool)
    mask[:5, :7] = False
    return cube, target, mask


@pytest.mark.parametrize("masked", [False, True])
def test_gram_under_a_memory_limit_equals_the_run_with_those_blocks(monkeypatch, masked):
    cube, target, mask = _gram_inputs()
    mask = mask if masked else None
    default = estimate.level_gram(cube, target, mask)
    seen = []

    def recording_blocks(*args, **kwargs):
        for start, stop, block in iter_sobel_blocks(*args, **kwargs):
            seen.append(stop - start)
            yield start, stop, block

    # The padded Sobel workspace fits for 6 rows, not 12: 48 rows -> 24 -> 12 -> 6.
    limit = LimitedEmpty(10 * 30 * 12 * 4)
    monkeypatch.setattr(np, "empty", limit)
    monkeypatch.setattr(estimate, "iter_sobel_blocks", recording_blocks)
    gram, rhs = estimate.level_gram(cube, target, mask)
    monkeypatch.undo()
    assert limit.refused > 0 and set(seen) == {6}
    reference = estimate.level_gram(cube, target, mask, rows=6)
    # Bit for bit the result of 6-row blocks; the Gram sums depend on the
    # blocks in their last bits only.
    np.testing.assert_array_equal(gram, reference[0])
    np.testing.assert_array_equal(rhs, reference[1])
    np.testing.assert_allclose(gram, default[0], rtol=1e-5)
    np.testing.assert_allclose(rhs, default[1], rtol=1e-5)


def test_gram_restarts_the_level_when_the_products_run_out_of_memory(monkeypatch):
    cube, target, mask = _gram_inputs(seed=6)
    add = GramAccumulator.add

    def limited_add(self, columns, target, weights=None):
        if columns.shape[0] > 16:  # rows of the block
            raise CUBLASError("CUBLAS_STATUS_ALLOC_FAILED")
        add(self, columns, target, weights)

    monkeypatch.setattr(GramAccumulator, "add", limited_add)
    gram, rhs = estimate.level_gram(cube, target, mask)
    monkeypatch.undo()
    reference = estimate.level_gram(cube, target, mask, rows=12)  # 48 -> 24 -> 12
    np.testing.assert_array_equal(gram, reference[0])
    np.testing.assert_array_equal(rhs, reference[1])


def test_estimate_out_of_memory_names_the_gram_stage(monkeypatch, small_phantom):
    def failing_add(self, *args, **kwargs):
        raise CupyOutOfMemory("Out of memory allocating 4,096 bytes")

    monkeypatch.setattr(GramAccumulator, "add", failing_add)
    with pytest.raises(MemoryError, match=r"out of memory in Gram matrices \(eq. 5\), even with chunks of 1 row "):
        estimate_global_gradient(small_phantom.guide, small_phantom.cube_on_guide, levels=2)


def test_estimate_cuda_error_names_the_stage(monkeypatch, small_phantom):
    def failing_add(self, *args, **kwargs):
        raise CUBLASError("CUBLAS_STATUS_EXECUTION_FAILED")

    monkeypatch.setattr(GramAccumulator, "add", failing_add)
    with pytest.raises(RuntimeError, match=r"CUDA error in Gram matrices \(eq. 5\): CUBLASError"):
        estimate_global_gradient(small_phantom.guide, small_phantom.cube_on_guide, levels=2)


def test_estimate_under_a_memory_limit_completes(monkeypatch, small_phantom):
    guide, cube = small_phantom.guide, small_phantom.cube_on_guide
    default = estimate_global_gradient(guide, cube, levels=3)
    # Grant the stages' whole outputs (pyramid levels, images); refuse any
    # other allocation beyond an eighth of the cube.
    level_shapes = [level.shape for level in gaussian_pyramid(cube, 3)]
    limit = LimitedEmpty(cube.nbytes // 8, allowed=level_shapes + [(3,) + guide.shape])
    monkeypatch.setattr(np, "empty", limit)
    result = estimate_global_gradient(guide, cube, levels=3)
    monkeypatch.undo()
    assert limit.refused > 0
    # Smaller Gram blocks round differently in float32; the NNLS weights of
    # correlated bands move by about 1e-5, the global gradient far less.
    np.testing.assert_allclose(result.channel_weights, default.channel_weights, atol=1e-4)
    np.testing.assert_allclose(result.grad_y, default.grad_y, atol=1e-4 * float(np.abs(default.grad_y).max()))


def test_pyramid_completes_in_smaller_blocks(monkeypatch):
    cube = random_cube((37, 29, 6), seed=7)
    default = blur_decimate(cube)
    out_shape = (19, 15, 6)
    # One row of the row pass (29 x 6 values) fits, two do not.
    limit = LimitedEmpty(29 * 6 * 4, allowed=[out_shape], error=OOM_ERRORS["cupy-pool"])
    monkeypatch.setattr(np, "empty", limit)
    blocked = blur_decimate(cube)
    monkeypatch.undo()
    assert limit.refused > 0
    np.testing.assert_array_equal(blocked, blur_decimate(cube, rows=1))
    np.testing.assert_allclose(blocked, default, rtol=1e-6, atol=1e-7)


def test_pyramid_errors_name_the_stage(monkeypatch):
    cube = random_cube((20, 18, 3))
    monkeypatch.setattr(np, "empty", LimitedEmpty(0, allowed=[(10, 9, 3)]))
    with pytest.raises(MemoryError, match=r"out of memory in Gaussian pyramid, even with chunks of 1 row "):
        gaussian_pyramid(cube, 2)
    monkeypatch.undo()

    def failing_apply(self, *args, **kwargs):
        raise CUBLASError("CUBLAS_STATUS_EXECUTION_FAILED")

    monkeypatch.setattr(pyramid._BandedDecimation, "apply", failing_apply)
    with pytest.raises(RuntimeError, match="CUDA error in Gaussian pyramid: CUBLASError"):
        gaussian_pyramid(cube, 2)


def fake_cupy_module(free, pool_free=0, pool_used=0, limit=0):
    """Just what the block budget reads from CuPy: memGetInfo and the pool's statistics."""
    pool = SimpleNamespace(
        free_bytes=lambda: pool_free, used_bytes=lambda: pool_used, get_limit=lambda: limit
    )
    runtime = SimpleNamespace(memGetInfo=lambda: (free, 80 << 30))
    return SimpleNamespace(cuda=SimpleNamespace(runtime=runtime), get_default_memory_pool=lambda: pool)


def test_gpu_block_budget_follows_the_available_device_memory():
    budget = _backend.default_block_bytes
    assert budget(fake_cupy_module(free=70 << 30)) == 256 << 20
    assert budget(fake_cupy_module(free=1 << 30)) == (1 << 30) // 16
    assert budget(fake_cupy_module(free=1 << 30, pool_free=1 << 30)) == (2 << 30) // 16  # cached blocks count
    assert budget(fake_cupy_module(free=70 << 30, pool_used=1 << 30, limit=(1 << 30) + (64 << 20))) == 4 << 20
    assert budget(fake_cupy_module(free=0)) == 1 << 20  # never below 1 MiB
    assert budget(SimpleNamespace()) == 256 << 20  # statistics unavailable


# --- on a device -------------------------------------------------------------------------------


@pytest.mark.gpu
def test_warp_completes_under_a_small_cupy_memory_limit(monkeypatch):
    usable, reason = cupy_usable()
    if not usable:
        pytest.skip(reason)
    import cupy

    rng = np.random.default_rng(9)
    host_cube = rng.random((96, 104, 64)).astype(np.float32)
    shape = (120, 130)
    cube = cupy.asarray(host_cube)
    expected = warp_cube(cube, AFFINE, shape, order=3).get()  # without a limit
    retries = []
    free = _backend.free_device_memory
    monkeypatch.setattr(_backend, "free_device_memory", lambda: (retries.append(1), free()))
    pool = cupy.get_default_memory_pool()
    cupy.cuda.Device().synchronize()
    pool.free_all_blocks()
    out_bytes = shape[0] * shape[1] * host_cube.shape[2] * 4
    coefficients = (96 + 24) * (104 + 24) * 64 * 4  # the cubic prefilter of all bands at once
    previous = pool.get_limit()
    # Room for the cube and the output, and half the coefficients of one chunk of all bands.
    pool.set_limit(size=pool.used_bytes() + out_bytes + coefficients // 2)
    try:
        got = warp_cube(cube, AFFINE, shape, order=3)
        cupy.cuda.Device().synchronize()
    finally:
        pool.set_limit(size=previous)
    assert isinstance(got, cupy.ndarray)
    assert retries, "the limit was never reached"
    np.testing.assert_array_equal(got.get(), expected)
