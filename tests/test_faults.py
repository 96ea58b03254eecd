"""Injected faults while ``ggrad refine`` writes: full disk, interrupts, SIGINT and SIGTERM.

Whatever goes wrong, and wherever, the run must leave the inputs
byte-identical, no OUTDIR that looks complete (an existing one, with
``--force``, stays as it was) and no hidden ``.out.partial-*`` or
``.*.tmp-*`` entry; the exit code says what happened (2 full disk, 130
SIGINT or Ctrl-C, 143 SIGTERM) on one stderr line.

In-process cases patch a writer to fail halfway through a file (``OSError``
with ``errno.ENOSPC``, or ``KeyboardInterrupt``); subprocess cases send real
signals to ``python -m ggrad_gpu refine``, once while it computes and once
while it writes (a patched writer then waits for the signal).
"""

import errno
import hashlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from ggrad_gpu.cli.command import EXIT_INPUT, EXIT_INTERRUPTED, EXIT_TERMINATED, main
from ggrad_gpu.io import cubes
from ggrad_gpu.synthetic import make_phantom

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUTPUTS = {"transform.json", "weights.json", "report.png"}
SUFFIX = {"npy": ".npy", "npz": ".npz", "tiff": ".tif", "envi": ".hdr", "hdf5": ".h5", "zarr": ".zarr"}
NEEDS = {"envi": "spectral", "hdf5": "h5py", "zarr": "zarr"}
posix_signals = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


def _fault(kind):
    if kind == "full-disk":
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return KeyboardInterrupt()


def _digest(folder):
    """Relative name -> SHA-256 of every file under ``folder``."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small():
    return make_phantom(shape=(120, 140), bands=8, seed=6, rotation_deg=1.0, shift=(3.0, -5.0))


@pytest.fixture
def inputs(tmp_path, small):
    """A folder with ``guide.npy`` and ``cube.npy``, and their digests."""
    np.save(tmp_path / "guide.npy", small.guide)
    np.save(tmp_path / "cube.npy", small.cube)
    return tmp_path, _digest(tmp_path)


def _previous_results(out):
    """An OUTDIR from an earlier run, to be replaced with --force (or kept when that fails)."""
    out.mkdir()
    (out / "transform.json").write_text('{"matrix": "the previous run"}')
    (out / "notes.txt").write_text("a user's notes")
    return _digest(out)


def _check_nothing_left(folder, before, out, old):
    """Inputs unchanged; OUTDIR absent (or the old one, unchanged); no hidden entries."""
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted(["cube.npy", "guide.npy"] + (["out"] if old is not None else [])), names
    assert {k: v for k, v in _digest(folder).items() if not k.startswith("out")} == before
    if old is not None:
        assert _digest(out) == old


# --------------------------------------------------------------------------- in-process: a writer fails halfway


def _half(path):
    """Cut a file written so far to half its length (what a full disk leaves)."""
    if path.is_file():
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])


def _inject(monkeypatch, point, fault, fmt="npy"):
    """Make the writer at ``point`` write half its file and then raise ``fault``."""
    if point == "cube":
        real = cubes.WRITERS[fmt]

        def save(temps, *args):
            real(temps, *args)
            _half(temps[0])
            raise fault

        monkeypatch.setitem(cubes.WRITERS, fmt, save)
    elif point in ("transform.json", "weights.json"):
        real_write_text = pathlib.Path.write_text
        stem = point.split(".")[0]

        def write_text(self, text, *args, **kwargs):
            if not self.name.startswith(f".{stem}.tmp-"):
                return real_write_text(self, text, *args, **kwargs)
            real_write_text(self, text[: len(text) // 2], *args, **kwargs)
            raise fault

        monkeypatch.setattr(pathlib.Path, "write_text", write_text)
    elif point == "report.png":
        from matplotlib.figure import Figure

        real_savefig = Figure.savefig

        def savefig(self, fname, *args, **kwargs):
            real_savefig(self, fname, *args, **kwargs)
            _half(pathlib.Path(fname))
            raise fault

        monkeypatch.setattr(Figure, "savefig", savefig)
    elif point == "rename":  # the finished folder's rename into place
        real_rename = os.rename

        def rename(source, target):
            if pathlib.Path(source).name.startswith(".out.partial-"):
                raise fault
            return real_rename(source, target)

        monkeypatch.setattr(os, "rename", rename)
    else:
        raise AssertionError(point)


CASES = [("cube", fmt) for fmt in SUFFIX] + [(point, "npy") for point in
                                             ("transform.json", "weights.json", "report.png", "rename")]
FAST_CASES = {("cube", "npy")}


@pytest.mark.parametrize("force", [False, True], ids=["new-outdir", "force-over-old"])
@pytest.mark.parametrize("fault_kind", ["full-disk", "interrupt"])
@pytest.mark.parametrize("point, fmt", [  # the fast lane: the cube as .npy (the rename: signals below)
    pytest.param(p, f, id=p if p != "cube" else f"cube-{f}", marks=() if (p, f) in FAST_CASES else pytest.mark.slow)
    for p, f in CASES])
def test_a_fault_while_writing_leaves_no_partial_output(inputs, monkeypatch, capsys, reliability,
                                                         point, fmt, fault_kind, force):
    if fmt in NEEDS:
        pytest.importorskip(NEEDS[fmt])
    folder, before = inputs
    out = folder / "out"
    old = _previous_results(out) if force else None
    _inject(monkeypatch, point, _fault(fault_kind), fmt)
    code = main(["refine", str(folder / "guide.npy"), str(folder / "cube.npy"), "-o", str(out), "-q",
                 "--levels", "2", "--backend", "numpy", "--format", fmt] + (["--force"] if force else []))
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    if fault_kind == "full-disk":
        assert code == EXIT_INPUT and err.startswith("ggrad: error:"), err
        assert "No space left on device" in err and str(out) in err, err
    else:
        assert code == EXIT_INTERRUPTED and err.startswith("ggrad: interrupted"), err
    _check_nothing_left(folder, before, out, old)
    reliability["full disk" if fault_kind == "full-disk" else "interrupts mid-write"] += 1


def test_the_sigterm_handler_is_restored(inputs, capsys):
    folder, _ = inputs
    before = signal.getsignal(signal.SIGTERM)
    assert main(["refine", str(folder / "guide.npy"), str(folder / "absent.npy"), "-o",
                 str(folder / "out"), "-q"]) == EXIT_INPUT
    assert signal.getsignal(signal.SIGTERM) is before
    assert "absent.npy" in capsys.readouterr().err


# --------------------------------------------------------------------------- in-process: real signals to this process


@posix_signals
@pytest.mark.parametrize("signum, expected", [(signal.SIGINT, EXIT_INTERRUPTED), (signal.SIGTERM, EXIT_TERMINATED)],
                         ids=["SIGINT", "SIGTERM"])
def test_a_signal_while_writing_the_cube(inputs, monkeypatch, capsys, reliability, signum, expected):
    folder, before = inputs
    real = cubes.WRITERS["npy"]

    def save(temps, *args):
        real(temps, *args)
        os.kill(os.getpid(), signum)  # delivered at the next bytecode, inside the writer
        time.sleep(5)
        raise AssertionError("the signal did not stop the writer")

    monkeypatch.setitem(cubes.WRITERS, "npy", save)
    code = main(["refine", str(folder / "guide.npy"), str(folder / "cube.npy"), "-o", str(folder / "out"),
                 "-q", "--levels", "2", "--backend", "numpy"])
    err = capsys.readouterr().err
    assert code == expected and err.count("\n") == 1, err
    assert ("terminated (SIGTERM)" if signum == signal.SIGTERM else "interrupted") in err
    _check_nothing_left(folder, before, folder / "out", None)
    reliability["signals"] += 1


@posix_signals
@pytest.mark.parametrize("force", [False, True], ids=["new-outdir", "force-over-old"])
@pytest.mark.parametrize("signum, expected", [  # the fast lane sends SIGINT; the full run SIGTERM too
    pytest.param(signal.SIGINT, EXIT_INTERRUPTED, id="SIGINT"),
    pytest.param(signal.SIGTERM, EXIT_TERMINATED, id="SIGTERM", marks=pytest.mark.slow)])
@pytest.mark.slow  # over 0.75 s: the fast lane stays under a minute
def test_a_signal_during_the_final_rename_waits_for_it(inputs, monkeypatch, capsys, reliability, signum,
                                                       expected, force):
    """The swap into place is not cut in two: the signal takes effect once OUTDIR is complete."""
    folder, before = inputs
    out = folder / "out"
    if force:
        _previous_results(out)
    real_rename = os.rename

    def rename(source, target):
        if pathlib.Path(source).name.startswith(".out.partial-"):
            os.kill(os.getpid(), signum)
            time.sleep(0.05)  # time for the handler to run, were it not held back
        return real_rename(source, target)

    monkeypatch.setattr(os, "rename", rename)
    code = main(["refine", str(folder / "guide.npy"), str(folder / "cube.npy"), "-o", str(out), "-q",
                 "--levels", "2", "--backend", "numpy"] + (["--force"] if force else []))
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert code == expected and err.count("\n") == 1, err
    # The new results, complete; the old ones gone; nothing hidden left.
    assert {p.name for p in out.iterdir()} == OUTPUTS | {"registered.npy"}
    assert json.loads((out / "transform.json").read_text())["matrix"] != "the previous run"
    assert sorted(p.name for p in folder.iterdir()) == ["cube.npy", "guide.npy", "out"]
    assert {k: v for k, v in _digest(folder).items() if not k.startswith("out")} == before
    reliability["signals"] += 1


# --------------------------------------------------------------------------- subprocesses: python -m ggrad_gpu


def _start(args, *, code=None):
    """Start ``python -m ggrad_gpu ARGS`` (or ``python -c CODE ARGS``) with SIGINT and SIGTERM at their defaults."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}

    def defaults():  # a test run in the background may have inherited SIGINT ignored
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    command = [sys.executable, "-m", "ggrad_gpu", *args] if code is None else [sys.executable, "-c", code, *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=defaults)


def _finish(process, signum):
    """Send ``signum`` to a running process; return (exit code, stderr)."""
    assert process.poll() is None, "the run ended before the signal: " + process.stderr.read()
    process.send_signal(signum)
    try:
        _, err = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError("the run did not stop after the signal") from None
    return process.returncode, err


@pytest.fixture(scope="module")
def big_inputs(tmp_path_factory):
    """A guide and cube that take a NumPy refinement a couple of seconds: (folder, digests)."""
    folder = tmp_path_factory.mktemp("big")
    phantom = make_phantom(shape=(350, 415), bands=300, seed=2)
    np.save(folder / "guide.npy", phantom.guide)
    np.save(folder / "cube.npy", phantom.cube)
    return folder, _digest(folder)


@posix_signals
@pytest.mark.parametrize("signum, expected", [  # the fast lane sends SIGINT; the full run SIGTERM too
    pytest.param(signal.SIGINT, EXIT_INTERRUPTED, id="SIGINT"),
    pytest.param(signal.SIGTERM, EXIT_TERMINATED, id="SIGTERM", marks=pytest.mark.slow)])
@pytest.mark.slow  # over 0.75 s: the fast lane stays under a minute
def test_signal_while_computing(big_inputs, reliability, signum, expected):
    folder, before = big_inputs
    out = folder / "out"
    process = _start(["refine", str(folder / "guide.npy"), str(folder / "cube.npy"), "-o", str(out),
                      "--backend", "numpy"])
    line = process.stdout.readline()  # "guide 350 x 415; cube ...": the inputs are read, refine starts
    assert line.startswith("guide"), line + process.stderr.read()
    time.sleep(0.5)
    code, err = _finish(process, signum)
    assert code == expected, err
    assert err.strip().splitlines()[-1].startswith("ggrad: " + ("terminated" if expected == 143 else "interrupted"))
    assert "Traceback" not in err, err
    assert sorted(p.name for p in folder.iterdir()) == ["cube.npy", "guide.npy"]
    assert _digest(folder) == before
    reliability["signals"] += 1


# Runs ggrad with a cube writer that stops halfway, after the file is written under its temporary
# name, until a signal comes.
SLOW_WRITER = textwrap.dedent("""
    import sys, time
    import ggrad_gpu.io.cubes as cubes
    from ggrad_gpu.cli.command import main

    real = cubes.WRITERS["npy"]

    def save(temps, *args):
        real(temps, *args)
        time.sleep(120)

    cubes.WRITERS["npy"] = save
    sys.exit(main(sys.argv[1:]))
""")


@posix_signals
@pytest.mark.parametrize("force", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["new-outdir", "force-over-old"])
@pytest.mark.parametrize("signum, expected", [  # the fast lane sends SIGINT; the full run SIGTERM too
    pytest.param(signal.SIGINT, EXIT_INTERRUPTED, id="SIGINT"),
    pytest.param(signal.SIGTERM, EXIT_TERMINATED, id="SIGTERM", marks=pytest.mark.slow)])
@pytest.mark.slow  # over 0.75 s: the fast lane stays under a minute
def test_signal_while_writing(inputs, reliability, signum, expected, force):
    folder, before = inputs
    out = folder / "out"
    old = _previous_results(out) if force else None
    process = _start(["refine", str(folder / "guide.npy"), str(folder / "cube.npy"), "-o", str(out), "-q",
                      "--levels", "2", "--backend", "numpy"] + (["--force"] if force else []), code=SLOW_WRITER)
    deadline = time.monotonic() + 120
    while not list(folder.glob(".out.partial-*/.registered.tmp-*.npy")):  # the cube, half-way through
        assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline, "the run never started writing"
        time.sleep(0.02)
    code, err = _finish(process, signum)
    assert code == expected and err.count("\n") == 1 and "Traceback" not in err, err
    _check_nothing_left(folder, before, out, old)
    reliability["signals"] += 1
