"""All-or-nothing writes: files and folders appear under their name only when complete.

Everything is written under a hidden temporary name beside its target and
renamed into place once complete (atomic for a file on one file system). When
the writing raises or is interrupted, the temporary files or folder are
removed and the target is left as it was. An existing target is replaced only
when asked to, and only once the new one is complete; SIGINT, SIGTERM and
SIGHUP are held back while finished files are renamed into place and while
temporary ones are removed, so Ctrl-C never cuts such a step in two.

One implementation serves every writer: :func:`atomic_write` (one file or
folder), :func:`atomic_write_all` (files that belong together, such as an
ENVI header and its data file), :func:`atomic_folder` (a folder assembled
file by file, such as ``ggrad refine``'s output folder) and
:func:`write_json`, :func:`write_figure` (a figure made by ``ggrad_gpu.plotting`` as a
PNG; io itself draws nothing).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import threading
import uuid
from pathlib import Path

import numpy as np

__all__ = ["atomic_folder", "atomic_write", "atomic_write_all", "write_figure", "write_json"]

# Signals held back while finished files are renamed into place (see _signals_deferred).
_DEFERRED_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


@contextlib.contextmanager
def atomic_write(path, *, overwrite: bool = False):
    """Write a file (or a folder) under a temporary name; rename it into place when done.

    Yields the temporary path, ``.<stem>.tmp-<random><suffix>`` in the same
    folder (the suffix is kept for libraries that go by it). When the block
    ends normally, what was written there is renamed to ``path`` (atomic for a
    file on one file system); when it raises (or is interrupted), the
    temporary file or folder is removed and ``path`` is left as it was.

    Parameters
    ----------
    path : path-like
        The final name.
    overwrite : bool
        Replace an existing ``path``. A folder is replaced only by a folder
        and a file only by a file.

    Raises
    ------
    FileExistsError
        If ``path`` exists and ``overwrite`` is False (checked before the
        block runs and again before renaming).
    FileNotFoundError
        If the folder to hold ``path`` does not exist, or nothing was written.

    Examples
    --------
    >>> import os, tempfile
    >>> from ggrad_gpu.io import atomic_write
    >>> path = os.path.join(tempfile.mkdtemp(), "notes.txt")
    >>> with atomic_write(path) as temp:
    ...     _ = temp.write_text("complete")
    >>> open(path).read()
    'complete'
    """
    with _staged([path], overwrite=overwrite) as temps:
        yield temps[0]


@contextlib.contextmanager
def atomic_write_all(paths, *, overwrite: bool = False):
    """:func:`atomic_write` for files that belong together: all of them appear, or none.

    Yields one temporary path per target (named as by :func:`atomic_write`).
    Once the block ends normally, they are renamed into place in the given
    order with signals held back throughout, so that, e.g., an ENVI header
    never goes without its data file.

    Parameters
    ----------
    paths : sequence of path-like
        The final names, in the order they are to be renamed into place.
    overwrite : bool
        Replace existing targets (a folder only by a folder, a file only by
        a file).

    Raises
    ------
    FileExistsError, FileNotFoundError
        As :func:`atomic_write`, for any of the targets.

    Examples
    --------
    >>> import os, tempfile
    >>> from ggrad_gpu.io import atomic_write_all
    >>> folder = tempfile.mkdtemp()
    >>> with atomic_write_all([os.path.join(folder, "a.img"), os.path.join(folder, "a.hdr")]) as temps:
    ...     for temp in temps:
    ...         _ = temp.write_text(temp.suffix)
    >>> sorted(os.listdir(folder))
    ['a.hdr', 'a.img']
    """
    with _staged(paths, overwrite=overwrite) as temps:
        yield temps


@contextlib.contextmanager
def atomic_folder(path, *, overwrite: bool = False):
    """Assemble a folder file by file under a hidden name; swap it into place when complete.

    Yields the new, empty folder ``.<name>.partial-<random>`` beside ``path``.
    When the block ends normally, it is renamed to ``path``; an existing
    folder (with ``overwrite``) is set aside first and removed only once the
    new one is in place, and put back if the rename fails. When the block
    raises (an exception, Ctrl-C, a full disk), the hidden folder is removed
    and ``path`` is left as it was.

    Parameters
    ----------
    path : path-like
        The folder to create.
    overwrite : bool
        Replace an existing folder at ``path`` (never a file).

    Raises
    ------
    FileExistsError
        If ``path`` exists and ``overwrite`` is False (checked before the
        block runs and again before the swap), or is a file.
    FileNotFoundError
        If the folder to hold ``path`` does not exist.

    Examples
    --------
    >>> import os, tempfile
    >>> from ggrad_gpu.io import atomic_folder
    >>> out = os.path.join(tempfile.mkdtemp(), "results")
    >>> with atomic_folder(out) as staging:
    ...     _ = (staging / "a.txt").write_text("first")
    ...     _ = (staging / "b.txt").write_text("second")
    >>> sorted(os.listdir(out))
    ['a.txt', 'b.txt']
    """
    with _staged([path], overwrite=overwrite, label="partial") as temps:
        temps[0].mkdir()
        yield temps[0]


def write_json(path, obj, *, overwrite: bool = False) -> Path:
    """Write ``obj`` as indented JSON, atomically (see :func:`atomic_write`).

    NumPy scalars and arrays are written as numbers and lists, paths as
    strings. NaN and infinity are refused (JSON has no such numbers).

    Parameters
    ----------
    path : path-like
    obj : JSON-serialisable object
    overwrite : bool
        Replace an existing file.

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    ValueError
        If ``obj`` holds NaN or infinity; the message names ``path``.
    TypeError
        If ``obj`` holds something JSON cannot represent.

    Examples
    --------
    >>> import json, os, tempfile
    >>> import numpy as np
    >>> from ggrad_gpu.io import write_json
    >>> path = write_json(os.path.join(tempfile.mkdtemp(), "record.json"), {"matrix": np.eye(2)})
    >>> json.loads(path.read_text())
    {'matrix': [[1.0, 0.0], [0.0, 1.0]]}
    """
    path = Path(path)
    try:
        text = json.dumps(obj, indent=2, allow_nan=False, default=_json_default) + "\n"
    except ValueError as exc:
        raise ValueError(f"cannot write {path} as JSON: {exc}") from exc
    with atomic_write(path, overwrite=overwrite) as temp:
        temp.write_text(text, encoding="utf-8")
    return path


def _json_default(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


# --------------------------------------------------------------------------- the one implementation


@contextlib.contextmanager
def _staged(paths, *, overwrite: bool, label: str = "tmp"):
    """Yield temporary names for ``paths``; rename them into place, in order, when the block ends.

    ``label`` names the temporaries: ``"tmp"`` for files written in one go,
    ``"partial"`` for a folder assembled file by file.
    """
    paths = [Path(p) for p in paths]
    for target in paths:
        _check_target(target, overwrite)
    token = uuid.uuid4().hex[:10]
    temps = [_temp_name(target, label, token) for target in paths]
    try:
        yield temps
        for temp, target in zip(temps, paths):
            if not os.path.lexists(temp):
                raise FileNotFoundError(f"nothing was written for {target}")
        # Held back from the last check to the last rename, so that neither a
        # signal nor a target appearing meanwhile can leave a pair half moved.
        with _signals_deferred():
            for target in paths:
                _check_target(target, overwrite, again=True)
            for temp, target in zip(temps, paths):
                _move_into_place(temp, target)
    except BaseException:
        with _signals_deferred():
            for temp in temps:
                _remove(temp)
        raise


@contextlib.contextmanager
def _signals_deferred():
    """Hold SIGINT, SIGTERM and SIGHUP back until the block ends, then deliver them.

    For the short steps that must not be cut in two: renaming finished files
    into place, swapping an old folder for a new one, removing a temporary
    folder. A signal that arrives meanwhile is raised again (with
    :func:`signal.raise_signal`) once the previous handlers are back, so
    Ctrl-C still stops the program, only a moment later. Outside the main
    thread (where Python cannot set handlers) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending, previous = [], {}

    def hold(signum, frame):
        pending.append(signum)

    try:
        for signum in _DEFERRED_SIGNALS:
            handler = signal.getsignal(signum)
            if handler is not None and handler is not signal.SIG_IGN:  # None: set outside Python
                previous[signum] = signal.signal(signum, hold)
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(pending):
            signal.raise_signal(signum)


def _temp_name(path: Path, label: str, token: str) -> Path:
    if label == "partial":
        return path.parent / f".{path.name}.partial-{token}"
    return path.parent / f".{path.stem}.{label}-{token}{path.suffix}"  # the suffix last: libraries go by it


def _check_target(path: Path, overwrite: bool, *, again: bool = False) -> None:
    if not path.parent.is_dir():
        raise FileNotFoundError(f"the folder to hold {path} does not exist: {path.parent}")
    if os.path.lexists(path) and not overwrite:
        if again:
            raise FileExistsError(f"{path} appeared while writing; what was written was not moved there")
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")


def _move_into_place(temp: Path, target: Path) -> None:
    """Rename ``temp`` to ``target``; an old folder there goes only once the new one is in place."""
    if not os.path.lexists(target):
        os.rename(temp, target)
        return
    if temp.is_dir() != (target.is_dir() and not target.is_symlink()):
        kind = "folder" if target.is_dir() else "file"
        raise FileExistsError(f"{target} exists and is a {kind}; it is only replaced by a {kind}")
    if not temp.is_dir():
        os.replace(temp, target)
        return
    retired = _temp_name(target, "tmp", "old-" + uuid.uuid4().hex[:10])
    os.rename(target, retired)
    try:
        os.rename(temp, target)
    except BaseException:
        os.rename(retired, target)  # put the old folder back
        raise
    shutil.rmtree(retired, ignore_errors=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def write_figure(figure, path, *, overwrite: bool = False) -> Path:
    """Write a Matplotlib ``figure`` (e.g. from :mod:`ggrad_gpu.plotting`) as a PNG at ``path``, atomically.

    The image is written to a temporary file in the same folder and renamed
    onto ``path`` only once it is complete, so ``path`` is either absent, the
    old file, or the whole new image; the temporary file is removed if
    anything fails. The format is PNG whatever the suffix.

    Raises
    ------
    FileExistsError
        If ``path`` exists and ``overwrite`` is False (checked before writing
        and again just before the rename).
    FileNotFoundError
        If the folder that should hold ``path`` does not exist.

    Examples
    --------
    >>> import tempfile
    >>> from matplotlib.figure import Figure
    >>> path = write_figure(Figure(figsize=(1, 1)), Path(tempfile.mkdtemp()) / "report.png")
    >>> path.read_bytes()[1:4]  # the PNG signature
    b'PNG'
    """
    path = Path(os.fspath(path))
    with atomic_write(path, overwrite=overwrite) as temporary:
        figure.savefig(temporary, format="png", dpi=figure.dpi)
    return path
