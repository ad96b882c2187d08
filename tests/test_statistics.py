"""The one-pass sufficient statistics (lmmops.data.statistics) against dense algebra."""

import numpy as np
import pytest
from conftest import random_design
from hypothesis import given, settings
from hypothesis import strategies as st

from lmmops.data.statistics import SufficientStatistics
from lmmops.errors import ArgumentError, LmmopsError
from lmmops.estimation.direct import DirectObjective
from lmmops.estimation.iterative import IterativeObjective
from lmmops.linalg.operators import GramOperator


def _problem(seed, levels=(7, 4, 3), n=60, weighted=True):
    rng = np.random.default_rng(seed)
    d = random_design(rng, list(levels), n, missing=0.3)
    X = np.column_stack([np.ones(n), rng.normal(size=n)])
    y = rng.normal(size=n) + rng.normal(size=d.n_levels[0])[d.codes[0]]
    w = rng.uniform(0.5, 2.0, size=n) if weighted else None
    return d, X, y, w


@pytest.mark.parametrize("weighted", [False, True])
def test_statistics_equal_dense_products(weighted):
    d, X, y, w = _problem(0, weighted=weighted)
    s = SufficientStatistics.from_arrays(d, X, y, w)
    W = np.diag(np.ones(d.n_obs) if w is None else w)
    T = np.column_stack([X, y])
    Z = [d.indicator(k).toarray() for k in range(d.n_factors)]
    np.testing.assert_allclose(s.TT, T.T @ W @ T, rtol=1e-13)
    for k in range(d.n_factors):
        np.testing.assert_allclose(s.ZT[k], Z[k].T @ W @ T, rtol=1e-13, atol=1e-13)
        np.testing.assert_allclose(s.D[k], np.diag(Z[k].T @ W @ Z[k]), rtol=1e-13)
        for l in range(d.n_factors):
            np.testing.assert_allclose(s.crosstab(k, l).toarray(), Z[k].T @ W @ Z[l],
                                       rtol=1e-13, atol=1e-13)
    Zall = np.hstack(Z)
    np.testing.assert_allclose(s.block(range(d.n_factors)), Zall.T @ W @ Zall, rtol=1e-13)
    assert s.log_weights == pytest.approx(0.0 if w is None else np.sum(np.log(w)))
    np.testing.assert_allclose(s.gram().toarray(), Zall.T @ W @ Zall, rtol=1e-13)
    G = GramOperator(d, stats=s)
    np.testing.assert_allclose(G.todense(), Zall.T @ W @ Zall, rtol=1e-13)
    np.testing.assert_allclose(GramOperator(d, weights=w).todense(), G.todense(), rtol=1e-13)


@settings(derandomize=True, max_examples=15, deadline=None)
@given(st.integers(0, 10**6), st.integers(1, 6), st.booleans())
def test_partitions_combine_to_the_whole(seed, n_parts, weighted):
    """Statistics of disjoint row blocks add up; the criterion does not see the split."""
    d, X, y, w = _problem(seed, weighted=weighted)
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.choice(np.arange(1, d.n_obs), size=n_parts - 1, replace=False))
    blocks = np.split(rng.permutation(d.n_obs), cuts)
    parts = [SufficientStatistics.from_codes(d.codes[:, r], d.n_levels, X[r], y[r],
                                             None if w is None else w[r]) for r in blocks]
    whole = SufficientStatistics.from_arrays(d, X, y, w)
    both = SufficientStatistics.combine(parts)
    assert both.n_obs == whole.n_obs
    np.testing.assert_allclose(both.TT, whole.TT, rtol=1e-12)
    for k in range(d.n_factors):
        np.testing.assert_allclose(both.ZT[k], whole.ZT[k], rtol=1e-12, atol=1e-12)
    theta = np.array([0.7, 0.3, 1.1])
    f_whole = DirectObjective(d, X, y, "REML", weights=w)(theta)
    f_parts = DirectObjective(d, X, y, "REML", weights=w, stats=both)(theta)
    assert f_parts == pytest.approx(f_whole, rel=1e-10)
    # the iterative objective consumes the same statistics: the same probes and seed give
    # the same estimate whether the statistics come from the rows or from the partitions
    e_whole = IterativeObjective(d, X, y, weights=w, n_probes=8, seed=3).evaluate(theta)
    e_parts = IterativeObjective(d, X, y, weights=w, n_probes=8, seed=3,
                                 stats=both).evaluate(theta)
    assert e_parts.objective == pytest.approx(e_whole.objective, rel=1e-10)
    np.testing.assert_allclose(e_parts.beta, e_whole.beta, rtol=1e-8, atol=1e-10)


def test_mismatched_statistics_are_refused():
    d, X, y, w = _problem(1)
    s = SufficientStatistics.from_arrays(d, X[:, :1], y)
    with pytest.raises(LmmopsError, match="do not match"):
        DirectObjective(d, X, y, stats=s)
    with pytest.raises(LmmopsError, match="do not match"):
        IterativeObjective(d, X, y, stats=s)
    other = SufficientStatistics.from_codes(d.codes[:2], d.n_levels[:2], X, y)
    with pytest.raises(ArgumentError, match="cannot combine"):
        SufficientStatistics.combine([s, other])
    with pytest.raises(ArgumentError, match="at least one part"):
        SufficientStatistics.combine([])
    with pytest.raises(ArgumentError, match="same number of rows"):
        SufficientStatistics.from_arrays(d, X[:5], y)


@pytest.mark.parametrize("weighted", [False, True])
def test_closed_forms_from_the_gram_equal_the_squared_tables(weighted):
    """||E||_F^2 and the boundary derivative's tr(C'P^{-1}C) read the Gram's own arrays
    (GramOperator.offdiag_square_rows); with any other operator for Z'WZ they read
    squared cell tables: the same numbers, and both equal the dense sums."""
    from scipy.sparse.linalg import aslinearoperator

    d, X, y, w = _problem(5, levels=(9, 6, 4), n=90, weighted=weighted)
    s = SufficientStatistics.from_arrays(d, X, y, w)
    fast = IterativeObjective(d, None, None, stats=s, n_probes=8, seed=2)
    plain = IterativeObjective(d, None, None, stats=s, n_probes=8, seed=2,
                               gram=aslinearoperator(s.gram()))
    assert fast._N2 is None
    assert len(plain._N2) == 3
    G = s.gram().toarray()
    off2 = G**2 - np.diag(np.diag(G) ** 2)
    a = np.random.default_rng(1).uniform(0.1, 1.0, size=d.q)
    np.testing.assert_allclose(fast._square_rows(a), off2 @ a, rtol=1e-13)
    np.testing.assert_allclose(plain._square_rows(a), off2 @ a, rtol=1e-13)
    theta = np.array([0.8, 0.5, 1.2])
    ev, ev0 = fast.evaluate(theta), plain.evaluate(theta)
    assert ev.objective == pytest.approx(ev0.objective, rel=1e-13)
    np.testing.assert_allclose(ev.gradient, ev0.gradient, rtol=1e-10, atol=1e-12)
    edge = np.array([0.8, 0.0, 1.2])
    b, _, _ = fast.boundary_gradient(fast.evaluate(edge), [1])
    b0, _, _ = plain.boundary_gradient(plain.evaluate(edge), [1])
    np.testing.assert_allclose(b, b0, rtol=1e-10)
