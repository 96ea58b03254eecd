"""Files in and out: cubes, guides, all-or-nothing writes, records and resumable stores (a leaf: it draws nothing).

Modules, one job each:

- :mod:`~ggrad_gpu.io.cubes`: read and write hyperspectral cubes (npy, npz,
  TIFF, ENVI, HDF5, Zarr); the table of formats and suffixes.
- :mod:`~ggrad_gpu.io.guides`: read guide (brightfield) images as 2-D float32.
- :mod:`~ggrad_gpu.io.atomic`: write a file, a set of files or a folder all
  or nothing, with Ctrl-C and SIGTERM held back while it is renamed into place;
  JSON.
- :mod:`~ggrad_gpu.io.records`: the content of ``transform.json`` and
  ``weights.json``, and reading a saved transform back.
- :mod:`~ggrad_gpu.io.resumable`: large stores written in place chunk by
  chunk, resumable, ``complete`` set last.
- :mod:`~ggrad_gpu.io.instruments`: instrument files read whole (Renishaw
  ``.wdf``, Agilent ``.dmt``): cube, band axis, white-light image and the
  initial transform from the stage metadata.
- :mod:`~ggrad_gpu.io.folders`: output folders of resumable commands: inputs kept
  out, another run's record found, outputs removed.
- :mod:`~ggrad_gpu.io.libraries`: the boundary with the optional format
  libraries (imported on demand; one error per unreadable file).

Every public name is available here, e.g. ``from ggrad_gpu.io import
read_cube, write_cube``. Nothing here imports CuPy or an optional format
library until a file needs it.
"""

from .._validation import LUMA_WEIGHTS
from .atomic import atomic_folder, atomic_write, atomic_write_all, write_figure, write_json
from .cubes import CUBE_FORMATS, CUBE_SUFFIXES, CubeData, cube_suffix, read_cube, split_dataset_path, write_cube
from .guides import GUIDE_SUFFIXES, read_guide
from .instruments import (
    INSTRUMENT_SUFFIXES,
    BandAxis,
    InstrumentFile,
    PlacedImage,
    is_instrument_file,
    read_instrument,
    stage_matrix,
)
from .records import CONVENTION, read_transform, transform_record, versions, weights_record
from .resumable import ResumableArray, file_signature, fingerprint

__all__ = [
    "CONVENTION",
    "CUBE_FORMATS",
    "CUBE_SUFFIXES",
    "GUIDE_SUFFIXES",
    "INSTRUMENT_SUFFIXES",
    "LUMA_WEIGHTS",
    "BandAxis",
    "CubeData",
    "InstrumentFile",
    "PlacedImage",
    "ResumableArray",
    "atomic_folder",
    "atomic_write",
    "atomic_write_all",
    "cube_suffix",
    "file_signature",
    "fingerprint",
    "is_instrument_file",
    "read_cube",
    "read_guide",
    "read_instrument",
    "read_transform",
    "split_dataset_path",
    "stage_matrix",
    "transform_record",
    "versions",
    "weights_record",
    "write_cube",
    "write_figure",
    "write_json",
]
