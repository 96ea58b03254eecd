"""What a refinement leaves on disk: ``transform.json`` and ``weights.json``.

``transform.json`` holds the guide-to-native-cube matrix under the key
``matrix`` (see :data:`CONVENTION`), so that one run's output can seed the next
(``ggrad refine --initial transform.json``). :func:`read_transform` reads it
back, or a plain text file with a 3 x 3 matrix.
"""

from __future__ import annotations

import datetime
import json
import math
import platform
from pathlib import Path

import numpy as np

from .._validation import check_matrix

__all__ = ["CONVENTION", "read_transform", "transform_record", "versions", "weights_record"]

CONVENTION = (
    "matrix maps a point (row, col, 1) of the full guide grid, in pixel-centre coordinates, to the point "
    "of the cube's native grid that lands on it (the pull-back convention of "
    "scipy.ndimage.affine_transform); cube A's native grid to cube B's is M_b @ inv(M_a)."
)


def versions() -> dict:
    """Versions of Python, ggrad_gpu and the numerical libraries, for the records.

    Returns
    -------
    dict
        Name -> version string. CuPy is listed only if already imported
        (asking would import it, and start a device context, in a CPU run).

    Examples
    --------
    >>> from ggrad_gpu.io import versions
    >>> {"ggrad_gpu", "numpy", "scipy"} <= set(versions())
    True
    """
    import sys

    import scipy

    from .._version import __version__

    found = {"python": platform.python_version(), "ggrad_gpu": __version__, "numpy": np.__version__,
             "scipy": scipy.__version__}
    cupy = sys.modules.get("cupy")
    if cupy is not None:
        found["cupy"] = cupy.__version__
    return found


def transform_record(refinement, *, guide=None, cube=None, initial_source: str = "default") -> dict:
    """The content of ``transform.json`` for a :class:`~ggrad_gpu.refinement.driver.Refinement`.

    Parameters
    ----------
    refinement : Refinement
    guide, cube : dict, optional
        What to say about the inputs (e.g. path, shape, format); stored as given.
    initial_source : str
        Where the initial transform came from: ``"default"`` (the cube spans
        the guide), ``"file"`` (``--initial``) or the instrument metadata
        (e.g. ``"renishaw-wdf stage metadata"``).

    Returns
    -------
    dict
        JSON-ready: ``matrix`` and ``initial`` as nested lists, the
        convention in words, ``improved`` and ``message``, TRE-free
        quality figures, the working grid, the registration's iteration
        count, timings and versions.

    Examples
    --------
    >>> from ggrad_gpu import refine, synthetic
    >>> from ggrad_gpu.io import transform_record
    >>> phantom = synthetic.make_phantom(shape=(96, 112), bands=12, seed=1, signatures="mixed")
    >>> result = refine(phantom.guide, phantom.cube, initial=phantom.initial, backend="numpy")
    >>> record = transform_record(result, initial_source="file")
    >>> record["improved"], record["initial_source"], len(record["matrix"])
    (True, 'file', 3)
    """
    registration = refinement.registration
    record = {
        "matrix": _nested(refinement.matrix),
        "convention": CONVENTION,
        "initial": _nested(refinement.initial),
        "initial_source": str(initial_source),
        "improved": bool(refinement.improved),
        "message": refinement.message,
        "quality": {name: _number(value) for name, value in refinement.quality.items()},
        "working_grid": {
            "shape": [int(n) for n in refinement.gradient.grad_x.shape],
            "working_to_guide": _nested(refinement.working_to_guide),
        },
        "output_grid": _output_grid(refinement),
        "registration": {
            "iterations": int(registration.iterations),
            "converged": bool(registration.converged),
            "coarse_shift": [float(v) for v in registration.coarse_shift],
        },
        "backend": refinement.backend,
        "timings_s": {name: round(float(value), 4) for name, value in refinement.timings.items()},
        "versions": versions(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if guide is not None:
        record["guide"] = guide
    if cube is not None:
        record["cube"] = cube
    return record


def weights_record(gradient, *, band_centres=None, band_unit=None) -> dict:
    """The content of ``weights.json``: level weights (eq. 9) and per-band weights (eq. 5).

    Parameters
    ----------
    gradient : GlobalGradient
    band_centres : array_like, shape (bands,), optional
        Wavenumbers, wavelengths or energies of the bands.
    band_unit : str, optional

    Returns
    -------
    dict
        ``alpha``, ``beta`` (K), ``channel_weights`` (K x bands), the bands
        each level uses, and the band centres and unit (None if unknown).

    Examples
    --------
    >>> from ggrad_gpu import estimate_global_gradient, synthetic
    >>> from ggrad_gpu.io import weights_record
    >>> phantom = synthetic.make_phantom(shape=(64, 80), bands=6, seed=1)
    >>> gradient = estimate_global_gradient(phantom.guide, phantom.cube_on_guide, levels=2)
    >>> record = weights_record(gradient, band_centres=phantom.wavenumbers, band_unit="cm-1")
    >>> len(record["alpha"]), len(record["beta"])
    (2, 2)
    """
    channel_weights = np.asarray(gradient.channel_weights, dtype=np.float64)
    bands = channel_weights.shape[1]
    if band_centres is not None:
        band_centres = np.asarray(band_centres, dtype=np.float64).ravel()
        if band_centres.shape != (bands,):
            raise ValueError(f"band_centres must have one value per band ({bands}); got {band_centres.shape[0]}")
    return {
        "levels": int(channel_weights.shape[0]),
        "bands": int(bands),
        "alpha": [float(v) for v in gradient.alpha],
        "beta": [float(v) for v in gradient.beta],
        "band_centres": None if band_centres is None else band_centres.tolist(),
        "band_unit": band_unit,
        "channel_weights": channel_weights.tolist(),
        "active_bands": [np.flatnonzero(row > 0).tolist() for row in channel_weights],
    }


def read_transform(path) -> np.ndarray:
    """A 3 x 3 guide-to-native-cube matrix from ``transform.json`` or a text file.

    Parameters
    ----------
    path : str or path-like
        A JSON file with the key ``matrix`` (nested lists, as ``ggrad refine``
        writes), or a text file of three rows of three numbers
        (``numpy.loadtxt``).

    Returns
    -------
    numpy.ndarray, shape (3, 3), float64

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the file holds no finite 3 x 3 matrix; the message names the file.

    Examples
    --------
    >>> import json, tempfile, os
    >>> from ggrad_gpu.io import read_transform
    >>> folder = tempfile.mkdtemp()
    >>> path = os.path.join(folder, "transform.json")
    >>> with open(path, "w") as f:
    ...     json.dump({"matrix": [[0.2, 0, 0.1], [0, 0.2, -3], [0, 0, 1]]}, f)
    >>> read_transform(path)[1]
    array([ 0. ,  0.2, -3. ])
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"initial transform file not found: {path}")
    text = path.read_text(encoding="utf-8", errors="replace")
    if text.lstrip().startswith("{"):
        try:
            content = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON: {exc}") from None
        if not isinstance(content, dict) or "matrix" not in content:
            raise ValueError(f"{path} has no key 'matrix' (the 3 x 3 guide-to-cube matrix)")
        values = content["matrix"]
    else:
        try:
            values = np.loadtxt(path, ndmin=2)
        except ValueError as exc:
            raise ValueError(f"{path} is neither JSON nor a text 3 x 3 matrix: {exc}") from None
    try:
        matrix = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{path}: the matrix must be 3 x 3 numbers") from None
    return check_matrix(matrix, f"the matrix in {path}")


def _output_grid(refinement) -> dict:
    """The grid of ``registered``: its shape and its pixel-to-guide matrix."""
    to_guide = refinement.output_to_guide
    return {
        "shape": [int(n) for n in refinement.registered.shape[:2]],
        "output_to_guide": _nested(refinement.working_to_guide if to_guide is None else to_guide),
    }


def _nested(matrix) -> list:
    return [[float(v) for v in row] for row in np.asarray(matrix, dtype=np.float64)]


def _number(value):
    if isinstance(value, (bool, np.bool_)):  # a yes-or-no figure (quality["normalised"]) stays one
        return bool(value)
    value = float(value)
    return value if math.isfinite(value) else None
