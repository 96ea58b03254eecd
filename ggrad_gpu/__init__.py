"""ggrad_gpu: guided global-gradient registration refinement of hyperspectral images.

Refines the registration of a hyperspectral cube (Raman, infrared, or a large
mosaic) to a brightfield guide image, on a GPU with CuPy or on any CPU with
NumPy. Low-level functions follow their input arrays (NumPy in, NumPy out;
CuPy in, CuPy out); importing the package never imports CuPy.
"""

import sys

from . import synthetic
from ._backend import array_module, ndimage_module, resolve_backend, to_device, to_host
from ._version import __version__
from .core import baselines
from .core.estimate import GlobalGradient, estimate_global_gradient
from .core.filters import sobel_magnitude
from .core.nnls import gram_products, nnls_gram
from .core.pyramid import gaussian_pyramid, upsample_level
from .core.warp import warp_cube
from .refinement.driver import Refinement, refine
from .refinement.multimodal import cube_to_cube, refine_many
from .registration import metrics
from .registration.register import AffineRegistration, register_affine

# The public modules keep their short names (``import ggrad_gpu.metrics``,
# ``from ggrad_gpu.baselines import band_sum``): the same module objects.
sys.modules[f"{__name__}.baselines"] = baselines
sys.modules[f"{__name__}.metrics"] = metrics

# Loaded on first use, so that ``import ggrad_gpu`` does not import Dask.
_LAZY = {"refine_mosaic": "scaleout.mosaic", "MosaicRefinement": "scaleout.mosaic"}


def __getattr__(name):
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
