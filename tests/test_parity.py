"""CuPy against NumPy for every public function: same inputs, float32 tolerance."""

import numpy as np
import pytest

import ggrad_gpu
from ggrad_gpu import metrics
from ggrad_gpu._backend import cupy_usable
from ggrad_gpu.core.level_weights import level_weights_matrix

from helpers import assert_backend, host

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not cupy_usable()[0], reason="CuPy sees no CUDA device")]


@pytest.fixture(scope="module")
def cp():
    import cupy

    return cupy


@pytest.fixture(scope="module")
def data(small_phantom):
    return small_phantom.guide, small_phantom.cube_on_guide


def close(gpu, cpu, rtol=2e-5):
    cpu = host(cpu)
    np.testing.assert_allclose(host(gpu), cpu, rtol=rtol, atol=rtol * max(np.nanmax(np.abs(cpu)), 1e-30))


def test_sobel_magnitude(cp, data):
    for array in data:
        out = ggrad_gpu.sobel_magnitude(cp.asarray(array))
        assert_backend(out, cp)
        close(out, ggrad_gpu.sobel_magnitude(array))


def test_gaussian_pyramid_and_upsample(cp, data):
    for array in data:
        for gpu, cpu in zip(ggrad_gpu.gaussian_pyramid(cp.asarray(array), 3), ggrad_gpu.gaussian_pyramid(array, 3)):
            assert_backend(gpu, cp)
            close(gpu, cpu)
    coarse = ggrad_gpu.gaussian_pyramid(data[0], 3)[2]
    close(ggrad_gpu.upsample_level(cp.asarray(coarse), 2, data[0].shape), ggrad_gpu.upsample_level(coarse, 2, data[0].shape))


def test_gram_products_and_nnls(cp, data):
    a = ggrad_gpu.sobel_magnitude(data[1]).reshape(-1, data[1].shape[2])
    b = ggrad_gpu.sobel_magnitude(data[0]).ravel()
    gram_gpu, rhs_gpu = ggrad_gpu.gram_products(cp.asarray(a), cp.asarray(b))
    gram, rhs = ggrad_gpu.gram_products(a, b)
    close(gram_gpu, gram, rtol=1e-12)
    close(rhs_gpu, rhs, rtol=1e-12)
    np.testing.assert_allclose(ggrad_gpu.nnls_gram(gram_gpu, rhs_gpu), ggrad_gpu.nnls_gram(gram, rhs), rtol=1e-8, atol=1e-12)


def test_estimate_global_gradient(cp, data):
    gpu = ggrad_gpu.estimate_global_gradient(cp.asarray(data[0]), cp.asarray(data[1]), levels=3)
    cpu = ggrad_gpu.estimate_global_gradient(*data, levels=3)
    assert_backend(gpu.grad_y, cp)
    close(gpu.grad_x, cpu.grad_x, rtol=1e-4)
    close(gpu.grad_y, cpu.grad_y, rtol=1e-4)
    np.testing.assert_allclose(gpu.alpha, cpu.alpha, atol=1e-4)
    np.testing.assert_allclose(gpu.beta, cpu.beta, atol=1e-4)
    close(gpu.channel_weights, cpu.channel_weights, rtol=1e-3)


def test_level_weights_matrix(cp, data):
    cpu = ggrad_gpu.estimate_global_gradient(*data, levels=3)
    q_gpu = level_weights_matrix(cp.asarray(cpu.guide_levels), cp.asarray(cpu.cube_levels))
    np.testing.assert_allclose(q_gpu, level_weights_matrix(cpu.guide_levels, cpu.cube_levels), rtol=1e-10)


def test_warp_cube(cp, small_phantom):
    gpu = ggrad_gpu.warp_cube(cp.asarray(small_phantom.cube), small_phantom.matrix, small_phantom.guide.shape)
    cpu = ggrad_gpu.warp_cube(small_phantom.cube, small_phantom.matrix, small_phantom.guide.shape)
    assert_backend(gpu, cp)
    np.testing.assert_array_equal(np.isnan(host(gpu)), np.isnan(cpu))
    close(gpu, cpu)


def test_metrics(cp, data):
    a, b = data[0], data[1][..., 0]
    assert metrics.ncc(cp.asarray(a), cp.asarray(b)) == pytest.approx(metrics.ncc(a, b), rel=1e-10)
    assert metrics.mse(cp.asarray(a), cp.asarray(b)) == pytest.approx(metrics.mse(a, b), rel=1e-10)


def test_register_affine(cp):
    import scipy.ndimage as ndi

    from ggrad_gpu.synthetic import affine_about_center

    rng = np.random.default_rng(0)
    fixed = ndi.gaussian_filter(rng.random((128, 144)), 4).astype(np.float32)
    true = affine_about_center(fixed.shape, rotation_deg=3, shift=(6, -9))
    moving = ndi.affine_transform(fixed, np.linalg.inv(true), order=3, mode="nearest").astype(np.float32)
    gpu = ggrad_gpu.register_affine(cp.asarray(fixed), cp.asarray(moving))
    cpu = ggrad_gpu.register_affine(fixed, moving)
    assert isinstance(gpu.matrix, np.ndarray)
    np.testing.assert_allclose(gpu.matrix, cpu.matrix, atol=1e-3)


def test_refine_backends(small_phantom):
    cpu = ggrad_gpu.refine(small_phantom.guide, small_phantom.cube, initial=small_phantom.initial, levels=3,
                           backend="numpy")
    gpu = ggrad_gpu.refine(small_phantom.guide, small_phantom.cube, initial=small_phantom.initial, levels=3,
                           backend="cupy")
    assert gpu.backend == "cupy" and isinstance(gpu.registered, np.ndarray)  # NumPy in, NumPy out
    np.testing.assert_allclose(gpu.matrix, cpu.matrix, atol=2e-2)


def test_chunked_refine_on_cupy_chunks_equals_numpy(small_phantom):
    """A lazy cube on the GPU: each chunk moves to the device when a task reads it (issue 14)."""
    import dask.array as da

    cube = small_phantom.cube
    lazy = da.from_array(cube, chunks=(16, 16, cube.shape[2]))
    options = dict(initial=small_phantom.initial, levels=3, output_grid="cube", memory_limit="64MB")
    cpu = ggrad_gpu.refine(small_phantom.guide, lazy, backend="numpy", **options)
    gpu = ggrad_gpu.refine(small_phantom.guide, lazy, backend="cupy", **options)
    assert gpu.backend == "cupy"
    tre = metrics.target_registration_error(gpu.matrix, cpu.matrix, small_phantom.guide.shape)
    assert tre.max < 0.01
    # registered: the in-memory NumPy warp through the GPU run's own matrix, to float32 rounding.
    registered = host(gpu.registered.compute())
    reference = ggrad_gpu.warp_cube(cube, gpu.matrix @ gpu.output_to_guide, registered.shape[:2])
    np.testing.assert_array_equal(np.isnan(registered), np.isnan(reference))
    close(np.nan_to_num(registered), np.nan_to_num(reference))
