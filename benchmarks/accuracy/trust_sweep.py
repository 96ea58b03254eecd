"""Trust without ground truth: refine(check=True) on wide seed sweeps and on induced wrong locks (RESULTS.md).

``python benchmarks/accuracy/trust_sweep.py phantom|tissue|locks [--cases 40] [--bands 100]
[--signatures mixed] [--seed 3030] [--json FILE]``; ``python benchmarks/accuracy/trust_sweep.py table
FILE.json ...`` prints the tables of RESULTS.md from those files.

- ``phantom``: ``make_phantom(bands=..., signatures=..., seed=500 + i, ...)``
  (350 x 415 guide, native 70 x 83 cube; ``"mixed"``, the phantom of the
  accuracy sweeps, by default) on ``draw_cases(n, seed=SWEEP_SEED)``: other
  misregistrations and noise seeds than the tests' and the accuracy sweeps'
  (``CASE_SEED``); ``--seed 4040`` draws a held-out set;
- ``tissue``: ``make_tissue_phantom(ihc.png, seed=500 + i, ...)`` on the same draws;
- ``locks``: deliberately induced wrong locks on repetitive texture
  (``make_lattice_phantom``, discs 40 px apart, jittered by up to 10 % of a
  step, seed 700 + i): the registration is started one lattice step from the
  truth (along rows or columns, alternately), without the coarse search, and
  refined there as ``refine`` would (re-estimate, register again); then
  ``trust.assess`` gives its spread. Plus, per case, ``refine(check=True)`` on
  a perfect lattice (no jitter) misplaced by one step, where nothing tells the
  steps apart and refine itself locks wrongly.

Per case: TRE (guide px, against the known transform) over the cube's true
footprint (DESIGN "TRE"; over the whole guide too, ``tre_max_guide``), whether
the guard accepted (``improved``), ``spread_px``, the seconds of refine's own
work and of the check (``timings["total"] - timings["check"]`` and
``timings["check"]`` of the same call), and the covariance of the footprint's
corners under the result's own fit (:func:`ggrad_gpu.refinement.trust.fit_covariance`,
for the bound below; computed after the timed call). Prints the table and
writes every case to the JSON. Many minutes.

The summary's ``spearman_bound``: the rank correlation that spread and max
TRE would reach if each case's error were a draw from the fit's own
covariance (``BOUND_DRAWS`` simulated sweeps: median and 5-95 %): what a
perfectly calibrated uncertainty can do when the cases differ as little in
difficulty as these do.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from ggrad_gpu import refine
from ggrad_gpu.cli.bench import draw_cases
from ggrad_gpu.metrics import footprint_region, target_registration_error
from ggrad_gpu.refinement import basins, passes, trust
from ggrad_gpu.synthetic import make_lattice_phantom, make_phantom, make_tissue_phantom

SWEEP_SEED = 3030  # draw_cases seed: not CASE_SEED (2024), which the accuracy sweeps use
PHANTOM_SEED = 500  # noise seeds 500 + i: the tests use seeds below 100
LOCK_SEED = 700
# Calibration is reported as the share of accepted cases with true max TRE <= k * spread_px, for these k
# (spread_px is meant as a bound at k = 1: its own-fit part is already FIT_SIGMAS standard deviations).
CALIBRATION_FACTORS = (0.5, 1, 2)
PERIOD = 40
BOUND_DRAWS = 1000
REPOSITORY = Path(__file__).resolve().parents[2]


def _tissue_rgb():
    from PIL import Image

    from tissue_sweep import default_image

    with Image.open(default_image()) as png:
        return np.asarray(png.convert("RGB"))


def _checked(phantom) -> dict:
    clock = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a kept initial transform: recorded as improved=False
        result = refine(phantom.guide, phantom.cube, initial=phantom.initial, backend="numpy", check=True)
    wall = time.perf_counter() - clock
    region = footprint_region(phantom.cube.shape[:2], phantom.matrix, phantom.guide.shape)
    tre = target_registration_error(result.matrix, phantom.matrix, phantom.guide.shape, region=region)
    whole = target_registration_error(result.matrix, phantom.matrix, phantom.guide.shape)
    before = target_registration_error(phantom.initial, phantom.matrix, phantom.guide.shape, region=region)
    spread = result.quality.get("spread_px")
    return {"tre_before": before.max, "tre_mean": tre.mean, "tre_max": tre.max, "tre_mean_guide": whole.mean,
            "tre_max_guide": whole.max, "improved": bool(result.improved),
            "spread_px": None if spread is None or not np.isfinite(spread) else float(spread),
            "seconds_refine": result.timings["total"] - result.timings["check"],
            "seconds_check": result.timings["check"], "seconds_wall": wall, "message": result.message,
            "fit_covariance": _fit_covariance(phantom, result).tolist() if result.improved else None}


def _fit_covariance(phantom, result):
    """The result's corner covariance (guide px^2), rebuilt outside the timed call."""
    problem = passes.build_problem(phantom.guide, phantom.cube, initial=phantom.initial, backend="numpy")
    to_guide = problem.grid.to_guide
    placement = np.linalg.inv(to_guide) @ np.linalg.solve(phantom.initial, result.matrix) @ to_guide
    estimate = passes.estimate_pass(problem, placement, 1, basins.screened_bands(problem, placement))
    return trust.fit_covariance(problem, placement, estimate)


def _covariances(rows):
    covariances = [np.array(r["fit_covariance"]) for r in rows if r.get("fit_covariance") is not None]
    return [c for c in covariances if np.isfinite(c).all()]


def _max_corner_errors(roots, rng):
    """One simulated sweep: each case's max corner error drawn from N(0, its covariance)."""
    return np.array([np.linalg.norm((root @ rng.standard_normal(8)).reshape(4, 2), axis=1).max() for root in roots])


def spearman_bound(rows, draws: int = BOUND_DRAWS, seed: int = 0):
    """Median and 5-95 % of Spearman(sigma, simulated max corner error) if errors were N(0, fit covariance)."""
    covariances = _covariances(rows)
    if len(covariances) < 3:
        return None
    sigmas = [np.sqrt(np.max(np.diag(c)[0::2] + np.diag(c)[1::2])) for c in covariances]
    roots = [np.linalg.cholesky(c + 1e-12 * np.eye(8)) for c in covariances]
    rng = np.random.default_rng(seed)
    rhos = [spearmanr(sigmas, _max_corner_errors(roots, rng))[0] for _ in range(draws)]
    low, median, high = np.percentile(rhos, [5, 50, 95])
    return {"median": float(median), "p5": float(low), "p95": float(high)}


def equal_difficulty(rows, draws: int = BOUND_DRAWS, seed: int = 1):
    """How much the max TRE varies over the cases (coefficient of variation, p90 / p10), against chance alone.

    ``simulated_*``: the same figures (medians over ``draws`` simulated
    sweeps) if every case erred by a draw from one covariance, the median
    case's: cases of equal difficulty. An observed spread no wider than that
    leaves nothing for any uncertainty estimate to rank.
    """
    covariances = _covariances(rows)
    if len(covariances) < 3:
        return None
    traces = [np.trace(c) for c in covariances]
    typical = covariances[int(np.argsort(traces)[len(traces) // 2])]
    root = np.linalg.cholesky(typical + 1e-12 * np.eye(8))
    rng = np.random.default_rng(seed)
    tre = np.array([r["tre_max"] for r in rows if r.get("fit_covariance") is not None])
    sims = [_max_corner_errors([root] * len(covariances), rng) for _ in range(draws)]

    def figures(x):
        return x.std() / x.mean(), np.percentile(x, 90) / np.percentile(x, 10)

    simulated = np.median([figures(x) for x in sims], axis=0)
    observed = figures(tre)
    return {"tre_cv": float(observed[0]), "tre_p90_p10": float(observed[1]), "simulated_cv": float(simulated[0]),
            "simulated_p90_p10": float(simulated[1])}


def sweep(kind: str, count: int, bands: int, signatures: str = "mixed", seed: int = SWEEP_SEED) -> list[dict]:
    rgb = _tissue_rgb() if kind == "tissue" else None
    rows = []
    for case in draw_cases(count, seed=seed):
        kwargs = {**case.phantom_kwargs(), "seed": PHANTOM_SEED + case.seed}
        if kind == "phantom":
            phantom = make_phantom(bands=bands, signatures=signatures, **kwargs)
        else:
            phantom = make_tissue_phantom(rgb, bands=bands, **kwargs)
        row = {"case": case.seed, **kwargs, **_checked(phantom)}
        print(f"{kind} {case.seed}: TRE {row['tre_before']:.1f} -> {row['tre_mean']:.3f} / {row['tre_max']:.3f} px, "
              f"improved {row['improved']}, spread {row['spread_px']}, {row['seconds_refine']:.1f} s + "
              f"{row['seconds_check']:.1f} s check", flush=True)
        rows.append(row)
    return rows


def induced_lock(index: int, bands: int) -> dict:
    """A jittered lattice, registered from one step off the truth; its TRE and spread."""
    rng = np.random.default_rng(LOCK_SEED + index)
    misplacement = {"rotation_deg": float(rng.uniform(-2, 2)), "scale": float(rng.uniform(0.98, 1.02)),
                    "shift": tuple(float(v) for v in rng.uniform(-10, 10, 2))}
    phantom = make_lattice_phantom(period=PERIOD, jitter=0.1, bands=bands, seed=LOCK_SEED + index, **misplacement)
    problem = passes.build_problem(phantom.guide, phantom.cube, initial=phantom.initial, backend="numpy")
    to_guide = problem.grid.to_guide
    truth = np.linalg.inv(to_guide) @ np.linalg.solve(phantom.initial, phantom.matrix) @ to_guide
    step = np.eye(3)
    step[index % 2, 2] = (1 if index % 4 < 2 else -1) * PERIOD / problem.grid.s
    start = truth @ step
    estimate = passes.estimate_pass(problem, start, problem.grid.cube_step)
    _, placement = passes.register_pass(problem, estimate, start, coarse_search=False)
    estimate = passes.estimate_pass(problem, placement, 1, basins.screened_bands(problem, placement))
    _, placement = passes.register_pass(problem, estimate, placement, coarse_search=False)
    matrix = phantom.initial @ to_guide @ placement @ np.linalg.inv(to_guide)
    tre = target_registration_error(matrix, phantom.matrix, phantom.guide.shape)
    clock = time.perf_counter()
    spread = trust.assess(problem, placement)
    seconds = time.perf_counter() - clock
    perfect = make_lattice_phantom(period=PERIOD, jitter=0.0, bands=bands, seed=LOCK_SEED + index,
                                   **{**misplacement, "shift": tuple(np.add(misplacement["shift"], (PERIOD, 0)))})
    return {"case": index, **misplacement, "tre_mean": tre.mean, "tre_max": tre.max, "spread_px": spread.spread_px,
            "seconds_check": seconds, "perfect_lattice": _checked(perfect)}


def locks(count: int, bands: int) -> list[dict]:
    rows = []
    for index in range(count):
        row = induced_lock(index, bands)
        perfect = row["perfect_lattice"]
        print(f"lock {index}: induced TRE {row['tre_mean']:.1f} / {row['tre_max']:.1f} px, spread "
              f"{row['spread_px']:.2f} px; perfect lattice: TRE {perfect['tre_max']:.1f} px, improved "
              f"{perfect['improved']}, spread {perfect['spread_px']}", flush=True)
        rows.append(row)
    return rows


def summary(rows: list[dict]) -> dict:
    """TRE figures, accepted results over 1 px, and the Spearman correlation of spread and TRE."""
    means, maxima = np.array([r["tre_mean"] for r in rows]), np.array([r["tre_max"] for r in rows])
    scored = [r for r in rows if r["improved"] and r["spread_px"] is not None]
    spreads = np.array([r["spread_px"] for r in scored])
    out = {"cases": len(rows), "mean_tre": float(means.mean()), "worst_mean_tre": float(means.max()),
           "worst_max_tre": float(maxima.max()), "cases_max_over_1px": int((maxima > 1).sum()),
           "accepted_over_1px": int(sum(r["improved"] and r["tre_max"] > 1 for r in rows)),
           "kept_initial": int(sum(not r["improved"] for r in rows)),
           "median_spread_px": float(np.median(spreads)) if len(spreads) else None,
           "max_spread_px": float(spreads.max()) if len(spreads) else None,
           "spread_over_1px": int((spreads > 1).sum()),
           "seconds_refine": float(np.median([r["seconds_refine"] for r in rows])),
           "seconds_check": float(np.median([r["seconds_check"] for r in rows]))}
    # Calibration: the share of scored cases whose true max TRE is within k spreads.
    for k in CALIBRATION_FACTORS:
        key = f"calibrated_k{k:g}"
        out[key] = float(np.mean([r["tre_max"] <= k * r["spread_px"] for r in scored])) if scored else None
    if len(scored) > 2:
        out["spearman_spread_vs_max_tre"] = float(spearmanr(spreads, [r["tre_max"] for r in scored])[0])
        out["spearman_spread_vs_mean_tre"] = float(spearmanr(spreads, [r["tre_mean"] for r in scored])[0])
        out["spearman_bound"] = spearman_bound(scored)
        out["equal_difficulty"] = equal_difficulty(scored)
    return out


def tables(paths) -> str:
    """The markdown tables of RESULTS.md from the sweeps' JSON files (phantom and tissue of any seeds, locks)."""
    loaded = [json.loads(Path(p).read_text()) for p in paths]
    runs = {run["kind"]: run for run in loaded}
    lines = ["| sweep | cases | mean TRE (px) | worst case mean | worst max | max > 1 px | accepted > 1 px | kept initial "
             "| median spread (px) | spread > 1 px | Spearman spread vs max TRE (vs mean) | bound: median (5-95 %) "
             "| max TRE <= spread | refine (s) | check (s) | max TRE: CV, p90 / p10 (equal difficulty) |",
             "|---" + "|---:" * 15 + "|"]
    for run in loaded:
        if run["kind"] in ("phantom", "tissue"):
            s = summary(run["rows"])
            lines.append(f"| {run['kind']}, seed {run.get('sweep_seed', SWEEP_SEED)} | {s['cases']} | "
                         f"{s['mean_tre']:.3f} | {s['worst_mean_tre']:.3f} | "
                         f"{s['worst_max_tre']:.3f} | {s['cases_max_over_1px']} | {s['accepted_over_1px']} | "
                         f"{s['kept_initial']} | {s['median_spread_px']:.3f} | {s['spread_over_1px']} | "
                         f"{s.get('spearman_spread_vs_max_tre', float('nan')):.2f} "
                         f"({s.get('spearman_spread_vs_mean_tre', float('nan')):.2f}) | {_bound(s)} | "
                         f"{100 * (s.get('calibrated_k1') or 0):.0f} % | {s['seconds_refine']:.1f} | "
                         f"{s['seconds_check']:.1f} | {_difficulty(s)} |")
    if "locks" in runs:
        rows = runs["locks"]["rows"]
        lines += ["", "| induced wrong lock | TRE mean / max (px) | spread (px) | check (s) | perfect lattice one step "
                  "off: refine's TRE max (px) | improved | spread (px) |", "|---:" * 7 + "|"]
        for r in rows:
            q = r["perfect_lattice"]
            spread = "n/a" if q["spread_px"] is None else f"{q['spread_px']:.1f}"
            lines.append(f"| {r['case']} | {r['tre_mean']:.1f} / {r['tre_max']:.1f} | {r['spread_px']:.1f} | "
                         f"{r['seconds_check']:.1f} | {q['tre_max']:.1f} | {q['improved']} | {spread} |")
    return "\n".join(lines)


def _difficulty(summary) -> str:
    d = summary.get("equal_difficulty")
    return "-" if not d else (f"{d['tre_cv']:.2f}, {d['tre_p90_p10']:.2f} ({d['simulated_cv']:.2f}, "
                              f"{d['simulated_p90_p10']:.2f})")


def _bound(summary) -> str:
    bound = summary.get("spearman_bound")
    return "-" if not bound else f"{bound['median']:.2f} ({bound['p5']:.2f}-{bound['p95']:.2f})"


def main(argv=None) -> int:
    if argv is None and sys.argv[1:2] == ["table"] or argv and argv[0] == "table":
        print(tables((argv or sys.argv[1:])[1:]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=("phantom", "tissue", "locks"))
    parser.add_argument("--cases", type=int, default=40)
    parser.add_argument("--bands", type=int, default=100)
    parser.add_argument("--signatures", choices=("mixed", "separate"), default="mixed",
                        help="make_phantom's spectra (phantom sweep only; default: mixed)")
    parser.add_argument("--seed", type=int, default=SWEEP_SEED,
                        help=f"draw_cases seed (default {SWEEP_SEED}; another, e.g. 4040, for a held-out set)")
    parser.add_argument("--json", type=Path, default=None,
                        help="per-case results (default: .benchmarks/trust_KIND.json in the repository)")
    args = parser.parse_args(argv)
    rows = (locks(args.cases, args.bands) if args.kind == "locks"
            else sweep(args.kind, args.cases, args.bands, args.signatures, args.seed))
    result = {"kind": args.kind, "bands": args.bands, "signatures": args.signatures, "sweep_seed": args.seed,
              "rows": rows}
    if args.kind != "locks":
        result["summary"] = summary(rows)
        print(json.dumps(result["summary"], indent=1))
    else:
        flagged = sum(r["spread_px"] > 1 for r in rows)
        perfect = [r["perfect_lattice"] for r in rows]
        print(f"induced wrong locks: {len(rows)}, TRE over 1 px: {sum(r['tre_max'] > 1 for r in rows)}, "
              f"flagged (spread > 1 px): {flagged}; perfect lattice one step off: TRE over 1 px "
              f"{sum(p['tre_max'] > 1 for p in perfect)}, flagged {sum((p['spread_px'] or 0) > 1 for p in perfect)}")
    path = args.json or REPOSITORY / ".benchmarks" / f"trust_{args.kind}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=float))
    print(f"wrote {path.name} to {path.parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
