"""Real geometry: a guide that shows more than the cube, small maps, automatic levels.

Accuracy is the TRE over the cube's true footprint (``metrics.footprint_region``),
where the cube is used, in guide pixels against the phantom's known transform.
"""

import warnings

import numpy as np
import pytest

from ggrad_gpu import refine, warp_cube
from ggrad_gpu.core.geometry import auto_levels, footprint_mask, fov_matrix, working_grid
from ggrad_gpu.io import read_instrument
from ggrad_gpu.metrics import footprint_region, target_registration_error
from ggrad_gpu.synthetic import make_phantom

from helpers import DATA, has_module


def _refine(guide, cube, initial, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a kept initial transform is asserted on, not warned
        return refine(guide, cube, initial=initial, backend="numpy", **options)


def _partial_case(index, *, exact=False, bands=64):
    """A guide 2-4x the cube's field in each direction, the cube anywhere inside, not touching the edges."""
    rng = np.random.default_rng(100 + index)
    rows, cols = (int(n) for n in rng.integers(240, 320, size=2))
    guide_shape = tuple(int(n * k) for n, k in zip((rows, cols), rng.uniform(2, 4, size=2)))
    row0 = int(rng.integers(10, guide_shape[0] - rows - 10))
    col0 = int(rng.integers(10, guide_shape[1] - cols - 10))
    misplacement = (
        {"rotation_deg": 0.0, "scale": 1.0, "shear": 0.0, "shift": (0.0, 0.0)}
        if exact
        else {
            "rotation_deg": float(rng.uniform(-5, 5)),
            "scale": float(1 + rng.uniform(-0.05, 0.05)),
            "shear": float(rng.uniform(-0.02, 0.02)),
            "shift": tuple(float(v) for v in rng.uniform(-40, 40, 2)),
        }
    )
    # The phantom before issue 18 (signatures="mixed"), on which the thresholds were set.
    return make_phantom(shape=guide_shape, bands=bands, native_factor=5, footprint=(row0, col0, rows, cols),
                        seed=index, signatures="mixed", **misplacement)


def _footprint_tre(result_matrix, phantom, cube_shape=None, matrix=None):
    matrix = phantom.matrix if matrix is None else matrix
    region = footprint_region(cube_shape or phantom.cube.shape, matrix, phantom.guide.shape)
    return target_registration_error(result_matrix, matrix, phantom.guide.shape, region=region)


# --------------------------------------------------------------------------- the working grid


def test_working_grid_is_the_footprint_plus_the_margin():
    initial = np.array([[0.2, 0, -30], [0, 0.2, -35], [0, 0, 1.0]])  # a 60 x 70 cube on guide rows 148..448
    grid = working_grid((600, 700), (60, 70), initial)
    rows, cols = grid.guide_region()
    # The footprint (147.5 .. 447.5, 172.5 .. 522.5) plus a third of its size each side (100, 116.7 px).
    assert (rows.start, rows.stop) == (47, 548) and (cols.start, cols.stop) == (55, 640)
    assert grid.s == 1 and grid.shape == (501, 585)
    np.testing.assert_array_equal(grid.to_guide, [[1, 0, 47], [0, 1, 55], [0, 0, 1]])
    assert footprint_mask((60, 70), initial @ grid.to_guide, grid.shape, np).sum() == pytest.approx(300 * 350, rel=0.02)


def test_working_grid_blocks_and_clipping():
    initial = np.array([[0.02, 0, -10], [0, 0.02, -4], [0, 0, 1.0]])  # r = 50: s = ceil(50 / 6) = 9
    grid = working_grid((2000, 1500), (30, 20), initial)
    assert grid.s == 9
    assert grid.origin[0] % 9 == 0 and grid.origin[1] % 9 == 0  # rounded out to whole blocks
    (r0, c0), (rows, cols) = grid.origin, grid.shape
    assert r0 + 9 * rows <= 2000 and c0 + 9 * cols <= 1500
    # S maps working pixel w to the centre of its 9 x 9 block of guide pixels.
    np.testing.assert_allclose(grid.to_guide @ [0, 0, 1], [r0 + 4, c0 + 4, 1])
    # Footprint rows 475 .. 1975 and cols 175 .. 1175, plus margins of 500 and 333 px: clipped to the guide.
    assert (r0, c0) == (0, 0) and (rows, cols) == (2000 // 9, 1500 // 9)


def test_a_cube_spanning_the_guide_keeps_the_whole_guide():
    grid = working_grid((350, 415), (70, 83), fov_matrix((350, 415), (70, 83)))
    assert grid.origin == (0, 0) and grid.shape == (350, 415) and grid.s == 1
    # 70 x 83 cube pixels on the grid at the cube's resolution: 70 and 35 across keep 24 (MIN_LEVEL_PIXELS).
    assert auto_levels((70, 83), fov_matrix((350, 415), (70, 83)), grid) == 2


def test_auto_levels_shrink_with_the_footprint():
    initial = np.array([[0.2, 0, -38], [0, 0.2, -66], [0, 0, 1.0]])  # a 20 x 20 map on 100 x 100 px
    grid = working_grid((480, 752), (20, 20), initial)
    assert grid.cube_step == 4 and auto_levels((20, 20), initial, grid) == 1  # 25 px across: one level


def test_explicit_levels_that_do_not_fit_say_how_many_do():
    phantom = make_phantom(shape=(120, 150), bands=8, footprint=(40, 50, 30, 40), seed=3)
    with pytest.raises(ValueError, match=r"levels=9 is too many .*at most \d levels"):
        refine(phantom.guide, phantom.cube, initial=phantom.initial, levels=9, backend="numpy")


def test_target_registration_error_over_a_region_by_brute_force():
    m_true = np.eye(3)
    m_est = np.array([[1, 0.01, 0.5], [0, 1, 0], [0, 0, 1.0]])
    tre = target_registration_error(m_est, m_true, (400, 500), spacing=10, region=(100, 200, 50, 60))
    points = [(r, c) for r in range(105, 150, 10) for c in range(205, 260, 10)]
    errors = [np.hypot(0.01 * c + 0.5, 0) for r, c in points]
    assert tre.mean == pytest.approx(np.mean(errors)) and tre.max == pytest.approx(max(errors))
    with pytest.raises(ValueError, match="region"):
        target_registration_error(m_est, m_true, (400, 500), region=(0, 0, 0, 5))


# --------------------------------------------------------------------------- partial fields


@pytest.mark.slow  # over 0.75 s: the fast lane stays under a minute
def test_partial_field_refines():
    phantom = _partial_case(7)
    result = _refine(phantom.guide, phantom.cube, phantom.initial)
    before = _footprint_tre(phantom.initial, phantom)
    after = _footprint_tre(result.matrix, phantom)
    assert result.improved, result.message
    assert before.mean > 40 and after.max < 1 and after.mean <= 0.3, (before, after)
    # The working grid is the guide region around the footprint, not the whole guide.
    assert result.registered.shape[0] < phantom.guide.shape[0] and result.working_to_guide[0, 2] > 0


@pytest.mark.slow
def test_partial_field_family():
    table = []
    for index in range(8):
        phantom = _partial_case(index)
        result = _refine(phantom.guide, phantom.cube, phantom.initial)
        table.append((result.improved, _footprint_tre(result.matrix, phantom)))
    print("partial-field family, TRE over the footprint (mean, max):", [tuple(np.round(t, 3)) for _, t in table])
    assert all(improved for improved, _ in table), table  # none kept at the initial transform
    assert np.mean([t.mean for _, t in table]) <= 0.3, table
    assert max(t.max for _, t in table) < 1.0, table


@pytest.mark.slow
def test_partial_field_from_the_right_placement_stays_there():
    errors = []
    for index in range(6):
        phantom = _partial_case(index, exact=True)
        errors.append(_footprint_tre(_refine(phantom.guide, phantom.cube, phantom.initial).matrix, phantom))
    print("partial-field family from the exact placement (mean, max):", [tuple(np.round(t, 3)) for t in errors])
    assert max(t.mean for t in errors) <= 0.2, errors  # every case stays within 0.2 px on average
    assert max(t.max for t in errors) < 0.5, errors


# --------------------------------------------------------------------------- small maps in large guides


@pytest.mark.parametrize(
    "seed, signatures",
    [
        (0, "mixed"),
        pytest.param(1, "mixed", marks=pytest.mark.slow),
        pytest.param(2, "mixed", marks=pytest.mark.slow),
        (0, "separate"),
        # Locked 51 px away, accepted by the guard, until the first registration
        # tried several coarse peaks and kept the best fair fit (basins).
        pytest.param(2, "separate", marks=pytest.mark.slow),
    ],
)
def test_twenty_by_twenty_map_on_a_hundred_pixels_of_a_large_guide(seed, signatures):
    # r = 5: a 20 x 20 map covering 100 x 100 pixels of a 480 x 752 white-light image; the thresholds
    # were set on the phantom before issue 18 (signatures="mixed").
    phantom = make_phantom(shape=(480, 752), bands=64, native_factor=5, footprint=(190, 330, 100, 100), seed=seed,
                           rotation_deg=2.0, scale=1.02, shift=(12.0, -9.0), signatures=signatures)
    assert phantom.cube.shape[:2] == (20, 20)
    result = _refine(phantom.guide, phantom.cube, phantom.initial)
    after = _footprint_tre(result.matrix, phantom)
    print(f"20 x 20 map on 100 x 100 px, {signatures} phantom, seed {seed}: TRE over the footprint {after.mean:.3f} / {after.max:.3f} px")
    # Measured: max TRE 0.29 (mixed) and 0.61 px (separate), one level (25 px across the map).
    assert result.improved and result.levels == 1 and after.max < 1.0, (result.message, after)


@pytest.mark.parametrize("seed", [0] + [pytest.param(seed, marks=pytest.mark.slow) for seed in (1, 2, 3, 4, 5, 7)] + [
    pytest.param(6, marks=[pytest.mark.slow, pytest.mark.xfail(strict=True, reason="max 1.17 px: see below")])])
def test_twenty_by_twenty_by_eighty_map_from_fifteen_pixels_off(seed):
    # Issue 25's small map: 20 x 20 x 80 (default phantom) on 100 x 100 px of a 480 x 752 guide, misplaced
    # by 15 px in a random direction, up to 2 deg and 2 %. Before small maps with few bands were denoised,
    # 4 of these 8 draws ended over 1 px (max 0.54-1.78); now 7 of 8 are under 1 px. Seed 6 (1.41 ->
    # 1.17 px max) also came under 1 px (0.46) when the re-estimate kept the levels down to the cube's
    # resolution, but that pushed the spread of 24 x 24 x 6 mosaic tiles over its limit (4 of 6 tiles,
    # right within 0.6 px, kept as uncertain), so that change was taken back: still open.
    rng = np.random.default_rng(100 + seed)
    angle = rng.uniform(0, 2 * np.pi)
    phantom = make_phantom(shape=(480, 752), bands=80, native_factor=5, footprint=(190, 326, 100, 100), seed=seed,
                           shift=(15 * np.sin(angle), 15 * np.cos(angle)), rotation_deg=rng.uniform(-2, 2),
                           scale=1 + rng.uniform(-0.02, 0.02))
    result = _refine(phantom.guide, phantom.cube, phantom.initial)
    truth = target_registration_error(result.matrix, phantom.matrix, phantom.guide.shape, region=(190, 326, 100, 100),
                                      spacing=5)
    assert result.improved and truth.max < 1.0, (result.message, truth)


@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow)])
def test_twenty_by_twenty_map_on_twenty_five_pixels(seed):
    # r = 1.25, the geometry of the shared renishaw_test_map2.wdf: 20 x 20 points 1.25 guide px apart.
    # The phantom before issue 18 (signatures="mixed"), on which the thresholds were set.
    phantom = make_phantom(shape=(480, 752), bands=64, native_factor=1, footprint=(227, 363, 25, 25), seed=seed,
                           rotation_deg=1.0, shift=(3.0, -2.0), signatures="mixed")
    step = 25 / 20
    to_coarse = np.array([[step, 0, (step - 1) / 2], [0, step, (step - 1) / 2], [0, 0, 1.0]])
    cube = warp_cube(phantom.cube, to_coarse, (20, 20))  # 25 x 25 px sampled every 1.25 px
    matrix, initial = np.linalg.solve(to_coarse, phantom.matrix), np.linalg.solve(to_coarse, phantom.initial)
    result = _refine(phantom.guide, cube, initial)
    before = _footprint_tre(initial, phantom, cube.shape, matrix)
    after = _footprint_tre(result.matrix, phantom, cube.shape, matrix)
    print(f"20 x 20 map on 25 x 25 px, seed {seed}: TRE over the footprint {before.mean:.3f} -> "
          f"{after.mean:.3f} / {after.max:.3f} px")
    assert result.improved and after.max < 1.0 and after.mean < before.mean / 5, (result.message, before, after)


def test_too_little_data_is_an_outcome():
    # A cube placed mostly beyond the guide's edge: a result with a reason, not an exception.
    phantom = make_phantom(shape=(200, 240), bands=16, seed=4)
    shifted = phantom.initial @ np.array([[1, 0, 190], [0, 1, 230], [0, 0, 1.0]])
    result = _refine(phantom.guide, phantom.cube, shifted)
    assert np.isfinite(result.matrix).all() and isinstance(result.message, str)
    if not result.improved:
        np.testing.assert_array_equal(result.matrix, shifted)


# --------------------------------------------------------------------------- real instrument files

RENISHAW = DATA / "renishaw-raman-whitelight"


@pytest.mark.slow  # over 0.75 s: the fast lane stays under a minute
@pytest.mark.data
@pytest.mark.parametrize("name", ["renishaw_test_map2.wdf", "renishaw_test_map.wdf"])
def test_real_renishaw_maps_refine_at_default_options(name):
    if not has_module("rsciio"):
        pytest.skip("rosettasciio is not installed")
    path = RENISHAW / name
    if not path.exists():
        pytest.skip("the Renishaw data set is not available")
    # The map, its white-light image and the stage transform (DESIGN "Instrument files"; the reader's own
    # tests check the transform against the stage positions).
    sample = read_instrument(path)
    guide, cube, initial = sample.guide, sample.cube, sample.initial
    result = _refine(guide, cube, initial)
    assert np.isfinite(result.matrix).all() and result.registered.shape[2] == cube.shape[2]
    # The map covers a small part of its image: the working grid is the region around it.
    region = footprint_region(cube.shape, initial, guide.shape[:2])
    rows, cols = result.registered.shape[:2]
    assert rows * cols < guide.shape[0] * guide.shape[1]
    assert result.valid.any()
    if name == "renishaw_test_map2.wdf":  # 20 x 20 points on about 25 x 25 of 480 x 752 pixels
        assert region[2] * region[3] < 30 * 30 and result.levels >= 1
    # Neither file has a known truth; each gets the outcome the guard gives it (measured): the 20 x 20
    # map explains the guide less at its best registration than at the stage placement (fit 0.499 ->
    # 0.457), the 3 x 3 map's scales it by up to 1.8.
    assert not result.improved, result.message
    reason = {"renishaw_test_map2.wdf": "explains the guide no better", "renishaw_test_map.wdf": "implausible"}[name]
    assert reason in result.message
    np.testing.assert_array_equal(result.matrix, initial)
