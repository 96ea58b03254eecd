"""Array-library plumbing: NumPy on the CPU, CuPy on CUDA.

Low-level functions find their array module from their inputs
(:func:`array_module`) and the matching ``ndimage`` (:func:`ndimage_module`);
only high-level calls take ``backend=`` and resolve it here
(:func:`resolve_backend`). There is no global backend state, and nothing in
this module imports CuPy unless a caller asks for it or hands in a CuPy array.

Block sizes and the out-of-memory retry live in :mod:`ggrad_gpu._memory`.
"""

from __future__ import annotations

import functools
import sys
from types import ModuleType

import numpy as np

__all__ = [
    "array_module",
    "cupy_usable",
    "is_cupy_array",
    "ndimage_module",
    "resolve_backend",
    "to_device",
    "to_host",
]

BACKENDS = ("auto", "numpy", "cupy")



def is_cupy_array(x) -> bool:
    """Whether ``x`` is a CuPy array, without importing CuPy."""
    cupy = sys.modules.get("cupy")
    return cupy is not None and isinstance(x, cupy.ndarray)


def array_module(**named_arrays) -> ModuleType:
    """The array module (``numpy`` or ``cupy``) that the named arrays live in.

    Parameters
    ----------
    **named_arrays
        The arrays, keyed by the parameter names a user knows them by. Python
        scalars and ``None`` are ignored.

    Returns
    -------
    module
        ``numpy`` when no argument is a CuPy array, else ``cupy``.

    Raises
    ------
    TypeError
        If NumPy and CuPy arrays are mixed; the message names both parameters.
        Data are never moved between host and device silently.
    """
    host, device = None, None
    for name, x in named_arrays.items():
        if is_cupy_array(x):
            device = device or name
        elif isinstance(x, np.ndarray):
            host = host or name
    if device is None:
        return np
    if host is not None:
        raise TypeError(
            f"{device} is a CuPy array but {host} is a NumPy array; put both on the "
            "same device (ggrad_gpu.to_device / ggrad_gpu.to_host)"
        )
    return sys.modules["cupy"]


def ndimage_module(xp: ModuleType) -> ModuleType:
    """``scipy.ndimage`` for NumPy, ``cupyx.scipy.ndimage`` for CuPy."""
    if xp is np:
        import scipy.ndimage

        return scipy.ndimage
    import cupyx.scipy.ndimage

    return cupyx.scipy.ndimage


@functools.cache
def cupy_usable() -> tuple[bool, str]:
    """Whether CuPy imports and sees a CUDA device, and if not, why not."""
    try:
        import cupy
    except Exception as exc:  # ImportError, or a broken CUDA install
        return False, f"CuPy does not import ({type(exc).__name__}: {exc})"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return False, f"CuPy sees no CUDA device ({type(exc).__name__}: {exc})"
    if count < 1:
        return False, "CuPy sees no CUDA device"
    return True, ""


def resolve_backend(backend: str = "auto") -> ModuleType:
    """The array module a high-level call computes with.

    Parameters
    ----------
    backend : {"auto", "numpy", "cupy"}
        ``"auto"`` picks CuPy when it imports and sees a device, else NumPy.
        ``"numpy"`` never imports CuPy. ``"cupy"`` raises where CuPy is not
        usable: there is no silent fallback.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    if backend == "numpy":
        return np
    usable, reason = cupy_usable()
    if backend == "cupy" and not usable:
        raise RuntimeError(f'backend="cupy" was requested but {reason}')
    if usable:
        import cupy

        return cupy
    return np


def to_host(x):
    """A NumPy array of ``x`` (copied from the device if it is a CuPy array)."""
    if is_cupy_array(x):
        return x.get()
    return np.asarray(x)


def to_device(x, xp: ModuleType):
    """``x`` as an array of module ``xp`` (NumPy or CuPy), copying only if needed."""
    if xp is np:
        return to_host(x)
    return xp.asarray(x)
