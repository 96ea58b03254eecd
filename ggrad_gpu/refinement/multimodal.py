"""Several cubes on one guide: each refined against it, and so registered to each other.

Two maps of one sample in different modalities (a Raman and an infrared map)
rarely share a pixel grid, a band axis or a resolution, but they share the
brightfield image. :func:`refine_many` refines each against it;
:func:`cube_to_cube` turns the guide-to-cube matrices into the transforms
between the cubes' native grids (``M_b @ inv(M_a)``, DESIGN "Matrices").

Each cube is refined by its own :func:`~ggrad_gpu.refine` call: the working
grid (the guide's region around the cube's footprint, block-averaged by a
factor set by the cube's resolution) differs between cubes, so the guide is
prepared per cube, not once.
"""

from __future__ import annotations

import numpy as np

from .._validation import check_matrix
from .driver import Refinement, refine
from .options import check_inputs

__all__ = ["cube_to_cube", "refine_many"]


def refine_many(guide, cubes, *, initials=None, **refine_options) -> list[Refinement]:
    """Refine several cubes against one guide image.

    Parameters
    ----------
    guide : array, shape (rows, cols)
        The brightfield image all the cubes are placed on.
    cubes : sequence of arrays, each shape (rows_i, cols_i, bands_i)
        The cubes at their native resolutions; band counts may differ.
    initials : sequence of (3, 3) arrays or None, optional
        One initial guide-to-cube matrix per cube (None: the cube spans the
        guide); by default every cube spans the guide.
    **refine_options
        Passed to every :func:`~ggrad_gpu.refine` call (``levels``,
        ``backend``, ``output_grid``...).

    Returns
    -------
    list of Refinement
        One per cube, in order.

    Raises
    ------
    ValueError, TypeError
        If ``cubes`` is empty, ``initials`` does not hold one entry per cube,
        or ``refine`` refuses a cube or its initial matrix (the message starts
        with ``cubes[i]``).

    Examples
    --------
    >>> import numpy as np
    >>> from ggrad_gpu import refine_many, cube_to_cube
    >>> from ggrad_gpu.synthetic import make_phantom
    >>> raman = make_phantom(shape=(120, 140), bands=12, native_factor=5, seed=2, signatures="mixed")
    >>> results = refine_many(raman.guide, [raman.cube, raman.cube[..., :6]],
    ...                       initials=[raman.initial, raman.initial], levels=2, backend="numpy")
    >>> [r.registered.shape[2] for r in results]
    [12, 6]
    >>> sorted(cube_to_cube([r.matrix for r in results], names=["all", "first6"]))
    ['all->first6', 'first6->all']
    """
    cubes = list(cubes)
    if not cubes:
        raise ValueError("cubes must hold at least one cube; got none")
    if initials is None:
        initials = [None] * len(cubes)
    initials = list(initials)
    if len(initials) != len(cubes):
        raise ValueError(f"initials must hold one matrix (or None) per cube ({len(cubes)}); got {len(initials)}")
    for index, cube in enumerate(cubes):  # every cube checked before the first refinement starts
        _naming(index, check_inputs, guide, cube, refine_options.get("band_axis", -1))
    return [_naming(index, refine, guide, cube, initial=initial, **refine_options)
            for index, (cube, initial) in enumerate(zip(cubes, initials))]


def _naming(index: int, call, *args, **kwargs):
    """``call(*args, **kwargs)``, its input errors prefixed with ``cubes[index]`` ("cube must be 3-D" names no index)."""
    try:
        return call(*args, **kwargs)
    except (ValueError, TypeError) as exc:
        raise type(exc)(f"cubes[{index}]: {exc}") from exc


def cube_to_cube(matrices, names=None) -> dict:
    """The transforms between the cubes' native grids, for every ordered pair.

    Parameters
    ----------
    matrices : sequence of (3, 3) arrays
        Guide-to-cube matrices (``Refinement.matrix``), one per cube.
    names : sequence of str, optional
        The cubes' names (default ``"0"``, ``"1"``...); they must be unique.

    Returns
    -------
    dict
        ``{"A->B": M_b @ inv(M_a)}``: cube A's native grid (row, col) to the
        point of cube B's native grid on the same spot of the guide.

    Examples
    --------
    >>> import numpy as np
    >>> from ggrad_gpu import cube_to_cube
    >>> fine = np.diag([0.5, 0.5, 1.0])  # a cube at half the guide's resolution
    >>> coarse = np.diag([0.25, 0.25, 1.0])
    >>> cube_to_cube([fine, coarse], names=["fine", "coarse"])["fine->coarse"]
    array([[0.5, 0. , 0. ],
           [0. , 0.5, 0. ],
           [0. , 0. , 1. ]])
    """
    matrices = [check_matrix(np.asarray(m, dtype=np.float64), f"matrices[{i}]") for i, m in enumerate(matrices)]
    names = [str(i) for i in range(len(matrices))] if names is None else [str(n) for n in names]
    if len(names) != len(matrices):
        raise ValueError(f"names must hold one name per matrix ({len(matrices)}); got {len(names)}")
    if len(set(names)) != len(names):
        raise ValueError(f"names must be unique; got {names}")
    return {f"{a}->{b}": mb @ np.linalg.inv(ma)
            for a, ma in zip(names, matrices) for b, mb in zip(names, matrices) if a != b}
