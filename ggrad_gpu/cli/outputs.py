"""Writing a refinement's results into an output folder, all or nothing.

The folder is assembled under a hidden name beside it and swapped into place
once every file is complete (:func:`~ggrad_gpu.io.atomic_folder`), so an
interrupted run (an exception, Ctrl-C, SIGTERM through the ``ggrad`` command,
a full disk) never leaves a folder that looks finished: the hidden folder is
removed on the way out. An existing folder is replaced only when asked to
(``force``), and then only after the new one is complete; Ctrl-C and SIGTERM
are held back for the moment of the swap, so the old folder is never lost
without the new one in its place.
"""

from __future__ import annotations

from pathlib import Path

from .._backend import to_host
from ..io.atomic import atomic_folder, write_json
from ..io.cubes import CUBE_FORMATS, CubeData, cube_suffix, write_cube
from ..io.records import transform_record, weights_record

__all__ = ["check_new_directory", "write_outputs"]


def check_new_directory(path, *, force: bool) -> Path:
    """Fail early if ``path`` exists and may not be replaced, or its parent is missing.

    Parameters
    ----------
    path : path-like
        The output folder to be written.
    force : bool
        Whether an existing folder may be replaced.

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    FileExistsError
        If ``path`` exists and ``force`` is False, or exists and is not a
        folder (never replaced).
    FileNotFoundError
        If the folder to hold ``path`` does not exist.

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> from ggrad_gpu.cli.outputs import check_new_directory
    >>> folder = Path(tempfile.mkdtemp())
    >>> check_new_directory(folder / "results", force=False).name
    'results'
    >>> check_new_directory(folder, force=False)
    Traceback (most recent call last):
    ...
    FileExistsError: output folder ... exists; choose another or pass --force to replace it
    """
    path = Path(path)
    if path.exists() and not force:
        raise FileExistsError(f"output folder {path} exists; choose another or pass --force to replace it")
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"output {path} exists and is not a folder; it is never replaced")
    if not path.parent.exists():
        raise FileNotFoundError(f"the folder to hold {path} does not exist: {path.parent}")
    return path


def write_outputs(outdir, refinement, guide, cube, *, cube_format: str = "npy", force: bool = False,
                  inputs: dict | None = None, save_cube: bool = True,
                  initial_source: str = "default") -> list[Path]:
    """Write ``registered.<ext>``, ``transform.json``, ``weights.json`` and ``report.png`` into ``outdir``.

    Parameters
    ----------
    outdir : path-like
        Folder to create. It must not exist unless ``force``.
    refinement : Refinement
    guide : array, shape (rows, cols)
        The guide as given to :func:`~ggrad_gpu.refine` (for the report).
    cube : CubeData or array, shape (rows, cols, bands)
        The native cube as given to ``refine``; a :class:`~ggrad_gpu.io.CubeData`
        also brings the band centres and unit.
    cube_format : {"npy", "npz", "tiff", "envi", "hdf5", "zarr"}
        Format of ``registered``.
    force : bool
        Replace an existing ``outdir``, once the new one is complete.
    inputs : dict, optional
        What to record about the inputs in ``transform.json``: ``"guide"`` and
        ``"cube"`` (e.g. their paths) and, for an instrument file,
        ``"instrument"`` (its metadata, recorded with the cube).
    save_cube : bool
        Write the registered cube (the demo leaves it out).
    initial_source : str
        Where the initial transform came from, for ``transform.json``
        (``"default"``, ``"file"`` or the instrument metadata).

    Returns
    -------
    list of pathlib.Path
        The files written, at their final place.

    Raises
    ------
    FileExistsError
        If ``outdir`` exists and ``force`` is False, or is not a folder.
    OSError
        If a file cannot be written (e.g. a full disk); the message names
        ``outdir`` and the file, and nothing is left behind.

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> from ggrad_gpu import refine, synthetic
    >>> from ggrad_gpu.cli.outputs import write_outputs
    >>> phantom = synthetic.make_phantom(shape=(96, 112), bands=12, seed=1, signatures="mixed")
    >>> result = refine(phantom.guide, phantom.cube, initial=phantom.initial, backend="numpy")
    >>> written = write_outputs(Path(tempfile.mkdtemp()) / "out", result, phantom.guide, phantom.cube)
    >>> sorted(path.name for path in written)
    ['registered.npy', 'report.png', 'transform.json', 'weights.json']
    """
    # Imported here: matplotlib loads only once there is a report to draw.
    from ..io.atomic import write_figure
    from ..plotting.report import report_figure

    if cube_format not in CUBE_FORMATS:
        raise ValueError(f"cube_format must be one of {CUBE_FORMATS}; got {cube_format!r}")
    outdir = check_new_directory(outdir, force=force)
    if isinstance(cube, CubeData):
        data, band_centres, band_unit, source_format = cube.data, cube.band_centres, cube.band_unit, cube.format
    else:
        data, band_centres, band_unit, source_format = cube, None, None, None
    inputs = dict(inputs or {})
    names, step = [], "the folder"
    try:
        with atomic_folder(outdir, overwrite=force) as staging:
            if save_cube:
                step = "registered" + cube_suffix(cube_format)
                write_cube(staging / step, to_host(refinement.registered), band_centres=band_centres,
                           band_unit=band_unit, format=cube_format)
                names.append(step)
            shape = {"shape": [int(n) for n in guide.shape]}
            record = transform_record(refinement, guide={**shape, "source": inputs.get("guide")},
                                      cube={"shape": [int(n) for n in data.shape], "source": inputs.get("cube"),
                                            "format": source_format,
                                            **({"instrument": inputs["instrument"]} if "instrument" in inputs else {})},
                                      initial_source=initial_source)
            step = "transform.json"
            write_json(staging / step, record)
            step = "weights.json"
            write_json(staging / step,
                       weights_record(refinement.gradient, band_centres=band_centres, band_unit=band_unit))
            step = "report.png"
            figure = report_figure(refinement, guide, data, band_centres=band_centres, band_unit=band_unit)
            write_figure(figure, staging / step)
            names += ["transform.json", "weights.json", "report.png"]
            step = "the folder"  # what is left is the swap into place
    except OSError as exc:
        # atomic_folder has already removed the hidden folder; say which file failed, once.
        if isinstance(exc, FileExistsError) or str(outdir) in str(exc):
            raise
        reason = exc.strerror or " ".join(str(exc).split()) or type(exc).__name__
        message = f"could not write {step} of {outdir}: {reason}; nothing was left behind"
        raise (OSError(exc.errno, message) if exc.errno is not None else OSError(message)) from exc
    return [outdir / name for name in names]
