"""The lazy layer (bottom, beside ``_backend``): cubes beyond memory on ``dask.array``, and scratch folders.

- :mod:`~ggrad_gpu._lazy.chunked`: runs an in-memory stage, handed in by the
  stage itself, on each chunk with the halo it needs; checkpoints of lazy
  intermediates (in memory or a temporary Zarr store).
- :mod:`~ggrad_gpu._lazy.window_cache`: windows of a Zarr store read in a known
  order, each store chunk decoded about once (the streamed write).
- :mod:`~ggrad_gpu._lazy.scratch`: temporary folders, and removal of those a
  killed run left behind.

Nothing here imports a stage of the method, nor dask until a dask array is handed in.
"""

from .chunked import checkpoint, checkpoints, is_dask_array
from .scratch import make_folder, release_folder, remove_abandoned

__all__ = ["checkpoint", "checkpoints", "is_dask_array", "make_folder", "release_folder", "remove_abandoned"]
