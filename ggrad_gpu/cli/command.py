"""The ``ggrad`` command.

``ggrad refine GUIDE CUBE -o OUTDIR`` refines the placement of a cube on a
guide image and writes the registered cube, ``transform.json``,
``weights.json`` and ``report.png`` into a new OUTDIR; ``ggrad refine FILE -o
OUTDIR`` takes the cube, the guide and the initial transform from an instrument
file (:func:`ggrad_gpu.io.read_instrument`), and ``ggrad refine --guide GUIDE
CUBE_A CUBE_B ... -o OUTDIR`` refines several cubes on one guide (a subfolder
per cube, ``cube_to_cube.json``, ``overlay.png``). ``ggrad apply TRANSFORM CUBE
-o OUTDIR`` resamples a cube with a saved ``transform.json`` without refining
(:mod:`ggrad_gpu.refinement.apply`). ``ggrad demo`` refines a built-in phantom (:func:`ggrad_gpu.synthetic.make_phantom`) and
prints, for the global gradient, the best single band and the baselines of
:mod:`ggrad_gpu.baselines`, how well each matches the guide's gradient and
the registration error that refine reaches with each (the paper's Tables
2-4, against the known transform). ``ggrad bench`` times each stage on NumPy or CuPy against the
machine's measured limits (:mod:`ggrad_gpu.cli.bench`) and prints a Markdown table.

Exit codes: 0 done (also when the initial transform was kept, unless
``--strict``); 1 the refinement kept the initial transform and ``--strict``
was given; 2 bad input or usage, including a corrupt or truncated input file
and a full disk (one line on stderr, naming the file); 3 an unexpected error
(one line; ``--debug`` shows the traceback); 130 interrupted (Ctrl-C,
SIGINT); 143 terminated (SIGTERM, 128 + 15, as a shell reports a process
that SIGTERM ended).

Data safety: inputs are only read. Results are assembled in a hidden folder
beside OUTDIR and renamed into place when complete; SIGTERM is handled like
Ctrl-C, so an interrupted run, a full disk or an error leaves neither OUTDIR
nor a temporary file behind, and an existing OUTDIR is kept unless
``--force`` (which refuses an OUTDIR that holds an input).
"""

from __future__ import annotations

import argparse
import functools
import signal
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import fields
from pathlib import Path

import numpy as np

from .. import synthetic
from .._backend import BACKENDS, resolve_backend, to_device
from .._memory import keep_freed_memory, return_freed_memory
from .._pages import small_pages
from .._version import __version__
from ..core.estimate import estimate_global_gradient
from ..core.filters import sobel_magnitude
from ..io import CUBE_FORMATS, INSTRUMENT_SUFFIXES, is_instrument_file, read_instrument, read_transform
from ..io.folders import check_outside
from ..refinement.apply import APPLY_GRIDS, apply_transform
from ..refinement.driver import refine
from ..refinement.multimodal import cube_to_cube
from ..refinement.options import OUTPUT_GRIDS, RefineOptions, parse_bytes
from ..registration.metrics import ncc, target_registration_error
from .mosaic import add_parser as add_mosaic_parser, mosaic_demo
from .multi_outputs import unique_names, write_many_outputs
from .outputs import check_new_directory, write_outputs

EXIT_OK, EXIT_KEPT, EXIT_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 3, 130, 143


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when the process receives SIGTERM while :func:`main` runs.

    A subclass of :class:`KeyboardInterrupt`, so that everything that cleans
    up after Ctrl-C (the output folder's staging, :func:`ggrad_gpu.io.atomic_write`)
    cleans up after SIGTERM too.

    Examples
    --------
    >>> issubclass(Terminated, KeyboardInterrupt)  # cleaned up after like Ctrl-C
    True
    >>> try:
    ...     raise Terminated()
    ... except KeyboardInterrupt as exc:
    ...     print(type(exc).__name__)
    Terminated
    """


def build_parser() -> argparse.ArgumentParser:
    """The ``ggrad`` command line: ``refine``, ``apply``, ``demo``, ``bench`` and ``mosaic``.

    Examples
    --------
    >>> args = build_parser().parse_args(["refine", "guide.png", "cube.npy", "-o", "out", "--levels", "3"])
    >>> args.command, [str(path) for path in args.inputs], str(args.output), args.levels, args.backend
    ('refine', ['guide.png', 'cube.npy'], 'out', 3, 'auto')
    >>> build_parser().parse_args(["bench", "--sizes", "tiny"]).repeat
    3
    """
    parser = argparse.ArgumentParser(
        prog="ggrad",
        description="Refine the registration of hyperspectral images to a brightfield image.",
        epilog="exit codes: 0 done; 1 initial transform kept (with --strict); 2 bad input; "
               "3 unexpected error; 130 interrupted (SIGINT); 143 terminated (SIGTERM)",
    )
    parser.add_argument("--version", action="version", version=f"ggrad_gpu {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser(
        "refine", help="refine cubes' placement on a guide image and write the results",
        description="ggrad refine GUIDE CUBE -o OUT; ggrad refine FILE -o OUT for an instrument file holding its "
                    "own guide (.wdf, .dmt); ggrad refine [--guide GUIDE | GUIDE] CUBE_A CUBE_B ... -o OUT for "
                    "several cubes on one guide (one subfolder per cube, cube_to_cube.json, overlay.png).",
    )
    run.add_argument("inputs", type=Path, nargs="+", metavar="FILE",
                     help="GUIDE CUBE [CUBE ...], or one instrument file (with --guide: cubes only). Guide: PNG, "
                          "TIFF, JPEG (RGB becomes grayscale) or .npy; cube: .npy, .npz, multi-page TIFF, ENVI .hdr, "
                          "HDF5 (file.h5:/dataset), .zarr, or an instrument file (.wdf, .dmt)")
    run.add_argument("-o", "--output", type=Path, required=True, metavar="OUTDIR",
                     help="folder to create for the results (never replaced without --force)")
    run.add_argument("--guide", type=Path, dest="guide_file", metavar="GUIDE",
                     help="the guide image; every positional FILE is then a cube (overrides an instrument "
                          "file's own white-light image)")
    run.add_argument("--initial", type=Path, metavar="FILE", action="append",
                     help="initial guide-to-cube transform: a transform.json (key 'matrix') or a text 3x3 "
                          "matrix (default: an instrument file's stage metadata, else the cube spans the "
                          "guide's field of view); once per cube, in the cubes' order")
    run.add_argument("--dataset", action="append",
                     help="dataset path inside an HDF5 or Zarr cube; once, or once per cube")
    run.add_argument("--band-axis", type=int, action="append",
                     help="axis of the stored cube that holds the bands (default: the format's own); once, or "
                          "once per cube")
    _common_options(run)
    run.add_argument("--alpha", type=_float_list, metavar="A0,A1,...",
                     help="manual guide level weights (with --beta; default: solved, eq. 9)")
    run.add_argument("--beta", type=_float_list, metavar="B0,B1,...", help="manual cube level weights")
    run.add_argument("--working-shape", type=int, nargs=2, metavar=("ROWS", "COLS"),
                     help="size of the working grid (default: from the cube's resolution)")
    run.add_argument("--output-grid", choices=OUTPUT_GRIDS, default=None,
                     help="grid of the registered cube: working, guide, or cube "
                          "(about the cube's pixel size; default: working, or cube when streaming)")
    run.add_argument("--memory-limit", type=_bytes, default=None, metavar="BYTES",
                     help="stream a cube larger than this (e.g. 4GB) chunk by chunk into registered.zarr, "
                          "resumably (default: a quarter of the machine's memory)")
    run.add_argument("--workers", type=int, default=None, metavar="N",
                     help="run the chunked work on a local Dask cluster of N worker processes")
    run.add_argument("--scheduler", default=None, metavar="ADDRESS",
                     help="run the chunked work on the Dask cluster at ADDRESS")
    run.add_argument("--format", choices=CUBE_FORMATS, default="npy", dest="cube_format",
                     help="file format of the registered cube (default: npy)")
    run.add_argument("--no-absorbance", action="store_false", dest="absorbance", default=None,
                     help="compare the cube with the guide's intensity, not its optical density "
                          "(for guides that are not transmitted light; the default where an instrument "
                          "file says its guide is an electron image)")
    run.add_argument("--no-denoise", action="store_false", dest="denoise",
                     help="estimate from the cube as it is, not from its projection on the components above "
                          "its noise")
    run.add_argument("--no-normalise", action="store_false", dest="normalise",
                     help="estimate from the spectra as they are, never each divided by its total (by default "
                          "the division is used where it explains the guide clearly better)")
    run.add_argument("--force", action="store_true", help="replace OUTDIR if it exists")
    run.add_argument("--strict", action="store_true", help="exit with 1 when the initial transform is kept")
    run.add_argument("--check", action="store_true",
                     help="also estimate the result's own uncertainty, spread_px in transform.json's quality "
                          "(independent refinements; about as long again)")
    run.set_defaults(run=_refine_command)

    _apply_parser(commands)

    demo = commands.add_parser(
        "demo", help="estimate and refine on a built-in phantom; print the error before and after"
    )
    demo.add_argument("--shape", type=int, nargs=2, default=(350, 415), metavar=("ROWS", "COLS"),
                      help="guide shape (default: 350 415, the paper's)")
    demo.add_argument("--bands", type=int, default=200,
                      help="spectral bands (default: 200; the paper's cubes have about 1000)")
    demo.add_argument("--seed", type=int, default=0, help="phantom seed (default: 0)")
    demo.add_argument("-o", "--output", type=Path, metavar="OUTDIR",
                      help="folder to create for the report (default: a new temporary folder)")
    demo.add_argument("--mosaic", action="store_true", help="a phantom mosaic of 3 x 4 tiles instead (ggrad mosaic)")
    _common_options(demo)
    demo.set_defaults(run=_demo_command, force=False, cube_format="npy")

    bench = commands.add_parser(
        "bench", help="time each stage on NumPy or CuPy against the machine's own limits; print a Markdown table",
        description="Time each stage (ggrad_gpu.cli.bench) on phantoms; the table goes to stdout, progress to stderr.",
    )
    bench.add_argument("--sizes", default="small", metavar="SIZES",
                       help="comma list of tiny (64x80x16), small (350x415x200), paper (350x415x1000), "
                            "large (1024x1024x512, 2048x2048x256) or ROWSxCOLSxBANDS (default: small)")
    bench.add_argument("--backend", choices=("numpy", "cupy", "auto", "both"), default="auto",
                       help="auto: CuPy where a GPU is usable, else NumPy; both: NumPy and CuPy (default: auto)")
    bench.add_argument("--stages", default=None, metavar="NAMES",
                       help="comma list of sobel, pyramid, gram, nnls, combine, warp, register, estimate, "
                            "refine (default: all)")
    bench.add_argument("--repeat", type=int, default=3, help="timed rounds per stage (default: 3)")
    bench.add_argument("--json", type=Path, metavar="FILE", help="also write the rows and the machine as JSON")
    bench.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    bench.add_argument("--debug", action="store_true", help="show the traceback of an error")
    bench.set_defaults(run=_bench_command)
    add_mosaic_parser(commands, _common_options)
    return parser


def _common_options(parser) -> None:
    parser.add_argument("--levels", type=_levels, default="auto",
                        help="pyramid levels K, or auto: as many as the cube's footprint holds (default: auto)")
    parser.add_argument("--backend", choices=BACKENDS, default="auto",
                        help="compute on NumPy or CuPy (default: auto, CuPy where a GPU is usable)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar, only results and errors")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")


def _levels(text: str):
    """``--levels``: ``auto`` or a positive integer."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be auto or a positive integer; got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be auto or a positive integer; got {text!r}")
    return value


def _bytes(text: str) -> int:
    try:
        return parse_bytes(text, "--memory-limit")
    except (TypeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _float_list(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers; got {text!r}") from None


def main(argv=None) -> int:
    """Run ``ggrad`` with ``argv`` (default ``sys.argv[1:]``); return the exit code.

    While it runs (in the main thread), SIGTERM raises :class:`Terminated`,
    which unwinds like Ctrl-C: partial outputs are removed and the exit code
    is 143 (130 for Ctrl-C). The previous SIGTERM handler is restored on
    return.

    Examples
    --------
    >>> import tempfile
    >>> from ggrad_gpu.synthetic import make_phantom
    >>> folder = tempfile.TemporaryDirectory(); root = Path(folder.name)
    >>> phantom = make_phantom(shape=(64, 80), bands=8, seed=0, signatures="mixed")
    >>> np.save(root / "guide.npy", phantom.guide); np.save(root / "cube.npy", phantom.cube)
    >>> np.savetxt(root / "initial.txt", phantom.initial)
    >>> command = ["refine", str(root / "guide.npy"), str(root / "cube.npy"), "--initial", str(root / "initial.txt"),
    ...            "-o", str(root / "out"), "-q"]
    >>> main(command)  # doctest: +ELLIPSIS
    refined: gradient MSE ... -> ..., NCC ... -> ..., fit ... -> ...
    wrote registered.npy, transform.json, weights.json, report.png to ...
    0
    >>> matrix = read_transform(root / "out" / "transform.json")
    >>> before = target_registration_error(phantom.initial, phantom.matrix, (64, 80)).mean
    >>> bool(target_registration_error(matrix, phantom.matrix, (64, 80)).mean < before / 3)
    True
    >>> main(command)  # the folder exists now: exit code 2, nothing replaced without --force
    2
    >>> folder.cleanup()
    """
    args = build_parser().parse_args(argv)
    previous = _handle_sigterm()
    try:
        with small_pages():  # reading, refining and writing: new arrays on small pages where huge ones stall
            return args.run(args)
    except KeyboardInterrupt as exc:
        terminated = isinstance(exc, Terminated)
        left = ("the same command continues the mosaic" if args.command == "mosaic"  # resumable by design
                else "no partial output was left behind")
        print(f"ggrad: {'terminated (SIGTERM)' if terminated else 'interrupted'}; {left}", file=sys.stderr)
        return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED
    except (ValueError, TypeError, OSError, ImportError) as exc:
        # Bad input, missing files, an existing OUTDIR, a missing optional reader.
        if args.debug:
            raise
        print(f"ggrad: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_INPUT
    except Exception as exc:  # noqa: BLE001 - scripts get one line and a code; --debug the rest
        if args.debug:
            raise
        print(f"ggrad: internal error ({type(exc).__name__}): {_one_line(exc)} (--debug shows more)",
              file=sys.stderr)
        return EXIT_INTERNAL
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _handle_sigterm():
    """Make SIGTERM raise :class:`Terminated`; return the handler it replaced (None if unchanged)."""
    if threading.current_thread() is not threading.main_thread():
        return None  # only the main thread may set handlers
    previous = signal.getsignal(signal.SIGTERM)
    if previous is None or previous is signal.SIG_IGN:  # set outside Python, or ignored on purpose
        return None

    def terminate(signum, frame):
        raise Terminated("SIGTERM")

    signal.signal(signal.SIGTERM, terminate)
    return previous


def _one_line(exc) -> str:
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())


def _refine_command(args) -> int:
    from .. import io

    guide_path, cube_paths = _refine_positionals(args)
    check_outside(args.output, [guide_path, *cube_paths, *(args.initial or [])])
    weights = _manual_weights(args)
    # The guide file is read at most once, by whichever step needs it first.
    read_guide = functools.lru_cache(maxsize=1)(lambda: io.read_guide(guide_path))
    streamed = _lazy_cube_over_limit(args, guide_path, cube_paths, read_guide)
    if streamed is not None:
        return _stream_command(args, guide_path, read_guide(), *streamed, weights)
    check_new_directory(args.output, force=args.force)
    keep_freed_memory()  # in memory: reuse freed arrays rather than fault in fresh ones
    guide, guide_instrument, jobs = _refine_inputs(args, guide_path, cube_paths, read_guide)
    say = _printer(args)
    if args.absorbance is None:  # not given: what the instrument file says its guide is
        kind = None if guide_instrument is None else guide_instrument.guide_kind
        args.absorbance = kind != "electron"
        if kind is not None:
            say(f"guide: {kind} image ({'optical density' if args.absorbance else 'compared as it is'})")
    say(f"guide {guide.shape[0]} x {guide.shape[1]}; " + "; ".join(
        f"cube {' x '.join(map(str, job['cube'].data.shape))} ({job['cube'].format})" for job in jobs))
    guide_source = guide_path if guide_path is not None else guide_instrument.path
    refinements = [_refine_one(args, guide, guide_source, job, weights) for job in jobs]
    for job, refinement in zip(jobs, refinements):
        if refinement.quality.get("normalised"):
            say(f"estimated from each spectrum divided by its total ({Path(job['path']).name}: its totals vary "
                "in a way the guide does not; --no-normalise uses them as they are)")
    if len(jobs) == 1:
        job, refinement = jobs[0], refinements[0]
        written = write_outputs(args.output, refinement, guide, job["cube"], cube_format=args.cube_format,
                                force=args.force, inputs=job["inputs"], initial_source=job["initial_source"])
        print(f"{refinement.message}")
    else:
        names = unique_names(job["path"] for job in jobs)
        pairs = cube_to_cube([r.matrix for r in refinements], names)
        written = write_many_outputs(args.output, refinements, guide, [job["cube"] for job in jobs], names,
                                     cube_to_cube=pairs, initial_sources=[job["initial_source"] for job in jobs],
                                     inputs=[job["inputs"] for job in jobs], cube_format=args.cube_format,
                                     force=args.force)
        for name, refinement in zip(names, refinements):
            print(f"{name}: {refinement.message}")
    print(f"wrote {', '.join(path.name for path in written)} to {args.output}")
    kept = not all(r.improved for r in refinements)
    return EXIT_KEPT if args.strict and kept else EXIT_OK


def _refine_positionals(args):
    """``(guide path or None, cube paths)`` from the grammar: --guide, one instrument file, or GUIDE CUBE..."""
    inputs = list(args.inputs)
    if args.guide_file is not None:
        return args.guide_file, inputs
    if len(inputs) == 1:
        if not is_instrument_file(inputs[0]):
            raise ValueError(f"a single input must be an instrument file holding its own guide "
                             f"({', '.join(INSTRUMENT_SUFFIXES)}); got {inputs[0]}: give GUIDE CUBE, or --guide GUIDE")
        return None, inputs
    return inputs[0], inputs[1:]


def _per_cube(values, count: int, option: str, *, shared: bool):
    """One value per cube from a repeated option: none, once per cube, or (``shared``) once for all."""
    if values is None:
        return [None] * count
    if len(values) == count:
        return list(values)
    if shared and len(values) == 1:
        return list(values) * count
    once = "once or " if shared else ""
    raise ValueError(f"{option} was given {len(values)} times for {count} cube(s); give it {once}once per cube, "
                     f"in the cubes' order")


def _refine_inputs(args, guide_path, cube_paths, read_guide):
    """The guide, the instrument file it came from (or None), and per cube: the cube, initial and sources.

    ``read_guide()`` reads the guide file ``guide_path`` (where it is not an instrument file).
    """
    count = len(cube_paths)
    initials = _per_cube(args.initial, count, "--initial", shared=False)
    datasets = _per_cube(args.dataset, count, "--dataset", shared=True)
    band_axes = _per_cube(args.band_axis, count, "--band-axis", shared=True)
    guide_instrument = None
    if guide_path is None or is_instrument_file(guide_path):
        guide_instrument = read_instrument(guide_path if guide_path is not None else cube_paths[0])
        if guide_instrument.guide is None:
            raise ValueError(f"{guide_instrument.path} holds no white-light image: give --guide GUIDE")
        guide = guide_instrument.guide
    else:
        guide = read_guide()
    jobs = []
    for path, initial, dataset, band_axis in zip(cube_paths, initials, datasets, band_axes):
        job = _cube_job(path, dataset, band_axis, guide_instrument)
        if initial is not None:
            job.update(initial=read_transform(initial), initial_source="file")
        job["inputs"] = {"guide": str(guide_path if guide_path is not None else path), "cube": str(path),
                         **job.pop("instrument", {})}
        jobs.append(job)
    return guide, guide_instrument, jobs


def _cube_job(path, dataset, band_axis, guide_instrument) -> dict:
    """A cube to refine: from a cube file, or an instrument file (its stage transform when it holds the guide)."""
    from .. import io

    if not is_instrument_file(path):
        cube = io.read_cube(path, dataset=dataset, band_axis=band_axis)
        return {"path": path, "cube": cube, "initial": None, "initial_source": "default"}
    for option, value in (("--dataset", dataset), ("--band-axis", band_axis)):
        if value is not None:
            raise ValueError(f"{option} does not apply to the instrument file {path}; got {value}")
    same = guide_instrument is not None and Path(guide_instrument.path).resolve() == Path(path).resolve()
    instrument = guide_instrument if same else read_instrument(path)
    job = {"path": path, "cube": instrument.cube_data(), "instrument": {"instrument": instrument.metadata}}
    if same and instrument.initial is not None:
        return {**job, "initial": instrument.initial, "initial_source": instrument.initial_source}
    if instrument.initial is not None:
        print(f"ggrad: note: the stage transform of {path} places it on its own white-light image, not on the "
              f"guide given; starting from the default placement (give --initial to set one)", file=sys.stderr)
    return {**job, "initial": None, "initial_source": "default"}


def _refine_one(args, guide, guide_source, job, weights):
    """``refine`` of one cube, its errors naming the file they concern."""
    cube_data, cube_path = job["cube"], job["path"]
    try:
        with np.errstate(over="raise"):  # values so large that they overflow: an input error, said once
            return _run_refine(args, guide, cube_data.data, initial=job["initial"],
                               **refine_options(args, weights=weights).keywords())
    except FloatingPointError as exc:
        largest = ", ".join(f"{_largest_magnitude(data):.3g} in {path}"
                            for data, path in ((cube_data.data, cube_path), (guide, guide_source)))
        raise ValueError(f"values too large to compute with ({exc}); the largest magnitudes are {largest}: "
                         f"rescale the data") from exc
    except (ValueError, TypeError) as exc:  # e.g. "cube contains NaN": say which file
        text = str(exc)
        source = cube_path if text.startswith("cube") else guide_source if text.startswith("guide") else None
        if source is None or str(source) in text:
            raise
        try:
            named = type(exc)(f"{source}: {text}")
        except Exception:  # noqa: BLE001 - an exception type with another signature
            named = ValueError(f"{source}: {text}")
        raise named from exc


def _apply_parser(commands) -> None:
    apply = commands.add_parser(
        "apply", help="resample a cube with a saved transform.json, without refining again",
        description="Resample CUBE (on the native grid the transform was made for) with TRANSFORM onto the "
                    "working grid or the guide grid; OUTDIR gets registered.<ext> and transform.json.",
    )
    apply.add_argument("transform", type=Path, help="a transform.json written by ggrad refine")
    apply.add_argument("cube", type=Path, help="cube file (as ggrad refine reads) or instrument file")
    apply.add_argument("-o", "--output", type=Path, required=True, metavar="OUTDIR",
                       help="folder to create (never replaced without --force)")
    apply.add_argument("--output-grid", choices=APPLY_GRIDS, default="working",
                       help="grid of the resampled cube: refine's working grid, the full guide, or cube "
                            "(about the cube's pixel size; default: working)")
    apply.add_argument("--dataset", help="dataset path inside an HDF5 or Zarr cube")
    apply.add_argument("--band-axis", type=int, default=None, help="axis of the stored cube that holds the bands")
    apply.add_argument("--format", choices=CUBE_FORMATS, default="npy", dest="cube_format",
                       help="file format of the resampled cube (default: npy)")
    apply.add_argument("--force", action="store_true", help="replace OUTDIR if it exists")
    apply.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    apply.add_argument("--debug", action="store_true", help="show the traceback of an error")
    apply.set_defaults(run=_apply_command)


def _apply_command(args) -> int:
    import json

    from .. import io

    check_new_directory(args.output, force=args.force)
    check_outside(args.output, [args.transform, args.cube])
    if not args.transform.is_file():
        raise FileNotFoundError(f"transform file not found: {args.transform}")
    try:
        record = json.loads(args.transform.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{args.transform} is not valid JSON: {exc}") from None
    if not isinstance(record, dict):
        raise ValueError(f"{args.transform} holds no transform record (a JSON object with 'matrix')")
    if is_instrument_file(args.cube):
        cube = read_instrument(args.cube).cube_data()
    else:
        cube = io.read_cube(args.cube, dataset=args.dataset, band_axis=args.band_axis)
    try:
        registered, valid, to_guide = apply_transform(cube.data, record, grid=args.output_grid)
    except ValueError as exc:
        raise ValueError(f"{args.transform} on {args.cube}: {exc}") from exc
    applied = {**record, "cube": {"shape": [int(n) for n in cube.data.shape], "source": str(args.cube),
                                  "format": cube.format},
               "applied": {"transform": str(args.transform), "output_grid": args.output_grid,
                           "output_shape": [int(n) for n in registered.shape[:2]],
                           "output_to_guide": [[float(v) for v in row] for row in to_guide],
                           "covered_pixels": int(valid.sum())}}
    name = "registered" + io.cube_suffix(args.cube_format)
    with io.atomic_folder(args.output, overwrite=args.force) as staging:
        io.write_cube(staging / name, registered, band_centres=cube.band_centres, band_unit=cube.band_unit,
                      format=args.cube_format)
        io.write_json(staging / "transform.json", applied)
    _printer(args)(f"resampled {' x '.join(map(str, cube.data.shape))} onto the {args.output_grid} grid "
                   f"({registered.shape[0]} x {registered.shape[1]}, {int(valid.sum())} pixels covered)")
    print(f"wrote {name}, transform.json to {args.output}")
    return EXIT_OK


def _lazy_cube_over_limit(args, guide_path, cube_paths, read_guide):
    """``(cube, memory limit, why)`` for one plain cube file to stream, read lazily; else None.

    Streamed: a cube larger than ``--memory-limit``, or one whose registered
    copy on the guide's grid would not fit it (``read_guide()`` reads the
    guide file for its size). ``why`` says which, for the user.
    """
    from .. import io
    from ..scaleout.streaming import default_memory_limit, in_memory_bytes

    if guide_path is None or len(cube_paths) != 1 or is_instrument_file(cube_paths[0]):
        return None
    try:
        import dask.array  # noqa: F401 - streaming needs it; without it every cube is read whole
    except ImportError:
        return None
    limit = args.memory_limit or default_memory_limit()
    dataset, band_axis = (_per_cube(values, 1, option, shared=True)[0]
                          for values, option in ((args.dataset, "--dataset"), (args.band_axis, "--band-axis")))
    probe = io.read_cube(cube_paths[0], dataset=dataset, band_axis=band_axis, lazy=True)
    if probe.data.nbytes > limit:
        return probe, limit, f"the cube ({probe.data.nbytes / 2**30:.2f} GiB) is larger than the memory limit"
    # The cube fits, but its registered copy on the guide's grid may not (a coarse cube on a large guide).
    needed = in_memory_bytes(probe.data.shape, read_guide().shape)
    if needed > limit:
        return probe, limit, (f"refining the cube in memory would take {needed / 2**30:.2f} GiB (its registered "
                              "copy on the guide's grid), more than the memory limit")
    return None


def _stream_command(args, guide_path, guide, cube_data, limit, why, weights) -> int:
    """``ggrad refine`` for a cube beyond ``--memory-limit`` (see :mod:`ggrad_gpu.scaleout.streaming`).

    ``guide`` is the guide file's image; ``why`` (from :func:`_lazy_cube_over_limit`) says why it streams.
    """
    from ..scaleout.cluster import dask_client
    from ..scaleout.streaming import check_memory_limit, stream_plan, stream_refine

    initial_path = _per_cube(args.initial, 1, "--initial", shared=False)[0]
    initial = None if initial_path is None else read_transform(initial_path)
    check_memory_limit(stream_plan(limit, cube_data.data, guide.shape))  # before anything starts
    return_freed_memory(limit)  # freed chunks go back to the system: the limit counts what is held
    say = _printer(args)
    print(f"ggrad: {why} ({limit / 2**30:.2f} GiB): streaming it chunk by chunk into {args.output / 'registered.zarr'} "
          f"on the {args.output_grid or 'cube'} grid", file=sys.stderr)
    try:
        with dask_client(workers=args.workers, scheduler=args.scheduler, memory_limit=limit):
            options = refine_options(args, weights=weights, memory_limit=limit,
                                     output_grid=args.output_grid or "cube")
            message, improved = stream_refine(
                guide, cube_data, args.output, options=options, guide_path=guide_path, initial_path=initial_path,
                initial=initial, band_axis=args.band_axis, force=args.force, quiet=args.quiet, say=say,
                run_refine=lambda guide, cube, **keywords: _run_refine(args, guide, cube, **keywords))
    except KeyboardInterrupt as exc:
        terminated = isinstance(exc, Terminated)
        print(f"ggrad: {'terminated (SIGTERM)' if terminated else 'interrupted'}; {args.output} is incomplete "
              "(registered.zarr says complete: false): run the same command again to continue", file=sys.stderr)
        return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED
    print(message)
    print(f"wrote registered.zarr, transform.json, weights.json, report.png to {args.output}")
    return EXIT_KEPT if args.strict and not improved else EXIT_OK


def _largest_magnitude(data) -> float:
    """The largest finite ``abs`` value of ``data`` (0 if none), for an error message."""
    with np.errstate(over="ignore", invalid="ignore"):
        magnitudes = np.abs(np.asarray(data, dtype=np.float64))
    finite = magnitudes[np.isfinite(magnitudes)]
    return float(finite.max()) if finite.size else 0.0


def _manual_weights(args):
    if args.alpha is None and args.beta is None:
        return "auto"
    if args.alpha is None or args.beta is None:
        raise ValueError("manual level weights need both --alpha and --beta")
    return (args.alpha, args.beta)


def refine_options(args, **given) -> RefineOptions:
    """``refine``'s options from ``ggrad``'s arguments: each field whose flag the command has, else its default.

    The flags are those the fields of :class:`~ggrad_gpu.refinement.options.RefineOptions`
    name (the argparse ``dest`` is the field's name; ``weights`` come from
    ``--alpha`` and ``--beta``); a flag left unset (None) keeps the default;
    ``given`` sets fields the command decides itself.

    Examples
    --------
    >>> args = build_parser().parse_args(["refine", "g.png", "c.npy", "-o", "out", "--no-denoise", "--levels", "2"])
    >>> options = refine_options(args, weights="auto")
    >>> options.denoise, options.levels, options.output_grid
    (False, 2, 'working')
    """
    parsed = vars(args)
    chosen = {option.name: parsed[option.name] for option in fields(RefineOptions)
              if option.metadata["flag"] is not None and parsed.get(option.name) is not None}
    return RefineOptions(**{**chosen, **given})


def _run_refine(args, guide, cube, **keywords):
    """``refine`` with a progress bar on stderr (quiet when not a terminal or with --quiet)."""
    from tqdm.auto import tqdm

    with tqdm(desc="refine", unit=" stage", disable=True if args.quiet else None, file=sys.stderr,
              leave=False) as bar, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the message is printed instead

        def progress(stage):
            bar.set_description_str(stage)
            bar.update()

        return refine(guide, cube, progress=progress, **keywords)


def _printer(args):
    return (lambda *a, **k: None) if args.quiet else print


DEMO_METHODS = (  # (label, refine's method or None, baseline image or None)
    ("global gradient (grad_y)", "gradient", None),
    ("best single band", None, None),
    ("band sum (paper eq. 2)", "band_sum", "band_sum"),
    ("spectral std (paper eq. 3)", "band_std", "band_std"),
    ("first principal component", "pca", "pca"),
)


def _demo_command(args) -> int:
    from ..core.baselines import BASELINES

    keep_freed_memory()

    if args.mosaic:
        return mosaic_demo(args)

    say = _printer(args)
    xp = resolve_backend(args.backend)
    output = args.output
    if output is None:
        output = Path(tempfile.mkdtemp(prefix="ggrad-demo-")) / "results"
    check_new_directory(output, force=False)
    phantom = synthetic.make_phantom(shape=tuple(args.shape), bands=args.bands, seed=args.seed)
    guide = to_device(phantom.guide, xp)
    cube = to_device(phantom.cube_on_guide, xp)
    rows, cols, bands = cube.shape
    print(f"phantom: guide {rows} x {cols}, cube {phantom.cube.shape[0]} x {phantom.cube.shape[1]} x {bands} "
          f"(native), {phantom.spectra.shape[0] - 1} components with peaks of their own on a substrate, "
          f"misplaced by a known affine; backend {xp.__name__}")
    start = time.perf_counter()
    levels = 4 if args.levels == "auto" else args.levels  # the phantom's cube spans its guide
    result = estimate_global_gradient(guide, cube, levels=levels)
    elapsed = time.perf_counter() - start

    # grad_y against simple single images of the cube, all compared with grad_x
    # on the guide grid with the true placement.
    band_gradients = sobel_magnitude(cube)
    single = [ncc(result.grad_x, band_gradients[..., b]) for b in range(bands)]
    best = int(np.argmax(single))
    similarity = {"gradient": ncc(result.grad_x, result.grad_y), None: single[best]}
    for _, method, image in DEMO_METHODS:
        if image is not None:
            similarity[method] = ncc(result.grad_x, sobel_magnitude(BASELINES[image](cube)))
    active = (result.channel_weights > 0).sum(axis=1)
    del band_gradients, cube

    say(f"estimated on the guide grid in {elapsed:.2f} s")
    say("level   alpha   beta   active bands")
    for k in range(levels):
        say(f"{k:>5}  {result.alpha[k]:6.3f} {result.beta[k]:6.3f}  {active[k]:>13d}")

    # The whole job: refine the native cube's placement from the device's,
    # with the global gradient and with each baseline in its place.
    before = target_registration_error(phantom.initial, phantom.matrix, phantom.guide.shape)
    refined, errors = {}, {}
    for _, method, _ in DEMO_METHODS:
        if method is not None:
            refined[method] = _run_refine(args, guide, to_device(phantom.cube, xp), initial=phantom.initial,
                                          **refine_options(args, method=method).keywords())
            errors[method] = target_registration_error(refined[method].matrix, phantom.matrix,
                                                       phantom.guide.shape)
    print("each image of the cube: NCC of its gradient with grad_x (true placement), and the target registration")
    print(f"error (guide px, mean / max) that refine(method=...) reaches with it from the same start, "
          f"{before.mean:.2f} / {before.max:.2f}:")
    print(f"  {'image':<30} {'NCC':>6}   {'TRE mean / max':>15}   method")
    for label, method, _ in DEMO_METHODS:
        name = f"{label} (#{best})" if method is None else label
        tre = "-" if method is None else f"{errors[method].mean:.3f} / {errors[method].max:.3f}"
        note = "(not in refine)" if method is None else method if refined[method].improved else \
            f"{method} (initial kept)"
        print(f"  {name:<30} {similarity[method]:6.3f}   {tre:>15}   {note}")
    chosen = refined["gradient"]
    after = errors["gradient"]
    print(f"refine (method \"gradient\"): {chosen.message}")
    print(f"  target registration error, guide px (mean / max): {before.mean:.2f} / {before.max:.2f} "
          f"-> {after.mean:.3f} / {after.max:.3f}, in {chosen.timings['total']:.2f} s")
    written = write_outputs(output, chosen, phantom.guide, phantom.cube, save_cube=False,
                            inputs={"guide": "built-in phantom", "cube": f"built-in phantom, seed {args.seed}"})
    report = next(path for path in written if path.suffix == ".png")
    print(f"report: {report} (method \"gradient\")")
    return EXIT_OK


def _bench_command(args) -> int:
    import json

    from . import bench

    keep_freed_memory()  # as ggrad refine runs; benchmarks/RESULTS.md gives the library's default beside it

    sizes, stages = bench.parse_sizes(args.sizes), bench.parse_stages(args.stages)
    if args.repeat < 1:
        raise ValueError(f"--repeat must be at least 1; got {args.repeat}")
    backends, note = bench.backends_for(args.backend)
    if note:
        print(f"ggrad bench: {note}", file=sys.stderr)
    results = bench.run(sizes, backends, stages, repeat=args.repeat,
                        progress=None if args.quiet else lambda line: print(line, file=sys.stderr, flush=True))
    print("\n".join(f"- {line}" for line in bench.machine_lines(results["machines"])) + "\n")
    print(bench.markdown_table(results["rows"]) + "\n")
    for line in bench.case_lines(results["rows"]) + [f"plain way skipped: {s}" for s in results["skipped"]]:
        print(line)
    print(bench.NOTES)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    failed = [row for row in results["rows"] if row.get("error")]
    if failed:
        print(f"ggrad bench: {len(failed)} case(s) failed: {failed[0]['error']}", file=sys.stderr)
    return EXIT_INTERNAL if failed else EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
