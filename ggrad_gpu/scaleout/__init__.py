"""Work beyond one cube in memory: mosaics, streamed cubes, fusion, Dask tasks and clusters.

- :mod:`~ggrad_gpu.scaleout.mosaic`: :func:`refine_mosaic`, every tile on one guide.
- :mod:`~ggrad_gpu.scaleout.streaming`: :func:`stream_refine`, a cube beyond memory.
- :mod:`~ggrad_gpu.scaleout.fusion`: tiles fused into one Zarr mosaic.
- :mod:`~ggrad_gpu.scaleout.tasks`: independent tasks with a cap in flight.
- :mod:`~ggrad_gpu.scaleout.cluster`: where Dask work runs.

The names below load on first use, so that importing this subpackage imports no Dask.
"""

_LAZY = {"MosaicRefinement": "mosaic", "refine_mosaic": "mosaic", "stream_refine": "streaming",
         "dask_client": "cluster", "fuse_mosaic": "fusion", "run_tasks": "tasks"}


def __getattr__(name):
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_LAZY)
