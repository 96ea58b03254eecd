"""Registration quality: target registration error, NCC and MSE."""

from __future__ import annotations

import numbers
from typing import NamedTuple

import numpy as np

from .._backend import array_module
from .._validation import check_affine, check_array, check_matrix
from ..core.geometry import check_output_shape, footprint_box

__all__ = ["TRE", "footprint_region", "mse", "ncc", "target_registration_error"]


class TRE(NamedTuple):
    """Target registration error in guide pixels.

    Examples
    --------
    >>> one_row_off = np.array([[1.0, 0, 1], [0, 1, 0], [0, 0, 1]])
    >>> tre = target_registration_error(one_row_off, np.eye(3), (50, 50))
    >>> isinstance(tre, TRE), float(tre.mean), float(tre.max)
    (True, 1.0, 1.0)
    """

    mean: float
    max: float


def target_registration_error(m_est, m_true, guide_shape, *, spacing: int = 10, region=None) -> TRE:
    """Mean and max of ``|inv(m_true) @ m_est @ p - p|`` over a grid of guide points.

    Parameters
    ----------
    m_est, m_true : array_like, shape (3, 3)
        Guide-to-cube matrices in (row, col) pixel coordinates, finite;
        ``m_true`` must be an invertible affine matrix.
    guide_shape : tuple of int
        ``(rows, cols)`` of the guide; the points ``p`` lie on a grid with step
        ``spacing`` starting at ``spacing // 2`` inside it.
    spacing : int, default 10
        A positive integer.
    region : (row0, col0, rows, cols), optional
        Only the points inside this window of the guide (clipped to it), e.g.
        the cube's true footprint where the guide shows more than the cube:
        accuracy is stated where the cube is used, not where a small
        rotation error grows with the distance from it.

    Raises
    ------
    ValueError, TypeError
        Naming the parameter that is malformed.

    Examples
    --------
    >>> import numpy as np
    >>> from ggrad_gpu.metrics import target_registration_error
    >>> shifted = np.array([[1, 0, 0.5], [0, 1, 0], [0, 0, 1.0]])
    >>> target_registration_error(shifted, np.eye(3), (100, 100))
    TRE(mean=0.5, max=0.5)
    """
    m_est = check_matrix(m_est, "m_est")
    m_true = check_affine(m_true, "m_true")
    if isinstance(spacing, bool) or not isinstance(spacing, numbers.Integral) or spacing < 1:
        raise ValueError(f"spacing must be a positive integer; got {spacing!r}")
    guide_shape = check_output_shape(guide_shape, "guide_shape")
    start, stop = _window(region, guide_shape)
    rows = np.arange(start[0] + spacing // 2, stop[0], spacing)
    cols = np.arange(start[1] + spacing // 2, stop[1], spacing)
    if rows.size == 0 or cols.size == 0:
        where = f"guide_shape {tuple(guide_shape)}" if region is None else f"region {tuple(region)}"
        raise ValueError(f"{where} holds no grid point at spacing {spacing}")
    grid = np.stack(np.meshgrid(rows, cols, indexing="ij"), axis=0).reshape(2, -1)
    points = np.vstack([grid, np.ones(grid.shape[1])])
    moved = np.linalg.solve(m_true, m_est @ points)
    error = np.hypot(*(moved[:2] - points[:2]))
    return TRE(float(error.mean()), float(error.max()))


def footprint_region(cube_shape, matrix, guide_shape) -> tuple[int, int, int, int]:
    """The window ``(row0, col0, rows, cols)`` of the guide that a cube's footprint covers.

    ``matrix`` maps the guide to the cube (e.g. the true one); the window is
    the footprint's bounding box, clipped to the guide. For
    :func:`target_registration_error`'s ``region``.

    Examples
    --------
    >>> import numpy as np
    >>> from ggrad_gpu.core.geometry import fov_matrix
    >>> from ggrad_gpu.metrics import footprint_region
    >>> footprint_region((20, 25), fov_matrix((100, 125), (20, 25)), (100, 125))
    (0, 0, 100, 125)
    """
    low, high = footprint_box(cube_shape, check_affine(matrix, "matrix"))
    start = np.clip(np.ceil(low), 0, guide_shape).astype(int)
    stop = np.clip(np.floor(high) + 1, 0, guide_shape).astype(int)
    return int(start[0]), int(start[1]), int(stop[0] - start[0]), int(stop[1] - start[1])


def _window(region, guide_shape):
    """``region`` as (start, stop) guide pixels, clipped to the guide; the whole guide for None."""
    if region is None:
        return (0, 0), guide_shape
    try:
        values = [int(v) for v in region]
        exact = all(int(v) == v for v in region)
    except (TypeError, ValueError):
        values, exact = [], False
    if len(values) != 4 or not exact or min(values[2:]) < 1:
        raise ValueError(f"region must be (row0, col0, rows, cols) with positive sizes; got {region!r}")
    start = (max(0, values[0]), max(0, values[1]))
    stop = (min(guide_shape[0], values[0] + values[2]), min(guide_shape[1], values[1] + values[3]))
    return start, stop


def _paired(a, b, mask):
    """``a`` and ``b`` in float64, 0 where either is not finite (or ``mask`` is False), checked.

    Also returns the map of the pixels kept (None: all are) and their number.
    Zeros and a count rather than compacting by a boolean index: on CuPy that
    would build an index array and read its size back.
    """
    check_array(a, "a", (1, 2, 3), "an image (1-D to 3-D array)")
    check_array(b, "b", (1, 2, 3), "an image (1-D to 3-D array)")
    xp = array_module(a=a, b=b, mask=mask)
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape; got {a.shape} and {b.shape}")
    if mask is not None:
        check_array(mask, "mask", (a.ndim,), f"{a.ndim}-D like a and b")
        if mask.shape != a.shape:
            raise ValueError(f"mask must have the shape of a and b, {a.shape}; got {mask.shape}")
    a = a.astype(xp.float64).ravel()
    b = b.astype(xp.float64).ravel()
    keep = xp.isfinite(a) & xp.isfinite(b)
    if mask is not None:
        keep &= mask.ravel().astype(bool)
    count = int(keep.sum())
    if count == 0:
        raise ValueError("a and b have no pixel in common that is finite (and inside mask)")
    if count == keep.size:
        return xp, a, b, None, count
    return xp, xp.where(keep, a, 0), xp.where(keep, b, 0), keep, count


def ncc(a, b, mask=None) -> float:
    """Normalised cross-correlation (Pearson) of two images, optionally within ``mask``.

    Pixels where either image is NaN or inf are left out. 0.0 where either
    image is constant over the pixels used.

    Raises
    ------
    ValueError, TypeError
        Naming ``a``, ``b`` or ``mask``: not real arrays, different shapes,
        or no finite pixel in common.

    Examples
    --------
    >>> import numpy as np
    >>> from ggrad_gpu.metrics import ncc
    >>> a = np.arange(12.0).reshape(3, 4)
    >>> round(ncc(a, 2 * a + 1), 6), round(ncc(a, -a), 6)
    (1.0, -1.0)
    """
    xp, a, b, keep, count = _paired(a, b, mask)
    a = a - a.sum() / count
    b = b - b.sum() / count
    if keep is not None:
        a, b = xp.where(keep, a, 0), xp.where(keep, b, 0)
    denominator = float(xp.sqrt((a @ a) * (b @ b)))
    return float(a @ b) / denominator if denominator > 0 else 0.0


def mse(a, b, mask=None) -> float:
    """Mean squared difference of two images, optionally within ``mask``.

    Pixels where either image is NaN or inf are left out.

    Raises
    ------
    ValueError, TypeError
        Naming ``a``, ``b`` or ``mask``: not real arrays, different shapes,
        or no finite pixel in common.

    Examples
    --------
    >>> import numpy as np
    >>> from ggrad_gpu.metrics import mse
    >>> mse(np.zeros((2, 2)), np.array([[0.0, 2.0], [0.0, 0.0]]))
    1.0
    """
    xp, a, b, _keep, count = _paired(a, b, mask)
    diff = a - b  # 0 where a pixel is left out
    return float((diff * diff).sum()) / count
