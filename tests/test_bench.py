"""The benchmark definitions (ggrad_gpu.cli.bench), ``ggrad bench`` and the plain way on the tiny size, NumPy.

Each stage runs, the table renders and the command exits 0; with the
repository's plain way (benchmarks/reference.py, not in the package) each
result agrees with the plain way's. Plumbing, not figures: the times are not
checked.
"""

import contextlib
import io
import json

import numpy as np
import pytest
import scipy.ndimage as ndi

from benchmarks import reference
from ggrad_gpu import resolve_backend
from ggrad_gpu.cli import bench
from ggrad_gpu.cli.command import main

TINY = bench.SIZES["tiny"][0]
NUMERIC = [name for name in bench.STAGES if reference.build(name, bench.Data(TINY)).compare is not None]
SITK = list(reference.SITK_STAGES)


def _cupy_usable() -> bool:
    try:
        resolve_backend("cupy")
    except RuntimeError:
        return False
    return True


@pytest.fixture(scope="module")
def command(tmp_path_factory):
    """``ggrad bench --sizes tiny`` once: exit code, stdout and the rows of its JSON."""
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["bench", "--sizes", "tiny", "--backend", "numpy", "--repeat", "1", "--json", str(path)])
    return code, out.getvalue(), json.loads(path.read_text())


@pytest.fixture(scope="module")
def with_reference():
    """The tiny size's stages on NumPy with the plain way first (benchmarks/reference.py)."""
    return reference.run([TINY], ["numpy"], list(bench.STAGES), repeat=1)


def _rows(results, backend):
    return {row["stage"]: row for row in results["rows"] if row["backend"] == backend}


def test_command_prints_a_table(command):
    code, stdout, _ = command
    assert code == 0
    lines = stdout.splitlines()
    header = next(line for line in lines if line.startswith("| stage"))
    for column in ("time", "throughput", "% of peak", "vs plain"):
        assert column in header
    body = [line for line in lines if line.startswith("| ") and line != header]
    assert {line.split("|")[1].strip() for line in body} == set(bench.STAGES)
    assert any(line.startswith("- CPU") and "GFLOP/s" in line for line in lines)


def test_every_stage_runs_on_numpy(command):
    rows = _rows(command[2], "numpy")
    assert list(rows) == list(bench.STAGES)
    rows_, cols, bands = TINY
    for row in rows.values():
        assert "error" not in row, row
        assert row["size"] == "64x80x16" and row["rounds"] == 1 and row["median_s"] > 0 and row["warmup_s"] > 0
        assert row["h2d_s"] is None  # nothing to copy on NumPy
    for name in ("sobel", "pyramid", "combine", "warp"):
        assert rows[name]["unit"] == "GB/s" and rows[name]["throughput"] > 0 and rows[name]["frac_peak"] > 0
    assert rows["gram"]["flops"] == 2 * rows_ * cols * bands**2 and rows["gram"]["unit"] == "GFLOP/s"
    assert rows["nnls"]["active_bands"] >= 1
    for name in ("register", "refine"):
        assert np.isfinite(rows[name]["tre_px"])
    assert rows["register"]["tre_px"] < 2  # a 1.5 deg, 2 %, 11 px misregistration of gradient images


def test_the_command_has_no_plain_way(command):
    assert not _rows(command[2], "plain") and not command[2]["skipped"]


def test_results_agree_with_the_plain_way(with_reference):
    plain, ours = _rows(with_reference, "plain"), _rows(with_reference, "numpy")
    for name in NUMERIC:  # no SimpleITK needed
        assert name in plain and "error" not in plain[name], plain.get(name)
        tolerance = reference.build(name, bench.Data(TINY)).tolerance
        assert ours[name]["difference"] <= tolerance, (name, ours[name]["difference"])
    assert ours["nnls"]["difference"] > -1e-6  # the plain objective is the exact optimum


def test_plain_way_of_the_registrations_needs_simpleitk(with_reference):
    plain, skipped = _rows(with_reference, "plain"), with_reference["skipped"]
    if skipped:  # SimpleITK is not installed: said once per stage that needs it, nothing else skipped
        assert len(skipped) == len(SITK) and all("SimpleITK" in line for line in skipped)
        assert not set(SITK) & set(plain)
    else:
        for name in SITK:
            assert np.isfinite(plain[name]["tre_px"])


def test_table_and_case_lines():
    rows = []
    for case, (ours, theirs) in enumerate([(2.0, 20.0), (1.0, 30.0)]):
        for backend, seconds in (("numpy", ours), ("plain", theirs)):
            rows.append({"stage": "refine", "size": "350x415x1000", "case": case, "backend": backend,
                         "median_s": seconds, "tre_px": 0.1})
    table = bench.markdown_table(rows).splitlines()
    assert len(table) == 4 and "(2 cases)" in table[2]
    numpy_row = next(line for line in table if "| numpy" in line)
    assert "16.7x" in numpy_row  # mean plain 25 s over mean ggrad 1.5 s
    lines = bench.case_lines(rows)
    assert lines[1].endswith("= 10.0x") and lines[2].endswith("= 30.0x") and lines[3].endswith("= 16.7x")


def test_rows_from_pytest_benchmark():
    row = {"stage": "sobel", "size": "64x80x16", "case": None, "backend": "numpy", "median_s": 9.0,
           "bytes_moved": 2e9, "peak_kind": "bandwidth"}
    machine = {"device": "CPU", "versions": "", "copy_gbps": 40.0, "gemm_gflops": {}, "gemm_n": 1}
    document = {"benchmarks": [{"stats": {"median": 0.5}, "extra_info": {"row": row, "machine": machine}},
                               {"stats": {"median": 1.0}, "extra_info": {}}]}
    rows, machines = bench.rows_from_pytest_benchmark(document)
    assert len(rows) == 1 and rows[0]["median_s"] == 0.5 and rows[0]["throughput"] == pytest.approx(4.0)
    assert rows[0]["frac_peak"] == pytest.approx(0.1) and machines == {"numpy": machine}


def test_parse_sizes_and_stages():
    assert bench.parse_sizes("tiny") == [TINY]
    assert bench.parse_sizes("paper, 350x415x1000,small") == [(350, 415, 1000), (350, 415, 200)]
    for bad in ("huge", "350x415", "10x10x3", "0x40x4"):
        with pytest.raises(ValueError, match="sizes"):
            bench.parse_sizes(bad)
    assert bench.parse_stages(None) == list(bench.STAGES)
    assert bench.parse_stages("refine, sobel") == ["sobel", "refine"]
    with pytest.raises(ValueError, match="stages"):
        bench.parse_stages("sobel,fft")


def test_refine_cases_are_drawn_once():
    """The end-to-end cases (benchmarks/RESULTS.md) must not change: a prefix does not depend on the count."""
    five = bench.draw_cases(5)
    assert bench.draw_cases(2) == five[:2] and [case.seed for case in five] == list(range(5))
    for case in five:
        assert -5 <= case.rotation_deg <= 5 and 0.95 <= case.scale <= 1.05 and np.hypot(*case.shift) <= 45
    assert bench.Data(bench.PAPER, case=3).refine_phantom.cube.shape == (70, 83, 1000)


@pytest.mark.skipif(_cupy_usable(), reason="CuPy is usable here")
def test_cupy_where_there_is_none(capsys):
    with pytest.raises(ValueError, match="cupy"):
        bench.backends_for("cupy")
    assert bench.backends_for("auto") == (["numpy"], None)
    backends, note = bench.backends_for("both")
    assert backends == ["numpy"] and "cupy" in note
    assert main(["bench", "--sizes", "tiny", "--backend", "cupy"]) == 2
    assert "cupy" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not _cupy_usable(), reason="CuPy sees no device")
def test_cupy_stages_agree_with_numpy():
    results = bench.run([TINY], ["numpy", "cupy"], ["sobel", "gram", "warp", "refine"], repeat=1)
    rows = _rows(results, "cupy")
    assert all("error" not in row and row["h2d_s"] > 0 for row in rows.values()), rows
    assert "GPU" in results["machines"]["cupy"]["device"]


def test_simpleitk_matrices_round_trip():
    sitk = pytest.importorskip("SimpleITK", exc_type=ImportError)
    from ggrad_gpu.synthetic import affine_about_center

    shape = (60, 80)
    known = affine_about_center(shape, rotation_deg=7.0, scale=1.03, shear=0.05, shift=(2.5, -4.0))
    for center in ((0.0, 0.0), reference.image_center(shape), (13.0, -7.0)):
        assert np.allclose(reference.sitk_to_matrix(reference.matrix_to_sitk(known, center)), known, atol=1e-12)
    # SimpleITK's Resample through the converted transform is ndimage's affine_transform with the matrix.
    image = ndi.gaussian_filter(np.random.default_rng(0).random(shape), 3).astype(np.float32)
    itk_image = sitk.GetImageFromArray(image)
    transform = reference.matrix_to_sitk(known, reference.image_center(shape))
    theirs = sitk.GetArrayFromImage(sitk.Resample(itk_image, itk_image, transform, sitk.sitkLinear, np.nan))
    ours = ndi.affine_transform(image, known, order=1, mode="constant", cval=np.nan)
    both = np.isfinite(theirs) & np.isfinite(ours)
    assert both.sum() > 0.8 * image.size and np.abs(theirs - ours)[both].max() < 1e-4
