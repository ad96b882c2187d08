"""A dense numpy oracle for the profiled REML/ML criterion and its optimum (small designs).

``V = s_e^2 (I + sum_k theta_k^2 Z_k Z_k')`` is formed densely, the criterion (lme4's
scale, ``s_e^2`` profiled out) and its gradient in ``theta`` come from a Cholesky factor
of ``V0 = I + sum_k theta_k^2 Z_k Z_k'``, and the optimum over ``theta >= 0`` is the best
of bounded quasi-Newton runs in ``log theta`` from a grid of starts that spans six orders
of magnitude in each component. Nothing here uses lmmops' solvers: only the design's
indicator matrices.
"""

import itertools

import numpy as np
import scipy.linalg as sla
from scipy import optimize

__all__ = ["DenseCriterion", "dense_optimum"]

_LOG2PI = np.log(2.0 * np.pi)


class DenseCriterion:
    """The profiled criterion of a small design, densely.

    Parameters
    ----------
    design : CrossedDesign
    X : ndarray, shape (n, p)
    y : ndarray, shape (n,)
    method : {"REML", "ML"}
    """

    def __init__(self, design, X, y, method="REML"):
        self.Z = [design.indicator(k).toarray() for k in range(design.n_factors)]
        self.ZZ = [Z @ Z.T for Z in self.Z]
        self.X = np.asarray(X, dtype=np.float64)
        self.y = np.asarray(y, dtype=np.float64)
        self.method = method
        self.n, self.p = self.X.shape
        self.dof = self.n - self.p if method == "REML" else self.n
        self.K = len(self.Z)

    def parts(self, theta):
        """``(criterion, gradient)`` at ``theta``."""
        theta = np.abs(np.asarray(theta, dtype=np.float64))
        V0 = np.eye(self.n)
        for t, ZZ in zip(theta, self.ZZ):
            V0 += t * t * ZZ
        C = sla.cho_factor(V0, lower=True)
        Vi = sla.cho_solve(C, np.eye(self.n))
        ViX = Vi @ self.X
        XtViX = self.X.T @ ViX
        CX = sla.cho_factor(XtViX, lower=True)
        P = Vi - ViX @ sla.cho_solve(CX, ViX.T)
        Py = P @ self.y
        r2 = float(self.y @ Py)
        if not r2 > 0.0:  # lost to round-off at extreme theta: not a candidate optimum
            return np.inf, np.zeros(self.K)
        f = 2.0 * np.sum(np.log(np.diag(C[0])))
        T = Vi
        if self.method == "REML":
            f += 2.0 * np.sum(np.log(np.diag(CX[0])))
            T = P
        f += self.dof * (1.0 + _LOG2PI + np.log(r2 / self.dof))
        g = np.array([2.0 * t * (np.sum(T * ZZ) - self.dof * float(Py @ ZZ @ Py) / r2)
                      for t, ZZ in zip(theta, self.ZZ)])
        return float(f), g

    def __call__(self, theta):
        return self.parts(theta)[0]


def dense_optimum(crit, extra_starts=(), grid=(1e-2, 1.0, 1e2, 1e4), bounds=(-14.0, 14.0)):
    """Minimise :class:`DenseCriterion` over ``theta >= 0`` from several starts.

    Bounded quasi-Newton (L-BFGS-B) in ``u = log theta``, from every combination of the
    values in ``grid`` and from ``extra_starts``: a component that starts far below its
    optimum can be trapped near 0, where the criterion is flat (it is even in each
    ``theta_k``), so one start per scale is not enough. The lower bound on ``u`` stands
    for the boundary ``theta_k = 0`` (at ``theta_k = e^-14`` the criterion differs from
    its value at 0 by about ``1e-12`` times its curvature there), and the result is
    evaluated with such components set to exactly 0 where that is not worse.

    Parameters
    ----------
    crit : DenseCriterion
    extra_starts : iterable of array_like
        More starting points (e.g. the generating values).
    grid : sequence of float
        Starting values of each component.
    bounds : (float, float)
        Bounds on ``log theta_k``.

    Returns
    -------
    theta : ndarray
    value : float
    """
    K = crit.K
    lo, hi = bounds

    def f(u):
        theta = np.exp(u)
        val, g = crit.parts(theta)
        return val, g * theta

    starts = [np.array(s) for s in itertools.product(grid, repeat=K)]
    starts += [np.asarray(e, dtype=np.float64) for e in extra_starts]
    best_theta, best = None, np.inf
    for x0 in starts:
        u0 = np.clip(np.log(np.maximum(x0, 1e-300)), lo, hi)
        try:
            r = optimize.minimize(f, u0, jac=True, method="L-BFGS-B", bounds=[bounds] * K,
                                  options=dict(ftol=1e-15, gtol=1e-11, maxiter=1000))
        except (np.linalg.LinAlgError, ValueError):
            continue
        if np.isfinite(r.fun) and r.fun < best:
            best_theta, best = np.exp(r.x), float(r.fun)
    for k in np.flatnonzero(best_theta <= np.exp(lo) * 1.0001):
        trial = best_theta.copy()
        trial[k] = 0.0
        val = crit(trial)
        if val <= best:
            best_theta, best = trial, val
    return best_theta, best
