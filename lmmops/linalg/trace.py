"""Stochastic trace, diagonal and log-determinant estimators on LinearOperators.

Every estimator takes an explicit ``rng`` (a :class:`numpy.random.Generator` or an int
seed) or explicit ``probes`` of shape ``(n, m)``, applies the operator to whole probe
blocks through ``matmat``, and returns a :class:`TraceEstimate` carrying the estimate and
its Monte Carlo standard error. Fixing the probes (common random numbers) makes an
estimate a smooth function of the operator's parameters, which is what an optimiser needs.

Estimators:

- :func:`hutchinson`: Rademacher probes, ``tr(A) ~ mean_i z_i'A z_i``; variance
  ``2(||A||_F^2 - sum_i a_ii^2) / m``.
- :func:`hutchpp`: Hutch++ (Meyer, Musco, Musco & Woodruff 2021), exact on a sketched
  range plus Hutchinson on the deflated remainder; O(1/eps) matvecs.
- :func:`xtrace`: XTrace (Epperly, Tropp & Webber 2024), exchangeable leave-one-out
  Hutch++, with a jackknife standard error.
- :func:`diagonal`: ``diag(A) ~ mean_i z_i * (A z_i)`` with per-entry standard errors.
- :func:`slq_logdet`: ``log|A|`` by stochastic Lanczos quadrature, optionally with a
  preconditioner split ``A = R (R^{-1} A R^{-T}) R'`` whose ``log|R R'|`` is exact, so only
  the log-determinant of the preconditioned operator is estimated (a control variate).
- :func:`lanczos_from_cg`: the Lanczos tridiagonal from conjugate-gradient coefficients,
  so a CG solve yields SLQ quadrature for free (mBCG).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg as sla
from scipy.sparse.linalg import LinearOperator, aslinearoperator

from lmmops.errors import ArgumentError

__all__ = [
    "TraceEstimate",
    "as_rng",
    "chunked_diagonal",
    "diagonal",
    "hutchinson",
    "hutchpp",
    "lanczos_from_cg",
    "rademacher",
    "slq_logdet",
    "slq_quadrature",
    "xtrace",
]


@dataclass(frozen=True)
class TraceEstimate:
    """A stochastic estimate with its Monte Carlo standard error.

    Attributes
    ----------
    estimate : float or ndarray
    stderr : float or ndarray
        Estimated standard deviation of ``estimate`` over the probe distribution.
    n_matvecs : int
        Operator applications used (columns of all probe blocks).
    """

    estimate: float | np.ndarray
    stderr: float | np.ndarray
    n_matvecs: int

    def __float__(self):
        return float(self.estimate)


def as_rng(rng):
    """Return a :class:`numpy.random.Generator` from a Generator, an int seed or None."""
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


def rademacher(n, m, rng=None):
    """An ``(n, m)`` block of independent Rademacher (+-1) probes, float64.

    Parameters
    ----------
    n, m : int
    rng : numpy.random.Generator or int, optional

    Returns
    -------
    ndarray, shape (n, m)

    Examples
    --------
    >>> Z = rademacher(4, 3, rng=0)
    >>> Z.shape, sorted(set(Z.ravel().tolist()))
    ((4, 3), [-1.0, 1.0])
    """
    rng = as_rng(rng)
    return rng.integers(0, 2, size=(n, m)).astype(np.float64) * 2.0 - 1.0


def _matmat(A, X):
    if hasattr(A, "matmat"):
        return np.asarray(A.matmat(X), dtype=np.float64)
    return np.asarray(A @ X, dtype=np.float64)


def _shape(A):
    n, n2 = A.shape
    if n != n2:
        raise ArgumentError(f"trace estimators need a square operator, got shape {A.shape}")
    return n


def _probes(A, n_probes, rng, probes):
    n = _shape(A)
    if probes is None:
        if n_probes is None or n_probes < 1:
            raise ArgumentError("give n_probes >= 1 or an explicit probe block")
        probes = rademacher(n, int(n_probes), rng)
    probes = np.asarray(probes, dtype=np.float64)
    if probes.ndim != 2 or probes.shape[0] != n:
        raise ArgumentError(f"probes must have shape ({n}, m), got {probes.shape}")
    return probes


def hutchinson(A, n_probes=None, rng=None, probes=None):
    """Hutchinson's trace estimator.

    Parameters
    ----------
    A : LinearOperator or ndarray, shape (n, n)
    n_probes : int, optional
        Number of Rademacher probes (ignored if ``probes`` is given).
    rng : numpy.random.Generator or int, optional
    probes : ndarray, shape (n, m), optional
        Explicit probes; unit vectors ``e_1..e_n`` make the estimate exact.

    Returns
    -------
    TraceEstimate
        ``estimate = mean_i z_i'A z_i`` and ``stderr = std_i(z_i'A z_i) / sqrt(m)``.

    Examples
    --------
    >>> A = np.diag(np.arange(1.0, 6.0)) + 0.1
    >>> est = hutchinson(A, n_probes=4000, rng=1)
    >>> bool(abs(est.estimate - np.trace(A)) < 4 * est.stderr)
    True
    >>> hutchinson(A, probes=np.eye(5)).estimate  # unit vectors: exact
    15.5
    """
    Z = _probes(A, n_probes, rng, probes)
    samples = np.einsum("ij,ij->j", Z, _matmat(A, Z))
    m = samples.size
    se = float(np.std(samples, ddof=1) / np.sqrt(m)) if m > 1 else np.inf
    if probes is not None and _is_unit_basis(Z):
        return TraceEstimate(float(samples.sum()), 0.0, m)
    return TraceEstimate(float(samples.mean()), se, m)


def _is_unit_basis(Z):
    n, m = Z.shape
    return n == m and np.array_equal(Z, np.eye(n))


def hutchpp(A, n_matvecs, rng=None):
    """Hutch++ trace estimator.

    A third of the budget sketches the range of ``A`` (``Q = orth(A S)``), the trace on
    that range is computed exactly, and Hutchinson estimates the trace of the deflated
    remainder ``(I - QQ')A(I - QQ')`` with the last third.

    Parameters
    ----------
    A : LinearOperator or ndarray, shape (n, n)
        Symmetric.
    n_matvecs : int
        Total budget of operator applications (at least 3).
    rng : numpy.random.Generator or int, optional

    Returns
    -------
    TraceEstimate
        The standard error is the Hutchinson standard error of the remainder (the
        sketched part is exact). With ``n_matvecs >= 3 n`` the estimate is exact.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> U = rng.normal(size=(50, 50))
    >>> A = U @ np.diag(1.0 / np.arange(1, 51) ** 2) @ U.T
    >>> est = hutchpp(A, 30, rng=1)
    >>> bool(abs(est.estimate - np.trace(A)) < 4 * est.stderr + 1e-9)
    True
    """
    n = _shape(A)
    rng = as_rng(rng)
    if n_matvecs < 3:
        raise ArgumentError("Hutch++ needs a budget of at least 3 matvecs")
    k = n_matvecs // 3
    m = n_matvecs - 2 * k
    S = rademacher(n, min(k, n), rng)
    Q, _ = np.linalg.qr(_matmat(A, S))
    AQ = _matmat(A, Q)
    exact = float(np.einsum("ij,ij->", Q, AQ))
    if Q.shape[1] >= n:
        return TraceEstimate(exact, 0.0, 2 * Q.shape[1])
    G = rademacher(n, m, rng)
    G = G - Q @ (Q.T @ G)
    AG = _matmat(A, G)
    AG = AG - Q @ (Q.T @ AG)
    samples = np.einsum("ij,ij->j", G, AG)
    se = float(np.std(samples, ddof=1) / np.sqrt(m)) if m > 1 else np.inf
    return TraceEstimate(exact + float(samples.mean()), se, 2 * Q.shape[1] + m)


def xtrace(A, n_matvecs, rng=None):
    """XTrace: the exchangeable Hutch++ estimator with a jackknife standard error.

    With ``m = n_matvecs // 2`` probes ``omega_i``, for each ``i`` the range is sketched
    from all probes but ``omega_i``, the trace on it is exact, and ``omega_i`` estimates
    the remainder; XTrace is the mean of the ``m`` leave-one-out estimates. Implemented
    with the downdating formulas of Epperly, Tropp & Webber (2024), Algorithm 1,
    in O(n m^2) work.

    Parameters
    ----------
    A : LinearOperator or ndarray, shape (n, n)
        Symmetric.
    n_matvecs : int
        Budget; ``m = n_matvecs // 2`` probes (at least 2).
    rng : numpy.random.Generator or int, optional

    Returns
    -------
    TraceEstimate
        ``stderr = std(leave-one-out estimates) / sqrt(m)``.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> U = rng.normal(size=(60, 60))
    >>> A = U @ np.diag(1.0 / np.arange(1, 61) ** 2) @ U.T
    >>> est = xtrace(A, 40, rng=2)
    >>> bool(abs(est.estimate - np.trace(A)) < 4 * est.stderr + 1e-9)
    True
    """
    n = _shape(A)
    rng = as_rng(rng)
    m = min(max(2, n_matvecs // 2), n)
    Om = rademacher(n, m, rng)
    Y = _matmat(A, Om)
    Q, R = np.linalg.qr(Y)
    W = Q.T @ Om
    # S: normalised columns of R^{-T} (the leave-one-out downdating directions)
    S = _col_normalize(sla.solve_triangular(R, np.eye(m), lower=False).T)
    Z = _matmat(A, Q)
    H = Q.T @ Z
    HW = H @ W
    T = Z.T @ Om

    def dp(X, Y_):
        return np.einsum("ij,ij->j", X, Y_)

    dSW = dp(S, W)
    dSHS = dp(S, H @ S)
    ests = (np.trace(H) - dSHS + dp(Om, Y) - dp(W, R) - dp(T, W) + dp(W, HW)
            + dSW * dp(S, R - HW) + dSW**2 * dSHS + dp(T - H.T @ W, S) * dSW)
    return TraceEstimate(float(ests.mean()), float(np.std(ests, ddof=1) / np.sqrt(m)), 2 * m)


def _col_normalize(M):
    return M / np.maximum(np.linalg.norm(M, axis=0), 1e-300)


def diagonal(A, n_probes=None, rng=None, probes=None):
    """Estimate ``diag(A)`` with Rademacher probes.

    Parameters
    ----------
    A : LinearOperator or ndarray, shape (n, n)
    n_probes : int, optional
    rng : numpy.random.Generator or int, optional
    probes : ndarray, shape (n, m), optional

    Returns
    -------
    TraceEstimate
        ``estimate`` and ``stderr`` are arrays of shape (n,):
        ``d_j = mean_i z_ij (A z_i)_j`` (Bekas, Kokiopoulou & Saad 2007).

    Examples
    --------
    >>> A = np.diag([1.0, 2.0, 3.0]) + 0.05
    >>> est = diagonal(A, n_probes=2000, rng=0)
    >>> bool(np.all(np.abs(est.estimate - np.diag(A)) < 4 * est.stderr + 1e-12))
    True
    """
    Z = _probes(A, n_probes, rng, probes)
    P = Z * _matmat(A, Z)
    m = Z.shape[1]
    with np.errstate(invalid="ignore", divide="ignore"):
        est = P.sum(axis=1) / (Z * Z).sum(axis=1)  # NaN where no probe touches entry j
    se = np.std(P, axis=1, ddof=1) / np.sqrt(m) if m > 1 else np.full(Z.shape[0], np.inf)
    return TraceEstimate(est, se, m)


def chunked_diagonal(apply, n, n_probes, rng, chunk=8):
    """Estimate ``diag(A)`` from an ``apply(Z) = A Z`` callable, ``chunk`` probes at a
    time (memory ``O(n chunk)``): :func:`diagonal` for operators that are expensive to
    hold, such as ``P`` of a mixed model in observation space.

    Parameters
    ----------
    apply : callable
        ``apply(Z)`` returns ``A Z`` for an ``(n, m)`` block.
    n : int
    n_probes : int
    rng : numpy.random.Generator or int
    chunk : int

    Returns
    -------
    TraceEstimate
        ``estimate`` and ``stderr`` of shape (n,).

    Examples
    --------
    >>> A = np.diag([1.0, 2.0, 3.0]) + 0.05
    >>> est = chunked_diagonal(lambda Z: A @ Z, 3, 2000, 0, chunk=64)
    >>> bool(np.all(np.abs(est.estimate - np.diag(A)) < 4 * est.stderr + 1e-12))
    True
    """
    rng = as_rng(rng)
    s1, s2 = np.zeros(n), np.zeros(n)
    done = 0
    while done < n_probes:
        m = min(int(chunk), n_probes - done)
        Z = rademacher(n, m, rng)
        samples = Z * apply(Z)
        s1 += samples.sum(axis=1)
        s2 += (samples ** 2).sum(axis=1)
        done += m
    d = s1 / n_probes
    var = np.maximum(s2 / n_probes - d * d, 0.0) * n_probes / max(n_probes - 1, 1)
    return TraceEstimate(d, np.sqrt(var / n_probes), n_probes)


def lanczos_from_cg(alpha, beta):
    """The Lanczos tridiagonal of a CG run, from its step lengths and improvements.

    For CG started at ``x0 = 0`` on ``A x = b`` with step lengths ``alpha_j`` and
    direction updates ``beta_j`` (``p_{j+1} = r_{j+1} + beta_j p_j``), the Lanczos
    tridiagonal of ``A`` with start ``b / ||b||`` has diagonal
    ``1/alpha_j + beta_{j-1}/alpha_{j-1}`` and off-diagonal ``sqrt(beta_j)/alpha_j``.

    Parameters
    ----------
    alpha : array_like, shape (k,)
    beta : array_like, shape (k - 1,) or (k,)
        Only the first ``k - 1`` are used.

    Returns
    -------
    diag : ndarray, shape (k,)
    offdiag : ndarray, shape (k - 1,)

    Notes
    -----
    This is the home of the CG-to-Lanczos map. With a preconditioner ``P`` the same
    coefficients give the tridiagonal of ``P^{1/2} A P^{1/2}``.
    """
    alpha = np.asarray(alpha, dtype=np.float64)
    beta = np.asarray(beta, dtype=np.float64)[: max(alpha.size - 1, 0)]
    diag = 1.0 / alpha
    diag[1:] += beta / alpha[:-1]
    off = np.sqrt(beta) / alpha[:-1]
    return diag, off


def slq_quadrature(diag, offdiag, f=np.log):
    """Gauss quadrature ``e_1' f(T) e_1`` of a symmetric tridiagonal ``T``.

    Parameters
    ----------
    diag : ndarray, shape (k,)
    offdiag : ndarray, shape (k - 1,)
    f : callable
        Applied to the eigenvalues (the Ritz values).

    Returns
    -------
    float
    """
    w, V = sla.eigh_tridiagonal(diag, offdiag)
    return float(np.sum(V[0] ** 2 * f(np.maximum(w, 1e-300))))


def _lanczos_block(A, Z, steps, reorth=True):
    """Independent Lanczos runs (one per column of Z) using matmat on the whole block.

    Returns per-column tridiagonals (lists of diag/offdiag) and the column norms.
    """
    n, m = Z.shape
    norms = np.linalg.norm(Z, axis=0)
    Q = np.empty((steps + 1, n, m)) if reorth else None
    q = Z / norms
    q_prev = np.zeros_like(q)
    b_prev = np.zeros(m)
    alphas, betas = [], []
    active = np.ones(m, dtype=bool)
    for j in range(steps):
        if reorth:
            Q[j] = q
        w = _matmat(A, q)
        a = np.einsum("ij,ij->j", q, w)
        w -= a * q + b_prev * q_prev
        if reorth:
            for i in range(j + 1):
                w -= Q[i] * np.einsum("ij,ij->j", Q[i], w)
        b = np.linalg.norm(w, axis=0)
        alphas.append(np.where(active, a, 0.0))
        tiny = b <= 1e-12 * np.maximum(np.abs(a), 1e-300)
        betas.append(np.where(active & ~tiny, b, 0.0))
        new_active = active & ~tiny
        q_prev, q = q, np.where(new_active, w / np.where(b > 0, b, 1.0), 0.0)
        b_prev = b
        if not new_active.any():
            active = new_active
            break
        active = new_active
    alphas = np.array(alphas)
    betas = np.array(betas)
    out = []
    for c in range(m):
        k = alphas.shape[0]
        # stop at the first breakdown of this column
        brk = np.flatnonzero(betas[:, c] == 0.0)
        kc = int(brk[0]) + 1 if brk.size else k
        out.append((alphas[:kc, c], betas[: kc - 1, c]))
    return out, norms


def slq_logdet(A, n_probes=None, rng=None, probes=None, steps=30, precond=None,
               precond_logdet=0.0):
    """``log|A|`` for SPD ``A`` by stochastic Lanczos quadrature.

    Parameters
    ----------
    A : LinearOperator or ndarray, shape (n, n)
        Symmetric positive definite.
    n_probes : int, optional
    rng : numpy.random.Generator or int, optional
    probes : ndarray, shape (n, m), optional
    steps : int
        Lanczos steps per probe (with full reorthogonalisation).
    precond : LinearOperator, optional
        ``R^{-1}`` of a symmetric split ``A ~ R R'`` (a control variate): then
        ``log|A| = precond_logdet + log|R^{-1} A R^{-T}|`` and only the second term is
        estimated; ``precond`` must provide ``matmat`` and its adjoint ``rmatmat``.
    precond_logdet : float
        ``log|R R'|``, exact.

    Returns
    -------
    TraceEstimate
        ``estimate = precond_logdet + mean_i ||z_i||^2 e_1' log(T_i) e_1``.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> U = rng.normal(size=(40, 40))
    >>> A = U @ U.T / 40 + np.eye(40)
    >>> est = slq_logdet(A, probes=np.eye(40), steps=40)  # unit probes, full Lanczos
    >>> bool(abs(est.estimate - np.linalg.slogdet(A)[1]) < 1e-8)
    True
    """
    Z = _probes(A, n_probes, rng, probes)
    op = A
    if precond is not None:

        R = aslinearoperator(precond)
        Aop = aslinearoperator(A)
        op = LinearOperator(A.shape, matvec=lambda x: R.matvec(Aop.matvec(R.rmatvec(x))),
                            matmat=lambda X: R.matmat(Aop.matmat(R.rmatmat(X))),
                            dtype=np.float64)
    steps = int(min(steps, Z.shape[0]))
    runs, norms = _lanczos_block(op, Z, steps)
    samples = np.array([nrm**2 * slq_quadrature(a, b) for (a, b), nrm in zip(runs, norms)])
    m = samples.size
    unit = probes is not None and _is_unit_basis(Z)
    est = float(samples.sum()) if unit else float(samples.mean())
    se = 0.0 if unit else (float(np.std(samples, ddof=1) / np.sqrt(m)) if m > 1 else np.inf)
    return TraceEstimate(precond_logdet + est, se, m * steps)
