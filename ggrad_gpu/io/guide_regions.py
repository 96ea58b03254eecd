"""A large guide read by region: Zarr arrays, TIFF through ``tifffile``'s Zarr view, memory-mapped npy.

``ggrad mosaic`` has each tile's task read the tile's region of the guide
when it starts; with :func:`open_guide_regions` only those regions are read,
never the whole slide-wide image, and a guide read from a file travels to a
worker process as its path (pickled), not as its pixels. Formats without random access (PNG, JPEG) are read
whole, as :func:`ggrad_gpu.io.read_guide` does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .._validation import to_gray
from .guides import read_guide
from .libraries import reading, require

__all__ = ["GuideRegions", "open_guide_regions"]


class GuideRegions:
    """A guide whose regions are read on demand, as 2-D float32 (colour becomes grayscale).

    Attributes
    ----------
    shape : (int, int)
        The guide's rows and columns.

    Examples
    --------
    >>> import numpy as np
    >>> from ggrad_gpu.io.guide_regions import GuideRegions
    >>> guide = GuideRegions(np.arange(24, dtype=np.uint8).reshape(4, 6), "guide.npy")
    >>> guide.shape, guide[1:3, 2:4].tolist()
    ((4, 6), [[8.0, 9.0], [14.0, 15.0]])
    """

    def __reduce__(self):
        # A file-backed guide (memory-mapped npy, Zarr, TIFF) is opened again
        # where it is unpickled: pickling a memmap would copy every pixel.
        if isinstance(self.array, np.ndarray) and not isinstance(self.array, np.memmap):
            return GuideRegions, (self.array, self.path)
        return open_guide_regions, (self.path,)

    def __init__(self, array, path):
        self.array, self.path = array, Path(path)
        if len(array.shape) not in (2, 3) or (len(array.shape) == 3 and array.shape[2] not in (3, 4)):
            raise ValueError(f"guide {path} must be 2-D or RGB(A); got shape {tuple(array.shape)}")
        self.shape = tuple(int(n) for n in array.shape[:2])
        self.ndim = 2

    def __getitem__(self, key):
        if not isinstance(key, tuple) or len(key) != 2 or not all(isinstance(k, slice) for k in key):
            raise TypeError(f"a guide region is two slices (rows, cols); got {key!r}")
        with reading(self.path, "guide image"):
            region = np.asarray(self.array[key])
        return np.ascontiguousarray(to_gray(region, "guide", source=self.path, dtype=np.float32), dtype=np.float32)

    def __array__(self, dtype=None, copy=None):
        whole = self[:, :]
        return whole if dtype is None else whole.astype(dtype)


def open_guide_regions(path):
    """The guide at ``path`` as a :class:`GuideRegions` where its format reads by region, else an array.

    ``.zarr`` (an array), ``.tif``/``.tiff`` (the first series, rows x cols
    or rows x cols x samples, through ``tifffile``'s Zarr store) and ``.npy``
    (memory-mapped) are read by region; other images whole with
    :func:`ggrad_gpu.io.read_guide`.

    Examples
    --------
    >>> import tempfile
    >>> folder = tempfile.TemporaryDirectory()
    >>> guide = np.arange(48, dtype=np.float32).reshape(6, 8)
    >>> np.save(Path(folder.name) / "guide.npy", guide)
    >>> regions = open_guide_regions(Path(folder.name) / "guide.npy")  # memory-mapped: read by region
    >>> isinstance(regions, GuideRegions), regions.shape, bool(np.array_equal(regions[2:4, 1:5], guide[2:4, 1:5]))
    (True, (6, 8), True)
    >>> import pickle
    >>> len(pickle.dumps(regions)) < guide.nbytes  # to a worker process as its path, not its pixels
    True
    >>> bool(np.array_equal(pickle.loads(pickle.dumps(regions))[2:4, 1:5], guide[2:4, 1:5]))
    True
    >>> del regions; folder.cleanup()
    >>> open_guide_regions(Path(folder.name) / "guide.npy")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
        ...
    FileNotFoundError: guide image .../guide.npy does not exist
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"guide image {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        with reading(path, "npy file"):
            return GuideRegions(np.load(path, mmap_mode="r", allow_pickle=False), path)
    if suffix == ".zarr":
        zarr = require("zarr", "zarr", "reading a Zarr guide")
        with reading(path, "Zarr array"):
            return GuideRegions(zarr.open_array(str(path), mode="r"), path)
    if suffix in (".tif", ".tiff"):
        tifffile = require("tifffile", "tifffile", "reading a TIFF guide")
        zarr = require("zarr", "zarr", "reading a TIFF guide by region")
        with reading(path, "TIFF image"):
            with tifffile.TiffFile(path) as tif:
                axes = tif.series[0].axes
            if axes in ("YX", "YXS"):
                return GuideRegions(zarr.open_array(tifffile.imread(path, aszarr=True), mode="r"), path)
    return read_guide(path)
