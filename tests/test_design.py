"""CrossedDesign: level order, counts, cross-tabulations, connectivity, validation."""

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmmops.data.design import CrossedDesign, sorted_levels
from lmmops.errors import DesignError, DisconnectedDesignError


def test_numeric_labels_sorted_numerically():
    codes, levels = sorted_levels(pd.Series([10, 2, 100, 2]))
    assert levels.tolist() == [2, 10, 100]
    assert codes.tolist() == [1, 0, 2, 0]


def test_string_labels_sorted_and_categorical_order_kept():
    _, lv = sorted_levels(pd.Series(["b", "a", "c", "a"]))
    assert lv.tolist() == ["a", "b", "c"]
    cat = pd.Categorical(["hi", "lo", "hi"], categories=["lo", "mid", "hi"])
    codes, lv = sorted_levels(pd.Series(cat))
    assert lv.tolist() == ["lo", "hi"]  # unused 'mid' dropped, order kept
    assert codes.tolist() == [1, 0, 1]


def test_mixed_type_labels_do_not_crash():
    _, lv = sorted_levels(pd.Series([1, "a", 2, "a"], dtype=object))
    assert len(lv) == 3


def test_interaction_levels_are_observed_combinations():
    df = pd.DataFrame({"a": [2, 1, 2, 1, 2], "b": ["y", "x", "x", "x", "y"]})
    d = CrossedDesign.from_frame(df, ["a:b"])
    assert d.names == ("a:b",)
    assert d.levels[0].tolist() == ["1:x", "2:x", "2:y"]
    assert d.codes[0].tolist() == [2, 0, 1, 0, 2]
    d2 = CrossedDesign.from_frame(df, [("a", "b")])
    assert d2.codes[0].tolist() == d.codes[0].tolist()


def random_codes(rng, n_levels, n):
    while True:
        codes = np.vstack([rng.integers(0, q, n) for q in n_levels])
        if all(np.bincount(c, minlength=q).min() > 0 for c, q in zip(codes, n_levels)):
            return codes


@pytest.mark.parametrize("n_levels", [(6, 4), (5, 4, 3)])
def test_crosstabs_and_gram_match_dense(n_levels):
    rng = np.random.default_rng(0)
    codes = random_codes(rng, n_levels, 50)
    d = CrossedDesign.from_codes(codes)
    Z = [np.eye(q)[c] for q, c in zip(n_levels, codes)]
    for k in range(len(n_levels)):
        np.testing.assert_array_equal(d.counts(k), Z[k].sum(axis=0))
        np.testing.assert_array_equal(d.indicator(k).toarray(), Z[k])
        for l in range(len(n_levels)):
            np.testing.assert_array_equal(d.crosstab(k, l).toarray(), Z[k].T @ Z[l])
    Zall = np.hstack(Z)
    np.testing.assert_array_equal(d.gram().toarray(), Zall.T @ Zall)
    np.testing.assert_array_equal(d.indicator_all().toarray(), Zall)
    assert d.q == sum(n_levels)
    assert d.offsets.tolist() == list(np.concatenate([[0], np.cumsum(n_levels)]))


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 6), st.integers(2, 5), st.integers(0, 10_000))
def test_level_rows_is_a_csr_by_level_permutation(q1, q2, seed):
    rng = np.random.default_rng(seed)
    codes = random_codes(rng, (q1, q2), 40)
    d = CrossedDesign.from_codes(codes)
    for k in range(2):
        indptr, rows = d.level_rows(k)
        assert sorted(rows.tolist()) == list(range(40))
        for j in range(d.n_levels[k]):
            r = rows[indptr[j]:indptr[j + 1]]
            assert np.all(codes[k][r] == j)
            assert np.all(np.diff(r) > 0)


def test_connectivity():
    # two islands: {a0,a1} x {b0} and {a2} x {b1}
    d = CrossedDesign.from_codes([[0, 1, 2, 2, 0], [0, 0, 1, 1, 0]], names=["a", "b"])
    ncomp, labels = d.connected_components()
    assert ncomp == 2
    assert not d.is_connected
    assert labels[0] == labels[1] == labels[3]
    assert labels[2] == labels[4]
    with pytest.raises(DisconnectedDesignError, match="2 connected components.*level 2 of 'a'"):
        d.check_connected()
    full = CrossedDesign.from_codes([[0, 1, 2, 2, 0], [0, 0, 1, 0, 1]], names=["a", "b"])
    assert full.is_connected
    full.check_connected()


def test_is_balanced():
    a = np.repeat(np.arange(3), 4)
    b = np.tile(np.arange(2), 6)
    assert CrossedDesign.from_codes([a, b]).is_balanced()
    assert not CrossedDesign.from_codes([a[:-1], b[:-1]]).is_balanced()


def test_validation_messages():
    with pytest.raises(DesignError, match="factor 'g1': 1 level\\(s\\) have no observations"):
        CrossedDesign.from_codes([[0, 2, 0, 2]], n_levels=[3])
    with pytest.raises(DesignError, match="'g1' has a single level"):
        CrossedDesign.from_codes([[0, 0, 0]])
    with pytest.raises(DesignError, match="'g1' has 3 levels for 3 observations"):
        CrossedDesign.from_codes([[0, 1, 2]])
    with pytest.raises(DesignError, match="codes must be integers"):
        CrossedDesign.from_codes([[0.5, 1.0, 0.0]])
    with pytest.raises(DesignError, match="names must be unique"):
        CrossedDesign.from_codes([[0, 1, 0], [1, 0, 1]], names=["a", "a"])
    with pytest.raises(DesignError, match="grouping factor 'g' has 1 missing"):
        CrossedDesign.from_frame(pd.DataFrame({"g": ["a", None, "b"]}), ["g"])


def test_repr_and_subset():
    d = CrossedDesign.from_codes([[0, 1, 0, 1, 2], [0, 0, 1, 1, 1], [0, 1, 1, 0, 0]],
                                 names=["a", "b", "c"])
    assert repr(d) == "CrossedDesign(n_obs=5, factors={'a': 3, 'b': 2, 'c': 2}, connected=True)"
    s = d.subset_factors(["c", "a"])
    assert s.names == ("c", "a")
    assert s.n_levels == (2, 3)
    assert d.index("b") == 1
    with pytest.raises(KeyError, match="no factor named 'z'"):
        d.index("z")
