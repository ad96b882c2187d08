"""The exact profiled criterion for vector-valued random-effects terms (random slopes).

A term ``(1 + x | g)`` has ``d`` columns and a ``d x d`` lower-triangular relative
covariance factor ``T_k``; ``Lambda = blockdiag_k(I_{q_k} (x) T_k)`` and, in lme4's
penalised least-squares form (:ref:`theory-slopes`, ``docs/theory_slopes.rst``),

    A = Lambda' Z'WZ Lambda + I,
    -2 l_REML = log|A| + log|X'V0^{-1}X| + (n - p)(1 + log(2 pi r^2 / (n - p))) - sum log w,
    -2 l_ML   = log|A| + n (1 + log(2 pi r^2 / n)) - sum log w,

with ``r^2`` the penalised weighted residual sum of squares. :class:`VectorObjective`
factors ``A`` blockwise as MixedModels.jl does: the first term (lme4's order puts the
term with the most levels first) gives a block-diagonal leading block of ``d_1 x d_1``
blocks, one per level; the rest is the dense Schur complement. The gradient is analytic
and needs no inverse of ``T_k``, so it is exact on the boundary (singular ``T_k``) too:
with ``M = Z'P0 Z - c / r^2 a a'`` (``a = Z'P0 y``, ``c = n - p`` for REML, ``n`` for ML;
``Z'V0^{-1}Z`` in place of ``Z'P0Z`` for ML), the derivative in the entry ``(i, j)`` of
``T_k`` is ``2 (T_k' M_k)_{j i}``, where ``M_k`` is the sum over the term's levels of
the ``d_k x d_k`` diagonal blocks of ``M``.

Examples
--------
>>> import numpy as np, pandas as pd
>>> from lmmops.data.terms import RandomEffectsTerm
>>> rng = np.random.default_rng(0)
>>> g = rng.integers(0, 8, 200).astype(np.int32)
>>> x = rng.normal(size=200)
>>> t = RandomEffectsTerm("g", g, pd.Index(range(8)), ("(Intercept)", "x"),
...                       np.column_stack([np.ones(200), x]))
>>> y = rng.normal(size=8)[g] + rng.normal(size=8)[g] * x + rng.normal(size=200)
>>> obj = VectorObjective([t], np.ones((200, 1)), y)
>>> ev = obj.evaluate(np.array([1.0, 0.0, 1.0]))
>>> ev.gradient.shape, bool(np.isfinite(ev.objective))
((3,), True)
"""

from __future__ import annotations

import copy
import math
import time

import numpy as np
import scipy.linalg as sla
import scipy.optimize as sopt
import scipy.sparse as sp

from lmmops.data.checks import check_method, check_weights
from lmmops.data.terms import (
    centred_start,
    centring_shifts,
    column_units,
    covariance_entries,
    lower_triangle,
    theta_layout,
    theta_lower_bounds,
    theta_names,
    theta_scales,
)
from lmmops.errors import LmmopsError, NumericalFailure, RankDeficientError
from lmmops.estimation.centring import fit_centred
from lmmops.estimation.criterion import criterion_at_sigma
from lmmops.estimation.direct import Evaluation, OptSummary
from lmmops.guard import check_dense
from lmmops.linalg import kernels
from lmmops.linalg.lapack import chol_factor, chol_inverse, chol_solve, mirror_triangle

__all__ = ["ScaledTheta", "VectorObjective", "VectorStatistics", "fit_vector", "profiled_gls",
           "random_effects_matrix", "span_average_information", "term_units",
           "vector_statistics"]

#: A term's gradient uses the selected inverse of ``A`` (and ``T_k^{-1}``) when every
#: diagonal entry of ``T_k`` is at least this; below it, the general form that needs no
#: inverse of ``T_k`` (exact on the boundary, slower).
_SELECTED_INVERSE_MIN_DIAG = 1e-3

#: The compiled Schur-block loops run in parallel from this many rows of the block on
#: (below it a thread team's start-up costs more than the loop: an 18-row block took 9 ms
#: in parallel on a loaded machine, 0.02 ms serially).
_PARALLEL_MIN_ROWS = 256

#: ``fit_vector(optimizer="auto")`` uses AI-Newton up to this many parameters.
AUTO_AI_NEWTON_MAX_THETA = 6

#: Probes of the Hutchinson estimates of the gradient's traces in the early AI-Newton
#: steps (:meth:`VectorObjective.evaluate` with ``probes``).
EARLY_GRADIENT_PROBES = 64

#: AI-Newton uses estimated traces while its decrement is above this (far from the
#: optimum, where the step needs the gradient's direction, not its last digits); every
#: evaluation from the first decrement below it on, the Newton check's and the result's
#: among them, is exact.
EARLY_GRADIENT_DECREMENT = 100.0


def random_effects_matrix(terms):
    """``Z = [Z_1 ... Z_K]`` as a CSR matrix, columns level-major, coefficient-minor
    within each term (lme4's order).

    Parameters
    ----------
    terms : sequence of RandomEffectsTerm

    Returns
    -------
    scipy.sparse.csr_matrix, shape (n_obs, sum_k q_k d_k)
    """
    # every row has sum_k d_k entries, term by term (so its column indices ascend): the
    # CSR arrays are written directly, without a COO sort or a stack
    n = terms[0].codes.shape[0]
    width = sum(t.dim for t in terms)
    q = sum(t.n_random_effects for t in terms)
    index_dtype = np.int32 if max(q, n * width) < 2**31 - 1 else np.int64
    indices = np.empty((n, width), dtype=index_dtype)
    data = np.empty((n, width))
    c, off = 0, 0
    for t in terms:
        d = t.dim
        base = t.codes.astype(index_dtype) * d + off
        for a in range(d):
            indices[:, c + a] = base + a
        if t.values is None:
            data[:, c] = 1.0
        else:
            data[:, c:c + d] = np.asarray(t.values, np.float64).reshape(n, d)
        c, off = c + d, off + t.n_random_effects
    indptr = np.arange(0, n * width + 1, width, dtype=index_dtype)
    return sp.csr_matrix((data.ravel(), indices.ravel(), indptr), shape=(n, q))


def vector_statistics(terms, X, y, weights=None):
    """The sufficient statistics of a model with vector-valued terms, one pass over the
    rows: ``Z``, ``C = Z'WZ`` (sparse CSR, ``q x q``, sorted indices), ``Z'W[X y]``,
    ``[X y]'W[X y]`` and ``sum(log w)`` (0 without weights).

    Parameters
    ----------
    terms : sequence of RandomEffectsTerm
    X : ndarray, shape (n_obs, p)
    y : ndarray, shape (n_obs,)
    weights : ndarray, shape (n_obs,), optional
        Checked prior weights.

    Returns
    -------
    (scipy.sparse.csr_matrix, scipy.sparse.csr_matrix, ndarray, ndarray, float)
        ``Z``, ``C``, ``Z'W[X y]`` (``q x (p + 1)``), ``[X y]'W[X y]`` and the log-sum of
        the weights. Columns of ``Z`` as :func:`random_effects_matrix`.
    """
    n = X.shape[0]
    Z = random_effects_matrix(terms)
    w = np.ones(n) if weights is None else weights
    Zw = Z if weights is None else sp.diags(w) @ Z  # no copy of Z without weights
    C = (Z.T @ Zw).tocsr()  # Z'WZ
    C.sort_indices()
    T = np.column_stack([X, y])
    ZtT = np.asarray(Zw.T @ T)  # Z'W[X y]
    TT = T.T @ (w[:, None] * T)
    ldW = float(np.sum(np.log(w))) if weights is not None else 0.0
    return Z, C, ZtT, TT, ldW


class VectorStatistics:
    """The level-space statistics of a slope model (:func:`vector_statistics` without
    ``Z``): what :class:`VectorObjective` needs from the rows, additive over row blocks.

    Parameters
    ----------
    C : scipy.sparse.csr_matrix, shape (q, q)
        ``Z'WZ`` (sorted indices).
    ZtT : ndarray, shape (q, p + 1)
        ``Z'W[X y]``.
    TT : ndarray, shape (p + 1, p + 1)
        ``[X y]'W[X y]``.
    log_weights : float
        ``sum log w`` (0 without weights).
    n_obs : int
    weighted : bool

    Examples
    --------
    >>> import pandas as pd
    >>> from lmmops.data.terms import RandomEffectsTerm
    >>> g = np.array([0, 0, 1, 1, 2], np.int32)
    >>> x = np.arange(5.0)
    >>> t = RandomEffectsTerm("g", g, pd.Index(range(3)), ("(Intercept)", "x"),
    ...                       np.column_stack([np.ones(5), x]))
    >>> whole = VectorStatistics.from_rows([t], np.ones((5, 1)), x)
    >>> halves = [VectorStatistics.from_rows([RandomEffectsTerm(
    ...     "g", g[r], t.levels, t.columns, t.values[r])], np.ones((r.size, 1)), x[r])
    ...     for r in (np.arange(2), np.arange(2, 5))]
    >>> both = VectorStatistics.combine(halves)
    >>> bool(np.allclose(both.C.toarray(), whole.C.toarray())), both.n_obs
    (True, 5)
    """

    def __init__(self, C, ZtT, TT, log_weights=0.0, n_obs=0, weighted=False):
        self.C = C
        self.ZtT = np.asarray(ZtT, dtype=np.float64)
        self.TT = np.asarray(TT, dtype=np.float64)
        self.log_weights = float(log_weights)
        self.n_obs = int(n_obs)
        self.weighted = bool(weighted)

    @property
    def p(self):
        """Number of fixed-effects columns."""
        return self.TT.shape[0] - 1

    @classmethod
    def from_rows(cls, terms, X, y, weights=None):
        """The statistics of a block of rows (the terms' codes and values of that block)."""
        X = np.ascontiguousarray(X, dtype=np.float64)
        y = np.ascontiguousarray(y, dtype=np.float64).ravel()
        w = None if weights is None else check_weights(weights, X.shape[0])
        _, C, ZtT, TT, ldW = vector_statistics(terms, X, y, w)
        return cls(C, ZtT, TT, ldW, X.shape[0], w is not None)

    @classmethod
    def combine(cls, parts):
        """The statistics of the union of disjoint row blocks: the sum of the parts."""
        parts = list(parts)
        if not parts:
            raise LmmopsError("combine needs at least one part")
        first = parts[0]
        for s in parts[1:]:
            if s.C.shape != first.C.shape or s.TT.shape != first.TT.shape:
                raise LmmopsError(f"cannot combine slope statistics of shapes "
                                  f"{s.C.shape}, {s.TT.shape} with {first.C.shape}, "
                                  f"{first.TT.shape}")
        C = sum((s.C for s in parts[1:]), first.C).tocsr()
        C.sum_duplicates()
        C.sort_indices()
        return cls(C, sum(s.ZtT for s in parts[1:]) + first.ZtT,
                   sum(s.TT for s in parts[1:]) + first.TT,
                   sum(s.log_weights for s in parts), sum(s.n_obs for s in parts),
                   any(s.weighted for s in parts))


def block_closed_arrays(C, terms, offsets, dims, merge_values):
    """``C``'s CSR arrays on a block-closed pattern (its own when it is one: the rows of
    a level share their columns, whole ``d_k x d_l`` blocks, the diagonal block
    present), on which ``Lambda' C Lambda + I`` has the same pattern for every
    ``theta`` (:func:`lmmops.linalg.kernels.get_slope_kernels`' ``lam_sandwich``).

    Parameters
    ----------
    C : scipy.sparse.csr_matrix, shape (q, q)
        Sorted column indices.
    terms : sequence of RandomEffectsTerm
    offsets, dims : ndarray of int64
        First row of each term (and ``q``); each term's dimension.
    merge_values : callable
        The ``merge_values`` kernel.

    Returns
    -------
    (ndarray, ndarray, ndarray)
        ``indptr`` (int64), ``indices`` (int32), ``data`` (float64).
    """
    q = C.shape[0]
    indptr = np.asarray(C.indptr, dtype=np.int64)
    indices = np.asarray(C.indices, dtype=np.int32)
    data = np.asarray(C.data, dtype=np.float64)
    if kernels.block_closed(indptr, indices, offsets, dims):
        return indptr, indices, data
    # the closure Bp (|C| + I) Bp, Bp the block-diagonal pattern of Lambda (positive
    # values: no cancellation drops an entry)
    rows, cols = [], []
    for k, t in enumerate(terms):
        d, o = t.dim, int(offsets[k])
        base = o + d * np.arange(t.n_levels, dtype=np.int64)
        for a in range(d):
            for b in range(d):
                rows.append(base + a)
                cols.append(base + b)
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    Bp = sp.csr_matrix((np.ones(rows.size), (rows, cols)), shape=(q, q))
    Cp = sp.csr_matrix((np.ones(indices.size), indices, indptr), shape=(q, q))
    S = (Bp @ (Cp + sp.identity(q, format="csr")) @ Bp).tocsr()
    S.sort_indices()
    pptr = np.asarray(S.indptr, dtype=np.int64)
    pind = np.asarray(S.indices, dtype=np.int32)
    out = np.empty(pind.size)
    merge_values(indptr, indices, data, pptr, pind, out)
    return pptr, pind, out


def profiled_gls(TT, LZT, sol, logdet_A, n, method, ldW):
    """Generalised least squares given ``theta`` and the profiled criterion, from the
    solves ``sol = A^{-1} Lambda'Z'W[X y]`` (exact or to a CG tolerance).

    Parameters
    ----------
    TT : ndarray, shape (p + 1, p + 1)
        ``[X y]'W[X y]``.
    LZT : ndarray, shape (q, p + 1)
        ``Lambda'Z'W[X y]``.
    sol : ndarray, shape (q, p + 1)
        ``A^{-1} LZT``.
    logdet_A : float
        ``log|A|`` (exact or estimated).
    n : int
    method : {"REML", "ML"}
    ldW : float
        ``sum(log w)``.

    Returns
    -------
    dict
        ``beta``, ``u`` (the spherical modes), ``pwrss``, ``logdet_RX``, ``Cx_inv``
        (``(X'V0^{-1}X)^{-1}``), ``sigma2``, ``dof`` and ``objective``.

    Raises
    ------
    RankDeficientError
        If ``X'V0^{-1}X`` is not positive definite.
    """
    p = TT.shape[0] - 1
    Cx = TT[:p, :p] - LZT[:, :p].T @ sol[:, :p]  # X'V0^{-1}X
    cxy = TT[:p, p] - LZT[:, :p].T @ sol[:, p]
    try:
        Rx = chol_factor(Cx, lower=True)
    except NumericalFailure as exc:
        raise RankDeficientError("X'V^{-1}X is not positive definite: the fixed "
                                 "effects are not identifiable") from exc
    beta = chol_solve(Rx, cxy, lower=True)
    u = sol[:, p] - sol[:, :p] @ beta
    # r^2 = ||W^{1/2}(y - X beta - Z Lambda u)||^2 + ||u||^2 at the PLS solution
    pwrss = float(TT[p, p] - TT[:p, p] @ beta - LZT[:, p] @ u)
    if not pwrss > 0:
        pwrss = float(np.finfo(float).tiny)
    logdet_RX = 2.0 * float(np.sum(np.log(np.diag(Rx))))
    dof = n - p if method == "REML" else n
    f = logdet_A + dof * (1.0 + math.log(2.0 * math.pi * pwrss / dof)) - ldW
    if method == "REML":
        f += logdet_RX
    return {"beta": beta, "u": u, "pwrss": pwrss, "logdet_RX": logdet_RX,
            "Cx_inv": chol_solve(Rx, np.eye(p), lower=True),
            "sigma2": pwrss / dof, "dof": dof, "objective": float(f)}


def setup_objective(obj, terms, X, y, method, weights, stats=None):
    """Check the inputs of a slope objective and set what every one keeps: ``method``,
    ``terms``, ``X``, ``y``, ``n``, ``p``, ``weights``, ``offsets`` (of each term's block
    in level space), ``q``, ``layout``, ``n_theta``, ``lower`` and ``names``.

    With ``X = y = None`` and ``stats`` (:class:`VectorStatistics`), the objective has
    no rows (``X``, ``y`` and ``weights`` None): ``n`` and ``p`` are the statistics'."""
    obj.method = check_method(method)
    obj.terms = tuple(terms)
    if X is None or y is None:
        if stats is None or X is not None or y is not None or weights is not None:
            raise LmmopsError("a slope objective without rows needs stats= and neither "
                              "X, y nor weights (they are in the statistics)")
        n, p = stats.n_obs, stats.p
        check_method(obj.method, n, p)
        obj.weights = None
        obj.n, obj.p = n, p
        obj.X = obj.y = None
    else:
        X = np.ascontiguousarray(X, dtype=np.float64)
        y = np.ascontiguousarray(y, dtype=np.float64).ravel()
        n, p = X.shape
        if y.shape[0] != n or any(t.codes.shape[0] != n for t in obj.terms):
            raise LmmopsError("X, y and the random-effects terms must have the same "
                              "number of rows")
        check_method(obj.method, n, p)
        obj.weights = None if weights is None else check_weights(weights, n)
        obj.n, obj.p = n, p
        obj.X, obj.y = X, y
    sizes = [t.n_random_effects for t in obj.terms]
    obj.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    obj.q = int(obj.offsets[-1])
    obj.layout = theta_layout(obj.terms)
    obj.n_theta = sum(t.n_theta for t in obj.terms)
    obj.lower = theta_lower_bounds(obj.terms)
    obj.names = theta_names(obj.terms)


def check_theta(obj, theta):
    """``theta`` as a float64 copy, checked against the objective's size and bounds.

    Raises
    ------
    LmmopsError
        For a ``theta`` of the wrong size, non-finite, or with a negative diagonal.
    """
    theta = np.asarray(theta, dtype=np.float64).copy()
    if (theta.shape != (obj.n_theta,) or not np.all(np.isfinite(theta))
            or np.any(theta < obj.lower)):
        raise LmmopsError(f"theta must be {obj.n_theta} finite values with the "
                          f"diagonal entries >= 0, got {theta}")
    return theta


class VectorObjective:
    """The exact profiled REML/ML criterion of a model with vector-valued terms.

    Parameters
    ----------
    terms : sequence of RandomEffectsTerm
        In lme4's order; the first term gives the block-diagonal leading block (for speed
        it should be the one with the most random effects).
    X : ndarray, shape (n_obs, p)
        Fixed-effects model matrix, full column rank.
    y : ndarray, shape (n_obs,)
    method : {"REML", "ML"}
    weights : array_like, shape (n_obs,), optional
        Prior weights (``R = s^2 W^{-1}``).

    Raises
    ------
    DenseTooLargeError
        When the dense Schur block of the terms after the first is too large; the message
        names ``solver="iterative"``.

    Notes
    -----
    ``theta`` is lme4's: each term's column-major lower triangle of ``T_k``, terms in
    order (:func:`lmmops.data.terms.theta_names`). Per evaluation the cost is the dense
    Cholesky of the ``m x m`` Schur block (``m`` the random effects after the first
    term) plus, for the gradient, triangular solves with ``m`` rows for each term's
    columns.
    """

    def __init__(self, terms, X, y, method="REML", weights=None, stats=None):
        setup_objective(self, terms, X, y, method, weights, stats)
        self.q1 = self.terms[0].n_random_effects
        self.d1 = self.terms[0].dim
        self.m = self.q - self.q1
        check_dense((self.m, self.m), "the exact solver's dense Schur block (all terms "
                    "but the first); use solver='iterative'", itemsize=8 * 3)
        if stats is None:  # sufficient statistics: one pass over the rows
            self.Z, self.C, self.ZtT, self.TT, self.ldW = vector_statistics(
                self.terms, self.X, self.y, self.weights)
        else:  # precomputed (e.g. combined from partitions); Z only with the rows
            if stats.C.shape != (self.q, self.q) or stats.p != self.p:
                raise LmmopsError(f"slope statistics of shape {stats.C.shape} with p = "
                                  f"{stats.p} do not match the terms' q = {self.q}, "
                                  f"p = {self.p}")
            self.Z = None if self.X is None else random_effects_matrix(self.terms)
            self.C, self.ZtT, self.TT, self.ldW = stats.C, stats.ZtT, stats.TT, \
                stats.log_weights
        self.n_evaluations = 0

    def with_terms(self, terms):
        """The same objective (rows, method, weights) on ``terms`` of the same shapes: the
        centred twin of :func:`lmmops.estimation.centring.fit_centred`."""
        return VectorObjective(terms, self.X, self.y, method=self.method,
                               weights=self.weights)

    # ---------------------------------------------------------------- pieces
    def _lambda(self, theta):
        """``Lambda = blockdiag_k(I (x) T_k)`` as CSR, on a pattern fixed at the first
        call (every lower-triangular entry of every ``T_k``, zeros included), so a new
        ``theta`` only refills the data (sp.kron and sp.block_diag took 3 ms a call on
        sleepstudy, a third of its fit)."""
        if getattr(self, "_lam_pattern", None) is None:
            indptr, indices, lens = [0], [], []
            for k, t in enumerate(self.terms):
                o, d = int(self.offsets[k]), t.dim
                a, b = lower_triangle(d)  # row-major lower triangle
                cols = (o + np.arange(t.n_levels)[:, None] * d + b[None, :]).ravel()
                indices.append(cols)
                lens.append(np.tile(np.bincount(a, minlength=d), t.n_levels))
            indptr = np.concatenate([[0], np.cumsum(np.concatenate(lens))])
            self._lam_pattern = (indptr.astype(np.int64),
                                 np.concatenate(indices).astype(np.int64))
        indptr, indices = self._lam_pattern
        data = np.concatenate([
            np.tile(t.relative_factor(theta[sl])[lower_triangle(t.dim)], t.n_levels)
            for t, sl in zip(self.terms, self.layout)])
        return sp.csr_matrix((data, indices, indptr), shape=(self.q, self.q))

    def _factor_pattern(self):
        """The fixed structure of the blocked factorisation, built at the first call:
        ``C`` on its block-closed pattern (on which ``A = Lambda' C Lambda + I`` is
        formed for every ``theta`` by one compiled pass), and the positions in ``A``'s
        values of the first term's diagonal blocks, of ``A_21`` and ``A_22`` (CSR, with
        ``A_22``'s diagonal) and of ``A_12 = A_21'`` (whose pattern ``K = A_11^{-1}
        A_12`` shares: a level's rows have the same columns)."""
        pat = getattr(self, "_fpat", None)
        if pat is not None:
            return pat
        par = self.m >= _PARALLEL_MIN_ROWS
        offs = np.asarray(self.offsets, dtype=np.int64)
        dims = np.array([t.dim for t in self.terms], dtype=np.int64)
        ks = kernels.get_slope_kernels(par)
        C = sp.csr_matrix(self.C).sorted_indices()
        ip, ix, dat = block_closed_arrays(C, self.terms, offs, dims, ks["merge_values"])
        q1, d1, m = self.q1, self.d1, self.m
        nl = q1 // d1
        rows = np.repeat(np.arange(self.q, dtype=np.int64), np.diff(ip))
        cols = ix.astype(np.int64)
        # the first term's diagonal blocks: a block-closed row has its d1 entries there
        inB = (rows < q1) & (cols // d1 == rows // d1) & (cols < q1)
        posB = np.flatnonzero(inB).reshape(nl, d1, d1)
        pat = {"par": par, "offs": offs, "dims": dims, "ks": ks, "indptr": ip,
               "indices": ix, "data": dat, "posB": posB,
               "chunks": kernels.block_chunks(offs, dims, 64 if par else 1, ip),
               "values": np.empty(dat.size)}
        if m:
            low = rows >= q1
            in21 = low & (cols < q1)
            in22 = low & (cols >= q1)
            p21, p22 = np.flatnonzero(in21), np.flatnonzero(in22)
            ptr21 = np.concatenate([[0], np.cumsum(np.bincount(rows[p21] - q1,
                                                               minlength=m))])
            ptr22 = np.concatenate([[0], np.cumsum(np.bincount(rows[p22] - q1,
                                                               minlength=m))])
            # A_12 = A_21' in CSR: its values are A_21's permuted (positions + 1, so
            # that no stored value is 0)
            T12 = sp.csr_matrix((np.arange(1.0, p21.size + 1), cols[p21], ptr21),
                                shape=(m, q1)).T.tocsr()
            T12.sort_indices()
            c22 = cols[p22] - q1
            # the diagonal entry of each row of A_22 (present: the pattern is closed)
            d22 = np.flatnonzero(rows[p22] - q1 == c22)
            pat.update(p21=p21, ptr21=ptr21.astype(np.int64),
                       ind21=cols[p21].astype(np.int32), p22=p22,
                       ptr22=ptr22.astype(np.int64), ind22=c22.astype(np.int32),
                       diag22=d22, p12=p21[T12.data.astype(np.int64) - 1],
                       ptr12=T12.indptr.astype(np.int64),
                       ind12=T12.indices.astype(np.int32))
        self._fpat = pat
        return pat

    def _factor(self, theta):
        """Blocked Cholesky of ``A = Lambda' C Lambda + I``; returns what the solves need."""
        Lam = self._lambda(theta)
        pat = self._factor_pattern()
        q1, d1 = self.q1, self.d1
        nl = q1 // d1
        Ts = [t.relative_factor(theta[sl]) for t, sl in zip(self.terms, self.layout)]
        dmax = int(pat["dims"].max())
        Tp = np.zeros((len(Ts), dmax, dmax))
        for k, T in enumerate(Ts):
            Tp[k, :T.shape[0], :T.shape[1]] = T
        Av = pat["values"]
        pat["ks"]["lam_sandwich"](pat["indptr"], pat["indices"], pat["data"], pat["offs"],
                                  pat["dims"], Tp, pat["chunks"], Av)
        # the leading block is block diagonal: one d1 x d1 block per level of term 1
        B = Av[pat["posB"]]
        try:
            L1 = np.linalg.cholesky(B)
        except np.linalg.LinAlgError:
            raise NumericalFailure(
                "a diagonal block of Lambda'Z'WZ Lambda + I is not numerically positive "
                f"definite at theta = {np.array2string(theta, precision=4)}") from None
        logdet = 2.0 * float(np.sum(np.log(np.diagonal(L1, axis1=1, axis2=2))))
        B1inv = np.linalg.inv(B)
        # block-diagonal CSR directly: row a of level j holds B_j^{-1}[a, :]
        cols = np.repeat((np.arange(nl)[:, None] * d1 + np.arange(d1)), d1, axis=0)
        Binv = sp.csr_matrix((B1inv.ravel(), cols.ravel(), np.arange(q1 + 1) * d1),
                             shape=(q1, q1))
        fac = {"Lam": Lam, "Binv": Binv, "B1inv": B1inv}
        if self.m:
            m = self.m
            A21 = sp.csr_matrix((Av[pat["p21"]], pat["ind21"], pat["ptr21"]),
                                shape=(m, q1))
            kdata = np.empty(pat["p12"].size)
            kernels.get_block_rows_kernel(pat["par"])(pat["ptr12"], Av[pat["p12"]], B1inv,
                                                      d1, kdata)
            K = sp.csr_matrix((kdata, pat["ind12"], pat["ptr12"]), shape=(q1, m))
            m22 = Av[pat["p22"]]
            m22[pat["diag22"]] -= 1.0  # M22 = A22 - I: the kernel adds I
            M22 = sp.csr_matrix((m22, pat["ind22"], pat["ptr22"]), shape=(m, m))
            # S = M22 + I - A21 K, assembled densely by a compiled loop over its rows
            # (row-major, so a row is one thread's; its transpose is the same symmetric
            # matrix in LAPACK's column-major order, factored in place)
            S = np.empty((m, m))
            kernels.get_schur_kernels(pat["par"])[0](
                M22.indptr, M22.indices, M22.data, A21.indptr, A21.indices, A21.data,
                K.indptr, K.indices, K.data, S)
            Ls, info = sla.lapack.dpotrf(S.T, lower=1, clean=0, overwrite_a=1)
            if info != 0:
                raise NumericalFailure("the Schur block of Lambda'Z'WZ Lambda + I is not "
                                       f"positive definite (LAPACK info {info})")
            logdet += 2.0 * float(np.sum(np.log(np.diag(Ls))))
            fac.update(A21=A21, K=K, Ls=Ls)
        fac["logdet"] = logdet
        return fac

    def _schur_inverse_lower(self, fac):
        """``S^{-1}`` from the Schur block's factor (LAPACK ``potri``), its lower
        triangle only (column-major), cached in ``fac``."""
        if "A22L" not in fac:
            fac["A22L"] = chol_inverse(fac["Ls"], lower=True, full=False)
        return fac["A22L"]

    def _schur_inverse(self, fac):
        """``S^{-1}`` from the Schur block's factor, both triangles, cached in ``fac``."""
        if "A22" not in fac:
            # the cached lower triangle, mirrored in place
            fac["A22"] = mirror_triangle(self._schur_inverse_lower(fac), lower=True)
        return fac["A22"]

    def _selected_inverse(self, fac):
        """Per term, the ``d_k x d_k`` diagonal blocks of ``A^{-1}``, one per level
        (``(n_k, d_k, d_k)``), cached in ``fac``.

        The first term's are ``B_j^{-1} + K_j S^{-1} K_j'`` (``K_j`` the level's rows of
        ``K = A_11^{-1} A_12``, sparse: a level meets few levels of the other terms), summed
        over the pairs of nonzeros of ``K_j`` by a compiled loop; the others' are the
        diagonal blocks of ``S^{-1}``. The cost is one ``potri`` (about twice the Schur
        block's Cholesky) plus ``sum_j nnz(K_j)^2 / 2``; both read the lower triangle of
        ``S^{-1}`` only (no mirroring).
        """
        if "blocks" not in fac:
            D11 = fac["B1inv"].copy()
            blocks = [D11]
            if self.m:
                # potri's column-major lower triangle, viewed as a row-major upper one
                U = self._schur_inverse_lower(fac).T
                K = fac["K"].tocsr()
                K.sort_indices()
                kernels.get_schur_kernels(self.m >= _PARALLEL_MIN_ROWS)[1](
                    K.indptr, K.indices, K.data, U, self.d1, D11)
                for k in range(1, len(self.terms)):
                    t = self.terms[k]
                    lo = self.offsets[k] - self.q1
                    ix = lo + np.arange(t.n_levels)[:, None] * t.dim + np.arange(t.dim)[None]
                    # ix increases along a level, so (ix_a, ix_b) with a <= b is in U
                    a, b = np.triu_indices(t.dim)
                    blk = np.empty((t.n_levels, t.dim, t.dim))
                    vals = U[ix[:, a], ix[:, b]]
                    blk[:, a, b] = vals
                    blk[:, b, a] = vals
                    blocks.append(blk)
            fac["blocks"] = blocks
        return fac["blocks"]

    def _term_inverse_sum(self, fac, k):
        """``S_k``: the sum over the levels of term ``k`` of its diagonal blocks of
        ``A^{-1}``."""
        return self._selected_inverse(fac)[k].sum(axis=0)

    def _solve(self, fac, b):
        """``A^{-1} b`` for a dense ``b`` (q x k)."""
        q1 = self.q1
        b1 = fac["Binv"] @ b[:q1]
        if not self.m:
            return b1
        rhs = b[q1:] - fac["A21"] @ b1
        x2 = chol_solve(fac["Ls"], rhs, lower=True)
        x1 = b1 - fac["K"] @ x2
        return np.vstack([x1, x2])

    # ---------------------------------------------------------------- evaluation
    def evaluate(self, theta, gradient=True, probes=0):
        """The criterion (and its analytic gradient) at ``theta``.

        Parameters
        ----------
        theta : array_like, shape (n_theta,)
            lme4's ``theta``: diagonal entries >= 0, the others free.
        gradient : bool
        probes : int, optional
            0 (default): the gradient is exact. A positive number: its traces (the sums
            of the diagonal blocks of ``A^{-1}``) are Hutchinson estimates with that many
            Rademacher probes at a fixed seed, solved with the factor instead of
            inverting the Schur block (for the early steps of a fit; the criterion is
            exact either way; ``Evaluation.gradient_probes`` records it).

        Returns
        -------
        Evaluation
            ``v`` holds the spherical modes ``u`` per term (level-major); the random
            effects are ``b_k = (I (x) T_k) u_k`` on the scale of ``y``.

        Raises
        ------
        LmmopsError
            For a ``theta`` of the wrong size, non-finite, or with a negative diagonal.
        RankDeficientError
            If ``X'V^{-1}X`` is numerically singular.
        """
        theta = check_theta(self, theta)
        n = self.n
        key = theta.tobytes()
        last = getattr(self, "_last_pieces", None)
        if gradient and last is not None and last[0] == key:
            # the gradient at the point just evaluated for its criterion (an accepted
            # line-search trial): the same factor, not a new evaluation
            fac, LZT, sol, g = last[1]
        else:
            self.n_evaluations += 1
            fac = self._factor(theta)
            LZT = np.asarray(fac["Lam"].T @ self.ZtT)  # Lambda' Z'W [X y]
            sol = self._solve(fac, LZT)  # A^{-1} Lambda' Z'W [X y]
            g = profiled_gls(self.TT, LZT, sol, fac["logdet"], n, self.method, self.ldW)
        # a criterion-only evaluation keeps its pieces for a gradient asked next
        self._last_pieces = None if gradient else (key, (fac, LZT, sol, g))
        beta, u, pwrss, Cx_inv = g["beta"], g["u"], g["pwrss"], g["Cx_inv"]
        # kept for the quantities at this theta (average information, leverages, PEV)
        self._state_key = theta.tobytes()
        self._state_val = {"fac": fac, "solX": sol[:, :self.p], "Cx_inv": Cx_inv,
                           "inv": None}
        v = [u[self.offsets[k]:self.offsets[k + 1]].copy() for k in range(len(self.terms))]
        grad = None
        probes = int(probes) if gradient and self.m else 0
        if gradient:
            grad = self._gradient(theta, fac, LZT, sol, beta, u, Cx_inv, pwrss, g["dof"],
                                  probes)
        return Evaluation(theta=theta, objective=g["objective"], gradient=grad,
                          sigma2=g["sigma2"], beta=beta, beta_cov=g["sigma2"] * Cx_inv, v=v,
                          logdet_L=fac["logdet"], logdet_RX=g["logdet_RX"], pwrss=pwrss,
                          gradient_probes=probes)

    def evaluate_at_sigma(self, theta, s2):
        """The criterion not profiled in the residual variance, at ``theta`` and
        ``s2``, with its analytic derivatives (for profile intervals).

        ``F = log|A| - sum(log w) + dof log(2 pi s2) + r^2 / s2`` (``+ log|R_X|^2`` for
        REML; :func:`lmmops.estimation.criterion.criterion_at_sigma`); its gradient in
        ``theta`` is the profiled criterion's with the weight ``dof / r^2`` of
        ``dr^2/dtheta`` replaced by ``1 / s2``.

        Parameters
        ----------
        theta : array_like, shape (n_theta,)
        s2 : float
            Residual variance (> 0), on the objective's scale.

        Returns
        -------
        (float, ndarray, float)
            ``F``, ``dF/dtheta`` and ``dF/ds2``.
        """
        theta = check_theta(self, theta)
        s2 = float(s2)
        if not (np.isfinite(s2) and s2 > 0):
            raise LmmopsError(f"the residual variance must be positive, got {s2!r}")
        self.n_evaluations += 1
        fac = self._factor(theta)
        LZT = np.asarray(fac["Lam"].T @ self.ZtT)
        sol = self._solve(fac, LZT)
        g = profiled_gls(self.TT, LZT, sol, fac["logdet"], self.n, self.method, self.ldW)
        pwrss = g["pwrss"]
        F = criterion_at_sigma(fac["logdet"], g["logdet_RX"], pwrss, self.n, self.p,
                               self.method, s2, self.ldW)
        grad = self._gradient(theta, fac, LZT, sol, g["beta"], g["u"], g["Cx_inv"], pwrss,
                              pwrss / s2)
        return float(F), grad, float(g["dof"] / s2 - pwrss / s2**2)

    @property
    def early_gradient_probes(self):
        """int: probes for the early AI-Newton steps' estimated traces, or 0 when the
        exact traces are the cheaper (small Schur blocks).

        The exact traces need the inverse of the ``m x m`` Schur block (``potri``,
        ``2 m^3 / 3`` flops after the Cholesky's ``m^3 / 3``) and the first term's
        blocks ``K_j S^{-1} K_j'``, one random read of ``S^{-1}`` per pair of columns of a
        level; the estimate solves ``2 P`` columns with the factor (``4 P m^2`` flops)
        plus two sparse products with ``K`` (``4 P nnz(K)``). In flop units a sparse
        multiply-add costs about 3 dense flops and a random read about 300 (measured,
        one thread: potri at 27 GFlop/s, ``K'Z`` at 4.4 GMAC/s, the pair loop at 12 ns
        a read). Estimates are used when they cost under a third of the exact traces:
        InstEval's slope model (``m = 2256``) 23 against 120 ms, a 4e5-row users x items
        design with two slope terms (``m = 1600``, ``nnz(K) = 1.6e6``) 70 against 297 ms
        (measured at load 4-5).
        """
        if not self.m:
            return 0
        P = EARLY_GRADIENT_PROBES
        cost = getattr(self, "_trace_costs", None)
        if cost is None:  # from the pattern of C_12, which K's shares
            C12 = sp.csr_matrix(self.C[:self.q1, self.q1:])
            n_j = np.diff(C12.indptr)[::self.d1].astype(np.float64)  # a level's columns
            d1 = self.d1
            per_pair = 1.0 if d1 <= 2 else d1 * (d1 + 1) / 2.0
            cost = self._trace_costs = (float(C12.nnz),
                                        float(np.sum(n_j * n_j)) / 2.0 * per_pair)
        nnz_k, pair_reads = cost
        exact = 2.0 * self.m ** 3 / 3.0 + 300.0 * pair_reads
        estimate = 4.0 * P * self.m ** 2 + 3.0 * 4.0 * P * nnz_k
        return P if estimate < exact / 3.0 else 0

    def _probes(self, rows, P):
        """A fixed ``rows x P`` Rademacher probe block (cached)."""
        Z = getattr(self, "_probe_block", None)
        if Z is None or Z.shape != (rows, P):
            rng = np.random.default_rng(20261204)
            Z = rng.integers(0, 2, size=(rows, P)).astype(np.float64) * 2.0 - 1.0
            self._probe_block = Z
        return Z

    def _term_inverse_sums_estimate(self, fac, P):
        """Hutchinson estimates of every term's ``S_k`` (sum over its levels of the
        diagonal blocks of ``A^{-1}``) from ``P`` probes, with the factor's solves.

        Term 1's blocks are ``B_j^{-1} + K_j S^{-1} K_j'``: the first part is exact,
        the second ``E[sum_j (K y)_j z_j']`` with ``y = S^{-1} K' z`` (``z`` on term 1's
        rows only, so the other terms' probes add no variance to it); the other terms'
        are ``E[sum_j (S^{-1} w)_j w_j']`` with ``w`` on the Schur block's rows.
        """
        q1, m, d1 = self.q1, self.m, self.d1
        Z = self._probes(q1 + m, P)
        Z1, W = Z[:q1], Z[q1:]
        K = fac["K"]
        rhs = np.hstack([K.T @ Z1, W])
        Y = chol_solve(fac["Ls"], rhs, lower=True)
        KY = K @ Y[:, :P]
        n1 = q1 // d1
        est = [fac["B1inv"].sum(axis=0)
               + np.einsum("jap,jbp->ab", KY.reshape(n1, d1, P), Z1.reshape(n1, d1, P)) / P]
        for k in range(1, len(self.terms)):
            t = self.terms[k]
            lo, hi = self.offsets[k] - q1, self.offsets[k + 1] - q1
            Yk = Y[lo:hi, P:].reshape(t.n_levels, t.dim, P)
            Wk = W[lo:hi].reshape(t.n_levels, t.dim, P)
            est.append(np.einsum("jap,jbp->ab", Yk, Wk) / P)
        return [0.5 * (e + e.T) for e in est]

    def _gradient(self, theta, fac, LZT, sol, beta, u, Cx_inv, pwrss, dof, probes=0):
        p, q1 = self.p, self.q1
        estimates = None
        Lam, C = fac["Lam"], self.C
        ZtX = self.ZtT[:, :p]
        # Z'V0^{-1}X and a = Z'P0 y = Z'W r
        Wz = ZtX - C @ (Lam @ sol[:, :p])
        a = self.ZtT[:, p] - ZtX @ beta - C @ (Lam @ u)
        LC = None  # Lambda' C, for terms near the boundary
        grad = np.empty(self.n_theta)
        for k, (t, sl) in enumerate(zip(self.terms, self.layout)):
            lo, hi, d = self.offsets[k], self.offsets[k + 1], t.dim
            T = t.relative_factor(theta[sl])
            Wk = Wz[lo:hi].reshape(t.n_levels, d, p)
            ak = a[lo:hi].reshape(t.n_levels, d)
            H = -(dof / pwrss) * (ak.T @ ak)
            if self.method == "REML":
                H -= np.einsum("jap,pq,jbq->ab", Wk, Cx_inv, Wk)
            if np.min(np.abs(np.diag(T))) >= _SELECTED_INVERSE_MIN_DIAG:
                # T_k invertible: the blocks of Z'V0^{-1}Z are T^{-T}(I - A^{-1}_jj)T^{-1},
                # so T'(sum of them) = (n_k I - S_k) T^{-1}, from the selected inverse
                Tinv = sla.solve_triangular(T, np.eye(d), lower=True, check_finite=False)
                if probes:
                    if estimates is None:
                        estimates = self._term_inverse_sums_estimate(fac, probes)
                    S = estimates[k]
                else:
                    S = self._term_inverse_sum(fac, k)
                G = 2.0 * ((t.n_levels * np.eye(d) - S) @ Tinv + T.T @ H)
            else:
                # near the boundary: the general form, sum of the diagonal blocks of
                # C - Y'A^{-1}Y with Y = Lambda'C[:, term]; no inverse of T_k
                if LC is None:
                    LC = (Lam.T @ C).tocsc()
                Y = LC[:, lo:hi]
                H += _block_sum(C[lo:hi, lo:hi], d)
                Y1 = Y[:q1]
                H -= _block_sum_product(Y1, fac["Binv"] @ Y1, d)
                if self.m:
                    Z2 = Y[q1:].toarray() - fac["K"].T @ Y1
                    F = sla.solve_triangular(fac["Ls"], Z2, lower=True, check_finite=False)
                    F = F.reshape(self.m, t.n_levels, d)
                    H -= np.einsum("rja,rjb->ab", F, F)
                G = 2.0 * T.T @ H
            rows, cols = lower_triangle(d, "F")  # column-major lower triangle
            grad[sl] = G[cols, rows]
        return grad

    # ---------------------------------------------------------------- at the optimum
    def _state(self, ev):
        """The factor, the solutions ``A^{-1} Lambda'Z'W[X y]`` and ``(X'V0^{-1}X)^{-1}``
        at ``ev`` (cached for the last ``theta``)."""
        key = ev.theta.tobytes()
        if getattr(self, "_state_key", None) != key:
            fac = self._factor(ev.theta)
            LZT = np.asarray(fac["Lam"].T @ self.ZtT)
            sol = self._solve(fac, LZT)
            Cx = self.TT[:self.p, :self.p] - LZT[:, :self.p].T @ sol[:, :self.p]
            self._state_val = {"fac": fac, "solX": sol[:, :self.p],
                               "Cx_inv": np.linalg.inv(Cx), "inv": None}
            self._state_key = key
        return self._state_val

    def _inverse_parts(self, ev):
        """The pieces of ``A^{-1}`` the leverages and prediction variances need: the first
        term's ``d_1 x d_1`` diagonal blocks, ``A^{-1}_{12}`` (``q_1 x m``) and
        ``A^{-1}_{22} = S^{-1}`` (``m x m``), from the blocked factor (guarded dense)."""
        st = self._state(ev)
        if st["inv"] is None:
            fac = st["fac"]
            D11 = self._selected_inverse(fac)[0]
            A12 = A22 = None
            if self.m:
                check_dense((self.q1 + self.m, self.m), "the exact solver's inverse blocks "
                            "A^{-1}_12 and S^{-1} for leverages and prediction variances; "
                            "use solver='iterative'")
                A22 = self._schur_inverse(fac)
                A12 = -np.asarray(fac["K"] @ A22)
            st["inv"] = (D11, A12, A22)
        return st["inv"]

    def _spherical_rows(self, ev, codes, values):
        """Per row, the nonzeros of ``Lambda' z_i`` (:func:`spherical_rows`)."""
        return spherical_rows(self, ev.theta, codes, values)

    def quadratic_rows(self, ev, codes, values, X=None):
        """``g_i' Omega^{-1} g_i`` for rows ``g_i = [Lambda' z_i; x_i]`` (spherical scale;
        ``X=None``: the random part ``z_i' Lambda A^{-1} Lambda' z_i`` only).

        Parameters
        ----------
        ev : Evaluation
        codes : sequence of ndarray
            Per term, the rows' level codes (-1: a level the fit has not seen).
        values : sequence of ndarray or None
            Per term, the rows' values of its columns (None for an intercept term).
        X : ndarray, optional
            The rows' fixed-effects rows (the objective's scale).

        Returns
        -------
        ndarray
        """
        D11, A12, A22 = self._inverse_parts(ev)
        parts = self._spherical_rows(ev, codes, values)
        (i1, z1), rest = parts[0], parts[1:]
        d1 = self.d1
        j1 = i1[:, 0] // d1
        h = np.einsum("na,nab,nb->n", z1, D11[j1], z1)
        if rest:
            i2 = np.concatenate([i - self.q1 for i, _ in rest], axis=1)
            z2 = np.concatenate([z for _, z in rest], axis=1)
            h += 2.0 * np.einsum("na,nab,nb->n", z1, A12[i1[:, :, None], i2[:, None, :]], z2)
            h += np.einsum("na,nab,nb->n", z2, A22[i2[:, :, None], i2[:, None, :]], z2)
        if X is not None:
            st = self._state(ev)
            idx = np.concatenate([i for i, _ in parts], axis=1)
            zz = np.concatenate([z for _, z in parts], axis=1)
            r = np.asarray(X, float) - np.einsum("nap,na->np", st["solX"][idx], zz)
            h += np.einsum("np,pq,nq->n", r, st["Cx_inv"], r)
        return h

    def diag_P(self, ev, z_only=False):
        """``diag(P)`` (``diag(V^{-1})`` with ``z_only``) per observation, exactly, on the
        objective's scale: ``P_ii = (w_i - w_i^2 h_i) / s^2``."""
        codes = [t.codes for t in self.terms]
        values = [t.values for t in self.terms]
        h = self.quadratic_rows(ev, codes, values, None if z_only else self.X)
        w = np.ones(self.n) if self.weights is None else self.weights
        return (w - w * w * h) / ev.sigma2

    def level_blocks(self, ev, z_only=False):
        """Per term, the ``d_k x d_k`` diagonal blocks of the inverse of the spherical
        mixed-model matrix, one per level (``(n_levels, d, d)``): ``A^{-1}`` given
        ``beta`` (``z_only``), else with the uncertainty of ``beta`` added. Times
        ``s^2`` and conjugated by ``T_k`` they are the BLUPs' prediction error
        covariances (:meth:`pev_blocks`)."""
        st = self._state(ev)
        out = [b.copy() for b in self._selected_inverse(st["fac"])]
        if not z_only:
            for k, t in enumerate(self.terms):
                F = st["solX"][self.offsets[k]:self.offsets[k + 1]].reshape(
                    t.n_levels, t.dim, self.p)
                out[k] = out[k] + np.einsum("jap,pq,jbq->jab", F, st["Cx_inv"], F)
        return out

    def pev_blocks(self, ev, z_only=False):
        """Per term, the prediction error covariance of each level's BLUPs,
        ``s^2 T_k B_j T_k'`` (``(n_levels, d, d)``, the objective's scale)."""
        out = []
        for t, sl, B in zip(self.terms, self.layout, self.level_blocks(ev, z_only)):
            T = t.relative_factor(ev.theta[sl])
            out.append(ev.sigma2 * np.einsum("ab,jbc,dc->jad", T, B, T))
        return out

    def average_information(self, ev):
        """The average-information approximation of the Hessian of the profiled criterion
        in ``theta`` (``n_theta x n_theta``).

        With ``phi = (theta, s^2)`` and ``V_a = dV/dphi_a``, the average information is
        ``AI_ab = y'P V_a P V_b P y / 2``; twice it approximates the Hessian of
        ``-2 l(theta, s^2)``, and ``s^2`` is profiled out by a Schur complement. The
        vectors ``V_a P y`` are ``Z (Lambda_a Lambda' + Lambda Lambda_a') Z'Py`` (``Z'Py =
        Z'W r / s^2``) for ``theta`` and ``(y - X beta) / s^2`` for ``s^2``; ``P`` is
        applied by one blocked solve with ``n_theta + 1`` right-hand sides. The REML form
        (``P``) serves both methods: it only steers the optimiser; the optimum is verified
        on a finite-difference Hessian.
        """
        if self.Z is None or self.C.nnz <= self.Z.nnz:
            # from the statistics: the same numbers (to 2e-15 on a 4e5-row users x
            # items design) at a third of the cost of the rows' products there
            return self._average_information_span(ev)
        return self._average_information_rows(ev)

    def _average_information_rows(self, ev):
        """:meth:`average_information` from the rows (``Z``, ``X``, ``y``)."""
        st = self._state(ev)
        fac, s2 = st["fac"], ev.sigma2
        Lam = fac["Lam"]
        u = np.concatenate(ev.v)
        r = self.y - self.X @ ev.beta - self.Z @ (Lam @ u)  # conditional residual
        w = np.ones(self.n) if self.weights is None else self.weights
        a = self.Z.T @ (w * r)  # Z'W r = s^2 Z'P y
        cols = []
        for k, (t, sl) in enumerate(zip(self.terms, self.layout)):
            T = t.relative_factor(ev.theta[sl])
            ak = a[self.offsets[k]:self.offsets[k + 1]].reshape(t.n_levels, t.dim)
            rows, cs = lower_triangle(t.dim, "F")
            for i, j in zip(rows, cs):
                E = np.zeros((t.dim, t.dim))
                E[i, j] = 1.0
                Bk = ak @ (E @ T.T + T @ E.T).T  # per level (E T' + T E') a_j
                full = np.zeros(self.q)
                full[self.offsets[k]:self.offsets[k + 1]] = Bk.ravel()
                cols.append(self.Z @ full)
        cols.append(r + self.Z @ (Lam @ u))  # y - X beta
        Wm = np.column_stack(cols) / 1.0
        Wm[:, -1] /= s2
        # P Wm on the objective's scale: V^{-1} = V0^{-1} / s^2, V0^{-1} B = W B -
        # W Z Lambda A^{-1} Lambda' Z'W B, then the projection off X
        WB = w[:, None] * Wm
        LZ = np.asarray(Lam.T @ (self.Z.T @ WB))
        Vi = WB - w[:, None] * (self.Z @ (Lam @ self._solve(fac, LZ)))
        XtVi = self.X.T @ Vi
        PW = (Vi - (w[:, None] * (self.X - self.Z @ (Lam @ st["solX"])))
              @ (st["Cx_inv"] @ XtVi)) / s2
        AI = 0.5 * (Wm.T @ PW)
        AI = 0.5 * (AI + AI.T)
        tt = slice(0, self.n_theta)
        ss = AI[-1, -1]
        return 2.0 * (AI[tt, tt] - np.outer(AI[tt, -1], AI[-1, tt]) / ss)

    def _average_information_span(self, ev):
        """:meth:`average_information` from the statistics alone
        (:func:`span_average_information` with this solver's sparse ``Lambda`` and
        blocked Cholesky)."""
        st = self._state(ev)
        fac = st["fac"]
        Lam = fac["Lam"]
        return span_average_information(
            self, ev, lambda B: np.asarray(self.C @ B), lambda B: Lam @ B,
            lambda B: np.asarray(Lam.T @ B), lambda B: self._solve(fac, B), st["solX"],
            st["Cx_inv"])

    def theta_covariance(self, ev):
        """Wald covariance of ``theta``: twice the inverse Hessian of the profiled
        criterion (finite differences of the analytic gradient, those of the fit's
        Newton check when they are at this ``theta``) on the free parameters; rows and
        columns of parameters on the boundary are NaN. After a fit on centred columns
        (``ev.centred``), the twin's mapped
        (:class:`lmmops.estimation.centring.CentredFit`)."""
        if getattr(ev, "centred", None) is not None:
            return ev.centred.theta_covariance()
        free = ~((ev.theta <= self.lower) & (ev.gradient > 0)) if ev.gradient is not None \
            else np.ones(self.n_theta, bool)
        free &= ~(ev.theta <= self.lower)  # a zero variance has no Wald interval
        idx = np.flatnonzero(free)
        cov = np.full((self.n_theta, self.n_theta), np.nan)
        if idx.size:
            H = self._profiled_hessian(ev, idx)[0]
            cov[np.ix_(idx, idx)] = 2.0 * np.linalg.pinv(H)
        return cov

    def _profiled_hessian(self, ev, idx):
        """``(H, dr^2/dtheta)`` of the profiled criterion on the parameters ``idx`` at
        ``ev``: the fit's Newton-check differences when they were taken at (within 1e-4
        of) this ``theta`` on these parameters or more (a column of differences does not
        depend on the others, so a subset is their sub-block), else new forward
        differences (central when ``ev`` has no gradient; ``dr^2/dtheta`` is then
        None)."""
        last = getattr(self, "_fd_last", None)
        if (last is not None and np.all(np.isin(idx, last[1]))
                and np.all(np.abs(last[0] - ev.theta)
                           <= 1e-4 * np.maximum(1.0, np.abs(ev.theta)))):
            pos = np.searchsorted(last[1], idx)
            return (last[2][np.ix_(pos, pos)],
                    None if last[3] is None else last[3][pos])
        _fd_hessian(self, ev.theta, idx, self.lower, g0=ev.gradient, pw0=ev.pwrss)
        return self._fd_last[2], self._fd_last[3]

    def variance_covariance(self, ev):
        """Wald covariance of the variance components on the objective's scale, in the
        order of :attr:`~lmmops.result.LMMResult.varcorr` (per term the variances of its
        columns, then their covariances, then the residual variance ``s^2``).

        Twice the inverse Hessian of the criterion not profiled in ``s^2``, in
        ``psi = (theta, s^2)``, mapped by the delta method to ``s^2 T_k T_k'`` and
        ``s^2``. The ``theta`` block of that Hessian is the profiled criterion's
        (finite differences of the analytic gradient, as :meth:`theta_covariance`) plus
        ``h h' / H_ss`` with ``h = -dr^2/dtheta / s^4`` (the same differences' penalised
        residual sums) and ``H_ss = dof / s^4``, so the ``theta`` block of the result is
        exactly :meth:`theta_covariance`'s. Entries of a term with a parameter on the
        boundary are NaN. After a fit on centred columns (``ev.centred``), the twin's
        mapped exactly (:class:`lmmops.estimation.centring.CentredFit`).
        """
        if getattr(ev, "centred", None) is not None:
            return ev.centred.variance_covariance()
        free = ~(ev.theta <= self.lower)
        idx = np.flatnonzero(free)
        s2 = ev.sigma2
        dof = self.n - self.p if self.method == "REML" else self.n
        # profiled Hessian and dr^2/dtheta from the same forward differences: those of
        # the fit's Newton check when it differenced at this theta, else new ones
        Hp, dpw = VectorObjective._profiled_hessian(self, ev, idx)  # self may be a view
        if dpw is None:  # central differences (no gradient at ev): forward ones
            _fd_hessian(self, ev.theta, idx, self.lower,
                        g0=self.evaluate(ev.theta).gradient, pw0=ev.pwrss)
            Hp, dpw = self._fd_last[2], self._fd_last[3]
        h = -dpw / s2**2
        Hss = dof / s2**2
        H = np.empty((idx.size + 1, idx.size + 1))
        H[:-1, :-1] = Hp + np.outer(h, h) / Hss
        H[:-1, -1] = H[-1, :-1] = h
        H[-1, -1] = Hss
        cov_psi = 2.0 * np.linalg.pinv(H)

        def phi(theta_free, sigma2):
            th = ev.theta.copy()
            th[idx] = theta_free
            out = [covariance_entries(sigma2 * (T @ T.T))
                   for T in (t.relative_factor(th[sl])
                             for t, sl in zip(self.terms, self.layout))]
            return np.concatenate([*out, [sigma2]])

        psi = np.append(ev.theta[idx], s2)
        J = np.empty((phi(psi[:-1], s2).size, psi.size))
        for c in range(psi.size):
            step = 1e-6 * max(1.0, abs(psi[c]))
            up, dn = psi.copy(), psi.copy()
            up[c] += step
            dn[c] -= step
            J[:, c] = (phi(up[:-1], up[-1]) - phi(dn[:-1], dn[-1])) / (2.0 * step)
        cov = J @ cov_psi @ J.T
        pos = 0
        for t, sl in zip(self.terms, self.layout):
            n_phi = t.dim * (t.dim + 1) // 2
            if not np.all(free[sl]):
                cov[pos:pos + n_phi, :] = np.nan
                cov[:, pos:pos + n_phi] = np.nan
            pos += n_phi
        return cov

    def residuals(self, ev):
        """Conditional residuals ``y - X beta - Z Lambda u`` (on the objective's scale)."""
        if self.Z is None:
            raise LmmopsError("the conditional residuals are row-level: this objective "
                              "was built from level-space statistics alone")
        Lam = self._lambda(ev.theta)
        u = np.concatenate(ev.v)
        return self.y - self.X @ ev.beta - self.Z @ (Lam @ u)

    def __call__(self, theta):
        return self.evaluate(theta, gradient=False).objective


def span_average_information(obj, ev, cmul, lam, lam_t, solve, sol_x, cx_inv):
    """The average information of :meth:`VectorObjective.average_information` from the
    level-space statistics alone, for any solver of ``A = Lambda' C Lambda + I``.

    The working variates are ``Wm = Z F + [X y] H`` (``F``: per entry ``(a, b)`` of a
    ``T_k`` the level blocks ``(E_ab T_k' + T_k E_ab') a_j`` of ``a = Z'W r``, ``H`` the
    ``s^2`` column ``(y - X beta) / s^2``), so every product with them is a level-space
    one: ``Z'W Wm = C F + Z'W[X y] H``, ``Wm'W Wm`` and ``X'W Wm`` from those and
    ``[X y]'W[X y]``, and one solve with ``n_theta + 1`` right-hand sides.

    Parameters
    ----------
    obj : object
        With ``terms``, ``layout``, ``offsets``, ``q``, ``p``, ``n_theta``, ``ZtT``
        (``Z'W[X y]``) and ``TT`` (``[X y]'W[X y]``).
    ev : Evaluation
        At ``theta``, with ``beta``, ``sigma2`` and the spherical modes ``v``.
    cmul, lam, lam_t, solve : callable
        ``B -> C B``, ``Lambda B``, ``Lambda' B`` and ``A^{-1} B`` for a ``(q, m)`` block.
    sol_x : ndarray, shape (q, p)
        ``A^{-1} Lambda' Z'W X``.
    cx_inv : ndarray, shape (p, p)
        ``(X'V0^{-1}X)^{-1}``.

    Returns
    -------
    ndarray, shape (n_theta, n_theta)
        Twice the average information in ``theta`` with ``s^2`` profiled out (a Schur
        complement).
    """
    s2, p = ev.sigma2, obj.p
    u = np.concatenate(ev.v)
    ZtT, TT = obj.ZtT, obj.TT
    ZtX = ZtT[:, :p]
    a = ZtT[:, p] - ZtX @ ev.beta - cmul(lam(u[:, None]))[:, 0]  # Z'W r
    m = obj.n_theta + 1
    F = np.zeros((obj.q, m))
    H = np.zeros((p + 1, m))
    c = 0
    for k, (t, sl) in enumerate(zip(obj.terms, obj.layout)):
        T = t.relative_factor(ev.theta[sl])
        lo, hi = obj.offsets[k], obj.offsets[k + 1]
        ak = a[lo:hi].reshape(t.n_levels, t.dim)
        rows, cs = lower_triangle(t.dim, "F")
        for i, j in zip(rows, cs):
            E = np.zeros((t.dim, t.dim))
            E[i, j] = 1.0
            F[lo:hi, c] = (ak @ (E @ T.T + T @ E.T).T).ravel()
            c += 1
    H[:p, -1] = -ev.beta / s2  # (y - X beta) / s^2
    H[p, -1] = 1.0 / s2
    ZtW = cmul(F) + ZtT @ H  # Z'W Wm
    TtW = ZtT.T @ F + TT @ H  # [X y]'W Wm
    WtW = F.T @ ZtW + H.T @ TtW  # Wm'W Wm
    XtW = TtW[:p]
    LZ = lam_t(ZtW)
    sol = solve(LZ)
    XtVi = XtW - lam_t(ZtX).T @ sol  # X'V0^{-1} Wm
    WVi = WtW - LZ.T @ sol  # Wm'V0^{-1} Wm
    WWX = XtW.T - ZtW.T @ lam(sol_x)  # Wm'W(X - Z Lambda solX)
    AI = 0.5 * (WVi - WWX @ (cx_inv @ XtVi)) / s2
    AI = 0.5 * (AI + AI.T)
    tt = slice(0, obj.n_theta)
    ss = AI[-1, -1]
    return 2.0 * (AI[tt, tt] - np.outer(AI[tt, -1], AI[-1, tt]) / ss)


def _block_sum(A, d):
    """Sum over levels of the ``d x d`` diagonal blocks of a sparse ``A`` (q d x q d)."""
    out = np.empty((d, d))
    r = np.arange(A.shape[0])
    for a in range(d):
        for b in range(d):
            out[a, b] = np.asarray(A[r[a::d], r[b::d]]).sum()
    return out


def _block_sum_product(Y, BY, d):
    """Sum over levels ``j`` of ``Y[:, j]' BY[:, j]`` (``d x d`` blocks of columns)."""
    Y, BY = sp.csc_matrix(Y), sp.csc_matrix(BY)
    c = np.arange(Y.shape[1])
    return np.array([[Y[:, c[a::d]].multiply(BY[:, c[b::d]]).sum() for b in range(d)]
                     for a in range(d)])


def spherical_rows(obj, theta, codes, values):
    """Per row, the nonzeros of ``Lambda' z_i`` of a slope objective ``obj`` (its
    ``terms``, ``layout`` and ``offsets``) at ``theta``: per term their level-space
    indices and values, ``(n, d_k)`` each (a level the fit has not seen: values 0,
    indices inside the term's block). For the quadratic forms of new rows
    (``quadratic_rows`` of both slope objectives)."""
    parts = []
    for k, (t, sl) in enumerate(zip(obj.terms, obj.layout)):
        T = t.relative_factor(theta[sl])
        c = np.asarray(codes[k], dtype=np.int64)
        v = np.ones((c.size, 1)) if values[k] is None else np.asarray(values[k], float)
        zt = v @ T  # row i: (T_k' v_i)'
        zt[c < 0] = 0.0  # a level not in the fit: no random effect of this term
        # an unseen level points at the term's first slots (its values are 0), so the
        # index stays inside the term's block (0 would be outside a later term's)
        idx = (obj.offsets[k] + np.maximum(c, 0)[:, None] * t.dim
               + np.arange(t.dim)[None])
        parts.append((idx, zt))
    return parts


def start_theta(terms):
    """lme4's start: ``T_k = I`` for every term."""
    return np.array([1.0 if i == j else 0.0 for t in terms
                     for j in range(t.dim) for i in range(j, t.dim)])


def _projected_gradient(theta, grad, lower):
    g = np.asarray(grad, dtype=np.float64).copy()
    at = (theta <= lower) & (g > 0)
    g[at] = 0.0
    return g


def last_evaluation_cache(objective, fitlog):
    """``ev_at(theta, probes=0)``: ``objective.evaluate(theta)``, remembering the last
    evaluation (an optimiser asks for the same point again after a line search) and
    appending ``(theta, criterion)`` to ``fitlog`` for every new point.

    ``probes > 0`` asks for estimated gradient traces (``VectorObjective.evaluate``); a
    remembered estimate is evaluated again when the exact gradient is asked for;
    ``gradient=False`` evaluates the criterion only (remembered too, evaluated again
    when a gradient is asked for)."""
    cache = {}

    def ev_at(th, probes=0, gradient=True):
        key = th.tobytes()
        ev = cache.get(key)
        if ev is None or (gradient and (ev.gradient is None or (
                getattr(ev, "gradient_probes", 0) and not probes))):
            new = ev is None
            if not gradient:
                ev = objective.evaluate(th, gradient=False)
            elif probes:
                ev = objective.evaluate(th, probes=probes)
            else:
                ev = objective.evaluate(th)
            cache.clear()
            cache[key] = ev
            if new:
                fitlog.append((th.copy(), ev.objective))
        return ev

    return ev_at


def fit_vector(objective, start=None, *, maxiter=200, tol=1e-6, callback=None,
               optimizer="auto", centre=True):
    """Minimise a :class:`VectorObjective` and verify the optimum.

    Projected Newton steps on the average-information Hessian
    (:meth:`VectorObjective.average_information`) with a backtracking line search, or
    L-BFGS-B (``optimizer="lbfgsb"``, also the fallback when a Newton step finds no
    descent), on lme4's ``theta`` with its box constraints (diagonal entries >= 0) and
    the analytic gradient; then Newton polishing with a Hessian from central differences
    of the gradient on the free parameters. The optimum is verified when the projected
    gradient, measured against the criterion's curvature, is below ``tol`` and the
    Hessian on the free parameters is positive definite.

    Parameters
    ----------
    objective : VectorObjective
    start : ndarray, optional
        Default :func:`lmmops.data.terms.centred_start` (see the notes).
    maxiter : int
    tol : float
        Convergence tolerance of the Newton decrement.
    callback : callable, optional
        ``callback(iteration, theta, criterion)``.
    optimizer : {"auto", "ai-newton", "lbfgsb"}
        The first phase. ``"auto"``: AI-Newton for at most
        :data:`AUTO_AI_NEWTON_MAX_THETA` parameters, else L-BFGS-B, by the evaluation
        counts measured in ``docs/studies/slopes_optimizer.md`` (AI-Newton needs fewer on
        few parameters, where one evaluation can be expensive, InstEval's 2256-row Schur
        block; with many parameters near the boundary its steps are poor, because the
        average information in a diagonal entry of ``T_k`` vanishes with the entry).
    centre : bool
        Optimise on off-centre slope columns centred (:func:`_fit_centred`), the default.

    Returns
    -------
    (Evaluation, OptSummary)

    Notes
    -----
    The optimiser works in ``theta^c = theta / r`` with ``r`` the powers of two of
    :func:`lmmops.data.terms.theta_scales` (each slope column on unit scale, exactly), so
    the path and the optimum do not depend on the units of a slope covariate; the start
    is :func:`lmmops.data.terms.centred_start` (lme4's ``T_k = I`` for the columns
    centred and on that scale); the evaluation, ``start``, ``callback`` and the summary
    are in lme4's ``theta``.

    A slope column whose mean is at least :data:`lmmops.data.terms.CENTRE_RATIO` of its
    spreads from 0 (a year, ``Days + 1e5``) makes the criterion in the user's ``theta``
    ill-conditioned (its intercept, the value at 0, is nearly aliased with the slope);
    such a fit runs on an objective of the columns centred, the same model, and maps
    its optimum back (:func:`_fit_centred`).
    """
    shifts = (None if objective.X is None or not centre
              else centring_shifts(objective.terms))
    if shifts is not None:
        return _fit_centred(objective, shifts, start, maxiter=maxiter, tol=tol,
                            callback=callback, optimizer=optimizer)
    units = term_units(objective.terms, objective.C, objective.offsets, objective.n)
    r = theta_scales(objective.terms, units)
    scaled = ScaledTheta(objective, r)
    start_c = (centred_start(objective.terms, units) if start is None
               else np.asarray(start, float)) / r
    cb = None
    if callback is not None:
        def cb(i, th, f):
            callback(i, th * r, f)
    ev, opt = _fit_vector(scaled, start_c, maxiter=maxiter, tol=tol, callback=cb,
                          optimizer=optimizer)
    return scaled.to_user(ev), scaled.summary_to_user(opt)


def _fit_centred(objective, shifts, start, *, maxiter, tol, callback, optimizer):
    """:func:`fit_vector` on the objective's off-centre slope columns centred by
    ``shifts`` (:func:`lmmops.data.terms.centring_shifts`), mapped back
    (:func:`lmmops.estimation.centring.fit_centred`).

    The Wald covariances of the result are the twin's, mapped
    (:class:`lmmops.estimation.centring.CentredFit`, ``ev.centred``), so they need no
    differences in the ill-conditioned user parametrisation; the criterion is the
    twin's. The fit is converged only where the twin's is and the criterion on the
    user's columns agrees with it within its rounding bound
    (:func:`lmmops.estimation.centring.centring_tolerance`).
    """
    def fit(twin, start_c, cb):
        return fit_vector(twin, start_c, maxiter=maxiter, tol=tol, callback=cb,
                          optimizer=optimizer, centre=False)

    ev, _, out, _ = fit_centred(objective, shifts, start, fit, callback=callback)
    return ev, out


def term_units(terms, C, offsets, n):
    """Per term, :func:`lmmops.data.terms.column_units` from ``C = Z'WZ``: the sum over
    the term's levels of its ``d x d`` diagonal blocks is ``sum_rows w z z'``."""
    diags = [C.diagonal(j) for j in range(max(t.dim for t in terms))]  # once, not per term
    out = []
    for k, t in enumerate(terms):
        o, d, nl = int(offsets[k]), t.dim, t.n_levels
        S = np.empty((d, d))
        for a in range(d):
            for b in range(a, d):
                S[a, b] = S[b, a] = float(np.sum(diags[b - a][o + a:o + nl * d:d]))
        out.append(column_units(t.columns, S, n))
    return out


class ScaledTheta:
    """An objective of random-slope terms seen in ``theta^c = theta / r`` (``r`` exact
    powers of two, :func:`lmmops.data.terms.theta_scales`), for the optimisers.

    Evaluations carry ``theta^c``, the gradient ``r * g`` and its Monte Carlo covariance
    ``Cov(g) * r r'`` (when present); the average information and the Newton check's
    differences (``_fd_last``) are mapped both ways; every other attribute is the
    objective's. :meth:`to_user` maps an evaluation back (also the iterative fit's
    ``theta_mc_cov`` and ``hessian``), :meth:`summary_to_user` an optimiser summary.

    Parameters
    ----------
    objective : VectorObjective or VectorIterativeObjective
    r : ndarray, shape (n_theta,)
    """

    def __init__(self, objective, r):
        self.inner, self.r = objective, np.asarray(r, dtype=np.float64)

    def __getattr__(self, name):  # terms, layout, lower, n_theta, seed, q, ...
        return getattr(self.inner, name)

    def _map(self, ev, f):
        """A copy of ``ev`` with ``theta`` times ``f`` and the derivatives divided."""
        out = copy.copy(ev)
        out.theta = ev.theta * f
        if getattr(ev, "gradient", None) is not None:
            out.gradient = ev.gradient / f
        if getattr(ev, "gradient_cov", None) is not None:
            out.gradient_cov = ev.gradient_cov / np.outer(f, f)
        if getattr(ev, "theta_mc_cov", None) is not None:
            out.theta_mc_cov = ev.theta_mc_cov * np.outer(f, f)
        if getattr(ev, "hessian", None) is not None:
            fi = f[ev.free]
            out.hessian = ev.hessian / np.outer(fi, fi)
        return out

    def evaluate(self, theta, gradient=True, **kw):
        theta = np.asarray(theta, dtype=np.float64)
        ev = self._map(self.inner.evaluate(theta * self.r, gradient=gradient, **kw),
                       1.0 / self.r)
        ev.theta = theta.copy()
        return ev

    def __call__(self, theta):
        return self.inner(np.asarray(theta, dtype=np.float64) * self.r)

    def average_information(self, ev):
        return self.inner.average_information(self.to_user(ev)) * np.outer(self.r, self.r)

    @property
    def _fd_last(self):
        """The objective's last Newton-check differences in ``theta^c`` (or None)."""
        last = getattr(self.inner, "_fd_last", None)
        if last is None:
            return None
        theta, idx, H, dpw = last
        r = self.r[idx]
        return (theta / self.r, idx, H * np.outer(r, r), None if dpw is None else dpw * r)

    @_fd_last.setter
    def _fd_last(self, value):
        theta, idx, H, dpw = value
        r = self.r[idx]
        self.inner._fd_last = (theta * self.r, idx, H / np.outer(r, r),
                               None if dpw is None else dpw / r)

    def to_user(self, ev):
        """An evaluation in lme4's ``theta``."""
        return self._map(ev, self.r)

    def summary_to_user(self, opt):
        """An optimiser summary in lme4's ``theta``."""
        out = copy.copy(opt)
        out.theta_initial = opt.theta_initial * self.r
        out.theta_final = opt.theta_final * self.r
        out.fitlog = [(th * self.r, f) for th, f in opt.fitlog]
        return out


def _fit_vector(objective, start, *, maxiter, tol, callback, optimizer):
    if optimizer not in ("auto", "ai-newton", "lbfgsb"):
        raise LmmopsError(f"unknown optimizer {optimizer!r}; use 'auto', 'ai-newton' or "
                          "'lbfgsb'")
    if optimizer == "auto":
        optimizer = "ai-newton" if objective.n_theta <= AUTO_AI_NEWTON_MAX_THETA else "lbfgsb"
    t0 = time.perf_counter()
    lower = objective.lower
    theta0 = start_theta(objective.terms) if start is None else np.asarray(start, float)
    fitlog = []
    ev_at = last_evaluation_cache(objective, fitlog)

    def fun(th):
        th = np.maximum(th, lower)
        ev = ev_at(th)
        return ev.objective, ev.gradient

    it = [0]

    def cb(th):
        it[0] += 1
        if callback is not None:
            callback(it[0], th, ev_at(np.maximum(th, lower)).objective)

    bounds = [(0.0 if b == 0 else None, None) for b in lower]
    n_eval0 = objective.n_evaluations
    early = int(getattr(objective, "early_gradient_probes", 0) or 0)
    f0 = ev_at(np.maximum(theta0, lower), early if optimizer == "ai-newton" else 0).objective
    theta, restarts, nit = theta0, 0, 0
    while True:
        x, n_it, message = None, 0, ""
        if optimizer == "ai-newton":
            theta, done, n_it, message = _ai_newton(objective, np.maximum(theta, lower),
                                                    ev_at, maxiter, cb, tol)
            x = theta if done else None
        if x is None:  # L-BFGS-B by request, or on from where the Newton phase stopped
            res = sopt.minimize(fun, theta, jac=True, method="L-BFGS-B", bounds=bounds,
                                callback=cb, options={"maxiter": maxiter, "ftol": 1e-15,
                                                      "gtol": 1e-10, "maxcor": 20})
            x, n_it, message = res.x, n_it + int(res.nit), res.message
        nit += n_it
        theta, ev, converged, message, H, idx, g_ok = _newton_polish(
            objective, np.maximum(x, lower), ev_at, tol, message)
        if converged or H is None or restarts >= 5:
            break
        # a stationary point that is not a minimum (L-BFGS-B stops where the gradient
        # vanishes, e.g. a diagonal entry at 0 where the criterion is even in it): step
        # along the most negative curvature direction and restart
        escaped = _negative_curvature_step(theta, ev, H, idx, lower, ev_at)
        if escaped is None:
            break
        theta, restarts = escaped, restarts + 1
    g = _projected_gradient(theta, g_ok, lower)
    opt = OptSummary(theta_initial=np.asarray(theta0, float), theta_final=theta.copy(),
                     f_initial=f0, f_final=ev.objective,
                     n_evaluations=objective.n_evaluations - n_eval0,
                     iterations=nit, restarts=restarts, gradient_norm=float(np.max(np.abs(g))),
                     converged=bool(converged), message=str(message),
                     optimizer=("AI-Newton" if optimizer == "ai-newton" else "L-BFGS-B")
                     + " + Newton check", elapsed_s=time.perf_counter() - t0,
                     fitlog=fitlog)
    return ev, opt


def _ai_newton(objective, theta, ev_at, maxiter, callback, tol=1e-6):
    """Newton on the average information until its decrement is below ``tol`` (the
    criterion's scale is 1; the Newton check that follows differences the gradient there
    and steps on if the decrement on that Hessian is not below ``tol`` too: tightening
    this phase to 1e-9 cost InstEval's slope model two more evaluations, 0.4 s each, for a
    change of 5e-7 in the criterion); returns ``(theta, done, iterations, message)``, ``done``
    False when a step finds no sufficient descent within 6 halvings or 25 steps do not
    converge (the caller goes on with L-BFGS-B from ``theta``)."""
    lower = objective.lower
    n_max = min(maxiter, 25)  # AI-Newton converges in a few steps or not at all
    # estimated gradient traces while the decrement is large (cheaper where the Schur
    # block is large; the objective says how many probes, 0 for none)
    probes = int(getattr(objective, "early_gradient_probes", 0) or 0)
    for it in range(1, n_max + 1):
        ev = ev_at(theta, probes)
        g = ev.gradient
        free = ~((theta <= lower) & (g > 0))
        idx = np.flatnonzero(free)
        if idx.size == 0:
            return theta, True, it, "all parameters on the boundary"
        H = objective.average_information(ev)[np.ix_(idx, idx)]
        H += 1e-10 * np.trace(H) / idx.size * np.eye(idx.size)
        try:
            step = sla.cho_solve(sla.cho_factor(H, lower=True), g[idx])
        except np.linalg.LinAlgError:
            return theta, False, it, "the average information is not positive definite"
        dec = float(g[idx] @ step)
        if probes and dec < EARLY_GRADIENT_DECREMENT:
            probes = 0  # exact from here on
            if dec < 10.0 * tol:  # near enough to judge: again with the exact gradient
                continue
        if dec < tol:
            return theta, True, it, f"AI-Newton decrement {dec:.2g}"
        # far from the optimum the average information can be far from the Hessian
        # (measured: a slope's T entry sent from 1.5 to 8, then to 2920, on a 4e5-row
        # users x items design): no entry moves by more than 0.9 max(|theta_i|, 0.5)
        # (0.9: a capped step never lands a diagonal entry exactly on 0, where the
        # criterion is even in it and the gradient vanishes)
        cap = 0.9 * np.maximum(np.abs(theta[idx]), 0.5)
        t = min(1.0, float(np.min(cap / np.maximum(np.abs(step), 1e-300))))
        for _ in range(6):  # backtracking (Armijo); a poor model hands over to L-BFGS-B
            new = theta.copy()
            new[idx] -= t * step
            # a diagonal entry stepping below 0 is reflected with its column of T_k
            # (T_k and T_k diag(+-1) give the same covariance and criterion), so the
            # step never lands on the boundary, where the criterion is even in the entry
            # and its derivative vanishes
            new = _canonical_theta(objective, new)
            # the trial's criterion only: its gradient is completed from the same
            # factor when the trial is accepted (the next iteration asks for it)
            if ev_at(new, probes, gradient=False).objective <= ev.objective - 1e-4 * t * dec:
                break
            t *= 0.5
        else:
            return theta, False, it, "no descent along the AI-Newton step"
        theta = new
        if callback is not None:
            callback(theta)
    return theta, False, n_max, f"{n_max} AI-Newton iterations"


def _canonical_theta(objective, theta):
    """``theta`` with every negative diagonal entry of a ``T_k`` made positive by
    flipping the sign of its column (the same ``T_k T_k'``)."""
    out = theta.copy()
    for t, sl in zip(objective.terms, objective.layout):
        T = t.relative_factor(out[sl])
        neg = np.diag(T) < 0
        if np.any(neg):
            T[:, neg] *= -1.0
            rows, cols = lower_triangle(t.dim, "F")
            out[sl] = T[rows, cols]
    return out


def _newton_polish(objective, theta, ev_at, tol, message):
    """Newton steps on the free set until the decrement is below ``tol``.

    Returns ``(theta, ev, converged, message, H, idx, gradient)``; ``H`` is the last
    Hessian on the free parameters ``idx`` when it is not positive definite, else None;
    ``gradient`` is the last analytic gradient, at ``theta`` or, when the verified point
    was followed by one more step on its Hessian (evaluated for the criterion only,
    ``ev.gradient`` None), at the verified point.
    """
    lower = objective.lower
    ev = ev_at(theta)
    for _ in range(20):
        free = ~((theta <= lower) & (ev.gradient > 0))
        idx = np.flatnonzero(free)
        if idx.size == 0:
            return theta, ev, True, ("all parameters on the boundary, gradient pointing "
                                     "out"), None, idx, ev.gradient
        H = _fd_hessian(objective, theta, idx, lower, g0=ev.gradient, pw0=ev.pwrss)
        try:
            Lh = np.linalg.cholesky(H)
        except np.linalg.LinAlgError:
            return theta, ev, False, ("the Hessian on the free parameters is not positive "
                                      "definite"), H, idx, ev.gradient
        step = sla.cho_solve((Lh, True), ev.gradient[idx])
        dec = float(ev.gradient[idx] @ step)
        if dec < tol:
            # verified: a positive definite Hessian and a decrement below tol. One more
            # step on this Hessian (one evaluation of the criterion only, no gradient
            # and no new differences) takes the criterion from about dec / 2 above the
            # optimum to its rounding level; kept when it does not increase the criterion
            msg = f"Newton decrement {dec:.2g} < {tol:g}"
            if dec > 1e-12 * max(1.0, abs(ev.objective)):
                new = np.maximum(theta - _scatter(step, idx, theta.size), lower)
                ev_new = ev_at(new, gradient=False)
                if ev_new.objective <= ev.objective:
                    return (new, ev_new, True, msg + ", then one more step", None, idx,
                            ev.gradient)
            return theta, ev, True, msg, None, idx, ev.gradient
        new = theta.copy()
        new[idx] -= step
        new = np.maximum(new, lower)
        ev_new = ev_at(new)
        if ev_new.objective > ev.objective:
            return (theta, ev, False, "Newton step did not decrease the criterion", None,
                    idx, ev.gradient)
        theta, ev = new, ev_new
    return (theta, ev, False, "20 Newton steps without convergence", None, idx,
            ev.gradient)


def _scatter(values, idx, size):
    """A length-``size`` vector with ``values`` at ``idx`` and 0 elsewhere."""
    out = np.zeros(size)
    out[idx] = values
    return out


def _negative_curvature_step(theta, ev, H, idx, lower, ev_at):
    """The best point along ``+-`` the most negative curvature direction of ``H`` (steps
    from 1 down to 1e-4, projected on the bounds), or None if none decreases the
    criterion."""
    w, vecs = np.linalg.eigh(H)
    if w[0] >= 0:
        return None
    best, f_best = None, ev.objective
    for sign in (1.0, -1.0):
        for s in 10.0 ** -np.arange(0.0, 4.5, 0.5):
            cand = theta.copy()
            cand[idx] += sign * s * vecs[:, 0]
            cand = np.maximum(cand, lower)
            f = ev_at(cand, gradient=False).objective
            if f < f_best - 1e-10 * max(1.0, abs(f_best)):
                best, f_best = cand, f
    return best


def _fd_hessian(objective, theta, idx, lower, h=1e-5, g0=None, pw0=None):
    """Hessian on the parameters ``idx`` from differences of the analytic gradient:
    central, or forward (one evaluation per parameter) when the gradient ``g0`` at
    ``theta`` is given or a central step would cross a bound.

    With forward differences and the penalised residual sum ``pw0`` at ``theta`` the
    same evaluations also give ``dr^2/dtheta``; the result is kept on the objective
    (``_fd_last``: theta, idx, H, dr^2/dtheta or None) for the Wald covariances at the
    optimum (:meth:`VectorObjective.variance_covariance`).
    """
    H = np.empty((idx.size, idx.size))
    dpw = None if pw0 is None else np.empty(idx.size)
    for c, i in enumerate(idx):
        e = np.zeros_like(theta)
        step = h * max(1.0, abs(theta[i]))
        e[i] = step
        e1 = objective.evaluate(theta + e)
        g1 = e1.gradient
        if g0 is not None or theta[i] - step < lower[i]:
            if g0 is None:
                g0 = objective.evaluate(theta).gradient
            H[:, c] = (g1 - g0)[idx] / step
            if dpw is not None:
                dpw[c] = (e1.pwrss - pw0) / step
        else:
            H[:, c] = (g1 - objective.evaluate(theta - e).gradient)[idx] / (2 * step)
            dpw = None
    H = 0.5 * (H + H.T)
    objective._fd_last = (np.array(theta, dtype=np.float64), idx.copy(), H, dpw)
    return H
