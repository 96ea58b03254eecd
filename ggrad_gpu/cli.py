"""The ``ggrad`` command.

``ggrad refine GUIDE CUBE -o OUTDIR`` refines the placement of a cube on a
guide image and writes the registered cube, ``transform.json``,
``weights.json`` and ``report.png`` into a new OUTDIR. ``ggrad demo`` does the
same on a built-in phantom (:func:`ggrad_gpu.synthetic.make_phantom`) and
prints, for the global gradient, the best single band and the baselines of
:mod:`ggrad_gpu.baselines`, how well each matches the guide's gradient and
the registration error that refine reaches with each (the paper's Tables
2-4, against the known transform). ``ggrad bench`` times each stage against the plain SciPy way
(:mod:`ggrad_gpu.bench`) and prints a Markdown table.

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
import signal
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np

from . import __version__, synthetic
from ._backend import BACKENDS, resolve_backend, to_device
from .estimate import estimate_global_gradient
from .filters import sobel_magnitude
from .io import CUBE_FORMATS, check_new_directory, read_transform, write_outputs
from .metrics import ncc, target_registration_error
from .options import OUTPUT_GRIDS
from .pipeline import refine

EXIT_OK, EXIT_KEPT, EXIT_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 3, 130, 143


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when the process receives SIGTERM while :func:`main` runs.

    A subclass of :class:`KeyboardInterrupt`, so that everything that cleans
    up after Ctrl-C (the output folder's staging, :func:`ggrad_gpu.io.atomic_write`)
    cleans up after SIGTERM too.
    """


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ggrad",
        description="Refine the registration of hyperspectral images to a brightfield image.",
        epilog="exit codes: 0 done; 1 initial transform kept (with --strict); 2 bad input; "
               "3 unexpected error; 130 interrupted (SIGINT); 143 terminated (SIGTERM)",
    )
    parser.add_argument("--version", action="version", version=f"ggrad_gpu {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("refine", help="refine a cube's placement on a guide image and write the results")
    run.add_argument("guide", type=Path, help="guide image: PNG, TIFF, JPEG (RGB becomes grayscale) or .npy")
    run.add_argument("cube", type=Path,
                     help="cube: .npy, .npz, multi-page TIFF, ENVI .hdr, HDF5 (file.h5:/dataset) or .zarr")
    run.add_argument("-o", "--output", type=Path, required=True, metavar="OUTDIR",
                     help="folder to create for the results (never replaced without --force)")
    run.add_argument("--initial", type=Path, metavar="FILE",
                     help="initial guide-to-cube transform: a transform.json (key 'matrix') or a text 3x3 "
                          "matrix (default: the cube spans the guide's field of view)")
    run.add_argument("--dataset", help="dataset path inside an HDF5 or Zarr cube")
    run.add_argument("--band-axis", type=int, default=None,
                     help="axis of the stored cube that holds the bands (default: the format's own)")
    _common_options(run)
    run.add_argument("--alpha", type=_float_list, metavar="A0,A1,...",
                     help="manual guide level weights (with --beta; default: solved, eq. 9)")
    run.add_argument("--beta", type=_float_list, metavar="B0,B1,...", help="manual cube level weights")
    run.add_argument("--working-shape", type=int, nargs=2, metavar=("ROWS", "COLS"),
                     help="size of the working grid (default: from the cube's resolution)")
    run.add_argument("--output-grid", choices=OUTPUT_GRIDS, default="working",
                     help="grid of the registered cube (default: working)")
    run.add_argument("--format", choices=CUBE_FORMATS, default="npy", dest="cube_format",
                     help="file format of the registered cube (default: npy)")
    run.add_argument("--no-absorbance", action="store_false", dest="absorbance",
                     help="compare the cube with the guide's intensity, not its optical density "
                          "(for guides that are not transmitted light)")
    run.add_argument("--force", action="store_true", help="replace OUTDIR if it exists")
    run.add_argument("--strict", action="store_true", help="exit with 1 when the initial transform is kept")
    run.add_argument("--check", action="store_true",
                     help="also estimate the result's own uncertainty, spread_px in transform.json's quality "
                          "(independent refinements; about as long again)")
    run.set_defaults(run=_refine_command)

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
    _common_options(demo)
    demo.set_defaults(run=_demo_command, force=False, cube_format="npy")

    bench = commands.add_parser(
        "bench", help="time each stage on NumPy or CuPy against the plain SciPy way; print a Markdown table",
        description="Time each stage (ggrad_gpu.bench) on phantoms; the table goes to stdout, progress to stderr.",
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
    bench.add_argument("--no-plain", action="store_false", dest="plain",
                       help="skip the plain way (per-band SciPy loops, SimpleITK), which takes minutes at 1000 bands")
    bench.add_argument("--json", type=Path, metavar="FILE", help="also write the rows and the machine as JSON")
    bench.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    bench.add_argument("--debug", action="store_true", help="show the traceback of an error")
    bench.set_defaults(run=_bench_command)
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
    """
    args = build_parser().parse_args(argv)
    previous = _handle_sigterm()
    try:
        return args.run(args)
    except KeyboardInterrupt as exc:
        terminated = isinstance(exc, Terminated)
        print(f"ggrad: {'terminated (SIGTERM)' if terminated else 'interrupted'}; no partial output was left "
              "behind", file=sys.stderr)
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
    from . import io

    check_new_directory(args.output, force=args.force)
    _check_outside(args.output, [args.guide, args.cube, args.initial])
    weights = _manual_weights(args)
    initial = None if args.initial is None else read_transform(args.initial)
    guide = io.read_guide(args.guide)
    cube_data = io.read_cube(args.cube, dataset=args.dataset, band_axis=args.band_axis)
    say = _printer(args)
    say(f"guide {guide.shape[0]} x {guide.shape[1]}; cube {' x '.join(map(str, cube_data.data.shape))} "
        f"({cube_data.format})")
    try:
        with np.errstate(over="raise"):  # values so large that they overflow: an input error, said once
            refinement = _run_refine(args, guide, cube_data.data, initial=initial, weights=weights)
    except FloatingPointError as exc:
        largest = ", ".join(f"{_largest_magnitude(data):.3g} in {path}"
                            for data, path in ((cube_data.data, args.cube), (guide, args.guide)))
        raise ValueError(f"values too large to compute with ({exc}); the largest magnitudes are {largest}: "
                         f"rescale the data") from exc
    except (ValueError, TypeError) as exc:  # e.g. "cube contains NaN": say which file
        text = str(exc)
        source = args.cube if text.startswith("cube") else args.guide if text.startswith("guide") else None
        if source is None or str(source) in text:
            raise
        try:
            named = type(exc)(f"{source}: {text}")
        except Exception:  # noqa: BLE001 - an exception type with another signature
            named = ValueError(f"{source}: {text}")
        raise named from exc
    written = write_outputs(
        args.output, refinement, guide, cube_data, cube_format=args.cube_format, force=args.force,
        inputs={"guide": str(args.guide), "cube": str(args.cube)},
    )
    print(f"{refinement.message}")
    print(f"wrote {', '.join(path.name for path in written)} to {args.output}")
    return EXIT_KEPT if args.strict and not refinement.improved else EXIT_OK


def _largest_magnitude(data) -> float:
    """The largest finite ``abs`` value of ``data`` (0 if none), for an error message."""
    with np.errstate(over="ignore", invalid="ignore"):
        magnitudes = np.abs(np.asarray(data, dtype=np.float64))
    finite = magnitudes[np.isfinite(magnitudes)]
    return float(finite.max()) if finite.size else 0.0


def _check_outside(output: Path, inputs) -> None:
    """Refuse an OUTDIR that is, or holds, one of the inputs (``--force`` would replace them)."""
    if not output.exists():
        return
    from .io import split_dataset_path

    folder = output.resolve()
    for given in inputs:
        if given is None:
            continue
        path = split_dataset_path(given)[0].resolve()  # "scan.h5:/cube" is the file scan.h5
        if path == folder or folder in path.parents:
            raise ValueError(f"output folder {output} holds the input {given}; it is never replaced: "
                             f"choose another OUTDIR")


def _manual_weights(args):
    if args.alpha is None and args.beta is None:
        return "auto"
    if args.alpha is None or args.beta is None:
        raise ValueError("manual level weights need both --alpha and --beta")
    return (args.alpha, args.beta)


def _run_refine(args, guide, cube, **options):
    """``refine`` with a progress bar on stderr (quiet when not a terminal or with --quiet)."""
    from tqdm.auto import tqdm

    with tqdm(desc="refine", unit=" stage", disable=True if args.quiet else None, file=sys.stderr,
              leave=False) as bar, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the message is printed instead

        def progress(stage):
            bar.set_description_str(stage)
            bar.update()

        return refine(guide, cube, levels=args.levels, backend=args.backend, progress=progress,
                      working_shape=getattr(args, "working_shape", None),
                      output_grid=getattr(args, "output_grid", "working"),
                      absorbance=getattr(args, "absorbance", True), check=getattr(args, "check", False),
                      **options)


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
    from .baselines import BASELINES

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
                                          method=method)
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

    sizes, stages = bench.parse_sizes(args.sizes), bench.parse_stages(args.stages)
    if args.repeat < 1:
        raise ValueError(f"--repeat must be at least 1; got {args.repeat}")
    backends, note = bench.backends_for(args.backend)
    if note:
        print(f"ggrad bench: {note}", file=sys.stderr)
    results = bench.run(sizes, backends, stages, repeat=args.repeat, plain=args.plain,
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
