"""The output folder of several cubes refined on one guide, all or nothing.

``OUT/<name>/`` holds each cube's usual outputs (:func:`~ggrad_gpu.cli.outputs.write_outputs`),
``OUT/cube_to_cube.json`` the transforms between the cubes' native grids
(``{"A->B": M_b @ inv(M_a)}``) and ``OUT/overlay.png`` the modalities on the
guide before and after. The folder is assembled under a hidden name and
swapped into place when complete (:func:`~ggrad_gpu.io.atomic_folder`).
"""

from __future__ import annotations

from pathlib import Path

from ..io.atomic import atomic_folder, write_json
from ..io.cubes import split_dataset_path
from .outputs import check_new_directory, write_outputs

__all__ = ["unique_names", "write_many_outputs"]


def unique_names(paths) -> list[str]:
    """The files' stems, made unique with ``-2``, ``-3``... in order (``a.npy``, ``a.h5`` -> ``a``, ``a-2``).

    Examples
    --------
    >>> from ggrad_gpu.cli.multi_outputs import unique_names
    >>> unique_names(["raman.npy", "ir/raman.h5", "ir.wdf"])
    ['raman', 'raman-2', 'ir']
    """
    names, seen = [], set()
    for path in paths:
        stem = split_dataset_path(path)[0].stem or "cube"  # "scan.h5:/cube" is named after scan.h5
        name, count = stem, 1
        while name in seen:
            count += 1
            name = f"{stem}-{count}"
        seen.add(name)
        names.append(name)
    return names


def write_many_outputs(outdir, refinements, guide, cubes, names, *, cube_to_cube, initial_sources, inputs,
                       cube_format: str = "npy", force: bool = False) -> list[Path]:
    """Write one subfolder per cube, ``cube_to_cube.json`` and ``overlay.png`` into a new ``outdir``.

    Parameters
    ----------
    outdir : path-like
        Folder to create; it must not exist unless ``force``.
    refinements : sequence of Refinement
    guide : array, shape (rows, cols)
    cubes : sequence of CubeData or arrays
        The native cubes, as given to ``refine``.
    names : sequence of str
        The subfolders' names (unique), one per cube.
    cube_to_cube : dict
        ``{"A->B": 3x3}`` (:func:`ggrad_gpu.cube_to_cube`).
    initial_sources : sequence of str
        Where each initial transform came from.
    inputs : sequence of dict
        What to record about each cube's inputs in its ``transform.json``.
    cube_format : str
    force : bool

    Returns
    -------
    list of pathlib.Path
        The entries written, at their final place.

    Examples
    --------
    >>> from ggrad_gpu import cube_to_cube, refine_many
    >>> from ggrad_gpu.cli.multi_outputs import write_many_outputs
    >>> results = refine_many(guide, [raman, ir], initials=[raman_stage, ir_stage])  # doctest: +SKIP
    >>> write_many_outputs("both", results, guide, [raman, ir], ["raman", "ir"],  # doctest: +SKIP
    ...                    cube_to_cube=cube_to_cube([r.matrix for r in results], ["raman", "ir"]),
    ...                    initial_sources=["file", "file"], inputs=[{}, {}])
    [PosixPath('both/raman'), PosixPath('both/ir'), PosixPath('both/cube_to_cube.json'), PosixPath('both/overlay.png')]
    """
    from ..plotting.overlay import overlay_figure
    from ..io.atomic import write_figure

    outdir = check_new_directory(outdir, force=force)
    with atomic_folder(outdir, overwrite=force) as staging:
        for refinement, cube, name, source, given in zip(refinements, cubes, names, initial_sources, inputs):
            write_outputs(staging / name, refinement, guide, cube, cube_format=cube_format, inputs=given,
                          initial_source=source)
        write_json(staging / "cube_to_cube.json",
                   {pair: [[float(v) for v in row] for row in matrix] for pair, matrix in cube_to_cube.items()})
        arrays = [getattr(cube, "data", cube) for cube in cubes]
        figure = overlay_figure(guide, arrays, [r.initial for r in refinements], [r.matrix for r in refinements],
                                names)
        write_figure(figure, staging / "overlay.png")
    return [outdir / name for name in (*names, "cube_to_cube.json", "overlay.png")]
