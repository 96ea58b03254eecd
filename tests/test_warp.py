import threading

import numpy as np
import pytest
import scipy.ndimage as ndi

import ggrad_gpu._threads as threads_module
import ggrad_gpu.core.warp as warp_module
from ggrad_gpu import warp_cube
from ggrad_gpu.synthetic import affine_about_center

from helpers import assert_backend, host

SHAPE = (23, 29)
MATRICES = {
    "rotation": affine_about_center(SHAPE, rotation_deg=7),
    "scale": affine_about_center(SHAPE, scale=(0.45, 1.2)),  # magnifies rows, shrinks columns
    "shear": affine_about_center(SHAPE, shear=0.15),
    "shift": affine_about_center(SHAPE, shift=(1.3, -2.6)),
    "all": affine_about_center(SHAPE, rotation_deg=-4, scale=0.9, shear=0.05, shift=(0.7, 1.9)),
}


def random_cube(shape=SHAPE + (4,), seed=0, dtype=np.float32):
    return np.random.default_rng(seed).random(shape).astype(dtype)


def footprint(cube_shape, matrix, output_shape):
    """Which output pixels land inside the cube's footprint (-0.5 .. size - 0.5)."""
    r, c = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in output_shape), indexing="ij")
    q = [matrix[i, 0] * r + matrix[i, 1] * c + matrix[i, 2] for i in (0, 1)]
    return (q[0] >= -0.5) & (q[0] <= cube_shape[0] - 0.5) & (q[1] >= -0.5) & (q[1] <= cube_shape[1] - 0.5)


def scipy_per_band(cube, matrix, output_shape, order):
    """The reference: one float64 ``affine_transform`` per band, edge clamping."""
    return np.stack(
        [ndi.affine_transform(cube[..., b].astype(np.float64), matrix, output_shape=output_shape, order=order,
                              mode="nearest") for b in range(cube.shape[2])],
        axis=-1,
    )


@pytest.mark.parametrize("order", [1, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", sorted(MATRICES))
def test_matches_affine_transform_per_band_inside(xp, name, dtype, order):
    cube = random_cube(dtype=dtype)
    matrix = MATRICES[name]
    output_shape = (25, 27)
    out = warp_cube(xp.asarray(cube), matrix, output_shape, order=order)
    assert_backend(out, xp)
    assert out.dtype == dtype and out.shape == output_shape + (4,)
    out = host(out)
    inside = footprint(cube.shape, matrix, output_shape)
    assert inside.mean() > 0.5 and not inside.all()  # the edges and the outside are both exercised
    expected = scipy_per_band(cube, matrix, output_shape, order)
    tolerance = 2e-6 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(out[inside], expected[inside], rtol=0, atol=tolerance)
    assert np.isnan(out[~inside]).all()


@pytest.mark.parametrize("order", [1, 3])
@pytest.mark.parametrize("shape", [(1, 6, 2), (6, 1, 2), (2, 3, 3)])
def test_thin_cubes_match_affine_transform(shape, order):
    cube = random_cube(shape, seed=3, dtype=np.float64)
    matrix = np.array([[0.7, 0.1, -0.2], [-0.05, 0.8, 0.3], [0, 0, 1]])
    out = warp_cube(cube, matrix, (5, 7), order=order)
    inside = footprint(shape, matrix, (5, 7))
    np.testing.assert_allclose(out[inside], scipy_per_band(cube, matrix, (5, 7), order)[inside], atol=1e-12)
    assert np.isnan(out[~inside]).all()


@pytest.mark.parametrize("dtype, expected", [(np.float32, np.float32), (np.float64, np.float64),
                                             (np.uint16, np.float32), (np.int32, np.float32)])
@pytest.mark.parametrize("order", [1, 3])
def test_output_dtype(xp, dtype, expected, order):
    cube = xp.asarray((random_cube(seed=1) * 1000).astype(dtype))
    out = warp_cube(cube, MATRICES["all"], SHAPE, order=order)
    assert_backend(out, xp)
    assert out.dtype == expected


@pytest.mark.parametrize("order", [1, 3])
def test_identity_reproduces_the_cube(xp, order):
    cube = random_cube(seed=2)
    out = host(warp_cube(xp.asarray(cube), np.eye(3), SHAPE, order=order))
    np.testing.assert_allclose(out, cube, atol=2e-6)


@pytest.mark.parametrize("order", [1, 3])
def test_footprint_is_half_a_pixel_beyond_the_centres(order):
    cube = np.ones((4, 4, 2), np.float32)
    shift = np.array([[1.0, 0, -0.5], [0, 1, 0], [0, 0, 1]])  # output row 0 reads cube row -0.5
    out = warp_cube(cube, shift, (6, 4), order=order)
    np.testing.assert_allclose(out[:5], 1, rtol=1e-6)  # rows -0.5 .. 3.5 are inside, edge-clamped
    assert np.isnan(out[5]).all()


@pytest.mark.parametrize("order", [1, 3])
def test_nan_stays_in_its_band_and_its_neighbourhood(xp, order):
    cube = random_cube((20, 24, 3), seed=5)
    matrix = MATRICES["all"]
    clean = host(warp_cube(xp.asarray(cube), matrix, SHAPE, order=order))
    holed = cube.copy()
    holed[9, 11, 1] = np.nan
    out = host(warp_cube(xp.asarray(holed), matrix, SHAPE, order=order))
    np.testing.assert_array_equal(out[..., [0, 2]], clean[..., [0, 2]])  # other bands: bit for bit
    assert np.isnan(holed[9, 11, 1])  # the input is not modified
    # Output pixels whose cube coordinate is far from the NaN keep their value (the cubic
    # prefilter sees a filled value whose influence decays by 0.27 per pixel).
    r, c = np.meshgrid(np.arange(SHAPE[0]), np.arange(SHAPE[1]), indexing="ij")
    q_rows = matrix[0, 0] * r + matrix[0, 1] * c + matrix[0, 2]
    q_cols = matrix[1, 0] * r + matrix[1, 1] * c + matrix[1, 2]
    distance = np.maximum(abs(q_rows - 9), abs(q_cols - 11))
    far = (distance >= (1 if order == 1 else 8)) & np.isfinite(clean[..., 1])
    np.testing.assert_allclose(out[..., 1][far], clean[..., 1][far], rtol=0, atol=0 if order == 1 else 1e-4)
    # Bilinear renormalises around a lone NaN; cubic loses the pixels nearest to it.
    lost = np.isnan(out[..., 1]) & np.isfinite(clean[..., 1])
    if order == 1:
        assert not lost.any()
    else:
        assert lost.any() and (distance[lost] <= 0.5).all()


def test_bilinear_renormalises_over_finite_neighbours(xp):
    cube = np.arange(2 * 4 * 2, dtype=np.float64).reshape(2, 4, 2)
    cube[0, 1, 0] = np.nan
    quarter = np.array([[1.0, 0, 0.25], [0, 1, 0], [0, 0, 1]])  # row 0.25: weights 0.75 / 0.25
    out = host(warp_cube(xp.asarray(cube), quarter, (1, 4)))[0]
    # Column 1 has only one finite neighbour with weight, row 1 (10); the others are plain.
    np.testing.assert_array_equal(out[:, 0], [0.75 * 0 + 0.25 * 8, 10, 0.75 * 4 + 0.25 * 12, 0.75 * 6 + 0.25 * 14])
    np.testing.assert_array_equal(out[:, 1], 0.75 * cube[0, :, 1] + 0.25 * cube[1, :, 1])
    half_col = np.array([[1.0, 0, 0], [0, 1, 0.5], [0, 0, 1]])  # between columns: weights 0.5 / 0.5
    out = host(warp_cube(xp.asarray(cube), half_col, (2, 3)))
    np.testing.assert_array_equal(out[0, :2, 0], [0, 4])  # the NaN's finite neighbours alone
    np.testing.assert_array_equal(out[1, :2, 0], [9, 11])
    # A NaN that carries zero weight changes nothing; one that carries all of it gives NaN.
    cube[:, 2, 0] = np.nan
    out = host(warp_cube(xp.asarray(cube), np.eye(3), (2, 4)))
    np.testing.assert_array_equal(np.isnan(out[..., 0]), np.isnan(cube[..., 0]))
    np.testing.assert_array_equal(out[..., 1], cube[..., 1])


def test_cubic_nan_where_the_nearest_pixel_is_nan(xp):
    cube = random_cube((12, 14, 2), seed=6, dtype=np.float64)
    cube[5, 6, 0] = np.nan
    out = host(warp_cube(xp.asarray(cube), np.eye(3), (12, 14), order=3))
    np.testing.assert_array_equal(np.isnan(out), np.isnan(cube))
    finite = np.isfinite(cube)
    np.testing.assert_allclose(out[finite], cube[finite], atol=1e-9)  # still interpolating
    shifted = host(warp_cube(xp.asarray(cube), np.array([[1.0, 0, 0.4], [0, 1, -0.4], [0, 0, 1]]), (12, 14),
                             order=3))
    np.testing.assert_array_equal(np.isnan(shifted), np.isnan(cube))  # nearest of (r + 0.4, c - 0.4) is (r, c)


@pytest.mark.parametrize("order", [1, 3])
def test_all_nan_band(xp, order):
    cube = random_cube((8, 9, 3), seed=7)
    cube[..., 1] = np.nan
    out = host(warp_cube(xp.asarray(cube), MATRICES["shift"], (8, 9), order=order))
    assert np.isnan(out[..., 1]).all()
    clean = host(warp_cube(xp.asarray(cube[..., [0, 2]]), MATRICES["shift"], (8, 9), order=order))
    np.testing.assert_array_equal(out[..., [0, 2]], clean)


@pytest.mark.parametrize("order", [1, 3])
def test_band_chunks_and_blocks_do_not_change_the_result(xp, order, monkeypatch):
    cube = random_cube((15, 17, 7), seed=8)
    cube[4, 5, 2] = np.nan
    cube[10, 3, 6] = np.nan
    matrix = MATRICES["all"]
    whole = host(warp_cube(xp.asarray(cube), matrix, SHAPE, order=order))
    for band_chunk in (1, 2, 3, 7, 100):  # chunks that do and do not divide the 7 bands
        chunked = host(warp_cube(xp.asarray(cube), matrix, SHAPE, order=order, band_chunk=band_chunk))
        np.testing.assert_array_equal(chunked, whole)
    # Pixel blocks that split output rows (7 pixels each) give the same result too.
    monkeypatch.setattr(warp_module, "block_rows", lambda shape, itemsize, xp: 7)
    blocked = host(warp_cube(xp.asarray(cube), matrix, SHAPE, order=order, band_chunk=3))
    np.testing.assert_array_equal(blocked, whole)


@pytest.mark.parametrize("order", [1, 3])
def test_threads_do_not_change_the_result(order, monkeypatch):
    cube = random_cube((15, 17, 7), seed=9)
    cube[4, 5, 2] = np.nan  # the renormalised and the nearest-NaN paths use each thread's scratch
    matrix = MATRICES["all"]
    monkeypatch.setattr(threads_module, "MIN_THREAD_VALUES", 1)
    monkeypatch.setattr(threads_module, "host_threads", lambda: 1)
    alone = warp_cube(cube, matrix, SHAPE, order=order)
    reference = scipy_per_band(np.nan_to_num(cube), matrix, SHAPE, order)
    inside = footprint(cube.shape[:2], matrix, SHAPE)
    np.testing.assert_allclose(alone[inside][:, [0, 1, 3]], reference[inside][:, [0, 1, 3]], atol=1e-5)
    runs, threads_seen = [], set()
    real_parallel = warp_module.parallel

    def counted(function, items):
        items = list(items)
        runs.append(len(items))

        def noted(item):
            threads_seen.add(threading.get_ident())
            return function(item)

        return real_parallel(noted, items)

    monkeypatch.setattr(warp_module, "parallel", counted)
    monkeypatch.setattr(warp_module, "block_rows", lambda shape, itemsize, xp: 5)  # several blocks per thread
    for threads in (2, 3, 1000):  # 1000: one pixel per thread at most
        monkeypatch.setattr(threads_module, "host_threads", lambda threads=threads: threads)
        np.testing.assert_array_equal(warp_cube(cube, matrix, SHAPE, order=order, band_chunk=3), alone)
    assert runs == [2] * 3 + [3] * 3 + [SHAPE[0] * SHAPE[1]] * 3  # each chunk of bands split in runs
    assert len(threads_seen) > 1


def test_many_threads_share_the_budget_in_blocks_of_an_eighth_at_the_least(monkeypatch):
    cube = random_cube((15, 17, 7), seed=10)
    alone = warp_cube(cube, MATRICES["all"], SHAPE)
    sizes = []
    real_call = warp_module._Sampler.__call__

    def noted(self, q_rows, q_cols, out):
        sizes.append(q_rows.shape[0])
        return real_call(self, q_rows, q_cols, out)

    monkeypatch.setattr(warp_module._Sampler, "__call__", noted)
    monkeypatch.setattr(threads_module, "MIN_THREAD_VALUES", 1)
    monkeypatch.setattr(warp_module, "block_rows", lambda shape, itemsize, xp: 80)  # the budget: 80 points
    for threads, block in ((2, 40), (4, 20), (64, 10)):  # 64 threads: 80 // MAX_BLOCK_SPLIT, not 80 // 64
        sizes.clear()
        monkeypatch.setattr(threads_module, "host_threads", lambda threads=threads: threads)
        np.testing.assert_array_equal(warp_cube(cube, MATRICES["all"], SHAPE), alone)
        assert max(sizes) == block and sum(sizes) == SHAPE[0] * SHAPE[1]


def test_a_small_warp_runs_in_the_calling_thread(monkeypatch):
    monkeypatch.setattr(threads_module, "host_threads", lambda: 4)
    seen = []
    monkeypatch.setattr(warp_module, "parallel",
                        lambda function, items: seen.append(len(items)) or [function(i) for i in items])
    cube = random_cube((15, 17, 7))
    assert warp_cube(cube, MATRICES["shift"], SHAPE).shape == SHAPE + (7,)
    assert seen == [1]  # under MIN_THREAD_VALUES: one run


def test_warp_errors():
    cube = np.ones((3, 3, 1))
    with pytest.raises(ValueError, match="order must be 1 or 3; got 2"):
        warp_cube(cube, np.eye(3), (3, 3), order=2)
    with pytest.raises(ValueError, match="order must be 1 or 3; got True"):
        warp_cube(cube, np.eye(3), (3, 3), order=True)
    with pytest.raises(ValueError, match=r"cube must be 3-D \(rows, cols, bands\); got shape \(3, 3\)"):
        warp_cube(np.ones((3, 3)), np.eye(3), (3, 3))
    with pytest.raises(TypeError, match="cube must be real"):
        warp_cube(np.ones((3, 3, 1), complex), np.eye(3), (3, 3))
    with pytest.raises(TypeError, match="cube must be a NumPy or CuPy array"):
        warp_cube([[[1.0]]], np.eye(3), (3, 3))
    with pytest.raises(ValueError, match="matrix must be a finite 3x3"):
        warp_cube(cube, np.eye(2), (3, 3))
    with pytest.raises(ValueError, match="matrix must be a finite 3x3"):
        warp_cube(cube, np.full((3, 3), np.nan), (3, 3))
    with pytest.raises(ValueError, match="matrix must be affine"):
        warp_cube(cube, np.ones((3, 3)), (3, 3))
    for shape in [(0, 3), (3,), 5, (3, "a")]:
        with pytest.raises(ValueError, match="output_shape"):
            warp_cube(cube, np.eye(3), shape)
    for band_chunk in [0, -2, 1.5, True]:
        with pytest.raises(ValueError, match="band_chunk must be a positive integer or None"):
            warp_cube(cube, np.eye(3), (3, 3), band_chunk=band_chunk)
