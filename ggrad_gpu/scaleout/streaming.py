"""``ggrad refine`` for a cube beyond memory: refine chunk by chunk, write ``registered.zarr`` resumably.

When the cube is larger than ``--memory-limit``, the CLI reads it lazily
(:func:`ggrad_gpu.io.read_cube` with ``lazy=True``), refines it with the same
stages chunk by chunk (:mod:`ggrad_gpu._lazy.chunked`), and writes the output folder
in place rather than all at once (DESIGN "Resumable output"):

1. ``transform.json``, ``weights.json`` and ``report.png`` first, each file
   atomic, with the run's fingerprint (inputs and settings) in
   ``transform.json``;
2. ``registered.zarr`` chunk by chunk (:class:`ggrad_gpu.io.resumable.ResumableArray`),
   ``complete`` set last.

The same command run again after an interruption finds the fingerprint,
reuses the transform without refining again and writes only the chunks still
missing; the store ends bit for bit as an uninterrupted run writes it. Other
inputs or settings never overwrite the folder without ``--force``.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from .._lazy.chunked import warp_cube_chunked
from .._version import __version__
from ..core.warp import warp_cube
from ..refinement.options import resume_settings

__all__ = ["MEMORY_SHARE", "default_memory_limit", "stream_refine"]

# Share of the machine's memory that the CLI lets a cube take before streaming it.
MEMORY_SHARE = 4
# Registered chunk side (DESIGN: chunks of about 256 x 256 x all bands).
CHUNK_SIDE = 256
OUTPUTS = ("registered.zarr", "transform.json", "weights.json", "report.png")
# Chunk-sized buffers a registered chunk holds from its task to its write (the
# source window, the interpolation's taps, the result, its encoded copy):
# about 3 measured (a batch of 4 chunks of 62 MB added 751 MiB).
WRITE_CHUNK_COST = 3


def default_memory_limit() -> int:
    """A quarter of the machine's physical memory, in bytes (4 GiB where the platform does not say).

    Examples
    --------
    >>> limit = default_memory_limit()
    >>> limit == (os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4 if hasattr(os, "sysconf") else 4 << 30)
    True
    """
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // MEMORY_SHARE
    except (AttributeError, ValueError, OSError):
        return 4 << 30


def stream_refine(guide, cube_data, output, *, options, guide_path, initial_path, initial, band_axis=None,
                  force: bool = False, quiet: bool = False, run_refine, say) -> tuple:
    """Refine a lazy cube and write the output folder in place, resumably.

    Parameters
    ----------
    guide : numpy.ndarray
        The guide image.
    cube_data : ggrad_gpu.io.CubeData
        The cube, ``data`` a dask array.
    output : path-like
        The output folder (made, or continued).
    options : ggrad_gpu.refinement.options.RefineOptions
        ``refine``'s options; ``memory_limit`` (bytes, required) also bounds
        the chunks computed at once. The fingerprint holds every option that
        :func:`~ggrad_gpu.refinement.options.resume_settings` gives.
    guide_path, initial_path : path-like
        The files they came from (``initial_path`` None for the default).
    initial
        As :func:`ggrad_gpu.refine` takes it.
    band_axis : int or list, optional
        The band axis the cube was read with (part of the fingerprint).
    force : bool
        Replace the outputs of another run in ``output``.
    quiet : bool
        No progress bar.
    run_refine : callable
        ``run_refine(guide, cube, initial=..., **options.keywords()) -> Refinement``
        (:func:`ggrad_gpu.refine`, or the CLI's, with its progress bar).
    say : callable
        Prints a progress line (or nothing, with ``--quiet``).

    Returns
    -------
    (str, bool)
        The refinement's message and whether it improved on the initial
        transform.

    Examples
    --------
    >>> import tempfile, zarr
    >>> from ggrad_gpu import io, refine
    >>> from ggrad_gpu.refinement.options import RefineOptions
    >>> from ggrad_gpu.synthetic import make_phantom
    >>> folder = tempfile.TemporaryDirectory(); root = Path(folder.name)
    >>> phantom = make_phantom(shape=(64, 80), bands=8, seed=0, signatures="mixed")
    >>> np.save(root / "guide.npy", phantom.guide); cube_path = io.write_cube(root / "cube.zarr", phantom.cube)
    >>> options = RefineOptions(output_grid="cube", memory_limit=1 << 20)
    >>> cube_data = io.read_cube(root / "cube.zarr", lazy=True)  # a dask array, never read whole
    >>> message, improved = stream_refine(phantom.guide, cube_data, root / "out", options=options,
    ...                                   guide_path=root / "guide.npy", initial_path=None, initial=phantom.initial,
    ...                                   quiet=True, run_refine=refine, say=lambda line: None)
    >>> improved, sorted(path.name for path in (root / "out").iterdir())
    (True, ['registered.zarr', 'report.png', 'transform.json', 'weights.json'])
    >>> store = zarr.open_array(str(root / "out" / "registered.zarr"), mode="r")
    >>> store.shape, store.attrs["complete"]  # output_grid "cube": about the cube's own 12 x 14 pixels
    ((12, 15, 8), True)
    >>> folder.cleanup()
    """
    from ..io import ResumableArray, file_signature, fingerprint, read_transform

    out = Path(output)
    grid, memory_limit = options.output_grid, options.memory_limit
    if memory_limit is None:
        raise ValueError("stream_refine needs options.memory_limit: the bytes the run may hold")
    signature = fingerprint(
        guide=file_signature(guide_path), cube=file_signature(cube_data.path), dataset=cube_data.dataset,
        initial=None if initial_path is None else file_signature(initial_path), band_axis=band_axis,
        options=resume_settings(options), version=__version__,
    )
    record = _resumable_record(out, signature, force=force)
    if record is None:
        refinement = run_refine(guide, cube_data.data, initial=initial, **options.keywords())
        source = "default" if initial_path is None else "file"
        record = _write_small_outputs(out, refinement, guide, cube_data, guide_path, signature, source)
        # Free the refinement's images and the report (matplotlib's reference
        # cycles wait for the collector) before the cube-sized write.
        del refinement
        gc.collect()
        say(f"refined: the transform is in {out / 'transform.json'}; now writing registered.zarr")
    else:
        say(f"continuing {out}: the transform of the interrupted run is reused")
    matrix = read_transform(out / "transform.json")
    to_guide = np.asarray(record["output_grid"]["output_to_guide"], dtype=np.float64)
    shape = tuple(record["output_grid"]["shape"])
    bands = cube_data.data.shape[2]
    dtype = np.float64 if cube_data.data.dtype == np.float64 else np.float32
    side = max(1, min(CHUNK_SIDE, int(np.sqrt(memory_limit / 16 / (bands * np.dtype(dtype).itemsize)))))
    store = ResumableArray.open(
        out / "registered.zarr", shape=shape + (bands,), chunks=(side, side, bands), dtype=dtype,
        fingerprint=signature, attributes=_store_attributes(matrix, to_guide, grid, cube_data),
    )
    registered = warp_cube_chunked(cube_data.data, matrix @ to_guide, shape, order=1, kernel=warp_cube,
                                   chunks=(side, side))
    start, count = time.perf_counter(), len(store.pending())
    _write_chunks(store, registered, memory_limit, quiet=quiet)
    store.finish()
    seconds = time.perf_counter() - start
    say(f"registered.zarr: warped and wrote {count} chunks of {side} x {side} x {bands} in {seconds:.1f} s")
    return record["message"], bool(record["improved"])


def _resumable_record(out: Path, signature: str, *, force: bool):
    """The ``transform.json`` of an interrupted run with this fingerprint, or None; the folder made ready.

    Raises FileExistsError when ``out`` holds anything else and ``force`` is
    False; ``force`` redoes the run (even one with this fingerprint).
    """
    from ..io.folders import remove_outputs, reusable_record

    record = reusable_record(out / "transform.json", signature, force=force, outputs=OUTPUTS)
    if force:
        record = None
        if out.is_dir():
            remove_outputs(out, OUTPUTS)
    out.mkdir(exist_ok=True)
    return record


def _write_small_outputs(out: Path, refinement, guide, cube_data, guide_path, signature, initial_source) -> dict:
    """``transform.json`` (with the fingerprint), ``weights.json`` and ``report.png``, each atomic."""
    from ..io import transform_record, weights_record, write_json
    from ..io.atomic import atomic_write, write_figure
    from ..plotting.report import report_figure

    centres, unit = cube_data.band_centres, cube_data.band_unit
    figure = report_figure(refinement, guide, cube_data.data, band_centres=centres, band_unit=unit)
    with atomic_write(out / "report.png", overwrite=True) as temp:
        write_figure(figure, temp)
    write_json(out / "weights.json", weights_record(refinement.gradient, band_centres=centres, band_unit=unit),
               overwrite=True)
    record = transform_record(
        refinement, guide={"shape": [int(n) for n in guide.shape], "source": str(guide_path)},
        cube={"shape": [int(n) for n in cube_data.data.shape], "source": str(cube_data.path),
              "format": cube_data.format},
        initial_source=initial_source,
    )
    record.update(fingerprint=signature, streamed=True)
    write_json(out / "transform.json", record, overwrite=True)  # last: its fingerprint marks the transform done
    return json.loads((out / "transform.json").read_text())


def _store_attributes(matrix, to_guide, grid: str, cube_data) -> dict:
    centres = None if cube_data.band_centres is None else [float(v) for v in cube_data.band_centres]
    return {"matrix": np.asarray(matrix).tolist(), "output_to_guide": np.asarray(to_guide).tolist(),
            "output_grid": grid, "band_centres": centres, "band_unit": cube_data.band_unit}


def _write_chunks(store, registered, memory_limit: int, *, quiet: bool) -> None:
    """Compute and write the store's pending chunks, a batch at a time, with a progress bar."""
    import dask
    from tqdm.auto import tqdm

    pending = store.pending()
    total = len(store.chunk_indices())
    chunk_bytes = int(np.prod(store.array.chunks)) * store.array.dtype.itemsize
    batch = max(1, memory_limit // (2 * WRITE_CHUNK_COST * chunk_bytes))  # a batch within half the limit
    with tqdm(total=total, initial=total - len(pending), desc="registered.zarr", unit=" chunk",
              disable=True if quiet else None, file=sys.stderr) as bar:
        for start in range(0, len(pending), batch):
            indices = pending[start:start + batch]
            blocks = dask.compute(*[registered.blocks[index[:2]] for index in indices])
            for index, block in zip(indices, blocks):
                store.write(index, block)
                bar.update()
