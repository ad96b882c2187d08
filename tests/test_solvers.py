"""Tests of lmmops.linalg.krylov: scipy-identical cg, block CG, Lanczos coefficients, solve_V.

Also runs the doctests of docs/embedding.rst.
"""

import doctest
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as spla
from conftest import SEED, random_design
from numpy.testing import assert_allclose
from scipy.sparse.linalg import LinearOperator

from lmmops.data.design import CrossedDesign
from lmmops.data.simulate import simulate_codes
from lmmops.linalg.krylov import block_cg, cg, cg_lanczos
from lmmops.linalg.operators import CovarianceOperator, SparseLevelOperator
from lmmops.linalg.preconditioners import build
from lmmops.linalg.solve import solve_V

ROOT = Path(__file__).resolve().parents[1]


def _spd(rng, n, cond=100.0):
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return (Q * np.geomspace(1.0, cond, n)) @ Q.T


class _Counting(LinearOperator):
    """Counts matvec and matmat calls of a dense SPD matrix."""

    def __init__(self, A):
        super().__init__(dtype=np.float64, shape=A.shape)
        self.A = A
        self.calls = {"vec": 0, "mat": 0}

    def _matvec(self, x):
        self.calls["vec"] += 1
        return self.A @ x

    def _matmat(self, X):
        self.calls["mat"] += 1
        return self.A @ X

    def _adjoint(self):
        return self


# ------------------------------------------------------------------ cg == scipy cg
@pytest.mark.parametrize(
    "opts",
    [
        {},
        {"rtol": 1e-10},
        {"rtol": 0.0, "atol": 1e-6},
        {"rtol": 1e-12, "maxiter": 7},
        {"rtol": 1e-9, "x0": "random"},
        {"rtol": 1e-9, "M": "jacobi"},
    ],
    ids=["default", "rtol", "atol", "maxiter", "x0", "precond"],
)
def test_cg_matches_scipy(opts, rng):
    n = 40
    A = _spd(rng, n) + np.diag(rng.uniform(0, 50, n))
    b = rng.standard_normal(n)
    opts = dict(opts)
    if opts.get("x0") == "random":
        opts["x0"] = rng.standard_normal(n)
    if opts.get("M") == "jacobi":
        opts["M"] = np.diag(1 / np.diag(A))
    ours_it, theirs_it = [], []
    x, info = cg(A, b, callback=lambda xk: ours_it.append(xk.copy()), **opts)
    y, info_s = spla.cg(A, b, callback=lambda xk: theirs_it.append(xk.copy()), **opts)
    assert info == info_s
    assert len(ours_it) == len(theirs_it)
    scale = np.abs(y).max()
    assert_allclose(x, y, rtol=0, atol=1e-9 * scale)  # same recurrences, summation order
    assert_allclose(ours_it[0], theirs_it[0], rtol=0, atol=1e-12 * scale)


def test_cg_residuals_and_edge_cases(rng):
    A = _spd(rng, 20)
    b = rng.standard_normal(20)
    res = []
    x, info = cg(A, b, rtol=1e-8, residuals=res)
    assert info == 0
    assert res[0] == pytest.approx(np.linalg.norm(b))
    assert res[-1] < 1e-8 * np.linalg.norm(b) <= res[-2]
    x, info = cg(A, np.zeros(20))
    assert info == 0
    assert not x.any()
    x, info = cg(sp.csr_matrix(A), b[:, None], rtol=1e-10)
    assert x.shape == (20,)
    assert info == 0
    x, info = cg(A, b, rtol=1e-14, maxiter=2)
    assert info == 2
    with pytest.raises(ValueError, match="shape"):
        cg(A, np.ones(3))


# ------------------------------------------------------------------ block CG
def test_block_cg_columns_converge_independently(rng):
    n = 50
    A = _spd(rng, n, cond=1e3)
    B = rng.standard_normal((n, 4))
    B[:, 1] = 0.0  # a zero column is solved at once
    B[:, 2] = A @ np.eye(n)[:, 0]  # converges faster than the others
    op = _Counting(A)
    res = []
    X, info = block_cg(op, B, rtol=1e-10, residuals=res)
    assert info.tolist() == [0, 0, 0, 0]
    assert_allclose(A @ X, B, atol=1e-8 * np.abs(B).max())
    assert not X[:, 1].any()
    assert op.calls["vec"] == 0
    assert op.calls["mat"] == len(res) - 1
    per_col = (np.array(res[1:]) > 0).sum(axis=0)  # iterations each column stayed active
    assert per_col[1] == 0
    assert per_col[2] < per_col[0]
    for j in (0, 3):
        xj, _ = cg(A, B[:, j], rtol=1e-10)
        assert_allclose(X[:, j], xj, rtol=1e-8, atol=1e-12)


def test_block_cg_matches_cg_with_preconditioner_and_maxiter(rng):
    n = 30
    A = _spd(rng, n, cond=1e4)
    B = rng.standard_normal((n, 3))
    P = np.diag(1 / np.diag(A))
    X, info = block_cg(A, B, rtol=1e-9, M=P)
    for j in range(3):
        xj, _ = cg(A, B[:, j], rtol=1e-9, M=P)
        assert_allclose(X[:, j], xj, rtol=1e-10, atol=1e-12)
    X, info = block_cg(A, B, rtol=1e-14, maxiter=3)
    assert info.tolist() == [3, 3, 3]
    x1, info1 = block_cg(A, B[:, 0], rtol=1e-9)
    assert x1.shape == (n,)
    assert info1.tolist() == [0]


# ------------------------------------------------------------------ Lanczos / SLQ
def test_slq_with_unit_probes_is_slogdet(rng):
    n = 25
    A = _spd(rng, n, cond=50.0)
    X, info, lz = cg_lanczos(A, np.eye(n), rtol=1e-14, maxiter=n)
    assert_allclose(lz.quadrature(np.log).sum(), np.linalg.slogdet(A)[1], rtol=1e-9)
    # e'f(A)e for another f: the inverse gives the diagonal of A^{-1}
    assert_allclose(lz.quadrature(lambda w: 1 / w), np.diag(np.linalg.inv(A)), rtol=1e-8)


def test_preconditioned_lanczos_quadrature_is_the_dense_one(rng):
    n = 30
    A = _spd(rng, n, cond=50.0)  # well conditioned: no loss of orthogonality in n steps
    B = rng.standard_normal((n, 2))
    d = np.diag(A).copy()
    P = np.diag(1 / d)
    X, info, lz = block_cg(A, B, rtol=1e-13, maxiter=n, M=P, return_lanczos=True)
    # (b'Pb) e1' log(T) e1 = (P^1/2 b)' log(P^1/2 A P^1/2) (P^1/2 b)
    S = np.diag(1 / np.sqrt(d))
    w, Q = np.linalg.eigh(S @ A @ S)
    for j in range(2):
        v = S @ B[:, j]
        exact = v @ (Q * np.log(w)) @ Q.T @ v
        assert_allclose(lz.quadrature(np.log)[j], exact, rtol=1e-8)
        assert lz.norms2[j] == pytest.approx(B[:, j] @ P @ B[:, j])


# ------------------------------------------------------------------ solve_V
@pytest.fixture
def V_small(rng):
    while True:
        d = random_design(rng, n_levels=(9, 6), n_obs=90, missing=0.4)
        if d.is_connected:
            return CovarianceOperator(d, 1.3, [0.5, 2.0])


@pytest.mark.parametrize(
    ("method", "pre"),
    [("auto", None), ("level", "proportional"), ("level", "jacobi"), ("level", "amg"),
     ("observation", None), ("observation", "spectral")],
)
def test_solve_V_matches_dense(V_small, method, pre):
    b = np.random.default_rng(1).standard_normal(V_small.shape[0])
    x, info = solve_V(V_small, b, method=method, preconditioner=pre, rtol=1e-10)
    assert_allclose(x, np.linalg.solve(V_small.todense(), b), rtol=1e-7, atol=1e-9)
    assert info.converged
    assert info.iterations >= 1
    assert info.residual_norm == pytest.approx(np.linalg.norm(b - V_small @ x), rel=1e-6)
    assert info.residual_norm <= 1e-10 * np.linalg.norm(b) * 1.01
    assert info.method.startswith("level" if method != "observation" else "observation")


def test_solve_V_auto_route_blocks_and_zero_variance(rng, design_k3):
    V = CovarianceOperator(design_k3, 0.7, [0.5, 0.0, 1.5])
    B = rng.standard_normal((V.shape[0], 3))
    B[:, 1] = 0.0
    X, info = solve_V(V, B, rtol=1e-9)
    assert info.method == "level:block_gauss_seidel"
    assert_allclose(X, np.linalg.solve(V.todense(), B), rtol=1e-6, atol=1e-9)
    X2, info2 = solve_V(V, B, rtol=1e-9, level_operator="kernel", method="auto")
    assert_allclose(X2, X, rtol=1e-6, atol=1e-9)
    V0 = CovarianceOperator(design_k3, 2.0, [0.0, 0.0, 0.0])
    x, info = solve_V(V0, B[:, 0])
    assert info.method == "diagonal"
    assert_allclose(x, B[:, 0] / 2.0)
    with pytest.raises(ValueError, match="method"):
        solve_V(V, B[:, 0], method="dense")
    with pytest.raises(ValueError, match="shape"):
        solve_V(V, B[:3, 0])


def test_solve_V_direct_many_right_hand_sides(rng, design_k3):
    """method='direct': V^{-1} B to rounding for every column, no iterations, the residual
    measured on V; zero variances are dropped first (down to one factor, where M is
    diagonal); options it cannot use are refused."""
    V = CovarianceOperator(design_k3, 0.7, [0.5, 2.0, 1.5])
    B = rng.standard_normal((V.shape[0], 5))
    X, info = solve_V(V, B, method="direct", rtol=1e-12)
    assert_allclose(X, np.linalg.solve(V.todense(), B), rtol=1e-10, atol=1e-12)
    assert (info.method, info.iterations, info.converged) == ("direct:schur", 0, True)
    assert info.residual_norm == pytest.approx(np.linalg.norm(B - V @ X, axis=0).max())
    V1 = CovarianceOperator(design_k3, 0.7, [0.0, 2.0, 0.0])
    x, info = solve_V(V1, B[:, 0], method="direct", rtol=1e-12)
    assert_allclose(x, np.linalg.solve(V1.todense(), B[:, 0]), rtol=1e-10, atol=1e-12)
    assert info.converged
    with pytest.raises(ValueError, match="no preconditioner"):
        solve_V(V, B, method="direct", preconditioner="jacobi")
    with pytest.raises(ValueError, match="max_dense"):
        solve_V(V, B, method="direct", max_dense=3)


def test_solve_V_medium_zipf_iterations_and_residual():
    codes = simulate_codes(30_000, [3000, 400], zipf=[1.0, 1.0], seed=SEED)
    V = CovarianceOperator(CrossedDesign.from_codes(codes), 1.0, [1.0, 1.0])
    b = np.random.default_rng(0).standard_normal(V.shape[0])
    x, info = solve_V(V, b, rtol=1e-6)
    assert info.iterations <= 12
    assert info.residual_norm <= 1e-6 * np.linalg.norm(b)
    x2, info2 = solve_V(V, b, method="observation", rtol=1e-6)
    assert info2.iterations <= 3
    assert_allclose(x2, x, rtol=1e-4, atol=1e-6 * np.abs(x).max())


def test_sparse_level_operator(V_small):
    M = V_small.level_space()
    S = SparseLevelOperator(M)
    X = np.random.default_rng(2).standard_normal((M.shape[0], 2))
    assert_allclose(S @ X, M @ X, rtol=1e-12)
    assert_allclose(S @ X[:, 0], M @ X[:, 0], rtol=1e-12)
    P = build(M, kind="block_gauss_seidel")
    u, info = cg(S, X[:, 0], rtol=1e-10, M=P.aspreconditioner())
    assert info == 0


# ------------------------------------------------------------------ docs
def test_embedding_docs_run():
    path = ROOT / "docs" / "embedding.rst"
    result = doctest.testfile(
        str(path), module_relative=False,
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
    )
    assert result.attempted > 0
    assert result.failed == 0
