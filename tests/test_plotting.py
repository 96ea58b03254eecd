"""The report figure: its panels (found by label) and their data, the verdict, and the PNG writer."""

import os
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ggrad_gpu import refine
from ggrad_gpu.io import write_figure as save_report
from ggrad_gpu.plotting.report import PANELS, report_figure, verdict_line
from ggrad_gpu.synthetic import make_phantom

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(shape=(96, 112), bands=24, seed=0)


@pytest.fixture(scope="module")
def refined(phantom):
    result = refine(phantom.guide, phantom.cube, initial=phantom.initial, backend="numpy")
    assert result.improved, result.message  # the phantom is a clear case
    return result


@pytest.fixture(scope="module")
def kept():
    """A refinement that keeps the initial transform: a cube of noise has no structure to match."""
    phantom = make_phantom(shape=(96, 112), bands=12, seed=4)
    noise = np.random.default_rng(0).random(phantom.cube.shape).astype(np.float32)
    with pytest.warns(UserWarning, match="kept the initial transform"):
        result = refine(phantom.guide, noise, initial=phantom.initial, levels=3, reestimate=False,
                        backend="numpy")
    assert not result.improved
    return SimpleNamespace(refinement=result, guide=phantom.guide, cube=noise)


@pytest.fixture(scope="module")
def figure(refined, phantom):
    return report_figure(refined, phantom.guide, phantom.cube)


def panel(figure, label):
    found = [ax for ax in figure.axes if ax.get_label() == label]
    assert len(found) == 1, f"expected one axes labelled {label!r}, found {len(found)}"
    return found[0]


def test_every_panel_exists_with_a_title(figure):
    assert isinstance(figure, Figure)
    for label in PANELS:
        assert panel(figure, label).get_title()
    assert set(PANELS) == {"grad_x", "grad_y", "before", "after", "band weights", "level weights"}


def test_size_and_layout(figure):
    width, height = figure.get_size_inches()
    assert 8 <= width <= 16 and 6 <= height <= 12
    assert 100 <= figure.dpi <= 150
    assert figure.get_layout_engine() is not None
    FigureCanvasAgg(figure).draw()  # renders without a display


def test_gradient_panels_show_the_global_gradients(figure, refined):
    for label, image in (("grad_x", refined.gradient.grad_x), ("grad_y", refined.gradient.grad_y)):
        shown = panel(figure, label).get_images()
        assert len(shown) == 1
        data = np.ma.filled(shown[0].get_array().astype(float), np.nan)
        assert data.shape == image.shape
        expected = np.asarray(image, dtype=float)
        if label == "grad_y" and refined.gradient.valid is not None:
            expected = np.where(refined.gradient.valid, expected, np.nan)
        np.testing.assert_allclose(data, expected, equal_nan=True)
    # a colour bar for each
    assert sum(ax.get_label() == "<colorbar>" for ax in figure.axes) >= 2


def test_overlays_are_rgb_on_the_working_grid(figure, refined):
    before = panel(figure, "before").get_images()[0].get_array()
    after = panel(figure, "after").get_images()[0].get_array()
    assert before.shape == after.shape == refined.gradient.grad_x.shape + (3,)
    for image in (before, after):
        assert np.isfinite(image).all() and image.min() >= 0 and image.max() <= 1
        np.testing.assert_array_equal(image[..., 0], image[..., 2])  # the guide is magenta
    # the guide channel is the same before and after (where the cube covers both), the cube moved
    covered = (before[..., 1] > 0) & (after[..., 1] > 0)
    assert covered.mean() > 0.5
    np.testing.assert_array_equal(before[..., 0][covered], after[..., 0][covered])
    assert not np.array_equal(before[..., 1], after[..., 1])


def test_a_lazy_cube_is_read_once_and_shown_as_in_memory(figure, refined, phantom):
    # A cube beyond memory (the streamed CLI passes its dask array): the report reads each chunk once,
    # not once per overlay, and shows what the in-memory cube shows.
    da = pytest.importorskip("dask.array")
    reads = []

    def read(block, block_info=None):
        reads.append(block_info[0]["chunk-location"])
        return block

    lazy = da.from_array(phantom.cube, chunks=(8, 8, -1)).map_blocks(read, dtype=phantom.cube.dtype)
    shown = report_figure(refined, phantom.guide, lazy)
    assert len(reads) == lazy.numblocks[0] * lazy.numblocks[1] and len(set(reads)) == len(reads), reads
    for label in ("before", "after"):
        np.testing.assert_allclose(panel(shown, label).get_images()[0].get_array(),
                                   panel(figure, label).get_images()[0].get_array(), atol=1e-5)


def test_overlay_is_black_green_outside_the_cube(phantom, refined):
    # Shrink the cube's placement so that it covers only part of the working grid.
    initial = refined.initial @ np.array([[2.0, 0, 0], [0, 2.0, 0], [0, 0, 1]])
    shifted = SimpleNamespace(**{**vars_of(refined), "initial": initial})
    figure = report_figure(shifted, phantom.guide, phantom.cube)
    before = panel(figure, "before").get_images()[0].get_array()
    rows, cols = before.shape[:2]
    # guide point p maps to cube point 2 * initial @ p: the far half lies outside
    assert np.all(before[rows - 5 :, :, 1] == 0) and np.all(before[:, cols - 5 :, 1] == 0)
    assert before[: rows // 3, : cols // 3, 1].max() > 0


def vars_of(refinement):
    return {name: getattr(refinement, name) for name in refinement.__dataclass_fields__}


def test_band_weights_lines_are_the_channel_weights(figure, refined):
    weights = refined.gradient.channel_weights
    lines = panel(figure, "band weights").get_lines()
    assert len(lines) == weights.shape[0]
    for line, row in zip(lines, weights):
        np.testing.assert_array_equal(line.get_ydata(), row)
        np.testing.assert_array_equal(line.get_xdata(), np.arange(weights.shape[1]))
    assert "band index" in panel(figure, "band weights").get_xlabel()


def test_band_centres_give_the_x_data_and_unit(refined, phantom):
    figure = report_figure(refined, phantom.guide, phantom.cube, band_centres=phantom.wavenumbers,
                           band_unit="cm^-1")
    ax = panel(figure, "band weights")
    for line in ax.get_lines():
        np.testing.assert_array_equal(line.get_xdata(), phantom.wavenumbers)
    assert "cm^-1" in ax.get_xlabel()


def test_level_weights_bars_are_alpha_and_beta(figure, refined):
    containers = {container.get_label(): container for container in panel(figure, "level weights").containers}
    assert set(containers) == {"alpha", "beta"}
    for name in ("alpha", "beta"):
        heights = [patch.get_height() for patch in containers[name].patches]
        np.testing.assert_array_equal(heights, getattr(refined.gradient, name))


def test_suptitle_says_improved(figure, refined):
    title = figure.get_suptitle()
    assert title.startswith("Improved")
    quality = refined.quality
    assert f"{quality['ncc_before']:.2f} -> {quality['ncc_after']:.2f}" in title
    change = 100 * (quality["mse_after"] - quality["mse_before"]) / quality["mse_before"]
    assert f"MSE {change:+.0f} %" in title
    assert "cube moved by" in title


def test_title_line_comes_first(refined, phantom):
    figure = report_figure(refined, phantom.guide, phantom.cube, title="sample 7")
    assert figure.get_suptitle().splitlines()[0] == "sample 7"


def test_kept_verdict(kept):
    figure = report_figure(kept.refinement, kept.guide, kept.cube)
    title = figure.get_suptitle()
    assert title.startswith("Kept the initial transform")
    assert "Improved" not in title and "moved" not in title
    reason = kept.refinement.message.split(": ", 1)[1].split(" (gradient", 1)[0]
    assert reason in title.replace("\n", " ")
    before = panel(figure, "before").get_images()[0].get_array()
    after = panel(figure, "after").get_images()[0].get_array()
    np.testing.assert_array_equal(before, after)  # the same transform


def test_verdict_line_without_quality():
    assert verdict_line(SimpleNamespace(improved=True, message="refined", quality={})) == "Improved"
    line = verdict_line(SimpleNamespace(improved=False, message="kept the initial transform: no luck", quality={}))
    assert line == "Kept the initial transform: no luck"


def test_baseline_method_without_band_weights(phantom):
    # Baseline methods have all-zero band weights: the cube image falls back to the band mean.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        result = refine(phantom.guide, phantom.cube, initial=phantom.initial, method="band_std", backend="numpy")
    figure = report_figure(result, phantom.guide, phantom.cube)
    after = panel(figure, "after").get_images()[0].get_array()
    assert after[..., 1].max() > 0
    assert len(panel(figure, "band weights").get_lines()) == 1


@pytest.mark.parametrize(
    "change, match",
    [
        ({"band_centres": np.arange(5.0)}, "band_centres"),
        ({"band_centres": np.full(24, np.nan)}, "band_centres"),
        ({"guide": np.zeros((50, 50), np.float32)}, "guide"),
        ({"guide": np.zeros((96, 112, 3), np.float32)}, "guide"),
        ({"cube": np.zeros((20, 23, 7), np.float32)}, "cube"),
        ({"cube": np.zeros((20, 23), np.float32)}, "cube"),
    ],
)
def test_errors_name_the_parameter(refined, phantom, change, match):
    arguments = {"guide": phantom.guide, "cube": phantom.cube, **change}
    band_centres = arguments.pop("band_centres", None)
    with pytest.raises(ValueError, match=match):
        report_figure(refined, arguments["guide"], arguments["cube"], band_centres=band_centres)


def test_cupy_inputs(xp):
    phantom = make_phantom(shape=(96, 112), bands=24, seed=0)
    guide, cube = xp.asarray(phantom.guide), xp.asarray(phantom.cube)
    result = refine(guide, cube, initial=phantom.initial)
    figure = report_figure(result, guide, cube, band_centres=xp.asarray(phantom.wavenumbers), band_unit="cm^-1")
    after = panel(figure, "after").get_images()[0].get_array()
    assert isinstance(after, np.ndarray) and after.shape == tuple(result.gradient.grad_x.shape) + (3,)
    assert figure.get_suptitle().startswith("Improved" if result.improved else "Kept")


def test_save_report_writes_a_png(figure, tmp_path):
    path = save_report(figure, tmp_path / "report.png")
    assert path == tmp_path / "report.png"
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert os.listdir(tmp_path) == ["report.png"]
    image = pytest.importorskip("PIL.Image")
    with image.open(path) as png:
        width, height = png.size
        assert png.format == "PNG"
    assert 800 <= width <= 3000 and 800 <= height <= 3000


def test_save_report_refuses_to_overwrite(figure, tmp_path):
    path = tmp_path / "report.png"
    path.write_bytes(b"old")
    with pytest.raises(FileExistsError, match="report.png"):
        save_report(figure, path)
    assert path.read_bytes() == b"old"
    save_report(figure, str(path), overwrite=True)
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert os.listdir(tmp_path) == ["report.png"]


def test_save_report_needs_the_folder(figure, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        save_report(figure, tmp_path / "missing" / "report.png")


def test_failed_save_leaves_nothing(figure, tmp_path, monkeypatch):
    def broken(self, *args, **kwargs):
        with open(args[0], "wb") as handle:  # half-written, then the failure
            handle.write(PNG_SIGNATURE)
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken)
    with pytest.raises(OSError, match="disk full"):
        save_report(figure, tmp_path / "report.png")
    assert os.listdir(tmp_path) == []
    # an existing report survives a failed overwrite
    (tmp_path / "report.png").write_bytes(b"old")
    with pytest.raises(OSError, match="disk full"):
        save_report(figure, tmp_path / "report.png", overwrite=True)
    assert os.listdir(tmp_path) == ["report.png"]
    assert (tmp_path / "report.png").read_bytes() == b"old"


def test_large_grids_are_shown_block_averaged(refined, phantom, monkeypatch):
    """Images larger than a panel can show are averaged over blocks (NaN left out), not held whole."""
    from ggrad_gpu.plotting import report as plotting

    monkeypatch.setattr(plotting, "DISPLAY_SIDE", 40)
    small = report_figure(refined, phantom.guide, phantom.cube)
    rows, cols = refined.gradient.grad_x.shape
    step = -(-max(rows, cols) // 40)
    grad_x = np.asarray(refined.gradient.grad_x, dtype=float)
    shown = np.ma.filled(panel(small, "grad_x").get_images()[0].get_array().astype(float), np.nan)
    assert shown.shape == (-(-rows // step), -(-cols // step)) and max(shown.shape) <= 40
    # an independent block mean: the top-left block and a block on the ragged last column
    np.testing.assert_allclose(shown[0, 0], grad_x[:step, :step].mean())
    np.testing.assert_allclose(shown[1, -1], grad_x[step:2 * step, (shown.shape[1] - 1) * step:].mean())
    overlay = panel(small, "after").get_images()[0].get_array()
    assert overlay.shape == shown.shape + (3,)
