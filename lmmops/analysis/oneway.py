"""The one-way random-effects model ``y_ij = mu + A_j + e_ij`` (:ref:`theory-oneway`).

``A_j ~ N(0, s_A^2)`` and ``e_ij ~ N(0, s_e^2)`` independent, ``j = 1..J`` groups of sizes
``n_j``, ``n = sum n_j``. The group means have ``E(ybar_j) = mu`` and
``V(ybar_j) = s_A^2 + s_e^2 / n_j``.

- :func:`weighted_mean`: the minimum-variance unbiased linear estimator of ``mu`` from
  the group means, ``mu_hat = sum w_j ybar_j / sum w_j`` with ``w_j = 1 / V(ybar_j)``
  (variance ``1 / sum w_j``); it is also the GLS (ML) estimator of ``mu``.
- :func:`moment_estimators`: the unbiased estimators
  ``s_e^2_hat = sum_j sum_i (y_ij - ybar_j)^2 / (n - J)`` and
  ``s_A^2_hat = n (S_A^2 - (J - 1) s_e^2_hat) / (n^2 - sum n_j^2)`` with
  ``S_A^2 = sum_j n_j (ybar_j - ybar)^2``; a negative ``s_A^2_hat`` is replaced by 0, with a
  note.
- :func:`ml_alternating`: maximum likelihood by alternating the weighted mean (the score
  equation for ``mu``, which has a closed form) and a maximisation over
  ``(s_A^2, s_e^2)`` with ``mu`` fixed (no closed form).
- :func:`estimate`: all three at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import optimize

from lmmops.errors import LmmopsError

__all__ = [
    "OneWayResult",
    "estimate",
    "ml_alternating",
    "moment_estimators",
    "weighted_mean",
]


def _groups(y, groups):
    y = np.asarray(y, dtype=np.float64).ravel()
    g = np.asarray(groups).ravel()
    if y.shape != g.shape:
        raise LmmopsError(f"y has {y.size} values but groups has {g.size}")
    if not np.all(np.isfinite(y)):
        raise LmmopsError("y has missing or non-finite values")
    _, codes = np.unique(g, return_inverse=True)
    codes = codes.ravel()
    J = int(codes.max()) + 1 if codes.size else 0
    if J < 2:
        raise LmmopsError("the one-way model needs at least 2 groups")
    if J >= y.size:
        raise LmmopsError(f"{J} groups for {y.size} observations: s_e^2 is not estimable")
    nj = np.bincount(codes, minlength=J).astype(np.float64)
    means = np.bincount(codes, weights=y, minlength=J) / nj
    return y, codes, nj, means


def weighted_mean(y, groups, sigma2_a, sigma2_e):
    """Minimum-variance unbiased linear estimator of ``mu`` from the group means.

    Parameters
    ----------
    y : array_like, shape (n_obs,)
    groups : array_like, shape (n_obs,)
        Group labels.
    sigma2_a, sigma2_e : float
        Variance components (``sigma2_e > 0``).

    Returns
    -------
    mu : float
    var : float
        ``1 / sum_j w_j``.

    Examples
    --------
    >>> mu, var = weighted_mean([1., 2, 3, 10], [0, 0, 0, 1], 1.0, 3.0)
    >>> round(mu, 6), round(var, 6)
    (4.666667, 1.333333)
    """
    y, codes, nj, means = _groups(y, groups)
    if not sigma2_e > 0 or sigma2_a < 0:
        raise LmmopsError("need sigma2_e > 0 and sigma2_a >= 0")
    w = 1.0 / (sigma2_a + sigma2_e / nj)
    return float(np.sum(w * means) / np.sum(w)), float(1.0 / np.sum(w))


def moment_estimators(y, groups):
    """Unbiased moment (ANOVA) estimators of ``s_A^2`` and ``s_e^2``.

    Parameters
    ----------
    y : array_like, shape (n_obs,)
    groups : array_like, shape (n_obs,)

    Returns
    -------
    sigma2_a : float
        Truncated at 0.
    sigma2_e : float
    note : str or None
        Set when ``s_A^2_hat`` was negative and truncated.

    Examples
    --------
    >>> y = [1.0, 2, 3, 4, 8, 9, 10, 11]
    >>> moment_estimators(y, [0, 0, 0, 0, 1, 1, 1, 1])
    (24.083333333333332, 1.6666666666666667, None)
    """
    y, codes, nj, means = _groups(y, groups)
    n, J = y.size, nj.size
    s2e = float(np.sum((y - means[codes]) ** 2) / (n - J))
    SA = float(np.sum(nj * (means - y.mean()) ** 2))
    s2a = n * (SA - (J - 1) * s2e) / (n * n - float(np.sum(nj**2)))
    note = None
    if s2a < 0:
        note = (f"the moment estimate of sigma_A^2 is negative ({s2a:.4g}) and is replaced "
                "by 0: the between-group variation is smaller than the within-group "
                "variation predicts, so the model may be unsuitable (sigma_A^2 near 0)")
        s2a = 0.0
    return float(s2a), s2e, note


def _negloglik(y, codes, nj, mu, s2a, s2e):
    r = y - mu
    J = nj.size
    rbar = np.bincount(codes, weights=r, minlength=J) / nj
    ssw = np.bincount(codes, weights=(r - rbar[codes]) ** 2, minlength=J)
    lam = s2e + nj * s2a
    return 0.5 * (y.size * np.log(2 * np.pi) + np.sum((nj - 1) * np.log(s2e) + np.log(lam)
                                                      + ssw / s2e + nj * rbar**2 / lam))


def ml_alternating(y, groups, start=None, tol=1e-10, maxiter=500):
    """Maximum likelihood by the alternating algorithm.

    Each iteration sets ``mu`` to the weighted mean at the current variances (the exact
    maximiser in ``mu``) and then maximises the log-likelihood in ``(s_A^2, s_e^2)`` with
    ``mu`` fixed (numerically, ``s_A^2 >= 0``). The log-likelihood increases at every
    step.

    Parameters
    ----------
    y : array_like, shape (n_obs,)
    groups : array_like, shape (n_obs,)
    start : (float, float), optional
        ``(sigma2_a, sigma2_e)``; default the moment estimators (``s_A^2`` at least 1e-3
        of ``s_e^2``).
    tol : float
        Stop when the log-likelihood changes by less than ``tol`` (relative).
    maxiter : int

    Returns
    -------
    dict
        ``mu``, ``sigma2_a``, ``sigma2_e``, ``loglik``, ``iterations``, ``converged``.

    Examples
    --------
    >>> rng = np.random.default_rng(2)
    >>> g = np.repeat(np.arange(8), 5)
    >>> y = 3 + rng.normal(size=8)[g] + rng.normal(size=40)
    >>> out = ml_alternating(y, g)
    >>> out["converged"], bool(out["sigma2_a"] > 0)
    (True, True)
    """
    y, codes, nj, means = _groups(y, groups)
    if start is None:
        s2a, s2e, _ = moment_estimators(y, codes)
        s2a = max(s2a, 1e-3 * s2e)
    else:
        s2a, s2e = (float(v) for v in start)
    ll_old = -np.inf
    converged = False
    it = 0
    mu = float(y.mean())
    while it < maxiter:
        it += 1
        w = 1.0 / (s2a + s2e / nj)
        mu = float(np.sum(w * means) / np.sum(w))

        def f(z, mu=mu):
            return _negloglik(y, codes, nj, mu, z[0], np.exp(z[1]))

        r = optimize.minimize(f, [s2a, np.log(s2e)], method="L-BFGS-B",
                              bounds=[(0.0, None), (None, None)],
                              options={"ftol": 1e-15, "gtol": 1e-10})
        s2a, s2e = float(r.x[0]), float(np.exp(r.x[1]))
        ll = -float(r.fun)
        if abs(ll - ll_old) <= tol * max(1.0, abs(ll)):
            converged = True
            break
        ll_old = ll
    return {"mu": mu, "sigma2_a": s2a, "sigma2_e": s2e, "loglik": ll, "iterations": it,
            "converged": converged}


@dataclass
class OneWayResult:
    """Estimates of the one-way model (see :func:`estimate`).

    Attributes
    ----------
    mu, mu_se : float
        Weighted (minimum-variance) estimate of ``mu`` at the moment estimates, and its
        standard error ``(sum w_j)^{-1/2}``.
    sigma2_a, sigma2_e : float
        Moment estimators (``sigma2_a`` truncated at 0).
    ml : dict
        The ML fit by :func:`ml_alternating`.
    n_groups, n_obs : int
    notes : list of str
    """

    mu: float
    mu_se: float
    sigma2_a: float
    sigma2_e: float
    ml: dict
    n_groups: int
    n_obs: int
    notes: list = field(default_factory=list)


def estimate(y, groups):
    """Moment estimators, the weighted mean and ML for the one-way model.

    Parameters
    ----------
    y, groups : array_like, shape (n_obs,)
        The response and the group labels, as in :func:`weighted_mean`.

    Returns
    -------
    OneWayResult

    Raises
    ------
    LmmopsError
        For mismatched lengths, non-finite ``y``, fewer than 2 groups, or as many groups
        as observations.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> g = np.repeat(np.arange(6), [3, 5, 8, 2, 6, 4])
    >>> y = 10 + 2 * rng.normal(size=6)[g] + rng.normal(size=g.size)
    >>> est = estimate(y, g)
    >>> est.n_groups, est.n_obs
    (6, 28)
    >>> bool(abs(est.mu - est.ml["mu"]) < 1.0)
    True
    """
    y, codes, nj, _ = _groups(y, groups)
    s2a, s2e, note = moment_estimators(y, codes)
    mu, var = weighted_mean(y, codes, s2a, s2e)
    ml = ml_alternating(y, codes)
    return OneWayResult(mu=mu, mu_se=float(np.sqrt(var)), sigma2_a=s2a, sigma2_e=s2e, ml=ml,
                        n_groups=int(nj.size), n_obs=int(y.size),
                        notes=[note] if note else [])
