"""Scratch folders: a killed run's folder is removed by the next one; a live run's never is.

References: real processes (a child killed with SIGKILL, a child still
running) and the file system itself.
"""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from ggrad_gpu._lazy import scratch
from ggrad_gpu._lazy.chunked import checkpoint, checkpoints, stored_path

pytestmark = pytest.mark.skipif(scratch.fcntl is None, reason="no advisory file locks on this platform")

CHILD = textwrap.dedent("""
    import os, signal, sys, time
    from ggrad_gpu._lazy.scratch import make_folder
    folder, handle = make_folder(root=sys.argv[1])
    open(os.path.join(folder, "data.bin"), "wb").write(b"x" * 1000)
    print(folder, flush=True)
    if sys.argv[2] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)
""")


def _child(root, how):
    process = subprocess.Popen([sys.executable, "-c", CHILD, str(root), how], stdout=subprocess.PIPE, text=True)
    return process, process.stdout.readline().strip()


def test_the_folder_of_a_killed_run_is_removed_by_the_next(tmp_path):
    process, folder = _child(tmp_path, "kill")
    process.wait(timeout=30)
    assert process.returncode == -9 and os.path.isdir(folder)  # SIGKILL: nothing cleaned up
    mine, handle = scratch.make_folder(root=str(tmp_path))  # the next run
    assert not os.path.exists(folder) and os.path.isdir(mine)
    scratch.release_folder(mine, handle)


def test_the_folder_of_a_live_run_and_folders_without_a_lock_are_kept(tmp_path):
    process, folder = _child(tmp_path, "live")
    other = tmp_path / f"{scratch.PREFIX}someone-else"
    other.mkdir()
    try:
        assert scratch.remove_abandoned(root=str(tmp_path)) == []
        assert os.path.isfile(os.path.join(folder, "data.bin")) and other.is_dir()
    finally:
        process.kill()
        process.wait(timeout=30)
    assert scratch.remove_abandoned(root=str(tmp_path)) == [folder]  # its run has ended now
    assert other.is_dir()


def test_a_checkpoint_folder_is_locked_while_its_block_runs(tmp_path, monkeypatch):
    da = pytest.importorskip("dask.array")
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)  # read TMPDIR again
    with checkpoints(memory_limit=64):
        kept = checkpoint(da.arange(100, chunks=10) * 2)
        folder = os.path.dirname(stored_path(kept))
        assert folder.startswith(str(tmp_path)) and scratch.remove_abandoned() == []
        assert int(kept.sum().compute()) == int(np.arange(100).sum() * 2)
    assert not os.path.exists(folder)
