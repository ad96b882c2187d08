"""Nested grouping factors ``(e | a/b)`` against lme4, name for name and number for number.

The reference is ``tests/data/lme4_nesting.json`` (written by ``make_lme4_nesting.R`` with
lme4 1.1-31 from ``pastes.csv``, R's copy of lme4::Pastes, and ``nesting_sim.csv``, made by
``make_nesting_sim.py``). lme4 expands ``(e | a/b)`` to ``(e | b:a) + (e | a)`` and names
the factors by R's deparse of the interaction (``b:a``, ``c:(b:a)``); the level labels are
R's ``factor(b:a)`` levels, ``"b_level:a_level"`` with ``b`` slowest. An interaction written
out, ``(1|batch:cask)``, keeps its name and order.
"""

import json
import pathlib

import numpy as np
import pandas as pd
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import lmmops
from lmmops.cli import main
from lmmops.data.design import CrossedDesign
from lmmops.data.formula import grouping_columns, parse_formula, varcorr_names
from lmmops.data.terms import theta_names
from lmmops.errors import DesignError

HERE = pathlib.Path(__file__).parent / "data"
REF = json.loads((HERE / "lme4_nesting.json").read_text())
FITS = {f["id"]: f for f in REF["fits"]}
CRIT_RTOL = 1e-6
THETA_ATOL = 1e-4


def _data(name):
    return pd.read_csv(HERE / f"{name}.csv")


@pytest.fixture(scope="module")
def fits():
    return {k: lmmops.fit(f["formula"], _data(f["data"])) for k, f in FITS.items()}


def test_reference_data_are_the_generated_ones():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_nesting_sim",
                                                  HERE / "make_nesting_sim.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.make() == (HERE / "nesting_sim.csv").read_text()
    pastes = _data("pastes")
    assert pastes.shape == (60, 4)
    assert pastes.strength.sum() == pytest.approx(3603.2, abs=1e-9)  # sum(Pastes$strength)


@pytest.mark.parametrize("fid", list(FITS))
def test_criterion_and_theta_match_lme4(fits, fid):
    ref, res = FITS[fid], fits[fid]
    assert res.converged
    assert abs(res.reml_criterion - ref["reml_criterion"]) <= CRIT_RTOL * ref["reml_criterion"]
    names = theta_names(res.terms)
    assert names == ref["theta"]["names"]
    np.testing.assert_allclose(res.theta.to_numpy(), ref["theta"]["values"], rtol=0,
                               atol=THETA_ATOL)
    # intercept-only models key theta by factor (lmmops' convention), in lme4's order
    keys = ([n.removesuffix(".(Intercept)") for n in names] if res.intercepts_only
            else names)
    assert list(res.theta.index) == keys
    np.testing.assert_allclose(res.sigma, ref["sigma"], rtol=1e-4)
    np.testing.assert_allclose(res.fixef.to_numpy(), list(ref["fixef"].values()), rtol=1e-4)
    assert list(res.fixef.index) == list(ref["fixef"])


@pytest.mark.parametrize("fid", list(FITS))
def test_group_names_levels_and_order_match_lme4(fits, fid):
    ref, res = FITS[fid], fits[fid]
    assert [t.group for t in res.terms] == ref["cnms"]
    assert list(res.ranef) == ref["flist"]
    assert list(res.n_levels) == ref["flist"]
    d = res.model.design
    for g, lv in ref["levels"].items():
        assert res.n_levels[g] == lv["nlevels"]
        assert list(d.levels[d.index(g)][:6]) == lv["first"]
        assert list(res.ranef[g].index[:6]) == lv["first"]


@pytest.mark.parametrize("fid", list(FITS))
def test_varcorr_and_ranef_match_lme4(fits, fid):
    ref, res = FITS[fid], fits[fid]
    vc = res.varcorr
    assert list(vc.grp) == [r["grp"] for r in ref["varcorr"]]
    assert [v if isinstance(v, str) else None for v in vc.var1] == \
        [r["var1"] for r in ref["varcorr"]]
    assert [v if isinstance(v, str) else None for v in vc.var2] == \
        [r["var2"] for r in ref["varcorr"]]
    np.testing.assert_allclose(vc.vcov.to_numpy(), [r["vcov"] for r in ref["varcorr"]],
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(vc.sdcor.to_numpy(), [r["sdcor"] for r in ref["varcorr"]],
                               rtol=1e-4, atol=1e-6)
    for g, re in ref["ranef"].items():
        tab = res.ranef[g]
        tab = tab.to_frame() if isinstance(tab, pd.Series) else tab
        assert list(tab.index[:3]) == re["rows"]
        assert list(tab.columns) == re["columns"] or (
            re["columns"] == ["(Intercept)"] and tab.shape[1] == 1)
        got = tab.iloc[:3].to_numpy()
        want = np.column_stack([re["values"][c] for c in re["columns"]])
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def test_summary_prints_lme4_names(fits):
    text = fits["pastes_nested"].summary()
    assert "groups:  cask:batch, 30; batch, 10" in text
    rows = [ln.split()[0] for ln in text.split("Random effects:")[1].split("Number")[0]
            .splitlines()[2:] if ln.strip()]
    assert rows == ["cask:batch", "batch", "Residual"]
    text = fits["sim_double_vert_nested"].summary()  # lme4 prints make.names'd names
    rows = [ln.split()[0] for ln in text.split("Random effects:")[1].split("Number")[0]
            .splitlines()[2:] if ln.strip()]
    assert rows == ["b.a", "b.a.1", "a", "a.1", "Residual"]
    assert "groups:  b:a, 40; a, 10" in text
    assert "groups:  c:(b:a), 120; b:a, 40; a, 10" in fits["sim_three_level"].summary()


def test_cli_json_values_use_lme4_names(capsys):
    ref = FITS["pastes_nested"]
    assert main(["fit", str(HERE / "pastes.csv"), "--formula", ref["formula"], "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n_levels"] == {"cask:batch": 30, "batch": 10}
    assert list(out["theta"]) == ["cask:batch", "batch"]
    assert list(out["variances"]) == ["cask:batch", "batch", "Residual"]
    assert [r["grp"] for r in out["varcorr"]] == [r["grp"] for r in ref["varcorr"]]
    assert abs(out["reml_criterion"] - ref["reml_criterion"]) <= CRIT_RTOL * 247
    # the contract's field names are unchanged by the new names
    assert {"n_levels", "theta", "variances", "varcorr", "stddev", "mc_stderr",
            "variances_se"} <= set(out)


def test_predict_newdata_on_nested_factors(fits):
    res = fits["sim_three_level"]
    sim = _data("nesting_sim")
    np.testing.assert_allclose(res.predict(sim), res.fitted, rtol=0, atol=1e-10)
    # a pupil label the fit never saw gets no random effect of that factor
    new = sim.iloc[:1].assign(c="p9")
    b = {g: res.ranef[g] for g in res.ranef}
    want = (res.fixef["(Intercept)"] + res.fixef["x"] * new.x.iloc[0]
            + b["b:a"]["k1:s01"] + b["a"]["s01"])
    assert res.predict(new)[0] == pytest.approx(want, abs=1e-10)


def test_interaction_in_two_orders_fits_as_lme4_or_is_refused_with_a_hint(fits):
    """``(1|a/b) + (0 + x|a:b)``: b:a and a:b group the rows identically, but their terms
    share no column, so it is the model of ``(1|a/b) + (0 + x|b:a)`` and lme4 fits it as
    two factors (``sim_two_orders`` in the reference: the criterion, theta, names,
    levels, varcorr and BLUPs are compared by the tests above). Two names of one
    grouping whose terms share a column are refused, naming both (before, every such
    pair was refused)."""
    sim = _data("nesting_sim")
    res = fits["sim_two_orders"]
    assert [t.group for t in res.terms] == ["a:b", "b:a", "a"]
    same = lmmops.fit("y ~ x + (1|a/b) + (0 + x|b:a)", sim)  # the same factor twice
    assert [t.group for t in same.terms] == ["b:a", "b:a", "a"]
    assert res.reml_criterion == pytest.approx(same.reml_criterion, rel=1e-12)
    np.testing.assert_allclose(np.sort(res.theta.to_numpy()), np.sort(same.theta.to_numpy()),
                               rtol=1e-6)
    # the prediction for new rows reads each name's labels in its own order
    np.testing.assert_allclose(res.predict(sim.iloc[::7]), res.fitted[::7], rtol=1e-10)
    with pytest.raises(DesignError, match=r"'b:a' and 'a:b' are one interaction written in "
                                          r"two orders.*'b:a'"):
        lmmops.fit("y ~ x + (1|b:a) + (1|a:b)", sim)
    with pytest.raises(DesignError, match=r"\(1 \| b:a\) and \(1 \+ x \| a:b\) on grouping "
                                          r"factors 'b:a' and 'a:b' \(which group the "
                                          r"observations identically\): column '\(Intercept\)'"):
        lmmops.fit("y ~ x + (1|a/b) + (1 + x|a:b)", sim)
    # hand-built terms: the model's own check of the two names' columns
    model = lmmops.LMM.from_formula("y ~ x + (1|a/b) + (0 + x|a:b)", sim)
    twin = [t for t in model.terms if t.group == "a:b"][0]
    dup = type(twin)(twin.group, twin.codes, twin.levels, ("(Intercept)",))
    with pytest.raises(DesignError, match=r"terms on both have the column\(s\) "
                                          r"\['\(Intercept\)'\]"):
        lmmops.LMM(model.design, model.X, model.y, terms=[*model.terms, dup])


@pytest.mark.parametrize(("formula", "random"), [
    ("y ~ (1|a/b)", ("b:a", "a")),
    ("y ~ (1|a/b/c)", ("c:(b:a)", "b:a", "a")),
    ("y ~ (1|a/b/c/d)", ("d:(c:(b:a))", "c:(b:a)", "b:a", "a")),
    ("y ~ (1|a/b:c)", ("b:c:a", "a")),  # as lme4's findbars
    ("y ~ (1|a:b/c)", ("c:(a:b)", "a:b")),  # lme4 1.1-31 fails on it; its naming rule
    ("y ~ (1|`my a`/b)", ("b:`my a`", "my a")),  # deparse quotes a non-syntactic name
    ("y ~ (1|`a`/b)", ("b:a", "a")),
    ("y ~ (1|b:a) + (1|a:b)", ("b:a", "a:b")),  # written out: kept as written
])
def test_parsed_names_are_lme4s(formula, random):
    assert parse_formula(formula).random == random


_NAMES = st.sampled_from(["a", "b", "c", "d", "g.1", "my a", "if"])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(_NAMES, min_size=1, max_size=2, unique=True), min_size=2,
                max_size=4, unique_by=tuple))
def test_nested_names_give_back_their_columns(parts):
    """For ``p0/p1/.../pk`` the factor of depth i is the interaction of p_i, ..., p_0 in
    that order (lme4's level order: p_i slowest), whatever the names."""
    cols = [c for p in parts for c in p]
    assume(len(set(cols)) == len(cols))
    q = ["`" + c + "`" if c in ("my a", "if") else c for c in cols]
    text, it = [], iter(q)
    for p in parts:
        text.append(":".join(next(it) for _ in p))
    random = parse_formula("y ~ (1|" + "/".join(text) + ")").random
    assert len(random) == len(parts)
    for i, name in enumerate(reversed(random)):
        want = tuple(c for p in reversed(parts[:i + 1]) for c in p)
        assert grouping_columns(name) == want


def test_design_levels_of_a_nested_name_are_rs():
    # R: with(df, levels(factor(c:(b:a)))) and levels(factor(b:a))
    df = pd.DataFrame({"a": ["B", "A", "B", "A", "B", "A"],
                       "b": ["y", "x", "x", "y", "x", "x"], "c": [2, 1, 1, 1, 2, 1]})
    d = CrossedDesign.from_frame(df, ["c:(b:a)", "b:a"])
    assert d.names == ("c:(b:a)", "b:a")
    assert list(d.levels[0]) == ["1:x:A", "1:x:B", "1:y:A", "2:x:B", "2:y:B"]
    assert list(d.levels[1]) == ["x:A", "x:B", "y:A", "y:B"]


@pytest.mark.parametrize(("groups", "r_names"), [  # R: make.names(groups, unique = TRUE)
    (["if", "if"], ["if.", "if..1"]),
    ([".2a", ".2a", "_a"], ["X.2a", "X.2a.1", "X_a"]),
    (["c:(b:a)", "c:(b:a)", "b:`my a`"], ["c..b.a.", "c..b.a..1", "b..my.a."]),
    (["b:a", "b:a", "a", "a", "a.1"], ["b.a", "b.a.1", "a", "a.2", "a.1"]),
    (["c:(b:a)", "b:a"], ["c:(b:a)", "b:a"]),  # no repeat: the names as they are
])
def test_varcorr_names_are_rs_make_names(groups, r_names):
    assert varcorr_names(groups) == r_names
