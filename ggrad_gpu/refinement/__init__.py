"""``refine`` and its steps: options, preparation, the passes, basins, guard, trust.

- :mod:`~ggrad_gpu.refinement.options`: ``refine``'s options, checked once.
- :mod:`~ggrad_gpu.refinement.preparation`: the guide and cube made ready.
- :mod:`~ggrad_gpu.refinement.passes`: the estimate and register passes over one problem.
- :mod:`~ggrad_gpu.refinement.basins`: the first registration from several coarse peaks.
- :mod:`~ggrad_gpu.refinement.guard`: whether a result beats the initial placement.
- :mod:`~ggrad_gpu.refinement.trust`: how far the result could be off.
- :mod:`~ggrad_gpu.refinement.driver`: :func:`refine`, which calls the steps in order.
- :mod:`~ggrad_gpu.refinement.multimodal`: several cubes on one guide.
- :mod:`~ggrad_gpu.refinement.apply`: a saved transform applied to a cube.

The subpackage is not named ``refine``: ``ggrad_gpu.refine`` is the function.
"""

from .apply import apply_transform
from .driver import Refinement, refine
from .multimodal import cube_to_cube, refine_many
from .options import RefineOptions

__all__ = ["Refinement", "RefineOptions", "apply_transform", "cube_to_cube", "refine", "refine_many"]
