"""Figures (Matplotlib), returned to the caller, never written here: the report, the overlay, the mosaic QC.

- :mod:`~ggrad_gpu.plotting.report`: ``report.png`` of ``ggrad refine``.
- :mod:`~ggrad_gpu.plotting.overlay`: ``overlay.png`` of several cubes on one guide.
- :mod:`~ggrad_gpu.plotting.mosaic`: the mosaic's QC figure.
"""

from .mosaic import mosaic_figure
from .overlay import overlay_figure
from .report import report_figure

__all__ = ["mosaic_figure", "overlay_figure", "report_figure"]
