"""Non-negative least squares from the Gram matrix (paper eq. 5).

``min_{x >= 0} ||A x - b||^2`` only needs ``A^T A`` (bands x bands) and
``A^T b``, which are accumulated over pixel chunks in float64
(:class:`GramAccumulator`, :func:`gram_products`) with bounded memory. The
solver (:func:`nnls_gram`) is the Lawson-Hanson active-set method in the
Gram form of Bro and De Jong (1997): exact. :func:`nnls_kkt_residual` measures
how far a solution is from the KKT conditions (a diagnostic for callers and
tests; the solver's active-set loop ends only where they hold).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import scipy.linalg

from .._backend import array_module, to_host
from .._memory import block_rows, default_block_bytes

__all__ = ["GramAccumulator", "gram_products", "nnls_gram", "nnls_kkt_residual", "rounding_ridge"]


def spurious_blas_flags_ignored():
    """Silence NumPy's "invalid value encountered in matmul" around BLAS calls.

    Some OpenBLAS kernels leave the floating-point invalid flag set on finite
    input (numpy/numpy#24067), which NumPy reports as a RuntimeWarning. The
    callers check their input for NaN and inf first, so the flag is noise.

    Examples
    --------
    >>> import numpy as np
    >>> with spurious_blas_flags_ignored():
    ...     inside = np.geterr()["invalid"]
    >>> inside, np.geterr()["invalid"] == "ignore"  # restored on the way out
    ('ignore', False)
    """
    return np.errstate(invalid="ignore")


# The products' buffer (the rows with the target as one more column) takes this share of the
# block budget (4 MiB on the CPU: 1048 rows of 1000 bands, near the float32 SYRK's full rate), or
# PROMOTE_SHARE where float32 rows are promoted to float64 (2 MiB): it stays small beside the
# gradients it comes from (estimate_global_gradient's peak: tests/test_memory.py).
COPY_SHARE = 2
PROMOTE_SHARE = 4

# The ridge that makes a nearly singular eq. 5 give one answer, in units of the products' rounding.
RIDGE_ULPS = 64


def rounding_ridge(dtype) -> float:
    """The relative ridge for :func:`nnls_gram` of a Gram matrix whose products are in ``dtype``.

    ``RIDGE_ULPS`` units of ``dtype``'s rounding: 7.6e-6 for float32, 1.4e-14
    for float64. Products in float32 differ in their last bits with the blocks
    (or chunks, or BLAS kernels) they share a call with: about 5e-7 of
    ``sqrt(G_ii G_jj)`` on eq. 5's matrices. Where the Gram matrix is nearly
    singular (a denoised cube's bands span a few components: condition
    numbers of 1e11 to 1e16), the exact NNLS optimum of each rounded matrix
    lies elsewhere along the directions the data hardly determine, and the
    registration that follows can move by 4e-3 px. A ridge some fifteen
    times that rounding bounds those moves. Measured on the nearly singular
    phantom of the tests (320 x 384 x 64, denoised): six random
    perturbations of 5e-7 moved the refined matrix by 2.3e-5 to 3.1e-4 px
    (without a ridge, two of six by 3.6e-3 and 3.8e-3 px; with 256 units, by
    at most 5.2e-5 px); chunked and in-memory refine, 7.9e-5 px apart (seeds
    0-2 of the same phantom: 3.9e-5 to 1.3e-4 px). Each ridge moves some
    case across one of the pipeline's discrete choices (which bands a fit
    keeps): this one moves that phantom by 3.5e-3 px from the float64
    products' answer and the demo by 2.5e-5 px; 256 units moved the demo by
    0.018 px, 1024 units changed a well-conditioned 4-band fit by 2.7e-4 of
    its maximum.

    Examples
    --------
    >>> import numpy as np
    >>> 5e-6 < rounding_ridge(np.float32) < 1e-5, rounding_ridge(np.float64) < 1e-13
    (True, True)
    """
    return RIDGE_ULPS * float(np.finfo(np.dtype(dtype)).eps)


class GramAccumulator:
    """Running ``A^T A`` and ``A^T b`` over row chunks of ``A``, summed in float64.

    Parameters
    ----------
    bands : int
        Number of columns of ``A``.
    xp : module
        Array module (NumPy or CuPy) the chunks live in; the sums stay there.
    product_dtype : dtype, default float64
        Precision of each chunk's products. float64 makes every product exact
        (a float32 product fits in float64); float32 runs at the float32 GEMM
        rate, and with short chunks summed in float64 the Gram's relative error
        stays near 1e-7, far below what moves the NNLS optimum (the tests check
        the objective against a float64 reference).

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> a, b = rng.random((6, 3)), rng.random(6)
    >>> acc = GramAccumulator(3)
    >>> acc.add(a[:4], b[:4]); acc.add(a[4:], b[4:])  # two chunks of rows
    >>> bool(np.allclose(acc.gram, a.T @ a)), bool(np.allclose(acc.rhs, a.T @ b))
    (True, True)
    >>> acc = GramAccumulator(3); acc.add(a, b, weights=np.array([1.0, 1, 1, 1, 0, 0]))  # a mask
    >>> bool(np.allclose(acc.gram, a[:4].T @ a[:4]))
    True
    """

    def __init__(self, bands: int, xp=np, product_dtype=np.float64):
        self.xp = xp
        self.product_dtype = np.dtype(product_dtype)
        self.gram = xp.zeros((bands, bands), dtype=xp.float64)
        self.rhs = xp.zeros(bands, dtype=xp.float64)

    def add(self, columns, target, weights=None) -> None:
        """Add a chunk: ``columns`` (..., bands) and ``target`` (...), same leading shape.

        ``weights`` (same shape as ``target``, optional) multiplies each pixel's
        row and target; a weight of 0 drops the pixel (masks). The rows go
        through one buffer of ``product_dtype``, a block at a time (half the
        block budget of :func:`ggrad_gpu._memory.block_rows`; a quarter of it
        where float32 rows are promoted to float64), with the target as one more
        column: one product (a SYRK) gives ``A^T A`` and ``A^T b`` with the same
        rounding. Apart, ``A^T b`` is a matrix-vector product that BLAS sums
        row after row, and in float32 its rounding grew with the rows (1e-4 of
        the sum over 1e5 pixels, where the SYRK's blocked sums stay near 5e-7).
        """
        xp, bands = self.xp, self.gram.shape[0]
        a = columns.reshape(-1, bands)
        b = target.reshape(-1)
        w = None if weights is None else weights.reshape(-1)
        kept = None
        if w is not None and xp is np:
            # A row of weight 0 adds nothing but its ~bands**2 flops: a partial field's margin
            # was half a tile's level-0 rows. (On a GPU, finding them costs a device sync.)
            kept = np.flatnonzero(w)
            if kept.size == w.size:
                kept = None
            else:
                b, w = b[kept], w[kept]
        count = a.shape[0] if kept is None else kept.size
        share = PROMOTE_SHARE if self.product_dtype.itemsize > a.dtype.itemsize else COPY_SHARE
        step = block_rows((count, bands + 1), self.product_dtype.itemsize, xp,
                          target_bytes=default_block_bytes(xp) // share)
        buffer = xp.empty((min(step, count), bands + 1), dtype=self.product_dtype)
        products = xp.zeros((bands + 1, bands + 1), dtype=xp.float64)
        for start in range(0, count, step):
            rows = slice(start, start + step)
            part = buffer[: min(step, count - start)]
            if kept is None:
                part[:, :bands] = a[rows]
            else:  # the kept rows gathered a buffer at a time: no copy of the whole chunk
                part[:, :bands] = a[kept[rows]]
            part[:, bands] = b[rows]
            if w is not None:
                part *= w[rows].astype(self.product_dtype)[:, None]
            # ``part.T @ part`` on one buffer is a SYRK in NumPy: half the flops of a GEMM.
            with spurious_blas_flags_ignored():
                products += part.T @ part
        # Products first, sums last: a chunk that runs out of memory (and is
        # retried smaller) has added nothing.
        self.gram += products[:bands, :bands]
        self.rhs += products[:bands, bands]


def gram_products(a, b, *, chunk_rows: int | None = None):
    """``A^T A`` and ``A^T b`` in float64, ``chunk_rows`` rows of ``A`` at a time.

    Parameters
    ----------
    a : array, shape (pixels, bands)
    b : array, shape (pixels,)
    chunk_rows : int, optional
        Rows promoted to float64 at once; memory stays ``O(chunk_rows * bands)``.
        Default: a block of float64 rows near the block budget
        (:func:`ggrad_gpu._memory.block_rows`: 8 MiB on the CPU, up to 256 MiB
        on a GPU, where small products would be launch-bound).

    Returns
    -------
    gram : array, shape (bands, bands), float64
    rhs : array, shape (bands,), float64
        In the input's array module.

    Examples
    --------
    >>> import numpy as np
    >>> from ggrad_gpu import gram_products
    >>> a, b = np.arange(6.0).reshape(3, 2), np.ones(3)
    >>> gram, rhs = gram_products(a, b)
    >>> bool(np.allclose(gram, a.T @ a)), rhs.tolist()
    (True, [6.0, 9.0])
    """
    xp = array_module(a=a, b=b)
    if a.ndim != 2:
        raise ValueError(f"a must be 2-D (pixels, bands); got shape {tuple(a.shape)}")
    if b.shape != a.shape[:1]:
        raise ValueError(f"b must have shape ({a.shape[0]},) to match a; got {tuple(b.shape)}")
    if chunk_rows is None:
        chunk_rows = block_rows(a.shape, 8, xp)
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be positive; got {chunk_rows}")
    acc = GramAccumulator(a.shape[1], xp)
    for start in range(0, a.shape[0], chunk_rows):
        acc.add(a[start : start + chunk_rows], b[start : start + chunk_rows])
    return acc.gram, acc.rhs


def nnls_gram(gram, rhs, *, max_iter: int | None = None, ridge: float = 0.0):
    """Exact non-negative least squares from the normal equations.

    Solves ``min_{x >= 0} x^T G x - 2 r^T x``, i.e. ``min_{x >= 0} ||A x - b||^2``
    with ``G = A^T A`` and ``r = A^T b``, by the Lawson-Hanson active-set method
    (Bro and De Jong's Gram form).

    Parameters
    ----------
    gram : array, shape (bands, bands)
        Symmetric positive semi-definite ``A^T A`` (NumPy or CuPy; solved on the
        host in float64, since the active-set loop is sequential and small).
    rhs : array, shape (bands,)
        ``A^T b``.
    max_iter : int, optional
        Bound on inner iterations; default ``30 * bands``.
    ridge : float, default 0
        Adds ``ridge * diag(gram)`` to the diagonal: the exact minimiser of
        ``||A x - b||^2 + ridge * sum_i gram_ii x_i^2``, unique for any
        ``ridge > 0`` (:func:`rounding_ridge` gives one from the products'
        precision). 0 solves the problem as given.

    Returns
    -------
    x : numpy.ndarray, shape (bands,), float64
        The minimiser, ``x >= 0``.

    Raises
    ------
    ValueError, TypeError
        Naming ``gram``, ``rhs`` or ``max_iter``: complex or non-numeric
        values, NaN or inf, an empty or non-square ``gram``, one that is not
        symmetric (to 1e-5 of its largest entry) or has a negative diagonal
        (not positive semi-definite), an ``rhs`` of the wrong length, a
        ``max_iter`` below 1.

    Notes
    -----
    Columns are scaled to unit norm first (``D G D`` with ``D = diag(G)^-1/2``),
    which makes the method insensitive to bands of very different magnitude;
    all-zero columns (constant bands) get weight 0. A variable enters the
    passive set only if its gradient exceeds a tolerance relative to
    ``max |D r|``, which stops duplicate or dependent columns from entering,
    so the passive-set systems stay well posed for rank-deficient ``A``.

    Examples
    --------
    >>> import numpy as np
    >>> from ggrad_gpu import nnls_gram
    >>> a = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    >>> b = np.array([2.0, -1.0, 1.0])
    >>> nnls_gram(a.T @ a, a.T @ b).round(6)
    array([1.5, 0. ])
    """
    gram, rhs = to_host(gram), to_host(rhs)
    for name, value in (("gram", gram), ("rhs", rhs)):
        if value.dtype.kind not in "biuf":
            raise TypeError(f"{name} must be a real numeric array; got dtype {value.dtype}")
    # Read only from here on (the scaled copy below is new): a float64 input is not copied.
    gram, rhs = gram.astype(np.float64, copy=False), rhs.astype(np.float64, copy=False)
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"gram must be a square 2-D matrix; got shape {gram.shape}")
    if gram.shape[0] == 0:
        raise ValueError(f"gram must not be empty; got shape {gram.shape}")
    if rhs.shape != gram.shape[:1]:
        raise ValueError(f"rhs must have shape ({gram.shape[0]},) to match gram; got {rhs.shape}")
    # The largest magnitude is NaN or inf exactly where some entry is: one pass checks both.
    largest = float(np.abs(gram).max())
    if not (math.isfinite(largest) and np.isfinite(rhs).all()):
        raise ValueError("gram and rhs must be finite (no NaN or inf)")
    if _asymmetry(gram) > 1e-5 * largest:
        raise ValueError("gram must be symmetric (a Gram matrix A^T A)")
    if (np.diag(gram) < 0).any():
        raise ValueError(
            f"gram must be positive semi-definite; its diagonal has negative entries {np.diag(gram).min():g}"
        )
    bands = rhs.shape[0]
    if max_iter is not None and (isinstance(max_iter, bool) or not isinstance(max_iter, (int, np.integer))
                                 or max_iter < 1):
        raise ValueError(f"max_iter must be None or an integer >= 1; got {max_iter!r}")
    max_iter = 30 * bands if max_iter is None else int(max_iter)
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float, np.integer, np.floating)) \
            or not (0 <= ridge < np.inf):
        raise ValueError(f"ridge must be a finite number >= 0; got {ridge!r}")

    diag = np.diag(gram)
    usable = diag > np.finfo(np.float64).tiny
    x = np.zeros(bands)
    if not usable.any():
        return x
    scale = 1.0 / np.sqrt(diag[usable])
    # D G D, each entry (G_ij s_i) s_j; without a gather where every band is usable (the rule).
    g = gram * scale[:, None] if usable.all() else gram[np.ix_(usable, usable)] * scale[:, None]
    g *= scale[None, :]
    if ridge:
        g[np.diag_indices_from(g)] += ridge  # the unit diagonal's share: ridge * diag(gram) unscaled
    r = rhs[usable] * scale
    x[usable] = _lawson_hanson(g, r, max_iter) * scale
    return x


def _asymmetry(gram, tile: int = 256) -> float:
    """``max |G - G^T|``, a square tile at a time (a whole transposed read runs at a fraction of the copy rate)."""
    n = gram.shape[0]
    worst = 0.0
    for i in range(0, n, tile):
        for j in range(i + tile, n, tile):  # tiles above the diagonal; a diagonal tile against itself below
            above, below = gram[i : i + tile, j : j + tile], gram[j : j + tile, i : i + tile]
            worst = max(worst, float(np.abs(above - below.T).max()))
        block = gram[i : i + tile, i : i + tile]
        worst = max(worst, float(np.abs(block - block.T).max()))
    return worst


def _lawson_hanson(g, r, max_iter):
    """Lawson-Hanson on a Gram matrix with unit diagonal."""
    n = r.shape[0]
    tol = 10 * n * np.finfo(np.float64).eps * max(np.abs(r).max(), np.finfo(np.float64).tiny)
    x = np.zeros(n)
    passive = np.zeros(n, dtype=bool)
    refused = np.zeros(n, dtype=bool)  # numerically dependent on the passive set, for now
    w = r.copy()
    iterations = 0
    while True:
        candidates = ~passive & ~refused & (w > tol)
        if not candidates.any():
            break
        entering = int(np.argmax(np.where(candidates, w, -np.inf)))
        passive[entering] = True
        first = True
        while True:
            iterations += 1
            if iterations > max_iter:
                warnings.warn(
                    f"nnls_gram stopped after max_iter={max_iter} iterations; "
                    "the result may not be optimal",
                    RuntimeWarning,
                    stacklevel=3,
                )
                return x
            idx = np.flatnonzero(passive)
            z = _solve_passive(g[np.ix_(idx, idx)], r[idx])
            blocking = z <= 0
            if not blocking.any():
                x[:] = 0
                x[idx] = z
                refused[:] = False
                break
            if first and blocking[np.searchsorted(idx, entering)]:
                # In exact arithmetic the entering variable always moves up; if it
                # cannot, its column is (numerically) in the span of the passive ones.
                passive[entering] = False
                refused[entering] = True
                break
            first = False
            # Step from x towards z until the first passive variable reaches 0;
            # every passive x is > 0 here, so the ratios are well defined.
            current = x[idx]
            ratios = current[blocking] / (current[blocking] - z[blocking])
            step = ratios.min()
            x[idx] = current + step * (z - current)
            leaving = idx[blocking][ratios <= step]
            leaving = np.union1d(leaving, idx[x[idx] <= 0])
            x[leaving] = 0
            passive[leaving] = False
        # x is zero off the passive set: only its rows of g enter (p of n, p mostly a few dozen;
        # rows, not columns: g is symmetric and its rows are contiguous).
        support = np.flatnonzero(x)
        w = r - x[support] @ g[support]
    return x


def _solve_passive(g, r):
    """Solve the passive-set normal equations, by Cholesky or least squares if singular."""
    try:
        factor = scipy.linalg.cho_factor(g, lower=True, check_finite=False)
        z = scipy.linalg.cho_solve(factor, r, check_finite=False)
        if np.isfinite(z).all():
            return z
    except np.linalg.LinAlgError:
        pass
    return scipy.linalg.lstsq(g, r, check_finite=False)[0]


def nnls_kkt_residual(gram, rhs, x) -> dict:
    """How far ``x`` is from the NNLS optimality (KKT) conditions.

    With the gradient ``w = rhs - gram @ x`` (half the negative gradient of the
    objective), an optimum has ``x >= 0``, ``w <= 0`` where ``x == 0`` and
    ``w == 0`` where ``x > 0``. Values are scaled by ``sqrt(diag(gram))`` so
    that they are comparable across bands of different magnitude.

    Returns
    -------
    dict
        ``negative_x`` (most negative entry of x, 0 if none), ``dual`` (largest
        positive ``w`` on the active set), ``stationarity`` (largest ``|w|`` on
        the passive set), ``complementarity`` (largest ``|x * w|``).

    Examples
    --------
    >>> import numpy as np
    >>> from scipy.optimize import nnls
    >>> rng = np.random.default_rng(0)
    >>> a, b = rng.random((20, 3)), rng.random(20)
    >>> x = nnls(a, b)[0]  # SciPy's optimum satisfies the KKT conditions
    >>> max(nnls_kkt_residual(a.T @ a, a.T @ b, x).values()) < 1e-8
    True
    >>> nnls_kkt_residual(a.T @ a, a.T @ b, np.zeros(3))["dual"] > 0.1  # x = 0 is no optimum here
    True
    """
    gram = to_host(gram).astype(np.float64)
    rhs = to_host(rhs).astype(np.float64)
    x = to_host(x).astype(np.float64)
    norms = np.sqrt(np.maximum(np.diag(gram), 0))
    safe = np.where(norms > 0, norms, 1.0)
    w = (rhs - gram @ x) / safe
    active = x <= 0
    return {
        "negative_x": float(max(0.0, -x.min())),
        "dual": float(max(0.0, w[active].max())) if active.any() else 0.0,
        "stationarity": float(np.abs(w[~active]).max()) if (~active).any() else 0.0,
        "complementarity": float(np.abs(x * safe * w).max()),
    }
