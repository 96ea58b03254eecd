import numpy as np
import pytest
import scipy.ndimage as ndi

from ggrad_gpu import synthetic, warp_cube
from ggrad_gpu.coverage import fill_gaps


def test_deterministic_from_seed():
    a = synthetic.make_phantom(shape=(40, 48), bands=12, seed=5)
    b = synthetic.make_phantom(shape=(40, 48), bands=12, seed=5)
    c = synthetic.make_phantom(shape=(40, 48), bands=12, seed=6)
    np.testing.assert_array_equal(a.guide, b.guide)
    np.testing.assert_array_equal(a.cube, b.cube)
    assert not np.array_equal(a.cube, c.cube)


def test_geometry_and_conventions():
    p = synthetic.make_phantom(shape=(90, 100), bands=20, native_factor=5, seed=1)
    assert p.guide.shape == (90, 100) and p.guide.dtype == np.float32
    assert p.cube.shape == (18, 20, 20) and p.cube.dtype == np.float32
    np.testing.assert_allclose(p.matrix, p.initial @ p.misregistration)
    # The default initial maps the guide's corners onto the cube's (pixel edges).
    edge = p.initial @ np.array([-0.5, -0.5, 1.0])
    np.testing.assert_allclose(edge[:2], [-0.5, -0.5])
    far = p.initial @ np.array([89.5, 99.5, 1.0])
    np.testing.assert_allclose(far[:2], [17.5, 19.5])


def test_area_normalisation_makes_the_band_sum_constant():
    p = synthetic.make_phantom(shape=(40, 48), bands=30, seed=2)
    np.testing.assert_allclose(p.cube.sum(axis=2), 30, rtol=1e-5)
    snv = synthetic.make_phantom(shape=(40, 48), bands=30, seed=2, normalisation="snv")
    np.testing.assert_allclose(snv.cube.mean(axis=2), 0, atol=1e-5)
    with pytest.raises(ValueError, match="normalisation"):
        synthetic.make_phantom(normalisation="max")


def test_true_matrix_puts_the_cube_on_the_scene():
    # Unmix the noise-free, unnormalised cube with the known spectra: the
    # component fractions, brought onto the guide grid with the true matrix,
    # must match the blurred true abundances far better than with the initial one.
    p = synthetic.make_phantom(shape=(120, 140), bands=60, noise=0.0, normalisation=None, seed=3,
                               rotation_deg=3.0, shift=(8.0, -10.0))
    coefficients = np.linalg.lstsq(p.spectra.T, p.cube.reshape(-1, 60).T, rcond=None)[0].T
    fractions = coefficients / coefficients.sum(axis=1, keepdims=True)
    fraction_cube = fractions.reshape(p.cube.shape[:2] + (-1,)).astype(np.float32)
    truth = ndi.gaussian_filter(p.abundances[0], 2.5)

    def score(matrix):
        on_guide = warp_cube(fraction_cube, matrix, p.guide.shape, order=1)[..., 0]
        on_guide = fill_gaps(on_guide, np.isnan(on_guide))  # beyond the footprint: its edge
        inner = (slice(15, -15), slice(15, -15))
        return np.corrcoef(on_guide[inner].ravel(), truth[inner].ravel())[0, 1]

    assert score(p.matrix) > 0.97
    assert score(p.matrix) > score(p.initial) + 0.1


def test_affine_about_center_keeps_the_center():
    m = synthetic.affine_about_center((51, 71), rotation_deg=7, scale=1.1, shear=0.02)
    np.testing.assert_allclose(m @ [25, 35, 1], [25, 35, 1])
    shifted = synthetic.affine_about_center((51, 71), shift=(3, -4))
    np.testing.assert_allclose(shifted @ [0, 0, 1], [3, -4, 1])


def test_cube_on_guide_is_finite_and_guide_shaped(small_phantom):
    cube = small_phantom.cube_on_guide
    assert cube.shape == small_phantom.guide.shape + (small_phantom.cube.shape[2],)
    assert np.isfinite(cube).all()
