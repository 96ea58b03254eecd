import json
import warnings

import numpy as np
import pytest

from ggrad_gpu import refine
from ggrad_gpu.io.records import CONVENTION, read_transform, transform_record, weights_record
from ggrad_gpu.synthetic import make_phantom


@pytest.fixture(scope="module")
def refinement():
    phantom = make_phantom(shape=(160, 190), bands=16, seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return refine(phantom.guide, phantom.cube, initial=phantom.initial, backend="numpy", levels=3)


def test_transform_record_round_trips_through_json(tmp_path, refinement):
    record = transform_record(refinement, guide={"shape": [160, 190]})
    path = tmp_path / "transform.json"
    path.write_text(json.dumps(record))
    np.testing.assert_array_equal(read_transform(path), refinement.matrix)  # floats survive JSON exactly
    loaded = json.loads(path.read_text())
    np.testing.assert_array_equal(np.array(loaded["initial"]), refinement.initial)
    assert loaded["convention"] == CONVENTION and "pull-back" in CONVENTION
    assert loaded["improved"] == refinement.improved
    assert loaded["quality"]["ncc_after"] == pytest.approx(refinement.quality["ncc_after"])
    assert loaded["working_grid"]["shape"] == list(refinement.gradient.grad_x.shape)
    np.testing.assert_array_equal(loaded["working_grid"]["working_to_guide"], refinement.working_to_guide)
    assert {"ggrad_gpu", "numpy", "scipy"} <= set(loaded["versions"])
    assert loaded["timings_s"]["total"] > 0


def test_weights_record(refinement):
    gradient = refinement.gradient
    centres = np.linspace(400, 1800, 16)
    record = json.loads(json.dumps(weights_record(gradient, band_centres=centres, band_unit="cm-1")))
    np.testing.assert_array_equal(record["channel_weights"], gradient.channel_weights)
    np.testing.assert_array_equal(record["alpha"], gradient.alpha)
    np.testing.assert_array_equal(record["band_centres"], centres)
    for level, active in enumerate(record["active_bands"]):
        np.testing.assert_array_equal(active, np.flatnonzero(gradient.channel_weights[level] > 0))
    with pytest.raises(ValueError, match="band_centres"):
        weights_record(gradient, band_centres=centres[:-1])


def test_read_transform_from_text(tmp_path):
    matrix = np.array([[0.2, 0.01, -3.5], [-0.01, 0.2, 4.25], [0, 0, 1]])
    path = tmp_path / "initial.txt"
    np.savetxt(path, matrix)
    np.testing.assert_array_equal(read_transform(path), matrix)


@pytest.mark.parametrize(
    "content, match",
    [
        ('{"matrix": [[1, 0], [0, 1]]}', "3x3"),
        ('{"transform": [[1, 0, 0], [0, 1, 0], [0, 0, 1]]}', "matrix"),
        ("{not json", "JSON"),
        ("1 2 3\n4 5 6\n", "3x3"),
        ("1 2 x\n", "text"),
        ('{"matrix": [[1, 0, NaN], [0, 1, 0], [0, 0, 1]]}', "finite"),
    ],
)
def test_read_transform_errors_name_the_file(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match) as info:
        read_transform(path)
    assert "bad.json" in str(info.value)


def test_read_transform_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        read_transform(tmp_path / "nowhere.json")
