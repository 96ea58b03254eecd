"""``python -m benchmarks.check``: a quick stage table against the plain way, beside the last recorded ratios.

A guard against the next regression (issue 26): each stage of ``ggrad bench``
(``ggrad_gpu.cli.bench``: the same cases, the same protocol) runs on NumPy and
the plain way (``benchmarks/reference.py``) in the same run, and its speed-up
over the plain way is set beside the one recorded last (``benchmarks/check.json``, written with
``--record``). A ratio that fell by more than ``--tolerance`` (15 %) is
flagged and the exit status is 1. Ratios, not times: both sides of a ratio run
on the same machine in the same minute, so a faster or slower machine moves
them far less than it moves either time.

Timings taken beside other work mean nothing (the 3-4x regression of issue 26
went unseen for that reason): with the 1-minute load average at 0.5 or more
(``uptime``) the check refuses to run (exit status 2) unless ``--anyway``,
and a loaded run is never recorded.

    python -m benchmarks.check                 # compare with the record
    python -m benchmarks.check --record        # then store this run's ratios
    python -m benchmarks.check --sizes small,paper --stages estimate,refine

The default (every stage at 350 x 415 x 200 and refine at the paper's
geometry, 3 timed rounds each, the plain way one) should take about a minute
and a half on a quiet 2-core machine (its plain ways are most of it).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

from benchmarks import reference  # the plain ways (SciPy, SimpleITK), outside the package
from ggrad_gpu.cli import bench  # the stage cases and the protocol of ggrad bench

RECORD = Path(__file__).with_name("check.json")
TOLERANCE = 0.15  # a ratio that fell by more than this share is flagged
QUIET_LOAD = 0.5  # 1-minute load average at or above which timings are not trusted
# The quick table: every stage at 350 x 415 x 200, and refine at the paper's geometry (the
# issue's headline figure, where eq. 5's products weigh most).
DEFAULT_PLAN = (("small", None), ("paper", "refine"))
DEFAULT_REPEAT = 3


def key(stage: str, size: str) -> str:
    """The record's name of a stage at a size.

    Examples
    --------
    >>> key("gram", "350x415x200")
    'gram@350x415x200'
    """
    return f"{stage}@{size}"


def ratios(rows) -> dict:
    """``{stage@size: {"seconds", "plain_seconds", "ratio"}}`` from ``reference.run``'s rows (NumPy against plain).

    Examples
    --------
    >>> rows = [{"stage": "sobel", "size": "s", "backend": "plain", "median_s": 0.8},
    ...         {"stage": "sobel", "size": "s", "backend": "numpy", "median_s": 0.1},
    ...         {"stage": "warp", "size": "s", "backend": "numpy", "median_s": 0.2}]  # no plain way: no ratio
    >>> ratios(rows)
    {'sobel@s': {'seconds': 0.1, 'plain_seconds': 0.8, 'ratio': 8.0}}
    """
    seconds = {}
    for row in rows:
        if row.get("median_s") and not row.get("error"):
            seconds.setdefault(key(row["stage"], row["size"]), {})[row["backend"]] = row["median_s"]
    out = {}
    for name, times in seconds.items():
        if "numpy" in times and "plain" in times:
            out[name] = {"seconds": times["numpy"], "plain_seconds": times["plain"],
                         "ratio": times["plain"] / times["numpy"]}
    return out


def compare(current: dict, recorded: dict | None, tolerance: float = TOLERANCE) -> list[dict]:
    """Each stage's ratio beside the recorded one; ``dropped`` where it fell by more than ``tolerance``.

    Parameters
    ----------
    current, recorded : dict
        ``{stage@size: {"ratio": ..., ...}}`` (:func:`ratios`; ``recorded``
        as stored by ``--record``, or None where nothing was recorded).

    Returns
    -------
    list of dict
        One per stage of ``current``, in its order: ``name``, ``ratio``,
        ``recorded`` (None where the record lacks it), ``change`` (the
        relative change of the ratio, None without a record) and ``dropped``.

    Examples
    --------
    >>> now = {"gram@s": {"ratio": 5.0}, "warp@s": {"ratio": 30.0}, "nnls@s": {"ratio": 700.0}}
    >>> before = {"gram@s": {"ratio": 6.0}, "warp@s": {"ratio": 33.0}}
    >>> [(c["name"], round(c["change"], 3) if c["change"] is not None else None, c["dropped"])
    ...  for c in compare(now, before)]
    [('gram@s', -0.167, True), ('warp@s', -0.091, False), ('nnls@s', None, False)]
    """
    if not 0 <= tolerance < 1:
        raise ValueError(f"tolerance must be in [0, 1); got {tolerance!r}")
    recorded = recorded or {}
    out = []
    for name, now in current.items():
        before = (recorded.get(name) or {}).get("ratio")
        change = None if not before else now["ratio"] / before - 1
        out.append({"name": name, "ratio": now["ratio"], "recorded": before, "change": change,
                    "dropped": change is not None and change < -tolerance})
    return out


def report(current: dict, comparison: list[dict], *, tolerance: float = TOLERANCE) -> str:
    """The comparison as a table: stage, time, plain time, ratio, recorded ratio, change, flag.

    Examples
    --------
    >>> now = {"gram@s": {"seconds": 0.1, "plain_seconds": 0.5, "ratio": 5.0}}
    >>> print(report(now, compare(now, {"gram@s": {"ratio": 6.0}})))
    | stage  |   time |  plain | vs plain | recorded | change | flag                  |
    |--------|-------:|-------:|---------:|---------:|-------:|-----------------------|
    | gram@s | 0.100s | 0.500s |     5.0x |     6.0x |  -17 % | DROP (more than 15 %) |
    """
    header = ("stage", "time", "plain", "vs plain", "recorded", "change", "flag")
    body = []
    for row in comparison:
        times = current[row["name"]]
        body.append((row["name"], f"{times['seconds']:.3f}s", f"{times['plain_seconds']:.3f}s",
                     f"{row['ratio']:.1f}x", "-" if row["recorded"] is None else f"{row['recorded']:.1f}x",
                     "-" if row["change"] is None else f"{100 * row['change']:+.0f} %",
                     f"DROP (more than {100 * tolerance:.0f} %)" if row["dropped"] else ""))
    widths = [max(len(cells[i]) for cells in [header, *body]) for i in range(len(header))]
    numeric = range(1, 6)

    def line(cells):
        return "| " + " | ".join(c.rjust(w) if i in numeric else c.ljust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths, strict=True))) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" if i in numeric else "-" * (w + 2) for i, w in enumerate(widths)) + "|"
    return "\n".join([line(header), rule] + [line(cells) for cells in body])


def own_load(before, after, seconds: float) -> float:
    """Cores this process (and its children) kept busy on average between two ``os.times()``.

    Examples
    --------
    >>> start, end = os.times_result((1.0, 0.5, 0, 0, 0)), os.times_result((4.0, 1.5, 0, 0, 0))
    >>> own_load(start, end, 2.0)  # 4 CPU seconds in 2 s: two cores
    2.0
    """
    used = sum(a - b for a, b in zip(after[:4], before[:4]))
    return used / seconds if seconds > 0 else 0.0


def load_average() -> float:
    """The 1-minute load average (0.0 where the system does not say)."""
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):  # pragma: no cover - Windows
        return 0.0


def _commit() -> str | None:
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.check", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=None,
                        help="ggrad bench sizes (default: every stage at small, and refine at paper)")
    parser.add_argument("--stages", default=None, help="comma list of stages (default: all)")
    parser.add_argument("--repeat", type=int, default=DEFAULT_REPEAT, help="timed rounds of ggrad_gpu's call")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE, help="flag a ratio that fell by more")
    parser.add_argument("--record", action="store_true", help=f"store this run's ratios in {RECORD.name}")
    parser.add_argument("--against", type=Path, default=RECORD, help="the recorded ratios (JSON)")
    parser.add_argument("--anyway", action="store_true",
                        help=f"run on a loaded machine (load >= {QUIET_LOAD}); never recorded")
    args = parser.parse_args(argv)
    plan = DEFAULT_PLAN if args.sizes is None and args.stages is None else ((args.sizes or "small", args.stages),)
    try:
        plan = [(bench.parse_sizes(sizes), bench.parse_stages(stages)) for sizes, stages in plan]
    except ValueError as exc:
        parser.error(str(exc))
    load = load_average()
    if load >= QUIET_LOAD:
        message = (f"the 1-minute load average is {load:.2f} (>= {QUIET_LOAD}): other work shares the cores and "
                   "the timings would mean nothing")
        if not args.anyway:
            print(f"benchmarks.check: refused: {message}; wait for a quiet machine (or --anyway, never recorded)",
                  file=sys.stderr)
            return 2
        print(f"WARNING: {message}. Not recorded.", file=sys.stderr)
    clock, cpu = time.perf_counter(), os.times()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a kept initial transform warns; the table says what it found
        result = {"rows": [], "machines": {}, "skipped": []}
        for sizes, stages in plan:
            part = reference.run(sizes, ["numpy"], stages, repeat=args.repeat,
                             progress=lambda line: print(f"  {line}", file=sys.stderr, flush=True))
            result["rows"] += part["rows"]
            result["skipped"] += part["skipped"]
            for device, limits in part["machines"].items():
                result["machines"].setdefault(device, limits)
    errors = [row for row in result["rows"] if row.get("error")]
    current = ratios(result["rows"])
    recorded = json.loads(args.against.read_text()).get("ratios") if args.against.exists() else None
    comparison = compare(current, recorded, args.tolerance)
    # The run's own threads raise the load average (to about 2 on 2 cores): what counts is the
    # load beyond them, the cores this process kept busy on average taken off.
    own = own_load(cpu, os.times(), time.perf_counter() - clock)
    load_after = max(0.0, load_average() - own)
    print(f"benchmarks.check at {_commit() or 'no commit'}; load average {load:.2f} before, {load_after:.2f} after "
          f"(less this run's own {own:.2f}); recorded: {args.against.name if recorded is not None else 'nothing yet'}")
    print("- " + "\n- ".join(bench.machine_lines(result["machines"])))
    print(report(current, comparison, tolerance=args.tolerance))
    for row in errors:
        print(f"FAILED {row['stage']} {row['size']} {row['backend']}: {row['error']}")
    for line in result["skipped"]:
        print(f"no ratio: {line}")
    dropped = [row["name"] for row in comparison if row["dropped"]]
    if dropped:
        print(f"DROP: {', '.join(dropped)} fell by more than {100 * args.tolerance:.0f} % against the record")
    if args.record:
        if load >= QUIET_LOAD or load_after >= QUIET_LOAD:
            print(f"not recorded: the load average reached {max(load, load_after):.2f}", file=sys.stderr)
        elif errors:
            print("not recorded: some stages failed", file=sys.stderr)
        else:
            document = {"recorded": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                        "commit": _commit(), "load": [load, load_after], "repeat": args.repeat,
                        "machine": bench.machine_lines(result["machines"]), "ratios": current}
            args.against.write_text(json.dumps(document, indent=1) + "\n")
            print(f"recorded in {args.against}")
    return 1 if dropped or errors else 0


if __name__ == "__main__":
    sys.exit(main())
