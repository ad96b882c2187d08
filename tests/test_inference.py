"""Variance-parameter inference: information SEs, Wald and profile intervals, JSON."""

import numpy as np
import pandas as pd
import pytest
from conftest import random_design
from scipy import optimize, stats

import lmmops
from lmmops.analysis.inference import full_criterion, variance_covariance
from lmmops.errors import LmmopsError


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(11)
    d = random_design(rng, n_levels=(12, 6), n_obs=150, missing=0.2)
    n = d.n_obs
    df = pd.DataFrame({"a": d.codes[0], "b": d.codes[1], "x": rng.normal(size=n)})
    df["y"] = (1 + 0.5 * df.x + rng.normal(size=12)[df.a] + 0.7 * rng.normal(size=6)[df.b]
               + rng.normal(size=n))
    return df


def dense_minus2ll(df, sds, sigma, method):
    d = lmmops.CrossedDesign.from_frame(df, ["a", "b"])
    X = np.column_stack([np.ones(len(df)), df.x])
    y = df.y.to_numpy()
    V = sigma**2 * np.eye(len(y))
    for k in range(2):
        Z = d.indicator(k).toarray()
        V += sds[k] ** 2 * Z @ Z.T
    Vi = np.linalg.inv(V)
    XtViX = X.T @ Vi @ X
    beta = np.linalg.solve(XtViX, X.T @ Vi @ y)
    r = y - X @ beta
    f = np.linalg.slogdet(2 * np.pi * V)[1] + r @ Vi @ r
    if method == "REML":
        f += np.linalg.slogdet(XtViX)[1] - X.shape[1] * np.log(2 * np.pi)
    return f


@pytest.mark.parametrize("method", ["REML", "ML"])
def test_full_criterion_and_its_gradient(data, method):
    res = lmmops.fit("y ~ x + (1|a) + (1|b)", data, method=method)
    obj = res.model.objective(method)  # the user-scale criterion (lme4's devfun)
    for sds, sigma in (([0.8, 0.5], 1.1), ([0.0, 0.9], 0.7)):
        f, g = full_criterion(obj, sds, sigma, gradient=True)
        assert f == pytest.approx(dense_minus2ll(data, sds, sigma, method), rel=1e-10)
        x = np.append(sds, sigma)
        h = 1e-6
        for j in range(3):
            if x[j] == 0.0:
                continue
            e = np.zeros(3)
            e[j] = h
            fd = (full_criterion(obj, (x + e)[:2], (x + e)[2])
                  - full_criterion(obj, (x - e)[:2], (x - e)[2])) / (2 * h)
            assert g[j] == pytest.approx(fd, rel=1e-5, abs=1e-6)
    # at the optimum it equals the profiled criterion
    assert full_criterion(obj, res.theta.to_numpy() * res.sigma, res.sigma) == pytest.approx(
        res.objective, rel=1e-12)


@pytest.mark.parametrize("method", ["REML", "ML"])
def test_variance_se_from_the_information_matches_dense(data, method):
    """The AI equals the observed information in (s_a^2, s_b^2, s^2) up to O(score)."""
    res = lmmops.fit("y ~ x + (1|a) + (1|b)", data, method=method)
    v = res.variances

    def f(p):
        return 0.5 * dense_minus2ll(data, np.sqrt(p[:2]), np.sqrt(p[2]), method)

    x = np.array([v["a"], v["b"], v["Residual"]])
    h = 1e-4 * x
    Hd = np.zeros((3, 3))
    for i in range(3):
        for j in range(3):
            ei, ej = np.eye(3)[i] * h[i], np.eye(3)[j] * h[j]
            Hd[i, j] = (f(x + ei + ej) - f(x + ei - ej) - f(x - ei + ej) + f(x - ei - ej)) / (
                4 * h[i] * h[j])
    se_obs = np.sqrt(np.diag(np.linalg.inv(Hd)))
    se = res.variances_se
    np.testing.assert_allclose([se["a"], se["b"], se["Residual"]], se_obs, rtol=0.1)
    obj, ev = res.fit_objective(exact=True)  # the solver's conditioned scale: variances times s^2
    np.testing.assert_allclose(res.variances_cov.to_numpy(), variance_covariance(obj, ev)
                               * res.model.conditioning.variance_scale ** 2)
    # exactly the average information of docs/theory.rst, 1/2 Q' P Q (ML: V^{-1} for P)
    d = lmmops.CrossedDesign.from_frame(data, ["a", "b"])
    X = np.column_stack([np.ones(len(data)), data.x])
    y = data.y.to_numpy()
    Zs = [d.indicator(k).toarray() for k in range(2)]
    Vd = [Z @ Z.T for Z in Zs] + [np.eye(len(y))]
    V = sum(x[j] * Vd[j] for j in range(3))
    Vi = np.linalg.inv(V)
    P = Vi - Vi @ X @ np.linalg.solve(X.T @ Vi @ X, X.T @ Vi)
    Q = np.column_stack([Vj @ P @ y for Vj in Vd])
    A = 0.5 * Q.T @ (P if method == "REML" else Vi) @ Q
    np.testing.assert_allclose(res.variances_cov.to_numpy(), np.linalg.inv(A), rtol=1e-7)
    out = res.to_dict()
    assert set(out["variances_se"]) == set(out["variances"])
    assert out["rank_deficient"] == []


def test_wald_intervals(data):
    res = lmmops.fit("y ~ x + (1|a) + (1|b)", data)
    ci = res.confint(method="wald")
    assert list(ci.index) == ["sd_a", "sd_b", "sigma", "(Intercept)", "x"]
    assert list(ci.columns) == ["estimate", "lower", "upper", "method"]
    z = stats.norm.ppf(0.975)
    assert ci.loc["x", "lower"] == pytest.approx(res.fixef["x"] - z * res.fixef_se["x"])
    se_sd = res.variances_se["a"] / (2 * res.stddev["a"])
    assert ci.loc["sd_a", "upper"] == pytest.approx(res.stddev["a"] + z * se_sd)
    assert ci.loc["sd_a", "estimate"] == pytest.approx(res.stddev["a"])


def test_profile_intervals_against_a_dense_profile(data):
    res = lmmops.fit("y ~ x + (1|a) + (1|b)", data)
    ci = res.confint(method="profile", parm=["sd_b", "sigma"])
    fmin = dense_minus2ll(data, [res.stddev["a"], res.stddev["b"]], res.sigma, "REML")
    cut = stats.chi2.ppf(0.95, 1)
    for lim in ("lower", "upper"):
        c = ci.loc["sd_b", lim]
        if c == 0.0:
            continue
        prof = optimize.minimize(
            lambda z, c=c: dense_minus2ll(data, [abs(z[0]), c], abs(z[1]), "REML"),
            [res.stddev["a"], res.sigma], method="Nelder-Mead",
            options=dict(xatol=1e-9, fatol=1e-11))
        assert prof.fun - fmin == pytest.approx(cut, abs=2e-4)
    c = ci.loc["sigma", "upper"]
    prof = optimize.minimize(
        lambda z: dense_minus2ll(data, np.abs(z), c, "REML"),
        [res.stddev["a"], res.stddev["b"]], method="Nelder-Mead",
        options=dict(xatol=1e-9, fatol=1e-11))
    assert prof.fun - fmin == pytest.approx(cut, abs=2e-4)
    assert ci.loc["sd_b", "lower"] < res.stddev["b"] < ci.loc["sd_b", "upper"]
    # profile and Wald agree roughly for the well-determined residual sd
    wald = res.confint(method="wald", parm=["sigma"])
    assert wald.loc["sigma", "upper"] == pytest.approx(ci.loc["sigma", "upper"], rel=0.02)


def test_profile_lower_limit_is_zero_for_a_negligible_component():
    rng = np.random.default_rng(3)
    n = 200
    df = pd.DataFrame({"a": rng.integers(0, 10, n), "b": rng.integers(0, 5, n)})
    df["y"] = rng.normal(size=10)[df.a] + 0.02 * rng.normal(size=5)[df.b] + rng.normal(size=n)
    res = lmmops.fit("y ~ 1 + (1|a) + (1|b)", df)
    ci = res.confint(parm=["sd_b"])
    assert ci.loc["sd_b", "lower"] == 0.0
    assert ci.loc["sd_b", "upper"] > 0.0


def test_confint_errors(data):
    res = lmmops.fit("y ~ x + (1|a) + (1|b)", data)
    with pytest.raises(LmmopsError, match="unknown interval method 'boot'"):
        res.confint(method="boot")
    with pytest.raises(LmmopsError, match=r"level must be in \(0, 1\)"):
        res.confint(level=95)
    with pytest.raises(LmmopsError, match=r"unknown parameter\(s\) \['sd_zz'\]"):
        res.confint(parm=["sd_zz"])
