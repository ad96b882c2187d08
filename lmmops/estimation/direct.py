"""The exact (direct) solver: profiled REML/ML deviance by a blocked Cholesky in level space.

The model is ``y = X beta + sum_k Z_k u_k + e`` with ``u_k ~ N(0, s_k^2 I)`` and
``e ~ N(0, s^2 I)``. With relative scales ``theta_k = s_k / s`` and
``Lambda = blkdiag(theta_k I_{q_k})``, lme4's penalised least-squares system is

.. math::

    \\Omega(\\theta) = \\begin{bmatrix}
    \\Lambda Z'Z \\Lambda + I & \\Lambda Z'X & \\Lambda Z'y \\\\
    X'Z\\Lambda & X'X & X'y \\\\
    y'Z\\Lambda & y'X & y'y \\end{bmatrix} = L L'.

The factor with the most levels comes first: its block of ``Lambda Z'Z Lambda + I`` is
diagonal, so eliminating it is exact and cheap, and what remains is a dense Schur
complement of size ``q_rest + p + 1`` (the other factors, X and y), factored by LAPACK.
This is MixedModels.jl's blocked Cholesky. From ``L``:

- ``log|Lambda Z'Z Lambda + I| = log|V| - n log s^2`` (matrix determinant lemma);
- ``log|R_X|^2 = log|X'V^{-1}X| + p log s^2``;
- ``r^2 = L[-1, -1]^2``, the penalised residual sum of squares.

The profiled criteria (``s^2`` optimised out) are

- ML: ``log|L_Z|^2 + n (1 + log(2 pi r^2 / n))``;
- REML: ``log|L_Z|^2 + log|R_X|^2 + (n - p)(1 + log(2 pi r^2 / (n - p)))``.

Their gradient in ``theta`` is analytic:
``d/dtheta_k = 2/theta_k [q_k - tr((M^{-1})_{kk}) - ||v_k||^2 / s^2]`` where ``M`` is the
leading block of ``Omega`` whose log-determinant enters the criterion (Z only for ML, Z and
X for REML) and ``v`` the spherical conditional modes; the criterion is even in each
``theta_k``, so the derivative is 0 on the boundary ``theta_k = 0``.
"""

from __future__ import annotations

import itertools
import math
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import scipy.linalg as sla
import scipy.sparse as sp

from lmmops.data.checks import check_method, check_rows_free, check_weights
from lmmops.data.design import CrossedDesign
from lmmops.data.statistics import SufficientStatistics
from lmmops.errors import ConvergenceWarning, LmmopsError, NumericalFailure
from lmmops.estimation.criterion import profiled_criterion
from lmmops.guard import check_dense
from lmmops.linalg import kernels
from lmmops.linalg.lapack import chol_inverse, tri_solve
from lmmops.threads import limit_threads, limits_active

__all__ = [
    "DirectObjective",
    "Evaluation",
    "NumericalFailure",
    "OptSummary",
    "fit_direct",
    "leading_cho_solve",
    "moment_start",
    "theta_gradient",
    "theta_scale",
    "warm_up",
]


@dataclass
class Evaluation:
    """Everything the blocked Cholesky gives at one ``theta``.

    Attributes
    ----------
    theta : ndarray, shape (K,)
    objective : float
        The profiled criterion (REML criterion or ML deviance), on lme4's scale.
    gradient : ndarray or None, shape (K,)
    sigma2 : float
        Profiled residual variance.
    beta : ndarray, shape (p,)
    beta_cov : ndarray, shape (p, p)
        ``sigma2 * (X'V^{-1}X)^{-1}`` scaled as lme4's ``vcov``.
    v : list of ndarray
        Spherical conditional modes per factor (original factor order).
    logdet_L : float
        ``log|Lambda Z'Z Lambda + I|``.
    logdet_RX : float
        ``log|R_X|^2``.
    pwrss : float
        Penalised weighted residual sum of squares ``r^2``.
    gradient_probes : int
        0 when ``gradient`` is exact; else the number of probes of the Hutchinson
        estimates of its traces (early optimiser steps of the slope solver).
    """

    theta: np.ndarray
    objective: float
    gradient: np.ndarray | None
    sigma2: float
    beta: np.ndarray
    beta_cov: np.ndarray
    v: list
    logdet_L: float
    logdet_RX: float
    pwrss: float
    traces: np.ndarray | None = None
    factor: tuple | None = field(default=None, repr=False)
    gradient_probes: int = 0


@dataclass
class OptSummary:
    """Record of an optimisation (after MixedModels.jl's ``OptSummary``).

    Attributes
    ----------
    theta_initial, theta_final : ndarray
    f_initial, f_final : float
    n_evaluations, iterations : int
    gradient_norm : float
        Infinity norm of the projected gradient at the end.
    converged : bool
    message : str
    optimizer : str
    elapsed_s : float
    fitlog : list of tuple
        ``(theta, objective)`` for every evaluation.
    restarts : int
        Restarts from ``theta = 1`` after a verification in doubt (see :func:`fit_direct`).
    """

    theta_initial: np.ndarray
    theta_final: np.ndarray
    f_initial: float
    f_final: float
    n_evaluations: int
    iterations: int
    gradient_norm: float
    converged: bool
    message: str
    optimizer: str = "L-BFGS-B"
    elapsed_s: float = 0.0
    fitlog: list = field(default_factory=list, repr=False)
    restarts: int = 0

    def __repr__(self):
        rows = [
            ("optimizer", self.optimizer),
            ("theta initial", np.array2string(self.theta_initial, precision=6)),
            ("theta final", np.array2string(self.theta_final, precision=6)),
            ("objective initial", f"{self.f_initial:.6f}"),
            ("objective final", f"{self.f_final:.6f}"),
            ("evaluations", str(self.n_evaluations)),
            ("iterations", str(self.iterations)),
            ("restarts", str(self.restarts)),
            ("|projected gradient|", f"{self.gradient_norm:.3g}"),
            ("converged", f"{self.converged} ({self.message})"),
            ("elapsed", f"{self.elapsed_s:.3f} s"),
        ]
        w = max(len(r[0]) for r in rows)
        return "OptSummary\n" + "\n".join(f"  {a:<{w}}  {b}" for a, b in rows)


class DirectObjective:
    """The exact profiled REML/ML criterion as a function of ``theta``.

    This is lme4's ``devfun``: build it once (an O(n) pass for the sufficient
    statistics), then evaluate it at any ``theta`` in time independent of n.

    Parameters
    ----------
    design : CrossedDesign
    X : ndarray, shape (n_obs, p)
        Fixed-effects model matrix, full column rank.
    y : ndarray, shape (n_obs,)
    method : {"REML", "ML"}
    weights : array_like, shape (n_obs,), optional
        Prior (precision) weights: ``R = s^2 W^{-1}``, as lme4's ``weights=``. The
        sufficient statistics are weighted (``Z'WZ``, ``Z'WT``, ``T'WT`` with
        ``T = [X y]``) and the criterion gains lme4's ``-sum(log w)`` term.
    stats : SufficientStatistics, optional
        The level-space statistics of ``(design, X, y, weights)``
        (:class:`~lmmops.data.statistics.SufficientStatistics`), e.g. combined from
        partitions; default: computed here in one pass over the rows.

    Raises
    ------
    DenseTooLargeError
        When the dense Schur block (all factors but the largest, plus X and y) is too
        large to form.

    Attributes
    ----------
    threads : "auto" or int
        BLAS threads of :meth:`evaluate` when it runs outside a fit (inside
        :meth:`lmmops.LMM.fit` the fit's ``threads=`` wins); default ``"auto"``: one
        thread for a Schur block below :data:`lmmops.threads.AUTO_BLAS_MIN_DENSE` rows.
        See :mod:`lmmops.threads`.

    Notes
    -----
    Memory is ``O(q_1 p + m^2)`` with ``m = q - q_1 + p + 1``, where ``q_1`` is the
    largest factor's level count; time per evaluation is ``O(m^3)`` plus
    ``O(sum_i nnz_i^2)`` over the rows ``i`` of the cross-tabulation ``N_1,rest``.

    Examples
    --------
    >>> from lmmops.data.design import CrossedDesign
    >>> rng = np.random.default_rng(0)
    >>> a, b = rng.integers(0, 6, 200), rng.integers(0, 4, 200)
    >>> d = CrossedDesign.from_codes([a, b], names=["a", "b"])
    >>> y = 1.0 + rng.normal(size=6)[a] + rng.normal(size=4)[b] + rng.normal(size=200)
    >>> obj = DirectObjective(d, np.ones((200, 1)), y, method="REML")
    >>> ev = obj.evaluate(np.array([1.0, 1.0]))
    >>> bool(np.isfinite(ev.objective))
    True
    """

    threads = "auto"

    def __init__(self, design, X, y, method="REML", weights=None, stats=None):
        method = check_method(method)
        self.method = method
        self.design = design
        if X is None or y is None:
            # level space only (the rows stayed where they are: a distributed backend):
            # everything below comes from the statistics; row-level outputs are not here
            check_rows_free("a DirectObjective", stats, X, y, weights)
            n, p = stats.n_obs, stats.p
            if design.n_obs != n:
                raise LmmopsError(f"the design has {design.n_obs} rows, the statistics {n}")
            self.weights = None
            self.weighted = stats.weighted
        else:
            X = np.ascontiguousarray(X, dtype=np.float64)
            y = np.ascontiguousarray(y, dtype=np.float64).ravel()
            n, p = X.shape
            if y.shape[0] != n or design.n_obs != n:
                raise LmmopsError("X, y and the design must have the same number of rows")
            self.weights = None if weights is None else check_weights(weights, n)
            self.weighted = self.weights is not None
        check_method(method, n, p)
        self.n, self.p, self.K = n, p, design.n_factors
        q = np.asarray(design.n_levels)
        self.first = int(np.argmax(q))
        self.rest = [k for k in range(self.K) if k != self.first]
        self.q1 = int(q[self.first])
        self.q_rest = [int(q[k]) for k in self.rest]
        self.qr = int(sum(self.q_rest))
        m = self.qr + p + 1
        check_dense((m, m), "the exact solver's dense Schur block", itemsize=8 * 4)
        self.m = m

        self.X, self.y = X, y
        # the level-space sufficient statistics, one pass over the rows (shared seam)
        if stats is None:
            stats = SufficientStatistics.from_arrays(design, X, y, self.weights)
        elif stats.n_levels != tuple(design.n_levels) or stats.p != p:
            raise LmmopsError(f"statistics on levels {stats.n_levels} with p = {stats.p} "
                              f"do not match the design's {tuple(design.n_levels)}, p = {p}")
        self.stats = stats
        self.ldW = stats.log_weights
        self.d1 = stats.D[self.first]
        self.Z1T = stats.ZT[self.first]
        self.TT = stats.TT
        if self.qr:
            self.rest_offsets = np.concatenate([[0], np.cumsum(self.q_rest)]).astype(np.int64)
            self.ZrT = np.vstack([stats.ZT[k] for k in self.rest])
            N = sp.hstack([stats.crosstab(self.first, k) for k in self.rest], format="csr")
            N.sum_duplicates()
            N.sort_indices()
            self.N = N
            self.Nt = N.T.tocsr()
        else:
            self.rest_offsets = np.zeros(1, dtype=np.int64)
            self.ZrT = np.zeros((0, p + 1))
            self.N = sp.csr_matrix((self.q1, 0))
            self.Nt = sp.csr_matrix((0, self.q1))
        self._N_arrays = (
            self.N.indptr.astype(np.int64), self.N.indices.astype(np.int64),
            self.N.data.astype(np.float64),
        )
        # N and N' for the CSR products (scipy's own index arrays, float64 values)
        self._N_csr = _csr_arrays(self.N)
        self._Nt_csr = _csr_arrays(self.Nt)
        # theta_k repeated over the levels of each factor but the first
        self._rest_index = np.repeat(np.asarray(self.rest, dtype=np.intp), self.q_rest)
        qr = self.qr
        # the Schur block's symbolic work, once: N's transpose as an index (the rows of
        # N with a nonzero in each column, kernels.csr_column_positions) and
        # Z_rest'WZ_rest's upper triangle (sparse); each evaluation refills the values
        self._cols = kernels.csr_column_positions(self._N_arrays[0], self._N_arrays[1], qr)
        A = sp.triu(sp.bmat([[stats.crosstab(k, l) for l in self.rest] for k in self.rest],
                            format="csr"), format="csr") if qr else sp.csr_matrix((0, 0))
        A.sort_indices()
        self._arr_upper = (A.indptr.astype(np.int64), A.indices.astype(np.int64),
                           A.data.astype(np.float64))
        # scratch for criterion-only evaluations; C order, of which only the upper
        # triangle is ever written: LAPACK factors its transpose (column-major, lower) in
        # place, and the other triangle stays zero
        self._S = np.zeros((m, m))
        self._no_rn = np.zeros((0, p + 1))
        # _first_parts' cache: a few entries, on small level spaces only
        self._first_cache = {}
        self._first_cacheable = (2 * self.q1 + (qr + p + 1) * (p + 1)
                                 <= _FIRST_CACHE_DOUBLES)
        self._offsets = [int(o) for o in design.offsets]
        self._level_index = {}  # _zt_times' bin index per number of columns
        self.n_evaluations = 0

    # ------------------------------------------------------------------ helpers
    def _theta_rest(self, theta):
        if not self.qr:
            return np.zeros(0)
        return np.asarray(theta, dtype=np.float64)[self._rest_index]

    def _N_times(self, B):
        """``N @ B`` (``N`` the cross-tabulation of the first factor with the rest) for a
        C-ordered float64 ``B`` of shape ``(q_rest, k)``, as scipy's CSR product computes
        it, without its dispatch."""
        return _csr_times(self._N_csr, B, self.q1)

    def _Nt_times(self, B):
        """``N' @ B`` for a C-ordered float64 ``B`` of shape ``(q_1, k)`` (see
        :meth:`_N_times`)."""
        return _csr_times(self._Nt_csr, B, self.qr)

    def _reml_dims(self):
        """Size of the leading block whose log-determinant enters the criterion."""
        return self.qr + (self.p if self.method == "REML" else 0)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, theta, gradient=True):
        """Evaluate the criterion (and optionally its gradient) at ``theta``.

        Parameters
        ----------
        theta : array_like, shape (n_factors,)
            Relative standard deviations ``s_k / s``, in the design's factor order, >= 0.
        gradient : bool
            Whether to compute the analytic gradient (about twice the cost).

        Returns
        -------
        Evaluation

        Raises
        ------
        RankDeficientError
            If X is numerically rank deficient.
        """
        # a small Schur block runs single-threaded BLAS (threads="auto", lmmops.threads);
        # inside a fit, the fit's limits are in force already
        if limits_active():
            return self._evaluate(theta, gradient)
        with limit_threads(self.threads, dense_size=self.m, inner=True):
            return self._evaluate(theta, gradient)

    def _factor(self, theta, gradient, keep=True):
        """The blocked Cholesky factor at ``theta`` and the criterion's pieces:
        ``(theta, L, d, w1, tr_, t1, logdet_L, logdet_RX, pwrss, criterion, dof)``.

        ``L`` is column-major, lower, with a zero upper triangle; ``keep=False`` factors
        in the objective's scratch block (the criterion alone: ``L`` is overwritten by the
        next such call), otherwise in a new one (an :class:`Evaluation` keeps it).
        ``gradient`` is unused (the gradient's Gram terms are summed on the fly).
        """
        theta = np.array(theta, dtype=np.float64)
        if theta.shape != (self.K,) or not all(0.0 <= t < math.inf for t in theta.tolist()):
            raise LmmopsError(f"theta must be {self.K} finite values >= 0, got {theta}")
        self.n_evaluations += 1
        n, p, qr, m = self.n, self.p, self.qr, self.m
        t1 = theta[self.first]
        d, w1, RN, Sxx, logdet_d = self._first_parts(t1)
        tr_ = self._theta_rest(theta)
        # S's upper triangle, C order (= the lower triangle of the column-major S.T)
        S = np.zeros((m, m)) if keep else self._S
        kernels.schur_fill_rows(*self._N_arrays, *self._cols, w1, *self._arr_upper, tr_,
                                self._no_rn if RN is None else RN, Sxx, S)
        L, info = sla.lapack.dpotrf(S.T, lower=1, overwrite_a=1, clean=0)
        if info > 0:
            col = info - 1
            if col == m - 1:  # y in the span of X and Z: perfect fit
                L[m - 1, m - 1] = 0.0
            else:
                where = "X" if qr <= col < qr + p else "the random effects"
                raise NumericalFailure(
                    f"the blocked Cholesky factor lost positive definiteness at pivot {info} "
                    f"({where}) for theta = {theta}"
                )
        diag = L.diagonal()
        logs = np.log(diag[:qr + p])
        logdet_L = float(logdet_d + 2.0 * logs[:qr].sum())
        logdet_RX = float(2.0 * logs[qr:].sum())
        pwrss = float(diag[m - 1] ** 2)
        if pwrss <= 0:
            raise LmmopsError("the response is fitted exactly (zero residual sum of squares)")
        # log|R| = n log s^2 - sum(log w), as lme4's ldW
        obj, dof = profiled_criterion(logdet_L, logdet_RX, pwrss, n, p, self.method, self.ldW)
        return theta, L, d, w1, tr_, t1, logdet_L, logdet_RX, pwrss, obj, dof

    def _first_parts(self, t1, gradient=False):
        """The parts of the Schur block that depend on the first factor's ``theta`` alone:
        ``(d, w1, Z_r'T - N'W_1 Z_1'T, T'T - T'Z_1 W_1 Z_1'T, sum(log d))`` with
        ``d = t1^2 D_1 + 1`` and ``w1 = t1^2 / d`` (the block of the other factors is
        filled from ``w1`` by :func:`~lmmops.linalg.kernels.schur_fill_rows`; ``gradient``
        is unused).

        Kept for the last few values of ``t1`` on a small level space (the optimiser's
        grids move the other components with ``t1`` fixed), so a repeated ``t1`` reuses
        the same numbers."""
        key = float(t1)
        hit = self._first_cache.get(key)
        if hit is not None:
            return hit
        qr = self.qr
        d = t1 * t1 * self.d1 + 1.0
        w1 = t1 * t1 / d
        WZ1 = w1[:, None] * self.Z1T
        RN = self.ZrT - self._Nt_times(WZ1) if qr else None
        Sxx = self.TT - self.Z1T.T @ WZ1
        parts = (d, w1, RN, Sxx, np.log(d).sum())
        if self._first_cacheable:
            for a in parts[:4]:
                if a is not None:
                    a.setflags(write=False)  # shared by the evaluations at this t1
            if len(self._first_cache) >= _FIRST_CACHE_ENTRIES:
                self._first_cache.clear()
            self._first_cache[key] = parts
        return parts

    def criterion(self, theta):
        """The criterion alone at ``theta`` (no modes, no gradient): the factorisation
        and its diagonal, for the optimiser's grid and line searches (about a third of
        the time of :meth:`evaluate`, mostly fixed overhead, on small designs)."""
        if limits_active():
            return float(self._factor(theta, False, keep=False)[9])
        with limit_threads(self.threads, dense_size=self.m, inner=True):
            return float(self._factor(theta, False, keep=False)[9])

    def _evaluate(self, theta, gradient):
        p, qr, m = self.p, self.qr, self.m
        theta, L, d, w1, tr_, t1, logdet_L, logdet_RX, pwrss, obj, dof = self._factor(
            theta, gradient)
        sigma2 = pwrss / dof

        # conditional modes: back-substitute the y column, then the first block. With the
        # whole factor (no copy of its leading block): L' [x; 0] = [c; 0] is
        # L_11' x = c as the last pivot sqrt(pwrss) > 0
        if m > 1:
            c = np.zeros(m)
            c[:m - 1] = L[m - 1, :m - 1]
            sol = tri_solve(L, c, lower=True, trans=1)[:m - 1]
        else:
            sol = np.zeros(0)
        v_rest = sol[:qr]
        beta = sol[qr:qr + p]
        rhs1 = t1 * self.Z1T[:, p] - t1 * (self.Z1T[:, :p] @ beta)
        if qr:
            rhs1 -= t1 * self._N_times(tr_ * v_rest)
        v1 = rhs1 / d
        # beta covariance: sigma2 * (R_X R_X')^{-1}
        RX = L[qr:qr + p, qr:qr + p]
        RXinv = tri_solve(RX, np.eye(p), lower=True) if p else np.zeros((0, 0))
        beta_cov = sigma2 * (RXinv.T @ RXinv)

        v = [None] * self.K
        v[self.first] = v1
        for i, k in enumerate(self.rest):
            v[k] = v_rest[self.rest_offsets[i]:self.rest_offsets[i + 1]]

        grad = traces = None
        if gradient:
            grad, traces = self._gradient(theta, L, d, w1, tr_, v, sigma2)
        return Evaluation(theta, float(obj), grad, float(sigma2), beta, beta_cov, v,
                          logdet_L, logdet_RX, pwrss, traces, (L, d, tr_))

    def _gradient(self, theta, L, d, w1, tr_, v, sigma2):
        p, qr = self.p, self.qr
        mp = self._reml_dims()
        # inverse of the leading Schur block S' = L' L'^T (rest factors [+ X]): its lower
        # triangle (column-major); the upper one is L's, zero
        if mp:
            Sinv = chol_inverse(L[:mp, :mp], lower=True, full=False)
        else:
            Sinv = np.zeros((0, 0))
        # trace of the first factor's block of M^{-1}: sum 1/d + tr(S'^{-1} B'D^{-2}B),
        # B'D^{-2}B = [[T N'W2 N T, T N'W2 X1], [., t1^2 X1'D^{-2}X1]] with W2 = w1 / d,
        # summed against S'^{-1}'s lower triangle (off-diagonal entries twice)
        tr_first = float(np.sum(1.0 / d))
        if mp:
            t1 = theta[self.first]
            w2 = w1 / d
            if qr:  # on N'N's pattern only, no dense Gram
                tr_first += kernels.schur_trace_rows(*self._N_arrays, *self._cols, w2, tr_, Sinv.T)
            if self.method == "REML" and p:
                X1 = self.Z1T[:, :p]
                Sxx = Sinv[qr:, qr:]
                Bxx = t1 * t1 * (X1.T @ (X1 / (d * d)[:, None]))
                tr_first += float(2.0 * np.sum(np.tril(Sxx) * Bxx)
                                  - np.sum(np.diagonal(Sxx) * np.diagonal(Bxx)))
                if qr:
                    NwX = self._Nt_times(w2[:, None] * X1)  # (qr, p)
                    tr_first += 2.0 * float(np.sum(Sinv[qr:, :qr].T * (tr_[:, None] * NwX)))
        diag_inv = np.diagonal(Sinv)
        traces = np.zeros(self.K)
        for k in range(self.K):
            if k == self.first:
                traces[k] = tr_first
            else:
                i = self.rest.index(k)
                lo, hi = self.rest_offsets[i], self.rest_offsets[i + 1]
                traces[k] = float(np.sum(diag_inv[lo:hi]))
        grad = theta_gradient(theta, self.design.n_levels, traces, v, sigma2)
        return grad, traces

    def residuals(self, ev):
        """Conditional residuals ``y - X beta - sum_k Z_k b_k`` at an evaluation.

        Parameters
        ----------
        ev : Evaluation

        Returns
        -------
        ndarray, shape (n_obs,)
        """
        if self.X is None:
            raise LmmopsError("the conditional residuals are row-level: this objective "
                              "was built from level-space statistics alone")
        return conditional_residuals(self.design, self.X, self.y, ev)

    @property
    def has_rows(self):
        """bool: whether the objective holds the rows (False when it was built from
        statistics alone, ``X=None, y=None, stats=...``)."""
        return self.X is not None

    def _need_rows(self, what):
        if self.X is None:
            raise LmmopsError(f"{what} are row-level: this objective was built from "
                              "level-space statistics alone (the rows were not gathered)")

    def _span_products(self, F, H):
        """For columns ``B = Z F + [X y] H`` (``F``: ``q x m``, ``H``: ``(p+1) x m``):
        ``Z'WB``, ``X'WB`` and ``B'WB`` from the statistics alone (no rows)."""
        st = self.stats
        if getattr(self, "_gram_full", None) is None:
            self._gram_full = st.gram()
            self._ZT_full = np.vstack(st.ZT)
        G, ZT, TT, p = self._gram_full, self._ZT_full, st.TT, self.p
        ZtB = np.asarray(G @ F) + ZT @ H
        TtB = ZT.T @ F + TT @ H  # [X y]'WB
        BtB = F.T @ ZtB + H.T @ TtB
        return ZtB, TtB[:p], BtB

    def quadratic_form_P_span(self, ev, F, H, z_only=False):
        """:meth:`quadratic_form_P` for columns ``B = Z F + [X y] H`` given by their
        coefficients, from the level-space statistics alone (equal to it up to rounding)."""
        ZtW, XtW, WtW = self._span_products(np.asarray(F, dtype=np.float64),
                                            np.asarray(H, dtype=np.float64))
        return self._projected_gram(ev, ZtW, XtW, WtW, z_only)

    def _projected_gram(self, ev, ZtW, XtW, WtW, z_only):
        """``W'PW`` (``z_only``: ``W'V^{-1}W``) from ``Z'W``, ``X'W`` and ``W'RW``-type
        products: one solve of the spherical system, symmetrised."""
        b1, br = self._split_rhs(ZtW, XtW, ev.theta)
        if z_only:
            x1, xr = self.solve_spherical(ev, b1, br[:self.qr], z_only=True)
            br = br[:self.qr]
        else:
            x1, xr = self.solve_spherical(ev, b1, br)
        WPW = (WtW - (b1.T @ x1 + br.T @ xr)) / ev.sigma2
        return 0.5 * (WPW + WPW.T)

    def working_variates_span(self, ev):
        """The average information's working variates ``Z_k Z_k'W e / s^2`` and
        ``e / s^2`` (``e`` the conditional residual) as coefficients ``(F, H)`` of
        ``Z F + [X y] H``, without the rows."""
        p, K, off = self.p, self.K, self.design.offsets
        q = int(off[-1])
        Fe = np.zeros((q, 1))
        for k in range(K):
            Fe[off[k]:off[k + 1], 0] = -ev.theta[k] * np.asarray(ev.v[k])
        He = np.zeros((p + 1, 1))
        He[:p, 0] = -ev.beta
        He[p, 0] = 1.0
        ZtWe, _, _ = self._span_products(Fe, He)  # Z'W e
        F = np.zeros((q, K + 1))
        H = np.zeros((p + 1, K + 1))
        for k in range(K):
            F[off[k]:off[k + 1], k] = ZtWe[off[k]:off[k + 1], 0] / ev.sigma2
        F[:, K] = Fe[:, 0] / ev.sigma2
        H[:, K] = He[:, 0] / ev.sigma2
        return F, H

    def _split_rhs(self, ZtW, XtW, theta):
        """Spherical right-hand sides ``[Lambda Z'W; X'W]`` in block order."""
        off = self._offsets
        f = self.first
        b1 = theta[f] * ZtW[off[f]:off[f + 1]]
        br = np.empty((self.qr + XtW.shape[0], ZtW.shape[1]))
        lo = 0
        for k in self.rest:
            hi = lo + off[k + 1] - off[k]
            np.multiply(theta[k], ZtW[off[k]:off[k + 1]], out=br[lo:hi])
            lo = hi
        br[lo:] = XtW
        return b1, br

    def solve_spherical(self, ev, b1, br, z_only=False):
        """Solve ``M x = b`` with the Z-and-X block of Omega factored at ``ev``.

        Parameters
        ----------
        ev : Evaluation
        b1 : ndarray, shape (q_1, m)
            Rows of the first (largest) factor.
        br : ndarray, shape (q_rest + p, m)
            Rows of the other factors, then X (``z_only``: the other factors only,
            shape ``(q_rest, m)``).
        z_only : bool
            Solve with ``Lambda Z'WZ Lambda + I`` alone (no X block).

        Returns
        -------
        x1, xr : ndarray
        """
        L, d, tr_ = ev.factor
        qr, p = self.qr, (0 if z_only else self.p)
        t1 = ev.theta[self.first]
        X1 = self.Z1T[:, :p]
        z = b1 / d[:, None]
        cr = np.array(br, dtype=np.float64, copy=True)
        if qr:
            cr[:qr] -= tr_[:, None] * self._Nt_times(t1 * z)
        if p:
            cr[qr:] -= t1 * (X1.T @ z)
        mp = qr + p
        xr = leading_cho_solve(L, mp, cr) if mp else cr
        back = X1 @ xr[qr:] if p else np.zeros_like(b1)
        if qr:
            back = back + self._N_times(tr_[:, None] * xr[:qr])
        x1 = (b1 - t1 * back) / d[:, None]
        return x1, xr

    def average_information(self, ev):
        """Average information matrix in the variance parameters.

        ``A_kl = 1/2 w_k' P w_l`` with working variates ``w_k = Z_k Z_k' P y`` for each
        factor and ``w_e = P y`` for the residual (:ref:`theory-reml-identities`); ``P w``
        comes from one solve with the factored mixed-model equations, so no trace is needed.

        Parameters
        ----------
        ev : Evaluation
            Where the matrix is formed (in a fit, the optimum).

        Returns
        -------
        ndarray, shape (n_factors + 1, n_factors + 1)
            Order: the factors' variances, then the residual variance.
        """
        if not self.has_rows:
            return 0.5 * self.quadratic_form_P_span(ev, *self.working_variates_span(ev))
        s2 = ev.sigma2
        e = self.residuals(ev)
        wt = self.weights
        we = e if wt is None else wt * e  # R^{-1} e s^2 = s^2 P y
        codes = self.design.codes
        W = np.empty((self.n, self.K + 1))
        for k in range(self.K):
            ze = np.bincount(codes[k], weights=we, minlength=self.design.n_levels[k])
            W[:, k] = ze[codes[k]] / s2
        W[:, self.K] = e / s2  # dV/ds_e^2 P y = W^{-1} P y
        return 0.5 * self.quadratic_form_P(ev, W)

    def quadratic_form_P(self, ev, W, z_only=False):
        """``W' P W`` for the columns of ``W``, exactly, by one solve in level space.

        ``P = R^{-1} - R^{-1} [Z X] C^{-1} [Z X]' R^{-1}`` is the REML projection
        (``z_only=True``: ``V^{-1}``, the same with Z alone), with ``R = s^2 W^{-1}``
        and ``s^2`` the evaluation's ``sigma2``.

        Parameters
        ----------
        ev : Evaluation
        W : ndarray, shape (n_obs, m)
        z_only : bool
            Use ``V^{-1}`` instead of ``P`` (ML's information).

        Returns
        -------
        ndarray, shape (m, m)
        """
        self._need_rows("quadratic forms of row vectors")
        wt = self.weights
        WW = W if wt is None else wt[:, None] * W
        return self._projected_gram(ev, self._zt_times(WW), self.X.T @ WW, W.T @ WW,
                                    z_only)

    def _zt_times(self, W):
        """``Z'W`` (``q x c``) for the columns of ``W`` (``n x c``): per factor and column
        the sums over each level's rows, in row order (``np.bincount``).

        For a small design one ``bincount`` over the bins ``(level, column)`` of all
        factors (its index cached per ``c``) adds the same values in the same order as
        one call per factor and column; larger designs take those calls (the index
        would hold ``n K c`` entries)."""
        n, c = W.shape
        q = self._offsets[-1]
        if n * self.K * c <= _ZT_TIMES_MAX_INDEX:
            idx = self._level_index.get(c)
            if idx is None:
                codes = np.asarray(self.design.codes, dtype=np.int64)
                lev = codes + np.asarray(self._offsets[:-1], dtype=np.int64)[:, None]
                idx = (lev[:, :, None] * c + np.arange(c)[None, None, :]).ravel()
                if len(self._level_index) >= 4:  # a few widths at most (AI: K + 1)
                    self._level_index.clear()
                self._level_index[c] = idx
            w = np.ascontiguousarray(W, dtype=np.float64).ravel()
            return np.bincount(idx, weights=np.tile(w, self.K), minlength=q * c).reshape(q, c)
        codes = self.design.codes
        return np.vstack([
            np.stack([np.bincount(codes[k], weights=W[:, j], minlength=self.design.n_levels[k])
                      for j in range(c)], axis=1)
            for k in range(self.K)
        ])

    def __call__(self, theta):
        """Return the criterion at ``theta`` (lme4's ``devfun``)."""
        return self.criterion(theta)


def leading_cho_solve(L, mp, b):
    """Solve ``L_11 L_11' x = b`` with the leading ``mp x mp`` block of the lower factor
    ``L`` (column-major), by triangular solves with the whole of ``L`` (no copy of the
    block): forward with ``[b; 0]``, the trailing part of the result set to 0, backward.

    Parameters
    ----------
    L : ndarray, shape (m, m)
        Lower Cholesky factor with a nonsingular trailing block.
    mp : int
    b : ndarray, shape (mp,) or (mp, k)

    Returns
    -------
    ndarray, shape of ``b``

    Examples
    --------
    >>> A = np.array([[4.0, 2.0, 1.0], [2.0, 3.0, 0.5], [1.0, 0.5, 2.0]])
    >>> L = np.asfortranarray(np.linalg.cholesky(A))
    >>> x = leading_cho_solve(L, 2, np.array([1.0, 2.0]))
    >>> bool(np.allclose(A[:2, :2] @ x, [1.0, 2.0]))
    True
    """
    m = L.shape[0]
    rhs = np.zeros((m,) + np.shape(b)[1:])
    rhs[:mp] = b
    y = tri_solve(L, rhs, lower=True)
    y[mp:] = 0.0
    return tri_solve(L, y, lower=True, trans=1)[:mp]


#: :meth:`DirectObjective._first_parts` keeps at most this many values of ``t1``, where
#: one entry holds at most ``_FIRST_CACHE_DOUBLES`` numbers (256 KiB)
_FIRST_CACHE_ENTRIES = 32
_FIRST_CACHE_DOUBLES = 2**15

#: :meth:`DirectObjective._zt_times` caches its one-``bincount`` index up to this many
#: entries (8 MiB)
_ZT_TIMES_MAX_INDEX = 2**20


def _csr_arrays(A):
    """``(indptr, indices, data)`` of a CSR matrix for :func:`_csr_times` (float64 data)."""
    return A.indptr, A.indices, np.asarray(A.data, dtype=np.float64)


def _csr_times(arrays, B, rows):
    """``A @ B`` for a CSR ``A`` given by :func:`_csr_arrays` with ``rows`` rows and a
    float64 ``B`` (1-d or 2-d): the serial ``csr_matmat`` kernel, which adds up each
    row's products in the order scipy's CSR product does (the same result, bit for bit),
    without scipy's dispatch (several microseconds a call)."""
    B = np.asarray(B, dtype=np.float64)
    vector = B.ndim == 1
    B2 = np.ascontiguousarray(B.reshape(-1, 1) if vector else B)
    out = np.empty((rows, B2.shape[1]))
    kernels.csr_matmat_serial(*arrays, B2, out)
    return out[:, 0] if vector else out


def theta_gradient(theta, n_levels, traces, v, sigma2):
    """Gradient of the profiled criterion in ``theta`` (both solvers use it).

    ``d/dtheta_k = 2/theta_k [q_k - tr((M^{-1})_kk) - ||v_k||^2 / s^2]`` for
    ``theta_k > 0``, and 0 at ``theta_k = 0`` (the criterion is even in ``theta_k``).

    Parameters
    ----------
    theta : ndarray, shape (K,)
    n_levels : sequence of int
        ``q_k``.
    traces : ndarray, shape (K,)
        ``tr((M^{-1})_kk)`` of the system whose log-determinant enters the criterion.
    v : list of ndarray
        Spherical conditional modes per factor.
    sigma2 : float
        Profiled residual variance ``s^2``.

    Returns
    -------
    ndarray, shape (K,)
    """
    grad = np.zeros(len(theta))
    for k, t in enumerate(theta):
        if t > 0.0:
            grad[k] = 2.0 / t * ((n_levels[k] - traces[k]) - float(v[k] @ v[k]) / sigma2)
    return grad


def conditional_residuals(design, X, y, ev):
    """Conditional residuals ``y - X beta - sum_k Z_k (theta_k v_k)`` (one pass over the rows).

    Parameters
    ----------
    design : CrossedDesign
    X : ndarray, shape (n_obs, p)
    y : ndarray, shape (n_obs,)
    ev : Evaluation
        Supplies ``beta``, ``theta`` and the spherical modes ``v``.

    Returns
    -------
    ndarray, shape (n_obs,)
    """
    r = y - X @ ev.beta
    for k in range(design.n_factors):
        if ev.theta[k] != 0.0:
            r -= (ev.theta[k] * ev.v[k])[design.codes[k]]
    return r


def theta_scale(design, weights=None, total_weight=None):
    """Natural scale of each ``theta_k``: ``1 / sqrt(mean weight per level of factor k)``.

    ``V_0 = I + sum_k theta_k^2 Z_k W Z_k'`` (up to ``W``) changes appreciably with
    ``theta_k`` once ``theta_k^2`` times the number of observations per level of factor
    ``k`` is about 1, whatever the other components are: that sets the scale of the
    optimiser's steps off the boundary and of its boundary tests.

    Parameters
    ----------
    design : CrossedDesign
    weights : ndarray, shape (n_obs,), optional
        Prior weights (a level's "count" is then its total weight).
    total_weight : float, optional
        The sum of the weights, in place of ``weights`` (from level-space statistics).

    Returns
    -------
    ndarray, shape (n_factors,)

    Examples
    --------
    >>> from lmmops.data.design import CrossedDesign
    >>> d = CrossedDesign.from_codes([[0, 0, 0, 0, 1, 1, 1, 1], [0, 1, 0, 1, 0, 1, 0, 1]])
    >>> theta_scale(d)
    array([0.5, 0.5])
    """
    if total_weight is not None:
        total = float(total_weight)
    else:
        total = float(design.n_obs) if weights is None else float(np.sum(weights))
    q = np.asarray(design.n_levels, dtype=np.float64)
    return np.sqrt(q / max(total, 1e-300))


def moment_start(design, X, y):
    """Starting values for ``theta`` from one-way moment estimators.

    For each factor, the unbiased one-way ANOVA estimators of the between-level and
    within-level variances are computed on the OLS residuals (the moment estimators
    of :ref:`theory-oneway`), and ``theta_k = sqrt(s_k^2 / s_e^2)`` with ``s_e^2`` the smallest
    within-level mean square. The start is per component on its own scale: an estimate
    at or below 0 starts at ``0.1 * theta_scale(design)[k]`` (:func:`theta_scale`), and
    the estimates are only clipped to ``[1e-3, 1e3]`` times that scale, so a variance
    ratio of ``1e6`` starts near its size instead of at a fixed cap. The optimiser does
    not rely on the start being good: :func:`fit_direct` verifies the optimum it reaches.

    Parameters
    ----------
    design : CrossedDesign
    X : ndarray, shape (n_obs, p)
    y : ndarray, shape (n_obs,)

    Returns
    -------
    ndarray, shape (n_factors,)

    Examples
    --------
    >>> import numpy as np
    >>> from lmmops.data.design import CrossedDesign
    >>> rng = np.random.default_rng(1)
    >>> a, b = np.repeat(np.arange(8), 6), np.tile(np.arange(6), 8)
    >>> d = CrossedDesign.from_codes([a, b])
    >>> y = 1e3 * rng.normal(size=8)[a] + rng.normal(size=6)[b] + rng.normal(size=48)
    >>> th = moment_start(d, np.ones((48, 1)), y)
    >>> bool(th[0] > 100)  # a variance ratio of about 1e6 starts near its size
    True
    """
    beta, *_ = np.linalg.lstsq(X, y, rcond=None)
    r = y - X @ beta
    n = r.size
    between, within = [], []
    for k in range(design.n_factors):
        cnt = design.counts(k).astype(np.float64)
        a = cnt.size
        sums = np.bincount(design.codes[k], weights=r, minlength=a)
        means = sums / cnt
        grand = r.mean()
        msa = float(np.sum(cnt * (means - grand) ** 2) / max(a - 1, 1))
        sse = float(np.sum((r - means[design.codes[k]]) ** 2))
        mse = sse / max(n - a, 1)
        n0 = (n - np.sum(cnt**2) / n) / max(a - 1, 1)
        between.append((msa - mse) / max(n0, 1e-300))
        within.append(mse)
    s2e = max(min(within), 1e-12 * max(float(np.var(r)), 1e-300))
    scale = theta_scale(design)
    th = np.array([np.sqrt(b / s2e) if b > 0 else 0.1 * s for b, s in zip(between, scale)])
    return np.clip(th, 1e-3 * scale, 1e3 * scale)


# relative trust radius of a Newton step (a positive theta_k changes by at most this
# factor of itself), and the relative criterion tolerances of the verification
_RADIUS = 4.0
_VERIFY_DECREMENT = 1e-9
_SLACK = 1e-10


class _Run:
    """Book-keeping of one optimisation: evaluations, the fit log and accepted iterations."""

    def __init__(self, objective, callback):
        self.objective = objective
        self.callback = callback
        self.fitlog = []
        self.iterations = 0
        self.joint_done = False  # the joint grid runs once per fit
        self._hessian = (None, None)

    def evaluate(self, theta):
        """The evaluation at ``theta``, or None where the factorisation fails."""
        try:
            ev = self.objective.evaluate(theta, gradient=True)
        except NumericalFailure:
            self.fitlog.append((np.asarray(theta, dtype=np.float64).copy(), np.inf))
            return None
        self.fitlog.append((ev.theta.copy(), ev.objective))
        return ev

    def value(self, theta):
        """The criterion alone at ``theta`` (no gradient), +inf where the factorisation
        fails."""
        try:
            f = float(self.objective(theta))
        except NumericalFailure:
            f = np.inf
        self.fitlog.append((np.asarray(theta, dtype=np.float64).copy(), f))
        return f

    def hessian(self, ev):
        """:func:`_newton_hessian` at ``ev``, computed once per evaluation."""
        if self._hessian[0] is not ev:
            self._hessian = (ev, _newton_hessian(self.objective, ev))
        return self._hessian[1]

    def accept(self, ev):
        """Count an accepted iterate and report it to the callback."""
        self.iterations += 1
        if self.callback is not None:
            self.callback(self.iterations, ev.theta, ev.objective)


def _newton_step(H, g, idx, unit):
    """Saddle-free Newton step on the components ``idx``, in units ``unit`` of theta.

    The Hessian is scaled to ``diag(unit) H diag(unit)``, its eigenvalues replaced by their
    absolute values with a relative floor; returns the step in those units (theta moves by
    ``unit * step``) and the scaled eigen-decomposition ``(U, |w|)``.
    """
    Hs = unit[:, None] * H[np.ix_(idx, idx)] * unit[None, :]
    w, U = np.linalg.eigh(Hs)
    w = np.maximum(np.abs(w), 1e-8 * max(1e-300, float(np.max(np.abs(w)))))
    step = -(U @ ((U.T @ (unit * g[idx])) / w))
    return step, U, w


def fit_direct(objective, start, *, maxiter=100, tol=1e-13, boundary_tol=1e-4,
               callback=None, restart=True):
    """Minimise a :class:`DirectObjective` over ``theta >= 0`` and verify the optimum.

    A projected Newton method. Its Hessian is the average-information matrix (exact
    solves with the working variates, ``docs/theory.rst``) mapped from the variance
    parameters to ``theta`` with the profiled residual variance eliminated, plus the exact
    first-derivative term ``g_k / theta_k`` that dominates near the boundary. Each
    component is stepped on its own relative scale (a saddle-free step in the units
    ``theta_k``, a positive component changing by at most a factor 5 per step), and steps
    are halved until the criterion decreases.

    The point it stops at is verified before it is called an optimum, as the criterion
    is even in each ``theta_k`` and so flat near ``theta_k = 0`` (where a first-order
    method sees a stationary point whatever the optimum is). Scales are per component,
    ``theta_scale`` (:func:`theta_scale`, about ``1/sqrt(rows per level)``):

    - the Newton decrement (the predicted decrease) is below ``1e-9 * max(1, |f|)``
      (or at the criterion's round-off level seen by a failed line search);
    - a component below ``boundary_tol`` times ``max(1, scale)`` is tried at exactly 0 and kept
      there if the criterion does not increase (a singular fit);
    - every component at 0 gets the one-sided second-order check: the derivative in
      ``theta_k^2`` at ``theta_k`` = 1e-2 of its scale. Where it is negative, or that
      point is lower, the component is scanned upwards by factors of 10 and Newton
      resumes from the best point; likewise a positive component where the criterion is
      concave in ``theta_k`` (tried at 0 and upwards);
    - a coarse grid in each component, the others fixed (0 and 1e-2 to 1e6 times its
      scale, every half decade, outwards until the criterion is 10 above the optimum)
      looks for another basin, and the other side of the boundary of each component is
      searched by Newton (the face ``theta_k = 0`` for a positive one, the interior from
      its scale for one at 0) where the grid found that start within the same 10: a local
      check cannot see a second, lower local minimum;
    - if any check is in doubt, the fit is restarted from ``theta = 1`` (the relative
      scale, lme4's and MixedModels.jl's start) and the better verified point is kept.

    A fit that stops for any other reason (iteration limit, a line search that cannot
    descend far from an optimum, a check that still fails) says ``converged=False`` with
    the reason in ``message``, and a :class:`~lmmops.errors.ConvergenceWarning` is issued.

    A stochastic objective (one whose evaluations carry ``gradient_cov``, such as
    :class:`~lmmops.estimation.iterative.IterativeObjective`) is minimised by the same projected
    Newton method on the absolute scale, stopping when the step is within its Monte Carlo error;
    the verification above does not apply to it.

    Parameters
    ----------
    objective : DirectObjective
    start : array_like, shape (n_factors,)
        Initial ``theta``, e.g. from :func:`moment_start`.
    maxiter : int
        Maximum number of Newton iterations (accepted steps), restarts included.
    tol : float
        Newton stops when the decrement is below ``tol * max(1, |criterion|)``.
    boundary_tol : float
        ``theta_k`` below ``boundary_tol * max(1, scale_k)`` are tried at 0 (lme4's
        boundary test on the relative scale, widened for components of a large scale).
    callback : callable, optional
        Called as ``callback(iteration, theta, objective)`` after each iteration.
    restart : bool
        Whether a fit whose verification is in doubt is restarted from ``theta = 1``.

    Returns
    -------
    evaluation : Evaluation
        At the optimum.
    summary : OptSummary

    Examples
    --------
    >>> from lmmops.data.design import CrossedDesign
    >>> rng = np.random.default_rng(0)
    >>> a, b = rng.integers(0, 6, 120), rng.integers(0, 4, 120)
    >>> d = CrossedDesign.from_codes([a, b])
    >>> y = rng.normal(size=6)[a] + 1e3 * rng.normal(size=4)[b] + rng.normal(size=120)
    >>> obj = DirectObjective(d, np.ones((120, 1)), y)
    >>> ev, opt = fit_direct(obj, np.array([0.1, 10.0]))
    >>> opt.converged, bool(ev.theta[1] > 100)
    (True, True)
    """
    t0 = time.perf_counter()
    start = np.asarray(start, dtype=np.float64)
    run = _Run(objective, callback)
    n_eval0 = objective.n_evaluations
    ev = run.evaluate(start)
    if ev is None:
        ev = objective.evaluate(start, gradient=True)  # raises with the reason
    f0 = ev.objective
    if getattr(ev, "gradient_cov", None) is not None:
        ev, converged, message = _fit_stochastic(run, ev, maxiter, tol, boundary_tol)
        restarts = 0
    else:
        ev, converged, message, restarts = _fit_exact(run, ev, maxiter, tol, boundary_tol,
                                                      restart)
    pg = _projected_gradient(ev.theta, ev.gradient)
    gnorm = float(np.max(np.abs(pg))) if pg.size else 0.0
    if not converged:
        warnings.warn(f"the REML/ML optimisation did not converge: {message} "
                      f"(projected gradient {gnorm:.3g})", ConvergenceWarning, stacklevel=2)
    summary = OptSummary(
        theta_initial=start, theta_final=ev.theta.copy(), f_initial=float(f0),
        f_final=ev.objective, n_evaluations=objective.n_evaluations - n_eval0,
        iterations=run.iterations, gradient_norm=gnorm, converged=bool(converged),
        message=message, optimizer="projected Newton (average information)",
        elapsed_s=time.perf_counter() - t0, fitlog=run.fitlog, restarts=restarts,
    )
    return ev, summary


def _fit_exact(run, ev, maxiter, tol, boundary_tol, restart):
    """Descend, verify, and restart from ``theta = 1`` if the verification is in doubt."""
    obj = run.objective
    if getattr(obj, "has_rows", True) or not obj.weighted:
        scale = theta_scale(obj.design, getattr(obj, "weights", None))
    else:  # statistics alone: the total weight is the sum of a factor's weighted counts
        scale = theta_scale(obj.design, total_weight=float(np.sum(obj.stats.D[0])))
    start = ev.theta.copy()
    ev, doubt, dec = _descend(run, ev, maxiter, tol, boundary_tol, scale)
    restarts = 0
    ones = np.ones(run.objective.K)
    if doubt and restart and run.iterations < maxiter and not np.array_equal(start, ones):
        ev1 = run.evaluate(ones)
        if ev1 is not None:
            restarts = 1
            ev1, doubt1, dec1 = _descend(run, ev1, maxiter, tol, boundary_tol, scale)
            slack = _SLACK * max(1.0, abs(ev.objective))
            if ev1.objective < ev.objective - slack or (
                    doubt1 is None and ev1.objective <= ev.objective + slack):
                ev, doubt, dec = ev1, doubt1, dec1
    if doubt is not None:
        if restarts:
            doubt += " (also after a restart from theta = 1)"
        return ev, False, doubt, restarts
    msg = f"verified optimum (Newton decrement {dec:.2g}"
    zero = np.flatnonzero(ev.theta == 0.0)
    if zero.size:
        msg += "; one-sided check passed at theta[" + ", ".join(map(str, zero)) + "] = 0"
    if restarts:
        msg += "; after a restart from theta = 1"
    return ev, True, msg + ")", restarts


def _descend(run, ev, maxiter, tol, boundary_tol, scale):
    """Newton, then the boundary checks, until they move nothing.

    Returns ``(ev, doubt, decrement)``: the final evaluation, None if it is a verified
    optimum (otherwise the reason it is not) and the last Newton decrement.
    """
    while True:
        ev, decrement, why, noise = _newton_exact(run, ev, maxiter, tol, boundary_tol, scale)
        if why == "maxiter":
            return ev, "maximum number of iterations reached", decrement
        ev, moved, doubt = _boundary_moves(run, ev, maxiter, tol, boundary_tol, scale)
        if moved:
            run.accept(ev)
            continue
        if doubt is not None:
            return ev, doubt, decrement
        # the decrement must be below the tolerance, or (when the line search failed) at
        # the criterion's round-off level seen along the line, capped at 1e-7 relative
        f = max(1.0, abs(ev.objective))
        limit = max(_VERIFY_DECREMENT * f, min(10.0 * noise, 1e-7 * f))
        if decrement > limit:
            return ev, (f"line search could not decrease the criterion (Newton decrement "
                        f"{decrement:.3g}, above {limit:.3g})"), decrement
        return ev, None, decrement


def _newton_exact(run, ev, maxiter, tol, boundary_tol, scale, main=True):
    """Projected saddle-free Newton on the positive components, each on its own scale.

    ``main=False`` for a side search (:func:`_boundary_moves`): its steps are not the
    fit's iterations (no callback) and it takes at most 20 of them.

    Returns ``(ev, decrement, why, noise)``: ``why`` is ``"decrement"``, ``"boundary"``
    (every component at 0), ``"concave"`` (a component near 0 where the criterion is
    concave in it, and a decrement below ``1e-6`` relative: Newton would only creep
    away, doubling it per step), ``"round-off"``
    (two steps in a row that gained less than ``1e-12`` relative with a decrement below
    the verification tolerance), ``"line search"`` or ``"maxiter"``; ``noise`` is the
    largest change of the criterion seen at line-search steps too short to change it
    (its round-off level), 0 if none.
    """
    noise = 0.0
    stalled = 0
    steps = 0
    while (run.iterations < maxiter) if main else (steps < 20):
        theta, g = ev.theta, ev.gradient
        f = max(1.0, abs(ev.objective))
        idx = np.flatnonzero(theta > 0)
        if idx.size == 0:
            return ev, 0.0, "boundary", noise
        H = run.hessian(ev)
        unit = theta[idx]
        step, _, _ = _newton_step(H, g, idx, unit)
        big = float(np.max(np.abs(step)))
        if big > _RADIUS:
            step *= _RADIUS / big
        decrement = float(-(unit * g[idx]) @ step)
        if decrement <= tol * f:
            return ev, max(decrement, 0.0), "decrement", noise
        if decrement <= 1e-6 * f and np.any(
                _concave(H, theta, scale, ev.objective) & (theta < 0.1 * scale)):
            return ev, decrement, "concave", noise
        alpha = 1.0
        for i in range(25):
            trial = theta.copy()
            # fraction to the boundary: one step shrinks a component at most tenfold, and
            # one already below boundary_tol of its scale goes to 0 instead
            new = unit * (1.0 + alpha * step)
            floor = 0.1 * unit
            snap = floor < boundary_tol * np.maximum(1.0, scale[idx])
            trial[idx] = np.where(new >= floor, new, np.where(snap, 0.0, floor))
            ev_t = run.evaluate(trial)
            if ev_t is not None and i >= 15:
                noise = max(noise, abs(ev_t.objective - ev.objective))
            # a strict decrease: equal values are round-off, where creeping on is useless
            if ev_t is not None and ev_t.objective < ev.objective:
                break
            alpha *= 0.5
        else:
            return ev, decrement, "line search", noise
        gain = ev.objective - ev_t.objective
        stalled = stalled + 1 if gain < 1e-12 * f and decrement <= _VERIFY_DECREMENT * f \
            else 0
        ev = ev_t
        steps += 1
        if main:
            run.accept(ev)
        if stalled >= 2:
            return ev, decrement, "round-off", noise
    return ev, np.inf, "maxiter", noise


def _concave(H, theta, scale, f):
    """Positive components where the criterion is concave (over their natural scale)."""
    return (theta > 0) & (np.diag(H) * scale**2 < -_VERIFY_DECREMENT * max(1.0, abs(f)))


def _boundary_moves(run, ev, maxiter, tol, boundary_tol, scale):
    """The boundary checks of :func:`fit_direct` at the point Newton stopped.

    Components below ``boundary_tol`` of their scale where the criterion is not concave
    are set to 0 if that is not worse; components at 0, and positive ones where the
    criterion is concave, are scanned (:func:`_scan`) and the best lower point is taken.
    Failing that, a coarse grid in each component (:func:`_grid_scan`); then the other
    side of the boundary of each component is searched by Newton: the face
    ``theta_k = 0`` for a positive component, and the interior from ``theta_k`` at its
    scale for one at 0 (a second local minimum across the boundary, which no local check
    can see), where the grid found that start less than :func:`_barrier` above ``ev``.
    Returns ``(ev, moved, doubt)``: the
    possibly improved point, whether it moved (by more than the slack), and None or the
    reason a check is in doubt.
    """
    K = run.objective.K
    slack = _SLACK * max(1.0, abs(ev.objective))
    H = run.hessian(ev) if np.any(ev.theta > 0) else np.zeros((K, K))
    concave = _concave(H, ev.theta, scale, ev.objective)
    for k in range(K):  # near-zero convex components tried at exactly 0 (a singular fit)
        # lme4's 1e-4 on the relative scale theta, widened to 1e-2 of the component's own
        # scale: the value at 0 decides, so a wider window only tries more points
        if 0.0 < ev.theta[k] < max(boundary_tol * max(1.0, scale[k]), 1e-2 * scale[k]):
            ev_t = _at(run, ev, k, 0.0)
            if ev_t is not None and ev_t.objective <= ev.objective + slack:
                ev = ev_t
    # scans of the components at 0 and the concave ones; the best lower point wins
    best = None
    for k in np.flatnonzero((ev.theta == 0.0) | concave):
        ev_t = _scan(run, ev, k, scale[k])
        if ev_t is not None and ev_t.objective < (ev if best is None else best).objective:
            best = ev_t
    if best is not None and best.objective < ev.objective - slack:
        return best, True, None
    best, seen = _grid_scan(run, ev, scale)
    if best is not None:
        ev_t = run.evaluate(best)
        if ev_t is not None:
            return ev_t, True, None
    # Newton from other starts, the first that ends lower wins: the joint grid's basins
    # and the transfers of variance between two components; the other side of the
    # boundary of each component (the face theta_k = 0 for a positive one, theta_k = its
    # scale for one at 0) where the grid found that start within the barrier; and a
    # second dip in the grid's profile along one component (a basin behind a hump, whose
    # grid points are above ev with the others fixed)
    starts = _joint_grid(run, ev, scale) + _transfers(run, ev)
    for k in np.flatnonzero(~concave):
        t = scale[k] if ev.theta[k] == 0.0 else 0.0
        if seen.get((k, t), np.inf) <= ev.objective + _barrier(ev.objective):
            trial = ev.theta.copy()
            trial[k] = t
            starts.append(trial)
    starts += _profile_dips(ev, seen)
    for start in starts:
        ev_t = run.evaluate(start)
        if ev_t is not None:
            ev_t = _newton_exact(run, ev_t, maxiter, tol, boundary_tol, scale,
                                 main=False)[0]
            if ev_t.objective < ev.objective - slack:
                return ev_t, True, None
    doubt = None
    for k in np.flatnonzero(concave):
        doubt = (f"the criterion is concave in theta[{k}] = {ev.theta[k]:.3g} and no "
                 f"lower point was found along it")
    return ev, False, doubt


def _profile_dips(ev, seen):
    """Starts at the local minima of the per-component grid profiles, away from ``ev``.

    ``seen`` is :func:`_grid_scan`'s criterion at ``(k, theta_k)``, the others fixed at
    ``ev``. Along each component the profile (with ``ev`` itself) is ordered by
    ``theta_k``; a grid point lower than both its neighbours, other than ``ev``'s own
    value, and less than :func:`_barrier` above ``ev``, is the bottom of another dip.
    """
    top = ev.objective + _barrier(ev.objective)
    starts = []
    for k in range(ev.theta.size):
        prof = sorted([(t, f) for (j, t), f in seen.items() if j == k]
                      + [(float(ev.theta[k]), ev.objective)])
        for i in range(1, len(prof) - 1):
            t, f = prof[i]
            if t != ev.theta[k] and f <= top and f < prof[i - 1][1] and f < prof[i + 1][1]:
                trial = ev.theta.copy()
                trial[k] = t
                starts.append((f, trial))
    return [t for _, t in sorted(starts, key=lambda x: x[0])]


def _barrier(f):
    """How far above the optimum ``f`` the side searches look: ``10 + 1e-5 |f|``.

    A basin behind a barrier this high in the criterion (a deviance difference of more
    than 10) is not searched for; see :func:`_grid_scan`.
    """
    return 10.0 + 1e-5 * abs(f)


#: the per-component grid's decades (:func:`_grid_scan`)
GRID_DECADES = tuple(np.arange(-2.0, 6.01, 0.5))


def _grid_scan(run, ev, scale, decades=GRID_DECADES):
    """A lower point on a coarse grid in each component, the others fixed, or None.

    Each ``theta_k`` in turn takes the values ``10^j`` times its scale for ``j`` in
    ``decades`` (from 1e-2 to 1e6 times the scale in half decades: variance ratios from
    about 1e-4 to 1e12 times the one that matters; two-decade steps missed a basin a
    factor 7 away behind a hump) and 0, outwards from the current value in each
    direction (values within a factor 3 of it are skipped), until the criterion rises more
    than :func:`_barrier` above ``ev``; only the criterion is evaluated (no gradient).
    Returns ``(best, seen)``: the lowest theta if it is lower than ``ev`` by more than
    ``1e-9`` relative (another basin of the criterion, which Newton then descends, and
    which no local check can see) or None, and the criterion at every point evaluated,
    keyed by ``(k, theta_k)``.
    """
    f0 = ev.objective
    best_t, best_f = None, f0 - 1e-9 * max(1.0, abs(f0))
    top = f0 + _barrier(f0)
    grid = 10.0 ** np.asarray(decades, dtype=np.float64)
    seen = {}
    for k in range(run.objective.K):
        now = ev.theta[k]
        pts = grid * scale[k]
        up = pts[pts >= 3.0 * now] if now > 0 else pts
        down = list(pts[pts <= now / 3.0][::-1]) + [0.0] if now > 0 else []
        for direction in (up, down):
            for t in direction:
                trial = ev.theta.copy()
                trial[k] = t
                f = seen[(k, float(t))] = run.value(trial)
                if f < best_f:
                    best_t, best_f = trial, f
                if f > top:
                    break
    return best_t, seen


#: the joint grid (:func:`_joint_grid`) runs for at most this many components and a
#: Schur block (the levels outside the largest factor) of at most this size, where an
#: evaluation costs well under a millisecond
JOINT_GRID_MAX_K = 3
JOINT_GRID_MAX_SCHUR = 400


def _small_level_space(obj):
    """Whether the joint searches run (:data:`JOINT_GRID_MAX_K`,
    :data:`JOINT_GRID_MAX_SCHUR`)."""
    return obj.K <= JOINT_GRID_MAX_K and getattr(obj, "qr", np.inf) <= JOINT_GRID_MAX_SCHUR


#: decades between the joint grid's points, by the number of components: about 200
#: points in all (34, 100, 216), over 1e-2 to 1e6 times each component's scale
JOINT_GRID_STEP = {1: 0.25, 2: 1.0, 3: 2.0}


def _joint_grid(run, ev, scale, starts=3):
    """Starts for Newton from the joint grid of all components (once per fit).

    Every combination of ``theta_k`` in ``{0} U {10^j scale_k}``, ``j`` from -2 to 6 in
    steps of :data:`JOINT_GRID_STEP` decades (criterion only). Returns the grid's local
    minima (no lower point among the neighbours along each axis) that are less than
    :func:`_barrier` above ``ev``, lowest first, at most ``starts`` of them (an empty
    list where the grid does not run): each is a basin of the criterion, and Newton is
    run from it, as a coarse grid point can sit a few units above a lower optimum.

    The per-component grid (:func:`_grid_scan`) moves one component at a time and so
    cannot see a basin reached only by moving two at once: with few levels per factor,
    two factors can explain the same variation, and the criterion then has a local
    minimum with the variance on the wrong one (seen with 3, 3 and 5 levels, 13.5 above
    the optimum). Even with one factor the criterion can have a minimum at 0 and a lower
    one inside (ML, two levels: 0.04 apart) with a hump between them that the
    per-component grid steps over. Runs only on small level spaces
    (:data:`JOINT_GRID_MAX_K`, :data:`JOINT_GRID_MAX_SCHUR`), where such designs live and
    the grid costs about 200 cheap evaluations; elsewhere the verification is the local
    and per-component one (``docs/guarantees.rst``).
    """
    obj = run.objective
    if run.joint_done or not _small_level_space(obj):
        return []
    run.joint_done = True
    top = ev.objective + _barrier(ev.objective)
    decades = np.arange(-2.0, 6.0 + 1e-9, JOINT_GRID_STEP[obj.K])
    axis = np.concatenate([[0.0], 10.0 ** decades])
    shape = (axis.size,) * obj.K
    points = np.array(list(itertools.product(*[axis * s for s in scale])))
    f = np.array([run.value(p) for p in points]).reshape(shape)
    local = np.ones(shape, dtype=bool)
    for k in range(obj.K):  # no lower neighbour along any axis
        lower = np.full(shape, np.inf)
        sl = [slice(None)] * obj.K
        for a, b in ((slice(1, None), slice(None, -1)), (slice(None, -1), slice(1, None))):
            sl_a, sl_b = list(sl), list(sl)
            sl_a[k], sl_b[k] = a, b
            lower[tuple(sl_a)] = np.minimum(lower[tuple(sl_a)], f[tuple(sl_b)])
        local &= f <= lower
    flat = f.ravel()
    order = [i for i in np.argsort(flat, kind="stable") if local.ravel()[i] and flat[i] <= top]
    return [points[i] for i in order[:starts]]


def _transfers(run, ev, factor=10.0):
    """Starts that move variance from one component to another (small level spaces).

    For each ordered pair ``(j, k)`` with ``theta_j > 0``: ``theta_j`` divided by
    ``factor`` and ``theta_k`` raised so that ``theta_j^2 + theta_k^2`` is unchanged,
    kept if the criterion there is less than :func:`_barrier` above ``ev``. Where two
    factors can explain the same variation (few levels each) the criterion has a basin
    for each way of sharing it, close in value (0.1 apart with 4, 3 and 2 levels) and
    too close in theta for a grid to separate; this visits the other one. Runs at every
    point the checks reach (at most ``K (K - 1)`` criterion values), under the joint
    grid's limits.
    """
    obj = run.objective
    if obj.K < 2 or not _small_level_space(obj):
        return []
    top = ev.objective + _barrier(ev.objective)
    starts = []
    for j, k in itertools.permutations(range(obj.K), 2):
        tj, tk = ev.theta[j], ev.theta[k]
        if tj <= 0.0:
            continue
        trial = ev.theta.copy()
        trial[j] = tj / factor
        trial[k] = math.sqrt(tk * tk + tj * tj * (1.0 - factor**-2))
        if run.value(trial) <= top:
            starts.append(trial)
    return starts


def _at(run, ev, k, t):
    """The evaluation at ``ev.theta`` with component ``k`` set to ``t`` (None on failure)."""
    trial = ev.theta.copy()
    trial[k] = t
    return run.evaluate(trial)


def _scan(run, ev, k, s):
    """A lower point along component ``k`` from ``ev``, or None.

    At ``theta_k = 0`` the first probe, at ``1e-2 * s``, is the one-sided second-order
    check: its derivative ``g_k / (2 theta_k)`` is the criterion's derivative in
    ``theta_k^2`` at 0. A non-negative derivative with no decrease accepts the boundary
    (one evaluation); otherwise the scan goes on upwards by factors of 10 while the
    criterion decreases. From a positive ``theta_k`` (where the criterion is concave in
    it) the boundary is tried, and upwards the first of the factors ``10, 10^(1/2),
    10^(1/4), 10^(1/8)`` that decreases the criterion, repeated while it decreases.
    """
    theta = ev.theta
    best, factor, ev0 = ev, 10.0, None
    if theta[k] == 0.0:
        cand = _at(run, ev, k, 1e-2 * s)
        if cand is None or (cand.gradient[k] >= 0.0 and cand.objective >= ev.objective):
            return None  # one-sided check passed: the criterion increases off the boundary
    else:
        ev0 = _at(run, ev, k, 0.0)
        for factor in 10.0 ** (0.5 ** np.arange(4)):
            cand = _at(run, ev, k, theta[k] * factor)
            if cand is not None and cand.objective < ev.objective:
                break
    for _ in range(14):
        if cand is None or cand.objective >= best.objective:
            break
        best = cand
        cand = _at(run, ev, k, best.theta[k] * factor)
    if ev0 is not None and ev0.objective < best.objective:
        best = ev0
    return best if best is not ev else None


def _fit_stochastic(run, ev, maxiter, tol, boundary_tol):
    """The projected Newton method for a stochastic objective (absolute scale).

    Stops when the Newton step is within the Monte Carlo error of every parameter, or
    the decrement is below ``tol``; near-zero ``theta_k`` are tried at 0 and components
    at 0 probed at ``1e-2`` and ``1e-1`` times the largest component.
    """
    objective = run.objective
    K = objective.K

    def newton(ev):
        converged = False
        message = "maximum number of iterations reached"
        while run.iterations < maxiter:
            theta, g = ev.theta, ev.gradient
            free = (theta > 0) | (g < 0)
            idx = np.flatnonzero(free)
            if idx.size == 0:
                converged, message = True, "all parameters on the boundary"
                break
            step, U, w = _newton_step(_newton_hessian(objective, ev), g, idx,
                                      np.ones(idx.size))
            noise = 0.0
            step_sd = None
            gcov = getattr(ev, "gradient_cov", None)
            if gcov is not None:  # stochastic objective: the step explained by MC noise alone
                Hinv = U @ np.diag(1.0 / w) @ U.T
                C = Hinv @ gcov[np.ix_(idx, idx)] @ Hinv
                noise = float(np.trace(Hinv @ gcov[np.ix_(idx, idx)]))
                step_sd = np.sqrt(np.maximum(np.diag(C), 0.0))
            radius = max(1.0, float(np.linalg.norm(theta[idx])))
            snorm = float(np.linalg.norm(step))
            if snorm > radius:
                step *= radius / snorm
            decrement = float(-g[idx] @ step)
            if decrement <= tol * max(1.0, abs(ev.objective)):
                converged, message = True, "Newton decrement below tolerance"
                break
            if step_sd is not None and np.all(np.abs(step) <= 2.0 * step_sd):
                converged = True
                message = "Newton step within the Monte Carlo error of every parameter"
                break
            accepted = False
            alpha = 1.0
            for _ in range(30 if gcov is None else 3):
                trial = theta.copy()
                # fraction to the boundary: one step shrinks a coordinate at most tenfold
                trial[idx] = np.maximum(theta[idx] + alpha * step, 0.1 * theta[idx])
                ev_t = run.evaluate(trial)
                if ev_t is not None and ev_t.objective <= ev.objective:
                    accepted = True
                    break
                alpha *= 0.5
            if not accepted:
                converged = decrement <= max(1e-6 * max(1.0, abs(ev.objective)), 25.0 * noise)
                message = "line search could not decrease the criterion"
                break
            ev = ev_t
            run.accept(ev)
        return ev, converged, message

    for _round in range(4):
        ev, converged, message = newton(ev)
        # boundary check: near-zero theta_k are tried at exactly 0 (a singular fit)
        theta = ev.theta.copy()
        for k in range(K):
            if 0.0 < theta[k] < boundary_tol:
                trial = theta.copy()
                trial[k] = 0.0
                ev_t = run.evaluate(trial)
                slack = 1e-10 * max(1.0, abs(ev.objective))
                if ev_t is not None and ev_t.objective <= ev.objective + slack:
                    ev, theta = ev_t, trial
        # escape: the criterion is even in each theta_k, so its gradient at theta_k = 0 is
        # 0 and Newton cannot leave the boundary; probe small positive values instead
        moved = False
        for k in np.flatnonzero(ev.theta == 0.0):
            for delta in (1e-2, 1e-1):
                trial = ev.theta.copy()
                trial[k] = delta * max(1.0, float(np.max(ev.theta)))
                ev_t = run.evaluate(trial)
                if ev_t is not None and ev_t.objective < ev.objective - 1e-9 * max(
                        1.0, abs(ev.objective)):
                    ev, moved = ev_t, True
                    break
        if not moved or run.iterations >= maxiter:
            break
    return ev, converged, message


def _newton_hessian(objective, ev):
    """Approximate Hessian of the profiled criterion in theta (see :func:`fit_direct`)."""
    K = objective.K
    s2 = ev.sigma2
    theta, g = ev.theta, ev.gradient
    AI = objective.average_information(ev)
    J = np.zeros((K + 1, K + 1))
    for k in range(K):
        J[k, k] = 2.0 * s2 * theta[k]
        J[k, K] = theta[k] ** 2
    J[K, K] = 1.0
    H = J.T @ (2.0 * AI) @ J
    for k in range(K):
        if theta[k] > 0:
            H[k, k] += g[k] / theta[k]
            H[k, K] += g[k] / s2
            H[K, k] += g[k] / s2
    Hs = H[:K, :K] - np.outer(H[:K, K], H[K, :K]) / H[K, K]
    return 0.5 * (Hs + Hs.T)


def _projected_gradient(theta, grad):
    g = np.asarray(grad, dtype=np.float64).copy()
    at_lb = theta <= 0.0
    g[at_lb & (g > 0)] = 0.0
    return g


def warm_up():
    """Compile (or load from Numba's cache) the kernels of the exact fit on a tiny model.

    Call it before timing a fit, so that the time is the fit's and not compilation's (the
    ``lmmops demo`` command and the asv benchmarks do).

    Examples
    --------
    >>> warm_up()
    """

    a = np.array([0, 0, 1, 1, 2, 2, 0, 1])
    b = np.array([0, 1, 0, 1, 0, 1, 1, 0])
    d = CrossedDesign.from_codes([a, b])
    y = np.arange(8, dtype=float) ** 1.5
    DirectObjective(d, np.ones((8, 1)), y).evaluate(np.array([0.5, 0.5]))
