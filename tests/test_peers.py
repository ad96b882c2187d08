"""The peers scripts, asv_benchmarks/peers/compare.py and sweep.py, at tiny sizes: the GPBoost
peers against lmmops' ML criterion, a missing peer reported, the sweep end to end."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# asv_benchmarks/peers/compare.py and sweep.py with the GPBoost peers (issue 16). gpboost
# is not a dependency of lmmops: these tests skip when it is not installed.

PEERS_DIR = Path(__file__).resolve().parents[1] / "asv_benchmarks" / "peers"
needs_gpboost = pytest.mark.skipif(
    importlib.util.find_spec("gpboost") is None or importlib.util.find_spec("formulaic")
    is None, reason="gpboost (and formulaic) not installed: the peers are optional")


def _run(script, *args, env=None):
    root = str(PEERS_DIR.parents[1])
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, str(PEERS_DIR / script), *args],
                          capture_output=True, text=True, timeout=240, env=env, cwd=root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


@pytest.fixture(scope="module")
def compare_report():
    env = dict(os.environ, LMMOPS_PEER_MODULES="mixedlm=lmmops_no_such_peer_module")
    proc = _run("compare.py", "--simulate", "1500,150,25", "--zipf", "1,1", "--method", "ML",
                "--peers", "gpboost,gpboost-iterative,mixedlm", "--repeat", "1",
                "--no-cold", "--no-single-blas", "--json", env=env)
    return json.loads(proc.stdout)


@needs_gpboost
def test_compare_gpboost_criteria_match_lmmops_ml(compare_report):
    res = compare_report["results"]
    c0 = res["lmmops"]["criterion"]
    for peer, inversion in (("gpboost", "cholesky"), ("gpboost-iterative", "iterative")):
        r = res[peer]
        assert "error" not in r, r
        assert r["matrix_inversion_method"] == inversion
        assert r["criterion"] == pytest.approx(c0, rel=1e-3)
        assert r["criterion"] == pytest.approx(-2.0 * r["loglik"])
        assert r["criterion_minus_lmmops"] == pytest.approx(r["criterion"] - c0)
        assert r["criterion_compared"] is True
        assert isinstance(r["lmmops_equal_or_better"], bool)
        assert set(r["variances"]) == {"g1", "g2", "Residual"}
        assert set(r["fixef"]) == {"(Intercept)"}
        for key in ("time_first", "times_warm", "version", "peak_rss_kib",
                    "loadavg_before", "loadavg_after"):
            assert key in r, key
        assert r["peak_rss_kib"] > 0
    # the Cholesky solver reaches lmmops' optimum closely; lmmops is equal or better
    assert res["gpboost"]["criterion"] == pytest.approx(c0, rel=1e-7)
    assert res["lmmops"]["peak_rss_kib"] > 0


@needs_gpboost
def test_compare_reports_a_missing_peer(compare_report):
    r = compare_report["results"]["mixedlm"]
    assert r["error"].startswith("not installed")
    assert "lmmops_no_such_peer_module" in r["error"]
    assert r["not_installed"] is True


@needs_gpboost
def test_compare_gpboost_under_reml_is_ml_only_and_slopes_unsupported():
    proc = _run("compare.py", "--simulate", "800,60,12", "--zipf", "1,1", "--method", "REML",
                "--peers", "gpboost", "--repeat", "1", "--no-cold", "--no-single-blas",
                "--json")
    r = json.loads(proc.stdout)["results"]["gpboost"]
    assert r["ml_only"] is True
    assert r["criterion_compared"] is False
    assert "criterion_minus_lmmops" not in r
    proc = _run("compare.py", "--simulate", "800,60,12", "--slopes", "--method", "ML",
                "--peers", "gpboost", "--repeat", "1", "--no-cold", "--no-single-blas",
                "--json")
    r = json.loads(proc.stdout)["results"]["gpboost"]
    assert r["not_supported"] is True
    assert r["error"].startswith("not supported")


def test_gpboost_spec():
    sys.path.insert(0, str(PEERS_DIR))
    try:
        import compare as peers_compare
    finally:
        sys.path.remove(str(PEERS_DIR))
    assert peers_compare._gpboost_spec("y ~ 1 + x + (1|a) + (1 | b)") == ("y", "1 + x",
                                                                          ["a", "b"])
    with pytest.raises(ValueError, match="random intercepts"):
        peers_compare._gpboost_spec("y ~ x + (1 + x | a)")


@needs_gpboost
def test_sweep_tiny(tmp_path):
    env = dict(os.environ, LMMOPS_PEER_MODULES="gpboost-iterative=lmmops_no_such_peer")
    proc = _run("sweep.py", "--sizes", "1000:100x20", "--no-insteval", "--peers",
                "gpboost,gpboost-iterative", "--repeat", "1", "--no-single-blas",
                "--timeout", "120", "--out-dir", str(tmp_path), env=env)
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    assert sweep["method"] == "ML"
    rows = {r["system"]: r for r in sweep["rows"]}
    assert set(rows) == {"lmmops", "gpboost", "gpboost-iterative"}
    assert rows["gpboost"]["status"] == "ok"
    assert rows["gpboost"]["n"] == 1000
    assert rows["gpboost"]["criterion"] == pytest.approx(rows["lmmops"]["criterion"],
                                                         rel=1e-3)
    for key in ("time_warm_s", "peak_rss_mib", "criterion_minus_lmmops",
                "time_ratio_to_lmmops", "loadavg_before", "loadavg_after"):
        assert rows["gpboost"][key] is not None, key
    assert rows["gpboost-iterative"]["status"] == "not installed"
    md = (tmp_path / "sweep.md").read_text()
    assert "skipped gpboost-iterative: not installed" in md
    assert "| simulated | 1000 | gpboost |" in md
    assert proc.stdout.strip() == md.strip()
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "sweep.png").stat().st_size > 0


def test_sweep_levels():
    sys.path.insert(0, str(PEERS_DIR))
    try:
        import sweep
    finally:
        sys.path.remove(str(PEERS_DIR))
    assert sweep.parse_sizes("1e5,1e6,1e7") == [(10**5, (10**4, 10**3)),
                                                (10**6, (10**5, 3000)),
                                                (10**7, (10**6, 30000))]
    assert sweep.parse_sizes("2e3:2e2x30") == [(2000, (200, 30))]
    assert sweep.levels_for(10**4) == (1000, 333)
