"""VectorIterativeObjective (random slopes, matrix-free) against the exact VectorObjective.

Real numbers, fixed seeds. "Within k MC standard errors" uses k = 4 throughout (the
reported errors come from 16-64 probes, so they are themselves uncertain by 10-20 %);
with unit-vector probes the estimators are exact, which is checked to round-off.
"""

import numpy as np
import pandas as pd
import pytest
from designs import nine_level_frame

import lmmops
from lmmops.data.design import CrossedDesign
from lmmops.data.simulate import simulate_slopes
from lmmops.data.terms import RandomEffectsTerm
from lmmops.errors import ArgumentError, LmmopsError
from lmmops.estimation import protocol
from lmmops.estimation.vector import VectorObjective, fit_vector
from lmmops.estimation.vector_iterative import (
    VectorIterativeObjective,
    check_slope_preconditioner,
    fit_vector_iterative,
)

K_SE = 4.0
TWO_SLOPES = np.array([0.8, 0.3, 0.6, 0.5, -0.2, 0.4])
SLOPE_AND_INTERCEPT = np.array([0.9, 0.2, 0.5, 0.8])


def _design(slopes, n=2000, levels=(60, 25), seed=3, weights=False):
    terms, X, y = simulate_slopes(n, list(levels), slopes=slopes, zipf=[0.8, 1.0],
                                  seed=seed)
    w = np.random.default_rng(seed + 100).uniform(0.5, 2.0, n) if weights else None
    return terms, X, y, w


CASES = [([True, True], TWO_SLOPES), ([True, False], SLOPE_AND_INTERCEPT)]


@pytest.mark.parametrize("method", ["REML", "ML"])
@pytest.mark.parametrize("weights", [False, True])
@pytest.mark.parametrize(("slopes", "theta"), CASES)
def test_criterion_and_gradient_within_mc_error(method, weights, slopes, theta):
    terms, X, y, w = _design(slopes, weights=weights)
    ex = VectorObjective(terms, X, y, method=method, weights=w).evaluate(theta)
    it = VectorIterativeObjective(terms, X, y, method=method, weights=w, n_probes=32,
                                  seed=5)
    ev = it.evaluate(theta)
    assert ev.cg_converged
    assert ev.objective_se > 0
    assert abs(ev.objective - ex.objective) <= K_SE * ev.objective_se
    se = np.sqrt(np.diag(ev.gradient_cov))
    assert np.all(se > 0)
    assert np.all(np.abs(ev.gradient - ex.gradient) <= K_SE * se)
    # the exact parts: GLS given theta to the CG tolerance
    np.testing.assert_allclose(ev.beta, ex.beta, rtol=1e-6, atol=1e-8)
    assert ev.pwrss == pytest.approx(ex.pwrss, rel=1e-7)
    assert ev.logdet_RX == pytest.approx(ex.logdet_RX, rel=1e-7, abs=1e-7)


@pytest.mark.parametrize(("slopes", "theta"), [
    *CASES,
    ([True, True], np.array([0.8, 0.3, 0.0, 0.5, 0.0, 0.0])),  # singular T_k: boundary
    ([True, False], np.array([0.9, 0.0, 0.0, 0.0])),  # a zero slope and a zero intercept
])
def test_unit_vector_probes_are_exact(slopes, theta):
    """With probes sqrt(q) e_i Hutchinson and full Lanczos quadrature are exact, so the
    estimated criterion and gradient are the exact ones (also on the boundary, where no
    inverse of T_k may appear)."""
    terms, X, y, w = _design(slopes, n=600, levels=(30, 12), weights=True)
    ex = VectorObjective(terms, X, y, weights=w).evaluate(theta)
    it = VectorIterativeObjective(terms, X, y, weights=w, n_probes=2, rtol=1e-12)
    ev = it.evaluate(theta, probes=np.sqrt(it.q) * np.eye(it.q))
    assert ev.objective == pytest.approx(ex.objective, abs=1e-7)
    np.testing.assert_allclose(ev.gradient, ex.gradient, atol=1e-6)


def test_logdet_unbiased_over_seeds_and_its_error_honest():
    terms, X, y, _ = _design([True, False], n=1500, levels=(50, 20))
    exact = VectorObjective(terms, X, y).evaluate(SLOPE_AND_INTERCEPT).logdet_L
    est, ses = [], []
    for seed in range(40):
        it = VectorIterativeObjective(terms, X, y, n_probes=8, seed=seed)
        ev = it.evaluate(SLOPE_AND_INTERCEPT, gradient=False)
        est.append(ev.logdet_L)
        ses.append(ev.objective_se)
    est = np.array(est)
    spread = est.std(ddof=1)
    # unbiased: the mean of 40 estimates within 4 of its standard errors
    assert abs(est.mean() - exact) <= K_SE * spread / np.sqrt(len(est))
    # the reported standard error matches the spread over seeds (within 40 %)
    assert 0.6 < np.mean(ses) / spread < 1.4


def test_gradient_is_not_the_derivative_of_the_estimate_but_close():
    """At fixed probes the Hutchinson gradient is not the derivative of the SLQ criterion
    estimate (non-commuting matrices), so it is no finite difference of it; the two agree
    within the Monte Carlo error, which is all the fit relies on."""
    terms, X, y, _ = _design([True, False], n=1500, levels=(50, 20))
    it = VectorIterativeObjective(terms, X, y, n_probes=16, seed=2, rtol=1e-11)
    ev = it.evaluate(SLOPE_AND_INTERCEPT)
    se = np.sqrt(np.diag(ev.gradient_cov))
    h = 1e-5
    for i in range(len(SLOPE_AND_INTERCEPT)):
        e = np.zeros_like(SLOPE_AND_INTERCEPT)
        e[i] = h
        fd = (it(SLOPE_AND_INTERCEPT + e) - it(SLOPE_AND_INTERCEPT - e)) / (2 * h)
        assert abs(fd - ev.gradient[i]) <= K_SE * se[i]


def _fit_both(slopes, n, levels, seed):
    terms, X, y = simulate_slopes(n, list(levels), slopes=slopes, zipf=[0.8, 1.0],
                                  seed=seed)
    ex, opt_ex = fit_vector(VectorObjective(terms, X, y))
    assert opt_ex.converged
    it = VectorIterativeObjective(terms, X, y, n_probes=16, seed=0)
    ev, opt = fit_vector_iterative(it)
    return ex, ev, opt, it


@pytest.mark.parametrize(("slopes", "n", "levels"), [([True, True], 12000, (400, 80)),
                                             ([True, False], 20000, (900, 120))])
def test_fit_agrees_with_exact_within_mc_error(slopes, n, levels):
    ex, ev, opt, it = _fit_both(slopes, n, levels, seed=7)
    assert opt.converged, opt.message
    sd = np.sqrt(np.diag(ev.theta_mc_cov))
    assert np.all(sd > 0)
    assert np.all(np.abs(ev.theta - ex.theta) <= K_SE * sd + 1e-6)
    assert abs(ev.objective - ex.objective) <= K_SE * ev.objective_se
    # beta moves with theta_hat by far less than its sampling standard error
    assert np.all(np.abs(ev.beta - ex.beta) <= 0.25 * np.sqrt(np.diag(ex.beta_cov)))
    assert opt.check_pvalue is not None
    assert opt.check_pvalue > 1e-3
    info = protocol.solver_info(it)
    assert info["preconditioner"] == "block_jacobi"
    assert len(info["cg_iterations"]) == opt.n_evaluations == it.n_evaluations
    assert max(info["cg_iterations"]) < 100  # block-Jacobi: tens of iterations


def test_boundary_zero_slope_variance():
    """No slope variance in the data: the exact optimum has T_k's slope row at (almost)
    0 (its diagonal entry exactly 0) and so does the iterative fit, within its Monte
    Carlo error."""
    rng = np.random.default_rng(11)
    n, G, H = 10000, 400, 60
    g, h = rng.integers(0, G, n).astype(np.int32), rng.integers(0, H, n).astype(np.int32)
    x = rng.normal(size=n)
    y = 1 + 0.5 * x + rng.normal(size=G)[g] + 0.6 * rng.normal(size=H)[h] \
        + rng.normal(size=n)
    terms = [RandomEffectsTerm("g", g, pd.Index(range(G)), ("(Intercept)", "x"),
                               np.column_stack([np.ones(n), x])),
             RandomEffectsTerm("h", h, pd.Index(range(H)))]
    X = np.column_stack([np.ones(n), x])
    ex, opt_ex = fit_vector(VectorObjective(terms, X, y))
    assert opt_ex.converged
    assert ex.theta[2] == 0.0
    for seed in (0, 1):
        ev, opt = fit_vector_iterative(VectorIterativeObjective(terms, X, y, seed=seed))
        assert opt.converged, opt.message
        sd = np.sqrt(np.diag(ev.theta_mc_cov))
        assert np.all(np.abs(ev.theta - ex.theta) <= K_SE * sd + 1e-3)
        assert ev.theta[1] ** 2 + ev.theta[2] ** 2 < 1e-5  # slope variance ~ 0


def _slope_model(n=3000, levels=(80, 20), seed=4):
    terms, X, y = simulate_slopes(n, list(levels), slopes=[True, False], seed=seed)
    d = CrossedDesign.from_codes([t.codes for t in terms], names=[t.group for t in terms])
    return lmmops.LMM(d, X, y, fixef_names=["(Intercept)", "x"], terms=terms)


def test_preconditioner_kinds_for_intercepts_are_refused():
    for kind in ("jacobi", "amg", "spectral", "block_gauss_seidel"):
        with pytest.raises(ArgumentError, match="random-intercept"):
            check_slope_preconditioner(kind)
        with pytest.raises(ArgumentError, match="block_jacobi"):
            _slope_model().fit(solver="iterative", preconditioner=kind)
    with pytest.raises(ArgumentError, match="must be one of"):
        check_slope_preconditioner("cholesky")
    assert check_slope_preconditioner("auto") == "block_jacobi"


def test_lmm_iterative_slopes_result():
    model = _slope_model()
    res = model.fit(solver="iterative", preconditioner="auto")
    exact = _slope_model().fit(solver="direct")
    assert res.solver == "iterative"
    assert not res.exact
    assert res.solver_info["preconditioner"] == "block_jacobi"
    assert res.mc_stderr["loglik"] > 0
    se = res.mc_stderr["covariances"]
    assert set(se) == {"g1", "g2"}
    assert se["g1"].shape == (2, 2)
    assert set(res.mc_stderr["variances"]) == {"g2", "Residual"}
    for g in ("g1", "g2"):
        diff = (res.covariances[g] - exact.covariances[g]).abs().to_numpy()
        assert np.all(diff <= K_SE * se[g].to_numpy() + 1e-6)
    assert abs(res.variances["Residual"] - exact.variances["Residual"]) \
        <= K_SE * res.mc_stderr["variances"]["Residual"] + 1e-9
    assert any("block-Jacobi" in note for note in res.notes)
    assert res.theta_cov.shape == (4, 4)
    json_mc = res.to_dict()["mc_stderr"]
    assert json_mc["loglik"] == res.mc_stderr["loglik"]
    tab = res.residual_table()  # diag(P) by probes (tests/test_slope_iterative_diagnostics.py)
    assert (tab.diag_P_se > 0).all()
    assert np.isfinite(tab.studentized).all()


def test_auto_picks_iterative_for_a_large_schur_block(monkeypatch):
    import lmmops.model as model_mod

    monkeypatch.setattr(model_mod, "AUTO_DIRECT_MAX_SCHUR", 10)
    picked, reason = _slope_model().choose_solver("auto")
    assert picked == "iterative"
    assert "would be" in reason
    monkeypatch.setattr(model_mod, "AUTO_DIRECT_MAX_SCHUR", 8000)
    assert _slope_model().choose_solver("auto")[0] == "direct"


def test_deflation_rank_is_refused_for_slopes():
    with pytest.raises(ArgumentError, match="deflation_rank"):
        _slope_model().iterative_objective(deflation_rank=4)


def test_invalid_inputs():
    terms, X, y, _ = _design([True, False], n=400, levels=(20, 8))
    with pytest.raises(LmmopsError, match="n_probes"):
        VectorIterativeObjective(terms, X, y, n_probes=1)
    with pytest.raises(LmmopsError, match="rtol"):
        VectorIterativeObjective(terms, X, y, rtol=0.0)
    it = VectorIterativeObjective(terms, X, y)
    with pytest.raises(LmmopsError, match="theta"):
        it.evaluate(np.array([-1.0, 0.0, 1.0, 1.0]))


def test_one_term_is_exact_and_three_terms_agree():
    """One term: A is block diagonal, so block-Jacobi is exact (one CG iteration, no
    Monte Carlo error beyond round-off: A is formed on C's pattern and D from C's
    blocks, which may differ in the last bits); three terms with a slope-only
    ``(0 + x | g3)`` term agree with the exact solver within their errors."""
    terms, X, y = simulate_slopes(1500, [40, 15, 6], slopes=[True, False, False], seed=9)
    theta1 = np.array([0.9, 0.2, 0.5])
    ex = VectorObjective(terms[:1], X, y).evaluate(theta1)
    ev = VectorIterativeObjective(terms[:1], X, y, n_probes=4).evaluate(theta1)
    assert ev.objective_se <= 1e-12 * abs(ev.objective)
    assert ev.cg_iterations <= 2
    assert ev.objective == pytest.approx(ex.objective, abs=1e-8)
    np.testing.assert_allclose(ev.gradient, ex.gradient, atol=1e-6)
    x = X[:, 1]
    slope_only = RandomEffectsTerm("g3", terms[2].codes, terms[2].levels, ("x",), x[:, None])
    three = [terms[0], terms[1], slope_only]
    theta3 = np.array([0.9, 0.2, 0.5, 0.8, 0.3])
    ex = VectorObjective(three, X, y).evaluate(theta3)
    ev = VectorIterativeObjective(three, X, y, n_probes=32, seed=3).evaluate(theta3)
    assert abs(ev.objective - ex.objective) <= K_SE * ev.objective_se
    se = np.sqrt(np.diag(ev.gradient_cov))
    assert np.all(np.abs(ev.gradient - ex.gradient) <= K_SE * se + 1e-8)


def test_one_term_fit_converges_where_the_estimates_are_exact():
    """One slope term: block-Jacobi is A itself, the Monte Carlo error is ~0, and the fit
    must still end converged (it reported '8 Newton steps without convergence')."""
    rng = np.random.default_rng(3)
    n, g = 400, 20
    df = pd.DataFrame({"g": rng.integers(0, g, n), "x": rng.normal(size=n)})
    df["y"] = rng.normal(size=g)[df.g] + 0.5 * rng.normal(size=g)[df.g] * df.x + rng.normal(size=n)
    it = lmmops.fit("y ~ x + (1 + x | g)", df, solver="iterative")
    ex = lmmops.fit("y ~ x + (1 + x | g)", df, solver="direct")
    assert it.converged, it.notes
    np.testing.assert_allclose(it.theta.to_numpy(), ex.theta.to_numpy(), atol=1e-5)


@pytest.mark.parametrize("z_only", [False, True])
@pytest.mark.parametrize(("slopes", "theta"), CASES)
def test_pev_blocks_within_mc_error_of_the_exact(slopes, theta, z_only):
    """The BLUPs' prediction error covariances of the matrix-free solver (block-Jacobi
    control variate plus Rademacher probes) against the exact solver's at the same theta:
    every entry within 4 standard errors, and the errors honest (not all tiny)."""
    terms, X, y, _ = _design(slopes)
    exo = VectorObjective(terms, X, y)
    itb = VectorIterativeObjective(terms, X, y, n_probes=16, seed=5)
    ex_blocks = exo.pev_blocks(exo.evaluate(theta), z_only=z_only)
    est, err = protocol.pev_blocks(itb, itb.evaluate(theta), z_only=z_only)
    for a, b, e in zip(ex_blocks, est, err):
        assert a.shape == b.shape == e.shape
        assert np.all(np.abs(b - a) <= K_SE * e + 1e-9 * np.abs(a).max())
        np.testing.assert_allclose(b, np.swapaxes(b, 1, 2))
        # honest, nonzero errors (64 probes: 5-25 % of the diagonal entries here, the
        # most for the levels with the most rows, whose PEV is smallest)
        assert np.all(np.isfinite(e))
        assert np.all(np.diagonal(e, axis1=1, axis2=2) > 0)
        assert np.median(np.diagonal(e, axis1=1, axis2=2) / np.diagonal(a, axis1=1,
                                                                          axis2=2)) < 0.5
    # the level diagonal (spherical) has the same standard errors' shape, one per effect
    d = protocol.level_diagonal_inverse(itb, itb.evaluate(theta), z_only=z_only)
    assert d.estimate.shape == d.stderr.shape == (itb.q,)


def test_iterative_ranef_pev_in_the_result():
    model = _slope_model()
    res = model.fit(solver="iterative")
    pev = res.ranef_pev_blocks()
    assert set(pev) == {"g1", "g2"}
    assert np.all(np.asarray(pev["g2"]) > 0)


def test_newton_steps_that_raise_the_criterion_are_halved():
    """A full Newton step on a poor Jacobian once sent three of four parameters to the
    boundary (criterion 9637 against the exact 7624, seed 3, a 9-level term); with the
    step kept only where the criterion stays within its Monte Carlo error, the fit
    converges near the exact optimum."""
    df = nine_level_frame()
    formula = "y ~ x + (1 + x|g) + (1|h)"
    exact = lmmops.fit(formula, df)
    res = lmmops.fit(formula, df, solver="iterative", seed=3)
    assert res.converged
    assert abs(res.loglik - exact.loglik) <= 5.0 * res.mc_stderr["loglik"]
    assert np.all(res.theta.to_numpy()[[0, 2, 3]] > 0.3)  # not on the boundary


@pytest.mark.parametrize("method", ["REML", "ML"])
@pytest.mark.parametrize("weights", [False, True])
@pytest.mark.parametrize(("slopes", "theta"), CASES)
def test_average_information_equals_the_exact_solver(method, weights, slopes, theta):
    # no probes enter it: exact given the solves (the AI solve's rtol 1e-6)
    terms, X, y, w = _design(slopes, weights=weights)
    ex = VectorObjective(terms, X, y, method=method, weights=w)
    it = VectorIterativeObjective(terms, X, y, method=method, weights=w, n_probes=8, seed=5)
    e1, e2 = ex.evaluate(theta), it.evaluate(theta)
    A1, A2 = ex.average_information(e1), it.average_information(e2)
    np.testing.assert_allclose(A2, A1, rtol=2e-5, atol=2e-5 * np.abs(A1).max())
    assert np.all(np.linalg.eigvalsh(A2) > 0)
    with pytest.raises(LmmopsError, match="sol_x"):
        it.average_information(e1)


def test_ai_newton_and_lbfgsb_reach_the_same_optimum_ai_with_fewer_evaluations():
    terms, X, y, _ = _design([True, False], n=20000, levels=(2000, 80), seed=4)
    fits = {}
    for name in ("ai-newton", "lbfgsb"):
        it = VectorIterativeObjective(terms, X, y, n_probes=16, seed=2)
        fits[name] = fit_vector_iterative(it, optimizer=name)
    (ea, oa), (el, ol) = fits["ai-newton"], fits["lbfgsb"]
    assert oa.converged
    assert ol.converged
    assert oa.optimizer.startswith("AI-Newton +")
    # the same fixed-probe root g_W = 0: within a Monte Carlo sd (each stops at 0.05 sd)
    sd = np.sqrt(np.diag(ea.theta_mc_cov))
    assert np.all(np.abs(ea.theta - el.theta) <= 0.2 * sd + 1e-9)
    assert ea.objective == pytest.approx(el.objective, abs=0.1 * ea.objective_se)
    # and near the exact optimum
    exact, _ = fit_vector(VectorObjective(terms, X, y))
    samp = np.sqrt(np.diag(2.0 * np.linalg.inv(ea.hessian)))
    assert np.all(np.abs(ea.theta - exact.theta) <= 4.0 * np.hypot(sd, 0.5 * samp))
    assert oa.n_evaluations < ol.n_evaluations
    with pytest.raises(LmmopsError, match="unknown optimizer"):
        fit_vector_iterative(VectorIterativeObjective(terms, X, y, n_probes=4),
                             optimizer="nelder-mead")


@pytest.mark.slow
def test_fit_agrees_with_exact_within_mc_error_at_a_million_rows():
    """The issue-14 acceptance at 10^6 rows: two crossed slope terms, 5,000 x 400 Zipf
    levels; theta and the criterion within ``K_SE`` Monte Carlo standard errors of the
    exact optimum."""
    ex, ev, opt, _ = _fit_both([True, True], 10**6, (5000, 400), seed=3)
    assert opt.converged, opt.message
    sd = np.sqrt(np.diag(ev.theta_mc_cov))
    assert np.all(np.abs(ev.theta - ex.theta) <= K_SE * sd + 1e-6)
    assert abs(ev.objective - ex.objective) <= K_SE * ev.objective_se
