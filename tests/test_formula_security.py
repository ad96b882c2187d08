"""Formula text never runs code: the allow-list, its three layers, and honest messages.

Every injection attempt below would leave a sentinel file behind (or put /etc/passwd in
the message) if any part of it ran. Each must raise FormulaError naming the offending
token, through lmmops.fit and through the command line, with no side effect. The
legitimate transforms must give formulaic's plain design matrix bit for bit.
"""

import builtins
import os
import subprocess
import sys

import formulaic
import numpy as np
import pandas as pd
import pytest
from formulaic.errors import FactorEvaluationError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lmmops
from lmmops.cli import main
from lmmops.data.formula import (
    _CONTEXT,
    ALLOWED_FUNCTIONS,
    _SandboxMaterializer,
    fixed_effects_matrix,
    lme4_names,
    parse_formula,
)
from lmmops.errors import FormulaError, LmmopsError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PASSWD_MARK = "root:x:0:0"  # first line of /etc/passwd on any Linux


@pytest.fixture(scope="module")
def df():
    rng = np.random.default_rng(12)
    n = 60
    out = pd.DataFrame({
        "g": rng.integers(0, 6, n),
        "h": rng.choice(list("abcde"), n),
        "x": rng.uniform(0.5, 4.0, n),
        "z": rng.normal(size=n),
        "f": rng.choice(["lo", "mid", "hi"], n),
        "Sepal.Length": rng.uniform(4.0, 7.0, n),
        "a b": rng.normal(size=n),
    })
    out["y"] = 1 + 0.3 * out.x + rng.normal(size=6)[out.g] + rng.normal(size=n)
    return out


@pytest.fixture
def sentinel(tmp_path):
    return str(tmp_path / "PWNED")


@pytest.fixture(scope="module")
def shared_sentinel(tmp_path_factory):
    # for the hypothesis tests: any example that ran code leaves it behind
    return str(tmp_path_factory.mktemp("sentinel") / "PWNED")


# ------------------------------------------------------------------ the battery
# (fixed-part text, a piece of the message that names the offending token); S is the
# sentinel path. Each would create S (or read /etc/passwd) if it were evaluated.
INJECTIONS = [
    ("I(__import__('os').system('touch S'))", "__import__"),
    ("{__import__('os').system('touch S')}", "__import__"),
    ("__import__('os').system('touch S')", "__import__"),
    ("I(open('/etc/passwd').read())", "'open'"),
    ("I(open('S', 'w').write('x'))", "'open'"),
    ("{open('S', 'w')}", "'open'"),
    ("I(exec(\"open('S', 'w')\"))", "'exec'"),
    ("I(eval(\"open('S', 'w')\"))", "'eval'"),
    ("I(compile('open(1)', 'f', 'eval'))", "'compile'"),
    ("I(getattr(x, 'to_csv')('S'))", "'getattr'"),
    ("I(globals())", "'globals'"),
    ("I(locals())", "'locals'"),
    ("I(vars(x))", "'vars'"),
    ("I(type(x))", "'type'"),
    ("I(setattr(x, 'name', 'S'))", "'setattr'"),
    ("I(print('pwned'))", "'print'"),
    ("I(breakpoint())", "'breakpoint'"),
    ("I((lambda: __import__('os').system('touch S'))())", "lambda"),
    ("{(lambda: open('S', 'w'))()}", "lambda"),
    ("I([open('S', 'w') for _ in [0]])", "comprehension"),
    ("I({k: open('S', 'w') for k in [0]})", "comprehension"),
    ("I(sum(open('S', 'w') for _ in [0]))", "'sum'"),
    ("I(x.__class__)", "__class__"),
    ("x.__class__", "__class__"),
    ("I(x.__class__.__base__.__subclasses__())", "__class__"),
    ("I(().__class__.__bases__[0].__subclasses__())", "__class__"),
    ("I(np.__builtins__)", "__builtins__"),
    ("I(__builtins__['open']('S', 'w'))", "__builtins__"),
    ("I(contr.__init__)", "__init__"),
    ("I(np.save('S', x))", "np.save"),
    ("I(np.load('S'))", "np.load"),
    ("I(np.fromfile('/etc/passwd'))", "np.fromfile"),
    ("I(np.lib.npyio.savetxt('S', x))", "np.lib"),
    ("I(numpy.testing)", "numpy.testing"),
    ("I(x.to_csv('S'))", "x.to_csv"),
    ("x.to_csv('S')", "x.to_csv"),
    ("I(x.values.tofile('S'))", "tofile"),
    ("I(os.system('touch S'))", "os.system"),
    ("I(sys.modules)", "sys.modules"),
    ("I(x)[0]", "subscript"),
    ("I(*[open('S', 'w')])", "starred"),
    ("I(**{'a': open('S', 'w')})", "**"),
    ("I((w := open('S', 'w')))", "assignment"),
    ("I(f\"{open('S', 'w')}\")", "f-string"),
    ("I(x if open('S', 'w') else x)", "conditional"),
    ("scale(x, _state=open('S', 'w'))", "_state"),
    ("C(f, contrasts=open('S', 'w'))", "'open'"),
    ("C(f, levels=[open('S', 'w')])", "open("),
    ("C(f, Treatment(open('S', 'w')))", "open("),
    ("C(f, contr.custom(open('S', 'w')))", "contr.custom"),
    ("poly(x, degree=open('S', 'w'))", "open("),
    ("I(lag(x))", "'lag'"),
    ("I(hashed(x))", "'hashed'"),
    ("Q('S')", "'Q'"),
    ("I(b'S')", "literal"),
    ("I('S' * 3)", "string"),
    ("I(x ** 10 ** 10 ** 10)", "power"),
    ("{x; open('S', 'w')}", "cannot parse"),
    ("I(x)\nimport os", "'import'"),
    ("lambda: open('S', 'w')", "lambda"),
    ("I(open)", "unknown column 'open'"),
]


def _fill(text, sentinel):
    return text.replace("'S'", repr(sentinel)).replace("touch S", f"touch {sentinel}")


def _no_side_effect(sentinel):
    # nothing was written next to the sentinel (np.save would add .npy to its name)
    folder = os.path.dirname(sentinel)
    return not os.path.exists(folder) or not os.listdir(folder)


def _assert_printable(msg):
    assert "\x1b" not in msg
    assert msg.isprintable()


def _assert_clean(msg, sentinel):
    assert _no_side_effect(sentinel), "an injected formula ran code"
    assert PASSWD_MARK not in msg
    _assert_printable(msg)


def _assert_cli_error(rc, err, token, sentinel):
    assert rc == 2
    assert err.startswith("lmmops: error: ")
    assert "Traceback" not in err
    assert token in err
    _assert_clean(err.strip(), sentinel)


def test_battery_is_large_enough():
    assert len(INJECTIONS) >= 40
    assert len({text for text, _ in INJECTIONS}) == len(INJECTIONS)


@pytest.mark.parametrize(("text", "token"), INJECTIONS)
def test_injection_refused_by_fit(df, sentinel, text, token):
    formula = f"y ~ {_fill(text, sentinel)} + (1|g)"
    with pytest.raises(FormulaError) as info:
        lmmops.fit(formula, df)
    msg = str(info.value)
    _assert_clean(msg, sentinel)
    assert token in msg


@pytest.mark.parametrize(("text", "token"), INJECTIONS)
def test_injection_refused_by_fixed_effects_matrix(df, sentinel, text, token):
    # the building block refuses on its own, with the data's columns known
    with pytest.raises(FormulaError) as info:
        fixed_effects_matrix(_fill(text, sentinel), df)
    _assert_clean(str(info.value), sentinel)


@pytest.mark.parametrize("formula", [
    "y ~ 1 + (__import__('os').system('touch S')|g)",  # random-term effects
    "y ~ 1 + (I(open('S', 'w'))|g)",
    "y ~ 1 + (1|__import__('os').system('touch S'))",  # grouping factor
    "y ~ 1 + (1|g:open('S', 'w'))",
    "__import__('os').system('touch S') ~ 1 + (1|g)",  # response: a column lookup only
])
def test_injection_outside_the_fixed_part(df, sentinel, formula):
    with pytest.raises(FormulaError) as info:
        lmmops.fit(_fill(formula, sentinel), df)
    _assert_clean(str(info.value), sentinel)


@pytest.fixture(scope="module")
def csv(df, tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "d.csv"
    df.to_csv(path, index=False)
    return str(path)


@pytest.mark.parametrize(("text", "token"), INJECTIONS)
def test_injection_refused_by_cli(csv, sentinel, capsys, text, token):
    rc = main(["fit", csv, "--formula", f"y ~ {_fill(text, sentinel)} + (1|g)"])
    _assert_cli_error(rc, capsys.readouterr().err, token, sentinel)


def _run_cli(csv, formula):
    return subprocess.run([sys.executable, "-m", "lmmops", "fit", csv, "--formula", formula],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_cli_process_refuses_shell_command(csv, sentinel):
    # the reproduction: this ran `touch` and exited 0
    out = _run_cli(csv, f"y ~ I(__import__('os').system('touch {sentinel}')) + (1|g)")
    _assert_cli_error(out.returncode, out.stderr, "__import__", sentinel)


@pytest.mark.slow
@pytest.mark.parametrize(("text", "token"), INJECTIONS)
def test_injection_refused_by_cli_process(csv, sentinel, text, token):
    out = _run_cli(csv, f"y ~ {_fill(text, sentinel)} + (1|g)")
    _assert_cli_error(out.returncode, out.stderr, token, sentinel)


# ------------------------------------------------------------------ defence in depth
@pytest.mark.parametrize(("code", "match"), [
    ("I(open('S', 'w'))", "'open' is not allowed"),
    ("I(__import__('os').system('touch S'))", "'__import__' is not allowed"),
    ("I(exec(\"open('S', 'w')\"))", "'exec' is not allowed"),
    ("I(getattr(x, 'to_csv')('S'))", "'getattr' is not allowed"),
    ("I(lag(x))", "'lag' is not allowed"),
    ("I(np.save('S', x))", "no attribute 'save'"),
    ("I(contr.custom)", "no attribute 'custom'"),
])
def test_evaluation_namespace_alone_blocks_builtins(df, sentinel, code, match):
    # formulaic's plain materializer, no lmmops pre-check: only the namespace stands
    # between the text and the builtins (formulaic wraps the refusal in its own error)
    with pytest.raises(Exception, match=match):
        formulaic.model_matrix(_fill(code, sentinel), df, context=_CONTEXT)
    assert _no_side_effect(sentinel)


def test_evaluation_namespace_shadows_every_builtin(monkeypatch, df, sentinel):
    # also one added after import (gettext.install adds _, the display hook too)
    monkeypatch.setattr(builtins, "late_builtin", open, raising=False)
    for name in dir(builtins):
        value = _CONTEXT[name]
        if name != "abs":  # abs is numpy's, the same numbers as the builtin
            with pytest.raises(FormulaError, match=f"'{name}' is not allowed"):
                value()
    with pytest.raises(FactorEvaluationError, match="'late_builtin' is not allowed"):
        formulaic.model_matrix(_fill("I(late_builtin('S', 'w'))", sentinel), df,
                               context=_CONTEXT)
    assert _no_side_effect(sentinel)


@pytest.mark.parametrize("code", [
    "I(open('S', 'w'))", "I((lambda: open('S', 'w'))())", "I(x.to_csv('S'))",
])
def test_sandbox_materializer_checks_what_formulaic_evaluates(df, sentinel, code):
    # bypass lmmops' parse: the materializer re-checks each expression before eval
    # (formulaic wraps the FormulaError raised inside its evaluation)
    with pytest.raises(FactorEvaluationError, match="FormulaError: .* is not allowed"):
        formulaic.model_matrix(_fill(code, sentinel), df, materializer=_SandboxMaterializer)
    assert _no_side_effect(sentinel)


def test_model_spec_rebuilds_new_data_in_the_sandbox(df, sentinel):
    X, _, spec = fixed_effects_matrix("scale(x) + log(z + 5) + f", df, return_spec=True)
    assert spec.materializer == "lmmops_sandbox"
    ref = formulaic.model_matrix("scale(x) + log(z + 5) + f", df)
    new = df.iloc[:7].copy()
    np.testing.assert_array_equal(np.asarray(spec.get_model_matrix(new), float),
                                  np.asarray(ref.model_spec.get_model_matrix(new), float))
    # a spec altered to hold code is still refused when rebuilt
    bad = spec.update(formula=formulaic.Formula(_fill("I(open('S', 'w'))", sentinel)))
    with pytest.raises(FactorEvaluationError, match="call of 'open'"):
        bad.get_model_matrix(new)
    assert _no_side_effect(sentinel)


# ------------------------------------------------------------------ random compositions
_DISALLOWED = [
    "open('S', 'w')", "__import__('os').system('touch S')", "(lambda: open('S', 'w'))()",
    "[open('S', 'w') for _ in [0]]", "getattr(x, 'to_csv')('S')", "x.to_csv('S')",
    "exec(\"open('S', 'w')\")", "eval(\"open('S', 'w')\")", "np.save('S', x)",
    "x.__class__", "globals()", "vars()", "x.values.tofile('S')", "print('S')",
    "{'a': open('S', 'w')}['a']", "(w := open('S', 'w'))", "x[0]", "__builtins__",
    "np.lib.npyio.savetxt('S', x)", "(open('S', 'w') if x else x)", "f\"{open('S', 'w')}\"",
]
_WRAPPERS = [
    "I({})", "log({})", "np.exp({})", "({} + x)", "I(x * {})", "scale({})", "C({})",
    "{{{}}}", "poly({}, 2)", "I(-{})", "I({} > 0)", "abs({})", "np.maximum(x, {})",
    "C(f, levels=[{}])", "C(f, Treatment({}))", "bs(x, df={})", "sqrt({} ** 2)",
]
_FORMULA_LEVEL = ["{}", "x + {}", "{}:f", "(x + {})^2", "x * {}", "{} - 1", "x %in% {}"]

_expressions = st.recursive(
    st.sampled_from(_DISALLOWED),
    lambda inner: st.tuples(st.sampled_from(_WRAPPERS), inner).map(
        lambda t: t[0].format(t[1])),
    max_leaves=4,
)
_formulas = st.tuples(st.sampled_from(_FORMULA_LEVEL), _expressions).map(
    lambda t: t[0].format(t[1]))


def _check_refused(df, sentinel, fixed):
    formula = f"y ~ {_fill(fixed, sentinel)} + (1|g)"
    with pytest.raises(FormulaError) as info:
        lmmops.fit(formula, df)
    _assert_clean(str(info.value), sentinel)


@settings(derandomize=True, max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fixed=_formulas)
def test_disallowed_inside_allowed_is_refused(df, shared_sentinel, fixed):
    _check_refused(df, shared_sentinel, fixed)


@pytest.mark.slow
@settings(max_examples=3000, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fixed=_formulas)
def test_disallowed_inside_allowed_is_refused_many(df, shared_sentinel, fixed):
    _check_refused(df, shared_sentinel, fixed)


# ------------------------------------------------------------------ legitimate formulas
LEGITIMATE = [
    "x", "1 + x + z", "0 + f", "-1 + x", "x - 1", "f", "x:f", "x*f", "x/f", "x %in% f",
    "(x + z)^2", "(x + z)**2", "x + z + x:z", "log(x)", "np.log(x)", "log10(x) + log2(x)",
    "exp(z)", "np.exp(z)", "abs(z)", "np.abs(z)", "np.sqrt(x)", "np.log1p(x)",
    "np.power(x, 2)", "np.maximum(x, 1)", "I(x**2)", "I(x ** 2 + z)", "I(x * np.pi)",
    "I(x > 2)", "I((x > 2) & (z < 0))", "I(x / 2 - z // 1)", "{x + 1}", "{x * z}",
    "C(f)", "C(g)", "C(f, Treatment('mid'))", "C(f, Treatment(reference='hi'))",
    "C(f, contr.treatment('mid'))", "C(f, Sum)", "C(f, Helmert)", "C(f, Poly)",
    "C(f, Diff)", "C(f, contr.sum)", "C(f, levels=['mid', 'lo', 'hi'])",
    "C(f, spans_intercept=False)", "poly(x, 2)", "poly(x, degree=3, raw=True)",
    "scale(x)", "scale(x, scale=False)", "center(z)", "bs(x, df=4)",
    "bs(x, knots=[1.5, 2.5], degree=2)", "Sepal.Length", "`a b`", "log(`a b` + 5)",
    "scale(x):f", "log(x) * C(f, Sum)", "np.log(x):z",
]


@pytest.mark.parametrize("fixed", LEGITIMATE)
def test_legitimate_transform_gives_formulaic_matrix(df, fixed):
    ref = formulaic.model_matrix(fixed, df, na_action="raise")
    X, names = fixed_effects_matrix(fixed, df)
    assert names == lme4_names([str(c) for c in ref.columns])
    np.testing.assert_array_equal(X, np.asarray(ref, dtype=np.float64))


@pytest.mark.parametrize(("ours", "numpy_form"), [
    ("sqrt(x)", "np.sqrt(x)"), ("log1p(x)", "np.log1p(x)"), ("expm1(z)", "np.expm1(z)"),
    ("numpy.log(x)", "np.log(x)"), ("factor(f)", "C(f)"),
])
def test_transforms_formulaic_lacks(df, ours, numpy_form):
    # sqrt, log1p, expm1 and numpy. are not in formulaic's namespace; factor is R's C
    X, names = fixed_effects_matrix(ours, df)
    ref = formulaic.model_matrix(numpy_form, df)
    np.testing.assert_array_equal(X, np.asarray(ref, dtype=np.float64))
    head = numpy_form.split("(")[0]
    assert names == [n.replace(head + "(", ours.split("(")[0] + "(", 1)
                     for n in lme4_names([str(c) for c in ref.columns])]


def test_fit_with_transforms_uses_the_same_matrix(df):
    res = lmmops.fit("y ~ log(x) + scale(z) + C(f, Sum) + (1|g) + (1|h)", df)
    ref = formulaic.model_matrix("log(x) + scale(z) + C(f, Sum)", df)
    np.testing.assert_array_equal(res.model.X, np.asarray(ref, dtype=np.float64))
    assert list(res.fixef.index) == lme4_names(list(ref.columns))


_allowed_expr = st.recursive(
    st.sampled_from(["x", "z", "`a b`"]),
    lambda inner: st.one_of(
        st.tuples(st.sampled_from(["I({} + 1)", "I({} ** 2)", "np.exp({} / 10)",
                                   "np.abs({})", "I(2 * {})", "log(abs({}) + 1)"]),
                  inner).map(lambda t: t[0].format(t[1])),
        st.tuples(inner, inner).map(lambda t: f"I({t[0]} * {t[1]})"),
    ),
    max_leaves=3,
)
_allowed_terms = st.lists(
    st.one_of(_allowed_expr, _allowed_expr.map(lambda e: f"{e}:f"),
              _allowed_expr.map(lambda e: f"scale({e})"),
              _allowed_expr.map(lambda e: f"{{{e} - 1}}"), st.just("Sepal.Length:f")),
    min_size=1, max_size=3, unique=True,
).map(" + ".join)


@settings(derandomize=True, max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fixed=_allowed_terms)
def test_random_allowed_compositions_match_formulaic(df, fixed):
    ref = formulaic.model_matrix(fixed, df, na_action="raise")
    X, names = fixed_effects_matrix(fixed, df)
    assert names == lme4_names([str(c) for c in ref.columns])
    np.testing.assert_array_equal(X, np.asarray(ref, dtype=np.float64))


def test_allowed_functions_listed():
    for name in ("I", "C", "factor", "log", "log1p", "exp", "sqrt", "abs", "scale",
                 "center", "poly", "np.log", "Treatment"):
        assert name in ALLOWED_FUNCTIONS
    for name in ("open", "eval", "exec", "getattr", "__import__", "lag", "hashed", "Q"):
        assert name not in ALLOWED_FUNCTIONS


# ------------------------------------------------------------------ syntax (section 6)
@pytest.mark.parametrize(("formula", "match"), [
    ("y ~ x + (1|g) +", r"'\+' has no term after it .* at character 15"),
    ("y ~ x + (1|g) + ", r"'\+' has no term after it"),
    ("y ~ (1|g) + x +", r"'\+' has no term after it"),
    ("y ~ x (1|g)", r"missing '\+' between 'x' and '\(' at character 7"),
    ("y ~ (1|g) (1|h)", r"missing '\+' between '\(1\|g\)' and '\(' at character 11"),
    ("y ~ x z + (1|g)", r"missing '\+' between 'x' and 'z' at character 7"),
    ("y ~ log(x) z + (1|g)", r"missing '\+' between 'log\(x\)' and 'z'"),
    ("y ~ x + + z + (1|g)", r"'\+' is followed by '\+' instead of a term at character 9"),
    ("y ~ + x + (1|g)", r"'\+' has no term before it at character 5"),
    ("y ~ x * (1|g)", "must be added to the model with '\\+'"),
    ("y ~ x - (1|g)", "must be added with '\\+', not subtracted"),
    ("y ~ x | g", "outside parentheses"),
    ("y ~ x + (1|g))", r"'\)' has no matching '\('"),
    ("y ~ x^z + (1|g)", "exponent of '\\^' must be a number"),
    ("y ~ x + 'a' + (1|g)", "string literal"),
    ("y ~ x $ z + (1|g)", r"character '\$' at character 7"),
])
def test_malformed_formula_names_the_position(df, formula, match):
    with pytest.raises(FormulaError, match=match):
        lmmops.fit(formula, df)


@pytest.mark.parametrize("fixed", ["2 + x", "x + 3"])
def test_formulaic_messages_lose_their_colour_codes(df, fixed):
    # formulaic's own refusal (a bare number other than 0/1) is marked up with ANSI
    # escape sequences; lmmops passes the text on without them
    with pytest.raises(FormulaError) as info:
        lmmops.fit(f"y ~ {fixed} + (1|g)", df)
    msg = str(info.value)
    assert "Numeric literals" in msg
    _assert_printable(msg)


def test_control_characters_are_refused_and_escaped(df):
    with pytest.raises(FormulaError, match=r"control character \\x1b at character 9") as info:
        lmmops.fit("y ~ x + \x1b[31mz + (1|g)", df)
    assert "\x1b" not in str(info.value)


def test_newlines_are_whitespace(df):
    pf = parse_formula("y ~ x +\n  log(z + 5)\t+ (1|g)")
    assert pf.fixed == "x + log(z + 5)"


_formula_chars = st.sampled_from(list("xyzfg1 +-*/:^~()|{}[]'\"`.,=<>!$%@#\\_") +
                                 ["\x1b[31m", "\x1b", "\n", "I(", "log(", "__", "C(",
                                  "(1|g)", "open(", "\u29db"])


@settings(derandomize=True, max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rhs=st.lists(_formula_chars, max_size=12).map("".join))
def test_any_text_gives_a_fit_or_a_clean_message(df, rhs):
    try:
        parse_formula(f"y ~ {rhs} + (1|g)")
        fixed_effects_matrix(parse_formula(f"y ~ {rhs} + (1|g)").fixed, df)
    except (LmmopsError, NotImplementedError) as exc:
        _assert_printable(str(exc))


@pytest.mark.parametrize(("fixed", "match"), [
    ("C(f, levels=['\\\\', 'lo'])", "string"),  # formulaic's sanitiser misreads '\\'
    ("C(f, levels=['`', 'lo'])", "string"),
    ("C(f, levels=['''lo''', 'hi'])", "string"),
    ("C(f, levels=['lo' 'hi'])", "string"),
    ("C(f, levels=[r'lo'])", "string"),
    ("log(`a'b`)", "backtick-quoted name with quotes"),
    ("log(``)", "backtick-quoted name"),
    ("log(`a b)", "unterminated"),
])
def test_quotes_every_reader_delimits_alike(df, fixed, match):
    # strings and quoted names are accepted only where formulaic's sanitiser, Python and
    # lmmops agree on where they start and end
    with pytest.raises(FormulaError, match=match):
        fixed_effects_matrix(fixed, df)
    X, names = fixed_effects_matrix("C(f, levels=['mid', \"lo\", 'hi'])", df)
    assert names[1:] == ["C(f, levels='mid', 'lo', 'hi')lo", "C(f, levels='mid', 'lo', 'hi')hi"]
