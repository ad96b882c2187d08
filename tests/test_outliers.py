"""MSOM and VSOM against a dense implementation of the formulas of docs/theory.rst
(Residuals and outlier models)."""

import numpy as np
import pandas as pd
import pytest
from conftest import random_design
from scipy import optimize

import lmmops
from lmmops.analysis.outliers import msom, msom_scan, vsom
from lmmops.errors import LmmopsError
from lmmops.estimation.direct import DirectObjective, fit_direct, moment_start


def dense_P(d, X, theta, s2, w=None):
    n = d.n_obs
    w = np.ones(n) if w is None else w
    V = np.diag(1.0 / w)
    for k in range(d.n_factors):
        Z = d.indicator(k).toarray()
        V = V + theta[k] ** 2 * Z @ Z.T
    V = s2 * V
    Vi = np.linalg.inv(V)
    return Vi - Vi @ X @ np.linalg.solve(X.T @ Vi @ X, X.T @ Vi), V


@pytest.fixture(params=[(7, 5), (6, 5, 4)], ids=["K2", "K3"])
def planted(request, rng):
    d = random_design(rng, n_levels=request.param, n_obs=70)
    n = d.n_obs
    X = np.column_stack([np.ones(n), rng.normal(size=n)])
    y = X @ [1.0, 0.5] + rng.normal(size=n)
    for k in range(d.n_factors):
        y += rng.normal(size=d.n_levels[k])[d.codes[k]]
    y[[4, 17]] += [7.0, -6.0]  # planted outliers
    obj = DirectObjective(d, X, y, "REML")
    ev, _ = fit_direct(obj, moment_start(d, X, y))
    return d, X, y, obj, ev


def test_msom_matches_dense_formulas(planted):
    d, X, y, obj, ev = planted
    P, _ = dense_P(d, X, ev.theta, ev.sigma2)
    for rows in ([4], [4, 17], [0, 1, 2, 30]):
        delta = np.zeros(d.n_obs)
        delta[rows] = 1.0
        dPd = delta @ P @ delta
        phi = (delta @ P @ y) / dPd
        out = msom(obj, ev, rows)
        np.testing.assert_allclose(out["phi"], phi, rtol=1e-9)
        np.testing.assert_allclose(out["se"], dPd ** -0.5, rtol=1e-9)
        np.testing.assert_allclose(out["statistic"], phi * np.sqrt(dPd), rtol=1e-9)


def test_msom_equals_refit_with_a_shift_column(planted):
    """phi_hat_I is the GLS coefficient of delta_I added to X (same variance parameters)."""
    d, X, y, obj, ev = planted
    delta = np.zeros(d.n_obs)
    delta[[4, 17]] = 1.0
    ev2 = DirectObjective(d, np.column_stack([X, delta]), y, "REML").evaluate(ev.theta)
    assert msom(obj, ev, [4, 17])["phi"] == pytest.approx(ev2.beta[-1], rel=1e-9)


def test_scan_ranks_planted_outliers_first(planted):
    d, X, y, obj, ev = planted
    P, _ = dense_P(d, X, ev.theta, ev.sigma2)
    Py = P @ y
    scan = msom_scan(obj, ev)
    t = Py / np.sqrt(np.diag(P))
    np.testing.assert_allclose(scan.sort_values("row")["t"].to_numpy(), t, rtol=1e-9)
    np.testing.assert_allclose(scan.sort_values("row")["phi"].to_numpy(),
                               Py / np.diag(P), rtol=1e-9)
    assert set(scan["row"].iloc[:2]) == {4, 17}
    top = msom_scan(obj, ev, top=3)
    assert len(top) == 3
    assert top["p_bonferroni"].iloc[0] < 0.01


def dense_vsom(d, X, y, rows, method="REML"):
    """Profiled REML criterion with V = s^2 (I + Z L^2 Z' + omega D_I D_I'), minimised."""
    n, p = X.shape

    def crit(params):
        theta, omega = np.abs(params[:-1]), abs(params[-1])
        V0 = np.eye(n)
        for k in range(d.n_factors):
            Z = d.indicator(k).toarray()
            V0 += theta[k] ** 2 * Z @ Z.T
        V0[rows, rows] += omega
        Vi = np.linalg.inv(V0)
        XtViX = X.T @ Vi @ X
        beta = np.linalg.solve(XtViX, X.T @ Vi @ y)
        r = y - X @ beta
        dof = n - p
        return (np.linalg.slogdet(V0)[1] + np.linalg.slogdet(XtViX)[1]
                + dof * (1 + np.log(2 * np.pi * (r @ Vi @ r) / dof))), (r @ Vi @ r) / dof

    best = None
    for om in (0.5, 5.0, 30.0):
        x0 = np.append(np.ones(d.n_factors), om)
        r = optimize.minimize(lambda t: crit(t)[0], x0, method="Nelder-Mead",
                              options=dict(xatol=1e-10, fatol=1e-12, maxiter=20000))
        if best is None or r.fun < best.fun:
            best = r
    s2 = crit(best.x)[1]
    return best.fun, abs(best.x[-1]) * s2


def test_vsom_matches_dense_reml(planted):
    d, X, y, obj, ev = planted
    out = vsom(obj, [4])
    f1, s2o = dense_vsom(d, X, y, [4])
    assert out["criterion"] == pytest.approx(f1, abs=1e-5)
    assert out["sigma2_o"] == pytest.approx(s2o, rel=2e-3)
    assert out["lrt"] == pytest.approx(ev.objective - f1, abs=1e-5)
    assert out["p_value"] < 0.01


def test_vsom_on_an_ordinary_observation_is_not_significant(planted):
    d, X, y, obj, ev = planted
    scan = msom_scan(obj, ev)
    ordinary = int(scan["row"].iloc[-1])  # the smallest |t|
    out = vsom(obj, [ordinary])
    assert out["p_value"] > 0.2
    assert out["lrt"] < 1.0


def test_result_methods(planted):
    d, X, y, obj, ev = planted
    df = pd.DataFrame({f"f{k}": d.codes[k] for k in range(d.n_factors)})
    df["x"], df["y"] = X[:, 1], y
    formula = "y ~ x + " + " + ".join(f"(1|f{k})" for k in range(d.n_factors))
    res = lmmops.fit(formula, df)
    scan = res.outliers(method="msom", top=5)
    assert list(scan.columns) == ["row", "phi", "se", "t", "p_value", "p_bonferroni"]
    assert set(scan["row"].iloc[:2]) == {4, 17}
    one = res.outliers(method="msom", rows=[4, 17])
    assert one["phi"] == pytest.approx(msom(obj, ev, [4, 17])["phi"], rel=1e-6)
    v = res.outliers(method="vsom", rows=[4])
    assert v["sigma2_o"] > 0
    with pytest.raises(LmmopsError, match="unknown outlier method 'cook'"):
        res.outliers(method="cook")
    with pytest.raises(LmmopsError, match="the VSOM needs a set of observations"):
        res.outliers(method="vsom")
    with pytest.raises(LmmopsError, match=r"observation indices must be in 0\.\.69"):
        res.outliers(method="msom", rows=[70])
    with pytest.raises(LmmopsError, match="the outlier set I is empty"):
        res.outliers(method="msom", rows=[])


def test_residual_kinds_match_the_dense_cheat_sheet(planted):
    d, X, y, obj, ev = planted
    df = pd.DataFrame({f"f{k}": d.codes[k] for k in range(d.n_factors)})
    df["x"], df["y"] = X[:, 1], y
    w = np.random.default_rng(1).uniform(0.5, 2.0, d.n_obs)
    df["w"] = w
    formula = "y ~ x + " + " + ".join(f"(1|f{k})" for k in range(d.n_factors))
    res = lmmops.fit(formula, df, weights="w", solver="direct")
    s2 = res.sigma ** 2
    P, V = dense_P(d, X, res.theta.to_numpy(), s2, w)
    R = s2 * np.diag(1.0 / w)
    Vi = np.linalg.inv(V)
    tau = np.linalg.solve(X.T @ Vi @ X, X.T @ Vi @ y)
    np.testing.assert_allclose(res.residuals("marginal"), y - X @ tau, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(res.residuals("model"), R @ P @ y, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(res.residuals("conditional"), R @ P @ y, rtol=1e-7, atol=1e-9)
    dP = np.diag(P)
    np.testing.assert_allclose(res.residuals("shift"), (P @ y) / dP, rtol=1e-7)
    np.testing.assert_allclose(res.residuals("studentized"), (P @ y) / np.sqrt(dP), rtol=1e-7)
    np.testing.assert_allclose(res.residuals("pearson"),
                               np.sqrt(w) * res.residuals("conditional") / res.sigma)
    tab = res.residual_table()
    np.testing.assert_allclose(tab["shift_var"], 1.0 / dP, rtol=1e-8)
    with pytest.raises(LmmopsError, match="unknown residual kind 'raw'"):
        res.residuals("raw")
