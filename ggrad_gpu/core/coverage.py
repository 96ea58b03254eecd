"""Coverage: which pixels of a grid hold data, and why the others do not.

A pixel may lack data for three reasons: it lies outside the cube's footprint,
the cube's value there is missing (NaN, inf, outside the user's ``mask``), or
the guide's is. Every stage treats such pixels the same way:

- for the filters (Sobel, pyramid blur), their values are *stand-ins*, filled
  from the nearest pixel with data (:func:`fill_gaps`), so no edge appears
  where the data stops, just as at the border of a grid (``mode="nearest"``);
- for the fits (eq. 5's Gram matrices, eq. 9's level weights, the
  registration metric) they do not count: at level 0 the pixel itself, at a
  coarser pyramid level every pixel whose blur draws more than half its weight
  from them (:func:`excluded_levels`), and on the level-0 grid every pixel
  that any level leaves out (:func:`valid_pixels`).

A footprint in the middle of a larger guide is then handled like one that
fills its grid: a stricter rule (every pixel whose blur reaches beyond the
footprint) would erode the data by the pyramid's reach at each level, about 28
level-0 pixels at four levels, and leaves nothing of a small map.
"""

from __future__ import annotations

from dataclasses import dataclass

from .._backend import array_module, ndimage_module
from .._lazy.chunked import fill_gaps_chunked, is_dask_array
from .pyramid import gaussian_pyramid

__all__ = ["Coverage", "NoDataError", "excluded_levels", "fill_gaps", "level_on_grid", "valid_pixels"]


class NoDataError(ValueError):
    """A coverage that leaves no pixel with data: there is nothing to estimate from.

    A ``ValueError``, so callers that validate input see one; the stages that
    try placements (the basins' fits) catch this class alone and score such a
    placement as fitting nothing.

    Examples
    --------
    >>> import numpy as np
    >>> from ggrad_gpu import estimate_global_gradient
    >>> nowhere = Coverage(footprint=np.zeros((16, 16), dtype=bool))
    >>> try:
    ...     estimate_global_gradient(np.ones((16, 16)), np.ones((16, 16, 2)), levels=1, coverage=nowhere)
    ... except NoDataError as error:
    ...     print(error)
    coverage leaves no pixel with data
    """


@dataclass(frozen=True)
class Coverage:
    """Where a grid holds data, split by cause.

    Attributes
    ----------
    footprint : array of bool, shape (rows, cols), or None
        Pixels inside the cube's footprint; None: all are.
    cube_missing : array of bool, shape (rows, cols), or None
        Pixels whose cube values are missing (filled in); None: none are.
    guide_missing : array of bool, shape (rows, cols), or None
        Pixels whose guide values are missing (filled in); None: none are.

    Examples
    --------
    >>> import numpy as np
    >>> coverage = Coverage(footprint=np.array([[True, True, False]]),
    ...                     guide_missing=np.array([[True, False, False]]))
    >>> coverage.cube_gaps  # outside the footprint
    array([[False, False,  True]])
    >>> coverage.gaps  # the cube's or the guide's
    array([[ True, False,  True]])
    >>> sorted(coverage.maps())
    ['footprint', 'guide_missing']
    >>> Coverage.of(None).gaps is None
    True
    """

    footprint: object = None
    cube_missing: object = None
    guide_missing: object = None

    @classmethod
    def of(cls, coverage) -> "Coverage":
        """``coverage`` as a Coverage: a Coverage, None, or a boolean map of pixels with data."""
        if coverage is None or isinstance(coverage, Coverage):
            return cls() if coverage is None else coverage
        return cls(footprint=coverage.astype(bool))

    @property
    def cube_gaps(self):
        """Pixels without cube data (outside the footprint or missing), or None."""
        outside = None if self.footprint is None else ~self.footprint
        return either(outside, self.cube_missing)

    @property
    def gaps(self):
        """Pixels where the cube or the guide lacks data, or None where every pixel has both."""
        return either(self.cube_gaps, self.guide_missing)

    def maps(self):
        """The maps that are set, by name."""
        return {name: value for name, value in vars(self).items() if value is not None}


def either(a, b):
    """``a | b`` where either may be None (nothing marked).

    Examples
    --------
    >>> import numpy as np
    >>> either(None, None) is None
    True
    >>> either(np.array([True, False, False]), np.array([False, False, True]))
    array([ True, False,  True])
    """
    if a is None or b is None:
        return b if a is None else a
    return a | b


def fill_gaps(values, gaps):
    """``values`` with every pixel in ``gaps`` set to the value of the nearest pixel outside it.

    Parameters
    ----------
    values : array, shape (rows, cols[, bands])
        NumPy or CuPy; values inside ``gaps`` may be anything (NaN included).
    gaps : array of bool, shape (rows, cols)
        Pixels to fill; at least one pixel must be outside it.

    Returns
    -------
    array
        A new array (``values`` is never modified). The nearest pixel is the
        Euclidean one (``distance_transform_edt``), all bands taken from it in
        one gather: like ``mode="nearest"`` at a grid's edge, the extension
        adds no edge where the data stops.

    Examples
    --------
    >>> import numpy as np
    >>> values = np.array([[1.0, np.nan, 3.0]])
    >>> fill_gaps(values, np.isnan(values))
    array([[1., 1., 3.]])
    """
    xp = array_module(values=values, gaps=gaps)
    if not bool(gaps.any()):
        return values.copy()
    if bool(gaps.all()):
        raise ValueError("fill_gaps needs at least one pixel with data (gaps covers every pixel)")
    if is_dask_array(values):
        return fill_gaps_chunked(values, gaps)
    ndi = ndimage_module(xp)
    nearest = ndi.distance_transform_edt(gaps, return_distances=False, return_indices=True)
    return values[nearest[0], nearest[1]]


def excluded_levels(gaps, levels: int, *, share: float = 0.5) -> list:
    """Per pyramid level, the pixels left out of the fits for the gaps in their data.

    Level 0: the gaps themselves. Level ``k``: the pixels whose pyramid blur
    (the data's ``blur_decimate``) draws more than ``share`` of its weight
    (default half) from gaps. Entries are None where ``gaps`` is None.

    Examples
    --------
    >>> import numpy as np
    >>> gaps = np.zeros((16, 16), bool); gaps[:, :8] = True  # no data in the left half
    >>> excluded = excluded_levels(gaps, 3)
    >>> excluded[0] is gaps, [level.shape for level in excluded[1:]]
    (True, [(8, 8), (4, 4)])
    >>> excluded[1][0].astype(int)  # more than half of the blur's weight from the gaps
    array([1, 1, 1, 1, 0, 0, 0, 0])
    >>> excluded_levels(None, 2)
    [None, None]
    """
    if gaps is None:
        return [None] * levels
    xp = array_module(gaps=gaps)
    fractions = gaussian_pyramid(gaps.astype(xp.float32), levels)
    return [gaps] + [fraction > share for fraction in fractions[1:]]


def level_on_grid(excluded, level: int, shape):
    """A level-``k`` map of excluded pixels on the level-0 grid ``shape``.

    Level-0 pixel ``p`` sits at level coordinate ``p / 2**k``, between level
    pixels ``floor`` and ``floor + 1``: it is excluded if either is.

    Examples
    --------
    >>> import numpy as np
    >>> excluded = np.array([[False, True], [False, False]])  # level 1
    >>> level_on_grid(excluded, 1, (4, 4)).astype(int)
    array([[1, 1, 1, 1],
           [1, 1, 1, 1],
           [0, 0, 0, 0],
           [0, 0, 0, 0]])
    """
    if level == 0:
        return excluded
    xp = array_module(excluded=excluded)
    reach = excluded.copy()
    reach[:-1] |= excluded[1:]
    reach[:, :-1] |= reach[:, 1:].copy()
    rows = xp.minimum(xp.arange(shape[0]) >> level, excluded.shape[0] - 1)
    cols = xp.minimum(xp.arange(shape[1]) >> level, excluded.shape[1] - 1)
    return reach[rows[:, None], cols[None, :]]


def valid_pixels(gaps, levels: int, shape, *, share: float = 0.5):
    """Level-0 pixels that no level of ``levels`` leaves out for ``gaps`` (None if there are none).

    ``share`` as in :func:`excluded_levels`.

    Examples
    --------
    >>> import numpy as np
    >>> gaps = np.zeros((16, 16), bool); gaps[:, :5] = True
    >>> valid = valid_pixels(gaps, 2, (16, 16))
    >>> bool((valid & gaps).any())  # a gap is never valid
    False
    >>> valid[0].astype(int)  # level 1 also leaves out column 5, next to the gaps
    array([0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1])
    """
    if gaps is None:
        return None
    valid = ~gaps
    for k, excluded in enumerate(excluded_levels(gaps, levels, share=share)[1:], start=1):
        valid &= ~level_on_grid(excluded, k, shape)
    return valid
