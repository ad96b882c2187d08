r"""The sufficient statistics of an intercept LMM, built in one pass over the rows.

With ``T = [X y]`` (``n x (p+1)``), prior weights ``W`` and the indicator matrices ``Z_k``
of the grouping factors, everything the rows contribute to the profiled REML/ML
criterion, its gradient and the BLUPs is

- ``T'WT`` (``(p+1) x (p+1)``),
- ``Z_k'WT`` per factor (``q_k x (p+1)``: per-level weighted sums of ``X`` and ``y``),
- ``diag(Z_k'WZ_k)`` per factor (weighted level counts),
- ``Z_k'WZ_l`` per pair ``k < l`` (sparse weighted cross-tabulations),
- ``sum log w`` (the weights' share of the log-likelihood).

:class:`SufficientStatistics` holds them; the exact objective builds its level-space
blocks from them, and the size of everything here is in level space, not in ``n``. It is
the seam a distributed backend replaces: the statistics of disjoint row blocks add up
(:meth:`SufficientStatistics.combine`), so a map over partitions and a tree reduction
give exactly the in-memory statistics (up to the order of floating-point summation).

Examples
--------
>>> import numpy as np
>>> from lmmops.data.design import CrossedDesign
>>> d = CrossedDesign.from_codes([[0, 0, 1, 1, 2], [0, 1, 0, 1, 1]])
>>> X, y = np.ones((5, 1)), np.arange(5.0)
>>> s = SufficientStatistics.from_arrays(d, X, y)
>>> s.ZT[0]
array([[2., 1.],
       [2., 5.],
       [1., 4.]])
>>> s.crosstab(0, 1).toarray()
array([[1., 1.],
       [1., 1.],
       [0., 1.]])
>>> halves = [SufficientStatistics.from_codes(d.codes[:, r], d.n_levels, X[r], y[r])
...           for r in (np.arange(3), np.arange(3, 5))]
>>> bool(np.allclose(SufficientStatistics.combine(halves).TT, s.TT))
True
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from lmmops.data.checks import check_weights
from lmmops.errors import ArgumentError

__all__ = ["SufficientStatistics", "assemble_gram", "cell_table", "level_sums"]


class SufficientStatistics:
    """Level-space sufficient statistics of ``T = [X y]`` on a crossed design.

    Parameters
    ----------
    n_levels : sequence of int
        Levels per factor, ``q_k``.
    n_obs : int
        Rows summarised.
    TT : ndarray, shape (p + 1, p + 1)
        ``T'WT``.
    ZT : list of ndarray, shape (q_k, p + 1)
        ``Z_k'WT`` per factor.
    D : list of ndarray, shape (q_k,)
        ``diag(Z_k'WZ_k)`` per factor.
    N : dict
        ``{(k, l): Z_k'WZ_l}`` for ``k < l``, CSR with sorted indices and no duplicates.
    log_weights : float
        ``sum log w`` (0 without weights).
    weighted : bool

    See Also
    --------
    SufficientStatistics.from_arrays : the one pass over the rows.
    """

    def __init__(self, n_levels, n_obs, TT, ZT, D, N, log_weights=0.0, weighted=False):
        self.n_levels = tuple(int(q) for q in n_levels)
        self.n_obs = int(n_obs)
        self.TT = TT
        self.ZT = list(ZT)
        self.D = list(D)
        self.N = dict(N)
        self.log_weights = float(log_weights)
        self.weighted = bool(weighted)

    @property
    def K(self):
        """Number of factors."""
        return len(self.n_levels)

    @property
    def p(self):
        """Number of fixed-effects columns."""
        return self.TT.shape[0] - 1

    @classmethod
    def from_arrays(cls, design, X, y, weights=None):
        """The statistics of ``(design, X, y, weights)``: one pass over the rows.

        Parameters
        ----------
        design : CrossedDesign
        X : ndarray, shape (n_obs, p)
        y : ndarray, shape (n_obs,)
        weights : ndarray, shape (n_obs,), optional
            Prior weights, finite and > 0.

        Returns
        -------
        SufficientStatistics
        """
        return cls.from_codes(design.codes, design.n_levels, X, y, weights)

    @classmethod
    def from_codes(cls, codes, n_levels, X, y, weights=None):
        """The statistics of a block of rows given by its level codes.

        The primitive of :meth:`from_arrays`, for row blocks (partitions) in which some
        levels may not occur: ``codes`` is ``(K, n)`` in ``0 .. n_levels[k] - 1``.
        """
        codes = np.asarray(codes)
        X = np.asarray(X, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64).ravel()
        q = [int(v) for v in n_levels]
        n = codes.shape[1]
        if X.ndim != 2 or X.shape[0] != n or y.shape[0] != n:
            raise ArgumentError(f"X ({X.shape}), y ({y.shape}) and the codes ({n} rows) "
                                "must have the same number of rows")
        w = None if weights is None else check_weights(weights, n)
        T = np.empty((n, X.shape[1] + 1))
        T[:, :-1] = X
        T[:, -1] = y
        WT = T if w is None else w[:, None] * T
        TT = T.T @ WT
        del T
        ZT, D, N = [], [], {}
        for k in range(len(q)):
            ZT.append(level_sums(codes[k], q[k], WT))
            D.append(level_sums(codes[k], q[k], w))
            for l in range(k):
                N[(l, k)] = cell_table(codes[l], codes[k], q[l], q[k], w)
        return cls(q, n, TT, ZT, D, N,
                   0.0 if w is None else float(np.sum(np.log(w))), w is not None)

    @classmethod
    def combine(cls, parts):
        """The statistics of the union of disjoint row blocks: the sum of their parts.

        Parameters
        ----------
        parts : sequence of SufficientStatistics
            On the same factors and levels (the same level dictionaries).

        Returns
        -------
        SufficientStatistics
        """
        parts = list(parts)
        if not parts:
            raise ArgumentError("combine needs at least one part")
        first = parts[0]
        for s in parts[1:]:
            if s.n_levels != first.n_levels or s.TT.shape != first.TT.shape:
                raise ArgumentError(f"cannot combine statistics on levels {s.n_levels} "
                                    f"with {first.n_levels} (shapes {s.TT.shape}, "
                                    f"{first.TT.shape})")
        N = {}
        for key in first.N:
            m = sum((s.N[key] for s in parts[1:]), first.N[key]).tocsr()
            m.sum_duplicates()
            m.sort_indices()
            N[key] = m
        return cls(first.n_levels, sum(s.n_obs for s in parts),
                   sum(s.TT for s in parts[1:]) + first.TT,
                   [sum(s.ZT[k] for s in parts) for k in range(first.K)],
                   [sum(s.D[k] for s in parts) for k in range(first.K)], N,
                   sum(s.log_weights for s in parts), any(s.weighted for s in parts))

    def crosstab(self, k, l):
        """``Z_k'WZ_l`` (CSR); ``diag(D_k)`` for ``k == l``."""
        if k == l:
            return sp.diags(self.D[k], format="csr")
        if k < l:
            return self.N[(k, l)]
        return self.N[(l, k)].T.tocsr()

    def gram(self):
        """The sparse ``Z'WZ`` (q x q, CSR, sorted indices): the level-space Gram matrix
        that the iterative solver's PCG products apply (:func:`assemble_gram`)."""
        return assemble_gram(self.D, self.N)

    def block(self, factors):
        """The dense ``Z_F'WZ_F`` of the factors ``F`` (levels in that order).

        Used for the exact solver's Schur block, whose size is guarded by its caller.
        """
        factors = list(factors)
        if len(factors) == 1:  # a diagonal block: the same matrix without scipy's bmat
            return np.diag(np.asarray(self.D[factors[0]], dtype=np.float64))
        blocks = [[self.crosstab(k, l) for l in factors] for k in factors]
        if not blocks:
            return np.zeros((0, 0))
        return sp.bmat(blocks, format="csr").toarray()


def level_sums(codes, q, values=None):
    """Per-level sums ``Z_k' v`` of the rows' values: one ``bincount`` per column.

    Parameters
    ----------
    codes : ndarray of int, shape (n,)
        Level codes of one factor, ``0 .. q - 1``.
    q : int
        Number of levels.
    values : ndarray, shape (n,) or (n, m), optional
        Values per row; None counts the rows.

    Returns
    -------
    ndarray of float64, shape (q,) or (q, m)

    Examples
    --------
    >>> level_sums(np.array([0, 1, 1]), 3, np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]))
    array([[ 1.,  2.],
           [ 8., 10.],
           [ 0.,  0.]])
    """
    if values is None or np.ndim(values) == 1:
        return np.bincount(codes, weights=values, minlength=q).astype(np.float64)
    values = np.asarray(values, dtype=np.float64)
    out = np.empty((q, values.shape[1]))
    for j in range(values.shape[1]):
        out[:, j] = np.bincount(codes, weights=values[:, j], minlength=q)
    return out


def cell_table(ck, cl, qk, ql, weights=None):
    """The cross-tabulation ``Z_k'WZ_l`` of two factors: CSR, summed, sorted indices.

    Parameters
    ----------
    ck, cl : ndarray of int, shape (n,)
        Level codes of the two factors.
    qk, ql : int
        Their numbers of levels.
    weights : ndarray, shape (n,), optional
        Prior weights (unweighted: the cell counts).

    Returns
    -------
    scipy.sparse.csr_matrix of float64, shape (qk, ql)

    Examples
    --------
    >>> cell_table(np.array([0, 0, 1]), np.array([1, 1, 0]), 2, 2).toarray()
    array([[0., 2.],
           [1., 0.]])
    """
    w = np.ones(len(ck)) if weights is None else np.asarray(weights, dtype=np.float64)
    m = sp.coo_matrix((w, (ck, cl)), shape=(qk, ql)).tocsr()
    m.sum_duplicates()
    m.sort_indices()
    return m


def assemble_gram(D, N):
    """The sparse level-space Gram matrix ``Z'WZ`` from its blocks.

    Parameters
    ----------
    D : sequence of ndarray, shape (q_k,)
        The diagonal blocks ``diag(Z_k'WZ_k)``.
    N : dict
        ``{(k, l): Z_k'WZ_l}`` for ``k < l`` (CSR).

    Returns
    -------
    scipy.sparse.csr_matrix of float64, shape (q, q)
        Sorted indices, no duplicates.

    Examples
    --------
    >>> G = assemble_gram([np.array([2.0, 1.0]), np.array([3.0])],
    ...                   {(0, 1): sp.csr_matrix([[2.0], [1.0]])})
    >>> G.toarray()
    array([[2., 0., 2.],
           [0., 1., 1.],
           [2., 1., 3.]])
    """
    K = len(D)
    blocks = [[None] * K for _ in range(K)]
    for k in range(K):
        blocks[k][k] = sp.diags(np.asarray(D[k], dtype=np.float64), format="csr")
        for l in range(k + 1, K):
            blocks[k][l] = N[(k, l)]
            blocks[l][k] = N[(k, l)].T
    A = sp.bmat(blocks, format="csr")
    A.sum_duplicates()
    A.sort_indices()
    return A
