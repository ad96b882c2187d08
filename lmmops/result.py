"""The fitted model: :class:`LMMResult` (estimates, summary, the JSON record).

An :class:`LMMResult` is what :meth:`lmmops.LMM.fit` returns. It maps the solver's
evaluation at the optimum back to the user's scale (:mod:`lmmops.data.conditioning`),
reads the random-effects structure from the design's terms
(:class:`~lmmops.data.terms.RandomEffectsTerm`), and asks the objective the fit used for
everything else through the protocol of :mod:`lmmops.estimation.protocol`, so it never
branches on the solver.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pandas as pd

from lmmops._version import __version__
from lmmops.analysis.inference import confint, variance_covariance
from lmmops.analysis.outliers import msom, msom_scan, vsom
from lmmops.analysis.plots import plot
from lmmops.analysis.predict import predict
from lmmops.data.formula import varcorr_names
from lmmops.data.terms import theta_layout, theta_names
from lmmops.errors import LmmopsError
from lmmops.estimation.protocol import diag_P as diag_P_of
from lmmops.estimation.protocol import (
    fit_notes,
    is_exact,
    monte_carlo_covariance,
    monte_carlo_stderr,
    pev_blocks,
    solver_info,
    theta_covariance,
)
from lmmops.threads import limit_threads

__all__ = ["LMMResult"]


class LMMResult:
    """A fitted linear mixed model.

    Attributes
    ----------
    formula, method, solver : str
    n_obs : int
    n_levels : dict
        Factor name to level count, in lme4's order of the grouping factors
        (``getME(m, "flist")``: by their first term in lme4's term order).
    fixef, fixef_se, tvalues : pandas.Series
        Fixed effects, standard errors and t values (lme4's names).
    vcov : pandas.DataFrame
        Covariance of the fixed effects.
    theta : pandas.Series
        Relative standard deviations ``s_k / s``.
    variances, stddev : dict
        Per random term (named as in the formula) and ``"Residual"``.
    sigma : float
        Residual standard deviation.
    loglik : float
        Log-likelihood (the REML log-likelihood for REML fits, as lme4's ``logLik``).
    reml_criterion, deviance : float or None
        ``-2 loglik`` for REML and ML fits respectively.
    aic, bic : float
    df : int
        Number of parameters: fixed effects, variance components and the residual.
    ranef : dict of pandas.Series
        BLUPs (conditional modes) per factor, indexed by level.
    resid : ndarray
        Conditional residuals ``y - X beta - Z b`` (see :meth:`residuals`).
    fitted : ndarray
        Conditional fitted values ``X beta + Z b``.
    converged : bool
    iterations, n_evaluations : int
    gradient_norm : float
    elapsed_s : float
        Wall time of building and fitting the model.
    notes : list of str
        For example the singular-fit note.
    thread_plan : lmmops.threads.ThreadPlan or None
        The BLAS / Numba thread counts the fit ran with (also used by :meth:`confint`);
        None for a result not made by ``LMM.fit``.
    optsum : OptSummary
        With user-scale criteria.
    evaluation : Evaluation
        The solver's evaluation at the optimum, on the conditioned scale of
        ``model.X_conditioned`` and ``model.y_conditioned`` (``model.conditioning``
        maps it back; every attribute above is already on the user's scale).
    """

    def __init__(self, model, obj, ev, opt, method, solver, resid, elapsed, options=None):
        self.model = model
        self.formula = model.formula
        self.method = method
        self.solver = solver
        self.options = options
        self._objective = obj
        #: whether the criterion, BLUPs and ``diag(P)`` are exact (no Monte Carlo error)
        self.exact = bool(is_exact(obj))
        self.data_name = model.data_name
        d = model.design
        terms = model.terms
        self.terms = terms
        self.n_obs = model.n_obs
        # lme4's flist order: the factors in the order of their first term (lme4's term
        # order), then any factor without a term
        order = list(dict.fromkeys([t.group for t in terms if t.group in d.names]
                                   + list(d.names)))
        self.n_levels = {g: int(d.n_levels[d.index(g)]) for g in order}
        # aliased columns of a rank-deficient X: NaN (not estimable; tau_1 = 0 is used)
        names = list(getattr(model, "all_fixef_names", model.fixef_names))
        keep = np.asarray(getattr(model, "keep", np.arange(len(names))))
        p_all = len(names)
        # ev is on the conditioned scale the solvers saw; everything reported is mapped
        # back to the user's (lmmops.data.conditioning)
        cond = model.conditioning
        s, s2 = cond.scale, cond.variance_scale
        beta = np.full(p_all, np.nan)
        beta[keep] = cond.fixef(ev.beta)
        cov = np.full((p_all, p_all), np.nan)
        cov[np.ix_(keep, keep)] = cond.fixef_cov(ev.beta_cov)
        self.rank_deficient = list(getattr(model, "rank_deficient", []))
        # the pandas tables (fixef, fixef_se, tvalues, vcov, theta, covariances, ranef)
        # are built when first read: on a small data set their construction costs as
        # much as a tenth of the fit
        self._fixef_parts = (names, beta, cov)
        self.evaluation = ev
        #: whether every term is a scalar random intercept on its own factor (the model of
        #: ``variances``, ``theta`` keyed by factor, and the per-factor analysis functions)
        self.intercepts_only = (all(t.is_intercept for t in terms)
                                and len(terms) == d.n_factors)
        self._theta_keys = list(d.names) if self.intercepts_only else theta_names(terms)
        groups = varcorr_names([t.group for t in terms])
        sigma2 = s2 * ev.sigma2
        self.sigma = float(np.sqrt(sigma2))
        layout = theta_layout(terms)
        # per term, the d x d covariance s^2 Lambda_k Lambda_k' of its random effects
        self._covariance_parts = {}
        for g, t, sl in zip(groups, terms, layout):
            L = t.relative_factor(ev.theta[sl])
            self._covariance_parts[g] = (sigma2 * (L @ L.T), list(t.columns))
        self.variances = {g: float(self._covariance_parts[g][0][0, 0])
                          for g, t in zip(groups, terms) if t.dim == 1}
        self.variances["Residual"] = float(sigma2)
        self.stddev = {k: float(np.sqrt(v)) for k, v in self.variances.items()}
        self.objective = cond.criterion(ev.objective, method)
        self.loglik = -0.5 * self.objective
        self.reml_criterion = self.objective if method == "REML" else None
        self.deviance = self.objective if method == "ML" else None
        p = len(keep)
        self.df = p + sum(t.n_theta for t in terms) + 1
        self.aic = -2.0 * self.loglik + 2.0 * self.df
        self.bic = -2.0 * self.loglik + math.log(self.n_obs) * self.df
        self.df_resid = self.n_obs - self.df
        # BLUPs b_k = (I (x) T_k) u_k; lme4's ranef: one table per grouping factor, the
        # columns of all its terms side by side (a Series for a lone intercept term)
        self._ranef_parts = [
            s * (np.asarray(ev.v[k]).reshape(t.n_levels, t.dim)
                 @ t.relative_factor(ev.theta[sl]).T)
            for k, (t, sl) in enumerate(zip(terms, layout))]
        self.resid = s * np.asarray(resid)
        self.fitted = model.y - self.resid
        self.converged = bool(opt.converged)
        self.iterations = int(opt.iterations)
        self.n_evaluations = int(opt.n_evaluations)
        self.gradient_norm = float(opt.gradient_norm)
        self.elapsed_s = float(elapsed)
        self.optsum = cond.opt_summary(opt, method)
        self.notes = []
        self.thread_plan = None
        if self.rank_deficient:
            self.notes.append(model.rank_message)
        zero = [g for g, t, sl in zip(groups, terms, layout)
                if np.any(np.diag(t.relative_factor(ev.theta[sl])) == 0.0)]
        self.singular = bool(zero)
        if zero:
            self.notes.append(
                "boundary (singular) fit: the variance of "
                + ", ".join(f"'{z}'" for z in zero)
                + " is estimated as 0"
            )
        if not self.converged:
            self.notes.append(f"did not converge: {opt.message}")
        self._set_mc_stderr(obj, ev)
        #: The solver's record: ``preconditioner`` (the kind, None for the direct solver),
        #: ``cg_iterations`` (per evaluation, the CG iterations of the solve with that
        #: preconditioner; empty for the direct solver) and ``probe_cg_iterations`` (the
        #: same for the Jacobi probe block of the stochastic estimates).
        self.solver_info = solver_info(obj)

    @functools.cached_property
    def fixef(self):
        """pandas.Series: the fixed effects (NaN for an aliased column)."""
        names, beta, _ = self._fixef_parts
        return pd.Series(beta, index=names, name="Estimate")

    @functools.cached_property
    def fixef_se(self):
        """pandas.Series: their standard errors."""
        names, _, cov = self._fixef_parts
        return pd.Series(np.sqrt(np.diag(cov)), index=names, name="Std. Error")

    @functools.cached_property
    def tvalues(self):
        """pandas.Series: the fixed effects over their standard errors."""
        names, beta, cov = self._fixef_parts
        return pd.Series(beta / np.sqrt(np.diag(cov)), index=names, name="t value")

    @functools.cached_property
    def vcov(self):
        """pandas.DataFrame: the fixed effects' covariance (lme4's ``vcov``)."""
        names, _, cov = self._fixef_parts
        return pd.DataFrame(cov, index=names, columns=names)

    @functools.cached_property
    def theta(self):
        """pandas.Series: the relative covariance parameters (per factor for random
        intercepts, lme4's ``theta`` names otherwise)."""
        return pd.Series(self.evaluation.theta, index=self._theta_keys, name="theta")

    @functools.cached_property
    def covariances(self):
        """dict of pandas.DataFrame: per grouping factor, the ``d x d`` covariance
        ``s^2 Lambda_k Lambda_k'`` of its random effects."""
        return {g: pd.DataFrame(c, index=cols, columns=cols)
                for g, (c, cols) in self._covariance_parts.items()}

    @functools.cached_property
    def ranef(self):
        """dict of pandas.Series or DataFrame: the BLUPs per grouping factor, indexed by
        level (lme4's ``ranef``)."""
        return self._by_group(self._ranef_parts)

    def _set_mc_stderr(self, obj, ev):
        """Monte Carlo standard errors of the fit (delta method; 0 where it is exact).

        The objective's Monte Carlo covariance of ``tau_hat = theta_hat^2``
        (:func:`~lmmops.estimation.protocol.monte_carlo_covariance`: for the iterative
        solver ``H^{-1} Cov(g) H^{-1}`` on the free components, the spread of
        ``max(0, .)`` on boundary ones) maps to the variances ``s^2 tau_k`` and the
        residual variance ``s^2(tau)`` by the delta method
        (``d s^2 / d tau_k = -||v_k||^2 / (tau_k dof)``, 0 on the boundary, where the
        estimate is held at 0). The log-likelihood's error is half the criterion's.
        """
        C, objective_se = monte_carlo_covariance(obj, ev)
        if C is None:  # an exact objective
            self.mc_stderr = {"loglik": 0.0, "variances": {k: 0.0 for k in self.variances}}
            self.notes.extend(fit_notes(obj, self.optsum, 0.0))
            return
        slopes = monte_carlo_stderr(obj, ev)
        if slopes is not None:  # random slopes: per term, d x d errors of s^2 T T'
            self._set_mc_stderr_terms(obj, slopes, objective_se)
            return
        K = len(C)
        tau = np.asarray(ev.theta, dtype=np.float64) ** 2
        dof = self.n_obs - self.model.X.shape[1] if self.method == "REML" else self.n_obs
        s2 = ev.sigma2
        ds2 = np.array([-float(v @ v) / (t * dof) if t > 0 else 0.0
                        for v, t in zip(ev.v, tau)])
        J = np.zeros((K + 1, K))
        J[:K] = tau[:, None] * ds2[None, :]
        J[np.arange(K), np.arange(K)] += s2
        J[K] = ds2
        cov = J @ C @ J.T
        # ev is on the conditioned scale: variances (and their errors) scale by s^2
        se = self.model.conditioning.variance_scale * np.sqrt(np.maximum(np.diag(cov), 0.0))
        se[~np.isfinite(np.diag(cov))] = np.nan
        self.mc_stderr = {
            "loglik": 0.5 * objective_se,
            "variances": {nm: float(x) for nm, x in zip(self.variances, se)},
        }
        self.notes.extend(fit_notes(obj, self.optsum, self.mc_stderr["loglik"]))

    def _set_mc_stderr_terms(self, obj, slopes, objective_se):
        """:meth:`_set_mc_stderr` for random-slope terms: ``mc_stderr["covariances"]``
        holds, per grouping factor, the Monte Carlo standard errors of
        :attr:`covariances` (a DataFrame of the same shape), and ``"variances"`` those of
        :attr:`variances` (the one-column terms and ``Residual``)."""
        per_term, resid_se = slopes
        vs = self.model.conditioning.variance_scale
        groups = varcorr_names([t.group for t in self.terms])
        covs, variances = {}, {}
        for g, t, se in zip(groups, self.terms, per_term):
            covs[g] = pd.DataFrame(vs * se, index=list(t.columns), columns=list(t.columns))
            if t.dim == 1:
                variances[g] = float(vs * se[0, 0])
        variances["Residual"] = float(vs * resid_se)
        self.mc_stderr = {"loglik": 0.5 * objective_se, "variances": variances,
                          "covariances": covs}
        self.notes.extend(fit_notes(obj, self.optsum, self.mc_stderr["loglik"]))

    RESIDUAL_KINDS = ("conditional", "marginal", "model", "pearson", "shift", "studentized")

    def residuals(self, kind="conditional"):
        """Residuals of the fit (``docs/theory.rst``, :ref:`theory-outliers`; exact on the
        direct solver).

        Parameters
        ----------
        kind : {"conditional", "marginal", "model", "pearson", "shift", "studentized"}
            - ``"conditional"``: ``y - X tau_hat - Z u_tilde``;
            - ``"marginal"``: ``y - X tau_hat`` (``= Z u_tilde + e``);
            - ``"model"``: the model-based residual ``e_tilde = R P y`` (it equals the
              conditional residual, as ``P y = R^{-1}(y - X tau_hat - Z u_tilde)``);
            - ``"pearson"``: ``sqrt(w_i) e_i / s`` (lme4's ``type = "pearson"``);
            - ``"shift"``: the mean-shift residual (:ref:`theory-outliers`),
              ``r_i = (delta_i'P delta_i)^{-1} delta_i'P y`` (the mean-shift estimate),
              with ``var(r_i) = (delta_i'P delta_i)^{-1}`` (see :meth:`residual_table`);
            - ``"studentized"``: ``t_i = r_i / sqrt(var(r_i))``.

            ``diag(P)`` is exact on the direct solver, from the level-space factor
            (:func:`lmmops.estimation.mme.diag_P`); on the iterative solver it is a stochastic
            diagonal estimate (:meth:`lmmops.estimation.iterative.IterativeObjective.diag_P`) whose
            standard errors are in :meth:`residual_table`.

        Returns
        -------
        ndarray, shape (n_obs,)

        Raises
        ------
        LmmopsError
            For an unknown kind.
        """
        if kind == "conditional":
            return self.resid.copy()
        if kind == "marginal":  # s (y_c - X_c beta_c) = y - X beta
            m = self.model
            return m.conditioning.scale * (m.y_conditioned
                                           - m.X_conditioned @ self.evaluation.beta)
        if kind not in self.RESIDUAL_KINDS:
            raise LmmopsError(f"unknown residual kind {kind!r}; use one of "
                              f"{', '.join(self.RESIDUAL_KINDS)}")
        wts = getattr(self.model, "weights", None)
        w = np.ones(self.n_obs) if wts is None else wts
        s2 = self.sigma ** 2
        Py = w * self.resid / s2
        if kind == "model":
            return s2 * Py / w
        if kind == "pearson":
            return np.sqrt(w) * self.resid / self.sigma
        dP = self._diag_P()
        if kind == "shift":
            return Py / dP
        return Py / np.sqrt(dP)

    def fit_objective(self, exact=False):
        """The objective the fit used and its evaluation at the optimum.

        Both on the solver's conditioned scale (``model.conditioning`` maps them to the
        user's), for the functions of :mod:`lmmops.estimation.protocol` and the analysis
        modules.

        Parameters
        ----------
        exact : bool
            Require an exact objective (:attr:`exact`), as profiling does.

        Returns
        -------
        (objective, Evaluation)

        Raises
        ------
        LmmopsError
            With ``exact=True`` for a fit by a stochastic solver.
        """
        if exact and not self.exact:
            raise LmmopsError(f"this quantity is exact only on the direct solver (the fit "
                              f"used solver={self.solver!r}); refit with solver='direct'")
        return self._objective, self.evaluation

    def _diag_P(self, conditioned=False):
        """``diag(P)``: exact on the direct solver; on the iterative solver a stochastic
        diagonal estimate (64 probes) whose standard errors are kept in ``_dP_se``.
        On the user's scale (``P`` scales as ``1/s^2``), or the solver's with
        ``conditioned=True``."""
        if getattr(self, "_dP_c", None) is None:
            est = diag_P_of(*self.fit_objective())
            self._dP_c, self._dP_c_se = est.estimate, est.stderr
        if conditioned:
            return self._dP_c
        v = self.model.conditioning.variance_scale
        self._dP_se = self._dP_c_se / v
        return self._dP_c / v

    def residual_table(self):
        """Residual diagnostics per observation as a DataFrame.

        Returns
        -------
        pandas.DataFrame
            Columns ``fitted``, ``conditional``, ``marginal``, ``shift`` (``r_i``),
            ``shift_var`` (``(delta_i'P delta_i)^{-1}``), ``studentized`` (``t_i``),
            ``diag_P`` and ``diag_P_se`` (the Monte Carlo standard error of ``diag_P`` on the
            iterative solver; 0 on the direct one).
        """
        dP = self._diag_P()
        return pd.DataFrame({
            "fitted": self.fitted,
            "conditional": self.residuals("conditional"),
            "marginal": self.residuals("marginal"),
            "shift": self.residuals("shift"),
            "shift_var": 1.0 / dP,
            "studentized": self.residuals("studentized"),
            "diag_P": dP,
            "diag_P_se": self._dP_se,
        })

    def ranef_pev(self, conditional_on_beta=False):
        """Prediction error variances of the BLUPs, per grouping factor.

        Parameters
        ----------
        conditional_on_beta : bool
            ``False``: the diagonal of ``C^{ZZ} = G - G Z'P Z G`` (accounts for estimating
            ``beta``); ``True``: lme4's ``condVar``,
            ``s^2 Lambda (Lambda' Z'WZ Lambda + I)^{-1} Lambda'``, given ``beta``.

        Returns
        -------
        dict of pandas.Series or pandas.DataFrame
            Shaped as :attr:`ranef` (a DataFrame with a column per coefficient for a
            vector-valued term; :meth:`ranef_pev_blocks` gives the whole ``d x d``
            blocks). Exact on the direct solver; on the iterative solver a stochastic
            diagonal estimate (:meth:`lmmops.estimation.iterative.IterativeObjective.diag_inverse`)
            whose Monte Carlo standard errors are then in ``ranef_pev_se``.
        """
        blocks, errs = self._pev(conditional_on_beta)
        diag = [np.diagonal(b, axis1=1, axis2=2) for b in blocks]
        diag_se = [np.diagonal(e, axis1=1, axis2=2) for e in errs]
        self.ranef_pev_se = self._by_group(diag_se)
        return self._by_group(diag)

    def ranef_pev_blocks(self, conditional_on_beta=False):
        """Prediction error covariances of the BLUPs as ``d x d`` blocks, per term.

        Returns
        -------
        dict of ndarray
            Keyed as :attr:`covariances`; each ``(n_levels, d, d)``, the levels in the
            order of :attr:`ranef`'s rows and the coefficients in its columns' order.
        """
        blocks, _ = self._pev(conditional_on_beta)
        return dict(zip(self.covariances, blocks))

    def _pev(self, conditional_on_beta):
        obj, ev = self.fit_objective()
        blocks, errs = pev_blocks(obj, ev, z_only=conditional_on_beta)
        v = self.model.conditioning.variance_scale
        return [v * b for b in blocks], [v * e for e in errs]

    def _by_group(self, per_term):
        """Per-term ``(n_levels, d)`` arrays as :attr:`ranef`'s tables."""
        out = {}
        for t, a in zip(self.terms, per_term):
            out.setdefault(t.group, []).append(
                pd.DataFrame(a, index=t.levels.rename(t.group), columns=list(t.columns)))
        for g, parts in out.items():
            tab = pd.concat(parts, axis=1) if len(parts) > 1 else parts[0]
            out[g] = tab.iloc[:, 0].rename(g) if self.intercepts_only else tab
        return out

    @property
    def theta_cov(self):
        """pandas.DataFrame: Wald covariance of :attr:`theta` (twice the inverse Hessian
        of the profiled criterion; NaN for parameters on the boundary). Available for
        models with vector-valued terms; ``theta`` is relative to ``sigma``, so it does
        not change with the scale of ``y``."""
        cov = theta_covariance(*self.fit_objective())
        return pd.DataFrame(cov, index=self.theta.index, columns=self.theta.index)

    def _varcorr_se(self):
        """Standard errors of the ``vcov`` column of :attr:`varcorr` (from
        :attr:`variances_cov`), None where not available."""
        try:
            c = self.variances_cov
        except LmmopsError:
            return [None] * len(self.varcorr)
        keys = (self._varcorr_names() if not self.intercepts_only
                else list(self.varcorr.grp))
        return [float(np.sqrt(max(c.loc[k, k], 0.0))) if np.isfinite(c.loc[k, k]) else None
                for k in keys]

    def _varcorr_names(self):
        """Names of the rows of :attr:`varcorr`: ``grp.var1`` for a variance,
        ``grp.var1.var2`` for a covariance, ``Residual``."""
        return [r.grp if r.grp == "Residual" else
                f"{r.grp}.{r.var1}" if pd.isna(r.var2) else f"{r.grp}.{r.var1}.{r.var2}"
                for r in self.varcorr.itertuples(index=False)]

    @property
    def variances_cov(self):
        """pandas.DataFrame: covariance of the variance estimates. Random intercepts:
        the inverse average information, indexed by the factors, then ``Residual``.
        Random slopes: Wald, twice the inverse Hessian of the criterion in
        ``(theta, s^2)`` by the delta method (on the matrix-free solver from the fit's
        Jacobian of the fixed-probe gradient), indexed by the rows of :attr:`varcorr`
        (``grp.var1``, ``grp.var1.var2``, ``Residual``); NaN for a term with a parameter
        on the boundary."""
        if getattr(self, "_vcov_var", None) is None:
            names = list(self.variances) if self.intercepts_only else self._varcorr_names()
            cov = variance_covariance(*self.fit_objective())
            cov = cov * self.model.conditioning.variance_scale ** 2  # to the user's scale
            self._vcov_var = pd.DataFrame(cov, index=names, columns=names)
        return self._vcov_var

    @property
    def variances_se(self):
        """dict: standard errors of the variance components (inverse average
        information), keyed as :attr:`variances`. On the iterative solver the average
        information comes from exact PCG solves, in its REML (P) form for both methods."""
        try:
            c = self.variances_cov
        except LmmopsError:
            return {k: float("nan") for k in self.variances}
        if not self.intercepts_only:  # the one-column terms' and the residual's rows
            names = {r.grp: n for n, r in zip(self._varcorr_names(),
                                              self.varcorr.itertuples(index=False))
                     if pd.isna(r.var2)}
            return {k: float(np.sqrt(max(c.loc[names[k], names[k]], 0.0)))
                    for k in self.variances}
        return {k: float(np.sqrt(max(c.loc[k, k], 0.0))) for k in c.index}

    @property
    def varcorr(self):
        """pandas.DataFrame: the variance components as lme4's
        ``as.data.frame(VarCorr(m))``.

        Columns ``grp``, ``var1``, ``var2``, ``vcov`` and ``sdcor``: per term, first a
        row per column (``var2`` missing; ``vcov`` the variance, ``sdcor`` the standard
        deviation), then a row per pair (``vcov`` the covariance, ``sdcor`` the
        correlation), then the residual (``grp`` ``"Residual"``, ``var1`` missing).
        """
        rows = []
        for grp, S in self.covariances.items():
            cols, C = list(S.columns), S.to_numpy()
            sd = np.sqrt(np.diag(C))
            rows.extend((grp, c, None, C[i, i], sd[i]) for i, c in enumerate(cols))
            for j in range(len(cols)):
                for i in range(j + 1, len(cols)):
                    r = C[i, j] / (sd[i] * sd[j]) if sd[i] * sd[j] > 0 else np.nan
                    rows.append((grp, cols[j], cols[i], C[i, j], r))
        s2 = self.variances["Residual"]
        rows.append(("Residual", None, None, s2, np.sqrt(s2)))
        return pd.DataFrame(rows, columns=["grp", "var1", "var2", "vcov", "sdcor"])

    def confint(self, method="profile", level=0.95, parm=None):
        """Confidence intervals (see :func:`lmmops.analysis.inference.confint`).

        Parameters
        ----------
        method : {"profile", "wald"}
        level : float
        parm : sequence of str, optional

        Returns
        -------
        pandas.DataFrame

        Notes
        -----
        Runs with the fit's thread plan (``thread_plan``; ``threads="auto"`` for a
        result without one): a profile refits the model hundreds of times, and small
        BLAS calls on two threads of a loaded machine cost several times one.
        """
        plan = getattr(self, "thread_plan", None) or "auto"
        with limit_threads(plan):
            return confint(self, method=method, level=level, parm=parm)

    def outliers(self, method="msom", rows=None, top=None):
        """Outlier statistics (see :mod:`lmmops.analysis.outliers`).

        Parameters
        ----------
        method : {"msom", "vsom"}
        rows : array_like of int, optional
            A set I of observation positions: the mean shift (MSOM) or variance shift
            (VSOM) for that set. Without it, the MSOM scan over all single observations.
        top : int, optional
            Keep the ``top`` largest ``|t|`` of the scan.

        Returns
        -------
        pandas.DataFrame (the scan) or dict (a set I)

        Raises
        ------
        LmmopsError
            For an unknown method, the VSOM without a set, or bad indices.
        """

        m = str(method).lower()
        if m not in ("msom", "vsom"):
            raise LmmopsError(f"unknown outlier method {method!r}; use 'msom' or 'vsom'")
        # computed on the solver's conditioned scale, reported on the user's
        cond = self.model.conditioning
        if m == "vsom":
            if rows is None:
                raise LmmopsError("the VSOM needs a set of observations: rows=[...]")
            obj = self.fit_objective()[0]
            return cond.vsom(vsom(obj, rows, start=self.evaluation.theta), self.method)
        # on the iterative solver the scan needs only P y and diag(P) (estimated
        # stochastically), a set I needs P delta_I (one PCG solve)
        obj, ev = self.fit_objective()
        if rows is not None:
            return cond.msom(msom(obj, ev, rows))
        return cond.msom(msom_scan(obj, ev, top=top, diag=self._diag_P(conditioned=True)))

    def predict(self, newdata=None, random=True, interval=None, level=0.95):
        """Predictions (see :func:`lmmops.analysis.predict.predict`).

        Parameters
        ----------
        newdata : pandas.DataFrame, optional
        random : bool
        interval : {None, "confidence", "prediction"}
        level : float

        Returns
        -------
        ndarray or pandas.DataFrame
        """

        return predict(self, newdata, random=random, interval=interval, level=level)

    def plot(self, kind="diagnostics", ax=None, **kwargs):
        """Diagnostic plot (see :func:`lmmops.analysis.plots.plot`; needs matplotlib).

        Parameters
        ----------
        kind : {"caterpillar", "resid_fitted", "qq", "outliers", "diagnostics"}
        ax : matplotlib Axes, optional
        **kwargs
            ``factor``, ``level``, ``top``, ``coef``.

        Returns
        -------
        matplotlib Axes or Figure
        """

        return plot(self, kind, ax=ax, **kwargs)

    # ------------------------------------------------------------------ output
    def to_dict(self):
        """The machine-readable result (the ``lmmops fit --json`` contract).

        Returns
        -------
        dict
            Keys: ``lmmops_version``, ``formula``, ``method``, ``solver``, ``n_obs``,
            ``n_levels``, ``loglik``, ``reml_criterion`` (REML) or ``deviance`` (ML),
            ``aic``, ``bic``, ``df``, ``fixef``, ``fixef_se``, ``variances``, ``stddev``,
            ``theta``, ``converged``, ``iterations``, ``n_evaluations``, ``restarts``,
            ``gradient_norm``, ``elapsed_s``, ``singular``, ``notes``, ``mc_stderr``
            (Monte Carlo standard errors of ``loglik`` and of each variance; 0 for the
            direct solver), ``variances_se`` (standard errors of ``variances`` from the
            inverse average information; null where not available) and
            ``rank_deficient`` (names of the dropped aliased coefficients, which appear
            in ``fixef`` and ``fixef_se`` as null), ``solver_info``
            (``preconditioner``: the iterative solver's preconditioner kind, null for the
            direct solver; ``cg_iterations``: the CG iterations of each evaluation's solve,
            empty for the direct solver; ``probe_cg_iterations``: those of the Jacobi
            probe block), ``varcorr`` (the records of :attr:`varcorr`, missing entries
            as null, each with ``vcov_se``: the standard error of ``vcov`` from
            :attr:`variances_cov`, null where not available).
        """
        out = {
            "lmmops_version": __version__,
            "formula": self.formula,
            "method": self.method,
            "solver": self.solver,
            "n_obs": int(self.n_obs),
            "n_levels": {k: int(v) for k, v in self.n_levels.items()},
            "loglik": self.loglik,
        }
        if self.method == "REML":
            out["reml_criterion"] = self.reml_criterion
        else:
            out["deviance"] = self.deviance
        out.update({
            "aic": self.aic,
            "bic": self.bic,
            "df": int(self.df),
            "fixef": {k: float(v) for k, v in self.fixef.items()},
            "fixef_se": {k: float(v) for k, v in self.fixef_se.items()},
            "variances": dict(self.variances),
            "stddev": dict(self.stddev),
            "theta": {k: float(v) for k, v in self.theta.items()},
            "converged": self.converged,
            "iterations": self.iterations,
            "n_evaluations": self.n_evaluations,
            "restarts": int(getattr(self.optsum, "restarts", 0)),
            "gradient_norm": self.gradient_norm,
            "elapsed_s": self.elapsed_s,
            "singular": self.singular,
            "notes": list(self.notes),
            "mc_stderr": {"loglik": self.mc_stderr["loglik"],
                          "variances": dict(self.mc_stderr["variances"])},
            "variances_se": self.variances_se,
            "rank_deficient": list(self.rank_deficient),
            "solver_info": {"preconditioner": self.solver_info["preconditioner"],
                            "cg_iterations": list(self.solver_info["cg_iterations"]),
                            "probe_cg_iterations":
                                list(self.solver_info["probe_cg_iterations"])},
            "options": None if self.options is None else self.options.as_dict(),
            "varcorr": [
                {"grp": r.grp, "var1": _text(r.var1), "var2": _text(r.var2),
                 "vcov": float(r.vcov),
                 "sdcor": float(r.sdcor) if math.isfinite(r.sdcor) else None,
                 "vcov_se": se if se is not None and math.isfinite(se) else None}
                for r, se in zip(self.varcorr.itertuples(index=False), self._varcorr_se())],
        })
        for key in ("fixef", "fixef_se", "variances_se"):
            out[key] = {k: (v if math.isfinite(v) else None) for k, v in out[key].items()}
        return out

    def summary(self):
        """A text summary laid out the way lme4 prints a model.

        Returns
        -------
        str
        """
        lines = []
        how = "REML" if self.method == "REML" else "maximum likelihood"
        lines.append(f"Linear mixed model fit by {how} [lmmops, solver={self.solver}]")
        lines.append(f"Formula: {self.formula}")
        if self.data_name:
            lines.append(f"   Data: {self.data_name}")
        lines.append("")
        if self.method == "REML":
            lines.append(f"REML criterion at convergence: {self.reml_criterion:.1f}")
        else:
            hdr = ["AIC", "BIC", "logLik", "deviance", "df.resid"]
            vals = [f"{self.aic:.1f}", f"{self.bic:.1f}", f"{self.loglik:.1f}",
                    f"{self.deviance:.1f}", f"{self.df_resid}"]
            w = max(max(len(h) for h in hdr), max(len(v) for v in vals)) + 1
            lines.append("".join(h.rjust(w) for h in hdr))
            lines.append("".join(v.rjust(w) for v in vals))
        lines.append("")
        lines.append("Scaled residuals: ")
        q = self._scaled_residual_quantiles()
        hdr = ["Min", "1Q", "Median", "3Q", "Max"]
        vals = [f"{v:.4f}" for v in q]
        w = max(len(v) for v in vals) + 1
        lines.append("".join(h.rjust(w) for h in hdr))
        lines.append("".join(v.rjust(w) for v in vals))
        lines.append("")
        lines.append("Random effects:")
        lines.extend(_random_effects_table(self.covariances, self.variances["Residual"]))
        groups = "; ".join(f"{k}, {v}" for k, v in self.n_levels.items())
        lines.append(f"Number of obs: {self.n_obs}, groups:  {groups}")
        lines.append("")
        lines.append("Fixed effects:")
        tab = pd.DataFrame({"Estimate": self.fixef, "Std. Error": self.fixef_se,
                            "t value": self.tvalues})
        lines.append(tab.to_string(float_format=lambda x: f"{x:.6g}"))
        if len(self.fixef) > 1:
            lines.append("")
            lines.append("Correlation of Fixed Effects:")
            sd = np.sqrt(np.diag(self.vcov.to_numpy()))
            corr = self.vcov.to_numpy() / np.outer(sd, sd)
            names = list(self.fixef.index)
            for i in range(1, len(names)):
                row = " ".join(f"{corr[i, j]:7.3f}" for j in range(i))
                lines.append(f"{names[i]:<14} {row}")
        if self.notes:
            lines.append("")
            lines.extend(self.notes)
        lines.append("")
        lines.append(
            f"optimizer: {self.optsum.optimizer}; {self.iterations} iterations, "
            f"{self.n_evaluations} evaluations, |projected gradient| "
            f"{self.gradient_norm:.2g}, converged: {self.converged}; "
            f"{self.elapsed_s:.3f} s"
        )
        return "\n".join(lines)

    def _scaled_residual_quantiles(self):
        """Min, quartiles and max of ``resid / sigma`` (for the summary)."""
        return np.quantile(self.resid / self.sigma, [0, 0.25, 0.5, 0.75, 1.0])

    def __repr__(self):
        crit = "REML criterion" if self.method == "REML" else "deviance"
        var = ", ".join(f"{k}={v:.4g}" for k, v in self.variances.items())
        return (f"<LMMResult {self.formula!r} ({self.method}, {self.solver}): "
                f"{crit} {self.objective:.4f}; variances {var}>")


def _fmt4(x):
    """Four significant digits, as R's print of variance components."""
    if x == 0:
        return "0.0000"
    digits = max(0, 4 - int(math.floor(math.log10(abs(x)))) - 1)
    return f"{x:.{digits}f}"


def _random_effects_table(covariances, residual):
    """lme4's ``Random effects:`` block: Groups, Name, Variance, Std.Dev. and, where a
    term has several columns, their correlations (lower triangle, one row per column)."""
    rows = []
    for grp, S in covariances.items():
        C = S.to_numpy()
        sd = np.sqrt(np.diag(C))
        for i, c in enumerate(S.columns):
            corr = [C[i, j] / (sd[i] * sd[j]) if sd[i] * sd[j] > 0 else np.nan
                    for j in range(i)]
            rows.append((grp if i == 0 else "", c, C[i, i], sd[i], corr))
    rows.append(("Residual", "", residual, math.sqrt(residual), []))
    gw = max(len("Groups"), max(len(r[0]) for r in rows))
    nw = max(11, max(len(r[1]) for r in rows))
    has_corr = any(r[4] for r in rows)
    head = f" {'Groups':<{gw}} {'Name':<{nw}} {'Variance':>10} {'Std.Dev.':>10}"
    out = [head + (" Corr" if has_corr else "")]
    for g, n, v, s, corr in rows:
        line = f" {g:<{gw}} {n:<{nw}} {_fmt4(v):>10} {_fmt4(s):>10}"
        if corr:
            line += " " + " ".join(f"{r:5.2f}" if math.isfinite(r) else "  NaN" for r in corr)
        out.append(line)
    return out


def _text(x):
    """A column name of :attr:`LMMResult.varcorr`, or None where it is missing."""
    return x if isinstance(x, str) else None


