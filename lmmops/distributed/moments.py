r"""Global moments of ``[X y]`` from partitions, and the conditioning they determine.

The in-memory path conditions ``X`` and ``y`` (:mod:`lmmops.data.conditioning`) by
Gram-Schmidt on the rows. Without the rows, the same map comes from the moments of
``[X y]``: per partition its mean and centred cross-products, merged exactly by Chan's
pairwise update (:meth:`Moments.combine`), so a constant column (the intercept) has a
centred sum of squares of exactly 0 and the centred Gram of the other columns is as
accurate as the rows allow. :func:`condition_from_moments` runs the rank test of
:func:`lmmops.data.conditioning.orthogonalise` on that Gram (a Cholesky in column order,
the intercept eliminated exactly) and returns a
:class:`~lmmops.data.conditioning.Conditioning` and the kept columns. A fit does not
depend on the conditioning in exact arithmetic (location and scale invariance), so the
distributed fit equals the in-memory one up to rounding.

Examples
--------
>>> rng = np.random.default_rng(0)
>>> X = np.column_stack([np.ones(50), rng.normal(size=50), rng.normal(size=50)])
>>> y = X @ [1.0, 2.0, 0.5] + rng.normal(size=50)
>>> parts = [Moments.from_arrays(X[r], y[r]) for r in (slice(0, 20), slice(20, 50))]
>>> cond, keep = condition_from_moments(Moments.combine(parts))
>>> keep.tolist()
[0, 1, 2]
>>> from lmmops.data.conditioning import condition
>>> ref, _, Xc, yc = condition(X, y)
>>> bool(np.allclose(cond.fixef(np.zeros(3)), ref.fixef(np.zeros(3))))
True
"""

from __future__ import annotations

import math

import numpy as np
import scipy.linalg as sla

from lmmops.data.conditioning import ROUNDING_FLOOR, Conditioning
from lmmops.errors import LmmopsError

__all__ = ["Moments", "condition_from_moments", "rank_from_moments"]

_EPS = float(np.finfo(np.float64).eps)

#: The constant vector is in the span of the kept columns when what is left of it (unit
#: norm) is below this. The rows' test uses 1e-8; from a Gram the residual norm carries
#: rounding of about ``sqrt(eps)``, so the test here is looser (a constant column, the
#: usual way the constant enters, is recognised exactly).
_SPAN_TOL = 1e-6

#: What is left of y after the fixed effects is resolved by the Gram when its sum of
#: squares is above this fraction of y's (centred) one: the Gram squares the condition
#: number, so 1e4 eps of the squares is about 1.5e-6 of the norms.
_GRAM_RESOLUTION = 1e4 * _EPS


def _pow2(x):
    if not (x > 0.0 and math.isfinite(x)):
        return 1.0
    return math.ldexp(1.0, math.frexp(x)[1] - 1)


class Moments:
    """Count, means, centred cross-products and largest magnitudes of ``[X y]``.

    Parameters
    ----------
    n : int
    mean : ndarray, shape (p + 1,)
    M2 : ndarray, shape (p + 1, p + 1)
        ``sum_i (t_i - mean)(t_i - mean)'``.
    amax : ndarray, shape (p + 1,)
        ``max_i |t_ij|`` per column.
    """

    def __init__(self, n, mean, M2, amax):
        self.n = int(n)
        self.mean = np.asarray(mean, dtype=np.float64)
        self.M2 = np.asarray(M2, dtype=np.float64)
        self.amax = np.asarray(amax, dtype=np.float64)

    @property
    def p(self):
        """Number of fixed-effects columns."""
        return self.mean.shape[0] - 1

    @classmethod
    def from_arrays(cls, X, y):
        """The moments of one block of rows."""
        T = np.column_stack([np.asarray(X, dtype=np.float64),
                             np.asarray(y, dtype=np.float64).ravel()])
        n, m = T.shape
        if n == 0:
            return cls(0, np.zeros(m), np.zeros((m, m)), np.zeros(m))
        mean = T.mean(axis=0)
        C = T - mean
        return cls(n, mean, C.T @ C, np.max(np.abs(T), axis=0))

    @classmethod
    def combine(cls, parts):
        """Merge the moments of disjoint blocks (Chan, Golub and LeVeque's update)."""
        parts = [q for q in parts if q.n > 0] or list(parts)[:1]
        out = parts[0]
        n, mean, M2, amax = out.n, out.mean.copy(), out.M2.copy(), out.amax.copy()
        for q in parts[1:]:
            tot = n + q.n
            d = q.mean - mean
            mean = mean + d * (q.n / tot)
            M2 = M2 + q.M2 + np.outer(d, d) * (n * q.n / tot)
            amax = np.maximum(amax, q.amax)
            n = tot
        return cls(n, mean, M2, amax)


def _gram_rank(mom, tol):
    """The in-order rank test on the Gram of ``[X y 1]`` (see :func:`rank_from_moments`);
    also what :func:`condition_from_moments` needs of the elimination."""
    n, p = mom.n, mom.p
    scales = np.array([_pow2(a) for a in mom.amax])
    mu = mom.mean / scales
    M2 = mom.M2 / np.outer(scales, scales)
    # columns 0..p-1: X, p: y, p+1: the constant vector
    m = p + 2
    G = np.empty((m, m))
    G[:p + 1, :p + 1] = M2 + n * np.outer(mu, mu)
    G[p + 1, :p + 1] = G[:p + 1, p + 1] = n * mu
    G[p + 1, p + 1] = n
    S = G.copy()
    R = np.zeros((p, m))
    keep = []
    const_in_span = False
    for j in range(p):
        if mom.amax[j] == 0.0:
            continue
        nx = math.sqrt(max(G[j, j], 0.0))
        ref = math.sqrt(max(M2[j, j], 0.0)) if const_in_span else nx
        nr = math.sqrt(max(S[j, j], 0.0))
        if nr <= tol * ref or nr <= ROUNDING_FLOOR * nx:
            continue
        k = len(keep)
        r = S[j] / nr
        R[k] = r
        S = S - np.outer(r, r)
        if k == 0 and M2[j, j] == 0.0:
            # the intercept first: what is left of the others is exactly their centred Gram
            S[:p + 1, :p + 1] = M2
            S[p + 1, :] = S[:, p + 1] = 0.0
            S[j, :] = S[:, j] = 0.0
        keep.append(j)
        if not const_in_span:
            const_in_span = math.sqrt(max(S[p + 1, p + 1], 0.0) / n) <= _SPAN_TOL
    return np.asarray(keep, dtype=int), R, S, G, M2, scales, const_in_span


def rank_from_moments(mom, tol=1e-7):
    """The kept columns of :func:`lmmops.data.formula.rank_columns` (R's in-order test,
    :func:`lmmops.data.conditioning.orthogonalise`) from the moments of ``[X y]``
    (``y`` is not tested).

    Examples
    --------
    >>> x = np.arange(6.0)
    >>> X = np.column_stack([np.ones(6), x, 2 * x + 1])
    >>> rank_from_moments(Moments.from_arrays(X, np.zeros(6))).tolist()
    [0, 1]
    """
    return _gram_rank(mom, tol)[0]


def condition_from_moments(mom, tol=1e-7):
    """The conditioning and rank test of :func:`lmmops.data.conditioning.condition`,
    from the moments of ``[X y]``.

    Parameters
    ----------
    mom : Moments
    tol : float
        Rank tolerance (R's 1e-7), as :func:`~lmmops.data.conditioning.orthogonalise`.

    Returns
    -------
    conditioning : Conditioning
        ``X_c = X[:, keep] T`` has orthonormal columns of unit root mean square and
        ``y_c = (y - X_c b) / s`` is the least-squares residual of ``y`` at unit root
        mean square (up to rounding of the Gram).
    keep : ndarray of int

    Raises
    ------
    LmmopsError
        If the fixed effects fit y exactly.
    """
    keep, R, S, G, M2, scales, const_in_span = _gram_rank(mom, tol)
    n, p = mom.n, mom.p
    rk = keep.size
    rootn = math.sqrt(n)
    Rk = R[:rk][:, keep]
    c = R[:rk, p]  # Q'y0
    ss, ref = S[p, p], G[p, p]
    if const_in_span and rk:
        # span(kept) holds the constant: y's residual is that of the centred y on the
        # centred kept columns, which the centred Gram resolves without y's offset
        MK = M2[np.ix_(keep, keep)]
        coef = np.linalg.lstsq(MK, M2[keep, p], rcond=1e-12)[0]
        ss, ref = M2[p, p] - M2[p, keep] @ coef, M2[p, p]
    ne = math.sqrt(max(ss, 0.0))
    if ss <= _GRAM_RESOLUTION * ref:
        raise LmmopsError(
            "the fixed effects fit the response exactly or to within the resolution of its "
            "moments "
            f"(residual sum of squares {ss:.3g} of {ref:.3g}): a fit from partitions "
            "conditions y from the Gram of [X y], which cannot resolve a residual below "
            "about 1e-6 of y's spread; centre and rescale the covariates, or fit in memory")
    if rk:
        Rinv = sla.solve_triangular(Rk, np.eye(rk))
        T = Rinv * (rootn / scales[keep])[:, None]
        logdet = float(-np.sum(np.log(scales[keep])) - np.sum(np.log(np.diag(Rk)))
                       + 0.5 * rk * math.log(n))
    else:
        T, logdet = np.zeros((0, 0)), 0.0
    ay = scales[p]
    b = c / rootn
    sy = ne / rootn
    return Conditioning(T, ay * b, ay * sy, n, log_abs_det_T=logdet), keep
