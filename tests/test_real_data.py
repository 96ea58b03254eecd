"""refine on a real cube: the SEM-EDS spectrum image against its own backscatter image.

The data live beside the project (``shared/data``, or ``GGRAD_DATA``); the tests
skip where they are absent. The backscatter image comes from the same scan; the
data's README measured the element maps one column to the right of it
(``map[:, j + 1] ~ asb[:, j]``, the best integer match), and refine lands within
a quarter of a pixel of that placement from every start it refines (the guide-
to-cube matrix shifts columns by +1): the truth these tests score against.
"""

import warnings

import numpy as np
import pytest

from ggrad_gpu import refine
from ggrad_gpu.metrics import target_registration_error
from ggrad_gpu.synthetic import affine_about_center

from helpers import DATA

pytestmark = [pytest.mark.data, pytest.mark.slow]  # each refine reads 30 x 30 x 2048 values

EDS = DATA / "sem-eds-bruker-30x30"


@pytest.fixture(scope="module")
def eds():
    if not (EDS / "cube.npy").exists():
        pytest.skip("the SEM-EDS data set is not available")
    return np.load(EDS / "image_asb.npy").astype(np.float32), np.load(EDS / "cube.npy", mmap_mode="r")


# The README's one-column placement: guide column j is cube column j + 1.
TRUTH = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0], [0.0, 0.0, 1.0]])


def _refine(image, cube, start):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        result = refine(image, np.asarray(cube), initial=start, absorbance=False, backend="numpy")
    return result, caught


def test_eds_against_its_backscatter_image(eds):
    image, cube = eds
    before = cube.copy()
    # From the identity: refined, to the README's one-column placement (measured 0.21 px mean).
    result, _ = _refine(image, cube, np.eye(3))
    tre = target_registration_error(result.matrix, TRUTH, image.shape, spacing=3)
    print(f"EDS from the identity: {result.message}; TRE {tre.mean:.2f} / {tre.max:.2f} px")
    assert result.improved, result.message
    assert tre.mean < 0.5 and tre.max < 1.0
    np.testing.assert_array_equal(np.asarray(cube), before)  # the input is untouched


# Each start and the outcome it gets: refined to the one-column placement (measured
# 0.18-0.25 px mean), or kept because the fit scales the small map beyond a factor 1.1.
STARTS = [((1.0, 0.0), "refined"), ((1.0, -1.0), "refined"), ((0.5, 0.5), "refined"), ((0.0, 1.0), "refined"),
          ((2.0, -1.0), "implausible")]


@pytest.mark.parametrize("shift, outcome", STARTS)
def test_eds_from_a_shifted_start(eds, shift, outcome):
    image, cube = eds
    start = affine_about_center(image.shape, shift=shift)
    result, caught = _refine(image, cube, start)
    tre = target_registration_error(result.matrix, TRUTH, image.shape, spacing=3)
    print(f"from a {shift} px shift: {result.message}; TRE {tre.mean:.2f} / {tre.max:.2f} px")
    if outcome == "refined":
        assert result.improved, result.message
        assert tre.mean < 0.5 and tre.max < 1.0
    else:
        assert not result.improved and outcome in result.message
        np.testing.assert_array_equal(result.matrix, start)
        assert any("kept the initial transform" in str(w.message) for w in caught)
