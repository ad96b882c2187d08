"""Fitting a stochastic criterion: REML and ML on the matrix-free solver, judged against
their Monte Carlo error.

:class:`lmmops.estimation.iterative.IterativeObjective` estimates the profiled criterion and its
gradient with a fixed probe set ``W`` (common random numbers), so its gradient ``g_W(theta)`` is a
smooth, deterministic function. :func:`fit_iterative` solves the optimality conditions of
``g_W`` to a precision far below its Monte Carlo error; the estimate then differs from the
exact optimum by Monte Carlo error alone, to first order

.. math::

    \\hat\\tau_W - \\tau^* \\approx -H^{-1} (g_W(\\tau^*) - g(\\tau^*)), \\qquad
    \\operatorname{Cov}(\\hat\\tau_W) \\approx H^{-1} \\operatorname{Cov}(g_W) H^{-1}

(the delta method; ``H`` is the Hessian of the criterion and ``Cov(g_W)`` the probe
covariance of the gradient). This is what the reported Monte Carlo standard errors are.

The parameters are the variance ratios ``tau_k = theta_k^2 = s_k^2 / s^2``. The criterion
is smooth in ``tau`` and its derivative at ``tau_k = 0`` is finite (in ``theta`` it is 0
there, by symmetry), so a boundary fit is an ordinary bound-constrained optimum that
projected Newton reaches exactly: ``tau_k = 0`` where the derivative is positive, as the
exact solver's (and lme4's) "boundary (singular) fit". The derivative at the boundary is
taken at ``theta_k = boundary_eps`` (the criterion is flat to ``O(eps^2)`` there), which
keeps it clear of the PCG tolerance.

Convergence is judged against the Monte Carlo error:

1. Newton steps (average-information Hessian, line search on the estimated criterion,
   or on the gradient once the change of the criterion is within its noise) until every
   component of the step is below ``step_tol`` (5 %) of its Monte Carlo standard deviation
   (half of it before the fresh probes join, which move the optimum by that much anyway);
2. then as many fresh probes again are drawn and the gradient is evaluated at the optimum
   with them: if ``W`` had found the optimum and ``Cov(g_W)`` is right, that gradient is
   zero within ``Cov(g_W) + Cov(g_fresh)``, a chi-squared (Hotelling) test. Either way the
   fresh probes join the set (twice the probes, a factor ``sqrt 2`` less error) and Newton
   re-converges. A rejected check is repeated with the doubled set, at most
   ``max_rounds`` times; a fit that never passes says ``converged=False``.

A block PCG solve that misses its tolerance at the final point also makes the fit
``converged=False``, with a note.
"""

from __future__ import annotations

import math
import time
import warnings

import numpy as np
from scipy import stats

from lmmops.errors import ConvergenceWarning, LmmopsError
from lmmops.estimation.direct import NumericalFailure, OptSummary

__all__ = ["fit_iterative", "tau_hessian"]


def tau_hessian(objective, ev, gtau):
    """Hessian of the profiled criterion in ``tau = theta^2``, from the average information.

    With ``phi = (s^2 tau_1, ..., s^2 tau_K, s^2)`` the variance parameters, the
    unprofiled criterion ``-2 log L`` has Hessian ``2 A`` (``A`` the average information,
    exact from solves); mapped to ``(tau, s^2)`` it gains the first-derivative term
    ``g_k / s^2`` in the ``(tau_k, s^2)`` entries, and ``s^2`` is profiled out by a Schur
    complement.

    Parameters
    ----------
    objective : IterativeObjective or DirectObjective
        Anything with ``average_information(ev)``.
    ev : Evaluation
        At ``theta`` (``tau = theta**2``).
    gtau : ndarray, shape (K,)
        Gradient of the profiled criterion in ``tau``.

    Returns
    -------
    ndarray, shape (K, K)

    Examples
    --------
    At the optimum it is close to the exact Hessian; away from it, or on weakly
    identified components, it can be tens of per cent off (which is why
    :func:`fit_iterative` differences the gradient for its Monte Carlo errors).

    >>> from lmmops.data.design import CrossedDesign
    >>> from lmmops.estimation.direct import DirectObjective, fit_direct
    >>> rng = np.random.default_rng(0)
    >>> a, b = rng.integers(0, 40, 2000), rng.integers(0, 30, 2000)
    >>> y = rng.normal(size=40)[a] + rng.normal(size=30)[b] + rng.normal(size=2000)
    >>> obj = DirectObjective(CrossedDesign.from_codes([a, b]), np.ones((2000, 1)), y)
    >>> ev, _ = fit_direct(obj, [1.0, 1.0])
    >>> g = ev.gradient / (2.0 * ev.theta)
    >>> H = tau_hessian(obj, ev, g)
    >>> tau, h = ev.theta**2, 1e-6  # against finite differences of the gradient in tau
    >>> ev2 = obj.evaluate(np.sqrt(tau + [h, 0.0]))
    >>> fd = (ev2.gradient / (2.0 * ev2.theta) - g) / h
    >>> bool(np.allclose(H[:, 0], fd, rtol=0.02))
    True
    """
    K = len(ev.theta)
    s2 = ev.sigma2
    tau = np.asarray(ev.theta, dtype=np.float64) ** 2
    AI = objective.average_information(ev)
    J = np.zeros((K + 1, K + 1))
    J[np.arange(K), np.arange(K)] = s2
    J[:K, K] = tau
    J[K, K] = 1.0
    H = J.T @ (2.0 * AI) @ J
    H[:K, K] += gtau / s2
    H[K, :K] += gtau / s2
    Hs = H[:K, :K] - np.outer(H[:K, K], H[K, :K]) / H[K, K]
    return 0.5 * (Hs + Hs.T)


class _Point:
    """One evaluation at ``tau``, in ``tau`` terms, with its Monte Carlo quantities.

    Components on the boundary take their derivative from
    :meth:`~lmmops.estimation.iterative.IterativeObjective.boundary_gradient` (own probes, so their
    Monte Carlo covariance with the others is 0).
    """

    def __init__(self, tau, ev, objective):
        self.tau = tau
        self.ev = ev
        self.f = float(ev.objective)
        self.fs = np.asarray(ev.objective_samples, dtype=np.float64)
        on = ev.theta > 0
        scale = np.where(on, 0.5 / np.where(on, ev.theta, 1.0), 0.0)  # d/dtau = d/dtheta / 2 theta
        self.g = ev.gradient * scale
        self.S = ev.gradient_samples * scale[:, None]
        m = self.S.shape[1]
        self.pcg_failed = int(not ev.pcg_converged)
        bound = np.flatnonzero(~on)
        if bound.size:
            value, samples, ok = objective.boundary_gradient(ev, bound)
            self.g[bound] = value
            self.S[bound] = samples
            self.pcg_failed += int(not ok)
        self.gdet = self.g - self.S.mean(axis=1)  # the part the probes do not touch
        self.cov = np.atleast_2d(np.cov(self.S)) / m
        self.cov[np.ix_(on, ~on)] = 0.0  # independent probe sets
        self.cov[np.ix_(~on, on)] = 0.0
        self._H = None
        self.hessian_failed = 0

    def free(self, held=None):
        """Components off the bound or pushed away from it by the gradient."""
        free = (self.tau > 0) | (self.g < 0)
        return free if held is None else free & ((self.tau > 0) | ~held)

    def hessian(self, objective):
        if self._H is None:
            before = objective.failed_solves
            self._H = tau_hessian(objective, self.ev, self.g)
            self.hessian_failed = objective.failed_solves - before
        return self._H

    def failed(self, objective):
        """PCG solves at this point (evaluation and Hessian) that missed the tolerance."""
        self.hessian(objective)
        return self.pcg_failed + self.hessian_failed

    def diff_sd(self, other):
        """Monte Carlo standard deviation of ``other.f - self.f`` (the same probes)."""
        if other.fs.shape != self.fs.shape or self.fs.size < 2:
            return 0.0
        return float(np.std(other.fs - self.fs, ddof=1) / math.sqrt(self.fs.size))


def _inverse(H):
    """Inverse of a symmetric matrix with |eigenvalues| floored (saddle-free Newton)."""
    w, U = np.linalg.eigh(H)
    indefinite = bool(np.any(w <= 0))
    w = np.maximum(np.abs(w), 1e-10 * max(1e-300, float(np.max(np.abs(w)))))
    return (U / w) @ U.T, indefinite


def _censored_sd(mu, sd):
    """Standard deviation of ``max(0, N(mu, sd^2))``: a boundary estimate's spread."""
    if sd <= 0:
        return 0.0
    z = mu / sd
    cdf, pdf = stats.norm.cdf(z), stats.norm.pdf(z)
    mean = mu * cdf + sd * pdf
    second = (mu * mu + sd * sd) * cdf + mu * sd * pdf
    return float(math.sqrt(max(second - mean * mean, 0.0)))


def _fresh_check(pt, m_old, free, level):
    """Is the gradient of the fresh probes zero within the Monte Carlo error?

    At the optimum of the old probes (``g_old(tau_hat) = 0``, to the optimiser's
    tolerance) the fresh probes' gradient is ``g_new - g_old = e_new - e_old``, whose
    covariance is ``Cov(g_old) + Cov(g_new)`` if the probe covariance is right; the
    two-sample Hotelling statistic is compared with its F distribution.
    """
    S_old, S_new = pt.S[:, :m_old], pt.S[:, m_old:]
    m_new = S_new.shape[1]
    idx = np.flatnonzero(free)
    d = (S_new.mean(axis=1) - S_old.mean(axis=1))[idx]
    C = (np.atleast_2d(np.cov(S_old))[np.ix_(idx, idx)] / m_old
         + np.atleast_2d(np.cov(S_new))[np.ix_(idx, idx)] / m_new)
    out = {"probes_old": int(m_old), "probes_new": int(m_new), "chi2": 0.0, "df": 0,
           "p_value": 1.0, "passed": True}
    if idx.size == 0:
        return out
    w, U = np.linalg.eigh(0.5 * (C + C.T))
    top = max(float(np.max(w)), 0.0)
    keep = w > 1e-12 * top
    # directions without Monte Carlo variance (deflated completely) must agree exactly,
    # to rounding: otherwise the probes' spread understates the error
    if np.any(np.abs(U[:, ~keep].T @ d) > 1e-6 * math.sqrt(top) + 1e-12 * (
            1.0 + float(np.max(np.abs(pt.gdet[idx]))))):
        out.update(chi2=math.inf, df=int(idx.size), p_value=0.0, passed=False)
        return out
    r = int(np.count_nonzero(keep))
    if r == 0:  # the gradient is exact (every free component is deflated completely)
        return out
    z = U[:, keep].T @ d
    T2 = float(np.sum(z * z / w[keep]))
    nu = m_old + m_new - 2
    out.update(chi2=T2, df=r)
    if nu - r + 1 < 1:
        out.update(p_value=math.nan, passed=False)
        return out
    p = float(stats.f.sf(T2 * (nu - r + 1) / (nu * r), r, nu - r + 1))
    out.update(p_value=p, passed=p >= level)
    return out


def _check_start(start, K):
    try:
        start = np.asarray(start, dtype=np.float64).ravel().copy()
    except (TypeError, ValueError):
        raise LmmopsError("start must be numeric") from None
    if start.shape != (K,) or not np.all(np.isfinite(start)) or np.any(start < 0):
        raise LmmopsError(f"start must be {K} finite values >= 0 (relative standard "
                          f"deviations, one per factor), got {start}")
    return start


def fit_iterative(objective, start, *, maxiter=100, tol=1e-13, step_tol=0.05,
                  check_level=1e-3, max_rounds=3, boundary_tol=1e-4, max_halvings=8,
                  max_releases=2, fd_step=1e-5, callback=None):
    """Minimise an :class:`~lmmops.estimation.iterative.IterativeObjective` over ``theta >= 0``,
    honestly.

    Projected Newton in ``tau = theta^2`` on the fixed-probe criterion, converged to
    ``step_tol`` of the Monte Carlo error, then checked against fresh probes (which then
    join the set); see the module description. The exact solver's counterpart is
    :func:`lmmops.estimation.direct.fit_direct`.

    Parameters
    ----------
    objective : IterativeObjective
        Its probe set grows during the fit
        (:meth:`~lmmops.estimation.iterative.IterativeObjective.add_probes`).
    start : array_like, shape (n_factors,)
        Initial ``theta``.
    maxiter : int
        Newton iterations in all (every round of the check included).
    tol : float
        Also converged when the Newton decrement is below ``tol * max(1, |criterion|)``
        after one more step (a criterion without noise, e.g. when every factor is
        deflated completely); the step still to go is part of the reported error.
    step_tol : float
        Converged when every component of the Newton step is below ``step_tol`` times its
        Monte Carlo standard deviation (the optimisation then adds at most
        ``step_tol**2`` to the Monte Carlo variance, and the step still to go is added to
        the reported error).
    check_level : float
        The fresh-probe check fails below this p-value.
    max_rounds : int
        Fresh-probe rounds at most (each doubles the probe count).
    boundary_tol : float
        A step that takes ``theta_k`` below this puts it on the boundary, exactly 0
        (lme4's tolerance for a singular fit).
    max_halvings : int
        Step halvings per line search.
    max_releases : int
        How often a component may leave the boundary; after that it is held there (the
        boundary and the interior estimates of its derivative disagree within their
        Monte Carlo error, so the two would alternate).
    fd_step : float
        Relative step of the forward differences of the gradient at the estimate (the
        Jacobian of the delta method; one evaluation per free component).
    callback : callable, optional
        ``callback(iteration, theta, objective)`` after every accepted step.

    Returns
    -------
    evaluation : Evaluation
        At the estimate (``theta_k`` exactly 0 on the boundary), with ``tau_cov``: the
        Monte Carlo covariance of ``tau_hat`` (delta method on the free components, plus
        the square of the Newton step still to go; for a boundary component the variance
        of ``max(0, tau_u)`` with ``tau_u`` the unconstrained Newton estimate).
    summary : OptSummary
        With ``notes`` (list of str), ``checks`` (the fresh-probe tests),
        ``n_probes_initial``, ``n_probes`` (in the estimate), ``loglik_shortfall``
        (expected shortfall of the log-likelihood from the Monte Carlo error of the
        estimate, ``tr(Cov(g) H^{-1}) / 4``), ``pcg_failed`` (PCG solves that missed
        ``rtol`` at the final point) and ``pcg_failed_before`` (at earlier points).

    Raises
    ------
    LmmopsError
        For a bad ``start``, or when the criterion cannot be evaluated at ``start``.

    Examples
    --------
    >>> from lmmops.data.design import CrossedDesign
    >>> from lmmops.estimation.direct import DirectObjective, fit_direct
    >>> from lmmops.estimation.iterative import IterativeObjective
    >>> rng = np.random.default_rng(0)
    >>> a, b = rng.integers(0, 300, 6000), rng.integers(0, 200, 6000)
    >>> y = rng.normal(size=300)[a] + 0.7 * rng.normal(size=200)[b] + rng.normal(size=6000)
    >>> d, X = CrossedDesign.from_codes([a, b]), np.ones((6000, 1))
    >>> ev, opt = fit_iterative(IterativeObjective(d, X, y, n_probes=16), [1.0, 1.0])
    >>> opt.converged
    True
    >>> exact, _ = fit_direct(DirectObjective(d, X, y), [1.0, 1.0])
    >>> z = (ev.theta**2 - exact.theta**2) / np.sqrt(np.diag(ev.tau_cov))
    >>> bool(np.all(np.abs(z) < 4))
    True
    """
    t0 = time.perf_counter()
    K = objective.K
    start = _check_start(start, K)
    bt = float(boundary_tol)
    if not (math.isfinite(bt) and bt >= 0):
        raise LmmopsError(f"boundary_tol must be a finite number >= 0, got {boundary_tol!r}")
    bt2 = bt * bt
    n_eval0 = objective.n_evaluations
    failed0 = objective.failed_solves
    m_initial = objective.n_probes
    fitlog = []
    notes = []
    releases = np.zeros(K, dtype=int)

    def point(tau):
        tau = np.where(tau < bt2, 0.0, tau)
        try:
            ev = objective.evaluate(np.sqrt(tau))
        except NumericalFailure:
            fitlog.append((np.sqrt(tau), np.inf))
            return None
        fitlog.append((np.sqrt(tau), float(ev.objective)))
        return _Point(tau, ev, objective)

    pt = point(start**2)
    if pt is None:
        raise LmmopsError(f"the criterion cannot be evaluated at the start {start}")
    f0 = pt.f

    def project(g, tau):
        return np.where((tau <= 0) & (g > 0), 0.0, g)

    def newton(pt, it, rel):
        """Projected Newton on the current probes, to ``rel`` of the Monte Carlo error.

        Returns (point, converged, why, it).
        """
        polished = False
        while it < maxiter:
            held = releases >= max_releases
            idx = np.flatnonzero(pt.free(held))
            if idx.size == 0:
                return pt, True, "every variance ratio is on the boundary", it
            Hinv, _ = _inverse(pt.hessian(objective)[np.ix_(idx, idx)])
            g = pt.g[idx]
            step = -Hinv @ g
            sd = np.sqrt(np.maximum(np.diag(Hinv @ pt.cov[np.ix_(idx, idx)] @ Hinv), 0.0))
            decrement = float(-g @ step)
            small = np.abs(step) <= np.maximum(rel * sd, 1e-9 * (pt.tau[idx] + bt2))
            if np.all(small):
                return pt, True, f"Newton step below {rel:g} of its Monte Carlo error", it
            # a decrement at the criterion's precision still gets one more step (the
            # stochastic error may be smaller still); after that it is converged
            tiny = decrement <= tol * max(1.0, abs(pt.f))
            if tiny and polished:
                return pt, True, "Newton decrement below tolerance", it
            polished = tiny
            radius = max(1.0, float(np.linalg.norm(pt.tau[idx])))
            snorm = float(np.linalg.norm(step))
            if snorm > radius:
                step *= radius / snorm
            # how much the estimated criterion may rise along a step that reduces the
            # gradient: 3 Monte Carlo standard deviations of the change (the same probes
            # at both points), plus its numerical floor (the Lanczos quadrature of a PCG
            # run that stops at rtol)
            floor = 10.0 * objective.rtol * max(1.0, abs(pt.f))
            g0 = project(pt.g, pt.tau)[idx]
            merit0 = float(g0 @ Hinv @ g0)
            alpha, accepted = 1.0, None
            for _ in range(max_halvings + 1):
                trial = pt.tau.copy()
                trial[idx] = np.maximum(pt.tau[idx] + alpha * step, 0.0)
                trial[trial < bt2] = 0.0
                if np.array_equal(trial, pt.tau):
                    # the step only pushes components below boundary_tol: they stay at 0
                    return pt, True, "optimum within boundary_tol of the boundary", it
                tp = point(trial)
                if tp is not None:
                    gt = project(tp.g, tp.tau)[idx]
                    armijo = tp.f <= pt.f - 1e-4 * alpha * decrement
                    within = (tp.f <= pt.f + 3.0 * pt.diff_sd(tp) + floor
                              and float(gt @ Hinv @ gt) < merit0)
                    if armijo or within:
                        accepted = tp
                        break
                alpha *= 0.5
            if accepted is None:
                if tiny:
                    return pt, True, "Newton decrement below tolerance", it
                return pt, False, ("the line search could decrease neither the criterion "
                                   "nor its gradient"), it
            it += 1
            releases[(pt.tau <= 0) & (accepted.tau > 0)] += 1
            pt = accepted
            if callback is not None:
                callback(it, np.sqrt(pt.tau), pt.f)
        return pt, False, f"maximum number of iterations ({maxiter}) reached", it

    exact = not np.any(pt.S)  # no probe touches the gradient: nothing to check
    rounds = 0 if exact else max_rounds
    pt, converged, message, it = newton(pt, 0, max(step_tol, 0.5) if rounds else step_tol)
    checks = []
    for _ in range(rounds):
        if not converged:
            break
        m_old = objective.n_probes
        objective.add_probes(m_old)
        merged = point(pt.tau)
        if merged is None:
            converged, message = False, "the criterion failed at the optimum"
            break
        check = _fresh_check(merged, m_old, pt.tau > 0, check_level)
        checks.append(check)
        pt, converged, message, it = newton(merged, it, step_tol)
        if check["passed"]:
            message += "; confirmed by fresh probes"
            break
    else:
        if converged and rounds:
            converged = False
            message = (f"fresh probes rejected the optimum in all {max_rounds} rounds "
                       f"(last p = {checks[-1]['p_value']:.2g})")
    if np.any(releases >= max_releases) and np.any(pt.tau <= 0):
        notes.append("a variance left the boundary and returned to it "
                     f"{max_releases} times and is held there: its derivative at 0 is "
                     "within Monte Carlo error of 0")

    # Monte Carlo covariance of tau_hat at the final point: the delta method with the
    # Jacobian of the fixed-probe gradient (forward differences; common random numbers make
    # g_W smooth), since the average information only approximates it (it is about the
    # mean of the observed and the expected information, tens of per cent off on weakly
    # identified components)
    free = pt.tau > 0
    idx = np.flatnonzero(free)
    H = pt.hessian(objective).copy()
    pcg_final = pt.failed(objective)
    for k in idx:
        trial = pt.tau.copy()
        trial[k] *= 1.0 + fd_step
        tp = point(trial)
        if tp is None:
            H = pt.hessian(objective)
            notes.append("the Jacobian of the gradient could not be differenced at the "
                         "estimate: the Monte Carlo errors use the average information")
            break
        pcg_final += tp.pcg_failed
        H[idx, k] = (tp.g[idx] - pt.g[idx]) / (trial[k] - pt.tau[k])
    else:
        H[np.ix_(idx, idx)] = 0.5 * (H[np.ix_(idx, idx)] + H[np.ix_(idx, idx)].T)
    tau_cov = np.zeros((K, K))
    shortfall = 0.0
    if idx.size:
        Hinv, indefinite = _inverse(H[np.ix_(idx, idx)])
        Cf = pt.cov[np.ix_(idx, idx)]
        rest = Hinv @ pt.g[idx]  # the Newton step still to go: an error of the optimiser
        tau_cov[np.ix_(idx, idx)] = Hinv @ Cf @ Hinv + np.outer(rest, rest)
        shortfall = 0.25 * float(np.trace(Cf @ Hinv))
        if indefinite:
            notes.append("the Hessian at the estimate is not positive definite: the Monte "
                         "Carlo errors use its absolute eigenvalues")
    bound = np.flatnonzero(~free)
    if bound.size:
        # a boundary estimate is max(0, tau_u) for the unconstrained Newton estimate tau_u
        Hinv_all, _ = _inverse(H)
        step_u = -Hinv_all @ pt.g
        sd_u = np.sqrt(np.maximum(np.diag(Hinv_all @ pt.cov @ Hinv_all), 0.0))
        for k in bound:
            tau_cov[k, k] = _censored_sd(float(step_u[k]), float(sd_u[k])) ** 2
    ev = pt.ev
    ev.tau_cov = tau_cov
    pcg_before = objective.failed_solves - failed0 - pcg_final
    if pcg_final:
        converged = False
        message = (f"PCG did not reach rtol={objective.rtol:g} within {objective.maxiter} "
                   f"iterations at the estimate ({pcg_final} solve(s); worst relative "
                   f"residual {objective.worst_residual:.2g})")
    if pcg_before > 0:
        notes.append(f"PCG missed rtol={objective.rtol:g} in {pcg_before} solve(s) before "
                     "the estimate; the solves at the estimate converged")
    if checks:
        c = checks[-1]
        verdict = "within" if c["passed"] else "outside"
        notes.append(
            f"fresh-probe check: with {c['probes_new']} new probes the gradient at the "
            f"optimum is {verdict} its Monte Carlo error (chi2 {c['chi2']:.3g} on "
            f"{c['df']} df, p = {c['p_value']:.2g}); the estimate uses all "
            f"{objective.n_probes} probes")
    if m_initial < 8:
        notes.append(f"only {m_initial} probes requested: Monte Carlo standard errors from "
                     "so few probes are themselves uncertain (use 8 or more)")
    theta = np.sqrt(pt.tau)
    pg = np.where((theta <= 0) & (ev.gradient > 0), 0.0, ev.gradient)
    gnorm = float(np.max(np.abs(pg))) if pg.size else 0.0
    if not converged:
        warnings.warn(f"the iterative REML/ML optimisation did not converge: {message}",
                      ConvergenceWarning, stacklevel=2)
    opt = OptSummary(
        theta_initial=start, theta_final=theta.copy(), f_initial=float(f0),
        f_final=float(ev.objective), n_evaluations=objective.n_evaluations - n_eval0,
        iterations=it, gradient_norm=gnorm, converged=bool(converged), message=message,
        optimizer="projected Newton in theta^2 (average information), Monte Carlo checked",
        elapsed_s=time.perf_counter() - t0, fitlog=fitlog,
    )
    opt.notes = notes
    opt.checks = checks
    opt.n_probes_initial = int(m_initial)
    opt.n_probes = int(objective.n_probes)
    opt.loglik_shortfall = shortfall
    opt.pcg_failed = int(pcg_final)
    opt.pcg_failed_before = int(pcg_before)
    return ev, opt
