"""LMMResult read from the design's terms: varcorr (lme4's as.data.frame(VarCorr)), its
JSON records, the protocol-backed exactness flag."""

import json

import numpy as np
import pandas as pd
import pytest

import lmmops
from lmmops.errors import LmmopsError


@pytest.fixture(scope="module")
def fitted():
    rng = np.random.default_rng(3)
    n = 300
    df = pd.DataFrame({"g": rng.integers(0, 15, n), "h": rng.integers(0, 6, n)})
    df["y"] = rng.normal(size=15)[df.g] + 0.5 * rng.normal(size=6)[df.h] + rng.normal(size=n)
    return lmmops.fit("y ~ 1 + (1|g) + (1|h)", df, solver="direct")


def test_varcorr_matches_variances(fitted):
    vc = fitted.varcorr
    assert list(vc.columns) == ["grp", "var1", "var2", "vcov", "sdcor"]
    assert list(vc.grp) == ["g", "h", "Residual"]
    assert list(vc.var1[:2]) == ["(Intercept)", "(Intercept)"]
    assert vc.var2.isna().all()
    assert pd.isna(vc.var1.iloc[2])
    np.testing.assert_allclose(vc.vcov, [fitted.variances[k] for k in ("g", "h", "Residual")],
                               rtol=1e-15)
    np.testing.assert_allclose(vc.sdcor, np.sqrt(vc.vcov), rtol=1e-15)


def test_varcorr_json_records_are_strict(fitted):
    out = json.loads(json.dumps(fitted.to_dict(), allow_nan=False))
    rec = out["varcorr"]
    assert rec[-1] == {"grp": "Residual", "var1": None, "var2": None,
                       "vcov": fitted.variances["Residual"],
                       "sdcor": fitted.stddev["Residual"],
                       "vcov_se": fitted.variances_se["Residual"]}
    assert rec[0]["vcov_se"] == fitted.variances_se[rec[0]["grp"]]
    assert rec[0]["var1"] == "(Intercept)"
    assert rec[0]["var2"] is None


def test_covariances_are_one_by_one_for_intercepts(fitted):
    assert fitted.covariances["g"].shape == (1, 1)
    assert fitted.covariances["g"].iloc[0, 0] == fitted.variances["g"]


def test_exactness_comes_from_the_objective(fitted):
    assert fitted.exact is True
    obj, ev = fitted.fit_objective(exact=True)
    assert ev is fitted.evaluation


def test_stochastic_fit_refuses_exact_only_quantities():
    rng = np.random.default_rng(4)
    n = 400
    df = pd.DataFrame({"g": rng.integers(0, 20, n), "h": rng.integers(0, 8, n)})
    df["y"] = rng.normal(size=20)[df.g] + rng.normal(size=8)[df.h] + rng.normal(size=n)
    res = lmmops.fit("y ~ 1 + (1|g) + (1|h)", df, solver="iterative")
    assert res.exact is False
    with pytest.raises(LmmopsError, match="solver='direct'"):
        res.fit_objective(exact=True)
    assert res.mc_stderr["loglik"] > 0
    assert any(n.startswith("iterative solver:") for n in res.notes)
