"""Outlier models: mean shift (MSOM) and variance shift (VSOM) (:ref:`theory-outliers`).

Mean-shift outlier model: ``y = X tau + Z u + delta_I phi_I + e`` with ``delta_I`` the
indicator of a set ``I`` of observations and ``phi_I`` a fixed shift. Then

- ``phi_hat_I = (delta_I' P delta_I)^{-1} delta_I' P y``,
- ``var(phi_hat_I) = (delta_I' P delta_I)^{-1}``,

and for a single observation ``phi_hat_i = r_i`` is the shift residual of
:ref:`theory-outliers` and ``phi_hat_i / se = t_i`` its studentised form.
``P y = R^{-1} e`` (``e`` the conditional residual) and the needed entries of ``P``
come exactly from the level-space factor (:mod:`lmmops.estimation.mme`); an iterative
solver would estimate ``diag(P)`` stochastically.

Variance-shift outlier model: ``y = X tau + Z u + delta_I o_I + e`` with
``o_I ~ N(0, s_o^2 I_|I|)``. Adding ``s_o^2`` to the residual variance of the rows in ``I``
is a change of prior weights: ``R_ii = s^2 (1/w_i + omega)`` with ``omega = s_o^2/s^2``, so
the REML fit for each ``omega`` is an exact weighted fit, and ``omega`` is found by a
one-dimensional search of the profiled REML criterion. The likelihood-ratio statistic
against ``s_o^2 = 0`` is referred to the boundary mixture ``1/2 chi2_0 + 1/2 chi2_1``.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from scipy import optimize, stats

from lmmops.errors import LmmopsError
from lmmops.estimation.direct import DirectObjective, fit_direct, moment_start
from lmmops.estimation.mme import P_columns, diag_P
from lmmops.estimation.stochastic import fit_iterative

__all__ = ["msom", "msom_scan", "vsom"]


def _py(obj, ev):
    """``P y = R^{-1} e = W e / s^2``."""
    e = obj.residuals(ev)
    w = np.ones(obj.n) if obj.weights is None else obj.weights
    return w * e / ev.sigma2


def _rows(rows, n):
    r = np.unique(np.asarray(rows, dtype=np.int64).ravel())
    if r.size == 0:
        raise LmmopsError("the outlier set I is empty")
    if r.min() < 0 or r.max() >= n:
        raise LmmopsError(f"observation indices must be in 0..{n - 1}, got {r.min()}..{r.max()}")
    return r


def msom(obj, ev, rows):
    """Mean-shift outlier model for the set ``I = rows``: one common shift ``phi_I``.

    Parameters
    ----------
    obj : DirectObjective or IterativeObjective
        On the iterative solver ``P delta_I`` comes from one PCG solve (exact to its
        tolerance).
    ev : Evaluation
        The fit (REML or ML) at which ``P`` is evaluated.
    rows : array_like of int
        Positions (0-based) of the observations in ``I``.

    Returns
    -------
    dict
        ``phi`` (``phi_hat_I``), ``se`` (``(delta' P delta)^{-1/2}``), ``statistic``
        (``phi / se``), ``p_value`` (two-sided, normal), ``rows``.

    Raises
    ------
    LmmopsError
        For an empty set or indices out of range.

    Examples
    --------
    >>> from lmmops.data.design import CrossedDesign
    >>> from lmmops.estimation.direct import DirectObjective, fit_direct
    >>> rng = np.random.default_rng(0)
    >>> g = np.repeat(np.arange(10), 8)
    >>> y = rng.normal(size=10)[g] + rng.normal(size=80)
    >>> y[5] += 8.0
    >>> obj = DirectObjective(CrossedDesign.from_codes([g]), np.ones((80, 1)), y)
    >>> ev, _ = fit_direct(obj, [1.0])
    >>> out = msom(obj, ev, [5])
    >>> bool(out["statistic"] > 4)
    True
    """
    r = _rows(rows, obj.n)
    Py = _py(obj, ev)
    if hasattr(obj, "apply_P"):  # iterative solver: P delta_I by one block PCG solve
        delta = np.zeros((obj.n, 1))
        delta[r, 0] = 1.0
        dPd = float(obj.apply_P(ev, delta)[r, 0].sum())
    else:
        _, block = P_columns(obj, ev, r)
        dPd = float(block.sum())
    dPy = float(Py[r].sum())
    phi = dPy / dPd
    se = 1.0 / np.sqrt(dPd)
    stat = phi / se
    return {"rows": r, "phi": phi, "se": se, "statistic": stat,
            "p_value": float(2.0 * stats.norm.sf(abs(stat)))}


def msom_scan(obj, ev, top=None, index=None, diag=None):
    """Mean-shift outlier statistics for every single observation, ranked.

    For ``I = {i}``: ``phi_hat_i = (P y)_i / P_ii`` (the conditional residual ``r_i``),
    ``se_i = P_ii^{-1/2}`` and ``t_i = (P y)_i / sqrt(P_ii)``, with ``diag(P)`` exact from the
    level-space factor (:func:`lmmops.estimation.mme.diag_P`).

    Parameters
    ----------
    obj : DirectObjective
    ev : Evaluation
    top : int, optional
        Keep the ``top`` largest ``|t|``; default all.
    index : array_like, optional
        Row labels for the output (default 0..n-1).
    diag : ndarray, optional
        ``diag(P)`` if already computed (for example a stochastic estimate from an
        iterative solver); default exact, by :func:`lmmops.estimation.mme.diag_P`.

    Returns
    -------
    pandas.DataFrame
        Sorted by ``|t|`` descending; columns ``row`` (0-based position), ``phi``, ``se``,
        ``t``, ``p_value`` (two-sided normal) and ``p_bonferroni`` (times n, capped at 1).
    """
    Py = _py(obj, ev)
    dP = diag_P(obj, ev) if diag is None else np.asarray(diag, dtype=np.float64)
    phi = Py / dP
    se = 1.0 / np.sqrt(dP)
    t = Py / np.sqrt(dP)
    p = 2.0 * stats.norm.sf(np.abs(t))
    n = obj.n
    order = np.argsort(-np.abs(t), kind="stable")
    if top is not None:
        order = order[: int(top)]
    labels = np.arange(n) if index is None else np.asarray(index)
    out = pd.DataFrame({
        "row": order,
        "phi": phi[order],
        "se": se[order],
        "t": t[order],
        "p_value": p[order],
        "p_bonferroni": np.minimum(1.0, n * p[order]),
    }, index=pd.Index(labels[order], name="observation"))
    return out


def vsom(obj, rows, *, start=None, omega_max=None):
    """Variance-shift outlier model: REML (or ML) estimate of ``s_o^2`` for the set I.

    Parameters
    ----------
    obj : DirectObjective or IterativeObjective
        The null model (its method, REML or ML, is used throughout). On the iterative
        solver every refit reuses the null model's probes and deflation basis, so the
        likelihood-ratio statistic is a difference under common random numbers.
    rows : array_like of int
        Positions of the observations in ``I``.
    start : array_like, optional
        Starting ``theta`` for the refits (default: the null fit's).
    omega_max : float, optional
        Upper end of the search for ``omega = s_o^2 / s^2``; default ``1e4``.

    Returns
    -------
    dict
        ``sigma2_o`` (the estimate of ``s_o^2``), ``omega``, ``sigma2`` (residual variance
        under the alternative), ``theta``, ``criterion_null``, ``criterion`` (REML
        criteria or ML deviances), ``lrt`` (their difference, >= 0), ``p_value``
        (``1/2 P(chi2_1 > lrt)``), ``rows``.

    Notes
    -----
    Every evaluation of the profile in ``omega`` is an exact weighted refit by the direct
    solver, so the cost is about 20 fits; use it on a few candidate sets found by
    :func:`msom_scan`.
    """
    r = _rows(rows, obj.n)
    w0 = np.ones(obj.n) if obj.weights is None else obj.weights.copy()
    ev0, _ = _quiet_fit(obj, start)
    theta0 = ev0.theta.copy()
    cache = {}

    def crit(omega):
        key = float(omega)
        if key in cache:
            return cache[key][0]
        w = w0.copy()
        w[r] = 1.0 / (1.0 / w0[r] + omega)
        if hasattr(obj, "with_weights"):  # iterative: same probes (common random numbers)
            o = obj.with_weights(w)
        else:
            o = DirectObjective(obj.design, obj.X, obj.y, method=obj.method, weights=w)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ev, _ = _fit(o, np.maximum(theta0, 0.05))
        cache[key] = (ev.objective, ev)
        return ev.objective

    f0 = ev0.objective
    hi = np.log(1e4 if omega_max is None else float(omega_max))
    res = optimize.minimize_scalar(lambda t: crit(np.exp(t)), bounds=(np.log(1e-6), hi),
                                   method="bounded", options={"xatol": 1e-6})
    omega = float(np.exp(res.x))
    f1 = crit(omega)
    if f1 >= f0:
        omega, f1, ev1 = 0.0, f0, ev0
    else:
        ev1 = cache[float(omega)][1]
    lrt = max(0.0, f0 - f1)
    return {
        "rows": r,
        "sigma2_o": omega * ev1.sigma2,
        "omega": omega,
        "sigma2": ev1.sigma2,
        "theta": ev1.theta.copy(),
        "criterion_null": f0,
        "criterion": f1,
        "lrt": lrt,
        "p_value": float(0.5 * stats.chi2.sf(lrt, 1)) if lrt > 0 else 1.0,
    }


def _fit(obj, start):
    """Fit with the optimiser that fits the objective: stochastic or exact."""
    if hasattr(obj, "add_probes"):
        return fit_iterative(obj, start)
    return fit_direct(obj, start)


def _quiet_fit(obj, start):
    if start is None:
        start = moment_start(obj.design, obj.X, obj.y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _fit(obj, start)
