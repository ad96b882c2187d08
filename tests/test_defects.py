"""Issue 12, section 6: the smaller defects, each with a test that failed before its fix.

Oracles: dense numpy linear algebra (``Z'WZ``), pandas' own grouping (``ngroup``) for
level codes and partitions, the scale equivariance of the variances (``y -> c y`` gives
``s^2 -> c^2 s^2``), and the CLI contract (exit 0 or 2, ``lmmops: error:`` and never a
traceback).
"""

import contextlib
import io
import pathlib
import re
import tempfile

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

import lmmops
from lmmops.cli import UserError, main, read_data
from lmmops.data.checks import check_response, check_weights
from lmmops.data.design import CrossedDesign, sorted_levels
from lmmops.data.formula import response_vector
from lmmops.data.simulate import simulate_codes, simulate_crossed
from lmmops.errors import (
    ArgumentError,
    ArgumentTypeError,
    DenseTooLargeError,
    DesignError,
    FormulaError,
    LmmopsError,
    UnknownNameError,
)
from lmmops.estimation import mme
from lmmops.linalg import kernels, krylov, preconditioners, trace
from lmmops.linalg import solve as solvers
from lmmops.linalg.operators import CovarianceOperator, GramOperator, LevelSpaceOperator
from lmmops.paper import lowrank, spectral

FORMULA = "y ~ 1 + (1|g1) + (1|g2)"


@pytest.fixture(scope="module")
def sim():
    """A small crossed data set: y, g1 (20 levels), g2 (8 levels), x, w."""
    df = simulate_crossed(300, [20, 8], sigma2=[1.5, 0.8], seed=1)
    rng = np.random.default_rng(2)
    df["x"] = rng.standard_normal(len(df))
    df["w"] = rng.uniform(0.5, 2.0, len(df))
    return df


@pytest.fixture(scope="module")
def sim_csv(sim, tmp_path_factory):
    p = tmp_path_factory.mktemp("defects") / "sim.csv"
    sim.to_csv(p, index=False)
    return p


def run_cli(argv):
    """Run the CLI in-process: (exit status, stdout, stderr); argparse exits count."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as exc:  # argparse's usage errors
            rc = exc.code
    return rc, out.getvalue(), err.getvalue()


def assert_user_error(argv, *fragments):
    rc, out, err = run_cli(argv)
    assert rc == 2, (rc, out, err)
    assert err.startswith("lmmops: error: "), err
    assert "Traceback" not in err
    for f in fragments:
        assert f in err, (f, err)
    return out, err


# ---------------------------------------------------------------------- mme.solve's guard
def test_mme_dense_route_checks_n_by_q_before_densifying(monkeypatch):
    rng = np.random.default_rng(0)
    n, q = 4000, 40
    Z = sp.csr_matrix((np.ones(n), (np.arange(n), rng.integers(0, q, n))), shape=(n, q))
    X, y = np.ones((n, 1)), rng.standard_normal(n)
    # (p + q)^2 doubles is 13 KB and passes; the dense n x q Z is 1.28 MB and does not
    monkeypatch.setenv("LMMOPS_MAX_DENSE_GIB", str(2**20 / 2**30))

    def no_densify(self, *a, **k):
        raise AssertionError("Z was densified before the size guard")

    monkeypatch.setattr(sp.csr_matrix, "toarray", no_densify)
    with pytest.raises(DenseTooLargeError, match=r"4000 x 40"):
        mme.solve(X, y, Z=Z, G=np.ones(q))


# ---------------------------------------------------------------------- CLI: no tracebacks
def test_cli_plot_with_unsupported_extension_refused_before_fitting(sim_csv, tmp_path):
    out, err = assert_user_error(["fit", sim_csv, "--formula", FORMULA, "--plot",
                                  tmp_path / "p.xyz"], "'.xyz'", ".png")
    assert out == ""  # refused before the fit, not after it
    assert_user_error(["fit", sim_csv, "--formula", FORMULA, "--plot", tmp_path / "p"],
                      "no file extension")
    assert_user_error(["fit", sim_csv, "--formula", FORMULA, "--plot",
                       tmp_path / "missing" / "p.png"], "does not exist")


def test_cli_simulate_into_missing_directory(tmp_path):
    target = tmp_path / "missing" / "dir" / "x.csv"
    assert_user_error(["simulate", target, "--n-obs", 100, "--levels", "10,5"],
                      "does not exist")
    assert not target.parent.exists()


@pytest.mark.parametrize("command", ["simulate", "fit"])
def test_cli_negative_seed(command, sim_csv, tmp_path):
    argv = (["simulate", tmp_path / "s.csv", "--n-obs", 100, "--levels", "10,5"]
            if command == "simulate" else
            ["fit", sim_csv, "--formula", FORMULA, "--solver", "iterative"])
    assert_user_error(argv + ["--seed", "-1"], "--seed", "non-negative", "-1")
    with pytest.raises(ArgumentError, match="non-negative"):
        simulate_crossed(100, [10, 5], seed=-1)


def test_cli_response_scaled_by_1e200(sim, tmp_path):
    p = tmp_path / "big.csv"
    sim.assign(y=sim["y"] * 1e200).to_csv(p, index=False)
    assert_user_error(["fit", p, "--formula", FORMULA], "overflows float64 when squared")


def test_cli_unhashable_labels(sim, tmp_path):
    pytest.importorskip("pyarrow")
    p = tmp_path / "lists.parquet"
    sim.assign(g1=[[int(v)] for v in sim["g1"]]).to_parquet(p)
    assert_user_error(["fit", p, "--formula", FORMULA], "grouping factor 'g1'",
                      "unhashable", "row 0")


def test_header_only_csv_has_no_rows(tmp_path):
    p = tmp_path / "header.csv"
    p.write_text("y,g1,g2\n")
    with pytest.raises(UserError, match=r"has no rows of data: only a header \(y, g1, g2\)"):
        read_data(str(p))
    _, err = assert_user_error(["fit", p, "--formula", FORMULA], "no rows")
    assert "not numeric" not in err


def test_simulate_with_no_factors_writes_nothing(tmp_path):
    target = tmp_path / "t.csv"
    assert_user_error(["simulate", target, "--n-obs", 100, "--levels", ""], "--levels")
    assert not target.exists()
    with pytest.raises(ArgumentError, match="n_levels is empty"):
        simulate_codes(100, [])


@pytest.mark.parametrize(("argv", "fragment"), [
    (["--n-obs", -3, "--levels", "5"], "n_obs must be an integer >= 1"),
    (["--n-obs", 50, "--levels", "5", "--sigma2-e", "nan"], "residual variances"),
    (["--n-obs", 50, "--levels", "5", "--zipf", "nan"], "Zipf exponents"),
    (["--n-obs", 50, "--levels", "5,4", "--sigma2", "1,inf"], "variances: value 2"),
    (["--n-obs", 50, "--levels", "5", "--intercept", "inf"], "intercepts"),
])
def test_cli_simulate_refuses_non_finite_and_negative_parameters(argv, fragment, tmp_path):
    assert_user_error(["simulate", tmp_path / "t.csv"] + argv, fragment)
    assert not (tmp_path / "t.csv").exists()


# a fuzz of the CLI: any argument list and any small CSV give exit 0 or 2, never a traceback
_CELLS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=64),
    st.sampled_from([0.0, 1.0, -1.0, 1e200, -1e200, 1e-200, 1e-320]),
    st.integers(-3, 6),
    st.sampled_from(["a", "b", "1", "", " ", "NA", "1e400", "x,y", '"q"']),
)
_COLUMNS = ["y", "g1", "g2", "x", "w"]


@st.composite
def _csv_text(draw):
    kind = draw(st.sampled_from(["table", "table", "table", "header", "empty", "junk"]))
    if kind == "empty":
        return ""
    if kind == "junk":
        return draw(st.text(max_size=40))
    cols = _COLUMNS if draw(st.integers(0, 3)) else draw(
        st.lists(st.sampled_from(_COLUMNS), min_size=1, max_size=5, unique=True))
    if kind == "header":
        return ",".join(cols) + "\n"
    n = draw(st.integers(1, 40))
    # mostly well-formed columns (so that fits happen), sometimes arbitrary cells
    rows = []
    for i in range(n):
        cells = []
        for c in cols:
            if draw(st.integers(0, 30)) == 0:
                v = draw(_CELLS)
            elif c.startswith("g"):
                v = (i * (3 if c == "g1" else 5)) % (4 if c == "g1" else 3)
            else:
                v = round(float(np.sin(i * len(c))) * (1 if c == "w" else 3) + len(c) + 1, 4)
            cells.append(str(v))
        rows.append(",".join(cells))
    return ",".join(cols) + "\n" + "\n".join(rows) + "\n"


_VALID_FORMULAS = st.sampled_from([FORMULA, "y ~ 1 + x + (1|g1)", "y ~ x + (1|g1) + (1|g2)",
                                   "y ~ g2 + (1|g1)", "y ~ 1 + (1|g1) + (1|g1:g2)"])
_FORMULAS = st.one_of(_VALID_FORMULAS, _VALID_FORMULAS, st.sampled_from([
    "y ~ 1 + (1|g1) + (1|g1:g1)", "y ~ 1 + (x|g1)", "y ~", "~ 1 + (1|g1)", "q ~ 1 + (1|g1)",
    "y ~ 1 + (1|nope)", "y ~ 1", "y ~ 1 + (1|g1) + (1|g1)", "((", "y ~ 1 + (1|g1:g2)",
]))


@st.composite
def _fit_argv(draw):
    argv = ["fit", "{data}", "--formula", draw(_FORMULAS)]
    if draw(st.booleans()):
        argv += ["--method", draw(st.sampled_from(["REML", "ML", "ml", "REML", "bogus"]))]
    if draw(st.booleans()):
        argv += ["--solver", draw(st.sampled_from(["auto", "direct", "iterative", "auto",
                                                   "direct", "x"]))]
    if draw(st.booleans()):
        argv += ["--seed", str(draw(st.integers(-1, 6)))]
    if draw(st.integers(0, 3)) == 0:
        argv += ["--weights", draw(st.sampled_from(["w", "w", "x", "g1", "nope"]))]
    if draw(st.integers(0, 3)) == 0:
        argv += ["--categorical", draw(st.sampled_from(["g2", "g2", "x", "nope", ",",
                                                        "g1,g2"]))]
    if draw(st.integers(0, 3)) == 0:
        argv += ["--plot", draw(st.sampled_from(["{dir}/p.xyz", "{dir}/p", "{dir}/no/p.png",
                                                 "{dir}"]))]
    argv += draw(st.lists(st.sampled_from(["--json", "--quiet", "--verbose"]), max_size=2))
    return argv


@st.composite
def _simulate_argv(draw):
    out = draw(st.sampled_from(["{dir}/s.csv", "{dir}/s.csv.gz", "{dir}/no/s.csv", "{dir}",
                                "{dir}/s.parquet"]))
    argv = ["simulate", out, "--n-obs", str(draw(st.integers(-2, 60)))]
    argv += ["--levels", draw(st.sampled_from(["", "5", "5,3", "0", "a", "2.5", "100", "5,,3",
                                               "1", "3,2,2"]))]
    for opt, values in (("--zipf", ["1", "0.5,0.5", "-1", "nan", "x"]),
                        ("--sigma2", ["1", "1,2", "-1", "inf", ""]),
                        ("--sigma2-e", ["1", "0", "-1", "nan"]),
                        ("--intercept", ["0", "1e300", "nan"]),
                        ("--seed", ["0", "-1", "7"])):
        if draw(st.booleans()):
            argv += [opt, draw(st.sampled_from(values))]
    return argv + ["--quiet"]


def _cli_never_crashes(csv_text, argv):
    with tempfile.TemporaryDirectory() as d:
        data = pathlib.Path(d) / "data.csv"
        data.write_text(csv_text)
        rc, out, err = run_cli([a.format(data=data, dir=d) for a in argv])
    assert rc in (0, 2), (rc, err)
    assert "Traceback" not in err + out
    if rc == 2 and "usage:" not in err:  # after any warnings, one error line
        assert re.search(r"^lmmops: error: \S", err, re.M), err


@settings(derandomize=True, max_examples=60, deadline=None)
@given(csv_text=_csv_text(), argv=st.one_of(_fit_argv(), _simulate_argv()))
def test_cli_fuzz_exits_0_or_2_without_traceback(csv_text, argv):
    _cli_never_crashes(csv_text, argv)


@pytest.mark.slow
@settings(derandomize=True, max_examples=600, deadline=None)
@given(csv_text=_csv_text(), argv=st.one_of(_fit_argv(), _simulate_argv()))
def test_cli_fuzz_exits_0_or_2_without_traceback_slow(csv_text, argv):
    _cli_never_crashes(csv_text, argv)


# ---------------------------------------------------------------------- response scale
def _scaled_fit(sim, exponent):
    """Variances scale by c^2 when y scales by c; outside float64's range: a clear error."""
    base = lmmops.fit(FORMULA, sim).variances
    y = sim["y"] * 10.0**exponent
    if abs(exponent) <= 70:
        res = lmmops.fit(FORMULA, sim.assign(y=y))
        assert res.converged
        for k, v in base.items():
            assert res.variances[k] == pytest.approx(v * 10.0 ** (2 * exponent), rel=1e-5)
    else:
        word = "overflows" if exponent > 0 else "underflows"
        with pytest.raises(ArgumentError, match=f"{word} float64 when squared"):
            lmmops.fit(FORMULA, sim.assign(y=y))


_EXPONENTS = st.one_of(st.integers(-70, 70), st.integers(78, 300), st.integers(-300, -78))


@settings(derandomize=True, max_examples=8, deadline=None)
@given(exponent=_EXPONENTS)
def test_response_scale_is_fitted_or_refused(sim, exponent):
    _scaled_fit(sim, exponent)


@pytest.mark.slow
@settings(derandomize=True, max_examples=80, deadline=None)
@given(exponent=_EXPONENTS)
def test_response_scale_is_fitted_or_refused_slow(sim, exponent):
    _scaled_fit(sim, exponent)


@pytest.mark.parametrize("solver", ["direct", "iterative"])
def test_response_near_the_scale_limits_fits(sim, solver):
    base = lmmops.fit(FORMULA, sim, solver=solver).variances
    for c in (1e75 / sim["y"].abs().max(), 1.3e-75 / sim["y"].abs().max()):
        res = lmmops.fit(FORMULA, sim.assign(y=sim["y"] * c), solver=solver)
        assert res.converged
        assert res.variances["g1"] == pytest.approx(base["g1"] * c**2, rel=1e-4)


def test_complex_response_refused(sim):
    yc = sim["y"] + 1j * sim["g1"]
    with pytest.raises(FormulaError, match="response 'y' is complex"):
        response_vector(sim.assign(y=yc), "y")
    with pytest.raises(FormulaError, match="complex"):
        lmmops.fit(FORMULA, sim.assign(y=yc))
    d = CrossedDesign.from_frame(sim, ["g1", "g2"])
    with pytest.raises(ArgumentError, match="complex"):
        lmmops.LMM(d, np.ones((len(sim), 1)), yc.to_numpy())
    with pytest.raises(ArgumentError, match="complex"):
        check_response(np.array([1 + 0j, 2 + 0j]))  # even with zero imaginary parts


# ---------------------------------------------------------------------- labels and partitions
def test_labels_that_print_alike_are_refused(sim):
    g = sim["g1"].astype(object)
    g[::2] = g[::2].astype(str)  # 1 and "1" in one column
    with pytest.raises(DesignError, match=r"'g1'.*\d+ \(int\) and '\d+' \(str\)"):
        lmmops.fit(FORMULA, sim.assign(g1=g))
    with pytest.raises(DesignError, match=r"1 \(int\) and '1' \(str\)"):
        sorted_levels(pd.Series([1, "1", 2], dtype=object), "g")
    with pytest.raises(DesignError, match=r"1\.5 \(float\) and '1\.5' \(str\)"):
        sorted_levels(pd.Series(["1.5", 1.5, "a"], dtype=object), "g")
    with pytest.raises(DesignError, match=r"1 \(int\) and '1' \(str\)"):
        sorted_levels(pd.Series(pd.Categorical([1, "1", 2, 1])), "g")
    codes, levels = sorted_levels(pd.Series([2, "b", 2, "a"], dtype=object))  # distinct text
    assert len(levels) == 3
    assert codes[0] == codes[2]


def test_unhashable_labels_refused_with_row():
    s = pd.Series([(1,), [2], (1,)], dtype=object)
    with pytest.raises(DesignError, match=r"'g' has an unhashable label \[2\] \(list\) at row 1"):
        sorted_levels(s, "g")


def _partitions_agree(codes_a, codes_b):
    """Oracle: the same partition iff the pairs have as many groups as each factor."""
    df = pd.DataFrame({"a": codes_a, "b": codes_b})
    na, nb = df["a"].nunique(), df["b"].nunique()
    return na == nb == len(df.drop_duplicates())


def _check_identical_partitions(n_a, n_b, rows, relabel):
    codes_a = np.array([r % n_a for r in rows])
    codes_b = np.array([(r % n_b) if not relabel else (n_a - 1 - r % n_a) for r in rows])
    df = pd.DataFrame({"a": codes_a, "b": codes_b, "y": np.arange(len(rows), dtype=float)})
    identical = _partitions_agree(codes_a, codes_b)
    if df["a"].nunique() < 2 or df["b"].nunique() < 2 or len(df) <= max(n_a, n_b):
        return
    if identical:
        with pytest.raises(DesignError, match="'a' and 'b' group the observations identically"):
            CrossedDesign.from_frame(df, ["a", "b"])
    else:
        CrossedDesign.from_frame(df, ["a", "b"])


_PARTITION_CASES = dict(n_a=st.integers(2, 6), n_b=st.integers(2, 6),
                        rows=st.lists(st.integers(0, 40), min_size=8, max_size=40),
                        relabel=st.booleans())


@settings(derandomize=True, max_examples=40, deadline=None)
@given(**_PARTITION_CASES)
def test_identical_partitions_refused_exactly(n_a, n_b, rows, relabel):
    _check_identical_partitions(n_a, n_b, rows, relabel)


@pytest.mark.slow
@settings(derandomize=True, max_examples=1000, deadline=None)
@given(**_PARTITION_CASES)
def test_identical_partitions_refused_exactly_slow(n_a, n_b, rows, relabel):
    _check_identical_partitions(n_a, n_b, rows, relabel)


def test_same_partition_twice_in_a_formula(sim):
    with pytest.raises(DesignError, match="'g1' and 'g1:g1'"):
        lmmops.fit("y ~ 1 + (1|g1) + (1|g1:g1) + (1|g2)", sim)
    const = sim.assign(b=sim["g1"] * 10 % 3)  # constant within g1: g1:b is g1
    with pytest.raises(DesignError, match="'g1' and 'g1:b'"):
        lmmops.fit("y ~ 1 + (1|g1) + (1|g1:b)", const)
    res = lmmops.fit("y ~ 1 + (1|g1) + (1|g1:g2)", sim)  # a genuine interaction still fits
    assert res.converged
    # operators accept a relabelled copy of a factor (V is well defined); a model does not
    g = sim["g1"].to_numpy()
    d = CrossedDesign.from_codes([g, 19 - g, sim["g2"].to_numpy()], names=["a", "b", "c"])
    V = CovarianceOperator(d, 1.0, [1.0, 2.0, 0.5])
    Z = d.indicator_all().toarray()
    dense = np.eye(len(g)) + Z @ np.diag(np.repeat([1.0, 2.0, 0.5], d.n_levels)) @ Z.T
    np.testing.assert_allclose(V @ sim["y"].to_numpy(), dense @ sim["y"].to_numpy())
    with pytest.raises(DesignError, match="'a' and 'b' group the observations identically"):
        lmmops.LMM(d, np.ones((len(g), 1)), sim["y"].to_numpy())


def test_codes_beyond_int32_refused():
    with pytest.raises(DesignError, match="int32"):
        CrossedDesign.from_codes([[0, 1, 2**31, 0, 1]])
    with pytest.raises(DesignError, match="int32"):
        CrossedDesign([[0, 1, 0, 1]], [2**31 + 5], ["g"])


def test_interaction_of_many_large_factors_does_not_overflow():
    # 7000^5 > 2^63: a single mixed-radix int64 code would wrap
    rng = np.random.default_rng(3)
    base = pd.DataFrame({f"f{j}": rng.permutation(7000) for j in range(5)})
    df = pd.concat([base, base.iloc[: 3500]], ignore_index=True)
    d = CrossedDesign.from_frame(df, ["f0:f1:f2:f3:f4"])
    oracle = df.groupby(list(base.columns), sort=True).ngroup().to_numpy()
    np.testing.assert_array_equal(d.codes[0], oracle)
    first = df.iloc[int(np.flatnonzero(oracle == 17)[0])]
    assert d.levels[0][17] == ":".join(str(first[c]) for c in base.columns)


# ---------------------------------------------------------------------- weights
def test_weights_series_aligned_by_index(sim):
    oracle = lmmops.fit(FORMULA, sim, weights="w")
    shuffled = sim["w"].sample(frac=1.0, random_state=0)
    res = lmmops.fit(FORMULA, sim, weights=shuffled)
    for k, v in oracle.variances.items():
        assert res.variances[k] == pytest.approx(v, rel=1e-10)
    relabelled = sim.set_index(sim.index.astype(str) + "r")
    res2 = lmmops.fit(FORMULA, relabelled, weights=relabelled["w"].iloc[::-1])
    assert res2.loglik == pytest.approx(oracle.loglik, rel=1e-10)


def test_weights_series_with_other_labels_refused(sim):
    w = sim["w"]
    with pytest.raises(ArgumentError, match=r"300 row\(s\) of the data have no label"):
        lmmops.fit(FORMULA, sim, weights=w.set_axis(w.index + 1000))
    partial = w.set_axis(list(range(299)) + [5000])
    with pytest.raises(ArgumentError, match=r"1 row\(s\) .*\(e\.g\. 299\).* 1 of its labels"):
        lmmops.fit(FORMULA, sim, weights=partial)
    with pytest.raises(ArgumentError, match="repeated labels"):
        lmmops.fit(FORMULA, sim, weights=w.set_axis([0] * 300))
    # arrays stay positional
    got = check_weights(w.to_numpy()[::-1], 300, index=sim.index)
    np.testing.assert_array_equal(got, w.to_numpy()[::-1])


def test_gram_operator_weights_validated_and_exact():
    d = CrossedDesign.from_codes([[0, 0, 1, 1, 2, 2], [0, 1, 0, 1, 1, 0]])
    w = np.array([1.0, 2.0, 0.5, 3.0, 1.5, 0.25])
    Z = d.indicator_all().toarray()
    np.testing.assert_allclose(GramOperator(d, weights=w).todense(), Z.T @ (w[:, None] * Z))
    for bad, msg in ((np.r_[w[:5], np.nan], "finite"), (np.r_[w[:5], -1.0], "> 0"),
                     (w[:5], "5 values for 6"), (w[:, None], r"shape \(6,\)"),
                     (np.array(["a"] * 6), "numeric")):
        with pytest.raises(ArgumentError, match=msg):
            GramOperator(d, weights=bad)


# ---------------------------------------------------------------------- solve_V, operators
def test_solve_V_refuses_nan_right_hand_side():
    rng = np.random.default_rng(0)
    d = CrossedDesign.from_codes(np.vstack([rng.integers(0, 12, 200), rng.integers(0, 5, 200)]))
    V = CovarianceOperator(d, 1.0, [0.5, 2.0])
    b = rng.standard_normal(200)
    for method in ("auto", "observation", "direct"):
        for bad in (np.nan, np.inf):
            b2 = b.copy()
            b2[7] = bad
            with pytest.raises(ArgumentError, match="first at flat index 7"):
                solvers.solve_V(V, b2, method=method)
    with pytest.raises(ArgumentError, match="x0 has 1 NaN"):
        solvers.solve_V(V, b, method="observation", x0=np.r_[np.nan, np.zeros(199)])


def _small_design():
    return CrossedDesign.from_codes([[0, 0, 1, 1, 2, 2], [0, 1, 0, 1, 1, 0]],
                                    names=["a", "b"])


@pytest.mark.parametrize(("call", "cls", "builtin"), [
    (lambda d: CovarianceOperator(d, -1.0, [1.0, 1.0]), ArgumentError, ValueError),
    (lambda d: CovarianceOperator(d, 1.0, {"a": 1.0, "zz": 1.0}), ArgumentError, ValueError),
    (lambda d: LevelSpaceOperator(d, [1.0, np.nan]), ArgumentError, ValueError),
    (lambda d: d.index("zz"), UnknownNameError, KeyError),
    (lambda d: kernels.get_kernel("zz"), UnknownNameError, KeyError),
    (lambda d: krylov.cg(object(), np.ones(6)), ArgumentTypeError, TypeError),
    (lambda d: krylov.cg(np.eye(6), np.ones(5)), ArgumentError, ValueError),
    (lambda d: preconditioners.build(LevelSpaceOperator(d, [1.0, 1.0]), kind="zz"),
     ArgumentError, ValueError),
    (lambda d: trace.hutchinson(np.eye(6), n_probes=0), ArgumentError, ValueError),
    (lambda d: spectral.khatri_rao(np.eye(3), np.eye(4)), ArgumentError, ValueError),
    (lambda d: lowrank.ExactInverse(CovarianceOperator(d, 1.0, [1.0, 1.0]), base="zz"),
     ArgumentError, ValueError),
])
def test_operators_raise_lmmops_errors(call, cls, builtin):
    with pytest.raises(cls) as info:
        call(_small_design())
    assert isinstance(info.value, LmmopsError)
    assert isinstance(info.value, builtin)
    assert not str(info.value).startswith("'")  # a KeyError's message is not quoted


def test_no_plain_builtin_raises_in_the_package():
    pkg = pathlib.Path(lmmops.__file__).parent
    pattern = re.compile(r"raise (ValueError|TypeError|KeyError)\(")
    found = []
    for path in sorted(pkg.rglob("*.py")):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            # "# protocol:" marks a raise that a Python protocol requires (Mapping.__getitem__)
            if pattern.search(line) and "# protocol:" not in line:
                found.append(f"{path.relative_to(pkg)}:{i}: {line.strip()}")
    # json.dumps' default= hook must raise TypeError itself, by json's protocol
    found = [f for f in found if not f.startswith("cli.py") or "not JSON serialisable" not in f]
    assert found == []


@pytest.mark.parametrize("seed", [-1, 1.5, True, "3"])
def test_fit_refuses_a_bad_probe_seed(seed):
    rng = np.random.default_rng(0)
    n = 200
    df = pd.DataFrame({"y": rng.normal(size=n), "a": rng.integers(0, 12, n).astype(str),
                       "b": rng.integers(0, 5, n).astype(str)})
    with pytest.raises(LmmopsError, match="seed must be a non-negative integer"):
        lmmops.fit("y ~ 1 + (1|a) + (1|b)", df, solver="iterative", seed=seed)
