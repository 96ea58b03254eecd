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
import warnings
from types import ModuleType

import numpy as np

__all__ = [
    "array_module",
    "check_cupy",
    "cupy_usable",
    "is_cupy_array",
    "ndimage_module",
    "resolve_backend",
    "to_device",
    "to_host",
]

BACKENDS = ("auto", "numpy", "cupy")



def is_cupy_array(x) -> bool:
    """Whether ``x`` is a CuPy array, without importing CuPy.

    Examples
    --------
    >>> imported = "cupy" in sys.modules
    >>> is_cupy_array(np.zeros(2)), ("cupy" in sys.modules) == imported  # never imports CuPy
    (False, True)
    """
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

    Examples
    --------
    >>> import numpy as np
    >>> from ggrad_gpu import array_module
    >>> array_module(guide=np.zeros((2, 2)), cube=np.zeros((2, 2, 3))).__name__
    'numpy'
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
    """``scipy.ndimage`` for NumPy, ``cupyx.scipy.ndimage`` for CuPy.

    Examples
    --------
    >>> import numpy as np
    >>> from ggrad_gpu import ndimage_module
    >>> ndimage_module(np).__name__
    'scipy.ndimage'
    """
    if xp is np:
        import scipy.ndimage

        return scipy.ndimage
    import cupyx.scipy.ndimage

    return cupyx.scipy.ndimage


@functools.cache
def cupy_usable() -> tuple[bool, str]:
    """Whether CuPy imports, sees a CUDA device and runs on it; if not, why not.

    Beyond the device count, a small elementwise kernel (compiled by NVRTC at
    first use) and a small matrix product (cuBLAS) run and are checked against
    NumPy: a ``cupy-cuda13x`` wheel without the CUDA runtime libraries
    (``cupy-cuda13x[ctk]``) sees the device but fails there. Checked once per
    process.

    Examples
    --------
    >>> usable, reason = cupy_usable()
    >>> usable == (reason == "") and (usable or reason.startswith("CuPy"))  # on a CPU-only machine: why not
    True
    """
    try:
        import cupy
    except Exception as exc:  # ImportError, or a broken CUDA install
        return False, f"CuPy does not import ({type(exc).__name__}: {exc})"
    return check_cupy(cupy)


def check_cupy(cupy) -> tuple[bool, str]:
    """The checks of :func:`cupy_usable` on an imported ``cupy`` module (or a stand-in).

    Examples
    --------
    >>> from types import SimpleNamespace
    >>> def stand_in(devices, asnumpy=np.asarray):  # NumPy posing as CuPy
    ...     runtime = SimpleNamespace(getDeviceCount=lambda: devices)
    ...     return SimpleNamespace(cuda=SimpleNamespace(runtime=runtime), asarray=np.asarray, asnumpy=asnumpy)
    >>> check_cupy(stand_in(0))
    (False, 'CuPy sees no CUDA device')
    >>> check_cupy(stand_in(1))
    (True, '')
    >>> check_cupy(stand_in(1, asnumpy=lambda a: np.asarray(a) + 1))  # doctest: +ELLIPSIS
    (False, 'CuPy sees a CUDA device but cannot compute on it: ... gave wrong numbers')
    """
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return False, f"CuPy sees no CUDA device ({type(exc).__name__}: {exc})"
    if count < 1:
        return False, "CuPy sees no CUDA device"
    host = np.arange(16, dtype=np.float32).reshape(4, 4)
    try:
        device = cupy.asarray(host)
        kernel = cupy.asnumpy(device * 2 + 1)  # an elementwise kernel: NVRTC
        product = cupy.asnumpy(device @ device)  # cuBLAS
    except Exception as exc:
        return False, (f"{BROKEN}: a test kernel or matrix product failed ({type(exc).__name__}: {exc}); "
                       "install the CUDA runtime libraries, e.g. pip install 'cupy-cuda13x[ctk]'")
    if not (np.array_equal(kernel, host * 2 + 1) and np.allclose(product, host @ host)):
        return False, f"{BROKEN}: a test kernel or matrix product gave wrong numbers"
    return True, ""


# How cupy_usable's reason starts where CuPy sees a device but cannot compute on it.
BROKEN = "CuPy sees a CUDA device but cannot compute on it"


def resolve_backend(backend: str = "auto") -> ModuleType:
    """The array module a high-level call computes with.

    Parameters
    ----------
    backend : {"auto", "numpy", "cupy"}
        ``"auto"`` picks CuPy when it imports, sees a device and passes the
        checks of :func:`cupy_usable`, else NumPy; where CuPy sees a device
        but fails those checks (a broken CUDA install), NumPy with a
        ``UserWarning`` that says why. ``"numpy"`` never imports CuPy.
        ``"cupy"`` raises where CuPy is not usable: there is no silent fallback.

    Examples
    --------
    >>> import numpy as np
    >>> from ggrad_gpu._backend import resolve_backend
    >>> resolve_backend("numpy") is np
    True
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
    if reason.startswith(BROKEN):
        warnings.warn(f'backend="auto" computes with NumPy: {reason}', UserWarning, stacklevel=3)
    return np


def to_host(x):
    """A NumPy array of ``x`` (copied from the device if it is a CuPy array).

    Examples
    --------
    >>> import numpy as np
    >>> from ggrad_gpu import to_host
    >>> to_host(np.arange(3)).tolist()
    [0, 1, 2]
    """
    if is_cupy_array(x):
        return x.get()
    return np.asarray(x)


def to_device(x, xp: ModuleType):
    """``x`` as an array of module ``xp`` (NumPy or CuPy), copying only if needed.

    Examples
    --------
    >>> import numpy as np
    >>> from ggrad_gpu import to_device
    >>> type(to_device([1.0, 2.0], np)).__name__
    'ndarray'
    """
    if xp is np:
        return to_host(x)
    return xp.asarray(x)
