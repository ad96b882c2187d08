"""Fits from a Dask DataFrame (lmmops.distributed) against the in-memory fit of the same
rows, on a real ``distributed.LocalCluster`` (two worker processes, loopback only)."""

import json
import pathlib

import numpy as np
import pandas as pd
import pytest
from designs import nine_level_frame

import lmmops
from lmmops.data.conditioning import condition
from lmmops.data.terms import theta_names
from lmmops.distributed.moments import Moments, condition_from_moments
from lmmops.errors import DataSourceError, DesignError, FormulaError, LmmopsError
from lmmops.estimation.direct import DirectObjective
from lmmops.estimation.protocol import variance_covariance
from lmmops.estimation.vector import VectorObjective, VectorStatistics

dd = pytest.importorskip("dask.dataframe")
distributed = pytest.importorskip("distributed")

TOL = 1e-10


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       host="127.0.0.1", dashboard_address=None)
    cl = distributed.Client(cluster)
    yield cl
    cl.close()
    cluster.close()


def _frame(n=2400, seed=3):
    return nine_level_frame(n, seed)


@pytest.fixture(scope="module")
def frame():
    return _frame()


def _rel(a, b):
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    assert np.array_equal(np.isnan(a), np.isnan(b))  # aliased coefficients: NaN in both
    ok = ~np.isnan(b)
    return float(np.max(np.abs(a[ok] - b[ok]) / np.maximum(np.abs(b[ok]), 1e-8)))


def _same_fit(a, b, tol=TOL):
    assert list(a.theta.index) == list(b.theta.index)
    assert list(a.fixef.index) == list(b.fixef.index)
    assert _rel(a.theta, b.theta) < tol
    assert _rel(a.fixef, b.fixef) < tol
    assert _rel(a.fixef_se, b.fixef_se) < tol
    assert _rel(a.sigma, b.sigma) < tol
    assert _rel(a.loglik, b.loglik) < tol
    assert a.n_obs == b.n_obs


CASES = [
    ("y ~ x + f + (1|g) + (1|h)", None, "REML"),
    ("y ~ x + f + (1|g) + (1|h)", "w", "ML"),
    ("y ~ x + (1 + x|g) + (1|h)", None, "REML"),
    ("y ~ x + f + (1 + x|g) + (1|h)", "w", "REML"),
]


@pytest.mark.parametrize(("formula", "weights", "method"), CASES)
def test_fit_equals_in_memory_for_1_3_7_partitions(client, frame, formula, weights, method):
    ref = lmmops.fit(formula, frame, method=method, weights=weights, solver="direct")
    for P in (1, 3, 7):
        res = lmmops.fit(formula, dd.from_pandas(frame, npartitions=P), method=method,
                         weights=weights)
        _same_fit(res, ref)
        assert res.n_partitions == P
        assert res.n_levels == ref.n_levels
        for g in ref.ranef:  # same level dictionaries, same order, same BLUPs
            assert list(res.ranef[g].index) == list(ref.ranef[g].index)
            assert np.max(np.abs(np.asarray(res.ranef[g]) - np.asarray(ref.ranef[g]))) \
                < 1e-9 * ref.sigma


def test_result_summary_json_and_log(client, frame, capsys):
    ddf = dd.from_pandas(frame, npartitions=4)
    res = lmmops.fit("y ~ x + f + (1|g) + (1|h)", ddf, progress_bar=True)
    err = capsys.readouterr().err  # one tqdm bar per pass, over the partitions
    for name in ("levels", "moments", "statistics"):
        assert f"dask {name} pass" in err
    assert "/4 [" in err
    ref = lmmops.fit("y ~ x + f + (1|g) + (1|h)", frame)
    a, b = res.to_dict(), ref.to_dict()
    assert set(a) == set(b) | {"distributed"}  # the in-memory fields and the cluster's
    json.dumps(a, allow_nan=False)
    assert a["distributed"]["partitions"] == 4
    assert a["distributed"]["bytes_gathered"]["total"] == sum(p.nbytes for p in res.passes)
    for k in ("g", "h", "Residual"):  # inverse average information, level space
        assert _rel(a["variances_se"][k], b["variances_se"][k]) < 1e-8
    text = res.summary()
    assert "Random effects:" in text
    assert "Number of obs: 2400" in text
    log = [n for n in res.notes if n.startswith("dask:")]
    assert len(log) == 1
    assert "4 partitions" in log[0]
    assert "2 workers" in log[0]
    assert "bytes gathered" in log[0]
    # the client gathered level-space objects only: far less than the rows
    assert sum(p.nbytes for p in res.passes) < frame.memory_usage(deep=True).sum()


def test_row_outputs_by_map_partitions(client, frame):
    ddf = dd.from_pandas(frame, npartitions=3)
    for formula, weights in (("y ~ x + f + (1|g) + (1|h)", None),
                             ("y ~ x + (1 + x|g) + (1|h)", "w")):
        res = lmmops.fit(formula, ddf, weights=weights)
        ref = lmmops.fit(formula, frame, weights=weights)
        r = res.resid.compute().to_numpy()
        assert np.max(np.abs(r - ref.resid)) < 1e-9 * ref.sigma
        rows = res.row_outputs().compute()
        assert np.max(np.abs(rows["marginal"].to_numpy() - ref.residuals("marginal"))) \
            < 1e-9 * ref.sigma
        assert np.max(np.abs(rows["fitted"].to_numpy() - ref.fitted)) < 1e-9 * ref.sigma
        table = ref.residual_table()  # diag(P) per row from the level-space factor
        for col in ("diag_P", "shift", "shift_var", "studentized"):
            want = table[col].to_numpy()
            assert np.max(np.abs(rows[col].to_numpy() - want)) < 1e-9 * np.max(np.abs(want))
        t = res.residuals("studentized").compute().to_numpy()
        assert np.max(np.abs(t - ref.residuals("studentized"))) < 1e-9
        pearson = res.residuals("pearson").compute().to_numpy()
        assert np.max(np.abs(pearson - ref.residuals("pearson"))) < 1e-9
        want, got = ref.outliers(top=6), res.outliers(top=6)  # the mean-shift scan
        assert got.index.tolist() == want.index.tolist()
        assert list(got.columns) == list(want.columns)
        assert np.max(np.abs(got.to_numpy() - want.to_numpy())) < 1e-9 * ref.sigma
        table = res.residual_table().compute()
        assert list(table.columns) == list(ref.residual_table().columns)
    with pytest.raises(LmmopsError, match="does not hold"):
        res.outliers("vsom", rows=[3])
    with pytest.raises(LmmopsError, match="draws every row"):
        res.plot("qq")


def test_known_categories_used_as_they_are(client, frame):
    df = frame.copy()
    # a categorical grouping factor whose category order is not the sorted one, with an
    # unused category (dropped, as the in-memory path drops it)
    cats = [f"lev{j:02d}" for j in (5, 2, 8, 0, 1, 3, 4, 6, 7)] + ["never"]
    df["h"] = pd.Categorical(df["h"], categories=cats)
    df["f"] = pd.Categorical(df["f"], categories=["w", "u", "v"])
    ref = lmmops.fit("y ~ x + f + (1|g) + (1|h)", df)
    ddf = dd.from_pandas(df, npartitions=5)
    assert ddf["h"].cat.known
    res = lmmops.fit("y ~ x + f + (1|g) + (1|h)", ddf)
    assert [p.name for p in res.passes] == ["levels", "moments", "statistics"]  # g only
    _same_fit(res, ref)
    assert list(res.ranef["h"].index) == cats[:-1]
    assert list(res.fixef.index) == ["(Intercept)", "x", "fu", "fv"]
    known = df.assign(g=df.g.astype("category"))
    res2 = lmmops.fit("y ~ x + f + (1|g) + (1|h)", dd.from_pandas(known, npartitions=2))
    assert [p.name for p in res2.passes] == ["moments", "statistics"]  # no level pass
    _same_fit(res2, ref)


def test_interaction_and_nested_factors(client, frame):
    df = frame.assign(b=np.random.default_rng(5).choice(["p", "q", "r"], len(frame)))
    df["f"] = pd.Categorical(df["f"], categories=["w", "v", "u"])  # its category order
    for formula in ("y ~ x + (1|h/b) + (1|g)", "y ~ x + (1|h:f)",
                    "y ~ x + (1 + x|h:b) + (1|g)"):
        ref = lmmops.fit(formula, df)
        res = lmmops.fit(formula, dd.from_pandas(df, npartitions=4))
        _same_fit(res, ref)
        assert res.n_levels == ref.n_levels
        for g in ref.ranef:
            assert list(res.ranef[g].index) == list(ref.ranef[g].index)
        if "h/b" in formula:  # lme4's name of the inner factor, and its level labels
            # findbars order b:h, h, g; g has the most levels, so lme4 reorders them
            assert list(res.n_levels) == ["g", "b:h", "h"]
            assert res.n_levels["g"] > res.n_levels["b:h"] > res.n_levels["h"]
            lab = res.ranef["b:h"].index[0]
            assert lab == f"p:{res.ranef['h'].index[0]}"


def test_nested_factors_named_as_lme4_and_as_in_memory(client):
    """lme4's names, levels and term order of (1|a/b/c), (1 + x|a/b) and
    (1|a/b) + (0 + x|a:b) (b:a and a:b: one grouping, two names) from a Dask frame
    (tests/data/lme4_nesting.json), the same as the in-memory fit's."""
    data = pathlib.Path(__file__).parent / "data"
    ref = {f["id"]: f for f in json.loads((data / "lme4_nesting.json").read_text())["fits"]}
    sim = pd.read_csv(data / "nesting_sim.csv")
    for fid in ("sim_three_level", "sim_slope_nested", "sim_two_orders"):
        f = ref[fid]
        mem = lmmops.fit(f["formula"], sim)
        res = lmmops.fit(f["formula"], dd.from_pandas(sim, npartitions=3))
        _same_fit(res, mem, tol=1e-8)
        assert theta_names(res.terms) == f["theta"]["names"]
        assert [t.group for t in res.terms] == f["cnms"]
        assert list(res.ranef) == f["flist"]
        assert list(res.varcorr.grp) == [r["grp"] for r in f["varcorr"]]
        for g, lv in f["levels"].items():
            assert res.n_levels[g] == lv["nlevels"]
            assert list(res.ranef[g].index[:6]) == lv["first"]
        assert abs(res.reml_criterion - f["reml_criterion"]) <= 1e-6 * f["reml_criterion"]


def test_rank_deficient_columns_dropped_as_in_memory(client, frame):
    df = frame.assign(x2=2.0 * frame.x - 1.0)
    with pytest.warns(lmmops.RankDeficientWarning):
        ref = lmmops.fit("y ~ x + x2 + (1|g) + (1|h)", df)
    with pytest.warns(lmmops.RankDeficientWarning):
        res = lmmops.fit("y ~ x + x2 + (1|g) + (1|h)", dd.from_pandas(df, npartitions=3))
    assert res.rank_deficient == ref.rank_deficient == ["x2"]
    assert np.isnan(res.fixef["x2"])
    _same_fit(res, ref)


def test_partition_errors_name_the_partition_and_column(client, frame):
    df = frame.copy()
    df.loc[1900, "y"] = np.nan
    with pytest.raises(FormulaError, match=r"partition 2: response 'y' has 1 missing"):
        lmmops.fit("y ~ x + (1|g) + (1|h)", dd.from_pandas(df, npartitions=3))
    df = frame.copy()
    df.loc[5, "x"] = np.inf
    with pytest.raises(FormulaError, match=r"partition 0: .*'x'"):
        lmmops.fit("y ~ x + (1|g) + (1|h)", dd.from_pandas(df, npartitions=3))
    # a typed (known-categories) column whose partition holds a level outside them
    df = frame.copy()
    df["h"] = pd.Categorical(df["h"])
    ddf = dd.from_pandas(df, npartitions=3)
    parts = ddf.to_delayed()
    bad = df.iloc[1600:].copy()
    bad["h"] = bad["h"].astype(str)
    bad.loc[bad.index[3], "h"] = "stranger"
    bad["h"] = pd.Categorical(bad["h"], categories=list(df["h"].cat.categories) + ["stranger"])
    ddf2 = dd.from_delayed(parts[:2] + [_delayed(bad)], meta=ddf._meta, verify_meta=False)
    with pytest.raises(DataSourceError, match=r"partition 2: grouping factor 'h' has the "
                                              r"level 'stranger'"):
        lmmops.fit("y ~ x + (1|g) + (1|h)", ddf2)
    with pytest.raises(DesignError, match="unknown column 'nope'"):
        lmmops.fit("y ~ x + (1|g:nope)", dd.from_pandas(frame, npartitions=2))
    with pytest.raises(FormulaError, match="learns its state"):
        lmmops.fit("y ~ scale(x) + (1|g)", dd.from_pandas(frame, npartitions=2))


def _delayed(obj):
    import dask

    return dask.delayed(obj)


def test_moments_conditioning_matches_rows():
    rng = np.random.default_rng(0)
    n = 500
    x = rng.normal(size=n)
    for X in (np.column_stack([np.ones(n), x, 3.0 * x + 2.0]),        # aliased
              np.column_stack([x, np.ones(n), rng.random(n) < 0.3]),  # intercept second
              np.column_stack([np.ones(n), 1e3 + x])):                # offset covariate
        X = X.astype(float)
        y = X @ np.arange(1.0, X.shape[1] + 1) + 1e6 + rng.normal(size=n)
        ref, keep_ref, _, _ = condition(X, y)
        parts = [Moments.from_arrays(X[r], y[r]) for r in np.array_split(np.arange(n), 6)]
        cond, keep = condition_from_moments(Moments.combine(parts))
        assert keep.tolist() == keep_ref.tolist()
        Xc = cond.X(X[:, keep])
        yc = (y - Xc @ cond.b) / cond.scale
        assert np.max(np.abs(Xc.T @ Xc / n - np.eye(keep.size))) < 1e-12
        assert np.max(np.abs(Xc.T @ yc / n)) < 1e-7
        assert abs(np.mean(yc**2) - 1.0) < 1e-7
        assert abs(cond.scale / ref.scale - 1.0) < 1e-7
    exact = Moments.from_arrays(np.column_stack([np.ones(n), x]), 2.0 + 3.0 * x)
    with pytest.raises(LmmopsError, match="fit the response exactly"):
        condition_from_moments(exact)


def test_level_space_average_information_equals_rows(frame):
    w = frame.w.to_numpy()
    m = lmmops.LMM.from_formula("y ~ x + (1|g) + (1|h)", frame, weights=w)
    rows = DirectObjective(m.design, m.X_conditioned, m.y_conditioned, weights=w)
    stats = DirectObjective(m.design, None, None, stats=rows.stats)
    for method in ("REML", "ML"):
        rows.method = stats.method = method
        ev, ev2 = rows.evaluate(np.array([0.7, 0.4])), stats.evaluate(np.array([0.7, 0.4]))
        assert ev2.objective == pytest.approx(ev.objective, rel=1e-13)
        A, A2 = rows.average_information(ev), stats.average_information(ev2)
        assert np.max(np.abs(A2 - A)) < 1e-10 * np.max(np.abs(A))
        V, V2 = variance_covariance(rows, ev), variance_covariance(stats, ev2)
        assert np.max(np.abs(V2 - V)) < 1e-10 * np.max(np.abs(V))
    with pytest.raises(LmmopsError, match="row-level"):
        stats.residuals(ev2)
    m = lmmops.LMM.from_formula("y ~ x + (1 + x|g) + (1|h)", frame, weights=w)
    rows = VectorObjective(m.terms, m.X_conditioned, m.y_conditioned, weights=w)
    vs = VectorStatistics.from_rows(m.terms, m.X_conditioned, m.y_conditioned, w)
    stats = VectorObjective(m.terms, None, None, stats=vs)
    th = np.array([0.5, 0.8, 0.1, 0.6])
    ev, ev2 = rows.evaluate(th), stats.evaluate(th)
    assert ev2.objective == pytest.approx(ev.objective, rel=1e-13)
    A, A2 = rows.average_information(ev), stats.average_information(ev2)
    assert np.max(np.abs(A2 - A)) < 1e-10 * np.max(np.abs(A))
    with pytest.raises(LmmopsError, match="row-level"):
        stats.residuals(ev2)


# ---------------------------------------------------------------- files and the CLI
def _parquet_parts(frame, directory, P):
    directory.mkdir()
    bounds = np.linspace(0, len(frame), P + 1).round().astype(int)
    for i in range(P):
        frame.iloc[bounds[i]:bounds[i + 1]].to_parquet(directory / f"part-{i:02d}.parquet",
                                                       index=False)
    return directory


def test_cli_fit_glob_with_and_without_dask(client, frame, tmp_path, capsys):
    from lmmops.cli import main

    parts = _parquet_parts(frame[["g", "h", "x", "f", "y"]], tmp_path / "parts", 4)
    formula = "y ~ x + f + (1|g) + (1|h)"
    ref = lmmops.fit(formula, frame).to_dict()
    runs = {
        "memory, glob": [str(parts / "part-*.parquet")],
        "memory, directory": [str(parts)],
        "scheduler": [str(parts), "--scheduler", client.scheduler.address,
                      "--output", str(tmp_path / "rows")],
        "workers": [str(parts / "part-*.parquet"), "--workers", "1"],
    }
    for name, argv in runs.items():
        assert main(["fit", *argv, "--formula", formula, "--json", "--quiet"]) == 0, name
        out = json.loads(capsys.readouterr().out)
        assert _rel(list(out["theta"].values()), list(ref["theta"].values())) < TOL, name
        assert _rel(out["loglik"], ref["loglik"]) < TOL, name
        assert out["n_obs"] == len(frame)
    rows = pd.read_parquet(tmp_path / "rows")
    assert len(rows) == len(frame)
    res = lmmops.fit(formula, frame)
    assert np.max(np.abs(rows["conditional"].to_numpy() - res.resid)) < 1e-9 * res.sigma


def test_cli_json_records_the_cluster_fit(client, frame, tmp_path, capsys):
    """``lmmops fit --workers 2 --json`` adds ``distributed``: partitions, workers, the
    passes with their seconds and bytes gathered (the pickled sizes of the roots the
    client receives, as the same passes in Python give), the client's peak memory."""
    import os
    import resource

    from lmmops.cli import main
    from lmmops.distributed import DaskLMM
    from lmmops.distributed.files import read_dask, resolve_files
    from lmmops.distributed.reduction import pickled_nbytes

    directory = tmp_path / "csv"
    directory.mkdir()
    bounds = np.linspace(0, len(frame), 4).round().astype(int)
    for i in range(3):
        frame.iloc[bounds[i]:bounds[i + 1]][["g", "h", "x", "y"]].to_csv(
            directory / f"part-{i}.csv", index=False)
    formula = "y ~ x + (1|g) + (1|h)"
    assert main(["fit", str(directory), "--formula", formula, "--json", "--quiet",
                 "--workers", "2"]) == 0
    text = capsys.readouterr().out

    def no_constants(name):
        raise AssertionError(f"{name} in the JSON")

    out = json.loads(text, parse_constant=no_constants)
    ref = lmmops.fit(formula, frame).to_dict()
    assert _rel(out["loglik"], ref["loglik"]) < TOL
    assert set(out) == set(ref) | {"distributed"}  # added, nothing renamed
    info = out["distributed"]
    assert info["partitions"] == 3
    assert info["workers"] == 2
    assert [p["name"] for p in info["passes"]] == ["levels", "moments", "statistics"]
    assert all(p["partitions"] == 3 and p["seconds"] > 0 for p in info["passes"])
    per_pass = {p["name"]: p["bytes"] for p in info["passes"]}
    assert info["bytes_gathered"]["per_pass"] == per_pass
    assert info["bytes_gathered"]["total"] == sum(per_pass.values())
    # the same passes in this process (its cluster): the same roots, the same sizes
    ddf, labels = read_dask(resolve_files(str(directory)))
    model = DaskLMM.from_formula(formula, ddf, labels=labels)
    stats = (model.stats, None)  # unweighted intercepts: the design's are the same
    assert per_pass["statistics"] == pickled_nbytes(stats)
    assert {p.name: p.nbytes for p in model.passes} == per_pass
    # the statistics hold at least the cell table (12 bytes a cell) and the level sums
    nnz = model.stats.N[(0, 1)].nnz
    assert per_pass["statistics"] >= 12 * nnz + 8 * 2 * model.design.q
    # the peak of this process (the CLI ran in it): at least what it holds now
    with open("/proc/self/statm") as f:
        now_mb = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    peak_now = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    assert 0 < info["client_peak_mb"] <= peak_now + 1
    assert info["client_peak_mb"] >= 0.5 * now_mb
    assert info["gram"] is None
    res = model.fit(solver="iterative", gram="workers")
    gram = res.to_dict()["distributed"]["gram"]
    assert gram["products"] == res._objective._ZtZ.products > 0
    assert gram["bytes_moved"] == res._objective._ZtZ.bytes_moved > 0
    json.dumps(res.to_dict(), allow_nan=False)


def test_cli_simulate_partitions_and_errors(client, frame, tmp_path, capsys):
    from lmmops.cli import main

    out = tmp_path / "sim"
    assert main(["simulate", str(out), "--n-obs", "3000", "--levels", "60,12", "--seed", "4",
                 "--partitions", "3", "--quiet"]) == 0
    files = sorted(p.name for p in out.iterdir())
    assert files == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    sim = pd.concat([pd.read_parquet(out / f) for f in files], ignore_index=True)
    assert len(sim) == 3000
    # a file whose response has a NaN: the error names the file and the column
    bad = _parquet_parts(frame[["g", "h", "x", "f", "y"]], tmp_path / "bad", 3)
    part = pd.read_parquet(bad / "part-01.parquet")
    part.loc[7, "y"] = np.nan
    part.to_parquet(bad / "part-01.parquet", index=False)
    argv = ["fit", str(bad), "--formula", "y ~ x + (1|g)", "--scheduler",
            client.scheduler.address]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmmops: error: file '")
    assert "part-01.parquet': response 'y' has 1 missing" in err
    # a file with another schema
    part = pd.read_parquet(bad / "part-01.parquet").drop(columns=["f"])
    part.to_parquet(bad / "part-01.parquet", index=False)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "part-01.parquet': the schema differs" in err
    assert "column 'f' is missing" in err
    assert main(["fit", str(bad), "--formula", "y ~ x + (1|g)"]) == 2  # in memory too
    assert "part-01.parquet': the schema differs" in capsys.readouterr().err
    assert main(["fit", str(tmp_path / "none-*.parquet"), "--formula", "y ~ (1|g)"]) == 2
    assert "no data files match" in capsys.readouterr().err
    assert main(["fit", str(out), "--formula", "y ~ (1|g1)", "--scheduler", "nowhere"]) == 2
    assert "expected an address" in capsys.readouterr().err
    assert main(["fit", str(out), "--formula", "y ~ (1|g1)", "--workers", "1", "--plot",
                 str(tmp_path / "p.png")]) == 2
    assert "--plot draws every row" in capsys.readouterr().err
    assert main(["fit", str(out), "--formula", "y ~ (1|g1)", "--output", "x"]) == 2
    assert "use it with --workers or --scheduler" in capsys.readouterr().err
    # --workers 0 is refused by name, not taken as "no cluster" (it was, silently)
    assert main(["fit", str(out), "--formula", "y ~ (1|g1)", "--workers", "0"]) == 2
    assert "--workers must be a positive integer, got 0" in capsys.readouterr().err


@pytest.mark.parametrize(("formula", "weights"), [("y ~ x + f + (1|g) + (1|h)", "w"),
                                                  ("y ~ x + (1 + x|g) + (1|h)", None)])
def test_iterative_solver_on_reduced_statistics(client, frame, formula, weights):
    # the same probes and seed as in memory: the statistics differ only in their summation
    # order, so the estimates agree far inside the Monte Carlo error
    ref = lmmops.fit(formula, frame, solver="iterative", weights=weights, seed=0)
    res = lmmops.fit(formula, dd.from_pandas(frame, npartitions=3), solver="iterative",
                     weights=weights, seed=0)
    assert res.solver == "iterative"
    assert not res.exact
    with pytest.raises(LmmopsError, match="needs the exact solver"):
        res.residuals("shift")
    _same_fit(res, ref, tol=1e-8)
    assert res.mc_stderr["loglik"] == pytest.approx(ref.mc_stderr["loglik"], rel=1e-6,
                                                    abs=1e-12)
    other = lmmops.fit(formula, dd.from_pandas(frame, npartitions=3), solver="iterative",
                       weights=weights, seed=1)
    if ref.mc_stderr["loglik"] > 1e-6:  # another seed, another estimate (this can fail)
        assert abs(other.loglik - ref.loglik) > 1e-8 * abs(ref.loglik)


def test_predictions_for_new_data_pandas_and_dask(client, frame):
    new = _frame(n=300, seed=9)
    new.loc[0, "h"] = "never-seen"  # a new level: the population-level part only
    new.loc[1, "g"] = -1
    for formula in ("y ~ x + f + (1|g) + (1|h)", "y ~ x + (1 + x|g) + (1|h)"):
        ref = lmmops.fit(formula, frame)
        res = lmmops.fit(formula, dd.from_pandas(frame, npartitions=3))
        for interval in (None, "prediction"):
            want = np.asarray(ref.predict(new, interval=interval))
            got = np.asarray(res.predict(new, interval=interval))
            assert np.max(np.abs(got - want)) < 1e-9 * ref.sigma
            lazy = res.predict(dd.from_pandas(new, npartitions=2), interval=interval)
            assert np.max(np.abs(lazy.compute().to_numpy() - want)) < 1e-9 * ref.sigma
        fitted = res.predict().compute().to_numpy()
        assert np.max(np.abs(fitted - ref.fitted)) < 1e-9 * ref.sigma


# ---------------------------------------------------------------- reliability
def _slow(chunk, seconds):
    import time

    time.sleep(seconds)
    return chunk


def _kill_a_worker_during(client, killed, task, victim, poll=0.02, timeout=60):
    """SIGKILL one worker process once the scheduler knows a task whose key contains
    ``task``: the worker ``victim(client)`` names (polled again while it names none).
    Its address is appended to ``killed`` (empty after ``timeout`` seconds: no kill)."""
    import os
    import signal
    import time

    deadline = time.time() + timeout
    while time.time() < deadline and not killed:
        keys = client.run_on_scheduler(
            lambda dask_scheduler: [str(k) for k in dask_scheduler.tasks])
        if any(task in k for k in keys):
            address = victim(client)
            if address is not None:
                pid = client.run(os.getpid, workers=[address])[address]
                os.kill(pid, signal.SIGKILL)
                killed.append(address)
                return
        time.sleep(poll)


def _busy_worker(client):
    """A worker processing some task now, or None."""
    busy = [a for a, ks in client.processing().items() if ks]
    return busy[0] if busy else None


def _block_holder(client):
    """A worker holding one of DistributedGram's persisted row blocks, or None."""
    holders = client.run_on_scheduler(lambda dask_scheduler: sorted(
        {ws.address for ts in dask_scheduler.tasks.values()
         if "_sum_blocks" in str(ts.key) for ws in ts.who_has}))
    return holders[0] if holders else None


def test_killed_worker_mid_statistics_pass_changes_nothing(client, frame):
    import sys
    import threading

    import cloudpickle
    import dask

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # _slow on the workers
    formula = "y ~ x + f + (1 + x|g) + (1|h)"
    bounds = np.linspace(0, len(frame), 9).round().astype(int)

    def slow_frame(seconds):
        parts = [dask.delayed(_slow)(frame.iloc[bounds[i]:bounds[i + 1]], seconds)
                 for i in range(8)]
        return dd.from_delayed(parts, meta=frame.iloc[:0])

    calm = lmmops.fit(formula, slow_frame(0.0))  # the same partitions, undisturbed
    killed = []
    thread = threading.Thread(target=_kill_a_worker_during,
                              args=(client, killed, "map_statistics", _busy_worker))
    thread.start()
    hit = lmmops.fit(formula, slow_frame(0.1))
    thread.join()
    assert killed, "no worker was killed during the statistics pass"
    a, b = hit.to_dict(), calm.to_dict()
    for key in ("theta", "fixef", "fixef_se", "variances"):
        assert _rel(list(a[key].values()), list(b[key].values())) < 1e-12, key
    assert a["loglik"] == pytest.approx(b["loglik"], rel=1e-13)
    client.wait_for_workers(2, timeout=60)  # the nanny restarts it for the next tests


# ---------------------------------------------------------------- the distributed PCG
def test_distributed_gram_products_and_pcg_with_a_killed_worker(client, frame):
    import threading

    from scipy.sparse.linalg import LinearOperator

    from lmmops.distributed import DaskLMM
    from lmmops.distributed.pcg import DistributedGram
    from lmmops.linalg.krylov import cg
    from lmmops.linalg.operators import GramOperator
    from lmmops.options import Options

    formula = "y ~ x + f + (1|g) + (1|h)"
    model = DaskLMM.from_formula(formula, dd.from_pandas(frame, npartitions=5), weights="w")
    G = DistributedGram.from_model(model, n_blocks=3)
    ref = GramOperator(model.design, stats=model.stats)
    assert len(G.blocks) == 3
    assert G.nnz == ref.nnz
    U = np.random.default_rng(1).normal(size=(model.design.q, 4))
    assert np.max(np.abs(G.matmat(U) - ref.matmat(U))) < 1e-12 * np.max(np.abs(ref @ U))
    assert G.bytes_moved == U.nbytes * 4  # inline in the 3 block tasks, gathered once
    # a PCG solve of (Lambda Z'WZ Lambda + I) x = b through the cluster's blocks, with a
    # worker that holds blocks killed in the middle: they are recomputed, x is the same
    lam = np.repeat([0.8, 0.5], model.design.n_levels)

    def system(A):
        return LinearOperator(A.shape, matvec=lambda v: lam * (A @ (lam * v)) + v,
                              dtype=np.float64)

    b = np.random.default_rng(2).normal(size=model.design.q)
    killed = []
    # once PCG products run on the persisted blocks, a worker that holds some
    thread = threading.Thread(target=_kill_a_worker_during,
                              args=(client, killed, "_block_product", _block_holder),
                              kwargs={"poll": 0.01})
    thread.start()
    x, info = cg(system(G), b, rtol=1e-13, maxiter=400)
    thread.join()
    assert killed, "no worker was killed during the distributed PCG"
    x0, info0 = cg(system(ref), b, rtol=1e-13, maxiter=400)
    assert info == info0 == 0
    assert np.max(np.abs(x - x0)) < 1e-9 * np.max(np.abs(x0))
    client.wait_for_workers(2, timeout=60)  # the nanny restarts it
    # the matrix-free objective with its products on the workers (what
    # fit(solver="iterative", gram="workers") optimises): the same evaluation, the same
    # CG iterations, as with the Gram on the client
    opts = Options()
    on_workers = model.iterative_objective("REML", opts, gram="workers")
    on_client = model.iterative_objective("REML", opts)
    assert isinstance(on_workers._ZtZ, DistributedGram)
    theta = np.array([0.9, 0.6])
    ev, ev0 = on_workers.evaluate(theta), on_client.evaluate(theta)
    assert ev.objective == pytest.approx(ev0.objective, rel=1e-12)
    assert np.max(np.abs(ev.gradient - ev0.gradient)) < 1e-9 * np.max(np.abs(ev0.gradient))
    assert on_workers.cg_history == on_client.cg_history
    with pytest.raises(lmmops.errors.ArgumentError, match="iterative solver"):
        model.fit(solver="direct", gram="workers")


def test_slope_term_checks_as_in_memory(client, frame):
    df = frame.assign(gc=np.random.default_rng(1).normal(size=400)[frame.g % 400],
                      x2=2.0 * frame.x + 1.0)
    ddf = dd.from_pandas(df, npartitions=3)
    for formula, match in (("y ~ x + (1 + gc|g)", "constant within every level of 'g'"),
                           ("y ~ x + (1 + x + x2|g)", "column.s. x2 are linear combinations"),
                           ("y ~ x + (1|g) + (1 + x|g)", "is also a column of the second")):
        with pytest.raises(DesignError, match=match):
            lmmops.fit(formula, df)
        with pytest.raises(DesignError, match=match):
            lmmops.fit(formula, ddf)
    _same_fit(lmmops.fit("y ~ x + (x || g)", ddf), lmmops.fit("y ~ x + (x || g)", df))
