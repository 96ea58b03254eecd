import itertools

import numpy as np
import pytest
import scipy.optimize

from ggrad_gpu.core.level_weights import (
    level_weights_kkt,
    level_weights_matrix,
    manual_level_weights,
    solve_level_weights,
)


def brute_force(q):
    """Enumerate every support: solve its equality-constrained QP, keep the best feasible."""
    scale = np.abs(q).max()
    q = q / scale  # a KKT matrix mixing 1e8 and 1 would lose its small singular values
    n = q.shape[0]
    k = n // 2
    best = np.inf
    for support in itertools.product([0, 1], repeat=n):
        support = np.array(support, bool)
        if not support[:k].any() or not support[k:].any():
            continue
        free = np.flatnonzero(support)
        m = free.size
        groups = np.zeros((2, m))
        groups[(free >= k).astype(int), np.arange(m)] = 1
        kkt = np.block([[2 * q[np.ix_(free, free)], -groups.T], [groups, np.zeros((2, 2))]])
        y = np.linalg.lstsq(kkt, np.r_[np.zeros(m), 1.0, 1.0], rcond=None)[0][:m]
        if y.min() < -1e-12:
            continue
        z = np.zeros(n)
        z[free] = np.maximum(y, 0)
        best = min(best, float(z @ q @ z))
    return best * scale


def random_q(rng, k, kind):
    n_pix = 60
    guide = np.abs(rng.standard_normal((n_pix, k)))
    cube = np.abs(rng.standard_normal((n_pix, k)))
    if kind == "shared-level":
        cube[:, 0] = guide[:, 0]
    elif kind == "duplicate-levels" and k > 1:
        guide[:, 1] = guide[:, 0]
        cube[:, 1] = cube[:, 0]
    elif kind == "exact-fit":
        cube = guide @ rng.random((k, k))
    elif kind == "scaled":
        guide *= 1e4
        cube *= 1e4
    m = np.hstack([guide, -cube])
    return m.T @ m / n_pix


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("kind", ["random", "shared-level", "duplicate-levels", "exact-fit", "scaled"])
@pytest.mark.parametrize("seed", range(4))
def test_qp_matches_brute_force_and_satisfies_kkt(k, kind, seed):
    q = random_q(np.random.default_rng(seed), k, kind)
    alpha, beta = solve_level_weights(q)
    assert alpha.shape == (k,) and beta.shape == (k,)
    kkt = level_weights_kkt(q, alpha, beta)
    scale = np.abs(q).max()
    assert kkt["primal"] <= 1e-12
    assert kkt["stationarity"] <= 1e-9 * scale
    assert kkt["dual"] <= 1e-9 * scale
    best = brute_force(q)
    assert kkt["objective"] <= best + 1e-10 * scale


def test_qp_no_worse_than_slsqp():
    rng = np.random.default_rng(7)
    q = random_q(rng, 4, "random")
    alpha, beta = solve_level_weights(q)
    cons = [{"type": "eq", "fun": lambda z: z[:4].sum() - 1}, {"type": "eq", "fun": lambda z: z[4:].sum() - 1}]
    ref = scipy.optimize.minimize(lambda z: z @ q @ z, np.full(8, 0.25), method="SLSQP",
                                  bounds=[(0, 1)] * 8, constraints=cons, options={"ftol": 1e-14})
    z = np.r_[alpha, beta]
    assert z @ q @ z <= ref.fun + 1e-12


def test_matrix_from_levels_and_weights(xp):
    rng = np.random.default_rng(8)
    guide_levels = rng.random((3, 9, 7))
    cube_levels = rng.random((3, 9, 7))
    m = np.hstack([guide_levels.reshape(3, -1).T, -cube_levels.reshape(3, -1).T])
    q = level_weights_matrix(xp.asarray(guide_levels), xp.asarray(cube_levels))
    assert isinstance(q, np.ndarray)
    np.testing.assert_allclose(q, m.T @ m / 63, rtol=1e-12)
    keep = rng.random((9, 7)) < 0.5
    qw = level_weights_matrix(xp.asarray(guide_levels), xp.asarray(cube_levels), xp.asarray(keep.astype(float)))
    mk = m[keep.ravel()]
    np.testing.assert_allclose(qw, mk.T @ mk / keep.sum(), rtol=1e-12)


def test_manual_weights_are_normalised():
    alpha, beta = manual_level_weights(([2, 0, 2], (1, 1, 2)), 3)
    np.testing.assert_allclose(alpha, [0.5, 0, 0.5])
    np.testing.assert_allclose(beta, [0.25, 0.25, 0.5])


@pytest.mark.parametrize(
    "weights, match",
    [
        (([1, 1], [1, 1, 1]), "alpha must have 3 entries"),
        (([1, 1, 1], [1, -1, 1]), "beta must be finite and non-negative"),
        (([0, 0, 0], [1, 1, 1]), "alpha must not be all zero"),
        (([1, np.nan, 1], [1, 1, 1]), "alpha must be finite"),
        ("manual", "weights must be"),
        ((1, 2, 3), "weights must be"),
    ],
)
def test_manual_weights_errors(weights, match):
    with pytest.raises(ValueError, match=match):
        manual_level_weights(weights, 3)
