"""``ggrad refine`` on a cube beyond ``--memory-limit``: streamed, resumable, the same answer.

References: the in-memory ``ggrad refine`` of the same files, ``warp_cube`` of
the whole cube through the recorded matrices, and an uninterrupted streamed
run for the resumed one (bit for bit).
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from helpers import SLOW_CHUNKS, has_module

pytestmark = pytest.mark.skipif(not (has_module("dask") and has_module("zarr")), reason="needs dask and zarr")

from ggrad_gpu import io, warp_cube
from ggrad_gpu.cli.command import main
from ggrad_gpu.metrics import target_registration_error
from ggrad_gpu.synthetic import make_phantom

LIMIT = "350KB"  # the phantom cube below is 430 KB; the least that works: its guide (269 KB) and 4 store chunks


def _write_chunked(path, cube, chunk=8, **attributes):
    """A Zarr cube in small chunks (all bands), so that a limit below the cube's size can hold a task."""
    import zarr

    array = zarr.create_array(str(path), shape=cube.shape, chunks=(chunk, chunk, cube.shape[2]), dtype=cube.dtype)
    array[...] = cube
    array.attrs.update(attributes)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    phantom = make_phantom(shape=(240, 280), bands=40, seed=6, shift=(6.0, -5.0))  # the default phantom
    np.save(folder / "guide.npy", phantom.guide)
    _write_chunked(folder / "cube.zarr", phantom.cube, band_centres=np.linspace(500, 1800, 40).tolist(),
                   band_unit="cm-1")
    np.savetxt(folder / "initial.txt", phantom.initial)
    return folder, phantom


def _refine(files, out, *extra):
    folder, _ = files
    # The working grid given: under a small --memory-limit it would be coarsened to fit.
    return main(["refine", str(folder / "guide.npy"), str(folder / "cube.zarr"), "-o", str(out), "-q",
                 "--initial", str(folder / "initial.txt"), "--working-shape", "240", "280", *extra])


def _registered(out):
    import zarr

    return zarr.open_array(str(out / "registered.zarr"), mode="r")


@pytest.mark.slow
def test_a_cube_over_the_limit_is_streamed_and_matches_the_in_memory_run(files, tmp_path, capsys):
    _, phantom = files
    assert _refine(files, tmp_path / "memory", "--output-grid", "cube") == 0
    assert _refine(files, tmp_path / "streamed", "--memory-limit", LIMIT) == 0
    assert "streaming it chunk by chunk" in capsys.readouterr().err
    streamed = json.loads((tmp_path / "streamed" / "transform.json").read_text())
    in_memory = json.loads((tmp_path / "memory" / "transform.json").read_text())
    shape = phantom.guide.shape
    assert target_registration_error(np.array(streamed["matrix"]), np.array(in_memory["matrix"]), shape).max < 0.01
    assert streamed["improved"] and in_memory["improved"], (streamed["message"], in_memory["message"])
    tre = target_registration_error(np.array(streamed["matrix"]), phantom.matrix, shape)
    assert tre.mean < 0.35 and tre.max < 0.9, tre  # in memory: 0.146 / 0.380 px measured
    store = _registered(tmp_path / "streamed")
    assert store.attrs["complete"] is True and store.attrs["output_grid"] == "cube"
    assert store.chunks[:2] != store.shape[:2]  # really written in chunks
    assert not (tmp_path / "streamed" / "registered.zarr" / ".done").exists()
    reference = warp_cube(phantom.cube, np.array(streamed["matrix"]) @ np.array(store.attrs["output_to_guide"]),
                          store.shape[:2])
    np.testing.assert_array_equal(store[...], reference)
    assert {p.name for p in (tmp_path / "streamed").iterdir()} == {"registered.zarr", "transform.json",
                                                                   "weights.json", "report.png"}


@pytest.mark.slow  # over 0.75 s: the fast lane stays under a minute
def test_an_interrupted_run_resumes_to_the_same_bits(files, tmp_path, monkeypatch, capsys):
    assert _refine(files, tmp_path / "whole", "--memory-limit", LIMIT) == 0
    written = []
    original = io.ResumableArray.write

    def write_then_stop(self, index, block):
        if len(written) == 3:
            raise KeyboardInterrupt  # Ctrl-C after three chunks
        written.append(index)
        original(self, index, block)

    monkeypatch.setattr(io.ResumableArray, "write", write_then_stop)
    assert _refine(files, tmp_path / "cut", "--memory-limit", LIMIT) == 130
    assert "run the same command again" in capsys.readouterr().err
    assert _registered(tmp_path / "cut").attrs["complete"] is False
    monkeypatch.setattr(io.ResumableArray, "write", original)
    refined_at = (tmp_path / "cut" / "transform.json").stat().st_mtime_ns
    assert _refine(files, tmp_path / "cut", "--memory-limit", LIMIT) == 0
    assert (tmp_path / "cut" / "transform.json").stat().st_mtime_ns == refined_at  # not refined again
    whole, resumed = _registered(tmp_path / "whole"), _registered(tmp_path / "cut")
    assert resumed.attrs["complete"] is True
    np.testing.assert_array_equal(resumed[...], whole[...])
    for name in ("matrix", "output_to_guide"):
        assert resumed.attrs[name] == whole.attrs[name]
    _, phantom = files
    reference = warp_cube(phantom.cube, np.array(resumed.attrs["matrix"]) @ np.array(resumed.attrs["output_to_guide"]),
                          resumed.shape[:2])
    np.testing.assert_array_equal(resumed[...], reference)


@pytest.mark.slow
def test_other_inputs_never_overwrite_a_streamed_folder_without_force(files, tmp_path, capsys):
    out = tmp_path / "out"
    assert _refine(files, out, "--memory-limit", LIMIT) == 0
    before = _registered(out)[...]
    assert _refine(files, out, "--memory-limit", LIMIT, "--levels", "2") == 2  # other settings
    assert "pass --force" in capsys.readouterr().err
    np.testing.assert_array_equal(_registered(out)[...], before)
    first = json.loads((out / "transform.json").read_text())["fingerprint"]
    assert _refine(files, out, "--memory-limit", LIMIT, "--levels", "2", "--force") == 0
    assert json.loads((out / "transform.json").read_text())["fingerprint"] != first
    assert _registered(out).attrs["complete"] is True


@pytest.mark.slow
def test_sigterm_mid_stream_then_rerun_completes(files, tmp_path):
    """A real SIGTERM to a running ``ggrad refine``, then the same command again."""
    folder, phantom = files
    out = tmp_path / "out"
    arguments = ["refine", str(folder / "guide.npy"), str(folder / "cube.zarr"), "-o", str(out), "-q",
                 "--initial", str(folder / "initial.txt"), "--memory-limit", LIMIT, "--working-shape", "240", "280"]
    command = [sys.executable, "-m", "ggrad_gpu", *arguments]
    # Chunks from the second on take a second longer to write, so the run is still going when signalled.
    process = subprocess.Popen([sys.executable, "-c", SLOW_CHUNKS, *arguments], stderr=subprocess.PIPE, text=True)
    marks = out / "registered.zarr" / ".done"
    deadline = time.monotonic() + 300
    while not (marks.is_dir() and len(os.listdir(marks)) >= 2):  # until some chunks are written
        assert process.poll() is None, "the run ended before two chunks were written: " + process.stderr.read()
        assert time.monotonic() < deadline, "the run never wrote two chunks"
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before the signal"
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err  # the signal landed mid-run: terminated, not finished
    assert "run the same command again" in err and "Traceback" not in err, err
    assert _registered(out).attrs["complete"] is False
    saved = (out / "transform.json").read_text()
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert (out / "transform.json").read_text() == saved  # the transform was reused, not refined again
    # Bit for bit what an uninterrupted run with this transform writes: the cube warped whole.
    store, record = _registered(out), json.loads(saved)
    reference = warp_cube(phantom.cube, np.array(record["matrix"]) @ np.array(store.attrs["output_to_guide"]),
                          store.shape[:2])
    np.testing.assert_array_equal(store[...], reference)


@pytest.mark.slow
def test_strict_when_streaming_exits_1_where_the_initial_transform_is_kept(files, tmp_path, capsys):
    # A cube of noise (nothing in it matches the guide) over the memory limit: the streamed run keeps
    # the initial transform, writes its outputs and exits 0, or 1 under --strict; so does its rerun,
    # which reuses the saved transform. A refined streamed run exits 0 under --strict.
    folder, phantom = files
    noise = np.random.default_rng(0).random(phantom.cube.shape).astype(np.float32)
    _write_chunked(tmp_path / "noise.zarr", noise)
    command = ["refine", str(folder / "guide.npy"), str(tmp_path / "noise.zarr"), "-q", "--initial",
               str(folder / "initial.txt"), "--working-shape", "240", "280", "--memory-limit", LIMIT, "-o"]
    assert main(command + [str(tmp_path / "plain")]) == 0
    assert main(command + [str(tmp_path / "strict"), "--strict"]) == 1
    out, err = capsys.readouterr()
    assert "streaming it chunk by chunk" in err
    assert out.count("kept the initial transform: the refinement did not improve the match") == 2, out
    record = json.loads((tmp_path / "strict" / "transform.json").read_text())
    assert record["improved"] is False and record["message"].startswith("kept the initial transform")
    np.testing.assert_array_equal(record["matrix"], phantom.initial)
    assert _registered(tmp_path / "strict").attrs["complete"] is True  # kept, but written whole
    assert main(command + [str(tmp_path / "strict"), "--strict"]) == 1  # the rerun reuses the kept transform
    assert _refine(files, tmp_path / "refined", "--memory-limit", LIMIT, "--strict") == 0


@pytest.mark.slow  # over 0.75 s: the fast lane stays under a minute
@pytest.mark.parametrize("changed", [["--no-denoise"], ["--check"]], ids=lambda flags: flags[0])
def test_an_interrupted_run_is_not_resumed_under_other_refine_options(changed, tmp_path, monkeypatch, capsys):
    """A streamed run cut short, then run again with another option of ``refine``: not resumed from the old transform.

    The fingerprint once omitted ``denoise`` and ``check``: the rerun with
    ``--no-denoise`` continued from the transform the denoised run had made.
    """
    phantom = make_phantom(shape=(64, 80), bands=64, seed=0)
    np.save(tmp_path / "guide.npy", phantom.guide)
    _write_chunked(tmp_path / "cube.zarr", phantom.cube, chunk=4)
    command = ["refine", str(tmp_path / "guide.npy"), str(tmp_path / "cube.zarr"), "-o", str(tmp_path / "out"),
               "-q", "--memory-limit", "40KB", "--working-shape", "64", "80"]  # the cube: 12 x 14 x 64, 43 KB

    def stop(self, index, block):
        raise KeyboardInterrupt  # Ctrl-C before the first chunk

    with monkeypatch.context() as patch:
        patch.setattr(io.ResumableArray, "write", stop)
        assert main(command) == 130
    assert (tmp_path / "out" / "transform.json").exists()
    capsys.readouterr()
    assert main(command + changed) == 2  # the folder holds another run's transform
    assert "pass --force" in capsys.readouterr().err


def test_a_limit_below_the_least_that_works_is_refused_before_anything_starts(files, tmp_path, capsys):
    folder, _ = files
    out = tmp_path / "refused"
    assert _refine(files, out, "--memory-limit", "300KB") == 2
    err = capsys.readouterr().err
    assert "--memory-limit 0.000 GiB is too small" in err and "at least --memory-limit" in err, err
    need = int(err.split("(")[-1].split(" bytes")[0])  # the smallest limit that works, in bytes
    assert 300_000 < need <= 350_000, need  # the guide (268,800 bytes) and four store chunks (10,240 each)
    assert "streaming it" not in err and not out.exists()  # said before it started


@pytest.mark.slow  # about 10 s: a streamed refine of a 20 MB cube in a child process
def test_a_streamed_run_s_peak_stays_within_the_limit_and_the_interpreter(tmp_path):
    """The child's peak resident memory: at most the limit plus what the interpreter and libraries take."""
    phantom = make_phantom(shape=(512, 512), bands=160, seed=3, native_factor=2)
    np.save(tmp_path / "guide.npy", phantom.guide)
    _write_chunked(tmp_path / "cube.zarr", phantom.cube.astype(np.float32), chunk=32)
    np.savetxt(tmp_path / "initial.txt", phantom.initial)
    limit = 8 << 20  # the cube is 40 MiB
    script = (
        "import resource, sys\n"
        "import numpy, scipy.ndimage, dask.array, zarr, matplotlib.pyplot\n"
        "from ggrad_gpu.cli.command import main\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "code = main(sys.argv[1:])\n"
        "print('PEAK', base * 1024, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, code)\n"
    )
    command = [sys.executable, "-c", script, "refine", str(tmp_path / "guide.npy"), str(tmp_path / "cube.zarr"),
               "-o", str(tmp_path / "out"), "-q", "--initial", str(tmp_path / "initial.txt"),
               "--memory-limit", str(limit), "--backend", "numpy"]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert "streaming it" in done.stderr, done.stderr[-2000:]
    base, peak, code = (int(v) for v in done.stdout.split("PEAK")[1].split())
    assert code in (0, 1), done.stderr[-2000:]
    assert peak - base <= limit + (64 << 20), (base, peak)  # the libraries loaded, then the run within the limit


@pytest.mark.slow
@pytest.mark.parametrize("grid", ["cube", "guide", "working"])
def test_the_write_reads_in_the_cache_s_planned_order_and_writes_the_same_bits(files, tmp_path, monkeypatch, grid):
    from ggrad_gpu._lazy import window_cache
    from ggrad_gpu.scaleout.streaming import StreamPlan

    _, phantom = files
    caches, original = [], window_cache.WindowCache.__init__

    def kept(self, *args, **kwargs):
        original(self, *args, **kwargs)
        caches.append(self)

    monkeypatch.setattr(window_cache.WindowCache, "__init__", kept)
    # The tiny limit leaves this cube's cache no room; give it 1 MiB to see that the reads follow its plan.
    monkeypatch.setattr(StreamPlan, "write_plan", lambda self, chunk_bytes: (1, 1 << 20))
    assert _refine(files, tmp_path / "out", "--memory-limit", LIMIT, "--output-grid", grid) == 0
    (cache,) = caches
    # Decodes counted as they happen equal the plan's only where the windows came in the planned order.
    assert cache.decodes == cache.plan.decodes
    assert cache.decodes < 0.7 * cache.plan.touches, (cache.decodes, cache.plan.touches)
    store = _registered(tmp_path / "out")
    assert store.attrs["output_grid"] == grid
    matrix = np.array(json.loads((tmp_path / "out" / "transform.json").read_text())["matrix"])
    reference = warp_cube(phantom.cube, matrix @ np.array(store.attrs["output_to_guide"]), store.shape[:2])
    np.testing.assert_array_equal(store[...], reference)
