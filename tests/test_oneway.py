"""The one-way model's estimators, cross-checked against one-factor lmmops fits."""

import numpy as np
import pandas as pd
import pytest

import lmmops
from lmmops.analysis.oneway import estimate, ml_alternating, moment_estimators, weighted_mean
from lmmops.errors import LmmopsError


@pytest.fixture
def unbalanced():
    rng = np.random.default_rng(8)
    sizes = rng.integers(1, 12, 15)
    g = np.repeat(np.arange(15), sizes)
    y = 5 + 1.3 * rng.normal(size=15)[g] + rng.normal(size=g.size)
    return y, g


def test_weighted_mean_is_gls(unbalanced):
    y, g = unbalanced
    s2a, s2e = 1.7, 0.9
    mu, var = weighted_mean(y, g, s2a, s2e)
    Z = (g[:, None] == np.arange(15)).astype(float)
    V = s2a * Z @ Z.T + s2e * np.eye(y.size)
    Vi1 = np.linalg.solve(V, np.ones(y.size))
    assert mu == pytest.approx((Vi1 @ y) / Vi1.sum(), rel=1e-12)
    assert var == pytest.approx(1.0 / Vi1.sum(), rel=1e-12)


def test_moment_estimators_are_unbiased():
    """Average over simulations of an unbalanced design is close to the truth."""
    rng = np.random.default_rng(1)
    sizes = np.array([2, 3, 5, 8, 1, 4, 6, 2, 9, 3])
    g = np.repeat(np.arange(10), sizes)
    est = np.array([moment_estimators(2 + 1.2 * rng.normal(size=10)[g]
                                      + rng.normal(size=g.size), g)[:2]
                    for _ in range(3000)])
    # untruncated mean is unbiased; truncation only raises s2a slightly
    assert est[:, 1].mean() == pytest.approx(1.0, abs=0.03)
    assert est[:, 0].mean() == pytest.approx(1.44, rel=0.08)


def test_moments_equal_reml_on_balanced_data():
    rng = np.random.default_rng(4)
    g = np.repeat(np.arange(12), 5)
    y = rng.normal(size=12)[g] + rng.normal(size=60)
    s2a, s2e, note = moment_estimators(y, g)
    assert note is None
    res = lmmops.fit("y ~ 1 + (1|g)", pd.DataFrame({"y": y, "g": g}))
    assert s2a == pytest.approx(res.variances["g"], rel=1e-6)
    assert s2e == pytest.approx(res.variances["Residual"], rel=1e-7)
    mu, var = weighted_mean(y, g, s2a, s2e)
    assert mu == pytest.approx(res.fixef["(Intercept)"], rel=1e-10)
    assert np.sqrt(var) == pytest.approx(res.fixef_se["(Intercept)"], rel=1e-6)


def test_ml_alternating_matches_lmmops_ml(unbalanced):
    y, g = unbalanced
    out = ml_alternating(y, g)
    assert out["converged"]
    res = lmmops.fit("y ~ 1 + (1|g)", pd.DataFrame({"y": y, "g": g}), method="ML")
    assert out["sigma2_a"] == pytest.approx(res.variances["g"], rel=1e-5)
    assert out["sigma2_e"] == pytest.approx(res.variances["Residual"], rel=1e-5)
    assert out["mu"] == pytest.approx(res.fixef["(Intercept)"], rel=1e-6)
    assert out["loglik"] == pytest.approx(res.loglik, rel=1e-9)
    # the weighted mean at REML variances is the REML fixed effect
    reml = lmmops.fit("y ~ 1 + (1|g)", pd.DataFrame({"y": y, "g": g}))
    mu, _ = weighted_mean(y, g, reml.variances["g"], reml.variances["Residual"])
    assert mu == pytest.approx(reml.fixef["(Intercept)"], rel=1e-9)


def test_truncation_note():
    rng = np.random.default_rng(0)
    g = np.repeat(np.arange(6), 4)
    y = rng.normal(size=24)
    y -= np.bincount(g, weights=y)[g] / 4  # identical group means: between SS = 0
    est = estimate(y, g)
    assert est.sigma2_a == 0.0
    assert "replaced by 0" in est.notes[0]


@pytest.mark.parametrize(("y", "g", "match"), [
    ([1.0, 2.0], [0, 0, 1], "y has 2 values but groups has 3"),
    ([1.0, 2.0, 3.0], [0, 0, 0], "at least 2 groups"),
    ([1.0, 2.0], [0, 1], "2 groups for 2 observations"),
    ([1.0, np.nan, 3.0], [0, 0, 1], "non-finite"),
])
def test_errors(y, g, match):
    with pytest.raises(LmmopsError, match=match):
        estimate(y, g)


def test_weighted_mean_needs_positive_residual_variance():
    with pytest.raises(LmmopsError, match="need sigma2_e > 0"):
        weighted_mean([1.0, 2, 3], [0, 0, 1], 1.0, 0.0)
