import numpy as np
import pytest
import scipy.optimize

from ggrad_gpu import gram_products, nnls_gram
from ggrad_gpu.core.nnls import GramAccumulator, _asymmetry, nnls_kkt_residual

from helpers import assert_backend, host


def objective(a, b, x):
    return float(np.sum((a @ x - b) ** 2))


def problem(rng, kind, m=120, n=25):
    a = rng.standard_normal((m, n))
    if kind == "gradient-like":
        a = np.abs(a) + 0.1
    elif kind == "duplicate":
        a[:, 3] = a[:, 1]
        a[:, 7] = a[:, 1]
    elif kind == "constant":
        a[:, 0] = 0.0
        a[:, 5] = 0.0
    elif kind == "dependent":
        a[:, 2] = a[:, 0] + 2 * a[:, 1]
    elif kind == "badly-scaled":
        a *= 10.0 ** rng.uniform(-6, 6, n)
    elif kind == "wide":
        a = rng.standard_normal((15, 40))  # more bands than pixels: rank deficient
    x_true = np.where(rng.random(a.shape[1]) < 0.4, rng.random(a.shape[1]), 0.0)
    b = a @ x_true + 0.3 * rng.standard_normal(a.shape[0]) * np.abs(a @ x_true).mean()
    return a, b


KINDS = ["random", "gradient-like", "duplicate", "constant", "dependent", "badly-scaled", "wide"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", range(6))
def test_nnls_reaches_the_optimum(kind, seed):
    rng = np.random.default_rng(seed)
    a, b = problem(rng, kind)
    x = nnls_gram(a.T @ a, a.T @ b)
    assert x.dtype == np.float64 and (x >= 0).all()
    x_scipy = scipy.optimize.nnls(a, b, maxiter=50 * a.shape[1])[0]
    # One-sided: SciPy's answer is not always optimal.
    assert objective(a, b, x) <= objective(a, b, x_scipy) + 1e-9 * max(objective(a, b, x_scipy), 1e-12 * (b @ b))
    kkt = nnls_kkt_residual(a.T @ a, a.T @ b, x)
    scale = np.linalg.norm(b)
    assert kkt["negative_x"] == 0
    assert kkt["dual"] <= 1e-8 * scale
    assert kkt["stationarity"] <= 1e-8 * scale
    assert kkt["complementarity"] <= 1e-8 * scale * np.abs(x).max(initial=1.0) * np.abs(a).max()


def test_nnls_exact_fit_and_all_negative():
    a = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    x = nnls_gram(a.T @ a, a.T @ (a @ [2.0, 3.0]))
    np.testing.assert_allclose(x, [2.0, 3.0], rtol=1e-12)
    np.testing.assert_array_equal(nnls_gram(a.T @ a, -a.T @ np.ones(3)), [0.0, 0.0])
    np.testing.assert_array_equal(nnls_gram(np.zeros((3, 3)), np.zeros(3)), np.zeros(3))


def test_nnls_accepts_device_gram(xp):
    rng = np.random.default_rng(4)
    a, b = problem(rng, "gradient-like")
    x = nnls_gram(xp.asarray(a.T @ a), xp.asarray(a.T @ b))
    assert isinstance(x, np.ndarray)
    np.testing.assert_allclose(x, nnls_gram(a.T @ a, a.T @ b))


@pytest.mark.parametrize(
    "gram, rhs, match",
    [
        (np.eye(3), np.ones(2), "rhs must have shape"),
        (np.ones((2, 3)), np.ones(2), "gram must be a square"),
        (np.full((2, 2), np.nan), np.ones(2), "finite"),
    ],
)
def test_nnls_rejects_bad_input(gram, rhs, match):
    with pytest.raises(ValueError, match=match):
        nnls_gram(gram, rhs)


@pytest.mark.parametrize("n", [1, 5, 255, 256, 257, 600])
def test_asymmetry_is_the_largest_difference_from_the_transpose(n):
    rng = np.random.default_rng(n)
    a = rng.standard_normal((n, n))
    gram = a + a.T
    assert _asymmetry(gram) == 0.0
    for i, j in [(0, n - 1), (n - 1, 0), (n // 2, n // 3), (n - 1, n - 1)]:  # across tiles, inside one, diagonal
        bent = gram.copy()
        bent[i, j] += 0.5 + i
        assert _asymmetry(bent) == np.abs(bent - bent.T).max()


@pytest.mark.parametrize("usable", ["all", "some"])
def test_nnls_leaves_its_float64_inputs_as_they_were(usable):
    rng = np.random.default_rng(7)
    a, b = problem(rng, "constant" if usable == "some" else "random")
    gram, rhs = a.T @ a, a.T @ b
    kept = gram.copy(), rhs.copy()
    x = nnls_gram(gram, rhs, ridge=1e-6)
    np.testing.assert_array_equal(gram, kept[0])
    np.testing.assert_array_equal(rhs, kept[1])
    # The same answer as from copies (the path a float32 or device input takes).
    np.testing.assert_array_equal(x, nnls_gram(gram.astype(np.float64, copy=True), rhs.copy(), ridge=1e-6))


def test_nnls_rejects_an_asymmetric_gram_and_inf():
    gram = np.eye(300)
    gram[3, 290] = 1.0
    with pytest.raises(ValueError, match="symmetric"):
        nnls_gram(gram, np.ones(300))
    with pytest.raises(ValueError, match="finite"):
        nnls_gram(np.diag([1.0, np.inf]), np.ones(2))
    with pytest.raises(ValueError, match="finite"):
        nnls_gram(np.eye(2), np.array([1.0, np.nan]))


@pytest.mark.parametrize("chunk_rows", [1, 7, 64, 10_000])
def test_gram_products_match_float64_products(xp, chunk_rows):
    rng = np.random.default_rng(5)
    a = rng.random((500, 12)).astype(np.float32)
    b = rng.random(500).astype(np.float32)
    gram, rhs = gram_products(xp.asarray(a), xp.asarray(b), chunk_rows=chunk_rows)
    assert_backend(gram, xp)
    assert gram.dtype == np.float64 and rhs.dtype == np.float64
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    np.testing.assert_allclose(host(gram), a64.T @ a64, rtol=1e-13)
    np.testing.assert_allclose(host(rhs), a64.T @ b64, rtol=1e-13)


def test_gram_accumulator_weights_drop_pixels():
    rng = np.random.default_rng(6)
    a, b = rng.random((50, 4)), rng.random(50)
    keep = rng.random(50) < 0.6
    acc = GramAccumulator(4)
    acc.add(a, b, weights=keep.astype(float))
    np.testing.assert_allclose(acc.gram, a[keep].T @ a[keep])
    np.testing.assert_allclose(acc.rhs, a[keep].T @ b[keep])


def test_gram_products_rejects_mismatch():
    with pytest.raises(ValueError, match="b must have shape"):
        gram_products(np.zeros((4, 2)), np.zeros(3))
    with pytest.raises(ValueError, match="a must be 2-D"):
        gram_products(np.zeros(4), np.zeros(4))


@pytest.mark.parametrize("kind", ["random", "duplicate", "dependent", "badly-scaled"])
def test_a_ridge_gives_the_optimum_of_the_ridged_problem(kind):
    rng = np.random.default_rng(11)
    a, b = problem(rng, kind)
    ridge = 1e-3
    gram = a.T @ a
    x = nnls_gram(gram, a.T @ b, ridge=ridge)
    # The same problem with the ridge as rows of A: sqrt(ridge * gram_ii) on the diagonal.
    stacked = np.vstack([a, np.diag(np.sqrt(ridge * np.diag(gram)))])
    target = np.concatenate([b, np.zeros(a.shape[1])])
    x_scipy = scipy.optimize.nnls(stacked, target, maxiter=50 * a.shape[1])[0]
    assert objective(stacked, target, x) <= objective(stacked, target, x_scipy) * (1 + 1e-9)
    np.testing.assert_allclose(x, x_scipy, rtol=1e-6, atol=1e-9 * np.abs(x_scipy).max())  # strictly convex: one answer


def test_a_ridge_makes_duplicate_columns_share_their_weight():
    a = np.random.default_rng(2).random((50, 2))
    a = np.hstack([a, a[:, :1]])  # column 2 repeats column 0
    b = a @ np.array([1.0, 0.5, 1.0])
    x = nnls_gram(a.T @ a, a.T @ b, ridge=1e-6)
    assert x[0] == pytest.approx(x[2], rel=1e-6) and x[0] + x[2] == pytest.approx(2.0, rel=1e-4)


@pytest.mark.parametrize("ridge", [-1e-6, float("nan"), float("inf"), "1e-6", True])
def test_nnls_rejects_a_bad_ridge(ridge):
    with pytest.raises(ValueError, match="ridge"):
        nnls_gram(np.eye(2), np.ones(2), ridge=ridge)


def test_float32_products_round_the_rhs_as_the_gram():
    """``A^T b`` rides in the Gram's product: summed row after row in float32 it drifted by 1e-4."""
    rng = np.random.default_rng(4)
    a = rng.random((200_000, 8), dtype=np.float32) + 1  # positive, as gradient magnitudes
    b = rng.random(200_000, dtype=np.float32) + 1
    acc = GramAccumulator(8, product_dtype=np.float32)
    acc.add(a, b, weights=np.ones(200_000, dtype=bool))
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    np.testing.assert_allclose(acc.gram, a64.T @ a64, rtol=2e-6)
    np.testing.assert_allclose(acc.rhs, a64.T @ b64, rtol=2e-6)
