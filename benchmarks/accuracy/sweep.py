"""The accuracy sweep shared by ``phantom_sweep.py`` and ``tissue_sweep.py``: refine against SimpleITK peers.

Methods, each on the same cases (``ggrad_gpu.cli.bench.draw_cases``: rotation +-5
deg, scale +-5 %, shear +-0.02, shift up to 45 guide px, seed 2024):

- ``ggrad``: ``refine(guide, cube, initial=phantom.initial, backend="numpy")``;
- ``plain``: the paper's method without this package, ``benchmarks.reference.plain_refine``
  (SciPy estimate on the cube placed by the initial transform, SimpleITK
  mean-squares affine registration of grad_y to grad_x);
- ``mattes_pca``: SimpleITK Mattes mutual information between the guide and
  the cube's first principal component on the guide grid (:func:`mattes_pca`).

TRE in guide pixels against the known transform
(``metrics.target_registration_error``); a case fails when its max TRE
exceeds 1 px. A known-answer check of the SimpleITK matrix conversion runs on
the first case (:func:`sanity`); the script exits 1 if it fails.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import scipy.ndimage as ndi

from ggrad_gpu import refine, warp_cube
from ggrad_gpu.baselines import first_principal_component
from benchmarks.reference import PlainRefinement, SitkSettings, fill_outside, plain_refine, register_sitk
from ggrad_gpu.cli.bench import CASE_SEED, draw_cases
from ggrad_gpu.metrics import target_registration_error
from ggrad_gpu.synthetic import affine_about_center, make_phantom

METHODS = ("ggrad", "plain", "mattes_pca")
LABELS = {
    "initial": "initial (device placement)",
    "ggrad": "ggrad_gpu.refine (NumPy)",
    "plain": "plain way: SciPy estimate + SimpleITK MSE",
    "mattes_pca": "SimpleITK Mattes MI, guide vs PC1",
}
FAIL_PX = 1.0  # a case fails when its max TRE exceeds this many guide pixels
FAR_PX = 25.0  # the registration issue's "shifts over 25 px"
SANITY_PX = 0.5
REPOSITORY = Path(__file__).resolve().parents[2]


def parser(description: str, *, default_json: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--cases", type=int, default=20, help="number of drawn cases (default: 20)")
    parser.add_argument("--bands", type=int, default=100,
                        help="bands of each cube (default: 100, which keeps the plain way's NNLS affordable)")
    parser.add_argument("--json", type=Path, default=REPOSITORY / ".benchmarks" / default_json,
                        help=f"per-case results (default: .benchmarks/{default_json} in the repository)")
    return parser


def mattes_pca(guide, cube, initial, *, settings=None, start=None) -> PlainRefinement:
    """SimpleITK Mattes MI of the guide (fixed) and the cube's first principal component (moving).

    The cube goes onto the guide grid through ``initial`` (``warp_cube``); the
    PC1 score image over the covered pixels, filled outside them with the
    nearest covered value, is registered to the guide.
    """
    initial = np.asarray(initial, dtype=np.float64)
    clock, timings = time.perf_counter(), {}
    on_guide = warp_cube(cube, initial, tuple(guide.shape), order=1)
    covered = np.isfinite(on_guide).all(axis=2)
    timings["place"], clock = time.perf_counter() - clock, time.perf_counter()
    scores = fill_outside(first_principal_component(on_guide, mask=covered), ~covered)
    timings["pca"], clock = time.perf_counter() - clock, time.perf_counter()
    registration, info = register_sitk(guide, scores, metric="mattes", initial=start, settings=settings)
    timings["register"] = time.perf_counter() - clock
    return PlainRefinement(initial @ registration, registration, info, timings, (np.asarray(guide), scores))


def _tre(phantom, matrix) -> dict:
    tre = target_registration_error(matrix, phantom.matrix, phantom.guide.shape)
    return {"tre_mean": float(tre.mean), "tre_max": float(tre.max)}


def sanity(phantom, plain, mattes) -> dict:
    """Known answers for the SimpleITK conversion on the first case's own images.

    ``exact``: the moving image is the fixed one warped by the true
    misregistration ``T``, so the metric's optimum is ``T``; SimpleITK started
    from the identity, from ``T`` and from ``T`` nudged (2 px, 0.5 deg, 1 %)
    must come back with ``initial @ R`` within ``SANITY_PX`` of the truth.
    ``real_from_truth``: the peers on their real images started from ``T``
    (their own bias, recorded, not checked).
    """
    truth = phantom.misregistration
    nudge = affine_about_center(phantom.guide.shape, rotation_deg=0.5, scale=1.01, shift=(2.0, -1.5))
    out = {"exact": {}, "real_from_truth": {}}
    for name, metric, result in (("plain", "mse", plain), ("mattes_pca", "mattes", mattes)):
        fixed, moving = (np.asarray(image, dtype=np.float64) for image in result.images)
        warped = ndi.affine_transform(fixed, np.linalg.inv(truth), order=3, mode="nearest")
        for start_name, start in (("identity", None), ("truth", truth), ("nudged", truth @ nudge)):
            registration, _ = register_sitk(fixed, warped, metric=metric, initial=start)
            out["exact"][f"{name} from {start_name}"] = _tre(phantom, phantom.initial @ registration)
        registration, _ = register_sitk(fixed, moving, metric=metric, initial=truth)
        out["real_from_truth"][name] = _tre(phantom, phantom.initial @ registration)
    return out


def _refine(phantom):
    with warnings.catch_warnings(record=True) as caught:  # a kept initial transform warns: recorded
        warnings.simplefilter("always")
        result = refine(phantom.guide, phantom.cube, initial=phantom.initial, backend="numpy")
    return result, [str(w.message) for w in caught]


def _timed(function, *args):
    start = time.perf_counter()
    out = function(*args)
    return out, time.perf_counter() - start


def run(count: int, build) -> dict:
    """Every method on the phantom ``build(case)`` of ``count`` drawn cases (minutes); prints a line a case."""
    tiny = make_phantom(shape=(120, 150), bands=8, seed=0)  # one-time costs stay out of the timings
    _refine(tiny)
    for peer in (plain_refine, mattes_pca):
        peer(tiny.guide, tiny.cube, tiny.initial, settings=SitkSettings(iterations=5))
    rows, first = [], None
    for case in draw_cases(count, seed=CASE_SEED):
        phantom = build(case)
        row = {"case": case.seed, "transform": asdict(case), "shift_px": float(np.hypot(*case.shift)),
               "initial": {**_tre(phantom, phantom.initial), "seconds": None}}
        (result, caught), seconds = _timed(_refine, phantom)
        row["ggrad"] = {**_tre(phantom, result.matrix), "seconds": seconds, "improved": bool(result.improved),
                        "message": result.message, "warnings": caught, "timings": result.timings}
        peers = {}
        for name, peer in (("plain", plain_refine), ("mattes_pca", mattes_pca)):
            peers[name], seconds = _timed(peer, phantom.guide, phantom.cube, phantom.initial)
            row[name] = {**_tre(phantom, peers[name].matrix), "seconds": seconds, **peers[name].info,
                         "timings": peers[name].timings}
        if first is None:
            first = {"case": case.seed, **sanity(phantom, peers["plain"], peers["mattes_pca"])}
        print(f"case {case.seed}: shift {row['shift_px']:.1f} px; max TRE " + ", ".join(
            f"{m} {row[m]['tre_max']:.3f}" for m in ("initial",) + METHODS), flush=True)
        rows.append(row)
    return {"rows": rows, "sanity": first, "guide_shape": list(phantom.guide.shape),
            "cube_shape": list(phantom.cube.shape)}


def summarise(rows, methods=("initial",) + METHODS, *, reference="ggrad") -> dict:
    """Per method: mean, median and worst max TRE, failures (also among shifts over ``FAR_PX``), s/case;
    and, per peer, the cases the reference fails but the peer does not."""
    far = [row["case"] for row in rows if row["shift_px"] > FAR_PX]
    table = []
    for method in methods:
        means = np.array([row[method]["tre_mean"] for row in rows])
        seconds = [row[method]["seconds"] for row in rows if row[method].get("seconds") is not None]
        failed = [row["case"] for row in rows if row[method]["tre_max"] > FAIL_PX]
        table.append({"method": method, "mean_tre": float(means.mean()), "median_tre": float(np.median(means)),
                      "worst_max_tre": float(max(row[method]["tre_max"] for row in rows)),
                      "failed_cases": failed, "far_failed_cases": [c for c in failed if c in far],
                      "seconds_per_case": float(np.mean(seconds)) if seconds else None})
    lost = {m: [row["case"] for row in rows if row[reference]["tre_max"] > FAIL_PX >= row[m]["tre_max"]]
            for m in methods if m != reference}
    return {"table": table, "far_cases": far, "reference_fails_peer_succeeds": lost}


def markdown(summary, *, seconds: bool = True) -> list[str]:
    """The table as printed in benchmarks/RESULTS.md."""
    header = ["method", "mean TRE (px)", "median (px)", "worst max (px)", "failures",
              f"failures, shift > {FAR_PX:g} px", "ggrad fails, this succeeds"] + (["s/case"] if seconds else [])
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    for entry in summary["table"]:
        lost = summary["reference_fails_peer_succeeds"].get(entry["method"])
        cells = [LABELS[entry["method"]], f"{entry['mean_tre']:.3f}", f"{entry['median_tre']:.3f}",
                 f"{entry['worst_max_tre']:.3f}", str(len(entry["failed_cases"])),
                 f"{len(entry['far_failed_cases'])} / {len(summary['far_cases'])}",
                 "-" if lost is None else str(len(lost))]
        if seconds:
            cells.append("-" if entry["seconds_per_case"] is None else f"{entry['seconds_per_case']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def report(sweep, *, title: str, path: Path, seconds: bool = True, starts=("identity", "truth", "nudged")) -> int:
    """Print the sweep's table and details, write every case to ``path``; 1 if the conversion check fails.

    ``starts``: the known-answer starts that check the conversion (on tissue,
    mean squares from the identity is not captured over a long shift: a
    capture failure, not a conversion error).
    """
    summary = summarise(sweep["rows"])
    exact = sweep["sanity"]["exact"]
    checked = [name for name in exact if name.rsplit(" ", 1)[-1] in starts]
    worst = max(exact[name]["tre_max"] for name in checked)
    rows, cols = sweep["guide_shape"]
    lines = [f"{title}: {len(sweep['rows'])} cases, {rows} x {cols} guide, "
             f"{' x '.join(map(str, sweep['cube_shape']))} cube; failure = max TRE > {FAIL_PX:g} px", ""]
    lines += markdown(summary, seconds=seconds) + [""]
    lines.append(f"cases with shift > {FAR_PX:g} px: {summary['far_cases']}")
    for entry in summary["table"]:
        if entry["failed_cases"] and entry["method"] != "initial":
            lines.append(f"{entry['method']} fails: {entry['failed_cases']} (shift > {FAR_PX:g} px: "
                         f"{entry['far_failed_cases']})")
    kept = [row["case"] for row in sweep["rows"] if not row["ggrad"]["improved"]]
    if kept:
        lines.append(f"refine kept the initial transform (improved=False): {kept}")
    lines.append(f"SimpleITK conversion check (known answer, case {sweep['sanity']['case']}): worst max TRE "
                 f"{worst:.3f} px over {', '.join(checked)}; started at the truth on their real images the peers "
                 "end at " + ", ".join(f"{name} {t['tre_mean']:.2f} / {t['tre_max']:.2f} px (mean / max)"
                                       for name, t in sweep["sanity"]["real_from_truth"].items()))
    print("\n".join(lines))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"title": title, "labels": LABELS, "fail_px": FAIL_PX, "far_px": FAR_PX,
                                "case_seed": CASE_SEED, "sitk_settings": asdict(SitkSettings()),
                                "summary": summary, "markdown": markdown(summary, seconds=seconds), **sweep},
                               indent=1, default=lambda value: np.asarray(value).tolist()))
    print(f"wrote {path.name} (every case) to {path.parent}")
    if worst >= SANITY_PX:
        print(f"FAILED: SimpleITK's known-answer registrations miss the truth by {worst:.3f} px (> {SANITY_PX})")
        return 1
    return 0
