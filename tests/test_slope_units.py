"""A slope covariate's units and origin: the exact slope fit does not depend on them.

Changing the units of ``x`` in ``(1 + x | g)`` (``a x``) is the same model with the
row of ``T`` that belongs to ``x`` divided by ``a``; moving its origin (``x + c``) is the
same model with the coefficients ``b_0 - c b_1`` and ``b_1`` (``_cov_in_original_x``
maps a fit's covariance back to the original ``x``).
The oracle is the fit on the original ``x``; the ML deviance is invariant.
"""

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lmmops
from lmmops.data.terms import centred_start, column_units, off_centre_hint, theta_scales
from lmmops.errors import NumericalFailure, RankDeficientError
from lmmops.estimation.vector import term_units

FORMULA = "y ~ x + (1 + x | g) + (1 | h)"


@pytest.fixture(scope="module")
def frame():
    rng = np.random.default_rng(5)
    n, g, h = 400, 15, 8
    df = pd.DataFrame({"g": rng.integers(0, g, n), "h": rng.integers(0, h, n),
                       "x": rng.uniform(0, 9, n)})
    df["y"] = (250 + 10 * df.x + 25 * rng.normal(size=g)[df.g]
               + 6 * rng.normal(size=g)[df.g] * df.x + 10 * rng.normal(size=h)[df.h]
               + 25 * rng.normal(size=n))
    df["g"] = pd.Categorical(df.g.map(lambda i: f"g{i:02d}"))
    df["h"] = pd.Categorical(df.h.map(lambda i: f"h{i}"))
    return df


@pytest.fixture(scope="module")
def base(frame):
    return lmmops.fit(FORMULA, frame, method="ML")


def _cov_in_original_x(res, a, c):
    """The covariance of (intercept, slope) on the original x of a fit on a x + c."""
    S = res.covariances["g"].to_numpy()
    N = np.array([[1.0, c], [0.0, a]])  # b_orig = N b_user
    return N @ S @ N.T


@settings(max_examples=6, deadline=None)
@given(st.sampled_from([1e-3, 0.1, 3.0, 86400.0, 1e6, 2.0**20, 2.0**-7]))
def test_units_of_a_slope_covariate_do_not_change_the_fit(frame, base, a):
    df = frame.copy()
    df["x"] = df.x * a
    res = lmmops.fit(FORMULA, df, method="ML")
    assert res.converged
    assert res.deviance == pytest.approx(base.deviance, rel=1e-10)
    np.testing.assert_allclose(_cov_in_original_x(res, a, 0.0),
                               base.covariances["g"].to_numpy(), rtol=1e-5, atol=1e-6)
    # powers of two rescale theta exactly: the same optimiser path; other factors move
    # the start within a factor of two on the optimiser's scale
    if np.log2(a) == np.round(np.log2(a)):
        assert res.n_evaluations == base.n_evaluations
    else:
        assert abs(res.n_evaluations - base.n_evaluations) <= 3


@pytest.mark.parametrize("c", [-30.0, 100.0, 1000.0])
def test_origin_of_a_slope_covariate_does_not_change_the_fit(frame, base, c):
    df = frame.copy()
    df["x"] = df.x + c
    res = lmmops.fit(FORMULA, df, method="ML")
    assert res.converged
    assert res.deviance == pytest.approx(base.deviance, rel=1e-9)
    np.testing.assert_allclose(_cov_in_original_x(res, 1.0, c),
                               base.covariances["g"].to_numpy(), rtol=2e-4, atol=1e-3)
    assert res.n_evaluations <= 3 * base.n_evaluations


def _fit_or_error(formula, df):
    try:
        return lmmops.fit(formula, df, method="ML"), ""
    except (RankDeficientError, NumericalFailure) as err:
        return None, str(err)


def test_far_from_centred_covariate_is_named(frame):
    df = frame.copy()
    df["x"] = df.x + 1e6
    res, message = _fit_or_error(FORMULA, df)
    if res is None:  # the numerical failure carries the advice
        assert "centre the column" in message
        assert "'x'" in message
    elif not res.converged:
        assert any("centre the column" in n and "'x'" in n for n in res.notes)
    else:  # when it does converge it is the right optimum
        base = lmmops.fit(FORMULA, frame, method="ML")
        assert res.deviance == pytest.approx(base.deviance, rel=1e-8)


def test_scales_and_start(frame):
    model = lmmops.LMM.from_formula(FORMULA, frame)
    obj = model.objective().conditioned
    t = model.terms[0]
    x = frame.x.to_numpy()
    units = term_units(obj.terms, obj.C, obj.offsets, obj.n)
    # from Z'WZ's diagonal blocks: the column's mean and spread
    np.testing.assert_allclose(units[0][1], [0.0, x.mean()], rtol=1e-12)
    c = 2.0 ** np.floor(np.log2(x.std()))
    np.testing.assert_array_equal(units[0][0], [1.0, c])
    np.testing.assert_array_equal(theta_scales(model.terms, units), [1.0, 1 / c, 1 / c, 1.0])
    T = t.relative_factor(centred_start(model.terms, units)[:3])
    G = np.array([[1.0, -x.mean() / c], [0.0, 1.0 / c]])
    np.testing.assert_allclose(T @ T.T, G @ G.T, rtol=1e-12)
    assert off_centre_hint(model.terms) == ""
    # without an intercept the spread is about 0 (the rows' mean square)
    cz, mz = column_units(("x",), np.array([[np.sum(x * x)]]), x.size)
    assert mz[0] == 0.0
    assert cz[0] == 2.0 ** np.floor(np.log2(np.sqrt(np.mean(x * x))))


def test_iterative_fit_is_invariant_to_power_of_two_units(frame):
    """The matrix-free fit optimises in the same scaled theta: with a power-of-two
    change of units the path is the same (same probes), so the fits agree to rounding;
    with 1e6 (not a power of two) within the Monte Carlo error."""
    base = lmmops.fit(FORMULA, frame, method="ML", solver="iterative")
    assert base.converged, base.notes
    for a, tol in [(2.0**20, 1e-9), (1e6, None)]:
        df = frame.copy()
        df["x"] = df.x * a
        res = lmmops.fit(FORMULA, df, method="ML", solver="iterative")
        assert res.converged, res.notes
        if tol is not None:
            assert res.deviance == pytest.approx(base.deviance, rel=tol)
            np.testing.assert_allclose(_cov_in_original_x(res, a, 0.0),
                                       base.covariances["g"].to_numpy(), rtol=1e-6,
                                       atol=1e-8)
        else:
            assert abs(res.loglik - base.loglik) <= 4 * (res.mc_stderr["loglik"]
                                                         + base.mc_stderr["loglik"])


@pytest.mark.parametrize("c", [1e4, 3e4])
def test_far_off_centre_covariate_is_centred_inside_the_fit(frame, base, c):
    """A column 4e3-1.2e4 spreads from 0 is centred inside the exact fit (the same
    model) and the optimum mapped back: the deviance, the covariance of the original
    coefficients and the BLUPs are the centred fit's."""
    df = frame.copy()
    df["x"] = df.x + c
    res = lmmops.fit(FORMULA, df, method="ML")
    assert res.converged, res.notes
    assert any("centred inside the fit" in n for n in res.notes)
    assert res.deviance == pytest.approx(base.deviance, rel=1e-7)
    np.testing.assert_allclose(_cov_in_original_x(res, 1.0, c),
                               base.covariances["g"].to_numpy(), rtol=1e-4, atol=1e-3)
    # b_orig = N b_user: the intercept at the original 0 is b_0 + c b_1
    r, b = res.ranef["g"], base.ranef["g"]
    np.testing.assert_allclose(r["x"], b["x"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(r["(Intercept)"] + c * r["x"], b["(Intercept)"],
                               rtol=1e-4, atol=1e-3 * abs(c) * 1e-4 + 1e-3)
    assert np.all(np.isfinite(res.theta_cov.to_numpy()))
    assert np.all(np.diag(res.theta_cov.to_numpy()) > 0)
    assert res.fixef["x"] == pytest.approx(base.fixef["x"], rel=1e-6)
    # the Wald errors of what the shift leaves alone are the unshifted fit's: they are
    # the centred twin's, mapped (before, a pseudo-inverse of the Hessian in the user's
    # theta dropped directions: sleepstudy Days + 1e4 gave 3.9 for the slope variance's
    # 14.8 and 71.4 for the residual's 77.2)
    for name in ("g.x", "h.(Intercept)", "Residual"):
        assert np.sqrt(res.variances_cov.loc[name, name]) == pytest.approx(
            np.sqrt(base.variances_cov.loc[name, name]), rel=2e-3), name


def test_centring_maps_theta_both_ways_and_keeps_the_criterion(frame):
    from lmmops.data.terms import centred_terms, centring_shifts, recentre_theta
    from lmmops.estimation.vector import VectorObjective

    df = frame.copy()
    df["x"] = df.x + 500.0
    model = lmmops.LMM.from_formula(FORMULA, df)
    obj = model.objective().conditioned
    shifts = centring_shifts(obj.terms)
    assert shifts is not None
    assert shifts[0][1] == pytest.approx(df.x.mean(), rel=1e-12)
    assert not np.any(shifts[1])
    twin = VectorObjective(centred_terms(obj.terms, shifts), obj.X, obj.y)
    rng = np.random.default_rng(3)
    for _ in range(3):
        th_c = np.abs(rng.normal(size=obj.n_theta)) + 0.1
        th_c[1] = rng.normal()
        th = recentre_theta(obj.terms, th_c, shifts, to="user")
        np.testing.assert_allclose(recentre_theta(obj.terms, th, shifts), th_c, rtol=1e-9)
        # the same model: the criterion is the same (to the rounding of the far column)
        assert obj(th) == pytest.approx(twin(th_c), rel=1e-9)


def test_scaled_theta_keeps_the_newton_check_differences_both_ways(frame):
    """The Newton check runs on ScaledTheta: its differences reach the objective in
    lme4's theta (the Hessian differenced there directly is the oracle) and read back
    in theta^c unchanged."""
    from lmmops.estimation.vector import ScaledTheta, _fd_hessian

    df = frame.copy()
    df["x"] = df.x * 1000.0
    model = lmmops.LMM.from_formula(FORMULA, df)
    obj = model.objective().conditioned
    units = term_units(obj.terms, obj.C, obj.offsets, obj.n)
    r = theta_scales(obj.terms, units)
    scaled = ScaledTheta(obj, r)
    theta = np.array([1.1, -0.02, 0.01, 0.5])
    idx = np.arange(obj.n_theta)
    ev = obj.evaluate(theta)
    Hc = _fd_hessian(scaled, theta / r, idx, obj.lower / r, g0=scaled.evaluate(theta / r).gradient,
                     pw0=ev.pwrss)
    th_in, idx_in, H_in, dpw_in = obj._fd_last
    np.testing.assert_allclose(th_in, theta, rtol=1e-15)
    Hd = _fd_hessian(obj, theta, idx, obj.lower)
    # forward differences in theta^c against central ones in theta: the steps on the
    # slope entries are ~2e-7 and the gradient's rounding noise here ~1e-8 of its size
    # (measured), so an entry agrees to about 1%; the mapping itself is checked exactly
    # below
    np.testing.assert_allclose(H_in, Hd, rtol=2e-2, atol=1e-6 * np.abs(Hd).max())
    obj._fd_last = (th_in, idx_in, H_in, dpw_in)
    th_c, idx_c, H_c, dpw_c = scaled._fd_last
    np.testing.assert_allclose(th_c, theta / r, rtol=1e-15)
    np.testing.assert_allclose(H_c, Hc, rtol=1e-12)
    assert dpw_c is not None
    np.testing.assert_allclose(dpw_c, dpw_in * r, rtol=1e-15)


def test_centred_fit_on_the_boundary_keeps_the_nan_pattern():
    """No random slope in the data: the exact fit is singular (T's last diagonal entry
    0) with and without x + 1e4. After centring, theta_cov is NaN for the parameter on
    the boundary (the twin's zero maps to the user's) and variances_cov NaN for the
    singular term, as without the shift; the crossed factor's entries are the same."""
    rng = np.random.default_rng(4)
    n, n_g, n_h = 400, 20, 8
    df = pd.DataFrame({"g": rng.integers(0, n_g, n), "h": rng.integers(0, n_h, n),
                       "x": rng.normal(size=n)})
    df["y"] = (1 + 0.5 * df.x + rng.normal(size=n_g)[df.g] + 0.7 * rng.normal(size=n_h)[df.h]
               + rng.normal(size=n))
    df["g"] = pd.Categorical(df.g)
    df["h"] = pd.Categorical(df.h)
    base = lmmops.fit(FORMULA, df, method="ML", solver="direct")
    shifted = df.copy()
    shifted["x"] = shifted.x + 1e4
    res = lmmops.fit(FORMULA, shifted, method="ML", solver="direct")
    for r in (base, res):
        assert r.converged, r.notes
        assert r.singular
    assert any("centred inside the fit" in n for n in res.notes)
    assert res.deviance == pytest.approx(base.deviance, rel=1e-9)
    tc, tb = res.theta_cov.to_numpy(), base.theta_cov.to_numpy()
    np.testing.assert_array_equal(np.isnan(np.diag(tc)), np.isnan(np.diag(tb)))
    assert np.isnan(tc[2, 2])
    assert tc[3, 3] == pytest.approx(tb[3, 3], rel=1e-3)
    vc, vb = res.variances_cov, base.variances_cov
    np.testing.assert_array_equal(np.isnan(vc.to_numpy()), np.isnan(vb.to_numpy()))
    for name in ("h.(Intercept)", "Residual"):
        assert vc.loc[name, name] == pytest.approx(vb.loc[name, name], rel=2e-3)


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 3), st.integers(0, 2**32 - 1),
       st.sampled_from([3.0, -40.0, 1e4, 2.5e5]))
def test_centred_maps_of_theta_and_covariance_entries(d, seed, scale):
    """The maps behind a centred fit, against closed forms: CentredFit.entries_map sends
    the covariance entries of the centred columns to those of G Sigma G' (G = N^{-1}),
    s^2 unchanged; centring_jacobian is the derivative of recentre_theta (a small step
    against the map itself, to second order)."""
    from lmmops.data.terms import RandomEffectsTerm, covariance_entries, recentre_theta
    from lmmops.estimation.centring import CentredFit, centring_jacobian

    rng = np.random.default_rng(seed)
    n = 40
    cols = ("(Intercept)", *(f"x{i}" for i in range(1, d)))
    values = np.column_stack([np.ones(n), rng.normal(size=(n, d - 1))])
    t = RandomEffectsTerm("g", rng.integers(0, 5, n).astype(np.int32), pd.Index(range(5)),
                          cols, values)
    m = np.concatenate([[0.0], scale * rng.uniform(0.5, 1.5, d - 1)])
    B = rng.normal(size=(d, d))
    S_c = B @ B.T + 0.1 * np.eye(d)
    G = np.eye(d)
    G[0] -= m
    M = CentredFit([t], [m], None, None).entries_map()
    phi_c = np.append(covariance_entries(S_c), 2.5)
    want = np.append(covariance_entries(G @ S_c @ G.T), 2.5)
    np.testing.assert_allclose(M @ phi_c, want, rtol=1e-10, atol=1e-10 * np.abs(want).max())
    T_c = np.linalg.cholesky(S_c)
    rows, cols_ = np.triu_indices(d)[::-1]  # lme4's column-major lower triangle
    theta_c = T_c[rows, cols_]
    J = centring_jacobian([t], theta_c, [m])
    # the map's curvature grows with the shift: the step shrinks with it, so the
    # second-order term stays below the tolerance
    step = 1e-5 / max(1.0, float(np.abs(m).max())) * rng.normal(size=theta_c.size)
    moved = (recentre_theta([t], theta_c + step, [m], to="user")
             - recentre_theta([t], theta_c, [m], to="user"))
    np.testing.assert_allclose(J @ step, moved, rtol=0,
                               atol=1e-3 * np.abs(moved).max() + 1e-12)
