"""The machine's limits and identity, for the stage benchmarks' fractions of peak.

CPU (measured here, in-process, once per run): memory bandwidth as
``np.copyto`` of a large float32 array (read + write; NumPy copies on one
thread), and the GEMM rate ``a @ b`` of square float32 and float64 matrices
(2 n^3 flops; BLAS on all its threads).

GPU (CuPy, only when asked for and usable): the data-sheet memory bandwidth
from the device's memory clock and bus width, ``2 * clock_kHz * 1e3 *
bus_bits / 8`` (double data rate), and measured: a device-to-device
``cupy.copyto`` (read + write), the cuBLAS GEMM rate in float32 and float64
and a pageable host-to-device copy, each timed with CUDA events after a warm-up.
CUDA 13 dropped ``memoryClockRate`` from ``cudaDeviceProp``; the clock is then
read with ``cudaDeviceGetAttribute``.

Identity: CPU model and cores, NumPy (and its BLAS), SciPy, Python; device
name, compute capability, memory, CUDA driver and runtime versions, CuPy.
"""

from __future__ import annotations

import functools
import os
import platform
import time

import numpy as np
import scipy

__all__ = ["cpu_peaks", "environment", "gpu_peaks", "peak_for"]

# cudaDeviceAttr values (driver_types.h); stable across CUDA releases.
_ATTR_MEMORY_CLOCK_RATE = 36  # kHz
_ATTR_GLOBAL_MEMORY_BUS_WIDTH = 37  # bits


def _best_seconds(call, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best


@functools.cache
def cpu_peaks(quick: bool = False) -> dict:
    """Measured CPU limits: copy bandwidth (GB/s) and GEMM rates (GFLOP/s).

    ``quick`` uses smaller operands (for smoke tests): rougher, a fraction of a second.
    """
    copy_bytes = (64 << 20) if quick else (512 << 20)
    n = 1024 if quick else 2048
    src = np.ones(copy_bytes // 4, dtype=np.float32)
    dst = np.zeros_like(src)  # zeros, then a copy: the pages are touched before timing
    np.copyto(dst, src)
    copy_s = _best_seconds(functools.partial(np.copyto, dst, src), 3 if quick else 5)
    del src, dst
    rng = np.random.default_rng(0)
    gemm = {}
    for dtype in ("float32", "float64"):
        a = rng.standard_normal((n, n)).astype(dtype)
        b = rng.standard_normal((n, n)).astype(dtype)
        out = np.empty((n, n), dtype=dtype)
        np.matmul(a, b, out=out)  # warm-up: BLAS threads start
        seconds = _best_seconds(functools.partial(np.matmul, a, b, out=out), 2 if quick else 3)
        gemm[dtype] = 2 * n**3 / seconds / 1e9
    return {
        "copy_gbps": 2 * copy_bytes / copy_s / 1e9,
        "copy_bytes": 2 * copy_bytes,
        "copy_method": "np.copyto of a float32 array, read + write, one thread",
        "gemm_gflops": gemm,
        "gemm_n": n,
        "gemm_method": "a @ b, square n x n operands, 2 n^3 flops, best of a few",
    }


def _device_attribute(runtime, props: dict, key: str, attribute: int, device: int) -> int:
    value = props.get(key)
    if value:
        return int(value)
    return int(runtime.deviceGetAttribute(attribute, device))


def _event_seconds(cupy, call, repeats: int) -> float:
    """Best seconds of ``call`` over ``repeats``, timed with CUDA events after one warm-up."""
    call()
    cupy.cuda.Device().synchronize()
    best = float("inf")
    for _ in range(repeats):
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        call()
        stop.record()
        stop.synchronize()
        best = min(best, cupy.cuda.get_elapsed_time(start, stop) / 1e3)
    return best


@functools.cache
def gpu_peaks(quick: bool = False) -> dict | None:
    """Device identity and limits, or None where CuPy is not usable.

    Measured operands: 1 GiB copies and 8192 x 8192 GEMMs (``quick``: 128 MiB, 2048).
    """
    from ggrad_gpu._backend import cupy_usable

    usable, _ = cupy_usable()
    if not usable:
        return None
    import cupy

    runtime = cupy.cuda.runtime
    device = cupy.cuda.Device()
    index = device.id
    props = runtime.getDeviceProperties(index)
    name = props.get("name", b"")
    name = name.decode(errors="replace") if isinstance(name, bytes) else str(name)
    clock_khz = _device_attribute(runtime, props, "memoryClockRate", _ATTR_MEMORY_CLOCK_RATE, index)
    bus_bits = _device_attribute(runtime, props, "memoryBusWidth", _ATTR_GLOBAL_MEMORY_BUS_WIDTH, index)
    spec_gbps = 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9

    copy_bytes = (128 << 20) if quick else (1 << 30)
    src = cupy.ones(copy_bytes // 4, dtype=cupy.float32)
    dst = cupy.empty_like(src)
    copy_s = _event_seconds(cupy, functools.partial(cupy.copyto, dst, src), 5 if quick else 10)
    host = np.ones(copy_bytes // 4, dtype=np.float32)
    h2d_s = _event_seconds(cupy, functools.partial(dst.set, host), 2 if quick else 3)
    del src, dst, host

    n = 2048 if quick else 8192
    gemm = {}
    for dtype in (np.float32, np.float64):
        a = cupy.random.random_sample((n, n), dtype=dtype)
        b = cupy.random.random_sample((n, n), dtype=dtype)
        seconds = _event_seconds(cupy, functools.partial(cupy.matmul, a, b), 3 if quick else 5)
        gemm[np.dtype(dtype).name] = 2 * n**3 / seconds / 1e9
        del a, b
    cupy.get_default_memory_pool().free_all_blocks()
    return {
        "name": name,
        "index": index,
        "compute_capability": f"{props.get('major', '?')}.{props.get('minor', '?')}",
        "multiprocessors": props.get("multiProcessorCount"),
        "total_memory_bytes": int(props.get("totalGlobalMem", 0)) or None,
        "memory_clock_khz": clock_khz,
        "memory_bus_bits": bus_bits,
        "spec_bandwidth_gbps": spec_gbps,
        "copy_gbps": 2 * copy_bytes / copy_s / 1e9,
        "copy_bytes": 2 * copy_bytes,
        "copy_method": "cupy.copyto of a float32 array on the device, read + write, CUDA events",
        "h2d_gbps": copy_bytes / h2d_s / 1e9,
        "h2d_method": "ndarray.set from pageable host memory, CUDA events",
        "gemm_gflops": gemm,
        "gemm_n": n,
        "gemm_method": "cupy.matmul (cuBLAS), square n x n operands, 2 n^3 flops, CUDA events",
        "tf32": os.environ.get("CUPY_TF32", "0"),
        "driver_version": runtime.driverGetVersion(),
        "runtime_version": runtime.runtimeGetVersion(),
        "cupy_version": cupy.__version__,
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _blas() -> str | None:
    """NumPy's BLAS, as its build configuration names it (NumPy >= 1.26), else None."""
    try:
        config = np.show_config(mode="dicts")
        blas = config["Build Dependencies"]["blas"]
        return f"{blas.get('name', '?')} {blas.get('version', '')}".strip()
    except Exception:
        return None


def environment(*, gpu: bool, quick: bool = False) -> dict:
    """Everything a result table needs to be read against: identity and limits.

    Parameters
    ----------
    gpu : bool
        Also describe and measure the GPU (only where CuPy is usable; no
        CuPy import otherwise).
    quick : bool
        Smaller measurement operands (smoke tests).
    """
    try:
        usable_cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable_cores = os.cpu_count()
    env = {
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "numpy": np.__version__,
        "numpy_blas": _blas(),
        "scipy": scipy.__version__,
        "cpu": {
            "model": _cpu_model(),
            "logical_cores": os.cpu_count(),
            "usable_cores": usable_cores,
            **cpu_peaks(quick),
        },
        "gpu": None,
    }
    if gpu:
        try:
            env["gpu"] = gpu_peaks(quick)
        except Exception as exc:  # e.g. out of device memory: report it, keep the CPU figures
            env["gpu"] = {"error": f"{type(exc).__name__}: {exc}"}
    return env


def peak_for(env: dict, backend: str, kind: str | None) -> tuple[float | None, float | None]:
    """The measured limit (and the data-sheet one, GPU bandwidth only) for a stage.

    Parameters
    ----------
    env : dict
        From :func:`environment`.
    backend : {"numpy", "cupy", "scipy"}
        "scipy" (the plain reference) runs on the CPU.
    kind : {"bandwidth", "float32", "float64"} or None

    Returns
    -------
    peak, spec : float or None
        GB/s for "bandwidth", GFLOP/s for a GEMM dtype.
    """
    if kind is None:
        return None, None
    limits = env.get("gpu") if backend == "cupy" else env.get("cpu")
    if not limits:
        return None, None
    if kind == "bandwidth":
        return limits.get("copy_gbps"), limits.get("spec_bandwidth_gbps")
    return limits.get("gemm_gflops", {}).get(kind), None
