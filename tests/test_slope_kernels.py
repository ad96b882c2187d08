"""The random-slope solvers' kernels against dense / scipy oracles: A formed on C's
block-closed pattern, the fused block-Jacobi block PCG, the gradient's per-probe sums,
warm-started gradient evaluations, the Powell-symmetric-Broyden update, and the exact
solver's Schur block and first-term inverse blocks."""

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from lmmops.data.simulate import simulate_slopes
from lmmops.errors import ArgumentError
from lmmops.estimation.vector import vector_statistics
from lmmops.estimation.vector_iterative import VectorIterativeObjective, _psb
from lmmops.linalg import kernels, krylov

# two terms: 7 levels of (1 + x) (rows 0-13), 5 levels of (1) (rows 14-18)
OFFS = np.array([0, 14, 19], dtype=np.int64)
DIMS = np.array([2, 1], dtype=np.int64)


def _blockdiag(blocks_per_term):
    """Dense blockdiag of per-term (n_l, d, d) blocks."""
    mats = [sp.block_diag(list(B)) for B in blocks_per_term]
    return sp.block_diag(mats).toarray()


def _closed_C(seed=0):
    """A random block-closed SPD C for OFFS / DIMS (from a random Z with dense x)."""
    rng = np.random.default_rng(seed)
    n = 60
    g, h = rng.integers(0, 7, n), rng.integers(0, 5, n)
    x = rng.normal(size=n)
    Z = np.zeros((n, 19))
    Z[np.arange(n), 2 * g] = 1.0
    Z[np.arange(n), 2 * g + 1] = x
    Z[np.arange(n), 14 + h] = 1.0
    C = sp.csr_matrix(Z.T @ Z)
    C.sort_indices()
    return C


def test_block_closed_detects_open_patterns():
    C = _closed_C()
    ip, ind = C.indptr.astype(np.int64), C.indices.astype(np.int32)
    assert kernels.block_closed(ip, ind, OFFS, DIMS)
    # drop one entry of a (1 + x) x (1) block: no longer closed
    D = C.toarray()
    r, c = 1, 14 + int(np.flatnonzero(D[1, 14:])[0])
    D[r, c] = D[c, r] = 0.0
    Co = sp.csr_matrix(D)
    Co.sort_indices()
    assert not kernels.block_closed(Co.indptr.astype(np.int64),
                                    Co.indices.astype(np.int32), OFFS, DIMS)
    # a missing diagonal block is not closed either
    E = np.eye(19)
    E[18, 18] = 0.0
    Ce = sp.csr_matrix(E)
    assert not kernels.block_closed(Ce.indptr.astype(np.int64),
                                    Ce.indices.astype(np.int32), OFFS, DIMS)


def test_block_chunks_start_on_blocks():
    ch = kernels.block_chunks(OFFS, DIMS, 5)
    assert ch[0] == 0
    assert ch[-1] == 19
    assert np.all(np.diff(ch) > 0)
    starts = set(range(0, 14, 2)) | set(range(14, 19))
    assert set(ch[:-1].tolist()) <= starts
    C = _closed_C()
    chn = kernels.block_chunks(OFFS, DIMS, 4, C.indptr)
    assert set(chn[:-1].tolist()) <= starts
    assert chn[-1] == 19


@pytest.mark.parametrize("parallel", [False, True])
def test_lam_sandwich_is_lambda_c_lambda_plus_identity(parallel):
    C = _closed_C(1)
    T1 = np.array([[0.9, 0.0], [-0.3, 0.4]])
    T2 = np.array([[0.7]])
    Lam = _blockdiag([np.repeat(T1[None], 7, 0), np.repeat(T2[None], 5, 0)])
    oracle = Lam.T @ C.toarray() @ Lam + np.eye(19)
    Tp = np.zeros((2, 2, 2))
    Tp[0] = T1
    Tp[1, :1, :1] = T2
    out = np.empty(C.nnz)
    ks = kernels.get_slope_kernels(parallel)
    ks["lam_sandwich"](C.indptr.astype(np.int64), C.indices.astype(np.int32), C.data,
                       OFFS, DIMS, Tp, kernels.block_chunks(OFFS, DIMS, 3), out)
    A = sp.csr_matrix((out, C.indices, C.indptr), shape=C.shape).toarray()
    np.testing.assert_allclose(A, oracle, rtol=1e-13, atol=1e-13)


def test_merge_values_onto_a_larger_pattern():
    C = _closed_C(2)
    P = sp.csr_matrix(np.ones((19, 19)))
    out = np.full(P.nnz, np.nan)
    kernels.get_slope_kernels(False)["merge_values"](
        C.indptr.astype(np.int64), C.indices.astype(np.int32), C.data,
        P.indptr.astype(np.int64), P.indices.astype(np.int32), out)
    np.testing.assert_array_equal(out.reshape(19, 19), C.toarray())


def _spd_blocks(rng):
    """Random SPD inverse blocks for OFFS / DIMS and their rows Dr."""
    D1 = rng.normal(size=(7, 2, 2))
    D1 = np.einsum("jab,jcb->jac", D1, D1) + np.eye(2)
    D2 = rng.uniform(0.5, 2.0, size=(5, 1, 1))
    Dr = np.zeros((19, 2))
    Dr[:14] = D1.reshape(14, 2)
    Dr[14:, :1] = D2.reshape(5, 1)
    return [D1, D2], Dr


@pytest.mark.parametrize("parallel", [False, True])
def test_bj_apply_and_fused_update(parallel):
    rng = np.random.default_rng(3)
    Ds, Dr = _spd_blocks(rng)
    Dense = _blockdiag(Ds)
    ks = kernels.get_slope_kernels(parallel)
    ch = kernels.block_chunks(OFFS, DIMS, 4)
    R = rng.normal(size=(19, 3))
    Z = np.empty_like(R)
    ks["bj_apply"](Dr, OFFS, DIMS, R, Z, ch)
    np.testing.assert_allclose(Z, Dense @ R, rtol=1e-14)
    X, P, AP = rng.normal(size=(3, 19, 3))
    a = rng.normal(size=3)
    X0, R0 = X.copy(), R.copy()
    partial = np.empty((ch.size - 1, 2, 3))
    ks["cg_update_bj"](X, R, P, AP, Z, Dr, OFFS, DIMS, a, ch, partial)
    Rn = R0 - AP * a
    np.testing.assert_allclose(X, X0 + P * a, rtol=1e-14)
    np.testing.assert_allclose(R, Rn, rtol=1e-14)
    np.testing.assert_allclose(Z, Dense @ Rn, rtol=1e-13)
    np.testing.assert_allclose(partial[:, 0].sum(0), np.einsum("ij,ij->j", Rn, Dense @ Rn),
                               rtol=1e-12)
    np.testing.assert_allclose(partial[:, 1].sum(0), (Rn * Rn).sum(0), rtol=1e-12)
    b = rng.normal(size=3)
    P0 = P.copy()
    ks["cg_direction_z"](P, Z, b, ch)
    np.testing.assert_allclose(P, Z + P0 * b, rtol=1e-14)


def test_block_pcg_blocks_solves_and_matches_the_general_path():
    rng = np.random.default_rng(4)
    C = _closed_C(4)
    A = C.toarray() + np.eye(19)
    # the block-Jacobi inverse blocks of A
    D1 = np.linalg.inv(np.stack([A[2 * j:2 * j + 2, 2 * j:2 * j + 2] for j in range(7)]))
    D2 = 1.0 / np.diag(A)[14:].reshape(5, 1, 1)
    Dr = np.zeros((19, 2))
    Dr[:14], Dr[14:, :1] = D1.reshape(14, 2), D2.reshape(5, 1)
    M = _blockdiag([D1, D2])
    B = rng.normal(size=(19, 4))
    rec = np.array([False, True, True, False])
    X, info = krylov.block_pcg(A, B, blocks=(Dr, OFFS, DIMS), rtol=1e-12, record=rec)
    np.testing.assert_allclose(X, np.linalg.solve(A, B), rtol=1e-9, atol=1e-10)
    assert info["converged"].all()
    Xg, ig = krylov.block_pcg(A, B, M=M, rtol=1e-12, record=rec)
    for c in (1, 2):  # the same CG coefficients as the general path (Lanczos quadrature)
        n_it = min(len(info["alpha"][c]), len(ig["alpha"][c]))
        assert n_it >= 3
        np.testing.assert_allclose(info["alpha"][c][:n_it], ig["alpha"][c][:n_it],
                                   rtol=1e-8)
        np.testing.assert_allclose(info["norms2"][c], ig["norms2"][c], rtol=1e-12)
    # a warm start at the solution of a nearby system: fewer iterations, same solution
    A2 = A + 1e-4 * np.diag(np.diag(A))
    Xw, iw = krylov.block_pcg(A2, B, blocks=(Dr, OFFS, DIMS), rtol=1e-10, x0=X)
    Xc, ic = krylov.block_pcg(A2, B, blocks=(Dr, OFFS, DIMS), rtol=1e-10)
    np.testing.assert_allclose(Xw, np.linalg.solve(A2, B), rtol=1e-7, atol=1e-8)
    assert iw["iterations"] < ic["iterations"]
    with pytest.raises(ArgumentError):
        krylov.block_pcg(A, B, blocks=(Dr, OFFS, DIMS), record=rec, x0=X)
    with pytest.raises(ArgumentError):
        krylov.block_pcg(A, B, blocks=(Dr, OFFS, DIMS), M=M)


@pytest.mark.parametrize("parallel", [False, True])
def test_pair_sums(parallel):
    rng = np.random.default_rng(5)
    m = 3
    G = rng.normal(size=(19, 2 * m))
    W, E = rng.normal(size=(2, 19, m))
    ks = kernels.get_slope_kernels(parallel)
    for lo, nl, d in ((0, 7, 2), (14, 5, 1)):
        ch = np.array([0, 2, nl], dtype=np.int64)
        work = np.empty((2, d, d, m))
        ks["pair_sums"](G, W, E, lo, nl, d, m, ch, work)
        gw = G[lo:lo + nl * d, :m].reshape(nl, d, m)
        ge = G[lo:lo + nl * d, m:].reshape(nl, d, m)
        ek = E[lo:lo + nl * d].reshape(nl, d, m)
        wk = W[lo:lo + nl * d].reshape(nl, d, m)
        oracle = np.einsum("lai,lbi->abi", gw, ek) + np.einsum("lai,lbi->abi", ge, wk)
        np.testing.assert_allclose(work.sum(0), oracle, rtol=1e-12)


def _objective_with_open_pattern():
    """A design where one level of the slope term has x = 0 on all its rows: C has no
    entries in that level's x row, so its pattern is not block-closed."""
    terms, X, y = simulate_slopes(1500, [40, 15], slopes=[True, False], seed=11)
    rows = terms[0].codes == 3
    terms[0].values[rows, 1] = 0.0
    X[rows, 1] = 0.0
    return terms, X, y


def test_open_pattern_is_closed_and_A_is_exact():
    terms, X, y = _objective_with_open_pattern()
    _, C, _, _, _ = vector_statistics(terms, X, y)
    it = VectorIterativeObjective(terms, X, y, n_probes=8, seed=2)
    assert not kernels.block_closed(C.indptr.astype(np.int64), C.indices.astype(np.int32),
                                    it._offs, it._dims)
    assert it._indices.size > C.nnz
    theta = np.array([0.9, 0.2, 0.5, 0.8])
    Ts = [t.relative_factor(theta[sl]) for t, sl in zip(it.terms, it.layout)]
    Lam = sp.block_diag([sp.kron(sp.identity(t.n_levels), T) for t, T in zip(it.terms, Ts)])
    oracle = (Lam.T @ C @ Lam).toarray() + np.eye(it.q)
    U = np.random.default_rng(0).normal(size=(it.q, 3))
    np.testing.assert_allclose(it._A(Ts, U), oracle @ U, rtol=1e-12, atol=1e-12)


def test_warm_gradient_equals_the_cold_one():
    terms, X, y = simulate_slopes(2000, [60, 25], slopes=[True, False], seed=3)
    it = VectorIterativeObjective(terms, X, y, n_probes=8, seed=1)
    theta = np.array([0.9, 0.2, 0.5, 0.8])
    it.evaluate(theta)
    near = theta + np.array([1e-4, 0.0, 0.0, 0.0])
    warm = it.evaluate(near, warm=True)
    cold = it.evaluate(near)
    assert np.isnan(warm.objective)
    assert np.isfinite(cold.objective)
    assert warm.cg_converged
    assert warm.cg_iterations < cold.cg_iterations
    np.testing.assert_allclose(warm.gradient, cold.gradient, rtol=1e-6,
                               atol=1e-6 * np.max(np.abs(cold.gradient)))


def test_psb_update_is_symmetric_and_secant():
    rng = np.random.default_rng(6)
    H = np.array([[4.0, 1.0, 0.0], [1.0, 3.0, 0.5], [0.0, 0.5, 2.0]])
    s, yv = rng.normal(size=(2, 3))
    Hn = _psb(H, s, yv)
    np.testing.assert_allclose(Hn, Hn.T, atol=1e-14)
    np.testing.assert_allclose(Hn @ s, yv, rtol=1e-12)
    np.testing.assert_array_equal(_psb(H, np.zeros(3), yv), H)


# ---------------------------------------------------------------- the exact solver's
@settings(max_examples=25, deadline=None)
@given(d=st.integers(1, 3), levels=st.integers(1, 9), m=st.integers(1, 12),
       density=st.floats(0.05, 0.9), seed=st.integers(0, 2**31 - 1),
       parallel=st.booleans(), shared=st.booleans())
def test_sandwich_blocks_read_only_the_upper_triangle(d, levels, m, density, seed,
                                                       parallel, shared):
    """``out[j] += K_j S K_j'`` against dense products, with the strict lower triangle
    of ``S`` set to NaN (the kernel must read ``S[r, c]``, ``c >= r``, only); with
    ``shared`` the rows of a level have the same columns (the two-column fast path)."""
    rng = np.random.default_rng(seed)
    if shared:
        mask = np.repeat(rng.random((levels, m)) < density, d, axis=0)
        K = sp.csr_matrix(np.where(mask, rng.normal(size=(levels * d, m)), 0.0))
    else:
        K = sp.random(levels * d, m, density=density, random_state=rng, format="csr")
    K.sort_indices()
    R = rng.normal(size=(m, m))
    S = R @ R.T
    U = np.triu(S) + np.tril(np.full((m, m), np.nan), -1)
    out = rng.normal(size=(levels, d, d))
    want = out.copy()
    Kd = K.toarray().reshape(levels, d, m)
    want += np.einsum("jam,mn,jbn->jab", Kd, S, Kd)
    kernels.get_schur_kernels(parallel)[1](K.indptr, K.indices, K.data, U, d, out)
    np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("parallel", [False, True])
def test_schur_rows_is_m22_plus_identity_minus_a21_k(parallel):
    rng = np.random.default_rng(7)
    M22 = sp.random(6, 6, density=0.4, random_state=rng, format="csr")
    A21 = sp.random(6, 9, density=0.3, random_state=rng, format="csr")
    K = sp.random(9, 6, density=0.3, random_state=rng, format="csr")
    K.sort_indices()
    S = np.full((6, 6), np.nan)
    kernels.get_schur_kernels(parallel)[0](M22.indptr, M22.indices, M22.data, A21.indptr,
                                           A21.indices, A21.data, K.indptr, K.indices,
                                           K.data, S)
    want = M22.toarray() + np.eye(6) - A21.toarray() @ K.toarray()
    np.testing.assert_allclose(S, want, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("parallel", [False, True])
def test_block_rows_left_multiply_is_blockdiag_times_m(parallel):
    """``blockdiag_j(B_j) M`` on ``M``'s pattern, for rows that come in groups of
    ``d`` sharing their columns (one group per level)."""
    rng = np.random.default_rng(11)
    d, levels, m = 2, 6, 9
    mask = np.repeat(rng.random((levels, m)) < 0.4, d, axis=0)
    mask[:, 0] = True  # every level has a column
    dense = np.where(mask, rng.normal(size=(levels * d, m)), 0.0)
    rows, cols = np.nonzero(mask)
    M = sp.csr_matrix((dense[rows, cols], (rows, cols)), shape=dense.shape)
    B = rng.normal(size=(levels, d, d))
    out = np.empty(M.nnz)
    kernels.get_block_rows_kernel(parallel)(M.indptr.astype(np.int64), M.data, B, d, out)
    got = sp.csr_matrix((out, M.indices, M.indptr), shape=M.shape).toarray()
    want = sp.block_diag(list(B)).toarray() @ dense
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-13)
