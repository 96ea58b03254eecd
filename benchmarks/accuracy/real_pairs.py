"""Accuracy on real pairs with a known truth, a negative control, and count-limited phantoms.

``python benchmarks/accuracy/real_pairs.py [--starts 16] [--data DIR]``

Each case is a cube and a guide whose true relation is known, refined from
``--starts`` seeded misplacements (a shift of 1 to 3 cube pixels in a random
direction, a rotation within +-3 degrees, a scale within +-4 %), by the
default ``refine`` and with the baseline images (``method="pca"``,
``"band_std"``) in place of the global gradient. Scored as TRE over the cube's
footprint in guide pixels against the truth; a start "counts as worse" when
the result is called refined and its mean TRE is larger than the start's.

Cases:

- ``p45``: the Bruker P45 EDS hypermap (75 x 100, 92 bands of 16 channels,
  about 8 X-ray counts per pixel) and the BSE image of the same scan, read by
  ``ggrad_gpu.io.read_instrument`` (truth: the identity, from the scan; see
  the data's README for the independent check). Skipped where the data set is
  absent (``../shared/data`` beside the repository, or ``GGRAD_DATA``).
- ``p45 SE``: the same hypermap against the SE image.
- ``control``: the same hypermap against its BSE image turned by 180
  degrees: nothing in the cube matches the guide; every start must end kept.
- ``counts C``: the default phantom (brightfield guide: optical density; 240 x
  280 guide, native 60 x 70 x 60, not normalised per pixel) without noise,
  scaled to C counts per pixel over all bands on average and drawn as Poisson
  counts (C = 2, 8, 50); starts of 1 to 3 cube pixels (4 to 12 guide px).
- ``raman``: the same with a fluorescence background (a broad band whose
  strength varies smoothly over the map, 5x the Raman signal) before the
  counts (20 per pixel).
- ``raw spectra``: the same phantom with its spectral noise (2 %), not as
  counts: spectra as an instrument gives them, each pixel's scaled by a
  smooth gain (0.3 to 1.6) that the guide does not share.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import scipy.ndimage as ndi

from ggrad_gpu import refine
from ggrad_gpu.metrics import target_registration_error
from ggrad_gpu.synthetic import affine_about_center, make_phantom

REPOSITORY = Path(__file__).resolve().parents[2]
METHODS = ("gradient", "pca", "band_std")


def data_folder(given=None) -> Path:
    return Path(given or os.environ.get("GGRAD_DATA") or REPOSITORY.parent / "shared" / "data")


def starts(shape, count, *, cube_pixel=1.0, seed=0):
    """``count`` misplacements (guide to guide) of a cube spanning ``shape``, ``cube_pixel`` guide px per cube px."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        angle, scale, length, direction = rng.uniform(-3, 3), 1 + rng.uniform(-0.04, 0.04), \
            cube_pixel * rng.uniform(1, 3), rng.uniform(0, 2 * np.pi)
        out.append(affine_about_center(shape, rotation_deg=angle, scale=scale,
                                       shift=(length * np.sin(direction), length * np.cos(direction))))
    return out


def real_cases(folder: Path):
    bcf = folder / "sem-eds-bruker-p45" / "P45_the_default_job.bcf"
    if not bcf.exists():
        print(f"skipped the real pairs: {bcf} is absent", file=sys.stderr)
        return []
    from ggrad_gpu.io import read_instrument

    sample = read_instrument(bcf)
    se = next(image.image for image in sample.images if image.name.startswith("SE"))
    # Electron images: compared as they are (absorbance=False), as ggrad refine does for a .bcf.
    return [("p45 BSE", sample.guide, sample.cube, np.eye(3), False, False),
            ("p45 SE", se, sample.cube, np.eye(3), False, False),
            ("control", np.ascontiguousarray(sample.guide[::-1, ::-1]), sample.cube, np.eye(3), True, False)]


PHANTOM_CUBE_PIXEL = 4  # guide px per cube px of the count-limited phantoms


def count_limited(counts: float, *, fluorescence: float = 0.0, seed: int = 0):
    """The default phantom as Poisson counts: ``counts`` per pixel over all bands (plus a background).

    Not normalised per pixel: counts, as a detector gives them.
    """
    phantom = make_phantom(shape=(240, 280), bands=60, native_factor=PHANTOM_CUBE_PIXEL, seed=seed, noise=0.0,
                           normalisation=None)
    clean = np.clip(phantom.cube, 0, None).astype(np.float64)
    clean /= clean.sum(axis=2).mean()
    if fluorescence:
        rng = np.random.default_rng(seed + 1000)
        bands = clean.shape[2]
        spectrum = np.exp(-0.5 * ((np.arange(bands) - 0.7 * bands) / (0.4 * bands)) ** 2)
        strength = ndi.gaussian_filter(rng.random(clean.shape[:2]), 6)
        strength = 0.5 + (strength - strength.min()) / np.ptp(strength)
        clean = clean + fluorescence * strength[:, :, None] * spectrum / spectrum.sum()
        clean /= clean.sum(axis=2).mean()
    cube = np.random.default_rng(seed).poisson(counts * clean).astype(np.float32)
    return phantom.guide, cube, phantom.matrix


def raw_spectra(seed: int = 0):
    """The default phantom's spectra with their gain, not normalised per pixel (noise 2 %)."""
    phantom = make_phantom(shape=(240, 280), bands=60, native_factor=PHANTOM_CUBE_PIXEL, seed=seed,
                           normalisation=None)
    return phantom.guide, phantom.cube, phantom.matrix


def run_case(name, guide, cube, truth, starts_, method, control, absorbance):
    rows = []
    for start in starts_:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            clock = time.perf_counter()
            result = refine(guide, cube, initial=start, method=method, absorbance=absorbance,
                            backend="numpy")
            seconds = time.perf_counter() - clock
        before = target_registration_error(start, truth, guide.shape, spacing=3)
        after = target_registration_error(result.matrix, truth, guide.shape, spacing=3)
        rows.append((before.mean, after.mean, after.max, result.improved, result.quality.get("spread_px"), seconds))
    rows = np.array(rows, dtype=float)
    refined = rows[:, 3] > 0
    return {
        "case": name, "method": method, "starts": len(rows),
        "under_1px": int((rows[:, 1] < 1).sum()) if not control else None,
        "refined": int(refined.sum()),
        "worse_called_refined": int((refined & (rows[:, 1] > rows[:, 0])).sum()),
        "median_mean_tre": float(np.median(rows[:, 1])), "max_tre": float(rows[:, 2].max()),
        "start_mean_tre": float(np.median(rows[:, 0])), "seconds": float(np.median(rows[:, 5])),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starts", type=int, default=16)
    parser.add_argument("--data", default=None, help="the real data sets' folder")
    parser.add_argument("--no-phantoms", action="store_true", help="the real pairs only")
    args = parser.parse_args(argv)
    cases = list(real_cases(data_folder(args.data)))
    if not args.no_phantoms:
        for counts in (2, 8, 50):
            guide, cube, truth = count_limited(counts)
            cases.append((f"counts {counts}", guide, cube, truth, False, True))  # brightfield guides
        guide, cube, truth = count_limited(20, fluorescence=5.0)
        cases.append(("raman 20 + fluorescence", guide, cube, truth, False, True))
        guide, cube, truth = raw_spectra()
        cases.append(("raw spectra", guide, cube, truth, False, True))
    print("| case | method | starts | under 1 px | called refined | worse called refined | median mean TRE "
          "(px) | worst max TRE (px) | start median (px) | s per refine |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    failed = False
    for name, guide, cube, truth, control, absorbance in cases:
        # Starts relative to the truth: misplacements of the true transform, 1 to 3 cube pixels.
        cube_pixel = 1 / np.sqrt(abs(np.linalg.det(truth[:2, :2])))
        misplaced = [truth @ start for start in starts(guide.shape, args.starts, cube_pixel=cube_pixel)]
        for method in METHODS:
            row = run_case(name, guide, cube, truth, misplaced, method, control, absorbance)
            under = "-" if row["under_1px"] is None else row["under_1px"]
            print(f"| {name} | {method} | {row['starts']} | {under} | {row['refined']} | "
                  f"{row['worse_called_refined']} | {row['median_mean_tre']:.2f} | {row['max_tre']:.2f} | "
                  f"{row['start_mean_tre']:.2f} | {row['seconds']:.2f} |", flush=True)
            if method == "gradient":
                failed |= row["worse_called_refined"] > 0 or (control and row["refined"] > 0)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
