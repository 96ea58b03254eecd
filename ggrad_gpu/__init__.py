"""ggrad_gpu: guided global-gradient registration refinement of hyperspectral images.

Refines the registration of a hyperspectral cube (Raman, infrared, or a large
mosaic) to a brightfield guide image, on a GPU with CuPy or on any CPU with
NumPy. Low-level functions follow their input arrays (NumPy in, NumPy out;
CuPy in, CuPy out); importing the package never imports CuPy.
"""

from importlib.metadata import PackageNotFoundError, version

from . import baselines, metrics, synthetic
from ._backend import array_module, ndimage_module, resolve_backend, to_device, to_host
from .estimate import GlobalGradient, estimate_global_gradient
from .filters import sobel_magnitude
from .multimodal import cube_to_cube, refine_many
from .nnls import gram_products, nnls_gram
from .pipeline import Refinement, refine
from .pyramid import gaussian_pyramid, upsample_level
from .register import AffineRegistration, register_affine
from .warp import warp_cube

# Loaded on first use, so that ``import ggrad_gpu`` does not import Dask.
_LAZY = {"refine_mosaic": "mosaic", "MosaicRefinement": "mosaic"}


def __getattr__(name):
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


try:
    __version__ = version("ggrad_gpu")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+unknown"

__all__ = [
    "AffineRegistration",
    "GlobalGradient",
    "MosaicRefinement",
    "Refinement",
    "baselines",
    "array_module",
    "cube_to_cube",
    "estimate_global_gradient",
    "gaussian_pyramid",
    "gram_products",
    "metrics",
    "ndimage_module",
    "nnls_gram",
    "refine",
    "refine_many",
    "refine_mosaic",
    "register_affine",
    "resolve_backend",
    "sobel_magnitude",
    "synthetic",
    "to_device",
    "to_host",
    "upsample_level",
    "warp_cube",
]
