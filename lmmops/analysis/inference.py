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
from lmmops.errors import LmmopsError
from lmmops.estimation.criterion import criterion_at_sigma, residual_dof
from lmmops.estimation.direct import theta_gradient
from lmmops.estimation.protocol import variance_covariance

__all__ = [
    "confint",
    "full_criterion",
    "profile_interval",
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


def _confint_theta(result, method, level, parm):
    """Wald intervals on lme4's ``theta`` (relative to ``sigma``, so scale-free) and the
    fixed effects, for models with vector-valued terms; a diagonal entry's lower limit is
    held at 0, and a parameter on the boundary gets NaN limits."""
    if method != "wald":
        raise LmmopsError("profile intervals are not available yet for models with "
                          "random-slope terms; use method='wald' (Wald intervals on theta)")
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
