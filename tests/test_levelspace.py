"""The client-side, level-space helpers of the Dask path without a cluster: the count of
the bytes gathered (lmmops.distributed.reduction.pickled_nbytes) and the connectivity of
a design known by its cell tables (lmmops.distributed.levelspace.LevelDesign)."""

import pickle
import tracemalloc

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.sparse import csgraph

from lmmops.data.design import CrossedDesign
from lmmops.data.statistics import SufficientStatistics
from lmmops.data.terms import RandomEffectsTerm
from lmmops.distributed.levelspace import LevelDesign
from lmmops.distributed.moments import Moments
from lmmops.distributed.reduction import pickled_nbytes
from lmmops.estimation.vector import VectorStatistics


def _codes(rng, levels, n):
    """Codes of ``n`` rows on factors with (at most) ``levels`` levels, every level used."""
    out = []
    for q in levels:
        c = rng.integers(0, q, size=n)
        out.append(np.unique(c, return_inverse=True)[1].astype(np.int32))
    return np.vstack(out)


def _statistics(seed, n=3000, levels=(300, 40), weighted=False):
    rng = np.random.default_rng(seed)
    codes = _codes(rng, levels, n)
    q = [int(c.max()) + 1 for c in codes]
    X = np.column_stack([np.ones(n), rng.normal(size=n)])
    y = rng.normal(size=n)
    w = rng.uniform(0.5, 2.0, size=n) if weighted else None
    return codes, q, X, y, w


@pytest.mark.parametrize("weighted", [False, True])
def test_pickled_nbytes_counts_the_pickle_of_real_statistics(weighted):
    codes, q, X, y, w = _statistics(1, weighted=weighted)
    intercepts = SufficientStatistics.from_codes(codes, q, X, y, w)
    terms = [RandomEffectsTerm("g", codes[0], pd.Index(range(q[0])), ("(Intercept)", "x"),
                               X),
             RandomEffectsTerm("h", codes[1], pd.Index(range(q[1])))]
    slopes = VectorStatistics.from_rows(terms, X, y, w)
    moments = (Moments.from_arrays(X, y), [np.bincount(c) for c in codes], None, {0: len(y)})
    for obj in (intercepts, (intercepts, None), (slopes, intercepts), moments,
                {"a": np.arange(7.0)[::2], "b": "text"}):  # a strided array: in band
        want = len(pickle.dumps(obj, protocol=5))
        got = pickled_nbytes(obj)
        bufs = []
        stream = pickle.dumps(obj, protocol=5, buffer_callback=bufs.append)
        assert got == len(stream) + sum(b.raw().nbytes for b in bufs)
        # an out-of-band buffer's opcode is 1 byte, an in-band one's 1 + 8 (its length)
        assert 0 <= want - got <= 9 * len(bufs) + 16, (type(obj), got, want)
        assert len(bufs) >= (0 if isinstance(obj, dict) else 3)


def test_pickled_nbytes_makes_no_copy():
    codes, q, X, y, w = _statistics(2, n=400_000, levels=(60_000, 3000))
    s = SufficientStatistics.from_codes(codes, q, X, y, w)
    want = len(pickle.dumps(s, protocol=5))
    tracemalloc.start()
    try:
        got = pickled_nbytes(s)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert abs(got - want) <= 1e-4 * want
    assert want > 5_000_000
    assert peak < 0.01 * want  # pickle.dumps itself peaks at the whole pickle


def _old_components(design):
    """The former implementation (COO of the edges, float adjacency, csgraph)."""
    K, off = design.n_factors, design.offsets
    rows, cols = [], []
    for k in range(1, K):
        c = design.crosstab(0, k).tocoo()
        rows.append(c.row + off[0])
        cols.append(c.col + off[k])
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    adj = sp.coo_matrix((np.ones(rows.size), (rows, cols)), shape=(design.q, design.q))
    ncomp, labels = csgraph.connected_components(adj, directed=False)
    return int(ncomp), labels.astype(np.int32)


def _dense_components(codes, offsets, q):
    """Oracle: a dense adjacency of levels that share an observation (first factor's
    level with every other factor's), through scipy.sparse.csgraph."""
    adj = np.zeros((q, q))
    for k in range(1, codes.shape[0]):
        adj[codes[0] + offsets[0], codes[k] + offsets[k]] = 1.0
    return csgraph.connected_components(adj, directed=False)


@settings(derandomize=True, max_examples=60, deadline=None)
@given(st.integers(0, 10**6), st.lists(st.integers(2, 30), min_size=1, max_size=3),
       st.integers(3, 80), st.booleans())
def test_connected_components_from_cell_tables(seed, levels, n, weighted):
    """Sparse designs (few rows for many levels) are often disconnected."""
    rng = np.random.default_rng(seed)
    codes = _codes(rng, levels, n)
    q = [int(c.max()) + 1 for c in codes]
    if min(q) < 2 or max(q) >= n:
        return  # not a design LevelDesign accepts
    w = rng.uniform(0.5, 2.0, size=n) if weighted else None
    s = SufficientStatistics.from_codes(codes, q, np.ones((n, 1)), rng.normal(size=n), w)
    d = LevelDesign([f"f{k}" for k in range(len(q))], [pd.Index(range(m)) for m in q],
                    s.D, s.N, n)
    ncomp, labels = d.connected_components()
    assert labels.dtype == np.int32
    assert labels.shape == (d.q,)
    want_n, want_labels = _dense_components(codes, d.offsets, d.q)
    assert ncomp == want_n
    np.testing.assert_array_equal(labels, want_labels)
    ref = CrossedDesign.from_codes(codes).connected_components()
    assert ncomp == ref[0]
    np.testing.assert_array_equal(labels, ref[1])
    if len(q) > 1:
        old = _old_components(d)
        assert old[0] == ncomp
        np.testing.assert_array_equal(old[1], labels)
    assert d.is_connected == (ncomp == 1)


def test_connected_components_two_blocks_and_memory():
    """Two disjoint blocks of a large design: two components, labelled in level order,
    with work arrays of O(q) only (no copy of the cells)."""
    rng = np.random.default_rng(5)
    n = 600_000
    half = n // 2
    g = np.concatenate([rng.integers(0, 50_000, half), rng.integers(50_000, 100_000, half)])
    h = np.concatenate([rng.integers(0, 2000, half), rng.integers(2000, 4000, half)])
    codes = np.vstack([np.unique(g, return_inverse=True)[1],
                       np.unique(h, return_inverse=True)[1]]).astype(np.int32)
    q = [int(c.max()) + 1 for c in codes]
    s = SufficientStatistics.from_codes(codes, q, np.ones((n, 1)), np.zeros(n))
    cells = s.N[(0, 1)].nnz
    d = LevelDesign(["g", "h"], [pd.Index(range(m)) for m in q], s.D, s.N, n)
    d.connected_components()  # compile outside the measurement
    d._cache.clear()
    tracemalloc.start()
    try:
        ncomp, labels = d.connected_components()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert ncomp == 2
    split = np.searchsorted(np.unique(g), 50_000)
    assert np.all(labels[:split] == 0)
    assert np.all(labels[split:q[0]] == 1)
    split_h = q[0] + np.searchsorted(np.unique(h), 2000)
    assert np.all(labels[q[0]:split_h] == 0)
    assert np.all(labels[split_h:] == 1)
    assert cells > 500_000
    assert peak <= 12 * d.q + 4096  # int64 parents and int32 labels
