"""VectorObjective (random slopes, exact): the criterion against dense linear algebra, the
analytic gradient against finite differences (inside and on the boundary), the optimiser
against the dense optimum, and lme4's sleepstudy fits from hand-built terms."""

import json
import math
import pathlib

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmmops.data.terms import RandomEffectsTerm
from lmmops.errors import LmmopsError
from lmmops.estimation.vector import (
    VectorObjective,
    fit_vector,
    random_effects_matrix,
    start_theta,
)

DATA = pathlib.Path(__file__).parent / "data"


def _slope_term(name, codes, n_levels, x, intercept=True):
    cols = ("(Intercept)", "x") if intercept else ("x",)
    vals = np.column_stack([np.ones_like(x), x]) if intercept else x[:, None]
    return RandomEffectsTerm(name, np.asarray(codes, np.int32),
                             pd.Index([f"{name}{i}" for i in range(n_levels)]), cols, vals)


def _crossed(seed, n=120, g=9, h=5, weights=False):
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, g, n), rng.integers(0, h, n)
    a[:g], b[:h] = np.arange(g), np.arange(h)
    x = rng.normal(size=n)
    y = (rng.normal(size=g)[a] + 0.7 * rng.normal(size=g)[a] * x
         + 0.5 * rng.normal(size=h)[b] + 0.3 * rng.normal(size=h)[b] * x + rng.normal(size=n))
    X = np.column_stack([np.ones(n), x])
    terms = [_slope_term("a", a, g, x), _slope_term("b", b, h, x)]
    w = rng.uniform(0.5, 2.0, n) if weights else None
    return terms, X, y, w


def dense_criterion(terms, X, y, theta, method="REML", weights=None):
    """-2 log-likelihood from V = s^2 (W^{-1} + Z Lambda Lambda' Z'), profiled over s^2."""
    n, p = X.shape
    Z = random_effects_matrix(terms).toarray()
    blocks, start = [], 0
    for t in terms:
        T = t.relative_factor(theta[start:start + t.n_theta])
        start += t.n_theta
        blocks.append(np.kron(np.eye(t.n_levels), T))
    q = sum(b.shape[0] for b in blocks)
    Lam = np.zeros((q, q))
    o = 0
    for b in blocks:
        Lam[o:o + b.shape[0], o:o + b.shape[0]] = b
        o += b.shape[0]
    Winv = np.diag(1.0 / weights) if weights is not None else np.eye(n)
    V0 = Winv + Z @ Lam @ Lam.T @ Z.T
    Vi = np.linalg.inv(V0)
    XVX = X.T @ Vi @ X
    beta = np.linalg.solve(XVX, X.T @ Vi @ y)
    r = y - X @ beta
    rss = float(r @ Vi @ r)
    dof = n - p if method == "REML" else n
    f = np.linalg.slogdet(V0)[1] + dof * (1 + math.log(2 * math.pi * rss / dof))
    if method == "REML":
        f += np.linalg.slogdet(XVX)[1]
    return f


THETA = np.array([0.8, 0.3, 0.6, 0.5, -0.2, 0.4])


@pytest.mark.parametrize("method", ["REML", "ML"])
@pytest.mark.parametrize("weights", [False, True])
def test_criterion_equals_dense(method, weights):
    terms, X, y, w = _crossed(1, weights=weights)
    obj = VectorObjective(terms, X, y, method=method, weights=w)
    got = obj.evaluate(THETA, gradient=False).objective
    assert got == pytest.approx(dense_criterion(terms, X, y, THETA, method, w), rel=1e-12)


def test_singular_theta_is_finite_and_dense():
    terms, X, y, _ = _crossed(2)
    theta = np.array([0.8, 0.4, 0.0, 0.0, 0.0, 0.0])  # correlation 1, and term b off
    obj = VectorObjective(terms, X, y)
    assert obj(theta) == pytest.approx(dense_criterion(terms, X, y, theta), rel=1e-12)


def _fd_gradient(f, theta, h=1e-6, one_sided=()):
    g = np.empty_like(theta)
    for i in range(theta.size):
        e = np.zeros_like(theta)
        e[i] = h
        if i in one_sided:  # at a bound: forward difference of second order
            g[i] = (-3 * f(theta) + 4 * f(theta + e) - f(theta + 2 * e)) / (2 * h)
        else:
            g[i] = (f(theta + e) - f(theta - e)) / (2 * h)
    return g


@pytest.mark.parametrize("method", ["REML", "ML"])
@pytest.mark.parametrize("weights", [False, True])
def test_gradient_matches_finite_differences(method, weights):
    terms, X, y, w = _crossed(3, weights=weights)
    obj = VectorObjective(terms, X, y, method=method, weights=w)
    g = obj.evaluate(THETA).gradient
    np.testing.assert_allclose(g, _fd_gradient(obj, THETA), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("theta", [
    [0.8, 0.4, 0.0, 0.5, -0.2, 0.0],  # two zero diagonal entries: the general form
    [0.8, 0.4, 2e-3, 0.5, -0.2, 0.0],  # one term by the selected inverse, one general
    [0.8, 0.4, 5e-4, 0.5, -0.2, 0.3],  # just below the switch
])
def test_gradient_on_and_near_the_boundary(theta):
    terms, X, y, _ = _crossed(4)
    theta = np.array(theta)
    obj = VectorObjective(terms, X, y)
    g = obj.evaluate(theta).gradient
    zero = tuple(i for i in (2, 5) if theta[i] == 0)
    fd = _fd_gradient(obj, theta, h=1e-5 if zero else 1e-7, one_sided=zero)
    np.testing.assert_allclose(g, fd, rtol=1e-5, atol=1e-5)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), dims=st.sampled_from([(1, 2), (2, 1), (2, 2)]))
def test_criterion_and_gradient_any_design(seed, dims):
    """Hypothesis over designs: one- or two-column terms in any order."""
    rng = np.random.default_rng(seed)
    n, g, h = 60, 6, 4
    a, b = rng.integers(0, g, n), rng.integers(0, h, n)
    a[:g], b[:h] = np.arange(g), np.arange(h)
    x = rng.normal(size=n)
    y = rng.normal(size=n) + rng.normal(size=g)[a]
    X = np.ones((n, 1))
    terms = [_slope_term("a", a, g, x, intercept=dims[0] == 2),
             _slope_term("b", b, h, x, intercept=dims[1] == 2)]
    ntheta = sum(t.n_theta for t in terms)
    theta = rng.uniform(0.2, 1.5, ntheta)
    obj = VectorObjective(terms, X, y)
    ev = obj.evaluate(theta)
    assert ev.objective == pytest.approx(dense_criterion(terms, X, y, theta), rel=1e-11)
    np.testing.assert_allclose(ev.gradient, _fd_gradient(obj, theta), rtol=1e-5, atol=1e-5)


def test_fit_reaches_the_dense_optimum():
    terms, X, y, _ = _crossed(5, n=200)
    obj = VectorObjective(terms, X, y)
    ev, opt = fit_vector(obj, start_theta(terms))
    assert opt.converged
    from scipy.optimize import minimize

    def f(t):
        return dense_criterion(terms, X, y, t)

    bounds = [(0, None) if lo == 0 else (None, None) for lo in obj.lower]
    ref = minimize(f, ev.theta, method="L-BFGS-B", bounds=bounds,
                   options={"ftol": 1e-15, "gtol": 1e-10})
    assert ev.objective <= ref.fun + 1e-8


def test_bad_theta_is_refused():
    terms, X, y, _ = _crossed(6)
    obj = VectorObjective(terms, X, y)
    with pytest.raises(LmmopsError, match="diagonal entries >= 0"):
        obj.evaluate(np.array([-0.1, 0, 1, 1, 0, 1]))
    with pytest.raises(LmmopsError, match="6 finite values"):
        obj.evaluate(np.ones(5))


def _lme4(formula, method):
    fits = json.loads((DATA / "lme4_slopes.json").read_text())["fits"]
    return next(f for f in fits if f["formula"] == formula and f["method"] == method)


@pytest.mark.parametrize("method", ["REML", "ML"])
def test_sleepstudy_correlated_slope_matches_lme4(sleepstudy, method):
    df = sleepstudy
    subj = df["Subject"].cat.codes.to_numpy()
    days = df["Days"].to_numpy(float)
    term = _slope_term("Subject", subj, 18, days)
    X = np.column_stack([np.ones(len(df)), days])
    obj = VectorObjective([term], X, df["Reaction"].to_numpy(float), method=method)
    ev, opt = fit_vector(obj, start_theta([term]))
    ref = _lme4("Reaction ~ Days + (Days | Subject)", method)
    crit = ref["reml_criterion"] if method == "REML" else ref["deviance"]
    assert opt.converged
    assert ev.objective <= crit * (1 + 1e-6) + 1e-9
    assert ev.objective == pytest.approx(crit, rel=1e-6)
    np.testing.assert_allclose(ev.theta, list(ref["theta"].values()), atol=1e-4)
    np.testing.assert_allclose(ev.beta, list(ref["fixef"].values()), rtol=1e-5)


def _dense_P_and_G(terms, X, y, w, obj, ev):
    n = len(y)
    Z = random_effects_matrix(terms).toarray()
    Lam = obj._lambda(ev.theta).toarray()
    Winv = np.diag(1.0 / w) if w is not None else np.eye(n)
    Vi = np.linalg.inv(ev.sigma2 * (Winv + Z @ Lam @ Lam.T @ Z.T))
    P = Vi - Vi @ X @ np.linalg.solve(X.T @ Vi @ X, X.T @ Vi)
    G = ev.sigma2 * Lam @ Lam.T
    return Z, Vi, P, G


@pytest.mark.parametrize("weights", [False, True])
def test_diag_P_and_prediction_error_blocks_equal_dense(weights):
    terms, X, y, w = _crossed(1, weights=weights)
    obj = VectorObjective(terms, X, y, weights=w)
    ev = obj.evaluate(THETA)
    Z, Vi, P, G = _dense_P_and_G(terms, X, y, w, obj, ev)
    np.testing.assert_allclose(obj.diag_P(ev), np.diag(P), rtol=1e-12)
    np.testing.assert_allclose(obj.diag_P(ev, z_only=True), np.diag(Vi), rtol=1e-12)
    for z_only, Q in ((False, P), (True, Vi)):
        C = G - G @ Z.T @ Q @ Z @ G  # G - G Z'PZ G, or lme4's condVar given beta
        blocks = obj.pev_blocks(ev, z_only=z_only)
        for k, t in enumerate(terms):
            for j in range(t.n_levels):
                sl = slice(obj.offsets[k] + j * t.dim, obj.offsets[k] + (j + 1) * t.dim)
                np.testing.assert_allclose(blocks[k][j], C[sl, sl], atol=1e-14 * np.abs(C).max())


def test_theta_covariance_is_twice_the_inverse_hessian():
    terms, X, y, _ = _crossed(5, n=200)
    obj = VectorObjective(terms, X, y)
    ev, opt = fit_vector(obj)
    assert opt.converged
    cov = obj.theta_covariance(ev)
    free = ev.theta > obj.lower  # off-diagonal entries are free, zero variances are not
    assert np.isnan(np.diag(cov)).sum() == np.sum(~free)
    h = 1e-4
    idx = np.arange(ev.theta.size)
    H = np.empty((idx.size, idx.size))  # second differences of the criterion itself
    for a in idx:
        for b in idx:
            ea, eb = np.eye(idx.size)[a] * h, np.eye(idx.size)[b] * h
            H[a, b] = (obj(ev.theta + ea + eb) - obj(ev.theta + ea - eb)
                       - obj(ev.theta - ea + eb) + obj(ev.theta - ea - eb)) / (4 * h * h)
    ref = 2.0 * np.linalg.inv(H[np.ix_(free, free)])
    np.testing.assert_allclose(cov[np.ix_(free, free)], ref, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("method", ["REML", "ML"])
def test_average_information_approximates_the_hessian_at_the_optimum(method):
    """At the optimum the average information is the expected Hessian; on 400 rows it is
    within 5 % of the finite-difference Hessian of the criterion (measured: 1-4 %)."""
    from lmmops.estimation.vector import _fd_hessian

    terms, X, y, _ = _crossed(5, n=400)
    obj = VectorObjective(terms, X, y, method=method)
    ev, _ = fit_vector(obj)
    H = _fd_hessian(obj, ev.theta, np.arange(ev.theta.size), obj.lower)
    AI = obj.average_information(ev)
    assert np.abs(AI - H).max() < 0.05 * np.abs(H).max()
    np.testing.assert_allclose(AI, AI.T)


@pytest.mark.parametrize("seed", [5, 6, 7])
def test_both_optimizers_reach_the_same_optimum(seed):
    terms, X, y, _ = _crossed(seed, n=400)
    fits = [fit_vector(VectorObjective(terms, X, y), optimizer=o) for o in ("ai-newton", "lbfgsb")]
    (ev1, o1), (ev2, o2) = fits
    assert o1.converged
    assert o2.converged
    assert ev1.objective == pytest.approx(ev2.objective, abs=1e-8)
    np.testing.assert_allclose(ev1.theta, ev2.theta, atol=1e-5)
    with pytest.raises(LmmopsError, match="unknown optimizer"):
        fit_vector(VectorObjective(terms, X, y), optimizer="bobyqa")


@pytest.mark.parametrize("method", ["REML", "ML"])
@pytest.mark.parametrize("weights", [False, True])
def test_average_information_from_statistics_equals_the_rows_one(method, weights):
    """The level-space average information (what ``average_information`` uses when
    ``C`` has no more nonzeros than ``Z``) equals the one from the rows."""
    terms, X, y, w = _crossed(3, n=300, weights=weights)
    obj = VectorObjective(terms, X, y, method=method, weights=w)
    ev = obj.evaluate(THETA)
    rows, span = obj._average_information_rows(ev), obj._average_information_span(ev)
    np.testing.assert_allclose(span, rows, rtol=1e-10, atol=1e-10 * np.abs(rows).max())
    np.testing.assert_allclose(obj.average_information(ev), rows, rtol=1e-10,
                               atol=1e-10 * np.abs(rows).max())
