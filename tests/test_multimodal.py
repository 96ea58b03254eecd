"""Several cubes on one guide (refine_many, ``ggrad refine --guide G A B``) and re-use of a transform
(``ggrad apply``).

Two modalities of one scene: cube A is the phantom's own (5x coarser than the guide, 40 bands); cube B
is measured in the test from the same scene (the phantom's abundances and spectra) at 8x coarser, with 20
bands, on a window of the guide, misplaced differently. Accuracy is against the known matrices.
"""

import json
import warnings

import numpy as np
import pytest
from scipy import ndimage

from ggrad_gpu import cube_to_cube, refine, refine_many, warp_cube
from ggrad_gpu.cli.command import main
from ggrad_gpu.core.geometry import fov_matrix
from ggrad_gpu.metrics import footprint_region, target_registration_error
from ggrad_gpu.synthetic import affine_about_center, make_phantom

GUIDE_SHAPE = (320, 384)
WINDOW = (24, 32, 272, 320)  # cube B's stage footprint: (row0, col0, rows, cols) of the guide
B_SHAPE = (34, 40)  # 8 guide pixels per point


def _two_modalities(seed):
    """guide, [cube A, cube B], [initial A, initial B], [true A, true B]."""
    # The mixed phantom: cube B takes every other band, which on the default phantom drops whole
    # components' peaks (each holds its own bands): B then reaches 0.17-0.74 px mean, 1.65 px max.
    phantom = make_phantom(shape=GUIDE_SHAPE, bands=40, native_factor=5, seed=seed, rotation_deg=2.0, scale=1.02,
                           shift=(8.0, -6.0), signatures="mixed")
    to_window = np.array([[1.0, 0, -WINDOW[0]], [0, 1, -WINDOW[1]], [0, 0, 1]])
    initial_b = fov_matrix(WINDOW[2:], B_SHAPE) @ to_window
    misplacement = np.linalg.inv(to_window) @ affine_about_center(
        WINDOW[2:], rotation_deg=-1.5, scale=0.98, shift=(-6.0, 9.0)) @ to_window
    true_b = initial_b @ misplacement
    # Each point of B sees the scene through a spot as wide as its step (as make_phantom's cubes do).
    spot = ndimage.gaussian_filter(phantom.abundances, (0, 4.0, 4.0), mode="nearest")
    rows, cols = np.mgrid[: B_SHAPE[0], : B_SHAPE[1]].astype(np.float64)
    points = np.linalg.solve(true_b, np.stack([rows.ravel(), cols.ravel(), np.ones(rows.size)]))[:2]
    assert points.min() > 0 and (points.max(axis=1) < np.array(GUIDE_SHAPE) - 1).all()  # inside the scene drawn
    fractions = np.stack([ndimage.map_coordinates(s, points, order=1) for s in spot], axis=1)
    clean = fractions @ phantom.spectra[:, ::2]
    noisy = clean + 0.02 * clean.mean() * np.random.default_rng(seed).standard_normal(clean.shape)
    cube_b = noisy.reshape(B_SHAPE + (clean.shape[1],)).astype(np.float32)
    return phantom.guide, [phantom.cube, cube_b], [phantom.initial, initial_b], [phantom.matrix, true_b]


def _footprint_tre(matrix, true, cube_shape):
    region = footprint_region(cube_shape, true, GUIDE_SHAPE)
    return target_registration_error(matrix, true, GUIDE_SHAPE, region=region)


def _cube_to_cube_error(estimated, true, a_shape):
    """Largest distance, in cube B pixels, between where the two A->B matrices send A's pixel centres."""
    rows, cols = np.mgrid[: a_shape[0], : a_shape[1]].astype(np.float64)
    points = np.stack([rows.ravel(), cols.ravel(), np.ones(rows.size)])
    return float(np.hypot(*((estimated - true) @ points)[:2]).max())


def _check(matrices, cubes, truths):
    tres = [_footprint_tre(m, t, c.shape) for m, t, c in zip(matrices, truths, cubes)]
    error = _cube_to_cube_error(matrices[1] @ np.linalg.inv(matrices[0]), truths[1] @ np.linalg.inv(truths[0]),
                                cubes[0].shape)
    print(f"TRE over each footprint (mean / max, guide px): A {tres[0].mean:.3f} / {tres[0].max:.3f}, "
          f"B {tres[1].mean:.3f} / {tres[1].max:.3f}; A->B within {error:.3f} B px")
    # Measured over seeds 1-4: A 0.038-0.096 / 0.254 px (mean / max), B 0.128-0.196 / 0.426 px, A->B 0.065 B px.
    assert all(t.mean <= 0.4 and t.max <= 0.9 for t in tres), tres
    assert error <= 0.15, error


@pytest.mark.parametrize("seed", [
    3,
    pytest.param(1, marks=pytest.mark.slow),
    pytest.param(2, marks=pytest.mark.slow),
    # Seed 4 missed (cube B 0.50 / 1.19 px) before the first registration tried several coarse peaks with
    # the bands refitted (basins); it reaches 0.20 / 0.51 px now.
    pytest.param(4, marks=pytest.mark.slow),
])
@pytest.mark.slow  # over 0.75 s: the fast lane stays under a minute
def test_refine_many_registers_two_modalities(seed):
    guide, cubes, initials, truths = _two_modalities(seed)
    assert cubes[0].shape[2] != cubes[1].shape[2]
    before = [_footprint_tre(i, t, c.shape).mean for i, t, c in zip(initials, truths, cubes)]
    assert min(before) > 5  # misplaced by several guide pixels
    results = refine_many(guide, cubes, initials=initials, backend="numpy")
    assert all(r.improved for r in results), [r.message for r in results]
    assert [r.registered.shape[2] for r in results] == [40, 20]
    _check([r.matrix for r in results], cubes, truths)


def test_cube_to_cube_sends_points_through_the_guide():
    rng = np.random.default_rng(0)
    m_a = np.vstack([rng.normal(size=(2, 3)) + [[0.2, 0, 1], [0, 0.2, 2]], [0, 0, 1]])
    m_b = np.vstack([rng.normal(size=(2, 3)) * 0.1 + [[0.125, 0, -3], [0, 0.125, 4]], [0, 0, 1]])
    pairs = cube_to_cube([m_a, m_b], names=["raman", "ir"])
    assert set(pairs) == {"raman->ir", "ir->raman"}
    for guide_point in rng.uniform(0, 300, size=(5, 2)):
        g = np.append(guide_point, 1.0)
        np.testing.assert_allclose(pairs["raman->ir"] @ (m_a @ g), m_b @ g, atol=1e-9)
        np.testing.assert_allclose(pairs["ir->raman"] @ (m_b @ g), m_a @ g, atol=1e-9)
    with pytest.raises(ValueError, match="names"):
        cube_to_cube([m_a, m_b], names=["same", "same"])


def test_refine_many_bad_input_names_the_parameter():
    guide = np.zeros((40, 40), np.float32)
    with pytest.raises(ValueError, match="cubes"):
        refine_many(guide, [])
    with pytest.raises(ValueError, match="initials"):
        refine_many(guide, [np.zeros((8, 8, 3))], initials=[None, None])
    with pytest.raises(ValueError, match=r"cubes\[1\]: cube must be 3-D"):
        refine_many(guide, [np.ones((8, 8, 3)), np.ones((8, 8))], backend="numpy")  # before refining cubes[0]


def _save_inputs(tmp_path, guide, cubes, initials):
    np.save(tmp_path / "guide.npy", guide)
    paths = []
    for name, cube, initial in zip(("raman", "ir"), cubes, initials):
        np.save(tmp_path / f"{name}.npy", cube)
        np.savetxt(tmp_path / f"{name}_initial.txt", initial)
        paths.append((tmp_path / f"{name}.npy", tmp_path / f"{name}_initial.txt"))
    return paths


@pytest.mark.slow
def test_several_cubes_through_the_command_line(tmp_path):
    guide, cubes, initials, truths = _two_modalities(3)
    (raman, raman_initial), (ir, ir_initial) = _save_inputs(tmp_path, guide, cubes, initials)
    out = tmp_path / "out"
    code = main(["refine", "--guide", str(tmp_path / "guide.npy"), str(raman), str(ir), "--initial", str(raman_initial),
                 "--initial", str(ir_initial), "-o", str(out), "-q", "--backend", "numpy"])
    assert code == 0
    assert {p.name for p in out.iterdir()} == {"raman", "ir", "cube_to_cube.json", "overlay.png"}
    records = [json.loads((out / name / "transform.json").read_text()) for name in ("raman", "ir")]
    assert all(r["initial_source"] == "file" for r in records)
    assert all({p.name for p in (out / n).iterdir()} == {"registered.npy", "transform.json", "weights.json",
                                                        "report.png"} for n in ("raman", "ir"))
    matrices = [np.array(r["matrix"]) for r in records]
    _check(matrices, cubes, truths)
    pairs = json.loads((out / "cube_to_cube.json").read_text())
    assert set(pairs) == {"raman->ir", "ir->raman"}
    np.testing.assert_allclose(pairs["raman->ir"], matrices[1] @ np.linalg.inv(matrices[0]))
    # GUIDE then cubes, without --guide: the same grammar; an existing OUT is kept.
    assert main(["refine", str(tmp_path / "guide.npy"), str(raman), str(ir), "-o", str(out), "-q"]) == 2
    assert (out / "overlay.png").exists()


def test_repeated_options_must_match_the_cubes(tmp_path, capsys):
    guide, cubes, initials, _ = _two_modalities(3)
    (raman, raman_initial), (ir, _) = _save_inputs(tmp_path, guide, cubes, initials)
    out = tmp_path / "out"
    code = main(["refine", "--guide", str(tmp_path / "guide.npy"), str(raman), str(ir), "--initial",
                 str(raman_initial), "-o", str(out)])
    assert code == 2 and "--initial was given 1 times for 2 cube(s)" in capsys.readouterr().err
    code = main(["refine", str(tmp_path / "guide.npy"), str(raman), str(ir), "--band-axis", "2", "--band-axis", "2",
                 "--band-axis", "2", "-o", str(out)])
    assert code == 2 and "--band-axis" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.slow  # over 0.75 s: the fast lane stays under a minute
def test_apply_reproduces_refines_registered_cube(tmp_path):
    phantom = make_phantom(shape=(200, 240), bands=24, seed=4, rotation_deg=2.0, scale=1.02, shift=(12.0, -15.0),
                           signatures="mixed")
    np.save(tmp_path / "guide.npy", phantom.guide)
    np.save(tmp_path / "cube.npy", phantom.cube)
    np.savetxt(tmp_path / "initial.txt", phantom.initial)
    refined = tmp_path / "refined"
    assert main(["refine", str(tmp_path / "guide.npy"), str(tmp_path / "cube.npy"), "--initial",
                 str(tmp_path / "initial.txt"), "-o", str(refined), "-q", "--backend", "numpy"]) == 0
    record = json.loads((refined / "transform.json").read_text())
    matrix, to_guide = np.array(record["matrix"]), np.array(record["working_grid"]["working_to_guide"])
    for grid, out_matrix, shape in (("working", matrix @ to_guide, record["working_grid"]["shape"]),
                                    ("guide", matrix, phantom.guide.shape)):
        out = tmp_path / f"applied-{grid}"
        assert main(["apply", str(refined / "transform.json"), str(tmp_path / "cube.npy"), "-o", str(out),
                     "--output-grid", grid, "-q"]) == 0
        applied = np.load(out / "registered.npy")
        expected = warp_cube(phantom.cube, out_matrix, tuple(shape))
        np.testing.assert_allclose(applied, expected, equal_nan=True)
        assert json.loads((out / "transform.json").read_text())["applied"]["output_grid"] == grid
    np.testing.assert_array_equal(np.load(tmp_path / "applied-working" / "registered.npy"),
                                  np.load(refined / "registered.npy"))


def test_apply_bad_input(tmp_path, capsys):
    record = {"matrix": [[0.2, 0, 0], [0, 0.2, 0], [0, 0, 1]], "guide": {"shape": [40, 40]},
              "cube": {"shape": [8, 8, 3]},
              "working_grid": {"shape": [40, 40], "working_to_guide": [[1, 0, 0], [0, 1, 0], [0, 0, 1]]}}
    (tmp_path / "transform.json").write_text(json.dumps(record))
    np.save(tmp_path / "other.npy", np.zeros((9, 8, 3), np.float32))
    out = tmp_path / "out"
    assert main(["apply", str(tmp_path / "transform.json"), str(tmp_path / "other.npy"), "-o", str(out)]) == 2
    assert "cube has 9 x 8 pixels" in capsys.readouterr().err
    assert main(["apply", str(tmp_path / "missing.json"), str(tmp_path / "other.npy"), "-o", str(out)]) == 2
    assert "missing.json" in capsys.readouterr().err
    assert not out.exists()
