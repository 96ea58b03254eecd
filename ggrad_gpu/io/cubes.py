"""Reading and writing hyperspectral cubes in six file formats.

Cubes come back as :class:`CubeData`: the array as ``(rows, cols, bands)``,
bands last, with the band centres and their unit where the file holds them.
Where the format allows, the array is a read-only memory map, so a large cube
is not read until it is used; every file is opened read-only.

========  ======================  ==============================  ==========
format    suffix                  library (``pip install ...``)   memory map
========  ======================  ==============================  ==========
npy       ``.npy``                NumPy                           yes
npz       ``.npz``                NumPy                           no
tiff      ``.tif``, ``.tiff``     ``tifffile``                    if uncompressed
envi      ``.hdr`` (+ data file)  ``spectral``                    yes
hdf5      ``.h5``, ``.hdf5``      ``h5py``                        no
zarr      ``.zarr`` (a folder)    ``zarr``                        no
========  ======================  ==============================  ==========

The optional libraries are imported only when a file of their format is read
or written (``pip install ggrad_gpu[io]`` installs them all).

Writers never leave a half-written file under the target name: they write to a
temporary name beside it and rename it into place once complete
(:func:`~ggrad_gpu.io.atomic_write_all`), and an existing file is replaced
only when asked to.
"""

from __future__ import annotations

import json
import os
import re
import reprlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._backend import to_host
from .._validation import check_array, check_band_axis
from .atomic import atomic_write_all
from .libraries import reading, require

__all__ = ["CUBE_FORMATS", "CUBE_SUFFIXES", "WRITERS", "CubeData", "cube_suffix", "read_cube", "split_dataset_path", "write_cube"]

# The one table of cube formats: each suffix and the format it means. The
# first suffix of a format is the one written for it (see cube_suffix).
CUBE_SUFFIXES = {
    ".npy": "npy", ".npz": "npz", ".tif": "tiff", ".tiff": "tiff", ".hdr": "envi",
    ".h5": "hdf5", ".hdf5": "hdf5", ".zarr": "zarr",
}
CUBE_FORMATS = tuple(dict.fromkeys(CUBE_SUFFIXES.values()))  # ("npy", "npz", "tiff", "envi", "hdf5", "zarr")

# Names under which a file may hold the band centres, in order of preference.
_CENTRE_KEYS = ("band_centres", "wavenumbers", "wavelengths", "energy")
_DATASET_FORMATS = ("npz", "hdf5", "zarr")
# ENVI "wavelength units" and the short units of CubeData.band_unit.
_ENVI_TO_UNIT = {
    "nanometers": "nm", "nanometer": "nm", "nm": "nm",
    "micrometers": "um", "micrometer": "um", "microns": "um", "um": "um", "\u00b5m": "um",
    "millimeters": "mm", "millimeter": "mm", "mm": "mm",
    "centimeters": "cm", "centimeter": "cm", "cm": "cm",
    "meters": "m", "meter": "m", "m": "m",
    "wavenumber": "cm-1", "wavenumbers": "cm-1", "cm-1": "cm-1",
    "ghz": "GHz", "mhz": "MHz", "index": None, "unknown": None,
}
_UNIT_TO_ENVI = {
    "nm": "Nanometers", "um": "Micrometers", "\u00b5m": "Micrometers", "mm": "Millimeters",
    "cm": "Centimeters", "m": "Meters", "cm-1": "Wavenumber", "1/cm": "Wavenumber",
    "ghz": "GHz", "mhz": "MHz",
}
# What each format is called in the error for a file that cannot be read.
_FORMAT_NAMES = {"npy": "npy file", "npz": "npz archive", "tiff": "TIFF file", "envi": "ENVI header and data file",
                 "hdf5": "HDF5 file", "zarr": "Zarr store"}
# ENVI data types (spectral's map); other real types are stored as float32.
_ENVI_DTYPES = tuple(np.dtype(t) for t in ("u1", "i2", "i4", "f4", "f8", "u2", "u4", "i8", "u8"))


@dataclass(frozen=True, eq=False)
class CubeData:
    """A cube read from a file, with what the file says about its bands.

    Attributes
    ----------
    data : numpy.ndarray, shape (rows, cols, bands)
        Bands last. A read-only ``numpy.memmap`` for npy, uncompressed TIFF and
        ENVI files (writing into it raises); an in-memory array otherwise.
    band_centres : numpy.ndarray of float64, shape (bands,), or None
        The band centres (wavelengths, wavenumbers, energies), if stored.
    band_unit : str or None
        Their unit, e.g. ``"nm"``, ``"cm-1"``, ``"keV"``, if stored.
    path : pathlib.Path
        The file (for ENVI, the header; for Zarr, the folder).
    format : str
        One of :data:`CUBE_FORMATS`.
    dataset : str or None
        The array's name inside an npz, HDF5 or Zarr container.

    Examples
    --------
    >>> import tempfile
    >>> folder = tempfile.TemporaryDirectory()
    >>> cube = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    >>> path = write_cube(Path(folder.name) / "cube.zarr", cube, band_centres=[500, 900, 1300, 1700], band_unit="cm-1")
    >>> data = read_cube(path)
    >>> isinstance(data, CubeData), data.shape, data.format, data.band_unit, data.band_centres.tolist()
    (True, (2, 3, 4), 'zarr', 'cm-1', [500.0, 900.0, 1300.0, 1700.0])
    >>> bool(np.array_equal(np.asarray(data.data), cube))
    True
    >>> folder.cleanup()
    """

    data: np.ndarray
    band_centres: np.ndarray | None
    band_unit: str | None
    path: Path
    format: str
    dataset: str | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(rows, cols, bands)``."""
        return tuple(self.data.shape)

    def __repr__(self) -> str:
        centres = "no band centres" if self.band_centres is None else f"band centres in {self.band_unit}"
        inside = f", dataset={self.dataset!r}" if self.dataset else ""
        return (f"CubeData({self.format} {self.data.dtype} {' x '.join(map(str, self.shape))}, "
                f"{centres}, path={str(self.path)!r}{inside})")


# --------------------------------------------------------------------------- reading cubes


def read_cube(path, *, dataset: str | None = None, band_axis: int | None = None,
              format: str | None = None, lazy: bool = False) -> CubeData:
    """Read a hyperspectral cube as ``(rows, cols, bands)``.

    Parameters
    ----------
    path : path-like
        The file: ``.npy``, ``.npz``, ``.tif``/``.tiff``, ``.hdr`` (ENVI; the
        data file beside it is found as ENVI does, or give the data file and
        its ``.hdr`` is found), ``.h5``/``.hdf5`` or a ``.zarr`` folder. An
        HDF5 or Zarr path may name the array inside: ``"scan.h5:/raman/cube"``.
    dataset : str, optional
        The array inside an npz, HDF5 or Zarr container. Default: the one
        named ``cube``, else the only 3-D array (more than one is an error).
    band_axis : int, optional
        The axis of the *stored* array that holds the bands; it is moved last
        with :func:`numpy.moveaxis` (a view, no copy). Default: the format's
        own: the first axis (pages) for TIFF, the last for npy, npz, HDF5 and
        Zarr. (A TIFF's first series is used, with any length-1 axes beyond
        three dropped, as in ImageJ stacks.) ENVI cubes always come as ``(lines, samples, bands)`` whatever
        their interleave (bsq, bil, bip), so only the default is accepted.
    format : {"npy", "npz", "tiff", "envi", "hdf5", "zarr"}, optional
        Override the format picked from the suffix.
    lazy : bool, default False
        Return ``data`` as a ``dask.array.Array`` read chunk by chunk (a
        cube beyond memory, for :func:`ggrad_gpu.refine`): Zarr in its own
        chunks, HDF5 by slices, npy, TIFF and ENVI through their memory
        maps, each chunk holding every band. npz and compressed files are
        read whole first. Needs dask.

    Returns
    -------
    CubeData
        ``data`` is a read-only memory map for npy, uncompressed TIFF and ENVI
        files; HDF5, Zarr, npz and compressed TIFF arrays are read into memory.
        Band centres come from, per format: npz arrays ``band_centres``,
        ``wavenumbers``, ``wavelengths`` or ``energy`` and ``band_unit``; the
        JSON ImageDescription that :func:`write_cube` puts in a TIFF; the ENVI
        header's ``wavelength`` and ``wavelength units`` (``Nanometers`` becomes
        ``"nm"``, ``Micrometers`` ``"um"``, ``Wavenumber`` ``"cm-1"``); attributes
        of the HDF5 dataset or Zarr array with those names (or 1-D arrays with
        those names beside it). npy files hold no band centres.

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    ValueError
        For an unknown suffix (the message lists the supported ones), a
        stored array that is not 3-D, an ambiguous or missing ``dataset``, or
        a file that cannot be read (corrupt, truncated, or not of its
        format): the message starts with the file's path and says what is
        wrong, whatever the library raised (chained as ``__cause__``).
    ImportError
        If the format's library is missing; the message says what to install.

    Notes
    -----
    Files are only ever opened for reading, memory maps with mode ``"r"``.

    Values are returned as stored: nothing is scaled or masked. In particular
    an ENVI header's ``reflectance scale factor``, ``data ignore value`` and
    ``bbl`` (bad band list) are not applied.

    Examples
    --------
    >>> import os, tempfile
    >>> import numpy as np
    >>> from ggrad_gpu.io import read_cube, write_cube
    >>> cube = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    >>> path = os.path.join(tempfile.mkdtemp(), "cube.npz")
    >>> path = write_cube(path, cube, band_centres=[500, 600, 700, 800], band_unit="nm")
    >>> found = read_cube(path)
    >>> found.shape, found.format, found.band_centres.tolist(), found.band_unit
    ((2, 3, 4), 'npz', [500.0, 600.0, 700.0, 800.0], 'nm')
    >>> bool((found.data == cube).all())
    True
    """
    _check_format(format)
    band_axis = check_band_axis(band_axis, allow_none=True)
    path, dataset = split_dataset_path(path, dataset)
    if not path.exists():
        raise FileNotFoundError(f"cube file {path} does not exist")
    fmt = format or _format_from_suffix(path, for_reading=True)
    if dataset is not None and fmt not in _DATASET_FORMATS:
        raise ValueError(f"dataset applies to {', '.join(_DATASET_FORMATS)} files only; got "
                         f"dataset={dataset!r} for a {fmt} file ({path})")
    if fmt == "envi" and band_axis not in (None, -1, 2):
        raise ValueError(f"band_axis must be left unset for an ENVI cube, whose header's interleave "
                         f"places the bands; got band_axis={band_axis}")
    reader = {"npy": _read_npy, "npz": _read_npz, "tiff": _read_tiff, "envi": _read_envi,
              "hdf5": _read_hdf5, "zarr": _read_zarr}[fmt]
    with reading(path, _FORMAT_NAMES[fmt]):
        data, centres, unit, dataset = reader(path, dataset, lazy)
        if data.ndim != 3:
            raise ValueError(f"cube must be 3-D (rows, cols, bands); got shape {tuple(data.shape)} "
                             f"in {path}" + (f" (dataset {dataset!r})" if dataset else ""))
        try:
            check_array(data, "cube", (3,), "3-D (rows, cols, bands)")
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{exc} in {path}") from None
        if band_axis is None:
            band_axis = 0 if fmt == "tiff" else -1
        data = _as_dask(data, band_axis) if lazy else data
        data = np.moveaxis(data, band_axis, -1)
        centres = _band_centres(centres, data.shape[2], f"the band centres in {path}")
    return CubeData(data=data, band_centres=centres, band_unit=_unit(unit), path=path, format=fmt,
                    dataset=dataset)


def split_dataset_path(path, dataset: str | None = None) -> tuple[Path, str | None]:
    """Split ``"file.h5:/group/name"`` (or ``"store.zarr:group/name"``) into the file and the name.

    A path that exists as given is never split, so a file whose name holds a
    colon is still found.

    Parameters
    ----------
    path : path-like
        A file, or an HDF5 or Zarr file followed by ``:`` and the array inside.
    dataset : str, optional
        The array's name given separately; it must agree with the one in the path.

    Returns
    -------
    (pathlib.Path, str or None)
        The file and the array's name (``dataset`` when the path names none).

    Raises
    ------
    ValueError
        If ``dataset`` contradicts the name in the path.

    Examples
    --------
    >>> from ggrad_gpu.io import split_dataset_path
    >>> path, name = split_dataset_path("scan.h5:/raman/cube")
    >>> path.name, name
    ('scan.h5', '/raman/cube')
    >>> split_dataset_path("cube.npy")[1] is None
    True
    """
    text = os.fspath(path)
    if not os.path.exists(text):
        match = re.match(r"^(.*\.(?:h5|hdf5|zarr)):(.*)$", text, flags=re.IGNORECASE)
        if match:
            inner = match.group(2)
            if dataset is not None and dataset.strip("/") != inner.strip("/"):
                raise ValueError(f"dataset={dataset!r} contradicts the dataset in the path {text!r}")
            return Path(match.group(1)), inner
    return Path(text), dataset


def cube_suffix(format: str) -> str:
    """The suffix :func:`write_cube` gives a cube of ``format`` (``"tiff"`` -> ``".tif"``).

    Examples
    --------
    >>> from ggrad_gpu.io import cube_suffix
    >>> [cube_suffix(fmt) for fmt in ("npy", "tiff", "envi", "hdf5")]
    ['.npy', '.tif', '.hdr', '.h5']
    """
    _check_format(format, allow_none=False)
    return next(suffix for suffix, fmt in CUBE_SUFFIXES.items() if fmt == format)


def _check_format(format, *, allow_none: bool = True) -> None:
    if not (format is None and allow_none) and format not in CUBE_FORMATS:
        raise ValueError(f"format must be one of {CUBE_FORMATS}; got {format!r}")


def _format_from_suffix(path: Path, *, for_reading: bool) -> str:
    suffix = path.suffix.lower()
    if suffix in CUBE_SUFFIXES:
        return CUBE_SUFFIXES[suffix]
    if for_reading and _envi_header(path) is not None:
        return "envi"
    supported = ", ".join(CUBE_SUFFIXES)
    raise ValueError(f"cannot tell the cube format of {path} from its suffix {path.suffix!r}; "
                     f"supported: {supported} (or pass format= one of {CUBE_FORMATS})")



def _band_centres(values, bands: int, name: str):
    """``values`` as a 1-D float64 array of length ``bands`` (None stays None)."""
    if values is None:
        return None
    try:
        centres = np.array(values, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be numbers; got {reprlib.repr(values)}") from None
    if centres.size != bands:
        raise ValueError(f"{name} must hold one value per band ({bands}); got {centres.size}")
    return centres


def _unit(value):
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if isinstance(value, np.ndarray):
        value = value.item()
        if isinstance(value, bytes):
            value = value.decode("utf-8")
    value = str(value).strip()
    return value or None


def _read_npy(path, dataset, lazy=False):
    return np.load(path, mmap_mode="r", allow_pickle=False), None, None, None


def _read_npz(path, dataset, lazy=False):
    with np.load(path, allow_pickle=False) as archive:
        names = list(archive.files)
        if dataset is None:
            shapes = {name: _npz_shape(archive, name) for name in names}
            dataset = _pick_dataset(shapes, path)
        elif dataset not in names:
            raise ValueError(f"dataset {dataset!r} is not in {path}; it holds {names}")
        data = archive[dataset]
        centres = next((archive[key] for key in _CENTRE_KEYS if key in names and key != dataset), None)
        unit = archive["band_unit"] if "band_unit" in names else None
    return data, centres, unit, dataset


def _npz_shape(archive, name):
    """The shape of one npz member, from its header (the data stay unread)."""
    with archive.zip.open(name + ".npy") as member:
        version = np.lib.format.read_magic(member)
        read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                else np.lib.format.read_array_header_2_0)
        return read(member)[0]


def _pick_dataset(shapes: dict, path) -> str:
    """``cube`` if present, else the only 3-D array; ``shapes`` maps names to shapes."""
    if "cube" in shapes:
        return "cube"
    candidates = [name for name, shape in shapes.items() if len(shape) == 3]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        found = ", ".join(f"{name} {tuple(shape)}" for name, shape in shapes.items()) or "nothing"
        raise ValueError(f"cube must be 3-D (rows, cols, bands); {path} holds no 3-D array "
                         f"(found: {found})")
    raise ValueError(f"{path} holds several 3-D arrays ({', '.join(candidates)}); choose one with dataset=")


def _read_tiff(path, dataset, lazy=False):
    tifffile = require("tifffile", "tifffile", "reading a TIFF cube")
    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        mappable = getattr(series, "dataoffset", None) is not None
        centres, unit = _tiff_metadata(tif)
        data = None if mappable else series.asarray()
    if data is None:
        data = tifffile.memmap(path, mode="r", series=0)
    while data.ndim > 3 and 1 in data.shape:  # e.g. an ImageJ stack's unused axes
        data = np.squeeze(data, axis=data.shape.index(1))
    return data, centres, unit, None


def _tiff_metadata(tif):
    """Band centres and unit from the JSON ImageDescription that :func:`write_cube` writes."""
    try:
        meta = json.loads(tif.pages[0].description)
    except (ValueError, TypeError, AttributeError, IndexError):
        return None, None
    if not isinstance(meta, dict):
        return None, None
    return meta.get("band_centres"), meta.get("band_unit")


def _envi_header(path: Path):
    """The ENVI header of ``path`` (itself if a ``.hdr``, else one beside it), or None."""
    if path.suffix.lower() == ".hdr":
        return path
    for header in (path.with_suffix(".hdr"), path.with_suffix(".HDR"), Path(f"{path}.hdr")):
        if header != path and header.is_file():
            return header
    return None


def _read_envi(path, dataset, lazy=False):
    envi = require("spectral.io.envi", "spectral", "reading an ENVI cube")
    header = _envi_header(path)
    if header is None or not header.is_file():
        raise FileNotFoundError(f"no ENVI header (.hdr) found for {path}")
    image = None if header == path else str(path)
    try:
        img = envi.open(str(header), image)
    except envi.EnviDataFileNotFoundError as exc:
        raise FileNotFoundError(f"the data file of the ENVI header {header} was not found beside it "
                                f"({exc})") from None
    try:
        try:
            data = img.open_memmap(writable=False)
        except Exception:  # noqa: BLE001 - e.g. a compressed file: read it instead
            data = np.asarray(img.load(dtype=np.dtype(img.dtype), scale=False))
    finally:
        fid = getattr(img, "fid", None)
        if fid is not None:
            fid.close()  # the memory map holds its own handle
    centres = img.metadata.get("wavelength")
    unit = img.metadata.get("wavelength units")
    if unit is not None:
        unit = _ENVI_TO_UNIT.get(unit.strip().lower(), unit.strip())
    return data, centres, unit, None


def _read_hdf5(path, dataset, lazy=False):
    h5py = require("h5py", "h5py", "reading an HDF5 cube")
    with h5py.File(path, "r") as file:
        if dataset is None:
            shapes = {}

            def visit(name, node):  # returning None keeps the walk going
                if isinstance(node, h5py.Dataset):
                    shapes[name] = node.shape

            file.visititems(visit)
            dataset = _pick_dataset(shapes, path)
        node = file.get(dataset)
        if not isinstance(node, h5py.Dataset):
            raise ValueError(f"dataset {dataset!r} is not an array in {path}")
        data = _HDF5Slices(str(path), node.name, node.shape, node.dtype) if lazy else node[()]
        dataset = node.name
        centres = _attr(node.attrs, _CENTRE_KEYS)
        if centres is None:
            centres = next((node.parent[key][()] for key in _CENTRE_KEYS
                            if isinstance(node.parent.get(key), h5py.Dataset)
                            and node.parent[key].ndim == 1), None)
        unit = _attr(node.attrs, ("band_unit",))
        if unit is None:
            unit = _attr(node.parent.attrs, ("band_unit",))
    return data, centres, unit, dataset


class _HDF5Slices:
    """An HDF5 dataset read slice by slice, the file opened for each read (picklable, for dask workers)."""

    def __init__(self, path, name, shape, dtype):
        self.path, self.name, self.shape, self.dtype, self.ndim = path, name, tuple(shape), np.dtype(dtype), len(shape)

    def __getitem__(self, key):
        import h5py

        with h5py.File(self.path, "r") as file:
            return file[self.name][key]

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self[()], dtype=dtype)


def _as_dask(data, band_axis: int):
    """``data`` (a memory map, Zarr array or HDF5 slices) as a dask array whose chunks hold every band."""
    from .._lazy.chunked import spatial_chunks

    da = require("dask.array", "dask", "reading a cube chunk by chunk")
    axis = band_axis % 3
    spatial = [n for i, n in enumerate(data.shape) if i != axis]
    rows, cols = spatial_chunks(tuple(spatial) + (data.shape[axis],), np.dtype(data.dtype).itemsize)
    chunks = [rows, cols]
    chunks.insert(axis, data.shape[axis])
    if type(data).__module__.startswith("zarr"):
        return da.from_zarr(data).rechunk({axis: -1})
    return da.from_array(data, chunks=tuple(chunks), asarray=True)


def _attr(attrs, keys):
    return next((attrs[key] for key in keys if key in attrs), None)


def _read_zarr(path, dataset, lazy=False):
    zarr = require("zarr", "zarr", "reading a Zarr cube")
    if path.is_dir() and not any((path / name).is_file() for name in ("zarr.json", ".zarray", ".zgroup")):
        raise ValueError(f"{path}: not a readable Zarr store: it holds no zarr.json, .zarray or .zgroup")
    root = zarr.open(store=str(path), mode="r")
    if isinstance(root, zarr.Group):
        arrays = dict(_zarr_arrays(root))
        if dataset is None:
            dataset = _pick_dataset({name: array.shape for name, array in arrays.items()}, path)
        dataset = dataset.strip("/")
        if dataset not in arrays:
            raise ValueError(f"dataset {dataset!r} is not an array in {path}; it holds {sorted(arrays)}")
        array = arrays[dataset]
        parent = dataset.rpartition("/")[0]
        siblings = {name.rpartition("/")[2]: a for name, a in arrays.items() if name.rpartition("/")[0] == parent}
        group = root[parent] if parent else root
    else:
        if dataset not in (None, "", "/"):
            raise ValueError(f"{path} is a single Zarr array; it has no dataset {dataset!r}")
        array, siblings, group, dataset = root, {}, None, None
    attrs = dict(array.attrs)
    centres = _attr(attrs, _CENTRE_KEYS)
    if centres is None:
        centres = next((siblings[key][...] for key in _CENTRE_KEYS
                        if key in siblings and len(siblings[key].shape) == 1), None)
    unit = _attr(attrs, ("band_unit",))
    if unit is None and group is not None:
        unit = _attr(dict(group.attrs), ("band_unit",))
    return array if lazy else np.asarray(array[...]), centres, unit, dataset


def _zarr_arrays(group, prefix=""):
    """Every array below a Zarr group, as ``(path, array)``."""
    for name, array in group.arrays():
        yield prefix + name, array
    for name, sub in group.groups():
        yield from _zarr_arrays(sub, prefix + name + "/")



# --------------------------------------------------------------------------- writing cubes


def write_cube(path, cube, *, band_centres=None, band_unit: str | None = None, format: str | None = None,
               overwrite: bool = False) -> Path:
    """Write a cube ``(rows, cols, bands)``, atomically.

    Parameters
    ----------
    path : path-like
        The file to create; its suffix picks the format unless ``format`` is
        given (see :data:`CUBE_SUFFIXES`). For ENVI, the header gets ``.hdr``
        and the data file ``.img`` (or the suffix given, if not ``.hdr``).
    cube : array, shape (rows, cols, bands)
        NumPy (or CuPy, copied to the host). Its dtype is kept, except that
        ENVI stores types it has no code for (bool, int8, float16) as float32.
    band_centres : sequence of float, shape (bands,), optional
    band_unit : str, optional
        E.g. ``"nm"``, ``"cm-1"``, ``"keV"``.
    format : {"npy", "npz", "tiff", "envi", "hdf5", "zarr"}, optional
    overwrite : bool
        Replace an existing file (or Zarr folder, or ENVI header and data).

    Returns
    -------
    pathlib.Path
        The file written (for ENVI, the header).

    Notes
    -----
    What is stored where, read back by :func:`read_cube`:

    - npy: the array only; ``band_centres`` and ``band_unit`` are **not**
      stored (use another format to keep them);
    - npz: arrays ``cube``, ``band_centres``, ``band_unit``;
    - tiff: one page per band, ``(bands, rows, cols)`` (BigTIFF past 4 GB),
      uncompressed so that it can be memory-mapped; band centres and unit in
      the JSON ImageDescription;
    - envi: BSQ, little-endian, with ``wavelength`` and ``wavelength units``
      (``"nm"`` written as ``Nanometers``, ``"um"`` as ``Micrometers``,
      ``"cm-1"`` as ``Wavenumber``; other units as given);
    - hdf5: dataset ``cube`` with attributes ``band_centres``, ``band_unit``;
    - zarr: an array at the store's root with those attributes.

    Every file is written under a temporary name and renamed into place once
    complete; on any error the temporary files are removed. The two ENVI
    files are renamed one after the other (data first, then the header).

    Examples
    --------
    >>> import os, tempfile
    >>> import numpy as np
    >>> from ggrad_gpu.io import read_cube, write_cube
    >>> path = write_cube(os.path.join(tempfile.mkdtemp(), "cube.npy"), np.zeros((4, 5, 3)))
    >>> path.name, read_cube(path).shape
    ('cube.npy', (4, 5, 3))
    """
    cube = to_host(cube)
    check_array(cube, "cube", (3,), "3-D (rows, cols, bands)")
    centres = None if band_centres is None else to_host(band_centres)
    centres = _band_centres(centres, cube.shape[2], "band_centres")
    if band_unit is not None and not isinstance(band_unit, str):
        raise TypeError(f"band_unit must be a string or None; got {band_unit!r}")
    _check_format(format)
    path = Path(path)
    fmt = format or _format_from_suffix(path, for_reading=False)
    saver = WRITERS[fmt]  # looked up per call: an entry replaced (e.g. to inject a fault) takes effect
    if fmt == "envi":
        data_file = path.with_suffix(".img") if path.suffix.lower() in (".hdr", "") else path
        targets = [data_file, data_file.with_suffix(".hdr")]
    else:
        targets = [path]
    with atomic_write_all(targets, overwrite=overwrite) as temps:
        saver(temps, cube, centres, band_unit)
    return targets[-1]


def _save_npy(temps, cube, centres, unit):
    with open(temps[0], "wb") as file:
        np.save(file, cube, allow_pickle=False)


def _save_npz(temps, cube, centres, unit):
    arrays = {"cube": cube}
    if centres is not None:
        arrays["band_centres"] = centres
    if unit is not None:
        arrays["band_unit"] = np.array(unit)
    with open(temps[0], "wb") as file:
        np.savez(file, **arrays)


def _save_tiff(temps, cube, centres, unit):
    tifffile = require("tifffile", "tifffile", "writing a TIFF cube")
    pages = np.ascontiguousarray(np.moveaxis(cube, -1, 0))
    metadata = {}
    if centres is not None:
        metadata["band_centres"] = centres.tolist()
    if unit is not None:
        metadata["band_unit"] = unit
    tifffile.imwrite(temps[0], pages, photometric="minisblack", metadata=metadata,
                     bigtiff=pages.nbytes > 2**32 - 2**25)


def _save_envi(temps, cube, centres, unit):
    envi = require("spectral.io.envi", "spectral", "writing an ENVI cube")
    data_file, header = temps
    dtype = cube.dtype.newbyteorder("=")
    if dtype not in _ENVI_DTYPES:
        dtype = np.dtype(np.float32)
    metadata = {}
    if centres is not None:
        metadata["wavelength"] = [float(value) for value in centres]
    if unit is not None:
        metadata["wavelength units"] = _UNIT_TO_ENVI.get(unit.strip().lower(), unit)
    envi.save_image(str(header), np.asarray(cube, dtype=dtype), dtype=dtype, interleave="bsq",
                    byteorder=0, ext=data_file.suffix, metadata=metadata, force=True)


def _save_hdf5(temps, cube, centres, unit):
    h5py = require("h5py", "h5py", "writing an HDF5 cube")
    with h5py.File(temps[0], "w") as file:
        dataset = file.create_dataset("cube", data=cube)
        if centres is not None:
            dataset.attrs["band_centres"] = centres
        if unit is not None:
            dataset.attrs["band_unit"] = unit


def _save_zarr(temps, cube, centres, unit):
    zarr = require("zarr", "zarr", "writing a Zarr cube")
    array = zarr.open_array(store=str(temps[0]), mode="w", shape=cube.shape, dtype=cube.dtype)
    array[...] = cube
    attrs = {}
    if centres is not None:
        attrs["band_centres"] = centres.tolist()
    if unit is not None:
        attrs["band_unit"] = unit
    if attrs:
        array.attrs.update(attrs)


#: The writer of each format: ``writer(temps, cube, centres, unit)`` fills the
#: temporary files ``temps`` (one, or ENVI's data and header) that
#: :func:`write_cube` then moves into place all or nothing.
WRITERS = {"npy": _save_npy, "npz": _save_npz, "tiff": _save_tiff, "envi": _save_envi,
           "hdf5": _save_hdf5, "zarr": _save_zarr}
