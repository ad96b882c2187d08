"""Formula parsing, coefficient names, and every bad input's error message."""

import numpy as np
import pandas as pd
import pytest

import lmmops
from lmmops.data.formula import (
    RankDeficientWarning,
    check_full_rank,
    lme4_names,
    parse_formula,
)
from lmmops.errors import (
    DenseTooLargeError,
    DesignError,
    DisconnectedDesignWarning,
    FormulaError,
    RankDeficientError,
)


@pytest.fixture
def df():
    rng = np.random.default_rng(7)
    n = 240
    out = pd.DataFrame({
        "g": rng.integers(0, 12, n),
        "h": rng.choice(list("abcdef"), n),
        "x": rng.normal(size=n),
        "f": pd.Categorical(rng.choice(["lo", "mid", "hi"], n), categories=["lo", "mid", "hi"]),
    })
    out["y"] = (1 + 0.5 * out.x + rng.normal(size=12)[out.g]
                + rng.normal(size=6)[pd.Categorical(out.h).codes] + rng.normal(size=n))
    return out


# ---------------------------------------------------------------- parsing
@pytest.mark.parametrize(("formula", "fixed", "random"), [
    ("y ~ 1 + (1|g)", "1", ("g",)),
    ("y ~ x + (1 | g) + (1 | h)", "x", ("g", "h")),
    ("y~(1|g)+x+(1|h)", "x", ("g", "h")),
    ("y ~ 1 + (1|a:b)", "1", ("a:b",)),
    ("y ~ 1 + (1|a/b)", "1", ("b:a", "a")),  # lme4's names and order
    ("y ~ 1 + (1|a/b/c)", "1", ("c:(b:a)", "b:a", "a")),
    ("y ~ x + log(z) + (1||g)", "x + log(z)", ("g",)),
    ("y ~ x + (x|g) + (1|h)", "x", ("g", "h")),  # slopes: tests/test_slope_terms.py
    ("y ~ x + (1|g) + (0 + x|g) + (x||h/k)", "x", ("g", "k:h", "h")),
])
def test_parse_formula(formula, fixed, random):
    pf = parse_formula(formula)
    assert pf.response == "y"
    assert pf.fixed == fixed
    assert pf.random == random


def test_lme4_names():
    assert lme4_names(["Intercept", "service[T.1]", "f[T.mid]:x", "C(z)[T.b]"]) == [
        "(Intercept)", "service1", "fmid:x", "C(z)b"]


def test_treatment_contrast_names_match_lme4(df):
    res = lmmops.fit("y ~ 1 + f + x + (1|g) + (1|h)", df)
    assert list(res.fixef.index) == ["(Intercept)", "fmid", "fhi", "x"]


def test_interaction_and_nested_terms(df):
    res = lmmops.fit("y ~ 1 + (1|g) + (1|g:h)", df)
    assert set(res.n_levels) == {"g", "g:h"}
    res2 = lmmops.fit("y ~ 1 + (1|g/h)", df)
    assert list(res2.variances) == ["h:g", "g", "Residual"]  # lme4's names and order
    np.testing.assert_allclose(res2.objective, res.objective, rtol=1e-10)
    assert res.ranef["g:h"].index[0] == "0:a"
    assert res2.ranef["h:g"].index[0] == "a:0"  # R's factor(h:g): h slowest


@pytest.mark.parametrize(("formula", "exc", "match"), [
    ("y ~ x + (0|g)", DesignError, r"term \(0 \| g\) has no columns"),
    ("y ~ x + (1|g) + (1 + x|g)", DesignError, "only the sum of the two"),
    ("y ~ x", FormulaError, "no random-effects term"),
    ("y + x", FormulaError, "response ~ terms"),
    (" ~ (1|g)", FormulaError, "no response"),
    ("y ~ (1|g) + (1|g)", FormulaError, "appears twice"),
    ("y ~ (1|g", FormulaError, "unbalanced parentheses"),
    ("y ~ (1|)", FormulaError, "no grouping factor"),
])
def test_formula_errors(df, formula, exc, match):
    with pytest.raises(exc, match=match):
        lmmops.fit(formula, df)


# ---------------------------------------------------------------- bad data
def test_unknown_column_in_fixed_part(df):
    with pytest.raises(FormulaError, match="unknown column 'zz' in the fixed effects"):
        lmmops.fit("y ~ zz + (1|g)", df)


def test_unknown_grouping_column(df):
    with pytest.raises(DesignError, match="unknown column 'zz' for grouping factor"):
        lmmops.fit("y ~ 1 + (1|zz)", df)


def test_unknown_response(df):
    with pytest.raises(FormulaError, match="unknown response column 'yy'"):
        lmmops.fit("yy ~ 1 + (1|g)", df)


def test_non_numeric_response(df):
    with pytest.raises(FormulaError, match="response 'h' is not numeric"):
        lmmops.fit("h ~ 1 + (1|g)", df)
    with pytest.raises(FormulaError, match="response 'f' is not numeric"):
        lmmops.fit("f ~ 1 + (1|g)", df)


def test_nan_in_response(df):
    df.loc[5, "y"] = np.nan
    with pytest.raises(FormulaError, match=r"response 'y' has 1 missing .* row 5"):
        lmmops.fit("y ~ 1 + (1|g)", df)


def test_nan_in_factor(df):
    df["g"] = df["g"].astype(float)
    df.loc[[3, 9], "g"] = np.nan
    with pytest.raises(DesignError, match=r"grouping factor 'g' has 2 missing .* row 3"):
        lmmops.fit("y ~ 1 + (1|g)", df)


def test_nan_in_fixed_covariate(df):
    df.loc[4, "x"] = np.nan
    with pytest.raises(FormulaError, match="column 'x' in the fixed effects has 1 missing"):
        lmmops.fit("y ~ x + (1|g)", df)


def test_single_level_factor(df):
    df["one"] = "only"
    with pytest.raises(DesignError, match="grouping factor 'one' has a single level"):
        lmmops.fit("y ~ 1 + (1|g) + (1|one)", df)


def test_factor_with_as_many_levels_as_observations(df):
    df["id"] = np.arange(len(df))
    with pytest.raises(DesignError, match="'id' has 240 levels for 240 observations"):
        lmmops.fit("y ~ 1 + (1|id)", df)


def test_rank_deficient_x_names_the_aliased_columns(df):
    """lme4's behaviour: drop the later aliased column with a message; report it as NaN."""
    df["x2"] = 2 * df["x"]
    with pytest.warns(RankDeficientWarning, match=(
            r"fixed-effect model matrix is rank deficient so dropping 1 column / "
            r"coefficient \(x2\)")):
        res = lmmops.fit("y ~ x + x2 + (1|g)", df)
    assert np.isnan(res.fixef["x2"])
    assert np.isnan(res.fixef_se["x2"])
    assert res.rank_deficient == ["x2"]
    assert res.to_dict()["rank_deficient"] == ["x2"]
    assert "rank deficient so dropping 1 column" in res.summary()
    ref = lmmops.fit("y ~ x + (1|g)", df)
    np.testing.assert_allclose(res.objective, ref.objective, rtol=1e-12)
    np.testing.assert_allclose(res.fixef[["(Intercept)", "x"]], ref.fixef, rtol=1e-10)
    assert res.df == ref.df
    # the formula-free building block still refuses a rank-deficient X
    X = np.column_stack([np.ones(4), [1., 2, 3, 4], [2., 4, 6, 8]])
    with pytest.raises(RankDeficientError, match="rank deficient.*x2"):
        check_full_rank(X, ["(Intercept)", "x", "x2"])


def test_codes_out_of_range():
    with pytest.raises(DesignError, match="factor 'a': code 5 is out of range 0..2"):
        lmmops.CrossedDesign.from_codes([[0, 1, 2, 5]], names=["a"], n_levels=[3])
    with pytest.raises(DesignError, match="code -1 is out of range"):
        lmmops.CrossedDesign.from_codes([[0, 1, -1, 1]], names=["a"], n_levels=[2])


def test_disconnected_design_warns(df):
    rng = np.random.default_rng(0)
    n = 200
    half = np.arange(n) < n // 2
    a = np.where(half, rng.integers(0, 5, n), rng.integers(5, 10, n))
    b = np.where(half, rng.integers(0, 4, n), rng.integers(4, 8, n))
    data = pd.DataFrame({"a": a, "b": b, "y": rng.normal(size=n)})
    with pytest.warns(DisconnectedDesignWarning, match="2 connected components"):
        lmmops.fit("y ~ 1 + (1|a) + (1|b)", data)


def test_nested_design_does_not_warn(df):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", DisconnectedDesignWarning)
        lmmops.fit("y ~ 1 + (1|g/h)", df)


def test_dense_block_too_big_is_refused(df, monkeypatch):
    monkeypatch.setenv("LMMOPS_MAX_DENSE_GIB", "1e-9")
    with pytest.raises(DenseTooLargeError, match="dense Schur block .* GiB"):
        lmmops.fit("y ~ 1 + (1|g) + (1|h)", df, solver="direct")
    # solver="auto" takes the matrix-free route instead, and says so
    res = lmmops.fit("y ~ 1 + (1|g) + (1|h)", df, solver="auto")
    assert res.solver == "iterative"
    assert any("picked 'iterative'" in note for note in res.notes)


def test_bad_method_and_solver(df):
    with pytest.raises(lmmops.LmmopsError, match="method must be 'REML' or 'ML'"):
        lmmops.fit("y ~ 1 + (1|g)", df, method="MLE")
    with pytest.raises(lmmops.LmmopsError, match="solver must be one of"):
        lmmops.fit("y ~ 1 + (1|g)", df, solver="magic")


def test_data_must_be_a_dataframe():
    with pytest.raises(FormulaError, match="must be a pandas DataFrame"):
        lmmops.fit("y ~ 1 + (1|g)", {"y": [1, 2]})


# ---------------------------------------------------------------- staged API and result
def test_staged_form_equals_one_call(df):
    model = lmmops.LMM.from_formula("y ~ x + (1|g) + (1|h)", df, method="ML")
    res = model.fit()
    res2 = lmmops.fit("y ~ x + (1|g) + (1|h)", df, method="ML")
    np.testing.assert_allclose(res.objective, res2.objective, rtol=1e-12)
    theta = res.theta.to_numpy()
    np.testing.assert_allclose(model.objective()(theta), res.deviance, rtol=1e-12)
    assert res.reml_criterion is None
    assert res.deviance is not None
    assert "deviance" in res.to_dict()
    assert "reml_criterion" not in res.to_dict()


def test_one_factor_model_matches_oneway_anova_on_balanced_data():
    """Balanced one-way REML has the closed form (MSA - MSE)/m, MSE."""
    rng = np.random.default_rng(3)
    a, m = 15, 6
    g = np.repeat(np.arange(a), m)
    y = rng.normal(size=a)[g] + rng.normal(size=a * m)
    df = pd.DataFrame({"g": g, "y": y})
    res = lmmops.fit("y ~ 1 + (1|g)", df)
    means = df.groupby("g").y.mean().to_numpy()
    msa = m * np.sum((means - y.mean()) ** 2) / (a - 1)
    mse = np.sum((y - means[g]) ** 2) / (a * (m - 1))
    assert res.variances["Residual"] == pytest.approx(mse, rel=1e-7)
    assert res.variances["g"] == pytest.approx((msa - mse) / m, rel=1e-6)
    assert res.fixef["(Intercept)"] == pytest.approx(y.mean(), rel=1e-12)


def test_summary_layout(df):
    res = lmmops.fit("y ~ x + (1|g) + (1|h)", df)
    s = res.summary()
    for piece in ("Linear mixed model fit by REML", "REML criterion at convergence:",
                  "Scaled residuals:", "Random effects:", "Groups", "Residual",
                  "Number of obs: 240, groups:  g, 12; h, 6", "Fixed effects:", "t value",
                  "Correlation of Fixed Effects:"):
        assert piece in s
    assert "maximum likelihood" in lmmops.fit("y ~ x + (1|g)", df, method="ML").summary()
    assert res.ranef["h"].index.tolist() == list("abcdef")
    assert res.iterations >= 1
    assert res.elapsed_s > 0
    assert res.gradient_norm < 1
