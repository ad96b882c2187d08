"""Inference for the variance parameters: information-based standard errors, Wald and
profile-likelihood intervals.

- **Standard errors** of ``(s_1^2, ..., s_K^2, s_e^2)`` come from the inverse of the
  average-information matrix ``A_kl = 1/2 w_k' P w_l`` (REML; working variates
  ``w_k = dV/ds_k^2 P y``) or, for ML fits, ``1/2 w_k' V^{-1} w_l``: exact solves with the
  factored mixed-model equations
  (:meth:`lmmops.estimation.direct.DirectObjective.average_information`). At the optimum the
  average information equals the expected (Fisher) information up to terms of mean zero.
- **Wald intervals**: ``estimate -/+ z se`` (fixed effects from ``vcov``; standard
  deviations by the delta method ``se(s) = se(s^2) / (2 s)``, truncated at 0).
- **Profile intervals** on the standard-deviation scale, as lme4's ``confint``: for each
  ``s_k`` (and ``s``) the criterion ``-2 l(s_1..s_K, s)`` (REML or ML, not profiled in ``s``)
  is minimised over the other parameters with the parameter fixed, and the interval is
  ``{c : -2 l_prof(c) - min <= chi2_1(level)}``. Every evaluation is exact (direct solver).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import optimize, stats

from lmmops.data.terms import theta_lower_bounds
from lmmops.errors import LmmopsError, RankDeficientError
from lmmops.estimation.criterion import criterion_at_sigma, residual_dof
from lmmops.estimation.direct import theta_gradient
from lmmops.estimation.protocol import variance_covariance

__all__ = [
    "confint",
    "full_criterion",
    "profile_interval",
    "sdcor_names",
    "sdcor_profile_interval",
    "sdcor_theta",
    "variance_covariance",
]

def full_criterion(obj, sd, sigma, gradient=False):
    """``-2 log L`` (REML or ML) at standard deviations ``sd`` and residual ``sigma``.

    ``-2 l = log|L|^2 - sum(log w) [+ log|R_X|^2] + dof log(2 pi s^2) + r^2 / s^2`` with
    ``dof = n - p`` (REML) or ``n`` (ML); at ``s^2 = r^2/dof`` it is the profiled criterion.

    Parameters
    ----------
    obj : DirectObjective or UserScaleObjective
        A model's :meth:`~lmmops.LMM.objective` gives the criterion of the user's X and y
        (evaluated on the conditioned data at ``sd / s`` and ``sigma / s``, see
        :mod:`lmmops.data.conditioning`).
    sd : array_like, shape (K,)
        ``s_k >= 0``.
    sigma : float
        ``s > 0``.
    gradient : bool
        Also return the gradient in ``(sd, sigma)``.

    Returns
    -------
    float, or (float, ndarray of shape (K + 1,))
    """
    cond = getattr(obj, "conditioning", None)
    if cond is not None:
        out = full_criterion(obj.conditioned, np.asarray(sd, dtype=np.float64) / cond.scale,
                             float(sigma) / cond.scale, gradient=gradient)
        if not gradient:
            return cond.criterion(out, obj.method)
        return cond.criterion(out[0], obj.method), out[1] / cond.scale
    sd = np.abs(np.asarray(sd, dtype=np.float64))
    sigma = float(sigma)
    theta = sd / sigma
    ev = obj.evaluate(theta, gradient=gradient)
    s2 = sigma * sigma
    dof = residual_dof(obj.n, obj.p, obj.method)
    f = criterion_at_sigma(ev.logdet_L, ev.logdet_RX, ev.pwrss, obj.n, obj.p, obj.method, s2,
                           obj.ldW)
    if not gradient:
        return f

    gth = theta_gradient(theta, obj.design.n_levels, ev.traces, ev.v, s2)
    g = np.empty(obj.K + 1)
    g[:obj.K] = gth / sigma
    g[obj.K] = -float(gth @ theta) / sigma + 2.0 * dof / sigma - 2.0 * ev.pwrss / sigma**3
    return f, g


def _profile_value(obj, j, c, x0):
    """min over the other parameters with parameter j (0..K-1: s_k, K: s) fixed at c.

    The free parameters are measured in units of the residual standard deviation ``u``
    of the start (or ``c`` when ``s`` is fixed), and ``s`` itself on the log scale, so
    the optimiser's steps do not depend on the units of y and cannot reach ``s = 0``.
    """
    K = obj.K
    free = [i for i in range(K + 1) if i != j]
    x0 = np.asarray(x0, dtype=np.float64)
    u = float(c) if j == K else float(x0[K])

    def unpack(z):
        x = np.empty(K + 1)
        x[j] = c
        for t, i in enumerate(free):
            x[i] = u * np.exp(z[t]) if i == K else u * z[t]
        return x

    def fun(z):
        x = unpack(z)
        f, g = full_criterion(obj, x[:K], x[K], gradient=True)
        return f, np.array([g[i] * (x[K] if i == K else u) for i in free])

    z0 = np.array([np.log(x0[K] / u) if i == K else x0[i] / u for i in free])
    bounds = [(None, None) if i == K else (0.0, None) for i in free]
    r = optimize.minimize(fun, z0, jac=True, method="L-BFGS-B", bounds=bounds,
                          options={"ftol": 1e-13, "gtol": 1e-9, "maxiter": 500})
    return float(r.fun), unpack(r.x)


def profile_interval(obj, ev, j, level=0.95):
    """Profile-likelihood interval for one standard deviation.

    Parameters
    ----------
    obj : DirectObjective
    ev : Evaluation
        At the optimum.
    j : int
        ``0..K-1`` for ``s_k`` (design order), ``K`` for the residual ``s``.
    level : float

    Returns
    -------
    (float, float)
        Lower and upper limits; the lower limit is 0 when the profile stays below the
        cut-off down to ``s_k = 0``.
    """
    K = obj.K
    sigma = np.sqrt(ev.sigma2)
    xhat = np.append(ev.theta * sigma, sigma)
    fmin = full_criterion(obj, xhat[:K], xhat[K])
    cut = stats.chi2.ppf(level, 1)
    est = xhat[j]
    state = {"x": xhat.copy()}

    def excess(c):
        f, x = _profile_value(obj, j, c, state["x"])
        state["x"] = x
        return (f - fmin) - cut

    # lower limit
    lower = 0.0
    if j < K:
        state["x"] = xhat.copy()
        if est > 0 and excess(0.0) > 0:
            state["x"] = xhat.copy()
            lower = optimize.brentq(excess, 0.0, est, xtol=1e-6 * max(est, 1e-8))
    else:
        lo = est / 2.0
        state["x"] = xhat.copy()
        while excess(lo) < 0:
            lo /= 2.0
        state["x"] = xhat.copy()
        lower = optimize.brentq(excess, lo, est, xtol=1e-6 * est)
    # upper limit
    scale = max(est, 1e-3 * sigma)
    hi = est + scale
    state["x"] = xhat.copy()
    for _ in range(60):
        if excess(hi) > 0:
            break
        hi = est + 2.0 * (hi - est)
    else:
        raise LmmopsError(f"the profile of parameter {j} did not reach the cut-off")
    state["x"] = xhat.copy()
    upper = optimize.brentq(excess, est, hi, xtol=1e-6 * max(est, 1e-8))
    return float(lower), float(upper)


def confint(result, method="profile", level=0.95, parm=None):
    """Confidence intervals for the standard deviations and the fixed effects.

    Parameters
    ----------
    result : LMMResult
        A fit; profile intervals need the direct solver, Wald intervals work on both
        (on the iterative solver the information comes from exact PCG solves).
    method : {"profile", "wald"}
        ``"profile"``: profile-likelihood intervals for the standard deviations (fixed
        effects get Wald intervals); ``"wald"``: Wald intervals for everything.
    level : float
        Confidence level in (0, 1).
    parm : sequence of str, optional
        Rows to compute (``"sd_<factor>"``, ``"sigma"`` or a fixed-effect name); default
        all.

    Returns
    -------
    pandas.DataFrame
        Index ``sd_<factor>``, ..., ``sigma``, then the fixed effects; columns
        ``estimate``, ``lower``, ``upper`` and ``method``.

    Raises
    ------
    LmmopsError
        For an unknown method or parameter, or a level outside (0, 1).
    """
    method = str(method).lower()
    if method not in ("profile", "wald"):
        raise LmmopsError(f"unknown interval method {method!r}; use 'profile' or 'wald'")
    if not 0.0 < float(level) < 1.0:
        raise LmmopsError(f"level must be in (0, 1), got {level}")
    if not result.intercepts_only:
        return _confint_theta(result, method, level, parm)
    if method == "profile":
        obj, ev = result.fit_objective(exact=True)  # every profile point is an exact refit
    # Wald needs only the estimates and the information (also on iterative fits); both on
    # the user's scale, while the profiles run on the solver's conditioned data, whose
    # standard deviations are the user's divided by conditioning.scale
    cov = result.variances_cov.to_numpy()
    scale = result.model.conditioning.scale
    names = [f"sd_{nm}" for nm in result.n_levels] + ["sigma"]
    fixed = list(result.fixef.index)
    allp = names + fixed
    if parm is None:
        parm = allp
    unknown = [p for p in parm if p not in allp]
    if unknown:
        raise LmmopsError(f"unknown parameter(s) {unknown}; choose from {allp}")
    z = stats.norm.ppf(0.5 + level / 2.0)
    sds = np.array([result.stddev[nm] for nm in result.n_levels] + [result.sigma])
    var_se = np.sqrt(np.maximum(np.diag(cov), 0.0))
    rows = []
    for p in parm:
        if p in names:
            j = names.index(p)
            est = sds[j]
            if method == "profile":
                lo, hi = (scale * c for c in profile_interval(obj, ev, j, level))
                how = "profile"
            else:
                se = var_se[j] / (2.0 * est) if est > 0 else np.nan
                lo, hi = max(0.0, est - z * se), est + z * se
                how = "wald"
        else:
            est = float(result.fixef[p])
            se = float(result.fixef_se[p])
            lo, hi = est - z * se, est + z * se
            how = "wald"
        rows.append((p, est, lo, hi, how))
    out = pd.DataFrame(rows, columns=["parameter", "estimate", "lower", "upper", "method"])
    return out.set_index("parameter")


def sdcor_names(terms):
    """lme4's names of the standard deviations and correlations of vector-valued terms
    (``confint(m, oldNames = FALSE)``), in ``theta``'s order: ``sd_<column>|<group>`` for
    a diagonal entry, ``cor_<column_i>.<column_j>|<group>`` below it."""
    out = []
    for t in terms:
        for j in range(t.dim):
            for i in range(j, t.dim):
                out.append(f"sd_{t.columns[i]}|{t.group}" if i == j
                           else f"cor_{t.columns[i]}.{t.columns[j]}|{t.group}")
    return out


def _correlation_factor(R):
    """Lower Cholesky factor of a correlation matrix that may be singular (a correlation
    of +-1); None when ``R`` is not positive semidefinite."""
    d = R.shape[0]
    L = np.zeros((d, d))
    for j in range(d):
        piv = R[j, j] - L[j, :j] @ L[j, :j]
        if piv < -1e-12:
            return None
        L[j, j] = np.sqrt(max(piv, 0.0))
        for i in range(j + 1, d):
            num = R[i, j] - L[i, :j] @ L[j, :j]
            if L[j, j] > 1e-12:
                L[i, j] = num / L[j, j]
            elif abs(num) > 1e-8:
                return None
    return L


def sdcor_theta(terms, x, sigma):
    """lme4's ``theta`` from per-term standard deviations and correlations ``x`` (in
    :func:`sdcor_names` order) and the residual ``sigma``: ``T_k = diag(s) chol(R) / s``;
    None when a term's correlation matrix is not positive semidefinite."""
    out, pos = [], 0
    for t in terms:
        d = t.dim
        vals = x[pos:pos + t.n_theta]
        pos += t.n_theta
        S = np.zeros((d, d))
        rows, cols = np.triu_indices(d)[::-1]  # column-major lower triangle
        S[rows, cols] = vals
        sd = np.abs(np.diag(S))
        R = np.tril(S, -1)
        R = R + R.T + np.eye(d)
        L = _correlation_factor(R)
        if L is None:
            return None
        T = sd[:, None] * L / sigma
        out.extend(T[rows, cols])
    return np.array(out)


def _sdcor_criterion(obj, terms, x, sigma):
    """The (REML or ML) criterion not profiled in ``s`` at standard deviations and
    correlations ``x`` and residual ``sigma``, on the objective's (conditioned) scale;
    +inf where a correlation matrix is not positive semidefinite."""
    theta = sdcor_theta(terms, x, sigma)
    if theta is None:
        return np.inf
    try:
        ev = obj.evaluate(theta, gradient=False)
    except RankDeficientError:  # far out on a profile, X'V^{-1}X numerically singular
        return np.inf
    return float(criterion_at_sigma(ev.logdet_L, ev.logdet_RX, ev.pwrss, obj.n, obj.p,
                                    obj.method, sigma * sigma, obj.ldW))


def _sdcor_theta_jacobian(terms, x, sigma, h=1e-7):
    """``theta`` of :func:`sdcor_theta` and ``d theta / d (x, sigma)``
    (``n_theta x (len(x) + 1)``):
    exact for the standard deviations (``dT/ds_a = e_a e_a' chol(R) / sigma``, at 0 too)
    and ``sigma`` (``-T / sigma``), central differences of the factor for the
    correlations (one-sided where a step would leave [-1, 1] or the semidefinite cone);
    ``(None, None)`` where ``theta`` is not defined."""
    theta = sdcor_theta(terms, x, sigma)
    if theta is None:
        return None, None
    J = np.zeros((theta.size, x.size + 1))
    J[:, -1] = -theta / sigma
    pos = 0
    for t in terms:
        d, n = t.dim, t.n_theta
        rows, cols = np.triu_indices(d)[::-1]  # column-major lower triangle
        S = np.zeros((d, d))
        S[rows, cols] = x[pos:pos + n]
        R = np.tril(S, -1)
        L = _correlation_factor(R + R.T + np.eye(d))
        for c in range(n):
            i = pos + c
            if rows[c] == cols[c]:  # a standard deviation: T's row a is s_a L[a, :] / s
                on_row = rows == rows[c]
                J[pos:pos + n, i] = np.where(on_row, L[rows[c], cols] / sigma, 0.0)
                continue
            cols_fd = []
            for step in (h, -h):
                xs = x.copy()
                xs[i] = x[i] + step
                ts = sdcor_theta(terms, xs, sigma) if abs(xs[i]) <= 1.0 else None
                cols_fd.append(ts)
            tp, tm = cols_fd
            if tp is not None and tm is not None:
                J[:, i] = (tp - tm) / (2 * h)
            elif tp is not None:
                J[:, i] = (tp - theta) / h
            elif tm is not None:
                J[:, i] = (theta - tm) / h
        pos += n
    return theta, J


def _sdcor_criterion_and_gradient(obj, terms, x, sigma):
    """:func:`_sdcor_criterion` and its gradient in ``(x, sigma)`` from the objective's
    analytic ``evaluate_at_sigma`` and :func:`_sdcor_theta_jacobian`; ``(inf, 0)``
    where the criterion is not defined."""
    theta, J = _sdcor_theta_jacobian(terms, x, sigma)
    if theta is None:
        return np.inf, np.zeros(x.size + 1)
    try:
        F, g_theta, g_s2 = obj.evaluate_at_sigma(theta, sigma * sigma)
    except RankDeficientError:
        return np.inf, np.zeros(x.size + 1)
    grad = g_theta @ J
    grad[-1] += g_s2 * 2.0 * sigma
    return F, grad


def _sdcor_profile_value(obj, terms, kinds, j, c, x0):
    """min over the other parameters with parameter ``j`` of ``x = (sd/cor..., s)``
    fixed at ``c`` (``kinds``: "sd", "cor" or "sigma" per entry); standard deviations in
    units of the start's residual ``s`` (``c`` when ``s`` is the one fixed), ``s`` on
    the log scale, correlations bounded to [-1, 1]. The gradient is analytic when the
    objective has ``evaluate_at_sigma`` (the exact slope solver), else by finite
    differences."""
    n_x = len(kinds)
    free = [i for i in range(n_x) if i != j]
    u = float(c) if kinds[j] == "sigma" else float(x0[-1])
    analytic = hasattr(obj, "evaluate_at_sigma")

    def unpack(z):
        x = np.empty(n_x)
        x[j] = c
        for t, i in enumerate(free):
            x[i] = (u * np.exp(z[t]) if kinds[i] == "sigma"
                    else u * z[t] if kinds[i] == "sd" else z[t])
        return x

    def fun(z):
        x = unpack(z)
        return _sdcor_criterion(obj, terms, x[:-1], x[-1])

    def fun_grad(z):
        x = unpack(z)
        F, g = _sdcor_criterion_and_gradient(obj, terms, x[:-1], x[-1])
        dxdz = np.array([x[i] if kinds[i] == "sigma" else u if kinds[i] == "sd" else 1.0
                         for i in free])
        return F, g[free] * dxdz

    z0 = np.array([np.log(x0[i] / u) if kinds[i] == "sigma"
                   else x0[i] / u if kinds[i] == "sd" else x0[i] for i in free])
    bounds = [(None, None) if kinds[i] == "sigma" else (0.0, None) if kinds[i] == "sd"
              else (-1.0, 1.0) for i in free]
    z0 = np.clip(z0, [-np.inf if lo is None else lo for lo, _ in bounds],
                 [np.inf if hi is None else hi for _, hi in bounds])
    if not free:
        return fun(z0), unpack(z0)
    if analytic:
        r = optimize.minimize(fun_grad, z0, jac=True, method="L-BFGS-B", bounds=bounds,
                              options={"ftol": 1e-12, "gtol": 1e-6, "maxiter": 1000})
    else:
        r = optimize.minimize(fun, z0, method="L-BFGS-B", bounds=bounds,
                              options={"ftol": 1e-12, "gtol": 1e-6, "maxiter": 1000,
                                       "eps": 1e-7})
    return float(r.fun), unpack(r.x)


def sdcor_profile_interval(obj, terms, xhat, j, level=0.95):
    """Profile-likelihood interval for one standard deviation, correlation or ``s`` of a
    model with vector-valued terms (lme4's ``confint(method = "profile")`` scale).

    Parameters
    ----------
    obj : VectorObjective
        Exact, on its own (conditioned) scale.
    terms : sequence of RandomEffectsTerm
    xhat : ndarray
        The estimates: standard deviations and correlations (:func:`sdcor_names` order),
        then ``s``.
    j : int
        Which entry of ``xhat``.
    level : float

    Returns
    -------
    (float, float)
        A standard deviation's lower limit is 0 and a correlation's limits are -1 or 1
        when the profile stays below the cut-off up to that bound.
    """
    kinds, where, pos = [], [], 0
    for t in terms:
        for b in range(t.dim):
            for a in range(b, t.dim):
                kinds.append("sd" if a == b else "cor")
                where.append((pos, a, b))
        pos += t.n_theta
    kinds.append("sigma")
    fmin = _sdcor_criterion(obj, terms, xhat[:-1], xhat[-1])
    cut = stats.chi2.ppf(level, 1)
    est = float(xhat[j])
    kind = kinds[j]

    def excess(c, x0):
        f, x = _sdcor_profile_value(obj, terms, kinds, j, c, x0)
        return (f - fmin) - cut, x

    def excess_fixed(k):
        """The excess with parameter ``k`` (a standard deviation) fixed at 0."""
        f, _ = _sdcor_profile_value(obj, terms, kinds, k, 0.0, xhat)
        return (f - fmin) - cut

    def walk(points, bound):
        """Follow the profile along ``points`` (away from the estimate), each
        minimisation started from the previous one's optimum (so the path does not jump
        to another basin, as a correlation's does when a standard deviation reaches 0),
        then find the crossing in the first segment that crosses the cut-off; ``bound``
        when none does."""
        prev, x = est, xhat.copy()
        for c in points:
            e, x_new = excess(c, x)
            if e > 0:
                return optimize.brentq(lambda t, x0=x: excess(t, x0)[0], *sorted((prev, c)),
                                       xtol=1e-7 * max(abs(est), 1e-8))
            prev, x = c, x_new
        if bound is None:
            raise LmmopsError(f"the profile of parameter {j} did not reach the cut-off")
        return bound

    steps = np.arange(1, 9) / 8.0
    sigma = float(xhat[-1])
    grow = est + max(est, 1e-3 * sigma) * (2.0 ** np.arange(-2, 40) - 0.25)
    if kind == "cor":
        # with either standard deviation at 0 the correlation has no effect, so the
        # profile never rises above the best fit with that standard deviation at 0: when
        # that is within the cut-off, so is every correlation (lme4's [-1, 1])
        off, a, b = where[j]
        for i in (a, b):
            k = next(n for n, w in enumerate(where) if w == (off, i, i))
            if excess_fixed(k) <= 0:
                return -1.0, 1.0
        lower = walk(est + (-1.0 - est) * steps, -1.0) if est > -1.0 else -1.0
        upper = walk(est + (1.0 - est) * steps, 1.0) if est < 1.0 else 1.0
    elif kind == "sd":
        lower = walk(est * (1.0 - steps), 0.0) if est > 0 else 0.0
        upper = walk(grow[1:], None)
    else:
        lower = walk(est * 0.8 ** np.arange(1, 80), None)
        upper = walk(grow[1:], None)
    return float(lower), float(upper)


def _confint_sdcor_profile(result, level, parm):
    """Profile intervals on lme4's standard-deviation / correlation scale for models with
    vector-valued terms (fixed effects: Wald), from exact refits on the solver's
    conditioned data (standard deviations and ``s`` scale with ``conditioning.scale``,
    correlations do not)."""
    obj, ev = result.fit_objective(exact=True)
    obj = getattr(obj, "conditioned", obj)
    terms = result.terms
    names = sdcor_names(terms) + ["sigma"]
    fixed = list(result.fixef.index)
    allp = names + fixed
    parm = allp if parm is None else list(parm)
    unknown = [p for p in parm if p not in allp]
    if unknown:
        raise LmmopsError(f"unknown parameter(s) {unknown}; choose from {allp}")
    scale = result.model.conditioning.scale
    sigma = float(np.sqrt(ev.sigma2))
    xhat = []
    for t, sl in zip(terms, obj.layout):
        T = t.relative_factor(ev.theta[sl]) * sigma
        cov = T @ T.T
        sd = np.sqrt(np.diag(cov))
        for b in range(t.dim):
            for a in range(b, t.dim):
                if a == b:
                    xhat.append(sd[a])
                else:
                    xhat.append(cov[a, b] / (sd[a] * sd[b]) if sd[a] * sd[b] > 0 else np.nan)
    xhat = np.append(xhat, sigma)
    z = stats.norm.ppf(0.5 + level / 2.0)
    rows = []
    for p in parm:
        if p in names:
            j = names.index(p)
            unit = 1.0 if p.startswith("cor_") else scale
            est = unit * xhat[j]
            if np.isnan(xhat[j]):
                lo = hi = np.nan  # a correlation of a term with a zero standard deviation
            else:
                x0 = np.nan_to_num(xhat)
                lo, hi = (unit * c for c in sdcor_profile_interval(obj, terms, x0, j, level))
            how = "profile"
        else:
            est, se = float(result.fixef[p]), float(result.fixef_se[p])
            lo, hi = est - z * se, est + z * se
            how = "wald"
        rows.append((p, est, lo, hi, how))
    out = pd.DataFrame(rows, columns=["parameter", "estimate", "lower", "upper", "method"])
    return out.set_index("parameter")


def _confint_theta(result, method, level, parm):
    """Wald intervals on lme4's ``theta`` (relative to ``sigma``, so scale-free) and the
    fixed effects, for models with vector-valued terms (profile intervals: on lme4's
    standard-deviation / correlation scale, :func:`sdcor_profile_interval`); a diagonal
    entry's lower limit is held at 0, and a parameter on the boundary gets NaN limits."""
    if method == "profile":
        return _confint_sdcor_profile(result, level, parm)
    theta = result.theta
    fixed = list(result.fixef.index)
    allp = list(theta.index) + fixed
    parm = allp if parm is None else list(parm)
    unknown = [p for p in parm if p not in allp]
    if unknown:
        raise LmmopsError(f"unknown parameter(s) {unknown}; choose from {allp}")
    z = stats.norm.ppf(0.5 + level / 2.0)
    cov = result.theta_cov
    lower = theta_lower_bounds(result.terms)
    rows = []
    for p in parm:
        if p in theta.index:
            j = list(theta.index).index(p)
            est, se = float(theta[p]), float(np.sqrt(cov.iloc[j, j]))
            lo, hi = est - z * se, est + z * se
            if lower[j] == 0.0:
                lo = max(lo, 0.0)
        else:
            est, se = float(result.fixef[p]), float(result.fixef_se[p])
            lo, hi = est - z * se, est + z * se
        rows.append((p, est, lo, hi, "wald"))
    out = pd.DataFrame(rows, columns=["parameter", "estimate", "lower", "upper", "method"])
    return out.set_index("parameter")
