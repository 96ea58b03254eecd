"""refine on a real cube: the SEM-EDS spectrum image against its own backscatter image.

The data live beside the project (``shared/data``, or ``GGRAD_DATA``); the tests
skip where they are absent. The backscatter image comes from the same scan, so
the true transform is the identity to about +-1 pixel (the data's README).
"""

import warnings

import numpy as np
import pytest

from ggrad_gpu import refine
from ggrad_gpu.metrics import target_registration_error
from ggrad_gpu.synthetic import affine_about_center

from helpers import DATA

pytestmark = pytest.mark.data

EDS = DATA / "sem-eds-bruker-30x30"


@pytest.fixture(scope="module")
def eds():
    if not (EDS / "cube.npy").exists():
        pytest.skip("the SEM-EDS data set is not available")
    return np.load(EDS / "image_asb.npy").astype(np.float32), np.load(EDS / "cube.npy", mmap_mode="r")


def test_eds_against_its_backscatter_image(eds):
    image, cube = eds
    before = cube.copy()
    # Backscatter is not transmitted light: no absorbance conversion.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        result = refine(image, np.asarray(cube), initial=np.eye(3), levels=2, absorbance=False, backend="numpy")
    tre = target_registration_error(result.matrix, np.eye(3), image.shape, spacing=3)
    print(f"EDS from the identity: {result.message}; TRE against the identity {tre.mean:.2f} / {tre.max:.2f} px")
    assert tre.max < 2.5  # the identity is right to about +-1 px
    np.testing.assert_array_equal(np.asarray(cube), before)  # the input is untouched


def test_eds_from_a_shifted_start_is_not_made_worse(eds):
    image, cube = eds
    start = affine_about_center(image.shape, shift=(2.0, -1.0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        result = refine(image, np.asarray(cube), initial=start, levels=2, absorbance=False, backend="numpy")
    before = target_registration_error(start, np.eye(3), image.shape, spacing=3)
    after = target_registration_error(result.matrix, np.eye(3), image.shape, spacing=3)
    print(f"EDS from a (2, -1) px shift: TRE {before.mean:.2f} -> {after.mean:.2f} px (max {after.max:.2f})")
    # 30 x 30 pixels hold too little structure to refine from 2 px off; what
    # matters is that the guard does not hand back something worse.
    assert after.mean <= before.mean + 0.1
