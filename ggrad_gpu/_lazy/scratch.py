"""Temporary folders for scratch data, and the removal of those a killed run left behind.

A run killed outright (SIGKILL, the kernel's out-of-memory killer, a lost
node) cannot remove its scratch folder, and a streamed refine's holds about
the cube's size several times over: one such folder of 37 GiB filled a disk
and failed a later run. So each folder holds a lock file that its run keeps
locked (``fcntl.flock``) while it lives; the kernel lets go of the lock
however the process ends. Making a folder first removes the folders of the
same prefix whose lock nobody holds. A folder without a lock file (another
program's, an older version's) is never touched. Where ``fcntl`` is missing
(Windows), folders are made without a lock and nothing is removed.
"""

from __future__ import annotations

import glob
import os
import shutil
import tempfile

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, no cleanup
    fcntl = None

__all__ = ["LOCK_NAME", "PREFIX", "make_folder", "release_folder", "remove_abandoned"]

PREFIX = "ggrad-chunks-"
LOCK_NAME = ".ggrad-lock"


def make_folder(prefix: str = PREFIX, root: str | None = None):
    """A new temporary folder, locked as in use; first, the abandoned ones of ``prefix`` are removed.

    Parameters
    ----------
    prefix : str
        Name prefix of the folder (and of the folders cleaned).
    root : str, optional
        Where; default the system's temporary folder (``TMPDIR``).

    Returns
    -------
    folder : str
    handle : file object or None
        The held lock; pass it to :func:`release_folder` when done.

    Examples
    --------
    >>> folder, handle = make_folder(root=tempfile.mkdtemp())
    >>> os.path.isdir(folder), remove_abandoned(root=os.path.dirname(folder))  # in use: kept
    (True, [])
    >>> release_folder(folder, handle); os.path.exists(folder)
    False
    """
    remove_abandoned(prefix, root)
    folder = tempfile.mkdtemp(prefix=prefix, dir=root)
    if fcntl is None:
        return folder, None
    # Locked under another name, then renamed: a cleaner never sees an unlocked lock file of a live run.
    pending = os.path.join(folder, LOCK_NAME + ".new")
    handle = open(pending, "w")  # noqa: SIM115 - held open while the folder is in use
    fcntl.flock(handle, fcntl.LOCK_EX)
    os.replace(pending, os.path.join(folder, LOCK_NAME))
    return folder, handle


def release_folder(folder: str, handle) -> None:
    """Remove ``folder`` and let go of its lock (``handle`` from :func:`make_folder`).

    Examples
    --------
    >>> folder, handle = make_folder(root=tempfile.mkdtemp())
    >>> release_folder(folder, handle); os.path.exists(folder)
    False
    """
    shutil.rmtree(folder, ignore_errors=True)
    if handle is not None:
        handle.close()


def remove_abandoned(prefix: str = PREFIX, root: str | None = None) -> list[str]:
    """Remove the folders of ``prefix`` in ``root`` whose lock file no live process holds.

    Returns the folders removed.

    Examples
    --------
    >>> root = tempfile.mkdtemp()
    >>> folder, handle = make_folder(root=root)
    >>> handle.close()  # as if its run had been killed: the lock is free
    >>> remove_abandoned(root=root) == [folder], os.path.exists(folder)
    (True, False)
    """
    if fcntl is None:
        return []
    removed = []
    for folder in sorted(glob.glob(os.path.join(root or tempfile.gettempdir(), glob.escape(prefix) + "*"))):
        lock = os.path.join(folder, LOCK_NAME)
        try:
            handle = open(lock)  # noqa: SIM115
        except OSError:  # no lock file: not ours to judge
            continue
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: its run is alive
            handle.close()
            continue
        shutil.rmtree(folder, ignore_errors=True)
        handle.close()
        removed.append(folder)
    return removed
