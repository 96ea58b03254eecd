import numpy as np
import pytest
import scipy.ndimage as ndi

from ggrad_gpu import register_affine
from ggrad_gpu.metrics import target_registration_error
from ggrad_gpu.registration import register as register_module
from ggrad_gpu.registration.register import affine_mse
from ggrad_gpu.synthetic import affine_about_center


SHAPE = (160, 192)


@pytest.fixture(scope="module")
def smooth_image():
    rng = np.random.default_rng(0)
    image = ndi.gaussian_filter(rng.random(SHAPE), 4)
    return ((image - image.mean()) / image.std()).astype(np.float32)


def moved(image, matrix):
    """The moving image whose content at ``matrix @ p`` is ``image`` at ``p``."""
    return ndi.affine_transform(image, np.linalg.inv(matrix), order=3, mode="nearest").astype(image.dtype)


CASES = [
    {"shift": (2.5, -1.5)},
    {"rotation_deg": 5, "scale": 1.05, "shear": 0.02, "shift": (12, -20)},
    {"rotation_deg": -5, "scale": 0.95, "shear": -0.02, "shift": (-30, 25)},
    {"rotation_deg": 3, "shift": (40, 0)},
]


@pytest.mark.parametrize("case", CASES)
def test_recovers_known_affine_transforms(xp, smooth_image, case):
    true = affine_about_center(SHAPE, **case)
    result = register_affine(xp.asarray(smooth_image), xp.asarray(moved(smooth_image, true)))
    assert isinstance(result.matrix, np.ndarray) and result.matrix.dtype == np.float64
    tre = target_registration_error(result.matrix, true, SHAPE)
    assert tre.max < 0.05
    assert result.mse_after < 0.05 * result.mse_before
    assert result.converged and result.iterations > 0


def test_moving_mask_keeps_garbage_out(smooth_image):
    true = affine_about_center(SHAPE, rotation_deg=2, shift=(6, -4))
    moving = moved(smooth_image, true)
    mask = np.ones(SHAPE, bool)
    mask[:, :50] = False
    moving[:, :50] = 50.0  # what an uncovered region may hold
    result = register_affine(smooth_image, moving, moving_mask=mask)
    assert target_registration_error(result.matrix, true, SHAPE).max < 0.05


def test_a_partial_field_is_evaluated_only_where_it_can_land(smooth_image, monkeypatch):
    # The moving image covers a quarter of the grid: the evaluations skip the fixed pixels that
    # cannot sample it, and the registration is the one over every pixel (to rounding).
    true = affine_about_center(SHAPE, rotation_deg=3, scale=1.02, shift=(5, -4))
    moving = moved(smooth_image, true)
    mask = np.zeros(SHAPE, bool)
    mask[40:120, 50:146] = True
    moving[~mask] = 50.0
    windowed = register_affine(smooth_image, moving, moving_mask=mask)
    sampled = []
    sample = register_module._Level._sample

    def counting(self, matrix, *images, **window):
        covered, values = sample(self, matrix, *images, **window)
        sampled.append(covered.size)
        return covered, values

    monkeypatch.setattr(register_module._Level, "_sample", counting)
    register_affine(smooth_image, moving, moving_mask=mask)
    windowed_samples, sampled[:] = sum(sampled), []
    monkeypatch.setattr(register_module, "_support_box", lambda coverage, xp: None)  # every pixel
    everywhere = register_affine(smooth_image, moving, moving_mask=mask)
    assert target_registration_error(windowed.matrix, true, SHAPE).max < 0.05
    np.testing.assert_allclose(windowed.matrix, everywhere.matrix, atol=1e-6)
    assert windowed.mse_after == pytest.approx(everywhere.mse_after, rel=1e-6)
    assert windowed_samples < 0.6 * sum(sampled)


def test_initial_is_the_starting_point(smooth_image):
    true = affine_about_center(SHAPE, shift=(3, 1))
    result = register_affine(smooth_image, moved(smooth_image, true), initial=true, coarse_search=False)
    assert target_registration_error(result.matrix, true, SHAPE).max < 0.05
    assert result.mse_before == pytest.approx(affine_mse(smooth_image, moved(smooth_image, true), true))


def test_affine_mse_against_brute_force(smooth_image):
    moving = np.roll(smooth_image, 3, axis=1)
    shift = np.array([[1.0, 0, 0], [0, 1, 3], [0, 0, 1]])
    # moving(p + (0, 3)) == smooth(p) inside: the MSE there is exactly 0.
    assert affine_mse(smooth_image, moving, shift) < 1e-10
    expected = np.mean((smooth_image[:, :-1] - moving[:, :-1]) ** 2)
    assert affine_mse(smooth_image, moving, np.eye(3), fixed_mask=np.pad(np.ones((160, 191), bool), ((0, 0), (0, 1)))) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"initial": np.eye(2)}, "initial must be a finite 3x3"),
        ({"moving_mask": np.ones((3, 3), bool)}, "moving_mask must have shape"),
    ],
)
def test_errors(smooth_image, kwargs, match):
    with pytest.raises(ValueError, match=match):
        register_affine(smooth_image, smooth_image, **kwargs)
    with pytest.raises(ValueError, match="fixed must be 2-D"):
        register_affine(smooth_image[None], smooth_image)
