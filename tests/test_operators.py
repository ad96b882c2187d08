"""Operators against dense oracles (via the OperatorChecks mixin) and their identities."""

import numpy as np
import pytest
import scipy.sparse as sps
import scipy.sparse.linalg as spla
from conftest import SEED, nested_design, random_design
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.testing import assert_allclose

from lmmops.errors import DenseTooLargeError
from lmmops.linalg import operators
from lmmops.linalg.operators import (
    CovarianceOperator,
    GramOperator,
    LevelSpaceOperator,
    RandomEffectsAdjointOperator,
    RandomEffectsOperator,
)
from lmmops.testing import OperatorChecks, assert_operator_matches_dense


def _k2():
    return random_design(np.random.default_rng(SEED), n_levels=(7, 5), n_obs=60, missing=0.5)


def _k3():
    return random_design(
        np.random.default_rng(SEED + 1), n_levels=(6, 5, 4), n_obs=50, missing=0.3
    )


def _nested():
    return nested_design(np.random.default_rng(SEED + 2))


def _dense_V(design, s2e, s2):
    """V from dense indicator matrices, independent of the operator code."""
    V = s2e * np.eye(design.n_obs)
    for k in range(design.n_factors):
        Zk = np.zeros((design.n_obs, design.n_levels[k]))
        Zk[np.arange(design.n_obs), design.codes[k]] = 1.0
        V += s2[k] * Zk @ Zk.T
    return V


def _dense_Z(design):
    Z = np.zeros((design.n_obs, design.q))
    for k in range(design.n_factors):
        Z[np.arange(design.n_obs), design.offsets[k] + design.codes[k]] = 1.0
    return Z


# ------------------------------------------------------------------ mixin-based classes
class _ZChecks(OperatorChecks):
    make_design = staticmethod(_k2)
    k = 0
    parallel = False

    def create_operator(self):
        return RandomEffectsOperator(self.make_design(), self.k, parallel=self.parallel)

    def dense(self, op):
        Z = _dense_Z(op.design)
        if self.k is None:
            return Z
        k = op.design.index(self.k)
        return Z[:, op.design.offsets[k] : op.design.offsets[k + 1]]


class TestRandomEffectsK2First(_ZChecks):
    pass


class TestRandomEffectsK3ByNameParallel(_ZChecks):
    make_design = staticmethod(_k3)
    k = "f3"
    parallel = True


class TestRandomEffectsAllFactors(_ZChecks):
    make_design = staticmethod(_nested)
    k = None


class TestRandomEffectsAdjoint(OperatorChecks):
    def create_operator(self):
        return RandomEffectsOperator(_k3(), 1, parallel=True).H

    def dense(self, op):
        d = op.design
        return _dense_Z(d)[:, d.offsets[1] : d.offsets[2]].T


class TestGramOperatorSerial(OperatorChecks):
    symmetric = True

    def create_operator(self):
        return GramOperator(_k3(), parallel=False)

    def dense(self, op):
        Z = _dense_Z(op.design)
        return Z.T @ Z


class TestGramOperatorParallel(TestGramOperatorSerial):
    def create_operator(self):
        return GramOperator(_k3(), parallel=True)


class _VChecks(OperatorChecks):
    symmetric = True
    positive_definite = True
    make_design = staticmethod(_k2)
    sigma2_e = 0.8
    sigma2 = (1.3, 0.4)
    parallel = False

    def create_operator(self):
        return CovarianceOperator(
            self.make_design(), self.sigma2_e, self.sigma2, parallel=self.parallel
        )

    def dense(self, op):
        return _dense_V(op.design, self.sigma2_e, self.sigma2)


class TestCovarianceK2Serial(_VChecks):
    pass


class TestCovarianceK2Parallel(_VChecks):
    parallel = True


class TestCovarianceK3Serial(_VChecks):
    make_design = staticmethod(_k3)
    sigma2 = (0.5, 2.0, 0.25)


class TestCovarianceK3Parallel(_VChecks):
    make_design = staticmethod(_k3)
    sigma2 = (0.5, 2.0, 0.25)
    parallel = True


class TestCovarianceNestedZeroVariance(_VChecks):
    make_design = staticmethod(_nested)
    sigma2 = (0.0, 3.0)


class TestCovarianceLargeVariances(_VChecks):
    """Ill-conditioned V (variance ratio 1e6)."""

    sigma2_e = 1e-3
    sigma2 = (1e3, 10.0)
    tolerances = {"matvec": 1e-11, "matmat": 1e-11}


class _MChecks(OperatorChecks):
    symmetric = True
    positive_definite = True
    make_design = staticmethod(_k3)
    lambdas = (0.5, 2.0, 4.0)
    parallel = False

    def create_operator(self):
        return LevelSpaceOperator(
            self.make_design(), self.lambdas, sigma2_e=1.7, parallel=self.parallel
        )

    def dense(self, op):
        Z = _dense_Z(op.design)
        return Z.T @ Z + np.diag(np.repeat(self.lambdas, op.design.n_levels))


class TestLevelSpaceK3Serial(_MChecks):
    pass


class TestLevelSpaceK3Parallel(_MChecks):
    parallel = True


class TestLevelSpaceK2(_MChecks):
    make_design = staticmethod(_k2)
    lambdas = (0.1, 10.0)


# ------------------------------------------------------------------ V specifics
def test_cg_on_V(design_k3, parallel, rng):
    s2 = [0.6, 1.2, 0.3]
    V = CovarianceOperator(design_k3, 0.5, s2, parallel=parallel)
    b = rng.standard_normal(design_k3.n_obs)
    x, info = spla.cg(V, b, rtol=1e-12, atol=0.0)
    assert info == 0
    assert_allclose(x, np.linalg.solve(_dense_V(design_k3, 0.5, s2), b), rtol=1e-9, atol=1e-10)


def test_V_matmat_column_blocks(design_k2, monkeypatch, rng):
    """Column blocking (used to bound the scratch memory) gives the same answer."""
    V = CovarianceOperator(design_k2, 1.0, [0.5, 2.0], parallel=True)
    X = rng.standard_normal((design_k2.n_obs, 7))
    full = V @ X
    monkeypatch.setattr(operators, "_WORK_LIMIT_BYTES", 8 * design_k2.q * 2)
    assert_allclose(V @ X, full, rtol=1e-14, atol=1e-14)
    assert_allclose(full, _dense_V(design_k2, 1.0, [0.5, 2.0]) @ X, rtol=1e-12, atol=1e-12)


def test_V_attributes_and_repr(design_k2):
    V = CovarianceOperator(design_k2, 2, {"f2": 0.25, "f1": 1})
    assert V.design is design_k2
    assert V.sigma2_e == 2.0
    assert V.sigma2.dtype == np.float64
    assert_allclose(V.sigma2, [1.0, 0.25])
    assert V.shape == (60, 60)
    assert V.dtype == np.float64
    assert V.H is V
    assert V.T is V
    assert_allclose(V.diagonal(), np.full(60, 3.25))
    assert repr(V) == (
        "CovarianceOperator(n_obs=60, factors={'f1': 7, 'f2': 5}, sigma2_e=2, "
        "sigma2=[1, 0.25], parallel=False)"
    )
    with pytest.raises(ValueError, match="read-only"):
        V.sigma2[0] = 5.0


def test_V_parallel_auto(design_k2):
    assert CovarianceOperator(design_k2, 1.0, [1.0, 1.0]).parallel is False
    assert CovarianceOperator(design_k2, 1.0, [1.0, 1.0], parallel=True).parallel is True


def test_with_variances_shares_design(design_k2, rng):
    V = CovarianceOperator(design_k2, 1.0, [1.0, 1.0])
    W = V.with_variances(0.3, [2.0, 0.0])
    assert W.design is V.design
    assert W is not V
    assert_allclose(V.sigma2, [1.0, 1.0])  # the original is untouched
    x = rng.standard_normal(60)
    assert_allclose(W @ x, _dense_V(design_k2, 0.3, [2.0, 0.0]) @ x, rtol=1e-12)
    assert_allclose(V @ x, _dense_V(design_k2, 1.0, [1.0, 1.0]) @ x, rtol=1e-12)


def test_factor_returns_Z_k(design_k3, rng):
    V = CovarianceOperator(design_k3, 1.0, [1.0, 2.0, 3.0])
    Z2 = V.factor("f2")
    assert isinstance(Z2, RandomEffectsOperator)
    assert isinstance(Z2.H, RandomEffectsAdjointOperator)
    assert Z2.H.H is Z2
    assert Z2.shape == (50, 5)
    u = rng.standard_normal(5)
    assert_allclose(Z2 @ u, u[design_k3.codes[1]])
    v = rng.standard_normal(50)
    assert_allclose(Z2.H @ v, np.bincount(design_k3.codes[1], weights=v), rtol=1e-13)
    # V = s2e I + sum_k s2_k Z_k Z_k' through the factor operators
    x = rng.standard_normal(50)
    parts = sum(s * (V.factor(k) @ (V.factor(k).H @ x)) for k, s in enumerate(V.sigma2))
    assert_allclose(V @ x, x + parts, rtol=1e-12)


def test_Z_bad_factor(design_k2):
    with pytest.raises(KeyError, match="no factor named 'zz'"):
        RandomEffectsOperator(design_k2, "zz")
    with pytest.raises(ValueError, match="out of range"):
        RandomEffectsOperator(design_k2, 5)


@pytest.mark.parametrize(
    ("sigma2_e", "sigma2", "match"),
    [
        (0.0, [1.0, 1.0], "sigma2_e must be finite and > 0"),
        (-1.0, [1.0, 1.0], "sigma2_e must be finite and > 0"),
        (np.nan, [1.0, 1.0], "sigma2_e must be finite and > 0"),
        ("a", [1.0, 1.0], "sigma2_e must be a real number"),
        (1.0, [1.0], r"got 1 value\(s\) for 2 factor\(s\)"),
        (1.0, [1.0, 2.0, 3.0], r"got 3 value\(s\) for 2 factor\(s\)"),
        (1.0, [1.0, np.inf], "sigma2 must be finite; got inf for factor 'f2'"),
        (1.0, [-0.5, 1.0], "sigma2 must be >= 0; got -0.5 for factor 'f1'"),
        (1.0, {"f1": 1.0}, r"sigma2 has no value for factor\(s\) \['f2'\]"),
        (1.0, {"f1": 1.0, "f2": 1.0, "g": 2.0}, r"unknown factor\(s\) \['g'\]"),
        (1.0, ["x", 1.0], "sigma2 must be real numbers"),
    ],
)
def test_V_validation(design_k2, sigma2_e, sigma2, match):
    with pytest.raises(ValueError, match=match):
        CovarianceOperator(design_k2, sigma2_e, sigma2)


def test_todense_guard(design_k2, monkeypatch):
    monkeypatch.setenv("LMMOPS_MAX_DENSE_GIB", "1e-9")
    V = CovarianceOperator(design_k2, 1.0, [1.0, 1.0])
    with pytest.raises(DenseTooLargeError, match="CovarianceOperator.todense"):
        V.todense()
    with pytest.raises(DenseTooLargeError, match="LevelSpaceOperator.todense"):
        V.level_space().todense()
    with pytest.raises(DenseTooLargeError, match="RandomEffectsOperator.todense"):
        V.factor(0).todense()
    with pytest.raises(DenseTooLargeError):
        V.factor(0).H.todense()
    # the matrix-free paths do not care
    assert (V @ np.ones(60)).shape == (60,)


# ------------------------------------------------------------------ level space
@pytest.fixture(params=["k2", "k3", "nested"])
def V_case(request, parallel):
    make = {"k2": _k2, "k3": _k3, "nested": _nested}[request.param]
    d = make()
    s2 = [0.7, 1.9, 0.35][: d.n_factors]
    return CovarianceOperator(d, 0.6, s2, parallel=parallel)


def test_level_space_matches_dense(V_case):
    M = V_case.level_space()
    d = V_case.design
    Z = _dense_Z(d)
    lam = 0.6 / V_case.sigma2
    expected = Z.T @ Z + np.diag(np.repeat(lam, d.n_levels))
    assert_allclose(M.lambdas, lam)
    assert_allclose(M.sigma2, V_case.sigma2)
    assert M.sigma2_e == 0.6
    assert M.parallel == V_case.parallel
    assert_allclose(M.todense(), expected, rtol=1e-14)
    assert_allclose(M.todense(), d.gram().toarray() + np.diag(np.repeat(lam, d.n_levels)))
    assert_allclose(M.diagonal(), np.diag(expected))
    assert_operator_matches_dense(M, expected, rtol=1e-12, rng=1)


def test_V_inverse_via_level_space(V_case, rng):
    """V^{-1} b = lift(M^{-1} rhs(b), b) (docs/theory.rst, Level space), for (n,) and (n, m)."""
    M = V_case.level_space()
    d = V_case.design
    Vd = _dense_V(d, V_case.sigma2_e, V_case.sigma2)
    Md = M.todense()
    b = rng.standard_normal(d.n_obs)
    B = rng.standard_normal((d.n_obs, 3))
    assert_allclose(M.rhs(b), _dense_Z(d).T @ b, rtol=1e-13, atol=1e-13)
    x = M.lift(np.linalg.solve(Md, M.rhs(b)), b)
    assert_allclose(x, np.linalg.solve(Vd, b), rtol=1e-10, atol=1e-12)
    X = M.lift(np.linalg.solve(Md, M.rhs(B)), B)
    assert X.shape == (d.n_obs, 3)
    assert_allclose(X, np.linalg.solve(Vd, B), rtol=1e-10, atol=1e-12)
    # and with an iterative q-space solve
    u, info = spla.cg(M, M.rhs(b), rtol=1e-13, atol=0.0)
    assert info == 0
    assert_allclose(M.lift(u, b), np.linalg.solve(Vd, b), rtol=1e-8, atol=1e-10)


def test_logdet_identity(V_case):
    """log|V| = n log s_e^2 + sum_k q_k log(s_k^2/s_e^2) + log|M| (docs/theory.rst)."""
    M = V_case.level_space()
    d = V_case.design
    sign_M, logdet_M = np.linalg.slogdet(M.todense())
    sign_V, logdet_V = np.linalg.slogdet(_dense_V(d, V_case.sigma2_e, V_case.sigma2))
    assert sign_M == 1
    assert sign_V == 1
    assert_allclose(M.logdet_V(logdet_M), logdet_V, rtol=1e-12)
    by_hand = (
        d.n_obs * np.log(V_case.sigma2_e)
        + sum(q * np.log(s / V_case.sigma2_e) for q, s in zip(d.n_levels, V_case.sigma2))
        + logdet_M
    )
    assert_allclose(M.logdet_V(logdet_M), by_hand, rtol=1e-13)


def test_level_space_needs_positive_variances(design_nested):
    V = CovarianceOperator(design_nested, 1.0, [0.0, 2.0])
    with pytest.raises(ValueError, match=r"sigma2 is 0 for factor\(s\) \['outer'\]"):
        V.level_space()


def test_level_space_validation_and_shapes(design_k2):
    with pytest.raises(ValueError, match="lambdas must be > 0; got 0.0 for factor 'f1'"):
        LevelSpaceOperator(design_k2, [0.0, 1.0])
    with pytest.raises(ValueError, match="sigma2_e must be finite and > 0"):
        LevelSpaceOperator(design_k2, [1.0, 1.0], sigma2_e=0.0)
    M = LevelSpaceOperator(design_k2, {"f1": 2.0, "f2": 0.5})
    assert_allclose(M.lambdas, [2.0, 0.5])
    with pytest.raises(ValueError, match=r"b has shape \(59,\)"):
        M.rhs(np.ones(59))
    with pytest.raises(ValueError, match=r"u has shape \(3,\)"):
        M.lift(np.ones(3), np.ones(60))
    with pytest.raises(ValueError, match="b has shape"):
        M.lift(np.ones(12), np.ones((60, 2)))
    assert repr(M).startswith("LevelSpaceOperator(q=12, factors={'f1': 7, 'f2': 5}")


def test_random_design_helper_importable(rng):
    d = random_design(rng, n_levels=(4, 3, 3, 2), n_obs=30, missing=0.2)
    assert d.n_factors == 4
    assert all(d.counts(k).min() >= 1 for k in range(4))
    with pytest.raises(ValueError, match="n_levels"):
        random_design(rng, n_levels=(1, 3), n_obs=10)


@settings(derandomize=True, max_examples=30, deadline=None)
@given(st.integers(0, 10**6), st.lists(st.integers(2, 9), min_size=1, max_size=4),
       st.booleans())
def test_gram_arrays_equal_the_assembled_gram_and_the_dense_one(seed, levels, weighted):
    """The Gram written straight into CSR arrays (no COO, no transposed copies) is
    assemble_gram's matrix entry for entry, and Z'WZ from dense indicators."""
    from lmmops.data.statistics import SufficientStatistics, assemble_gram

    rng = np.random.default_rng(seed)
    n = 6 * max(levels) + 5
    d = random_design(rng, n_levels=levels, n_obs=n, missing=0.4)
    w = rng.uniform(0.5, 2.0, size=n) if weighted else None
    s = SufficientStatistics.from_arrays(d, np.ones((n, 1)), rng.normal(size=n), w)
    indptr, indices, data = operators.gram_arrays(s.D, s.N)
    assert indptr.dtype == np.int64
    assert indices.dtype == np.int32
    ref = assemble_gram(s.D, s.N)
    np.testing.assert_array_equal(indptr, ref.indptr)
    np.testing.assert_array_equal(indices, ref.indices)
    np.testing.assert_array_equal(data, ref.data)  # the same numbers, not rounded
    Z = np.hstack([d.indicator(k).toarray() for k in range(d.n_factors)])
    W = np.ones(n) if w is None else w
    G = sps.csr_matrix((data, indices, indptr), shape=(d.q, d.q)).toarray()
    assert_allclose(G, Z.T @ (W[:, None] * Z), rtol=1e-13, atol=1e-13)
    op = GramOperator(d, stats=s)
    U = rng.normal(size=(d.q, 3))
    assert_allclose(op.matmat(U), Z.T @ (W[:, None] * (Z @ U)), rtol=1e-12, atol=1e-12)
    assert op.nnz == ref.nnz


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("m", [1, 5])
def test_gram_sandwich_is_the_three_steps_bit_for_bit(parallel, m):
    """The fused spherical product lam * (Z'Z (lam * U)) + U of the iterative solver."""
    d = _k3()
    G = GramOperator(d, parallel=parallel)
    rng = np.random.default_rng(4)
    lam = rng.uniform(0.1, 3.0, size=d.q)
    U = rng.normal(size=(d.q, m))
    steps = G.matmat(lam[:, None] * U)
    steps *= lam[:, None]
    steps += U
    np.testing.assert_array_equal(G.sandwich(lam, U), steps)
    Z = np.hstack([d.indicator(k).toarray() for k in range(d.n_factors)])
    assert_allclose(G.sandwich(lam, U), lam[:, None] * (Z.T @ (Z @ (lam[:, None] * U))) + U,
                    rtol=1e-13, atol=1e-13)
