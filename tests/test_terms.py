"""Random-effects terms (lmmops.data.terms): layout and names against lme4's."""

import json
import pathlib

import numpy as np
import pandas as pd
import pytest

from lmmops.data.design import CrossedDesign
from lmmops.data.terms import (
    RandomEffectsTerm,
    theta_layout,
    theta_lower_bounds,
    theta_names,
)
from lmmops.errors import DesignError

DATA = pathlib.Path(__file__).parent / "data"


def _slope_term(dim=2, n=12, q=4):
    rng = np.random.default_rng(0)
    codes = (np.arange(n) % q).astype(np.int32)
    cols = ("(Intercept)", "Days", "x")[:dim]
    values = np.column_stack([np.ones(n)] + [rng.normal(size=n) for _ in range(dim - 1)])
    return RandomEffectsTerm("Subject", codes, pd.Index(range(q)), cols, values)


def test_design_terms_are_its_factors_as_intercepts():
    d = CrossedDesign.from_codes([[0, 0, 1, 1, 2], [0, 1, 0, 1, 1]], names=["a", "b:c"])
    terms = d.terms
    assert [t.group for t in terms] == ["a", "b:c"]
    for k, t in enumerate(terms):
        assert t.is_intercept
        assert t.dim == 1
        assert t.n_theta == 1
        assert t.n_levels == d.n_levels[k]
        assert t.n_random_effects == d.n_levels[k]
        np.testing.assert_array_equal(t.codes, d.codes[k])
        assert t.levels.equals(d.levels[k])
    assert d.terms is terms  # built once
    assert theta_names(terms) == ["a.(Intercept)", "b:c.(Intercept)"]
    np.testing.assert_array_equal(theta_lower_bounds(terms), [0.0, 0.0])


def test_slope_theta_names_are_lme4s():
    """lme4's names(getME(m, "theta")) for (Days | Subject), from tests/data."""
    ref = json.loads((DATA / "lme4_slopes.json").read_text())
    lme4_names = list(ref["fits"][0]["theta"])
    assert _slope_term(2).theta_names() == lme4_names


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_theta_count_layout_and_bounds(dim):
    t = _slope_term(dim)
    assert t.n_theta == dim * (dim + 1) // 2
    lower = t.theta_lower_bounds()
    # column-major lower triangle: the diagonal entries are at these positions
    diag = [sum(dim - c for c in range(j)) for j in range(dim)]
    assert [i for i, b in enumerate(lower) if b == 0.0] == diag
    assert all(np.isneginf(b) for i, b in enumerate(lower) if i not in diag)
    d = CrossedDesign.from_codes([[0, 1, 0, 1, 2, 2]], names=["g"])
    layout = theta_layout([d.terms[0], t, d.terms[0]])
    assert layout == [slice(0, 1), slice(1, 1 + t.n_theta),
                      slice(1 + t.n_theta, 2 + t.n_theta)]


def test_inconsistent_terms_are_refused():
    codes = np.array([0, 1, 1], dtype=np.int32)
    with pytest.raises(DesignError, match="values of columns"):
        RandomEffectsTerm("g", codes, pd.Index([0, 1]), ("(Intercept)", "x"))
    with pytest.raises(DesignError, match="values of shape"):
        RandomEffectsTerm("g", codes, pd.Index([0, 1]), ("(Intercept)", "x"),
                          np.ones((3, 1)))
    with pytest.raises(DesignError, match="level names"):
        RandomEffectsTerm("g", codes, pd.Index([0]))
    with pytest.raises(DesignError, match="at least one column"):
        RandomEffectsTerm("g", codes, pd.Index([0, 1]), ())
