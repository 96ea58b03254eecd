"""Instrument files read whole: Renishaw .wdf (the map, its white-light image, the stage transform) and
the Agilent FTIR mosaic with its visible images, whose placement is checked by cross-correlation."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.signal import fftconvolve

from ggrad_gpu.cli.command import main
from ggrad_gpu.io import read_instrument, stage_matrix
from ggrad_gpu.io.libraries import require

from helpers import DATA, has_module

RENISHAW = DATA / "renishaw-raman-whitelight"
WDF_FILES = {"renishaw_test_map2.wdf": (20, 20, 1015), "renishaw_test_map.wdf": (3, 3, 47)}


def _wdf(name):
    if not has_module("rsciio"):
        pytest.skip("rosettasciio is not installed")
    path = RENISHAW / name
    if not path.exists():
        pytest.skip("the Renishaw data set is not available")
    return path


def _agilent_dmt():
    if not has_module("agilent_format"):
        pytest.skip("agilent-format is not installed")
    import agilent_format

    path = Path(agilent_format.__file__).parent / "datasets" / "5_mosaic_agg1024.dmt"
    if not path.exists():
        pytest.skip("agilent-format ships without its datasets")
    return path


def test_stage_matrix_against_stage_positions():
    # Guide pixel p's centre is on the stage at origin + (p + 0.5) * pixel; cube point q at first + q * step.
    image_origin, pixel, first, step = (-30.0, 12.5), (0.8, 0.75), (-20.0, 20.0), (2.0, 2.5)
    matrix = stage_matrix(image_origin, pixel, first, step)
    for p in [(0, 0), (17, 3), (120, 250)]:
        stage = [image_origin[a] + (p[a] + 0.5) * pixel[a] for a in range(2)]
        expected = [(stage[a] - first[a]) / step[a] for a in range(2)]
        np.testing.assert_allclose((matrix @ [p[0], p[1], 1.0])[:2], expected)
    # "corner": the map's origin is its outer corner, so its first point's centre is half a step inside.
    np.testing.assert_allclose(stage_matrix(image_origin, pixel, (-21.0, 18.75), step, map_origin_at="corner"), matrix)
    with pytest.raises(ValueError, match="map_step"):
        stage_matrix(image_origin, pixel, first, (0.0, 1.0))


@pytest.mark.data
@pytest.mark.parametrize("name", sorted(WDF_FILES))
def test_renishaw_file_read_whole(name):
    path = _wdf(name)
    sample = read_instrument(path)
    assert sample.cube.shape == WDF_FILES[name] and sample.cube.dtype == np.float32
    assert sample.guide.shape == (480, 752) and sample.guide.dtype == np.float32
    assert sample.band_axis.units == "nm" and sample.band_axis.values.shape == (WDF_FILES[name][2],)
    assert sample.initial_source == "renishaw-wdf stage metadata"
    # Independent of the matrix: the stage positions rsciio reports for the map and the image.
    from rsciio.renishaw import file_reader

    spectral_map, image = file_reader(str(path))
    rows, cols = spectral_map["axes"][:2]
    image_rows, image_cols = image["axes"][:2]
    for q in [(0, 0), (WDF_FILES[name][0] - 1, WDF_FILES[name][1] - 1)]:
        p = np.linalg.solve(sample.initial, [q[0], q[1], 1.0])[:2]  # the guide point under map point q
        stage = [float(image_rows["offset"]) + (p[0] + 0.5) * float(image_rows["scale"]),
                 float(image_cols["offset"]) + (p[1] + 0.5) * float(image_cols["scale"])]
        np.testing.assert_allclose(stage, [float(rows["offset"]) + q[0] * float(rows["scale"]),
                                           float(cols["offset"]) + q[1] * float(cols["scale"])], atol=1e-3)
    # The white-light image is the luma of the RGB the file holds.
    rgb = np.stack([image["data"][c] for c in "RGB"], axis=-1).astype(np.float64)
    np.testing.assert_allclose(sample.guide, rgb @ [0.2125, 0.7154, 0.0721], rtol=1e-5)


@pytest.mark.data
@pytest.mark.parametrize("name", [pytest.param("renishaw_test_map2.wdf", marks=pytest.mark.slow),
                                  "renishaw_test_map.wdf"])
@pytest.mark.slow  # over 0.75 s: the fast lane stays under a minute
def test_renishaw_file_through_the_command_line(tmp_path, name):
    path = _wdf(name)
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "ggrad_gpu", "refine", str(path), "-o", str(out), "-q",
                           "--backend", "numpy"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert {p.name for p in out.iterdir()} == {"registered.npy", "transform.json", "weights.json", "report.png"}
    record = json.loads((out / "transform.json").read_text())
    sample = read_instrument(path)
    assert record["initial_source"] == "renishaw-wdf stage metadata"
    np.testing.assert_allclose(record["initial"], sample.initial)
    assert record["guide"]["shape"] == [480, 752] and record["cube"]["shape"] == list(WDF_FILES[name])
    assert record["cube"]["instrument"]["map_step_um"] == sample.metadata["map_step_um"]
    assert np.load(out / "registered.npy").shape[2] == WDF_FILES[name][2]
    # No known truth: the guard keeps the stage transform of both maps (see test_real_geometry).
    assert not record["improved"], record["message"]
    np.testing.assert_array_equal(record["matrix"], record["initial"])
    weights = json.loads((out / "weights.json").read_text())
    assert weights["band_unit"] == "nm" and len(weights["band_centres"]) == WDF_FILES[name][2]


def _cross_correlation_peak(template, image):
    """(row, col) of ``image`` where ``template``'s top-left pixel lands at the highest normalised correlation."""
    template = (template - template.mean()) / template.std()
    ones = np.ones_like(template)
    sums = fftconvolve(image, ones[::-1, ::-1], mode="valid")
    squares = fftconvolve(image ** 2, ones[::-1, ::-1], mode="valid")
    spread = np.sqrt(np.maximum(squares - sums ** 2 / template.size, 1e-12))
    score = fftconvolve(image, template[::-1, ::-1], mode="valid") / spread
    return np.unravel_index(np.argmax(score), score.shape)


def test_agilent_visible_pair_placed_where_cross_correlation_puts_it():
    sample = read_instrument(_agilent_dmt())
    assert sample.cube.shape == (8, 4, 9) and sample.band_axis.units == "cm-1"
    assert sample.initial_source.startswith("agilent-dmt")
    overview, cutout = sample.images
    assert (overview.name, cutout.name) == ("Entire Image", "IR Cutout")
    assert sample.guide is overview.image and overview.image.shape == (328, 307) and cutout.image.shape == (280, 140)
    # The IR field's outer corner (cube coordinate -0.5, -0.5) on each image, from the metadata alone.
    corner = [np.linalg.solve(image.to_cube, [-0.5, -0.5, 1.0])[:2] + 0.5 for image in sample.images]
    np.testing.assert_allclose(corner[1], [0, 0], atol=1e-9)  # the cutout is the IR field
    # Independent evidence: where the cutout's pixels match the overview's best.
    peak = _cross_correlation_peak(cutout.image.astype(np.float64), overview.image.astype(np.float64))
    assert tuple(int(v) for v in peak) == (9, 40)
    assert np.hypot(*(corner[0] - peak)) <= 1.5, (corner[0], peak)


@pytest.mark.data
def test_agilent_cube_matches_the_shared_conversion():
    shared = DATA / "agilent-ftir-mosaic"
    if not (shared / "cube.npy").exists():
        pytest.skip("the Agilent data set is not available")
    sample = read_instrument(_agilent_dmt())
    np.testing.assert_array_equal(sample.cube, np.load(shared / "cube.npy"))
    np.testing.assert_allclose(sample.band_axis.values, np.load(shared / "wavenumbers.npy"))


def test_bad_instrument_inputs_name_the_file(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="missing.wdf"):
        read_instrument(tmp_path / "missing.wdf")
    unknown = tmp_path / "scan.spc"
    unknown.write_bytes(b"\0" * 64)
    with pytest.raises(ValueError, match=r"scan.spc: unknown format '.spc'"):
        read_instrument(unknown)
    broken = tmp_path / "broken.wdf"
    broken.write_bytes(b"not a wdf file at all")
    if has_module("rsciio"):
        with pytest.raises(ValueError, match="broken.wdf"):
            read_instrument(broken)
    # The command line: a single input that is not an instrument file, and a missing one.
    np.save(tmp_path / "cube.npy", np.zeros((4, 4, 3), np.float32))
    assert main(["refine", str(tmp_path / "cube.npy"), "-o", str(tmp_path / "out")]) == 2
    assert "instrument file" in capsys.readouterr().err
    assert main(["refine", str(tmp_path / "missing.wdf"), "-o", str(tmp_path / "out")]) == 2
    assert "missing.wdf" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_missing_library_names_the_instruments_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "rsciio.renishaw", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r"rosettasciio.*ggrad_gpu\[instruments\]"):
        require("rsciio.renishaw", "rosettasciio", "reading a Renishaw .wdf file", extra="instruments")
    path = tmp_path / "map.wdf"
    path.write_bytes(b"\0")
    with pytest.raises(ImportError, match=r"ggrad_gpu\[instruments\]"):
        read_instrument(path)


@pytest.mark.data
@pytest.mark.slow
def test_guide_and_initial_override_the_file(tmp_path, capsys):
    path = _wdf("renishaw_test_map2.wdf")
    sample = read_instrument(path)
    # --initial: the file's cube and guide, the given matrix.
    shifted = sample.initial @ np.array([[1, 0, 2.0], [0, 1, -3.0], [0, 0, 1]])
    np.savetxt(tmp_path / "stage.txt", shifted)
    out = tmp_path / "with-initial"
    assert main(["refine", str(path), "--initial", str(tmp_path / "stage.txt"), "-o", str(out), "-q",
                 "--backend", "numpy"]) == 0
    record = json.loads((out / "transform.json").read_text())
    assert record["initial_source"] == "file"
    np.testing.assert_allclose(record["initial"], shifted)
    # --guide: another image; the file's stage transform places the map on its own image, so it is not used.
    np.save(tmp_path / "guide.npy", sample.guide[100:300, 200:500])
    out = tmp_path / "with-guide"
    assert main(["refine", "--guide", str(tmp_path / "guide.npy"), str(path), "-o", str(out), "-q",
                 "--backend", "numpy"]) == 0
    assert "stage transform" in capsys.readouterr().err
    record = json.loads((out / "transform.json").read_text())
    assert record["initial_source"] == "default" and record["guide"]["shape"] == [200, 300]


def test_agilent_cube_rows_run_down_the_visible_image():
    # Orientation from the data, not the reader's flag: the printed digit is transparent (bright in the
    # visible image, low absorbance), so the band mean anti-correlates with the cutout averaged onto the
    # cube's grid, in this orientation better than in any flip.
    sample = read_instrument(_agilent_dmt())
    cutout = sample.images[1].image.astype(np.float64)
    rows, cols = sample.cube.shape[:2]
    edges_r = np.linspace(0, cutout.shape[0], rows + 1).round().astype(int)
    edges_c = np.linspace(0, cutout.shape[1], cols + 1).round().astype(int)
    brightness = np.array([[cutout[edges_r[i]:edges_r[i + 1], edges_c[j]:edges_c[j + 1]].mean()
                            for j in range(cols)] for i in range(rows)])
    absorbance = sample.cube.mean(axis=2)
    flips = {"as read": absorbance, "rows flipped": absorbance[::-1], "cols flipped": absorbance[:, ::-1],
             "both flipped": absorbance[::-1, ::-1]}
    r = {name: np.corrcoef(brightness.ravel(), image.ravel())[0, 1] for name, image in flips.items()}
    print("band mean against visible brightness, r:", {k: round(float(v), 3) for k, v in r.items()})
    assert r["as read"] < -0.6 and min(r, key=r.get) == "as read", r
