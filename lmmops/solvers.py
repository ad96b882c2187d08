r"""Conjugate-gradient solvers over LinearOperators, and the exact solve ``V x = b``.

- :func:`cg`: preconditioned CG with :func:`scipy.sparse.linalg.cg`'s signature and exact
  semantics, plus pyamg's ``residuals=`` history.
- :func:`block_cg`: many right-hand sides in one pass (one ``matmat`` per iteration on the
  columns that have not converged yet), per-column convergence; optionally records the
  CG coefficients of every column (``return_lanczos=True``).
- :func:`cg_lanczos`: :func:`block_cg` that returns the Lanczos tridiagonals
  (:class:`LanczosCoefficients`), the modified batched CG (mBCG) of Gardner et al. (2018)
  used by stochastic Lanczos quadrature.
- :func:`solve_V`: ``V^{-1} b`` for a :class:`~lmmops.operators.CovarianceOperator` by
  the fastest exact route, level-space PCG (math.md Sections 11, 12), with a residual
  measured on ``V`` itself.

Stopping rule (scipy's): iterate until ``||b - A x|| < max(rtol ||b||, atol)``, where the
residual is CG's recursively updated one. ``info`` is 0 on success and the number of
iterations (``maxiter``) otherwise; ``maxiter`` defaults to ``10 n``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import scipy.linalg as sla
from scipy.sparse.linalg import LinearOperator, aslinearoperator

from .errors import ArgumentError, ArgumentTypeError

__all__ = [
    "LanczosCoefficients",
    "SolveInfo",
    "SparseLevelOperator",
    "block_cg",
    "cg",
    "cg_lanczos",
    "solve_V",
]


def _operator(A, name):
    if A is None:
        return None
    try:
        return aslinearoperator(A)
    except TypeError:
        raise ArgumentTypeError(
            f"{name} must be an ndarray, a sparse matrix or a LinearOperator, got "
            f"{type(A).__name__}"
        ) from None


def _atol_vector(bnorm, rtol, atol):
    if rtol < 0 or atol < 0:
        raise ArgumentError(f"rtol and atol must be >= 0, got rtol={rtol}, atol={atol}")
    return np.maximum(float(atol), float(rtol) * bnorm)


@dataclass
class LanczosCoefficients:
    r"""CG coefficients of each column of a :func:`block_cg` run, and their tridiagonals.

    For CG on ``A x = b`` from ``x0 = 0`` with preconditioner ``P`` (approximating
    ``A^{-1}``), step lengths ``alpha_j`` and direction updates ``beta_j``, the Lanczos
    tridiagonal ``T`` of ``P^{1/2} A P^{1/2}`` with start ``P^{1/2} b / ||P^{1/2} b||`` has
    diagonal ``1/alpha_j + beta_{j-1}/alpha_{j-1}`` and off-diagonal
    ``sqrt(beta_j)/alpha_j``, so that

    .. math::

        b' P^{1/2} f(P^{1/2} A P^{1/2}) P^{1/2} b \approx (b' P b)\, e_1' f(T) e_1

    (Gauss quadrature; exact for polynomials of degree < 2k after k steps).

    Attributes
    ----------
    alpha : list of ndarray
        Per column, the step lengths (one per iteration).
    beta : list of ndarray
        Per column, the direction updates (one fewer than ``alpha``).
    norms2 : ndarray, shape (m,)
        ``b' P b`` of each column (``||b||^2`` without a preconditioner).
    """

    alpha: list = field(default_factory=list)
    beta: list = field(default_factory=list)
    norms2: np.ndarray = None

    def tridiagonal(self, j):
        """The Lanczos tridiagonal of column ``j``.

        Parameters
        ----------
        j : int

        Returns
        -------
        diag : ndarray, shape (k,)
        offdiag : ndarray, shape (k - 1,)
        """
        alpha = np.asarray(self.alpha[j], dtype=np.float64)
        beta = np.asarray(self.beta[j], dtype=np.float64)[: max(alpha.size - 1, 0)]
        diag = 1.0 / alpha
        diag[1:] += beta / alpha[:-1]
        return diag, np.sqrt(beta) / alpha[:-1]

    def quadrature(self, f=np.log):
        """``(b'Pb) e_1' f(T) e_1`` for every column (0 for a zero column).

        Parameters
        ----------
        f : callable, optional
            Applied elementwise to the Ritz values (default ``np.log``).

        Returns
        -------
        ndarray of float64, shape (m,)
        """
        out = np.zeros(len(self.alpha))
        for j in range(len(self.alpha)):
            if len(self.alpha[j]) == 0:
                continue
            d, e = self.tridiagonal(j)
            w, S = sla.eigh_tridiagonal(d, e)
            out[j] = self.norms2[j] * float(np.sum(S[0] ** 2 * f(w)))
        return out


def _pcg_block(A, B, X, atol, maxiter, M=None, callback=None, residuals=None, record=None,
               stop_norms=None, vector=False):
    """PCG on the columns of ``B`` (2-d), in place in ``X``; returns per-column iterations.

    Columns are dropped from the products once converged. ``stop_norms(R, cols)`` maps the
    active residual block to the norms compared with ``atol`` (default: column 2-norms).
    ``vector=True`` (one column) uses ``matvec`` as scipy does. Returns ``(iters, done)``.
    """
    m = B.shape[1]
    iters = np.zeros(m, dtype=np.int64)
    done = np.zeros(m, dtype=bool)
    if vector:
        def amul(P):
            return A.matvec(P[:, 0])[:, None]

        def psolve(R):
            return R if M is None else M.matvec(R[:, 0])[:, None]
    else:
        def amul(P):
            return A.matmat(P)

        def psolve(R):
            return R if M is None else M.matmat(R)

    def norms(R, cols):
        if stop_norms is not None:
            return stop_norms(R, cols)
        return np.linalg.norm(R, axis=0)

    if np.any(X):
        R = B - (A.matvec(X[:, 0])[:, None] if vector else A.matmat(X))
    else:
        R = B.copy()
    act = np.arange(m)
    rn = norms(R, act)
    if residuals is not None:
        residuals[:] = [float(rn[0]) if vector else rn.copy()]
    P = None
    rho_prev = None
    for it in range(maxiter):
        conv = rn < atol[act]
        if conv.any():
            done[act[conv]] = True
            keep = ~conv
            act = act[keep]
            if act.size == 0:
                return iters, done
            R = R[:, keep]
            P = P[:, keep] if P is not None else None
            rho_prev = rho_prev[keep] if rho_prev is not None else None
        Zr = psolve(R)
        rho = np.einsum("ij,ij->j", R, Zr)
        if record is not None and it == 0:
            record.norms2[act] = rho
        if P is None:
            P = Zr.copy()
        else:
            beta = rho / rho_prev
            P *= beta
            P += Zr
            if record is not None:
                for c, bv in zip(act, beta):
                    record.beta[c].append(float(bv))
        Q = amul(P)
        alpha = rho / np.einsum("ij,ij->j", P, Q)
        if record is not None:
            for c, av in zip(act, alpha):
                record.alpha[c].append(float(av))
        if act.size == m:
            X += alpha * P
        else:
            X[:, act] += alpha * P
        R -= alpha * Q
        rho_prev = rho
        iters[act] += 1
        rn = norms(R, act)
        if residuals is not None:
            if vector:
                residuals.append(float(rn[0]))
            else:
                full = np.zeros(m)
                full[act] = rn
                residuals.append(full)
        if callback is not None:
            callback(X[:, 0] if vector else X)
    return iters, done


def cg(A, b, *, x0=None, rtol=1e-5, atol=0.0, maxiter=None, M=None, callback=None,
       residuals=None):
    """Solve ``A x = b`` for symmetric positive definite ``A`` by preconditioned CG.

    The signature and every argument mean exactly what they mean in
    :func:`scipy.sparse.linalg.cg`; ``residuals`` is pyamg's.

    Parameters
    ----------
    A : {ndarray, sparse matrix, LinearOperator}, shape (n, n)
        Symmetric positive definite.
    b : ndarray, shape (n,) or (n, 1)
    x0 : ndarray, shape (n,), optional
        Starting guess (default zeros).
    rtol, atol : float, optional
        Stop when ``||b - A x|| < max(rtol ||b||, atol)`` (the recursive residual).
    maxiter : int, optional
        Default ``10 n``.
    M : {ndarray, sparse matrix, LinearOperator}, optional
        Symmetric positive definite approximation of ``A^{-1}``, e.g.
        ``lmmops.preconditioners.build(A, ...).aspreconditioner()``.
    callback : callable, optional
        ``callback(xk)`` after every iteration.
    residuals : list, optional
        Filled with the residual norm before the first iteration and after each one.

    Returns
    -------
    x : ndarray, shape (n,)
    info : int
        0 on convergence, else the number of iterations performed (``maxiter``).

    Examples
    --------
    >>> A = np.array([[4.0, 1.0, 0.0], [1.0, 3.0, 1.0], [0.0, 1.0, 2.0]])
    >>> res = []
    >>> x, info = cg(A, np.ones(3), rtol=1e-10, residuals=res)
    >>> info, bool(np.allclose(A @ x, 1.0)), len(res) - 1
    (0, True, 3)
    """
    A = _operator(A, "A")
    M = _operator(M, "M")
    b = np.asarray(b)
    n = A.shape[0]
    if b.shape not in ((n,), (n, 1)):
        raise ArgumentError(f"b has shape {b.shape}, expected ({n},) or ({n}, 1)")
    dtype = np.result_type(A.dtype, b.dtype, np.float64)
    if np.issubdtype(dtype, np.complexfloating):
        from scipy.sparse.linalg import cg as _scipy_cg

        return _scipy_cg(A, b, x0=x0, rtol=rtol, atol=atol, maxiter=maxiter, M=M,
                         callback=callback)
    b = b.reshape(n).astype(np.float64)
    bnorm = float(np.linalg.norm(b))
    tol = _atol_vector(np.array([bnorm]), rtol, atol)
    if bnorm == 0:
        if residuals is not None:
            residuals[:] = [0.0]
        return b, 0
    maxiter = 10 * n if maxiter is None else int(maxiter)
    X = np.zeros((n, 1)) if x0 is None else np.array(x0, dtype=np.float64).reshape(n, 1)
    iters, done = _pcg_block(A, b[:, None], X, tol, maxiter, M=M, callback=callback,
                             residuals=residuals, vector=True)
    return X[:, 0], 0 if done[0] else maxiter


def block_cg(A, B, *, X0=None, rtol=1e-5, atol=0.0, maxiter=None, M=None, callback=None,
             residuals=None, return_lanczos=False):
    """Solve ``A X = B`` column by column with one ``matmat`` per iteration.

    Each column runs its own CG recurrence (independent step lengths, as in GPyTorch's
    mBCG); the block is applied with ``A.matmat`` and ``M.matmat`` on the columns that have
    not converged yet, so converged columns cost nothing.

    Parameters
    ----------
    A : {ndarray, sparse matrix, LinearOperator}, shape (n, n)
        Symmetric positive definite.
    B : ndarray, shape (n, m) or (n,)
    X0 : ndarray, shape of ``B``, optional
    rtol, atol : float, optional
        Column j stops when ``||B_j - A X_j|| < max(rtol ||B_j||, atol)``.
    maxiter : int, optional
        Per column; default ``10 n``.
    M : {ndarray, sparse matrix, LinearOperator}, optional
        SPD approximation of ``A^{-1}``; its ``matmat`` should be a real block operation.
    callback : callable, optional
        ``callback(Xk)`` (the whole block) after every iteration.
    residuals : list, optional
        Filled with arrays (shape (m,)) of the column residual norms, before the first
        iteration and after each one (0 for columns already converged or zero).
    return_lanczos : bool, optional
        Also return the :class:`LanczosCoefficients` of every column (requires ``X0``
        None).

    Returns
    -------
    X : ndarray, shape of ``B``
    info : ndarray of int64, shape (m,)
        Per column: 0 on convergence, else ``maxiter``.
    lanczos : LanczosCoefficients
        Only with ``return_lanczos=True``.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> G = rng.standard_normal((30, 30))
    >>> A = G @ G.T + 30 * np.eye(30)
    >>> B = rng.standard_normal((30, 4))
    >>> X, info = block_cg(A, B, rtol=1e-10)
    >>> info.tolist(), bool(np.allclose(A @ X, B))
    ([0, 0, 0, 0], True)
    """
    A = _operator(A, "A")
    M = _operator(M, "M")
    B = np.asarray(B, dtype=np.float64)
    one_d = B.ndim == 1
    B2 = B[:, None] if one_d else B
    n, m = B2.shape
    if n != A.shape[0] or B2.ndim != 2:
        raise ArgumentError(f"B has shape {B.shape}, expected ({A.shape[0]}, m)")
    if return_lanczos and X0 is not None:
        raise ArgumentError("return_lanczos=True needs X0=None (the quadrature starts at 0)")
    maxiter = 10 * n if maxiter is None else int(maxiter)
    bnorm = np.linalg.norm(B2, axis=0)
    tol = _atol_vector(bnorm, rtol, atol)
    X = np.zeros((n, m)) if X0 is None else np.array(X0, dtype=np.float64).reshape(n, m)
    record = None
    if return_lanczos:
        record = LanczosCoefficients([[] for _ in range(m)], [[] for _ in range(m)],
                                     np.zeros(m))
    zero = bnorm == 0
    if zero.all():
        iters, done = np.zeros(m, np.int64), np.ones(m, bool)
        X[:] = 0.0
        if residuals is not None:
            residuals[:] = [np.zeros(m)]
    else:
        cols = np.flatnonzero(~zero)
        Xs = np.ascontiguousarray(X[:, cols])
        sub = None
        if record is not None:
            sub = LanczosCoefficients([[] for _ in cols], [[] for _ in cols],
                                      np.zeros(cols.size))
        cb = None
        if callback is not None:
            def cb(Xk):
                X[:, cols] = Xk
                callback(X[:, 0] if one_d else X)
        res_s = [] if residuals is not None else None
        iters_s, done_s = _pcg_block(A, np.ascontiguousarray(B2[:, cols]), Xs, tol[cols],
                                     maxiter, M=M, callback=cb, residuals=res_s,
                                     record=sub)
        if residuals is not None:
            full = []
            for r in res_s:
                f = np.zeros(m)
                f[cols] = r
                full.append(f)
            residuals[:] = full
        X[:, cols] = Xs
        X[:, zero] = 0.0
        iters, done = np.zeros(m, np.int64), np.ones(m, bool)
        iters[cols], done[cols] = iters_s, done_s
        if record is not None:
            for i, c in enumerate(cols):
                record.alpha[c] = np.array(sub.alpha[i])
                record.beta[c] = np.array(sub.beta[i])
                record.norms2[c] = sub.norms2[i]
    info = np.where(done, 0, maxiter).astype(np.int64)
    if record is not None:
        for c in range(m):
            record.alpha[c] = np.asarray(record.alpha[c], dtype=np.float64)
            record.beta[c] = np.asarray(record.beta[c], dtype=np.float64)
    Xout = X[:, 0] if one_d else X
    if return_lanczos:
        return Xout, info, record
    return Xout, info


def cg_lanczos(A, B, *, rtol=1e-5, atol=0.0, maxiter=None, M=None):
    """Block CG that also returns the Lanczos coefficients (mBCG) of every column.

    Shorthand for ``block_cg(A, B, ..., return_lanczos=True)``; see
    :class:`LanczosCoefficients` for the quadrature.

    Parameters
    ----------
    A : {ndarray, sparse matrix, LinearOperator}, shape (n, n)
    B : ndarray, shape (n, m)
        Probe vectors (e.g. Rademacher, or ``M^{-1/2}``-scaled Gaussians with a
        preconditioner).
    rtol, atol, maxiter, M
        As in :func:`block_cg`.

    Returns
    -------
    X : ndarray, shape (n, m)
        ``A^{-1} B``.
    info : ndarray of int64, shape (m,)
    lanczos : LanczosCoefficients

    Examples
    --------
    Stochastic Lanczos quadrature with the unit vectors as probes is exact:

    >>> rng = np.random.default_rng(1)
    >>> G = rng.standard_normal((12, 12))
    >>> A = G @ G.T / 12 + np.eye(12)
    >>> X, info, lz = cg_lanczos(A, np.eye(12), rtol=1e-13, maxiter=12)
    >>> bool(np.isclose(lz.quadrature(np.log).sum(), np.linalg.slogdet(A)[1]))
    True
    """
    return block_cg(A, B, rtol=rtol, atol=atol, maxiter=maxiter, M=M, return_lanczos=True)


# ---------------------------------------------------------------------------- solve_V
@dataclass
class SolveInfo:
    """What :func:`solve_V` did.

    Attributes
    ----------
    iterations : int
        CG iterations (the largest over the columns for a block right-hand side).
    residual_norm : float
        ``||b - V x||`` measured with one product by the observation-space ``V`` (the
        largest column norm for a block).
    method : str
        The route taken, e.g. ``"level:block_gauss_seidel"`` or ``"observation:exact"``.
    converged : bool
        Whether every column reached ``max(rtol ||b||, atol)``.
    rtol : float
    setup_seconds : float
        Time spent building the preconditioner.
    solve_seconds : float
        Time spent in CG (and lifting).
    """

    iterations: int
    residual_norm: float
    method: str
    converged: bool
    rtol: float
    setup_seconds: float = 0.0
    solve_seconds: float = 0.0


#: Level-space preconditioner chosen by ``solve_V(method="auto")`` (any number of factors).
#: Measured in docs/studies/solver_study.md: symmetric block Gauss-Seidel needs the fewest
#: iterations of the kinds without setup cost (4-8 on uniform, Poisson, missing-cell and
#: Zipf designs, 9-11 at variance ratio 10 or K = 3, against 5-15 for D2 and 8-22 for
#: Jacobi), and one application (two sweeps over the sparse cross-tabulations) costs less
#: than one product by M. It is the fastest route at n = 10^6 and 10^7. Exception: banded
#: ("staircase") designs, where the canonical correlations have a few outliers near 1 and
#: it needs about 20 iterations; pass ``preconditioner="spectral"`` (K = 2: 7) or
#: ``"amg"`` (8) there. AMG needs the fewest iterations everywhere but costs about two
#: products per application (a symmetric V-cycle) and a setup of its own.
AUTO_LEVEL_KIND = "block_gauss_seidel"


def _reduce_zero_variances(V):
    """V without the factors whose variance is 0 (the same matrix, smaller level space)."""
    from .operators import CovarianceOperator

    keep = np.flatnonzero(np.asarray(V.sigma2) > 0)
    if keep.size == V.design.n_factors:
        return V
    if keep.size == 0:
        return None
    design = V.design.subset_factors(keep.tolist())
    return CovarianceOperator(design, V.sigma2_e, np.asarray(V.sigma2)[keep],
                              parallel=V.parallel)


def solve_V(V, b, method="auto", rtol=1e-6, atol=0.0, maxiter=None, preconditioner=None,
            x0=None, level_operator="sparse", **options):
    """Solve ``V x = b`` for a crossed covariance ``V`` by preconditioned CG.

    Parameters
    ----------
    V : CovarianceOperator
    b : ndarray, shape (n_obs,) or (n_obs, m)
    method : {'auto', 'level', 'observation', 'direct'}, optional
        ``'level'``: CG on ``M = Z'Z + Lambda`` with ``rhs = Z'b``, then
        ``x = lift(u, b)`` (math.md Section 11). ``'observation'``: CG on ``V`` itself.
        ``'direct'``: no iteration; ``V^{-1} b`` by the dense Schur complement of M on
        the factors other than the largest (at most ``max_dense`` = 4000 levels), factored
        once: worth its setup when there are many right-hand sides (each then costs about
        1.5 V matvecs). ``rtol``, ``atol``, ``maxiter``, ``preconditioner`` and ``x0`` do
        not apply to it, and ``converged`` reports whether the residual met the target.
        ``'auto'`` (default) is ``'level'`` with :data:`AUTO_LEVEL_KIND` (any number of
        factors); factors with zero variance are dropped first, and with all variances 0
        ``V = sigma2_e I`` is solved directly.
    rtol, atol : float, optional
        Target ``||b - V x|| <= max(rtol ||b||, atol)`` on the observation-space residual,
        per column. In level space CG stops on a guaranteed bound of that residual,
        ``||Z Lambda^{-1} r|| <= sqrt(K sum_k ||D_k^{1/2} r_k / lambda_k||^2)`` with ``r``
        the level-space residual, so the target holds on exit (up to rounding).
    maxiter : int, optional
        Per column; default ``10 q`` (level) or ``10 n`` (observation).
    preconditioner : str or object or None, optional
        A kind for :func:`lmmops.preconditioners.build` in the chosen space, or an object
        with ``aspreconditioner()``; default the auto choice (level) or ``'exact'``
        (observation).
    x0 : ndarray, optional
        Starting guess (observation space only).
    level_operator : {'sparse', 'kernel'}, optional
        How CG applies M in level space: through the sparse ``Z'Z`` of the design
        (:class:`SparseLevelOperator`, default: ``O(cells)`` per product, ``Z'Z`` built once
        per design) or the matrix-free row pass of ``V.level_space()`` (``O(n K)``, nothing
        stored).
    **options
        Passed to :func:`lmmops.preconditioners.build`.

    Returns
    -------
    x : ndarray, shape of ``b``
    info : SolveInfo
        ``iterations``, ``residual_norm`` (measured on V), ``method``, ``converged``.

    Raises
    ------
    ArgumentError
        For ``b`` of the wrong shape, a NaN or infinite entry in ``b`` or ``x0``, or an
        unknown ``method`` or ``level_operator``.

    Notes
    -----
    Why level space: there ``M`` is exact (V in Woodbury form), and a good preconditioner
    of M (proportional, spectral, block Gauss-Seidel) gives 5-10 iterations on skewed
    designs, while the same approximation lifted to observation space is a disastrous
    preconditioner of V (math.md Section 12). A level-space iteration costs one pass over
    the rows for ``M u`` plus one for the preconditioner, and the vectors have length q.

    Examples
    --------
    >>> from lmmops.design import CrossedDesign
    >>> from lmmops.operators import CovarianceOperator
    >>> rng = np.random.default_rng(0)
    >>> codes = np.vstack([rng.integers(0, 30, 500), rng.integers(0, 8, 500)])
    >>> V = CovarianceOperator(CrossedDesign.from_codes(codes), 1.0, [0.5, 2.0])
    >>> b = rng.standard_normal(500)
    >>> x, info = solve_V(V, b, rtol=1e-8)
    >>> info.method, info.converged, bool(info.residual_norm <= 1e-8 * np.linalg.norm(b))
    ('level:block_gauss_seidel', True, True)
    """
    from . import preconditioners as _pc

    b = np.asarray(b, dtype=np.float64)
    n = V.shape[0]
    if b.ndim not in (1, 2) or b.shape[0] != n:
        raise ArgumentError(f"b has shape {b.shape}, expected ({n},) or ({n}, m)")
    for what, arr in (("b", b), ("x0", x0)):
        bad = None if arr is None else ~np.isfinite(np.asarray(arr, dtype=np.float64))
        if bad is not None and bad.any():
            raise ArgumentError(
                f"{what} has {int(bad.sum())} NaN or infinite entr(ies) (first at flat index "
                f"{int(np.flatnonzero(bad)[0])}); V x = b needs a finite right-hand side"
            )
    if level_operator not in ("sparse", "kernel"):
        raise ArgumentError(f"level_operator must be 'sparse' or 'kernel', got {level_operator!r}")
    if method not in ("auto", "level", "observation", "direct"):
        raise ArgumentError(
            f"method must be 'auto', 'level', 'observation' or 'direct', got {method!r}"
        )
    b2 = b[:, None] if b.ndim == 1 else b
    bnorm = np.linalg.norm(b2, axis=0)
    tol = _atol_vector(bnorm, rtol, atol)
    t0 = time.perf_counter()
    if method in ("auto", "direct"):
        Vr = _reduce_zero_variances(V)
        if Vr is None:  # every factor variance is 0: V = sigma2_e I
            x2 = b2 / V.sigma2_e
            info = SolveInfo(0, 0.0, "diagonal", True, rtol)
            return (x2[:, 0] if b.ndim == 1 else x2), info
    if method == "direct":
        if preconditioner is not None or x0 is not None:
            raise ArgumentError("method='direct' takes no preconditioner and no x0")
        P = _pc.build(Vr, kind="exact", inner="direct", **options)
        setup = time.perf_counter() - t0
        t1 = time.perf_counter()
        x2 = P.solve(b2)
        iters = np.zeros(b2.shape[1], dtype=int)
        done = None
        route = "direct:schur"
    elif method in ("auto", "level"):
        Vr = Vr if method == "auto" else V
        M = Vr.level_space()
        kind = AUTO_LEVEL_KIND if preconditioner is None else preconditioner
        P = kind if hasattr(kind, "aspreconditioner") else _pc.build(M, kind=kind, **options)
        Pop = P.aspreconditioner()
        setup = time.perf_counter() - t0
        t1 = time.perf_counter()
        rhs = M.rhs(b2)
        design = Vr.design
        weights = np.concatenate(
            [design.counts(k) / lam**2 for k, lam in enumerate(M.lambdas)]
        ).astype(np.float64)
        Kf = design.n_factors

        def bound(R, cols):
            return np.sqrt(Kf * np.einsum("i,ij->j", weights, R * R))

        q = M.shape[0]
        mi = 10 * q if maxiter is None else int(maxiter)
        U = np.zeros((q, b2.shape[1]))
        active = np.flatnonzero(bnorm > 0)
        iters = np.zeros(b2.shape[1], np.int64)
        done = np.ones(b2.shape[1], bool)
        if active.size:
            Ua = np.zeros((q, active.size))
            Aop = SparseLevelOperator(M) if level_operator == "sparse" else M
            it_a, done_a = _pcg_block(Aop, np.ascontiguousarray(rhs[:, active]), Ua,
                                      tol[active], mi, M=Pop, stop_norms=bound)
            U[:, active] = Ua
            iters[active], done[active] = it_a, done_a
        x2 = M.lift(U, b2)
        name = getattr(P, "kind", type(P).__name__)
        route = f"level:{name}"
    else:
        kind = "exact" if preconditioner is None else preconditioner
        P = kind if hasattr(kind, "aspreconditioner") else _pc.build(V, kind=kind, **options)
        setup = time.perf_counter() - t0
        t1 = time.perf_counter()
        mi = 10 * n if maxiter is None else int(maxiter)
        X = np.zeros_like(b2) if x0 is None else np.array(x0, np.float64).reshape(b2.shape)
        iters, done = _pcg_block(V, b2, X, tol, mi, M=P.aspreconditioner())
        x2 = X
        route = f"observation:{getattr(P, 'kind', type(P).__name__)}"
    solve = time.perf_counter() - t1
    res = np.linalg.norm(b2 - V.matmat(x2) if b2.shape[1] > 1 else
                         b2[:, 0:1] - V.matvec(x2[:, 0])[:, None], axis=0)
    if done is None:  # direct: exact up to rounding; say so only if the residual shows it
        done = res <= tol
    info = SolveInfo(
        iterations=int(iters.max(initial=0)),
        residual_norm=float(res.max(initial=0.0)),
        method=route,
        converged=bool(done.all()),
        rtol=float(rtol),
        setup_seconds=setup,
        solve_seconds=solve,
    )
    return (x2[:, 0] if b.ndim == 1 else x2), info


class SparseLevelOperator(LinearOperator):
    """``M = Z'Z + Lambda`` applied through the sparse ``Z'Z`` (``design.gram()``).

    The same matrix as :class:`~lmmops.operators.LevelSpaceOperator`, but a product costs
    ``O(nnz(Z'Z))`` (non-empty cells) instead of a pass over the ``n`` rows; ``Z'Z`` is
    built once per design (cached by the design) and does not depend on the variances.

    Parameters
    ----------
    M : LevelSpaceOperator

    Examples
    --------
    >>> from lmmops.design import CrossedDesign
    >>> from lmmops.operators import LevelSpaceOperator
    >>> d = CrossedDesign.from_codes([[0, 0, 1, 1, 2], [0, 1, 0, 1, 1]])
    >>> M = LevelSpaceOperator(d, [2.0, 0.5])
    >>> bool(np.allclose(SparseLevelOperator(M) @ np.ones(5), M @ np.ones(5)))
    True
    """

    def __init__(self, M):
        super().__init__(dtype=np.float64, shape=M.shape)
        self.args = (M,)
        self._G = M.design.gram()
        self._d = np.repeat(np.asarray(M.lambdas, dtype=np.float64), M.design.n_levels)

    def _matvec(self, x):
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        return self._G @ x + self._d * x

    def _matmat(self, X):
        X = np.asarray(X, dtype=np.float64)
        return self._G @ X + self._d[:, None] * X

    def _adjoint(self):
        return self

    _transpose = _adjoint
