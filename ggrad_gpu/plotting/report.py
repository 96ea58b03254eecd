"""The one-glance report of a refinement (``report.png`` of ``ggrad refine``).

:func:`report_figure` builds a :class:`matplotlib.figure.Figure` directly
(no ``pyplot``, no global state, no display: it renders with the Agg canvas)
for the caller to write (:func:`ggrad_gpu.io.write_figure`: a PNG, atomically). Every panel is an
Axes with a stable label (``Axes.get_label()``) so that callers and tests can
find it:

``"before"``, ``"after"``
    Colour overlays of the guide's gradient image ``grad_x`` (magenta) and the
    cube's gradient image (green) placed by ``refinement.initial`` and by
    ``refinement.matrix``; white where both have edges.
``"grad_x"``, ``"grad_y"``
    The global gradient images of the guide and the cube (eqs. 6-7).
``"band weights"``
    The per-band NNLS weights ``x_k`` of every level (eq. 5).
``"level weights"``
    ``alpha`` and ``beta`` per level (eqs. 8-9), as grouped bars.

The figure's suptitle is the verdict: improved or not, and by how much.
"""

from __future__ import annotations

import math
import textwrap

import numpy as np

from .._backend import array_module, to_host
from .._lazy.chunked import is_dask_array
from .._validation import check_array, float_dtype
from ..core.filters import sobel_magnitude
from ..core.geometry import block_mean
from ..core.warp import warp_cube

__all__ = ["DISPLAY_SIDE", "PANELS", "display_step", "report_figure"]

PANELS = ("before", "after", "level weights", "grad_x", "grad_y", "band weights")
FIGSIZE = (12.0, 8.0)  # inches
DPI = 120
_PERCENTILES = (1.0, 99.5)  # robust display range of every image
_OUTSIDE_DIMMING = 0.45  # guide brightness outside the cube's footprint in the overlays
_TITLE_WIDTH = 130  # characters per suptitle line
# Pixels per side an image panel shows at most: a panel is under 500 pixels
# wide at FIGSIZE and DPI, and a larger image only costs memory (matplotlib
# holds it and its RGBA copies while drawing).
DISPLAY_SIDE = 1024
_KEPT_PREFIX = "kept the initial transform: "


def report_figure(refinement, guide, cube, *, band_centres=None, band_unit=None, title=None):
    """The report figure of a refinement.

    Parameters
    ----------
    refinement : Refinement
        The result of :func:`ggrad_gpu.refine`.
    guide : array, shape (rows, cols)
        The guide given to ``refine`` (NumPy or CuPy). Only its shape is
        used, to check that it is the refinement's guide: the overlays show
        the guide's gradient image ``grad_x``, which is what the registration
        matched.
    cube : array, shape (cube_rows, cube_cols, bands)
        The native cube given to ``refine`` (NumPy or CuPy).
    band_centres : array_like, shape (bands,), optional
        Band centres (e.g. wavenumbers) for the x axis of the band weights;
        default: band index.
    band_unit : str, optional
        Unit of ``band_centres`` (e.g. ``"cm^-1"``), shown in the axis label.
    title : str, optional
        A line above the verdict (e.g. the names of the inputs).

    Returns
    -------
    matplotlib.figure.Figure
        12 x 8 inches at 120 dpi, constrained layout, one Axes per panel of
        :data:`PANELS`, each found by its label (``ax.get_label()``):

        - ``"before"``, ``"after"``: RGB overlays on the working grid,
          shape ``grad_x.shape + (3,)``: the guide's ``grad_x`` in magenta
          and the cube's image in green, the cube placed by
          ``refinement.initial`` and by ``refinement.matrix``. The cube's
          image is the Sobel magnitude of the cube on the working grid
          combined over bands with the level-0 band weights,
          ``sobel_magnitude(registered @ channel_weights[0])`` (the cube is
          combined at its native grid first, then warped bilinearly, which
          is the same for a bilinear warp and far cheaper). Outside the
          cube's footprint the green channel is black and the guide dimmed.
        - ``"grad_x"``, ``"grad_y"``: grayscale with colour bars; ``grad_y``
          is transparent where it is not valid (pixels the cube does not
          cover).
        - ``"band weights"``: one line per level ``k``, y data
          ``channel_weights[k]``, x data ``band_centres`` or band indices.
        - ``"level weights"``: two bar containers labelled ``"alpha"`` and
          ``"beta"`` with one bar per level.

        Each image is shown between its 1st and 99.5th percentile.

    Raises
    ------
    ValueError
        If ``guide``'s working grid or ``cube``'s bands do not match the
        refinement, or ``band_centres`` is not one finite value per band;
        the message names the parameter.

    Examples
    --------
    >>> from ggrad_gpu import refine, synthetic
    >>> from ggrad_gpu.plotting.report import report_figure
    >>> phantom = synthetic.make_phantom(shape=(60, 70), bands=20, seed=0)
    >>> result = refine(phantom.guide, phantom.cube, initial=phantom.initial, levels=3, backend="numpy")
    >>> figure = report_figure(result, phantom.guide, phantom.cube,
    ...                        band_centres=phantom.wavenumbers, band_unit="cm^-1")
    >>> sorted(ax.get_label() for ax in figure.axes if ax.get_label() in ("before", "after"))
    ['after', 'before']
    >>> figure.get_suptitle().startswith("Improved")
    True
    """
    from matplotlib.figure import Figure

    gradient = refinement.gradient
    grad_x = _host_float(gradient.grad_x)
    grad_y = _host_float(gradient.grad_y)
    shape = grad_x.shape
    scale = np.asarray(refinement.working_to_guide, dtype=np.float64)
    _check_guide(guide, shape, scale)
    check_array(cube, "cube", (3,), "3-D (rows, cols, bands)")
    channel_weights = np.atleast_2d(np.asarray(gradient.channel_weights, dtype=np.float64))
    bands = channel_weights.shape[1]
    if cube.shape[2] != bands:
        raise ValueError(
            f"cube must have the refinement's {bands} bands; got shape {tuple(cube.shape)}"
        )
    centres = _check_band_centres(band_centres, bands)

    figure = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    axes = dict(zip(PANELS, figure.subplots(2, 3).ravel()))
    for label, ax in axes.items():
        ax.set_label(label)

    # The cube's image on the working grid, combined once at its native grid.
    native_image = _combined_bands(cube, channel_weights)
    valid = None if gradient.valid is None else to_host(gradient.valid).astype(bool)
    step = display_step(shape)
    for label, matrix, name in (
        ("before", refinement.initial, "initial"),
        ("after", refinement.matrix, "refined" if refinement.improved else "kept"),
    ):
        on_grid = warp_cube(native_image[:, :, None], np.asarray(matrix) @ scale, shape, order=1)[:, :, 0]
        edges = _host_float(sobel_magnitude(on_grid))
        ax = axes[label]
        ax.imshow(_overlay(_block_mean(grad_x, step), _block_mean(edges, step)), interpolation="nearest")
        ax.set_title(f"{label.capitalize()}: {name} transform\nguide magenta, cube green, both white")
        _image_axes(ax)

    for label, image, mask, what in (
        ("grad_x", grad_x, None, "guide"),
        ("grad_y", grad_y, valid, "cube"),
    ):
        shown = _block_mean(image if mask is None else np.where(mask, image, np.nan), step)
        low, high = _display_range(shown)
        ax = axes[label]
        picture = ax.imshow(shown, cmap="gray", vmin=low, vmax=high, interpolation="nearest")
        ax.set_title(f"{label}: global gradient of the {what}")
        _image_axes(ax)
        figure.colorbar(picture, ax=ax, shrink=0.85, label="gradient magnitude")

    _plot_band_weights(axes["band weights"], channel_weights, centres, band_unit)
    _plot_level_weights(axes["level weights"], gradient.alpha, gradient.beta)

    verdict = verdict_line(refinement)
    change = _change_line(refinement)
    lines = ([title] if title else []) + [verdict] + ([change] if change else [])
    figure.suptitle("\n".join(textwrap.fill(line, _TITLE_WIDTH) for line in lines), fontsize="large")
    return figure


def verdict_line(refinement) -> str:
    """One line: whether the refinement improved the match, and by how much.

    ``"Improved: gradient NCC 0.43 -> 0.80, MSE -42 %"`` or
    ``"Kept the initial transform: <reason>; gradient NCC ..., MSE ..."``,
    from ``refinement.improved``, ``message`` and ``quality``; with
    ``refine(check=True)`` also the uncertainty, ``"spread 0.21 px"``.

    Examples
    --------
    >>> from types import SimpleNamespace
    >>> from ggrad_gpu.plotting.report import verdict_line
    >>> quality = {"ncc_before": 0.62, "ncc_after": 0.91, "mse_before": 0.5, "mse_after": 0.26}
    >>> verdict_line(SimpleNamespace(improved=True, message="refined", quality=quality))
    'Improved: gradient NCC 0.62 -> 0.91, MSE -48 %'
    >>> verdict_line(SimpleNamespace(improved=True, message="refined", quality={**quality, "spread_px": 0.21}))
    'Improved: gradient NCC 0.62 -> 0.91, MSE -48 %, spread 0.21 px'
    """
    figures = _quality_figures(getattr(refinement, "quality", None) or {})
    if refinement.improved:
        return "Improved" + (f": {figures}" if figures else "")
    reason = str(refinement.message or "").strip()
    if reason.lower().startswith(_KEPT_PREFIX):
        reason = reason[len(_KEPT_PREFIX):]
    # refine's message ends with its own figures in parentheses; ours replace them.
    if figures and reason.endswith(")") and " (gradient " in reason:
        reason = reason[: reason.rindex(" (gradient ")]
    line = "Kept the initial transform" + (f": {reason}" if reason else "")
    return line + (f"; {figures}" if figures else "")


def _quality_figures(quality: dict) -> str:
    parts = []
    try:
        parts.append(f"gradient NCC {float(quality['ncc_before']):.2f} -> {float(quality['ncc_after']):.2f}")
    except (KeyError, TypeError, ValueError):
        pass
    try:
        before, after = float(quality["mse_before"]), float(quality["mse_after"])
    except (KeyError, TypeError, ValueError):
        before = after = math.nan
    if math.isfinite(before) and math.isfinite(after) and before > 0:
        parts.append(f"MSE {100.0 * (after - before) / before:+.0f} %")
    spread = quality.get("spread_px")  # refine(check=True) only; None in a transform.json where not finite
    if isinstance(spread, (int, float)) and math.isfinite(spread):
        parts.append(f"spread {float(spread):.2f} px")
    return ", ".join(parts)


def _change_line(refinement) -> str:
    """The change of placement from the initial to the final transform, in guide pixels.

    ``matrix = initial @ D`` with ``D`` a guide-frame pull-back; the cube's
    content moves by ``E = inv(D)``: its shift is taken at the guide's centre
    (of the working grid's extent), its rotation and scale from ``E``'s linear part.
    """
    if not refinement.improved:
        return ""
    try:
        change = np.linalg.inv(np.linalg.solve(refinement.initial, refinement.matrix))
    except np.linalg.LinAlgError:
        return ""
    shape = np.asarray(refinement.gradient.grad_x.shape, dtype=np.float64)
    centre_working = np.append((shape - 1) / 2, 1.0)
    centre = np.asarray(refinement.working_to_guide, dtype=np.float64) @ centre_working
    shift = (change @ centre - centre)[:2]
    linear = change[:2, :2]
    # (row, col) axes on screen: row down, col right; a positive angle turns
    # the row axis towards the col axis, i.e. counter-clockwise on screen.
    angle = math.degrees(math.atan2(linear[1, 0] - linear[0, 1], linear[0, 0] + linear[1, 1]))
    scale = math.sqrt(abs(float(np.linalg.det(linear))))
    return (
        f"cube moved by ({shift[0]:+.1f}, {shift[1]:+.1f}) guide px (row, col) at the centre, "
        f"rotated {abs(angle):.2f} deg {'counter-clockwise' if angle > 0 else 'clockwise'}, scaled x{scale:.3f}"
    )


def _check_guide(guide, shape, scale):
    """The guide must hold the refinement's working grid: its region of ``s x s`` blocks lies inside it."""
    check_array(guide, "guide", (2,), "2-D (rows, cols)")
    s = max(1, int(round(float(scale[0, 0]))))
    start = [int(round(float(scale[axis, 2]) - (s - 1) / 2)) for axis in (0, 1)]
    stop = [start[axis] + s * shape[axis] for axis in (0, 1)]
    if min(start) < 0 or stop[0] > guide.shape[0] or stop[1] > guide.shape[1]:
        raise ValueError(
            f"guide must be the refinement's guide: its working grid covers guide rows {start[0]} to "
            f"{stop[0]} and columns {start[1]} to {stop[1]} (blocks of {s}); got guide shape {tuple(guide.shape)}"
        )


def _check_band_centres(band_centres, bands):
    if band_centres is None:
        return None
    centres = np.asarray(to_host(band_centres), dtype=np.float64)
    if centres.shape != (bands,) or not np.isfinite(centres).all():
        raise ValueError(
            f"band_centres must be {bands} finite values, one per band; got shape {centres.shape}"
        )
    return centres


def _combined_bands(cube, channel_weights):
    """The native cube combined over bands, ``cube @ w``, as a 2-D host-or-device image (a lazy cube's computed).

    ``w`` is the level-0 band weights; if they are all zero (a baseline
    method, or a level that got no weight) the sum over levels, else the band
    mean. Bands of weight zero are left out, so their NaNs do not spread.
    """
    xp = array_module(cube=cube)
    weights = channel_weights[0]
    if not (weights > 0).any():
        weights = channel_weights.sum(axis=0)
    if not (weights > 0).any():
        weights = np.full(channel_weights.shape[1], 1.0 / channel_weights.shape[1])
    used = np.flatnonzero(weights > 0)
    dtype = float_dtype(cube.dtype)
    values = cube if used.size == cube.shape[2] else cube[:, :, xp.asarray(used)]
    combined = values.astype(dtype, copy=False) @ xp.asarray(weights[used], dtype=dtype)
    if is_dask_array(combined):
        # A cube beyond memory: one pass over it, chunk by chunk, to a 2-D image. Left lazy, each
        # overlay's warp read the whole cube again, holding many windows at once (a 4 GiB Zarr cube
        # under --memory-limit 1GiB: 70 s and a peak of 3.1 GiB).
        combined = combined.compute()
    return combined


def display_step(shape, side: int | None = None) -> int:
    """Pixels per displayed pixel along each axis, so that no side shows more than ``side`` (:data:`DISPLAY_SIDE`).

    Examples
    --------
    >>> display_step((800, 600)), display_step((2048, 1500)), display_step((4100, 10))
    (1, 2, 5)
    """
    return max(1, math.ceil(max(shape) / (DISPLAY_SIDE if side is None else side)))


def _block_mean(image, step: int) -> np.ndarray:
    """``image`` averaged over ``step x step`` blocks, NaN left out, the last blocks taking what is left."""
    return block_mean(image, step, partial=True, skip_nan=True)


def _host_float(image) -> np.ndarray:
    return np.asarray(to_host(image), dtype=np.float64)


def _display_range(image) -> tuple[float, float]:
    """The 1st and 99.5th percentiles of the finite values (0, 1 if there are none)."""
    finite = image[np.isfinite(image)]
    if finite.size == 0:
        return 0.0, 1.0
    low, high = (float(v) for v in np.percentile(finite, _PERCENTILES))
    if not high > low:
        high = low + 1.0
    return low, high


def _normalised(image) -> np.ndarray:
    low, high = _display_range(image)
    with np.errstate(invalid="ignore"):
        return np.clip((image - low) / (high - low), 0.0, 1.0)


def _overlay(guide_image, cube_image) -> np.ndarray:
    """RGB (rows, cols, 3): guide in magenta (red + blue), cube in green.

    Where the cube's image is NaN (outside its footprint) green is 0 and the
    guide is dimmed, so the footprint stands out.
    """
    guide_channel = _normalised(guide_image)
    guide_channel = np.where(np.isfinite(guide_channel), guide_channel, 0.0)
    outside = ~np.isfinite(cube_image)
    cube_channel = np.where(outside, 0.0, _normalised(cube_image))
    guide_channel = np.where(outside, _OUTSIDE_DIMMING * guide_channel, guide_channel)
    return np.stack([guide_channel, cube_channel, guide_channel], axis=-1)


def _image_axes(ax):
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel("col (working grid)")
    ax.set_ylabel("row")


def _plot_band_weights(ax, channel_weights, centres, unit):
    x = np.arange(channel_weights.shape[1]) if centres is None else centres
    for level, row in enumerate(channel_weights):
        ax.plot(x, row, label=f"level {level}", linewidth=1.2, marker="." if row.size <= 64 else None)
    if centres is None:
        ax.set_xlabel("band index")
    else:
        ax.set_xlabel(f"band centre ({unit})" if unit else "band centre")
    ax.set_ylabel("weight $x_k$ (eq. 5)")
    ax.set_title("Band weights per pyramid level")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)


def _plot_level_weights(ax, alpha, beta):
    alpha = np.asarray(alpha, dtype=np.float64).ravel()
    beta = np.asarray(beta, dtype=np.float64).ravel()
    levels = np.arange(alpha.size)
    width = 0.38
    ax.bar(levels - width / 2, alpha, width, label="alpha")
    ax.bar(levels + width / 2, beta, width, label="beta")
    ax.set_xticks(levels)
    ax.set_xlabel("pyramid level k")
    ax.set_ylabel("weight (eqs. 8-9)")
    ax.set_ylim(0, max(1.0, float(np.max(np.concatenate([alpha, beta]), initial=0.0))) * 1.05)
    ax.set_title("Level weights")
    ax.legend(ax.containers, ["alpha (guide)", "beta (cube)"], fontsize="small")
    ax.grid(axis="y", alpha=0.3)
