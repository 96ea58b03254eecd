"""Small assertions and constants shared by the tests."""

import os
import tracemalloc
from pathlib import Path

import numpy as np

# The real data sets beside the project (``shared/data``), or ``GGRAD_DATA``;
# tests that read them skip where they are absent.
DATA = Path(os.environ.get("GGRAD_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


def assert_backend(result, xp):
    """The result lives in ``xp`` (NumPy in, NumPy out; CuPy in, CuPy out)."""
    assert isinstance(result, xp.ndarray), f"expected {xp.__name__}.ndarray, got {type(result)}"


def host(x):
    """A NumPy copy of a NumPy or CuPy array."""
    return x.get() if hasattr(x, "get") else np.asarray(x)


# The range: rotations within +-5 deg, scale within +-5 %, shear 0.02,
# shifts up to 45 guide pixels; the cube 5x coarser than the guide, with noise.
MISREGISTRATIONS = [
    {"rotation_deg": 1.5, "scale": 1.02, "shift": (6, -9)},
    {"rotation_deg": 5, "scale": 1.05, "shear": 0.02, "shift": (30, -20)},
    {"rotation_deg": -5, "scale": 0.95, "shear": -0.02, "shift": (-45, 10)},
    {"rotation_deg": 0, "scale": 1.0, "shift": (0, 0)},
    {"rotation_deg": 3, "scale": 0.97, "shift": (15, 40)},
    {"rotation_deg": -2, "scale": 1.03, "shear": 0.02, "shift": (-30, -35)},
    {"rotation_deg": 4, "scale": 0.96, "shift": (40, -5)},
    {"rotation_deg": -4, "scale": 1.0, "shear": -0.02, "shift": (-10, 45)},
]


def has_module(name):
    """Whether ``name`` imports (an optional dependency such as zarr or h5py)."""
    try:
        __import__(name)
    except ImportError:
        return False
    return True


def traced(call):
    """``call()`` and the peak of the memory allocated while it ran (tracemalloc)."""
    tracemalloc.start()
    try:
        result = call()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# ``python -c SLOW_CHUNKS ARGS`` runs ``python -m ggrad_gpu ARGS`` with every resumable chunk from
# the second on taking a second longer to write: an interruption test that waits for two chunks
# finds the run still going, so its signal lands mid-run on any machine (the chunks are the same).
SLOW_CHUNKS = """
import runpy, sys, threading, time
from ggrad_gpu.io.resumable import ResumableArray

real, lock, written = ResumableArray.write, threading.Lock(), []

def write(self, index, block):
    real(self, index, block)
    with lock:
        written.append(index)
        slow = len(written) >= 2
    if slow:
        time.sleep(1.0)

ResumableArray.write = write
sys.argv[0] = "ggrad"
runpy.run_module("ggrad_gpu", run_name="__main__", alter_sys=True)
"""
