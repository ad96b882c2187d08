"""The objective protocol: what a fitted objective answers, whichever solver it is.

The analysis layer and :class:`~lmmops.LMMResult` ask an objective for a few level-space
and observation-space quantities at its optimum. Each function here answers for both
objectives, the exact :class:`~lmmops.estimation.direct.DirectObjective` and the matrix-free
:class:`~lmmops.estimation.iterative.IterativeObjective`, as a
:class:`~lmmops.linalg.trace.TraceEstimate` whose standard error is 0 where the answer is
exact. Callers never branch on the solver; a new objective registers its own
implementation (:func:`functools.singledispatch`).

Examples
--------
>>> import numpy as np
>>> from lmmops.data.design import CrossedDesign
>>> from lmmops.estimation.direct import DirectObjective, fit_direct
>>> rng = np.random.default_rng(0)
>>> a, b = rng.integers(0, 6, 200), rng.integers(0, 4, 200)
>>> d = CrossedDesign.from_codes([a, b])
>>> y = rng.normal(size=6)[a] + rng.normal(size=4)[b] + rng.normal(size=200)
>>> obj = DirectObjective(d, np.ones((200, 1)), y)
>>> ev = obj.evaluate(np.array([0.8, 0.9]))
>>> est = diag_P(obj, ev)
>>> est.estimate.shape, float(np.max(est.stderr))
((200,), 0.0)
"""

from __future__ import annotations

import functools
import math

import numpy as np

from lmmops.data.terms import (
    centred_start,
    centring_shifts,
    column_units,
    theta_names,
    theta_scales,
)
from lmmops.errors import ArgumentTypeError
from lmmops.estimation.centring import centred_twin, fit_centred
from lmmops.estimation.direct import DirectObjective, fit_direct
from lmmops.estimation.iterative import IterativeObjective
from lmmops.estimation.mme import diag_P as _exact_diag_P
from lmmops.estimation.mme import level_space_diagonals
from lmmops.estimation.stochastic import fit_iterative
from lmmops.estimation.vector import ScaledTheta, VectorObjective, fit_vector
from lmmops.estimation.vector_iterative import (
    PEV_PROBES,
    VectorIterativeObjective,
    fit_vector_iterative,
)
from lmmops.linalg.trace import TraceEstimate

__all__ = ["AUTO_MAX_PROBES", "AUTO_RAISE_ABOVE", "MC_TO_SAMPLING_MAX", "diag_P", "fit_notes",
           "is_exact", "judge_monte_carlo_error", "level_diagonal_inverse",
           "monte_carlo_covariance", "monte_carlo_stderr", "optimise", "pev_blocks",
           "progress_note", "solver_info", "theta_covariance", "variance_covariance"]


@functools.singledispatch
def diag_P(obj, ev):
    """``diag(P)`` at ``ev``, one entry per observation (solver's scale).

    Exact on the direct solver; a stochastic diagonal estimate on the iterative one
    (:meth:`~lmmops.estimation.iterative.IterativeObjective.diag_P`).
    """
    raise ArgumentTypeError(f"no diag_P for {type(obj).__name__}")


@diag_P.register
def _(obj: DirectObjective, ev):
    d = _exact_diag_P(obj, ev)
    return TraceEstimate(d, np.zeros_like(d), 0)


@diag_P.register
def _(obj: IterativeObjective, ev):
    return obj.diag_P(ev)


@diag_P.register
def _(obj: VectorObjective, ev):
    d = obj.diag_P(ev)
    return TraceEstimate(d, np.zeros_like(d), 0)


@functools.singledispatch
def level_diagonal_inverse(obj, ev, z_only=False):
    """The random-effects diagonal of the inverse of the spherical mixed-model matrix.

    One entry per level, all factors concatenated in level-space order; with
    ``z_only=True`` conditional on ``beta`` (the fixed effects known), otherwise
    including the uncertainty of ``beta``. Times ``s^2 theta_k^2`` it is the prediction
    error variance of each BLUP.
    """
    raise ArgumentTypeError(f"no level_diagonal_inverse for {type(obj).__name__}")


@level_diagonal_inverse.register
def _(obj: DirectObjective, ev, z_only=False):
    d = np.concatenate(level_space_diagonals(obj, ev, z_only=z_only)["omega_diag"])
    return TraceEstimate(d, np.zeros_like(d), 0)


@level_diagonal_inverse.register
def _(obj: IterativeObjective, ev, z_only=False):
    return obj.diag_inverse(ev, z_only=z_only)


@level_diagonal_inverse.register
def _(obj: VectorObjective, ev, z_only=False):
    d = np.concatenate([np.diagonal(B, axis1=1, axis2=2).ravel()
                        for B in obj.level_blocks(ev, z_only=z_only)])
    return TraceEstimate(d, np.zeros_like(d), 0)


@functools.singledispatch
def pev_blocks(obj, ev, z_only=False):
    """Per term, the prediction error covariance of each level's BLUPs (the
    objective's scale), ``(n_levels, d, d)``, and its Monte Carlo standard errors.

    ``z_only=False`` includes the uncertainty of ``beta`` (``G - G Z'PZ G``);
    ``z_only=True`` is lme4's ``condVar`` (given ``beta``). For a random-intercept
    objective the blocks are ``1 x 1``: ``s^2 theta_k^2`` times
    :func:`level_diagonal_inverse`.
    """
    est = level_diagonal_inverse(obj, ev, z_only=z_only)
    off = np.concatenate([[0], np.cumsum(obj.design.n_levels)])
    blocks, errs = [], []
    for k in range(len(off) - 1):
        c = ev.sigma2 * ev.theta[k] ** 2
        blocks.append(c * est.estimate[off[k]:off[k + 1], None, None])
        errs.append(c * est.stderr[off[k]:off[k + 1], None, None])
    return blocks, errs


@pev_blocks.register
def _(obj: VectorObjective, ev, z_only=False):
    blocks = obj.pev_blocks(ev, z_only=z_only)
    return blocks, [np.zeros_like(b) for b in blocks]


@functools.singledispatch
def theta_covariance(obj, ev):
    """Wald covariance of ``theta`` (twice the inverse Hessian of the profiled criterion,
    NaN for parameters on the boundary); exact objectives only."""
    raise ArgumentTypeError(f"no theta_covariance for {type(obj).__name__}")


@theta_covariance.register(VectorObjective)
@theta_covariance.register(VectorIterativeObjective)
def _(obj, ev):
    return obj.theta_covariance(ev)


@functools.singledispatch
def variance_covariance(obj, ev):
    """Asymptotic covariance of the variance-parameter estimates (inverse information).

    Parameters
    ----------
    obj : DirectObjective or IterativeObjective
    ev : Evaluation
        At the REML or ML optimum (``obj.method`` decides which information).

    Returns
    -------
    ndarray, shape (K + 1, K + 1)
        In the order ``s_1^2, ..., s_K^2, s_e^2`` (factors in design order). A
        pseudo-inverse is used if the information is singular. On the iterative solver
        the average information comes from PCG solves (no traces), in its REML (``P``)
        form for both methods, so the standard errors are available at scale too.
    """
    raise ArgumentTypeError(f"no variance_covariance for {type(obj).__name__}")


def _inverse(A):
    try:
        return np.linalg.inv(A)
    except np.linalg.LinAlgError:
        return np.linalg.pinv(A)


@variance_covariance.register
def _(obj: DirectObjective, ev):
    if obj.method == "REML":
        A = obj.average_information(ev)
    elif not obj.has_rows:  # level-space statistics alone: the same variates, by span
        A = 0.5 * obj.quadratic_form_P_span(ev, *obj.working_variates_span(ev), z_only=True)
    else:
        s2 = ev.sigma2
        e = obj.residuals(ev)
        wt = np.ones(obj.n) if obj.weights is None else obj.weights
        codes = obj.design.codes
        W = np.empty((obj.n, obj.K + 1))
        for k in range(obj.K):
            ze = np.bincount(codes[k], weights=wt * e, minlength=obj.design.n_levels[k])
            W[:, k] = ze[codes[k]] / s2
        W[:, obj.K] = e / s2
        A = 0.5 * obj.quadratic_form_P(ev, W, z_only=True)
    return _inverse(A)


@variance_covariance.register
def _(obj: IterativeObjective, ev):
    return _inverse(obj.average_information(ev))


@functools.singledispatch
def optimise(obj, start, options, callback=None):
    """Minimise the objective over ``theta >= 0`` and verify the optimum.

    Parameters
    ----------
    obj : DirectObjective or IterativeObjective
    start : ndarray
        Initial ``theta``.
    options : Options
        The optimiser's settings (:class:`lmmops.options.Options`: ``maxiter``, ``tol``,
        ``boundary_tol``, ``restart``; ``step_tol`` for the iterative solver).
    callback : callable, optional
        ``callback(iteration, theta, criterion)``.

    Returns
    -------
    (Evaluation, OptSummary)
        :func:`~lmmops.estimation.direct.fit_direct` for the exact objective,
        :func:`~lmmops.estimation.stochastic.fit_iterative` for the matrix-free one.
    """
    raise ArgumentTypeError(f"no optimiser for {type(obj).__name__}")


@optimise.register
def _(obj: DirectObjective, start, options, callback=None):
    return fit_direct(obj, start, maxiter=options.maxiter, tol=options.tol,
                      boundary_tol=options.boundary_tol, restart=options.restart,
                      callback=callback)


@optimise.register
def _(obj: VectorObjective, start, options, callback=None):
    return fit_vector(obj, start, maxiter=max(options.maxiter, 200), callback=callback)


@optimise.register
def _(obj: VectorIterativeObjective, start, options, callback=None):
    shifts = None if obj.X is None else centring_shifts(obj.terms)
    if shifts is None:
        return _fit_slopes_iterative(obj, start, options, callback)
    return _fit_slopes_iterative_centred(obj, shifts, start, options, callback)


def _fit_slopes_iterative(obj, start, options, callback):
    """The matrix-free slope fit on ``obj``'s columns as they are: in ``theta / r``,
    raising the probes while the Monte Carlo error is large (:func:`optimise`)."""
    first, evals, rounds = obj.n_probes, 0, []
    # as the exact fit: the optimiser works in theta / r (exact powers of two per slope
    # column, from the diagonal blocks of Z'WZ), from lme4's start for the columns
    # centred and on unit scale
    units = [column_units(t.columns, B.sum(axis=0), obj.n) for t, B in zip(obj.terms, obj.Cd)]
    r = theta_scales(obj.terms, units)
    scaled = ScaledTheta(obj, r)
    start = (centred_start(obj.terms, units) if start is None
             else np.asarray(start, dtype=np.float64)) / r
    cb = None
    if callback is not None:
        def cb(i, th, f):
            callback(i, th * r, f)
    while True:
        ev, opt = fit_vector_iterative(scaled, start, maxiter=max(options.maxiter, 200),
                                       step_tol=options.step_tol, callback=cb)
        ev, opt = scaled.to_user(ev), scaled.summary_to_user(opt)
        evals += opt.n_evaluations
        judge_monte_carlo_error(obj, ev, opt)
        ratio = opt.mc_to_sampling
        rounds.append(f"{obj.n_probes} probes: Monte Carlo / sampling error "
                      + ("n/a" if ratio is None else f"{ratio:.2g}"))
        if (ratio is None or ratio <= AUTO_RAISE_ABOVE or obj.n_probes >= AUTO_MAX_PROBES
                or len(rounds) > 3):
            break
        # the Monte Carlo variance falls as 1 / n_probes: aim at 0.7 of the raising
        # threshold, and refit from the estimate with the larger set
        need = math.ceil(obj.n_probes * (ratio / (0.7 * AUTO_RAISE_ABOVE)) ** 2)
        obj.set_probes(min(max(need, 2 * obj.n_probes), AUTO_MAX_PROBES))
        start = ev.theta / r
    opt.n_evaluations = evals
    if len(rounds) > 1:
        opt.notes = [f"probes raised from {first} to {obj.n_probes} because the Monte "
                     f"Carlo error of theta exceeded its sampling error ({'; '.join(rounds)})",
                     *opt.notes]
    return ev, opt


#: The matrix-free slope fit on centred columns (:func:`_fit_slopes_iterative_centred`)
#: accepts a gap between the criteria on the user's columns and on the centred ones of
#: this many combined Monte Carlo standard errors (their probes are the same, their
#: block-Jacobi factors are not), on top of the exact solver's rounding bound
#: (:func:`lmmops.estimation.centring.centring_tolerance`).
CENTRED_AGREEMENT_SE = 4.0


def _fit_slopes_iterative_centred(obj, shifts, start, options, callback):
    """:func:`_fit_slopes_iterative` on the twin of ``obj`` with its off-centre slope
    columns centred (:func:`lmmops.estimation.centring.fit_centred`, as the exact fit),
    mapped back.

    The evaluation is ``obj``'s own at the mapped optimum, with its own probes (the
    twin's number of them, raised or not); the fit's Monte Carlo covariance of
    ``theta`` maps as ``J Cov J'`` (``J = d theta / d theta^c``,
    :func:`~lmmops.estimation.centring.centring_jacobian`) and the Wald covariances are
    the twin's, mapped (:class:`~lmmops.estimation.centring.CentredFit`), so neither
    needs differences in the ill-conditioned user parametrisation. The judgement of the Monte Carlo
    error (:func:`judge_monte_carlo_error`) is the twin's, in its well-conditioned
    parametrisation. The CG counts of the twin's evaluations are the objective's.
    """
    twin = centred_twin(obj, shifts)
    if twin.n_probes != obj.n_probes:  # a refit after the twin's probes were raised
        twin.set_probes(obj.n_probes)
    base = (obj.cg_iterations, len(obj.cg_history))
    t0 = (twin.cg_iterations, len(twin.cg_history))

    def sync():  # the twin's CG work on the objective (progress lines, solver_info)
        obj.cg_iterations = base[0] + twin.cg_iterations - t0[0]
        obj.last = twin.last

    def fit(tw, start_c, cb):
        inner = None
        if cb is not None:
            def inner(i, th, f):
                sync()
                cb(i, th, f)
        out = _fit_slopes_iterative(tw, start_c, options, inner)
        if obj.n_probes != tw.n_probes:  # the user-column evaluation with as many
            obj.set_probes(tw.n_probes)
        return out

    def allowance(ev, ev_c):
        se = math.hypot(ev.objective_se, ev_c.objective_se)
        return CENTRED_AGREEMENT_SE * se if math.isfinite(se) else 0.0

    ev, ev_c, opt, _ = fit_centred(obj, shifts, start, fit, callback=callback,
                                   allowance=allowance)
    sync()
    obj.cg_iterations += ev.cg_iterations
    obj.cg_history[base[1]:base[1]] = twin.cg_history[t0[1]:]
    obj.probe_cg_history[base[1]:base[1]] = twin.probe_cg_history[t0[1]:]
    # the Monte Carlo covariance of theta by the delta method; the Wald covariances
    # are the twin's, mapped (ev.centred)
    J = ev.centred.jacobian
    ev.theta_mc_cov = J @ ev_c.theta_mc_cov @ J.T
    return ev, opt


#: A random-slope iterative fit is converged only when the Monte Carlo standard
#: deviation of every free ``theta`` component is at most this multiple of its sampling
#: standard error (:func:`judge_monte_carlo_error`): the Monte Carlo error then at most
#: doubles the estimate's variance.
MC_TO_SAMPLING_MAX = 1.0

#: The slope fit raises its probes (refitting from its estimate) while the Monte Carlo
#: error exceeds :data:`AUTO_RAISE_ABOVE` times the sampling error, up to this many.
AUTO_MAX_PROBES = 256

#: The ratio of Monte Carlo to sampling error above which the slope fit raises its
#: probes (a Monte Carlo error below half the sampling error adds at most a quarter to
#: the variance). On the 9-level design of :func:`judge_monte_carlo_error` the fits at
#: 64 probes with ratios 0.6-0.85 were 0.4-2.0 below the exact log-likelihood, those
#: raised to 256 probes 0.01-0.42.
AUTO_RAISE_ABOVE = 0.5


def judge_monte_carlo_error(obj, ev, opt):
    """Compare a matrix-free slope fit's Monte Carlo error with its sampling error.

    With ``H`` the Jacobian of the fixed-probe gradient on the free parameters and
    ``Cov(g)`` the gradient's Monte Carlo covariance, ``theta_hat`` has the Monte Carlo
    covariance ``H^{-1} Cov(g) H^{-1}`` (``ev.theta_mc_cov``) and, the criterion being
    ``-2 log L``, the sampling covariance about ``2 H^{-1}``. A component whose Monte
    Carlo standard deviation exceeds :data:`MC_TO_SAMPLING_MAX` times its sampling
    standard error is not determined by the probes to the precision the data give it:
    the fit is then ``converged=False``, with a note naming it and the number of probes
    that would bring it within (the Monte Carlo variance falls as ``1 / n_probes``). The
    expected shortfall of the log-likelihood from the Monte Carlo error of the estimate,
    ``tr(Cov(g) H^{-1}) / 4`` (half the expected excess ``delta' H delta / 2`` of the
    criterion), is kept as ``opt.loglik_shortfall``.

    On a 2400-row design with a 9-level crossed factor and 16 probes, one seed's fit
    put that factor's ``theta`` at 2.67 (the exact optimum is 0.77) with a Monte Carlo
    standard deviation of 37: before this check it said converged, with a log-likelihood
    7.0 below the exact maximum and a stated Monte Carlo error of 0.74. The optimiser
    (:func:`optimise`) refits with more probes, up to :data:`AUTO_MAX_PROBES`, while the
    check fails.

    Parameters
    ----------
    obj : VectorIterativeObjective
    ev : Evaluation
        The fit's, with ``theta_mc_cov``, ``hessian``, ``free``, ``gradient_cov``.
    opt : OptSummary

    Returns
    -------
    OptSummary
        ``opt``, changed in place: ``converged``, ``message``, ``notes``,
        ``loglik_shortfall``, ``mc_to_sampling`` (the largest ratio, or None).
    """
    H, idx = getattr(ev, "hessian", None), getattr(ev, "free", None)
    opt.loglik_shortfall, opt.mc_to_sampling = None, None
    if H is None or idx is None or not np.size(idx):
        return opt
    idx = np.asarray(idx)
    try:
        Hinv = np.linalg.inv(H)
    except np.linalg.LinAlgError:
        return opt
    Cg = np.asarray(ev.gradient_cov)[np.ix_(idx, idx)]
    mc_sd = np.sqrt(np.maximum(np.diag(ev.theta_mc_cov)[idx], 0.0))
    samp_sd = np.sqrt(np.abs(np.diag(2.0 * Hinv)))
    ratio = mc_sd / np.maximum(samp_sd, 1e-300)
    opt.loglik_shortfall = max(0.25 * float(np.trace(Cg @ Hinv)), 0.0)
    worst = int(np.argmax(ratio))
    opt.mc_to_sampling = float(ratio[worst])
    if opt.mc_to_sampling > MC_TO_SAMPLING_MAX:
        names = theta_names(obj.terms)
        need = int(math.ceil(obj.n_probes * (opt.mc_to_sampling / MC_TO_SAMPLING_MAX) ** 2))
        note = (f"the Monte Carlo standard deviation of theta '{names[idx[worst]]}' "
                f"({mc_sd[worst]:.3g}) is {opt.mc_to_sampling:.3g} times its sampling "
                f"standard error ({samp_sd[worst]:.3g}; at most {MC_TO_SAMPLING_MAX:g} "
                f"accepted): {obj.n_probes} probes do not determine the estimate to the "
                f"precision of the data; refit with about {need} probes "
                f"(n_probes={need}) or solver='direct' where it fits")
        if opt.converged:
            opt.converged = False
            opt.message = note
        opt.notes = [*getattr(opt, "notes", []), note]
    return opt


@optimise.register
def _(obj: IterativeObjective, start, options, callback=None):
    return fit_iterative(obj, start, maxiter=options.maxiter, step_tol=options.step_tol,
                         boundary_tol=options.boundary_tol, callback=callback)


@functools.singledispatch
def solver_info(obj):
    """The solver's record of a fit: ``preconditioner`` (the kind, None for the exact
    solver), ``cg_iterations`` and ``probe_cg_iterations`` (per evaluation; empty for the
    exact solver), as in the ``solver_info`` field of ``lmmops fit --json``."""
    raise ArgumentTypeError(f"no solver_info for {type(obj).__name__}")


@solver_info.register(DirectObjective)
@solver_info.register(VectorObjective)
def _(obj):
    return {"preconditioner": None, "cg_iterations": [], "probe_cg_iterations": []}


@solver_info.register(VectorIterativeObjective)
@solver_info.register(IterativeObjective)
def _(obj):
    return {"preconditioner": obj.preconditioner,
            "cg_iterations": [int(c) for c in obj.cg_history],
            "probe_cg_iterations": [int(c) for c in obj.probe_cg_history]}


@functools.singledispatch
def is_exact(obj):
    """Whether the objective's criterion, BLUPs and ``diag(P)`` are exact (the direct
    solver) rather than stochastic estimates with Monte Carlo errors (the iterative one).
    Profile intervals and the VSOM refit need an exact objective."""
    raise ArgumentTypeError(f"no is_exact for {type(obj).__name__}")


@is_exact.register(DirectObjective)
@is_exact.register(VectorObjective)
def _(obj):
    return True


@is_exact.register(IterativeObjective)
@is_exact.register(VectorIterativeObjective)
def _(obj):
    return False


@functools.singledispatch
def monte_carlo_covariance(obj, ev):
    """Monte Carlo error of a fit at its optimum ``ev``.

    Returns
    -------
    (ndarray, float)
        The Monte Carlo covariance of ``tau_hat = theta_hat^2`` (``K x K``) and the
        standard error of the criterion; None and 0 for an exact objective. For the
        iterative solver the covariance is the one
        :func:`~lmmops.estimation.stochastic.fit_iterative` leaves in ``ev.tau_cov``
        (NaN where it left none).
    """
    raise ArgumentTypeError(f"no monte_carlo_covariance for {type(obj).__name__}")


@monte_carlo_covariance.register(DirectObjective)
@monte_carlo_covariance.register(VectorObjective)
def _(obj, ev):
    return None, 0.0


@monte_carlo_covariance.register
def _(obj: IterativeObjective, ev):
    K = len(ev.theta)
    C = np.asarray(getattr(ev, "tau_cov", np.full((K, K), np.nan)), dtype=np.float64)
    return C, float(getattr(ev, "objective_se", 0.0))


@monte_carlo_covariance.register
def _(obj: VectorIterativeObjective, ev):
    # random slopes: the covariance of theta_hat itself (lme4's theta), not of theta^2
    K = len(ev.theta)
    C = np.asarray(getattr(ev, "theta_mc_cov", np.full((K, K), np.nan)), dtype=np.float64)
    return C, float(getattr(ev, "objective_se", 0.0))


@functools.singledispatch
def monte_carlo_stderr(obj, ev):
    """Monte Carlo standard errors of a random-slope fit's covariance parameters, on the
    objective's scale: ``(covariances, residual)``, per term the ``d x d`` standard
    errors of ``s^2 T_k T_k'`` and that of ``s^2``, by the delta method from
    :func:`monte_carlo_covariance` (the covariance of ``theta_hat``) and the exact
    derivative of the profiled ``s^2``; None for an objective without them (exact, or
    random intercepts, whose errors come from the covariance of ``theta^2``)."""
    return None


@monte_carlo_stderr.register
def _(obj: VectorIterativeObjective, ev):
    C, _ = monte_carlo_covariance(obj, ev)
    s2, ds2 = ev.sigma2, np.asarray(getattr(ev, "dsigma2", np.zeros(len(ev.theta))))
    out = []
    for t, sl in zip(obj.terms, obj.layout):
        T = t.relative_factor(ev.theta[sl])
        S = T @ T.T
        d = t.dim
        J = ds2[None, None, :] * S[:, :, None]  # d(s^2 T T')/d theta, (d, d, n_theta)
        ii, jj = np.triu_indices(d)[::-1]
        for m, (a, b) in enumerate(zip(ii, jj)):
            Tm = np.zeros((d, d))
            Tm[a, b] = 1.0
            J[:, :, sl.start + m] += s2 * (Tm @ T.T + T @ Tm.T)
        var = np.einsum("abm,mn,abn->ab", J, C, J)
        out.append(np.sqrt(np.maximum(var, 0.0)))
    return out, float(np.sqrt(max(float(ds2 @ C @ ds2), 0.0)))


@functools.singledispatch
def fit_notes(obj, opt, loglik_se):
    """The solver's lines for the fit's notes (a list of str; none for the exact
    solver). ``opt`` is the optimiser's summary and ``loglik_se`` the Monte Carlo
    standard error of the log-likelihood."""
    raise ArgumentTypeError(f"no fit_notes for {type(obj).__name__}")


def _shortfall(opt):
    """The fit-notes clause on the expected log-likelihood shortfall, or ``""``."""
    shortfall = getattr(opt, "loglik_shortfall", None)
    if shortfall is None:
        return ""
    return (f", expected log-likelihood shortfall from the Monte Carlo error of the "
            f"estimate {shortfall:.2g}")


@fit_notes.register(DirectObjective)
@fit_notes.register(VectorObjective)
def _(obj, opt, loglik_se):
    return list(getattr(opt, "notes", []))


@fit_notes.register
def _(obj: VectorIterativeObjective, opt, loglik_se):
    evals = len(obj.cg_history)
    line = (f"iterative solver (random slopes, block-Jacobi PCG): {obj.n_probes} probes, "
            f"{obj.cg_iterations} CG iterations in {evals} evaluations; Monte Carlo "
            f"standard error of the log-likelihood {loglik_se:.3g}")
    return [line + _shortfall(opt), *getattr(opt, "notes", [])]


@fit_notes.register
def _(obj: IterativeObjective, opt, loglik_se):
    probes = getattr(opt, "n_probes", obj.n_probes)
    first = getattr(opt, "n_probes_initial", probes)
    used = f"{first} probes" if probes == first else f"{first} probes ({probes} in the end)"
    line = (f"iterative solver: {used}, {obj.cg_iterations} CG iterations; Monte Carlo "
            f"standard error of the log-likelihood {loglik_se:.3g}")
    return [line + _shortfall(opt), *getattr(opt, "notes", [])]


@functools.singledispatch
def progress_note(obj, state):
    """The solver's part of a progress line: ``""`` for the exact solver; the CG
    iterations since the last call and the criterion's Monte Carlo error for the
    iterative one. ``state`` is a dict the caller keeps between calls (start with
    ``{}``)."""
    raise ArgumentTypeError(f"no progress_note for {type(obj).__name__}")


@progress_note.register(DirectObjective)
@progress_note.register(VectorObjective)
def _(obj, state):
    return ""


@progress_note.register(IterativeObjective)
@progress_note.register(VectorIterativeObjective)
def _(obj, state):
    cg = obj.cg_iterations - state.get("cg", 0)
    state["cg"] = obj.cg_iterations
    return f"  CG iterations {cg:5d}  MC error {obj.last.get('objective_se', 0.0):.3g}"




@variance_covariance.register
def _(obj: VectorObjective, ev):
    return obj.variance_covariance(ev)


@variance_covariance.register
def _(obj: VectorIterativeObjective, ev):
    return obj.variance_covariance(ev)


@diag_P.register
def _(obj: VectorIterativeObjective, ev):
    return obj.diag_P(ev)


@level_diagonal_inverse.register
def _(obj: VectorIterativeObjective, ev, z_only=False):
    est, err = obj.level_blocks(ev, z_only=z_only)
    diag = [np.diagonal(b, axis1=1, axis2=2).ravel() for b in est]
    sd = [np.diagonal(e, axis1=1, axis2=2).ravel() for e in err]
    return TraceEstimate(np.concatenate(diag), np.concatenate(sd), PEV_PROBES)


@pev_blocks.register
def _(obj: VectorIterativeObjective, ev, z_only=False):
    return obj.pev_blocks(ev, z_only=z_only)
