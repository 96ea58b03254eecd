"""Affine primitives that every layer uses, the lazy one included (the rest of the geometry: ``core.geometry``)."""

from __future__ import annotations

import numpy as np

__all__ = ["translation"]


def translation(rows: float, cols: float) -> np.ndarray:
    """The 3 x 3 homogeneous matrix that adds ``(rows, cols)`` to a (row, col) point.

    Examples
    --------
    >>> translation(2.0, -1.5) @ np.array([1.0, 1.0, 1.0])
    array([ 3. , -0.5,  1. ])
    """
    return np.array([[1.0, 0, rows], [0, 1.0, cols], [0, 0, 1.0]])
