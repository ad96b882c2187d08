"""The exact solver against dense linear algebra on small unbalanced designs."""

import numpy as np
import pytest
from scipy import optimize

from lmmops.data.design import CrossedDesign
from lmmops.errors import ConvergenceWarning
from lmmops.estimation.direct import DirectObjective, fit_direct, moment_start


def make_design(rng, n_levels, n_obs, missing=0.4):
    """Random unbalanced design: missing cells, some levels with one observation."""
    K = len(n_levels)
    while True:
        codes = np.vstack([rng.integers(0, q, n_obs) for q in n_levels])
        if K >= 2 and missing:
            keep = rng.random(n_levels[:2]) > missing
            ok = keep[codes[0], codes[1]]
            codes = codes[:, ok]
        # a level with exactly one observation in the last factor
        last = codes[-1]
        counts = np.bincount(last, minlength=n_levels[-1])
        if np.all(np.array([np.bincount(c, minlength=q).min() for c, q in
                            zip(codes, n_levels)]) > 0) and counts.min() >= 1:
            rows = np.flatnonzero(last == 0)
            if rows.size > 1:
                codes = np.delete(codes, rows[1:], axis=1)
            if all(np.bincount(c, minlength=q).min() > 0 for c, q in zip(codes, n_levels)):
                return CrossedDesign.from_codes(codes, names=[f"f{k}" for k in range(K)])


def dense_parts(design, theta):
    """V0 = I + Z Lambda^2 Z' densely."""
    n = design.n_obs
    V0 = np.eye(n)
    for k in range(design.n_factors):
        Z = design.indicator(k).toarray()
        V0 += theta[k] ** 2 * Z @ Z.T
    return V0


def dense_criterion(design, X, y, theta, method):
    n, p = X.shape
    V0 = dense_parts(design, theta)
    Vi = np.linalg.inv(V0)
    XtViX = X.T @ Vi @ X
    beta = np.linalg.solve(XtViX, X.T @ Vi @ y)
    r = y - X @ beta
    r2 = r @ Vi @ r
    ld = np.linalg.slogdet(V0)[1]
    if method == "REML":
        dof = n - p
        return ld + np.linalg.slogdet(XtViX)[1] + dof * (1 + np.log(2 * np.pi * r2 / dof))
    return ld + n * (1 + np.log(2 * np.pi * r2 / n))


CASES = [
    ((9,), 60),
    ((8, 5), 90),
    ((7, 5, 3), 110),
    ((12, 4), 70),
]


@pytest.fixture(params=CASES, ids=lambda c: "x".join(map(str, c[0])))
def problem(request):
    rng = np.random.default_rng(abs(hash(request.param[0])) % 2**32)
    n_levels, n_obs = request.param
    d = make_design(rng, n_levels, n_obs)
    n = d.n_obs
    X = np.column_stack([np.ones(n), rng.normal(size=n), rng.integers(0, 2, n)])
    y = X @ [1.0, 0.5, -0.3] + rng.normal(size=n)
    for k in range(d.n_factors):
        y += rng.normal(scale=0.8, size=d.n_levels[k])[d.codes[k]]
    return d, X, y


@pytest.mark.parametrize("method", ["REML", "ML"])
def test_criterion_matches_dense(problem, method):
    d, X, y = problem
    obj = DirectObjective(d, X, y, method)
    rng = np.random.default_rng(3)
    for _ in range(3):
        theta = rng.uniform(0.05, 2.0, d.n_factors)
        np.testing.assert_allclose(obj(theta), dense_criterion(d, X, y, theta, method),
                                   rtol=1e-11)
    # a boundary point
    theta = np.full(d.n_factors, 0.7)
    theta[0] = 0.0
    np.testing.assert_allclose(obj(theta), dense_criterion(d, X, y, theta, method), rtol=1e-11)


@pytest.mark.parametrize("method", ["REML", "ML"])
def test_gradient_matches_finite_difference(problem, method):
    d, X, y = problem
    obj = DirectObjective(d, X, y, method)
    theta = np.linspace(0.3, 1.4, d.n_factors)
    g = obj.evaluate(theta).gradient
    h = 1e-6
    fd = np.array([(obj(theta + h * e) - obj(theta - h * e)) / (2 * h)
                   for e in np.eye(d.n_factors)])
    np.testing.assert_allclose(g, fd, rtol=1e-5, atol=1e-6)


def test_estimates_match_dense_gls_and_blups(problem):
    d, X, y = problem
    obj = DirectObjective(d, X, y, "REML")
    theta = np.linspace(0.4, 1.1, d.n_factors)
    ev = obj.evaluate(theta)
    V0 = dense_parts(d, theta)
    Vi = np.linalg.inv(V0)
    XtViX = X.T @ Vi @ X
    beta = np.linalg.solve(XtViX, X.T @ Vi @ y)
    np.testing.assert_allclose(ev.beta, beta, rtol=1e-10)
    n, p = X.shape
    r = y - X @ beta
    sigma2 = (r @ Vi @ r) / (n - p)
    np.testing.assert_allclose(ev.sigma2, sigma2, rtol=1e-10)
    np.testing.assert_allclose(ev.beta_cov, sigma2 * np.linalg.inv(XtViX), rtol=1e-9)
    # BLUPs b_k = s_k^2 Z_k' V^{-1} (y - X beta) = theta_k^2 Z_k' V0^{-1} r
    for k in range(d.n_factors):
        Z = d.indicator(k).toarray()
        blup = theta[k] ** 2 * Z.T @ (Vi @ r)
        np.testing.assert_allclose(theta[k] * ev.v[k], blup, rtol=1e-9, atol=1e-12)
    # log-determinants: log|V0| and log|R_X|^2 = log|X'V0^{-1}X|
    np.testing.assert_allclose(ev.logdet_L, np.linalg.slogdet(V0)[1], rtol=1e-11)
    np.testing.assert_allclose(ev.logdet_RX, np.linalg.slogdet(XtViX)[1], rtol=1e-10)


def test_average_information_matches_dense(problem):
    d, X, y = problem
    obj = DirectObjective(d, X, y, "REML")
    theta = np.linspace(0.5, 1.2, d.n_factors)
    ev = obj.evaluate(theta)
    s2 = ev.sigma2
    V = s2 * dense_parts(d, theta)
    Vi = np.linalg.inv(V)
    P = Vi - Vi @ X @ np.linalg.solve(X.T @ Vi @ X, X.T @ Vi)
    Py = P @ y
    Vdots = [d.indicator(k).toarray() @ d.indicator(k).toarray().T
             for k in range(d.n_factors)] + [np.eye(d.n_obs)]
    W = np.column_stack([Vd @ Py for Vd in Vdots])
    AI = 0.5 * W.T @ P @ W
    np.testing.assert_allclose(obj.average_information(ev), AI, rtol=1e-9)


def test_fit_reaches_dense_optimum(problem):
    d, X, y = problem
    obj = DirectObjective(d, X, y, "REML")
    ev, opt = fit_direct(obj, moment_start(d, X, y))
    assert opt.converged
    best = min(
        (optimize.minimize(lambda t: dense_criterion(d, X, y, np.abs(t), "REML"), x0,
                           method="Nelder-Mead",
                           options=dict(xatol=1e-9, fatol=1e-12, maxiter=4000))
         for x0 in (np.full(d.n_factors, 0.5), np.full(d.n_factors, 1.5))),
        key=lambda r: r.fun,
    )
    assert ev.objective <= best.fun + 1e-7
    assert opt.iterations <= 30


def test_singular_fit_reports_zero_variance():
    rng = np.random.default_rng(11)
    n = 400
    a = rng.integers(0, 20, n)
    b = rng.integers(0, 4, n)
    y = rng.normal(size=20)[a] + rng.normal(size=n)
    # make every level mean of b identical, so its REML variance estimate is exactly 0
    for j in range(4):
        m = b == j
        y[m] += 5.0 - y[m].mean()
    d = CrossedDesign.from_codes([a, b], names=["a", "b"])
    X = np.ones((n, 1))
    obj = DirectObjective(d, X, y, "REML")
    ev, opt = fit_direct(obj, np.array([1.0, 1.0]))
    assert ev.theta[1] == 0.0
    assert ev.theta[0] > 0.3
    assert opt.converged
    # the boundary optimum is a true minimum: a small positive theta_b is worse
    assert obj(np.array([ev.theta[0], 1e-3])) > ev.objective


def test_rank_deficient_trial_point_is_rejected_not_raised():
    """Huge steps can make the X block numerically singular; the line search backs off."""
    rng = np.random.default_rng(5)
    codes = [np.repeat(np.arange(24), 6), np.tile(np.arange(6), 24)]
    d = CrossedDesign.from_codes(codes, names=["plate", "sample"])
    y = 23 + rng.normal(size=24)[codes[0]] + 2 * rng.normal(size=6)[codes[1]] \
        + 0.5 * rng.normal(size=144)
    obj = DirectObjective(d, np.ones((144, 1)), y, "ML")
    with np.errstate(all="ignore"):
        ev, opt = fit_direct(obj, np.array([0.05, 0.05]))
    assert opt.converged


def test_nonconvergence_is_reported():
    rng = np.random.default_rng(2)
    d = make_design(rng, (8, 5), 90)
    X = np.ones((d.n_obs, 1))
    y = rng.normal(size=d.n_obs) + rng.normal(size=8)[d.codes[0]]
    obj = DirectObjective(d, X, y, "REML")
    with pytest.warns(ConvergenceWarning, match="did not converge"):
        _, opt = fit_direct(obj, np.array([5.0, 5.0]), maxiter=1)
    assert not opt.converged


@pytest.mark.parametrize("seed", [2, 13, 18])
def test_optimum_does_not_depend_on_the_start(seed):
    """Regression: a step used to clip a small variance to exactly 0, where the gradient of
    the (even) criterion vanishes, and the optimiser stalled there."""
    from lmmops.data.simulate import simulate_codes

    codes = simulate_codes(600, [40, 15, 5], zipf=[0.5, 0.5, 0], seed=seed)
    d = CrossedDesign.from_codes(codes)
    rng = np.random.default_rng(seed)
    y = (rng.normal(size=40)[codes[0]] + 0.3 * rng.normal(size=15)[codes[1]]
         + 0.05 * rng.normal(size=5)[codes[2]] + rng.normal(size=600))
    X = np.ones((600, 1))
    obj = DirectObjective(d, X, y)
    ref, _ = fit_direct(obj, moment_start(d, X, y))
    assert ref.theta[2] > 0
    for start in (np.ones(3), np.full(3, 5.0), np.array([1.0, 1.0, 0.0])):
        ev, opt = fit_direct(obj, start)
        assert opt.converged
        assert ev.objective == pytest.approx(ref.objective, abs=1e-6)
        np.testing.assert_allclose(ev.theta, ref.theta, rtol=1e-3)


def test_factor_is_the_dense_schur_cholesky_and_survives_later_evaluations(problem):
    """The blocked factor equals numpy's Cholesky of the dense Schur block (upper
    triangle zero), and an Evaluation keeps it: criterion-only evaluations factor in the
    objective's scratch block, later evaluations in new ones."""
    from lmmops.estimation.direct import leading_cho_solve

    d, X, y = problem
    obj = DirectObjective(d, X, y, "REML")
    theta = np.linspace(0.4, 1.3, d.n_factors)
    ev = obj.evaluate(theta)
    L = ev.factor[0].copy()
    # the dense Schur block: Omega = [[Lam Z'Z Lam + I, Lam Z'[X y]], [., [X y]'[X y]]],
    # the first factor eliminated
    f, rest = obj.first, obj.rest
    Z = [d.indicator(k).toarray() for k in range(d.n_factors)]
    Zr = np.hstack([theta[k] * Z[k] for k in rest]) if rest else np.zeros((d.n_obs, 0))
    W = np.hstack([Zr, X, y[:, None]])
    Z1 = theta[f] * Z[f]
    A11 = Z1.T @ Z1 + np.eye(Z1.shape[1])
    Om = W.T @ W
    Om[:obj.qr, :obj.qr] += np.eye(obj.qr)
    S = Om - (W.T @ Z1) @ np.linalg.solve(A11, Z1.T @ W)
    np.testing.assert_allclose(L, np.linalg.cholesky(S), rtol=1e-10, atol=1e-12)
    assert np.all(np.triu(L, 1) == 0.0)
    # later evaluations leave ev's factor alone; its solves still match dense ones
    for t in (0.5 * theta, 2.0 * theta):
        obj.criterion(t)
        obj.evaluate(t)
    np.testing.assert_array_equal(ev.factor[0], L)
    mp = obj.qr + obj.p
    b = np.random.default_rng(1).normal(size=(mp, 2))
    np.testing.assert_allclose(leading_cho_solve(ev.factor[0], mp, b),
                               np.linalg.solve(S[:mp, :mp], b), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(leading_cho_solve(ev.factor[0], obj.qr, b[:obj.qr]),
                               np.linalg.solve(S[:obj.qr, :obj.qr], b[:obj.qr]),
                               rtol=1e-9, atol=1e-12)
