"""Prior weights, R = s^2 W^{-1}, checked against lme4's semantics worked densely.

lme4's ``weights=`` are precision weights: ``V = Z G Z' + s^2 W^{-1}`` and the profiled
criterion carries ``-sum(log w)`` (``ldW`` in lme4's ``lmerResp::Laplace``), so the
log-likelihood is that of ``y ~ N(X beta, V)``.
"""

import numpy as np
import pandas as pd
import pytest
from conftest import random_design
from scipy import optimize

import lmmops
from lmmops.errors import LmmopsError
from lmmops.estimation.direct import DirectObjective


def dense_loglik_criterion(d, X, y, w, theta, method):
    """-2 log-likelihood (REML or ML), profiled over s^2, with V = s^2 (W^{-1} + Z L^2 Z')."""
    n, p = X.shape
    V0 = np.diag(1.0 / w)
    for k in range(d.n_factors):
        Z = d.indicator(k).toarray()
        V0 += theta[k] ** 2 * Z @ Z.T
    Vi = np.linalg.inv(V0)
    XtViX = X.T @ Vi @ X
    beta = np.linalg.solve(XtViX, X.T @ Vi @ y)
    r = y - X @ beta
    dof = n - p if method == "REML" else n
    s2 = (r @ Vi @ r) / dof
    V = s2 * V0
    ll = -0.5 * (np.linalg.slogdet(2 * np.pi * V)[1] + r @ np.linalg.solve(V, r))
    if method == "REML":
        ll -= 0.5 * (np.linalg.slogdet(XtViX / s2)[1] - p * np.log(2 * np.pi))
    return -2 * ll, beta, s2


@pytest.fixture
def problem(rng):
    d = random_design(rng, n_levels=(7, 5), n_obs=70)
    n = d.n_obs
    X = np.column_stack([np.ones(n), rng.normal(size=n)])
    w = rng.uniform(0.3, 3.0, n)
    y = X @ [1.0, 0.5] + rng.normal(size=7)[d.codes[0]] + rng.normal(size=5)[d.codes[1]] \
        + rng.normal(size=n) / np.sqrt(w)
    return d, X, y, w


@pytest.mark.parametrize("method", ["REML", "ML"])
def test_weighted_criterion_is_the_gaussian_likelihood(problem, method):
    d, X, y, w = problem
    obj = DirectObjective(d, X, y, method, weights=w)
    for theta in ([0.7, 1.3], [0.0, 0.4], [2.0, 0.1]):
        ev = obj.evaluate(np.array(theta))
        crit, beta, s2 = dense_loglik_criterion(d, X, y, w, theta, method)
        np.testing.assert_allclose(ev.objective, crit, rtol=1e-11)
        np.testing.assert_allclose(ev.beta, beta, rtol=1e-10)
        np.testing.assert_allclose(ev.sigma2, s2, rtol=1e-10)


def test_weighted_gradient_and_average_information(problem):
    d, X, y, w = problem
    obj = DirectObjective(d, X, y, "REML", weights=w)
    theta = np.array([0.8, 1.1])
    ev = obj.evaluate(theta)
    h = 1e-6
    fd = [(obj(theta + h * e) - obj(theta - h * e)) / (2 * h) for e in np.eye(2)]
    np.testing.assert_allclose(ev.gradient, fd, rtol=1e-5, atol=1e-6)
    s2 = ev.sigma2
    Zs = [d.indicator(k).toarray() for k in range(2)]
    V = s2 * (np.diag(1 / w) + sum(t**2 * Z @ Z.T for t, Z in zip(theta, Zs)))
    Vi = np.linalg.inv(V)
    P = Vi - Vi @ X @ np.linalg.solve(X.T @ Vi @ X, X.T @ Vi)
    Py = P @ y
    Vdots = [Z @ Z.T for Z in Zs] + [np.diag(1 / w)]
    Wv = np.column_stack([Vd @ Py for Vd in Vdots])
    np.testing.assert_allclose(obj.average_information(ev), 0.5 * Wv.T @ P @ Wv, rtol=1e-9)


def test_weighted_fit_reaches_the_dense_optimum(problem):
    d, X, y, w = problem
    df = pd.DataFrame({"a": d.codes[0], "b": d.codes[1], "x": X[:, 1], "y": y, "w": w})
    res = lmmops.fit("y ~ x + (1|a) + (1|b)", df, weights="w")
    best = optimize.minimize(
        lambda t: dense_loglik_criterion(d, X, y, w, np.abs(t), "REML")[0],
        res.theta.to_numpy() * 1.2, method="Nelder-Mead",
        options=dict(xatol=1e-10, fatol=1e-12, maxiter=4000))
    assert res.reml_criterion <= best.fun + 1e-7
    np.testing.assert_allclose(res.reml_criterion, best.fun, atol=1e-6)
    # an array gives the same fit as the column
    res2 = lmmops.fit("y ~ x + (1|a) + (1|b)", df, weights=w)
    np.testing.assert_allclose(res2.reml_criterion, res.reml_criterion, rtol=1e-12)
    # the fitted values use the weighted GLS
    _, beta, _ = dense_loglik_criterion(d, X, y, w, res.theta.to_numpy(), "REML")
    np.testing.assert_allclose(res.fixef.to_numpy(), beta, rtol=1e-8)


def test_unit_weights_change_nothing_and_scaling_weights_scales_sigma(problem):
    d, X, y, w = problem
    a = DirectObjective(d, X, y, "ML")
    b = DirectObjective(d, X, y, "ML", weights=np.ones(d.n_obs))
    theta = np.array([0.5, 0.9])
    assert a(theta) == pytest.approx(b(theta), rel=1e-13)
    # w -> c w: the same model with s^2 -> c s^2 and theta -> theta / sqrt(c)
    c = 4.0
    e1 = DirectObjective(d, X, y, "ML", weights=w).evaluate(theta)
    e2 = DirectObjective(d, X, y, "ML", weights=c * w).evaluate(theta / np.sqrt(c))
    np.testing.assert_allclose(e2.sigma2, c * e1.sigma2, rtol=1e-10)
    np.testing.assert_allclose(e2.objective, e1.objective, rtol=1e-11)


def test_weights_are_precision_not_frequency(problem):
    """Weight 2 is not a duplicated row (lme4's semantics)."""
    d, X, y, w = problem
    n = d.n_obs
    w2 = np.ones(n)
    w2[0] = 2.0
    ev_w = DirectObjective(d, X, y, "ML", weights=w2).evaluate(np.array([0.6, 0.6]))
    crit, _, _ = dense_loglik_criterion(d, X, y, w2, [0.6, 0.6], "ML")
    assert ev_w.objective == pytest.approx(crit, rel=1e-11)
    codes = np.concatenate([d.codes, d.codes[:, :1]], axis=1)
    dd = lmmops.CrossedDesign(codes, d.n_levels, d.names)
    ev_dup = DirectObjective(dd, np.vstack([X, X[:1]]), np.append(y, y[0]), "ML").evaluate(
        np.array([0.6, 0.6]))
    assert abs(ev_dup.objective - ev_w.objective) > 1e-3


@pytest.mark.parametrize(("weights", "match"), [
    ("nope", "unknown weights column 'nope'"),
    (np.ones(5), "weights has 5 values for 70 observations"),
    ("wnan", "weights must be finite: 1 missing or non-finite weight"),
    ("wneg", r"weights must be > 0: 2 weight\(s\) are <= 0 \(first at row 3\)"),
    ("wstr", "weights must be numeric"),
])
def test_bad_weights(problem, weights, match):
    d, X, y, w = problem
    df = pd.DataFrame({"a": d.codes[0], "b": d.codes[1], "y": y, "w": w})
    df["wnan"] = w
    df.loc[4, "wnan"] = np.nan
    df["wneg"] = w
    df.loc[[3, 9], "wneg"] = [0.0, -1.0]
    df["wstr"] = "x"
    with pytest.raises(LmmopsError, match=match):
        lmmops.fit("y ~ 1 + (1|a) + (1|b)", df, weights=weights)


def test_cli_weights(problem, tmp_path, capsys):
    import json

    from lmmops.cli import main

    d, X, y, w = problem
    df = pd.DataFrame({"a": d.codes[0], "b": d.codes[1], "y": y, "w": w})
    path = tmp_path / "d.csv"
    df.to_csv(path, index=False)
    assert main(["fit", str(path), "--formula", "y ~ 1 + (1|a) + (1|b)", "--weights", "w",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    ref = lmmops.fit("y ~ 1 + (1|a) + (1|b)", df, weights="w")
    assert out["reml_criterion"] == pytest.approx(ref.reml_criterion, rel=1e-10)
    assert main(["fit", str(path), "--formula", "y ~ 1 + (1|a) + (1|b)",
                 "--weights", "zz"]) == 2
    assert "unknown weights column 'zz'" in capsys.readouterr().err
