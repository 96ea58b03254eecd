"""A cube beyond memory: the chunked stages and ``refine`` on dask.array against the in-memory ones.

The references are the in-memory functions on the same data (independent of
the chunking: they see the whole array), SciPy where a stage is SciPy's, and the
phantom's known transform. Chunks are chosen to be awkward: odd sizes, chunks
smaller than the pyramid's halo, and chunks that do not divide the shape.
"""

import warnings

import numpy as np
import pytest
from scipy import ndimage

from helpers import has_module

pytestmark = pytest.mark.skipif(not has_module("dask"), reason="dask is not installed")

if has_module("dask"):
    import dask
    import dask.array as da

from ggrad_gpu import refine, sobel_magnitude, warp_cube
from ggrad_gpu._lazy.chunked import checkpoint, checkpoints, is_dask_array
from ggrad_gpu.core import denoise
from ggrad_gpu.core.coverage import fill_gaps
from ggrad_gpu.core.estimate import combine_bands, level_gram
from ggrad_gpu.core.pyramid import blur_decimate
from ggrad_gpu.metrics import ncc, target_registration_error
from ggrad_gpu.synthetic import make_phantom

CHUNKINGS = [(13, 11), (7, 5), (3, 2), (64, 64)]  # odd; smaller than the blur's halo; whole


@pytest.fixture(autouse=True)
def synchronous():
    with dask.config.set(scheduler="synchronous"):
        yield


@pytest.fixture(scope="module")
def cube():
    rng = np.random.default_rng(0)
    values = ndimage.gaussian_filter(rng.random((53, 47, 6)), (2, 2, 0)).astype(np.float32)
    return values


def _lazy(values, chunks):
    return da.from_array(values, chunks=chunks + values.shape[2:])


@pytest.mark.slow  # over 0.75 s: the fast lane stays under a minute
@pytest.mark.parametrize("chunks", CHUNKINGS)
@pytest.mark.parametrize("order", [1, 3])
def test_warp_equals_the_in_memory_warp(cube, chunks, order):
    values = cube.copy()
    values[3, 4, 1] = np.nan
    # Generic numbers: a point exactly on the footprint's edge may round to either side in a block.
    matrix = np.array([[0.9317, 0.1123, 2.3141], [-0.0913, 1.0437, -1.7719], [0, 0, 1]])
    expected = warp_cube(values, matrix, (61, 52), order=order)
    lazy = warp_cube(_lazy(values, chunks), matrix, (61, 52), order=order)
    assert is_dask_array(lazy)
    from ggrad_gpu._lazy.chunked import warp_cube_chunked

    blocks = warp_cube_chunked(_lazy(values, chunks), matrix, (61, 52), order=order, kernel=warp_cube,
                               chunks=(9, 7)).compute()
    for result in (lazy.compute(), blocks):
        np.testing.assert_array_equal(np.isnan(result), np.isnan(expected))
        # Order 3: each block prefilters its own window (16 px beyond its reach).
        np.testing.assert_allclose(result, expected, rtol=0, atol=0 if order == 1 else 1e-6)


def test_a_shrinking_warp_keeps_each_block_s_source_window_to_the_budget():
    """A coarse level reads 4 x 4 source pixels per output pixel: the blocks are 4 x smaller a side."""
    from ggrad_gpu._lazy import chunked

    values = np.random.default_rng(4).random((96, 96, 8)).astype(np.float32)
    matrix = np.diag([4.0, 4.0, 1.0])  # output pixel i reads source pixel 4 i
    lazy = chunked.warp_cube_chunked(_lazy(values, (32, 32)), matrix, (24, 24), order=1, kernel=warp_cube)
    side = chunked.spatial_chunks((24, 24, 8), 4)[0]  # the block where nothing shrinks: all 24 rows
    assert max(lazy.chunks[0]) == max(lazy.chunks[1]) == side // 4
    np.testing.assert_array_equal(lazy.compute(), warp_cube(values, matrix, (24, 24), order=1))


@pytest.mark.parametrize("chunks", CHUNKINGS)
def test_blur_decimate_equals_the_in_memory_step_and_scipy(cube, chunks):
    expected = ndimage.gaussian_filter(cube.astype(np.float64), 1.0, axes=(0, 1), mode="reflect")[::2, ::2]
    result = blur_decimate(_lazy(cube, chunks)).compute()
    np.testing.assert_allclose(result, blur_decimate(cube), rtol=0, atol=1e-6)
    np.testing.assert_allclose(result, expected, rtol=0, atol=1e-6)


@pytest.mark.slow  # over 0.75 s: the fast lane stays under a minute
@pytest.mark.parametrize("chunks", CHUNKINGS)
def test_blur_decimate_of_a_checkpoint_on_disk_reads_windows_from_its_store(cube, chunks, monkeypatch):
    """A level kept on disk is decimated block by block from windows of its store, as in memory."""
    from ggrad_gpu._lazy import chunked

    read = []
    original = chunked.read_window
    monkeypatch.setattr(chunked, "read_window", lambda *a: read.append(a) or original(*a))
    expected = ndimage.gaussian_filter(cube.astype(np.float64), 1.0, axes=(0, 1), mode="reflect")[::2, ::2]
    with checkpoints(memory_limit=1):  # every checkpoint to disk
        stored = checkpoint(_lazy(cube, chunks))
        result = blur_decimate(stored).compute()
    if min(cube.shape[:2]) >= 8:
        assert read  # the store's windows, not dask's neighbour chunks
    np.testing.assert_allclose(result, blur_decimate(cube), rtol=0, atol=1e-6)
    np.testing.assert_allclose(result, expected, rtol=0, atol=1e-6)


def test_fill_gaps_takes_a_nearest_pixel_with_data_by_brute_force():
    rng = np.random.default_rng(3)
    values = rng.random((15, 17, 4))
    gaps = rng.random((15, 17)) < 0.4
    gaps[:4, :5] = True
    filled = fill_gaps(np.where(gaps[..., None], np.nan, values), gaps)
    np.testing.assert_array_equal(filled[~gaps], values[~gaps])  # pixels with data kept as they are
    data = np.argwhere(~gaps)
    for r, c in np.argwhere(gaps):
        distance = np.hypot(*(data - (r, c)).T)
        nearest = data[distance == distance.min()]  # any of the nearest (ties)
        assert any(np.array_equal(filled[r, c], values[i, j]) for i, j in nearest)


@pytest.mark.parametrize("chunks", CHUNKINGS)
def test_fill_gaps_equals_the_in_memory_fill(cube, chunks):
    gaps = np.zeros(cube.shape[:2], dtype=bool)
    gaps[:6] = True
    gaps[20:26, 8:31] = True
    values = np.where(gaps[..., None], np.nan, cube)
    np.testing.assert_array_equal(fill_gaps(_lazy(values, chunks), gaps).compute(), fill_gaps(values, gaps))


@pytest.mark.slow  # over 0.75 s: the fast lane stays under a minute
@pytest.mark.parametrize("chunks", CHUNKINGS)
def test_gram_and_combination_equal_the_in_memory_ones(cube, chunks):
    rng = np.random.default_rng(1)
    target = sobel_magnitude(rng.random(cube.shape[:2]).astype(np.float32))
    mask = rng.random(cube.shape[:2]) > 0.2
    gram, rhs = level_gram(cube, target, mask)
    lazy_gram, lazy_rhs = level_gram(_lazy(cube, chunks), target, mask)
    # float32 products per block, summed in float64 (DESIGN, Numerics): the chunks change the
    # blocks the products are rounded in, by a few float32 units.
    np.testing.assert_allclose(lazy_gram, gram, rtol=2e-6)
    np.testing.assert_allclose(lazy_rhs, rhs, rtol=2e-6)
    # The float64 reference: every pixel's gradients summed directly.
    gradients = sobel_magnitude(cube.astype(np.float64))[mask]
    np.testing.assert_allclose(lazy_gram, gradients.T @ gradients, rtol=1e-5)
    weights = np.array([0.5, 0, 1.2, 0, 0.3, 0.05])
    np.testing.assert_allclose(combine_bands(_lazy(cube, chunks), weights), combine_bands(cube, weights),
                               rtol=0, atol=1e-6)


def test_checkpoint_goes_to_a_temporary_store_beyond_the_limit_and_is_removed(cube, tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    lazy = _lazy(cube, (13, 11)) * 2
    with checkpoints(memory_limit=4 * cube.nbytes):
        kept = checkpoint(lazy)
        assert all(isinstance(v, np.ndarray) for v in dict(kept.dask).values())  # persisted in memory
        assert not list(tmp_path.iterdir())
    with checkpoints(memory_limit=1000):
        stored = checkpoint(lazy)
        assert [p.name.startswith("ggrad-chunks-") for p in tmp_path.iterdir()] == [True]
        assert list(tmp_path.glob("ggrad-chunks-*/step-*.zarr"))
        np.testing.assert_array_equal(stored.compute(), cube * 2)
    assert not list(tmp_path.iterdir())  # removed on leaving the block
    np.testing.assert_array_equal(checkpoint(cube), cube)  # in-memory arrays pass through


@pytest.mark.slow  # over 0.75 s: the fast lane stays under a minute
def test_a_large_lazy_cube_is_kept_on_disk_once_and_warped_by_windows(monkeypatch):
    """Every estimate warps the cube: beyond the limit it is written once and read window by window."""
    from ggrad_gpu._lazy import chunked
    from ggrad_gpu.refinement import passes as pipeline

    sample = make_phantom(shape=(160, 192), bands=16, seed=2, signatures="mixed")
    stored, windows, passes = [], [], []
    for module, name, log in ((chunked, "_stored", stored), (chunked, "read_window", windows),
                              (pipeline, "estimate_pass", passes)):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _f=original, _log=log, **k: _log.append(a) or _f(*a, **k))
    lazy = _lazy(sample.cube, (10, 12))
    # The projection as bands (a factored one's few coefficients are held: tests/test_factored.py).
    monkeypatch.setattr(denoise, "FACTORED_SHARE", 10**9)
    # The working grid given: under this limit it would be coarsened, and the cube with it.
    result = _refine(sample.guide, lazy, sample.initial, memory_limit=2 * sample.cube.nbytes, output_grid="cube",
                     working_shape=sample.guide.shape)
    sources = [a for a in stored if a[0].shape == sample.cube.shape]
    assert len(passes) >= 3 and len(sources) == 1  # several estimates, one copy of the cube
    assert windows  # the warps read the store's windows
    whole = _refine(sample.guide, sample.cube, sample.initial, output_grid="cube", working_shape=sample.guide.shape)
    assert target_registration_error(result.matrix, whole.matrix, sample.guide.shape).max < 1e-3


def test_a_kept_source_is_stored_in_pieces_of_the_cube_s_own_chunks(monkeypatch):
    """Each stored chunk comes from one of the cube's chunks: no new chunk draws on several."""
    from ggrad_gpu._lazy import chunked

    values = np.random.default_rng(3).random((96, 80, 64)).astype(np.float32)
    monkeypatch.setattr(chunked, "SOURCE_CHUNK_BYTES", 9 * 9 * 64 * 4)  # a 9 x 9 side at most
    with checkpoints(memory_limit=100_000):
        kept = chunked.keep_source(_lazy(values, (48, 40)))
        assert chunked.stored_path(kept) is not None
        assert set(kept.chunks[0]) == {8} and set(kept.chunks[1]) == {8}  # 48 and 40 split in eighths and fifths
        np.testing.assert_array_equal(kept.compute(), values)


def _refine(guide, cube, initial, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return refine(guide, cube, initial=initial, backend="numpy", **options)


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(shape=(240, 280), bands=24, seed=5, rotation_deg=1.0, shift=(5.0, -7.0))  # the default phantom


@pytest.mark.slow  # over 0.75 s: the fast lane stays under a minute
@pytest.mark.parametrize("chunks, limit", [((13, 17), None), ((7, 5), 20_000), ((48, 56), "1GB")])
def test_refine_on_a_lazy_cube_equals_the_in_memory_refine(phantom, chunks, limit):
    cube = phantom.cube.copy()
    cube[5:9, 10:14, :] = np.nan  # missing pixels
    cube[:, :, 3] = np.nan  # a dead band
    mask = np.ones(cube.shape[:2], dtype=bool)
    mask[20:22, 30:40] = False
    # The working grid given: under a small memory_limit a lazy cube's grid would be coarsened to fit.
    grid = {"working_shape": phantom.guide.shape}
    expected = _refine(phantom.guide, cube, phantom.initial, mask=mask, order=3, **grid)
    lazy = _refine(phantom.guide, _lazy(cube, chunks), phantom.initial, mask=mask, order=3, memory_limit=limit,
                   **grid)
    assert is_dask_array(lazy.registered) and lazy.improved and expected.improved, (lazy.message, expected.message)
    shape = phantom.guide.shape
    assert target_registration_error(lazy.matrix, expected.matrix, shape).max < 0.01
    tre = target_registration_error(lazy.matrix, phantom.matrix, shape)
    assert tre.mean < 0.35 and tre.max < 0.9, tre  # in memory: 0.158 / 0.439 px measured
    # The last estimate ran from placements 1e-5 px apart: its images agree, to that.
    assert ncc(lazy.gradient.grad_y, expected.gradient.grad_y) > 0.9999
    # registered: the in-memory warp through the lazy run's matrix, to float32 rounding.
    registered = lazy.registered.compute()
    reference = warp_cube(np.where(mask[..., None], cube, np.nan), lazy.matrix @ lazy.output_to_guide,
                          registered.shape[:2], order=3)
    np.testing.assert_array_equal(np.isnan(registered), np.isnan(reference))
    np.testing.assert_allclose(registered, reference, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(lazy.valid), expected.valid)


@pytest.mark.slow
def test_chunked_and_in_memory_refine_agree_where_eq5_is_nearly_singular():
    """A denoised cube spans a few components: NNLS must not pick other weights for other sums.

    With float32 products of the gradients, the chunks' rounding gave this case a matrix 0.013 px
    from the in-memory one (the Gram matrices' condition numbers are 1e11 to 1e16 here).
    """
    sample = make_phantom(shape=(320, 384), bands=64, seed=3, signatures="mixed")
    chunked = _refine(sample.guide, _lazy(sample.cube, (16, 16)), sample.initial, memory_limit="64MB",
                      output_grid="cube")
    whole = _refine(sample.guide, sample.cube, sample.initial, output_grid="cube", working_shape=sample.guide.shape)
    from ggrad_gpu.core.denoise import signal_subspace

    assert signal_subspace(sample.cube).rank is not None  # both paths estimate on the projected cube
    assert target_registration_error(chunked.matrix, whole.matrix, sample.guide.shape).max < 1e-3


@pytest.mark.slow  # over 0.75 s: the fast lane stays under a minute
def test_the_working_grid_of_a_lazy_cube_is_coarsened_to_the_memory_limit(phantom):
    lazy = _lazy(phantom.cube, (16, 16))
    full = _refine(phantom.guide, lazy, phantom.initial, memory_limit="1GB")
    small = _refine(phantom.guide, lazy, phantom.initial, memory_limit="5MB")
    assert full.working_to_guide[0, 0] == 1
    rows, cols = small.gradient.grad_x.shape
    # Its 2-D steps take at most half the limit (options.WORKING_BYTES_PER_PIXEL a pixel).
    assert small.working_to_guide[0, 0] == 3 and rows * cols * 200 <= 5e6 / 2
    assert small.improved, small.message
    tre = target_registration_error(small.matrix, phantom.matrix, phantom.guide.shape)
    assert tre.mean < 0.35 and tre.max < 0.9, tre  # 0.156 / 0.439 px measured


@pytest.mark.slow  # over 0.75 s: the fast lane stays under a minute
def test_the_lazy_cube_is_never_read_whole(phantom, tmp_path):
    log = str(tmp_path / "reads.txt")  # a file: dask may copy the source object into its graph

    class Recorder:
        """An array-like source that logs the size of every read."""

        shape, dtype, ndim = phantom.cube.shape, phantom.cube.dtype, 3

        def __getitem__(self, key):
            part = phantom.cube[key]
            with open(log, "a") as f:
                f.write(f"{part.size}\n")
            return part

    lazy = da.from_array(Recorder(), chunks=(16, 16, phantom.cube.shape[2]), asarray=True)
    result = _refine(phantom.guide, lazy, phantom.initial, output_grid="cube")
    result.registered.compute()
    reads = [int(n) for n in open(log).read().split()]
    assert len(reads) > 1 and max(reads) <= 16 * 16 * phantom.cube.shape[2] < phantom.cube.size


@pytest.mark.slow
def test_a_local_cluster_with_two_workers_gives_the_same_matrix(phantom):
    distributed = pytest.importorskip("distributed")
    expected = _refine(phantom.guide, _lazy(phantom.cube, (16, 16)), phantom.initial)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            distributed.Client(cluster):
        with dask.config.set(scheduler=None):
            on_cluster = _refine(phantom.guide, _lazy(phantom.cube, (16, 16)), phantom.initial)
            registered = on_cluster.registered.compute()
    # Workers run BLAS on one thread (distributed's default), which sums the products in another order.
    assert target_registration_error(on_cluster.matrix, expected.matrix, phantom.guide.shape).max < 0.01
    reference = warp_cube(phantom.cube, on_cluster.matrix @ on_cluster.output_to_guide, registered.shape[:2])
    np.testing.assert_array_equal(registered, reference)
