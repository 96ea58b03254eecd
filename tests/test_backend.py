import subprocess
import sys
import types

import numpy as np
import pytest
import scipy.ndimage

from ggrad_gpu import _backend, _memory, estimate_global_gradient, metrics, register_affine
from ggrad_gpu._backend import array_module, ndimage_module, resolve_backend, to_device, to_host
from ggrad_gpu._memory import block_rows


def test_array_module_numpy_and_scalars():
    assert array_module(a=np.zeros(3), b=None, c=2.0) is np
    assert array_module() is np


def test_ndimage_module_numpy():
    assert ndimage_module(np) is scipy.ndimage


def test_resolve_backend_numpy_and_bad_names():
    assert resolve_backend("numpy") is np
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("torch")


def test_cupy_requested_without_device_is_an_error():
    usable, _ = _backend.cupy_usable()
    if usable:
        pytest.skip("a CUDA device is usable here")
    with pytest.raises(RuntimeError, match='backend="cupy"'):
        resolve_backend("cupy")
    assert resolve_backend("auto") is np


def test_import_does_not_import_cupy():
    code = "import sys, ggrad_gpu; ggrad_gpu.estimate_global_gradient; print('cupy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_numpy_backend_never_imports_cupy():
    code = (
        "import sys, ggrad_gpu\n"
        "from ggrad_gpu._backend import resolve_backend\n"
        "resolve_backend('numpy')\n"
        "p = ggrad_gpu.synthetic.make_phantom(shape=(40, 48), bands=8)\n"
        "ggrad_gpu.estimate_global_gradient(p.guide, p.cube_on_guide, levels=2)\n"
        "print('cupy' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_transfers_round_trip(xp):
    x = np.arange(6.0).reshape(2, 3)
    on = to_device(x, xp)
    assert isinstance(on, xp.ndarray)
    np.testing.assert_array_equal(to_host(on), x)


@pytest.fixture
def stand_in_cupy(monkeypatch):
    """A stand-in ``cupy`` module whose ``ndarray`` is a NumPy subclass: what the backend layer checks.

    ``is_cupy_array`` looks for ``sys.modules["cupy"].ndarray`` and never imports
    CuPy, so views of NumPy arrays as this class pass for CuPy arrays; the
    public functions' checks see a real array and reach the backend decision.
    """
    module = types.ModuleType("cupy")
    module.ndarray = type("ndarray", (np.ndarray,), {"__module__": "cupy"})
    monkeypatch.setitem(sys.modules, "cupy", module)
    return module


def test_stand_in_is_what_the_backend_layer_takes_for_cupy(stand_in_cupy):
    on_device = np.zeros(2).view(stand_in_cupy.ndarray)
    assert _backend.is_cupy_array(on_device) and not _backend.is_cupy_array(np.zeros(2))
    assert array_module(guide=on_device, cube=on_device) is stand_in_cupy


@pytest.mark.parametrize("device_first", [False, True])
def test_mixed_arrays_name_both_parameters(stand_in_cupy, device_first):
    host, device = np.zeros(2), np.zeros(2).view(stand_in_cupy.ndarray)
    arrays = {"guide": device, "cube": host} if device_first else {"guide": host, "cube": device}
    with pytest.raises(TypeError, match="guide.*cube|cube.*guide"):
        array_module(**arrays)


MIXED_CALLS = {
    "estimate_global_gradient": (lambda g, c, d: estimate_global_gradient(g, d(c), levels=2), ("guide", "cube")),
    "estimate_global_gradient, guide on the device": (
        lambda g, c, d: estimate_global_gradient(d(g), c, levels=2), ("guide", "cube")),
    "register_affine": (lambda g, c, d: register_affine(g, d(g)), ("fixed", "moving")),
    "ncc": (lambda g, c, d: metrics.ncc(d(g), g), ("a", "b")),
}


@pytest.mark.parametrize("name", sorted(MIXED_CALLS))
def test_public_functions_refuse_mixed_arrays_naming_both(stand_in_cupy, name):
    # Data are never moved between host and device silently: a CuPy array
    # beside a NumPy one is a TypeError that names both parameters.
    rng = np.random.default_rng(0)
    guide, cube = rng.random((32, 32), dtype=np.float32), rng.random((32, 32, 3), dtype=np.float32)
    call, (first, second) = MIXED_CALLS[name]
    with pytest.raises(TypeError, match=rf"\b{first}\b.*\b{second}\b|\b{second}\b.*\b{first}\b"):
        call(guide, cube, lambda x: x.view(stand_in_cupy.ndarray))


@pytest.mark.gpu
def test_mixed_arrays_name_both_parameters_with_cupy():
    usable, reason = _backend.cupy_usable()
    if not usable:
        pytest.skip(reason)
    import cupy

    with pytest.raises(TypeError, match="guide.*cube|cube.*guide"):
        array_module(guide=np.zeros(2), cube=cupy.zeros(2))
    with pytest.raises(TypeError, match="fixed.*moving|moving.*fixed"):
        register_affine(np.zeros((16, 16), np.float32), cupy.zeros((16, 16), np.float32))


def test_block_rows_budget():
    assert block_rows((100, 10, 10), 4, np, target_bytes=4000) == 10
    assert block_rows((5, 1000, 1000), 8, np, target_bytes=1) == 1
    assert block_rows((5, 2), 4, np, target_bytes=10**9) == 5


def test_numpy_refine_never_imports_cupy():
    code = (
        "import sys, ggrad_gpu\n"
        "p = ggrad_gpu.synthetic.make_phantom(shape=(60, 70), bands=6, native_factor=2, seed=3)\n"
        "r = ggrad_gpu.refine(p.guide, p.cube, initial=p.initial, levels=2, backend='numpy')\n"
        "assert r.backend == 'numpy', r.backend\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('cupy', 'cupyx', 'cupy_backends', 'cucim')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_default_block_budget():
    assert _memory.default_block_bytes(np) == 8 << 20
    assert block_rows((1000, 100, 100), 4, np) == (8 << 20) // (100 * 100 * 4)


REQUIRED_GPU_TESTS = ["tests/test_parity.py::test_sobel_magnitude",  # skipped by a module-level skipif
                      "tests/test_backend.py::test_transfers_round_trip[cupy]"]  # conftest's xp parameter


@pytest.mark.slow  # over 0.75 s: the fast lane stays under a minute
@pytest.mark.parametrize("required", [False, True])
def test_require_gpu_turns_skipped_gpu_tests_into_failures(required):
    # A CuPy that does not import (sys.modules["cupy"] = None), in a pytest
    # of its own: without GGRAD_REQUIRE_GPU the gpu tests skip; with it, each
    # fails and says why, so a broken CUDA install cannot pass a GPU run.
    import os
    from pathlib import Path

    code = ("import sys; sys.modules['cupy'] = None; import pytest; "
            f"sys.exit(pytest.main(['-p', 'no:cacheprovider', '-q', '-rA', *{REQUIRED_GPU_TESTS!r}]))")
    env = {**os.environ, "GGRAD_REQUIRE_GPU": "1" if required else "0"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=Path(__file__).resolve().parents[1])
    if required:
        assert out.returncode == 1, out.stdout + out.stderr
        assert out.stdout.count("GGRAD_REQUIRE_GPU=1 but this gpu test was skipped: ") >= 2, out.stdout
        assert "CuPy does not import" in out.stdout
    else:
        assert out.returncode == 0 and "2 skipped" in out.stdout, out.stdout + out.stderr
