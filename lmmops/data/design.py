"""Crossed designs: grouping-factor codes, level labels, counts and cross-tabulations.

A :class:`CrossedDesign` holds K grouping factors observed on n rows. Factor k has
``q_k`` levels, coded 0..q_k-1 in a stable sorted order of its labels (lme4's order).
It provides everything the operators and solvers need that does not depend on the
variance parameters:

- the level counts ``D_k = diag(Z_k' Z_k)``;
- the sparse cross-tabulations ``N_kl = Z_k' Z_l``;
- the level graph and its connected components;
- a CSR-by-level permutation of the rows, for race-free parallel scatters.

This module is pure numpy/scipy; no numba.
"""

from __future__ import annotations

import numbers

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.sparse import csgraph

from lmmops.data.formula import grouping_columns
from lmmops.data.statistics import assemble_gram, cell_table
from lmmops.data.terms import RandomEffectsTerm
from lmmops.errors import DesignError, DisconnectedDesignError, UnknownNameError

__all__ = ["CrossedDesign", "LevelCounts", "sorted_levels"]

#: Level codes are int32: a factor has at most this many levels.
_MAX_CODE = int(np.iinfo(np.int32).max)


def _sort_key_labels(labels):
    """Sort unique labels in lme4's order: numeric numerically, strings lexically."""
    try:
        return sorted(labels)
    except TypeError:  # mixed types: sort by type name, then value as text
        return sorted(labels, key=lambda v: (type(v).__name__, str(v)))


def _check_label_text(uniq, name):
    """Refuse distinct labels that print alike (``1`` and ``"1"`` would be two levels)."""
    if all(isinstance(v, str) for v in uniq):  # the usual case: distinct strings
        return
    seen = {}
    for v in uniq:
        other = seen.setdefault(str(v), v)
        if other is not v:
            if isinstance(other, str):  # name the non-string label first
                other, v = v, other
            raise DesignError(
                f"grouping factor '{name}' has distinct labels that print alike (mixed "
                f"label types?): {other!r} ({type(other).__name__}) and {v!r} "
                f"({type(v).__name__}); lmmops does not guess whether they are one level. "
                f"Convert the column to one type first, e.g. data['{name}'].astype(str)"
            )


def _unique_labels(arr, name):
    """``pandas.unique`` of object labels, refusing unhashable ones with their row."""
    try:
        return pd.unique(arr).tolist()
    except TypeError:
        for i, v in enumerate(arr):
            try:
                hash(v)
            except TypeError:
                text = repr(v)
                text = text if len(text) <= 40 else text[:37] + "..."
                raise DesignError(
                    f"grouping factor '{name}' has an unhashable label {text} "
                    f"({type(v).__name__}) at row {i}; labels must be hashable values such "
                    "as strings or integers"
                ) from None
        raise


def sorted_levels(values, name="factor"):
    """Encode labels as integer codes in lme4's level order.

    Parameters
    ----------
    values : array_like or pandas.Series, shape (n_obs,)
        Hashable labels. A pandas Categorical keeps its category order, with unused
        categories dropped (as R's ``factor`` does for a grouping factor).
    name : str
        Factor name used in error messages.

    Returns
    -------
    codes : ndarray of int32, shape (n_obs,)
    levels : pandas.Index
        The labels, in code order.

    Raises
    ------
    DesignError
        If any label is missing (NaN or None) or unhashable, or if two labels of
        different types print alike (``1`` and ``"1"``), which would be two levels.

    Examples
    --------
    >>> codes, levels = sorted_levels([10, 2, 10, 7])
    >>> codes.tolist(), levels.tolist()
    ([2, 0, 2, 1], [2, 7, 10])
    """
    s = pd.Series(values) if not isinstance(values, pd.Series) else values
    if isinstance(s.dtype, pd.CategoricalDtype):
        return _categorical_levels(s.array, name)
    missing = s.isna().to_numpy()
    if missing.any():
        rows = np.flatnonzero(missing)
        raise DesignError(
            f"grouping factor '{name}' has {rows.size} missing value(s) "
            f"(first at row {rows[0]}); remove or impute them before fitting"
        )
    arr = s.to_numpy()
    if arr.dtype.kind in "biuf":
        uniq, codes = np.unique(arr, return_inverse=True)
        return codes.astype(np.int32).ravel(), pd.Index(uniq)
    uniq = _unique_labels(arr, name)
    _check_label_text(uniq, name)
    index = pd.Index(_sort_key_labels(uniq), dtype=object)
    codes = index.get_indexer(arr)
    return codes.astype(np.int32), index


def _categorical_levels(cat, name):
    """:func:`sorted_levels` of a pandas Categorical: its codes (``-1`` is a missing
    value) and categories, unused categories dropped in their order (as
    ``remove_unused_categories``, without building a new Series)."""
    codes = np.asarray(cat.codes)
    missing = codes < 0
    if missing.any():
        rows = np.flatnonzero(missing)
        raise DesignError(
            f"grouping factor '{name}' has {rows.size} missing value(s) "
            f"(first at row {rows[0]}); remove or impute them before fitting"
        )
    categories = cat.categories
    used = np.bincount(codes, minlength=len(categories)) > 0
    if used.all():
        codes = codes.astype(np.int32)
    else:
        codes = (np.cumsum(used) - 1).astype(np.int32)[codes]
        categories = categories[used]
    _check_label_text(categories, name)
    return codes, pd.Index(categories)


class LevelCounts:
    """The level-space sizes of a design with level counts ``_n_levels``: shared by
    :class:`CrossedDesign` and the Dask backend's row-free design."""

    @property
    def q(self):
        """int: total number of random effects, sum of q_k."""
        return int(sum(self._n_levels))

    @property
    def offsets(self):
        """ndarray of int64, shape (n_factors + 1,): start of each factor's block in q-space."""
        return np.concatenate([[0], np.cumsum(self._n_levels)]).astype(np.int64)


class CrossedDesign(LevelCounts):
    """Grouping factors of a crossed (or nested) random-effects design.

    Parameters
    ----------
    codes : array_like of int, shape (n_factors, n_obs)
        Level codes; row k holds factor k's codes in 0..n_levels[k]-1.
    n_levels : sequence of int
        Number of levels of each factor.
    names : sequence of str
        Factor names, as written in the model formula (``"s"``, ``"a:b"``).
    levels : sequence of pandas.Index, optional
        Level labels in code order; default ``0..q_k-1``.

    Raises
    ------
    DesignError
        For codes out of range, a level with no observations, a factor with a single
        level, or a factor with as many levels as observations.

    See Also
    --------
    CrossedDesign.from_codes, CrossedDesign.from_frame

    Notes
    -----
    With ``Z_k`` the n x q_k indicator matrix of factor k, the random-effects design is
    ``Z = [Z_1 ... Z_K]``, ``Z'Z`` has diagonal blocks ``D_k`` (level counts) and
    off-diagonal blocks ``N_kl = Z_k'Z_l``, the cross-tabulations.

    Examples
    --------
    >>> d = CrossedDesign.from_codes([[0, 0, 1, 1, 2], [0, 1, 0, 1, 1]], names=["a", "b"])
    >>> d
    CrossedDesign(n_obs=5, factors={'a': 3, 'b': 2}, connected=True)
    >>> d.crosstab(0, 1).toarray()
    array([[1., 1.],
           [1., 1.],
           [0., 1.]])
    """

    def __init__(self, codes, n_levels, names, levels=None):
        codes = np.ascontiguousarray(np.atleast_2d(np.asarray(codes)))
        if codes.ndim != 2:
            raise DesignError("codes must be a 2-d array of shape (n_factors, n_obs)")
        if codes.dtype.kind not in "iu":
            if codes.dtype.kind == "f" and np.all(np.isfinite(codes)) and np.all(
                codes == np.round(codes)
            ):
                codes = codes.astype(np.int64)
            else:
                raise DesignError(
                    f"codes must be integers, got dtype {codes.dtype}; use "
                    "CrossedDesign.from_frame for labels"
                )
        K, n = codes.shape
        names = [str(x) for x in names]
        if len(names) != K:
            raise DesignError(f"got {len(names)} names for {K} factors")
        if len(set(names)) != K:
            raise DesignError(f"factor names must be unique, got {names}")
        n_levels = [int(x) for x in n_levels]
        if len(n_levels) != K:
            raise DesignError(f"got {len(n_levels)} level counts for {K} factors")
        if n == 0:
            raise DesignError("the design has no observations")
        for k in range(K):
            if n_levels[k] > _MAX_CODE:
                raise DesignError(
                    f"factor '{names[k]}': {n_levels[k]} levels do not fit in lmmops' int32 "
                    f"level codes (at most {_MAX_CODE} levels per factor)"
                )
            c = codes[k]
            lo, hi = int(c.min()), int(c.max())
            if lo < 0 or hi >= n_levels[k]:
                bad = lo if lo < 0 else hi
                raise DesignError(
                    f"factor '{names[k]}': code {bad} is out of range 0..{n_levels[k] - 1}"
                )
        self._codes = codes.astype(np.int32)
        self._codes.setflags(write=False)
        self._n_levels = tuple(n_levels)
        self._names = tuple(names)
        if levels is None:
            levels = [pd.RangeIndex(q) for q in n_levels]
        self._levels = tuple(pd.Index(lv) for lv in levels)
        for k, lv in enumerate(self._levels):
            if len(lv) != n_levels[k]:
                raise DesignError(
                    f"factor '{names[k]}': {len(lv)} labels for {n_levels[k]} levels"
                )
        self._counts = tuple(
            np.bincount(self._codes[k], minlength=q).astype(np.int64)
            for k, q in enumerate(self._n_levels)
        )
        self._cache = {}
        self._validate()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_codes(cls, codes, names=None, n_levels=None):
        """Build a design from integer codes.

        Parameters
        ----------
        codes : array_like of int, shape (n_factors, n_obs) or a list of 1-d arrays
            Level codes starting at 0, one row per factor. A pandas DataFrame is read
            column by column (one column per factor).
        names : sequence of str, optional
            Factor names; default ``g1``, ``g2``, ...
        n_levels : sequence of int, optional
            Level counts; default ``max(code) + 1``. Every level must be observed.

        Returns
        -------
        CrossedDesign

        Examples
        --------
        >>> CrossedDesign.from_codes([[0, 1, 1], [0, 0, 1]]).n_levels
        (2, 2)
        """
        if isinstance(codes, pd.DataFrame):
            if names is None:
                names = [str(c) for c in codes.columns]
            codes = codes.to_numpy().T
        arr = np.asarray(codes) if not isinstance(codes, list) else np.vstack(
            [np.asarray(c).ravel() for c in codes]
        )
        arr = np.atleast_2d(arr)
        K = arr.shape[0]
        if names is None:
            names = [f"g{k + 1}" for k in range(K)]
        if n_levels is None:
            if arr.size and arr.dtype.kind in "iuf":
                n_levels = [int(np.max(arr[k])) + 1 if arr.shape[1] else 0 for k in range(K)]
            else:
                n_levels = [0] * K
        return cls(arr, n_levels, names)

    @classmethod
    def from_frame(cls, data, columns, names=None, check=True):
        """Build a design from DataFrame columns holding any hashable labels.

        Parameters
        ----------
        data : pandas.DataFrame
        columns : sequence of str or tuple of str
            Grouping factors. A tuple, or a string ``"a:b"`` that is not itself a
            column, is the interaction of its columns: one level per observed
            combination, ordered by the levels of ``a`` then ``b``, labelled
            ``"a_level:b_level"``. lme4's names of nested factors are understood
            (:func:`~lmmops.data.formula.grouping_columns`: ``"c:(b:a)"`` is the
            interaction of ``c``, ``b`` and ``a``).
        names : sequence of str, optional
            Factor names; default the column names (``"a:b"`` for interactions, the
            string as given).
        check : bool
            Refuse two factors that group the rows identically
            (:meth:`check_distinct_partitions`), the default. ``False`` for a design
            whose factors carry random-effects terms built afterwards
            (:meth:`lmmops.LMM.from_formula`: ``(1 | a/b) + (0 + x | a:b)``, two names
            of one grouping with different columns), which the model checks with its
            terms.

        Returns
        -------
        CrossedDesign

        Raises
        ------
        DesignError
            For an unknown column, a missing, unhashable or ambiguous label, two factors
            that group the rows identically (:meth:`check_distinct_partitions`), or the
            conditions listed in :class:`CrossedDesign`.

        Examples
        --------
        >>> df = pd.DataFrame({"s": ["x", "y", "x", "z"], "d": [3, 1, 1, 3]})
        >>> d = CrossedDesign.from_frame(df, ["s", "d"])
        >>> d.levels[0].tolist(), d.levels[1].tolist()
        (['x', 'y', 'z'], [1, 3])
        """
        codes, levels, nlev, out_names = [], [], [], []
        for i, col in enumerate(columns):
            parts = cls._term_parts(data, col)
            label = ":".join(parts) if isinstance(col, tuple) else str(col)
            fcodes, flevels = cls._encode_term(data, parts)
            codes.append(fcodes)
            levels.append(flevels)
            nlev.append(len(flevels))
            out_names.append(names[i] if names is not None else label)
        design = cls(np.vstack(codes), nlev, out_names, levels)
        if check:
            design.check_distinct_partitions()
        return design

    def permuted(self, order):
        """The same design with its factors in another order.

        Parameters
        ----------
        order : sequence of int
            A permutation of ``0..n_factors-1``: factor ``order[j]`` becomes factor ``j``.

        Returns
        -------
        CrossedDesign

        Raises
        ------
        DesignError
            If ``order`` is not a permutation of the factors.

        Examples
        --------
        >>> d = CrossedDesign.from_codes([[0, 0, 1, 1, 2], [0, 1, 0, 1, 1]], names=["a", "b"])
        >>> d.permuted([1, 0]).names, d.permuted([1, 0]).n_levels
        (('b', 'a'), (2, 3))
        """
        order = [int(i) for i in order]
        if sorted(order) != list(range(self.n_factors)):
            raise DesignError(f"{order} is not a permutation of the design's "
                              f"{self.n_factors} factors")
        return CrossedDesign(self._codes[order], [self._n_levels[i] for i in order],
                             [self._names[i] for i in order],
                             [self._levels[i] for i in order])

    @staticmethod
    def _term_parts(data, col):
        if isinstance(col, tuple):
            parts = [str(c) for c in col]
        elif col in data.columns:
            return [col]
        else:
            parts = list(grouping_columns(col))
        for p in parts:
            if p not in data.columns:
                raise DesignError(
                    f"unknown column '{p}' for grouping factor '{col}'; available columns: "
                    f"{', '.join(map(str, data.columns))}"
                )
        return parts

    @staticmethod
    def _encode_term(data, parts):
        if len(parts) == 1:
            return sorted_levels(data[parts[0]], parts[0])
        sub = [sorted_levels(data[p], p) for p in parts]
        # interaction: lexicographic in the component codes (first factor slowest),
        # combined one factor at a time so that no code exceeds n_obs * q_j (no overflow)
        codes = sub[0][0].astype(np.int64)
        for c, lv in sub[1:]:
            combined = codes * len(lv) + c
            _, first, codes = np.unique(combined, return_index=True, return_inverse=True)
            codes = codes.ravel()
        # each level's label read once (a pandas Index is slow to index element-wise)
        values = [[lv[j] for j in range(len(lv))] for _, lv in sub]
        labels = [":".join(str(vals[c[i]]) for (c, _), vals in zip(sub, values))
                  for i in first]
        return codes.astype(np.int32), pd.Index(labels, dtype=object)

    # ------------------------------------------------------------------ validation
    def _validate(self):
        n = self.n_obs
        for k, name in enumerate(self._names):
            q = self._n_levels[k]
            empty = np.flatnonzero(self._counts[k] == 0)
            if empty.size:
                raise DesignError(
                    f"factor '{name}': {empty.size} level(s) have no observations (first: "
                    f"code {empty[0]}); recode the factor, e.g. with "
                    "np.unique(codes, return_inverse=True)"
                )
            if q < 2:
                raise DesignError(
                    f"grouping factor '{name}' has a single level; a random effect needs at "
                    "least 2 levels (use a fixed effect or drop the term)"
                )
            if q >= n:
                raise DesignError(
                    f"grouping factor '{name}' has {q} levels for {n} observations; the number "
                    "of levels must be less than the number of observations, or its variance "
                    "is not identifiable apart from the residual"
                )

    def identical_partitions(self):
        """The pairs ``(k, l)``, ``k < l``, of factors that group the observations
        identically (each level of one is exactly one level of the other).

        Examples
        --------
        >>> d = CrossedDesign.from_codes([[0, 0, 1, 1, 2], [2, 2, 0, 0, 1], [0, 1, 0, 1, 0]],
        ...                              names=["a", "b", "c"])
        >>> d.identical_partitions()
        [(0, 1)]
        """
        return [(k, l) for k in range(self.n_factors) for l in range(k + 1, self.n_factors)
                if self._n_levels[k] == self._n_levels[l]
                and self.crosstab(k, l).nnz == self._n_levels[k]]

    def check_distinct_partitions(self, terms=None):
        """Raise :class:`DesignError` if two factors group the observations identically.

        Two factors with the same partition of the rows, such as ``(1|g) + (1|g:g)``, or
        ``(1|a) + (1|a:b)`` with ``b`` constant within ``a``, have the same ``Z_k`` up to
        a relabelling of levels, so their variances are not identifiable apart. The
        operators do not need distinct factors; a model does, and
        :meth:`from_frame` and :class:`lmmops.LMM` call this check.

        With the model's random-effects ``terms``, two such factors are accepted when
        each carries terms and no column name is in terms of both: they are then as
        terms on one factor, ``(1 | a/b) + (0 + x | a:b)`` (``b:a`` and ``a:b``, one
        grouping), which lme4 fits as two factors. (A column of one in the span of the
        other's columns is refused by :func:`lmmops.data.terms.build_terms`.)

        Parameters
        ----------
        terms : sequence of RandomEffectsTerm, optional
            Default: one random intercept per factor (the design's own).

        Raises
        ------
        DesignError
            Naming both factors.

        Examples
        --------
        >>> d = CrossedDesign.from_codes([[0, 0, 1, 1, 2], [2, 2, 0, 0, 1]], names=["a", "b"])
        >>> d.check_distinct_partitions()  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        lmmops.errors.DesignError: grouping factors 'a' and 'b' group the observations ...
        """
        columns = None
        if terms is not None:
            columns = {}
            for t in terms:
                columns.setdefault(t.group, set()).update(t.columns)
        for k, l in self.identical_partitions():
            a, b = self._names[k], self._names[l]
            if columns is not None and a in columns and b in columns:
                shared = columns[a] & columns[b]
                if not shared:
                    continue
            ca, cb = grouping_columns(a), grouping_columns(b)
            if len(ca) > 1 and sorted(ca) == sorted(cb):  # b:a and a:b
                raise DesignError(
                    f"grouping factors '{a}' and '{b}' are one interaction written "
                    "in two orders, which lmmops keeps as two factors grouping the "
                    "observations identically"
                    + (f", and terms on both have the column(s) {sorted(shared)}: only the "
                       "sum of their variances is identifiable; merge the terms or drop one"
                       if columns is not None and a in columns and b in columns else
                       "; write it the same way in every term")
                    + " (lme4's name of the inner factor of (1|a/b) is 'b:a')"
                )
            raise DesignError(
                f"grouping factors '{a}' and '{b}' group the "
                f"observations identically (each level of one is exactly one level of "
                "the other), so their variances cannot be told apart; drop one of the "
                "two terms"
            )

    # ------------------------------------------------------------------ basic facts
    @property
    def codes(self):
        """ndarray of int32, shape (n_factors, n_obs): read-only level codes."""
        return self._codes

    @property
    def n_obs(self):
        """int: number of observations n."""
        return self._codes.shape[1]

    @property
    def n_factors(self):
        """int: number of grouping factors K."""
        return self._codes.shape[0]

    @property
    def n_levels(self):
        """tuple of int: number of levels q_k of each factor."""
        return self._n_levels


    @property
    def names(self):
        """tuple of str: factor names."""
        return self._names

    @property
    def terms(self):
        """The random-effects terms, one per factor (:class:`~lmmops.data.terms.RandomEffectsTerm`,
        random intercepts)."""
        if "terms" not in self._cache:
            self._cache["terms"] = tuple(
                RandomEffectsTerm(name, self._codes[k], self._levels[k])
                for k, name in enumerate(self._names))
        return self._cache["terms"]

    @property
    def levels(self):
        """tuple of pandas.Index: level labels of each factor, in code order."""
        return self._levels

    def index(self, name):
        """Return the position of factor ``name``.

        Parameters
        ----------
        name : str or int

        Returns
        -------
        int
        """
        if isinstance(name, numbers.Integral):
            return int(name)
        try:
            return self._names.index(name)
        except ValueError:
            raise UnknownNameError(
                f"no factor named '{name}'; factors are {list(self._names)}"
            ) from None

    def counts(self, k):
        """Level counts of factor ``k``: the diagonal of ``Z_k' Z_k``.

        Parameters
        ----------
        k : int or str

        Returns
        -------
        ndarray of int64, shape (q_k,)
        """
        return self._counts[self.index(k)]

    # ------------------------------------------------------------------ sparse structure
    def indicator(self, k):
        """Sparse indicator matrix ``Z_k`` of factor ``k``.

        Parameters
        ----------
        k : int or str

        Returns
        -------
        scipy.sparse.csr_matrix, shape (n_obs, q_k)
        """
        k = self.index(k)
        n = self.n_obs
        return sp.csr_matrix(
            (np.ones(n), self._codes[k], np.arange(n + 1)), shape=(n, self._n_levels[k])
        )

    def indicator_all(self):
        """Sparse ``Z = [Z_1 ... Z_K]``, shape (n_obs, q)."""
        return sp.hstack([self.indicator(k) for k in range(self.n_factors)], format="csr")

    def crosstab(self, k, l):
        """Sparse cross-tabulation ``N_kl = Z_k' Z_l``.

        Parameters
        ----------
        k, l : int or str

        Returns
        -------
        scipy.sparse.csr_matrix of float64, shape (q_k, q_l)
            Entry (i, j) counts the rows with level i of factor k and level j of factor l.
        """
        k, l = self.index(k), self.index(l)
        key = ("crosstab", k, l)
        if key not in self._cache:
            if k == l:
                m = sp.diags(self._counts[k].astype(np.float64), format="csr")
            elif k > l:
                # N_kl = N_lk': a transpose of the cached table (CSR -> CSR, indices
                # sorted) costs a tenth of a recount over the rows
                m = self.crosstab(l, k).T.tocsr()
                m.sort_indices()
            else:
                m = cell_table(self._codes[k], self._codes[l], self._n_levels[k],
                               self._n_levels[l])
            self._cache[key] = m
        return self._cache[key]

    def gram(self):
        """Sparse ``Z'Z``, shape (q, q), with blocks ``N_kl``."""
        key = ("gram",)
        if key not in self._cache:
            K = self.n_factors
            self._cache[key] = assemble_gram(
                self._counts, {(k, l): self.crosstab(k, l)
                               for k in range(K) for l in range(k + 1, K)})
        return self._cache[key]

    def level_rows(self, k):
        """CSR-by-level row permutation of factor ``k``.

        Parameters
        ----------
        k : int or str

        Returns
        -------
        indptr : ndarray of int64, shape (q_k + 1,)
        rows : ndarray of int64, shape (n_obs,)
            ``rows[indptr[j]:indptr[j+1]]`` are the rows at level j, in increasing order.
        """
        k = self.index(k)
        key = ("level_rows", k)
        if key not in self._cache:
            rows = np.argsort(self._codes[k], kind="stable").astype(np.int64)
            indptr = np.concatenate([[0], np.cumsum(self._counts[k])]).astype(np.int64)
            self._cache[key] = (indptr, rows)
        return self._cache[key]

    # ------------------------------------------------------------------ connectivity
    def connected_components(self):
        """Connected components of the level graph.

        Levels are vertices; two levels are joined when some observation has both.

        Returns
        -------
        n_components : int
        labels : ndarray of int32, shape (q,)
            Component of each level, in q-space order (factor blocks concatenated).
        """
        key = ("components",)
        if key not in self._cache:
            off = self.offsets
            K = self.n_factors
            if K == 1:
                res = (self.q, np.arange(self.q, dtype=np.int32))
            else:
                rows = np.concatenate([self._codes[0] + off[0]] * (K - 1))
                cols = np.concatenate([self._codes[k] + off[k] for k in range(1, K)])
                adj = sp.coo_matrix((np.ones(rows.size), (rows, cols)), shape=(self.q, self.q))
                ncomp, labels = csgraph.connected_components(adj, directed=False)
                res = (int(ncomp), labels.astype(np.int32))
            self._cache[key] = res
        return self._cache[key]

    @property
    def is_connected(self):
        """bool: whether the level graph is connected."""
        return self.connected_components()[0] == 1

    def check_connected(self):
        """Raise :class:`DisconnectedDesignError` unless the level graph is connected.

        Raises
        ------
        DisconnectedDesignError
            Naming the number of components and a level outside the first component.
        """
        ncomp, labels = self.connected_components()
        if ncomp > 1:
            j = int(np.flatnonzero(labels != labels[0])[0])
            k = int(np.searchsorted(self.offsets, j, side="right") - 1)
            lev = self._levels[k][j - self.offsets[k]]
            raise DisconnectedDesignError(
                f"the design is disconnected: its level graph ({' x '.join(self._names)}) has "
                f"{ncomp} connected components; e.g. level {lev!r} of '{self._names[k]}' never "
                "shares an observation, directly or indirectly, with level "
                f"{self._levels[0][0]!r} of '{self._names[0]}'. Fit the components separately "
                "or use a method that does not need connectivity"
            )

    def is_balanced(self):
        """Whether every cell of the full K-way table has the same positive count.

        Returns
        -------
        bool
        """
        cells = np.prod([float(q) for q in self._n_levels])
        if cells > self.n_obs:
            return False
        flat = np.zeros(self.n_obs, dtype=np.int64)
        for k in range(self.n_factors):
            flat = flat * self._n_levels[k] + self._codes[k]
        cnt = np.bincount(flat, minlength=int(cells))
        return bool(cnt.min() == cnt.max() and cnt.min() > 0)

    def subset_factors(self, which):
        """Return the design restricted to some factors.

        Parameters
        ----------
        which : sequence of int or str

        Returns
        -------
        CrossedDesign
        """
        idx = [self.index(w) for w in which]
        return CrossedDesign(
            self._codes[idx],
            [self._n_levels[i] for i in idx],
            [self._names[i] for i in idx],
            [self._levels[i] for i in idx],
        )

    def __repr__(self):
        facs = {nm: q for nm, q in zip(self._names, self._n_levels)}
        conn = self.is_connected if self.n_factors > 1 else True
        return f"CrossedDesign(n_obs={self.n_obs}, factors={facs}, connected={conn})"
