"""The stage model of a mosaic: one shared affine correction, fitted robustly over the refined tiles.

A motorised stage places every tile with the same systematic error (the
stage's axes against the camera's: rotation, scale, offset) plus an error of
its own (backlash, drift, now and then a slip). With ``initial_i`` the
stage's guide-to-tile matrix, the model's placement of tile ``i`` is
``initial_i @ C``, where ``C`` (guide to guide) is fitted by least squares on
the tiles' corners and centres: where each refined tile's own matrix puts
them on the guide against where ``initial_i @ C`` puts them. It starts from
the element-wise median of the tiles' own corrections and refits over the
tiles within the tolerance (the larger of a floor, one tile pixel by
default, and three robust standard deviations of the tiles' distances from
the model, from their median) until that set stays the same; the others
disagree with the model, the way ASHLAR falls back to a linear stage model
for the tiles it cannot trust.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .geometry import pixels_per_cube_pixel

__all__ = ["MIN_MODEL_TILES", "StageModel", "fit_stage_model", "largest_displacement", "tile_points"]

# A shared affine from fewer tiles would only repeat one tile's own result.
MIN_MODEL_TILES = 2
# Refits with a new set of inliers, at most (it settles in two or three).
MAX_ROUNDS = 10
# Median of |d| for a 2-D Gaussian d with unit standard deviation per axis is
# sqrt(2 ln 2) = 1.18; three of those standard deviations beyond it is an outlier.
_SIGMA_FROM_MEDIAN = 1.0 / np.sqrt(2 * np.log(2))
_OUTLIER_SIGMAS = 3.0


@dataclass(frozen=True)
class StageModel:
    """The fitted stage correction and how each tile's own result sits against it.

    Attributes
    ----------
    matrix : numpy.ndarray, shape (3, 3), or None
        ``C``, guide to guide: a tile placed by the model gets
        ``initial_i @ C``. None when fewer than ``MIN_MODEL_TILES`` tiles
        refined.
    residuals : numpy.ndarray, shape (tiles, 2)
        Where the tile's own result puts its centre on the guide minus where
        the model puts it, in guide pixels (row, col); NaN for a tile without
        a result of its own (or without a model).
    distances : numpy.ndarray, shape (tiles,)
        The largest such displacement over the tile's corners and centre,
        guide pixels (NaN likewise).
    inliers : numpy.ndarray of bool, shape (tiles,)
        The tiles the final fit used.
    tolerance : float
        The displacement beyond which a tile disagrees with the model, guide
        pixels.

    Examples
    --------
    >>> import numpy as np
    >>> correction = np.array([[1.0, 0, 2.0], [0, 1.0, -1.0], [0, 0, 1]])
    >>> initials = np.stack([np.array([[0.25, 0, -10.0 * i], [0, 0.25, 0], [0, 0, 1]]) for i in range(4)])
    >>> model = fit_stage_model(initials, initials @ correction, [(32, 32)] * 4, [True] * 4)
    >>> isinstance(model, StageModel), bool(np.allclose(model.placement(initials[1]), initials[1] @ correction))
    (True, True)
    >>> model.residuals.shape, bool(np.nanmax(model.distances) < model.tolerance)
    ((4, 2), True)
    """

    matrix: np.ndarray | None
    residuals: np.ndarray
    distances: np.ndarray
    inliers: np.ndarray
    tolerance: float

    def placement(self, initial) -> np.ndarray:
        """The model's guide-to-tile matrix for a tile whose stage placement is ``initial``."""
        if self.matrix is None:
            raise ValueError("the stage model has no matrix (too few tiles refined)")
        return np.asarray(initial, dtype=np.float64) @ self.matrix

    def anchored(self, initial, own, tile_shape) -> np.ndarray:
        """The model's placement moved so that the tile's centre lands where its own result puts it.

        The shared linear part (rotation, scale, shear), fitted over all the
        inliers, with the tile's own position: a small tile's own fit pins
        its position far better than its rotation and scale, whose errors
        grow towards its corners.

        Parameters
        ----------
        initial, own : array_like, shape (3, 3)
            The tile's stage placement and its own refined result (guide to tile).
        tile_shape : (rows, cols, ...)

        Returns
        -------
        numpy.ndarray, shape (3, 3)
            Guide to tile: ``shift @ initial @ C``, the shift in tile pixels.

        Examples
        --------
        >>> import numpy as np
        >>> from ggrad_gpu.core.stage_model import StageModel
        >>> model = StageModel(np.eye(3), np.zeros((1, 2)), np.zeros(1), np.ones(1, bool), 1.0)
        >>> own = np.array([[1.01, 0, 2.0], [0, 1, -1.0], [0, 0, 1]])  # scale off by 1%, moved
        >>> anchored = model.anchored(np.eye(3), own, (10, 10))
        >>> centre = np.array([4.5, 4.5, 1.0])
        >>> bool(np.allclose(np.linalg.solve(anchored, centre), np.linalg.solve(own, centre))), float(anchored[0, 0])
        (True, 1.0)
        """
        placement = self.placement(initial)
        centre = tile_points(tile_shape)[:, 4]
        anchor = np.linalg.solve(np.asarray(own, dtype=np.float64), centre)  # the centre on the guide
        shift = np.eye(3)
        shift[:2, 2] = (centre - placement @ anchor)[:2]
        return shift @ placement


def tile_points(tile_shape) -> np.ndarray:
    """A tile's four outer corners and its centre, homogeneous tile coordinates, shape (3, 5).

    Examples
    --------
    >>> tile_points((3, 5))  # corners (-0.5 .. size - 0.5) and the centre
    array([[-0.5, -0.5,  2.5,  2.5,  1. ],
           [-0.5,  4.5, -0.5,  4.5,  2. ],
           [ 1. ,  1. ,  1. ,  1. ,  1. ]])
    """
    h, w = tile_shape[0] - 0.5, tile_shape[1] - 0.5
    return np.array([[-0.5, -0.5, h, h, (h - 0.5) / 2], [-0.5, w, -0.5, w, (w - 0.5) / 2], [1, 1, 1, 1, 1.0]])


def largest_displacement(matrix, other, tile_shape) -> float:
    """The largest guide distance between where two guide-to-tile matrices put a tile's corners and centre.

    Examples
    --------
    >>> import numpy as np
    >>> from ggrad_gpu.core.stage_model import largest_displacement
    >>> largest_displacement(np.eye(3), np.array([[1.0, 0, 3], [0, 1, 4], [0, 0, 1]]), (8, 8))
    5.0
    """
    points = tile_points(tile_shape)
    moved = np.linalg.solve(np.asarray(matrix, dtype=np.float64), points) - np.linalg.solve(
        np.asarray(other, dtype=np.float64), points)
    return float(np.hypot(*moved[:2]).max())


def fit_stage_model(initials, matrices, tile_shapes, refined, *, floor=None) -> StageModel:
    """Fit ``C`` with ``matrices[i] ~ initials[i] @ C`` over the refined tiles, dropping outliers.

    Parameters
    ----------
    initials, matrices : array_like, shape (tiles, 3, 3)
        Each tile's stage placement and its own refined result (guide to tile).
    tile_shapes : sequence of (rows, cols, ...)
        Each tile's native shape.
    refined : array_like of bool, shape (tiles,)
        Which tiles have a result of their own (the others are left out).
    floor : float, optional
        The smallest tolerance, guide pixels; default one tile pixel (the
        median over the tiles of ``r``, guide pixels per tile pixel).

    Returns
    -------
    StageModel

    Examples
    --------
    >>> import numpy as np
    >>> from ggrad_gpu.core.stage_model import fit_stage_model
    >>> correction = np.array([[1.0, 0, 2.0], [0, 1.0, -1.0], [0, 0, 1]])
    >>> initials = np.stack([np.array([[0.25, 0, -10.0 * i], [0, 0.25, 0], [0, 0, 1]]) for i in range(4)])
    >>> refined = initials @ correction
    >>> refined[3] = refined[3] @ np.array([[1.0, 0, 15.0], [0, 1, 0], [0, 0, 1]])  # a slip
    >>> model = fit_stage_model(initials, refined, [(32, 32)] * 4, [True] * 4)
    >>> np.round(model.matrix, 6)[:2] + 0.0, model.inliers.tolist()
    (array([[ 1.,  0.,  2.],
           [ 0.,  1., -1.]]), [True, True, True, False])
    """
    initials = np.asarray(initials, dtype=np.float64)
    matrices = np.asarray(matrices, dtype=np.float64)
    refined = np.asarray(refined, dtype=bool)
    count = len(initials)
    if matrices.shape != (count, 3, 3) or initials.shape != (count, 3, 3):
        raise ValueError(f"initials and matrices must both be (tiles, 3, 3); got {initials.shape} and "
                         f"{matrices.shape}")
    if floor is None:
        floor = float(np.median([pixels_per_cube_pixel(m) for m in initials])) if count else 1.0
    points = [tile_points(shape) for shape in tile_shapes]
    # Where each tile's own result puts its points on the guide (p), and where
    # the stage does (q): the model C takes p to q.
    own = [np.linalg.solve(matrices[i], points[i]) for i in range(count)]
    stage = [np.linalg.solve(initials[i], points[i]) for i in range(count)]
    nan = np.full(count, np.nan)
    if refined.sum() < MIN_MODEL_TILES:
        return StageModel(None, np.full((count, 2), np.nan), nan, np.zeros(count, bool), float(floor))
    # A robust start: the element-wise median of the tiles' own corrections;
    # then least squares over the tiles within the tolerance, until they stay the same.
    correction = np.median([np.linalg.solve(initials[i], matrices[i]) for i in np.flatnonzero(refined)], axis=0)
    inliers = refined.copy()
    for _ in range(MAX_ROUNDS):
        distances = _distances(correction, own, stage, refined)
        spread = _OUTLIER_SIGMAS * _SIGMA_FROM_MEDIAN * float(np.median(distances[refined]))
        tolerance = max(float(floor), spread)
        kept = refined & (distances <= tolerance)
        if kept.sum() < MIN_MODEL_TILES:
            break
        chosen = np.flatnonzero(kept)
        correction = _affine_least_squares(np.hstack([own[i] for i in chosen]), np.hstack([stage[i] for i in chosen]))
        settled = bool((kept == inliers).all())
        inliers = kept
        if settled:
            break
    distances = _distances(correction, own, stage, refined)
    displacement = [own[i][:2, -1] - np.linalg.solve(correction, stage[i][:, -1])[:2] for i in range(count)]
    residuals = np.array([d if refined[i] else (np.nan, np.nan) for i, d in enumerate(displacement)])
    return StageModel(correction, residuals, distances, inliers, tolerance)


def _distances(correction, own, stage, refined) -> np.ndarray:
    """Per tile, the largest guide distance between its own points and the model's (NaN if not refined)."""
    return np.array([np.hypot(*(own[i][:2] - np.linalg.solve(correction, stage[i])[:2])).max() if refined[i]
                     else np.nan for i in range(len(own))])


def _affine_least_squares(source, target) -> np.ndarray:
    """The affine 3x3 ``A`` minimising ``|A @ source - target|`` over homogeneous points (3, n)."""
    solution, *_ = np.linalg.lstsq(source.T, target[:2].T, rcond=None)
    matrix = np.eye(3)
    matrix[:2] = solution.T
    return matrix
