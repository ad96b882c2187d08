"""diag(P) and the covariance of the variance components on the matrix-free random-slope
solver (VectorIterativeObjective), against the exact blocked-Cholesky solver
(VectorObjective): at the same theta, after fits, in the JSON of ``lmmops fit``."""

import copy
import json

import numpy as np
import pytest
from designs import slope_frame

import lmmops
from lmmops.cli import main
from lmmops.data.simulate import simulate_slopes
from lmmops.errors import LmmopsError
from lmmops.estimation import protocol
from lmmops.estimation.vector import VectorObjective, VectorStatistics, random_effects_matrix
from lmmops.estimation.vector_iterative import VectorIterativeObjective

FORMULA = "y ~ x + (1 + x | g) + (1 | h)"
THETA = np.array([0.9, 0.2, 0.4, 0.8])


@pytest.fixture(scope="module")
def design():
    return simulate_slopes(3000, [60, 50], seed=3)


@pytest.fixture(scope="module")
def frame():
    return slope_frame(3000, 60, 40, seed=5)


@pytest.fixture(scope="module")
def fits(frame):
    return (lmmops.fit(FORMULA, frame, solver="direct"),
            lmmops.fit(FORMULA, frame, solver="iterative"))


def test_apply_P_equals_dense_P_with_weights():
    """``P B`` by the level-space solve is the dense
    ``(V0^{-1} - V0^{-1}X(X'V0^{-1}X)^{-1}X'V0^{-1}) / s^2`` to the CG tolerance, prior
    weights included, and its diagonal is the exact solver's diag(P)."""
    terms, X, y = simulate_slopes(400, [20, 8], seed=2)
    w = np.random.default_rng(7).uniform(0.5, 2.0, 400)
    it = VectorIterativeObjective(terms, X, y, weights=w, n_probes=8, seed=1, rtol=1e-12)
    ev = it.evaluate(THETA)
    ex = VectorObjective(terms, X, y, weights=w)
    ev0 = ex.evaluate(THETA)
    Z = random_effects_matrix(terms).toarray()
    Lam = ex._lambda(THETA).toarray()
    V0 = np.diag(1.0 / w) + Z @ Lam @ Lam.T @ Z.T
    Vi = np.linalg.inv(V0)
    ViX = Vi @ X
    P = (Vi - ViX @ np.linalg.solve(X.T @ ViX, ViX.T)) / ev0.sigma2
    B = np.random.default_rng(3).normal(size=(400, 3))
    np.testing.assert_allclose(it.apply_P(ev, B), P @ B, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(np.diag(P), ex.diag_P(ev0), rtol=1e-9)


def test_diag_P_within_its_errors_of_the_exact_one(design):
    """At the same theta: every entry within 4 of its standard errors of the exact
    diag(P); the standardised differences look like N(0, 1) (not errors inflated to
    pass), and the errors are a few percent, not all tiny."""
    terms, X, y = design
    ex = VectorObjective(terms, X, y)
    it = VectorIterativeObjective(terms, X, y, n_probes=16, seed=1)
    exact = ex.diag_P(ex.evaluate(THETA))
    est = protocol.diag_P(it, it.evaluate(THETA))
    assert est.estimate.shape == est.stderr.shape == (3000,)
    assert est.n_matvecs == 64
    rel = est.stderr / exact
    assert 0.005 < np.median(rel) < 0.1  # measured 0.028
    z = (est.estimate - exact) / est.stderr
    assert np.max(np.abs(z)) < 4.5  # measured 4.10 over 3000 entries (t-like tails)
    assert np.mean(np.abs(z) > 4) < 1e-3
    assert abs(np.mean(z)) < 0.1
    assert 0.85 < np.std(z) < 1.15


def test_diag_P_needs_the_rows(design):
    terms, X, y = design
    stats = VectorStatistics.from_rows(terms, X, y)
    it = VectorIterativeObjective(terms, None, None, n_probes=8, stats=stats)
    ev = it.evaluate(THETA)
    with pytest.raises(LmmopsError, match="diag\\(P\\) needs the rows"):
        protocol.diag_P(it, ev)
    # the covariance of the variance components is level-space: it works there
    assert np.all(np.isfinite(protocol.variance_covariance(it, ev)))


def test_variance_covariance_at_the_same_theta(design):
    """Without a fit's Jacobian the profiled Hessian is differenced anew (fixed probes);
    the standard errors are the exact solver's within 5% (measured <= 2.4%), and the
    layout (per term variances, covariances, then s^2) is the same."""
    terms, X, y = design
    ex = VectorObjective(terms, X, y)
    it = VectorIterativeObjective(terms, X, y, n_probes=16, seed=1)
    c0 = protocol.variance_covariance(ex, ex.evaluate(THETA))
    ev1 = it.evaluate(THETA)
    c1 = protocol.variance_covariance(it, ev1)
    assert c0.shape == c1.shape == (5, 5)
    np.testing.assert_allclose(c1, c1.T, atol=1e-12)
    np.testing.assert_allclose(np.sqrt(np.diag(c1)), np.sqrt(np.diag(c0)), rtol=0.05)
    # s^2's error depends on theta's only through dr^2/dtheta (exact given the solves
    # here, forward differences on the exact solver): measured 2e-4 apart
    assert abs(np.sqrt(c1[-1, -1] / c0[-1, -1]) - 1.0) < 2e-3
    np.testing.assert_allclose(ev1.dsigma2 * (3000 - 2), ex._fd_last[3], rtol=1e-4)


def test_variances_after_iterative_and_direct_fits(fits):
    """Standard errors of the variance components after the two fits: within 20% (the
    two fits' theta differ by the iterative one's Monte Carlo error, here up to 0.5 of
    theta's sampling sd, and a variance's standard error moves with the variance)."""
    ex, it = fits
    assert it.solver == "iterative"
    assert ex.solver == "direct"
    # the two fits' theta differ by the iterative one's Monte Carlo error (measured: at
    # most 2.2 of its standard deviations, after the fit raised its probes to 83)
    mc_sd = np.sqrt(np.diag(it.fit_objective()[1].theta_mc_cov))
    assert np.all(np.abs(it.theta.to_numpy() - ex.theta.to_numpy()) <= 4 * mc_sd + 1e-6)
    c0, c1 = ex.variances_cov, it.variances_cov
    assert list(c1.index) == list(c0.index) == [
        "g.(Intercept)", "g.x", "g.(Intercept).x", "h.(Intercept)", "Residual"]
    se0, se1 = np.sqrt(np.diag(c0)), np.sqrt(np.diag(c1))
    assert np.all(se1 > 0)
    # a variance's standard error is about proportional to the variance: compare the
    # relative errors of the variances (h's variance is 12% larger in the iterative
    # fit, its standard error 22%; relative errors measured within 9%), the covariance's
    # absolute one
    def values(res):
        gc, hc = res.covariances["g"].to_numpy(), res.covariances["h"].to_numpy()
        return np.array([gc[0, 0], gc[1, 1], 1.0, hc[0, 0], res.sigma ** 2])
    np.testing.assert_allclose(se1 / values(it), se0 / values(ex), rtol=0.2)
    for k, v in it.variances_se.items():
        assert np.isfinite(v)
        assert v > 0
        rel_it = v / (it.variances[k])
        rel_ex = ex.variances_se[k] / ex.variances[k]
        assert abs(rel_it - rel_ex) <= 0.2 * rel_ex
    # from the fit's Jacobian (ev.hessian) or differenced anew at the estimate: the same
    # within the Monte Carlo error of the Jacobian (measured ratios 0.942 to 1.002)
    obj, ev = it.fit_objective()
    assert ev.hessian is not None
    fresh = copy.copy(ev)
    fresh.hessian = None
    se_fit = np.sqrt(np.diag(protocol.variance_covariance(obj, ev)))
    se_new = np.sqrt(np.diag(protocol.variance_covariance(obj, fresh)))
    np.testing.assert_allclose(se_new, se_fit, rtol=0.1)


def test_studentized_residuals_after_iterative_fit(fits):
    ex, it = fits
    t0, t1 = ex.residuals("studentized"), it.residuals("studentized")
    assert np.all(np.isfinite(t1))
    assert np.max(np.abs(t1 - t0)) < 0.25  # measured 0.11
    assert np.corrcoef(t0, t1)[0, 1] > 0.999
    tab = it.residual_table()
    assert (tab.diag_P_se > 0).all()
    assert np.median(tab.diag_P_se / tab.diag_P) < 0.1
    d0 = ex.residual_table().diag_P
    # the fits' theta differ a little, so the error is the probes' plus that: 6 se
    # (measured at most 4.06 se; median relative se 0.026)
    assert np.all(np.abs(tab.diag_P - d0) < 6 * tab.diag_P_se + 0.01)
    top = it.outliers(top=3)
    assert len(top) == 3
    assert np.all(np.isfinite(top.t))


def test_cli_json_has_vcov_se_on_iterative_slopes(frame, tmp_path, capsys):
    path = tmp_path / "slopes.csv"
    frame.to_csv(path, index=False)
    out = {}
    for solver in ("direct", "iterative"):
        assert main(["fit", str(path), "--formula", FORMULA, "--solver", solver,
                     "--json"]) == 0
        out[solver] = json.loads(capsys.readouterr().out)
    assert out["iterative"]["solver"] == "iterative"
    se1 = [r["vcov_se"] for r in out["iterative"]["varcorr"]]
    assert len(se1) == 5
    assert all(isinstance(s, float) and s > 0 for s in se1)
    # relative errors of the variances (var2 null), absolute of the covariance, as in
    # test_variances_after_iterative_and_direct_fits
    def scaled(res):
        return [r["vcov_se"] / (r["vcov"] if r["var2"] is None else 1.0)
                for r in res["varcorr"]]
    np.testing.assert_allclose(scaled(out["iterative"]), scaled(out["direct"]), rtol=0.2)
    assert all(np.isfinite(v) for v in out["iterative"]["variances_se"].values())
