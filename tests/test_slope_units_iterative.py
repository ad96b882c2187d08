"""A slope covariate's origin: the matrix-free slope fit centres an off-centre slope column
inside the fit, as the exact fit does (lmmops.estimation.centring), and reports
everything of the columns as given.

Moving the origin of ``x`` (``x + c``) in ``(1 + x | g)`` is the same model with the
coefficients ``N^{-1} b`` (``N = [[1, c], [0, 1]]``), so the covariance of the original
coefficients is ``N S N'`` (``_in_original_x``). Oracles:

- sleepstudy (one term): block-Jacobi is ``A`` itself, so the matrix-free estimates carry
  no Monte Carlo error (their stated errors are ~1e-15) and the fit must equal the fit of
  ``Days`` and the exact solver's on the same shifted data to the optimiser's and the
  finite differences' precision;
- a crossed design (tests/designs.py): the fit of the unshifted ``x`` within the stated
  Monte Carlo errors; the exact objective at the fit's own ``theta`` for what is exact
  given ``theta`` (BLUPs, fitted values) or has its own stated error (``diag(P)``, the
  prediction error covariances); the fit of the column centred by hand (no centring
  inside: the twin's data) mapped by the closed form of ``N`` for the Wald covariances.
"""

import numpy as np
import pytest
from designs import slope_frame

import lmmops
from lmmops.analysis.predict import predict
from lmmops.data.terms import centring_shifts
from lmmops.estimation.protocol import pev_blocks

SLEEP = "Reaction ~ Days + (Days | Subject)"
CROSSED = "y ~ x + (1 + x | g) + (1 | h)"


@pytest.fixture(scope="module")
def sleep_base(sleepstudy):
    return lmmops.fit(SLEEP, sleepstudy, solver="iterative")


@pytest.fixture(scope="module")
def crossed():
    return slope_frame(300, 12, 7, seed=11, intercept=2.0, h_label="h{}")


@pytest.fixture(scope="module")
def crossed_base(crossed):
    return lmmops.fit(CROSSED, crossed, method="ML", solver="iterative")


def _shifted(df, col, c):
    out = df.copy()
    out[col] = out[col] + c
    return out


def _in_original_x(S, c):
    """The covariance of (intercept, slope) of the original x from that of x + c."""
    N = np.array([[1.0, c], [0.0, 1.0]])
    return N @ S @ N.T


def _entries_to_user(c):
    """The closed form of the map of (var0, var1, cov01) of x - m to those of x - m + c
    (``Sigma_u = G Sigma G'``, ``G = [[1, -c], [0, 1]]``)."""
    return np.array([[1.0, c * c, -2.0 * c],
                     [0.0, 1.0, 0.0],
                     [0.0, -c, 1.0]])


def _within(got, want, tol):
    """Elementwise ``|got - want| <= tol`` (``tol`` broadcast), with the worst ratio."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    ratio = np.abs(got - want) / np.asarray(tol, dtype=np.float64)
    assert np.all(ratio <= 1.0), f"worst |got - want| / tol = {float(np.max(ratio)):.3g}"


def _centred_note(res):
    return any("centred inside the fit" in n for n in res.notes)


def test_plain_days_is_not_centred(sleepstudy, sleep_base):
    """Days (mean 4.5, 1.6 spreads) is below CENTRE_RATIO: the fit is the one it was."""
    model = lmmops.LMM.from_formula(SLEEP, sleepstudy)
    assert centring_shifts(model.terms) is None
    assert not _centred_note(sleep_base)
    assert getattr(sleep_base.evaluation, "centred", None) is None
    assert sleep_base.converged, sleep_base.notes
    assert len(sleep_base.solver_info["cg_iterations"]) == sleep_base.n_evaluations


@pytest.mark.parametrize("c", [1e4, 1e5, 1e6])
def test_shifted_days_fits_as_days(sleepstudy, sleep_base, c):
    """Days + 1e4 .. 1e6 (3.5e3 to 3.5e5 spreads from 0): the same covariance of the
    original coefficients, fixed slope, residual variance and criterion as Days. The
    stated Monte Carlo errors are zero to rounding (one term), so the tolerances are the
    optimiser's (its Newton steps stop at 1e-6 of theta) and, at 1e6 for the
    covariances mapped here by N S N', the rounding of that map (about 1e-5)."""
    res = lmmops.fit(SLEEP, _shifted(sleepstudy, "Days", c), solver="iterative")
    assert _centred_note(res)
    assert getattr(res.evaluation, "centred", None) is not None
    mc = res.mc_stderr["covariances"]["Subject"].to_numpy()
    assert np.all(mc <= 1e-9 * np.abs(res.covariances["Subject"].to_numpy()).max())
    base_S = sleep_base.covariances["Subject"].to_numpy()
    rel = 1e-6 if c <= 1e5 else 2e-5  # measured 3.4e-9, 5.9e-8, 5.7e-6
    np.testing.assert_allclose(_in_original_x(res.covariances["Subject"].to_numpy(), c),
                               base_S, rtol=rel, atol=rel * np.abs(base_S).max())
    assert res.sigma == pytest.approx(sleep_base.sigma, rel=rel)
    assert res.fixef["Days"] == pytest.approx(sleep_base.fixef["Days"], rel=rel)
    assert res.n_evaluations <= sleep_base.n_evaluations + 2
    assert len(res.solver_info["cg_iterations"]) == res.n_evaluations
    # converged at 1e6 too: the criterion on the columns as given is within its rounding
    # bound (eps (c / s)^2 of it), and the one reported is the centred twin's
    assert res.converged, (res.optsum.message, res.notes)
    assert res.loglik == pytest.approx(sleep_base.loglik, rel=1e-10)


@pytest.mark.parametrize("c", [1e4, 1e5])
def test_shifted_days_downstream_matches_the_exact_solver(sleepstudy, sleep_base, c):
    """Wald covariances, theta_cov, BLUPs, fitted values, diag(P) and the prediction
    error variances of the iterative fit on Days + c against the exact solver's on the
    same data; the slope variance's and the residual's Wald errors (invariant under the
    shift) against the fit of Days."""
    df = _shifted(sleepstudy, "Days", c)
    res = lmmops.fit(SLEEP, df, solver="iterative")
    ex = lmmops.fit(SLEEP, df, solver="direct")
    assert res.converged, res.notes
    assert ex.converged, ex.notes
    # the Jacobian of the fixed-probe gradient (forward differences, 1e-4) against the
    # exact Hessian (forward differences, 1e-5): the same to about 1e-4
    vi, ve = res.variances_cov.to_numpy(), ex.variances_cov.to_numpy()
    np.testing.assert_allclose(np.sqrt(np.diag(vi)), np.sqrt(np.diag(ve)), rtol=1e-3)
    _within(vi, ve, 3e-3 * np.sqrt(np.outer(np.diag(ve), np.diag(ve))))
    vb = sleep_base.variances_cov
    for name in ("Subject.Days", "Residual"):
        assert np.sqrt(res.variances_cov.loc[name, name]) == pytest.approx(
            np.sqrt(vb.loc[name, name]), rel=1e-3)
    ti, te = np.diag(res.theta_cov.to_numpy()), np.diag(ex.theta_cov.to_numpy())
    assert np.all(ti > 0)
    assert np.all(te > 0)
    np.testing.assert_allclose(ti, te, rtol=3e-3)
    bi, be = res.ranef["Subject"].to_numpy(), ex.ranef["Subject"].to_numpy()
    _within(bi, be, 1e-6 * np.abs(be).max(axis=0))
    # both on the columns as given: their rounding, about 1e-8 of the values at 1e5
    _within(res.fitted, ex.fitted, 1e-7 * np.abs(ex.fitted).max())
    ti_, te_ = res.residual_table(), ex.residual_table()
    z = np.abs(ti_.diag_P - te_.diag_P) / ti_.diag_P_se
    assert float(z.max()) < 5.0
    pi, pe = res.ranef_pev()["Subject"].to_numpy(), ex.ranef_pev()["Subject"].to_numpy()
    np.testing.assert_allclose(pi, pe, rtol=1e-5)
    new = df.iloc[::7].copy()
    new["Days"] = new.Days + 0.5  # new rows, the term's columns built from the formula
    np.testing.assert_allclose(predict(res, new), predict(ex, new), rtol=1e-7)


@pytest.mark.parametrize("c", [1e4, 1e5])
def test_crossed_shifted_fit_within_monte_carlo_error(crossed, crossed_base, c):
    """A crossed design with Monte Carlo error: the fit of x + c (centred inside, a path
    with other numbers than the fit of x) equals the fit of x within 4 combined stated
    Monte Carlo standard errors, for the covariance of the original coefficients, the
    crossed factor's variance and the log-likelihood."""
    res = lmmops.fit(CROSSED, _shifted(crossed, "x", c), method="ML", solver="iterative")
    assert res.converged, res.notes
    assert _centred_note(res)
    base = crossed_base
    se = np.sqrt(2.0) * base.mc_stderr["covariances"]["g"].to_numpy()
    assert np.all(se > 0)
    S = _in_original_x(res.covariances["g"].to_numpy(), c)
    assert np.all(np.abs(S - base.covariances["g"].to_numpy()) <= 4.0 * se)
    se_h = np.hypot(res.mc_stderr["variances"]["h"], base.mc_stderr["variances"]["h"])
    assert abs(res.variances["h"] - base.variances["h"]) <= 4.0 * se_h
    se_l = np.hypot(res.mc_stderr["loglik"], base.mc_stderr["loglik"])
    assert abs(res.loglik - base.loglik) <= 4.0 * se_l + res.optsum.loglik_shortfall \
        + base.optsum.loglik_shortfall
    # the stated Monte Carlo errors are of the columns as given: the slope's (invariant)
    # as the unshifted fit's, the intercept's at 0 (c spreads away) c^2 times it
    mc = res.mc_stderr["covariances"]["g"].to_numpy()
    assert mc[1, 1] == pytest.approx(base.mc_stderr["covariances"]["g"].iloc[1, 1], rel=0.05)
    assert mc[0, 0] == pytest.approx(c * c * mc[1, 1], rel=0.05)
    assert len(res.solver_info["cg_iterations"]) == res.n_evaluations


def test_crossed_shifted_downstream_on_the_users_columns(crossed):
    """x + 1e4 on the crossed design: what is exact given theta against the exact
    objective on the same data at the fit's theta (BLUPs and fitted values to the CG
    tolerance; diag(P) and the prediction error covariances within their stated
    errors); the Wald covariances against the fit of the column centred by hand (the
    twin's data, no centring inside) mapped by the closed form."""
    c = 1e4
    df = _shifted(crossed, "x", c)
    model = lmmops.LMM.from_formula(CROSSED, df, method="ML")
    res = model.fit(solver="iterative")
    assert res.converged, res.notes
    ev = res.evaluation
    obj = model.objective("ML").conditioned
    ev_ex = obj.evaluate(ev.theta)
    s = model.conditioning.scale
    for k, t in enumerate(model.terms):
        T = t.relative_factor(ev_ex.theta[obj.layout[k]])
        b = s * np.asarray(ev_ex.v[k]).reshape(t.n_levels, t.dim) @ T.T
        got = res.ranef[t.group]
        got = got.to_numpy().reshape(b.shape)
        _within(got, b, 1e-6 * np.abs(b).max(axis=0))
    fitted = model.y - s * obj.residuals(ev_ex)
    np.testing.assert_allclose(res.fitted, fitted, rtol=0, atol=1e-6 * np.abs(fitted).max())
    tab = res.residual_table()
    dP = obj.diag_P(ev_ex) / model.conditioning.variance_scale
    assert float(np.max(np.abs(tab.diag_P - dP) / tab.diag_P_se)) < 5.0
    blocks, errs = pev_blocks(*res.fit_objective())  # the solver's scale, with errors
    for got, err, want in zip(blocks, errs, obj.pev_blocks(ev_ex)):
        assert np.all(err > 0)
        assert np.all(np.abs(got - want) <= 5.0 * err + 1e-9 * np.abs(want).max())
    # the Wald covariances: the twin's data fitted directly, mapped by G = [[1, -m'], ...]
    m = float(np.mean(df.x.to_numpy()))
    dfc = df.copy()
    dfc["x"] = df.x - m
    twin = lmmops.fit(CROSSED, dfc, method="ML", solver="iterative")
    assert not _centred_note(twin)
    np.testing.assert_allclose(res.covariances["g"].to_numpy(),
                               _in_original_x(twin.covariances["g"].to_numpy(), -m),
                               rtol=1e-6)
    new = df.iloc[::10].copy()
    new["x"] = new.x + 0.5
    new_c = new.copy()
    new_c["x"] = new.x - m
    np.testing.assert_allclose(predict(res, new), predict(twin, new_c), rtol=1e-6)
    names = ["g.(Intercept)", "g.x", "g.(Intercept).x", "h.(Intercept)", "Residual"]
    M = np.eye(5)
    M[:3, :3] = _entries_to_user(m)
    want = M @ twin.variances_cov.loc[names, names].to_numpy() @ M.T
    got = res.variances_cov.loc[names, names].to_numpy()
    _within(got, want, 1e-5 * np.sqrt(np.outer(np.diag(want), np.diag(want))))
    # theta_cov by the delta method: the invariant slope row's variance and the
    # crossed factor's against the twin's
    tc, tt = res.theta_cov, twin.theta_cov
    assert tc.iloc[3, 3] == pytest.approx(tt.iloc[3, 3], rel=1e-5)
