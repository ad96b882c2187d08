"""Location and scale invariance (issue 12, section 3).

Every reported quantity of a fit under ``y -> a y + c`` or ``x -> a x + c`` (a model with
an intercept) is the base fit mapped by the known transformation, over many orders of
magnitude, on both solvers; and the rank test keeps columns whatever their units or
origin (a covariate N(1e4, 1), a column times 3e7, Unix times) while still dropping
genuinely aliased ones with lme4's message.

The base data are derived from the transformed data so that both describe the same
numbers: for ``y + c`` the base is ``(y + c) - c``, which is exact in floating point
(Sterbenz), so the comparison measures lmmops and not the rounding of the data.
"""

import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats
from scipy.linalg import block_diag as sla_block_diag

import lmmops
from lmmops.data.formula import RankDeficientWarning, rank_columns
from lmmops.errors import LmmopsError

EPS = np.finfo(np.float64).eps
FORMULA = "y ~ 1 + x + (1|a) + (1|b)"
KINDS = ("conditional", "marginal", "model", "pearson", "shift", "studentized")
Z95 = stats.norm.ppf(0.975)


def frame(seed=5, n=120):
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({"a": rng.integers(0, 12, n), "b": rng.integers(0, 6, n),
                       "x": rng.normal(size=n)})
    df["y"] = (1.0 + 0.5 * df.x + rng.normal(size=12)[df.a] + 0.7 * rng.normal(size=6)[df.b]
               + rng.normal(size=n))
    df.loc[7, "y"] += 5.0  # an outlier for the scan
    df["w"] = rng.uniform(0.5, 2.0, n)
    return df


BASE = frame()
NEW = pd.DataFrame({"a": [0, 3, 99], "b": [1, 5, 2], "x": [0.3, -1.2, 2.0]})  # 99: new level


def fit(df, method="REML", weights=False, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RankDeficientWarning)
        return lmmops.fit(FORMULA, df, method=method, weights="w" if weights else None,
                          **kw)


def report(res, new):
    """Every reported quantity of a fit, by name."""
    out = {"fixef": res.fixef.to_numpy(), "fixef_se": res.fixef_se.to_numpy(),
           "vcov": res.vcov.to_numpy(), "theta": res.theta.to_numpy(),
           "criterion": res.objective, "loglik": res.loglik, "aic": res.aic, "bic": res.bic}
    names = list(res.variances)
    out["variances"] = np.array([res.variances[k] for k in names])
    out["stddev"] = np.array([res.stddev[k] for k in names])
    out["variances_se"] = np.array([res.variances_se[k] for k in names])
    out["mc_variances"] = np.array([res.mc_stderr["variances"][k] for k in names])
    out["mc_loglik"] = res.mc_stderr["loglik"]
    out["ranef"] = np.concatenate([res.ranef[k].to_numpy() for k in res.n_levels])
    for key, cond in (("pev", False), ("pev_beta", True)):
        pev = res.ranef_pev(conditional_on_beta=cond)
        out[key] = np.concatenate([pev[k].to_numpy() for k in res.n_levels])
    out["fitted"] = res.fitted
    for kind in KINDS:
        out["resid_" + kind] = res.residuals(kind)
    tab = res.residual_table()
    out["shift_var"], out["diag_P"] = tab["shift_var"].to_numpy(), tab["diag_P"].to_numpy()
    scan = res.outliers().sort_values("row")
    for col in ("phi", "se", "t"):
        out["scan_" + col] = scan[col].to_numpy()
    ms = res.outliers(rows=[7, 20])
    for col in ("phi", "se", "statistic", "p_value"):
        out["msom_" + col] = ms[col]
    out["predict"] = res.predict()
    for random in (True, False):
        for interval in ("confidence", "prediction"):
            p = res.predict(new, random=random, interval=interval)
            for col in ("fit", "se", "lower", "upper"):
                out[f"pred_{random}_{interval}_{col}"] = p[col].to_numpy()
    ci = res.confint(method="wald")
    for col in ("estimate", "lower", "upper"):
        out["ci_" + col] = ci[col].to_numpy()
    out["at_theta"] = res.model.objective(res.method)(res.theta.to_numpy())
    json.dumps(res.to_dict(), allow_nan=False)  # strict JSON
    return out


def expected(base, a=1.0, c=0.0, L=None, dcrit=0.0):
    """The base report mapped by ``y -> a y + c`` then the basis change ``beta -> L beta``."""
    p = base["fixef"].size
    L = np.eye(p) if L is None else L
    e0 = np.eye(p)[0]
    sg, a2 = math.copysign(1.0, a), a * a
    out = dict(base)
    out["fixef"] = L @ (a * base["fixef"] + c * e0)
    out["vcov"] = a2 * L @ base["vcov"] @ L.T
    out["fixef_se"] = np.sqrt(np.diag(out["vcov"]))
    for key in ("variances", "variances_se", "mc_variances", "pev", "pev_beta", "shift_var"):
        out[key] = a2 * base[key]
    out["stddev"] = abs(a) * base["stddev"]
    out["diag_P"] = base["diag_P"] / a2
    for key in ("ranef", "scan_phi", "msom_phi") + tuple("resid_" + k for k in KINDS[:3]) + (
            "resid_shift",):
        out[key] = a * base[key]
    for key in ("resid_pearson", "resid_studentized", "scan_t", "msom_statistic"):
        out[key] = sg * base[key]
    for key in ("scan_se", "msom_se"):
        out[key] = abs(a) * base[key]
    out["fitted"] = a * base["fitted"] + c
    out["predict"] = a * base["predict"] + c
    for random in (True, False):
        for interval in ("confidence", "prediction"):
            k = f"pred_{random}_{interval}_"
            out[k + "fit"] = a * base[k + "fit"] + c
            out[k + "se"] = abs(a) * base[k + "se"]
            lo, hi = a * base[k + "lower"] + c, a * base[k + "upper"] + c
            out[k + "lower"], out[k + "upper"] = (lo, hi) if a > 0 else (hi, lo)
    K = base["variances"].size  # sd rows (factors, sigma), then the fixed effects
    est = np.concatenate([abs(a) * base["ci_estimate"][:K], out["fixef"]])
    out["ci_estimate"] = est
    sd_lo, sd_hi = abs(a) * base["ci_lower"][:K], abs(a) * base["ci_upper"][:K]
    out["ci_lower"] = np.concatenate([sd_lo, est[K:] - Z95 * out["fixef_se"]])
    out["ci_upper"] = np.concatenate([sd_hi, est[K:] + Z95 * out["fixef_se"]])
    for key in ("criterion", "aic", "bic", "at_theta"):
        out[key] = base[key] + dcrit
    out["loglik"] = base["loglik"] - 0.5 * dcrit
    return out


def scales(exp):
    """The natural scale of each quantity (errors are measured against it)."""
    sigma = exp["stddev"][-1]
    se = exp["fixef_se"]
    K = exp["variances"].size
    sc = {}
    for key, val in exp.items():
        if key in ("fixef", "fixef_se"):
            sc[key] = se
        elif key == "vcov":
            sc[key] = np.outer(se, se)
        elif key in ("variances", "variances_se", "mc_variances"):
            sc[key] = np.max(exp["variances"])
        elif key == "stddev":
            sc[key] = sigma
        elif key == "theta":
            sc[key] = max(1.0, float(np.max(val)))
        elif key.startswith("ci_"):
            sc[key] = np.concatenate([np.full(K, sigma), se])
        elif key in ("pev", "pev_beta", "shift_var", "diag_P", "scan_se", "msom_se") or (
                key.startswith("pred_") and key.endswith("_se")):
            sc[key] = np.abs(val)
        elif key in ("resid_pearson", "resid_studentized", "scan_t", "msom_statistic",
                     "msom_p_value", "criterion", "loglik", "aic", "bic", "at_theta",
                     "mc_loglik"):
            sc[key] = 1.0
        else:  # on the scale of y: BLUPs, residuals, fitted values and predictions
            sc[key] = sigma
    return sc


def assert_reports_match(got, exp, rtol, extra=None):
    """Within ``rtol`` of each quantity's natural scale, plus rounding of the value itself
    and, for the keys of ``extra``, an absolute allowance (rounding of the inputs)."""
    sc = scales(exp)
    extra = extra or {}
    for key, want in exp.items():
        g, w = np.asarray(got[key], dtype=float), np.asarray(want, dtype=float)
        bound = (rtol * np.asarray(sc[key]) + 64 * EPS * np.maximum(np.abs(w), np.abs(g))
                 + extra.get(key, 0.0))
        err = np.abs(g - w)
        assert np.all(np.isfinite(g)), key
        assert np.all(err <= bound), (key, float(np.max(err / bound)), g, w)


def shifted(df, a=1.0, c=0.0, column="y"):
    """``(base, transformed)`` frames for ``column -> a column + c``; the base is computed
    back from the transformed values so that both hold the same numbers."""
    new = df.copy()
    new[column] = a * df[column] + c
    base = df.copy()
    base[column] = (new[column] - c) / a
    return base, new


magnitude = st.integers(-8, 8)
mantissa = st.floats(1.0, 9.99)
methods = st.sampled_from(["REML", "ML"])


def _power(e, m, neg):
    return (-1.0 if neg else 1.0) * m * 10.0 ** e


# --------------------------------------------------------------------- y -> y + c, a y
def check_response(a, c, method="REML", weights=False, rtol=1e-7, **fit_options):
    base_df, new_df = shifted(BASE, a, c)
    base = report(fit(base_df, method, weights, **fit_options), NEW)
    got = report(fit(new_df, method, weights, **fit_options), NEW)
    n, p = len(BASE), 2
    dof = n - p if method == "REML" else n
    assert_reports_match(got, expected(base, a, c, dcrit=dof * math.log(a * a)), rtol)
    return base


@settings(derandomize=True, max_examples=8, deadline=None)
@given(st.integers(0, 12), mantissa, st.booleans(), methods, st.booleans())
def test_fit_is_invariant_under_a_shift_of_y(e, m, neg, method, weights):
    """y + 1e6 moved the variances by 0.4-11 %, y + 1e8 raised "fitted exactly"."""
    check_response(1.0, _power(e, m, neg), method, weights)


@settings(derandomize=True, max_examples=8, deadline=None)
@given(magnitude, mantissa, st.booleans(), methods, st.booleans())
def test_fit_is_equivariant_under_a_scaling_of_y(e, m, neg, method, weights):
    check_response(_power(e, m, neg), 0.0, method, weights)


@pytest.mark.slow
@settings(derandomize=True, max_examples=60, deadline=None)
@given(st.integers(-40, 40), mantissa, st.booleans(), st.integers(-12, 12), mantissa,
       st.booleans(), methods, st.booleans())
def test_fit_under_affine_maps_of_y_slow(ea, ma, na, ec, mc, nc, method, weights):
    a = _power(ea, ma, na)
    c = _power(ec, mc, nc) * abs(a)  # y keeps at least 2 digits
    check_response(a, c, method, weights)


# --------------------------------------------------------------------- x -> a x + c
def check_covariate(a, c, method="REML", weights=False, rtol=1e-7, **fit_options):
    base_df, new_df = shifted(BASE, a, c, column="x")
    newb, newx = NEW.copy(), NEW.copy()
    newx["x"] = a * NEW.x + c
    newb["x"] = (newx.x - c) / a
    base = report(fit(base_df, method, weights, **fit_options), newb)
    got = report(fit(new_df, method, weights, **fit_options), newx)
    # y = b0 + b1 x = (b0 - b1 c / a) + (b1 / a) x'; REML's log|X'V^-1 X| gains 2 log|a|
    L = np.array([[1.0, -c / a], [0.0, 1.0 / a]])
    dcrit = 2.0 * math.log(abs(a)) if method == "REML" else 0.0
    exp = expected(base, L=L, dcrit=dcrit)
    # a new row's x' = a x + c is itself rounded at its magnitude: predictions move by
    # up to that rounding times the slope, their standard errors times its error
    dx = 64 * EPS * float(np.max(np.abs(newx.x)))
    extra = {k: dx * (exp["fixef_se"][1] if k.endswith("_se") else abs(exp["fixef"][1]))
             for k in exp if k.startswith("pred_")}
    assert_reports_match(got, exp, rtol, extra)


@settings(derandomize=True, max_examples=10, deadline=None)
@given(magnitude, mantissa, st.booleans(), st.integers(-2, 8), mantissa, st.booleans(),
       methods, st.booleans())
def test_fit_is_invariant_under_affine_maps_of_a_covariate(ea, ma, na, ec, mc, nc, method,
                                                           weights):
    """c / a up to 1e8 (the covariate keeps 8 digits), a from 1e-8 to 1e8."""
    a = _power(ea, ma, na)
    check_covariate(a, _power(ec, mc, nc) * abs(a), method, weights)


@pytest.mark.slow
@settings(derandomize=True, max_examples=60, deadline=None)
@given(st.integers(-40, 40), mantissa, st.booleans(), st.integers(-4, 10), mantissa,
       st.booleans(), methods, st.booleans())
def test_affine_maps_of_a_covariate_slow(ea, ma, na, ec, mc, nc, method, weights):
    a = _power(ea, ma, na)
    check_covariate(a, _power(ec, mc, nc) * abs(a), method, weights)


# --------------------------------------------------------------------- iterative solver
ITER = dict(solver="iterative", n_probes=4, seed=3)


@pytest.mark.parametrize(("a", "c"), [(1.0, 1e8), (-3e-7, 0.0), (2.5e6, -4e9)])
def test_iterative_solver_is_invariant_under_affine_maps_of_y(a, c):
    base = check_response(a, c, rtol=1e-6, **ITER)
    assert base["mc_variances"].max() > 0  # the Monte Carlo errors are mapped too


def test_iterative_solver_is_invariant_under_an_affine_map_of_a_covariate():
    check_covariate(3e7, 1.7e9, rtol=1e-6, **ITER)


# --------------------------------------------------------------------- other outputs
def test_vsom_and_profile_intervals_are_equivariant():
    a, c = -4e5, 3e9
    base_df, new_df = shifted(BASE, a, c)
    rb, rn = fit(base_df), fit(new_df)
    vb, vn = rb.outliers(method="vsom", rows=[7]), rn.outliers(method="vsom", rows=[7])
    dcrit = (len(BASE) - 2) * math.log(a * a)
    for key, f in (("sigma2_o", a * a), ("sigma2", a * a), ("omega", 1.0), ("lrt", 1.0),
                   ("p_value", 1.0)):
        assert vn[key] == pytest.approx(f * vb[key], rel=1e-6, abs=1e-9), key
    for key in ("criterion_null", "criterion"):
        assert vn[key] == pytest.approx(vb[key] + dcrit, abs=1e-6), key
    assert vb["criterion_null"] == pytest.approx(rb.objective, abs=1e-8)
    # the profiles' optimiser works in units of the residual sd (it used to step to s = 0
    # and fail when s was below about 1)
    cb = rb.confint(method="profile", parm=["sd_a"])
    cn = rn.confint(method="profile", parm=["sd_a"])
    np.testing.assert_allclose(cn[["estimate", "lower", "upper"]].to_numpy(),
                               abs(a) * cb[["estimate", "lower", "upper"]].to_numpy(),
                               rtol=1e-6)


def test_verbose_progress_reports_the_user_scale_criterion():
    lines = []
    res = fit(shifted(BASE, 1e-3, 1e8)[1], progress=lines.append)
    last = float(lines[-1].split("criterion")[1].split()[0])
    assert last == pytest.approx(res.objective, abs=1e-5)
    assert res.optsum.f_final == pytest.approx(res.objective, abs=1e-9)


def test_cli_json_is_invariant_under_a_shift_of_y(tmp_path, capsys):
    from lmmops.cli import main

    out = {}
    for c in (0.0, 1e8):
        base, new = shifted(BASE, 1.0, c)
        path = tmp_path / f"d{int(c)}.csv"
        (new if c else base).to_csv(path, index=False)
        assert main(["fit", str(path), "--formula", FORMULA, "--json"]) == 0
        out[c] = json.loads(capsys.readouterr().out)
    for k, v in out[0.0]["variances"].items():
        assert out[1e8]["variances"][k] == pytest.approx(v, rel=1e-7)
    assert out[1e8]["fixef"]["(Intercept)"] == pytest.approx(
        out[0.0]["fixef"]["(Intercept)"] + 1e8, abs=1e-6)
    assert out[1e8]["reml_criterion"] == pytest.approx(out[0.0]["reml_criterion"], abs=1e-6)
    assert out[1e8]["converged"] is True


# --------------------------------------------------------------------- the rank test
def _with(df, **cols):
    out = df.copy()
    for k, v in cols.items():
        out[k] = v
    return out


def _dense_reml(df, X, theta):
    """lme4's REML criterion and GLS fixed effects at ``theta``, by dense algebra."""
    d = lmmops.CrossedDesign.from_frame(df, ["a", "b"])
    y = df.y.to_numpy()
    n, p = X.shape
    Vr = np.eye(n)
    for k in range(2):
        Z = d.indicator(k).toarray()
        Vr += theta[k] ** 2 * Z @ Z.T
    Vi = np.linalg.inv(Vr)
    A = X.T @ Vi @ X
    beta = np.linalg.solve(A, X.T @ Vi @ y)
    r = y - X @ beta
    s2 = r @ Vi @ r / (n - p)
    f = (np.linalg.slogdet(Vr)[1] + np.linalg.slogdet(A)[1]
         + (n - p) * (1 + np.log(2 * np.pi * s2)))
    return f, beta


def test_unix_timestamps_are_kept_and_fitted_correctly():
    """Unix times over a month were dropped as "rank deficient"."""
    rng = np.random.default_rng(8)
    n = len(BASE)
    t0 = 1.7e9
    t = t0 + rng.integers(0, 30 * 86400, n).astype(float)  # seconds, a month
    days = (t - t0) / 86400.0
    df = _with(BASE, t=t, y=BASE.y + 0.2 * days)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = lmmops.fit("y ~ 1 + t + (1|a) + (1|b)", df)
    assert res.rank_deficient == []
    assert res.converged
    # the oracle in the well-conditioned basis (1, days): t = t0 + 86400 days
    X = np.column_stack([np.ones(n), days])
    f, beta = _dense_reml(df, X, res.theta.to_numpy())
    slope = beta[1] / 86400.0
    assert res.fixef["t"] == pytest.approx(slope, rel=1e-8)
    assert res.fixef["(Intercept)"] == pytest.approx(beta[0] - t0 * slope, rel=1e-8)
    assert res.fixef["t"] * 86400 == pytest.approx(0.2, abs=0.05)
    # lme4 reports the REML criterion of the user's X: log|X'V^-1 X| gains 2 log 86400
    assert res.objective == pytest.approx(f + 2 * np.log(86400.0), abs=1e-7)
    ref = lmmops.fit("y ~ 1 + days + (1|a) + (1|b)", _with(df, days=days))
    np.testing.assert_allclose(list(res.variances.values()), list(ref.variances.values()),
                               rtol=1e-7)
    np.testing.assert_allclose(res.fitted, ref.fitted, rtol=0, atol=1e-8)


@pytest.mark.parametrize(("name", "col", "a", "c"), [
    ("N(1e4, 1)", lambda x: 1e4 + x, 1.0, 1e4),
    ("N(1e8, 1)", lambda x: 1e8 + x, 1.0, 1e8),
    ("x * 3e7", lambda x: 3e7 * x, 3e7, 0.0),
    ("x * 3e-9 + 7", lambda x: 3e-9 * x + 7.0, 3e-9, 7.0),
])
def test_badly_scaled_covariates_are_kept(name, col, a, c):
    """These were dropped as "rank deficient" (the test was relative to |R_00|)."""
    z = col(BASE.x.to_numpy())
    df = _with(BASE, z=z)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = lmmops.fit("y ~ 1 + z + (1|a) + (1|b)", df)
    assert res.rank_deficient == []
    ref = lmmops.fit("y ~ 1 + z + (1|a) + (1|b)", _with(df, z=(z - c) / a))
    assert res.fixef["z"] == pytest.approx(ref.fixef["z"] / a, rel=1e-7)
    assert res.fixef_se["z"] == pytest.approx(ref.fixef_se["z"] / abs(a), rel=1e-7)
    assert res.objective == pytest.approx(ref.objective + 2 * np.log(abs(a)), abs=1e-7)
    assert res.rank_deficient == []
    assert rank_columns(
        np.column_stack([np.ones(len(z)), z]), ["(Intercept)", "z"])[1] == []


@pytest.mark.parametrize(("offset", "scale"), [(0.0, 1.0), (1.7e9, 1e5), (0.0, 3e7), (1e4, 1.0)])
def test_genuinely_aliased_columns_are_still_dropped(offset, scale):
    z = offset + scale * BASE.x.to_numpy()
    df = _with(BASE, z=z, z2=2.0 * z + 1.0)
    with pytest.warns(RankDeficientWarning, match=(
            r"fixed-effect model matrix is rank deficient so dropping 1 column / "
            r"coefficient \(z2\)")):
        res = lmmops.fit("y ~ 1 + z + z2 + (1|a) + (1|b)", df)
    assert res.rank_deficient == ["z2"]
    assert np.isnan(res.fixef["z2"])
    ref = lmmops.fit("y ~ 1 + z + (1|a) + (1|b)", df)
    np.testing.assert_allclose(res.fixef[["(Intercept)", "z"]], ref.fixef, rtol=1e-9)
    assert res.objective == pytest.approx(ref.objective, abs=1e-9)


def test_a_numerically_constant_column_is_aliased_with_the_intercept():
    rng = np.random.default_rng(2)
    k = rng.integers(1, 1000, len(BASE)).astype(float)
    z = (0.1 * k) / k  # 0.1 up to the last bit: its centred values are rounding noise
    assert np.ptp(z) > 0
    with pytest.warns(RankDeficientWarning, match=r"\(z\)"):
        res = lmmops.fit("y ~ 1 + z + (1|a) + (1|b)", _with(BASE, z=z))
    assert res.rank_deficient == ["z"]


def test_the_later_of_aliased_columns_is_dropped_when_the_intercept_comes_last():
    """R's column order: [d1, d2, 1] with d1 + d2 = 1 drops the constant, not d2."""
    d = lmmops.CrossedDesign.from_frame(BASE, ["a", "b"])
    d1 = (BASE.x.to_numpy() > 0).astype(float)
    X = np.column_stack([d1, 1.0 - d1, np.ones(len(BASE))])
    y = BASE.y.to_numpy() + 1e8
    with pytest.warns(RankDeficientWarning, match=r"\(one\)"):
        model = lmmops.LMM(d, X, y, fixef_names=["d1", "d2", "one"])
    assert model.rank_deficient == ["one"]
    res = model.fit()
    ref = lmmops.LMM(d, X[:, :2], y - 1e8).fit()
    np.testing.assert_allclose(res.fixef[["d1", "d2"]], ref.fixef + 1e8, rtol=0, atol=1e-6)
    assert res.objective == pytest.approx(ref.objective, abs=1e-7)


@settings(derandomize=True, max_examples=25, deadline=None)
@given(st.lists(st.tuples(magnitude, mantissa, st.booleans(), st.integers(-2, 8)),
                min_size=4, max_size=4),
       st.integers(0, 2**31))
def test_rank_test_is_invariant_under_affine_maps_of_the_columns(maps, seed):
    """[1, x1, x2, x1 + 2 x2, x3] with each non-constant column mapped to a x + c."""
    rng = np.random.default_rng(seed)
    n = 50
    x1, x2, x3 = rng.normal(size=(3, n))
    X = np.column_stack([np.ones(n), x1, x2, x1 + 2 * x2 - 1, x3])
    names = ["(Intercept)", "x1", "x2", "x12", "x3"]
    assert rank_columns(X, names)[1] == ["x12"]
    Y = X.copy()
    for j, (e, m, neg, ec) in enumerate(maps, start=1):
        a = _power(e, m, neg)
        Y[:, j] = a * X[:, j] + m * 10.0 ** ec * abs(a)
    keep, dropped = rank_columns(Y, names)
    assert keep.tolist() == [0, 1, 2, 4]
    assert dropped == ["x12"]


def test_response_fitted_exactly_by_the_fixed_effects_is_a_clear_error():
    df = _with(BASE, y=1e8 + 2.0 * BASE.x)
    with pytest.raises(LmmopsError, match="fitted exactly by the fixed effects"):
        lmmops.fit(FORMULA, df)
    d = lmmops.CrossedDesign.from_frame(BASE, ["a", "b"])
    X = np.column_stack([np.ones(len(BASE)), BASE.x])
    X[3, 1] = np.inf
    with pytest.raises(LmmopsError, match="X has missing or non-finite values"):
        lmmops.LMM(d, X, BASE.y.to_numpy())


@pytest.mark.parametrize(("a", "c", "ax", "cx"), [(1.0, 1e8, 1.0, 0.0), (-2e-6, 5e3, 3e7, 1.7e9),
                                                  (4e5, 0.0, 1e-6, 1e4)])
def test_mme_level_space_solution_is_equivariant(a, c, ax, cx):
    """Henderson's equations at given variances: the level-space route raised "fitted
    exactly" for y + 1e8; checked against the dense route on the base data."""
    from lmmops.estimation.mme import solve

    d = lmmops.CrossedDesign.from_frame(BASE, ["a", "b"])
    base_df, new_df = shifted(BASE, a, c)
    base_df = shifted(base_df, ax, cx, column="x")[0]
    new_df = shifted(new_df, ax, cx, column="x")[1]
    X0 = np.column_stack([np.ones(len(BASE)), base_df.x])
    X1 = np.column_stack([np.ones(len(BASE)), new_df.x])
    var, s2 = np.array([0.6, 0.3]), 1.1
    dense = solve(X0, base_df.y, Z=d.indicator_all(), G=np.repeat(var, d.n_levels),
                  sigma2_e=s2, blocks=["C_inv"])
    lev = solve(X1, new_df.y, design=d, variances=a * a * var, sigma2_e=a * a * s2,
                blocks=["C_inv"])
    L = np.array([[1.0, -cx / ax], [0.0, 1.0 / ax]])
    tau = L @ (a * dense.tau + [c, 0.0])
    var_tau = a * a * L @ dense.var_tau @ L.T
    se = np.sqrt(np.diag(var_tau))
    assert np.all(np.abs(lev.tau - tau) <= 1e-8 * se + 64 * EPS * np.abs(tau))
    np.testing.assert_allclose(lev.var_tau, var_tau, rtol=1e-8, atol=1e-10 * se.max() ** 2)
    np.testing.assert_allclose(lev.u, a * dense.u, rtol=0, atol=1e-9 * abs(a))
    np.testing.assert_allclose(lev.pev_diag, a * a * dense.pev_diag, rtol=1e-9)
    M = sla_block_diag(L, np.eye(d.q))  # C_inv's order: X, then Z
    want = a * a * M @ dense.C_inv @ M.T
    np.testing.assert_allclose(lev.C_inv, want, rtol=1e-7, atol=1e-9 * np.abs(want).max())
