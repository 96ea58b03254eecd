import numpy as np
import pytest
import scipy.ndimage as ndi

from ggrad_gpu import sobel_magnitude
from ggrad_gpu.core.filters import iter_sobel_blocks

from helpers import assert_backend, host


def reference_sobel(image):
    image = np.asarray(image, dtype=np.float64)
    return np.hypot(ndi.sobel(image, axis=0), ndi.sobel(image, axis=1))


@pytest.mark.parametrize("shape", [(37, 29), (1, 9), (8, 1), (2, 2), (23, 31, 7), (5, 3, 1)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint16])
def test_sobel_matches_scipy_per_band(xp, shape, dtype):
    rng = np.random.default_rng(0)
    data = (rng.random(shape) * 1000).astype(dtype)
    out = sobel_magnitude(xp.asarray(data))
    assert_backend(out, xp)
    assert out.shape == shape
    assert out.dtype == (np.float64 if dtype == np.float64 else np.float32)
    if data.ndim == 2:
        expected = reference_sobel(data)
    else:
        expected = np.stack([reference_sobel(data[..., b]) for b in range(shape[2])], axis=-1)
    tol = 1e-12 if dtype == np.float64 else 2e-6
    np.testing.assert_allclose(host(out), expected, rtol=tol, atol=tol * np.abs(expected).max())


def test_bands_do_not_mix(xp):
    cube = np.zeros((9, 9, 5), np.float32)
    cube[4, 4, 2] = 1.0  # a spike in one band only
    out = host(sobel_magnitude(xp.asarray(cube)))
    assert out[..., [0, 1, 3, 4]].max() == 0
    # ndimage.sobel on the 3-D array would smooth across bands; ours must not.
    assert ndi.sobel(cube, axis=0)[..., 1].max() > 0
    np.testing.assert_allclose(out[..., 2], reference_sobel(cube[..., 2]), atol=1e-6)


@pytest.mark.parametrize("rows", [1, 2, 5, 40])
def test_blocks_cover_rows_and_select_bands(rows):
    rng = np.random.default_rng(1)
    cube = rng.random((17, 13, 6)).astype(np.float32)
    whole = sobel_magnitude(cube)
    seen = np.zeros(17, bool)
    for start, stop, block in iter_sobel_blocks(cube, rows=rows, bands=np.array([1, 4])):
        np.testing.assert_allclose(block, whole[start:stop][..., [1, 4]], rtol=1e-6)
        seen[start:stop] = True
    assert seen.all()


@pytest.mark.parametrize(
    "bad, error, match",
    [
        (np.zeros(5), ValueError, "image_or_cube must be 2-D"),
        (np.zeros((2, 2, 2, 2)), ValueError, "got shape"),
        (np.zeros((3, 3), complex), TypeError, "real"),
        (np.zeros((0, 3)), ValueError, "empty"),
        ([[1, 2], [3, 4]], TypeError, "NumPy or CuPy array"),
    ],
)
def test_sobel_rejects_bad_input(bad, error, match):
    with pytest.raises(error, match=match):
        sobel_magnitude(bad)
