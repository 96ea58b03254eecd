"""Memory pages: large NumPy arrays on small pages where huge ones would stall their first touch.

On Linux, NumPy marks every array of 4 MiB or more with
``madvise(MADV_HUGEPAGE)``. Where the kernel's transparent-huge-page policy
compacts memory for such regions when it faults them in
(``/sys/kernel/mm/transparent_hugepage/defrag`` set to ``madvise``,
``defer+madvise`` or ``always``) and no huge page is free, each fault waits
for that compaction (numpy/numpy#31590). On the development VM (defrag
``madvise``) a fresh 830 MB array filled at 0.40 GB/s with the mark and at
2.9 GB/s without it, and written again at 7.9 and 7.7 GB/s: a refine's
first call in a process paid about 1 s for it at the paper's geometry and
up to 1.5 s for a partial-field tile (benchmarks/RESULTS.md, issue 26,
seventh session).

:func:`small_pages` turns the mark off while a block runs (``refine`` and
``ggrad``'s commands run in one) and puts NumPy's setting back when the last
block leaves. Where the kernel does not stall, or where the user has chosen
with NumPy's ``NUMPY_MADVISE_HUGEPAGE`` environment variable, nothing
changes. The mark is only a performance hint: no result depends on it.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import threading
from pathlib import Path

import numpy as np

__all__ = ["huge_pages_stall", "small_pages"]

_DEFRAG = Path("/sys/kernel/mm/transparent_hugepage/defrag")
# The defrag policies under which a fault in a region marked MADV_HUGEPAGE compacts memory first.
_STALLING = frozenset({"always", "madvise", "defer+madvise"})

_lock = threading.Lock()
_users = 0  # blocks inside small_pages, over all threads
_saved = None  # NumPy's setting before the first of them


@functools.cache
def huge_pages_stall(defrag: Path = _DEFRAG) -> bool:
    """Whether this kernel compacts memory before it faults in a region marked for huge pages.

    Parameters
    ----------
    defrag : pathlib.Path
        The kernel's policy file (Linux's sysfs; absent elsewhere).

    Returns
    -------
    bool
        True where the selected policy (the bracketed word) is ``always``,
        ``madvise`` or ``defer+madvise``; False where it is ``defer`` or
        ``never``, or where the file cannot be read (not Linux).

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> policy = Path(tempfile.mkdtemp()) / "defrag"
    >>> _ = policy.write_text("always defer defer+madvise [madvise] never\\n")
    >>> huge_pages_stall(policy)
    True
    >>> huge_pages_stall(Path(tempfile.mkdtemp()) / "absent")
    False
    """
    try:
        selected = re.search(r"\[([^\]]+)\]", defrag.read_text())
    except OSError:
        return False
    return selected is not None and selected.group(1) in _STALLING


def _numpy_switch():
    """NumPy's switch for marking large arrays (it returns the previous setting), or None."""
    core = getattr(np, "_core", None) or getattr(np, "core", None)  # NumPy 2, NumPy 1
    return getattr(getattr(core, "multiarray", None), "_set_madvise_hugepage", None)


@contextlib.contextmanager
def small_pages():
    """A block whose new NumPy arrays are not marked for huge pages, where the mark would stall them.

    Safe to nest and to enter from several threads at once: NumPy's setting
    is saved by the first block to enter and restored by the last to leave.

    Examples
    --------
    >>> import numpy as np
    >>> with small_pages():
    ...     values = np.ones((1024, 1024, 4), dtype=np.float32)  # 16 MiB, first touched on small pages
    >>> float(values.sum())
    4194304.0
    """
    global _users, _saved
    switch = _numpy_switch()
    if switch is None or "NUMPY_MADVISE_HUGEPAGE" in os.environ or not huge_pages_stall():
        yield
        return
    with _lock:
        if _users == 0:
            _saved = switch(False)
        _users += 1
    try:
        yield
    finally:
        with _lock:
            _users -= 1
            if _users == 0:
                switch(_saved)
