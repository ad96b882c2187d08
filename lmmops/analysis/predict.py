"""Prediction from a fitted model, with prediction variances.

For new rows with fixed-effects row ``x`` and random-effects row ``z`` the prediction is
``x' tau_hat + z' u_tilde`` (``random=True``) or ``x' tau_hat`` (``random=False``). A level
not seen in the fit contributes 0 (the population-level prediction), as lme4's
``allow.new.levels=TRUE``.

Variances (``interval=``):

- ``"confidence"``: ``var(x'tau_hat + z'u_tilde - x'tau - z'u) = h' C^{-1} h`` with
  ``h = [x; z]`` and ``C^{-1}`` the inverse of Henderson's equations (the PEV, including the
  covariance of ``tau_hat`` and ``u_tilde``); for ``random=False``, ``x' var(tau_hat) x``.
  A new level adds its variance ``s_k^2`` when ``random=True`` (its effect is unknown).
- ``"prediction"``: the above plus the residual variance ``s^2 / w`` of a new observation.

``h' C^{-1} h = s^2 g' Omega^{-1} g`` with ``g = [Lambda z; x]`` is computed by one
level-space solve for all new rows; no ``q x q`` matrix is formed.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from lmmops.data.formula import grouping_columns
from lmmops.errors import LmmopsError
from lmmops.estimation.iterative import IterativeObjective

__all__ = ["predict"]


def _codes_for(result, newdata):
    """Level codes of the new rows per factor (-1 for a level not in the fit)."""
    d = result.model.design
    out = []
    for k, name in enumerate(d.names):
        parts = [name] if name in newdata.columns else list(grouping_columns(name))
        for p in parts:
            if p not in newdata.columns:
                raise LmmopsError(f"newdata has no column '{p}' for the grouping factor "
                                  f"'{name}'")
        if len(parts) == 1:
            labels = np.asarray(newdata[parts[0]].to_numpy(dtype=object))
            lev = pd.Index(d.levels[k])
            idx = lev.get_indexer(pd.Index(labels, dtype=object))
            if np.all(idx < 0) and len(labels):  # e.g. "3" against integer labels
                idx = pd.Index(lev.astype(str)).get_indexer(pd.Index(labels).astype(str))
        else:
            labels = newdata[parts].astype(str).agg(":".join, axis=1)
            idx = pd.Index(d.levels[k]).get_indexer(labels)
        out.append(np.asarray(idx, dtype=np.int64))
    return out


def predict(result, newdata=None, random=True, interval=None, level=0.95, weights=None):
    """Predictions for new (or the original) data.

    Parameters
    ----------
    result : LMMResult
    newdata : pandas.DataFrame, optional
        Default: the data of the fit (then the predictions are the fitted values).
    random : bool
        Include the BLUPs (conditional prediction) or not (population level).
    interval : {None, "confidence", "prediction"}
        Add standard errors and limits.
    level : float
        Interval level.
    weights : array_like, optional
        Prior weights of the new observations for ``"prediction"`` (default 1).

    Returns
    -------
    ndarray, shape (n_new,), or pandas.DataFrame
        Without ``interval``: the predictions. With it: columns ``fit``, ``se``,
        ``lower``, ``upper``.

    Raises
    ------
    LmmopsError
        For an unknown interval type, missing columns, or a model built without a formula
        (``newdata`` needs the formula's fixed-effects specification).
    """
    if interval not in (None, "confidence", "prediction"):
        raise LmmopsError(f"unknown interval {interval!r}; use None, 'confidence' or "
                          "'prediction'")
    model = result.model
    obj, ev = result.fit_objective()
    # the iterative objective answers the prediction variances by level-space PCG solves
    # (exact to tolerance), the exact one by its blocked factor
    iterative = isinstance(obj, IterativeObjective)
    # the solvers' conditioned scale (lmmops.data.conditioning): X_c = X T, and the values map
    # back as X_c b + s f_c, the variances as s^2
    cond = model.conditioning
    if newdata is None:
        X = model.X_conditioned
        codes = [np.asarray(c, dtype=np.int64) for c in model.design.codes]
    else:
        if not isinstance(newdata, pd.DataFrame):
            raise LmmopsError("newdata must be a pandas DataFrame")
        if getattr(model, "fixed_spec", None) is None:
            raise LmmopsError("predicting for newdata needs a model built from a formula")
        try:
            mm = model.fixed_spec.get_model_matrix(newdata, na_action="raise")
        except Exception as exc:  # formulaic raises several types
            raise LmmopsError(f"cannot build the fixed effects for newdata: {exc}") from None
        X = cond.X(np.asarray(mm, dtype=np.float64)[:, model.keep])
        codes = _codes_for(result, newdata)
    m = X.shape[0]
    if not result.intercepts_only:
        fit, var = _terms_prediction(result, obj, ev, X, newdata, random,
                                     interval is not None)
        return _finish(result, X, fit, var, interval, level, weights, newdata)
    theta = ev.theta
    fit = X @ ev.beta
    if random:
        for k in range(obj.K):
            c = codes[k]
            known = c >= 0
            fit[known] += theta[k] * ev.v[k][c[known]]
    if interval is None:
        return _finish(result, X, fit, None, None, level, weights, newdata)
    s2 = ev.sigma2
    if random and iterative:
        # g = [Lambda z; x] in design order; block solves of at most 256 rows at a time
        off = model.design.offsets
        var = np.empty(m)
        for lo in range(0, m, 256):
            hi = min(m, lo + 256)
            cols = np.arange(hi - lo)
            bz = np.zeros((model.design.q, hi - lo))
            for k in range(obj.K):
                c = codes[k][lo:hi]
                kk = c >= 0
                bz[off[k] + c[kk], cols[kk]] = theta[k]
            var[lo:hi] = s2 * obj.quadratic_zx(ev, bz, X[lo:hi].T)
        for k in range(obj.K):
            var += np.where(codes[k] < 0, s2 * theta[k] ** 2, 0.0)
    elif random:
        # g = [Lambda z; x] in the solver's blocks; one solve for all rows
        b1 = np.zeros((obj.q1, m))
        br = np.zeros((obj.qr + obj.p, m))
        cols = np.arange(m)
        c1 = codes[obj.first]
        k1 = c1 >= 0
        b1[c1[k1], cols[k1]] = theta[obj.first]
        for i, k in enumerate(obj.rest):
            c = codes[k]
            kk = c >= 0
            br[obj.rest_offsets[i] + c[kk], cols[kk]] = theta[k]
        br[obj.qr:] = X.T
        x1, xr = obj.solve_spherical(ev, b1, br)
        var = s2 * (np.sum(b1 * x1, axis=0) + np.sum(br * xr, axis=0))
        for k in range(obj.K):
            var += np.where(codes[k] < 0, s2 * theta[k] ** 2, 0.0)
    else:
        var = np.einsum("ij,jk,ik->i", X, ev.beta_cov, X)
    return _finish(result, X, fit, var, interval, level, weights, newdata)


def _finish(result, X, fit, var, interval, level, weights, newdata):
    """Map to the user's scale and add the interval columns (``var`` on the solver's)."""
    cond = result.model.conditioning
    fit = cond.response(X, fit)
    if interval is None:
        return fit
    if interval == "prediction":
        w = np.ones(X.shape[0]) if weights is None else np.asarray(weights, dtype=np.float64)
        var = var + result.evaluation.sigma2 / w
    se = cond.scale * np.sqrt(np.maximum(var, 0.0))
    z = stats.norm.ppf(0.5 + level / 2.0)
    index = newdata.index if newdata is not None else None
    return pd.DataFrame({"fit": fit, "se": se, "lower": fit - z * se, "upper": fit + z * se},
                        index=index)


def _term_rows(result, newdata):
    """Per term, the new rows' level codes (-1 for an unseen level) and column values."""
    model = result.model
    if newdata is None:
        return [t.codes for t in model.terms], [t.values for t in model.terms]
    factor_codes = _codes_for(result, newdata)
    codes, values = [], []
    for t in model.terms:
        codes.append(factor_codes[model.design.index(t.group)])
        if t.values is None:
            values.append(None)
            continue
        if t.spec is None:
            raise LmmopsError("predicting for newdata needs a model built from a formula "
                              f"(term '{t.group}' was built by hand)")
        try:
            mm = t.spec.get_model_matrix(newdata, na_action="raise")
        except Exception as exc:  # formulaic raises several types
            raise LmmopsError(f"cannot build the random-effects columns {list(t.columns)} "
                              f"of term '{t.group}' for newdata: {exc}") from None
        values.append(np.asarray(mm, dtype=np.float64))
    return codes, values


def _terms_prediction(result, obj, ev, X, newdata, random, with_variance):
    """Prediction and its variance (solver's scale) for a model with vector-valued terms:
    ``x'beta + sum_k v_k' b_k[level]``, an unseen level contributing 0 to the prediction
    and its term's variance ``s^2 v' T_k T_k' v`` to the variance."""
    fit = X @ ev.beta
    if not random:
        return fit, (np.einsum("ij,jk,ik->i", X, ev.beta_cov, X) if with_variance else None)
    codes, values = _term_rows(result, newdata)
    extra = np.zeros(X.shape[0])
    for k, (t, c, v) in enumerate(zip(obj.terms, codes, values)):
        T = t.relative_factor(ev.theta[obj.layout[k]])
        b = np.asarray(ev.v[k]).reshape(t.n_levels, t.dim) @ T.T
        v = np.ones((len(c), 1)) if v is None else v
        known = c >= 0
        fit[known] += np.einsum("na,na->n", v[known], b[c[known]])
        vt = v @ T
        extra += np.where(known, 0.0, ev.sigma2 * np.einsum("na,na->n", vt, vt))
    if not with_variance:
        return fit, None
    return fit, ev.sigma2 * obj.quadratic_rows(ev, codes, values, X) + extra
