"""Estimates whose pixels lie 2 or more cube pixels apart read the cube's pyramid level (passes.coarsening)."""

import numpy as np
import pytest
import scipy.ndimage as ndi

from ggrad_gpu import refine
from ggrad_gpu._lazy.chunked import checkpoints
from ggrad_gpu.metrics import target_registration_error
from ggrad_gpu.refinement import passes
from ggrad_gpu.refinement.basins import basin_level
from ggrad_gpu.refinement.passes import build_problem, coarsening, estimate_pass
from ggrad_gpu.refinement.preparation import prepare_cube
from ggrad_gpu.synthetic import make_phantom

from helpers import has_module


@pytest.fixture(scope="module")
def large():
    """A cube finer than the grids that choose among basins: 640 x 640 cube pixels, one per guide pixel."""
    return make_phantom(shape=(640, 640), bands=4, native_factor=1, seed=0)


def test_the_level_is_scipys_blur_then_every_second_pixel():
    cube = np.random.default_rng(0).random((40, 36, 3)).astype(np.float32)
    expected = cube
    for _ in range(2):
        expected = ndi.gaussian_filter(expected, (1, 1, 0), mode="reflect")[::2, ::2]
    prepared = prepare_cube(cube, None, np)
    np.testing.assert_allclose(prepared.coarsened(2), expected, atol=1e-6)
    assert prepared.coarsened(2) is prepared.coarsened(2)  # made once


def test_only_grids_two_or_more_cube_pixels_apart_read_a_level(large):
    problem = build_problem(large.guide, large.cube, initial=large.initial, backend="numpy")
    step, _ = basin_level(problem)
    assert (problem.grid.cube_step, step) == (1, 2)  # 640 x 640 is more than basins.BASIN_PIXELS
    assert [coarsening(problem, s) for s in (1, step, 2 * step)] == [0, 1, 2]
    holed = large.cube.copy()
    holed[3, 4, :] = np.nan  # missing values: the blur would spread them, so the cube itself is read
    assert coarsening(build_problem(large.guide, holed, initial=large.initial, backend="numpy"), step) == 0


@pytest.mark.skipif(not has_module("dask"), reason="needs dask")
def test_coarse_estimates_of_a_lazy_cube_read_it_once_and_match_the_in_memory_cube(large, monkeypatch):
    import dask.array as da

    reads = []

    def counted(block, block_info=None):
        reads.append(block_info[0]["chunk-location"])
        return block

    lazy = da.from_array(large.cube, chunks=(160, 160, -1)).map_blocks(counted, dtype=large.cube.dtype)
    options = dict(initial=large.initial, backend="numpy", denoise=False)
    problem = build_problem(large.guide, lazy, **options)
    step, levels = basin_level(problem)
    moved = np.array([[1.0, 0.0, 3.0], [0.0, 1.0, -2.0], [0.0, 0.0, 1.0]])

    def reads_of(problem, placement):
        del reads[:]
        with checkpoints():
            estimate = estimate_pass(problem, placement, step, levels=levels)
        return len(reads), estimate

    first, estimate = reads_of(problem, np.eye(3))
    again, _ = reads_of(problem, moved)
    assert first == 16 and again == 0  # the level, from one read of each chunk, serves every placement
    in_memory = estimate_pass(build_problem(large.guide, large.cube, **options), np.eye(3), step, levels=levels)
    np.testing.assert_allclose(estimate.gradient.grad_y, in_memory.gradient.grad_y, rtol=1e-4, atol=1e-6)
    # Reading the cube itself, every estimate passes over it again.
    monkeypatch.setattr(passes, "coarsening", lambda problem, step: 0)
    assert reads_of(build_problem(large.guide, lazy, **options), moved)[0] >= 16


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_a_cube_finer_than_the_basins_grid_refines_within_a_fifth_of_a_pixel(seed):
    # 1100 x 1100 cube pixels, one per guide pixel, 16 px off: the first estimate and the fits read level 2
    # (measured: 0.057 / 0.108 and 0.082 / 0.183 px; reading the cube itself, 0.064 / 0.126 and 0.089 / 0.194).
    phantom = make_phantom(shape=(1100, 1100), bands=24, native_factor=1, seed=seed)
    result = refine(phantom.guide, phantom.cube, initial=phantom.initial, backend="numpy")
    error = target_registration_error(result.matrix, phantom.matrix, phantom.guide.shape)
    assert result.improved, result.message
    assert error.mean < 0.15 and error.max < 0.3, error
