import numpy as np
import pytest
import scipy.ndimage as ndi

from ggrad_gpu import gaussian_pyramid, upsample_level
from ggrad_gpu._validation import max_levels

from helpers import assert_backend, host


def direct_pyramid(image, levels):
    """Filter-and-decimate with scipy, one 2-D image at a time."""
    out = [np.asarray(image, np.float64)]
    for _ in range(1, levels):
        out.append(ndi.gaussian_filter(out[-1], 1.0)[::2, ::2])
    return out


@pytest.mark.parametrize("shape", [(64, 50), (37, 29, 4), (13, 12, 3), (9, 40)])
def test_pyramid_matches_direct_filter_and_decimate(xp, shape):
    rng = np.random.default_rng(0)
    data = rng.random(shape).astype(np.float32)
    levels = min(3, max_levels(shape))
    pyramid = gaussian_pyramid(xp.asarray(data), levels)
    assert len(pyramid) == levels
    for k, level in enumerate(pyramid):
        assert_backend(level, xp)
        assert level.dtype == np.float32
        if data.ndim == 2:
            expected = direct_pyramid(data, levels)[k]
        else:
            expected = np.stack([direct_pyramid(data[..., b], levels)[k] for b in range(shape[2])], -1)
        np.testing.assert_allclose(host(level), expected, rtol=1e-5, atol=1e-6)


def test_pyramid_equals_3d_gaussian_on_spatial_axes():
    data = np.random.default_rng(1).random((30, 22, 5))
    level1 = gaussian_pyramid(data, 2)[1]
    np.testing.assert_allclose(level1, ndi.gaussian_filter(data, (1, 1, 0))[::2, ::2], rtol=1e-12)


def test_level_zero_is_not_copied_for_float32():
    data = np.ones((16, 16), np.float32)
    assert gaussian_pyramid(data, 2)[0] is data


def test_too_many_levels_says_the_maximum():
    with pytest.raises(ValueError, match="at most 4 levels"):
        gaussian_pyramid(np.zeros((20, 20)), 5)
    with pytest.raises(ValueError, match="levels must be at least 1"):
        gaussian_pyramid(np.zeros((20, 20)), 0)
    with pytest.raises(TypeError, match="levels must be an integer"):
        gaussian_pyramid(np.zeros((20, 20)), 2.0)


def test_upsample_matches_map_coordinates(xp):
    rng = np.random.default_rng(2)
    coarse = rng.random((11, 13)).astype(np.float32)
    out = upsample_level(xp.asarray(coarse), 2, (41, 50))
    assert_backend(out, xp)
    rows, cols = np.meshgrid(np.arange(41) / 4, np.arange(50) / 4, indexing="ij")
    expected = ndi.map_coordinates(coarse.astype(np.float64), [rows, cols], order=3, mode="nearest")
    np.testing.assert_allclose(host(out), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("level", [0, 1, 2, 3])
@pytest.mark.parametrize("shape", [(41, 50), (64, 64), (9, 17), (3, 100)])
def test_separable_upsampling_is_map_coordinates(level, shape):
    # Two 1-D passes by phase, float64 sums: the float32 values of map_coordinates.
    rng = np.random.default_rng(level)
    coarse = rng.normal(size=(-(-shape[0] // 2**level), -(-shape[1] // 2**level))).astype(np.float32)
    if level == 0:
        shape = (shape[0] + 1, shape[1])  # level 0 onto another shape: not a copy
    rows, cols = np.meshgrid(np.arange(shape[0]) / 2**level, np.arange(shape[1]) / 2**level, indexing="ij")
    expected = ndi.map_coordinates(coarse.astype(np.float64), [rows, cols], order=3, mode="nearest")
    np.testing.assert_allclose(upsample_level(coarse, level, shape), expected.astype(np.float32), rtol=1e-6,
                               atol=1e-6)


def test_upsampling_beyond_the_level_clamps_as_map_coordinates():
    # A level-0 grid larger than the level covers reads past the padded spline: map_coordinates' clamping.
    coarse = np.random.default_rng(3).random((5, 6)).astype(np.float32)
    rows, cols = np.meshgrid(np.arange(120) / 2, np.arange(30) / 2, indexing="ij")
    expected = ndi.map_coordinates(coarse.astype(np.float64), [rows, cols], order=3, mode="nearest")
    np.testing.assert_allclose(upsample_level(coarse, 1, (120, 30)), expected, rtol=1e-5, atol=1e-5)


def test_upsampled_levels_stay_aligned_with_level_zero():
    # A linear ramp survives blurring (away from edges) and cubic interpolation
    # exactly, so every upsampled level must reproduce it where no edge is near.
    rows, cols = np.mgrid[:96, :80].astype(np.float64)
    ramp = 0.7 * rows - 0.3 * cols
    for k, level in enumerate(gaussian_pyramid(ramp, 4)):
        up = upsample_level(level, k, ramp.shape)
        margin = 12 * 2**k
        np.testing.assert_allclose(up[margin:-margin, margin:-margin], ramp[margin:-margin, margin:-margin], atol=1e-6)
