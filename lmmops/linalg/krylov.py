r"""Conjugate-gradient solvers over LinearOperators.

- :func:`cg`: preconditioned CG with :func:`scipy.sparse.linalg.cg`'s signature and exact
  semantics, plus pyamg's ``residuals=`` history.
- :func:`block_cg`: many right-hand sides in one pass (one ``matmat`` per iteration on the
  columns that have not converged yet), per-column convergence; optionally records the
  CG coefficients of every column (``return_lanczos=True``).
- :func:`cg_lanczos`: :func:`block_cg` that returns the Lanczos tridiagonals
  (:class:`LanczosCoefficients`), the modified batched CG (mBCG) of Gardner et al. (2018)
  used by stochastic Lanczos quadrature.

Stopping rule (scipy's): iterate until ``||b - A x|| < max(rtol ||b||, atol)``, where the
residual is CG's recursively updated one. ``info`` is 0 on success and the number of
iterations (``maxiter``) otherwise; ``maxiter`` defaults to ``10 n``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.sparse.linalg import aslinearoperator
from scipy.sparse.linalg import cg as _scipy_cg

from lmmops.errors import ArgumentError, ArgumentTypeError
from lmmops.linalg import kernels
from lmmops.linalg.trace import lanczos_from_cg, slq_quadrature

__all__ = [
    "LanczosCoefficients",
    "block_cg",
    "block_pcg",
    "cg",
    "cg_lanczos",
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
        return lanczos_from_cg(self.alpha[j], self.beta[j])

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
            out[j] = self.norms2[j] * slq_quadrature(*self.tridiagonal(j), f=f)
        return out


def _work(work, name, shape):
    """The reusable block ``work[name]`` of ``shape`` (float64, C order; allocated
    once, or anew when the shape changes; a plain allocation without ``work``)."""
    if work is None:
        return np.empty(shape)
    a = work.get(name)
    if a is None or a.shape != tuple(shape):
        a = work[name] = np.empty(shape)
    return a


def _pcg_block(A, B, X, atol, maxiter, M=None, callback=None, residuals=None, record=None,
               stop_norms=None, vector=False, diagonal=None, stats=None, record_mask=None,
               blocks=None, work=None, overwrite_b=False):
    """PCG on the columns of ``B`` (2-d), in place in ``X``; returns per-column iterations.

    The one block-CG recurrence of the package. Two ways to run an iteration:

    - general (``diagonal`` None): any preconditioner ``M``; columns are dropped from the
      products once converged;
    - fused Jacobi (``diagonal``: the inverse diagonal ``1/d`` of a diagonal preconditioner):
      the updates ``X += P a``, ``R -= A P a``, the residual reductions and the new
      directions run in the Numba kernels of :mod:`lmmops.linalg.kernels` (two passes over
      the block per iteration); a converged column keeps a zero step length, so the block
      keeps its width (the kernels need contiguous blocks);
    - fused block Jacobi (``blocks``: ``(Dr, offsets, dims)``, the rows of the inverse
      ``d x d`` diagonal blocks, see :func:`block_pcg`): the same, with ``Z = D^{-1} R``
      formed in the update kernel, block by block.

    ``stop_norms(R, cols)`` maps the active residual block to the norms compared with
    ``atol`` (default: column 2-norms; general path only). ``vector=True`` (one column) uses
    ``matvec`` as scipy does. ``stats`` (a dict, optional) receives ``norms`` (the last
    residual norm of every column) and ``first_product`` (``A M B``, the first product).
    ``record_mask`` limits the recorded columns. ``work`` (a dict, fused block-Jacobi path
    only) keeps the (n, m) blocks ``R``, ``P``, ``Z`` and the products ``Q`` between calls
    (each fresh block of this size costs page faults); ``A.matmat_out(P, Q)`` then writes
    the products in place, and ``first_product`` is a copy. ``overwrite_b``: ``B`` becomes
    the residual block (no copy; its values are lost). Returns ``(iters, done)``.
    """
    m = B.shape[1]
    iters = np.zeros(m, dtype=np.int64)
    done = np.zeros(m, dtype=bool)
    fused = diagonal is not None or blocks is not None
    bj = blocks is not None
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

    if fused:
        parallel = B.size >= 200_000
        nb = kernels.n_blocks(True) if parallel else 1
        if bj:
            Dr, b_off, b_dims = blocks
            ks = kernels.get_slope_kernels(parallel and nb > 1)
            chunks = kernels.block_chunks(b_off, b_dims, 8 * nb if parallel else 1)
            Zb = _work(work, "Z", B.shape)
            partial = np.zeros((chunks.size - 1, 2, m))
        else:
            pinv = np.ascontiguousarray(diagonal, dtype=np.float64)
            k_update, k_direction = kernels.get_cg_kernels(parallel and nb > 1)
            partial = np.zeros((nb, 2, m))
        live = np.ones(m, dtype=bool)

    def norms(R, cols):
        if stop_norms is not None:
            return stop_norms(R, cols)
        return np.linalg.norm(R, axis=0)

    recorded = np.ones(m, dtype=bool) if record_mask is None else np.asarray(record_mask, bool)
    reuse = work is not None and bj and hasattr(A, "matmat_out")
    if reuse:
        Qb = _work(work, "Q", B.shape)
        R = _work(work, "R", B.shape)
        if np.any(X):
            A.matmat_out(X, Qb)
            np.subtract(B, Qb, out=R)
        else:
            np.copyto(R, B)
    elif np.any(X):
        R = B - (A.matvec(X[:, 0])[:, None] if vector else A.matmat(X))
    else:
        R = B if overwrite_b else B.copy()
    act = np.arange(m)
    rn = norms(R, act)
    last = rn.copy()
    if residuals is not None:
        residuals[:] = [float(rn[0]) if vector else rn.copy()]
    P = None
    rho_prev = None
    rho_next = None
    for it in range(maxiter):
        if fused:
            conv = live & (rn < atol)
            done |= conv
            live &= ~conv
            if not live.any():
                break
        else:
            conv = rn < atol[act]
            if conv.any():
                done[act[conv]] = True
                keep = ~conv
                act = act[keep]
                if act.size == 0:
                    break
                R = R[:, keep]
                P = P[:, keep] if P is not None else None
                rho_prev = rho_prev[keep] if rho_prev is not None else None
        if fused:
            cols = np.flatnonzero(live & recorded) if record is not None else ()
            if P is None:
                if bj:
                    ks["bj_apply"](Dr, b_off, b_dims, R, Zb, chunks)
                    P = _work(work, "P", B.shape) if reuse else np.empty_like(B)
                    np.copyto(P, Zb)
                else:
                    P = pinv[:, None] * R
                rho = np.einsum("ij,ij->j", R, P)
                if record is not None:
                    record.norms2[:] = rho
            else:
                rho = np.where(live, rho_next, rho_prev)
                beta = np.where(live & (rho_prev > 0),
                                rho / np.where(rho_prev > 0, rho_prev, 1.0), 0.0)
                for c in cols:
                    record.beta[c].append(float(beta[c]))
                if bj:
                    ks["cg_direction_z"](P, Zb, beta, chunks)
                else:
                    k_direction(P, R, pinv, beta, nb)
        else:
            Zr = psolve(R)
            rho = np.einsum("ij,ij->j", R, Zr)
            if record is not None and it == 0:
                record.norms2[act] = rho
            cols = act[recorded[act]] if record is not None else ()
            if P is None:
                P = Zr.copy()
            else:
                beta = rho / rho_prev
                P *= beta
                P += Zr
                for c in cols:
                    record.beta[c].append(float(beta[np.searchsorted(act, c)]))
        if reuse:
            A.matmat_out(P, Qb)
            Q = Qb
        else:
            Q = None  # the last product is not needed: freed before the next one is made
            Q = amul(P)
        if stats is not None and it == 0 and not stats.get("skip_first"):
            if act.size == m or fused:
                stats["first_product"] = Q.copy() if reuse else Q
            else:
                stats["first_product"] = np.zeros((Q.shape[0], m))
                stats["first_product"][:, act] = Q
        pq = np.einsum("ij,ij->j", P, Q)
        if fused:
            alpha = np.where(live & (pq > 0), rho / np.where(pq > 0, pq, 1.0), 0.0)
            for c in cols:
                record.alpha[c].append(float(alpha[c]))
            if bj:
                ks["cg_update_bj"](X, R, P, Q, Zb, Dr, b_off, b_dims, alpha, chunks,
                                   partial)
            else:
                k_update(X, R, P, Q, pinv, alpha, nb, partial)
            rho_next = partial[:, 0, :].sum(axis=0)
            rn = np.where(live, np.sqrt(partial[:, 1, :].sum(axis=0)), rn)
            rho_prev = rho
            iters[live] += 1
            last = rn
        else:
            alpha = rho / pq
            if record is not None:
                for c in cols:
                    record.alpha[c].append(float(alpha[np.searchsorted(act, c)]))
            if act.size == m:
                X += alpha * P
            else:
                X[:, act] += alpha * P
            R -= alpha * Q
            rho_prev = rho
            iters[act] += 1
            rn = norms(R, act)
            last[act] = rn
        if residuals is not None:
            if vector:
                residuals.append(float(rn[0]))
            else:
                full = np.zeros(m)
                if fused:
                    full[live] = rn[live]
                else:
                    full[act] = rn
                residuals.append(full)
        if callback is not None:
            callback(X[:, 0] if vector else X)
    else:
        if fused:
            done |= live & (rn < atol)
        else:
            done[act[rn < atol[act]]] = True
    if stats is not None:
        stats["norms"] = np.asarray(last, dtype=np.float64).copy()
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
        ``lmmops.linalg.preconditioners.build(A, ...).aspreconditioner()``.
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


class _Matmat:
    """A bare ``matmat`` callable seen as an operator (for :func:`block_pcg`)."""

    def __init__(self, f, n):
        self.matmat = f
        self.shape = (n, n)


def block_pcg(A, B, *, M=None, diagonal=None, blocks=None, rtol=1e-8, maxiter=1000,
              record=None, x0=None, work=None, first_product=True, overwrite_b=False):
    """Block PCG with per-column convergence and a diagnostics record (the fit's solver).

    The same recurrence as :func:`block_cg` (one implementation, ``_pcg_block``), with what
    the matrix-free REML objective needs: the relative residual of every column, the first
    product ``A M B`` (which callers may reuse), the CG coefficients of chosen columns (for
    Lanczos quadrature) and, with ``diagonal``, the fused Jacobi path (Numba kernels).

    Parameters
    ----------
    A : LinearOperator or callable
        The SPD operator, or ``matmat(U)`` applying it to a (n, m) block.
    B : ndarray, shape (n, m)
    M : LinearOperator, optional
        SPD approximation of ``A^{-1}``, e.g. ``preconditioners.build(...).aspreconditioner()``.
    diagonal : ndarray, shape (n,), optional
        The diagonal ``d`` of a diagonal preconditioner (``M = diag(1/d)``): the fused
        Jacobi path. Exclusive with ``M`` and ``blocks``.
    blocks : tuple, optional
        ``(Dr, offsets, dims)``: a block-Jacobi preconditioner ``M = blockdiag_j(D_j^{-1})``
        with ``d x d`` blocks, term ``k`` holding rows ``offsets[k] .. offsets[k + 1] - 1``
        in blocks of ``dims[k]``; ``Dr`` (n, dmax) holds row ``a`` of ``D_j^{-1}`` in row
        ``start_j + a`` (its first ``d`` entries). The fused block-Jacobi path (Numba
        kernels, ``Z = M R`` formed in the update pass). Exclusive with ``M`` and
        ``diagonal``.
    rtol : float
        Column ``j`` stops when ``||b_j - A x_j|| < rtol ||b_j||``.
    maxiter : int
    record : array_like of bool, shape (m,), optional
        Columns whose CG coefficients are recorded (their Lanczos quadrature assumes a
        start at zero: recording with ``x0`` is refused).
    x0 : ndarray, shape (n, m), optional
        Starting block (default zero), e.g. the solution at a nearby operator.
    work : dict, optional
        With ``blocks``: reusable (n, m) blocks kept between calls (the solution ``X``,
        the residuals, directions, preconditioned residuals and products), so that
        repeated solves of one size allocate nothing of that size (a fresh block costs
        page faults, as much as the solve's vector work on some machines). The returned
        ``X`` is then ``work["X"]``, overwritten by the next call with the same dict;
        ``x0`` may be that same array. ``A`` may offer ``matmat_out(U, out)``.
    first_product : bool
        Return ``info["first_product"]`` (``A M B``; None without).
    overwrite_b : bool
        Let the solve use ``B`` as its residual block instead of a copy (when ``B`` is
        C-contiguous float64): one ``(n, m)`` block less at the peak; ``B`` is
        overwritten.

    Returns
    -------
    X : ndarray, shape (n, m)
    info : dict
        ``iterations`` (max over columns), ``iterations_per_column``, ``converged`` (bool
        per column), ``residual`` (relative residual per column), ``first_product`` and
        ``alpha`` / ``beta`` (lists per column, empty for unrecorded columns), ``norms2``
        (``b' M b`` per column).

    Raises
    ------
    ArgumentError
        For ``M`` and ``diagonal`` together, or a block of the wrong shape.

    Examples
    --------
    >>> A = np.diag([1.0, 2.0, 3.0]) + 0.1
    >>> X, info = block_pcg(A, np.eye(3), diagonal=np.diag(A), rtol=1e-12)
    >>> bool(np.allclose(A @ X, np.eye(3))), bool(info["converged"].all())
    (True, True)
    """
    if sum(x is not None for x in (M, diagonal, blocks)) > 1:
        raise ArgumentError("block_pcg takes one of a preconditioner M, a diagonal or "
                            "blocks")
    given = B
    B = np.ascontiguousarray(B, dtype=np.float64)
    # the residual block is B itself when allowed, or when B is already a private copy
    overwrite_b = bool(overwrite_b) or not np.may_share_memory(B, given)
    if B.ndim != 2:
        raise ArgumentError(f"B must be 2-d (n, m), got shape {B.shape}")
    n, m = B.shape
    if callable(A) and not hasattr(A, "matmat"):
        A = _Matmat(A, n)
    elif not hasattr(A, "matmat"):
        A = _operator(A, "A")
    M = _operator(M, "M")
    inv = None if diagonal is None else 1.0 / np.asarray(diagonal, dtype=np.float64)
    bnorm = np.linalg.norm(B, axis=0)
    bnorm[bnorm == 0] = 1.0
    atol = float(rtol) * bnorm
    rec = LanczosCoefficients([[] for _ in range(m)], [[] for _ in range(m)], np.zeros(m))
    mask = np.zeros(m, dtype=bool) if record is None else np.asarray(record, dtype=bool)
    wk = work if blocks is not None else None
    if x0 is not None and np.shape(x0) != (n, m):
        raise ArgumentError(f"x0 of shape {np.shape(x0)} for a block of shape {(n, m)}")
    if wk is not None:
        X = _work(wk, "X", (n, m))
        if x0 is None:
            X.fill(0.0)
        elif x0 is not X:
            np.copyto(X, x0)
    elif x0 is None:
        X = np.zeros((n, m))
    else:
        X = np.array(x0, dtype=np.float64, order="C")
    if x0 is not None:
        if mask.any():
            raise ArgumentError("CG coefficients for Lanczos quadrature need a start at "
                                "zero: record and x0 are exclusive")
    stats = {"skip_first": not first_product}
    if blocks is not None:
        Dr, b_off, b_dims = blocks
        blocks = (np.ascontiguousarray(Dr, dtype=np.float64),
                  np.asarray(b_off, dtype=np.int64), np.asarray(b_dims, dtype=np.int64))
        if blocks[0].shape[0] != n or blocks[1][-1] != n:
            raise ArgumentError(f"blocks of {blocks[0].shape[0]} rows ending at "
                                f"{blocks[1][-1]} for a block of {n} rows")
    iters, done = _pcg_block(A, B, X, atol, int(maxiter), M=M, record=rec, diagonal=inv,
                             stats=stats,
                             record_mask=mask, blocks=blocks, work=wk,
                             overwrite_b=overwrite_b)
    first = stats.get("first_product")
    if not first_product:
        first = None
    elif first is None:  # nothing to iterate (every column zero)
        first = np.zeros_like(B)
    info = {"iterations": int(iters.max(initial=0)), "iterations_per_column": iters,
            "converged": done, "residual": stats["norms"] / bnorm, "alpha": rec.alpha,
            "beta": rec.beta, "norms2": rec.norms2, "first_product": first}
    return X, info


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
