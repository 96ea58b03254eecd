"""``refine``'s options: defined once, checked once, before any work, and held in one frozen object.

:class:`RefineOptions` is the one list of ``refine``'s choices: its fields are
``refine``'s keywords (the tests hold the two equal, defaults included, and
each documented in ``refine``'s docstring), each field names the ``ggrad
refine`` flag that sets it or says why none does, and :func:`resume_settings`
gives the choices a resumable run's fingerprint holds.
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass, field, fields

import numpy as np

from .._backend import array_module
from .._lazy.chunked import is_dask_array
from .._validation import GRAY_LAYOUT, check_affine, check_array, check_band_axis, check_mask, max_levels
from ..core.geometry import WorkingGrid, auto_levels, fov_matrix, working_grid
from ..core.level_weights import manual_level_weights

__all__ = ["METHODS", "OUTPUT_GRIDS", "RefineOptions", "bands_first_hint", "check_inputs", "check_placement",
           "parse_bytes", "resolve_levels", "resume_settings"]

METHODS = ("gradient", "band_sum", "band_std", "pca")
OUTPUT_GRIDS = ("working", "guide", "cube")


def _option(default, *, flag: str | None = None, no_flag: str = "", resume: bool = True):
    """A field of :class:`RefineOptions`.

    ``flag``: the ``ggrad refine`` flag that sets it (its argparse ``dest`` is
    the field's name, but for ``weights``: ``--alpha`` and ``--beta``), or
    ``no_flag``: why the command has none. ``resume``: whether a resumable
    run's fingerprint holds it (a rerun that changes it starts afresh).
    """
    if (flag is None) == (not no_flag):
        raise ValueError("an option has a flag or says why it has none")
    return field(default=default, metadata={"flag": flag, "no_flag": no_flag, "resume": resume})


_STUDY = "a choice for studies of the method (Python API); ggrad refine uses the default"


@dataclass(frozen=True)
class RefineOptions:
    """The choices of :func:`ggrad_gpu.refine`, one field per keyword (see its docstring for each).

    Examples
    --------
    >>> options = RefineOptions(levels=3, order=3, memory_limit="1GiB")
    >>> options.levels, options.memory_limit, options.auto_weights
    (3, 1073741824, True)
    >>> RefineOptions(order=2)
    Traceback (most recent call last):
        ...
    ValueError: order must be 1 or 3; got 2
    >>> sorted(options.keywords())[:3]  # refine(guide, cube, **options.keywords())
    ['absorbance', 'backend', 'band_axis']
    """

    levels: object = _option("auto", flag="--levels")
    weights: object = _option("auto", flag="--alpha")
    output_grid: str = _option("working", flag="--output-grid")
    method: str = _option("gradient", no_flag="ggrad demo compares the methods; ggrad refine uses the gradient")
    reestimate: bool = _option(True, no_flag=_STUDY)
    screen_bands: bool = _option(True, no_flag=_STUDY)
    order: int = _option(1, no_flag=_STUDY)
    psf_sigma: float | None = _option(0.5, no_flag=_STUDY)
    absorbance: bool = _option(True, flag="--no-absorbance")
    memory_limit: object = _option(None, flag="--memory-limit", resume=False)  # a rerun may change it
    denoise: bool = _option(True, flag="--no-denoise")
    normalise: bool = _option(True, flag="--no-normalise")
    backend: str = _option("auto", flag="--backend")
    working_shape: object = _option(None, flag="--working-shape")
    band_axis: int = _option(-1, no_flag="ggrad refine's --band-axis is the reader's: the cube reaches refine "
                                         "bands last")
    check: bool = _option(False, flag="--check")

    def __post_init__(self):
        object.__setattr__(self, "memory_limit", parse_bytes(self.memory_limit, "memory_limit"))
        for name in ("denoise", "normalise"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False; got {getattr(self, name)!r}")
        if not isinstance(self.check, bool):
            raise TypeError(f"check must be True or False; got {self.check!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}; got {self.method!r}")
        if self.output_grid not in OUTPUT_GRIDS:
            raise ValueError(f"output_grid must be one of {OUTPUT_GRIDS}; got {self.output_grid!r}")
        if isinstance(self.order, bool) or not isinstance(self.order, numbers.Integral) or self.order not in (1, 3):
            raise ValueError(f"order must be 1 or 3; got {self.order!r}")
        sigma = self.psf_sigma
        if sigma is not None and (
            isinstance(sigma, bool) or not isinstance(sigma, numbers.Real) or not math.isfinite(sigma) or sigma < 0
        ):
            raise ValueError(f"psf_sigma must be None or a finite number >= 0; got {sigma!r}")
        levels = self.levels
        if not (isinstance(levels, str) and levels == "auto"):
            if isinstance(levels, bool) or not isinstance(levels, numbers.Integral):
                raise TypeError(f"levels must be an integer or 'auto'; got {levels!r}")
            if levels < 1:
                raise ValueError(f"levels must be at least 1; got {levels}")
            object.__setattr__(self, "levels", int(levels))
        if not self.auto_weights:
            count = self.levels if isinstance(self.levels, int) else _first_length(self.weights)
            manual_level_weights(self.weights, count)  # raises, naming weights

    @property
    def auto_weights(self) -> bool:
        return isinstance(self.weights, str) and self.weights == "auto"

    @classmethod
    def from_arguments(cls, arguments: dict) -> RefineOptions:
        """The options from a mapping that holds every field (``refine``'s ``locals()``); a missing one is an error.

        Examples
        --------
        >>> RefineOptions.from_arguments({**RefineOptions().keywords(), "levels": 2, "guide": None}).levels
        2
        """
        return cls(**{option.name: arguments[option.name] for option in fields(cls)})

    def keywords(self) -> dict:
        """``{name: value}`` of every field: ``refine``'s keyword arguments.

        Examples
        --------
        >>> RefineOptions(levels=2).keywords()["levels"]
        2
        """
        return {option.name: getattr(self, option.name) for option in fields(self)}


def resume_settings(options: RefineOptions) -> dict:
    """The choices that a resumable run's fingerprint holds: every field but those marked ``resume=False``.

    Examples
    --------
    >>> settings = resume_settings(RefineOptions(denoise=False))
    >>> settings["denoise"], "memory_limit" in settings
    (False, False)
    """
    return {option.name: getattr(options, option.name) for option in fields(options) if option.metadata["resume"]}


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value, name: str = "memory_limit"):
    """A byte count from an integer or a string such as ``"4GB"``, ``"512 MiB"`` or ``"1e9"`` (None stays None).

    Examples
    --------
    >>> parse_bytes("4GB"), parse_bytes("512MiB"), parse_bytes(1000), parse_bytes(None)
    (4000000000, 536870912, 1000, None)
    """
    if value is None:
        return None
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        number = int(value)
    elif isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", value)
        unit = match.group(2).lower() if match else None
        try:
            number = int(float(match.group(1)) * _UNITS[unit]) if match else None
        except (KeyError, ValueError):
            number = None
        if number is None:
            raise ValueError(f"{name} must be a byte count such as 4GB or 512MiB; got {value!r}")
    else:
        raise TypeError(f"{name} must be an integer or a string such as '4GB'; got {value!r}")
    if number <= 0:
        raise ValueError(f"{name} must be positive; got {value!r}")
    return number


def _first_length(weights) -> int:
    """The length of manual weights' first sequence (1 where there is none: the check then says why)."""
    try:
        return max(1, len(weights[0]))
    except (TypeError, IndexError, KeyError):
        return 1


def check_inputs(guide, cube, band_axis):
    """Check ``guide`` and ``cube`` (before ``band_axis`` moves), naming them; the cube, bands last (a view).

    Examples
    --------
    >>> import numpy as np
    >>> check_inputs(np.zeros((20, 30)), np.zeros((5, 10, 15)), band_axis=0).shape  # bands moved last
    (10, 15, 5)
    >>> check_inputs(np.zeros((20, 30)), np.zeros((10, 15)), band_axis=2)
    Traceback (most recent call last):
        ...
    ValueError: cube must be 3-D (rows, cols, bands); got shape (10, 15) (a single band? pass cube[..., None])
    """
    check_array(guide, "guide", (2, 3), GRAY_LAYOUT)
    if guide.ndim == 3 and guide.shape[2] > 4:
        raise ValueError(
            f"guide must be {GRAY_LAYOUT}; got shape {tuple(guide.shape)} "
            f"({guide.shape[2]} channels; is it a cube?)"
        )
    band_axis = check_band_axis(band_axis)
    if getattr(cube, "ndim", None) == 2 and hasattr(cube, "dtype"):
        raise ValueError(
            f"cube must be 3-D (rows, cols, bands); got shape {tuple(cube.shape)} "
            "(a single band? pass cube[..., None])"
        )
    check_array(cube, "cube", (3,), "3-D (rows, cols, bands)")
    return cube if band_axis == 2 else array_module(cube=cube).moveaxis(cube, band_axis, -1)


# Bytes per working-grid pixel that refine's in-memory steps hold at their peak
# (the guide and its levels, the estimate's level images, the registration's
# pyramids; its evaluations run in row blocks): 192 measured with tracemalloc
# on a 1024 x 1024 working grid (2026-11-30). A streamed cube's working grid
# is coarsened until its 2-D steps fit half the memory limit.
WORKING_BYTES_PER_PIXEL = 200


def check_placement(guide_shape, cube, initial, mask, working_shape, memory_limit=None):
    """The initial matrix (default: the cube spans the guide), the mask and the working grid, checked.

    For a dask cube with a ``memory_limit``, the working grid is coarsened
    (where it must be) so that its 2-D steps fit the limit.

    Examples
    --------
    >>> import numpy as np
    >>> initial, mask, grid = check_placement((600, 700), np.zeros((60, 70, 4)), None, None, None)
    >>> bool(np.allclose(initial, fov_matrix((600, 700), (60, 70)))), mask is None
    (True, True)
    >>> grid.s  # ceil(10 guide pixels per cube pixel / 6)
    2
    """
    if mask is not None:
        mask = check_mask(mask, "mask", cube.shape[:2])
    initial = fov_matrix(guide_shape, cube.shape[:2]) if initial is None else check_affine(initial, "initial")
    max_pixels = None
    if memory_limit is not None and is_dask_array(cube) and working_shape is None:
        # At most half the limit: the rest is for the chunk tasks, the checkpoints and what the
        # allocator keeps (under 1 GiB, a 2048 x 2048 working grid took 0.84 GiB by this count
        # and the run peaked at 1.53 GiB resident).
        max_pixels = max(64, memory_limit // 2 // WORKING_BYTES_PER_PIXEL)
    grid = working_grid(guide_shape, cube.shape[:2], initial, working_shape, max_pixels=max_pixels)
    return initial, mask, grid


def resolve_levels(options: RefineOptions, guide_shape, cube_shape, initial, grid: WorkingGrid, hint: str = ""):
    """The number of pyramid levels: ``"auto"``, the manual weights' length, or the user's, checked to fit.

    ``"auto"`` keeps 3 x 3 pixels of the grid at the cube's resolution over
    the cube's footprint (at least one level: a footprint too small for that
    is an outcome of the refinement, not an error). An explicit number must
    fit the grids themselves; the error says how many fit.

    Examples
    --------
    >>> import numpy as np
    >>> initial = fov_matrix((600, 700), (60, 70))
    >>> grid = working_grid((600, 700), (60, 70), initial)
    >>> resolve_levels(RefineOptions(), (600, 700), (60, 70), initial, grid)  # 60, 30 px across the map
    2
    >>> resolve_levels(RefineOptions(levels=2), (600, 700), (60, 70), initial, grid)
    2
    >>> resolve_levels(RefineOptions(levels=9), (600, 700), (60, 70), initial, grid)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
        ...
    ValueError: levels=9 is too many for a guide of 600 x 700 and a cube of 60 x 70 pixels: ...
    """
    estimate_grid = grid.level_shape(grid.cube_step)
    if max_levels(grid.shape) == 0:
        raise ValueError(f"guide must be at least 3 x 3 pixels; got {guide_shape[0]} x {guide_shape[1]}")
    if max_levels(estimate_grid) == 0:
        raise ValueError(
            f"cube of {cube_shape[0]} x {cube_shape[1]} pixels is too small: the estimate at its resolution "
            f"runs on a {estimate_grid[0]} x {estimate_grid[1]} grid, which must be at least 3 x 3{hint}"
        )
    if isinstance(options.levels, int):
        wanted = options.levels
    elif not options.auto_weights:
        wanted = _first_length(options.weights)
    else:
        return max(1, auto_levels(cube_shape, initial, grid))
    fit = min(max_levels(grid.shape), max_levels(estimate_grid))
    if wanted > fit:
        raise ValueError(
            f"levels={wanted} is too many for a guide of {guide_shape[0]} x {guide_shape[1]} and a cube of "
            f"{cube_shape[0]} x {cube_shape[1]} pixels: the estimate at the cube's resolution runs on a "
            f"{estimate_grid[0]} x {estimate_grid[1]} grid and the working grid is {grid.shape[0]} x "
            f"{grid.shape[1]} (at most {fit} levels){hint}"
        )
    return wanted


def bands_first_hint(cube_shape, guide_shape, initial=None) -> str:
    """A hint when the cube's last two axes fit the guide far better than its first two.

    The expected aspect ratio (rows / cols) of the cube's grid is the
    guide's, or, with an ``initial`` matrix, that of the region of the cube
    the guide maps to. Bands-first cubes such as (200, 70, 83) or (16, 70,
    83) for a 350 x 415 guide show up as a grid of the wrong shape: the hint
    comes where axes 1 and 2 fit within 15 % and axes 0 and 1 miss by more
    than 25 %.

    Examples
    --------
    >>> bands_first_hint((70, 83, 200), (350, 415))
    ''
    >>> bands_first_hint((200, 70, 83), (350, 415))
    '; the bands look like they are first; pass band_axis=0'
    """
    if initial is None:
        expected = guide_shape[0] / guide_shape[1]
    else:
        extent = np.abs(initial[:2, :2]) @ np.asarray(guide_shape, dtype=np.float64)
        expected = extent[0] / extent[1]
    rows, cols, bands = cube_shape

    def misfit(ratio):
        return abs(math.log(ratio / expected))

    if misfit(cols / bands) < math.log(1.15) and misfit(rows / cols) > math.log(1.25):
        return "; the bands look like they are first; pass band_axis=0"
    return ""
