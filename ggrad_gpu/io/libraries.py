"""The boundary with the format libraries: imported on demand, one error per unreadable file.

The optional libraries (tifffile, spectral, h5py, zarr, Pillow) are imported
only when a file of their format is read or written, and whatever they raise
for a corrupt, truncated or mislabelled file becomes one ``ValueError`` that
starts with the file's path.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import warnings
from pathlib import Path

__all__ = ["reading", "require", "require_all"]

# Loggers of the readers' libraries: what they say while a read fails is dropped
# (the error says it); what they say during a read that succeeds is passed on.
_LIBRARY_LOGGERS = ("tifffile", "spectral", "h5py", "zarr", "numcodecs", "PIL")


def require(module: str, package: str, what: str, *, extra: str = "io"):
    """Import an optional library, or say which ``pip install`` provides it.

    Parameters
    ----------
    module : str
        The module to import, e.g. ``"spectral.io.envi"``.
    package : str
        The distribution that provides it, e.g. ``"spectral"``.
    what : str
        What needs it, for the error, e.g. ``"reading an ENVI cube"``.
    extra : str
        The ``ggrad_gpu`` extra that installs it with its kind (``"io"``, ``"instruments"``).

    Returns
    -------
    module

    Raises
    ------
    ImportError
        If it is missing; the message says what to install.

    Examples
    --------
    >>> require("json", "json", "reading a manifest").dumps([1, 2])
    '[1, 2]'
    >>> require("no_such_module", "no-such-package", "reading a test file")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
        ...
    ImportError: reading a test file needs the optional package 'no-such-package': pip install no-such-package ...
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"{what} needs the optional package {package!r}: pip install {package} "
                          f"(or pip install 'ggrad_gpu[{extra}]' for every format of its kind)") from exc


def require_all(modules: dict, what: str, *, extras: str) -> None:
    """Check, before any work, that every optional library a command needs imports here; else one error.

    ``modules`` maps a module to the distribution that provides it; the
    modules are found, not imported. The error names those missing and the
    exact ``pip install`` of the ``ggrad_gpu`` extras that bring them.

    Examples
    --------
    >>> require_all({"json": "json"}, "reading a manifest", extras="io")
    >>> require_all({"json": "json", "no_such_module": "no-such-package"}, "ggrad demo --mosaic", extras="io,dask")
    Traceback (most recent call last):
        ...
    ImportError: ggrad demo --mosaic needs no-such-package, not installed here: pip install 'ggrad_gpu[io,dask]'
    """
    missing = []
    for module, package in modules.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a parent package missing, or a module set to None
            found = False
        if not found:
            missing.append(package)
    if missing:
        raise ImportError(f"{what} needs {', '.join(missing)}, not installed here: "
                          f"pip install 'ggrad_gpu[{extras}]'")


@contextlib.contextmanager
def reading(path: Path, what: str):
    """The boundary between a format's library and ggrad_gpu: one clear error per unreadable file.

    Corrupt, truncated or mislabelled files make the libraries raise all kinds
    of errors (``TiffFileError``, ``BadZipFile``, ``EOFError``, ``OSError``
    without a file name, ``KeyError``, ``struct.error``, ``MemoryError`` for
    a header that declares a huge array...). Here they become one
    ``ValueError("<path>: <what is wrong>")``, the library's error chained as
    ``__cause__``. Passed on unchanged: a ``ValueError``, ``TypeError`` or
    ``OSError`` whose message already names the file (ggrad_gpu's own checks
    and some of the libraries'), an ``ImportError`` (a missing optional
    package) and whatever is not an ``Exception`` (``KeyboardInterrupt``).
    An ``OSError`` of the operating system (it has an ``errno``: permission
    denied, an I/O error) keeps its type and gets the file name.

    What the libraries log or warn while the file is read is held back: it is
    dropped if the read fails (the error says it all, on one line) and passed
    on if it succeeds.

    Parameters
    ----------
    path : pathlib.Path
        The file being read, named in the error.
    what : str
        What the file should be, e.g. ``"TIFF file"``: the error says
        ``"<path>: not a readable TIFF file ..."``.

    Examples
    --------
    >>> with reading(Path("broken.tif"), "TIFF file"):
    ...     raise KeyError("IFD 0")  # what a library might raise for a truncated file
    Traceback (most recent call last):
        ...
    ValueError: broken.tif: not a readable TIFF file (corrupt or truncated?): KeyError: 'IFD 0'
    >>> with reading(Path("cube.npy"), "npy file"):
    ...     raise ValueError("cube.npy: cube must be 3-D")  # already names the file: passed on unchanged
    Traceback (most recent call last):
        ...
    ValueError: cube.npy: cube must be 3-D
    """
    records = []

    class _Hold(logging.Handler):
        def emit(self, record):
            records.append(record)

    hold, saved = _Hold(), []
    for name in _LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.handlers[:], logger.propagate))
        logger.handlers[:], logger.propagate = [hold], False
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                yield
            except Exception as exc:  # noqa: BLE001 - mapped to one error naming the file
                error = _read_error(path, what, exc)
                if error is exc:
                    raise
                raise error from exc
    finally:
        for logger, handlers, propagate in saved:
            logger.handlers[:], logger.propagate = handlers, propagate
    for record in records:
        logging.getLogger(record.name).handle(record)
    for message in caught:
        warnings.warn_explicit(message.message, message.category, message.filename, message.lineno)


def _read_error(path: Path, what: str, exc: Exception) -> Exception:
    """The error to raise for ``exc``, met while reading ``path`` (see :func:`reading`)."""
    text = " ".join(str(exc).split())
    if isinstance(exc, ImportError) or (isinstance(exc, (ValueError, TypeError, OSError)) and str(path) in text):
        return exc
    if isinstance(exc, OSError) and exc.errno is not None and exc.strerror:
        return type(exc)(exc.errno, exc.strerror, str(path))
    if isinstance(exc, MemoryError):
        return ValueError(f"{path}: not a readable {what}: it declares more data than fits in memory "
                          f"(a corrupt header, or a file too large for this machine)")
    detail = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    if len(detail) > 200:
        detail = detail[:197] + "..."
    return ValueError(f"{path}: not a readable {what} (corrupt or truncated?): {detail}")
