"""The level-space stand-ins of the in-memory model's row-level objects.

:class:`LevelDesign` answers what the model, the objectives and the result ask of a
:class:`~lmmops.data.design.CrossedDesign` (names, levels, counts, cross-tabulations,
connectivity) from the reduced cell tables alone; :func:`level_terms` gives the
:class:`~lmmops.data.terms.RandomEffectsTerm` objects with no rows (their level
dictionaries, columns and formulaic specifications, which is all the estimation and the
result read from them); :func:`moment_start_from_stats` is
:func:`lmmops.estimation.direct.moment_start` from unweighted statistics.

Examples
--------
>>> import scipy.sparse as sp
>>> d = LevelDesign(["a", "b"], [pd.Index([0, 1]), pd.Index(["u", "v", "w"])],
...                 [np.array([3.0, 2.0]), np.array([2.0, 2.0, 1.0])],
...                 {(0, 1): sp.csr_matrix([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])}, 5)
>>> d.n_levels, d.connected_components()[0]
((2, 3), 1)
"""

from __future__ import annotations

import numbers

import numpy as np
import pandas as pd
import scipy.sparse as sp

from lmmops.data.design import CrossedDesign, LevelCounts
from lmmops.data.statistics import assemble_gram
from lmmops.data.terms import RandomEffectsTerm
from lmmops.errors import DesignError, UnknownNameError
from lmmops.estimation.direct import theta_scale
from lmmops.linalg import kernels

__all__ = ["LevelDesign", "level_terms", "moment_start_from_stats"]


class LevelDesign(LevelCounts):
    """Grouping factors known by their level counts and cell tables (no rows).

    Parameters
    ----------
    names : sequence of str
    levels : sequence of pandas.Index
    counts : sequence of ndarray
        Rows per level (unweighted).
    N : dict
        ``{(k, l): Z_k'Z_l}`` for ``k < l`` (CSR): the cell tables, unweighted counts
        or weighted ones (the design's checks read only their pattern).
    n_obs : int
    """

    def __init__(self, names, levels, counts, N, n_obs):
        self._names = tuple(str(x) for x in names)
        self._levels = tuple(pd.Index(lv) for lv in levels)
        self._n_levels = tuple(len(lv) for lv in self._levels)
        self._counts = [np.asarray(c, dtype=np.float64) for c in counts]
        self._N = dict(N)
        self._n_obs = int(n_obs)
        self._cache = {}
        self._validate()

    def _validate(self):
        n = self._n_obs
        if n == 0:
            raise DesignError("the design has no observations")
        for k, name in enumerate(self._names):
            q = self._n_levels[k]
            if q < 2:
                raise DesignError(
                    f"grouping factor '{name}' has a single level; a random effect needs at "
                    "least 2 levels (use a fixed effect or drop the term)")
            if q >= n:
                raise DesignError(
                    f"grouping factor '{name}' has {q} levels for {n} observations; the "
                    "number of levels must be less than the number of observations, or its "
                    "variance is not identifiable apart from the residual")

    n_obs = property(lambda self: self._n_obs, doc="int: number of observations.")
    n_factors = property(lambda self: len(self._names), doc="int: number of factors.")
    n_levels = property(lambda self: self._n_levels, doc="tuple of int: levels per factor.")
    names = property(lambda self: self._names, doc="tuple of str: factor names.")
    levels = property(lambda self: self._levels, doc="tuple of pandas.Index: labels.")


    @property
    def terms(self):
        """One random intercept per factor, without rows."""
        return tuple(RandomEffectsTerm(nm, np.zeros(0, np.int32), lv)
                     for nm, lv in zip(self._names, self._levels))

    def index(self, name):
        """The position of factor ``name``."""
        if isinstance(name, numbers.Integral):
            return int(name)
        try:
            return self._names.index(name)
        except ValueError:
            raise UnknownNameError(f"unknown factor '{name}'; factors: "
                                   f"{', '.join(self._names)}") from None

    def counts(self, k):
        """Rows per level of factor ``k``."""
        return self._counts[self.index(k)].astype(np.int64)

    def crosstab(self, k, l):
        """``Z_k'Z_l`` (CSR); the diagonal counts for ``k == l``."""
        k, l = self.index(k), self.index(l)
        if k == l:
            return sp.diags(self._counts[k], format="csr")
        if k < l:
            return self._N[(k, l)]
        return self._N[(l, k)].T.tocsr()

    def gram(self):
        """Sparse ``Z'Z``."""
        return assemble_gram(self._counts, self._N)

    identical_partitions = CrossedDesign.identical_partitions
    check_distinct_partitions = CrossedDesign.check_distinct_partitions

    def connected_components(self):
        """Connected components of the level graph (as
        :meth:`CrossedDesign.connected_components`: edges from the first factor).

        A union-find over the cell tables' own CSR index arrays
        (:func:`lmmops.linalg.kernels.union_csr`): no copy of the tables, ``12 q`` bytes
        of work whatever the number of cells (the edge list and the float adjacency
        matrix that ``scipy.sparse.csgraph`` needs would cost tens of bytes per cell).
        """
        if "components" not in self._cache:
            K, off = self.n_factors, self.offsets
            if K == 1:
                res = (self.q, np.arange(self.q, dtype=np.int32))
            else:
                parent = np.arange(self.q, dtype=np.int64)
                for k in range(1, K):
                    c = self._table(0, k)
                    kernels.union_csr(c.indptr, c.indices, np.int64(off[0]),
                                      np.int64(off[k]), parent)
                labels = np.empty(self.q, dtype=np.int32)
                ncomp = kernels.component_labels(parent, labels)
                res = (int(ncomp), labels)
            self._cache["components"] = res
        return self._cache["components"]

    def _table(self, k, l):
        """``Z_k'Z_l`` for ``k < l``: the stored cell table (CSR, no copy)."""
        m = self._N[(k, l)]
        return m if sp.issparse(m) and m.format == "csr" else sp.csr_matrix(m)

    @property
    def is_connected(self):
        """bool: whether the level graph is connected."""
        return self.connected_components()[0] == 1

    def subset_factors(self, which):
        """The design restricted to some factors."""
        idx = [self.index(w) for w in which]
        N = {(a, b): self.crosstab(idx[a], idx[b])
             for a in range(len(idx)) for b in range(a + 1, len(idx))}
        return LevelDesign([self._names[i] for i in idx], [self._levels[i] for i in idx],
                           [self._counts[i] for i in idx], N, self._n_obs)

    def __repr__(self):
        facs = dict(zip(self._names, self._n_levels))
        return f"LevelDesign(n_obs={self._n_obs}, factors={facs})"


def level_terms(design, specs):
    """The random-effects terms without rows.

    Parameters
    ----------
    design : LevelDesign
    specs : sequence of (group, columns, formulaic spec or None)

    Returns
    -------
    tuple of RandomEffectsTerm
        ``codes`` of length 0; ``values`` of shape ``(0, d)`` (None for an intercept).
    """
    out = []
    for group, columns, spec in specs:
        k = design.index(group)
        values = None if spec is None else np.zeros((0, len(columns)))
        out.append(RandomEffectsTerm(group, np.zeros(0, np.int32), design.levels[k],
                                     tuple(columns), values, spec=spec))
    return tuple(out)


def moment_start_from_stats(design, TT, ZT, D):
    """:func:`lmmops.estimation.direct.moment_start` from unweighted statistics.

    Parameters
    ----------
    design : LevelDesign
    TT : ndarray, shape (p + 1, p + 1)
        ``[X y]'[X y]`` (unweighted, conditioned scale).
    ZT : list of ndarray
        ``Z_k'[X y]`` per factor (unweighted).
    D : list of ndarray
        Rows per level.

    Returns
    -------
    ndarray, shape (n_factors,)
    """
    from_start = theta_scale(design)
    p = TT.shape[0] - 1
    n = float(design.n_obs)
    beta = np.linalg.lstsq(TT[:p, :p], TT[:p, p], rcond=None)[0] if p else np.zeros(0)
    rr = float(TT[p, p] - 2.0 * beta @ TT[:p, p] + beta @ TT[:p, :p] @ beta)
    between, within = [], []
    grand = None
    for k in range(design.n_factors):
        cnt = np.asarray(D[k], dtype=np.float64)
        a = cnt.size
        sums = ZT[k][:, p] - ZT[k][:, :p] @ beta
        if grand is None:
            grand = float(np.sum(sums)) / n
        means = sums / cnt
        msa = float(np.sum(cnt * (means - grand) ** 2) / max(a - 1, 1))
        sse = rr - float(np.sum(sums * means))
        mse = sse / max(n - a, 1)
        n0 = (n - np.sum(cnt**2) / n) / max(a - 1, 1)
        between.append((msa - mse) / max(n0, 1e-300))
        within.append(mse)
    var = rr / n - grand**2
    s2e = max(min(within), 1e-12 * max(var, 1e-300))
    th = np.array([np.sqrt(b / s2e) if b > 0 else 0.1 * s
                   for b, s in zip(between, from_start)])
    return np.clip(th, 1e-3 * from_start, 1e3 * from_start)

