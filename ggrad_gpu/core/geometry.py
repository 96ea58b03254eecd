"""Affine geometry shared by every stage: coordinates, footprints and the working grid.

All matrices are 3x3 homogeneous (row, col) pixel-centre matrices in the
pull-back direction: a point of the output (guide, working) grid maps to the
point of the source (cube) grid it takes its value from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .._backend import array_module

__all__ = [
    "CAPTURE_MARGIN",
    "MAX_LEVELS",
    "WorkingGrid",
    "affine_coordinates",
    "block_mean",
    "auto_levels",
    "block_region",
    "check_output_shape",
    "cube_output_grid",
    "cube_resolution_step",
    "degeneracy",
    "footprint_mask",
    "footprint_sides",
    "fov_matrix",
    "in_footprint",
    "map_points",
    "pixels_per_cube_pixel",
    "working_grid",
]

# Guide pixels of margin around the cube's footprint, at least (DESIGN "Real
# geometry"): the misregistrations refine promises to capture.
CAPTURE_MARGIN = 45
MAX_LEVELS = 4
# Working pixels per cube pixel that the working grid resolves at most (s = ceil(r / 6)).
WORKING_PER_CUBE = 6
# The coarsest pyramid level keeps at least this many pixels across the footprint. A level
# with fewer holds a handful of blurred features, which the cube's bands match about as well
# from a few pixels away as in place, and eq. 9, which weights levels by how well they match,
# puts its weight there: the global gradient then fits the guide at a wrong placement and has
# no basin to register into. On the real P45 SEM-EDS pair (75 x 100 x 92), at 8 pixels (4
# levels) the fused gradient's NCC with the guide was 0.94-0.98 from starts 1-3 px off against
# 0.97 at the truth, and 0 of 8 starts reached 1 px; at 24 (2 levels) 8 of 8, 0.35-0.40 px.
# The phantom sweep at the paper's geometry went from mean 0.129 to 0.118 px (6 cases).
MIN_LEVEL_PIXELS = 24


def fov_matrix(guide_shape, cube_shape) -> np.ndarray:
    """The default initial transform: the cube spans the guide's field of view.

    ``q = (p + 0.5) * (h / H) - 0.5`` per axis, as a 3x3 (row, col) matrix.

    Examples
    --------
    >>> fov_matrix((100, 50), (20, 10))[:2]
    array([[ 0.2,  0. , -0.4],
           [ 0. ,  0.2, -0.4]])
    """
    matrix = np.eye(3)
    for axis in (0, 1):
        ratio = cube_shape[axis] / guide_shape[axis]
        matrix[axis, axis] = ratio
        matrix[axis, 2] = 0.5 * ratio - 0.5
    return matrix


def check_output_shape(shape, name: str = "output_shape") -> tuple[int, int]:
    """``shape`` as ``(rows, cols)`` of positive integers; ValueError naming ``name`` otherwise.

    Examples
    --------
    >>> check_output_shape([4.0, 5])
    (4, 5)
    >>> check_output_shape((4, 0))
    Traceback (most recent call last):
        ...
    ValueError: output_shape must be (rows, cols) with positive sizes; got (4, 0)
    """
    try:
        values = tuple(shape)
        out = tuple(int(n) for n in values)
        exact = all(int(n) == n for n in values)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be (rows, cols) with positive sizes; got {shape!r}") from None
    if len(out) != 2 or min(out) < 1 or not exact:
        raise ValueError(f"{name} must be (rows, cols) with positive sizes; got {shape!r}")
    return out


def map_points(matrix, rows, cols):
    """``(q_rows, q_cols) = matrix @ (rows, cols, 1)`` for arrays of pixel coordinates (broadcast).

    The matrix's entries become host scalars, so no device round trip per
    call; the result has the coordinates' dtype and array module.

    Examples
    --------
    >>> matrix = np.array([[2.0, 0, 1], [0, 3, -1], [0, 0, 1]])
    >>> map_points(matrix, np.array([0.0, 1.0]), np.array([2.0, 2.0]))
    (array([1., 3.]), array([5., 5.]))
    """
    m = [[float(v) for v in row] for row in np.asarray(matrix)[:2]]
    return m[0][0] * rows + m[0][1] * cols + m[0][2], m[1][0] * rows + m[1][1] * cols + m[1][2]


def in_footprint(q_rows, q_cols, cube_shape):
    """Whether cube coordinates lie in the cube's footprint, ``-0.5 .. size - 0.5`` on each axis.

    Examples
    --------
    >>> in_footprint(np.array([-0.5, 2.4, 2.6]), np.zeros(3), (3, 3))
    array([ True,  True, False])
    """
    return (q_rows >= -0.5) & (q_rows <= cube_shape[0] - 0.5) & (q_cols >= -0.5) & (q_cols <= cube_shape[1] - 0.5)


def affine_coordinates(matrix, shape, xp):
    """Source coordinates ``(q_rows, q_cols)`` of every pixel of a grid, in float64.

    Parameters
    ----------
    matrix : numpy.ndarray, shape (3, 3)
        Grid pixel to source coordinate.
    shape : (int, int)
        The grid.
    xp : module
        NumPy or CuPy: where the coordinates are made.

    Examples
    --------
    >>> q_rows, q_cols = affine_coordinates(fov_matrix((4, 4), (2, 2)), (4, 4), np)
    >>> q_rows.shape, q_rows[:, 0].tolist()
    ((4, 4), [-0.25, 0.25, 0.75, 1.25])
    """
    r = xp.arange(shape[0], dtype=xp.float64)[:, None]
    c = xp.arange(shape[1], dtype=xp.float64)[None, :]
    return map_points(matrix, r, c)


def footprint_mask(cube_shape, matrix, shape, xp):
    """Grid pixels whose mapped point lies in the cube's footprint (``-0.5 .. size - 0.5``).

    Examples
    --------
    >>> footprint_mask((2, 2), np.eye(3), (3, 4), np).astype(int)
    array([[1, 1, 0, 0],
           [1, 1, 0, 0],
           [0, 0, 0, 0]])
    """
    return in_footprint(*affine_coordinates(matrix, shape, xp), cube_shape)


def pixels_per_cube_pixel(matrix) -> float:
    """``r = 1 / sqrt(|det(matrix[:2, :2])|)``: grid pixels per cube pixel (matrix: grid to cube).

    Examples
    --------
    >>> pixels_per_cube_pixel(fov_matrix((100, 100), (20, 20)))
    5.0
    """
    det = abs(float(np.linalg.det(np.asarray(matrix, dtype=np.float64)[:2, :2])))
    if not det > 0:
        raise ValueError("initial must be invertible (its 2 x 2 linear part has determinant 0)")
    return 1.0 / math.sqrt(det)


def footprint_sides(cube_shape, matrix) -> tuple[float, float]:
    """Lengths, in grid pixels, of the cube footprint's sides along the cube's rows and columns.

    Examples
    --------
    >>> footprint_sides((20, 10), np.diag([0.5, 0.25, 1.0]))
    (40.0, 40.0)
    """
    inverse = np.linalg.inv(np.asarray(matrix, dtype=np.float64)[:2, :2])
    return (float(np.hypot(*inverse[:, 0])) * cube_shape[0], float(np.hypot(*inverse[:, 1])) * cube_shape[1])


def footprint_box(cube_shape, matrix) -> tuple[np.ndarray, np.ndarray]:
    """The grid's bounding box ``(low, high)`` (row, col) of the cube's footprint, pixel edges included.

    Examples
    --------
    >>> low, high = footprint_box((20, 10), fov_matrix((100, 50), (20, 10)))
    >>> np.round(low, 6).tolist(), np.round(high, 6).tolist()
    ([-0.5, -0.5], [99.5, 49.5])
    """
    h, w = cube_shape[0] - 0.5, cube_shape[1] - 0.5
    corners = np.array([[-0.5, -0.5, 1], [-0.5, w, 1], [h, -0.5, 1], [h, w, 1]]).T
    points = np.linalg.solve(np.asarray(matrix, dtype=np.float64), corners)[:2]
    return points.min(axis=1), points.max(axis=1)


def cube_resolution_step(to_cube, pitch: float = 0.8) -> int:
    """Pixel step ``2**k`` of the working grid's pyramid level ``k`` at the cube's resolution.

    Levels finer than the cube resolves carry no information of the cube's
    (its values there are interpolated) but cost the most: the estimate from
    the initial placement runs on the coarsest level whose pixels still sample
    the cube at least every ``pitch`` cube pixels (the fair fits, which only
    compare placements, every cube pixel: ``pitch=1``).

    Examples
    --------
    >>> cube_resolution_step(np.diag([0.0625, 0.0625, 1.0]))  # 16 pixels per cube pixel: step 8 samples every 0.5
    8
    >>> cube_resolution_step(np.diag([0.0625, 0.0625, 1.0]), pitch=1.0)  # every cube pixel: step 16
    16
    >>> cube_resolution_step(np.eye(3))
    1
    """
    pixel = pixels_per_cube_pixel(to_cube)
    return 2 ** max(0, int(math.floor(math.log2(max(pixel * pitch, 1.0)))))


@dataclass(frozen=True)
class WorkingGrid:
    """The grid ``refine`` works on: a region of the guide, block-averaged by ``s``.

    Attributes
    ----------
    s : int
        Guide pixels per working pixel along each axis.
    origin : (int, int)
        Guide pixel ``(r0, c0)`` where the region starts.
    shape : (int, int)
        Working pixels ``(rows, cols)``; the region is ``s * rows`` by
        ``s * cols`` guide pixels.
    to_guide : numpy.ndarray, shape (3, 3)
        ``S``: working pixel to guide coordinate,
        ``[[s, 0, r0 + (s-1)/2], [0, s, c0 + (s-1)/2], [0, 0, 1]]``.
    cube_step : int
        Pixel step of the working grid's pyramid level at the cube's
        resolution (:func:`cube_resolution_step`).

    Examples
    --------
    >>> grid = WorkingGrid(s=2, origin=(10, 20), shape=(5, 6), to_guide=np.eye(3), cube_step=1)
    >>> grid.guide_region()
    (slice(10, 20, None), slice(20, 32, None))
    >>> grid.level_shape(4)
    (2, 2)
    """

    s: int
    origin: tuple[int, int]
    shape: tuple[int, int]
    to_guide: np.ndarray
    cube_step: int

    def guide_region(self):
        """The guide's rows and columns the grid covers, as two slices."""
        (r0, c0), (rows, cols) = self.origin, self.shape
        return slice(r0, r0 + self.s * rows), slice(c0, c0 + self.s * cols)

    def level_shape(self, step: int) -> tuple[int, int]:
        """Shape of the working grid's pyramid level with pixel step ``step``."""
        return -(-self.shape[0] // step), -(-self.shape[1] // step)


def working_grid(guide_shape, cube_shape, initial, working_shape=None, *, max_pixels=None) -> WorkingGrid:
    """The working grid for a cube placed on a guide by ``initial`` (DESIGN "Grids", "Real geometry").

    ``s = max(1, ceil(r / 6))`` with ``r`` guide pixels per cube pixel, unless
    ``working_shape`` gives it; with ``max_pixels``, ``s`` grows until the
    grid has at most that many pixels (a cube streamed under a memory limit). The region is the cube's footprint plus a
    capture margin of ``max(45, side / 3)`` guide pixels on each side, rounded
    out to whole ``s x s`` blocks and clipped to the guide: the whole guide
    when the cube spans it.

    Examples
    --------
    >>> import numpy as np
    >>> grid = working_grid((600, 700), (60, 70), np.array([[0.2, 0, -30], [0, 0.2, -35], [0, 0, 1.0]]))
    >>> grid.s, grid.origin, grid.shape
    (1, (47, 55), (501, 585))
    """
    rows, cols = guide_shape
    low, high = footprint_box(cube_shape, initial)
    margin = np.maximum(CAPTURE_MARGIN, (high - low) / 3)
    if working_shape is None:
        s = max(1, math.ceil(pixels_per_cube_pixel(initial) / WORKING_PER_CUBE - 1e-9))
    else:
        wanted = check_output_shape(working_shape, "working_shape")
        s = max(1, min(rows // wanted[0], cols // wanted[1]))
    extent = np.minimum(high + margin, guide_shape) - np.maximum(low - margin, 0)
    if max_pixels is not None:
        s = max(s, math.ceil(math.sqrt(float(np.prod(extent)) / max_pixels)))
    s = min(s, max(1, int(min(extent)) // 8))
    origin, size, to_guide = block_region(guide_shape, low - margin, high + margin, s)
    step = cube_resolution_step(initial @ to_guide)
    return WorkingGrid(s, origin, size, to_guide, step)


def block_region(guide_shape, low, high, s: int):
    """The guide's region from ``low`` to ``high`` (row, col), rounded out to whole ``s x s`` blocks.

    Returns ``(origin, shape, to_guide)``: the region's first guide pixel, its
    size in blocks, and the matrix from a block's pixel to its guide
    coordinate, ``[[s, 0, r0 + (s-1)/2], [0, s, c0 + (s-1)/2], [0, 0, 1]]``.
    The region is clipped to the guide; one outside it is an error.

    Examples
    --------
    >>> block_region((100, 100), (10.2, -5.0), (30.0, 41.0), 4)[:2]
    ((8, 0), (6, 11))
    """
    origin, size = [], []
    for axis, n in enumerate(guide_shape):
        start = max(0, math.floor(low[axis] / s) * s)
        stop = min(n, math.ceil(high[axis] / s) * s)
        if stop - start < s:
            raise ValueError("initial places the cube outside the guide: no guide pixel maps into the cube")
        origin.append(int(start))
        size.append(int((stop - start) // s))
    to_guide = np.array([[s, 0, origin[0] + (s - 1) / 2], [0, s, origin[1] + (s - 1) / 2], [0, 0, 1.0]])
    return tuple(origin), tuple(size), to_guide


def cube_output_grid(guide_shape, cube_shape, matrix):
    """The output grid at about the cube's own pixel size (``output_grid="cube"``, DESIGN "Grids").

    The guide block-averaged by ``k = max(1, round(r))``, with ``r`` guide
    pixels per cube pixel under ``matrix``, over the cube's footprint rounded
    out to whole ``k x k`` blocks and clipped to the guide: an output about the
    cube's size, aligned with the guide.

    Returns
    -------
    to_guide : numpy.ndarray, shape (3, 3)
        Output pixel to guide coordinate.
    shape : (int, int)
        The output grid's rows and columns.

    Examples
    --------
    >>> import numpy as np
    >>> to_guide, shape = cube_output_grid((600, 700), (60, 70), fov_matrix((600, 700), (60, 70)))
    >>> shape, to_guide[0].tolist()
    ((60, 70), [10.0, 0.0, 4.5])
    """
    k = max(1, round(pixels_per_cube_pixel(matrix)))
    low, high = footprint_box(cube_shape, matrix)
    # Pixel-centre coordinates of the footprint's edges to edge coordinates
    # (guide pixel p spans [p, p + 1)); the tolerance keeps rounding noise in
    # the inverse from adding a block.
    _, shape, to_guide = block_region(guide_shape, low + 0.5 + 1e-6, high + 0.5 - 1e-6, k)
    return to_guide, shape


def auto_levels(cube_shape, initial, grid: WorkingGrid) -> int:
    """The most pyramid levels (at most 4) that keep 24 pixels across the footprint at the coarsest.

    Counted on the grid at the cube's resolution (``grid.cube_step``), the
    coarser of the two grids the estimates run on; at least 1.

    Examples
    --------
    >>> initial = np.array([[0.2, 0, -30], [0, 0.2, -35], [0, 0, 1.0]])
    >>> grid = working_grid((600, 700), (60, 70), initial)
    >>> grid.cube_step, auto_levels((60, 70), initial, grid)  # 60 and 30 pixels across: 2 levels
    (4, 2)
    """
    sides = footprint_sides(cube_shape, initial)
    across = min(min(sides) / grid.s, *grid.shape) / grid.cube_step
    if across < MIN_LEVEL_PIXELS:
        return 0
    return int(min(MAX_LEVELS, 1 + math.floor(math.log2(across / MIN_LEVEL_PIXELS))))


def degeneracy(relative, max_scale: float) -> str:
    """Why a refined affine is no plausible refinement (empty if it is one).

    ``relative`` is the refined matrix relative to the start (``inv(start) @
    refined``). Not finite, a flip or collapse, or a change of scale beyond
    ``max_scale`` along any axis.

    Examples
    --------
    >>> degeneracy(np.eye(3), 1.5)
    ''
    >>> degeneracy(np.diag([-1.0, 1.0, 1.0]), 1.5)
    'it flips or collapses the image'
    >>> degeneracy(np.diag([2.0, 1.0, 1.0]), 1.5)
    'it scales by 1 to 2, beyond a factor 1.5'
    """
    relative = np.asarray(relative, dtype=np.float64)
    if not np.isfinite(relative).all():
        return "the matrix is not finite"
    linear = relative[:2, :2]
    if np.linalg.det(linear) <= 0:
        return "it flips or collapses the image"
    singular = np.linalg.svd(linear, compute_uv=False)
    if singular.max() > max_scale or singular.min() < 1 / max_scale:
        return f"it scales by {singular.min():.3g} to {singular.max():.3g}, beyond a factor {max_scale:g}"
    return ""


def block_mean(image, step: int, *, partial: bool = False, skip_nan: bool = False):
    """Mean of ``step x step`` blocks of an image (or of every band of a cube), in the image's array module.

    By default over the first ``step * (rows // step)`` rows and columns (the
    partial last blocks left out), a block with a NaN being NaN: the working
    grid's guide. ``partial`` keeps the last blocks with what is left;
    ``skip_nan`` leaves NaN out of each block's mean (NaN where a block has no
    value): the report's panels. ``step`` 1 returns ``image`` itself.

    Examples
    --------
    >>> block_mean(np.arange(16.0).reshape(4, 4), 2)
    array([[ 2.5,  4.5],
           [10.5, 12.5]])
    >>> block_mean(np.ones((5, 7)), 2).shape  # the partial last blocks are left out
    (2, 3)
    >>> image = np.arange(20.0).reshape(4, 5); image[0, 0] = np.nan
    >>> block_mean(image, 2, partial=True, skip_nan=True)
    array([[ 4. ,  5. ,  6.5],
           [13. , 15. , 16.5]])
    """
    if step == 1:
        return image
    xp = array_module(image=image)
    rows, cols = image.shape[:2]
    if partial:
        padded = xp.full((-(-rows // step) * step, -(-cols // step) * step) + tuple(image.shape[2:]), xp.nan)
        padded[:rows, :cols] = image
        image = padded
    else:
        image = image[: rows // step * step, : cols // step * step]
    blocks = image.reshape((image.shape[0] // step, step, image.shape[1] // step, step) + tuple(image.shape[2:]))
    if not skip_nan:
        return blocks.mean(axis=(1, 3))
    finite = xp.isfinite(blocks)
    count = finite.sum(axis=(1, 3))
    total = xp.where(finite, blocks, 0.0).sum(axis=(1, 3))
    return xp.where(count > 0, total / xp.maximum(count, 1), xp.nan)
