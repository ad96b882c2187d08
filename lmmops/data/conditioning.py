"""Conditioning of the response and the fixed-effects columns: location and scale invariance.

A linear mixed model is equivariant under a change of basis of the fixed effects and an
affine change of the response inside the column space of X. With an invertible ``T`` and
any ``b``, the fit of

.. math::

    X_c = X T, \\qquad y_c = (y - X_c b) / s

maps back exactly to the fit of ``(X, y)``:

- fixed effects ``beta = T (b + s beta_c)`` and their covariance ``s^2 T C_c T'``;
- ``theta`` unchanged; variances times ``s^2``; standard deviations, BLUPs and every kind
  of residual times ``s`` (studentised and Pearson residuals unchanged);
- fitted values and predictions ``x_c' b + s f_c`` with ``x_c = T' x``;
- the criterion: the ML deviance is ``f_c + n log s^2`` and the REML criterion
  ``f_c + (n - p) log s^2 - 2 log|det T|`` (the ``log|R_X|^2`` term depends on the basis
  of X), which is what lme4 reports on the user's X and y.

:class:`lmmops.LMM` picks ``T``, ``b`` and ``s`` so that the solvers see well-scaled
numbers whatever the user's units (:func:`condition`): each column of X is scaled by a
power of two and the columns are orthogonalised in their given order (Gram-Schmidt,
twice, which is also the rank test of :func:`orthogonalise`), so ``X_c = sqrt(n) Q`` has
orthonormal columns; y loses its least-squares fit on X (a constant, or a multiple of a
covariate, added to y changes nothing the solvers see) and is scaled to unit root mean
square, so the solvers see the same problem, up to rounding, for ``a y + c`` as for ``y``
(and for ``a x + c`` as for a covariate ``x``). Without this, the sums of squares
``[X y]'[X y]`` that both solvers factor square the condition number: ``y + 1e8`` loses
all 16 digits of the residual sum of squares, and a covariate such as a Unix time (about
1.7e9) sits almost on the intercept.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import scipy.linalg as sla

from lmmops.errors import LmmopsError

__all__ = ["ROUNDING_FLOOR", "Conditioning", "UserScaleObjective", "condition", "orthogonalise"]

_EPS = float(np.finfo(np.float64).eps)

#: A column is aliased when what is left of it after the earlier columns is at most this
#: fraction of its own raw norm: its remaining digits are rounding noise (about 4 digits
#: above the last bit). For ``x + c`` with ``x`` of unit spread this keeps ``|c|`` up to
#: about 4e11.
ROUNDING_FLOOR = 1e4 * _EPS

#: The response is "fitted exactly by X" when its least-squares residual is at most this
#: fraction of its norm (the residual is rounding noise).
_EXACT_FIT = 64 * _EPS

#: The constant vector is taken to lie in the span of the kept columns when what is left
#: of it (unit norm) is below this.
_SPAN_TOL = 1e-8


def _pow2(x):
    """The largest power of two not above ``x > 0`` (1 for 0 or a non-finite x)."""
    if not (x > 0.0 and math.isfinite(x)):
        return 1.0
    return math.ldexp(1.0, math.frexp(x)[1] - 1)


def _project_out(Q, x):
    """``x - Q Q'x`` and ``Q'x``: modified Gram-Schmidt, then classical ("twice is enough").

    The first pass removes one direction at a time, so a large common part (an offset
    along the intercept) is subtracted exactly before anything else is rounded at its
    magnitude; the second pass works on what is left.
    """
    r = np.array(x, dtype=np.float64, copy=True)
    c = np.empty(Q.shape[1])
    for i in range(Q.shape[1]):
        q = Q[:, i]
        c[i] = q @ r
        r -= c[i] * q
    c2 = Q.T @ r
    r -= Q @ c2
    return r, c + c2


def orthogonalise(X, tol=1e-7):
    """Orthonormalise the columns of X in their order, dropping aliased ones (the rank test).

    Column ``j`` (scaled by a power of two) is aliased when the norm of what is left of it
    after projecting out the columns kept before it is at most ``tol`` times its own norm
    on the conditioned scale (R's ``dqrdc2`` rule with ``tol = 1e-7``, as lme4's
    ``chkRank.drop.cols``), where "conditioned" means centred once the constant vector
    lies in the span of the earlier kept columns (so the test is invariant under
    ``x -> a x + c`` in a model with an intercept), or at most :data:`ROUNDING_FLOOR`
    times its raw norm (its centred values are rounding noise). Of two collinear columns
    the later is dropped. Zero columns are dropped.

    Parameters
    ----------
    X : ndarray, shape (n_obs, p)
        Finite values.
    tol : float
        Relative tolerance (R's default 1e-7).

    Returns
    -------
    keep : ndarray of int, shape (r,)
        Kept columns, in order.
    Q : ndarray, shape (n_obs, r)
        Orthonormal basis of the kept columns (Fortran order).
    R : ndarray, shape (r, r)
        Upper triangular, ``X[:, keep] / scales[keep] = Q R``.
    scales : ndarray, shape (p,)
        The power-of-two column scales (1 for zero columns).

    Examples
    --------
    >>> t = 1.7e9 + np.arange(0.0, 30 * 86400.0, 86400.0)      # Unix times, a month
    >>> X = np.column_stack([np.ones(30), t, 2.0 * t + 1.0])
    >>> keep, Q, R, scales = orthogonalise(X)
    >>> keep.tolist()                                           # 2t + 1 is aliased
    [0, 1]
    >>> bool(np.allclose(Q.T @ Q, np.eye(2)))
    True
    """
    X = np.asarray(X, dtype=np.float64)
    n, p = X.shape
    scales = np.ones(p)
    Q = np.empty((n, p), order="F")
    R = np.zeros((p, p))
    keep = []
    u = np.full(n, 1.0 / math.sqrt(n)) if n else np.zeros(0)  # what is left of 1/sqrt(n)
    const_in_span = False
    for j in range(p):
        amax = float(np.max(np.abs(X[:, j]))) if n else 0.0
        if amax == 0.0:
            continue
        scales[j] = _pow2(amax)
        x = X[:, j] / scales[j]
        nx = float(np.linalg.norm(x))
        ref = float(np.linalg.norm(x - x.mean())) if const_in_span else nx
        k = len(keep)
        r, c = _project_out(Q[:, :k], x)
        nr = float(np.linalg.norm(r))
        if nr <= tol * ref or nr <= ROUNDING_FLOOR * nx:
            continue
        Q[:, k] = r / nr
        R[:k, k] = c
        R[k, k] = nr
        keep.append(j)
        if not const_in_span:
            q = Q[:, k]
            for _ in range(2):
                u -= q * float(q @ u)
            const_in_span = float(np.linalg.norm(u)) <= _SPAN_TOL
    rk = len(keep)
    return np.asarray(keep, dtype=int), Q[:, :rk], R[:rk, :rk].copy(), scales


class Conditioning:
    """The map between the user's ``(X, y)`` and the conditioned ``(X_c, y_c)``.

    ``X_c = X T`` and ``y_c = (y - X_c b) / s`` (see the module docstring); build it with
    :func:`condition`. Every method maps a conditioned quantity to the user's scale.

    Parameters
    ----------
    T : ndarray, shape (p, p)
        Change of basis of the (kept) fixed-effects columns.
    b : ndarray, shape (p,)
        Coefficients, in the conditioned basis, of the part of y removed before scaling.
    scale : float
        ``s``.
    n_obs : int
    log_abs_det_T : float, optional
        ``log|det T|``; computed from ``T`` by default.

    Attributes
    ----------
    T, b, scale, n_obs, p, log_abs_det_T
    variance_scale : float
        ``s^2``.

    Examples
    --------
    >>> cond = Conditioning(np.array([[0.5]]), np.array([10.0]), 4.0, n_obs=50)
    >>> float(cond.fixef(np.array([1.0]))[0])                  # 0.5 (10 + 4 * 1)
    7.0
    >>> bool(np.isclose(cond.criterion_offset("ML"), 50 * np.log(16.0)))
    True
    """

    def __init__(self, T, b, scale, n_obs, log_abs_det_T=None):
        self.T = np.asarray(T, dtype=np.float64)
        self.b = np.asarray(b, dtype=np.float64)
        self.scale = float(scale)
        self.n_obs = int(n_obs)
        self.p = self.T.shape[0]
        if log_abs_det_T is None:
            log_abs_det_T = float(np.linalg.slogdet(self.T)[1]) if self.p else 0.0
        self.log_abs_det_T = float(log_abs_det_T)

    @property
    def variance_scale(self):
        """float: ``s^2``, the factor of every variance."""
        return self.scale * self.scale

    def X(self, X):
        """Conditioned rows ``X T`` of fixed-effects rows ``X`` (kept columns, user scale)."""
        return np.asarray(X, dtype=np.float64) @ self.T

    def fixef(self, beta):
        """User-scale fixed effects ``T (b + s beta_c)``."""
        return self.T @ (self.b + self.scale * np.asarray(beta, dtype=np.float64))

    def fixef_cov(self, cov):
        """User-scale covariance of the fixed effects ``s^2 T C_c T'``."""
        c = self.variance_scale * (self.T @ np.asarray(cov, dtype=np.float64) @ self.T.T)
        return 0.5 * (c + c.T)

    def response(self, Xc, values):
        """User-scale fitted or predicted values ``X_c b + s f_c`` of conditioned ones."""
        return np.asarray(Xc, dtype=np.float64) @ self.b + self.scale * np.asarray(values)

    def criterion_offset(self, method):
        """``f - f_c``: ``n log s^2`` (ML), ``(n - p) log s^2 - 2 log|det T|`` (REML)."""
        if str(method).upper() == "REML":
            return ((self.n_obs - self.p) * math.log(self.variance_scale)
                    - 2.0 * self.log_abs_det_T)
        return self.n_obs * math.log(self.variance_scale)

    def criterion(self, f, method):
        """The user-scale criterion (REML criterion or ML deviance) of a conditioned one."""
        return float(f) + self.criterion_offset(method)

    def evaluation(self, ev, method):
        """A copy of an evaluation on the user's scale (its factor is dropped).

        Parameters
        ----------
        ev : Evaluation
            From a conditioned objective.
        method : {"REML", "ML"}

        Returns
        -------
        Evaluation
            ``objective``, ``sigma2``, ``beta``, ``beta_cov``, ``v``, ``pwrss`` and
            ``logdet_RX`` on the user's scale; ``theta``, ``gradient``, ``traces`` and
            ``logdet_L`` unchanged; ``factor`` None.
        """
        out = copy.copy(ev)
        s, s2 = self.scale, self.variance_scale
        out.objective = self.criterion(ev.objective, method)
        out.sigma2 = s2 * ev.sigma2
        out.beta = self.fixef(ev.beta)
        out.beta_cov = self.fixef_cov(ev.beta_cov)
        out.v = [s * vk for vk in ev.v]
        out.pwrss = s2 * ev.pwrss
        out.logdet_RX = ev.logdet_RX - 2.0 * self.log_abs_det_T
        out.factor = None
        return out

    def opt_summary(self, opt, method):
        """A copy of an :class:`~lmmops.estimation.direct.OptSummary` with user-scale criteria."""
        out = copy.copy(opt)
        off = self.criterion_offset(method)
        out.f_initial = opt.f_initial + off
        out.f_final = opt.f_final + off
        out.fitlog = [(th, f + off) for th, f in opt.fitlog]
        return out

    def msom(self, out):
        """User-scale mean-shift statistics (a dict or the scan's DataFrame)."""
        out = out.copy()
        out["phi"] = out["phi"] * self.scale
        out["se"] = out["se"] * self.scale
        return out

    def vsom(self, out, method):
        """User-scale variance-shift statistics (the dict of
        :func:`lmmops.analysis.outliers.vsom`)."""
        out = dict(out)
        out["sigma2_o"] = out["sigma2_o"] * self.variance_scale
        out["sigma2"] = out["sigma2"] * self.variance_scale
        for key in ("criterion_null", "criterion"):
            out[key] = self.criterion(out[key], method)
        return out


def condition(X, y, tol=1e-7):
    """Condition ``(X, y)`` for the solvers, with the rank test of :func:`orthogonalise`.

    Parameters
    ----------
    X : ndarray, shape (n_obs, p)
        All fixed-effects columns (finite).
    y : ndarray, shape (n_obs,)
        Response (finite).
    tol : float
        Rank tolerance (R's 1e-7).

    Returns
    -------
    conditioning : Conditioning
        For the kept columns.
    keep : ndarray of int
        Kept (non-aliased) columns of X.
    Xc : ndarray, shape (n_obs, r)
        ``sqrt(n) Q``: orthonormal columns of unit root mean square (C order).
    yc : ndarray, shape (n_obs,)
        The least-squares residual of y on X, scaled to unit root mean square (so ``y``,
        ``a y + c`` and ``y + X d`` give the same ``y_c`` up to rounding and sign).

    Raises
    ------
    LmmopsError
        If the fixed effects fit y exactly (the residual is rounding noise): nothing is
        left for the variance components.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=40)
    >>> X = np.column_stack([np.ones(40), 3e7 * x + 1.7e9])
    >>> y = 1e8 + x + rng.normal(size=40)
    >>> cond, keep, Xc, yc = condition(X, y)
    >>> keep.tolist(), bool(np.allclose(Xc.T @ Xc / 40, np.eye(2)))
    ([0, 1], True)
    >>> bool(np.allclose(cond.X(X), Xc) and np.isclose(np.mean(yc**2), 1.0))
    True
    """
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64).ravel()
    n = X.shape[0]
    keep, Q, R, scales = orthogonalise(X, tol)
    rk = keep.size
    rootn = math.sqrt(n)
    ay = _pow2(float(np.max(np.abs(y))) if n else 0.0)
    y0 = y / ay
    e, c = _project_out(Q, y0)
    b = c / rootn  # Q c = X_c c / sqrt(n)
    Xc = np.empty((n, rk))
    np.multiply(Q, rootn, out=Xc)
    del Q
    if rk:
        Rinv = sla.solve_triangular(R, np.eye(rk))
        T = Rinv * (rootn / scales[keep])[:, None]
        logdet = float(-np.sum(np.log(scales[keep])) - np.sum(np.log(np.diag(R)))
                       + 0.5 * rk * math.log(n))
    else:
        T, logdet = np.zeros((0, 0)), 0.0
    ne, ny = float(np.linalg.norm(e)), float(np.linalg.norm(y0))
    if ne <= _EXACT_FIT * ny:
        raise LmmopsError(
            "the response is fitted exactly by the fixed effects: its least-squares "
            f"residual is at the rounding level of y (|r|/|y| = {ne / max(ny, 1e-300):.2g}), "
            "so nothing is left for the variance components"
        )
    sy = ne / rootn  # exactly the root mean square: y and a y give the same y_c
    yc = e / sy
    cond = Conditioning(T, ay * b, ay * sy, n, log_abs_det_T=logdet)
    return cond, keep, Xc, yc


class UserScaleObjective:
    """The criterion of a conditioned objective, reported on the user's scale.

    ``obj(theta)`` is lme4's ``devfun`` on the user's X and y and ``obj.evaluate(theta)``
    returns a user-scale :class:`~lmmops.estimation.direct.Evaluation` (see
    :meth:`Conditioning.evaluation`); the solvers' own objective is ``obj.conditioned``.

    Parameters
    ----------
    objective : DirectObjective
        Built on the conditioned ``(X_c, y_c)``.
    conditioning : Conditioning

    Attributes
    ----------
    conditioned : DirectObjective
    conditioning : Conditioning
    method, design, n, p, K
    """

    def __init__(self, objective, conditioning):
        self.conditioned = objective
        self.conditioning = conditioning
        self.method = objective.method
        self.design = getattr(objective, "design", None)  # None for slope terms
        self.n, self.p = objective.n, objective.p
        self.K = getattr(objective, "K", None)

    @property
    def n_evaluations(self):
        """int: evaluations of the conditioned objective so far."""
        return self.conditioned.n_evaluations

    def evaluate(self, theta, gradient=True):
        """Evaluate at ``theta``; the evaluation is on the user's scale.

        Parameters
        ----------
        theta : array_like, shape (n_factors,)
        gradient : bool

        Returns
        -------
        Evaluation
        """
        ev = self.conditioned.evaluate(theta, gradient=gradient)
        return self.conditioning.evaluation(ev, self.method)

    def __call__(self, theta):
        """Return the user-scale criterion at ``theta`` (lme4's ``devfun``)."""
        return self.conditioning.criterion(self.conditioned(theta), self.method)
