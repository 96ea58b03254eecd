"""Several modalities on one guide, before and after (``overlay.png`` of ``ggrad refine`` with several cubes).

:func:`overlay_figure` draws two panels, labelled ``"before"`` and
``"after"``: the guide in gray, and on it each cube's edges (the gradient of
its first principal component), in its own colour, placed by its initial and by its refined
matrix, with its footprint outlined: where the refinement worked, each
colour's edges lie on the guide's. It builds a :class:`matplotlib.figure.Figure` without ``pyplot``;
:func:`ggrad_gpu.io.write_figure` writes it atomically.
"""

from __future__ import annotations

import numpy as np

from .._backend import to_host
from ..core.baselines import first_principal_component
from ..core.filters import sobel_magnitude
from ..core.geometry import footprint_mask
from ..core.warp import warp_cube

__all__ = ["OVERLAY_PANELS", "overlay_figure"]

OVERLAY_PANELS = ("before", "after")
_COLOURS = ((1.0, 0.2, 0.8), (0.1, 0.9, 0.2), (0.2, 0.6, 1.0), (1.0, 0.7, 0.1), (0.7, 0.3, 1.0), (0.1, 0.9, 0.9))
_MAX_SIDE = 800  # guide pixels drawn along the longer side; larger guides are drawn every k-th pixel
_OPACITY = 0.9  # of the strongest edges


def overlay_figure(guide, cubes, initials, matrices, names):
    """The cubes' edges on the guide, placed by ``initials`` (panel "before") and ``matrices`` ("after").

    Parameters
    ----------
    guide : array, shape (rows, cols)
    cubes : sequence of arrays, each shape (rows_i, cols_i, bands_i)
        The native cubes.
    initials, matrices : sequences of (3, 3) arrays
        Guide-to-cube matrices before and after the refinement, one per cube.
    names : sequence of str
        The legend's names, one per cube.

    Returns
    -------
    matplotlib.figure.Figure

    Examples
    --------
    >>> from ggrad_gpu.plotting.overlay import overlay_figure
    >>> from ggrad_gpu.synthetic import make_phantom
    >>> phantom = make_phantom(shape=(60, 80), bands=8, seed=1)
    >>> figure = overlay_figure(phantom.guide, [phantom.cube], [phantom.initial], [phantom.matrix], ["raman"])
    >>> [axes.get_label() for axes in figure.axes]
    ['before', 'after']
    """
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    guide = np.asarray(to_host(guide), dtype=np.float64)
    if not (len(cubes) == len(initials) == len(matrices) == len(names)):
        raise ValueError(f"cubes, initials, matrices and names must have one entry per cube; got "
                         f"{len(cubes)}, {len(initials)}, {len(matrices)}, {len(names)}")
    step = max(1, int(np.ceil(max(guide.shape) / _MAX_SIDE)))
    shown = guide[::step, ::step]
    # Drawn pixel (i, j) is guide pixel (step * i, step * j).
    to_guide = np.diag([float(step), float(step), 1.0])
    low, high = np.nanpercentile(shown, [1, 99.5]) if np.isfinite(shown).any() else (0.0, 1.0)
    gray = np.clip((shown - low) / max(high - low, 1e-12), 0, 1)
    figure = Figure(figsize=(12.0, 6.0), dpi=110)
    for index, (label, placements) in enumerate((("before", initials), ("after", matrices))):
        axes = figure.add_subplot(1, 2, index + 1, label=label)
        image = np.repeat(gray[..., None], 3, axis=2)
        for number, (cube, matrix) in enumerate(zip(cubes, placements)):
            image = _blend(image, cube, np.asarray(matrix, dtype=np.float64) @ to_guide, _COLOURS[number % 6])
        axes.imshow(image, interpolation="nearest")
        axes.set_title(f"{label}: {'initial placement' if label == 'before' else 'refined'}")
        axes.set_xticks([]), axes.set_yticks([])
    handles = [Line2D([], [], color=_COLOURS[i % 6], lw=6) for i in range(len(names))]
    figure.legend(handles, [str(n) for n in names], loc="lower center", ncol=min(6, len(names)))
    return figure


def _blend(image, cube, matrix, colour):
    """``image`` with the cube's edges and its footprint's outline in ``colour``.

    The edges are the gradient of the cube's first principal component: a band
    mean is flat for area-normalised spectra.
    """
    from scipy import ndimage

    cube = np.asarray(to_host(cube), dtype=np.float32)
    summary = first_principal_component(cube) if cube.shape[2] > 1 else cube[..., 0]
    finite = np.isfinite(summary)
    summary = np.where(finite, summary, np.mean(summary[finite]) if finite.any() else 0.0)
    edges = sobel_magnitude(summary)[..., None]  # on the native grid: the cube's own structure
    placed = warp_cube(edges, matrix, image.shape[:2])[..., 0]
    inside = footprint_mask(cube.shape[:2], matrix, image.shape[:2], np) & np.isfinite(placed)
    if not inside.any():
        return image
    high = np.percentile(placed[inside], 99)
    strength = np.where(inside, np.clip(placed / max(high, 1e-12), 0, 1), 0.0)[..., None]
    outline = (inside & ~ndimage.binary_erosion(inside, iterations=2))[..., None]
    weight = np.maximum(_OPACITY * strength, outline.astype(np.float64))
    return (1 - weight) * image + weight * np.asarray(colour)
