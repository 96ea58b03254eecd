"""Benchmarks of ggrad_gpu.refine against two SimpleITK peers, on the same cases in one run.

Methods (:mod:`benchmarks.peers`):

- ``ggrad``: ``ggrad_gpu.refine(guide, cube, initial=phantom.initial, backend="numpy")``;
- ``plain``: the paper's method without this package: the cube on the guide
  grid with the initial transform, :func:`benchmarks.reference.plain_estimate`
  (per-band SciPy loops, ``scipy.optimize.nnls``), SimpleITK affine
  registration of ``grad_y`` to ``grad_x`` by mean squares;
- ``mattes_pca``: SimpleITK Mattes mutual information between the guide and
  the cube's first principal component on the guide grid.

Tests:

- ``test_refine_accuracy_sweep``: ``GGRAD_BENCH_CASES`` (default 20) phantoms
  (350 x 415 guide, 70 x 83 x 100 cube) with misregistrations drawn by
  :func:`benchmarks.peers.draw_cases` (rotation +-5 deg, scale 0.95-1.05,
  shear +-0.02, shift up to 45 px). TRE per case (``metrics.target_registration_error``),
  wall time per method and case. It asserts nothing about accuracy, only that
  the SimpleITK transforms are converted right (a sanity case with a known
  answer). The Markdown table is printed in the end-of-run summary and, with
  the per-case rows, written to ``.benchmarks/refine_cases.json``.
- ``test_refine_tissue_sweep``: the same three methods on
  ``GGRAD_BENCH_TISSUE_CASES`` (default 20) semi-synthetic tissue phantoms
  (:func:`ggrad_gpu.synthetic.make_tissue_phantom`: the real IHC micrograph
  ``ihc.png`` as the guide, the cube's component maps from its
  colour-deconvolved stains; 350 x 415 guide, 70 x 83 x 100 cube) with the
  same drawn misregistrations. Also counts each method's failures among the
  cases shifted by more than 25 px. The image is read from
  ``<repository>/../shared/data/ihc-brightfield/ihc.png`` (or ``$GGRAD_DATA``,
  as ``tests/test_tissue.py``); the test skips where it is absent. Table in
  the summary (printed by the test too) and ``.benchmarks/refine_tissue_cases.json``.
- ``test_refine_end_to_end``: group ``refine-350x415x<bands>``: ``refine`` and
  the plain way end to end, one round each, on the first
  ``GGRAD_BENCH_SPEED_CASES`` (default 3) cases at ``GGRAD_BENCH_BANDS``
  (default 1000) bands, the paper's geometry. The ratio is in the summary and
  in ``.benchmarks/refine_speed.json``.

Run from the repository root: ``python -m pytest benchmarks/test_refine.py -p no:cacheprovider``
(many minutes; ``GGRAD_BENCH_CASES=3`` while iterating; ``-k tissue`` for the tissue
sweep alone). Skipped without SimpleITK.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.ndimage as ndi

pytest.importorskip("SimpleITK")

from benchmarks import peers  # noqa: E402
from benchmarks._runner import _jsonable  # noqa: E402
from benchmarks.conftest import env_int  # noqa: E402
from ggrad_gpu import refine  # noqa: E402
from ggrad_gpu.metrics import target_registration_error  # noqa: E402
from ggrad_gpu.synthetic import affine_about_center, make_phantom, make_tissue_phantom  # noqa: E402


SWEEP_CASES = env_int("GGRAD_BENCH_CASES", 20)
TISSUE_CASES = env_int("GGRAD_BENCH_TISSUE_CASES", 20)
SPEED_CASES = env_int("GGRAD_BENCH_SPEED_CASES", 3)
SPEED_BANDS = env_int("GGRAD_BENCH_BANDS", 1000)
SWEEP_BANDS = 100  # keeps the plain way's scipy.optimize.nnls affordable over the sweep
CASE_SEED = 2024
METHODS = ("ggrad", "plain", "mattes_pca")
LABELS = {
    "initial": "initial (device placement)",
    "ggrad": "ggrad_gpu.refine (NumPy)",
    "plain": "plain way: SciPy estimate + SimpleITK MSE",
    "mattes_pca": "SimpleITK Mattes MI, guide vs PC1",
}
SANITY_PX = 0.5
SANITY_STARTS = ("identity", "truth", "nudged")  # where _sanity starts SimpleITK


def _refine(phantom):
    """``refine`` as a user calls it; a kept initial transform warns, which is recorded, not raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = refine(phantom.guide, phantom.cube, initial=phantom.initial, backend="numpy")
    return result, [str(w.message) for w in caught]


def _timed(function, *args, **kwargs):
    start = time.perf_counter()
    out = function(*args, **kwargs)
    return out, time.perf_counter() - start


def _tre(phantom, matrix) -> dict:
    tre = target_registration_error(matrix, phantom.matrix, phantom.guide.shape)
    return {"tre_mean": tre.mean, "tre_max": tre.max}


def _benchmarks_dir(config):
    folder = config.rootpath / ".benchmarks"
    folder.mkdir(exist_ok=True)
    return folder


# --------------------------------------------------------------------------- sanity


def _sanity(phantom, plain, mattes) -> dict:
    """Known answers for the SimpleITK conversion, on the first case's own images.

    ``exact``: the moving image is the fixed one warped by the true
    misregistration ``T`` (``moving(T p) = fixed(p)``), so the metric's optimum
    is ``T`` itself; SimpleITK, started from the identity, from ``T`` and from
    ``T`` nudged by 2 px / 0.5 deg / 1 %, must come back with
    ``initial @ R`` within ``SANITY_PX`` of the phantom's matrix. A transposed,
    inverted or off-centre conversion misses by pixels to tens of pixels.
    Which starts count is :func:`_report`'s choice: on the tissue phantoms the
    mean-squares descent from the identity is not captured over a long shift
    (a capture failure on tissue texture, not a conversion error), so there
    only the starts at and near ``T`` check the conversion.

    ``real_from_truth``: SimpleITK on the peers' real images started from
    ``T``: where their own metric's optimum lies (recorded, not asserted: it is
    the method's bias, not the conversion's).
    """
    truth = phantom.misregistration
    nudge = affine_about_center(phantom.guide.shape, rotation_deg=0.5, scale=1.01, shift=(2.0, -1.5))
    out = {"exact": {}, "real_from_truth": {}}
    for name, metric, result in (("plain", "mse", plain), ("mattes_pca", "mattes", mattes)):
        fixed, moving = (np.asarray(image, dtype=np.float64) for image in result.images)
        warped = ndi.affine_transform(fixed, np.linalg.inv(truth), order=3, mode="nearest")
        for start_name, start in (("identity", None), ("truth", truth), ("nudged", truth @ nudge)):
            registration, _ = peers.register_sitk(fixed, warped, metric=metric, initial=start)
            out["exact"][f"{name} from {start_name}"] = _tre(phantom, phantom.initial @ registration)
        registration, _ = peers.register_sitk(fixed, moving, metric=metric, initial=truth)
        out["real_from_truth"][name] = _tre(phantom, phantom.initial @ registration)
    return out


# --------------------------------------------------------------------------- sweep


def _warm_up():
    """Each method once on a tiny phantom: one-time costs of a process stay out of the timings."""
    tiny = make_phantom(shape=(120, 150), bands=8, seed=0)
    _refine(tiny)
    settings = peers.SitkSettings(iterations=5)
    peers.plain_way(tiny.guide, tiny.cube, tiny.initial, settings=settings)
    peers.mattes_pca(tiny.guide, tiny.cube, tiny.initial, settings=settings)


def _run_sweep(cases, build):
    """Every method on the phantom ``build(case)`` of every case (minutes).

    Returns the rows (one per case, as :func:`benchmarks.peers.summarise` takes
    them, with the case's shift length ``shift_px``), the SimpleITK sanity
    check on the first case, and the guide and native cube shapes.
    """
    rows, sanity, phantom = [], None, None
    _warm_up()
    for case in cases:
        phantom = build(case)
        row = {"case": case.seed, "transform": asdict(case), "shift_px": float(np.hypot(*case.shift)),
               "initial": _tre(phantom, phantom.initial)}
        row["initial"]["seconds"] = None

        (result, caught), seconds = _timed(_refine, phantom)
        row["ggrad"] = {**_tre(phantom, result.matrix), "seconds": seconds, "improved": bool(result.improved),
                        "message": result.message, "warnings": caught, "timings": result.timings}

        plain, seconds = _timed(peers.plain_way, phantom.guide, phantom.cube, phantom.initial)
        row["plain"] = {**_tre(phantom, plain.matrix), "seconds": seconds, "stop": plain.stop,
                        "iterations": plain.iterations, "metric": plain.metric, "timings": plain.timings}

        mattes, seconds = _timed(peers.mattes_pca, phantom.guide, phantom.cube, phantom.initial)
        row["mattes_pca"] = {**_tre(phantom, mattes.matrix), "seconds": seconds, "stop": mattes.stop,
                             "iterations": mattes.iterations, "metric": mattes.metric, "timings": mattes.timings}
        if sanity is None:
            sanity = _sanity(phantom, plain, mattes)
        rows.append(row)
    return SimpleNamespace(
        cases=cases, rows=rows, sanity=sanity, shape=phantom.guide.shape, native=phantom.cube.shape[:2]
    )


def _report(sweep, summary, request, *, key, title, data, filename, description, seconds=True,
            starts=SANITY_STARTS):
    """The sweep's table into ``summary[key]`` and, with every case, ``.benchmarks/<filename>``.

    ``starts``: the starts of :func:`_sanity`'s known-answer registrations that
    check the conversion (the others are recorded only). Returns the ``summary`` entry.
    """
    report = peers.summarise(sweep.rows, ("initial",) + METHODS, far_px=peers.FAR_PX)
    lost = report["reference_fails_peer_succeeds"]
    markdown = peers.markdown_table(report["table"], LABELS, far_px=report["far_px"], lost=lost, seconds=seconds)
    kept = [row["case"] for row in sweep.rows if not row["ggrad"]["improved"]]
    entry = summary[key] = {
        "title": title,
        "data": data,
        "cases": len(sweep.rows),
        "shape": sweep.shape,
        "native": sweep.native,
        "bands": SWEEP_BANDS,
        "fail_px": report["fail_px"],
        "far_px": report["far_px"],
        "far_cases": report["far_cases"],
        "table": [row for row in report["table"] if row["method"] != "initial"],
        "markdown": markdown,
        "reference_fails_peer_succeeds": {method: cases for method, cases in lost.items() if method != "initial"},
        "kept_initial": kept,
        "sanity": sweep.sanity,
        "conversion_checked": [name for name in sweep.sanity["exact"] if name.rsplit(" ", 1)[-1] in starts],
        "first_case": sweep.rows[0]["case"],
    }
    document = {
        "description": description,
        "guide_shape": list(sweep.shape),
        "cube_shape": [*sweep.native, SWEEP_BANDS],
        "case_seed": CASE_SEED,
        "fail_px": report["fail_px"],
        "far_px": report["far_px"],
        "far_cases": report["far_cases"],
        "labels": LABELS,
        "sitk_settings": asdict(peers.SitkSettings()),
        "table": report["table"],
        "markdown": markdown,
        "ggrad_fails_peer_succeeds": lost,
        "ggrad_kept_initial": kept,
        "sanity": sweep.sanity,
        "cases": sweep.rows,
    }
    path = _benchmarks_dir(request.config) / filename
    path.write_text(json.dumps(_jsonable(document), indent=1))
    return entry


def _check_conversion(entry):
    """SimpleITK's known-answer registrations (the matrix conversion) come back within ``SANITY_PX``.

    ``entry``: :func:`_report`'s; only its ``conversion_checked`` registrations count.
    """
    exact = entry["sanity"]["exact"]
    bad = {name: exact[name] for name in entry["conversion_checked"] if not exact[name]["tre_max"] < SANITY_PX}
    assert not bad, f"SimpleITK's known-answer registrations miss the truth by more than {SANITY_PX} px: {bad}"


PEERS_DESCRIPTION = (
    "ggrad_gpu.refine vs the plain way (SciPy estimate + SimpleITK MSE) vs SimpleITK Mattes MI "
    "(guide vs first principal component); TRE in guide pixels (metrics.target_registration_error)"
)


@pytest.fixture(scope="session")
def sweep():
    """Every method on every synthetic phantom, once per session (minutes)."""
    return _run_sweep(peers.draw_cases(SWEEP_CASES, seed=CASE_SEED),
                      lambda case: make_phantom(bands=SWEEP_BANDS, **case.phantom_kwargs()))


def test_refine_accuracy_sweep(sweep, summary, request):
    """TRE and time of refine and its peers on the sweep's cases; checks only the conversion."""
    _check_conversion(_report(sweep, summary, request, key="refine_sweep", title="refine accuracy sweep",
                              data="phantoms", filename="refine_cases.json", description=PEERS_DESCRIPTION))


# --------------------------------------------------------------------------- tissue


def _ihc_path() -> Path:
    """Where the IHC micrograph lives: ``$GGRAD_DATA``, else ``shared/data`` beside the repository."""
    data = os.environ.get("GGRAD_DATA")
    folder = Path(data) if data else Path(__file__).resolve().parents[1].parent / "shared" / "data"
    return folder / "ihc-brightfield" / "ihc.png"


@pytest.fixture(scope="session")
def ihc_rgb():
    """The IHC micrograph as (rows, cols, 3) uint8, read in place with Pillow; skip where absent."""
    path = _ihc_path()
    if not path.is_file():
        pytest.skip(f"the ihc-brightfield data set is not available ({path.name} not found beside the project)")
    pil = pytest.importorskip("PIL.Image")
    with pil.open(path) as png:
        return np.asarray(png.convert("RGB"))


@pytest.fixture(scope="session")
def tissue_sweep(ihc_rgb):
    """Every method on every tissue phantom, once per session (minutes)."""
    return _run_sweep(peers.draw_cases(TISSUE_CASES, seed=CASE_SEED),
                      lambda case: make_tissue_phantom(ihc_rgb, bands=SWEEP_BANDS, **case.phantom_kwargs()))


def test_refine_tissue_sweep(tissue_sweep, summary, request):
    """TRE of refine and its peers on tissue phantoms from the IHC micrograph; checks only the conversion.

    The registration issue: the peers fail on many shifts over 25 px, refine
    must not (every case under 1 px, mean at most 0.4 px). Recorded, not
    asserted here (``tests/test_tissue.py`` asserts it on its own cases).
    Wall times are recorded in the JSON but left out of the table.
    """
    entry = _report(tissue_sweep, summary, request, key="refine_tissue_sweep", title="refine tissue sweep",
                    data="tissue phantoms (ihc.png)", filename="refine_tissue_cases.json",
                    description=PEERS_DESCRIPTION + "; tissue phantoms: synthetic.make_tissue_phantom(ihc.png)",
                    seconds=False, starts=("truth", "nudged"))
    # The end-of-run summary (conftest.py) shows this entry only beside the other refine figures; print it too.
    print("\n" + "\n".join(peers.sweep_summary_lines(entry)))
    _check_conversion(entry)


# --------------------------------------------------------------------------- speed


@pytest.fixture(scope="session")
def speed_phantoms():
    """The first ``SPEED_CASES`` cases at ``SPEED_BANDS`` bands, built on demand and kept."""
    cases = peers.draw_cases(SPEED_CASES, seed=CASE_SEED)
    built = {}
    _warm_up()

    def get(index):
        if index not in built:
            built[index] = make_phantom(bands=SPEED_BANDS, **cases[index].phantom_kwargs())
        return built[index]

    return get


@pytest.mark.parametrize("method", ["ggrad", "plain"])
@pytest.mark.parametrize("case", range(SPEED_CASES))
def test_refine_end_to_end(benchmark, summary, speed_phantoms, request, case, method):
    """refine vs the plain way, end to end at the paper's geometry (one round each)."""
    phantom = speed_phantoms(case)
    rows, cols = phantom.guide.shape
    benchmark.group = f"refine-{rows}x{cols}x{phantom.cube.shape[2]}"
    measured = {}

    def job():
        start = time.perf_counter()
        if method == "ggrad":
            out = _refine(phantom)[0].matrix
        else:
            out = peers.plain_way(phantom.guide, phantom.cube, phantom.initial).matrix
        measured["seconds"] = time.perf_counter() - start
        return out

    matrix = benchmark.pedantic(job, rounds=1, iterations=1, warmup_rounds=0)
    tre = _tre(phantom, matrix)
    benchmark.extra_info.update(case=case, **tre)
    stats = getattr(benchmark, "stats", None)
    seconds = float(stats.stats.mean) if stats is not None else measured["seconds"]
    speed = summary.setdefault("refine_speed", {"shape": (rows, cols, *phantom.cube.shape), "cases": {}})
    entry = speed["cases"].setdefault(case, {})
    entry[method] = seconds
    entry[f"{method}_tre"] = tre
    path = _benchmarks_dir(request.config) / "refine_speed.json"
    path.write_text(json.dumps(_jsonable(speed), indent=1))
