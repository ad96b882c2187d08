"""The options object (lmmops.options.Options): defaults, validation, replace."""

import pytest

from lmmops.errors import ArgumentError, ConvergenceWarning, LmmopsError
from lmmops.options import Options


def test_defaults_match_the_solvers_defaults():
    o = Options()
    assert (o.maxiter, o.tol, o.boundary_tol, o.restart) == (100, 1e-13, 1e-4, True)
    assert (o.n_probes, o.seed, o.cg_rtol, o.cg_maxiter) == (16, 0, 1e-8, 2000)
    assert o.deflation_rank is None
    assert o.threads == "auto"
    assert set(o.as_dict()) == {"maxiter", "tol", "boundary_tol", "restart", "n_probes",
                                "seed", "cg_rtol", "cg_maxiter", "deflation_rank",
                                "step_tol", "threads"}


@pytest.mark.parametrize(("name", "value", "match"), [
    ("maxiter", 0, "maxiter must be a positive integer"),
    ("maxiter", 2.5, "maxiter must be a positive integer"),
    ("maxiter", True, "maxiter must be a positive integer"),
    ("cg_maxiter", -1, "cg_maxiter must be a positive integer"),
    ("deflation_rank", 0, "deflation_rank must be a positive integer"),
    ("tol", 0.0, "tol must be finite"),
    ("tol", float("nan"), "tol must be finite"),
    ("boundary_tol", 1.0, "boundary_tol must be finite"),
    ("cg_rtol", 0.0, "rtol"),
    ("n_probes", 1, "probes"),
    ("seed", -1, "seed"),
    ("threads", 0, "threads"),
    ("step_tol", "a", "step_tol must be a number"),
    ("restart", 1, "restart must be True or False"),
])
def test_bad_settings_name_themselves(name, value, match):
    with pytest.raises(LmmopsError, match=match):
        Options(**{name: value})


def test_replace_validates_and_refuses_unknown_names():
    o = Options(n_probes=8)
    p = o.replace(cg_rtol=1e-6, threads="2")
    assert (p.n_probes, p.cg_rtol, p.threads) == (8, 1e-6, 2)
    assert o.cg_rtol == 1e-8  # frozen: the original is unchanged
    with pytest.raises(ArgumentError, match="unknown option 'maxiters'"):
        o.replace(maxiters=3)
    with pytest.raises(LmmopsError, match="probes"):
        o.replace(n_probes=0)


# ---------------------------------------------------------------- wired into the fit
def _data():
    from lmmops.data.simulate import simulate_crossed
    return simulate_crossed(2000, [40, 15], zipf=[0.8, 1.0], sigma2=[0.5, 0.8], seed=3)


def test_fit_records_and_uses_its_options():
    import lmmops

    df = _data()
    f = "y ~ 1 + (1|g1) + (1|g2)"
    with pytest.warns(ConvergenceWarning, match="maximum number of iterations"):
        res = lmmops.fit(f, df, options=lmmops.Options(maxiter=2, restart=False))
    assert res.options.maxiter == 2
    assert res.optsum.iterations <= 2
    assert not res.converged  # two iterations cannot verify an optimum from the start
    assert res.to_dict()["options"]["maxiter"] == 2
    # a keyword overrides the same setting of options
    res = lmmops.fit(f, df, options=lmmops.Options(maxiter=2), maxiter=100)
    assert res.options.maxiter == 100
    assert res.converged
    with pytest.raises(LmmopsError, match="options must be an lmmops.options.Options"):
        lmmops.fit(f, df, options={"maxiter": 2})


def test_cg_budget_reaches_the_iterative_solves():
    import lmmops

    df = _data()
    with pytest.warns(ConvergenceWarning, match="PCG did not reach"):
        res = lmmops.fit("y ~ 1 + (1|g1) + (1|g2)", df, solver="iterative",
                         options=lmmops.Options(cg_maxiter=2, n_probes=4))
    assert res.options.cg_maxiter == 2
    assert not res.converged
    assert any("PCG" in n or "CG" in n for n in res.notes)


def test_cli_options_flags(tmp_path, capsys):
    import json

    from lmmops.cli import main

    p = tmp_path / "d.csv"
    _data().to_csv(p, index=False)
    assert main(["fit", str(p), "--formula", "y ~ 1 + (1|g1) + (1|g2)", "--json",
                 "--maxiter", "50", "--cg-maxiter", "300", "--cg-rtol", "1e-6"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["options"]["maxiter"] == 50
    assert out["options"]["cg_maxiter"] == 300
    assert out["options"]["cg_rtol"] == 1e-6
    assert main(["fit", str(p), "--formula", "y ~ 1 + (1|g1) + (1|g2)",
                 "--cg-maxiter", "0"]) == 2
    assert "lmmops: error: cg_maxiter must be a positive integer" in capsys.readouterr().err
