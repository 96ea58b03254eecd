"""Run one stage in this process under a real memory limit; print what happened as JSON.

``python tests/memory_harness.py [SCENARIO ...]`` is what ``test_memory``
starts in a child process (Linux only). The limit is the address-space rlimit
(``RLIMIT_AS``), set just before the call to the memory in use plus a stated
headroom, so any allocation beyond it fails with NumPy's own
``MemoryError``, as it would on a full machine: nothing in the package is
patched. The only knob turned is the public block budget
(``ggrad_gpu._memory.CPU_BLOCK_BYTES``) or a stage's own ``rows`` keyword,
set so that the first try is one block of everything and must be retried
smaller to fit.

The parent sets the environment: one BLAS thread (OpenBLAS's threaded GEMM
aborts the process when its own ``malloc`` fails) and a fixed glibc mmap
threshold, so that every array is its own mapping and is returned to the
system when freed; otherwise freed heap would count as room.

Every scenario first runs the stage without a limit (the reference; this also
loads what the stage imports lazily and warms BLAS), measures its peak with
``tracemalloc``, then runs it again with a headroom of the output plus a
quarter of the rest of that peak.
"""

from __future__ import annotations

import json
import resource
import sys
from contextlib import contextmanager

import numpy as np

from helpers import traced  # this script runs from the tests folder

# What OpenBLAS maps for a product beyond tracemalloc's sight, given to the scenarios whose BLAS call would
# otherwise meet the limit first (it dies there, SIGSEGV, rather than report the failed allocation).
LIBRARY_BYTES = 4 << 20

AFFINE = np.array([[0.93, 0.05, 1.7], [-0.04, 0.88, 2.3], [0, 0, 1]])


def address_space() -> int:
    """Bytes of address space this process has mapped (``VmSize``)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


@contextmanager
def memory_limit(headroom: int):
    """Allow at most ``headroom`` more bytes of address space inside the block."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (address_space() + int(headroom), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))



def random_cube(shape, seed=0):
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def nbytes(result) -> int:
    return int(result.nbytes) if isinstance(result, np.ndarray) else 0


def under_a_limit(call, compare, output_bytes=None, share=4, library_bytes=0):
    """Run ``call`` without, then with, a limit below what it used; a JSON-able summary.

    The headroom is the output plus ``1 / share`` of the rest of the peak,
    plus ``library_bytes`` for what a library maps beyond ``tracemalloc``'s
    sight (OpenBLAS's own buffers: it does not survive a failed ``malloc``).
    ``enforced`` says whether, under that limit, one allocation of the peak
    fails, i.e. whether the first run's way of working cannot fit (the limit
    is real on this system).
    """
    reference, peak = traced(call)
    output = nbytes(reference) if output_bytes is None else output_bytes
    headroom = output + (peak - output) // share + library_bytes
    record = {"peak": peak, "output": output, "headroom": headroom, "error": None}
    with memory_limit(headroom):
        try:
            np.empty(peak, np.uint8)
            record["enforced"] = False
        except MemoryError:
            record["enforced"] = True
    try:
        with memory_limit(headroom):
            result = call()
    except MemoryError as error:
        record["error"] = f"{type(error).__name__}: {error}"
        return record
    record.update(compare(result, reference))
    return record


def identical(a, b):
    return {"identical": bool(np.array_equal(a, b, equal_nan=True))}


def close(rtol):
    def compare(a, b):
        a, b = (np.asarray(x, np.float64) for x in (a, b))
        scale = max(float(np.nanmax(np.abs(b))), 1e-300)
        return {"max_difference": float(np.nanmax(np.abs(a - b))) / scale, "tolerance": rtol}

    return compare


# --------------------------------------------------------------------------- scenarios


def warp(order):
    from ggrad_gpu import _memory, warp_cube

    _memory.CPU_BLOCK_BYTES = 1 << 40  # the first try: all output pixels and all bands in one block
    cube = random_cube((128, 128, 96), seed=1)
    cube[3, 4, 2] = np.nan
    return under_a_limit(lambda: warp_cube(cube, AFFINE, (140, 150), order=order), identical)


def sobel_blocks():
    from ggrad_gpu.core.filters import iter_sobel_blocks

    cube = random_cube((160, 128, 96), seed=3)
    sizes = []

    def call():
        sizes.clear()
        out = np.empty(cube.shape, np.float32)
        for start, stop, block in iter_sobel_blocks(cube, rows=cube.shape[0]):  # one block asked for
            out[start:stop] = block
            sizes.append(stop - start)
        return out

    record = under_a_limit(call, identical, output_bytes=cube.nbytes)
    record["block_rows"] = sizes
    return record


def pyramid_step():
    from ggrad_gpu.core.pyramid import blur_decimate

    cube = random_cube((160, 128, 96), seed=7)
    # Fewer rows per product can round a few values differently (BLAS).
    return under_a_limit(lambda: blur_decimate(cube, rows=cube.shape[0]), close(1e-6))


def gram():
    from ggrad_gpu import sobel_magnitude
    from ggrad_gpu.core.estimate import level_gram

    cube = random_cube((160, 128, 96), seed=5)
    target = sobel_magnitude(random_cube((160, 128), seed=6))

    def call():
        gram, rhs = level_gram(cube, target, None, rows=cube.shape[0])
        return np.concatenate([np.ravel(gram), np.ravel(rhs)])

    # Smaller blocks sum the float32 products in another order.
    return under_a_limit(call, close(1e-5), output_bytes=0, library_bytes=LIBRARY_BYTES)


def estimate():
    from ggrad_gpu import estimate_global_gradient
    from ggrad_gpu.synthetic import make_phantom

    phantom = make_phantom(shape=(192, 224), bands=64, seed=11)
    guide, cube = phantom.guide, phantom.cube_on_guide

    def call():
        result = estimate_global_gradient(guide, cube, levels=3)
        return np.stack([result.grad_x, result.grad_y])

    return under_a_limit(call, close(1e-4), output_bytes=0, share=3)


def at_the_minimum(stage):
    """Room for the output and 64 KiB more: the stage's smallest chunk (one band, one row of
    one MiB) does not fit either, and the error names the stage."""
    from ggrad_gpu import sobel_magnitude, warp_cube
    from ggrad_gpu.core.estimate import level_gram

    wide = random_cube((8, 4096, 64), seed=8)  # one row: 1 MiB
    tall = random_cube((512, 512, 4), seed=9)  # one band: 1 MiB
    target = sobel_magnitude(wide[..., 0])
    calls = {
        "warp_cube": (lambda: warp_cube(tall, AFFINE, (60, 60), order=3), 60 * 60 * 4 * 4),
        "Sobel gradients": (lambda: sobel_magnitude(wide), wide.nbytes),
        "Gram matrices": (lambda: level_gram(wide, target, None), 0),
    }
    call, output = calls[stage]
    call()  # loads what the stage imports lazily
    try:
        with memory_limit(output + (64 << 10)):
            call()
    except MemoryError as error:
        return {"error": str(error)}
    return {"error": None}


SCENARIOS = {
    "warp-1": lambda: warp(1),
    "warp-3": lambda: warp(3),
    "sobel-blocks": sobel_blocks,
    "pyramid-step": pyramid_step,
    "gram": gram,
    "estimate": estimate,
    "minimum-warp_cube": lambda: at_the_minimum("warp_cube"),
    "minimum-Sobel gradients": lambda: at_the_minimum("Sobel gradients"),
    "minimum-Gram matrices": lambda: at_the_minimum("Gram matrices"),
}


def main(names):
    """Run the named scenarios (default: all), one after the other; print ``{name: record}``."""
    records = {}
    for name in names or SCENARIOS:
        try:
            records[name] = SCENARIOS[name]()
        except Exception as error:  # reported to the test, which fails with it
            records[name] = {"crash": f"{type(error).__name__}: {error}"}
    print(json.dumps(records))


if __name__ == "__main__":
    main(sys.argv[1:])
