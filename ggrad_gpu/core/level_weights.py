"""Level weights of paper eq. 9: a small QP over two probability simplices.

``min_{alpha, beta} mean((P~ alpha - G~ beta)^2)`` subject to ``alpha, beta >= 0``,
``sum(alpha) = sum(beta) = 1``, where the columns of ``P~`` and ``G~`` are the
upsampled per-level gradients of the guide and of the cube. With
``z = [alpha, beta]`` and ``M = [P~, -G~]`` this is ``min z^T Q z`` with
``Q = M^T M / N``, a convex QP in ``2K`` variables, solved exactly by a primal
active-set method (:func:`solve_level_weights`) whose KKT conditions
:func:`level_weights_kkt` reports.
"""

from __future__ import annotations

import functools

import numpy as np

from .._backend import array_module, to_host
from .._memory import block_rows, retry_smaller

__all__ = ["level_weights_kkt", "level_weights_matrix", "manual_level_weights", "solve_level_weights"]


def level_weights_matrix(guide_levels, cube_levels, weights=None) -> np.ndarray:
    """``Q = M^T M / N`` for ``M = [P~, -G~]``, in float64 on the host.

    Parameters
    ----------
    guide_levels, cube_levels : array, shape (K, rows, cols)
        Upsampled per-level gradients of the guide and of the cube.
    weights : array, shape (rows, cols), optional
        Pixel weights (0 drops a pixel); N is then their sum.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> guide_levels, cube_levels = rng.random((2, 4, 4)), rng.random((2, 4, 4))
    >>> m = np.concatenate([guide_levels.reshape(2, -1), -cube_levels.reshape(2, -1)]).T
    >>> bool(np.allclose(level_weights_matrix(guide_levels, cube_levels), m.T @ m / 16))
    True
    """
    xp = array_module(guide_levels=guide_levels, cube_levels=cube_levels, weights=weights)
    k = guide_levels.shape[0]
    guide_flat, cube_flat = guide_levels.reshape(k, -1), cube_levels.reshape(k, -1)
    w = None if weights is None else weights.reshape(-1)
    pixels = guide_flat.shape[1]
    q = xp.zeros((2 * k + 1, 2 * k + 1), dtype=xp.float64)

    def block(start, size):
        # The float64 columns of a block of pixels only (the whole 2K x N would
        # be 8 N K float64), their products summed on the device.
        stop = min(start + size, pixels)
        columns = xp.empty((2 * k + 1, stop - start), dtype=xp.float64)
        columns[:k] = guide_flat[:, start:stop]
        xp.negative(cube_flat[:, start:stop], out=columns[k : 2 * k], dtype=xp.float64)
        columns[2 * k] = 1.0 if w is None else xp.sqrt(w[start:stop].astype(xp.float64))
        if w is not None:
            columns[: 2 * k] *= columns[2 * k]
        q[...] += columns @ columns.T
        return stop

    size = block_rows((pixels, 2 * k + 1), 8, xp)
    start = 0
    while start < pixels:
        start, size = retry_smaller(functools.partial(block, start), size, stage="level weights (eq. 9)",
                                    unit="pixels", xp=xp)
    q = to_host(q)  # one read: the products and (last row, with weights) the pixel count
    count = pixels if w is None else float(q[2 * k, 2 * k])
    return q[: 2 * k, : 2 * k] / max(count, 1.0)


def solve_level_weights(q, *, max_iter: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact minimiser of ``z^T Q z`` over ``z = [alpha, beta]`` on two simplices.

    Parameters
    ----------
    q : array_like, shape (2K, 2K)
        Symmetric positive semi-definite (see :func:`level_weights_matrix`).
    max_iter : int, optional
        Bound on active-set iterations; default ``50 * 2K``.

    Returns
    -------
    alpha, beta : numpy.ndarray, shape (K,), float64
        Non-negative, each summing to 1.

    Notes
    -----
    Primal active set: from the feasible uniform weights, repeatedly solve the
    equality-constrained problem on the free variables (a KKT system, solved by
    least squares so that a singular ``Q`` is fine: the objective is bounded
    below, so the system is consistent), step back to the boundary when that
    solution leaves the simplex, and free the bound with the most negative
    multiplier when it does not. It ends when the KKT conditions hold, which
    for a convex QP certifies the global minimum.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> guide_levels = rng.random((2, 8, 8))
    >>> cube_levels = np.stack([rng.random((8, 8)), guide_levels[0]])  # cube level 1 = guide level 0
    >>> alpha, beta = solve_level_weights(level_weights_matrix(guide_levels, cube_levels))
    >>> np.round(alpha, 9) + 0.0, np.round(beta, 9) + 0.0
    (array([1., 0.]), array([0., 1.]))
    """
    q = np.asarray(q, dtype=np.float64)
    if q.ndim != 2 or q.shape[0] != q.shape[1] or q.shape[0] % 2 or q.shape[0] == 0:
        raise ValueError(f"q must be a square matrix of even size 2K; got shape {q.shape}")
    if not np.isfinite(q).all():
        raise ValueError("q must be finite (no NaN or inf)")
    q = 0.5 * (q + q.T)
    n = q.shape[0]
    k = n // 2
    group = np.repeat([0, 1], k)
    max_iter = 50 * n if max_iter is None else int(max_iter)
    scale = max(np.abs(q).max(), np.finfo(np.float64).tiny)
    tol = 1e3 * np.finfo(np.float64).eps

    z = np.full(n, 1.0 / k)
    fixed = np.zeros(n, dtype=bool)  # bounds z_j = 0 in the working set
    for _ in range(max_iter):
        free = np.flatnonzero(~fixed)
        y, multipliers = _equality_qp(q / scale, free, group)
        if (y >= -tol).all():
            z = np.zeros(n)
            z[free] = np.maximum(y, 0)
            z = _renormalise(z, group)
            bound_mult = (2 * (q / scale) @ z - multipliers[group])[fixed]
            if not fixed.any() or bound_mult.min() >= -tol:
                return z[:k].copy(), z[k:].copy()
            fixed[np.flatnonzero(fixed)[np.argmin(bound_mult)]] = False
            continue
        # Move towards y until the first free variable hits its bound.
        current = z[free]
        blocking = y < current
        ratios = np.where(blocking, current / np.where(blocking, current - y, 1.0), np.inf)
        step = min(1.0, ratios.min())
        z[free] = current + step * (y - current)
        hit = free[ratios <= step]
        z[hit] = 0
        fixed[hit] = True
    raise RuntimeError(f"level-weight QP did not converge in {max_iter} iterations")


def _equality_qp(q, free, group):
    """Minimise ``z^T Q z`` on ``free`` with each group's sum equal to 1.

    Returns the solution on ``free`` and the two multipliers of the sums.
    """
    m = free.size
    groups = np.zeros((2, m))
    groups[group[free], np.arange(m)] = 1
    kkt = np.zeros((m + 2, m + 2))
    kkt[:m, :m] = 2 * q[np.ix_(free, free)]
    kkt[:m, m:] = -groups.T
    kkt[m:, :m] = groups
    rhs = np.concatenate([np.zeros(m), [1.0, 1.0]])
    solution = np.linalg.lstsq(kkt, rhs, rcond=None)[0]
    return solution[:m], solution[m:]


def _renormalise(z, group):
    for g in (0, 1):
        z[group == g] /= z[group == g].sum()
    return z


def level_weights_kkt(q, alpha, beta) -> dict:
    """KKT residuals of ``(alpha, beta)`` for the eq. 9 QP with matrix ``q``.

    Returns
    -------
    dict
        ``primal`` (largest violation of ``z >= 0`` and the two sums),
        ``stationarity`` (largest ``|grad_j - lambda_g|`` where ``z_j > 0``),
        ``dual`` (largest ``lambda_g - grad_j`` where ``z_j == 0``: negative
        multipliers), ``objective``. The multiplier of each sum is the mean
        gradient over that group's positive entries.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> guide_levels = rng.random((2, 8, 8))
    >>> q = level_weights_matrix(guide_levels, np.stack([rng.random((8, 8)), guide_levels[0]]))
    >>> kkt = level_weights_kkt(q, *solve_level_weights(q))
    >>> sorted(kkt), kkt["primal"] < 1e-12, kkt["objective"] < 1e-12
    (['dual', 'objective', 'primal', 'stationarity'], True, True)
    >>> level_weights_kkt(q, [0.5, 0.5], [0.5, 0.5])["objective"] > 0.01  # uniform weights do worse
    True
    """
    q = np.asarray(q, dtype=np.float64)
    z = np.concatenate([np.asarray(alpha, float), np.asarray(beta, float)])
    k = z.size // 2
    group = np.repeat([0, 1], k)
    grad = 2 * q @ z
    positive = z > 1e-12
    stationarity, dual = 0.0, 0.0
    for g in (0, 1):
        on = (group == g) & positive
        off = (group == g) & ~positive
        lam = grad[on].mean()
        stationarity = max(stationarity, float(np.abs(grad[on] - lam).max()))
        if off.any():
            dual = max(dual, float((lam - grad[off]).max()))
    primal = max(
        float(max(0.0, -z.min())), abs(z[:k].sum() - 1), abs(z[k:].sum() - 1)
    )
    return {"primal": primal, "stationarity": stationarity, "dual": max(dual, 0.0), "objective": float(z @ q @ z)}


def manual_level_weights(weights, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """Validate user weights ``(alpha, beta)`` and divide each by its sum.

    Raises
    ------
    ValueError
        Naming ``weights`` when the pair is malformed, of the wrong length,
        negative, not finite or all zero.

    Examples
    --------
    >>> manual_level_weights(([1, 1, 2], [0, 0, 3]), 3)
    (array([0.25, 0.25, 0.5 ]), array([0., 0., 1.]))
    >>> manual_level_weights(([1, 1], [1, 1]), 3)
    Traceback (most recent call last):
        ...
    ValueError: weights: alpha must have 3 entries (one per level); got 2
    """
    try:
        alpha, beta = weights
    except (TypeError, ValueError):
        raise ValueError(
            f'weights must be "auto" or a pair (alpha, beta) of length-{levels} sequences; got {weights!r}'
        ) from None
    result = []
    for name, w in (("alpha", alpha), ("beta", beta)):
        w = np.asarray(to_host(w), dtype=np.float64).reshape(-1)
        if w.size != levels:
            raise ValueError(f"weights: {name} must have {levels} entries (one per level); got {w.size}")
        if not np.isfinite(w).all() or (w < 0).any():
            raise ValueError(f"weights: {name} must be finite and non-negative; got {w.tolist()}")
        if w.sum() <= 0:
            raise ValueError(f"weights: {name} must not be all zero")
        result.append(w / w.sum())
    return result[0], result[1]
