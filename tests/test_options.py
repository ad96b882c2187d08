"""The options object (lmmops.options.Options): defaults, validation, replace."""

import pytest

from lmmops.errors import ArgumentError, LmmopsError
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
