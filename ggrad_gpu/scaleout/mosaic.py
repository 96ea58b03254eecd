"""``refine_mosaic``: every tile of a mosaic refined on one guide, and a stage model for the rest.

Each tile is refined by :func:`ggrad_gpu.refine` on the guide's region around
it (the working grid's region, :func:`ggrad_gpu.core.geometry.working_grid`: its
footprint under the stage's placement plus the capture margin). A task
carries where its region lies (:class:`GuideWindow`) and its tile, and reads
both when it starts, never the whole guide (a Zarr or TIFF guide is read by
region): the regions and tiles held at once are those of the tasks in
flight, however many tiles the mosaic has. The tasks run on Dask
(:mod:`ggrad_gpu.scaleout.tasks`). Then the stage model
(:mod:`ggrad_gpu.core.stage_model`) is fitted over the tiles that refined, and
each tile gets a status:

- ``"refined"``: its own result passed refine's guard and agrees with the
  model, or disagrees with it on a strong match (``ncc_after`` of at least
  ``strong_ncc``: a genuine slip). It keeps its own position (where its
  own result puts its centre) with the model's shared rotation, scale and
  shear (:meth:`StageModel.anchored`): fitted over all the tiles, those are
  far better known than one small tile's own, whose errors grow towards its
  corners; a tile whose own fit differs from them by more than the
  model's tolerance (more than a slip) keeps its own result whole;
- ``"model"``: its own refinement failed the guard, or disagreed with the
  model on a weaker match; placed by the model, ``initial_i @ C``;
- ``"initial"``: it did not refine and no model could be fitted; its stage
  placement is kept;
- ``"failed"``: the tile could not be read or refined at all (an exception);
  left out of the mosaic.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import numpy as np

from .._backend import is_cupy_array
from ..core.geometry import working_grid
from ..core.stage_model import StageModel, fit_stage_model, largest_displacement
from ..refinement.driver import refine
from .tasks import run_tasks

__all__ = ["STATUSES", "STRONG_NCC", "GuideWindow", "MosaicRefinement", "TileOutcome", "guide_window",
           "quiet_kept_transforms", "refine_mosaic", "refine_tile"]

STATUSES = ("refined", "model", "initial", "failed")
# A tile that disagrees with the stage model keeps its own result only on a
# match at least this good (the guard's NCC of the gradient images after the
# refinement). On the phantom mosaics (make_mosaic, seed 0) the tiles with
# structure reach 0.70-0.86 (signatures="separate") or 0.92-0.97 ("mixed"),
# the slipped tile 0.70-0.76; the featureless tile fails the guard. The guard
# itself asks for 0.2.
STRONG_NCC = 0.6


@dataclass(frozen=True)
class TileOutcome:
    """One tile's own refinement, as a task returns it.

    Attributes
    ----------
    matrix : numpy.ndarray, shape (3, 3)
        Guide to tile: the refined one, or the initial one when not improved.
    improved : bool
        Whether refine's guard accepted the refinement.
    quality : dict
        ``Refinement.quality`` (empty when the tile failed).
    message : str
    failed : bool
        The tile could not be read or refined (an exception).
    shape : tuple of int or None
        The tile's shape (None if unknown).
    seconds : float

    Examples
    --------
    >>> from ggrad_gpu import synthetic
    >>> mosaic = synthetic.make_mosaic(grid=(1, 2), tile_shape=(16, 16), bands=4, slipped=None, featureless=None)
    >>> outcome = refine_tile(mosaic.guide, np.zeros((4, 4)), mosaic.initials[0])  # not a cube: the tile fails
    >>> isinstance(outcome, TileOutcome), outcome.failed, outcome.message.split(":")[0]
    (True, True, 'ValueError')
    >>> bool(np.array_equal(outcome.matrix, mosaic.initials[0])), outcome.quality  # the stage's placement kept
    (True, {})
    """

    matrix: np.ndarray
    improved: bool
    quality: dict
    message: str
    failed: bool = False
    shape: tuple | None = None
    seconds: float = 0.0


@dataclass(frozen=True)
class MosaicRefinement:
    """Result of :func:`refine_mosaic`.

    Attributes
    ----------
    matrices : numpy.ndarray, shape (tiles, 3, 3)
        Guide-to-tile matrices after the status rules (the module's docstring):
        a refined tile is placed by the model's linear part at its own
        position, unless its own result differs from that by more than the
        model's tolerance.
    status : tuple of str
        Per tile, one of ``STATUSES``.
    quality : tuple of dict
        Per tile, ``Refinement.quality`` of its own refinement (empty if it
        failed).
    model : StageModel
        The stage correction ``C`` (``model.matrix``) and the tiles'
        residuals against it.
    timings : dict
        Seconds: ``"refine"`` (all tiles, wall clock), ``"model"``, ``"total"``,
        and ``"tiles"`` (each tile's own refine).
    initials : numpy.ndarray, shape (tiles, 3, 3)
    own : numpy.ndarray, shape (tiles, 3, 3)
        Each tile's own result (the initial matrix where not improved).
    messages : tuple of str
        refine's message per tile (or why it failed).
    shapes : tuple
        Each tile's shape (None where it could not be read).

    Examples
    --------
    >>> from ggrad_gpu import synthetic
    >>> from ggrad_gpu.metrics import target_registration_error
    >>> mosaic = synthetic.make_mosaic(grid=(1, 2), tile_shape=(16, 16), bands=4, slipped=None, featureless=None,
    ...                                signatures="mixed")
    >>> result = refine_mosaic(mosaic.guide, mosaic.tiles, initials=mosaic.initials, backend="numpy")
    >>> isinstance(result, MosaicRefinement), result.status
    (True, ('refined', 'refined'))
    >>> centre = np.array([7.5, 7.5, 1.0])  # a refined tile's centre stays where its own fit puts it
    >>> [bool(np.allclose(np.linalg.solve(result.matrices[i], centre), np.linalg.solve(result.own[i], centre)))
    ...  for i in range(2)]
    [True, True]
    >>> [bool(target_registration_error(result.matrices[i], mosaic.matrices[i], mosaic.guide.shape).mean
    ...       < target_registration_error(mosaic.initials[i], mosaic.matrices[i], mosaic.guide.shape).mean / 3)
    ...  for i in range(2)]
    [True, True]
    """

    matrices: np.ndarray
    status: tuple
    quality: tuple
    model: StageModel
    timings: dict = field(default_factory=dict)
    initials: np.ndarray | None = None
    own: np.ndarray | None = None
    messages: tuple = ()
    shapes: tuple = ()


def refine_tile(guide_region, tile, initial, origin=(0, 0), options=None) -> TileOutcome:
    """Refine one tile on a region of the guide; a task of :func:`refine_mosaic`.

    Parameters
    ----------
    guide_region : array-like, shape (rows, cols)
        The guide's window that starts at guide pixel ``origin``: an array,
        or anything :func:`numpy.asarray` reads (a :class:`GuideWindow` is
        read here, in the task).
    tile : array-like, shape (tile_rows, tile_cols, bands)
        Anything :func:`numpy.asarray` reads (a lazy reader is read here, in
        the task).
    initial : array_like, shape (3, 3)
        Full guide grid to tile.
    origin : (int, int)
        Where ``guide_region`` starts on the guide.
    options : dict, optional
        Keywords for :func:`ggrad_gpu.refine`.

    Returns
    -------
    TileOutcome
        ``matrix`` maps the full guide grid to the tile. Any exception
        (an unreadable tile) gives ``failed=True`` and the initial matrix.

    Examples
    --------
    >>> from ggrad_gpu import synthetic
    >>> from ggrad_gpu.metrics import target_registration_error
    >>> mosaic = synthetic.make_mosaic(grid=(1, 2), tile_shape=(24, 24), bands=4, slipped=None, featureless=None,
    ...                                signatures="mixed")
    >>> origin = (10, 12)  # the guide's window starts here; the matrix maps the full guide
    >>> window = mosaic.guide[origin[0]:, origin[1]:]
    >>> outcome = refine_tile(window, mosaic.tiles[0], mosaic.initials[0], origin, options={"backend": "numpy"})
    >>> outcome.improved, outcome.failed, outcome.shape
    (True, False, (24, 24, 4))
    >>> before = target_registration_error(mosaic.initials[0], mosaic.matrices[0], mosaic.guide.shape).mean
    >>> bool(target_registration_error(outcome.matrix, mosaic.matrices[0], mosaic.guide.shape).mean < before / 3)
    True
    """
    start = time.perf_counter()
    initial = np.asarray(initial, dtype=np.float64)
    to_guide = np.array([[1.0, 0, origin[0]], [0, 1, origin[1]], [0, 0, 1]])
    shape = None
    try:
        cube = np.asarray(tile)
        shape = tuple(cube.shape)
        # An array stays where it is (NumPy or CuPy); a window is read now, in the task.
        region = guide_region if hasattr(guide_region, "__array_namespace__") else np.asarray(guide_region)
        result = refine(region, cube, initial=initial @ to_guide, **(options or {}))
    except Exception as exc:  # noqa: BLE001 - the tile's failure is its status, not the mosaic's
        return TileOutcome(initial, False, {}, f"{type(exc).__name__}: {exc}", True, shape,
                           time.perf_counter() - start)
    return TileOutcome(result.matrix @ np.linalg.inv(to_guide), bool(result.improved), dict(result.quality),
                       result.message, False, shape, time.perf_counter() - start)


def refine_mosaic(guide, tiles, *, initials, levels="auto", backend: str = "auto", client=None,
                  max_in_flight=None, progress=None, strong_ncc: float = STRONG_NCC, tolerance=None,
                  **refine_options) -> MosaicRefinement:
    """Refine every tile of a mosaic on one guide; place the tiles that cannot be trusted by a stage model.

    Parameters
    ----------
    guide : array-like, shape (rows, cols)
        The guide (a NumPy array, or a Zarr array or anything sliced by
        region: only each tile's region is read).
    tiles : sequence of array-like, each (tile_rows, tile_cols, bands)
        The tiles at their native resolution; each needs ``shape`` and is
        read with :func:`numpy.asarray` inside its task.
    initials : sequence of array_like, shape (3, 3)
        Each tile's stage placement, guide to tile.
    levels, backend
        As in :func:`ggrad_gpu.refine`, for every tile.
    client : distributed.Client, optional
        Run the tiles on its cluster; default in-process threads.
    max_in_flight : int, optional
        Tiles refined at once at most (default: the worker threads, or the
        cores): bounds the memory the tiles and their regions hold.
    progress : callable, optional
        Called with ``(index, TileOutcome)`` as each tile finishes.
    strong_ncc : float, default ``STRONG_NCC``
        The match (``quality["ncc_after"]``) that lets a tile which disagrees
        with the model keep its own result.
    tolerance : float, optional
        Smallest disagreement with the model that counts, guide pixels
        (default one tile pixel; see :func:`ggrad_gpu.core.stage_model.fit_stage_model`).
    **refine_options
        Further keywords for :func:`ggrad_gpu.refine` (``weights``,
        ``method``, ``psf_sigma``...). Its warnings for kept initial
        transforms are silenced: the status and ``messages`` say it.

    Returns
    -------
    MosaicRefinement

    Examples
    --------
    >>> from ggrad_gpu import refine_mosaic, synthetic
    >>> mosaic = synthetic.make_mosaic(grid=(2, 3), tile_shape=(24, 24), bands=6, signatures="mixed",
    ...                                slipped=None, featureless=4)
    >>> result = refine_mosaic(mosaic.guide, mosaic.tiles, initials=mosaic.initials, backend="numpy")
    >>> result.status
    ('refined', 'refined', 'refined', 'model', 'model', 'refined')
    """
    clock = time.perf_counter()
    initials = _check_initials(initials, len(tiles))
    options = dict(refine_options, levels=levels, backend=backend)
    for name in ("initial", "output_grid", "progress"):
        if name in options:
            raise TypeError(f"refine_mosaic sets refine's {name!r} itself; got {name}={options[name]!r}")
    # Only the matrix is kept: the registered tile on a grid of about its own size,
    # not on the working grid (which for a 128 x 128 x 256 tile at r = 4 holds half a GB).
    options["output_grid"] = "cube"
    tasks, outcomes = [], [None] * len(tiles)
    for i, (tile, initial) in enumerate(zip(tiles, initials)):
        try:  # where each region lies; the task reads it
            region, origin = guide_window(guide, tuple(tile.shape), initial)
        except Exception as exc:  # noqa: BLE001 - no shape, or placed off the guide: the tile failed
            outcomes[i] = TileOutcome(initial, False, {}, f"{type(exc).__name__}: {exc}", True)
            continue
        tasks.append((i, (region, tile, initial, origin, options)))

    def done(index, outcome):
        if progress is not None:
            progress(tasks[index][0], outcome)

    if client is not None:
        client.run(quiet_kept_transforms)  # on the workers, whose warnings this block does not reach
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a kept initial transform: the status says it
        results = run_tasks(refine_tile, [args for _, args in tasks], client=client, max_in_flight=max_in_flight,
                            on_done=done)
    for (i, _), outcome in zip(tasks, results):
        outcomes[i] = outcome
    timings = {"refine": time.perf_counter() - clock}
    return _decide(outcomes, initials, strong_ncc, tolerance, timings, clock)


def quiet_kept_transforms() -> None:
    """Silence refine's warning for a kept initial transform in this process (a Dask worker's).

    The tile's status and message say it; only that warning is filtered.

    Examples
    --------
    >>> with warnings.catch_warnings(record=True) as seen:
    ...     warnings.simplefilter("always")
    ...     quiet_kept_transforms()
    ...     warnings.warn("kept the initial transform: the guide has no edges", UserWarning)
    ...     warnings.warn("another warning", UserWarning)
    >>> [str(warning.message) for warning in seen]  # only refine's kept-transform warning is silenced
    ['another warning']
    """
    warnings.filterwarnings("ignore", message="kept the initial transform", category=UserWarning)


def _decide(outcomes, initials, strong_ncc, tolerance, timings, clock) -> MosaicRefinement:
    """The stage model over the refined tiles, each tile's status and matrix."""
    start = time.perf_counter()
    own = np.stack([o.matrix for o in outcomes])
    improved = np.array([o.improved and not o.failed for o in outcomes])
    shapes = tuple(o.shape for o in outcomes)
    model = fit_stage_model(initials, own, [s or (1, 1) for s in shapes], improved, floor=tolerance)
    status, matrices = [], own.copy()
    for i, outcome in enumerate(outcomes):
        if outcome.failed:
            state = "failed"
        elif model.matrix is None:
            state = "refined" if improved[i] else "initial"
        elif improved[i] and (model.distances[i] <= model.tolerance
                              or outcome.quality.get("ncc_after", 0.0) >= strong_ncc):
            state = "refined"
            # Its own position with the model's rotation and scale, unless its own
            # fit differs from those by more than the tolerance (not a mere slip).
            anchored = model.anchored(initials[i], own[i], shapes[i])
            if largest_displacement(anchored, own[i], shapes[i]) <= model.tolerance:
                matrices[i] = anchored
        else:
            state = "model"
            matrices[i] = model.placement(initials[i])
        status.append(state)
    timings.update(model=time.perf_counter() - start, total=time.perf_counter() - clock,
                   tiles=[o.seconds for o in outcomes])
    return MosaicRefinement(matrices, tuple(status), tuple(dict(o.quality) for o in outcomes), model, timings,
                            initials, own, tuple(o.message for o in outcomes), shapes)


class GuideWindow:
    """A window of a guide, read when a task reads it (:func:`numpy.asarray`), not before.

    Pickled (to a worker process) as the guide's handle and two slices: a
    guide opened by :func:`ggrad_gpu.io.guide_regions.open_guide_regions`
    travels as its path.

    Attributes
    ----------
    guide : array-like
        Anything sliced by ``guide[rows, cols]``.
    rows, cols : slice
    shape : (int, int)

    Examples
    --------
    >>> guide = np.arange(30.0).reshape(5, 6)
    >>> window = GuideWindow(guide, slice(1, 3), slice(2, 5))
    >>> window.shape, np.asarray(window).tolist()
    ((2, 3), [[8.0, 9.0, 10.0], [14.0, 15.0, 16.0]])
    """

    def __init__(self, guide, rows: slice, cols: slice):
        self.guide, self.rows, self.cols = guide, rows, cols
        self.shape = (rows.stop - rows.start, cols.stop - cols.start)

    def __array__(self, dtype=None, copy=None):
        region = np.asarray(self.guide[self.rows, self.cols])
        return region if dtype is None else region.astype(dtype)


def guide_window(guide, tile_shape, initial):
    """The guide's window that refine works on for a tile, unread, and the guide pixel where it starts.

    An in-memory guide (NumPy, CuPy) gives a view; any other (a Zarr array,
    :class:`ggrad_gpu.io.guide_regions.GuideRegions`) a :class:`GuideWindow`,
    read only by the task.

    Examples
    --------
    >>> from ggrad_gpu import synthetic
    >>> mosaic = synthetic.make_mosaic(grid=(1, 2), tile_shape=(16, 16), bands=4, slipped=None, featureless=None)
    >>> view, origin = guide_window(mosaic.guide, mosaic.tiles[1].shape, mosaic.initials[1])
    >>> bool(np.shares_memory(view, mosaic.guide)), view.shape[0] > 4 * 16  # the footprint and a margin
    (True, True)
    >>> class Lazy:  # stands in for a guide read by region (Zarr, TIFF)
    ...     shape = mosaic.guide.shape
    ...     def __getitem__(self, key):
    ...         return mosaic.guide[key]
    >>> window, same = guide_window(Lazy(), mosaic.tiles[1].shape, mosaic.initials[1])
    >>> isinstance(window, GuideWindow), same == origin, bool(np.array_equal(np.asarray(window), view))
    (True, True, True)
    """
    if len(tile_shape) != 3:
        raise ValueError(f"tile must be 3-D (rows, cols, bands); got shape {tile_shape}")
    rows, cols = working_grid(tuple(guide.shape[:2]), tile_shape[:2], initial).guide_region()
    origin = (rows.start, cols.start)
    if isinstance(guide, np.ndarray) or is_cupy_array(guide):
        return guide[rows, cols], origin  # a view: nothing is read or copied
    return GuideWindow(guide, rows, cols), origin


def _check_initials(initials, count) -> np.ndarray:
    matrices = np.asarray(initials, dtype=np.float64)
    if matrices.shape != (count, 3, 3) or not np.isfinite(matrices).all():
        raise ValueError(f"initials must be one finite 3x3 matrix per tile ({count}, 3, 3); got shape "
                         f"{matrices.shape}")
    return matrices
