"""The small-data fast paths give the numbers of the general code they bypass, bit for bit.

A warm fit on lme4's Penicillin, Pastes or sleepstudy is a few milliseconds, most of it
fixed per-call overhead; these paths remove it (issue 16). Each is checked here against
the code it replaces: scipy's triangular and Cholesky solves and CSR products, one
``bincount`` per column, pandas' ``remove_unused_categories``, formulaic's model matrix,
the Schur block built afresh, and the result's eager tables.
"""

import numpy as np
import pandas as pd
import pytest
import scipy.linalg as sla
import scipy.sparse as sp
from conftest import random_design
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lmmops
from lmmops.data import formula as formula_mod
from lmmops.data.design import CrossedDesign, sorted_levels
from lmmops.data.formula import fixed_effects_matrix
from lmmops.estimation.direct import DirectObjective, _csr_arrays, _csr_times
from lmmops.linalg.lapack import chol_factor, chol_inverse, chol_solve, tri_solve
from lmmops.threads import limit_threads, limits_active

FAST = dict(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _spd(rng, m):
    A = rng.normal(size=(m, m))
    return A @ A.T + m * np.eye(m)


# ----------------------------------------------------------------- LAPACK calls
@settings(**FAST)
@given(m=st.integers(1, 12), k=st.integers(0, 3), lower=st.booleans(),
       trans=st.sampled_from([0, 1]), order=st.sampled_from(["C", "F", "slice"]),
       seed=st.integers(0, 2**31 - 1))
def test_tri_solve_equals_scipy_bit_for_bit(m, k, lower, trans, order, seed):
    rng = np.random.default_rng(seed)
    L = np.linalg.cholesky(_spd(rng, m))
    a = L if lower else L.T
    if order == "F":
        a = np.asfortranarray(a)
    elif order == "slice":  # a block of a larger Fortran-ordered factor, as the solver has
        big = np.asfortranarray(np.pad(a, ((0, 1), (0, 1)), constant_values=1.0))
        a = big[:m, :m]
    b = rng.normal(size=(m,) if k == 0 else (m, k))
    want = sla.solve_triangular(a, b, lower=lower, trans=trans)
    got = tri_solve(a, b, lower=lower, trans=trans)
    assert got.shape == want.shape
    assert np.array_equal(got, want)
    # and it solves the system (against a dense oracle)
    op = a.T if trans else a
    assert np.allclose(op @ got, b, rtol=1e-10, atol=1e-10)


@settings(**FAST)
@given(m=st.integers(1, 12), k=st.integers(0, 3), seed=st.integers(0, 2**31 - 1))
def test_chol_solve_and_inverse_equal_scipy(m, k, seed):
    rng = np.random.default_rng(seed)
    A = _spd(rng, m)
    big = np.asfortranarray(np.linalg.cholesky(np.pad(A, ((0, 2), (0, 2))) + np.eye(m + 2)))
    c = big[:m, :m]  # a leading block of a factor, as solve_spherical passes
    b = rng.normal(size=(m,) if k == 0 else (m, k))
    assert np.array_equal(chol_solve(c, b), sla.cho_solve((c, True), b))
    inv, info = sla.lapack.dpotri(c, lower=1)
    assert info == 0
    iu = np.triu_indices(m, 1)
    inv[iu] = inv.T[iu]
    got = chol_inverse(c)
    assert np.array_equal(got, inv)
    assert np.allclose(got, np.linalg.inv(c @ c.T), rtol=1e-9, atol=1e-12)


@settings(**FAST)
@given(m=st.integers(1, 12), seed=st.integers(0, 2**31 - 1))
def test_chol_factor_equals_scipy(m, seed):
    A = _spd(np.random.default_rng(seed), m)
    got = chol_factor(A)
    assert np.array_equal(got, sla.cholesky(A, lower=True))
    assert np.allclose(got @ got.T, A)


def test_empty_systems_return_empty_arrays_as_scipy_does():
    e = np.zeros((0, 0))
    assert chol_factor(e).shape == (0, 0)
    assert chol_solve(e, np.zeros(0)).shape == (0,)
    assert tri_solve(e, np.zeros((0, 2)), lower=True).shape == (0, 2)
    with pytest.raises(lmmops.errors.NumericalFailure, match="not positive definite"):
        chol_factor(np.array([[1.0, 2.0], [2.0, 1.0]]))


def test_tri_solve_singular_raises_lmmops_error():
    a = np.array([[1.0, 0.0], [1.0, 0.0]])
    with pytest.raises(lmmops.errors.NumericalFailure, match="trtrs"):
        tri_solve(np.asfortranarray(a), np.ones(2), lower=True)


# ----------------------------------------------------------------- CSR products, sums
@settings(**FAST)
@given(r=st.integers(1, 15), c=st.integers(1, 15), k=st.integers(0, 4),
       density=st.floats(0.0, 1.0), seed=st.integers(0, 2**31 - 1))
def test_csr_times_equals_scipy_bit_for_bit(r, c, k, density, seed):
    rng = np.random.default_rng(seed)
    A = sp.random(r, c, density=density, format="csr", random_state=rng)
    B = rng.normal(size=(c,) if k == 0 else (c, k))
    got = _csr_times(_csr_arrays(A), B, r)
    want = A @ B
    assert got.shape == want.shape
    assert np.array_equal(got, want)
    assert np.allclose(got, A.toarray() @ B)


@settings(**FAST)
@given(seed=st.integers(0, 2**31 - 1), K=st.integers(1, 3), cols=st.integers(1, 5))
def test_zt_times_equal_one_bincount_per_column(seed, K, cols):
    rng = np.random.default_rng(seed)
    d = random_design(rng, n_levels=(6, 4, 3)[:K], n_obs=50)
    X = np.ones((d.n_obs, 1))
    obj = DirectObjective(d, X, rng.normal(size=d.n_obs))
    W = rng.normal(size=(d.n_obs, cols))
    want = np.vstack([np.stack([np.bincount(d.codes[k], weights=W[:, j],
                                            minlength=d.n_levels[k])
                                for j in range(cols)], axis=1) for k in range(K)])
    got = obj._zt_times(W)
    assert np.array_equal(got, want)
    Z = sp.hstack([sp.csr_matrix((np.ones(d.n_obs), (np.arange(d.n_obs), d.codes[k])),
                                 shape=(d.n_obs, d.n_levels[k])) for k in range(K)])
    assert np.allclose(got, Z.T @ W)  # Z'W from the indicator matrix


# ----------------------------------------------------------------- the Schur block cache
def _objective(seed, K=2, method="REML", weights=False):
    rng = np.random.default_rng(seed)
    d = random_design(rng, n_levels=(7, 5, 3)[:K], n_obs=70)
    X = np.column_stack([np.ones(d.n_obs), rng.normal(size=d.n_obs)])
    y = rng.normal(size=d.n_obs) + rng.normal(size=7)[d.codes[0]]
    w = rng.uniform(0.5, 2.0, d.n_obs) if weights else None
    return lambda: DirectObjective(d, X, y, method=method, weights=w)


@settings(**FAST)
@given(seed=st.integers(0, 2**31 - 1), K=st.integers(1, 3),
       method=st.sampled_from(["REML", "ML"]), weights=st.booleans(),
       t=st.lists(st.floats(0.0, 5.0, allow_subnormal=False), min_size=3, max_size=3))
def test_cached_first_factor_parts_give_the_fresh_numbers(seed, K, method, weights, t):
    make = _objective(seed, K, method, weights)
    warm = make()
    theta = np.array(t[:K])
    for other in ([0.3, 1.7], [2.0, 0.0]):  # the same t1, other components
        probe = theta.copy()
        probe[warm.rest] = np.array(other)[:K - 1]
        warm.criterion(probe)
        warm.evaluate(probe, gradient=True)
    assert len(warm._first_cache) == 1  # this t1 (the gradient's Gram is not cached)
    for gradient in (False, True):
        fresh = make().evaluate(theta, gradient=gradient)
        again = warm.evaluate(theta, gradient=gradient)
        assert again.objective == fresh.objective
        assert np.array_equal(again.beta, fresh.beta)
        if gradient:
            assert np.array_equal(again.gradient, fresh.gradient)
    assert warm.criterion(theta) == make().criterion(theta)


def test_cached_parts_are_read_only():
    obj = _objective(3)()
    obj.criterion(np.array([0.7, 1.1]))
    (parts,) = obj._first_cache.values()
    for a in parts[:4]:  # d, w1, RN, Sxx (then the float sum(log d))
        if a is not None:
            with pytest.raises(ValueError):
                a[...] = 0.0


def test_cache_is_bounded():
    obj = _objective(4)()
    for t in np.linspace(0.1, 3.0, 80):
        obj.criterion(np.array([t, 0.5]))
    assert 0 < len(obj._first_cache) <= 32


# ----------------------------------------------------------------- thread limits
def test_limits_active_inside_a_block_only():
    assert not limits_active()
    with limit_threads(1):
        assert limits_active()
        with limit_threads("auto", inner=True) as plan:
            assert plan is None
    assert not limits_active()


# ----------------------------------------------------------------- design encoding
def _old_categorical(s):
    cat = s.cat.remove_unused_categories()
    return cat.cat.codes.to_numpy().astype(np.int32), pd.Index(cat.cat.categories)


@settings(**FAST)
@given(labels=st.lists(st.integers(0, 9), min_size=1, max_size=40),
       extra=st.lists(st.integers(10, 14), max_size=4, unique=True),
       kind=st.sampled_from(["str", "int", "float"]), ordered=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_categorical_levels_equal_remove_unused_categories(labels, extra, kind, ordered, seed):
    rng = np.random.default_rng(seed)
    conv = {"str": lambda v: f"L{v}", "int": int, "float": lambda v: v / 2}[kind]
    cats = [conv(v) for v in rng.permutation(sorted(set(labels) | set(extra)))]
    s = pd.Series(pd.Categorical([conv(v) for v in labels], categories=cats,
                                 ordered=ordered))
    codes, levels = sorted_levels(s, "g")
    want_codes, want_levels = _old_categorical(s)
    assert codes.dtype == np.int32
    assert np.array_equal(codes, want_codes)
    assert levels.equals(want_levels)
    assert levels.dtype == want_levels.dtype
    assert [levels[c] for c in codes] == [conv(v) for v in labels]


def test_categorical_missing_value_is_reported():
    s = pd.Series(pd.Categorical(["a", None, "b"]))
    with pytest.raises(lmmops.errors.DesignError, match="1 missing value"):
        sorted_levels(s, "g")


def test_interaction_labels_unchanged():
    df = pd.DataFrame({"a": pd.Categorical(["x", "y", "x", "y", "x"]),
                       "b": [3, 1, 1, 3, 3]})
    d = CrossedDesign.from_frame(df, ["a:b"])
    assert d.levels[0].tolist() == ["x:1", "x:3", "y:1", "y:3"]
    assert d.codes[0].tolist() == [1, 2, 0, 3, 1]


# ----------------------------------------------------------------- fixed-effects cache
@pytest.fixture
def empty_plain_cache(monkeypatch):
    monkeypatch.setattr(formula_mod, "_PLAIN", {})


@pytest.mark.parametrize("fixed", ["1", "x", "0 + x", "x + z", "z + 1 + x"])
def test_plain_formula_rebuilt_as_formulaic_builds_it(empty_plain_cache, fixed):
    rng = np.random.default_rng(1)
    df = pd.DataFrame({"x": rng.normal(size=30), "z": rng.integers(0, 9, 30)})
    X0, names0, spec0 = fixed_effects_matrix(fixed, df, return_spec=True)
    assert formula_mod._PLAIN  # remembered
    df2 = pd.DataFrame({"x": rng.normal(size=20), "z": rng.integers(0, 9, 20)})
    X1, names1, spec1 = fixed_effects_matrix(fixed, df2, return_spec=True)
    assert spec1 is spec0
    want = np.asarray(spec0.get_model_matrix(df2), dtype=np.float64)  # formulaic itself
    assert names1 == names0
    assert np.array_equal(X1, want)


@pytest.mark.parametrize("fixed", ["log(x)", "x:z", "C(z)", "f", "I(x + 1)"])
def test_formulas_with_state_or_transforms_are_not_remembered(empty_plain_cache, fixed):
    df = pd.DataFrame({"x": [1.0, 2.0, 4.0, 3.0], "z": [1, 2, 1, 2],
                       "f": ["a", "b", "a", "b"]})
    fixed_effects_matrix(fixed, df)
    assert not formula_mod._PLAIN


def test_plain_cache_falls_back_on_new_dtypes_and_missing_values(empty_plain_cache):
    df = pd.DataFrame({"x": [1.0, 2.0, 4.0, 3.0]})
    fixed_effects_matrix("x", df)
    # a categorical x now: formulaic's dummy coding, not the remembered numeric column
    X, names = fixed_effects_matrix("x", pd.DataFrame({"x": ["a", "b", "a", "c"]}))
    assert names == ["(Intercept)", "xb", "xc"]
    with pytest.raises(lmmops.errors.FormulaError, match="missing"):
        fixed_effects_matrix("x", pd.DataFrame({"x": [1.0, np.nan, 2.0]}))
    with pytest.raises(lmmops.errors.FormulaError, match="non-finite"):
        fixed_effects_matrix("x", pd.DataFrame({"x": [1.0, np.inf, 2.0]}))
    with pytest.raises(lmmops.errors.FormulaError, match="unknown column"):
        fixed_effects_matrix("x", pd.DataFrame({"y": [1.0, 2.0]}))


def test_refit_is_the_first_fit(empty_plain_cache):
    rng = np.random.default_rng(2)
    df = pd.DataFrame({"g": rng.integers(0, 8, 80).astype(str), "x": rng.normal(size=80)})
    df["y"] = df.x + rng.normal(size=8)[df.g.astype(int)] + rng.normal(size=80)
    first = lmmops.fit("y ~ x + (1|g)", df)
    second = lmmops.fit("y ~ x + (1|g)", df)
    assert second.objective == first.objective
    assert second.fixef.equals(first.fixef)
    new = df.iloc[:5].copy()
    assert np.array_equal(second.predict(new), first.predict(new))


# ----------------------------------------------------------------- lazy result tables
def test_result_tables_are_built_once_and_assignable():
    rng = np.random.default_rng(5)
    df = pd.DataFrame({"a": rng.integers(0, 6, 90), "b": rng.integers(0, 4, 90)})
    df["y"] = rng.normal(size=6)[df.a] + rng.normal(size=4)[df.b] + rng.normal(size=90)
    res = lmmops.fit("y ~ 1 + (1|a) + (1|b)", df)
    for name in ("fixef", "fixef_se", "tvalues", "vcov", "theta", "covariances", "ranef"):
        assert name not in res.__dict__  # not built by the fit
        first = getattr(res, name)
        assert getattr(res, name) is first  # built once
    ev = res.evaluation
    s = res.model.conditioning.scale
    assert np.array_equal(res.theta.to_numpy(), ev.theta)
    assert res.theta.index.tolist() == ["a", "b"]
    assert res.variances["a"] == res.covariances["a"].iloc[0, 0]
    assert np.allclose(res.ranef["a"].to_numpy(), s * ev.theta[0] * ev.v[0])
    se = np.sqrt(np.diag(res.vcov.to_numpy()))
    assert np.array_equal(res.fixef_se.to_numpy(), se)
    assert np.array_equal(res.tvalues.to_numpy(), res.fixef.to_numpy() / se)
    res.fixef = pd.Series([1.0], index=["(Intercept)"])  # still a plain attribute to set
    assert res.fixef.iloc[0] == 1.0
