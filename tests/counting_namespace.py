"""A stand-in for CuPy that runs on NumPy and logs what a GPU would pay for.

``CountingCupy`` is installed as ``sys.modules["cupy"]``; its ``ndarray`` is a
NumPy subclass, so the backend layer (``is_cupy_array``, ``array_module``)
takes its arrays for CuPy arrays and the package computes through it as it
would through CuPy. Every call through the namespace and every ufunc on its
arrays is an *operation* (a kernel launch on a GPU); every conversion of one of
its arrays to a host value (``float()``, ``int()``, ``bool()``, ``.item()``,
``.tolist()``, ``.get()``, ``__array__``) is a *read* (a device-to-host copy
and a sync). ``events`` holds both in order, with the dtype and shape of what
each operation made, so tests can count launches, find reads between two
products, and check intermediate dtypes.
"""

from __future__ import annotations

import types
from types import SimpleNamespace

import numpy as np


class Event(SimpleNamespace):
    """``kind`` ("op" or "read"), ``name``, and for ops the ``dtype``/``shape`` made and ``out`` given."""


def _plain(value):
    """``value`` with stand-in arrays as plain NumPy views (also inside tuples, lists and dicts)."""
    if isinstance(value, DeviceArray):
        return value.view(np.ndarray)
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


class DeviceArray(np.ndarray):
    """What passes for a CuPy array: a NumPy array whose host conversions are logged."""

    namespace = None  # the CountingCupy that logs, set when it is installed

    def _read(self, name):
        type(self).namespace.events.append(Event(kind="read", name=name))

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        result = getattr(ufunc, method)(*_plain(inputs), **_plain(kwargs))
        out = kwargs.get("out")
        return type(self).namespace.made(f"{ufunc.__name__}.{method}" if method != "__call__" else ufunc.__name__,
                                         result, out=out is not None)

    def __float__(self):
        self._read("float")
        return float(self.view(np.ndarray))

    def __int__(self):
        self._read("int")
        return int(self.view(np.ndarray))

    def __index__(self):
        self._read("index")
        return self.view(np.ndarray).__index__()

    def __bool__(self):
        self._read("bool")
        return bool(self.view(np.ndarray))

    def item(self, *args):
        self._read("item")
        return self.view(np.ndarray).item(*args)

    def tolist(self):
        self._read("tolist")
        return self.view(np.ndarray).tolist()

    def __array__(self, dtype=None, copy=None):
        self._read("__array__")
        plain = self.view(np.ndarray)
        return plain if dtype is None else plain.astype(dtype)

    def get(self):
        self._read("get")
        return np.array(self.view(np.ndarray))

    def __getitem__(self, key):
        if _boolean_key(key):
            type(self).namespace.events.append(Event(kind="mask", name="boolean indexing"))
        return super().__getitem__(key)

    def __setitem__(self, key, value):
        if _boolean_key(key):
            type(self).namespace.events.append(Event(kind="mask", name="boolean-mask assignment"))
        super().__setitem__(key, value)


def _boolean_key(key) -> bool:
    """Whether an index holds a boolean array (an index array and a sync on CuPy)."""
    keys = key if isinstance(key, tuple) else (key,)
    return any(isinstance(k, np.ndarray) and k.dtype == np.bool_ and k.ndim > 0 for k in keys)


class CountingCupy(types.ModuleType):
    """The namespace: NumPy's functions, logged, with the few CUDA hooks the package touches."""

    def __init__(self):
        super().__init__("cupy")
        self.ndarray = DeviceArray
        self.events = []
        pool = SimpleNamespace(free_bytes=lambda: 0, used_bytes=lambda: 0, get_limit=lambda: 0,
                               free_all_blocks=lambda: None)
        self.get_default_memory_pool = lambda: pool
        stream = SimpleNamespace(synchronize=lambda: self.events.append(Event(kind="sync", name="synchronize")))
        runtime = SimpleNamespace(memGetInfo=lambda: (8 << 30, 16 << 30), getDeviceCount=lambda: 1)
        self.cuda = SimpleNamespace(runtime=runtime, get_current_stream=lambda: stream)
        self.lib = np.lib

    def made(self, name, result, *, out=False):
        """Log an operation and hand its array results back as stand-in arrays."""
        if isinstance(result, tuple):
            return tuple(self.made(name, r, out=out) for r in result)
        if isinstance(result, (np.ndarray, np.generic)):
            array = np.asarray(result)
            self.events.append(Event(kind="op", name=name, dtype=array.dtype, shape=array.shape, out=out))
            return array.view(DeviceArray)
        self.events.append(Event(kind="op", name=name, dtype=None, shape=None, out=out))
        return result

    def __getattr__(self, name):
        value = getattr(np, name)
        if not callable(value) or isinstance(value, type):
            return value

        def call(*args, **kwargs):
            return self.made(name, value(*_plain(args), **_plain(kwargs)), out="out" in kwargs)

        return call

    def asarray(self, value, dtype=None):
        return self.made("asarray", np.array(_plain(value), dtype=dtype))

    def asnumpy(self, value):
        if isinstance(value, DeviceArray):
            return value.get()
        return np.asarray(value)

    # counting helpers for the tests

    def clear(self):
        self.events.clear()

    def ops(self):
        return [e for e in self.events if e.kind == "op"]

    def reads(self):
        return [e for e in self.events if e.kind == "read"]

    def masks(self):
        return [e for e in self.events if e.kind == "mask"]


class CountingNdimage(types.ModuleType):
    """``cupyx.scipy.ndimage`` of the stand-in: SciPy's, each call logged as an operation."""

    def __init__(self, namespace):
        super().__init__("cupyx.scipy.ndimage")
        self.namespace = namespace

    def __getattr__(self, name):
        import scipy.ndimage

        value = getattr(scipy.ndimage, name)

        def call(*args, **kwargs):
            return self.namespace.made(name, value(*_plain(args), **_plain(kwargs)), out="output" in kwargs)

        return call


def modules() -> dict:
    """The stand-in modules by name: ``cupy`` and ``cupyx.scipy.ndimage`` (with its parents)."""
    namespace = CountingCupy()
    ndimage = CountingNdimage(namespace)
    scipy_ = types.ModuleType("cupyx.scipy")
    scipy_.ndimage = ndimage
    cupyx = types.ModuleType("cupyx")
    cupyx.scipy = scipy_
    return {"cupy": namespace, "cupyx": cupyx, "cupyx.scipy": scipy_, "cupyx.scipy.ndimage": ndimage}


def install(monkeypatch) -> CountingCupy:
    """Put a fresh CountingCupy (and its ndimage) in ``sys.modules`` for one test."""
    import sys

    found = modules()
    for name, module in found.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(DeviceArray, "namespace", found["cupy"])
    return found["cupy"]


def to_stand_in(array):
    """A NumPy array as a stand-in device array (a view: no copy, nothing logged)."""
    return np.asarray(array).view(DeviceArray)
