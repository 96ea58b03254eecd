"""A stand-in for CuPy that runs on NumPy and logs what a GPU would pay for.

``CountingCupy`` is installed as ``sys.modules["cupy"]``; its ``ndarray`` is a
NumPy subclass, so the backend layer (``is_cupy_array``, ``array_module``)
takes its arrays for CuPy arrays and the package computes through it as it
would through CuPy. Every call through the namespace and every ufunc on its
arrays is an *operation* (a kernel launch on a GPU); every conversion of one of
its arrays to a host value (``float()``, ``int()``, ``bool()``, ``.item()``,
``.tolist()``, ``.get()``) is a *read* (a device-to-host copy and a sync).
``events`` holds both in order, with the dtype and shape of what each
operation made, so tests can count launches, find reads between two
products, and check intermediate dtypes.

It is as strict as CuPy where CuPy refuses, so that code which would fail on a
GPU fails here too:

- an *implicit* conversion to a NumPy array (``np.asarray``, ``np.array``,
  ``np.ascontiguousarray`` of a device array, or anything that calls
  ``__array__``) raises CuPy's ``TypeError``; ``.get()`` and
  ``cupy.asnumpy`` are the explicit ways;
- a NumPy array in an elementwise operation with a device array (``dev *
  host``), or beside device arrays in a CuPy function, raises ``TypeError``,
  as CuPy's kernels do;
- only names CuPy provides are served (:data:`CUPY_NAMES`, written out from
  CuPy's own ``__init__`` files), and only the ``cupyx.scipy.ndimage``
  functions CuPy has (:data:`CUPYX_NDIMAGE_NAMES`); any other name is an
  ``AttributeError``, as it is on CuPy;
- a NumPy function called on a device array dispatches to the stand-in's
  function of the same name (CuPy's ``__array_function__``), and is a
  ``TypeError`` where CuPy has none.
"""

from __future__ import annotations

import functools
import types
from types import SimpleNamespace

import numpy as np

# CuPy's top-level names: cupy/__init__.py of CuPy's main branch (commit
# 6b6d9563c4f7, August 2026), the names it imports or defines, without the
# private ones. Written out, so that a NumPy function CuPy lacks is not served.
CUPY_NAMES = frozenset("""
    483
    AxisError ComplexWarning DataSource ElementwiseKernel Inf Infinity ModuleDeprecationWarning NAN NINF NZERO NaN
    PINF PZERO RankWarning RawKernel RawModule ReductionKernel TooHardError VisibleDeprecationWarning abs absolute
    acos acosh add all allclose alltrue amax amin angle annotations any append apply_along_axis apply_over_axes
    arange arccos arccosh arcsin arcsinh arctan arctan2 arctanh argmax argmin argpartition argsort argwhere around
    array array2string array_equal array_equiv array_repr array_split array_str asanyarray asarray asarray_chkfinite
    ascontiguousarray asfarray asfortranarray asin asinh asnumpy astype atan atan2 atanh atleast_1d atleast_2d
    atleast_3d average bartlett base_repr binary_repr bincount bitwise_and bitwise_count bitwise_invert
    bitwise_left_shift bitwise_not bitwise_or bitwise_right_shift bitwise_xor blackman bool bool_ broadcast
    broadcast_arrays broadcast_shapes broadcast_to byte byte_bounds c_ can_cast cbrt cdouble ceil cfloat choose
    clear_memo clip column_stack common_type complex128 complex64 complex_ complexfloating compress concat
    concatenate conj conjugate convolve copy copysign copyto corrcoef correlate cos cosh count_nonzero cov cross
    csingle cuda cumprod cumproduct cumsum cumulative_prod cumulative_sum deg2rad degrees delete diag diag_indices
    diag_indices_from diagflat diagonal diff digitize disable_experimental_feature_warning disp divide divmod dot
    double dsplit dstack dtype e ediff1d einsum empty empty_like equal euler_gamma exceptions exp exp2 expand_dims
    expm1 extract eye fabs fft fill_diagonal find_common_type finfo fix flatiter flatnonzero flip fliplr flipud
    float16 float32 float64 float_ float_power floating floor floor_divide fmax fmin fmod format_float_positional
    format_float_scientific format_parser frexp fromDlpack from_dlpack frombuffer fromfile fromfunction fromiter
    fromstring full full_like fuse gcd generic genfromtxt get_array_module get_array_wrap get_default_memory_pool
    get_default_pinned_memory_pool get_printoptions gradient greater greater_equal half hamming hanning heaviside
    histogram histogram2d histogramdd hsplit hstack hypot i0 identity iinfo imag in1d index_exp indices inexact inf
    infty inner int16 int32 int64 int8 int_ intc integer interp intersect1d intp invert is_available isclose
    iscomplex iscomplexobj isdtype isfinite isfortran isin isinf isnan isneginf isposinf isreal isrealobj isscalar
    issctype issubclass_ issubdtype issubsctype iterable ix_ kaiser kron lcm ldexp left_shift less less_equal
    lexsort linalg linspace load loadtxt log log10 log1p log2 logaddexp logaddexp2 logical_and logical_not
    logical_or logical_xor logspace long longlong make_aligned_dtype mask_indices matmul matrix_transpose max
    maximum may_share_memory mean median memoize meshgrid mgrid min min_scalar_type minimum mintypecode mod modf
    moveaxis msort multiply nan nan_to_num nanargmax nanargmin nancumprod nancumsum nanmax nanmean nanmedian nanmin
    nanprod nanstd nansum nanvar ndarray ndim ndindex negative newaxis nextafter nonzero not_equal number obj2sctype
    ogrid ones ones_like outer packbits pad partition percentile permute_dims pi piecewise place poly poly1d polyadd
    polyfit polymul polynomial polysub polyval positive pow power printoptions prod product promote_types ptp put
    put_along_axis putmask quantile r_ rad2deg radians random ravel ravel_multi_index real real_if_close reciprocal
    remainder repeat require reshape resize result_type right_shift rint roll rollaxis roots rot90 round round_
    row_stack s_ safe_eval save savetxt savez savez_compressed sctype2char searchsorted select set_printoptions
    set_string_function setdiff1d setxor1d shape shares_memory short show_config sign signbit signedinteger sin sinc
    single singlecomplex sinh size sometrue sort sort_complex split sqrt square squeeze stack std subtract sum
    swapaxes take take_along_axis tan tanh tensordot testing tile trace transpose trapezoid trapz tri tril
    tril_indices tril_indices_from trim_zeros triu triu_indices triu_indices_from true_divide trunc typename ubyte
    ufunc uint uint16 uint32 uint64 uint8 uintc uintp ulong ulonglong union1d unique unique_all unique_counts
    unique_inverse unique_values unpackbits unravel_index unsignedinteger unwrap ushort vander var vdot vectorize
    vsplit vstack where who zeros zeros_like
""".split())

# cupy/linalg/__init__.py, cupy/fft/__init__.py and cupy/lib/stride_tricks.py of the same commit.
CUPY_SUBMODULE_NAMES = {
    "linalg": frozenset("""cholesky cond cross det eig eigh eigvals eigvalsh inv lstsq matmul matrix_power matrix_rank
        matrix_transpose norm pinv qr slogdet solve svd tensorinv tensorsolve LinAlgError""".split()),
    "fft": frozenset("""fft fft2 fftfreq fftn fftshift hfft ifft ifft2 ifftn ifftshift ihfft irfft irfft2 irfftn rfft
        rfft2 rfftfreq rfftn""".split()),
    "lib.stride_tricks": frozenset({"as_strided", "sliding_window_view"}),
}

# cupyx/scipy/ndimage/__init__.py of the same commit.
CUPYX_NDIMAGE_NAMES = frozenset("""
    correlate convolve correlate1d convolve1d uniform_filter1d uniform_filter gaussian_filter1d gaussian_filter
    prewitt sobel generic_laplace laplace gaussian_laplace generic_gradient_magnitude gaussian_gradient_magnitude
    minimum_filter maximum_filter minimum_filter1d maximum_filter1d median_filter rank_filter percentile_filter
    generic_filter generic_filter1d fourier_ellipsoid fourier_gaussian fourier_shift fourier_uniform
    affine_transform map_coordinates rotate shift spline_filter spline_filter1d zoom find_objects label sum
    sum_labels mean variance standard_deviation minimum maximum minimum_position maximum_position median extrema
    center_of_mass histogram labeled_comprehension value_indices generate_binary_structure iterate_structure
    binary_erosion binary_dilation binary_opening binary_closing binary_hit_or_miss binary_fill_holes
    binary_propagation grey_erosion grey_dilation grey_closing grey_opening morphological_gradient
    morphological_laplace white_tophat black_tophat distance_transform_edt
""".split())

# CuPy's message for an implicit device-to-host conversion (cupy/_core/core.pyx, ndarray.__array__).
IMPLICIT = ("Implicit conversion to a NumPy array is not allowed. "
            "Please use `.get()` to construct a NumPy array explicitly.")

# NumPy's host constructors, kept before install() replaces them with ones that refuse device arrays.
_HOST_CONSTRUCTORS = {name: getattr(np, name) for name in
                      ("array", "asarray", "asanyarray", "ascontiguousarray", "asfortranarray")}


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
        _refuse_host_arrays(ufunc.__name__, inputs + tuple(kwargs.get("out") or ()), everywhere=True)
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
        raise TypeError(IMPLICIT)

    def __array_function__(self, func, types, args, kwargs):
        # CuPy's: the CuPy function of the same module path and name, or NotImplemented
        # (NumPy then raises TypeError) where CuPy has none.
        try:
            module = functools.reduce(getattr, func.__module__.split(".")[1:], type(self).namespace)
            twin = getattr(module, func.__name__)
        except AttributeError:
            return NotImplemented
        return twin(*args, **kwargs)

    def get(self):
        self._read("get")
        return _HOST_CONSTRUCTORS["array"](self.view(np.ndarray))

    def __getitem__(self, key):
        if _boolean_key(key):
            type(self).namespace.events.append(Event(kind="mask", name="boolean indexing"))
        return super().__getitem__(key)

    def __setitem__(self, key, value):
        if _boolean_key(key):
            type(self).namespace.events.append(Event(kind="mask", name="boolean-mask assignment"))
        super().__setitem__(key, value)


def _holds_device(value) -> bool:
    if isinstance(value, DeviceArray):
        return True
    return isinstance(value, (list, tuple)) and any(_holds_device(v) for v in value)


def _host_arrays(values):
    """The plain NumPy arrays among ``values`` (and inside list or tuple arguments)."""
    for value in values:
        if isinstance(value, (list, tuple)):
            yield from _host_arrays(value)
        elif isinstance(value, np.ndarray) and not isinstance(value, DeviceArray):
            yield value


def _refuse_host_arrays(name, args, *, everywhere=False):
    """CuPy's ``TypeError`` for a NumPy array passed to a kernel (with a device array, or anywhere for a ufunc)."""
    if not everywhere and not _holds_device(list(args)):
        return
    host = next(_host_arrays(args), None)
    if host is not None:
        raise TypeError(f"Unsupported type {type(host)} in cupy {name} (a NumPy array of shape {host.shape} "
                        "beside device arrays: CuPy never copies it to the device implicitly)")


def _refusing_constructor(name):
    """NumPy's ``name`` (``asarray``...), refusing device arrays as CuPy's ``__array__`` does."""
    original = _HOST_CONSTRUCTORS[name]

    @functools.wraps(original)
    def construct(value, *args, **kwargs):
        if _holds_device(value):
            raise TypeError(IMPLICIT)
        return original(value, *args, **kwargs)

    return construct


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
        self.cuda = SimpleNamespace(runtime=runtime, get_current_stream=lambda: stream,
                                    Device=lambda *args: SimpleNamespace(synchronize=stream.synchronize, id=0))
        self.linalg = Submodule(self, "linalg", np.linalg)
        self.fft = Submodule(self, "fft", np.fft)
        self.lib = SimpleNamespace(stride_tricks=Submodule(self, "lib.stride_tricks", np.lib.stride_tricks))

    def made(self, name, result, *, out=False):
        """Log an operation and hand its array results back as stand-in arrays."""
        if isinstance(result, tuple):
            return tuple(self.made(name, r, out=out) for r in result)
        if isinstance(result, (np.ndarray, np.generic)):
            array = _HOST_CONSTRUCTORS["asarray"](result)
            self.events.append(Event(kind="op", name=name, dtype=array.dtype, shape=array.shape, out=out))
            return array.view(DeviceArray)
        self.events.append(Event(kind="op", name=name, dtype=None, shape=None, out=out))
        return result

    def __getattr__(self, name):
        if name.startswith("__") or name not in CUPY_NAMES:
            raise AttributeError(f"module 'cupy' has no attribute {name!r} (the stand-in serves only CuPy's names)")
        return self.function(name, getattr(np, name))

    def function(self, name, value):
        """NumPy's ``value`` as the stand-in's ``name``: logged, device arrays out, refusing host arrays."""
        if not callable(value) or isinstance(value, type):
            return value

        def call(*args, **kwargs):
            _refuse_host_arrays(name, list(args) + list(kwargs.values()), everywhere=isinstance(value, np.ufunc))
            return self.made(name, value(*_plain(args), **_plain(kwargs)), out="out" in kwargs)

        return call

    def asarray(self, value, dtype=None):
        return self.made("asarray", _HOST_CONSTRUCTORS["array"](_plain(value), dtype=dtype))

    def asnumpy(self, value):
        if isinstance(value, DeviceArray):
            return value.get()
        return _HOST_CONSTRUCTORS["asarray"](value)

    # counting helpers for the tests

    def clear(self):
        self.events.clear()

    def ops(self):
        return [e for e in self.events if e.kind == "op"]

    def reads(self):
        return [e for e in self.events if e.kind == "read"]

    def masks(self):
        return [e for e in self.events if e.kind == "mask"]


class Submodule(types.ModuleType):
    """``cupy.linalg``, ``cupy.fft``, ``cupy.lib.stride_tricks`` of the stand-in: CuPy's names, logged."""

    def __init__(self, namespace, name, numpy_module):
        super().__init__(f"cupy.{name}")
        self.namespace, self.key, self.numpy_module = namespace, name, numpy_module

    def __getattr__(self, name):
        if name.startswith("__") or name not in CUPY_SUBMODULE_NAMES[self.key]:
            raise AttributeError(f"module 'cupy.{self.key}' has no attribute {name!r}")
        return self.namespace.function(f"{self.key}.{name}", getattr(self.numpy_module, name))


class CountingNdimage(types.ModuleType):
    """``cupyx.scipy.ndimage`` of the stand-in: SciPy's functions that cupyx has, each call logged.

    The image (first argument) must be a device array, as cupyx's kernels need.
    """

    def __init__(self, namespace):
        super().__init__("cupyx.scipy.ndimage")
        self.namespace = namespace

    def __getattr__(self, name):
        import scipy.ndimage

        if name.startswith("__") or name not in CUPYX_NDIMAGE_NAMES:
            raise AttributeError(f"module 'cupyx.scipy.ndimage' has no attribute {name!r}")
        value = getattr(scipy.ndimage, name)

        def call(*args, **kwargs):
            if args and isinstance(args[0], np.ndarray) and not isinstance(args[0], DeviceArray):
                raise TypeError(f"cupyx.scipy.ndimage.{name} got a NumPy array; it takes CuPy arrays")
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
    for name in _HOST_CONSTRUCTORS:  # np.asarray(device array) raises, as CuPy's __array__ does
        monkeypatch.setattr(np, name, _refusing_constructor(name))
    return found["cupy"]


def to_stand_in(array):
    """A NumPy array as a stand-in device array (a view: no copy, nothing logged)."""
    return _HOST_CONSTRUCTORS["asarray"](array).view(DeviceArray)
