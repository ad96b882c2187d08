"""The iterative fit with every level-space preconditioner kind (issue 13).

The kind changes the generalised-least-squares and auxiliary PCG solves (to the CG
tolerance), never the probes, so with the same probes and seed every kind must give the
same estimates to far better than the issue's 1e-4.
"""

import json

import numpy as np
import pytest

import lmmops
from lmmops.cli import main
from lmmops.data.simulate import simulate_crossed
from lmmops.errors import ArgumentError
from lmmops.estimation.iterative import PRECONDITIONERS

KINDS_ANY_K = [k for k in PRECONDITIONERS if k != "spectral"]


def _data(K):
    levels = [40, 25, 8][:K]
    return simulate_crossed(2500, levels, zipf=[0.8, 0.5, 0.0][:K],
                            sigma2=[1.0, 0.5, 2.0][:K], seed=K)


def _formula(K):
    return "y ~ 1 + " + " + ".join(f"(1|g{k + 1})" for k in range(K))


def _fit(df, K, kind):
    return lmmops.fit(_formula(K), df, solver="iterative", preconditioner=kind,
                      n_probes=8, seed=3)


@pytest.fixture(scope="module", params=[2, 3])
def reference(request):
    K = request.param
    df = _data(K)
    return K, df, _fit(df, K, "jacobi")


@pytest.mark.parametrize("kind", PRECONDITIONERS)
def test_every_kind_gives_the_same_estimates(reference, kind):
    K, df, ref = reference
    if kind == "spectral" and K != 2:
        with pytest.raises(ArgumentError, match="spectral.*two crossed factors"):
            _fit(df, K, kind)
        return
    res = _fit(df, K, kind)
    assert res.solver_info["preconditioner"] == kind
    assert len(res.solver_info["cg_iterations"]) == res.n_evaluations
    assert all(c >= 1 for c in res.solver_info["cg_iterations"])
    for name, v in ref.variances.items():
        assert res.variances[name] == pytest.approx(v, rel=1e-4), name
    for name, b in ref.fixef.items():
        assert res.fixef[name] == pytest.approx(b, rel=1e-4, abs=1e-8), name
    assert res.loglik == pytest.approx(ref.loglik, rel=1e-4)


def test_direct_solver_info_is_empty():
    df = _data(2)
    res = lmmops.fit(_formula(2), df, solver="direct")
    assert res.to_dict()["solver_info"] == {"preconditioner": None, "cg_iterations": [],
                                            "probe_cg_iterations": []}
    with pytest.raises(ArgumentError, match="applies to the iterative solver"):
        lmmops.fit(_formula(2), df, solver="direct", preconditioner="amg")


def test_unknown_kind_is_an_argument_error():
    with pytest.raises(ArgumentError, match="preconditioner must be one of"):
        _fit(_data(2), 2, "ilu")


def test_cli_flag_and_json_field(tmp_path, capsys):
    path = tmp_path / "sim.csv"
    _data(2).to_csv(path, index=False)
    argv = ["fit", str(path), "--formula", _formula(2), "--solver", "iterative",
            "--probes", "8", "--quiet", "--json"]
    assert main(argv + ["--preconditioner", "block_gauss_seidel"]) == 0
    out = json.loads(capsys.readouterr().out)
    info = out["solver_info"]
    assert info["preconditioner"] == "block_gauss_seidel"
    assert len(info["cg_iterations"]) == out["n_evaluations"]
    assert all(isinstance(c, int) and c >= 1 for c in info["cg_iterations"])
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["solver_info"]["preconditioner"] == "jacobi"
    assert main(argv + ["--preconditioner", "ilu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmmops: error:")
    assert "preconditioner must be one of" in err
    assert np.isfinite(out["loglik"])
