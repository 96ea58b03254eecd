"""The mosaic's QC figure: tile outlines before and after on the guide, residual arrows, a quality table.

The figure ASHLAR's users ask for: on the guide, each tile's outline where
the stage put it (dashed) and where it ends up (solid), coloured by status;
an arrow from the model's placement of each refined tile's centre to its
own, magnified so that pixel-sized residuals show; and beside it one row per
tile with its status, the match before and after and its distance from the
model.
"""

from __future__ import annotations

import numpy as np

from ..core.stage_model import tile_points

__all__ = ["STATUS_COLOURS", "mosaic_figure"]

STATUS_COLOURS = {"refined": "tab:green", "model": "tab:orange", "initial": "tab:gray", "failed": "tab:red"}
# The guide is shown with at most this many pixels along its larger side.
DISPLAY_PIXELS = 2000
# Outline corners in drawing order (tile_points: four corners, then the centre).
_OUTLINE = [0, 1, 3, 2, 0]


def mosaic_figure(guide, result, names=None, *, arrow_scale=None):
    """Build the QC figure of a :class:`ggrad_gpu.scaleout.mosaic.MosaicRefinement`.

    Parameters
    ----------
    guide : array-like, shape (rows, cols)
        Sliced with a step (``guide[::n, ::n]``) when larger than
        ``DISPLAY_PIXELS``, so a guide read by region is not read whole.
    result : MosaicRefinement
    names : sequence of str, optional
        Tile names for the table (default their indices).
    arrow_scale : float, optional
        Magnification of the residual arrows (default: the longest arrow of
        a tile the model fitted 8% of the guide's larger side, at least 1);
        longer arrows (slips) are cut at 15% with their length beside them.

    Returns
    -------
    matplotlib.figure.Figure

    Examples
    --------
    >>> import numpy as np
    >>> from ggrad_gpu.scaleout.mosaic import MosaicRefinement
    >>> from ggrad_gpu.plotting.mosaic import mosaic_figure
    >>> from ggrad_gpu.core.stage_model import fit_stage_model
    >>> tiles = np.stack([np.array([[0.25, 0, -2.0], [0, 0.25, -2.0 - 6 * i], [0, 0, 1]]) for i in range(3)])
    >>> model = fit_stage_model(tiles, tiles, [(8, 8, 2)] * 3, [True] * 3)
    >>> result = MosaicRefinement(tiles, ("refined",) * 3, ({"ncc_before": 0.3, "ncc_after": 0.8},) * 3, model,
    ...                           initials=tiles, own=tiles, shapes=((8, 8, 2),) * 3)
    >>> len(mosaic_figure(np.zeros((40, 100)), result).axes)
    2
    """
    from matplotlib.figure import Figure

    rows, cols = guide.shape[:2]
    step = max(1, -(-max(rows, cols) // DISPLAY_PIXELS))  # a large guide is shown (and read) decimated
    shown = np.asarray(guide[::step, ::step], dtype=np.float64)
    count = len(result.status)
    names = [str(i) for i in range(count)] if names is None else [str(n) for n in names]
    figure = Figure(figsize=(13, 6.5), dpi=110, layout="constrained")
    image_ax, table_ax = figure.subplots(1, 2, width_ratios=[1.6, 1])
    finite = shown[np.isfinite(shown)]
    low, high = (np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0))
    image_ax.imshow(shown, cmap="gray", vmin=low, vmax=high, interpolation="nearest",
                    extent=(-0.5, step * shown.shape[1] - 0.5, step * shown.shape[0] - 0.5, -0.5))
    residuals = result.model.residuals
    lengths = np.hypot(*residuals.T)
    typical = lengths[result.model.inliers & np.isfinite(lengths)]
    longest = float(typical.max()) if typical.size else 0.0
    if arrow_scale is None:
        arrow_scale = max(1.0, 0.08 * max(rows, cols) / longest) if longest > 0 else 1.0
    # An outlier's arrow (a slip) is drawn no longer than this; its length is written beside it.
    cap = 0.15 * max(rows, cols)
    for i in range(count):
        shape = result.shapes[i] if result.shapes else None
        if shape is None:
            continue
        points = tile_points(shape)
        colour = STATUS_COLOURS[result.status[i]]
        before = np.linalg.solve(result.initials[i], points)
        after = np.linalg.solve(result.matrices[i], points)
        image_ax.plot(before[1, _OUTLINE], before[0, _OUTLINE], "--", color=colour, lw=0.8, alpha=0.7)
        image_ax.plot(after[1, _OUTLINE], after[0, _OUTLINE], "-", color=colour, lw=1.4)
        image_ax.text(after[1, -1], after[0, -1], names[i], color=colour, fontsize=7, ha="center", va="center")
        if result.model.matrix is not None and np.isfinite(residuals[i]).all():
            start = np.linalg.solve(result.model.placement(result.initials[i]), points[:, -1])
            arrow = arrow_scale * residuals[i]
            if np.hypot(*arrow) > cap:
                arrow *= cap / np.hypot(*arrow)
                image_ax.text(start[1] + arrow[1], start[0] + arrow[0], f"{lengths[i]:.1f} px", color="yellow",
                              fontsize=7)
            image_ax.annotate("", xy=(start[1] + arrow[1], start[0] + arrow[0]), xytext=(start[1], start[0]),
                              arrowprops={"arrowstyle": "->", "color": "yellow", "lw": 1.2})
    handles = [image_ax.plot([], [], "-", color=c, label=s)[0] for s, c in STATUS_COLOURS.items()]
    image_ax.legend(handles=handles, loc="lower right", fontsize=7, title="solid: after, dashed: stage",
                    title_fontsize=7)
    image_ax.set_title(f"tiles on the guide; arrows: own placement minus the stage model's, x{arrow_scale:.3g}",
                       fontsize=9)
    image_ax.set_xlim(-0.5, cols - 0.5)
    image_ax.set_ylim(rows - 0.5, -0.5)
    _quality_table(table_ax, result, names)
    return figure


def _quality_table(ax, result, names):
    """One row per tile: name, status, NCC before -> after, distance from the model (guide px)."""
    ax.axis("off")
    rows = []
    for i, name in enumerate(names):
        quality = result.quality[i]
        ncc = (f"{quality['ncc_before']:.2f} -> {quality['ncc_after']:.2f}" if "ncc_after" in quality else "-")
        distance = result.model.distances[i]
        rows.append([name, result.status[i], ncc, "-" if not np.isfinite(distance) else f"{distance:.2f}"])
    shown = rows[:40]
    table = ax.table(cellText=shown, colLabels=["tile", "status", "NCC before -> after", "from model (px)"],
                     loc="upper center", cellLoc="left")
    table.auto_set_font_size(False)
    table.set_fontsize(7)
    for row, (_, status, _, _) in enumerate(shown, start=1):
        table[row, 1].set_text_props(color=STATUS_COLOURS[status])
    note = f"tolerance {result.model.tolerance:.2f} guide px"
    if len(rows) > len(shown):
        note += f"; {len(rows) - len(shown)} more tiles in tiles.json"
    ax.set_title(f"per-tile quality ({note})", fontsize=9)
