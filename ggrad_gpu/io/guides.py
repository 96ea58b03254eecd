"""Reading guide (brightfield, white-light) images as 2-D float32 arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .._validation import to_gray
from .libraries import reading, require

__all__ = ["GUIDE_SUFFIXES", "read_guide"]

GUIDE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".npy")


def read_guide(path) -> np.ndarray:
    """Read a guide (brightfield) image as a 2-D float32 array.

    Parameters
    ----------
    path : path-like
        PNG, JPEG or BMP (read with Pillow), TIFF (``tifffile``) or ``.npy``.

    Returns
    -------
    numpy.ndarray of float32, shape (rows, cols)
        Colour images become grayscale with the ITU-R BT.709 luma weights
        :data:`~ggrad_gpu.io.LUMA_WEIGHTS` (0.2125 R + 0.7154 G + 0.0721 B, as scikit-image's
        ``rgb2gray``); an alpha channel is dropped. Values are not rescaled:
        an 8-bit image gives 0 to 255 and a 16-bit one 0 to 65535 (unlike
        ``rgb2gray``, which first scales integers to [0, 1]); booleans give 0
        and 1. Integers above 2**24 are rounded to float32's precision.

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    ValueError
        For an unknown suffix, an image that is neither 2-D nor RGB(A), or a
        file that cannot be read (corrupt, truncated, or not of its format;
        the message starts with the file's path).
    ImportError
        If Pillow (PNG, JPEG, BMP) or tifffile (TIFF) is missing.

    Examples
    --------
    >>> import os, tempfile
    >>> import numpy as np
    >>> from ggrad_gpu.io import read_guide
    >>> path = os.path.join(tempfile.mkdtemp(), "guide.npy")
    >>> np.save(path, np.full((2, 3, 3), [100, 100, 100], dtype=np.uint8))
    >>> guide = read_guide(path)
    >>> guide.shape, guide.dtype, float(guide[0, 0])
    ((2, 3), dtype('float32'), 100.0)
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"guide image {path} does not exist")
    suffix = path.suffix.lower()
    if suffix not in GUIDE_SUFFIXES:
        raise ValueError(f"cannot tell the image format of guide {path} from its suffix "
                         f"{path.suffix!r}; supported: {', '.join(GUIDE_SUFFIXES)}")
    kind = {".npy": "npy file", ".tif": "TIFF image", ".tiff": "TIFF image"}.get(suffix, "image file")
    with reading(path, kind):
        if suffix == ".npy":
            image = np.load(path, allow_pickle=False)
        elif suffix in (".tif", ".tiff"):
            image = _read_tiff_image(path)
        else:
            image = _read_pillow_image(path)
    return _to_gray(image, path)


def _read_tiff_image(path):
    tifffile = require("tifffile", "tifffile", "reading a TIFF guide")
    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        image, axes = series.asarray(), series.axes
    if "S" in axes:  # colour samples, possibly stored planar: put them last
        image = np.moveaxis(image, axes.index("S"), -1)
    keep = tuple(i for i, n in enumerate(image.shape) if n != 1 or i >= image.ndim - 2)
    return image.reshape([image.shape[i] for i in keep])


def _read_pillow_image(path):
    image_module = require("PIL.Image", "pillow", "reading a PNG, JPEG or BMP guide")
    with image_module.open(path) as img:
        if img.mode in ("P", "PA"):
            img = img.convert("RGBA")
        elif img.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
            img = img.convert("RGB")
        return np.array(img)


def _to_gray(image, path) -> np.ndarray:
    # The conversion is shared with ``refine``'s colour guides (_validation.to_gray).
    image = to_gray(np.asarray(image), "guide", source=path, dtype=np.float32)
    return np.ascontiguousarray(image, dtype=np.float32)
