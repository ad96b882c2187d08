"""Matrix-free REML and ML: the profiled criterion, score and information by PCG and
stochastic estimators, for designs too large for the exact solver.

Everything happens in level space (q = sum_k q_k unknowns) with lme4's spherical system

.. math::

    M(\\theta) = \\Lambda Z'Z \\Lambda + I, \\qquad V = \\sigma^2 (I + Z\\Lambda\\Lambda Z'),

applied matrix-free (one pass over the rows per product; ``Z'Z`` is never formed). One
block preconditioned-CG solve per evaluation, with right-hand sides

- ``Lambda Z'X`` and ``Lambda Z'y``: exact generalised least squares given ``theta``
  (``X'V^{-1}X``, ``beta``, the penalised residual sum of squares and the conditional
  modes), to the CG tolerance;
- ``P^{1/2} w_i`` for fixed Rademacher probes ``w_i`` (common random numbers, drawn once
  per objective), where ``P = diag(M)`` is the Jacobi preconditioner.

The solves go through :func:`lmmops.linalg.krylov.block_pcg`. With the default
preconditioner, ``"jacobi"``, both kinds of column share one block on the fused Jacobi
path. With another kind (``preconditioner=``, built by
:func:`lmmops.linalg.preconditioners.build` on ``Z'Z + Lambda^{-2}`` and applied by the
diagonal similarity ``M = Lambda (Z'Z + Lambda^{-2}) Lambda``) the first columns and every
auxiliary solve use that kind, and the probe columns a second, Jacobi block: the
estimators below are built on ``P = diag(M)``.

The probe columns give two stochastic quantities with Monte Carlo standard errors:

- ``log|M| = log|P| + log|P^{-1/2} M P^{-1/2}|``: the first term exact (the control
  variate), the second by stochastic Lanczos quadrature from the CG coefficients
  (:func:`lmmops.linalg.trace.lanczos_from_cg`), so no extra products are needed;
- ``tr((M^{-1})_{kk})`` per factor by Hutchinson, ``E[(P^{-1/2}w)_k' (M^{-1} P^{1/2} w)_k]``,
  for the analytic gradient (the same formula as :mod:`lmmops.estimation.direct`; see
  ``docs/theory.rst``, "REML identities").

The average-information matrix needs only solves with the working variates (no traces),
so Newton steps are exact given the score; it is computed in level space too.
"""

from __future__ import annotations

import math
import numbers
import time
import warnings

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import LinearOperator

from lmmops.data.checks import check_method, check_rows_free, check_weights
from lmmops.data.statistics import SufficientStatistics
from lmmops.errors import ArgumentError, ConvergenceWarning, LmmopsError
from lmmops.estimation.criterion import profiled_criterion
from lmmops.estimation.direct import (
    DirectObjective,
    Evaluation,
    NumericalFailure,
    theta_gradient,
)
from lmmops.linalg import krylov, preconditioners
from lmmops.linalg.operators import GramOperator, LevelSpaceOperator, RandomEffectsOperator
from lmmops.linalg.trace import (
    TraceEstimate,
    chunked_diagonal,
    lanczos_from_cg,
    rademacher,
    slq_quadrature,
)

__all__ = ["DEFAULT_PRECONDITIONER", "MIN_PROBES", "PRECONDITIONERS", "USEFUL_PROBES",
           "IterativeObjective", "block_pcg", "check_n_probes", "check_preconditioner",
           "check_rtol"]

#: The level-space preconditioner kinds the iterative fit can use
#: (:func:`lmmops.linalg.preconditioners.build`). ``"spectral"`` needs K = 2.
PRECONDITIONERS = ("jacobi", "block_gauss_seidel", "proportional", "spectral", "lowrank",
                   "amg")
#: The iterative fit's default preconditioner, the measured fastest (2 shared cores, load
#: average 2.5-3.4 from other jobs, so +-30 % noise between runs). Whole REML fits, seed 0,
#: 16 probes: on ``simulate_crossed(10**5, [2000, 300], zipf=[0.8, 1.0], seed=1)`` (10
#: evaluations) jacobi 0.64-0.96 s, block_gauss_seidel 1.05, spectral 1.00, amg 1.12,
#: proportional 1.31, lowrank 4.37; at 10**6 rows ([20000, 3000], 10 evaluations) jacobi
#: 9.2-10.4 s, proportional 9.4, spectral 10.6, block_gauss_seidel 11.0, amg 19.1; on
#: InstEval (73,421 rows, K = 3, 12 evaluations) jacobi 9.2-10.1 s, amg 9.1,
#: block_gauss_seidel 9.4, proportional 9.9, lowrank 13.1.
#: The better kinds halve the CG iterations of the GLS solve (InstEval: 670 -> 324-346),
#: but the probe block, on Jacobi in every case, has more columns and dominates (about 790
#: iterations), and another kind costs a second block; the fused Jacobi path runs both in
#: one.
DEFAULT_PRECONDITIONER = "jacobi"

#: The smallest probe count with a Monte Carlo standard error: the sample variance of the
#: per-probe estimates has ``m - 1`` degrees of freedom.
MIN_PROBES = 2
#: Below this many probes the standard errors are themselves too uncertain to judge
#: convergence by (their relative error is about ``1 / sqrt(2 (m - 1))``: 27 % at 8).
USEFUL_PROBES = 8


def check_n_probes(n_probes, name="n_probes"):
    """Validate a probe count for the stochastic estimators.

    Parameters
    ----------
    n_probes : int
    name : str
        How the caller spells the option, for the message (``--probes`` on the CLI).

    Returns
    -------
    int

    Raises
    ------
    LmmopsError
        For a non-integer or a count below :data:`MIN_PROBES`.

    Examples
    --------
    >>> check_n_probes(16)
    16
    >>> check_n_probes(1)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    lmmops.errors.LmmopsError: n_probes must be an integer >= 2, got 1: ...
    """
    ok = isinstance(n_probes, numbers.Integral) and not isinstance(n_probes, bool)
    if ok and n_probes >= MIN_PROBES:
        return int(n_probes)
    raise LmmopsError(
        f"{name} must be an integer >= {MIN_PROBES}, got {n_probes!r}: a Monte Carlo "
        f"standard error needs at least {MIN_PROBES} probes (the sample variance of the "
        f"per-probe estimates has m - 1 degrees of freedom), and {USEFUL_PROBES} or more "
        f"are useful (with m probes the standard error itself is uncertain by about "
        f"1/sqrt(2(m - 1)): 27% at 8, 18% at 16)"
    )


def check_seed(seed):
    """Validate a probe seed: a non-negative integer or a numpy Generator.

    Parameters
    ----------
    seed : int or numpy.random.Generator

    Returns
    -------
    int or numpy.random.Generator

    Raises
    ------
    LmmopsError
        For a negative, non-integer or boolean seed (numpy's seeds are non-negative).

    Examples
    --------
    >>> check_seed(3)
    3
    """
    if isinstance(seed, np.random.Generator):
        return seed
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) \
            or seed < 0:
        raise LmmopsError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def check_rtol(rtol):
    """Validate a PCG tolerance: a finite number with ``0 < rtol < 1``.

    Parameters
    ----------
    rtol : float

    Returns
    -------
    float

    Raises
    ------
    LmmopsError
        For anything else (``rtol = 0`` can never be met in floating point; ``rtol >= 1``
        accepts the starting guess).

    Examples
    --------
    >>> check_rtol(1e-8)
    1e-08
    """
    try:
        r = float(rtol)
    except (TypeError, ValueError):
        r = math.nan
    if not (math.isfinite(r) and 0.0 < r < 1.0):
        why = ("rtol >= 1 accepts the starting guess without a single iteration"
               if r >= 1.0 else "rtol <= 0 can never be met in floating point")
        raise LmmopsError(
            f"rtol must be a finite number with 0 < rtol < 1, got {rtol!r}: PCG stops when "
            f"every column's residual is at most rtol times its right-hand side, and {why}"
        )
    return r



def check_preconditioner(kind, n_factors=None):
    """Validate a preconditioner kind for the iterative fit.

    Parameters
    ----------
    kind : str
        One of :data:`PRECONDITIONERS`.
    n_factors : int, optional
        The design's number of factors K, to reject a kind that does not apply.

    Returns
    -------
    str

    Raises
    ------
    ArgumentError
        For an unknown kind, or ``"spectral"`` with K != 2.

    Examples
    --------
    >>> check_preconditioner("amg")
    'amg'
    """
    if not isinstance(kind, str) or kind not in PRECONDITIONERS:
        raise ArgumentError(
            f"preconditioner must be one of {', '.join(PRECONDITIONERS)}, got {kind!r}")
    if kind == "spectral" and n_factors is not None and n_factors != 2:
        raise ArgumentError(
            f"preconditioner='spectral' (D1) needs exactly two crossed factors, got "
            f"K={n_factors}: the two-projection spectral decomposition has no closed form "
            "for three or more; use 'block_gauss_seidel', 'proportional', 'lowrank' or 'amg'")
    return kind


class _SphericalPreconditioner(LinearOperator):
    """A level-space preconditioner of ``Z'Z + Lambda^{-2}`` seen on the spherical form.

    ``M = Lambda Z'Z Lambda + I = Lambda (Z'Z + Lambda^{-2}) Lambda`` for ``theta > 0``, so
    ``C^{-1}`` approximating ``(Z'Z + Lambda^{-2})^{-1}`` gives
    ``Lambda^{-1} C^{-1} Lambda^{-1}`` approximating ``M^{-1}`` (SPD). A ``theta_k`` below
    ``floor`` is raised to it for the preconditioner only: the rows of a factor at
    ``theta_k = 0`` are the identity in ``M``, and the floored form gives them
    ``1 / (1 + floor^2 r_i)``, the identity to ``O(floor^2)``.
    """

    def __init__(self, design, theta, kind, floor):
        theta = np.maximum(np.asarray(theta, dtype=np.float64), floor)
        A = LevelSpaceOperator(design, 1.0 / theta**2)
        self.pc = preconditioners.build(A, kind=kind)
        self.inv_lam = np.repeat(1.0 / theta, design.n_levels)
        super().__init__(dtype=np.float64, shape=A.shape)

    def _matmat(self, X):
        Y = self.pc.solve(self.inv_lam[:, None] * X)
        Y *= self.inv_lam[:, None]
        return Y

    def _matvec(self, x):
        return self._matmat(np.asarray(x, dtype=np.float64).reshape(-1, 1))[:, 0]

    def _adjoint(self):
        return self


def block_pcg(matmat, B, precond_diag, rtol=1e-8, maxiter=1000, record=None, parallel=None):
    """Block CG with a diagonal preconditioner: a thin call of
    :func:`lmmops.linalg.krylov.block_pcg` (its fused Jacobi path).

    Parameters
    ----------
    matmat : callable
        ``matmat(U)`` applies the SPD operator to a (q, m) block.
    B : ndarray, shape (q, m)
    precond_diag : ndarray, shape (q,)
        Diagonal ``P`` of the preconditioner (``P^{-1}`` approximates the inverse).
    rtol : float
        Per-column stopping rule ``||b_j - A x_j|| < rtol ||b_j||``.
    maxiter : int
    record : array_like of bool, shape (m,), optional
        Columns whose CG coefficients are recorded (for Lanczos quadrature).
    parallel : bool or None
        Ignored (the kernels choose from the block size); kept for compatibility.

    Returns
    -------
    X : ndarray, shape (q, m)
    info : dict
        As :func:`lmmops.linalg.krylov.block_pcg`.

    Examples
    --------
    >>> A = np.diag([1.0, 2.0, 3.0]) + 0.1
    >>> X, info = block_pcg(lambda U: A @ U, np.eye(3), np.diag(A), rtol=1e-12)
    >>> bool(np.allclose(A @ X, np.eye(3)))
    True
    """
    return krylov.block_pcg(matmat, B, diagonal=precond_diag, rtol=check_rtol(rtol),
                            maxiter=maxiter, record=record)


def _orthonormal_columns(A, tol=1e-10):
    """Orthonormal basis of the column space of A (rank-revealing, via SVD of R)."""
    Q, R = np.linalg.qr(A)
    U, sv, _ = np.linalg.svd(R)
    keep = sv > tol * sv[0]
    return Q @ U[:, keep]


class IterativeObjective:
    """The profiled REML/ML criterion evaluated matrix-free, with Monte Carlo errors.

    Same interface as :class:`lmmops.estimation.direct.DirectObjective` (``evaluate``,
    ``average_information``, ``residuals``), so the same optimiser fits both.

    Parameters
    ----------
    design : CrossedDesign
    X : ndarray, shape (n_obs, p)
    y : ndarray, shape (n_obs,)
    method : {"REML", "ML"}
    n_probes : int
        Rademacher probes for the log-determinant and the traces.
    seed : int or numpy.random.Generator
        Seed of the probes, drawn once (common random numbers: the estimated criterion is
        a smooth function of ``theta``).
    rtol : float
        CG tolerance (relative residual, per column).
    maxiter : int
        CG iteration limit per solve.
    parallel : bool or None
        Use the parallel kernels for the level-space products.
    deflation_rank : int, optional
        Extra deflation directions beyond the K proportional ones: the dominant
        eigenvectors of the normalised level graph ``D^{-1/2}(Z'Z - D)D^{-1/2}`` (its
        canonical correlations, ``docs/theory_inverse.rst``), found once per design by
        block power iteration. Default ``min(32, q // 8)``, and 8 above q = 200,000 (the blocks are
        ``O(q r)`` in memory). They change only the variance of the estimates, never their
        expectation.
    power_iters : int
        Block power iterations for the deflation basis.
    small_factor_levels : int
        Factors with at most this many levels are deflated completely (all their level
        directions join the basis), which makes their traces, and so their gradient
        components, exact.
    deflation_basis : ndarray, shape (q, r), optional
        An orthonormal deflation basis to use instead of computing one (any orthonormal
        basis keeps the estimates unbiased; see :meth:`with_weights`).
    preconditioner : str
        Level-space preconditioner of the solves (:data:`PRECONDITIONERS`, default
        :data:`DEFAULT_PRECONDITIONER`), built by
        :func:`lmmops.linalg.preconditioners.build` on ``Z'Z + Lambda^{-2}`` once per
        ``theta`` and applied to the spherical system by the diagonal similarity
        ``M = Lambda (Z'Z + Lambda^{-2}) Lambda``. ``"jacobi"`` runs the fused Jacobi
        kernels of :func:`lmmops.linalg.krylov.block_pcg` in one block with the probes.
        Every other kind solves the generalised-least-squares columns ``Lambda Z'[X y]``
        and every auxiliary solve (information, ``P B``, boundary derivatives); the probe
        columns of the stochastic log-determinant and traces stay on Jacobi in every case,
        because their control variates (``log|P|``, the closed-form ``||E||_F^2``, the
        deflated Hutchinson terms) and the Lanczos quadrature are built on
        ``P = diag(M)``. So the kind changes the solves (to the CG tolerance), never the
        stochastic estimates. With prior weights the kinds are built on the unweighted
        counts (an approximation of ``Z'WZ``, still SPD; CG converges to the same
        solution). ``"spectral"`` needs two factors and a connected design.
    weights : array_like, shape (n_obs,), optional
        Prior weights, ``R = s^2 W^{-1}`` (lme4's ``weights=``). The weighted problem is
        the unweighted one with rows scaled by ``sqrt(w)``: ``Z'Z`` becomes ``Z'WZ``, the
        sufficient statistics ``Z'W[X y]`` and ``[X y]'W[X y]``, and the criterion gains
        ``-sum(log w)``, exactly as :class:`~lmmops.estimation.direct.DirectObjective`.
    stats : SufficientStatistics, optional
        The level-space statistics of ``(design, X, y, weights)``
        (:class:`~lmmops.data.statistics.SufficientStatistics`, e.g. combined from
        partitions); by default one pass over the rows builds them. Everything the
        solves need from the rows comes from them; the rows themselves are read again
        only for row-level outputs (residuals, ``diag(P)``).
    gram : LinearOperator, optional
        Applies ``Z'WZ`` in the PCG products (its ``matmat``), in place of the
        :class:`~lmmops.linalg.operators.GramOperator` of the statistics: e.g. the row
        blocks kept on a Dask cluster
        (:class:`lmmops.distributed.pcg.DistributedGram`).

    Notes
    -----
    Memory is ``O(n K)`` for the codes plus ``O(q (p + 1 + n_probes))`` for the level-space
    blocks; nothing of size ``n x q`` or ``q x q`` is formed.

    Examples
    --------
    >>> from lmmops.data.design import CrossedDesign
    >>> from lmmops.estimation.direct import DirectObjective
    >>> rng = np.random.default_rng(0)
    >>> a, b = rng.integers(0, 30, 600), rng.integers(0, 20, 600)
    >>> d = CrossedDesign.from_codes([a, b])
    >>> y = rng.normal(size=30)[a] + rng.normal(size=20)[b] + rng.normal(size=600)
    >>> X = np.ones((600, 1))
    >>> it = IterativeObjective(d, X, y, n_probes=64, seed=1)
    >>> ev = it.evaluate(np.array([1.0, 1.0]))
    >>> exact = DirectObjective(d, X, y).evaluate(np.array([1.0, 1.0])).objective
    >>> bool(abs(ev.objective - exact) < 4 * ev.objective_se + 1e-6)
    True
    """

    def __init__(self, design, X, y, method="REML", n_probes=16, seed=0, rtol=1e-8,
                 maxiter=2000, parallel=None, deflation_rank=None, power_iters=4,
                 small_factor_levels=64, weights=None, deflation_basis=None,
                 preconditioner=DEFAULT_PRECONDITIONER, stats=None, gram=None):
        method = check_method(method)
        self.method = method
        self.design = design
        if X is None or y is None:
            # level space only (the rows stayed on a cluster): n and p from the statistics
            check_rows_free("an IterativeObjective", stats, X, y, weights)
            self.X = self.y = None
            n, p = stats.n_obs, stats.p
        else:
            self.X = np.ascontiguousarray(X, dtype=np.float64)
            self.y = np.ascontiguousarray(y, dtype=np.float64).ravel()
            n, p = self.X.shape
        self.n, self.p, self.K, self.q = n, p, design.n_factors, design.q
        if method == "REML" and n <= p:
            raise LmmopsError(f"REML needs more observations ({n}) than fixed effects ({p})")
        self.n_probes = check_n_probes(n_probes)
        self.preconditioner = check_preconditioner(preconditioner, self.K)
        if self.preconditioner == "spectral":
            design.check_connected()  # D1's canonical basis needs one connected component
        self._pc_cache = (None, None)
        self.small_factor_levels = int(small_factor_levels)
        self.weights = None if weights is None else check_weights(weights, n)
        self.rtol = check_rtol(rtol)
        if not isinstance(maxiter, numbers.Integral) or maxiter < 1:
            raise LmmopsError(f"maxiter (the PCG iteration limit) must be an integer >= 1, "
                              f"got {maxiter!r}")
        self.maxiter = int(maxiter)
        # the one O(n) pass: the level-space sufficient statistics (the shared seam)
        if stats is None:
            stats = SufficientStatistics.from_arrays(design, self.X, self.y, self.weights)
        elif stats.n_levels != tuple(design.n_levels) or stats.p != p or stats.n_obs != n:
            raise LmmopsError(f"statistics on levels {stats.n_levels} with p = {stats.p} and "
                              f"{stats.n_obs} rows do not match the design "
                              f"({tuple(design.n_levels)}, p = {p}, {n} rows)")
        self.ldW = stats.log_weights
        # Z'WZ for the products in the PCG loop (one pass over the cells)
        if gram is None:
            self._ZtZ = GramOperator(design, parallel=parallel, stats=stats)
        else:  # e.g. lmmops.distributed.pcg.DistributedGram: row blocks on a cluster
            if tuple(gram.shape) != (self.q, self.q):
                raise LmmopsError(f"gram has shape {gram.shape}, expected "
                                  f"({self.q}, {self.q})")
            self._ZtZ = gram
        self.ZtT = np.vstack(stats.ZT)  # Z'W[X y], (q, p + 1)
        self.TT = stats.TT
        self.counts = np.concatenate(stats.D)  # the diagonal of Z'WZ
        self.sizes = list(design.n_levels)
        self.offsets = design.offsets
        rng = np.random.default_rng(check_seed(seed))
        self.seed = seed
        if deflation_basis is None:
            self.Q = self._deflation_basis(deflation_rank, power_iters, rng)
        else:
            self.offsets = design.offsets
            self.Q = np.asarray(deflation_basis, dtype=np.float64)
            if self.Q.ndim != 2 or self.Q.shape[0] != self.q:
                raise LmmopsError(f"deflation_basis must have shape ({self.q}, r)")
        self._probe_rng = rng
        self.W = self._project(rademacher(self.q, self.n_probes, rng))
        # seed of the boundary probes (one stream per factor, see boundary_gradient)
        self._boundary_seed = int(rng.integers(2**62))
        # squared cross-tabulations, for ||E||_F^2 in closed form: from the Gram's own
        # arrays when it is a GramOperator (no copy), else squared tables
        self._N2 = None
        if not hasattr(self._ZtZ, "offdiag_square_rows"):
            self._N2 = []
            for (k, l), N in sorted(stats.N.items()):
                N = N.tocsr()  # the squares share the table's index arrays (no copy)
                self._N2.append((k, l, sp.csr_matrix((N.data**2, N.indices, N.indptr),
                                                     shape=N.shape, copy=False)))
        self.n_evaluations = 0
        self.cg_iterations = 0
        # per evaluation: CG iterations of the solve with the chosen preconditioner (the
        # Lambda Z'[X y] columns) and of the Jacobi probe columns
        self.cg_history = []
        self.probe_cg_history = []
        self.n_solves = 0  # block PCG solves, and how many missed rtol within maxiter
        self.failed_solves = 0
        self.worst_residual = 0.0
        self.last = {}

    def _deflation_basis(self, rank, power_iters, rng):
        """Orthonormal, theta-independent basis of the dominant level-graph directions.

        The K "proportional" directions ``sqrt(r_k / n)`` (exact eigenvectors of the
        normalised graph, the rho = 1 pair for K = 2), then the dominant eigenvectors of
        ``C = D^{-1/2}(Z'Z - D)D^{-1/2}`` on their complement by block power iteration.
        """
        off = self.offsets = self.design.offsets
        QK = np.zeros((self.q, self.K))
        for k in range(self.K):
            QK[off[k]:off[k + 1], k] = np.sqrt(self.counts[off[k]:off[k + 1]] / self.n)
        # small factors (few levels) are deflated completely: their traces become exact
        cols = [QK]
        for k in range(self.K):
            qk = off[k + 1] - off[k]
            if qk <= self.small_factor_levels:
                Ek = np.zeros((self.q, qk))
                Ek[off[k] + np.arange(qk), np.arange(qk)] = 1.0
                cols.append(Ek)
        if len(cols) > 1:
            QK = _orthonormal_columns(np.hstack(cols))
        if rank is None:  # fewer directions for huge q: memory O(q r), MC error reported
            rank = min(32, self.q // 8) if self.q <= 200_000 else 8
        rank = int(max(0, min(rank, self.q - QK.shape[1])))
        if rank == 0:
            return QK
        isq = 1.0 / np.sqrt(self.counts)

        def C(U):
            return isq[:, None] * self._gram(isq[:, None] * U) - U

        Y = rng.standard_normal((self.q, rank))
        for _ in range(max(1, power_iters)):
            Y -= QK @ (QK.T @ Y)
            Y, _ = np.linalg.qr(C(C(Y)))
        Y -= QK @ (QK.T @ Y)
        Y, _ = np.linalg.qr(Y)
        H = Y.T @ C(Y)
        w, U = np.linalg.eigh(0.5 * (H + H.T))
        Y = Y @ U[:, np.argsort(-np.abs(w))]
        return _orthonormal_columns(np.hstack([QK, Y]))

    def _project(self, W):
        """Probes projected off the deflation basis (they stay unbiased for the remainder)."""
        return W - self.Q @ (self.Q.T @ W)

    def add_probes(self, m):
        """Append ``m`` fresh Rademacher probes (independent of the ones in use).

        The new probes come from the objective's own generator, so a fit that refreshes
        its probes is still determined by ``seed``. Every later evaluation uses all the
        probes (common random numbers across evaluations again).

        Parameters
        ----------
        m : int

        Returns
        -------
        int
            The probe count now in use.
        """
        m = check_n_probes(m, "m")
        self.W = np.hstack([self.W, self._project(rademacher(self.q, m, self._probe_rng))])
        self.n_probes = self.W.shape[1]
        return self.n_probes

    # ------------------------------------------------------------------ operators
    def _square_rows(self, a):
        """``s_i = sum_{j != i} (Z'WZ)_ij^2 a_j`` (the squared cross-tabulations' rows
        weighted by ``a``): from the Gram's arrays, or the squared tables."""
        if self._N2 is None:
            return self._ZtZ.offdiag_square_rows(a)
        off = self.offsets
        s = np.zeros(self.q)
        for k, l, N2 in self._N2:
            s[off[k]:off[k + 1]] += N2 @ a[off[l]:off[l + 1]]
            s[off[l]:off[l + 1]] += N2.T @ a[off[k]:off[k + 1]]
        return s

    def _lam(self, theta):
        return np.repeat(np.asarray(theta, dtype=np.float64), self.sizes)

    def _gram(self, U):
        """``Z'Z U`` for a (q, m) block, through the sparse ``Z'Z`` (one pass over cells)."""
        return self._ZtZ.matmat(U)

    def _M_matmat(self, lam):
        sandwich = getattr(self._ZtZ, "sandwich", None)
        if sandwich is not None:  # GramOperator: fused, no (q, m) temporary
            return lambda U: sandwich(lam, U)

        def mm(U):  # lam Z'Z (lam U) + U, scaled in place (one (q, m) temporary)
            out = self._gram(lam[:, None] * U)
            out *= lam[:, None]
            out += U
            return out
        return mm

    def _preconditioner(self, lam):
        """The chosen kind's preconditioner of ``M`` at ``lam`` (cached for one theta)."""
        theta = lam[self.offsets[:-1]]
        key = theta.tobytes()
        if self._pc_cache[0] != key:
            floor = 1e-4 * max(1.0, float(theta.max()))
            self._pc_cache = (key, _SphericalPreconditioner(
                self.design, theta, self.preconditioner, floor))
        return self._pc_cache[1]

    def _solve(self, lam, B, record=None, kind=None, overwrite_b=False, first_product=True):
        """Block PCG on ``M X = B``: fused Jacobi, or the chosen kind (``kind`` overrides);
        ``overwrite_b``: ``B`` may become the residual block, ``first_product=False``:
        the first product is not kept (Jacobi)."""
        kind = self.preconditioner if kind is None else kind
        P = lam * lam * self.counts + 1.0
        if kind == "jacobi":
            X, info = krylov.block_pcg(self._M_matmat(lam), B, diagonal=P, rtol=self.rtol,
                                       maxiter=self.maxiter, record=record,
                                       overwrite_b=overwrite_b, first_product=first_product)
        else:
            X, info = krylov.block_pcg(self._M_matmat(lam), B, M=self._preconditioner(lam),
                                       rtol=self.rtol, maxiter=self.maxiter, record=record)
        self.cg_iterations += info["iterations"]
        self.n_solves += 1
        if not np.all(info["converged"]):
            worst = float(np.max(info["residual"]))
            self.failed_solves += 1
            self.worst_residual = max(self.worst_residual, worst)
            warnings.warn(
                f"PCG did not reach rtol={self.rtol:g} in {self.maxiter} iterations "
                f"(worst relative residual {worst:.2g})",
                ConvergenceWarning, stacklevel=3,
            )
        return X, info, P

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, theta, gradient=True):
        """Evaluate the criterion, its gradient and their Monte Carlo errors at ``theta``.

        Parameters
        ----------
        theta : array_like, shape (n_factors,)
        gradient : bool
            The gradient comes at no extra cost; accepted for interface compatibility.

        Returns
        -------
        Evaluation
            With the Monte Carlo quantities ``objective_se`` (standard error of the
            criterion), ``gradient_cov`` (covariance of the gradient estimate),
            ``gradient_samples`` (shape (K, m): the per-probe terms whose mean is the
            stochastic part of the gradient) and ``objective_samples`` (the same for the
            criterion), and the PCG status ``pcg_converged`` (every column reached
            ``rtol``) and ``pcg_residual`` (the worst relative residual).
        """
        theta = np.asarray(theta, dtype=np.float64).copy()
        if theta.shape != (self.K,) or np.any(~np.isfinite(theta)) or np.any(theta < 0):
            raise LmmopsError(f"theta must be {self.K} finite values >= 0, got {theta}")
        self.n_evaluations += 1
        t0 = time.perf_counter()
        n, p, m = self.n, self.p, self.n_probes
        lam = self._lam(theta)
        P = lam * lam * self.counts + 1.0
        sqP = np.sqrt(P)
        K = self.K
        r = self.Q.shape[1]
        c0, cQ, cW = p + 1, p + 1 + r, p + 1 + r + m  # column blocks: [X y | Q | W]
        B = np.empty((self.q, cW))
        B[:, :c0] = lam[:, None] * self.ZtT
        B[:, c0:cQ] = sqP[:, None] * self.Q
        B[:, cQ:] = sqP[:, None] * self.W
        record = np.zeros(cW, dtype=bool)
        record[c0:] = True
        Lt = B[:, :c0].copy()  # copies: views would keep the whole blocks alive
        if self.preconditioner == "jacobi":
            # B becomes the residual block, and the first product M P^{-1} B of the [Q W]
            # columns is made again after the solve (the same numbers) rather than kept
            # through it: two (q, c) blocks less at the solve's peak, one product more
            S, info, _ = self._solve(lam, B, record, overwrite_b=True, first_product=False)
            del B
            per_col = info["iterations_per_column"]
            cg_exact = int(per_col[:c0].max())
            cg_probe = int(per_col[c0:].max(initial=0))
            first = np.empty((self.q, cW - c0))
            first[:, :r] = sqP[:, None] * self.Q
            first[:, r:] = sqP[:, None] * self.W
            first *= (1.0 / P)[:, None]  # the solve's first direction, P^{-1} B
            first = self._M_matmat(lam)(first)
        else:  # the GLS columns with the chosen kind, the probe columns on Jacobi
            S = np.empty_like(B)
            S[:, :c0], info0, _ = self._solve(lam, np.ascontiguousarray(B[:, :c0]))
            S[:, c0:], info, _ = self._solve(lam, np.ascontiguousarray(B[:, c0:]),
                                             record[c0:], kind="jacobi")
            del B
            cg_exact, cg_probe = info0["iterations"], info["iterations"]
            first = info["first_product"]  # of the [Q W] columns
            info = {"alpha": [[]] * c0 + list(info["alpha"]),
                    "beta": [[]] * c0 + list(info["beta"]),
                    "converged": np.concatenate([info0["converged"], info["converged"]]),
                    "residual": np.concatenate([info0["residual"], info["residual"]]),
                    "iterations": cg_exact + cg_probe}
        self.cg_history.append(cg_exact)
        self.probe_cg_history.append(cg_probe)
        St = S[:, :c0].copy()
        Omega = self.TT - Lt.T @ St  # [X y]' V0^{-1} [X y]
        Omega = 0.5 * (Omega + Omega.T)
        A = Omega[:p, :p]
        if p:
            try:
                cA = np.linalg.cholesky(A)
            except np.linalg.LinAlgError:
                raise NumericalFailure("X'V^{-1}X is not positive definite") from None
            beta = np.linalg.solve(A, Omega[:p, p])
            logdet_RX = 2.0 * float(np.sum(np.log(np.diag(cA))))
        else:
            beta = np.zeros(0)
            logdet_RX = 0.0
        pwrss = float(Omega[p, p] - Omega[:p, p] @ beta)
        if pwrss <= 0:
            raise LmmopsError("the response is fitted exactly (zero residual sum of squares)")
        dof = n - p if self.method == "REML" else n
        sigma2 = pwrss / dof
        # normalised operator Ahat = P^{-1/2} M P^{-1/2} = I + E; Ahat x from the first product
        EQ = first[:, :r] / sqP[:, None] - self.Q
        EW = first[:, r:] / sqP[:, None] - self.W
        del first
        a = lam * lam / P
        E2 = float(a @ self._square_rows(a))  # ||E||_F^2 = 2 sum_{k<l} sum_ij N_ij^2 a_i a_j
        off = self.offsets
        # log|M| = log|P| + sum_i q_i' log(Ahat) q_i (deterministic quadrature)
        #        + tr(Pq log(Ahat) Pq): closed-form Taylor part + stochastic remainder
        quadQ = 0.0
        for i in range(r):
            al, be = info["alpha"][c0 + i], info["beta"][c0 + i]
            if al:
                quadQ += slq_quadrature(*lanczos_from_cg(al, be))
        samples = np.empty(m)
        wn2 = np.einsum("ij,ij->j", self.W, self.W)
        for i in range(m):
            al, be = info["alpha"][cQ + i], info["beta"][cQ + i]
            if not al:
                samples[i] = 0.0
                continue
            dg, od = lanczos_from_cg(al, be)
            e1 = dg[0] - 1.0
            e2 = e1 * e1 + (od[0] ** 2 if od.size else 0.0)
            samples[i] = wn2[i] * (slq_quadrature(dg, od) - e1 + 0.5 * e2)
        exact = (float(np.sum(np.log(P))) - float(np.einsum("ij,ij->", self.Q, EQ))
                 - 0.5 * (E2 - float(np.einsum("ij,ij->", EQ, EQ))))
        logdet_M = exact + quadQ + float(samples.mean())
        logdet_se = float(np.std(samples, ddof=1) / np.sqrt(m))
        # log|R| = n log s^2 - sum(log w); the same arithmetic as the exact objective's
        obj, _ = profiled_criterion(logdet_M, logdet_RX, pwrss, n, p, self.method, self.ldW)
        # conditional modes and fixed-effect covariance
        Sx = St[:, :p]
        vfull = St[:, p] - Sx @ beta
        Ainv = np.linalg.inv(A) if p else np.zeros((0, 0))
        beta_cov = sigma2 * Ainv
        # traces of the diagonal blocks of M^{-1}: tr(D_k Ahat^{-1}), D_k = S_k P^{-1},
        # = tr(Q'D_k Ahat^{-1} Q) + tr(Pq D_k (I - E) Pq) (closed form)
        #   + tr(Pq D_k (Ahat^{-1} - I + E) Pq) (stochastic remainder)
        Pinv = 1.0 / P
        rowQ = sqP[:, None] * S[:, c0:cQ]
        rowQ -= self.Q
        rowQ += EQ
        rowQ *= Pinv[:, None] * self.Q
        rem = sqP[:, None] * S[:, cQ:]
        del S
        rem -= self.W
        rem += EW
        del EW
        rem *= Pinv[:, None] * self.W
        tr_samples = np.stack([rem[off[k]:off[k + 1]].sum(axis=0) for k in range(K)])
        traces = np.array([
            float(np.sum(Pinv[off[k]:off[k + 1]]) + np.sum(rowQ[off[k]:off[k + 1]]))
            for k in range(K)
        ]) + tr_samples.mean(axis=1)
        if self.method == "REML" and p:
            extra = np.einsum("ij,ij->i", Sx @ Ainv, Sx)
            traces = traces + np.array([extra[off[k]:off[k + 1]].sum()
                                        for k in range(self.K)])
        v = [vfull[off[k]:off[k + 1]] for k in range(self.K)]
        grad = theta_gradient(theta, self.sizes, traces, v, sigma2)
        grad_samples = np.zeros((self.K, m))
        for k in range(self.K):
            if theta[k] > 0:
                grad_samples[k] = -2.0 / theta[k] * tr_samples[k]
        grad_cov = np.atleast_2d(np.cov(grad_samples)) / m
        ev = Evaluation(theta, float(obj), grad, float(sigma2), beta, beta_cov, v,
                        logdet_M, logdet_RX, pwrss, traces, None)
        ev.objective_se = logdet_se
        ev.gradient_cov = grad_cov
        ev.gradient_samples = grad_samples  # gradient = deterministic part + their mean
        ev.objective_samples = samples  # the same for the criterion
        ev.pcg_converged = bool(np.all(info["converged"]))
        ev.pcg_residual = float(np.max(info["residual"]))
        ev.cg_iterations = int(info["iterations"])
        ev._lam = lam
        ev._Sx = Sx
        ev._Ainv = Ainv
        self.last = {"cg_iterations": ev.cg_iterations, "objective_se": logdet_se,
                     "seconds": time.perf_counter() - t0}
        return ev

    def __call__(self, theta):
        """Return the estimated criterion at ``theta``."""
        return self.evaluate(theta).objective

    def _boundary_probes(self, k, m):
        """The first ``m`` Rademacher probes of factor ``k``'s level space (a fixed
        stream per factor: more probes extend the same set)."""
        rng = np.random.default_rng([self._boundary_seed, k])
        return rademacher(m, self.sizes[k], rng).T

    def boundary_gradient(self, ev, factors):
        """Derivative of the criterion in ``tau_k = theta_k^2`` at ``theta_k = 0``.

        On the boundary the derivative in ``theta_k`` is 0 by symmetry, and the
        ``theta``-form estimator's noise grows as ``1 / theta_k``; in ``tau_k`` the
        derivative is finite,

        .. math::

            \\partial F / \\partial \\tau_k = \\operatorname{tr}(Z_k' P_0 Z_k)
            - \\|Z_k' e\\|^2 / s^2

        (``P_0 = V_0^{-1}`` for ML, the REML projection for REML, ``V = s^2 V_0``, ``e``
        the conditional residual). In level space ``Z_k'V_0^{-1}Z_k = D_k - C'M^{-1}C``
        with ``C = Lambda Z'Z_k`` (no factor-``k`` rows, since ``theta_k = 0``): ``tr D_k``
        and the Jacobi control variate ``tr(C'P^{-1}C)`` are exact (squared
        cross-tabulations), ``tr(C'(M^{-1} - P^{-1})C)`` is estimated with Rademacher
        probes in factor ``k``'s levels (fixed per factor: common random numbers), and the
        REML term ``tr(B A^{-1} B')``, ``B = Z_k'V_0^{-1}X``, is exact. With two factors
        ``M`` restricted to the other factor is diagonal and the derivative is exact.

        Parameters
        ----------
        ev : Evaluation
            From :meth:`evaluate`, with ``theta_k = 0`` for every ``k`` in ``factors``.
        factors : sequence of int

        Returns
        -------
        value : ndarray, shape (len(factors),)
        samples : ndarray, shape (len(factors), n_probes)
            Per-probe terms whose mean is the stochastic part of ``value``.
        pcg_converged : bool
        """
        factors = [int(k) for k in factors]
        if any(ev.theta[k] != 0.0 for k in factors):
            raise LmmopsError("boundary_gradient needs theta_k = 0 for the factors asked")
        lam, off, p, m = ev._lam, self.offsets, self.p, self.n_probes
        P = lam * lam * self.counts + 1.0
        R = np.zeros((self.q, m * len(factors)))
        for i, k in enumerate(factors):
            E = np.zeros((self.q, m))
            E[off[k]:off[k + 1]] = self._boundary_probes(k, m)
            R[:, i * m:(i + 1) * m] = lam[:, None] * self._gram(E)
        X, info, _ = self._solve(lam, R)
        X -= R / P[:, None]
        samples = -np.einsum("ij,ij->j", R, X).reshape(len(factors), m)
        Zte = self._Zt_resid(ev)
        a = lam * lam / P
        if self.method == "REML" and p:
            ZZS = self._gram(lam[:, None] * ev._Sx)
        value = np.empty(len(factors))
        srows = self._square_rows(a)
        for i, k in enumerate(factors):
            sl = slice(off[k], off[k + 1])
            exact = float(np.sum(self.counts[sl]))  # tr D_k
            # tr(C'P^{-1}C) = sum_{l != k} sum_ij N_kl[i,j]^2 a_j
            exact -= float(np.sum(srows[sl]))
            if self.method == "REML" and p:
                B = self.ZtT[sl, :p] - ZZS[sl]
                exact -= float(np.einsum("ij,ij->", B @ ev._Ainv, B))
            value[i] = exact + samples[i].mean() - float(Zte[sl] @ Zte[sl]) / ev.sigma2
        return value, samples, bool(np.all(info["converged"]))

    # ------------------------------------------------------------------ information
    def _Zt_resid(self, ev):
        """``Z'e`` for the conditional residual e, in level space (no pass over rows)."""
        lam = ev._lam
        vfull = np.concatenate(ev.v)
        return self.ZtT[:, self.p] - self.ZtT[:, : self.p] @ ev.beta - self._gram(
            (lam * vfull)[:, None])[:, 0]

    def average_information(self, ev):
        """Average information ``A_kl = 1/2 w_k' P w_l`` in the variance parameters.

        Working variates ``w_k = Z_k Z_k' e / s^2`` and ``w_e = e / s^2`` (e the
        conditional residual) are handled in level space: ``w_k = Z_k a_k``; one block
        PCG solve gives every ``P w``. Exact given the solves.

        Parameters
        ----------
        ev : Evaluation

        Returns
        -------
        ndarray, shape (n_factors + 1, n_factors + 1)
        """
        K, p, q = self.K, self.p, self.q
        s2 = ev.sigma2
        lam = ev._lam
        off = self.offsets
        Zte = self._Zt_resid(ev)
        vfull = np.concatenate(ev.v)
        ee = ev.pwrss - float(vfull @ vfull)
        # level-space coefficients: w_k = Z E_k a_k, a_k = (Z_k'e)/s2; w_e = e/s2
        Ea = np.zeros((q, K))
        for k in range(K):
            Ea[off[k]:off[k + 1], k] = Zte[off[k]:off[k + 1]] / s2
        GEa = self._gram(Ea)  # Z'Z E_k a_k = Z' w_k
        Ztw = np.empty((q, K + 1))
        Ztw[:, :K] = GEa
        Ztw[:, K] = Zte / s2
        Xtw = np.empty((p, K + 1))
        Xtw[:, :K] = self.ZtT[:, :p].T @ Ea
        Xtw[:, K] = 0.0  # X'e = 0 at the mixed-model-equation solution
        WW = np.empty((K + 1, K + 1))
        WW[:K, :K] = Ea.T @ GEa
        WW[:K, K] = WW[K, :K] = np.einsum("ik,i->k", Ea, Zte) / s2
        WW[K, K] = ee / s2**2
        # b = [Lambda Z'w; X'w]; solve the Z-and-X system by its Schur complement
        bz = lam[:, None] * Ztw
        T, _, _ = self._solve(lam, bz)
        Sx, Ainv = ev._Sx, ev._Ainv
        if p:
            xb = Ainv @ (Xtw - Sx.T @ bz)  # (X'V0^{-1}X)^{-1}(X'w - X'Z Lambda M^{-1} b_z)
            xz = T - Sx @ xb
            bx = bz.T @ xz + Xtw.T @ xb
        else:
            bx = bz.T @ T
        WPW = (WW - bx) / s2
        return 0.25 * (WPW + WPW.T)

    def apply_P(self, ev, B):
        """``P B`` for an (n, m) block, ``P = V^{-1} - V^{-1}X(X'V^{-1}X)^{-1}X'V^{-1}``.

        One block PCG solve in level space: with ``T = M^{-1} Lambda Z'WB``,
        ``P B = W [B - Z Lambda T - (X - Z Lambda S_x) A^{-1} (X'WB - (Lambda Z'WX)'T)] / s^2``
        (``A = X'V_0^{-1}X``, ``V = s^2 V_0``, ``W = I`` without prior weights).

        Parameters
        ----------
        ev : Evaluation
        B : ndarray, shape (n_obs, m)

        Returns
        -------
        ndarray, shape (n_obs, m)
        """
        Z = getattr(self, "_Z", None)
        if Z is None:
            Z = self._Z = RandomEffectsOperator(self.design, None)
        B = np.ascontiguousarray(B, dtype=np.float64)
        w = None if self.weights is None else self.weights[:, None]
        WB = B if w is None else w * B
        lam = ev._lam
        rhs = lam[:, None] * (Z.H @ WB)
        T, _, _ = self._solve(lam, rhs)
        out = B - Z @ (lam[:, None] * T)
        p = self.p
        if p:
            Lx = lam[:, None] * self.ZtT[:, :p]
            XtVB = self.X.T @ WB - Lx.T @ T
            VX = self.X - Z @ (lam[:, None] * ev._Sx)
            out -= VX @ (ev._Ainv @ XtVB)
        if w is not None:  # P = W^{1/2} P_s W^{1/2} for the row-scaled problem
            out *= w
        return out / ev.sigma2

    def expected_information(self, ev, n_probes=32, seed=4):
        """Stochastic expected (Fisher) information in the variance parameters.

        ``I_kl = 1/2 tr(P Vdot_k P Vdot_l)`` with ``Vdot_k = Z_k Z_k'`` for the factors and
        ``Vdot_e = W^{-1}`` for the residual. For factors the trace is a squared Frobenius
        norm of a level-space block, ``1/2 ||Z_k' P Z_l||_F^2``, and ``||B||_F^2 =
        E ||B z||^2`` for Rademacher ``z``; so each column of the information needs one
        block ``P Z_l z`` (:meth:`apply_P`), and the residual row uses
        ``W^{-1/2} P Z_l z`` and ``W^{-1/2} P W^{-1/2} z`` likewise. (The average
        information, exact from solves, is what the optimiser uses; this is the expected
        one, for inference where it is wanted.)

        Parameters
        ----------
        ev : Evaluation
        n_probes : int
        seed : int

        Returns
        -------
        info : ndarray, shape (K + 1, K + 1)
            Order: the factors' variances, then the residual variance.
        stderr : ndarray, shape (K + 1, K + 1)
            Monte Carlo standard errors.
        """
        rng = np.random.default_rng(seed)
        K, n = self.K, self.n
        codes = self.design.codes
        winv_sqrt = (np.ones(n) if self.weights is None else 1.0 / np.sqrt(self.weights))
        samples = np.zeros((K + 1, K + 1, n_probes))
        for l in range(K + 1):
            if l < K:
                z = rademacher(self.design.n_levels[l], n_probes, rng)
                B = z[codes[l]]  # Z_l z
            else:
                B = winv_sqrt[:, None] * rademacher(n, n_probes, rng)  # W^{-1/2} z
            PB = self.apply_P(ev, B)
            for k in range(K):
                ZtPB = np.stack([np.bincount(codes[k], weights=PB[:, j],
                                             minlength=self.design.n_levels[k])
                                 for j in range(n_probes)], axis=1)
                samples[k, l] = np.einsum("ij,ij->j", ZtPB, ZtPB)
            R = winv_sqrt[:, None] * PB
            samples[K, l] = np.einsum("ij,ij->j", R, R)
        samples = 0.5 * (samples + samples.transpose(1, 0, 2)) / 2.0  # symmetrise
        info = samples.mean(axis=2)
        se = samples.std(axis=2, ddof=1) / np.sqrt(n_probes)
        return info, se

    def diag_P(self, ev, n_probes=64, seed=1, chunk=8):
        """Stochastic estimate of ``diag(P)`` with per-entry standard errors.

        Rademacher probes in observation space, ``d_i = mean_j z_ij (P z_j)_i``
        (:func:`lmmops.linalg.trace.diagonal`), applied in chunks of ``chunk`` probes so memory
        stays ``O(n chunk)``. The noise of entry i comes only from the off-diagonal
        ``P_il`` (observations sharing levels with i), which are ``O(1 / level count)``.

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
        """
        return chunked_diagonal(lambda Zp: self.apply_P(ev, Zp), self.n, n_probes,
                                np.random.default_rng(seed), chunk)

    def with_weights(self, weights):
        """The same objective with other prior weights, the same probes and basis.

        Used for refits whose criteria are compared (the variance-shift model): common
        random numbers make the difference of two estimated criteria far more precise
        than either.

        Parameters
        ----------
        weights : array_like, shape (n_obs,)

        Returns
        -------
        IterativeObjective
        """
        other = IterativeObjective(
            self.design, self.X, self.y, method=self.method, n_probes=self.n_probes,
            seed=self.seed, rtol=self.rtol, maxiter=self.maxiter,
            small_factor_levels=self.small_factor_levels, weights=weights,
            deflation_basis=self.Q, preconditioner=self.preconditioner)
        other.W = self.W.copy()  # the very same probes, not a redraw from the seed
        other._boundary_seed = self._boundary_seed
        return other

    def quadratic_zx(self, ev, bz, bx):
        """``g' M_zx^{-1} g`` per column for ``g = [bz; bx]`` and the Z-and-X system.

        ``M_zx = [[M, Lambda Z'WX], [X'WZ Lambda, X'WX]]`` is solved by its Schur complement:
        one level-space block PCG solve ``T = M^{-1} bz``, then exact dense algebra for X.
        Exact to the CG tolerance.

        Parameters
        ----------
        ev : Evaluation
        bz : ndarray, shape (q, m)
        bx : ndarray, shape (p, m)

        Returns
        -------
        ndarray, shape (m,)
        """
        T, _, _ = self._solve(ev._lam, np.ascontiguousarray(bz, dtype=np.float64))
        out = np.einsum("ij,ij->j", bz, T)
        if self.p:
            Sx, Ainv = ev._Sx, ev._Ainv
            u = bx - Sx.T @ bz
            out += np.einsum("ij,ij->j", u, Ainv @ u)
        return out

    def diag_inverse(self, ev, n_probes=64, seed=2, z_only=False):
        """Stochastic estimate of the diagonal of the spherical system's inverse.

        ``diag(M^{-1})`` (``z_only``) or the random-effects block of the Z-and-X system's
        inverse, ``diag(M^{-1}) + diag(S_x A^{-1} S_x')`` (exact second term), in level
        space. With ``Ahat = P^{-1/2} M P^{-1/2} = I + E`` (``E`` zero-diagonal) and
        ``F = Ahat^{-1}``, ``diag(M^{-1}) = P^{-1} diag(F)`` and, for the deflation basis
        ``Q`` of the criterion and ``Pq = I - QQ'``,
        ``diag(F) = diag(F Q Q') + diag((I - E) Pq) + diag((F - I + E) Pq)``: the first two
        terms exactly (solves with the columns of ``Q``; ``E Q`` from the first CG product),
        the last by Rademacher probes ``w`` as ``w * (F - I + E) Pq w``. One block solve
        does it all. Multiplied by ``s^2 theta_k^2`` these are the prediction error
        variances of the BLUPs.

        Parameters
        ----------
        ev : Evaluation
        n_probes : int
        seed : int
        z_only : bool
            ``True``: given ``beta`` (lme4's ``condVar``).

        Returns
        -------
        TraceEstimate
            ``estimate`` and ``stderr`` of shape (q,).
        """
        rng = np.random.default_rng(seed)
        Q = self.Q
        r = Q.shape[1]
        W = rademacher(self.q, n_probes, rng)
        Wt = W - Q @ (Q.T @ W)  # projected probes
        lam = ev._lam
        P = lam * lam * self.counts + 1.0
        sqP = np.sqrt(P)
        S, info, _ = self._solve(lam, sqP[:, None] * np.hstack([Q, Wt]), kind="jacobi")
        first = info["first_product"]
        FQ = sqP[:, None] * S[:, :r]  # Ahat^{-1} Q
        EQ = first[:, :r] / sqP[:, None] - Q
        FW = sqP[:, None] * S[:, r:]
        EW = first[:, r:] / sqP[:, None] - Wt
        del S, first
        # diag(F) = diag(F QQ') + diag((I - E)(I - QQ')) + diag((F - I + E)(I - QQ'))
        exact = np.einsum("ij,ij->i", FQ, Q) + 1.0 - np.einsum("ij,ij->i", Q, Q) \
            + np.einsum("ij,ij->i", EQ, Q)
        samples = W * (FW - Wt + EW)
        d = (exact + samples.mean(axis=1)) / P
        se = samples.std(axis=1, ddof=1) / np.sqrt(n_probes) / P
        if not z_only and self.p:
            d = d + np.einsum("ij,ij->i", ev._Sx @ ev._Ainv, ev._Sx)
        return TraceEstimate(d, se, n_probes)

    # the conditional residuals (one pass over the rows), shared with the exact objective
    residuals = DirectObjective.residuals
