"""The REML and ML criteria from their pieces, assembled in one place.

Every objective (the exact :mod:`lmmops.estimation.direct` and the matrix-free
:mod:`lmmops.estimation.iterative`) and the analysis code that evaluates the criterion
at a given residual standard deviation (:func:`lmmops.analysis.inference.full_criterion`)
compute the same three numbers, ``log|L_Z|^2`` (or ``log|M|``), ``log|R_X|^2`` and the
penalised residual sum of squares, and combine them here, on lme4's scale (-2 times the
log-likelihood; :ref:`theory-criteria`).
"""

from __future__ import annotations

import numpy as np

__all__ = ["criterion_at_sigma", "profiled_criterion", "residual_dof"]

LOG2PI = np.log(2.0 * np.pi)


def residual_dof(n, p, method):
    """``n - p`` for REML, ``n`` for ML.

    Parameters
    ----------
    n, p : int
    method : {"REML", "ML"}

    Returns
    -------
    int
    """
    return n - p if method == "REML" else n


def profiled_criterion(logdet_L, logdet_RX, pwrss, n, p, method, ldW=0.0):
    """The criterion with ``beta`` and ``sigma^2`` profiled out.

    ``d_ML = log|L_Z|^2 + n (1 + log(2 pi r^2 / n))`` and
    ``d_REML = log|L_Z|^2 + log|R_X|^2 + (n - p)(1 + log(2 pi r^2 / (n - p)))``, minus
    ``sum(log w)`` for prior weights (lme4's ``ldW``).

    Parameters
    ----------
    logdet_L : float
        ``log|L_Z|^2``, the log-determinant of the random-effects block.
    logdet_RX : float
        ``log|R_X|^2`` (used by REML only).
    pwrss : float
        The penalised residual sum of squares ``r^2``.
    n, p : int
    method : {"REML", "ML"}
    ldW : float, optional
        ``sum(log w)`` of the prior weights.

    Returns
    -------
    value : float
    dof : int
        ``n - p`` (REML) or ``n`` (ML): ``sigma^2_hat = pwrss / dof``.

    Examples
    --------
    >>> value, dof = profiled_criterion(0.0, 0.0, 10.0, 10, 1, "ML")
    >>> dof, bool(round(value, 6) == round(10 * (1 + np.log(2 * np.pi)), 6))
    (10, True)
    """
    dof = residual_dof(n, p, method)
    if method == "REML":
        obj = logdet_L + logdet_RX + dof * (1.0 + LOG2PI + np.log(pwrss / dof))
    else:
        obj = logdet_L + dof * (1.0 + LOG2PI + np.log(pwrss / dof))
    return obj - ldW, dof


def criterion_at_sigma(logdet_L, logdet_RX, pwrss, n, p, method, s2, ldW=0.0):
    """The criterion at a given residual variance ``s2`` (``beta`` profiled out only).

    ``log|L_Z|^2 - sum(log w) + dof log(2 pi s2) + r^2 / s2`` (``+ log|R_X|^2`` for
    REML); its minimum over ``s2`` is :func:`profiled_criterion`.

    Parameters
    ----------
    logdet_L, logdet_RX, pwrss : float
    n, p : int
    method : {"REML", "ML"}
    s2 : float
    ldW : float, optional

    Returns
    -------
    float
    """
    dof = residual_dof(n, p, method)
    f = logdet_L - ldW + dof * (LOG2PI + np.log(s2)) + pwrss / s2
    if method == "REML":
        f += logdet_RX
    return f
