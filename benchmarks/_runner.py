"""The stage benchmarks without pytest: run them, print one table, write it as Markdown and JSON.

``python -m benchmarks`` (see :func:`main`); the pytest suite
(``benchmarks/test_stages.py``) times the same cases through pytest-benchmark.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ggrad_gpu._backend import cupy_usable

from ._peaks import environment, peak_for
from ._stages import (
    LEVELS,
    STAGES,
    BenchData,
    Stage,
    Workspace,
    parse_backends,
    parse_sizes,
    parse_stages,
    plan,
    size_id,
)
from ._timing import rates, repeat, summarise_times, time_call

__all__ = ["WorkspaceCache", "add_speedups", "format_table", "main", "run", "run_case", "write_results"]

SCHEMA = 1
DEFAULT_OUT = "bench-results"
DEFAULT_ROUNDS = 3
BACKEND_LABELS = {"numpy": "NumPy", "cupy": "CuPy", "scipy": "SciPy (plain)"}

Timer = Callable[[Callable[[], object], Callable[[], None], int], list]


def run_case(stage: Stage, workspace: Workspace, backend: str, rounds: int, env: dict, *, timer: Timer = repeat) -> dict:
    """Time one stage on one backend and describe it as a JSON-able row.

    Inputs are built and copied to the device first (``h2d_s``); the first
    call is timed alone (``warmup_s``) and its output described (``info``);
    then ``timer(call, sync, rounds)`` returns the seconds of the timed
    rounds (the pytest suite passes one that goes through
    ``benchmark.pedantic``).
    """
    workspace.begin()
    case = stage.case(workspace, backend)
    h2d_s, h2d_bytes = workspace.transfer()
    warmup_s, out = time_call(case.call, workspace.sync)
    info = dict(case.info)
    if case.describe is not None:
        info.update(case.describe(out))
    del out
    if backend == "scipy" and stage.reference_max_rounds:
        rounds = min(rounds, stage.reference_max_rounds)
    times = [float(t) for t in timer(case.call, workspace.sync, rounds)]
    stats = summarise_times(times)
    peak, spec = peak_for(env, backend, case.peak)
    row = {
        "stage": stage.name,
        "title": stage.title,
        "size": size_id(workspace.data.shape),
        "shape": list(workspace.data.shape),
        "backend": backend,
        "data": workspace.data.source if stage.name != "refine" else "make_phantom (native cube)",
        "rounds": len(times),
        "times_s": times,
        **stats,
        "warmup_s": warmup_s,
        "h2d_s": h2d_s if backend == "cupy" else None,
        "h2d_bytes": h2d_bytes if backend == "cupy" else None,
        "bytes_moved": case.bytes_moved,
        "flops": case.flops,
        "model": case.model,
        "peak_kind": case.peak,
        "peak": peak,
        "peak_unit": None if case.peak is None else ("GB/s" if case.peak == "bandwidth" else "GFLOP/s"),
        "spec": spec,
        **rates(stats["median_s"], bytes_moved=case.bytes_moved, flops=case.flops, peak=peak, spec=spec),
        "info": info,
    }
    return _jsonable(row)


class WorkspaceCache:
    """The workspace of the current size and backend; building the next one releases it.

    Cases come size by size, backend by backend (:func:`benchmarks._stages.plan`),
    so each size's data and each backend's derived inputs are built once, and
    only one size's arrays are held at a time. The plain SciPy cases share
    NumPy's workspace.
    """

    def __init__(self):
        self.data: BenchData | None = None
        self.workspace: Workspace | None = None

    def get(self, item) -> Workspace:
        if self.data is None or self.data.shape != tuple(item.shape):
            self.release()
            self.data = BenchData(item.shape)
        wanted = "numpy" if item.backend == "scipy" else item.backend
        if self.workspace is None or self.workspace.backend != wanted:
            if self.workspace is not None:
                self.workspace.release()
            self.workspace = Workspace(self.data, item.backend)
        return self.workspace

    def release(self) -> None:
        if self.workspace is not None:
            self.workspace.release()
        self.data, self.workspace = None, None


def _jsonable(value):
    """Plain JSON types: numpy scalars and arrays unwrapped, tuples as lists, non-finite floats as None."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def add_speedups(rows: list[dict]) -> None:
    """``speedup_vs_numpy`` (CuPy rows) and ``speedup_vs_scipy`` (NumPy and CuPy rows), by median."""
    medians = {(r["stage"], r["size"], r["backend"]): r.get("median_s") for r in rows}
    for r in rows:
        mine = r.get("median_s")
        r["speedup_vs_numpy"] = r["speedup_vs_scipy"] = None
        if not mine:
            continue
        numpy_median = medians.get((r["stage"], r["size"], "numpy"))
        scipy_median = medians.get((r["stage"], r["size"], "scipy"))
        if r["backend"] == "cupy" and numpy_median:
            r["speedup_vs_numpy"] = numpy_median / mine
        if r["backend"] != "scipy" and scipy_median:
            r["speedup_vs_scipy"] = scipy_median / mine


def run(
    sizes,
    backends,
    stages,
    rounds: int = DEFAULT_ROUNDS,
    *,
    quick_peaks: bool = False,
    progress: Callable[[str], None] | None = None,
    keep_going: bool = True,
) -> dict:
    """Run the stage benchmarks; return the results as a JSON-able dict.

    Parameters
    ----------
    sizes : list of (rows, cols, bands)
    backends : list of {"numpy", "scipy", "cupy"}
        CuPy where it is not usable is listed under ``skipped``, not an error.
    stages : list of str
        Names from :data:`benchmarks._stages.STAGES`.
    rounds : int
        Timed rounds per case after the warm-up (the plain NNLS: one).
    quick_peaks : bool
        Measure the machine's limits with small operands (smoke tests).
    progress : callable, optional
        Called with a line of text per case.
    keep_going : bool
        Record a failing case as a row with ``error`` and go on (default),
        instead of raising.

    Returns
    -------
    dict
        ``schema``, ``created``, ``environment`` (machine identity and
        limits, :func:`benchmarks._peaks.environment`), ``settings``,
        ``rows`` (one per case that ran) and ``skipped``.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1; got {rounds}")
    say = progress or (lambda line: None)
    gpu = "cupy" in backends and cupy_usable()[0]
    env = environment(gpu=gpu, quick=quick_peaks)
    rows, skipped = [], []
    workspaces = WorkspaceCache()
    try:
        for item in plan(sizes, backends, stages):
            if item.skip:
                skipped.append({"stage": item.stage, "size": item.size, "backend": item.backend, "reason": item.skip})
                continue
            try:
                row = run_case(STAGES[item.stage], workspaces.get(item), item.backend, rounds, env)
            except Exception as exc:
                if not keep_going:
                    raise
                say(f"{item.id}: FAILED {type(exc).__name__}: {exc}")
                traceback.print_exc(file=sys.stderr)
                rows.append(
                    {"stage": item.stage, "size": item.size, "shape": list(item.shape), "backend": item.backend,
                     "error": f"{type(exc).__name__}: {exc}", "median_s": None}
                )
                workspaces.release()  # e.g. out of device memory: start the next case afresh
                continue
            rows.append(row)
            say(f"{item.id}: median {_seconds(row['median_s'])}, warm-up {_seconds(row['warmup_s'])}")
    finally:
        workspaces.release()
    add_speedups(rows)
    return _jsonable(
        {
            "schema": SCHEMA,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "environment": env,
            "settings": {
                "sizes": [size_id(s) for s in sizes],
                "backends": list(backends),
                "stages": list(stages),
                "rounds": rounds,
                "levels": LEVELS,
            },
            "rows": rows,
            "skipped": skipped,
        }
    )


# --------------------------------------------------------------------------- formatting


def _seconds(value) -> str:
    if value is None:
        return "-"
    if value < 1e-3:
        return f"{value * 1e6:.1f} us"
    if value < 1:
        return f"{value * 1e3:.1f} ms"
    return f"{value:.2f} s"


def _number(value) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def _rate(row) -> str:
    if row.get("gflops") is not None:
        return f"{_number(row['gflops'])} GFLOP/s"
    if row.get("gbps") is not None:
        return f"{_number(row['gbps'])} GB/s"
    return "-"


def _fraction(value) -> str:
    return "-" if value is None else f"{100 * value:.0f} %"


def _times(value) -> str:
    return "-" if value is None else f"{value:.1f}x"


COLUMNS = ("stage", "size", "backend", "median", "min", "rounds", "warm-up", "h2d", "rate", "% peak", "CuPy/NumPy", "vs SciPy")


def _cells(row) -> list[str]:
    if row.get("error"):
        return [row["stage"], row["size"], row["backend"], "FAILED", "-", "-", "-", "-", row["error"][:40], "-", "-", "-"]
    peak = _fraction(row.get("frac_peak"))
    if row.get("frac_spec") is not None:
        peak += f" ({_fraction(row['frac_spec'])} spec)"
    return [
        row["stage"],
        row["size"],
        row["backend"],
        _seconds(row.get("median_s")),
        _seconds(row.get("min_s")),
        str(row.get("rounds", "-")),
        _seconds(row.get("warmup_s")),
        _seconds(row.get("h2d_s")),
        _rate(row),
        peak,
        _times(row.get("speedup_vs_numpy")),
        _times(row.get("speedup_vs_scipy")),
    ]


def format_table(results: dict) -> str:
    """The results as one Markdown table (stage x size x backend), padded to read in a terminal.

    Rows run size by size and backend by backend; the table puts a stage's backends side by side.
    """
    sizes, stages = results["settings"]["sizes"], list(STAGES)
    order = {backend: i for i, backend in enumerate(("numpy", "cupy", "scipy"))}

    def key(row):
        size = sizes.index(row["size"]) if row["size"] in sizes else len(sizes)
        stage = stages.index(row["stage"]) if row["stage"] in stages else len(stages)
        return size, stage, order.get(row["backend"], len(order))

    body = [_cells(row) for row in sorted(results["rows"], key=key)]
    widths = [max(len(c) for c in column) for column in zip(COLUMNS, *body)]
    numeric = set(range(3, len(COLUMNS)))

    def line(cells):
        padded = [c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if i in numeric else ("-" * (w + 2)) for i, w in enumerate(widths)) + "|"
    return "\n".join([line(COLUMNS), rule] + [line(cells) for cells in body])


def environment_lines(env: dict) -> list[str]:
    """The machine in a few lines: identity, versions, measured limits."""
    cpu = env["cpu"]
    gemm = cpu.get("gemm_gflops", {})
    lines = [
        f"CPU: {cpu['model']}, {cpu['usable_cores']} usable of {cpu['logical_cores']} logical cores; "
        f"Python {env['python']}, NumPy {env['numpy']} ({env.get('numpy_blas') or 'BLAS ?'}), SciPy {env['scipy']}",
        f"CPU limits (measured): copy {cpu['copy_gbps']:.1f} GB/s (np.copyto, one thread); GEMM float32 "
        f"{gemm.get('float32', float('nan')):.1f}, float64 {gemm.get('float64', float('nan')):.1f} GFLOP/s "
        f"(n = {cpu['gemm_n']})",
    ]
    gpu = env.get("gpu")
    if gpu and gpu.get("error"):
        lines.append(f"GPU: could not be measured ({gpu['error']})")
    elif gpu:
        g = gpu.get("gemm_gflops", {})
        lines += [
            f"GPU: {gpu['name']} (compute {gpu['compute_capability']}, {gpu['multiprocessors']} SMs, "
            f"{(gpu.get('total_memory_bytes') or 0) / 2**30:.0f} GiB); CUDA driver {gpu['driver_version']}, "
            f"runtime {gpu['runtime_version']}; CuPy {gpu['cupy_version']}",
            f"GPU limits: memory bandwidth {gpu['spec_bandwidth_gbps']:.0f} GB/s data sheet "
            f"({gpu['memory_clock_khz']} kHz x {gpu['memory_bus_bits']} bit x 2); measured copy "
            f"{gpu['copy_gbps']:.0f} GB/s, cuBLAS GEMM float32 {g.get('float32', float('nan')):.0f}, float64 "
            f"{g.get('float64', float('nan')):.0f} GFLOP/s (n = {gpu['gemm_n']}, TF32 {gpu['tf32']}); "
            f"host-to-device {gpu['h2d_gbps']:.1f} GB/s (pageable)",
        ]
    else:
        lines.append("GPU: none used (CuPy not asked for or not usable)")
    return lines


NOTES = """\
- median, min: seconds of one call over the timed rounds, after a first call timed alone
  (warm-up: CUDA compilation, cuBLAS set-up, memory pool growth, page faults). On CuPy the
  timed call ends with a device synchronisation; inputs are on the device before timing.
- h2d: host-to-device copy of the stage's inputs (pageable memory), timed alone; for inputs
  derived on the device (Sobel output, Gram), what copying an equal host array takes.
- rate: bytes moved (sobel, pyramid, warp: read + write per pass) or flops (gram: 2 N L^2,
  the GEMM count; NumPy runs A^T A as a SYRK, half of that) per median second.
- % peak: of the measured limit of the backend's device (copy bandwidth, GEMM of the
  stage's product precision: float32 for ggrad_gpu's Gram, float64 for the plain one);
  "spec": of the GPU's data-sheet memory bandwidth.
- CuPy/NumPy: NumPy's median over CuPy's. vs SciPy: the plain SciPy way's median over this
  row's (per-band ndimage loops, X.T @ X in float64, scipy.optimize.nnls on the explicit A).
- nnls, level_weights, register, refine: time only. refine is DESIGN's geometry: a
  rows x cols guide and a native cube 5x coarser (make_phantom)."""


def format_markdown(results: dict) -> str:
    """``stages.md``: environment, settings, the table, notes, skipped cases."""
    settings = results["settings"]
    lines = [
        "# ggrad_gpu stage benchmarks",
        "",
        f"Created {results['created']} by `python -m benchmarks` (rounds {settings['rounds']}, "
        f"{settings['levels']} pyramid levels).",
        "",
    ]
    lines += [f"- {line}" for line in environment_lines(results["environment"])]
    lines += ["", format_table(results), "", NOTES]
    if results["skipped"]:
        lines += ["", "Skipped:"]
        reasons = sorted({(s["backend"], s["reason"]) for s in results["skipped"]})
        lines += [f"- {backend}: {reason}" for backend, reason in reasons]
    return "\n".join(lines) + "\n"


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``."""
    handle = tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, prefix=f".{path.name}.",
                                         suffix=".tmp", delete=False)
    try:
        with handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except BaseException:
        try:
            os.unlink(handle.name)
        except OSError:
            pass
        raise


def write_results(results: dict, out_dir) -> tuple[Path, Path]:
    """Write ``stages.md`` and ``stages.json`` into ``out_dir`` (created if needed), atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    markdown, data = out / "stages.md", out / "stages.json"
    _write_atomic(data, json.dumps(results, indent=1, allow_nan=False) + "\n")
    _write_atomic(markdown, format_markdown(results))
    return markdown, data


# --------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Time ggrad_gpu's stages on NumPy, CuPy (where usable) and the plain SciPy way; "
        "print one table and write it as stages.md and stages.json.",
    )
    parser.add_argument("--sizes", default=None,
                        help="'small' (350x415x200,350x415x1000), 'all' (adds 1024x1024x512,2048x2048x256) or a "
                        "comma list of RxCxB; default: $GGRAD_BENCH_SIZES, else 'small'")
    parser.add_argument("--backends", default="numpy,cupy,scipy",
                        help="comma list of numpy, cupy, scipy (the plain reference; small sizes only); "
                        "default: %(default)s (CuPy is skipped where it is not usable)")
    parser.add_argument("--stages", default=None, help=f"comma list of {', '.join(STAGES)}; default: all")
    parser.add_argument("--out", default=DEFAULT_OUT, help="folder for stages.md and stages.json; default: %(default)s")
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS, help="timed rounds per case; default: %(default)s")
    parser.add_argument("--quick-peaks", action="store_true", help="measure the machine's limits with small operands")
    return parser


def main(argv=None) -> int:
    """Command line entry point; returns the exit status (1 if a case failed)."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        sizes = parse_sizes(args.sizes)
        backends = parse_backends(args.backends)
        stages = parse_stages(args.stages)
    except ValueError as exc:
        parser.error(str(exc))
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1; got {args.rounds}")
    if "cupy" in backends:
        usable, reason = cupy_usable()
        if not usable:
            print(f"cupy: skipped ({reason})", flush=True)
    results = run(sizes, backends, stages, args.rounds, quick_peaks=args.quick_peaks,
                  progress=lambda line: print(line, flush=True))
    markdown, data = write_results(results, args.out)
    print()
    for line in environment_lines(results["environment"]):
        print(line)
    print()
    print(format_table(results))
    print()
    print(f"wrote {markdown} and {data}")
    return 1 if any(row.get("error") for row in results["rows"]) else 0
