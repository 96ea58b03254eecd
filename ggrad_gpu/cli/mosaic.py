"""``ggrad mosaic GUIDE MANIFEST -o OUTDIR``: refine every tile, fit the stage model, fuse the mosaic.

MANIFEST is JSON, ``{"tiles": [{"cube": PATH, "initial": 3x3 list or PATH,
"name": optional, "dataset": optional}, ...]}`` (paths relative to the
manifest; ``initial`` as ``ggrad refine --initial`` reads it), or a CSV of
stage positions, ``cube,x_um,y_um`` (and optionally ``name``, ``dataset``),
with ``--tile-pixel-size`` and ``--guide-pixel-size`` (and ``--guide-origin``):
a tile's position is the stage position of the centre of its first pixel,
the guide's origin that of the outer corner of its first pixel (DESIGN
"Instrument files"); x runs along columns, y along rows.

OUTDIR receives ``tiles.json`` (per tile: matrix, initial, status, quality;
the stage model; the mosaic grid), ``mosaic.zarr`` (resumable: see
:mod:`ggrad_gpu.scaleout.fusion`) and ``report.png`` (:mod:`ggrad_gpu.plotting.mosaic`);
with ``--ome-zarr`` also ``mosaic.ome.zarr`` (NGFF, ``(c, y, x)``, all or
nothing, once the mosaic is complete).
The transforms are computed first and saved; a rerun of the same command
(same inputs and settings: ``tiles.json``'s fingerprint) reuses them and
writes only the mosaic's missing chunks, so an interrupted run (Ctrl-C,
SIGTERM) continues where it stopped. An OUTDIR from other inputs is refused
without ``--force``.

Where it runs: in-process threads by default; ``--workers N`` starts a
``distributed.LocalCluster`` of N processes; ``--scheduler ADDRESS`` uses a
running cluster. For several GPUs, start ``dask_cuda.LocalCUDACluster()``
(one worker per GPU), pass its scheduler address and ``--backend cupy``.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np

__all__ = ["TileFile", "add_parser", "initial_from_stage", "mosaic_command", "mosaic_demo", "read_manifest"]

OUTPUTS = ("tiles.json", "mosaic.zarr", "report.png")
# What a mosaic needs beyond a bare install: Dask runs the tiles, Zarr holds the fused mosaic.
NEEDS = {"dask": "dask", "zarr": "zarr"}
NEEDS_EXTRAS = "io,dask"
OME_ZARR = "mosaic.ome.zarr"  # with --ome-zarr


class TileFile:
    """A tile on disk: its shape now, its values when a task reads it (``numpy.asarray``).

    Examples
    --------
    >>> import tempfile
    >>> folder = tempfile.TemporaryDirectory(); root = Path(folder.name)
    >>> cube = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    >>> np.save(root / "tile.npy", cube)
    >>> tile = TileFile(root / "tile.npy")
    >>> tile.shape, bool(np.array_equal(np.asarray(tile), cube))  # the shape now, the values when read
    ((2, 3, 4), True)
    >>> tile.stamp()["dataset"] is None, tile.stamp() == TileFile(root / "tile.npy").stamp()
    (True, True)
    >>> folder.cleanup()
    """

    def __init__(self, path, dataset=None):
        from ..io import read_cube

        self.path, self.dataset = Path(path), dataset
        header = read_cube(self.path, dataset=dataset)  # npy is memory-mapped: cheap
        self.shape, self.band_centres = tuple(header.shape), header.band_centres

    def __array__(self, dtype=None, copy=None):
        from ..io import read_cube

        data = np.asarray(read_cube(self.path, dataset=self.dataset).data)
        return data if dtype is None else data.astype(dtype)

    def stamp(self) -> dict:
        """What identifies the file's content cheaply (:func:`ggrad_gpu.io.resumable.file_signature`)."""
        from ..io.resumable import file_signature

        return {**file_signature(self.path), "dataset": self.dataset}


def initial_from_stage(x_um, y_um, tile_pixel_um, guide_pixel_um, guide_origin_um=(0.0, 0.0)) -> np.ndarray:
    """Guide-to-tile matrix of a tile at stage position ``(x_um, y_um)`` (its first pixel's centre).

    The guide's pixel ``p`` has its centre at stage ``origin + (p + 0.5) * guide_pixel_um``
    (the origin is the outer corner of its first pixel); the tile's pixel
    ``q`` at ``(y_um, x_um) + q * tile_pixel_um``.

    Examples
    --------
    >>> from ggrad_gpu.cli.mosaic import initial_from_stage
    >>> initial_from_stage(100.0, 50.0, 4.0, 1.0)[:2]
    array([[  0.25 ,   0.   , -12.375],
           [  0.   ,   0.25 , -24.875]])
    """
    ratio = guide_pixel_um / tile_pixel_um
    x0, y0 = guide_origin_um
    return np.array([[ratio, 0, (y0 + 0.5 * guide_pixel_um - y_um) / tile_pixel_um],
                     [0, ratio, (x0 + 0.5 * guide_pixel_um - x_um) / tile_pixel_um], [0, 0, 1.0]])


def read_manifest(path, *, tile_pixel_um=None, guide_pixel_um=None, guide_origin_um=(0.0, 0.0)) -> list[dict]:
    """The tiles of a JSON or CSV manifest: ``[{"name", "cube", "dataset", "initial"}]``, paths resolved.

    Examples
    --------
    >>> import tempfile
    >>> folder = tempfile.TemporaryDirectory(); root = Path(folder.name)
    >>> _ = (root / "tiles.json").write_text(json.dumps({"tiles": [{"cube": "a.npy", "initial": np.eye(3).tolist()}]}))
    >>> tiles = read_manifest(root / "tiles.json")
    >>> tiles[0]["name"], tiles[0]["cube"] == root / "a.npy", tiles[0]["initial"].shape  # paths beside the manifest
    ('a', True, (3, 3))
    >>> _ = (root / "stage.csv").write_text("cube,x_um,y_um\\na.npy,100,50\\n")
    >>> tiles = read_manifest(root / "stage.csv", tile_pixel_um=4.0, guide_pixel_um=1.0)
    >>> bool(np.allclose(tiles[0]["initial"], initial_from_stage(100.0, 50.0, 4.0, 1.0)))
    True
    >>> folder.cleanup()
    """
    from ..io import read_transform

    path = Path(path)
    folder = path.parent
    if path.suffix.lower() == ".csv":
        if tile_pixel_um is None or guide_pixel_um is None:
            raise ValueError(f"a CSV manifest ({path}) needs --tile-pixel-size and --guide-pixel-size")
        with path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        missing = {"cube", "x_um", "y_um"} - set(rows[0] if rows else {})
        if missing:
            raise ValueError(f"manifest {path} must have the columns cube, x_um, y_um; missing {sorted(missing)}")
        entries = [{"cube": row["cube"], "name": row.get("name") or None, "dataset": row.get("dataset") or None,
                    "initial": initial_from_stage(float(row["x_um"]), float(row["y_um"]), tile_pixel_um,
                                                  guide_pixel_um, guide_origin_um)} for row in rows]
    else:
        try:
            entries = json.loads(path.read_text(encoding="utf-8"))["tiles"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"manifest {path} must be JSON with a list under 'tiles' (or a .csv): {exc}") from exc
    tiles, names = [], set()
    for number, entry in enumerate(entries):
        if not isinstance(entry, dict) or "cube" not in entry or "initial" not in entry:
            raise ValueError(f"manifest {path}: tile {number} must give 'cube' and 'initial'; got {entry!r}")
        initial = entry["initial"]
        if isinstance(initial, str):
            initial = read_transform(folder / initial)
        initial = np.asarray(initial, dtype=np.float64)
        if initial.shape != (3, 3):
            raise ValueError(f"manifest {path}: tile {number}'s initial must be a 3x3 matrix; got shape "
                             f"{initial.shape}")
        cube = folder / entry["cube"]
        name = entry.get("name") or Path(entry["cube"]).stem
        while name in names:
            name += f"-{number}"
        names.add(name)
        tiles.append({"name": name, "cube": cube, "dataset": entry.get("dataset"), "initial": initial})
    if not tiles:
        raise ValueError(f"manifest {path} lists no tiles")
    return tiles


def add_parser(commands, common_options) -> None:
    """Register ``ggrad mosaic`` on the ``ggrad`` parser's subcommands.

    Examples
    --------
    >>> import argparse
    >>> parser = argparse.ArgumentParser(prog="ggrad")
    >>> add_parser(parser.add_subparsers(dest="command"), lambda subparser: None)
    >>> args = parser.parse_args(["mosaic", "guide.png", "tiles.json", "-o", "out", "--chunk", "64"])
    >>> args.command, str(args.manifest), args.chunk, args.run is mosaic_command
    ('mosaic', 'tiles.json', 64, True)
    """
    mosaic = commands.add_parser("mosaic", help="refine every tile of a mosaic on one guide and fuse the mosaic",
                                 description=__doc__.split("\n\n")[0])
    mosaic.add_argument("guide", type=Path, help="guide image of the whole mosaic")
    mosaic.add_argument("manifest", type=Path, help="tiles: JSON (cube, initial, name, dataset) or CSV "
                        "(cube, x_um, y_um) with paths relative to it")
    mosaic.add_argument("-o", "--output", type=Path, required=True, metavar="OUTDIR",
                        help="folder for tiles.json, mosaic.zarr and report.png (a rerun continues it)")
    mosaic.add_argument("--workers", type=int, metavar="N", help="start a local Dask cluster of N processes")
    mosaic.add_argument("--scheduler", metavar="ADDRESS", help="run on this Dask scheduler (e.g. tcp://host:8786)")
    mosaic.add_argument("--max-in-flight", type=int, metavar="N",
                        help="tiles (and mosaic chunks) in flight at once (default: the worker threads)")
    mosaic.add_argument("--tile-pixel-size", type=float, metavar="UM", help="tile pixel size (CSV manifest)")
    mosaic.add_argument("--guide-pixel-size", type=float, metavar="UM", help="guide pixel size (CSV manifest)")
    mosaic.add_argument("--guide-origin", type=float, nargs=2, default=(0.0, 0.0), metavar=("X_UM", "Y_UM"),
                        help="stage position of the guide's first pixel's outer corner (CSV manifest)")
    mosaic.add_argument("--chunk", type=int, default=256, help="rows and columns of a mosaic chunk (default 256)")
    mosaic.add_argument("--ome-zarr", action="store_true", help="also write mosaic.ome.zarr (NGFF, c/y/x) for napari")
    mosaic.add_argument("--force", action="store_true", help="replace OUTDIR's outputs from other inputs")
    common_options(mosaic)
    mosaic.set_defaults(run=mosaic_command)


def mosaic_command(args) -> int:
    """``ggrad mosaic``: refine the manifest's tiles, fit the stage model, fuse ``mosaic.zarr``; the exit code.

    Examples
    --------
    >>> import tempfile
    >>> from ggrad_gpu import synthetic
    >>> from ggrad_gpu.cli.command import build_parser
    >>> folder = tempfile.TemporaryDirectory(); root = Path(folder.name)
    >>> mosaic = synthetic.make_mosaic(grid=(1, 2), tile_shape=(16, 16), bands=4, slipped=None, featureless=None,
    ...                                signatures="mixed")
    >>> np.save(root / "guide.npy", mosaic.guide)
    >>> for i, tile in enumerate(mosaic.tiles):
    ...     np.save(root / f"tile{i}.npy", tile)
    >>> manifest = {"tiles": [{"cube": f"tile{i}.npy", "initial": m.tolist()} for i, m in enumerate(mosaic.initials)]}
    >>> _ = (root / "tiles.json").write_text(json.dumps(manifest))
    >>> args = build_parser().parse_args(["mosaic", str(root / "guide.npy"), str(root / "tiles.json"),
    ...                                   "-o", str(root / "out"), "-q", "--backend", "numpy"])
    >>> mosaic_command(args)  # doctest: +ELLIPSIS
    2 tiles: 2 refined
    wrote tiles.json, mosaic.zarr, report.png to ...
    0
    >>> [tile["status"] for tile in json.loads((root / "out" / "tiles.json").read_text())["tiles"]]
    ['refined', 'refined']
    >>> folder.cleanup()
    """
    from ..io.libraries import require_all

    require_all(NEEDS, "ggrad mosaic", extras=NEEDS_EXTRAS)  # before any work
    from .. import io
    from ..scaleout.cluster import WORKER_CONFIG, dask_client
    from ..scaleout.fusion import mosaic_grid
    from ..io.guide_regions import open_guide_regions
    from ..io.resumable import file_signature, fingerprint
    from ..io.folders import remove_outputs, reusable_record
    from ..refinement.options import RefineOptions, resume_settings

    tiles = read_manifest(args.manifest, tile_pixel_um=args.tile_pixel_size, guide_pixel_um=args.guide_pixel_size,
                          guide_origin_um=tuple(args.guide_origin))
    _check_outdir(args.output, [args.guide, args.manifest] + [t["cube"] for t in tiles])
    guide = open_guide_regions(args.guide)  # by region where the format allows
    sources, stamps = _open_tiles(tiles)
    # refine's choices for the tiles (those ggrad mosaic sets; the others at their defaults), as a streamed
    # refine's fingerprint holds them: a rerun that changes one refines again.
    options = RefineOptions(levels=args.levels, backend=args.backend)
    settings = {**resume_settings(options), "chunk": args.chunk}
    stamp = fingerprint(guide=file_signature(args.guide), tiles=[[t["name"], t["initial"].tolist()] for t in tiles],
                        files=stamps, settings=settings)
    record_path = args.output / "tiles.json"
    record = reusable_record(record_path, stamp, force=args.force, outputs=OUTPUTS)
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr))
    with dask_client(workers=args.workers, scheduler=args.scheduler, config=WORKER_CONFIG) as client:
        if record is None:
            if args.output.exists() and args.force:
                remove_outputs(args.output, OUTPUTS + (OME_ZARR,))
            args.output.mkdir(exist_ok=True)
            result = _refine_tiles(args, guide, tiles, sources, client)
            placed = [i for i, s in enumerate(result.status) if s != "failed"]
            if not placed:
                raise ValueError(f"no tile could be read, nothing to place; {tiles[0]['cube']}: {result.messages[0]}")
            grid = mosaic_grid([result.shapes[i] for i in placed], result.matrices[placed], guide.shape)
            record = _tiles_record(tiles, result, grid, stamp)
            io.write_json(record_path, record, overwrite=True)
            _write_report(args.output / "report.png", guide, result, [t["name"] for t in tiles])
        else:
            say(f"ggrad mosaic: reusing the transforms in {record_path}")
        _fuse(args, record, sources, stamp, client)
    if args.ome_zarr and not (args.output / OME_ZARR).exists():
        from ..scaleout.fusion import write_ome_zarr

        write_ome_zarr(args.output / "mosaic.zarr", args.output / OME_ZARR)
    counts = {s: [t["status"] for t in record["tiles"]].count(s) for s in ("refined", "model", "initial", "failed")}
    print(f"{len(tiles)} tiles: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n))
    print(f"wrote {', '.join(OUTPUTS + ((OME_ZARR,) if args.ome_zarr else ()))} to {args.output}")
    return 0


def mosaic_demo(args) -> int:
    """``ggrad demo --mosaic``: a 3 x 4 phantom mosaic refined and fused; each tile's error before and after.

    :func:`ggrad_gpu.synthetic.make_mosaic` (``signatures="mixed"``, tiles of
    32 x 32 x ``--bands`` at 4 guide pixels per tile pixel, a slipped tile and
    a featureless one); the outputs of ``ggrad mosaic`` go to OUTDIR.

    Examples
    --------
    >>> import tempfile
    >>> from ggrad_gpu.cli.command import build_parser
    >>> folder = tempfile.TemporaryDirectory()
    >>> args = build_parser().parse_args(["demo", "--mosaic", "--bands", "4", "-o", folder.name + "/demo"])
    >>> # twelve tile refinements, about 10 s: tests/test_mosaic_cli.py runs it instead
    >>> mosaic_demo(args)  # doctest: +SKIP
    phantom mosaic: guide 394 x 503, 12 tiles of 32 x 32 x 4 (3 x 4, overlapping), a shared stage error, ...
    0
    >>> folder.cleanup()
    """
    import tempfile

    from ..io.libraries import require_all

    require_all(NEEDS, "ggrad demo --mosaic", extras=NEEDS_EXTRAS)  # before any work
    from .. import synthetic
    from ..scaleout.fusion import fuse_mosaic, mosaic_grid
    from .outputs import check_new_directory
    from ..io import write_json
    from ..registration.metrics import footprint_region, target_registration_error
    from ..scaleout.mosaic import refine_mosaic

    output = args.output or Path(tempfile.mkdtemp(prefix="ggrad-demo-")) / "mosaic"
    check_new_directory(output, force=False)
    mosaic = synthetic.make_mosaic(bands=args.bands, seed=args.seed, signatures="mixed")
    print(f"phantom mosaic: guide {mosaic.guide.shape[0]} x {mosaic.guide.shape[1]}, {len(mosaic.tiles)} tiles of "
          f"{' x '.join(map(str, mosaic.tiles[0].shape))} ({mosaic.grid[0]} x {mosaic.grid[1]}, overlapping), a shared "
          f"stage error, jitter; tile {mosaic.slipped} slipped, tile {mosaic.featureless} over a featureless sample")
    result = refine_mosaic(mosaic.guide, mosaic.tiles, initials=mosaic.initials, levels=args.levels,
                           backend=args.backend)
    print("tile  status    TRE over its footprint, guide px (mean): stage -> result")
    for i, status in enumerate(result.status):
        region = footprint_region(mosaic.tiles[i].shape, mosaic.matrices[i], mosaic.guide.shape)
        before, after = (target_registration_error(m, mosaic.matrices[i], mosaic.guide.shape, region=region).mean
                         for m in (mosaic.initials[i], result.matrices[i]))
        print(f"{i:>4}  {status:<8}  {before:6.2f} -> {after:.3f}")
    grid = mosaic_grid([t.shape for t in mosaic.tiles], result.matrices, mosaic.guide.shape)
    output.mkdir()
    names = [f"tile{i}" for i in range(len(mosaic.tiles))]
    entries = [{"name": name, "cube": f"built-in phantom, seed {args.seed}"} for name in names]
    write_json(output / "tiles.json", _tiles_record(entries, result, grid, None))
    fuse_mosaic(output / "mosaic.zarr", mosaic.tiles, result.matrices, grid, band_centres=mosaic.wavenumbers)
    _write_report(output / "report.png", mosaic.guide, result, names)
    print(f"wrote tiles.json, mosaic.zarr, report.png to {output} in {result.timings['total']:.1f} s of refinement")
    return 0


def _refine_tiles(args, guide, tiles, sources, client):
    from tqdm.auto import tqdm

    from ..scaleout.mosaic import refine_mosaic

    with tqdm(total=len(tiles), desc="tiles", unit=" tile", disable=True if args.quiet else None,
              file=sys.stderr) as bar:
        failed = [0]

        def progress(index, outcome):
            failed[0] += outcome.failed or not outcome.improved
            bar.set_postfix_str(f"not refined {failed[0]}")
            bar.update()

        readable = [_Missing() if source is None else source for source in sources]
        return refine_mosaic(guide, readable, initials=[t["initial"] for t in tiles], levels=args.levels,
                             backend=args.backend, client=client, max_in_flight=args.max_in_flight,
                             progress=progress)


class _Missing:
    """A tile whose file could not be opened: refine_mosaic marks it failed."""

    @property
    def shape(self):
        raise OSError("the tile's file could not be read")


def _fuse(args, record, sources, stamp, client):
    from tqdm.auto import tqdm

    from ..scaleout.fusion import MosaicGrid, fuse_mosaic

    mosaic = record["mosaic"]
    grid = MosaicGrid(int(mosaic["grid_factor"]), np.asarray(mosaic["mosaic_to_guide"]), tuple(mosaic["shape"][:2]))
    placed = [i for i, t in enumerate(record["tiles"]) if t["status"] != "failed"]
    unreadable = [record["tiles"][i]["cube"] for i in placed if sources[i] is None]
    if unreadable:
        raise ValueError(f"tiles placed before cannot be read now: {', '.join(unreadable)}")
    with tqdm(desc="mosaic", unit=" chunk", disable=True if args.quiet else None, file=sys.stderr) as bar:
        def progress(done, total):
            bar.total = total
            bar.update(done - bar.n)

        try:
            fuse_mosaic(args.output / "mosaic.zarr", [sources[i] for i in placed],
                        [np.asarray(record["tiles"][i]["matrix"]) for i in placed], grid, chunk=args.chunk,
                        band_centres=sources[placed[0]].band_centres,
                        fingerprint=stamp, force=args.force, client=client, max_in_flight=args.max_in_flight,
                        progress=progress)
        except KeyboardInterrupt:
            print(f"ggrad mosaic: {args.output / 'mosaic.zarr'} is incomplete; run the same command again to "
                  f"continue it", file=sys.stderr)
            raise


def _tiles_record(tiles, result, grid, stamp) -> dict:
    from ..io import versions

    model = result.model
    entries = []
    for i, tile in enumerate(tiles):
        quality = {k: float(v) for k, v in result.quality[i].items() if np.isfinite(v)}
        distance = model.distances[i]
        entries.append({"name": tile["name"], "cube": str(tile["cube"]), "matrix": result.matrices[i],
                        "initial": result.initials[i], "status": result.status[i], "quality": quality,
                        "message": result.messages[i],
                        "distance_to_model": None if not np.isfinite(distance) else float(distance)})
    bands = next(s[2] for s, status in zip(result.shapes, result.status) if status != "failed")
    return {"tiles": entries,
            "model": {"matrix": None if model.matrix is None else model.matrix, "tolerance": model.tolerance,
                      "inliers": model.inliers.tolist(),
                      "residuals": [None if not np.isfinite(r).all() else r.tolist() for r in model.residuals]},
            "mosaic": grid.record(bands), "fingerprint": stamp, "versions": versions()}


def _write_report(path, guide, result, names) -> None:
    from ..plotting.mosaic import mosaic_figure
    from ..io.atomic import write_figure

    write_figure(mosaic_figure(guide, result, names), path, overwrite=True)


def _open_tiles(tiles):
    """A :class:`TileFile` per tile (None where it cannot be opened) and their stamps."""
    sources, stamps = [], []
    for tile in tiles:
        try:
            source = TileFile(tile["cube"], tile["dataset"])
            stamps.append(source.stamp())
        except (OSError, ValueError, TypeError) as exc:
            source = None
            stamps.append([str(tile["cube"]), f"unreadable: {type(exc).__name__}"])
        sources.append(source)
    return sources, stamps


def _check_outdir(output: Path, inputs) -> None:
    """Refuse an OUTDIR that holds one of the inputs, or whose folder does not exist."""
    from ..io.folders import check_outside

    if not output.exists() and not output.parent.exists():
        raise FileNotFoundError(f"the folder to hold {output} does not exist: {output.parent}")
    check_outside(output, inputs)
