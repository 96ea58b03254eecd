"""What drives the true TRE of right results, case by case (issue 12's spread; RESULTS.md).

``python benchmarks/accuracy/trust_diagnostics.py phantom|tissue [--cases 40] [--seed 3030] [--repeats 3]
[--json FILE]``: the trust sweep's cases (``trust_sweep.py``: ``draw_cases(n, seed)``,
noise seeds 500 + i, 100 bands, the mixed phantom or the tissue phantom),
each refined as ``refine`` does, and per case:

- the TRE against the known transform, over the whole guide (the sweep's
  old figure) and over the cube's true footprint (DESIGN "TRE"), mean and max,
  and the error of each footprint corner;
- ``trust.assess``'s alternatives (band halves, the result's own fit, far
  starts) and the quantities the spread could be built from (the final
  fit, MSE, the gradient energy and area of the footprint, the screened bands);
- **noise or bias**: the same case rebuilt without noise (cube and guide),
  and ``repeats`` times with fresh noise of the same level on that clean
  case; each refined the same way. The spread of the corner errors over the
  repeats is the noise part of the error, their mean the bias.

Writes every case to the JSON (default ``.benchmarks/diag_KIND_SEED.json``).
``python trust_diagnostics.py analyse FILE.json ...`` prints the rank
correlations of every quantity with the true max TRE and the noise / bias split.
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

from ggrad_gpu.cli.bench import draw_cases
from ggrad_gpu.metrics import footprint_region, target_registration_error
from ggrad_gpu.refinement import basins, passes, trust
from ggrad_gpu.registration.register import displacement_spread
from ggrad_gpu.synthetic import make_phantom, make_tissue_phantom

REPOSITORY = Path(__file__).resolve().parents[2]
PHANTOM_SEED = 500
BANDS = 100


def build(kind, case, *, rgb=None, noise=True):
    kwargs = {**case.phantom_kwargs(), "seed": PHANTOM_SEED + case.seed}
    if kind == "phantom":
        extra = {} if noise else {"noise": 0.0, "guide_noise": 0.0}
        return make_phantom(bands=BANDS, signatures="mixed", **kwargs, **extra)
    return make_tissue_phantom(rgb, bands=BANDS, **kwargs, **({} if noise else {"noise": 0.0}))


def refined(guide, cube, initial):
    """refine's own steps (no check): the problem, the working placement, the first registration's candidates."""
    problem = passes.build_problem(guide, cube, initial=initial, backend="numpy")
    first = basins.first_estimate(problem)
    _, placement, candidates = basins.first_registration(problem, first)
    last = passes.estimate_pass(problem, placement, 1, basins.screened_bands(problem, placement))
    _, placement = passes.register_pass(problem, last, placement, coarse_search=False)
    return problem, placement, candidates


def guide_matrix(problem, placement):
    to_guide = problem.grid.to_guide
    return problem.initial @ to_guide @ placement @ np.linalg.inv(to_guide)


def corner_errors(matrix, truth, region):
    """|inv(truth) @ matrix @ p - p| at the four corners of ``region`` (guide px)."""
    row0, col0, rows, cols = region
    corners = np.array([[row0, col0, 1], [row0, col0 + cols - 1, 1], [row0 + rows - 1, col0, 1],
                        [row0 + rows - 1, col0 + cols - 1, 1]], dtype=np.float64).T
    moved = np.linalg.solve(truth, matrix @ corners)
    return (moved - corners)[:2].T  # (4, 2)


def tre(matrix, phantom, region):
    whole = target_registration_error(matrix, phantom.matrix, phantom.guide.shape)
    inside = target_registration_error(matrix, phantom.matrix, phantom.guide.shape, region=region)
    return {"tre_mean_guide": whole.mean, "tre_max_guide": whole.max, "tre_mean": inside.mean, "tre_max": inside.max}


def footprint_figures(problem, placement):
    estimate = passes.estimate_pass(problem, placement, 1, basins.screened_bands(problem, placement))
    fixed, moving, mask = passes.registration_images(problem, estimate)
    fixed, moving = np.asarray(fixed, np.float64), np.asarray(moving, np.float64)
    valid = np.isfinite(fixed) & np.isfinite(moving) & (True if mask is None else np.asarray(mask))
    residual = np.where(valid, moving - fixed, 0)
    out = {"footprint_px": int(valid.sum()), "energy_fixed": float((np.where(valid, fixed, 0) ** 2).mean()),
           "energy_moving": float((np.where(valid, moving, 0) ** 2).mean()),
           "mse_final": float((residual**2).sum() / max(valid.sum(), 1)),
           "bands_screened": len(basins.screened_bands(problem, placement)), "s": int(problem.grid.s)}
    region = footprint_region(problem.cube.values.shape[:2], guide_matrix(problem, placement), problem.guide_shape)
    out.update(block_sigmas(problem, estimate, region, (8, 16, 32, 64)))
    out["fit_covariance"] = trust.fit_covariance(problem, placement, estimate).tolist()
    return out, estimate


def block_sigmas(problem, estimate, region, blocks):
    """One standard deviation of the fit at the worst corner of ``region`` (guide px), for each block size."""
    fixed, moving, mask = passes.registration_images(problem, estimate)
    row0, col0, rows, cols = region
    corners = np.array([[row0, col0, 1], [row0, col0 + cols - 1, 1], [row0 + rows - 1, col0, 1],
                        [row0 + rows - 1, col0 + cols - 1, 1]], dtype=np.float64)
    working = np.linalg.solve(problem.grid.to_guide, corners.T)[:2].T
    return {f"fit_sigma_b{block}": float(displacement_spread(fixed, moving, np.eye(3), working, moving_mask=mask,
                                                             block=block).max()) * problem.grid.s
            for block in blocks}


def one_case(kind, case, repeats, rgb):
    clock = time.perf_counter()
    phantom = build(kind, case, rgb=rgb)
    region = footprint_region(phantom.cube.shape[:2], phantom.matrix, phantom.guide.shape)
    problem, placement, candidates = refined(phantom.guide, phantom.cube, phantom.initial)
    matrix = guide_matrix(problem, placement)
    row = {"case": case.seed, "rotation_deg": case.rotation_deg, "scale": case.scale, "shear": case.shear,
           "shift": list(case.shift), "shift_px": float(np.hypot(*case.shift)), "region": list(region),
           **tre(matrix, phantom, region), "corner_error": corner_errors(matrix, phantom.matrix, region).tolist(),
           "fit": basins.fit_at(problem, placement)}
    # The spread's own grid: alternative_distance against the truth, on the estimated footprint.
    truth = np.linalg.inv(problem.grid.to_guide) @ np.linalg.solve(problem.initial, phantom.matrix) @ \
        problem.grid.to_guide
    row["tre_on_spread_grid"] = trust.alternative_distance(problem, placement, truth)
    figures, _ = footprint_figures(problem, placement)
    row.update(figures)
    spread = trust.assess(problem, placement, candidates=candidates)
    row["spread_px"] = spread.spread_px
    row["alternatives"] = [{"kind": a.kind, "distance_px": a.distance_px, "fit": a.fit, "counts": a.counts}
                           for a in spread.alternatives]
    # Noise or bias: the clean case, then fresh noise on it.
    clean = build(kind, case, rgb=rgb, noise=False)
    _, clean_placement, _ = refined(clean.guide, clean.cube, clean.initial)
    clean_matrix = guide_matrix(problem, clean_placement)
    row["clean"] = {**tre(clean_matrix, phantom, region),
                    "corner_error": corner_errors(clean_matrix, phantom.matrix, region).tolist()}
    noise_cube = np.asarray(phantom.cube, np.float64) - np.asarray(clean.cube, np.float64)
    cube_sigma = noise_cube.std(axis=2, keepdims=True)
    guide_sigma = float((np.asarray(phantom.guide, np.float64) - clean.guide).std())
    rng = np.random.default_rng(9000 + case.seed)
    row["repeats"] = []
    for _ in range(repeats):
        cube = (clean.cube + cube_sigma * rng.standard_normal(clean.cube.shape)).astype(np.float32)
        guide = (clean.guide + guide_sigma * rng.standard_normal(clean.guide.shape)).astype(np.float32)
        _, other, _ = refined(guide, cube, clean.initial)
        other_matrix = guide_matrix(problem, other)
        row["repeats"].append({**tre(other_matrix, phantom, region),
                               "corner_error": corner_errors(other_matrix, phantom.matrix, region).tolist()})
    row["seconds"] = time.perf_counter() - clock
    return row


def analyse(paths):
    for path in paths:
        data = json.loads(Path(path).read_text())
        rows = data["rows"]
        tmax = np.array([r["tre_max"] for r in rows])
        print(f"== {Path(path).name}: {len(rows)} cases, max TRE over the footprint {tmax.min():.3f}-{tmax.max():.3f}"
              f" (whole guide {min(r['tre_max_guide'] for r in rows):.3f}-{max(r['tre_max_guide'] for r in rows):.3f})")
        columns = {"spread_px": [r["spread_px"] for r in rows], "tre_max_guide": [r["tre_max_guide"] for r in rows],
                   "tre_on_spread_grid": [r["tre_on_spread_grid"] for r in rows],
                   "clean tre_max": [r["clean"]["tre_max"] for r in rows]}
        for kind in ("band half", "fit blocks", "far start"):
            columns[kind] = [max((a["distance_px"] for a in r["alternatives"] if a["kind"] == kind and a["counts"]),
                                 default=0.0) for r in rows]
        for key in ("fit", "mse_final", "energy_fixed", "energy_moving", "footprint_px", "bands_screened",
                    "fit_sigma_b8", "fit_sigma_b16", "fit_sigma_b32", "fit_sigma_b64", "shift_px"):
            columns[key] = [r[key] for r in rows]
        columns["|rotation|"] = [abs(r["rotation_deg"]) for r in rows]
        columns["|scale-1|"] = [abs(r["scale"] - 1) for r in rows]
        columns["noise sd (repeats, corner)"] = [noise_sd(r) for r in rows]
        columns["bias (repeat mean, max corner)"] = [bias(r) for r in rows]
        for key, values in columns.items():
            rho = spearmanr(values, tmax)[0]
            print(f"  {key:34s} Spearman vs max TRE {rho:+.2f}   median {np.median(values):.4g}")
        # Noise or bias: how much of the corner error is the same for every noise draw.
        errors = np.array([r["corner_error"] for r in rows])  # (cases, 4, 2)
        clean = np.array([r["clean"]["corner_error"] for r in rows])
        reps = np.array([[rep["corner_error"] for rep in r["repeats"]] for r in rows])  # (cases, k, 4, 2)
        allruns = np.concatenate([errors[:, None], reps], axis=1)
        within = allruns.var(axis=1, ddof=1).sum(axis=-1).mean()
        total = (allruns.reshape(-1, 8) ** 2).sum(axis=-1).mean() / 4
        print(f"  corner error: mean squared {total:.4f} px^2, of which noise (variance over draws) {within:.4f}; "
              f"clean vs noisy corner error correlation {np.corrcoef(clean.ravel(), errors.ravel())[0, 1]:.2f}")
        rep_max = np.array([[rep["tre_max"] for rep in r["repeats"]] for r in rows])
        rho_reps = [spearmanr(rep_max[:, k], tmax)[0] for k in range(rep_max.shape[1])]
        print(f"  Spearman of max TRE between noise draws of the same cases: {np.round(rho_reps, 2)}; "
              f"vs clean: {spearmanr([r['clean']['tre_max'] for r in rows], tmax)[0]:.2f}")


def noise_sd(row):
    runs = np.array([row["corner_error"]] + [rep["corner_error"] for rep in row["repeats"]])  # (k, 4, 2)
    return float(np.sqrt(runs.var(axis=0, ddof=1).sum(axis=-1)).max())


def bias(row):
    runs = np.array([row["corner_error"]] + [rep["corner_error"] for rep in row["repeats"]])
    return float(np.linalg.norm(runs.mean(axis=0), axis=-1).max())


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["analyse"]:
        analyse(argv[1:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=("phantom", "tissue"))
    parser.add_argument("--cases", type=int, default=40)
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--seed", type=int, default=3030)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    rgb = None
    if args.kind == "tissue":
        from trust_sweep import _tissue_rgb

        rgb = _tissue_rgb()
    rows = []
    path = args.json or REPOSITORY / ".benchmarks" / f"diag_{args.kind}_{args.seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    for case in draw_cases(args.cases, seed=args.seed)[args.first:]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            row = one_case(args.kind, case, args.repeats, rgb)
        rows.append(row)
        print(f"{args.kind} {case.seed}: max TRE {row['tre_max']:.3f} (guide {row['tre_max_guide']:.3f}, clean "
              f"{row['clean']['tre_max']:.3f}, repeats {[round(r['tre_max'], 3) for r in row['repeats']]}), "
              f"spread {row['spread_px']:.3f}, {row['seconds']:.1f} s", flush=True)
        path.write_text(json.dumps({"kind": args.kind, "seed": args.seed, "rows": rows}, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
