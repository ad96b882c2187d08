r"""Matrix-free REML and ML for vector-valued random-effects terms (random slopes).

The counterpart of :class:`lmmops.estimation.vector.VectorObjective` (the exact,
blocked-Cholesky solver, whose Schur block of all terms but the first is dense) for
designs where that block is too large. The model, criterion and gradient are those of
``docs/theory_slopes.rst``; with ``Lambda = blockdiag_k(I_{q_k} (x) T_k)`` and the sparse
``C = Z'WZ`` (built once, :func:`lmmops.estimation.vector.vector_statistics`),

.. math::

    A(\theta) = \Lambda^\top C \Lambda + I

is applied matrix-free: ``Lambda x`` reshapes each term's block to ``(q_k, d_k)`` and
multiplies by ``T_k`` (no Kronecker product is formed), ``C x`` is the row-parallel CSR
kernel of :mod:`lmmops.linalg.kernels`. Per evaluation there is one block PCG solve
(:func:`lmmops.linalg.krylov.block_pcg`) with the **block-Jacobi** preconditioner
``D = blockdiag_j(D_j)``, the ``d_k x d_k`` diagonal blocks of ``A`` per level
(``D_j = T_k' C_jj T_k + I``, batched Cholesky ``D_j = L_j L_j'``), and right-hand sides

- ``Lambda' Z'W[X y]``: generalised least squares given ``theta`` (``beta``, ``r^2``,
  ``log|X'V0^{-1}X|``, the conditional modes), exact to the CG tolerance;
- ``L z_i`` for Rademacher probes ``z_i`` drawn once per objective (common random
  numbers), so that CG on ``A`` with ``M = D^{-1}`` is CG on
  ``L^{-1} A L^{-T}`` started at ``z_i``.

Stochastic parts, with Monte Carlo standard errors from the spread over the probes:

- ``log|A| = log|D| + log|L^{-1} A L^{-T}|``: the first term exact (the control variate),
  the second by stochastic Lanczos quadrature from the probe columns' CG coefficients
  (:func:`lmmops.linalg.trace.lanczos_from_cg`, no extra products);
- the trace part of the gradient, ``tr(A^{-1} dA)`` with
  ``dA = Lambda_m' C Lambda + Lambda' C Lambda_m`` (``Lambda_m = I (x) E_ab`` for entry
  ``(a, b)`` of ``T_k``): ``tr(D^{-1} dA)`` exact from the diagonal blocks and Hutchinson
  on the difference, ``w_i' dA (x_i - w_i)`` with ``x_i = A^{-1} L z_i`` (the probe
  solves) and ``w_i = L^{-T} z_i = D^{-1} L z_i``. No inverse of ``T_k`` appears, so the
  gradient is valid on the boundary.

The rest of the gradient (``log|X'V0^{-1}X|`` and ``r^2``) is exact given the solves.
The gradient estimate is **not** the derivative of the criterion estimate at fixed
probes: the derivative of the quadrature ``z' log(L^{-1} A L^{-T}) z`` is not
``z' (L^{-1} A L^{-T})^{-1} L^{-1} dA L^{-T} z`` (the matrices do not commute, and
``L`` moves with ``theta``). Both are unbiased for the exact quantities, so they agree
within Monte Carlo error; :func:`fit_vector_iterative` therefore solves ``g_W = 0`` (the
fixed-probe gradient, a smooth deterministic function) by Newton steps on its
finite-difference Jacobian after AI-Newton steps (the average information needs no
probes), rather than trusting a line search on the criterion.

Examples
--------
>>> import numpy as np, pandas as pd
>>> from lmmops.data.terms import RandomEffectsTerm
>>> from lmmops.estimation.vector import VectorObjective
>>> rng = np.random.default_rng(0)
>>> n = 600
>>> g, h = rng.integers(0, 30, n).astype(np.int32), rng.integers(0, 12, n).astype(np.int32)
>>> x = rng.normal(size=n)
>>> y = (rng.normal(size=30)[g] + 0.5 * rng.normal(size=30)[g] * x
...      + rng.normal(size=12)[h] + rng.normal(size=n))
>>> terms = [RandomEffectsTerm("g", g, pd.Index(range(30)), ("(Intercept)", "x"),
...                            np.column_stack([np.ones(n), x])),
...          RandomEffectsTerm("h", h, pd.Index(range(12)))]
>>> X = np.ones((n, 1))
>>> it = VectorIterativeObjective(terms, X, y, n_probes=32, seed=1)
>>> theta = np.array([1.0, 0.2, 0.5, 0.9])
>>> ev = it.evaluate(theta)
>>> exact = VectorObjective(terms, X, y).evaluate(theta).objective
>>> bool(abs(ev.objective - exact) < 4 * ev.objective_se + 1e-8)
True
"""

from __future__ import annotations

import math
import time
from types import SimpleNamespace

import numpy as np
import scipy.linalg as sla
import scipy.optimize as sopt
from scipy import stats

from lmmops.data.terms import lower_triangle
from lmmops.errors import ArgumentError, LmmopsError
from lmmops.estimation.direct import Evaluation, OptSummary
from lmmops.estimation.iterative import (
    PRECONDITIONERS as INTERCEPT_PRECONDITIONERS,
)
from lmmops.estimation.iterative import (
    check_n_probes,
    check_rtol,
    check_seed,
)
from lmmops.estimation.vector import (
    VectorObjective,
    _canonical_theta,
    block_closed_arrays,
    check_theta,
    last_evaluation_cache,
    profiled_gls,
    random_effects_matrix,
    setup_objective,
    span_average_information,
    spherical_rows,
    start_theta,
    vector_statistics,
)
from lmmops.linalg import kernels, krylov
from lmmops.linalg.trace import (
    chunked_diagonal,
    lanczos_from_cg,
    rademacher,
    slq_quadrature,
)

__all__ = ["AI_RTOL", "PEV_PROBES", "PRECONDITIONERS", "VectorIterativeObjective",
           "check_slope_preconditioner", "fit_vector_iterative"]

#: Rademacher probes of the stochastic prediction error covariances (level_blocks).
PEV_PROBES = 64

#: The preconditioner kinds of the slope solver. ``"auto"`` means ``"block_jacobi"``.
PRECONDITIONERS = ("block_jacobi",)

#: CG tolerance of the average information's solve (:meth:`VectorIterativeObjective.
#: average_information`): it steers the optimiser only.
AI_RTOL = 1e-6

#: Non-zeros of ``C = Z'WZ`` from which the parallel CSR kernel is used.
_PARALLEL_MIN_NNZ = 200_000


def check_slope_preconditioner(kind):
    """Validate a preconditioner kind for random-slope terms.

    Parameters
    ----------
    kind : str or None
        ``"block_jacobi"``, ``"auto"`` or None (both mean ``"block_jacobi"``).

    Returns
    -------
    kind : str
        Always ``"block_jacobi"`` (the one kind for slope terms).

    Raises
    ------
    ArgumentError
        For a kind of the random-intercept solver (they are built on the diagonal
        ``Z'Z + Lambda^{-2}`` of scalar terms and do not apply to ``d_k x d_k`` blocks),
        or an unknown kind.

    Examples
    --------
    >>> check_slope_preconditioner("auto")
    'block_jacobi'
    """
    if kind is None or kind in ("auto", "block_jacobi"):
        return "block_jacobi"
    if kind in INTERCEPT_PRECONDITIONERS:
        raise ArgumentError(
            f"preconditioner={kind!r} is for random-intercept models (it is built on "
            "Z'Z + Lambda^{-2} with one scalar variance per factor, which a random-slope "
            "term's d x d covariance blocks do not have); random-slope terms use "
            "preconditioner='block_jacobi' (or 'auto'): the d_k x d_k diagonal blocks per "
            "level")
    raise ArgumentError(f"preconditioner must be one of {', '.join(PRECONDITIONERS)} or "
                        f"'auto' for random-slope terms, got {kind!r}")


class VectorIterativeObjective:
    """The profiled REML/ML criterion of a random-slope model, matrix-free, with Monte
    Carlo errors.

    Same interface as :class:`lmmops.estimation.vector.VectorObjective` (``evaluate``
    returning an :class:`~lmmops.estimation.direct.Evaluation`, ``residuals``, lme4's
    ``theta``), fitted by :func:`fit_vector_iterative`.

    Parameters
    ----------
    terms : sequence of RandomEffectsTerm
        In lme4's order.
    X : ndarray, shape (n_obs, p)
    y : ndarray, shape (n_obs,)
    method : {"REML", "ML"}
    weights : array_like, shape (n_obs,), optional
        Prior weights (``R = s^2 W^{-1}``).
    n_probes : int
        Rademacher probes (at least 2), drawn once (common random numbers).
    seed : int or numpy.random.Generator
        Seed of the probes.
    rtol : float
        CG tolerance (relative residual per column), ``0 < rtol < 1``.
    maxiter : int
        CG iteration limit per solve.
    preconditioner : str
        ``"block_jacobi"`` (or ``"auto"``); see :func:`check_slope_preconditioner`.
    parallel : bool, optional
        Use the parallel CSR kernel for ``C x``; default from the number of non-zeros.

    Notes
    -----
    Memory: ``C`` (``nnz <= sum_k q_k d_k^2 + 2 sum_{k<l} d_k d_l cells_kl``) plus
    ``O(q (p + 1 + n_probes))`` for the CG blocks; no ``n x q`` or dense ``q x q``
    matrix is formed. ``Z`` is built once for ``C`` and then dropped.
    """

    def __init__(self, terms, X, y, method="REML", weights=None, n_probes=16, seed=0,
                 rtol=1e-8, maxiter=2000, preconditioner="block_jacobi", parallel=None,
                 stats=None):
        setup_objective(self, terms, X, y, method, weights, stats)
        self.n_probes = check_n_probes(n_probes)
        self.seed = check_seed(seed)
        self.rtol = check_rtol(rtol)
        self.maxiter = int(maxiter)
        self.preconditioner = check_slope_preconditioner(preconditioner)
        if stats is None:  # the one pass over the rows
            _, C, self.ZtT, self.TT, self.ldW = vector_statistics(
                self.terms, self.X, self.y, self.weights)
        else:  # precomputed (VectorStatistics, e.g. combined from partitions)
            if stats.C.shape != (self.q, self.q) or stats.p != self.p:
                raise LmmopsError(f"slope statistics of shape {stats.C.shape} with p = "
                                  f"{stats.p} do not match the terms' q = {self.q}, "
                                  f"p = {self.p}")
            C, self.ZtT, self.TT, self.ldW = stats.C, stats.ZtT, stats.TT, stats.log_weights
        self._offs = np.asarray(self.offsets, dtype=np.int64)
        self._dims = np.array([t.dim for t in self.terms], dtype=np.int64)
        self.nnz = int(C.nnz)
        par = (self.nnz >= _PARALLEL_MIN_NNZ and kernels.n_blocks(True) > 1
               if parallel is None else bool(parallel))
        self._csr = kernels.get_csr_matmat(par)
        self._block = kernels.get_block_matmat(par and self.q >= _PARALLEL_MIN_NNZ // 4)
        self._ks = kernels.get_slope_kernels(par)
        self._par = par
        self._set_pattern(C)
        # the d_k x d_k diagonal blocks of C per level (the preconditioner's and the
        # control variates' C_jj)
        self.Cd = []
        for k, t in enumerate(self.terms):
            o, d, nl = int(self.offsets[k]), t.dim, t.n_levels
            B = np.empty((nl, d, d))
            for a in range(d):
                for b in range(a, d):
                    diag = C.diagonal(b - a)
                    B[:, a, b] = B[:, b, a] = diag[o + a:o + nl * d:d]
            self.Cd.append(B)
        del C
        self.probes = rademacher(self.q, self.n_probes, self.seed)
        self.n_evaluations = 0
        self.cg_iterations = 0
        self.cg_history, self.probe_cg_history = [], []
        self.last = {}
        self._warm = None  # the last solution with the own probes (warm starts)
        self._pool, self._views = {}, {}  # reused (q, m) blocks (see _view)
        self._pc = (None, None)  # the last evaluation's theta and block-Jacobi D^{-1}

    def with_terms(self, terms):
        """The same objective (rows, method, weights, probes, seed, CG settings) on
        ``terms`` of the same shapes: the centred twin of
        :func:`lmmops.estimation.centring.fit_centred`. The probes are the same
        Rademacher matrix (same size and seed)."""
        return VectorIterativeObjective(terms, self.X, self.y, method=self.method,
                                        weights=self.weights, n_probes=self.n_probes,
                                        seed=self.seed, rtol=self.rtol,
                                        maxiter=self.maxiter,
                                        preconditioner=self.preconditioner,
                                        parallel=self._par)

    # ---------------------------------------------------------------- operators
    def _set_pattern(self, C):
        """Keep ``C`` on a block-closed pattern (its own when it is one: the rows of a
        level share their columns, whole blocks, the diagonal block present), on which
        ``A = Lambda' C Lambda + I`` is formed once per ``theta``."""
        indptr, indices, data = block_closed_arrays(C, self.terms, self._offs,
                                                    self._dims, self._ks["merge_values"])
        self._indptr, self._indices, self._data = indptr, indices, data
        self._adata = np.empty_like(data)
        self._a_key = None
        self._a_chunks = kernels.block_chunks(self._offs, self._dims,
                                              64 if self._par else 1, indptr)
        self._cg_blocks = None

    def _form_A(self, Ts):
        """The values of ``A = Lambda' C Lambda + I`` on ``C``'s pattern at ``Ts`` (kept
        until ``Ts`` changes)."""
        key = b"".join(np.ascontiguousarray(T, dtype=np.float64).tobytes() for T in Ts)
        if key == self._a_key:
            return
        dmax = int(self._dims.max())
        Tp = np.zeros((len(Ts), dmax, dmax))
        for k, T in enumerate(Ts):
            Tp[k, :T.shape[0], :T.shape[1]] = T
        self._a_key = None  # while the values are being overwritten
        self._ks["lam_sandwich"](self._indptr, self._indices, self._data, self._offs,
                                 self._dims, Tp, self._a_chunks, self._adata)
        self._a_key = key

    def _view(self, name, shape):
        """A reused float64 block of ``shape`` (C order) from the flat buffer ``name``.

        A fresh block of ``q x m`` floats costs page faults, on this project's test
        machine about 0.5 s of system time per 300 MB (the 10^7-row design's
        ``q x 19``), as much as a CG iteration's arithmetic; an evaluation used to
        allocate about 9 GB. The buffers grow to the largest shape asked for and stay.
        The same object is returned for the same ``(name, shape)``."""
        key = (name, tuple(shape))
        v = self._views.get(key)
        if v is not None:
            return v
        size = int(np.prod(shape))
        buf = self._pool.get(name)
        if buf is None or buf.size < size:
            buf = self._pool[name] = np.empty(size)
            self._views = {k: w for k, w in self._views.items() if k[0] != name}
            if name == "X":
                self._warm = None
        v = self._views[key] = buf[:size].reshape(shape)
        return v

    def _blocks(self, X):
        """Per term, the view of rows of ``X`` (q, m) as ``(n_l, d, m)``."""
        m = X.shape[1]
        return [X[self.offsets[k]:self.offsets[k + 1]].reshape(t.n_levels, t.dim, m)
                for k, t in enumerate(self.terms)]

    def _by_blocks(self, Bs, X, out=None):
        """``blockdiag(B) X`` for per-term blocks ``Bs[k]`` of shape ``(n_l, d, d)`` (or
        ``(1, d, d)``, one block for every level) and a (q, m) block ``X`` (into ``out``,
        C order, when given)."""
        X = np.ascontiguousarray(X, dtype=np.float64)
        if out is None:
            out = np.empty_like(X)
        for k, B in enumerate(Bs):
            lo, hi = self.offsets[k], self.offsets[k + 1]
            self._block(B, X[lo:hi], out[lo:hi])
        return out

    def _lam(self, Ts, X, transpose=False, out=None):
        """``Lambda X`` (``Lambda' X`` with ``transpose``) for a (q, m) block."""
        return self._by_blocks([np.ascontiguousarray(T.T if transpose else T)[None]
                                for T in Ts], X, out=out)

    def _C(self, X, out=None):
        X = np.ascontiguousarray(X, dtype=np.float64)
        if out is None:
            out = np.empty_like(X)
        self._csr(self._indptr, self._indices, self._data, X, out)
        return out

    def _A(self, Ts, X):
        """``A X`` with ``A = Lambda' C Lambda + I`` formed on ``C``'s pattern (one CSR
        product)."""
        self._form_A(Ts)
        X = np.ascontiguousarray(X, dtype=np.float64)
        out = np.empty_like(X)
        self._csr(self._indptr, self._indices, self._adata, X, out)
        return out

    def _preconditioner(self, Ts):
        """Block-Jacobi pieces: per term the Cholesky factors ``L_j`` of
        ``D_j = T' C_jj T + I``, ``L_j^{-T}``, ``D_j^{-1}``, and ``log|D|``."""
        L, LinvT, Dinv, logdet = [], [], [], 0.0
        for T, Cd in zip(Ts, self.Cd):
            D = np.einsum("ba,jbc,cd->jad", T, Cd, T)
            D += np.eye(T.shape[0])[None]
            Lk = np.linalg.cholesky(D)
            Li = np.linalg.inv(Lk)
            logdet += 2.0 * float(np.sum(np.log(np.diagonal(Lk, axis1=1, axis2=2))))
            L.append(Lk)
            LinvT.append(np.ascontiguousarray(np.swapaxes(Li, 1, 2)))
            Dinv.append(np.einsum("jba,jbc->jac", Li, Li))
        return L, LinvT, Dinv, logdet

    def _block_solve(self, Ts, Dinv, B, record=None, x0=None, reuse=False, rtol=None):
        """``A^{-1} B`` by block PCG with the block-Jacobi preconditioner ``Dinv``
        (:func:`lmmops.linalg.krylov.block_pcg`; ``record``: the columns whose CG
        coefficients are kept; ``reuse``: the CG blocks and the returned solution are
        the objective's reused buffers, see :meth:`_view`; ``rtol``: default the
        objective's). Returns ``(solution, info)``."""
        dmax = int(self._dims.max())
        Dr = self._view("Dr", (self.q, dmax)) if reuse else np.empty((self.q, dmax))
        Dr.fill(0.0)
        for k, Di in enumerate(Dinv):
            d = Di.shape[1]
            Dr[self._offs[k]:self._offs[k + 1], :d] = Di.reshape(-1, d)
        self._form_A(Ts)
        work = None
        if reuse:
            work = {name: self._view(name, B.shape) for name in ("X", "R", "P", "Z", "Q")}
        return krylov.block_pcg(_AOperator(self), B, blocks=(Dr, self._offs, self._dims),
                                rtol=self.rtol if rtol is None else rtol,
                                maxiter=self.maxiter, record=record, x0=x0,
                                work=work, first_product=False)

    # ---------------------------------------------------------------- evaluation
    def evaluate(self, theta, gradient=True, probes=None, warm=False):
        """The estimated criterion (and gradient) at ``theta``.

        Parameters
        ----------
        theta : array_like, shape (n_theta,)
        gradient : bool
        probes : ndarray, shape (q, m), optional
            Probes to use instead of the objective's fixed ones (a fresh set for a
            check); the objective's own are used by default.
        warm : bool
            Start the block PCG at the solution of the last evaluation with the
            objective's own probes (when there is one), for the gradient alone: the
            solves are to the same tolerance, but the criterion (its Lanczos quadrature
            needs a start at zero) is not estimated and ``objective`` is NaN. For the
            finite differences of the gradient in :func:`fit_vector_iterative`.

        Returns
        -------
        Evaluation
            As :meth:`lmmops.estimation.vector.VectorObjective.evaluate`, plus
            ``objective_se`` (Monte Carlo standard error of the criterion),
            ``logdet_samples`` (per probe), ``gradient_cov`` (Monte Carlo covariance of
            the gradient), ``gradient_samples`` (``n_theta x m``, the per-probe
            stochastic part), ``dsigma2`` (derivative of the profiled ``sigma^2`` in
            ``theta``, exact given the solves), ``cg_converged`` and ``cg_iterations``.

        Raises
        ------
        LmmopsError
            For an invalid ``theta``.
        RankDeficientError
            If ``X'V0^{-1}X`` is numerically singular.
        """
        theta = check_theta(self, theta)
        self.n_evaluations += 1
        n, p, q = self.n, self.p, self.q
        Z = self.probes if probes is None else np.asarray(probes, dtype=np.float64)
        m = Z.shape[1]
        Ts = [t.relative_factor(theta[sl]) for t, sl in zip(self.terms, self.layout)]
        L, LinvT, Dinv, logdet_D = self._preconditioner(Ts)
        LZT = self._lam(Ts, self.ZtT, transpose=True)
        B = self._view("B", (q, p + 1 + m))
        B[:, :p + 1] = LZT
        B[:, p + 1:] = self._by_blocks(L, Z, out=self._view("P", (q, m)))

        x0 = None
        if warm and probes is None and self._warm is not None:
            x0 = self._warm
        warm = x0 is not None
        mask = np.r_[np.zeros(p + 1, bool), np.full(m, not warm)]
        sol, info = self._block_solve(Ts, Dinv, B, record=mask, x0=x0, reuse=True)
        # the start of the next warm evaluations (None after fresh probes: the buffer
        # then holds their solves)
        if not warm:
            self._warm = sol if probes is None else None
        per = info["iterations_per_column"]
        self.cg_history.append(int(per[:p + 1].max()))
        self.probe_cg_history.append(int(per[p + 1:].max()))
        self.cg_iterations += int(info["iterations"])
        samples = np.empty(m)
        for i in range(m):
            c = p + 1 + i
            a = info["alpha"][c]
            if len(a) == 0:
                samples[i] = 0.0
                continue
            dg, off = lanczos_from_cg(a, info["beta"][c])
            samples[i] = info["norms2"][c] * slq_quadrature(dg, off)
        logdet = logdet_D + float(samples.mean())
        se = float(samples.std(ddof=1) / math.sqrt(m)) if m > 1 else math.inf
        if warm:
            logdet, se = math.nan, math.nan
        g = profiled_gls(self.TT, LZT, sol[:, :p + 1], logdet, n, self.method, self.ldW)
        u = g["u"]
        v = [u[self.offsets[k]:self.offsets[k + 1]].copy() for k in range(len(self.terms))]
        ev = Evaluation(theta=theta, objective=g["objective"], gradient=None,
                        sigma2=g["sigma2"], beta=g["beta"], beta_cov=g["sigma2"] * g["Cx_inv"],
                        v=v, logdet_L=logdet, logdet_RX=g["logdet_RX"], pwrss=g["pwrss"])
        ev.objective_se = se
        ev.logdet_samples = samples
        ev.sol_x = sol[:, :p].copy()  # A^{-1} Lambda'Z'WX (the average information's)
        self._pc = (theta.tobytes(), Dinv)
        ev.cg_converged = bool(np.all(info["converged"]))
        ev.cg_iterations = int(info["iterations"])
        if gradient:
            self._gradient(ev, Ts, Dinv, LinvT, Z, sol, g)
        if not warm:
            self.last = {"objective_se": se, "theta": theta}
        return ev

    def _gradient(self, ev, Ts, Dinv, LinvT, Z, sol, g):
        p, m = self.p, Z.shape[1]
        u, beta, Cx_inv, pwrss, dof = g["u"], g["beta"], g["Cx_inv"], g["pwrss"], g["dof"]
        q = self.q
        S = sol[:, :p]  # A^{-1} Lambda'Z'WX
        # w_i = L^{-T} z_i = D^{-1} L z_i (the reused buffers: B is free after the solve)
        W = self._by_blocks(LinvT, Z, out=self._view("B", (q, m)))
        # one product C Lambda [W, E, S, u] (one pass over C's indices), with
        # E = (A^{-1} - D^{-1}) L z_i
        Y = self._view("R", (q, 2 * m + p + 1))
        Y[:, :m] = W
        np.subtract(sol[:, p + 1:], W, out=Y[:, m:2 * m])
        Y[:, 2 * m:2 * m + p] = S
        Y[:, 2 * m + p] = u
        E = Y[:, m:2 * m]
        G2 = self._C(self._lam(Ts, Y, out=self._view("P", Y.shape)),
                     out=self._view("Z", Y.shape))
        CY = G2[:, 2 * m:]
        Wz = self.ZtT[:, :p] - CY[:, :p]  # Z'V0^{-1}X
        a = self.ZtT[:, p] - self.ZtT[:, :p] @ beta - CY[:, p]  # Z'W r
        grad = np.empty(self.n_theta)
        gs = np.empty((self.n_theta, m))
        dpw = np.empty(self.n_theta)
        parts = zip(self.terms, self.layout, Ts, self.Cd, Dinv, self._blocks(S),
                    self._blocks(Wz), self._blocks(a[:, None]), self._blocks(u[:, None]))
        for k, (t, sl, T, Cd, Di, Sk, Wk, ak, uk) in enumerate(parts):
            d = t.dim
            # tr(D^{-1} dA) = 2 (sum_j D_j^{-1} T' C_jj)_{ba}, exact
            P = np.einsum("jbc,ec,jef->bf", Di, T, Cd)
            # s[a, b, i] = sum_l (C Lambda w_i)_{l a} e_{l b i} + (C Lambda e_i)_{l a}
            # w_{l b i}, the Hutchinson terms w_i' dA e_i per entry (a, b)
            chunks = np.unique(np.linspace(0, t.n_levels, 8 * kernels.n_blocks(True) + 1
                                           if self._par else 2).astype(np.int64))
            work = np.empty((chunks.size - 1, d, d, m))
            self._ks["pair_sums"](G2, W, E, int(self._offs[k]), t.n_levels, d, m, chunks,
                                  work)
            s = work.sum(axis=0)
            dlogA = 2.0 * P.T + s.mean(axis=2)
            dRX = -2.0 * np.einsum("jbp,pq,jaq->ab", Sk, Cx_inv, Wk)
            dPW = -2.0 * np.einsum("ja,jb->ab", ak[:, :, 0], uk[:, :, 0])
            G = dlogA + (dof / pwrss) * dPW
            if self.method == "REML":
                G += dRX
            ii, jj = lower_triangle(d, "F")
            grad[sl] = G[ii, jj]
            gs[sl] = s[ii, jj]
            dpw[sl] = dPW[ii, jj]
        ev.gradient = grad
        ev.gradient_samples = gs
        ev.gradient_cov = np.atleast_2d(np.cov(gs)) / m
        ev.dsigma2 = dpw / dof

    def average_information(self, ev):
        """The average-information approximation of the Hessian of the profiled criterion
        in ``theta``, as :meth:`lmmops.estimation.vector.VectorObjective.average_information`
        (:func:`~lmmops.estimation.vector.span_average_information`), matrix-free: one
        block PCG solve with ``n_theta + 1`` right-hand sides to :data:`AI_RTOL` (it only
        steers the optimiser) and no probes, so it carries no Monte Carlo error beyond
        that of ``ev``'s ``beta``, ``s^2`` and modes (exact given the solves).

        Parameters
        ----------
        ev : Evaluation
            From :meth:`evaluate` (it keeps ``sol_x = A^{-1} Lambda'Z'WX``).

        Returns
        -------
        ndarray, shape (n_theta, n_theta)
        """
        theta = check_theta(self, ev.theta)
        sol_x = getattr(ev, "sol_x", None)
        if sol_x is None:
            raise LmmopsError("the average information needs an evaluation from "
                              "VectorIterativeObjective.evaluate (its sol_x)")
        Ts = [t.relative_factor(theta[sl]) for t, sl in zip(self.terms, self.layout)]
        key, Dinv = self._pc
        if key != theta.tobytes():
            Dinv = self._preconditioner(Ts)[2]
        rtol = max(self.rtol, AI_RTOL)
        return span_average_information(
            self, ev, self._C, lambda B: self._lam(Ts, B),
            lambda B: self._lam(Ts, B, transpose=True),
            lambda B: self._block_solve(Ts, Dinv, B, rtol=rtol)[0], sol_x,
            ev.beta_cov / ev.sigma2)

    # ---------------------------------------------------------------- at the optimum
    def residuals(self, ev):
        """Conditional residuals ``y - X beta - Z Lambda u`` (on the objective's scale),
        from the terms' codes and values (``Z`` is not kept)."""
        r = self.y - self.X @ ev.beta
        for t, sl, uk in zip(self.terms, self.layout, ev.v):
            b = uk.reshape(t.n_levels, t.dim) @ t.relative_factor(ev.theta[sl]).T
            rows = b[t.codes]
            r -= rows[:, 0] if t.values is None else np.einsum("na,na->n", rows, t.values)
        return r

    def level_blocks(self, ev, z_only=False, n_probes=None, seed=2, chunk=16):
        """Stochastic estimates of the ``d_k x d_k`` diagonal blocks of the inverse of the
        spherical mixed-model matrix, one per level, with Monte Carlo standard errors.

        ``blocks(A^{-1}) = D^{-1} + blocks(A^{-1} - D^{-1})``: the block-Jacobi inverse
        ``D^{-1}`` (exact) is the control variate, and the rest is estimated by
        Rademacher probes ``w`` as ``sym((A^{-1} w - D^{-1} w)_j w_j')``, unbiased since
        ``E[w w'] = I``; its noise comes only from the off-diagonal blocks of ``A^{-1}``
        (levels of other terms that share rows). Without ``z_only`` the uncertainty of
        ``beta`` is added exactly: ``(S_x)_j (X'V0^{-1}X)^{-1} (S_x)_j'`` with
        ``S_x = A^{-1} Lambda'Z'WX`` (solved in the same block PCG). Probes are solved
        ``chunk`` at a time.

        Parameters
        ----------
        ev : Evaluation
        z_only : bool
            ``True``: given ``beta`` (lme4's ``condVar``).
        n_probes : int, optional
            Default :data:`PEV_PROBES`.
        seed : int
        chunk : int

        Returns
        -------
        (list of ndarray, list of ndarray)
            Per term, estimates and standard errors, each ``(n_levels, d, d)``.
        """
        n_probes = PEV_PROBES if n_probes is None else int(n_probes)
        theta = check_theta(self, ev.theta)
        p, q = self.p, self.q
        Ts = [t.relative_factor(theta[sl]) for t, sl in zip(self.terms, self.layout)]
        _, _, Dinv, _ = self._preconditioner(Ts)


        def solve(B):
            return self._block_solve(Ts, Dinv, B)[0]

        rng = np.random.default_rng(check_seed(seed))
        s1 = [np.zeros((t.n_levels, t.dim, t.dim)) for t in self.terms]
        s2 = [np.zeros_like(a) for a in s1]
        done = 0
        while done < n_probes:
            m = min(chunk, n_probes - done)
            W = rademacher(q, m, rng)
            F = solve(W) - self._by_blocks(Dinv, W)  # (A^{-1} - D^{-1}) W
            for k, (fk, wk) in enumerate(zip(self._blocks(F), self._blocks(W))):
                for i in range(m):
                    o = fk[:, :, i, None] * wk[:, None, :, i]
                    o = 0.5 * (o + np.swapaxes(o, 1, 2))
                    s1[k] += o
                    s2[k] += o * o
            done += m
        est, err = [], []
        for k in range(len(self.terms)):
            mean = s1[k] / n_probes
            var = np.maximum(s2[k] / n_probes - mean * mean, 0.0) * n_probes / max(
                n_probes - 1, 1)
            est.append(Dinv[k] + mean)
            err.append(np.sqrt(var / n_probes))
        if not z_only and p:
            LZX = self._lam(Ts, self.ZtT[:, :p], transpose=True)
            Sx = solve(LZX)
            Cx_inv = ev.beta_cov / ev.sigma2
            for k, Sk in enumerate(self._blocks(Sx)):
                est[k] = est[k] + np.einsum("jap,pq,jbq->jab", Sk, Cx_inv, Sk)
        return est, err

    def pev_blocks(self, ev, z_only=False, n_probes=None, seed=2):
        """Per term, the prediction error covariance of each level's BLUPs,
        ``s^2 T_k B_j T_k'`` from :meth:`level_blocks`, and its Monte Carlo standard
        errors (of each entry, ``s^2 T_k`` times the blocks' errors by the entries'
        propagation ``sqrt(sum (T_ab SE_bc T_dc)^2)``, an upper bound for correlated
        entries)."""
        est, err = self.level_blocks(ev, z_only=z_only, n_probes=n_probes, seed=seed)
        out, errs = [], []
        for t, sl, B, E in zip(self.terms, self.layout, est, err):
            T = t.relative_factor(ev.theta[sl])
            out.append(ev.sigma2 * np.einsum("ab,jbc,dc->jad", T, B, T))
            errs.append(ev.sigma2 * np.sqrt(np.einsum("ab,jbc,dc->jad", T * T, E * E,
                                                      T * T)))
        return out, errs

    def theta_covariance(self, ev):
        """Wald covariance of ``theta``: twice the inverse of the Jacobian of the
        fixed-probe gradient that :func:`fit_vector_iterative` left in ``ev.hessian``
        (NaN rows and columns for parameters on the boundary, and everywhere without a
        fit); after a fit on centred columns (``ev.centred``), the twin's mapped
        (:class:`lmmops.estimation.centring.CentredFit`)."""
        if getattr(ev, "centred", None) is not None:
            return ev.centred.theta_covariance()
        cov = np.full((self.n_theta, self.n_theta), np.nan)
        H, idx = getattr(ev, "hessian", None), getattr(ev, "free", None)
        if H is None:
            return cov
        keep = ev.theta[idx] > self.lower[idx]
        sub = idx[keep]
        if sub.size:
            Hs = H[np.ix_(keep, keep)]
            cov[np.ix_(sub, sub)] = 2.0 * np.linalg.pinv(Hs)
        return cov

    # ------------------------------------------------ row diagnostics, Wald covariance
    def _rows_Z(self):
        """``Z`` (sparse CSR, ``n x q``) from the terms' codes and values, built for the
        caller and not kept; an :class:`~lmmops.errors.LmmopsError` when the objective
        has no rows (built from level-space statistics, e.g. on Dask)."""
        if self.X is None or self.n == 0 or any(t.codes.shape[0] != self.n
                                                 for t in self.terms):
            raise LmmopsError("diag(P) needs the rows (the terms' codes and values): this "
                              "slope objective was built from level-space statistics "
                              "alone (e.g. on Dask); fit in memory for leverages and "
                              "studentized residuals")
        return random_effects_matrix(self.terms)

    def apply_P(self, ev, B, Z=None):
        """``P B`` for an ``(n_obs, m)`` block, on the objective's scale (``1/s^2``
        included, as :meth:`lmmops.estimation.vector.VectorObjective.diag_P`).

        ``P = (V0^{-1} - V0^{-1} X (X'V0^{-1}X)^{-1} X'V0^{-1}) / s^2`` with
        ``V0^{-1} = W - W Z Lambda A^{-1} Lambda' Z'W``: one block PCG solve in level
        space (:meth:`_block_solve`) with right-hand sides ``Lambda'Z'WX`` and
        ``Lambda'Z'WB``, exact to the CG tolerance.

        Parameters
        ----------
        ev : Evaluation
        B : ndarray, shape (n_obs, m)
        Z : scipy.sparse matrix, optional
            The rows' ``Z`` (:meth:`_rows_Z`), built here when not given.

        Returns
        -------
        ndarray, shape (n_obs, m)
        """
        Z = self._rows_Z() if Z is None else Z
        theta = check_theta(self, ev.theta)
        p = self.p
        B = np.asarray(B, dtype=np.float64).reshape(self.n, -1)
        w = np.ones(self.n) if self.weights is None else self.weights
        Ts = [t.relative_factor(theta[sl]) for t, sl in zip(self.terms, self.layout)]
        _, _, Dinv, _ = self._preconditioner(Ts)
        WB = w[:, None] * B
        rhs = np.column_stack([self.ZtT[:, :p], np.asarray(Z.T @ WB)])
        sol = self._block_solve(Ts, Dinv, self._lam(Ts, rhs, transpose=True))[0]
        ZL = np.asarray(Z @ self._lam(Ts, sol))  # Z Lambda A^{-1} Lambda'Z'W [X B]
        ViB = WB - w[:, None] * ZL[:, p:]
        if p:
            ViX = w[:, None] * (self.X - ZL[:, :p])
            XtViB = self.X.T @ WB - rhs[:, :p].T @ (self._lam(Ts, sol[:, p:]))
            ViB -= ViX @ ((ev.beta_cov / ev.sigma2) @ XtViB)
        return ViB / ev.sigma2

    def quadratic_rows(self, ev, codes, values, X=None, chunk=None):
        """``g_i' Omega^{-1} g_i`` for rows ``g_i = [Lambda' z_i; x_i]`` (spherical scale;
        ``X=None``: the random part ``z_i' Lambda A^{-1} Lambda' z_i`` only), as
        :meth:`lmmops.estimation.vector.VectorObjective.quadratic_rows`: the variances
        of predictions for new rows (:func:`lmmops.analysis.predict.predict`).

        By the Schur complement of ``Omega = [[A, Lambda'Z'WX], [X'WZ Lambda, X'WX]]``,
        ``g' Omega^{-1} g = a' A^{-1} a + r' (X'V0^{-1}X)^{-1} r`` with ``a = Lambda' z``
        and ``r = x - X'WZ Lambda A^{-1} a``: one block PCG solve ``A^{-1} a`` per
        ``chunk`` rows, no probes, so no Monte Carlo error. A column solved to the
        relative residual ``rtol`` has ``|a' (A^{-1} a)_{CG} - a' A^{-1} a| <=
        rtol ||a||^2`` (``A >= I``).

        Parameters
        ----------
        ev : Evaluation
        codes : sequence of ndarray
            Per term, the rows' level codes (-1: a level the fit has not seen).
        values : sequence of ndarray or None
            Per term, the rows' values of its columns (None for an intercept term).
        X : ndarray, optional
            The rows' fixed-effects rows (the objective's scale).
        chunk : int, optional
            Rows per solve; default the most (up to 256) whose ``q x chunk`` block
            holds at most 4 Mi numbers.

        Returns
        -------
        ndarray
        """
        theta = check_theta(self, ev.theta)
        Ts = [t.relative_factor(theta[sl]) for t, sl in zip(self.terms, self.layout)]
        _, _, Dinv, _ = self._preconditioner(Ts)
        parts = spherical_rows(self, theta, codes, values)
        idx = np.concatenate([i for i, _ in parts], axis=1)
        zz = np.concatenate([z for _, z in parts], axis=1)
        n_rows = idx.shape[0]
        if chunk is None:
            chunk = max(1, min(256, (1 << 22) // max(self.q, 1)))
        p = self.p if X is not None else 0
        LZX = self._lam(Ts, self.ZtT[:, :p], transpose=True) if p else None
        Cx_inv = ev.beta_cov / ev.sigma2 if p else None
        h = np.empty(n_rows)
        for lo in range(0, n_rows, chunk):
            hi = min(n_rows, lo + chunk)
            cols = np.broadcast_to(np.arange(hi - lo)[:, None], idx[lo:hi].shape)
            a = np.zeros((self.q, hi - lo))
            np.add.at(a, (idx[lo:hi], cols), zz[lo:hi])
            sol = self._block_solve(Ts, Dinv, a)[0]
            h[lo:hi] = np.einsum("ij,ij->j", a, sol)
            if p:
                r = np.asarray(X[lo:hi], dtype=np.float64) - (LZX.T @ sol).T
                h[lo:hi] += np.einsum("np,pq,nq->n", r, Cx_inv, r)
        return h

    def diag_P(self, ev, n_probes=64, seed=1, chunk=8):
        """Stochastic estimate of ``diag(P)`` with per-entry standard errors, on the
        objective's scale (``1/s^2`` included, as the exact
        :meth:`lmmops.estimation.vector.VectorObjective.diag_P`).

        Rademacher probes in observation space, ``d_i = mean_j z_ij (P z_j)_i``, ``P z``
        by :meth:`apply_P` in chunks of ``chunk`` probes (memory ``O(n chunk)``), as
        :meth:`lmmops.estimation.iterative.IterativeObjective.diag_P`. The noise of entry
        ``i`` comes only from the off-diagonal ``P_il`` (rows sharing levels with ``i``).

        Parameters
        ----------
        ev : Evaluation
        n_probes : int
        seed : int
        chunk : int

        Returns
        -------
        TraceEstimate
            ``estimate`` and ``stderr`` of shape (n_obs,).

        Raises
        ------
        LmmopsError
            When the objective has no rows (level-space statistics alone, e.g. on Dask).
        """
        Z = self._rows_Z()
        return chunked_diagonal(lambda R: self.apply_P(ev, R, Z), self.n, n_probes,
                                np.random.default_rng(check_seed(seed)), chunk)

    def variance_covariance(self, ev):
        """Wald covariance of the variance components on the objective's scale, laid out
        as :meth:`lmmops.estimation.vector.VectorObjective.variance_covariance` (per term
        the variances of its columns, then their covariances, then ``s^2``; NaN for a
        term with a parameter on the boundary), by the same formula.

        Its inputs are the profiled Hessian in ``theta`` and ``dr^2/dtheta``: the
        Jacobian of the fixed-probe gradient that :func:`fit_vector_iterative` left in
        ``ev.hessian`` (on ``ev.free``), restricted to the interior parameters, and
        ``dof * ev.dsigma2`` (exact given the solves). Without a fit's Jacobian (an
        evaluation not from a fit) it is differenced anew, one evaluation per interior
        parameter. Both carry Monte Carlo error (common random numbers). After a fit on
        centred columns (``ev.centred``), the twin's mapped exactly
        (:class:`lmmops.estimation.centring.CentredFit`).

        Parameters
        ----------
        ev : Evaluation

        Returns
        -------
        ndarray, shape (n_phi, n_phi)
        """
        if getattr(ev, "centred", None) is not None:
            return ev.centred.variance_covariance()
        theta = np.asarray(ev.theta, dtype=np.float64)
        idx = np.flatnonzero(~(theta <= self.lower))
        H, free = getattr(ev, "hessian", None), getattr(ev, "free", None)
        if H is not None and free is not None and np.all(np.isin(idx, free)):
            pos = np.searchsorted(free, idx)
            Hp = np.asarray(H)[np.ix_(pos, pos)]
        else:
            if getattr(ev, "gradient", None) is None:
                ev = self.evaluate(theta)
            Hp = _jacobian(self, theta, ev, idx) if idx.size else np.zeros((0, 0))
        dsigma2 = getattr(ev, "dsigma2", None)
        if dsigma2 is None:
            dsigma2 = self.evaluate(theta).dsigma2
        dof = self.n - self.p if self.method == "REML" else self.n
        dpw = dof * np.asarray(dsigma2, dtype=np.float64)[idx]
        # the exact solver's delta method, fed these differences (its _fd_last)
        view = SimpleNamespace(lower=self.lower, n=self.n, p=self.p, method=self.method,
                               terms=self.terms, layout=self.layout,
                               _fd_last=(theta, idx, Hp, dpw))
        return VectorObjective.variance_covariance(view, ev)

    def set_probes(self, n_probes):
        """Use ``n_probes`` Rademacher probes from now on (drawn from the objective's
        seed, so the first columns are not the old ones: a new set of common random
        numbers). The statistics are kept; nothing else changes.

        Parameters
        ----------
        n_probes : int
            At least 2 (:func:`lmmops.estimation.iterative.check_n_probes`).
        """
        self.n_probes = check_n_probes(n_probes)
        self.probes = rademacher(self.q, self.n_probes, self.seed)
        self.last = {}

    def __call__(self, theta):
        return self.evaluate(theta, gradient=False).objective


def _jacobian(objective, theta, ev, idx, h=1e-4):
    """Forward differences of the fixed-probe gradient on the parameters ``idx``
    (symmetrised); one gradient-only evaluation per parameter, its CG started at the
    last full evaluation's solution (``evaluate(warm=True)``: about half the iterations
    at the same tolerance)."""
    J = np.empty((idx.size, idx.size))
    for c, i in enumerate(idx):
        e = np.zeros_like(theta)
        e[i] = h * max(1.0, abs(theta[i]))
        g1 = objective.evaluate(theta + e, warm=True).gradient
        J[:, c] = (g1 - ev.gradient)[idx] / e[i]
    return 0.5 * (J + J.T)


def _psb(H, s, y):
    """The Powell-symmetric-Broyden update of ``H`` for the step ``s`` and gradient
    change ``y`` (symmetric, and ``H_new s = y``)."""
    ss = float(s @ s)
    if not ss > 0:
        return H
    r = y - H @ s
    return H + (np.outer(r, s) + np.outer(s, r)) / ss - float(r @ s) * np.outer(s, s) / ss**2


def _spd(J):
    """``J`` made positive definite by flooring its eigenvalues (and whether it was)."""
    w, V = np.linalg.eigh(J)
    floor = 1e-8 * max(1.0, float(np.max(np.abs(w))))
    if w[0] > floor:
        return J, True
    return (V * np.maximum(np.abs(w), floor)) @ V.T, False


class _AOperator:
    """``A = Lambda' C Lambda + I`` as formed by :meth:`VectorIterativeObjective._form_A`
    for :func:`lmmops.linalg.krylov.block_pcg` (``matmat`` and, into a buffer,
    ``matmat_out``)."""

    def __init__(self, obj):
        self.obj = obj
        self.shape = (obj.q, obj.q)

    def matmat_out(self, U, out):
        o = self.obj
        o._csr(o._indptr, o._indices, o._adata, np.ascontiguousarray(U), out)
        return out

    def matmat(self, U):
        return self.matmat_out(U, np.empty((self.shape[0], U.shape[1])))


class _Handover(Exception):
    """L-BFGS-B stops here; Newton steps continue from ``theta``."""

    def __init__(self, theta):
        super().__init__("hand over to Newton")
        self.theta = np.array(theta, dtype=np.float64)


def _ai_phase(objective, theta, ev_at, *, handover_sd, max_steps, callback, it):
    """AI-Newton steps (:meth:`VectorIterativeObjective.average_information`, deterministic
    given the solves) on the fixed-probe gradient from ``theta`` until the step is within
    ``handover_sd`` of its Monte Carlo standard deviation (``AI^{-1} Cov(g) AI^{-1}``) or
    the expected decrease of the criterion is below its Monte Carlo standard error: the
    probes then resolve no more, and Newton on the differenced Jacobian takes over.

    A step is capped so that no entry moves by more than ``0.9 max(|theta_i|, 0.5)`` (as
    the exact solver's :func:`lmmops.estimation.vector._ai_newton`), a diagonal entry
    stepping below 0 is reflected with its column of ``T_k``
    (:func:`lmmops.estimation.vector._canonical_theta`), and it is kept when the
    criterion falls by the Armijo amount less three Monte Carlo standard errors (the
    same probes at both points); else it is halved, at most five times.

    Returns ``(theta, ok, message)``: ``ok`` False when the average information is not
    positive definite or no step is kept (the caller goes on with L-BFGS-B).
    """
    lower = objective.lower
    for _ in range(max_steps):
        ev = ev_at(theta)
        g = ev.gradient
        idx = np.flatnonzero(~((theta <= lower) & (g > 0)))
        if idx.size == 0:
            return theta, True, "all parameters on the boundary"
        try:
            H = objective.average_information(ev)[np.ix_(idx, idx)]
            fac = sla.cho_factor(H, lower=True)
        except (np.linalg.LinAlgError, ValueError):
            return theta, False, "the average information is not positive definite"
        step = sla.cho_solve(fac, g[idx])
        Hinv = sla.cho_solve(fac, np.eye(idx.size))
        sd = np.sqrt(np.maximum(np.diag(Hinv @ ev.gradient_cov[np.ix_(idx, idx)] @ Hinv),
                                0.0))
        floor = 1e-6 * np.maximum(1.0, np.abs(theta[idx]))
        dec = float(g[idx] @ step)
        if (np.max(np.abs(step) / np.maximum(sd, floor)) <= handover_sd
                or 0.5 * dec <= ev.objective_se):
            return theta, True, "AI-Newton step within its Monte Carlo error"
        cap = 0.9 * np.maximum(np.abs(theta[idx]), 0.5)
        t = min(1.0, float(np.min(cap / np.maximum(np.abs(step), 1e-300))))
        for _ in range(6):
            new = theta.copy()
            new[idx] -= t * step
            new = np.maximum(_canonical_theta(objective, new), lower)
            ev_new = ev_at(new)
            allowance = 3.0 * max(ev.objective_se, ev_new.objective_se)
            if ev_new.objective <= ev.objective - 1e-4 * t * dec + allowance:
                break
            t *= 0.5
        else:
            return theta, False, "no descent along the AI-Newton step"
        theta = new
        it[0] += 1
        if callback is not None:
            callback(it[0], theta, ev_new.objective)
    return theta, True, f"{max_steps} AI-Newton steps"


def fit_vector_iterative(objective, start=None, *, maxiter=100, step_tol=0.05,
                         newton_steps=8, check_level=1e-3, handover=2.0,
                         handover_drop=10.0, max_line_search=6, callback=None,
                         optimizer="ai-newton", ai_handover=1.0, ai_steps=12,
                         rejudge=0.5):
    """Minimise a :class:`VectorIterativeObjective` and judge the optimum against its
    Monte Carlo error.

    1. AI-Newton steps (``optimizer="ai-newton"``, the default; :func:`_ai_phase`) from
       lme4's start on the average information
       (:meth:`VectorIterativeObjective.average_information`, one extra solve with
       ``n_theta + 1`` right-hand sides and no probes), until the step is within
       ``ai_handover`` Monte Carlo standard deviations or its expected decrease of the
       criterion is below the criterion's Monte Carlo standard error. Where the average
       information is not positive definite or no step is kept, and with
       ``optimizer="lbfgsb"``, L-BFGS-B takes over on the fixed-probe criterion and
       gradient (lme4's bounds: diagonal entries of ``T_k`` >= 0), until every component
       of the projected gradient is within ``handover`` of its Monte Carlo standard
       errors (at any point it evaluates), or two accepted iterates in a row each lower
       the criterion by less than ``handover_drop`` of its Monte Carlo standard errors
       (one alone may be a short first step; the line search then judges differences the
       probes barely resolve, with a gradient that is not the criterion's derivative: the
       module notes), or more than ``max_line_search`` evaluations pass without an
       accepted iterate (then from the last one). On the 10^6-row design of
       ``asv_benchmarks/peers/scale.py --slopes`` AI-Newton needs 12 evaluations in all
       (5 in its phase, one of them a halved step) where L-BFGS-B needed 22, to the same
       optimum within 0.01 Monte Carlo standard deviations.
    2. Newton steps on the fixed-probe gradient ``g_W`` (a smooth, deterministic function
       of ``theta``: common random numbers), with its Jacobian ``H`` from forward
       differences, on the free parameters (a diagonal entry at 0 with a positive
       derivative stays there), until every component of the step is below
       ``step_tol`` times its Monte Carlo standard deviation, from
       ``Cov(theta_hat) = H^{-1} Cov(g_W) H^{-1}`` (the delta method). The estimated
       gradient is not the derivative of the estimated criterion (see the module notes),
       so these steps solve ``g_W = 0`` rather than follow the criterion. The Jacobian
       is differenced once and then kept with Powell-symmetric-Broyden secant updates;
       it is differenced anew at the estimate unless it was differenced within
       ``rejudge`` sampling standard errors of it in every component.
    3. A check with as many fresh probes: the gradient at the optimum with them must be
       zero within ``Cov(g_W) + Cov(g_fresh)`` (a chi-squared test at ``check_level``);
       a rejection makes the fit ``converged=False`` with a note, as does a CG solve
       that misses its tolerance or a Jacobian that is not positive definite.

    Parameters
    ----------
    objective : VectorIterativeObjective
    start : ndarray, optional
        Default :func:`lmmops.estimation.vector.start_theta` (lme4's).
    maxiter : int
        L-BFGS-B iterations.
    step_tol : float
        Newton convergence, relative to the Monte Carlo standard deviation.
    newton_steps : int
        Most Newton steps.
    check_level : float
        Level of the fresh-probe check.
    handover : float
        L-BFGS-B stops when the projected gradient is within this many of its Monte
        Carlo standard errors, and Newton steps take over.
    handover_drop : float
        L-BFGS-B also stops when two accepted iterates in a row each lower the criterion
        by less than this many of its Monte Carlo standard errors (0: never). On the
        10^6-row slope design of ``asv_benchmarks/peers/scale.py --slopes`` this hands
        over after 9 evaluations instead of 16, with the same optimum.
    max_line_search : int
        Evaluations without an accepted L-BFGS-B iterate before Newton takes over.
    callback : callable, optional
        ``callback(iteration, theta, criterion)``.
    optimizer : {"ai-newton", "lbfgsb"}
        The first phase.
    ai_handover : float
        AI-Newton hands over to Newton on the differenced Jacobian when its step is
        within this many Monte Carlo standard deviations.
    ai_steps : int
        Most AI-Newton steps.
    rejudge : float
        See step 2.

    Returns
    -------
    (Evaluation, OptSummary)
        The evaluation carries ``theta_mc_cov`` (Monte Carlo covariance of
        ``theta_hat``), ``hessian`` and ``free`` (the Jacobian of ``g_W`` on the free
        parameters), besides what :meth:`VectorIterativeObjective.evaluate` gives; the
        summary carries ``notes``, ``n_probes`` and ``check_pvalue``; its
        ``n_evaluations`` counts every evaluation (the Jacobian's and the fresh-probe
        check's too), ``fitlog`` only the optimiser's.
    """
    t0 = time.perf_counter()
    n_eval0 = objective.n_evaluations
    lower = objective.lower
    theta0 = start_theta(objective.terms) if start is None else np.asarray(start, float)
    fitlog, it = [], [0]
    ev_at = last_evaluation_cache(objective, fitlog)

    state = {"accepted": np.maximum(theta0, lower), "since": 0, "f": None,
             "small_drop": False}

    def small(th, ev):
        g = ev.gradient.copy()
        g[(th <= lower) & (g > 0)] = 0.0
        return bool(np.all(np.abs(g) <= handover * np.sqrt(np.diag(ev.gradient_cov))))

    def fun(th):
        th = np.maximum(th, lower)
        ev = ev_at(th)
        state["since"] += 1
        # hand over to Newton once the gradient is within its Monte Carlo error, or when
        # the line search keeps failing: from there it would judge the criterion against
        # a gradient that is not its derivative (module notes), in many short steps
        if small(th, ev):
            raise _Handover(th)
        if state["since"] > max_line_search:
            raise _Handover(state["accepted"])
        return ev.objective, ev.gradient

    def cb(th):
        it[0] += 1
        state["accepted"], state["since"] = np.maximum(th, lower), 0
        ev = ev_at(state["accepted"])
        if callback is not None:
            callback(it[0], th, ev.objective)
        small_drop = state["f"] - ev.objective < handover_drop * ev.objective_se
        state["f"] = ev.objective
        if small_drop and state["small_drop"]:
            raise _Handover(state["accepted"])
        state["small_drop"] = small_drop

    if optimizer not in ("ai-newton", "lbfgsb"):
        raise LmmopsError(f"unknown optimizer {optimizer!r}; use 'ai-newton' or 'lbfgsb'")
    bounds = [(0.0 if b == 0 else None, None) for b in lower]
    theta = np.maximum(theta0, lower)
    f0 = ev_at(theta).objective
    state["f"] = f0
    first, ai_ok, ai_message = "L-BFGS-B", False, ""
    if optimizer == "ai-newton":
        first = "AI-Newton"
        theta, ai_ok, ai_message = _ai_phase(objective, theta, ev_at,
                                             handover_sd=ai_handover, max_steps=ai_steps,
                                             callback=callback, it=it)
        if not ai_ok:
            first = "AI-Newton, then L-BFGS-B"
    if not ai_ok:
        state["accepted"], state["f"] = theta, ev_at(theta).objective
        try:
            res = sopt.minimize(fun, theta, jac=True, method="L-BFGS-B",
                                bounds=bounds, callback=cb,
                                options={"maxiter": maxiter, "ftol": 1e-13, "gtol": 1e-9,
                                         "maxcor": 20})
            theta = np.maximum(res.x, lower)
        except _Handover as stop:
            theta = stop.theta
    ev = ev_at(theta)
    notes, converged, message = [], False, ""
    H = idx = cov = None
    jac_at = jac_theta = None  # the free set of the Jacobian H and where it was differenced
    secant = False  # H carries secant updates since it was differenced
    steps = 0
    while True:
        free = ~((theta <= lower) & (ev.gradient > 0))
        idx = np.flatnonzero(free)
        if idx.size == 0:
            converged, message = True, "all parameters on the boundary, gradient pointing out"
            break
        # the Jacobian is differenced once and then kept with symmetric (Powell) secant
        # updates from the steps taken (each differencing costs an evaluation per free
        # parameter); differenced anew where a step had to be halved, the free set
        # changes, or at convergence if it carries updates (theta_mc_cov and the Wald
        # covariance are then from a differenced Jacobian at the estimate)
        if jac_at is None or not np.array_equal(jac_at, idx):
            H, pd_ok = _spd(_jacobian(objective, theta, ev, idx))
            Hinv, jac_at, secant = np.linalg.inv(H), idx, False
            jac_theta = theta.copy()
        cov = Hinv @ ev.gradient_cov[np.ix_(idx, idx)] @ Hinv
        sd = np.sqrt(np.maximum(np.diag(cov), 0.0))
        step = Hinv @ ev.gradient[idx]
        # where the estimates are exact (one term: block-Jacobi is A itself, so the
        # probes see no error) the Monte Carlo sd is ~0 and convergence is numerical:
        # the step is measured against 1e-6 of theta's scale at least
        floor = 1e-6 * np.maximum(1.0, np.abs(theta[idx]))
        size = float(np.max(np.abs(step) / np.maximum(sd, floor)))
        if size <= step_tol:
            # a Jacobian with secant updates is differenced again here, unless it was
            # differenced within rejudge of a sampling standard error (sqrt(2 H^-1))
            # of the estimate in every component: the curvature varies on the scale of
            # theta, so it has moved by a fraction of the sampling error's own relative
            # size there (a differencing costs one evaluation per free parameter)
            samp = np.sqrt(np.maximum(2.0 * np.diag(Hinv), 0.0))
            moved = np.abs(theta - jac_theta)[idx]
            if secant and not np.all(moved <= rejudge * samp):
                jac_at = None  # judge again with a differenced Jacobian here
                continue
            converged = pd_ok
            message = (f"Newton step below {step_tol:g} of its Monte Carlo standard deviation"
                       if pd_ok else
                       "the Jacobian of the gradient is not positive definite")
            break
        if steps == newton_steps:
            message = f"{newton_steps} Newton steps without convergence"
            break
        steps += 1
        # a step is kept when the criterion does not rise by more than its Monte Carlo
        # error allows (3 standard errors of either point: the same probes at both, so
        # this is generous); else it is halved. A full step on a poor Jacobian once sent
        # three of four parameters to the boundary and the criterion from 7624 to 9637
        # (a 2400-row design with a 9-level term, seed 3)
        alpha, accepted = 1.0, None
        for _ in range(8):
            new = theta.copy()
            new[idx] -= alpha * step
            new = np.maximum(new, lower)
            ev_new = ev_at(new)
            allowance = 3.0 * max(ev.objective_se, ev_new.objective_se) + 1e-9 * abs(
                ev.objective)
            if ev_new.objective <= ev.objective + allowance:
                accepted = (new, ev_new)
                break
            alpha *= 0.5
        if accepted is None:
            message = ("no Newton step (halved 7 times) kept the criterion within its "
                       "Monte Carlo error")
            break
        if alpha < 1.0:
            jac_at = None  # the Jacobian's model was poor there: difference anew
        else:
            H, ok = _spd(_psb(H, (accepted[0] - theta)[idx],
                              (accepted[1].gradient - ev.gradient)[idx]))
            Hinv, secant = np.linalg.inv(H), True
        theta, ev = accepted
        it[0] += 1
        if callback is not None:
            callback(it[0], theta, ev.objective)
    n_theta = objective.n_theta
    mc_cov = np.zeros((n_theta, n_theta))
    if cov is not None:
        mc_cov[np.ix_(idx, idx)] = cov
    ev.theta_mc_cov = mc_cov
    ev.hessian, ev.free = H, idx
    if not ev.cg_converged:
        converged = False
        notes.append(f"a block PCG solve missed its tolerance {objective.rtol:g} at the "
                     "estimate; the criterion and gradient are not to that precision")
    # the fresh-probe check
    pval = None
    if idx is not None and idx.size:
        rng = np.random.default_rng(
            [int(objective.seed) if isinstance(objective.seed, int) else 0, 1])
        fresh = objective.evaluate(theta, probes=rademacher(objective.q,
                                                            objective.n_probes, rng))
        dg = (fresh.gradient - ev.gradient)[idx]
        Cd = (fresh.gradient_cov + ev.gradient_cov)[np.ix_(idx, idx)]
        # the solves' own error (rtol times the criterion's scale, ~n) is a floor under the
        # Monte Carlo one: where the estimates are exact (one term) Cd is ~0 and the test
        # would reject rounding
        Cd = Cd + np.diag(np.full(idx.size, (1e-6 * objective.n) ** 2))
        try:
            chi2 = float(dg @ np.linalg.solve(Cd, dg))
            pval = float(stats.chi2.sf(chi2, idx.size))
        except np.linalg.LinAlgError:
            pval = None
        if pval is not None and pval < check_level:
            converged = False
            notes.append(f"the gradient with {objective.n_probes} fresh probes differs from "
                         f"the fit's by more than their Monte Carlo errors (p = {pval:.2g} "
                         f"< {check_level:g}): the optimum or its error is in doubt; refit "
                         "with more probes")
    g = ev.gradient.copy()
    g[(theta <= lower) & (g > 0)] = 0.0
    opt = OptSummary(theta_initial=np.asarray(theta0, float), theta_final=theta.copy(),
                     f_initial=f0, f_final=ev.objective,
                     n_evaluations=objective.n_evaluations - n_eval0,
                     iterations=it[0], gradient_norm=float(np.max(np.abs(g))),
                     converged=bool(converged), message=str(message),
                     optimizer=f"{first} + Newton on the fixed-probe gradient",
                     elapsed_s=time.perf_counter() - t0, fitlog=fitlog)
    opt.notes = notes
    opt.n_probes = objective.n_probes
    opt.check_pvalue = pval
    if pval is not None:
        notes.append(f"fresh-probe check of the gradient at the optimum: p = {pval:.3g}")
    return ev, opt
