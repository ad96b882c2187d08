"""Kernels against numpy/scipy oracles; serial vs parallel; on-disk cache; no-JIT mode."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import scipy.sparse as sp
from conftest import nested_design, random_design
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numpy.testing import assert_allclose

from lmmops.linalg import kernels

RTOL = 1e-12


def _nb(parallel):
    return kernels.n_blocks(parallel)


def _dense_parts(design):
    Zs = [design.indicator(k).toarray() for k in range(design.n_factors)]
    return Zs, np.hstack(Zs)


def _bincount_all(design, v):
    """Z'v by np.bincount, factor by factor."""
    return np.concatenate(
        [
            np.bincount(design.codes[k], weights=v, minlength=q)
            for k, q in enumerate(design.n_levels)
        ]
    )


def _cov_dense(design, s2e, s2):
    Zs, _ = _dense_parts(design)
    V = s2e * np.eye(design.n_obs)
    for k, Zk in enumerate(Zs):
        V += s2[k] * Zk @ Zk.T
    return V


def _run_all(design, rng, parallel, m=3):
    """Run every kernel once; return results and dense expectations."""
    codes, off, n, q = design.codes, design.offsets, design.n_obs, design.q
    nb = _nb(parallel)
    s2e, s2 = 0.7, rng.uniform(0.1, 2.0, design.n_factors)
    lam = rng.uniform(0.2, 3.0, design.n_factors)
    _, Z = _dense_parts(design)
    x, X = rng.standard_normal(n), rng.standard_normal((n, m))
    u, U = rng.standard_normal(q), rng.standard_normal((q, m))
    V = _cov_dense(design, s2e, s2)
    M = Z.T @ Z + np.diag(np.repeat(lam, design.n_levels))
    get = lambda name: kernels.get_kernel(name, parallel)  # noqa: E731
    res = {}
    out = np.empty(n)
    get("gather")(codes, off, u, out)
    res["gather"] = (out, Z @ u)
    out = np.empty((n, m))
    get("gather_block")(codes, off, U, out)
    res["gather_block"] = (out, Z @ U)
    out = np.empty(n)
    get("axpy_gather")(codes, off, x, 0.3, u, -1.7, out)
    res["axpy_gather"] = (out, 0.3 * x - 1.7 * (Z @ u))
    out = np.empty((n, m))
    get("axpy_gather_block")(codes, off, X, 0.3, U, -1.7, out)
    res["axpy_gather_block"] = (out, 0.3 * X - 1.7 * (Z @ U))
    out = np.empty(q)
    get("scatter")(codes, off, x, np.empty((nb, q)), out)
    res["scatter"] = (out, Z.T @ x)
    out = np.empty((q, m))
    get("scatter_block")(codes, off, X, np.empty((nb, q, m)), out)
    res["scatter_block"] = (out, Z.T @ X)
    out = np.empty(n)
    get("cov_matvec")(codes, off, x, s2e, s2, np.empty((nb, q)), out)
    res["cov_matvec"] = (out, V @ x)
    out = np.empty((n, m))
    get("cov_matmat")(codes, off, X, s2e, s2, np.empty((nb, q, m)), out)
    res["cov_matmat"] = (out, V @ X)
    out = np.empty(q)
    get("level_matvec")(codes, off, u, lam, np.empty((nb, q)), out)
    res["level_matvec"] = (out, M @ u)
    out = np.empty((q, m))
    get("level_matmat")(codes, off, U, lam, np.empty((nb, q, m)), out)
    res["level_matmat"] = (out, M @ U)
    return res


@pytest.mark.parametrize("name", sorted(kernels.KERNELS))
def test_kernel_matches_dense(name, design, parallel, rng):
    got, expected = _run_all(design, rng, parallel)[name]
    assert_allclose(got, expected, rtol=RTOL, atol=RTOL * np.abs(expected).max())


def test_scatter_matches_bincount(design_k3, parallel, rng):
    d = design_k3
    v = rng.standard_normal(d.n_obs)
    out = np.empty(d.q)
    kernels.get_kernel("scatter", parallel)(
        d.codes, d.offsets, v, np.empty((_nb(parallel), d.q)), out
    )
    assert_allclose(out, _bincount_all(d, v), rtol=RTOL, atol=1e-14)
    # single factor: codes[k:k+1] with offsets [0, q_k]
    k = 1
    out1 = np.empty(d.n_levels[k])
    kernels.get_kernel("scatter", parallel)(
        d.codes[k : k + 1],
        np.array([0, d.n_levels[k]]),
        v,
        np.empty((_nb(parallel), d.n_levels[k])),
        out1,
    )
    assert_allclose(out1, np.bincount(d.codes[k], weights=v), rtol=RTOL, atol=1e-14)


def test_gather_single_factor_is_take(design_k2, rng):
    d = design_k2
    u = rng.standard_normal(d.n_levels[0])
    out = np.empty(d.n_obs)
    kernels.gather_serial(d.codes[:1], np.array([0, d.n_levels[0]]), u, out)
    np.testing.assert_array_equal(out, u[d.codes[0]])


def test_serial_parallel_agree_large(rng):
    """Many rows, several blocks: the private-bin reduction matches the serial sums."""
    n, q = 200_003, (3_001, 17)
    codes = np.vstack([rng.integers(0, qq, n) for qq in q]).astype(np.int32)
    off = np.array([0, q[0], q[0] + q[1]], dtype=np.int64)
    x = rng.standard_normal(n)
    s2 = np.array([0.3, 1.7])
    outs = []
    variants = [
        (1, kernels.cov_matvec_serial),
        (max(2, _nb(True)), kernels.cov_matvec_parallel),
        (5, kernels.cov_matvec_parallel),
        (5, kernels.cov_matvec_serial),
    ]
    for nb, fn in variants:
        out = np.empty(n)
        fn(codes, off, x, 0.9, s2, np.empty((nb, off[-1])), out)
        outs.append(out)
    scale = np.abs(outs[0]).max()
    for out in outs[1:]:
        assert_allclose(out, outs[0], rtol=1e-12, atol=1e-12 * scale)
    sums = np.empty(off[-1])
    kernels.scatter_parallel(codes, off, x, np.empty((4, off[-1])), sums)
    ref = np.concatenate([np.bincount(codes[k], weights=x, minlength=q[k]) for k in range(2)])
    assert_allclose(sums, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["gather", "scatter", "cov_matvec", "level_matvec"])
def test_matmat_equals_matvec_columns(name, design_k3, parallel, rng):
    d = design_k3
    n, q, nb, m = d.n_obs, d.q, _nb(parallel), 4
    s2, lam = np.array([0.4, 1.1, 2.0]), np.array([0.5, 1.5, 3.0])
    vec = kernels.get_kernel(name, parallel)
    mat = kernels.get_kernel(
        {"gather": "gather_block", "scatter": "scatter_block"}.get(name)
        or name.replace("matvec", "matmat"),
        parallel,
    )
    n_in, n_out = {
        "gather": (q, n),
        "scatter": (n, q),
        "cov_matvec": (n, n),
        "level_matvec": (q, q),
    }[name]
    A = rng.standard_normal((n_in, m))
    extra = {"gather": (), "scatter": (), "cov_matvec": (0.7, s2), "level_matvec": (lam,)}[name]
    needs_work = name != "gather"
    got = np.empty((n_out, m))
    mat(d.codes, d.offsets, A, *extra, *((np.empty((nb, q, m)),) if needs_work else ()), got)
    for c in range(m):
        col = np.empty(n_out)
        vec(
            d.codes,
            d.offsets,
            np.ascontiguousarray(A[:, c]),
            *extra,
            *((np.empty((nb, q)),) if needs_work else ()),
            col,
        )
        assert_allclose(got[:, c], col, rtol=1e-13, atol=1e-13)


def test_kernel_registry():
    assert kernels.get_kernel("gather") is kernels.gather_serial
    assert kernels.get_kernel("gather", parallel=True) is kernels.gather_parallel
    with pytest.raises(KeyError, match="no kernel named 'nope'"):
        kernels.get_kernel("nope")
    assert kernels.n_blocks(False) == 1
    assert kernels.n_blocks(True) >= 1


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    q=st.lists(st.integers(2, 9), min_size=1, max_size=4),
    extra=st.integers(0, 40),
    missing=st.floats(0.0, 0.8),
    parallel=st.booleans(),
)
def test_property_random_designs(seed, q, extra, missing, parallel):
    rng = np.random.default_rng(seed)
    n_obs = max(q) + 1 + extra
    d = random_design(rng, n_levels=q, n_obs=n_obs, missing=missing)
    for name, (got, expected) in _run_all(d, rng, parallel, m=2).items():
        scale = max(1.0, np.abs(expected).max())
        assert_allclose(got, expected, rtol=RTOL, atol=RTOL * scale, err_msg=name)


def test_designs_have_edge_cases(design_k2, design_k3, rng):
    for d in (design_k2, design_k3):
        assert any((d.counts(k) == 1).any() for k in range(d.n_factors))
        assert all((d.counts(k) > 0).all() for k in range(d.n_factors))
    # missing cells in K = 2
    assert (design_k2.crosstab(0, 1).toarray() == 0).any()
    nd = nested_design(rng)
    assert (np.count_nonzero(nd.crosstab(1, 0).toarray(), axis=1) == 1).all()


# ------------------------------------------------------------------ subprocess checks
_CACHE_SCRIPT = textwrap.dedent(
    """
    import json
    import numpy as np
    from lmmops.linalg import kernels
    codes = np.array([[0, 1, 1, 2], [0, 0, 1, 1]], dtype=np.int32)
    off = np.array([0, 3, 5], dtype=np.int64)
    x = np.arange(4.0)
    stats = {}
    for name, fn in [("serial", kernels.cov_matvec_serial),
                     ("parallel", kernels.cov_matvec_parallel)]:
        out = np.empty(4)
        fn(codes, off, x, 1.0, np.array([1.0, 1.0]), np.empty((2, 5)), out)
        stats[name] = [sum(fn.stats.cache_hits.values()), sum(fn.stats.cache_misses.values())]
    stats["out"] = out.tolist()
    print(json.dumps(stats))
    """
)


def _run(script, **env):
    full_env = {**os.environ, **env}
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_numba_cache_hits(tmp_path):
    """Second process loads the serial and parallel kernels from NUMBA_CACHE_DIR."""
    env = {"NUMBA_CACHE_DIR": str(tmp_path)}
    first = json.loads(_run(_CACHE_SCRIPT, **env).strip().splitlines()[-1])
    second = json.loads(_run(_CACHE_SCRIPT, **env).strip().splitlines()[-1])
    assert first["serial"][1] >= 1  # compiled, then saved
    assert first["parallel"][1] >= 1
    assert second["serial"] == [1, 0], second
    assert second["parallel"] == [1, 0], second
    assert first["out"] == second["out"] == [1.0, 5.0, 10.0, 11.0]
    # serial and parallel variants have separate cache entries (not one shared file)
    names = {p.name for p in tmp_path.rglob("*.nbi")}
    assert any("_cov_matvec_parallel" in nm for nm in names), names
    assert any("_cov_matvec-" in nm for nm in names), names


def test_kernels_without_jit():
    """With NUMBA_DISABLE_JIT=1 the kernels run as plain Python and give the same answers."""
    script = textwrap.dedent(
        """
        import numpy as np
        from lmmops.linalg import kernels
        assert not hasattr(kernels.cov_matvec_serial, "py_func")
        rng = np.random.default_rng(0)
        codes = np.vstack([rng.integers(0, 4, 30), rng.integers(0, 3, 30)]).astype(np.int32)
        codes[0, :4] = np.arange(4); codes[1, :3] = np.arange(3)
        off = np.array([0, 4, 7], dtype=np.int64)
        Z = np.zeros((30, 7)); Z[np.arange(30), codes[0]] = 1; Z[np.arange(30), 4 + codes[1]] = 1
        s2 = np.array([0.5, 2.0]); x = rng.standard_normal(30); X = rng.standard_normal((30, 2))
        V = np.eye(30) * 0.3 + 0.5 * Z[:, :4] @ Z[:, :4].T + 2.0 * Z[:, 4:] @ Z[:, 4:].T
        lam = np.array([1.5, 0.25]); M = Z.T @ Z + np.diag(np.repeat(lam, [4, 3]))
        u = rng.standard_normal(7); U = rng.standard_normal((7, 2))
        for par in (False, True):
            nb = 3 if par else 1
            out = np.empty(30)
            kernels.get_kernel("cov_matvec", par)(codes, off, x, 0.3, s2, np.empty((nb, 7)), out)
            assert np.allclose(out, V @ x)
            out = np.empty((30, 2))
            work = np.empty((nb, 7, 2))
            kernels.get_kernel("cov_matmat", par)(codes, off, X, 0.3, s2, work, out)
            assert np.allclose(out, V @ X)
            out = np.empty(7)
            kernels.get_kernel("level_matvec", par)(codes, off, u, lam, np.empty((nb, 7)), out)
            assert np.allclose(out, M @ u)
            out = np.empty((7, 2))
            kernels.get_kernel("level_matmat", par)(codes, off, U, lam, np.empty((nb, 7, 2)), out)
            assert np.allclose(out, M @ U)
            out = np.empty(30)
            kernels.get_kernel("gather", par)(codes, off, u, out)
            assert np.allclose(out, Z @ u)
            out = np.empty((30, 2))
            kernels.get_kernel("gather_block", par)(codes, off, U, out)
            assert np.allclose(out, Z @ U)
            out = np.empty(7)
            kernels.get_kernel("scatter", par)(codes, off, x, np.empty((nb, 7)), out)
            assert np.allclose(out, Z.T @ x)
            out = np.empty((7, 2))
            kernels.get_kernel("scatter_block", par)(codes, off, X, np.empty((nb, 7, 2)), out)
            assert np.allclose(out, Z.T @ X)
        print("ok")
        """
    )
    assert _run(script, NUMBA_DISABLE_JIT="1").strip().endswith("ok")


@pytest.mark.parametrize("m", [1, 7])
@pytest.mark.parametrize("parallel", [False, True])
def test_csr_matmat_matches_scipy(parallel, m):
    import scipy.sparse as sp

    rng = np.random.default_rng(3)
    A = sp.random(300, 200, density=0.05, random_state=4, format="csr")
    A.sort_indices()
    X = rng.normal(size=(200, m))
    out = np.full((300, m), np.nan)
    kernels.get_csr_matmat(parallel)(A.indptr.astype(np.int64), A.indices.astype(np.int32),
                                     A.data.astype(np.float64), X, out)
    np.testing.assert_allclose(out, A @ X, rtol=1e-13, atol=1e-13)
    assert kernels.get_csr_matmat(parallel) is (
        kernels.csr_matmat_parallel if parallel else kernels.csr_matmat_serial)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("parallel", [False, True])
def test_dense_kernels_match_numpy(parallel, k):
    rng = np.random.default_rng(5)
    U = rng.normal(size=(301, 37))
    C = rng.normal(size=(37, k))
    T = rng.normal(size=(301, k))
    matmat, tmatmat = kernels.get_dense_kernels(parallel)
    out = np.full((301, k), np.nan)
    matmat(U, np.ascontiguousarray(C.T), out)
    np.testing.assert_allclose(out, U @ C, rtol=1e-12, atol=1e-12)
    outt = np.full((k, 37), np.nan)
    tmatmat(U, T, np.full((kernels.n_blocks(parallel), k, 37), np.nan), outt)
    np.testing.assert_allclose(outt, (U.T @ T).T, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("nb", [1, 2, 7])
def test_sym_matmat_reads_only_the_lower_triangle(parallel, k, nb):
    """out = A X from the lower triangle alone (the upper one is NaN), for any number of
    row blocks, including more blocks than the kernel has threads."""
    rng = np.random.default_rng(6)
    B = rng.normal(size=(203, 203))
    A = B + B.T
    X = rng.normal(size=(203, k))
    low = np.tril(A) + np.triu(np.full_like(A, np.nan), 1)
    sym = kernels.sym_matmat_parallel if parallel else kernels.sym_matmat_serial
    out = np.full((203, k), np.nan)
    sym(low, np.ascontiguousarray(X.T), np.full((nb, k, 203), np.nan), out)
    np.testing.assert_allclose(out, A @ X, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("parallel", [False, True])
def test_csr_matmat_skewed_rows_and_empty_rows(parallel, m):
    """Rows split into blocks of equal nnz: one row holding most of the entries, empty
    rows at the start, in the middle and at the end, more blocks than non-empty rows,
    and an all-zero matrix are all covered exactly once."""
    rng = np.random.default_rng(8)
    counts = np.zeros(150, dtype=np.int64)
    counts[[3, 4, 70, 71, 140]] = [4000, 2, 1, 30, 5]
    rows = np.repeat(np.arange(150), counts)
    A = sp.csr_matrix((rng.normal(size=rows.size), (rows, rng.integers(0, 90, rows.size))),
                      shape=(150, 90))
    X = rng.normal(size=(90, m))
    kern = kernels.get_csr_matmat(parallel)
    for B in (A, sp.csr_matrix((150, 90)), A[:5]):
        out = np.full((B.shape[0], m), np.nan)
        kern(B.indptr.astype(np.int64), B.indices.astype(np.int32), B.data, X, out)
        np.testing.assert_allclose(out, B @ X, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("parallel", [False, True])
def test_csr_residual_matches_scipy(parallel):
    """out = scale * (b - A x), fused, on a skewed matrix with empty rows, float32 data
    (the count tables' storage) and an all-zero matrix; out may be a view of b."""
    rng = np.random.default_rng(9)
    counts = np.zeros(120, dtype=np.int64)
    counts[[0, 5, 6, 60, 119]] = [900, 3, 1, 40, 7]
    rows = np.repeat(np.arange(120), counts)
    A = sp.csr_matrix((rng.integers(1, 4, rows.size).astype(np.float32),
                       (rows, rng.integers(0, 80, rows.size))), shape=(120, 80))
    x, b, scale = rng.normal(size=80), rng.normal(size=120), rng.uniform(0.5, 2.0, 120)
    kern = kernels.csr_residual_parallel if parallel else kernels.csr_residual_serial
    for B in (A, sp.csr_matrix((120, 80))):
        out = np.full(120, np.nan)
        kern(B.indptr, B.indices, B.data, x, b, scale, out)
        np.testing.assert_allclose(out, scale * (b - B @ x), rtol=1e-13, atol=1e-13)
    inplace = b.copy()
    kern(A.indptr, A.indices, A.data, x, inplace, scale, inplace)
    np.testing.assert_allclose(inplace, scale * (b - A @ x), rtol=1e-13, atol=1e-13)


def _sorted_csr(rng, q1, r, density):
    N = sp.random(q1, r, density=density, random_state=rng, format="csr",
                  data_rvs=lambda k: rng.integers(1, 4, k).astype(float))
    N.sum_duplicates()
    N.sort_indices()
    return N, (N.indptr.astype(np.int64), N.indices.astype(np.int64), N.data)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(q1=st.integers(1, 40), r=st.integers(1, 25), density=st.floats(0.0, 1.0),
       seed=st.integers(0, 2**31 - 1))
def test_schur_fill_and_trace_match_dense(q1, r, density, seed):
    """The exact solver's Schur block from N's transpose index equals
    ``T (A - N' diag(w) N) T + I`` densely (upper triangle only written), and the trace
    kernel equals ``sum(S o T N'diag(w)N T)`` for a symmetric S given by its upper triangle."""
    rng = np.random.default_rng(seed)
    N, arrays = _sorted_csr(rng, q1, r, density)
    ptr, rows, pos = kernels.csr_column_positions(arrays[0], arrays[1], r)
    # the index is the transpose: column b's nonzeros, rows increasing
    Nc = N.tocsc()
    Nc.sort_indices()
    assert_allclose(ptr, Nc.indptr)
    assert np.array_equal(rows, Nc.indices)
    assert np.array_equal(arrays[1][pos], np.repeat(np.arange(r), np.diff(ptr)))
    w = rng.random(q1)
    scale = rng.random(r) + 0.1
    A = sp.random(r, r, density=0.3, random_state=rng)
    A = (A + A.T + sp.diags(rng.random(r) + r)).tocsr()
    Au = sp.triu(A, format="csr")
    Au.sort_indices()
    c = 2
    RN = rng.normal(size=(r, c))
    Sxx = rng.normal(size=(c, c))
    out = np.full((r + c, r + c), np.pi)
    kernels.schur_fill_rows(*arrays, ptr, rows, pos, w, Au.indptr.astype(np.int64),
                            Au.indices.astype(np.int64), Au.data, scale, RN, Sxx, out)
    G = N.T.toarray() @ (w[:, None] * N.toarray())
    ref = np.empty((r + c, r + c))
    ref[:r, :r] = scale[:, None] * (A.toarray() - G) * scale[None, :] + np.eye(r)
    ref[:r, r:] = scale[:, None] * RN
    ref[r:, r:] = Sxx
    iu, il = np.triu_indices(r + c), np.tril_indices(r + c, -1)
    assert_allclose(out[iu], ref[iu], rtol=1e-13, atol=1e-12)
    assert np.all(out[il] == np.pi)  # the other triangle is not touched
    S = rng.normal(size=(r, r))
    S = S + S.T
    got = kernels.schur_trace_rows(*arrays, ptr, rows, pos, w, scale, np.triu(S))
    want = float(np.sum(S * (scale[:, None] * G * scale[None, :])))
    assert_allclose(got, want, rtol=1e-12, atol=1e-12 * max(1.0, np.abs(S).sum() * G.max()))
