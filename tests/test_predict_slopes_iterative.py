"""Prediction intervals after a matrix-free random-slope fit (solver="iterative", issue
14): ``VectorIterativeObjective.quadratic_rows`` by block PCG solves in level space.

Oracles:

- the quadratic forms ``g' Omega^{-1} g`` (``g = [Lambda' z; x]``) against dense linear
  algebra and against the exact objective's at the same theta (weights, unseen levels,
  with and without ``X``), to the CG tolerance (no probes: no Monte Carlo error);
- sleepstudy (one term: the iterative fit carries no Monte Carlo error) against the exact
  solver's intervals;
- a crossed design: the iterative fit's intervals against the exact objective at the fit's
  own theta (to the CG tolerance), and against the exact fit's within 4 stated Monte Carlo
  errors (the fit's Monte Carlo covariance of theta carried to each standard error by
  finite differences of the exact intervals in theta).
"""

import copy

import numpy as np
import pytest
from designs import slope_frame
from hypothesis import given, settings
from hypothesis import strategies as st

import lmmops
from lmmops.analysis.predict import predict
from lmmops.data.simulate import simulate_slopes
from lmmops.estimation.vector import VectorObjective, random_effects_matrix
from lmmops.estimation.vector_iterative import VectorIterativeObjective

SLEEP = "Reaction ~ Days + (Days | Subject)"
CROSSED = "y ~ x + (1 + x | g) + (1 | h)"


@settings(max_examples=12, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 40), st.booleans(), st.booleans())
def test_quadratic_rows_equal_dense_and_the_exact_objective(seed, n_new, weighted, with_x):
    """New rows (random levels, some unseen, random slope values and fixed-effects rows):
    ``g' Omega^{-1} g`` with ``Omega = [[Lambda'Z'WZ Lambda + I, Lambda'Z'WX],
    [X'WZ Lambda, X'WX]]`` by dense inversion, the exact objective's quadratic_rows, and
    the matrix-free one (CG rtol 1e-12; in chunks of 7 rows) agree within 1e-8."""
    rng = np.random.default_rng(seed)
    terms, X, y = simulate_slopes(300, [15, 6], seed=int(rng.integers(1 << 30)))
    w = rng.uniform(0.5, 2.0, 300) if weighted else None
    theta = np.array([rng.uniform(0.3, 1.2), rng.normal(0, 0.3), rng.uniform(0.1, 0.8),
                      rng.uniform(0.2, 1.0)])
    it = VectorIterativeObjective(terms, X, y, weights=w, n_probes=4, seed=1, rtol=1e-12)
    ex = VectorObjective(terms, X, y, weights=w)
    ev_it, ev_ex = it.evaluate(theta, gradient=False), ex.evaluate(theta, gradient=False)
    codes = [rng.integers(-1, t.n_levels, n_new) for t in terms]
    xnew = rng.normal(size=n_new)
    values = [np.column_stack([np.ones(n_new), xnew]) if t.values is not None else None
              for t in terms]
    Xnew = np.column_stack([np.ones(n_new), xnew]) if with_x else None
    got = it.quadratic_rows(ev_it, codes, values, Xnew, chunk=7)
    np.testing.assert_allclose(got, ex.quadratic_rows(ev_ex, codes, values, Xnew),
                               rtol=1e-8)
    # dense oracle
    Z = random_effects_matrix(terms).toarray()
    Lam = ex._lambda(theta).toarray()
    W = np.ones(300) if w is None else w
    ZL = Z @ Lam
    A = ZL.T @ (W[:, None] * ZL) + np.eye(ex.q)
    if with_x:
        B = ZL.T @ (W[:, None] * X)
        Om = np.block([[A, B], [B.T, X.T @ (W[:, None] * X)]])
    else:
        Om = A
    for i in range(n_new):
        z = np.zeros(ex.q)
        for k, t in enumerate(terms):
            if codes[k][i] < 0:
                continue
            o = ex.offsets[k] + codes[k][i] * t.dim
            z[o:o + t.dim] = values[k][i] if values[k] is not None else 1.0
        g = Lam.T @ z
        if with_x:
            g = np.concatenate([g, Xnew[i]])
        assert got[i] == pytest.approx(g @ np.linalg.solve(Om, g), rel=1e-8, abs=1e-14)


def _new_rows(df, group, col, step):
    new = df.iloc[::step].copy()
    new[col] = new[col] + 0.5
    new[group] = new[group].astype(str)
    new.loc[new.index[0], group] = "unseen"  # the population prediction plus its variance
    return new


def test_sleepstudy_intervals_equal_the_exact_solvers(sleepstudy):
    """One term (no Monte Carlo error): the confidence and prediction intervals and the
    population-level ones equal the exact fit's within 1e-6 relative (the two optima
    differ by the optimisers' tolerances; before: AttributeError)."""
    it = lmmops.fit(SLEEP, sleepstudy, solver="iterative")
    ex = lmmops.fit(SLEEP, sleepstudy, solver="direct")
    assert it.converged
    assert ex.converged
    new = _new_rows(sleepstudy, "Subject", "Days", 9)
    for interval in ("confidence", "prediction"):
        for random in (True, False):
            a = predict(it, new, random=random, interval=interval)
            b = predict(ex, new, random=random, interval=interval)
            for col in ("fit", "se", "lower", "upper"):
                np.testing.assert_allclose(a[col], b[col], rtol=1e-6, err_msg=col)
    a = it.predict(new, interval="prediction")
    assert np.all(a["se"] > it.sigma)


def _at_exact(res, theta):
    """A copy of the iterative result whose objective is the exact one at ``theta``."""
    out = copy.copy(res)
    obj = res.model.objective(res.method).conditioned
    out._objective = obj
    out.evaluation = obj.evaluate(np.asarray(theta, dtype=np.float64), gradient=False)
    return out


@pytest.fixture(scope="module")
def crossed():
    return slope_frame(1200, 30, 12, seed=8)


def test_crossed_intervals_to_cg_tolerance_and_within_monte_carlo_error(crossed):
    """Crossed design with Monte Carlo error: (a) the iterative fit's intervals equal the
    exact objective's at the fit's own theta within 1e-6 (the CG tolerance: beta, s^2,
    the BLUPs and the quadratic forms are exact given theta); (b) its standard errors
    equal the exact fit's within 4 stated Monte Carlo errors (the fit's ``J C J'``,
    ``C`` its Monte Carlo covariance of theta, ``J`` central differences of the exact
    standard errors in theta) plus 1e-6."""
    res = lmmops.fit(CROSSED, crossed, method="ML", solver="iterative")
    ex = lmmops.fit(CROSSED, crossed, method="ML", solver="direct")
    assert res.converged, res.notes
    new = _new_rows(crossed, "g", "x", 37)
    got = predict(res, new, interval="prediction")
    want = predict(_at_exact(res, res.evaluation.theta), new, interval="prediction")
    for col in ("fit", "se"):
        np.testing.assert_allclose(got[col], want[col], rtol=1e-6, err_msg=col)
    conf = predict(res, new, interval="confidence")
    conf_ex = predict(_at_exact(res, res.evaluation.theta), new, interval="confidence")
    np.testing.assert_allclose(conf["se"], conf_ex["se"], rtol=1e-6)
    # (b) the Monte Carlo error of theta carried to each standard error
    theta = res.evaluation.theta
    C = res.evaluation.theta_mc_cov
    J = np.empty((len(new), theta.size))
    for j in range(theta.size):
        h = 1e-4 * max(1.0, abs(theta[j]))
        e = np.zeros(theta.size)
        e[j] = h
        hi = predict(_at_exact(res, theta + e), new, interval="confidence")["se"]
        lo = predict(_at_exact(res, theta - e), new, interval="confidence")["se"]
        J[:, j] = (hi - lo) / (2 * h)
    mc = np.sqrt(np.einsum("ij,jk,ik->i", J, C, J))
    assert np.all(mc > 0)
    se_ex = predict(ex, new, interval="confidence")["se"].to_numpy()
    gap = np.abs(conf["se"].to_numpy() - se_ex)
    assert np.all(gap <= 4.0 * mc + 1e-6 * se_ex), gap / mc
