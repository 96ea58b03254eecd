"""Per-pixel intensity normalisation for the estimates (``core.intensity``, ``refine(normalise=...)``)."""

import warnings

import numpy as np
import pytest

from ggrad_gpu import refine, synthetic
from ggrad_gpu.core.intensity import MIN_TOTAL_SHARE, intensity_scale, normalised
from ggrad_gpu.metrics import target_registration_error
from ggrad_gpu.refinement.preparation import prepare_cube


def _gain_cube(seed=0, shape=(12, 14, 9)):
    rng = np.random.default_rng(seed)
    spectra = rng.uniform(0.5, 2.0, shape)
    gain = rng.uniform(0.5, 3.0, shape[:2])
    return (gain[:, :, None] * spectra).astype(np.float32)


def test_the_scale_brings_every_total_to_the_median_total():
    cube = _gain_cube()
    totals = cube.astype(np.float64).sum(axis=2)
    scale = intensity_scale(cube)
    np.testing.assert_allclose(scale, np.median(totals) / totals, rtol=1e-12)
    result = normalised(cube, scale)
    np.testing.assert_allclose(result.sum(axis=2, dtype=np.float64), np.median(totals), rtol=1e-5)
    np.testing.assert_allclose(result / result.sum(axis=2, keepdims=True), cube / cube.sum(axis=2, keepdims=True),
                               rtol=1e-5)  # the spectra's shapes are kept


def test_missing_values_and_pixels_without_data_are_left_out_of_the_totals():
    cube = _gain_cube()
    cube[2, 3, 4] = np.nan
    with_data = np.ones(cube.shape[:2], bool)
    with_data[2, 3] = False
    cube[5, 5] = 1e6  # a pixel without data, however bright, does not move the median
    with_data[5, 5] = False
    scale = intensity_scale(cube, with_data)
    totals = np.nansum(cube.astype(np.float64), axis=2)
    median = np.median(totals[with_data])
    np.testing.assert_allclose(scale[with_data], median / totals[with_data], rtol=1e-12)
    assert scale[2, 3] == 1.0 and scale[5, 5] == 1.0


@pytest.mark.parametrize("kind", ["centred", "sparse counts", "all zero"])
def test_spectra_without_a_clearly_positive_total_are_not_normalised(kind):
    rng = np.random.default_rng(1)
    if kind == "centred":  # SNV-like data: every spectrum sums to about 0
        cube = rng.standard_normal((10, 10, 20))
        cube -= cube.mean(axis=2, keepdims=True)
    elif kind == "sparse counts":  # 2 counts per pixel: many pixels have none
        cube = rng.poisson(2 / 20, (30, 30, 20)).astype(float)
    else:
        cube = np.zeros((5, 5, 4))
    assert intensity_scale(cube) is None


def test_the_rule_reads_the_low_percentile_against_the_threshold():
    cube = np.ones((10, 10, 4))
    cube[0, :2] = MIN_TOTAL_SHARE * 0.5  # two pixels in 100 (over the 1st percentile) at a tenth of the median
    assert intensity_scale(cube) is None
    cube[0, 1] = 1.0  # one pixel in 100: the 1st percentile lies above the threshold
    assert intensity_scale(cube) is not None


def test_the_cube_given_is_never_changed():
    cube = _gain_cube()
    kept = cube.copy()
    prepared = prepare_cube(cube, None, np, denoise=False, normalise=True)
    assert prepared.values is cube and np.array_equal(cube, kept)
    assert prepared.normalised is not None and not np.shares_memory(prepared.normalised, cube)
    assert prepared.for_estimates is prepared.normalised and prepared.as_given().for_estimates is cube


def test_a_lazy_cube_is_normalised_as_an_in_memory_one():
    da = pytest.importorskip("dask.array")
    cube = _gain_cube(shape=(16, 18, 6))
    lazy = da.from_array(cube, chunks=(5, 7, 4))
    scale = intensity_scale(lazy)
    np.testing.assert_allclose(scale, intensity_scale(cube), rtol=1e-12)
    result = normalised(lazy, scale)
    assert isinstance(result, da.Array)
    np.testing.assert_array_equal(result.compute(), normalised(cube, intensity_scale(cube)))


@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.slow  # over 0.75 s: the fast lane stays under a minute
def test_a_cube_with_its_gain_left_in_refines_within_half_a_pixel(seed):
    # The phantom's spectra keep their smooth gain (normalisation=None), as raw counts and
    # unnormalised spectra do: its edges are in every band and not in the guide.
    phantom = synthetic.make_phantom(shape=(200, 240), bands=40, native_factor=4, normalisation=None, seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        results = {flag: refine(phantom.guide, phantom.cube, initial=phantom.initial, backend="numpy",
                                normalise=flag) for flag in (True, False)}
    tre = {flag: target_registration_error(r.matrix, phantom.matrix, phantom.guide.shape)
           for flag, r in results.items()}
    assert results[True].improved and tre[True].max < 0.5
    assert tre[False].max > 1.0  # the case needs the normalisation: without it, it is not registered


def test_refine_rejects_a_normalise_that_is_not_a_bool():
    phantom = synthetic.make_phantom(shape=(64, 64), bands=8, seed=0)
    with pytest.raises(TypeError, match="normalise must be True or False"):
        refine(phantom.guide, phantom.cube, backend="numpy", normalise="yes")


def test_integer_counts_are_normalised_as_floats():
    cube = np.random.default_rng(0).poisson(50, (8, 9, 5)).astype(np.int32)
    totals = cube.sum(axis=2, keepdims=True)
    result = normalised(cube, intensity_scale(cube))
    assert result.dtype == np.float32
    np.testing.assert_allclose(result, cube / totals * np.median(totals), rtol=1e-6)


def test_a_cube_normalised_already_is_left_as_it_is():
    cube = _gain_cube()
    cube /= cube.sum(axis=2, keepdims=True)
    assert intensity_scale(cube) is None
    assert prepare_cube(cube, None, np, normalise=True).normalised is None


@pytest.mark.slow  # over 0.75 s: the fast lane stays under a minute
def test_refine_records_which_spectra_the_estimates_read():
    raw = synthetic.make_phantom(shape=(200, 240), bands=40, native_factor=4, normalisation=None, seed=1)
    normalised_already = synthetic.make_phantom(shape=(200, 240), bands=40, native_factor=4, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        gain = refine(raw.guide, raw.cube, initial=raw.initial, backend="numpy")
        equal = refine(normalised_already.guide, normalised_already.cube, initial=normalised_already.initial,
                       backend="numpy")
        as_given = refine(raw.guide, raw.cube, initial=raw.initial, backend="numpy", normalise=False)
    assert gain.quality["normalised"] is True
    assert equal.quality["normalised"] is False and as_given.quality["normalised"] is False


@pytest.mark.slow  # over 0.75 s: the fast lane stays under a minute
def test_a_lazy_cube_is_refined_with_normalised_spectra_as_in_memory():
    da = pytest.importorskip("dask.array")
    phantom = synthetic.make_phantom(shape=(200, 240), bands=40, native_factor=4, normalisation=None, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        in_memory = refine(phantom.guide, phantom.cube, initial=phantom.initial, backend="numpy")
        lazy = refine(phantom.guide, da.from_array(phantom.cube, chunks=(16, 20, 40)), initial=phantom.initial,
                      backend="numpy")
    assert in_memory.quality["normalised"] and lazy.quality["normalised"]
    # The registration stops once its (damped) step is under 1e-3 px: from images 1e-5 apart (the
    # chunked Gram sums), two runs stop up to a few hundredths of a pixel apart (0.022 px measured).
    assert target_registration_error(lazy.matrix, in_memory.matrix, phantom.guide.shape).max < 0.05
    for result in (in_memory, lazy):
        assert target_registration_error(result.matrix, phantom.matrix, phantom.guide.shape).mean < 0.2


@pytest.mark.slow  # over 0.75 s: the fast lane stays under a minute
def test_ggrad_refine_says_and_records_that_it_normalised(tmp_path, capsys):
    import json

    from ggrad_gpu.cli import main

    phantom = synthetic.make_phantom(shape=(200, 240), bands=40, native_factor=4, normalisation=None, seed=1)
    np.save(tmp_path / "guide.npy", phantom.guide)
    np.save(tmp_path / "cube.npy", phantom.cube)
    np.savetxt(tmp_path / "stage.txt", phantom.initial)
    assert main(["refine", str(tmp_path / "guide.npy"), str(tmp_path / "cube.npy"), "--initial",
                 str(tmp_path / "stage.txt"), "-o", str(tmp_path / "out")]) == 0
    assert "estimated from each spectrum divided by its total (cube.npy" in capsys.readouterr().out
    record = json.loads((tmp_path / "out" / "transform.json").read_text())
    assert record["quality"]["normalised"] is True and record["improved"] is True
