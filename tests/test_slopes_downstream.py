"""Everything after the fit for random-slope models, against dense linear algebra:
predictions (fitted, new data, unseen levels) and their variances, residuals and diag(P),
prediction error variances shaped as ranef, Wald intervals on theta, the summary and JSON."""

import json

import numpy as np
import pytest
from designs import slope_frame

import lmmops
from lmmops.data.terms import lower_triangle
from lmmops.errors import LmmopsError
from lmmops.estimation.vector import random_effects_matrix


@pytest.fixture(scope="module")
def frame():
    return slope_frame(300, 12, 7, seed=11, intercept=2.0, h_label="h{}")


@pytest.fixture(scope="module")
def res(frame):
    return lmmops.fit("y ~ x + (1 + x | g) + (1 | h)", frame)


def _dense(res):
    """Omega = [[A, Lambda'Z'X], [X'Z Lambda, X'X]] on the user's scale."""
    obj, ev = res.fit_objective()
    Z = random_effects_matrix(obj.terms).toarray()
    Lam = obj._lambda(ev.theta).toarray()
    X = res.model.X
    ZL = Z @ Lam
    Om = np.block([[ZL.T @ ZL + np.eye(ZL.shape[1]), ZL.T @ X], [X.T @ ZL, X.T @ X]])
    return obj, ev, Z, Lam, X, Om


def test_fitted_values_are_the_conditional_predictions(res):
    np.testing.assert_allclose(res.predict(), res.fitted, rtol=1e-10)


def test_new_data_prediction_and_variances_equal_dense(res, frame):
    obj, ev, Z, Lam, X, Om = _dense(res)
    new = frame.iloc[:5].copy()
    new["g"] = new["g"].astype(str)
    new.loc[new.index[0], "g"] = "unseen"
    out = res.predict(new, interval="confidence")
    s2 = res.sigma ** 2
    beta = res.fixef.to_numpy()
    tab = res.ranef["g"]
    hh = res.ranef["h"]
    sd = res.covariances["g"].to_numpy()
    for i, (_, row) in enumerate(new.iterrows()):
        x = np.array([1.0, row.x])
        v = np.array([1.0, row.x])
        want = x @ beta + hh.loc[row.h, "(Intercept)"]
        zrow = Z[i].copy()
        extra = 0.0
        if row.g == "unseen":  # population prediction; the term's variance is added
            kg = [t.group for t in obj.terms].index("g")
            zrow[obj.offsets[kg]:obj.offsets[kg + 1]] = 0
            extra = v @ sd @ v
        else:
            want += v @ tab.loc[row.g].to_numpy()
        g = np.concatenate([Lam.T @ zrow, x])
        var = s2 * g @ np.linalg.solve(Om, g) + extra
        assert out["fit"].iloc[i] == pytest.approx(want, rel=1e-9)
        assert out["se"].iloc[i] == pytest.approx(np.sqrt(var), rel=1e-8)
    pred = res.predict(new, interval="prediction")
    np.testing.assert_allclose(pred["se"] ** 2, out["se"] ** 2 + s2, rtol=1e-10)
    pop = res.predict(new, random=False)
    np.testing.assert_allclose(pop, np.column_stack([np.ones(5), new.x]) @ beta, rtol=1e-10)


def test_residuals_and_diag_P_equal_dense(res):
    obj, ev, Z, Lam, X, Om = _dense(res)
    s2 = res.sigma ** 2
    V = s2 * (np.eye(len(X)) + Z @ Lam @ Lam.T @ Z.T)
    Vi = np.linalg.inv(V)
    P = Vi - Vi @ X @ np.linalg.solve(X.T @ Vi @ X, X.T @ Vi)
    dP = res._diag_P()
    np.testing.assert_allclose(dP, np.diag(P), rtol=1e-9)
    y = res.model.y
    np.testing.assert_allclose(res.residuals("shift"), (P @ y) / np.diag(P), rtol=1e-8)


def test_pev_is_shaped_as_ranef_and_equals_dense(res):
    obj, ev, Z, Lam, X, Om = _dense(res)
    s2 = res.sigma ** 2
    Oi = np.linalg.inv(Om)
    q = Z.shape[1]
    cov_b = s2 * Lam @ Oi[:q, :q] @ Lam.T  # G - G Z'PZ G in spherical form
    pev = res.ranef_pev()
    blocks = res.ranef_pev_blocks()
    assert set(pev) == set(res.ranef)
    for k, t in enumerate(obj.terms):
        tab = pev[t.group]
        assert list(getattr(tab, "columns", [t.group])) == list(
            getattr(res.ranef[t.group], "columns", [t.group]))
        for j in range(t.n_levels):
            sl = slice(obj.offsets[k] + j * t.dim, obj.offsets[k] + (j + 1) * t.dim)
            np.testing.assert_allclose(blocks[t.group][j], cov_b[sl, sl], rtol=1e-8,
                                       atol=1e-12)


def test_wald_intervals_on_theta(res):
    ci = res.confint(method="wald")
    assert list(ci.index[:4]) == list(res.theta.index)
    se = np.sqrt(np.diag(res.theta_cov.to_numpy()))
    z = 1.959963984540054
    np.testing.assert_allclose(ci.upper.iloc[:4], res.theta.to_numpy() + z * se, rtol=1e-10)
    assert (ci.lower.iloc[[0, 2, 3]] >= 0).all()  # diagonal entries: held at 0


def test_summary_and_strict_json(res):
    text = res.summary()
    assert "Corr" in text
    assert "(Intercept)" in text
    out = json.loads(json.dumps(res.to_dict(), allow_nan=False))
    assert [r["grp"] for r in out["varcorr"]] == ["g", "g", "g", "h", "Residual"]
    assert out["theta"] == pytest.approx(dict(res.theta))


def test_caterpillar_per_coefficient(res):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for coef in ("(Intercept)", "x"):
        ax = res.plot("caterpillar", factor="g", coef=coef)
        assert ax.get_title() == f"Caterpillar plot: g: {coef}"
        # the points drawn are the BLUPs of that coefficient, sorted
        xs = np.sort(ax.lines[0].get_xdata()) if ax.lines else None
        assert xs is None or np.allclose(np.sort(xs), np.sort(res.ranef["g"][coef]))
    with pytest.raises(LmmopsError, match="unknown coefficient 'z'"):
        res.plot("caterpillar", factor="g", coef="z")
    fig = res.plot("diagnostics")
    assert len(fig.axes) == 4
    plt.close("all")


def test_variances_cov_is_the_inverse_hessian_in_the_variance_parameters(res):
    """Against an independent oracle: central differences of the criterion (not profiled
    in s^2) in the variance components themselves, (Sigma_k entries, s^2) -> theta by
    Cholesky, on the solver's scale; cov = 2 H^{-1}, to the user's scale."""
    from lmmops.estimation.criterion import criterion_at_sigma

    obj, ev = res.fit_objective()
    obj = getattr(obj, "conditioned", obj)
    cov = res.variances_cov
    names = res._varcorr_names()
    assert list(cov.index) == names
    assert names[-1] == "Residual"
    np.testing.assert_allclose(cov.to_numpy(), cov.to_numpy().T, rtol=1e-10)

    def phi_to_theta(phi):
        th, pos = [], 0
        for t in obj.terms:
            d = t.dim
            C = np.zeros((d, d))
            C[np.diag_indices(d)] = phi[pos:pos + d]
            k = pos + d
            for j in range(d):
                for i in range(j + 1, d):
                    C[i, j] = C[j, i] = phi[k]
                    k += 1
            pos = k
            T = np.linalg.cholesky(C / phi[-1])
            th.extend(T[lower_triangle(d, "F")])  # lme4's column-major theta
        return np.array(th)

    def F(phi):
        e = obj.evaluate(phi_to_theta(phi), gradient=False)
        return criterion_at_sigma(e.logdet_L, e.logdet_RX, e.pwrss, obj.n, obj.p,
                                  obj.method, phi[-1], obj.ldW)

    phi0 = []
    s2 = ev.sigma2
    for t, sl in zip(obj.terms, obj.layout):
        T = t.relative_factor(ev.theta[sl])
        C = s2 * T @ T.T
        phi0.extend(np.diag(C))
        for j in range(t.dim):
            phi0.extend(C[i, j] for i in range(j + 1, t.dim))
    phi0 = np.array(phi0 + [s2])
    np.testing.assert_allclose(phi_to_theta(phi0), ev.theta, rtol=1e-10, atol=1e-12)
    k = phi0.size
    H = np.empty((k, k))
    h = 1e-4 * np.maximum(np.abs(phi0), 1e-3)
    for a in range(k):
        for b in range(k):
            def f(da, db, a=a, b=b):
                x = phi0.copy()
                x[a] += da * h[a]
                x[b] += db * h[b]
                return F(x)
            H[a, b] = (f(1, 1) - f(1, -1) - f(-1, 1) + f(-1, -1)) / (4 * h[a] * h[b])
    oracle = 2.0 * np.linalg.inv(0.5 * (H + H.T)) * res.model.conditioning.variance_scale**2
    np.testing.assert_allclose(cov.to_numpy(), oracle, rtol=2e-3,
                               atol=2e-3 * np.abs(oracle).max())
    # the standard errors of the one-column terms and the residual are its diagonal
    se = res.variances_se
    assert se["h"] == pytest.approx(np.sqrt(cov.loc["h.(Intercept)", "h.(Intercept)"]))
    assert se["Residual"] == pytest.approx(np.sqrt(cov.loc["Residual", "Residual"]))
