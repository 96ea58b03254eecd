"""Denoised cubes kept factored (``core.factored``): the same numbers as the dense projected cube.

References: the dense cube ``coefficients @ basis`` itself, filtered with
``scipy.ndimage.sobel`` band by band, the dense projection of
``signal_subspace``, and ``refine`` with factoring turned off.
"""

import warnings

import numpy as np
import pytest
import scipy.ndimage as ndi

from ggrad_gpu import estimate_global_gradient, refine
from ggrad_gpu._lazy.chunked import checkpoints, stored_path
from ggrad_gpu.core import denoise
from ggrad_gpu.core.coverage import Coverage
from ggrad_gpu.core.denoise import signal_subspace
from ggrad_gpu.core.factored import FactoredCube, is_factored
from ggrad_gpu.core.filters import iter_sobel_blocks
from ggrad_gpu.core.intensity import intensity_scale, normalised
from ggrad_gpu.metrics import target_registration_error
from ggrad_gpu.refinement.preparation import prepare_cube
from ggrad_gpu.synthetic import make_phantom


def _host(a):
    return a.get() if hasattr(a, "get") else np.asarray(a)


def _random_factored(xp, shape=(37, 29), rank=4, bands=60, seed=0):
    rng = np.random.default_rng(seed)
    coefficients = ndi.gaussian_filter(rng.random(shape + (rank,)), (1.5, 1.5, 0)).astype(np.float32)
    basis = rng.standard_normal((rank, bands)).astype(np.float32)
    return FactoredCube(xp.asarray(coefficients), xp.asarray(basis))


def _scipy_magnitude(cube):
    """Sobel magnitude of every band on its own, the SciPy way."""
    out = np.empty(cube.shape, dtype=np.float64)
    for band in range(cube.shape[2]):
        image = cube[:, :, band].astype(np.float64)
        out[:, :, band] = np.hypot(ndi.sobel(image, axis=0, mode="reflect"), ndi.sobel(image, axis=1, mode="reflect"))
    return out


@pytest.mark.parametrize("bands", [None, [41, 3, 17, 3]])
def test_sobel_blocks_of_a_factored_cube_are_the_dense_cube_s(xp, bands):
    cube = _random_factored(xp)
    dense = _host(cube.dense()).astype(np.float64)
    reference = _scipy_magnitude(dense if bands is None else dense[:, :, bands])
    blocks = [(start, stop, _host(gradients).copy()) for start, stop, gradients in
              iter_sobel_blocks(cube, rows=6, bands=bands)]
    assert [(start, stop) for start, stop, _ in blocks][:2] == [(0, 6), (6, 12)]
    got = np.concatenate([gradients for *_, gradients in blocks])
    np.testing.assert_allclose(got, reference, atol=2e-5 * reference.max())


def test_factored_cube_operations_match_the_dense_cube():
    cube = _random_factored(np, rank=3, bands=9)
    dense = cube.dense()
    np.testing.assert_allclose(cube.bands([8, 0]).dense(), dense[:, :, [8, 0]], rtol=1e-6)
    factors = np.linspace(0, 2, 9)
    np.testing.assert_allclose(cube.band_scaled(factors).dense(), dense * factors, rtol=1e-5, atol=1e-6)
    gain = np.random.default_rng(1).random(dense.shape[:2]) + 0.5
    np.testing.assert_allclose(cube.pixel_scaled(gain).dense(), dense * gain[:, :, None], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cube.totals(), dense.sum(axis=2), rtol=1e-5, atol=1e-5)
    shifted = cube.pixelwise(lambda c: np.roll(c, 2, axis=0))
    np.testing.assert_allclose(shifted.dense(), np.roll(dense, 2, axis=0), rtol=1e-6)
    assert is_factored(shifted) and not is_factored(dense)


def _noisy_low_rank(shape=(48, 52), rank=3, bands=64, noise=0.02, seed=0):
    rng = np.random.default_rng(seed)
    abundances = ndi.gaussian_filter(rng.random(shape + (rank,)), (2, 2, 0))
    clean = abundances @ (rng.random((rank, bands)) + 0.1)
    return (clean + noise * rng.standard_normal(clean.shape)).astype(np.float32)


def test_the_factored_subspace_is_the_dense_projection(xp):
    cube = _noisy_low_rank()
    cube[:, :, 5] = 0.25  # a band without noise: kept as it is
    cube[:, :, 9] = np.nan  # a band without data: the estimates read 0
    cube = xp.asarray(cube)
    subspace = signal_subspace(cube)
    factored = subspace.factored(cube, dead_bands=np.array([9]))
    assert factored.rank == subspace.rank + 2  # the components, the mean, the band kept as it is
    projected, got = _host(subspace.values), _host(factored.dense())
    other = np.setdiff1d(np.arange(cube.shape[2]), [9])
    np.testing.assert_allclose(got[:, :, other], projected[:, :, other], atol=2e-5 * np.abs(projected[:, :, other]).max())
    assert np.all(got[:, :, 9] == 0)
    # More coefficients (4) than a quarter of the bands: the bands are cheaper as they are.
    few = xp.asarray(_noisy_low_rank(bands=15))
    assert signal_subspace(few).factored(few) is None


def test_prepare_cube_keeps_a_many_band_projection_factored_and_normalises_it():
    phantom = make_phantom(shape=(160, 180), bands=120, native_factor=3, normalisation=None, seed=3)
    cube = np.asarray(phantom.cube, dtype=np.float32)
    prepared = prepare_cube(cube, None, np, denoise=True, normalise=True)
    assert is_factored(prepared.denoised) and is_factored(prepared.normalised)
    assert prepared.values is cube  # the cube as given: what registered is resampled from
    # The dense way: the projected cube, each spectrum brought to the median total.
    projected = signal_subspace(cube).values
    expected = normalised(projected, intensity_scale(projected))
    got = prepared.normalised.dense()
    np.testing.assert_allclose(got, expected, atol=1e-4 * np.abs(expected).max())


def test_an_estimate_of_a_factored_cube_is_the_dense_cube_s(xp):
    phantom = make_phantom(shape=(96, 112), bands=60, seed=1)
    on_guide = np.asarray(phantom.cube_on_guide, dtype=np.float32)
    noise = 0.05 * float(on_guide.std()) * np.random.default_rng(2).standard_normal(on_guide.shape)
    on_guide = (on_guide + noise).astype(np.float32)  # a noise bulk: the subspace stands clear of it
    subspace = signal_subspace(on_guide)
    factored = subspace.factored(xp.asarray(on_guide))
    assert factored is not None
    gaps = np.zeros((96, 112), bool)
    gaps[:10, :30] = True  # missing cube pixels: stand-ins filled, left out of eq. 5
    coverage = Coverage(None, xp.asarray(gaps), None)
    guide = xp.asarray(phantom.guide.astype(np.float32))
    dense = estimate_global_gradient(guide, factored.dense(), levels=3, coverage=coverage)
    fact = estimate_global_gradient(guide, factored, levels=3, coverage=coverage)
    reference, got = _host(dense.grad_y), _host(fact.grad_y)
    np.testing.assert_allclose(got, reference, atol=1e-3 * np.abs(reference).max())
    np.testing.assert_allclose(fact.alpha, dense.alpha, atol=1e-3)
    np.testing.assert_allclose(fact.beta, dense.beta, atol=1e-3)


@pytest.mark.slow
def test_refine_is_the_same_with_the_projection_factored_or_dense(monkeypatch):
    phantom = make_phantom(shape=(300, 340), bands=300, native_factor=5, signatures="mixed", seed=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        factored = refine(phantom.guide, phantom.cube, initial=phantom.initial, backend="numpy")
        monkeypatch.setattr(denoise, "FACTORED_SHARE", 10**9)  # never factored
        dense = refine(phantom.guide, phantom.cube, initial=phantom.initial, backend="numpy")
    assert factored.improved and dense.improved
    shape = phantom.guide.shape
    assert target_registration_error(factored.matrix, dense.matrix, shape).max < 0.02
    assert target_registration_error(factored.matrix, phantom.matrix, shape).mean < 0.5


def test_a_lazy_cube_s_coefficients_are_held_in_memory_within_the_limit():
    da = pytest.importorskip("dask.array")
    cube = _noisy_low_rank(shape=(64, 72), bands=64)
    lazy = da.from_array(cube, chunks=(16, 24, 64))
    prepared = prepare_cube(lazy, None, np, denoise=True)
    factored = prepared.denoised
    assert is_factored(factored)
    # Held: computed once, read from memory; nothing of the cube's own graph is left to run again.
    graph = factored.coefficients.__dask_graph__()
    assert not any(lazy.name in str(key) for key in graph)
    coefficients = factored.coefficients.compute()
    assert coefficients.shape == (64, 72, factored.rank)
    assert factored.coefficients.chunks[:2] == lazy.chunks[:2]
    expected = signal_subspace(cube).values
    np.testing.assert_allclose(factored.dense().compute(), expected, atol=2e-5 * np.abs(expected).max())
    # Over an eighth of the limit: read from the cube until a refine's block holds them once (on disk
    # here), and the normalisation decided from what is held.
    limit = 8 * coefficients.nbytes - 1
    prepared = prepare_cube(lazy, None, np, denoise=True, normalise=True, memory_limit=limit)
    assert prepared.unheld and prepared.normalised is None
    assert any(lazy.name in str(key) for key in prepared.denoised.coefficients.__dask_graph__())
    with checkpoints(limit):
        held = prepared.held_coefficients()
        assert not held.unheld and stored_path(held.denoised.coefficients) is not None
        assert held.held_coefficients() is held
        expected_normalised = normalised(expected, intensity_scale(expected))
        source = held.coarsened(0)
        np.testing.assert_allclose(source.dense().compute(), expected_normalised,
                                   atol=2e-5 * np.abs(expected_normalised).max())
        as_given = held.as_given().coarsened(0)
        np.testing.assert_allclose(as_given.dense().compute(), expected, atol=2e-5 * np.abs(expected).max())


def test_an_estimate_of_chunked_coefficients_is_the_in_memory_one():
    da = pytest.importorskip("dask.array")
    cube = _random_factored(np, shape=(50, 44), rank=3, bands=30)
    guide = np.asarray(cube.dense()[:, :, 0] + cube.dense()[:, :, 7], dtype=np.float32)
    chunked = cube.pixelwise(lambda c: da.from_array(c, chunks=(13, 20, -1)))
    in_memory = estimate_global_gradient(guide, cube, levels=2)
    lazy = estimate_global_gradient(guide, chunked, levels=2)
    np.testing.assert_allclose(np.asarray(lazy.grad_y), in_memory.grad_y, atol=1e-4 * np.abs(in_memory.grad_y).max())
    np.testing.assert_allclose(lazy.channel_weights, in_memory.channel_weights, atol=1e-3)
