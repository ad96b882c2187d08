"""lmmops.anova: likelihood-ratio tests with ML refits, AIC/BIC table, errors."""

import numpy as np
import pandas as pd
import pytest
from scipy import stats

import lmmops
from lmmops.analysis.compare import RefitWarning
from lmmops.errors import LmmopsError


@pytest.fixture(scope="module")
def df():
    rng = np.random.default_rng(21)
    n = 300
    out = pd.DataFrame({"a": rng.integers(0, 15, n), "b": rng.integers(0, 8, n),
                        "x": rng.normal(size=n)})
    out["y"] = (0.3 * out.x + rng.normal(size=15)[out.a] + 0.6 * rng.normal(size=8)[out.b]
                + rng.normal(size=n))
    return out


def test_lrt_for_a_random_term(df):
    small = lmmops.fit("y ~ x + (1|a)", df, method="ML")
    big = lmmops.fit("y ~ x + (1|a) + (1|b)", df, method="ML")
    tab = lmmops.anova(big, small)  # any order: sorted by npar
    assert list(tab.index) == ["y ~ x + (1|a)", "y ~ x + (1|a) + (1|b)"]
    chisq = small.deviance - big.deviance
    assert tab["Chisq"].iloc[1] == pytest.approx(chisq, rel=1e-12)
    assert tab["Df"].iloc[1] == 1
    assert tab["Pr(>Chisq)"].iloc[1] == pytest.approx(stats.chi2.sf(chisq, 1))
    assert tab["AIC"].iloc[0] == pytest.approx(small.aic)
    assert tab["BIC"].iloc[1] == pytest.approx(big.bic)
    assert np.isnan(tab["Chisq"].iloc[0])
    assert (tab["mc_error"] == 0.0).all()


def test_reml_fits_are_refitted_by_ml(df):
    small = lmmops.fit("y ~ 1 + (1|a) + (1|b)", df)
    big = lmmops.fit("y ~ x + (1|a) + (1|b)", df)
    with pytest.warns(RefitWarning, match=r"refitting model\(s\) with ML \(instead of REML\)"):
        tab = lmmops.anova(small, big)
    ml_small = lmmops.fit("y ~ 1 + (1|a) + (1|b)", df, method="ML")
    ml_big = lmmops.fit("y ~ x + (1|a) + (1|b)", df, method="ML")
    assert tab["logLik"].iloc[0] == pytest.approx(ml_small.loglik, rel=1e-9)
    assert tab["Chisq"].iloc[1] == pytest.approx(ml_small.deviance - ml_big.deviance, rel=1e-7)


def test_refit_false_compares_reml_fits_with_the_same_fixed_effects(df):
    small = lmmops.fit("y ~ x + (1|a)", df)
    big = lmmops.fit("y ~ x + (1|a) + (1|b)", df)
    tab = lmmops.anova(small, big, refit=False, names=["small", "big"])
    assert tab["Chisq"].iloc[1] == pytest.approx(small.reml_criterion - big.reml_criterion)
    assert list(tab.index) == ["small", "big"]


def test_errors(df):
    a = lmmops.fit("y ~ x + (1|a)", df, method="ML")
    b = lmmops.fit("y ~ x + (1|a)", df.iloc[:200], method="ML")
    with pytest.raises(LmmopsError, match="at least two fitted models"):
        lmmops.anova(a)
    with pytest.raises(LmmopsError, match="not all fitted to the same size of dataset"):
        lmmops.anova(a, b)
    df2 = df.assign(y=df.y + 1.0)
    c = lmmops.fit("y ~ x + (1|a)", df2, method="ML")
    with pytest.raises(LmmopsError, match="not all fitted to the same response"):
        lmmops.anova(a, c)
    r1 = lmmops.fit("y ~ 1 + (1|a)", df)
    r2 = lmmops.fit("y ~ x + (1|a)", df)
    with pytest.raises(LmmopsError, match="REML fits with different fixed effects"):
        lmmops.anova(r1, r2, refit=False)
    with pytest.raises(LmmopsError, match="names has 1 entries for 2 models"):
        lmmops.anova(a, lmmops.fit("y ~ x + (1|a) + (1|b)", df, method="ML"), names=["x"])
