import numpy as np
import pytest
import scipy.ndimage as ndi
import scipy.optimize

from ggrad_gpu import estimate_global_gradient
from ggrad_gpu.core.level_weights import level_weights_kkt, level_weights_matrix
from ggrad_gpu.synthetic import make_phantom

from helpers import assert_backend, host


def reference_level(image_or_cube, k):
    """Level k of a scipy pyramid, band by band, in float64."""
    data = np.asarray(image_or_cube, np.float64)
    for _ in range(k):
        data = ndi.gaussian_filter(data, (1, 1) + (0,) * (data.ndim - 2))[::2, ::2]
    return data


def reference_gradients(data):
    """Explicit per-band Sobel magnitudes as a (pixels, bands) matrix, via scipy."""
    if data.ndim == 2:
        return np.hypot(ndi.sobel(data, 0), ndi.sobel(data, 1)).ravel()
    return np.stack(
        [np.hypot(ndi.sobel(data[..., b], 0), ndi.sobel(data[..., b], 1)).ravel() for b in range(data.shape[2])],
        axis=1,
    )


@pytest.fixture(scope="module")
def estimate(small_phantom):
    return estimate_global_gradient(small_phantom.guide, small_phantom.cube_on_guide, levels=3)


def test_result_types_and_shapes(xp, small_phantom):
    result = estimate_global_gradient(xp.asarray(small_phantom.guide), xp.asarray(small_phantom.cube_on_guide), levels=3)
    shape = small_phantom.guide.shape
    for image in (result.grad_x, result.grad_y):
        assert_backend(image, xp)
        assert image.shape == shape and image.dtype == np.float32
    assert result.guide_levels.shape == (3,) + shape and result.cube_levels.shape == (3,) + shape
    for weights in (result.alpha, result.beta, result.channel_weights):
        assert isinstance(weights, np.ndarray) and weights.dtype == np.float64
    assert result.channel_weights.shape == (3, small_phantom.cube.shape[2])
    np.testing.assert_allclose([result.alpha.sum(), result.beta.sum()], 1.0)
    assert (result.alpha >= 0).all() and (result.beta >= 0).all() and (result.channel_weights >= 0).all()


def test_band_weights_are_the_nnls_optimum_of_each_level(estimate, small_phantom):
    for k in range(3):
        a = reference_gradients(reference_level(small_phantom.cube_on_guide, k))
        b = reference_gradients(reference_level(small_phantom.guide, k))
        x = estimate.channel_weights[k]
        x_scipy = scipy.optimize.nnls(a, b, maxiter=100 * a.shape[1])[0]
        ours, theirs = np.sum((a @ x - b) ** 2), np.sum((a @ x_scipy - b) ** 2)
        # float32 filtering vs SciPy's float64: allow a relative 1e-5 on the objective.
        assert ours <= theirs * (1 + 1e-5)


def test_weights_rebuild_the_guide_gradient_better_than_any_band(estimate, small_phantom):
    a = reference_gradients(reference_level(small_phantom.cube_on_guide, 0))
    b = reference_gradients(reference_level(small_phantom.guide, 0))
    combined = np.sum((a @ estimate.channel_weights[0] - b) ** 2)
    # Best non-negative multiple of each single band.
    scale = np.maximum((a * b[:, None]).sum(0) / np.maximum((a * a).sum(0), 1e-300), 0)
    single = np.min(np.sum((a * scale - b[:, None]) ** 2, axis=0))
    assert combined < 0.9 * single
    assert (estimate.channel_weights[0] > 0).sum() > 1


def test_levels_are_upsampled_scipy_levels(estimate, small_phantom):
    shape = small_phantom.guide.shape
    for k in range(3):
        level = reference_level(small_phantom.guide, k)
        gradient = np.hypot(ndi.sobel(level, 0), ndi.sobel(level, 1))
        rows, cols = np.meshgrid(np.arange(shape[0]) / 2**k, np.arange(shape[1]) / 2**k, indexing="ij")
        expected = ndi.map_coordinates(gradient, [rows, cols], order=3, mode="nearest")
        np.testing.assert_allclose(estimate.guide_levels[k], expected, rtol=1e-4, atol=1e-4 * expected.max())


def test_level_weights_solve_eq9_and_combine_levels(estimate):
    q = level_weights_matrix(estimate.guide_levels, estimate.cube_levels)
    kkt = level_weights_kkt(q, estimate.alpha, estimate.beta)
    assert kkt["stationarity"] <= 1e-8 * np.abs(q).max() and kkt["dual"] <= 1e-8 * np.abs(q).max()
    np.testing.assert_allclose(estimate.grad_x, np.tensordot(estimate.alpha, estimate.guide_levels, 1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(estimate.grad_y, np.tensordot(estimate.beta, estimate.cube_levels, 1), rtol=1e-5, atol=1e-6)


def test_global_gradient_matches_guide_far_better_than_band_sum(estimate, small_phantom):
    def ncc(a, b):
        return np.corrcoef(np.ravel(a), np.ravel(b))[0, 1]

    band_sum = reference_gradients(small_phantom.cube_on_guide.sum(axis=2).astype(np.float64))
    assert ncc(estimate.grad_x, estimate.grad_y) > 0.8
    assert ncc(estimate.grad_x, band_sum) < 0.3


def test_manual_weights(small_phantom):
    result = estimate_global_gradient(small_phantom.guide, small_phantom.cube_on_guide, levels=2, weights=([3, 1], [0, 2]))
    np.testing.assert_allclose(result.alpha, [0.75, 0.25])
    np.testing.assert_allclose(result.beta, [0, 1])
    np.testing.assert_allclose(result.grad_y, result.cube_levels[1], rtol=1e-6)


def test_float64_inputs_compute_in_float64(small_phantom):
    result = estimate_global_gradient(small_phantom.guide.astype(np.float64), small_phantom.cube_on_guide, levels=2)
    assert result.grad_x.dtype == np.float64 and result.grad_y.dtype == np.float64


@pytest.mark.parametrize(
    "guide_shape, cube_shape, kwargs, error, match",
    [
        ((20, 20), (20, 21, 3), {}, ValueError, "cube must be on the guide's grid"),
        ((20, 20, 3), (20, 20, 3), {}, ValueError, "guide must be 2-D"),
        ((20, 20), (20, 20), {}, ValueError, "cube must be 3-D"),
        ((20, 20), (20, 20, 3), {"levels": 6}, ValueError, "at most 4 levels"),
        ((20, 20), (20, 20, 3), {"levels": 2, "weights": ([1, 1], [1])}, ValueError, "beta must have 2 entries"),
        ((20, 20), (20, 20, 3), {"levels": 2, "weights": "bogus"}, ValueError, "weights must be"),
    ],
)
def test_bad_input_names_the_parameter(guide_shape, cube_shape, kwargs, error, match):
    with pytest.raises(error, match=match):
        estimate_global_gradient(np.ones(guide_shape, np.float32), np.ones(cube_shape, np.float32), **kwargs)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", ["guide", "cube"])
def test_non_finite_input_is_a_clear_error(value, where):
    guide, cube = np.ones((20, 20), np.float32), np.ones((20, 20, 3), np.float32)
    (guide if where == "guide" else cube)[3, 3, ...] = value
    with pytest.raises(ValueError, match=f"{where} contains NaN or inf"):
        estimate_global_gradient(guide, cube, levels=2)


def test_constant_and_duplicate_bands_are_harmless(small_phantom):
    cube = small_phantom.cube_on_guide
    cube = np.concatenate([cube, np.zeros_like(cube[..., :2]), cube[..., :3]], axis=2)
    result = estimate_global_gradient(small_phantom.guide, cube, levels=2)
    bands = small_phantom.cube.shape[2]
    assert np.isfinite(host(result.grad_y)).all()
    np.testing.assert_array_equal(result.channel_weights[:, bands : bands + 2], 0)


def test_coverage_excludes_uncovered_pixels(small_phantom):
    guide, cube = small_phantom.guide, small_phantom.cube_on_guide.copy()
    mask = np.ones(guide.shape, bool)
    mask[:, :20] = False  # a strip the cube does not cover
    first = cube.copy()
    first[:, :20] = np.nan
    second = cube.copy()
    second[:, :20] = np.random.default_rng(0).random((guide.shape[0], 20, cube.shape[2])) * 100
    a = estimate_global_gradient(guide, first, levels=3, coverage=mask)
    b = estimate_global_gradient(guide, second, levels=3, coverage=mask)
    # Nothing outside the mask may matter: the weights are identical.
    np.testing.assert_allclose(a.channel_weights, b.channel_weights, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(a.alpha, b.alpha, atol=1e-9)
    np.testing.assert_allclose(a.beta, b.beta, atol=1e-9)
    assert a.valid.dtype == bool and not a.valid[:, :20].any() and a.valid[:, 64:].all()
    np.testing.assert_allclose(a.grad_y[a.valid], b.grad_y[b.valid], rtol=1e-5, atol=1e-6)
    assert estimate_global_gradient(guide, cube, levels=2).valid is None


def test_coverage_errors(small_phantom):
    guide, cube = small_phantom.guide, small_phantom.cube_on_guide.copy()
    with pytest.raises(ValueError, match="coverage must have"):
        estimate_global_gradient(guide, cube, levels=2, coverage=np.ones((3, 3), bool))
    with pytest.raises(ValueError, match="coverage leaves no pixel"):
        estimate_global_gradient(guide, cube, levels=2, coverage=np.zeros(guide.shape, bool))
    cube[5, 5, 0] = np.nan
    with pytest.raises(ValueError, match="where coverage says it holds data"):
        estimate_global_gradient(guide, cube, levels=2, coverage=np.ones(guide.shape, bool))


def test_a_small_footprint_keeps_every_level():
    # A footprint in the middle of a larger grid: the fits keep the pixels whose
    # blur draws mostly on data at every level (a rule that dropped every pixel
    # whose blur reaches beyond the footprint left nothing at level 3).
    phantom = make_phantom(shape=(150, 175), bands=12, seed=2)
    cube = phantom.cube_on_guide.copy()
    footprint = np.zeros(phantom.guide.shape, bool)
    footprint[37:112, 44:131] = True
    cube[~footprint] = np.nan
    result = estimate_global_gradient(phantom.guide, cube, levels=4, coverage=footprint)
    assert result.valid[footprint].mean() > 0.7 and not result.valid[~footprint].any()
    assert (result.channel_weights > 0).any(axis=1).all()  # every level found weights
    full = estimate_global_gradient(phantom.guide, phantom.cube_on_guide, levels=4)
    inside = result.valid
    assert np.corrcoef(result.grad_y[inside], full.grad_y[inside])[0, 1] > 0.95
