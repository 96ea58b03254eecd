"""Tiled mosaics: the phantom, the stage model, refine_mosaic on Dask, and the fused mosaic in Zarr."""

import threading
import weakref

import numpy as np
import pytest
import scipy.ndimage as ndi

zarr = pytest.importorskip("zarr")
pytest.importorskip("dask")

from ggrad_gpu import refine_mosaic, warp_cube  # noqa: E402
from ggrad_gpu.core.stage_model import fit_stage_model, largest_displacement  # noqa: E402
from ggrad_gpu.io.resumable import ResumableArray  # noqa: E402
from ggrad_gpu.metrics import footprint_region, target_registration_error  # noqa: E402
from ggrad_gpu.scaleout.fusion import fuse_mosaic, mosaic_array, mosaic_grid  # noqa: E402
from ggrad_gpu.synthetic import affine_about_center, make_mosaic  # noqa: E402


def _shift(rows, cols):
    return np.array([[1.0, 0, rows], [0, 1, cols], [0, 0, 1]])


class Unreadable:
    """A tile whose file cannot be read: it has a shape, and reading it raises."""

    shape = (32, 32, 8)

    def __array__(self, dtype=None, copy=None):
        raise OSError("tile.npy: truncated file")


# --------------------------------------------------------------------------- the phantom


def test_make_mosaic_holds_its_truth():
    mosaic = make_mosaic(grid=(3, 4), tile_shape=(16, 16), bands=4, seed=2)
    again = make_mosaic(grid=(3, 4), tile_shape=(16, 16), bands=4, seed=2)
    assert np.array_equal(mosaic.guide, again.guide) and np.array_equal(mosaic.tiles[3], again.tiles[3])
    assert len(mosaic.tiles) == 12 and mosaic.tiles[0].shape == (16, 16, 4)
    rows, cols = mosaic.guide.shape
    for i, (matrix, initial) in enumerate(zip(mosaic.matrices, mosaic.initials)):
        # The truth places each tile on its window of the guide; the stage adds its error and a jitter.
        region = footprint_region(mosaic.tiles[i].shape, matrix, mosaic.guide.shape)
        assert region == mosaic.footprints[i]
        expected = matrix @ mosaic.stage_error @ affine_about_center((rows, cols), shift=mosaic.jitter[i])
        np.testing.assert_allclose(initial, expected, atol=1e-12)
    # Neighbours overlap; the slipped tile's own error is far beyond the others'.
    first, second = mosaic.footprints[0], mosaic.footprints[1]
    assert second[1] < first[1] + first[3]
    own = np.hypot(*mosaic.jitter.T)
    assert own[mosaic.slipped] > 5 * np.delete(own, mosaic.slipped).max()
    # The featureless tile shows no structure; the others do.
    # (the spread of each band over the tile once the noise is smoothed away, the largest over bands)
    contrast = [ndi.gaussian_filter(t, (1.5, 1.5, 0)).std(axis=(0, 1)).max() for t in mosaic.tiles]
    assert contrast[mosaic.featureless] < 0.2 * np.delete(contrast, mosaic.featureless).min()


def test_make_mosaic_names_bad_arguments():
    with pytest.raises(ValueError, match="overlap"):
        make_mosaic(overlap=0.6)
    with pytest.raises(ValueError, match="slipped"):
        make_mosaic(grid=(2, 2), slipped=7)
    with pytest.raises(ValueError, match="featureless"):
        make_mosaic(slipped=3, featureless=3)


# --------------------------------------------------------------------------- the stage model


def test_stage_model_recovers_a_known_correction_past_a_slip():
    rng = np.random.default_rng(0)
    correction = affine_about_center((400, 500), rotation_deg=0.7, scale=1.02, shift=(4.0, -3.0))
    initials = np.stack([np.array([[0.25, 0, -r * 27.0], [0, 0.25, -c * 27.0], [0, 0, 1]])
                         for r in range(3) for c in range(4)])
    refined = initials @ correction
    refined[5] = refined[5] @ _shift(12.0, -9.0)  # a slip
    refined[2] = refined[2] @ _shift(*rng.normal(0, 0.01, 2))  # tiny noise: still an inlier
    model = fit_stage_model(initials, refined, [(32, 32)] * 12, np.ones(12, bool))
    # TRE over the guide (400 x 500), not element-wise: 0.00054 px max measured.
    assert target_registration_error(model.matrix, correction, (400, 500)).max < 0.0015
    assert model.inliers.tolist() == [i != 5 for i in range(12)]
    assert model.distances[5] > model.tolerance >= 4.0  # the floor: one tile pixel, 4 guide px
    # The residual arrow: where the tile's own result puts its centre minus the model's.
    np.testing.assert_allclose(model.residuals[5], [-12.0, 9.0], atol=0.05)  # own = initial @ C @ slip


def test_anchored_placement_takes_the_models_linear_part_at_the_tiles_own_centre():
    correction = affine_about_center((400, 500), rotation_deg=0.7, scale=1.02, shift=(4.0, -3.0))
    initial = np.array([[0.25, 0, -27.0], [0, 0.25, -54.0], [0, 0, 1]])
    initials = np.stack([initial @ _shift(0, -27.0 * c) for c in range(3)])
    model = fit_stage_model(initials, initials @ correction, [(32, 32)] * 3, np.ones(3, bool))
    # A tile's own result: the model's, slipped by (7, -5) guide px, its rotation off by 0.3 degrees.
    turned = affine_about_center((400, 500), rotation_deg=0.3)
    own = initial @ correction @ _shift(7.0, -5.0) @ turned
    anchored = model.anchored(initial, own, (32, 32, 8))
    # Linear part (guide to tile): the model's; the tile's centre (15.5, 15.5) lands where its own result puts it.
    np.testing.assert_allclose(anchored[:2, :2], (initial @ correction)[:2, :2], atol=1e-9)
    centre = np.array([15.5, 15.5, 1.0])
    np.testing.assert_allclose(np.linalg.solve(anchored, centre), np.linalg.solve(own, centre), atol=1e-9)
    # The displacement between two placements, over the tile's corners and centre, against a brute-force sweep.
    rows, cols = np.meshgrid([-0.5, 31.5], [-0.5, 31.5], indexing="ij")
    corners = np.stack([rows.ravel(), cols.ravel(), np.ones(4)])
    expected = np.hypot(*(np.linalg.solve(anchored, corners) - np.linalg.solve(own, corners))[:2]).max()
    assert largest_displacement(anchored, own, (32, 32)) == pytest.approx(expected, rel=1e-12)
    assert largest_displacement(own, own, (32, 32)) == 0.0


def test_stage_model_needs_two_refined_tiles():
    initials = np.stack([np.eye(3)] * 3)
    model = fit_stage_model(initials, initials, [(8, 8)] * 3, [True, False, False])
    assert model.matrix is None and np.isnan(model.distances).all()
    with pytest.raises(ValueError, match="stage model"):
        model.placement(np.eye(3))


# --------------------------------------------------------------------------- refine_mosaic


@pytest.fixture(scope="module")
def mosaic():
    # signatures="mixed": the phantom on which refine's accuracy thresholds were set (see README).
    return make_mosaic(grid=(3, 4), tile_shape=(32, 32), bands=8, signatures="mixed", seed=0)


@pytest.fixture(scope="module")
def refined(mosaic):
    """The 12 tiles and one more that cannot be read, refined on threads."""
    seen = []
    result = refine_mosaic(mosaic.guide, mosaic.tiles + [Unreadable()], initials=list(mosaic.initials) +
                           [mosaic.initials[0]], backend="numpy", max_in_flight=2,
                           progress=lambda index, outcome: seen.append(index))
    return result, seen


def _tile_tre(mosaic, i, matrix):
    region = footprint_region(mosaic.tiles[i].shape, mosaic.matrices[i], mosaic.guide.shape)
    return target_registration_error(matrix, mosaic.matrices[i], mosaic.guide.shape, spacing=4, region=region)


@pytest.mark.slow
def test_refine_mosaic_places_every_tile(mosaic, refined):
    result, seen = refined
    assert sorted(seen) == list(range(13))  # every tile reported, the unreadable one too
    assert result.status[12] == "failed" and "truncated" in result.messages[12]
    structured = [i for i in range(12) if i != mosaic.featureless]
    assert all(result.status[i] == "refined" for i in structured)
    for i in structured:
        # Each refined tile: the model's linear part at its own centre, or its own result where that
        # differs from the model's linear part by more than the tolerance.
        anchored = result.model.anchored(mosaic.initials[i], result.own[i], mosaic.tiles[i].shape)
        agrees = largest_displacement(anchored, result.own[i], mosaic.tiles[i].shape) <= result.model.tolerance
        np.testing.assert_array_equal(result.matrices[i], anchored if agrees else result.own[i])


def _phantom_mosaic(signatures, seed):
    # 64 bands, as a hyperspectral tile has (the benchmark's have 256): with 8, a 32 x 32 tile of the
    # default phantom, whose components show only in the bands at their peaks, pins its position to
    # 0.3-0.5 guide px (0.47 px even without noise), which is the tile's information, not the mosaic's.
    return make_mosaic(grid=(3, 4), tile_shape=(32, 32), bands=64, signatures=signatures, seed=seed)


@pytest.mark.slow
@pytest.mark.parametrize("signatures, seed", [("separate", 0), ("separate", 1), ("mixed", 0), ("mixed", 2)])
def test_every_tile_within_a_third_of_a_guide_pixel(signatures, seed):
    mosaic = _phantom_mosaic(signatures, seed)
    result = refine_mosaic(mosaic.guide, mosaic.tiles, initials=mosaic.initials, backend="numpy", max_in_flight=2)
    structured = [i for i in range(12) if i != mosaic.featureless]
    errors = {i: _tile_tre(mosaic, i, result.matrices[i]) for i in range(12)}
    before = {i: _tile_tre(mosaic, i, mosaic.initials[i]) for i in range(12)}
    print(f"{signatures} seed {seed}, per-tile TRE (guide px, mean / max):",
          {i: f"{before[i].mean:.2f} -> {e.mean:.3f} / {e.max:.3f} ({result.status[i]})" for i, e in errors.items()})
    assert all(result.status[i] == "refined" for i in structured)
    # Each tile's, not the average over tiles; measured over the four mosaics: 0.187 / 0.407 px at worst.
    assert max(errors[i].mean for i in structured) <= 0.3
    assert max(errors[i].max for i in structured) < 0.8
    # The featureless tile: placed by the model, within its own jitter of the truth.
    i = mosaic.featureless
    assert result.status[i] == "model"
    assert errors[i].mean < np.hypot(*mosaic.jitter[i]) + 0.5
    # The slipped tile: at its own result's position, not the model's.
    i = mosaic.slipped
    assert result.status[i] == "refined" and not result.model.inliers[i]
    centre = np.array([15.5, 15.5, 1.0])
    np.testing.assert_allclose(np.linalg.solve(result.matrices[i], centre), np.linalg.solve(result.own[i], centre),
                               atol=1e-9)


@pytest.mark.slow
def test_featureless_tile_is_placed_by_the_model_within_the_jitter(mosaic, refined):
    result, _ = refined
    i = mosaic.featureless
    assert result.status[i] == "model"
    np.testing.assert_array_equal(result.matrices[i], mosaic.initials[i] @ result.model.matrix)
    error = _tile_tre(mosaic, i, result.matrices[i])
    jitter = np.hypot(*mosaic.jitter[i])
    print(f"featureless tile: TRE {_tile_tre(mosaic, i, mosaic.initials[i]).mean:.2f} -> {error.mean:.2f} px; "
          f"its own jitter {jitter:.2f} px")
    # The model removes the stage's shared error; the tile's own shift remains.
    assert error.mean < jitter + 0.5
    assert error.mean < _tile_tre(mosaic, i, mosaic.initials[i]).mean


@pytest.mark.slow
def test_slipped_tile_keeps_its_own_result(mosaic, refined):
    result, _ = refined
    i = mosaic.slipped
    assert result.status[i] == "refined" and not result.model.inliers[i]
    assert result.model.distances[i] > result.model.tolerance  # it disagrees with the model ...
    assert result.quality[i]["ncc_after"] >= 0.6  # ... on a strong match
    # Its own position (the centre where its own result puts it), the model's rotation and scale.
    anchored = result.model.anchored(mosaic.initials[i], result.own[i], mosaic.tiles[i].shape)
    np.testing.assert_array_equal(result.matrices[i], anchored)
    assert _tile_tre(mosaic, i, result.own[i]).max < 1.0
    assert _tile_tre(mosaic, i, result.matrices[i]).max < 1.0
    assert _tile_tre(mosaic, i, result.model.placement(mosaic.initials[i])).mean > 10


@pytest.mark.slow
def test_a_weak_disagreeing_match_is_placed_by_the_model(mosaic, refined):
    result, _ = refined
    i = mosaic.slipped
    # The same outcomes, judged with a bar the slipped tile's match does not reach.
    strict = refine_mosaic(mosaic.guide, [mosaic.tiles[j] for j in range(12)], initials=mosaic.initials,
                           backend="numpy", strong_ncc=result.quality[i]["ncc_after"] + 0.01)
    assert strict.status[i] == "model"
    np.testing.assert_allclose(strict.matrices[i], mosaic.initials[i] @ strict.model.matrix)


@pytest.mark.slow
def test_the_same_matrices_and_mosaic_on_a_cluster_of_processes(mosaic, refined, tmp_path):
    distributed = pytest.importorskip("distributed")
    result, _ = refined
    tiles, matrices = mosaic.tiles, result.matrices[:12]
    grid = mosaic_grid([t.shape for t in tiles], matrices, mosaic.guide.shape)
    on_threads = fuse_mosaic(tmp_path / "threads.zarr", tiles, matrices, grid, chunk=32)
    # Two worker processes, one thread each: the tiles and the chunks are pickled to them and back.
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") \
            as cluster, distributed.Client(cluster) as client:
        on_cluster = refine_mosaic(mosaic.guide, tiles, initials=mosaic.initials, backend="numpy", client=client,
                                   max_in_flight=3)
        fused = fuse_mosaic(tmp_path / "cluster.zarr", tiles, matrices, grid, chunk=32, client=client)
    assert on_cluster.status == result.status[:12]
    # The same matrices, to well under a millionth of a guide pixel anywhere on each tile's footprint.
    moved = [target_registration_error(on_cluster.matrices[i], matrices[i], mosaic.guide.shape, spacing=4,
                                       region=footprint_region(tiles[i].shape, matrices[i], mosaic.guide.shape)).max
             for i in range(12)]
    print(f"largest difference, threads against processes: {max(moved):.3g} guide px")
    assert max(moved) < 1e-6
    # The fusion through the cluster writes the same bytes as on threads.
    threads_store, cluster_store = zarr.open_array(str(on_threads)), zarr.open_array(str(fused))
    assert cluster_store.attrs["complete"] is True
    assert cluster_store[:].tobytes() == threads_store[:].tobytes()


class RecordingGuide:
    """A guide read by region (as a Zarr or TIFF guide is) that records each read.

    Per read: the thread that made it and how many regions it has handed out
    are still alive (each region is a fresh copy, tracked until it is freed).
    """

    def __init__(self, array):
        self.array, self.shape = array, array.shape
        self.lock, self.events, self.alive = threading.Lock(), [], 0

    def __getitem__(self, key):
        region = np.array(self.array[key])
        with self.lock:
            self.alive += 1
            self.events.append(("read", threading.get_ident(), self.alive))
        weakref.finalize(region, self._freed)
        return region

    def _freed(self):
        with self.lock:
            self.alive -= 1

    def done(self, index, outcome):
        with self.lock:
            self.events.append(("done", index, self.alive))


@pytest.mark.slow  # over 0.75 s: the fast lane stays under a minute
@pytest.mark.parametrize("cap", [1, 2])
def test_each_task_reads_its_own_guide_region_when_it_starts(cap):
    mosaic = make_mosaic(grid=(2, 3), tile_shape=(16, 16), bands=4, signatures="mixed", slipped=None,
                         featureless=None)
    guide = RecordingGuide(mosaic.guide)
    result = refine_mosaic(guide, mosaic.tiles, initials=mosaic.initials, backend="numpy", max_in_flight=cap,
                           progress=guide.done)
    reads = [event for event in guide.events if event[0] == "read"]
    assert len(reads) == 6 and all(status == "refined" for status in result.status)
    # Read inside the tasks (Dask's worker threads), not by the caller before it makes them ...
    assert threading.get_ident() not in {thread for _, thread, _ in reads}
    # ... so a region is read only once a slot is free: never more reads than tiles finished plus the cap,
    # never more regions alive than the cap (a tile's region is freed when its task ends).
    started = finished = 0
    for kind, _, alive in guide.events:
        started, finished = started + (kind == "read"), finished + (kind == "done")
        assert started - finished <= cap and alive <= cap
    assert guide.alive == 0
    # The same placements as from the guide in memory.
    direct = refine_mosaic(mosaic.guide, mosaic.tiles, initials=mosaic.initials, backend="numpy", max_in_flight=cap)
    np.testing.assert_array_equal(result.matrices, direct.matrices)


def test_refine_mosaic_names_bad_arguments(mosaic):
    with pytest.raises(ValueError, match="initials"):
        refine_mosaic(mosaic.guide, mosaic.tiles[:2], initials=mosaic.initials[:3])
    with pytest.raises(TypeError, match="initial"):
        refine_mosaic(mosaic.guide, mosaic.tiles[:1], initials=mosaic.initials[:1], initial=np.eye(3))
    with pytest.raises(ValueError, match="max_in_flight"):
        refine_mosaic(mosaic.guide, mosaic.tiles[:1], initials=mosaic.initials[:1], max_in_flight=0)


# --------------------------------------------------------------------------- fusion


@pytest.fixture(scope="module")
def small():
    """A 2 x 3 mosaic at its true placement, with one band missing at a few pixels of one tile."""
    mosaic = make_mosaic(grid=(2, 3), tile_shape=(20, 24), bands=5, native_factor=3, slipped=None,
                         featureless=None, seed=4)
    tiles = [t.copy() for t in mosaic.tiles]
    tiles[1][3:6, 20:24, 2] = np.nan  # in the overlap with tile 2: tile 2's values stand alone there
    return tiles, mosaic.matrices, mosaic.guide.shape


def _reference(tiles, matrices, guide_shape):
    """The mosaic built whole, independently: each tile warped onto the grid, weighted by its own feather."""
    r = np.median([1 / np.sqrt(abs(np.linalg.det(m[:2, :2]))) for m in matrices])
    k = max(1, int(round(r)))
    # The grid's first and last blocks: those whose centres fall inside the footprints.
    edges = []
    for tile, m in zip(tiles, matrices):
        h, w = tile.shape[0] - 0.5, tile.shape[1] - 0.5
        corners = np.linalg.inv(m) @ np.array([[-0.5, -0.5, h, h], [-0.5, w, -0.5, w], [1, 1, 1, 1]])
        edges.append((corners[0].min(), corners[0].max(), corners[1].min(), corners[1].max()))
    edges = np.array(edges)
    centre = (k - 1) / 2
    blocks = [[j for j in range(0, guide_shape[axis] // k) if lo < j * k + centre < hi]
              for axis, (lo, hi) in enumerate([(edges[:, 0].min(), edges[:, 1].max()),
                                               (edges[:, 2].min(), edges[:, 3].max())])]
    (r0, *_), (c0, *_) = blocks
    to_guide = np.array([[k, 0, r0 * k + centre], [0, k, c0 * k + centre], [0, 0, 1.0]])
    shape = (len(blocks[0]), len(blocks[1]))
    total = np.zeros(shape + (tiles[0].shape[2],))
    weight = np.zeros_like(total)
    rows, cols = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    for tile, m in zip(tiles, matrices):
        to_tile = m @ to_guide
        values = warp_cube(tile, to_tile, shape)
        q = np.tensordot(to_tile, np.stack([rows, cols, np.ones_like(rows)]), axes=1)
        distance = np.minimum.reduce([q[0] + 0.5, tile.shape[0] - 0.5 - q[0], q[1] + 0.5, tile.shape[1] - 0.5 - q[1]])
        feather = np.clip(distance, 0, None)[:, :, None] * np.isfinite(values)
        total += np.nan_to_num(values) * feather
        weight += feather
    with np.errstate(invalid="ignore"):
        return to_guide, total / np.where(weight > 0, weight, np.nan)


def test_fused_mosaic_equals_an_independent_reference(small, tmp_path):
    tiles, matrices, guide_shape = small
    grid = mosaic_grid([t.shape for t in tiles], matrices, guide_shape)
    path = fuse_mosaic(tmp_path / "mosaic.zarr", tiles, matrices, grid, chunk=16, band_centres=range(5))
    store = zarr.open_array(str(path), mode="r")
    to_guide, expected = _reference(tiles, matrices, guide_shape)
    np.testing.assert_array_equal(store.attrs["mosaic_to_guide"], to_guide)
    assert store.attrs["complete"] is True and store.attrs["band_centres"] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert store.shape == expected.shape and store.chunks == (16, 16, 5) and store.dtype == np.float32
    fused = store[:]
    np.testing.assert_array_equal(np.isnan(fused), np.isnan(expected))
    np.testing.assert_allclose(fused, expected, rtol=1e-5, atol=1e-6, equal_nan=True)
    # The lazy dask.array view holds the same values.
    np.testing.assert_array_equal(mosaic_array(tiles, matrices, grid, chunk=16).compute(), fused)


@pytest.mark.parametrize("with_gaps", [False, True])
def test_fused_chunk_has_the_bits_of_per_band_float32_weights(small, with_gaps):
    """The chunk against the plain float32 formulation: every band weighted where it has a value, in tile order."""
    from ggrad_gpu.scaleout.fusion import feather_weights, fuse_chunk

    tiles, matrices, guide_shape = small
    if not with_gaps:
        tiles = [np.nan_to_num(t, nan=0.5) for t in tiles]
    grid = mosaic_grid([t.shape for t in tiles], matrices, guide_shape)
    rows, cols = (2, grid.shape[0] - 1), (3, grid.shape[1] - 2)  # across every overlap
    window = grid.to_guide @ _shift(rows[0], cols[0])
    shape = (rows[1] - rows[0], cols[1] - cols[0])
    total = np.zeros(shape + (5,), np.float32)
    weight = np.zeros_like(total)
    for tile, m in zip(tiles, matrices):
        values = warp_cube(tile, m @ window, shape)
        feather = feather_weights(m @ window, tile.shape, shape).astype(np.float32)[:, :, None]
        present = ~np.isnan(values)
        total += np.where(present, values * feather, np.float32(0))
        weight += present * feather
    with np.errstate(invalid="ignore"):
        expected = total / weight
    fused = fuse_chunk(tiles, matrices, grid, rows, cols)
    assert bool((weight[:, :, 2] != weight[:, :, 0]).any()) == with_gaps  # band 2's gaps weigh in
    assert fused.tobytes() == expected.tobytes()


def test_no_tile_reaches_is_nan(small, tmp_path):
    tiles, matrices, guide_shape = small
    # Tile 0 alone, on the grid of all six: everything beyond its footprint is NaN.
    grid = mosaic_grid([t.shape for t in tiles], matrices, guide_shape)
    fused = zarr.open_array(str(fuse_mosaic(tmp_path / "m.zarr", tiles[:1], matrices[:1], grid, chunk=16)))[:]
    footprint = np.isfinite(warp_cube(tiles[0], matrices[0] @ grid.to_guide, grid.shape)[:, :, 0])
    assert np.isnan(fused[~footprint]).all() and footprint.sum() > 0


class Interrupt(Exception):
    pass


def test_an_interrupted_fusion_resumes_to_the_same_bits(small, tmp_path):
    tiles, matrices, guide_shape = small
    grid = mosaic_grid([t.shape for t in tiles], matrices, guide_shape)
    whole = zarr.open_array(str(fuse_mosaic(tmp_path / "whole.zarr", tiles, matrices, grid, chunk=8)))[:]
    path = tmp_path / "mosaic.zarr"

    def stop_after_five(done, total):
        if done == 5:
            raise Interrupt

    with pytest.raises(Interrupt):
        fuse_mosaic(path, tiles, matrices, grid, chunk=8, max_in_flight=1, progress=stop_after_five)
    interrupted = zarr.open_array(str(path), mode="r")
    assert interrupted.attrs["complete"] is False  # an incomplete store never says complete
    left = len(ResumableArray(path, interrupted).pending())
    total = len(range(0, grid.shape[0], 8)) * len(range(0, grid.shape[1], 8))
    assert 0 < left <= total - 5
    counts = []
    fuse_mosaic(path, tiles, matrices, grid, chunk=8, progress=lambda done, total: counts.append(total))
    assert set(counts) == {left}  # only the missing chunks were written
    resumed = zarr.open_array(str(path), mode="r")
    assert resumed.attrs["complete"] is True
    assert resumed[:].tobytes() == whole.tobytes()


def test_a_store_from_other_inputs_is_refused_without_force(small, tmp_path):
    tiles, matrices, guide_shape = small
    grid = mosaic_grid([t.shape for t in tiles], matrices, guide_shape)
    path = fuse_mosaic(tmp_path / "mosaic.zarr", tiles, matrices, grid, chunk=16)
    before = zarr.open_array(str(path))[:]
    moved = [m @ _shift(0.5, 0) for m in matrices]
    with pytest.raises(FileExistsError, match="other inputs"):
        fuse_mosaic(path, tiles, moved, grid, chunk=16)
    assert zarr.open_array(str(path))[:].tobytes() == before.tobytes()
    fuse_mosaic(path, tiles, moved, grid, chunk=16, force=True)
    after = zarr.open_array(str(path))
    assert after.attrs["complete"] is True and not np.array_equal(after[:], before, equal_nan=True)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        fuse_mosaic(tmp_path / "notes.txt", tiles, matrices, grid)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_ome_zarr_holds_the_mosaic_as_c_y_x(small, tmp_path):
    pytest.importorskip("ome_zarr")
    from ggrad_gpu.scaleout.fusion import write_ome_zarr

    tiles, matrices, guide_shape = small
    grid = mosaic_grid([t.shape for t in tiles], matrices, guide_shape)
    path = fuse_mosaic(tmp_path / "mosaic.zarr", tiles, matrices, grid, chunk=16)
    ome = write_ome_zarr(path, tmp_path / "mosaic.ome.zarr")
    group = zarr.open_group(str(ome), mode="r")
    axes = [axis["name"] for axis in group.attrs["ome"]["multiscales"][0]["axes"]]
    assert axes == ["c", "y", "x"]
    np.testing.assert_array_equal(group["s0"][:], np.moveaxis(zarr.open_array(str(path))[:], 2, 0))
    with pytest.raises(FileExistsError):
        write_ome_zarr(path, ome)
    zarr.open_array(str(path), mode="r+").attrs.update({"complete": False})
    with pytest.raises(ValueError, match="not complete"):
        write_ome_zarr(path, tmp_path / "other.ome.zarr")
    assert not (tmp_path / "other.ome.zarr").exists()
