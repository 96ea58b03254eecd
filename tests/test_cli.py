"""The ``ggrad`` command: round trips through every cube format, outputs, exit codes, real files."""

import errno
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import ggrad_gpu
from ggrad_gpu import io
from ggrad_gpu.cli import outputs
from ggrad_gpu.cli.command import main
from ggrad_gpu.metrics import target_registration_error
from ggrad_gpu.synthetic import make_phantom

from helpers import DATA, has_module

FORMATS = {"npy": ".npy", "npz": ".npz", "tiff": ".tif", "envi": ".hdr", "hdf5": ".h5", "zarr": ".zarr"}
NEEDS = {"envi": "spectral", "hdf5": "h5py", "zarr": "zarr"}
OUTPUTS = {"transform.json", "weights.json", "report.png"}


@pytest.fixture(scope="module")
def phantom():
    # The default phantom; refine reaches 0.125 / 0.314 px (mean / max TRE) on it from 19 px off.
    return make_phantom(shape=(200, 240), bands=24, seed=4, rotation_deg=2.0, scale=1.02, shift=(12.0, -15.0))


@pytest.fixture(scope="module")
def centres():
    return np.linspace(500.0, 1800.0, 24)


def _digest(path):
    """SHA-256 of a file, or of every file under a folder (names and bytes)."""
    digest = hashlib.sha256()
    paths = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for item in paths:
        digest.update(str(item.relative_to(path.parent)).encode())
        digest.update(item.read_bytes())
    return digest.hexdigest()


def _inputs(tmp_path, phantom, centres, fmt):
    guide = tmp_path / "guide.npy"
    np.save(guide, phantom.guide)
    cube = tmp_path / ("cube" + FORMATS[fmt])
    io.write_cube(cube, phantom.cube, band_centres=centres, band_unit="cm-1")
    return guide, cube


def _tre(out, phantom, *, refined=True):
    """TRE of OUTDIR's matrix, once its record says it was refined (or kept, with ``refined=False``)."""
    record = json.loads((out / "transform.json").read_text())
    assert record["improved"] is refined and record["message"].startswith("refined" if refined else "kept"), record
    return target_registration_error(np.array(record["matrix"]), phantom.matrix, phantom.guide.shape)


@pytest.mark.slow  # over 0.75 s: the fast lane stays under a minute
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_round_trip_every_format(tmp_path, phantom, centres, fmt, capsys):
    if fmt in NEEDS:
        pytest.importorskip(NEEDS[fmt])
    guide, cube = _inputs(tmp_path, phantom, centres, fmt)
    files = [guide] + sorted(p for p in tmp_path.iterdir() if p.name.startswith("cube"))
    before = {p: _digest(p) for p in files}
    out = tmp_path / "out"
    code = main(["refine", str(guide), str(cube), "-o", str(out), "--backend", "numpy", "-q", "--format", fmt])
    assert code == 0, capsys.readouterr().err
    # Everything written, nothing half-written left beside it, the inputs untouched.
    assert {p.name for p in out.iterdir()} == OUTPUTS | {"registered" + FORMATS[fmt]} | (
        {"registered.img"} if fmt == "envi" else set()
    )
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert {p: _digest(p) for p in files} == before
    initial = target_registration_error(phantom.initial, phantom.matrix, phantom.guide.shape)
    tre = _tre(out, phantom)
    assert initial.mean > 10 and tre.mean <= 0.3 and tre.max <= 0.8, tre  # 0.125 / 0.314 px measured
    registered = io.read_cube(out / ("registered" + FORMATS[fmt]))
    assert registered.data.shape == (200, 240, 24)  # the working grid (s = 1 here)
    weights = json.loads((out / "weights.json").read_text())
    if fmt != "npy":  # .npy holds no band centres
        np.testing.assert_array_equal(registered.band_centres, centres)
        np.testing.assert_array_equal(weights["band_centres"], centres)
    # --levels auto: the 40 x 48 cube spans 50 x 60 pixels of the grid at its resolution (step 4): 2 levels
    # keep 24 across (geometry.MIN_LEVEL_PIXELS).
    assert weights["levels"] == len(weights["channel_weights"]) == 2 and len(weights["channel_weights"][0]) == 24


@pytest.mark.slow  # over 0.75 s: the fast lane stays under a minute
def test_png_guide_and_output_seeds_the_next_run(tmp_path, phantom, centres):
    from PIL import Image

    # A brightfield PNG as a lab would have it: 8-bit RGB.
    grey = np.clip(phantom.guide / phantom.guide.max() * 255, 0, 255).astype(np.uint8)
    Image.fromarray(np.dstack([grey] * 3)).save(tmp_path / "guide.png")
    cube = tmp_path / "cube.npz"
    io.write_cube(cube, phantom.cube, band_centres=centres)
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(["refine", str(tmp_path / "guide.png"), str(cube), "-o", str(first), "-q"]) == 0
    tre = _tre(first, phantom)
    assert tre.mean <= 0.3 and tre.max <= 0.8, tre  # 0.160 / 0.369 px measured
    # transform.json seeds the next run, which starts where the first ended: little left to gain. It keeps
    # the placement or moves it by a hair (measured: kept, or 0.160 -> 0.124 px mean, as the bands the fit
    # at the start weights differ), and is as accurate.
    assert main(["refine", str(tmp_path / "guide.png"), str(cube), "-o", str(second), "-q",
                 "--initial", str(first / "transform.json")]) == 0
    record = json.loads((second / "transform.json").read_text())
    first_matrix = json.loads((first / "transform.json").read_text())["matrix"]
    np.testing.assert_array_equal(record["initial"], first_matrix)
    moved = target_registration_error(np.array(record["matrix"]), np.array(first_matrix), phantom.guide.shape)
    assert moved.max < 0.15, moved
    again = _tre(second, phantom, refined=record["improved"])
    assert again.mean <= 0.3 and again.max <= 0.8, again


def test_text_initial_manual_weights_and_guide_grid(tmp_path, phantom, centres):
    guide, cube = _inputs(tmp_path, phantom, centres, "npy")
    text = tmp_path / "initial.txt"
    np.savetxt(text, phantom.initial)
    out = tmp_path / "out"
    code = main(["refine", str(guide), str(cube), "-o", str(out), "-q", "--initial", str(text),
                 "--alpha", "1,1,1,0", "--beta", "0,1,1,1", "--output-grid", "guide"])
    assert code == 0
    weights = json.loads((out / "weights.json").read_text())
    np.testing.assert_allclose(weights["alpha"], [1 / 3, 1 / 3, 1 / 3, 0])
    np.testing.assert_allclose(weights["beta"], [0, 1 / 3, 1 / 3, 1 / 3])
    assert np.load(out / "registered.npy").shape == (200, 240, 24)
    # Weights picked by hand, not by eq. 9, put most of grad_y on blurred levels: the fit could lie
    # 5.4 px elsewhere (its own blocks; measured TRE 0.76 / 1.69 px, where the defaults reach 0.11 /
    # 0.27 with a spread of 0.3 px), so the default verdict keeps the initial transform and says why.
    record = json.loads((out / "transform.json").read_text())
    assert not record["improved"] and "uncertain" in record["message"]
    np.testing.assert_allclose(record["matrix"], phantom.initial)


@pytest.mark.slow  # over 0.75 s: the fast lane stays under a minute
def test_existing_output_is_kept_without_force(tmp_path, phantom, centres, capsys):
    guide, cube = _inputs(tmp_path, phantom, centres, "npy")
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("a user's file")
    code = main(["refine", str(guide), str(cube), "-o", str(out), "-q"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("ggrad: error:") and "--force" in err and err.count("\n") == 1
    assert (out / "mine.txt").read_text() == "a user's file"
    assert main(["refine", str(guide), str(cube), "-o", str(out), "-q", "--force"]) == 0
    assert {p.name for p in out.iterdir()} == OUTPUTS | {"registered.npy"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.slow  # over 0.75 s: the fast lane stays under a minute
@pytest.mark.parametrize("writer", ["registered.npy", "transform.json", "weights.json", "report.png"])
def test_failure_while_writing_leaves_no_output(tmp_path, phantom, centres, monkeypatch, capsys, reliability,
                                                writer):
    guide, cube = _inputs(tmp_path, phantom, centres, "npy")
    before = {p: _digest(p) for p in (guide, cube)}
    real = {"registered.npy": io.write_cube, "transform.json": io.write_json, "weights.json": io.write_json}

    def full_disk(*args, **kwargs):
        path = args[1] if writer == "report.png" else args[0]
        if os.path.basename(path) == writer:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real[os.path.basename(path)](*args, **kwargs)

    if writer == "report.png":
        monkeypatch.setattr("ggrad_gpu.io.atomic.write_figure", full_disk)
    else:
        monkeypatch.setattr(outputs, "write_cube" if writer == "registered.npy" else "write_json", full_disk)
    out = tmp_path / "out"
    assert main(["refine", str(guide), str(cube), "-o", str(out), "-q", "--levels", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ggrad: error:") and err.count("\n") == 1, err
    assert "No space left" in err and writer in err and str(out) in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cube.npy", "guide.npy"]
    assert {p: _digest(p) for p in (guide, cube)} == before
    reliability["full disk"] += 1


@pytest.mark.parametrize("inside", ["guide", "cube", "outdir-is-the-cube"])
def test_force_never_replaces_a_folder_that_holds_an_input(tmp_path, phantom, centres, capsys, inside):
    folder = tmp_path / "data"
    folder.mkdir()
    if inside == "outdir-is-the-cube":
        guide, cube = _inputs(folder, phantom, centres, "zarr" if has_module("zarr") else "npy")
        out = cube if cube.is_dir() else folder
    else:
        guide, cube = _inputs(folder, phantom, centres, "npy")
        out = folder
    before = _digest(folder)
    code = main(["refine", str(guide), str(cube), "-o", str(out), "-q", "--force"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("ggrad: error:") and "holds the input" in err and err.count("\n") == 1, err
    assert _digest(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


@pytest.mark.parametrize(
    "make_args, match",
    [
        (lambda t: [str(t / "missing.npy"), str(t / "cube.npy")], "missing.npy"),
        (lambda t: [str(t / "guide.npy"), str(t / "cube.xyz")], "suffix|format"),
        (lambda t: [str(t / "guide.npy"), str(t / "cube.npy"), "--alpha", "1,0,0,0"], "--beta"),
        (lambda t: [str(t / "guide.npy"), str(t / "cube.npy"), "--initial", str(t / "guide.npy")], "matrix|JSON|text"),
        (lambda t: [str(t / "guide.npy"), str(t / "cube.npy"), "--levels", "12"], "levels"),
    ],
    ids=["missing-guide", "unknown-format", "alpha-without-beta", "bad-initial", "too-many-levels"],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, phantom, centres, capsys, make_args, match):
    _inputs(tmp_path, phantom, centres, "npy")
    (tmp_path / "cube.xyz").write_bytes(b"not a cube")
    code = main(["refine", *make_args(tmp_path), "-o", str(tmp_path / "out"), "-q"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("ggrad: error:") and err.count("\n") == 1, err
    assert __import__("re").search(match, err), err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # over 0.75 s: the fast lane stays under a minute
def test_strict_exit_code_when_the_initial_transform_is_kept(tmp_path, capsys):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "guide.npy", np.full((160, 200), 0.5, np.float32))  # no edges at all
    np.save(tmp_path / "cube.npy", rng.random((32, 40, 8)).astype(np.float32))
    args = ["refine", str(tmp_path / "guide.npy"), str(tmp_path / "cube.npy"), "-q", "--levels", "3"]
    assert main(args + ["-o", str(tmp_path / "a")]) == 0
    assert "kept the initial transform" in capsys.readouterr().out
    record = json.loads((tmp_path / "a" / "transform.json").read_text())
    assert record["improved"] is False and record["matrix"] == record["initial"]
    assert main(args + ["-o", str(tmp_path / "b"), "--strict"]) == 1


@pytest.mark.slow  # over 0.75 s: the fast lane stays under a minute
def test_demo_prints_the_error_and_writes_a_report(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--shape", "200", "240", "--bands", "24", "--levels", "3", "--backend", "numpy",
                 "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "alpha" in text and "global gradient (grad_y)" in text
    assert "target registration error" in text and 'refine (method "gradient"): refined' in text
    # The table: the global gradient and the four baselines, each with its NCC,
    # and a TRE for every one that refine takes as a method.
    table = {line.split()[-1]: line for line in text.splitlines()
             if line.rstrip().endswith(("gradient", "band_sum", "band_std", "pca", "kept)", "refine)"))}
    assert {"gradient", "refine)"} <= set(table)
    # Each baseline with the TRE refine reaches with it, or the start where it kept it (on this
    # phantom all three: their fits could lie several pixels elsewhere).
    for method in ("band_sum", "band_std", "pca"):
        assert any(line.split()[-1] == method or line.rstrip().endswith(f"{method} (initial kept)")
                   for line in text.splitlines()), method
    assert "best single band (#" in text and "band sum (paper eq. 2)" in text
    assert "spectral std (paper eq. 3)" in text and "first principal component" in text
    assert f"report: {out / 'report.png'}" in text
    assert {p.name for p in out.iterdir()} == OUTPUTS
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [line for line in text.splitlines() if line.strip()[:1].isdigit()]
    assert len(rows) == 3  # one row per level


def test_demo_bad_levels_is_one_line_error(capsys):
    assert main(["demo", "--shape", "20", "20", "--bands", "4", "--levels", "9", "--backend", "numpy"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ggrad: error:") and "levels" in err and err.count("\n") == 1


def test_version_and_entry_point():
    out = subprocess.run([sys.executable, "-m", "ggrad_gpu", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and ggrad_gpu.__version__ in out.stdout


# --- real files -------------------------------------------------------------------


@pytest.mark.slow  # over 0.75 s: the fast lane stays under a minute
@pytest.mark.data
def test_eds_cube_against_its_backscatter_image(tmp_path, capsys):
    folder = DATA / "sem-eds-bruker-30x30"
    if not (folder / "cube.npy").exists():
        pytest.skip("the SEM-EDS data set is not available")
    before = {name: _digest(folder / name) for name in ("cube.npy", "image_asb.npy")}
    identity = tmp_path / "identity.txt"
    np.savetxt(identity, np.eye(3))
    out = tmp_path / "eds"
    code = main(["refine", str(folder / "image_asb.npy"), str(folder / "cube.npy"), "-o", str(out), "-q",
                 "--no-absorbance", "--initial", str(identity), "--backend", "numpy"])
    assert code == 0, capsys.readouterr().err
    record = json.loads((out / "transform.json").read_text())
    # The README's one-column placement (map[:, j + 1] ~ asb[:, j]; tests/test_real_data.py), measured 0.21 px.
    one_column = np.array([[1.0, 0, 0], [0, 1, 1], [0, 0, 1]])
    tre = target_registration_error(np.array(record["matrix"]), one_column, (30, 30), spacing=3)
    print(f"EDS: {record['message']}; TRE against the one-column placement {tre.mean:.2f} / {tre.max:.2f} px")
    assert record["improved"] and tre.mean < 0.5 and tre.max < 1.0
    assert {name: _digest(folder / name) for name in before} == before


@pytest.mark.slow  # over 0.75 s: the fast lane stays under a minute
@pytest.mark.data
def test_swir_envi_header_round_trip(tmp_path, capsys):
    pytest.importorskip("spectral")
    folder = DATA / "fenix-rock-swir"
    if not (folder / "image.hdr.orig.txt").exists():
        pytest.skip("the FENIX SWIR data set is not available")
    cube = np.load(folder / "cube.npy")
    wavelengths = np.load(folder / "wavelengths_nm.npy")
    # The original ENVI header beside its data, rebuilt as BSQ uint16 (exact: the values are integers).
    (tmp_path / "image.hdr").write_bytes((folder / "image.hdr.orig.txt").read_bytes())
    np.ascontiguousarray(cube.transpose(2, 0, 1)).astype("<u2").tofile(tmp_path / "image.img")
    # A guide from the cube's own visible bands, 4x finer.
    visible = cube[..., (wavelengths > 450) & (wavelengths < 700)].mean(axis=2)
    np.save(tmp_path / "guide.npy", np.kron(visible, np.ones((4, 4))).astype(np.float32))
    out = tmp_path / "out"
    code = main(["refine", str(tmp_path / "guide.npy"), str(tmp_path / "image.hdr"), "-o", str(out), "-q",
                 "--levels", "2", "--no-absorbance", "--format", "envi"])
    assert code == 0, capsys.readouterr().err
    registered = io.read_cube(out / "registered.hdr")
    np.testing.assert_allclose(registered.band_centres, wavelengths, rtol=1e-6)
    assert registered.band_unit == "nm" and registered.data.shape[2] == 450
    weights = json.loads((out / "weights.json").read_text())
    np.testing.assert_allclose(weights["band_centres"], wavelengths, rtol=1e-6)
    assert os.path.getsize(tmp_path / "image.img") == cube.size * 2  # the input is untouched


def test_an_unexpected_error_is_exit_3_and_debug_shows_it(tmp_path, phantom, centres, monkeypatch, capsys):
    # A bug deep inside refine (not bad input): exit code 3 and one line on stderr, nothing left
    # behind; --debug lets the exception and its traceback through instead.
    from ggrad_gpu.refinement import basins

    def broken(*args, **kwargs):
        raise ZeroDivisionError("simulated: a bug deep in refine")

    monkeypatch.setattr(basins, "first_registration", broken)
    guide, cube = _inputs(tmp_path, phantom, centres, "npy")
    out = tmp_path / "out"
    command = ["refine", str(guide), str(cube), "-o", str(out), "-q", "--backend", "numpy"]
    assert main(command) == 3
    err = capsys.readouterr().err
    assert err == "ggrad: internal error (ZeroDivisionError): simulated: a bug deep in refine (--debug shows more)\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cube.npy", "guide.npy"]  # no OUTDIR, no partial one
    with pytest.raises(ZeroDivisionError, match="simulated"):
        main(command + ["--debug"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cube.npy", "guide.npy"]
    # Bad input stays exit 2 without --debug, and is raised with it.
    missing = ["refine", str(guide), str(tmp_path / "none.npy"), "-o", str(out), "-q"]
    assert main(missing) == 2 and "none.npy" in capsys.readouterr().err
    with pytest.raises(OSError):
        main(missing + ["--debug"])
