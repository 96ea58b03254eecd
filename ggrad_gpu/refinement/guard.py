"""The guard: whether a refined placement beats the initial one, judged without ground truth.

It compares the first estimate's gradient images (made from the initial
placement) before and after the refined placement, by MSE and NCC over their
overlap, and rejects outcomes no refinement of a device placement should give.

Those images can favour a wrong placement: their weights were fitted with the
cube misplaced, and an affine fit to repetitive texture or to a small map's
noise can raise their NCC away from the truth (a 30 x 30 px EDS map from a
shifted start: NCC up, TRE worse). So the guard also asks for the *fair fit*
(:func:`ggrad_gpu.refinement.basins.fit_at`) to rise: the NCC of the guide's gradients and
the cube's, with the weights estimated afresh at each placement, before and
after.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .._backend import array_module
from ..core.geometry import degeneracy
from ..registration.register import affine_mse, affine_ncc

__all__ = ["MAX_SCALE_CHANGE", "MIN_NCC", "MIN_OVERLAP", "Verdict", "judge"]

# Along any axis, refined against initial: stage errors are shifts, small
# rotations and a few per cent of scale; more is the optimiser shrinking the
# overlap to where both images are flat, or, on a small map, fitting scale to
# its edges and noise (30 x 30 px EDS map from a start 0.5 px off: 1.13 along
# the rows, worst point 3.1 px off, accepted at a bound of 1.2).
MAX_SCALE_CHANGE = 1.1
# Below this, grad_x and grad_y share too little structure to trust a registration.
MIN_NCC = 0.2
# Valid pixels the registration needs at least (its Gauss-Newton step does).
MIN_OVERLAP = 16


@dataclass(frozen=True)
class Verdict:
    """The guard's finding.

    Attributes
    ----------
    improved : bool
    reason : str
        Why not, when ``improved`` is False; else empty.
    quality : dict
        ``mse_before``, ``mse_after``, ``ncc_before``, ``ncc_after``, and where
        given ``fit_before``, ``fit_after`` (and, with ``refine(check=True)``,
        ``spread_px``).

    Examples
    --------
    >>> quality = {"mse_before": 0.2, "mse_after": 0.05, "ncc_before": 0.3, "ncc_after": 0.9,
    ...            "fit_before": 0.25, "fit_after": 0.95}
    >>> Verdict(True, "", quality).figures
    'gradient MSE 0.2 -> 0.05, NCC 0.300 -> 0.900, fit 0.250 -> 0.950'
    >>> import scipy.ndimage as ndi
    >>> grad_x = ndi.gaussian_filter(np.random.default_rng(0).random((64, 64)), 2)
    >>> verdict = judge(grad_x, grad_x, np.eye(3))  # nothing moved: nothing improved
    >>> isinstance(verdict, Verdict), verdict.improved, bool(verdict.reason)
    (True, False, True)
    """

    improved: bool
    reason: str
    quality: dict = field(default_factory=dict)

    @property
    def figures(self) -> str:
        """The quality figures in one line."""
        q = self.quality
        line = (f"gradient MSE {q['mse_before']:.4g} -> {q['mse_after']:.4g}, "
                f"NCC {q['ncc_before']:.3f} -> {q['ncc_after']:.3f}")
        if "fit_before" in q:
            line += f", fit {q['fit_before']:.3f} -> {q['fit_after']:.3f}"
        if "spread_px" in q:
            line += f", spread {q['spread_px']:.2f} px" if math.isfinite(q["spread_px"]) else ", spread n/a"
        return line


def judge(grad_x, grad_y, placement, *, fixed_valid=None, moving_valid=None, guide_flat=False, fits=None) -> Verdict:
    """Judge ``placement`` (a working-grid registration matrix) against the identity.

    Parameters
    ----------
    grad_x, grad_y : array, shape (rows, cols)
        The first estimate's gradient images on the working grid.
    placement : numpy.ndarray, shape (3, 3)
        The refined registration (fixed = ``grad_x``'s grid to ``grad_y``'s).
    fixed_valid, moving_valid : array of bool, optional
        Pixels of each image that hold data.
    guide_flat : bool
        The guide is constant (no edges anywhere).
    fits : (float, float), optional
        The fair fit at the initial and at the refined placement
        (:func:`ggrad_gpu.refinement.basins.fit_at`); the refinement must raise it.

    Examples
    --------
    >>> import numpy as np
    >>> import scipy.ndimage as ndi
    >>> from ggrad_gpu.refinement.guard import judge
    >>> grad_x = ndi.gaussian_filter(np.random.default_rng(0).random((64, 64)), 2)
    >>> grad_y = np.roll(grad_x, 3, axis=1)  # the moving image, 3 px off
    >>> shift = np.array([[1.0, 0, 0], [0, 1, 3], [0, 0, 1]])
    >>> judge(grad_x, grad_y, shift).improved, judge(grad_x, grad_y, shift, fits=(0.9, 0.5)).reason
    (True, 'the cube explains the guide no better at the refined placement (fit 0.900 -> 0.500)')
    """
    xp = array_module(grad_x=grad_x, grad_y=grad_y)
    masks = {"fixed_mask": fixed_valid, "moving_mask": moving_valid}
    quality = {
        "mse_before": affine_mse(grad_x, grad_y, np.eye(3), **masks),
        "mse_after": affine_mse(grad_x, grad_y, placement, **masks) if np.isfinite(placement).all() else math.inf,
        "ncc_before": affine_ncc(grad_x, grad_y, np.eye(3), **masks),
        "ncc_after": affine_ncc(grad_x, grad_y, placement, **masks) if np.isfinite(placement).all() else 0.0,
    }
    if fits is not None:
        quality["fit_before"], quality["fit_after"] = (float(f) for f in fits)
    overlap = xp.ones(grad_x.shape, dtype=bool)
    for valid in (fixed_valid, moving_valid):
        if valid is not None:
            overlap &= valid
    problem = degeneracy(placement, MAX_SCALE_CHANGE)
    if int(overlap.sum()) < MIN_OVERLAP:
        reason = "too few valid pixels where the guide and the cube overlap (little overlap, or missing data)"
    elif guide_flat or _is_flat(grad_x, overlap, xp):
        reason = "the guide has no edges where the cube overlaps it (its gradient image is 0)"
    elif _is_flat(grad_y, overlap, xp):
        reason = "the cube has no spatial structure that the guide shares (its global gradient image is 0)"
    elif problem:
        reason = f"the refined transform is implausible: {problem}"
    elif not (quality["mse_after"] < quality["mse_before"] and quality["ncc_after"] > quality["ncc_before"]):
        reason = "the refinement did not improve the match"
    elif fits is not None and not fits[1] > fits[0]:
        reason = f"the cube explains the guide no better at the refined placement (fit {fits[0]:.3f} -> {fits[1]:.3f})"
    elif quality["ncc_after"] < MIN_NCC:
        reason = f"the gradient images hardly match (NCC below {MIN_NCC})"
    else:
        reason = ""
    return Verdict(not reason, reason, quality)


def _is_flat(image, valid, xp) -> bool:
    """Whether ``image`` is 0 at every pixel of ``valid``."""
    return not float(xp.abs(xp.where(valid, image, 0)).max()) > 0
