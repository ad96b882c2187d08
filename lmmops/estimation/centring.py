"""Fitting a random-slope model on its off-centre slope columns centred, for both slope
solvers.

A slope column far from 0 relative to its spread (a year, ``Days + 1e5``) makes the
criterion in the user's ``theta`` ill-conditioned: the term's intercept (the value at 0)
is nearly aliased with the slope. Shifting the column by its mean is the same model
(:func:`lmmops.data.terms.centring_shifts`, ``Z = Z^c N``, ``N = I + e_0 m'``), so a fit
runs on a *twin* objective of the columns centred (the objective's ``with_terms``, built
once per objective and kept as ``_centred_twin``) and maps its optimum back
(:func:`lmmops.data.terms.recentre_theta`). :func:`fit_centred` is that wrapper, whatever
the solver; :func:`centring_jacobian` carries the Monte Carlo covariance of ``theta``
over to the user's and :class:`CentredFit` the Wald covariances
(``docs/theory_slopes.rst``, "Conditioning").

Examples
--------
>>> import numpy as np, pandas as pd
>>> from lmmops.data.terms import RandomEffectsTerm, centring_shifts
>>> x = np.tile(np.arange(4.0), 5) + 1e5
>>> t = RandomEffectsTerm("g", np.repeat(np.arange(5), 4).astype(np.int32),
...                       pd.Index(range(5)), ("(Intercept)", "x"),
...                       np.column_stack([np.ones(20), x]))
>>> shifts = centring_shifts([t])
>>> J = centring_jacobian([t], np.array([1.0, 0.2, 0.5]), shifts)
>>> J.shape, bool(abs(J[0, 2]) > 1e4)   # the intercept at 0 moves with the slope
((3, 3), True)
"""

from __future__ import annotations

import copy

import numpy as np

from lmmops.data.terms import (
    INTERCEPT,
    centred_terms,
    centring_offsets,
    covariance_entries,
    recentre_theta,
    theta_lower_bounds,
)
from lmmops.errors import NumericalFailure, RankDeficientError

__all__ = ["CENTRED_AGREEMENT", "CENTRED_ROUNDING", "CENTRED_ROUNDING_MAX", "CentredFit",
           "centred_twin", "centring_jacobian", "centring_tolerance", "fit_centred"]

#: The criterion at the mapped optimum, on the user's columns, must equal the centred
#: fit's within this relative tolerance plus its rounding bound
#: (:data:`CENTRED_ROUNDING`; on the matrix-free solver plus its Monte Carlo allowance)
#: for the fit to count as converged.
CENTRED_AGREEMENT = 1e-7

#: The rounding bound of the criterion on the user's columns, relative, is this
#: multiple of ``eps kappa``, ``kappa = (|m| / s)^2`` of the columns shifted
#: (:func:`lmmops.data.terms.centring_offsets`). Measured at 20 points near the optimum
#: each of sleepstudy ``Days + c`` and two crossed designs at ``x + c``, ``c`` 1e3 to
#: 1e7 (``kappa`` 1e5 to 1e14): the gap to the centred twin's criterion was at most
#: 0.28 ``eps kappa`` of it, and it grows as ``kappa`` throughout.
CENTRED_ROUNDING = 1.0

#: Beyond this relative rounding bound (``eps kappa`` above 1e-4: about 6.7e5 spreads
#: from 0) the criterion on the columns as given is too inexact to confirm the mapped
#: optimum, and the fit says ``converged=False`` with a note to centre the column.
CENTRED_ROUNDING_MAX = 1e-4


def centred_twin(objective, shifts):
    """The objective's twin on its slope columns centred by ``shifts``
    (``objective.with_terms``: the same rows, method, weights and settings), built once
    per objective (one statistics pass) and kept as ``objective._centred_twin``."""
    twin = getattr(objective, "_centred_twin", None)
    if twin is None:
        twin = objective._centred_twin = objective.with_terms(
            centred_terms(objective.terms, shifts))
    return twin


def centring_jacobian(terms, theta_c, shifts, h=1e-6):
    """``J = d theta / d theta^c``: the derivative of lme4's ``theta`` of the user's
    columns in that of the centred ones (:func:`lmmops.data.terms.recentre_theta`), by
    central differences of the closed-form map (steps ``h max(1, |theta^c_j|)``).

    Parameters
    ----------
    terms : sequence of RandomEffectsTerm
        The user's terms.
    theta_c : ndarray, shape (n_theta,)
    shifts : list of ndarray
    h : float

    Returns
    -------
    ndarray, shape (n_theta, n_theta)
    """
    theta_c = np.asarray(theta_c, dtype=np.float64)
    n = theta_c.size
    J = np.empty((n, n))
    for j in range(n):
        e = np.zeros(n)
        e[j] = h * max(1.0, abs(theta_c[j]))
        J[:, j] = (recentre_theta(terms, theta_c + e, shifts, to="user")
                   - recentre_theta(terms, theta_c - e, shifts, to="user")) / (2 * e[j])
    return J


class CentredFit:
    """The centred twin's optimum behind a fit on the user's columns, kept on the user's
    evaluation as ``ev.centred`` by :func:`fit_centred`.

    The Wald covariances are computed on the twin, whose parametrisation is well
    conditioned, and mapped: ``theta = f(theta^c)`` by the delta method with
    :attr:`jacobian`, the covariance entries exactly by the linear map
    ``Sigma = G Sigma^c G'``, ``G = N^{-1} = I - e_0 m'``. In the user's ``theta`` the
    criterion's Hessian has a condition number of about ``(mean / spread)^4``: a
    pseudo-inverse there drops directions (sleepstudy ``Days + 1e4``: the Wald standard
    error of the slope variance came out 3.9 instead of 14.8).

    Parameters
    ----------
    terms : sequence of RandomEffectsTerm
        The user's terms.
    shifts : list of ndarray
    twin : VectorObjective or VectorIterativeObjective
    ev_c : Evaluation
        The twin's at its optimum.
    """

    def __init__(self, terms, shifts, twin, ev_c):
        self.terms, self.shifts, self.twin, self.ev_c = tuple(terms), shifts, twin, ev_c
        self._J = None

    @property
    def jacobian(self):
        """``d theta / d theta^c`` at the optimum (:func:`centring_jacobian`)."""
        if self._J is None:
            self._J = centring_jacobian(self.terms, self.ev_c.theta, self.shifts)
        return self._J

    def entries_map(self):
        """The matrix ``M`` with ``phi = M phi^c`` for the covariance entries
        ``phi`` of :func:`lmmops.data.terms.covariance_entries` per term, then ``s^2``
        (the layout of the slope solvers' ``variance_covariance``)."""
        blocks = []
        for t, m in zip(self.terms, self.shifts):
            d = t.dim
            G = np.eye(d)
            if np.any(m):
                G[t.columns.index(INTERCEPT)] -= m
            rows, cols = np.diag_indices(d)
            pairs = [*zip(rows, cols), *((i, j) for j in range(d) for i in range(j + 1, d))]
            B = np.empty((len(pairs), len(pairs)))
            for c, (i, j) in enumerate(pairs):
                E = np.zeros((d, d))
                E[i, j] = E[j, i] = 1.0
                B[:, c] = covariance_entries(G @ E @ G.T)
            blocks.append(B)
        blocks.append(np.ones((1, 1)))
        return _block_diag(blocks)

    def theta_covariance(self):
        """The Wald covariance of the user's ``theta``: NaN for the entries that a NaN
        of the twin's (a parameter on the boundary) moves, and for the user's parameters
        on the boundary (a singular ``T^c`` maps to a singular ``T``, whose zero may sit
        in another entry)."""
        cov = _map_covariance(self.jacobian, self.twin.theta_covariance(self.ev_c))
        theta = recentre_theta(self.terms, self.ev_c.theta, self.shifts, to="user")
        at = theta <= theta_lower_bounds(self.terms)
        cov[at, :] = np.nan
        cov[:, at] = np.nan
        return cov

    def variance_covariance(self):
        """The Wald covariance of the user's covariance entries and ``s^2``, laid out as
        the slope solvers' ``variance_covariance``."""
        return _map_covariance(self.entries_map(), self.twin.variance_covariance(self.ev_c))


def _block_diag(blocks):
    n = sum(b.shape[0] for b in blocks)
    out = np.zeros((n, n))
    o = 0
    for b in blocks:
        k = b.shape[0]
        out[o:o + k, o:o + k] = b
        o += k
    return out


def _map_covariance(M, C):
    """``M C M'`` where ``C`` may have NaN rows and columns (parameters without a Wald
    interval): those stay NaN in every entry of the result that depends on them."""
    C = np.asarray(C, dtype=np.float64)
    bad = ~np.isfinite(np.diag(C))
    out = M @ np.where(np.isfinite(C), C, 0.0) @ M.T
    hit = np.any(M[:, bad] != 0.0, axis=1)
    out[hit, :] = np.nan
    out[:, hit] = np.nan
    return out


def fit_centred(objective, shifts, start, fit, *, callback=None, allowance=None):
    """Fit ``objective`` on its twin of the slope columns centred by ``shifts``
    (:func:`lmmops.data.terms.centring_shifts`) and map the optimum back.

    The twin is the same model (the criterion, ``beta``, ``s^2`` and the fitted values
    are the same; ``theta`` maps by :func:`lmmops.data.terms.recentre_theta`). The
    evaluation returned is the objective's own at the mapped optimum (on the user's
    columns: every quantity computed from it afterwards is of the columns as given).
    The summary is in the user's ``theta`` (start, final, fit log, callback), counts the
    twin's evaluations and that one, and carries a note naming the centred columns. The
    fit is converged only where the twin's is and the two criteria agree within
    :func:`centring_tolerance` (the user-column criterion's rounding bound) plus
    ``allowance``; else ``converged=False`` with a message and a note (a real failure:
    the mapped optimum is not the twin's). Beyond :data:`CENTRED_ROUNDING_MAX` the
    check cannot be made and the fit is ``converged=False`` with a note to centre the
    columns.

    Parameters
    ----------
    objective : VectorObjective or VectorIterativeObjective
        With rows (``X`` not None) and ``with_terms``.
    shifts : list of ndarray
    start : ndarray or None
        lme4's ``theta`` of the user's columns.
    fit : callable
        ``fit(twin, start, callback) -> (Evaluation, OptSummary)`` in the twin's
        ``theta`` (``start`` None or mapped, ``callback`` mapped or None).
    callback : callable, optional
        ``callback(iteration, theta, criterion)`` in the user's ``theta``.
    allowance : callable, optional
        ``allowance(ev, ev_c) -> float``: a gap of the criteria accepted beyond the
        relative tolerance (the matrix-free solver's Monte Carlo error); default 0.

    Returns
    -------
    (Evaluation, Evaluation, OptSummary, object)
        The objective's evaluation at the mapped optimum, the twin's at its optimum,
        the summary, and the twin.

    Raises
    ------
    NumericalFailure
        When the objective cannot be evaluated at the mapped optimum (``X'V^{-1}X``
        not positive definite there: a wrong map, or columns too far from centred).
    """
    terms = objective.terms
    twin = centred_twin(objective, shifts)
    n_before = twin.n_evaluations
    start_c = None if start is None else recentre_theta(terms, start, shifts)
    cb = None
    if callback is not None:
        def cb(i, th, f):
            callback(i, recentre_theta(terms, th, shifts, to="user"), f)
    ev_c, opt = fit(twin, start_c, cb)
    theta = np.maximum(recentre_theta(terms, ev_c.theta, shifts, to="user"),
                       objective.lower)
    try:
        ev = objective.evaluate(theta)
    except (RankDeficientError, NumericalFailure) as exc:
        raise NumericalFailure(
            f"the centred fit's optimum (criterion {ev_c.objective:.10g}) mapped to the "
            f"columns as given cannot be evaluated on them ({exc}): the map to them or "
            "their conditioning failed") from exc
    objective.n_evaluations += twin.n_evaluations - n_before
    out = copy.copy(opt)
    out.theta_initial = recentre_theta(terms, opt.theta_initial, shifts, to="user")
    out.theta_final = theta.copy()
    out.fitlog = [(recentre_theta(terms, th, shifts, to="user"), f) for th, f in opt.fitlog]
    out.n_evaluations = opt.n_evaluations + 1
    names = [f"'{c}' of the term on '{t.group}' (by {m[i]:.6g})"
             for t, m in zip(terms, shifts) for i, c in enumerate(t.columns) if m[i]]
    out.notes = [*getattr(opt, "notes", []),
                 f"slope column(s) {', '.join(names)} centred inside the fit (the same "
                 "model; theta, the covariances and the BLUPs are of the columns as given)"]
    ev.centred = CentredFit(terms, shifts, twin, ev_c)
    # the criterion is the twin's (the same model, well conditioned); the evaluation on
    # the columns as given checks the map to within its rounding
    # (the allowance of the two evaluations' own Monte Carlo errors first)
    extra = 0.0 if allowance is None else float(allowance(ev, ev_c))
    ev.objective_user = ev.objective
    ev.objective = out.f_final = ev_c.objective
    if hasattr(ev_c, "objective_se"):
        ev.objective_user_se = getattr(ev, "objective_se", 0.0)
        ev.objective_se = ev_c.objective_se
    gap = abs(ev.objective_user - ev_c.objective)
    rounding, tol = centring_tolerance(terms, shifts, ev_c.objective)
    tol += extra
    if rounding > CENTRED_ROUNDING_MAX:
        problem = (f"the criterion on the columns as given loses up to {rounding:.2g} of "
                   "itself to rounding, too much to confirm the optimum mapped to them; "
                   "the columns are too far from centred to evaluate it: centre them")
    elif not gap <= tol:
        problem = (f"the criterion on the columns as given ({ev.objective_user:.10g}) "
                   f"differs from the centred fit's ({ev_c.objective:.10g}) by {gap:.3g}, "
                   f"beyond its rounding bound {tol:.3g}: the optimum mapped to the "
                   "columns as given is not the centred fit's")
    else:
        problem = None
    if problem is not None:
        out.converged = False
        out.message = problem
        out.notes.append(f"not converged: {problem}")
    return ev, ev_c, out, twin


def centring_tolerance(terms, shifts, criterion):
    """The gap accepted between the criterion on the user's columns and the centred
    twin's at the same optimum (:func:`fit_centred`), before a Monte Carlo allowance.

    With ``kappa = (|m| / s)^2`` the largest over the shifted columns
    (:func:`lmmops.data.terms.centring_offsets`), the criterion on the user's columns
    is exact to about ``eps kappa`` of itself: its relative rounding bound is
    ``rounding = CENTRED_ROUNDING eps kappa`` and the tolerance
    ``(CENTRED_AGREEMENT + rounding) max(1, |criterion|)``.

    Parameters
    ----------
    terms : sequence of RandomEffectsTerm
        The user's terms.
    shifts : list of ndarray
    criterion : float
        The twin's criterion.

    Returns
    -------
    (float, float)
        ``rounding`` (relative) and the tolerance (absolute).

    Examples
    --------
    >>> import numpy as np, pandas as pd
    >>> from lmmops.data.terms import RandomEffectsTerm, centring_shifts
    >>> x = np.tile(np.arange(4.0), 5) + 1e5
    >>> t = RandomEffectsTerm("g", np.repeat(np.arange(5), 4).astype(np.int32),
    ...                       pd.Index(range(5)), ("(Intercept)", "x"),
    ...                       np.column_stack([np.ones(20), x]))
    >>> rounding, tol = centring_tolerance([t], centring_shifts([t]), 500.0)
    >>> f"{rounding:.2g} {tol:.2g}"
    '1.8e-06 0.00094'
    """
    kappa = centring_offsets(terms, shifts) ** 2
    rounding = CENTRED_ROUNDING * np.finfo(np.float64).eps * kappa
    return rounding, (CENTRED_AGREEMENT + rounding) * max(1.0, abs(float(criterion)))
