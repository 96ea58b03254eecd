"""Output folders of resumable commands: inputs kept out, another run's record found, outputs removed.

One set of rules for ``ggrad refine`` (streamed or not), ``ggrad apply`` and
``ggrad mosaic``:

- :func:`check_outside`: an OUTDIR that is, or holds, one of the inputs is
  refused (``--force`` would replace them);
- :func:`reusable_record`: the JSON record of an interrupted run with the same
  fingerprint is reused; a folder that holds anything else is refused unless
  the caller may replace its outputs;
- :func:`remove_outputs`: a command's own outputs removed from a folder, and
  nothing else.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .cubes import split_dataset_path

__all__ = ["check_outside", "remove_outputs", "reusable_record"]


def check_outside(output, inputs) -> None:
    """Refuse an OUTDIR that is, or holds, one of the inputs (None entries are skipped).

    An input ``file.h5:/dataset`` is the file ``file.h5``.

    Examples
    --------
    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> check_outside(folder / "out", [folder / "cube.npy"])  # OUTDIR missing: nothing to refuse
    >>> check_outside(folder, [folder / "cube.h5:/data"])
    Traceback (most recent call last):
        ...
    ValueError: output folder ... holds the input ...cube.h5:/data; it is never replaced: choose another OUTDIR
    """
    output = Path(output)
    if not output.exists():
        return
    folder = output.resolve()
    for given in inputs:
        if given is None:
            continue
        path = split_dataset_path(given)[0].resolve()
        if path == folder or folder in path.parents:
            raise ValueError(f"output folder {output} holds the input {given}; it is never replaced: "
                             f"choose another OUTDIR")


def reusable_record(path, fingerprint: str, *, force: bool, outputs) -> dict | None:
    """The JSON record at ``path`` when it holds ``fingerprint`` (an interrupted run to continue), else None.

    The folder of ``path`` is the OUTDIR: when it exists it must be a folder;
    when it holds anything but a record with this fingerprint it is refused
    (FileExistsError), unless ``force`` (the caller then removes its
    ``outputs``, named in the message). The folder that holds OUTDIR must
    exist (FileNotFoundError).

    Examples
    --------
    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp()) / "out"
    >>> reusable_record(folder / "record.json", "abc", force=False, outputs=("record.json",)) is None  # no folder
    True
    >>> folder.mkdir(); _ = (folder / "record.json").write_text('{"fingerprint": "abc"}')
    >>> reusable_record(folder / "record.json", "abc", force=False, outputs=("record.json",))
    {'fingerprint': 'abc'}
    >>> reusable_record(folder / "record.json", "other", force=False, outputs=("record.json",))
    Traceback (most recent call last):
        ...
    FileExistsError: output folder ... holds results from other inputs or settings (or other files); choose another or pass --force to replace its record.json
    """
    path = Path(path)
    folder = path.parent
    if not folder.parent.exists():
        raise FileNotFoundError(f"the folder to hold {folder} does not exist: {folder.parent}")
    if not folder.exists():
        return None
    if not folder.is_dir():
        raise FileExistsError(f"output {folder} exists and is not a folder; it is never replaced")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        record = None
    if isinstance(record, dict) and record.get("fingerprint") == fingerprint:
        return record
    if not force and any(folder.iterdir()):
        raise FileExistsError(f"output folder {folder} holds results from other inputs or settings (or other "
                              f"files); choose another or pass --force to replace its {', '.join(outputs)}")
    return None


def remove_outputs(folder, names) -> None:
    """Remove the files or folders ``names`` from ``folder`` (a link itself, never what it points to); nothing else.

    Examples
    --------
    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp()); (folder / "a.zarr").mkdir(); _ = (folder / "keep.txt").write_text("")
    >>> remove_outputs(folder, ["a.zarr", "b.json"]); sorted(p.name for p in folder.iterdir())
    ['keep.txt']
    """
    folder = Path(folder)
    for name in names:
        target = folder / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif os.path.lexists(target):
            target.unlink()
