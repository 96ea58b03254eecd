"""Input checks shared by the public functions.

Every check names the parameter and shows what was wrong, e.g.
``cube must be 3-D (rows, cols, bands); got shape (70, 70)``.

What can be used is converted, not refused: integer, boolean, float16 and
byte-swapped (big-endian) arrays compute in native float32, float64 stays
float64 (:func:`float_dtype`), and colour guides become grayscale
(:func:`to_gray`). What cannot be used (complex values, empty arrays, shapes
that do not match, images too small for the pyramid) raises ``TypeError`` or
``ValueError`` naming the parameter.
"""

from __future__ import annotations

import numbers

import numpy as np

#: ITU-R BT.709 luma weights for R, G, B (as scikit-image's ``rgb2gray``).
LUMA_WEIGHTS = (0.2125, 0.7154, 0.0721)
GRAY_LAYOUT = "2-D (rows, cols) or RGB(A) (rows, cols, 3 or 4)"


def float_dtype(dtype) -> np.dtype:
    """The floating type a computation on ``dtype`` runs in, in native byte order.

    float64 (either byte order) stays float64; everything else real (float16,
    float32, integers, booleans) computes in float32, which halves memory
    traffic against float64.

    Raises
    ------
    TypeError
        For complex or non-numeric dtypes.

    Examples
    --------
    >>> [str(float_dtype(t)) for t in (np.float64, ">f8", np.float16, np.int64, bool)]
    ['float64', 'float64', 'float32', 'float32', 'float32']
    >>> float_dtype(np.complex64)
    Traceback (most recent call last):
        ...
    TypeError: complex input is not supported; got dtype complex64
    """
    dtype = np.dtype(dtype)
    if dtype.kind == "c":
        raise TypeError(f"complex input is not supported; got dtype {dtype}")
    if dtype.kind not in "biuf":
        raise TypeError(f"input must have a real numeric dtype; got {dtype}")
    return np.dtype(np.float64) if dtype.kind == "f" and dtype.itemsize >= 8 else np.dtype(np.float32)


def check_array(x, name: str, ndims: tuple[int, ...], layout: str, *, min_size: int = 1):
    """Check that ``x`` is a real NumPy or CuPy array with one of ``ndims`` dims.

    ``min_size`` is the least number of pixels along each of the first two
    (spatial) axes; every other axis must not be empty.

    Examples
    --------
    >>> check_array(np.zeros((70, 70, 5)), "cube", (3,), "3-D (rows, cols, bands)").shape
    (70, 70, 5)
    >>> check_array(np.zeros((70, 70)), "cube", (3,), "3-D (rows, cols, bands)")
    Traceback (most recent call last):
        ...
    ValueError: cube must be 3-D (rows, cols, bands); got shape (70, 70)
    """
    if not hasattr(x, "shape") or not hasattr(x, "dtype") or not hasattr(x, "ndim"):
        raise TypeError(f"{name} must be a NumPy or CuPy array; got {type(x).__name__}")
    if x.ndim not in ndims:
        raise ValueError(f"{name} must be {layout}; got shape {tuple(x.shape)}")
    if x.dtype.kind == "c":
        raise TypeError(f"{name} must be real; got dtype {x.dtype}")
    if x.dtype.kind not in "biuf":
        raise TypeError(f"{name} must have a numeric dtype; got {x.dtype}")
    if x.ndim and min(x.shape) < 1:
        raise ValueError(f"{name} must not be empty; got shape {tuple(x.shape)}")
    if min_size > 1 and min(x.shape[:2]) < min_size:
        raise ValueError(
            f"{name} must be at least {min_size} x {min_size} pixels; got shape {tuple(x.shape)}"
        )
    return x


def check_band_axis(band_axis, *, allow_none: bool = False):
    """``band_axis`` as an axis 0, 1 or 2 of a 3-D cube (or None where ``allow_none``).

    Raises TypeError for a non-integer (booleans included) and ValueError,
    naming ``band_axis``, for an axis outside -3 .. 2.

    Examples
    --------
    >>> check_band_axis(-1), check_band_axis(0), check_band_axis(None, allow_none=True)
    (2, 0, None)
    >>> check_band_axis(3)
    Traceback (most recent call last):
        ...
    ValueError: band_axis must be an axis of a 3-D cube (-3 to 2); got 3
    """
    if band_axis is None and allow_none:
        return None
    if isinstance(band_axis, bool) or not isinstance(band_axis, numbers.Integral):
        kind = "an integer or None" if allow_none else "an integer"
        raise TypeError(f"band_axis must be {kind}; got {band_axis!r}")
    if not -3 <= band_axis <= 2:
        raise ValueError(f"band_axis must be an axis of a 3-D cube (-3 to 2); got {band_axis}")
    return int(band_axis) % 3


def check_mask(mask, name: str, shape, xp=None):
    """Check a boolean pixel mask of ``shape`` (rows, cols); return it as bool.

    Accepts boolean arrays and 0/1 numeric ones (nonzero = True); refuses
    other shapes and non-arrays, naming ``name``.

    Examples
    --------
    >>> check_mask(np.array([[0, 1], [2, 0]]), "mask", (2, 2))  # nonzero is True
    array([[False,  True],
           [ True, False]])
    >>> check_mask(np.ones((2, 3), bool), "mask", (2, 2))
    Traceback (most recent call last):
        ...
    ValueError: mask must have shape (2, 2); got (2, 3)
    """
    check_array(mask, name, (2,), "2-D (rows, cols)")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}; got {tuple(mask.shape)}")
    return mask if mask.dtype == np.bool_ else mask.astype(bool)


def check_matrix(matrix, name: str) -> np.ndarray:
    """``matrix`` as a float64 NumPy array, checked to be a finite 3 x 3 transform.

    A private copy: a caller's matrix is never modified through it.

    Examples
    --------
    >>> matrix = np.eye(3)
    >>> checked = check_matrix(matrix, "initial")
    >>> checked.dtype, checked is matrix  # a private copy
    (dtype('float64'), False)
    >>> check_matrix(np.eye(2), "initial")
    Traceback (most recent call last):
        ...
    ValueError: initial must be a finite 3x3 matrix; got shape (2, 2)
    """
    try:
        matrix = np.array(matrix, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a finite 3x3 matrix; got {matrix!r}") from None
    if matrix.shape != (3, 3) or not np.isfinite(matrix).all():
        raise ValueError(f"{name} must be a finite 3x3 matrix; got shape {matrix.shape}")
    return matrix


def check_affine(matrix, name: str) -> np.ndarray:
    """:func:`check_matrix`, and the matrix must be affine (last row ``0, 0, 1``) and invertible.

    Examples
    --------
    >>> check_affine(np.diag([2.0, 0.5, 1.0]), "initial")[:2, :2].tolist()
    [[2.0, 0.0], [0.0, 0.5]]
    >>> check_affine(np.diag([1.0, 0.0, 1.0]), "initial")
    Traceback (most recent call last):
        ...
    ValueError: initial must be invertible (its 2 x 2 linear part has determinant 0)
    >>> check_affine([[1, 0, 0], [0, 1, 0], [0.1, 0, 1]], "initial")
    Traceback (most recent call last):
        ...
    ValueError: initial must be affine, with last row (0, 0, 1); got [0.1, 0.0, 1.0]
    """
    matrix = check_matrix(matrix, name)
    det = float(np.linalg.det(matrix[:2, :2]))
    scale = float(np.abs(matrix[:2, :2]).max())
    if not abs(det) > 1e-12 * max(scale * scale, np.finfo(np.float64).tiny):
        raise ValueError(f"{name} must be invertible (its 2 x 2 linear part has determinant {det:g})")
    if not np.allclose(matrix[2], (0.0, 0.0, 1.0), rtol=0.0, atol=1e-9):
        raise ValueError(f"{name} must be affine, with last row (0, 0, 1); got {matrix[2].tolist()}")
    return matrix


def check_finite(x, name: str, xp) -> None:
    """Raise if ``x`` holds NaN or inf.

    ``min`` and ``max`` propagate NaN and reach inf, so two streaming
    reductions decide it without a full-size boolean temporary.

    Examples
    --------
    >>> check_finite(np.ones(3), "guide", np) is None
    True
    >>> check_finite(np.array([1.0, np.nan]), "guide", np)
    Traceback (most recent call last):
        ...
    ValueError: guide contains NaN or inf values
    """
    if x.dtype.kind == "f" and not all_finite(x, xp):
        raise ValueError(f"{name} contains NaN or inf values")


def all_finite(x, xp) -> bool:
    """Whether a real array holds no NaN or inf (two reductions, no full-size temporary).

    A dask array is read once: both reductions are computed by the one ``bool``.

    Examples
    --------
    >>> all_finite(np.array([1.0, np.inf]), np), all_finite(np.array([1.0, 2.0]), np), all_finite(np.arange(3), np)
    (False, True, True)
    """
    if x.dtype.kind != "f":
        return True
    return bool(xp.isfinite(x.min()) & xp.isfinite(x.max()))


def check_levels(levels, shape, name: str = "levels", *, image: str | None = None) -> int:
    """Check the number of pyramid levels for an image of ``shape`` (rows, cols).

    The error for too many levels gives the most the image allows. With
    ``image`` (the image's parameter name), an image too small for any
    pyramid (under 3 x 3 pixels) is reported under that name.

    Examples
    --------
    >>> check_levels(3, (40, 30))
    3
    >>> check_levels(5, (40, 30))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
        ...
    ValueError: levels=5 is too many for an image of 40 x 30 pixels: ... (at most 4 levels)
    """
    if isinstance(levels, bool) or not isinstance(levels, numbers.Integral):
        raise TypeError(f"{name} must be an integer; got {levels!r}")
    levels = int(levels)
    if levels < 1:
        raise ValueError(f"{name} must be at least 1; got {levels}")
    maximum = max_levels(shape)
    if maximum == 0 and image is not None:
        raise ValueError(
            f"{image} must be at least 3 x 3 pixels for a pyramid; got {shape[0]} x {shape[1]}"
        )
    if levels > maximum:
        raise ValueError(
            f"{name}={levels} is too many for an image of {shape[0]} x {shape[1]} pixels: "
            f"the coarsest level would be smaller than 3 x 3 (at most {maximum} levels)"
        )
    return levels


def power_of_two_scale(peak, *, limit: float = 2.0**30) -> float:
    """A power of two that brings a magnitude ``peak`` near 1, or 1.0 where it is already within ``limit``.

    Multiplying by a power of two is exact, so computations whose result does
    not depend on a common scale (a least-squares minimiser, normalised
    weights) give the same bits, without the overflow of squaring 1e30 in
    float32 or the underflow of squaring 1e-30.

    Examples
    --------
    >>> scale = power_of_two_scale(1e30)
    >>> float(np.log2(scale)), 1e30 * scale  # exactly 2**-100: the product is near 1
    (-100.0, 0.7888609052210118)
    >>> power_of_two_scale(5.0)  # already within the limit
    1.0
    """
    peak = float(peak)
    if not (np.isfinite(peak) and peak > 0) or 1.0 / limit <= peak <= limit:
        return 1.0
    return float(2.0 ** -round(np.log2(peak)))


def max_levels(shape) -> int:
    """The most pyramid levels whose coarsest level is still at least 3 x 3 (0 if none).

    Examples
    --------
    >>> max_levels((40, 30))  # 30, 15, 8, 4 pixels across; the next (2) is too small
    4
    >>> max_levels((2, 100))
    0
    """
    size, levels = min(shape[:2]), 0
    while size >= 3:
        levels += 1
        size = (size + 1) // 2
    return levels


def to_gray(image, name: str = "guide", *, source=None, dtype=None):
    """A 2-D image from a gray, gray + alpha, RGB or RGBA one.

    Parameters
    ----------
    image : array, shape (rows, cols) or (rows, cols, channels)
        NumPy or CuPy. One channel is gray, two are gray and alpha, three RGB
        and four RGBA.
    name : str
        The parameter's name, for errors.
    source : optional
        Where the image came from (e.g. a path), appended to a shape error.
    dtype : optional
        Precision of the colour conversion; default :func:`float_dtype` of
        the image's.

    Returns
    -------
    array, shape (rows, cols)
        A 2-D input as it is (not cast); the first channel of gray (+ alpha);
        for colour, ``0.2125 R + 0.7154 G + 0.0721 B`` (:data:`LUMA_WEIGHTS`,
        ITU-R BT.709 as scikit-image's ``rgb2gray``, without its rescaling of
        integers), the alpha channel dropped.

    Raises
    ------
    ValueError
        Naming ``name`` for any other shape (e.g. more than 4 channels).
    TypeError
        Naming ``name`` for complex or non-numeric values.

    Examples
    --------
    >>> import numpy as np
    >>> from ggrad_gpu._validation import to_gray
    >>> to_gray(np.full((1, 2, 4), [100, 100, 100, 255], dtype=np.uint8))
    array([[100., 100.]], dtype=float32)
    """
    where = "" if source is None else f" from {source}"
    if getattr(image, "ndim", None) == 3 and image.shape[-1] in (1, 2):  # gray, gray + alpha
        image = image[..., 0]
    if getattr(image, "ndim", None) == 3 and image.shape[-1] in (3, 4):
        check_array(image, name, (3,), GRAY_LAYOUT)
        dtype = float_dtype(image.dtype) if dtype is None else np.dtype(dtype)
        rgb = image[..., :3].astype(dtype)
        red, green, blue = (dtype.type(w) for w in LUMA_WEIGHTS)
        image = red * rgb[..., 0] + green * rgb[..., 1] + blue * rgb[..., 2]
    if getattr(image, "ndim", None) is not None and image.ndim != 2:
        raise ValueError(f"{name} must be {GRAY_LAYOUT}; got shape {tuple(image.shape)}{where}")
    check_array(image, name, (2,), GRAY_LAYOUT)
    return image
