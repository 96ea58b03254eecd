"""Re-use of a saved transform: a cube resampled with ``transform.json``, without refining again.

``ggrad refine`` saves the guide-to-native-cube matrix, the guide's shape and
the working grid in ``transform.json``. :func:`apply_transform` puts any cube
on the same native grid (the same map at another band range, a processed
copy, another channel) onto the working grid or the full guide grid with it,
as :func:`~ggrad_gpu.refine` would have resampled it (``ggrad apply``).
"""

from __future__ import annotations

import numpy as np

from .._validation import check_matrix
from ..core.geometry import cube_output_grid, footprint_mask
from ..core.warp import warp_cube

__all__ = ["APPLY_GRIDS", "apply_transform", "output_grid"]

APPLY_GRIDS = ("working", "guide", "cube")


def output_grid(record: dict, grid: str = "working") -> tuple[np.ndarray, tuple[int, int]]:
    """The output grid ``grid`` of a ``transform.json`` record: its matrix to the guide and its shape.

    Parameters
    ----------
    record : dict
        The content of ``transform.json`` (keys ``guide.shape`` and
        ``working_grid``).
    grid : {"working", "guide", "cube"}
        ``"cube"``: the guide-aligned grid at about the cube's pixel size
        (:func:`ggrad_gpu.core.geometry.cube_output_grid` of the record's matrix).

    Returns
    -------
    (numpy.ndarray of shape (3, 3), (int, int))
        Output pixel to guide coordinate, and the output's (rows, cols).

    Examples
    --------
    >>> from ggrad_gpu.refinement.apply import output_grid
    >>> record = {"guide": {"shape": [40, 60]},
    ...           "working_grid": {"shape": [20, 30], "working_to_guide": [[2, 0, 0.5], [0, 2, 0.5], [0, 0, 1]]}}
    >>> output_grid(record, "working")[1], output_grid(record, "guide")[1]
    ((20, 30), (40, 60))
    """
    if grid not in APPLY_GRIDS:
        raise ValueError(f"output_grid must be one of {APPLY_GRIDS}; got {grid!r}")
    try:
        if grid == "guide":
            return np.eye(3), tuple(int(n) for n in record["guide"]["shape"][:2])
        if grid == "cube":
            matrix = np.asarray(record["matrix"], dtype=np.float64)
            return cube_output_grid(record["guide"]["shape"][:2], record["cube"]["shape"][:2], matrix)
        working = record["working_grid"]
        shape = tuple(int(n) for n in working["shape"][:2])
        return check_matrix(np.asarray(working["working_to_guide"], dtype=np.float64), "working_to_guide"), shape
    except (KeyError, TypeError, IndexError) as exc:
        raise ValueError(f"the transform record has no {grid} grid (a transform.json written by ggrad refine "
                         f"holds 'guide' and 'working_grid'): missing {exc}") from None


def apply_transform(cube, record: dict, *, grid: str = "working", order: int = 1):
    """Resample ``cube`` with a saved transform onto one of its output grids.

    Parameters
    ----------
    cube : array, shape (rows, cols, bands)
        On the native grid the transform was made for (``record["cube"]["shape"]``'s rows and cols).
    record : dict
        The content of ``transform.json`` (key ``matrix``: guide to native cube).
    grid : {"working", "guide", "cube"}
        The working grid ``refine`` used, the full guide grid, or the grid at
        about the cube's pixel size.
    order : {0, 1}
        Interpolation, as :func:`~ggrad_gpu.warp_cube`.

    Returns
    -------
    registered : array, shape (out_rows, out_cols, bands)
        NaN beyond the cube's footprint.
    valid : array of bool, shape (out_rows, out_cols)
        Output pixels the cube covers.
    output_to_guide : numpy.ndarray, shape (3, 3)

    Raises
    ------
    ValueError
        If the cube's rows and cols are not those the transform was made for,
        or the record has no matrix or grid.

    Examples
    --------
    >>> import numpy as np
    >>> from ggrad_gpu.refinement.apply import apply_transform
    >>> record = {"matrix": [[0.5, 0, -0.25], [0, 0.5, -0.25], [0, 0, 1]], "guide": {"shape": [8, 8]},
    ...           "cube": {"shape": [4, 4, 2]}}
    >>> registered, valid, _ = apply_transform(np.ones((4, 4, 2)), record, grid="guide")
    >>> registered.shape, bool(valid.all())
    ((8, 8, 2), True)
    """
    if "matrix" not in record:
        raise ValueError("the transform record has no 'matrix' (the guide-to-cube matrix)")
    matrix = check_matrix(np.asarray(record["matrix"], dtype=np.float64), "the record's matrix")
    expected = (record.get("cube") or {}).get("shape")
    if getattr(cube, "ndim", None) != 3:
        raise ValueError(f"cube must be 3-D (rows, cols, bands); got shape {tuple(np.shape(cube))}")
    if expected is not None and tuple(cube.shape[:2]) != tuple(int(n) for n in expected[:2]):
        raise ValueError(f"cube has {cube.shape[0]} x {cube.shape[1]} pixels but the transform was made for a "
                         f"cube of {expected[0]} x {expected[1]}: it maps the guide to that native grid")
    to_guide, shape = output_grid(record, grid)
    out_matrix = matrix @ to_guide
    registered = warp_cube(cube, out_matrix, shape, order=order)
    valid = footprint_mask(cube.shape[:2], out_matrix, shape, np)
    return registered, valid, to_guide
