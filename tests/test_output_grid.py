"""``output_grid="cube"``: the registered cube at about the cube's own pixel size (DESIGN "Grids").

The references are independent of the pipeline: the native cube itself where the
grid samples exactly its pixel centres, ``warp_cube`` through the returned
matrices, and the footprint's corners mapped by hand.
"""

import json
import warnings

import numpy as np
import pytest

from ggrad_gpu import refine, warp_cube
from ggrad_gpu.cli.command import main
from ggrad_gpu.core.geometry import cube_output_grid, fov_matrix
from ggrad_gpu.synthetic import make_phantom


def _refine(guide, cube, initial, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return refine(guide, cube, initial=initial, backend="numpy", **options)


def test_cube_grid_of_the_field_of_view_samples_the_cube_pixel_centres():
    cube = np.random.default_rng(0).random((60, 70, 3), dtype=np.float32)
    to_guide, shape = cube_output_grid((600, 700), cube.shape, fov_matrix((600, 700), cube.shape))
    assert shape == (60, 70)
    # Output pixel i sits at the centre of guide block i (10 x 10 pixels), which is cube pixel i.
    np.testing.assert_allclose(fov_matrix((600, 700), cube.shape) @ to_guide, np.eye(3), atol=1e-12)
    registered = warp_cube(cube, fov_matrix((600, 700), cube.shape) @ to_guide, shape)
    np.testing.assert_allclose(registered, cube, atol=1e-6)


@pytest.mark.parametrize("factor, offset", [(2.6, (100.3, 41.7)), (1.2, (7.0, 300.5)), (0.5, (20.0, 20.0))])
def test_cube_grid_is_guide_aligned_and_covers_the_footprint(factor, offset):
    cube_shape = (40, 50)
    to_cube = np.linalg.inv(np.array([[factor, 0, offset[0]], [0, factor, offset[1]], [0, 0, 1.0]]))
    to_guide, shape = cube_output_grid((400, 500), cube_shape, to_cube)
    k = int(to_guide[0, 0])
    assert k == max(1, round(factor))
    origin = to_guide[:2, 2] - (k - 1) / 2
    assert np.all(origin % k == 0) and np.all(origin >= 0)  # whole guide blocks from the guide's corner
    # The footprint's corners (pixel edges) in guide pixels, and the guide pixels the grid spans.
    corners = [offset[axis] + factor * np.array([-0.5, cube_shape[axis] - 0.5]) for axis in (0, 1)]
    for axis in (0, 1):
        first, last = origin[axis], origin[axis] + k * shape[axis]  # guide pixel edges of the grid
        assert first <= max(corners[axis][0] + 0.5, 0) < first + k
        assert last - k < min(corners[axis][1] + 0.5, (400, 500)[axis]) <= last


def test_refine_on_the_cube_grid_is_the_cube_warped_there():
    phantom = make_phantom(shape=(240, 280), bands=16, seed=3, native_factor=5, shift=(6.0, -4.0),
                           signatures="mixed")
    result = _refine(phantom.guide, phantom.cube, phantom.initial, output_grid="cube")
    assert result.improved
    rows, cols = result.registered.shape[:2]
    # About the cube's size (a shifted footprint may reach into one more block), not the guide's.
    assert abs(rows - phantom.cube.shape[0]) <= 1 and abs(cols - phantom.cube.shape[1]) <= 1
    expected = warp_cube(phantom.cube, result.matrix @ result.output_to_guide, (rows, cols))
    np.testing.assert_array_equal(result.registered, expected)
    np.testing.assert_array_equal(result.valid, np.isfinite(expected).any(axis=2))
    working = _refine(phantom.guide, phantom.cube, phantom.initial)
    np.testing.assert_array_equal(working.output_to_guide, working.working_to_guide)
    np.testing.assert_allclose(working.matrix, result.matrix)


@pytest.mark.slow  # over 0.75 s: the fast lane stays under a minute
def test_cli_writes_the_cube_grid_and_records_it(tmp_path):
    phantom = make_phantom(shape=(200, 240), bands=8, seed=4, shift=(5.0, -3.0), signatures="mixed")
    np.save(tmp_path / "guide.npy", phantom.guide)
    np.save(tmp_path / "cube.npy", phantom.cube)
    np.savetxt(tmp_path / "initial.txt", phantom.initial)
    out = tmp_path / "out"
    code = main(["refine", str(tmp_path / "guide.npy"), str(tmp_path / "cube.npy"), "-o", str(out), "-q",
                 "--initial", str(tmp_path / "initial.txt"), "--output-grid", "cube"])
    assert code == 0
    record = json.loads((out / "transform.json").read_text())
    registered = np.load(out / "registered.npy")
    assert list(registered.shape[:2]) == record["output_grid"]["shape"]
    expected = warp_cube(phantom.cube, np.array(record["matrix"]) @ np.array(record["output_grid"]["output_to_guide"]),
                         registered.shape[:2])
    np.testing.assert_array_equal(registered, expected)
