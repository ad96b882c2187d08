"""The user API: :class:`LMM` (staged: build, then fit), :func:`fit`, and :class:`LMMResult`.

The shape follows lme4's modular pipeline: :meth:`LMM.from_formula` parses the formula
and validates the data (``lFormula``), :meth:`LMM.objective` returns the profiled
criterion as a function of ``theta`` (``mkLmerDevfun``), and :meth:`LMM.fit` optimises it
and packages the result (``optimizeLmer`` + ``mkMerMod``).
"""

from __future__ import annotations

import math
import time
import warnings

import numpy as np
import pandas as pd

from . import __version__
from .design import CrossedDesign
from .direct import DirectObjective, fit_direct, moment_start
from .errors import DisconnectedDesignWarning, FormulaError, LmmopsError
from .formula import (
    check_full_rank,
    fixed_effects_matrix,
    parse_formula,
    response_vector,
)

__all__ = ["LMM", "LMMResult", "fit"]

SOLVERS = ("direct",)


def _check_method(method):
    m = str(method).upper()
    if m not in ("REML", "ML"):
        raise LmmopsError(f"method must be 'REML' or 'ML', got {method!r}")
    return m


def _check_solver(solver):
    s = str(solver).lower()
    if s not in SOLVERS:
        raise LmmopsError(
            f"solver must be one of {', '.join(SOLVERS)}, got {solver!r}"
        )
    return s


class LMM:
    """A linear mixed model with crossed random intercepts, ready to fit.

    Parameters
    ----------
    design : CrossedDesign
        The grouping factors.
    X : ndarray, shape (n_obs, p)
        Fixed-effects model matrix (full column rank).
    y : ndarray, shape (n_obs,)
        Response.
    fixef_names : sequence of str, optional
        Names of the columns of X; default ``x0``, ``x1``, ...
    formula : str, optional
        The formula, for printing.
    response : str
        Name of the response, for printing.
    method : {"REML", "ML"}
        Default criterion for :meth:`fit`.

    See Also
    --------
    LMM.from_formula : build from an lme4 formula and a DataFrame.
    fit : build and fit in one call.

    Examples
    --------
    >>> import numpy as np, pandas as pd
    >>> rng = np.random.default_rng(1)
    >>> df = pd.DataFrame({"a": rng.integers(0, 8, 300), "b": rng.integers(0, 5, 300)})
    >>> df["y"] = (2.0 + rng.normal(size=8)[df.a] + 0.5 * rng.normal(size=5)[df.b]
    ...            + rng.normal(size=300))
    >>> model = LMM.from_formula("y ~ 1 + (1|a) + (1|b)", df)
    >>> model
    LMM('y ~ 1 + (1|a) + (1|b)', n_obs=300, levels={'a': 8, 'b': 5}, p=1)
    >>> res = model.fit()
    >>> res.converged
    True
    """

    def __init__(self, design, X, y, fixef_names=None, formula=None, response="y",
                 method="REML", data_name=None):
        self.design = design
        self.X = np.ascontiguousarray(X, dtype=np.float64)
        self.y = np.ascontiguousarray(y, dtype=np.float64).ravel()
        if self.X.ndim != 2 or self.X.shape[0] != self.y.shape[0]:
            raise LmmopsError("X must be 2-d with one row per observation")
        if design.n_obs != self.y.shape[0]:
            raise LmmopsError(
                f"the design has {design.n_obs} rows but y has {self.y.shape[0]}"
            )
        if not np.all(np.isfinite(self.y)):
            raise LmmopsError("the response has missing or non-finite values")
        self.fixef_names = list(fixef_names) if fixef_names is not None else [
            f"x{j}" for j in range(self.X.shape[1])
        ]
        check_full_rank(self.X, self.fixef_names)
        self.formula = formula
        self.response = response
        self.method = _check_method(method)
        self.data_name = data_name
        self.build_s = 0.0
        self._objectives = {}
        self._warn_disconnected()

    def _warn_disconnected(self):
        d = self.design
        if d.n_factors < 2:
            return
        crossed = []
        for k in range(d.n_factors):
            nested = False
            for l in range(d.n_factors):
                if l != k and d.n_levels[l] < d.n_levels[k]:
                    N = d.crosstab(k, l)
                    if np.all(np.diff(N.indptr) == 1):
                        nested = True
                        break
            if not nested:
                crossed.append(k)
        if len(crossed) < 2:
            return
        sub = d.subset_factors(crossed) if len(crossed) < d.n_factors else d
        ncomp, _ = sub.connected_components()
        if ncomp > 1:
            warnings.warn(
                f"the design is disconnected: the level graph of the crossed factors "
                f"{', '.join(sub.names)} has {ncomp} connected components. REML and ML are "
                "still well defined, but the components share information only through the "
                "variance parameters; check that this is intended",
                DisconnectedDesignWarning, stacklevel=3,
            )

    @classmethod
    def from_formula(cls, formula, data, method="REML", data_name=None):
        """Build a model from an lme4 formula and a DataFrame.

        Parameters
        ----------
        formula : str
            lme4 formula with random intercepts, e.g.
            ``"y ~ 1 + service + (1|s) + (1|d) + (1|dept)"``.
        data : pandas.DataFrame
        method : {"REML", "ML"}
        data_name : str, optional
            Name of the data, for printing.

        Returns
        -------
        LMM

        Raises
        ------
        FormulaError
            For an unparsable formula, an unknown column, a non-numeric response, or
            missing values.
        DesignError
            For a grouping factor with missing values, a single level, or as many levels as
            observations.
        RankDeficientError
            If the fixed-effects matrix is rank deficient (naming the aliased columns).
        NotImplementedError
            For random slopes.
        """
        t0 = time.perf_counter()
        if not isinstance(data, pd.DataFrame):
            raise FormulaError(f"data must be a pandas DataFrame, got {type(data).__name__}")
        pf = parse_formula(formula)
        y = response_vector(data, pf.response)
        design = CrossedDesign.from_frame(data, list(pf.random))
        X, names = fixed_effects_matrix(pf.fixed, data)
        model = cls(design, X, y, fixef_names=names, formula=pf.formula,
                    response=pf.response, method=method, data_name=data_name)
        model.build_s = time.perf_counter() - t0
        return model

    @property
    def n_obs(self):
        """int: number of observations."""
        return self.y.shape[0]

    def objective(self, method=None):
        """The profiled criterion as a callable of ``theta`` (lme4's ``devfun``).

        Parameters
        ----------
        method : {"REML", "ML"}, optional
            Default: the model's method.

        Returns
        -------
        DirectObjective
            ``obj(theta)`` returns the REML criterion or ML deviance;
            ``obj.evaluate(theta)`` returns everything at ``theta``.
        """
        m = _check_method(method or self.method)
        if m not in self._objectives:
            self._objectives[m] = DirectObjective(self.design, self.X, self.y, method=m)
        return self._objectives[m]

    def fit(self, method=None, solver="direct", start=None, verbose=False, maxiter=100):
        """Fit by REML or ML.

        Parameters
        ----------
        method : {"REML", "ML"}, optional
            Default: the model's method.
        solver : {"direct"}
            ``"direct"``: the exact blocked-Cholesky solver.
        start : array_like, optional
            Initial ``theta`` (relative standard deviations, one per factor); default from
            one-way moment estimators.
        verbose : bool
            Print one line per iteration.
        maxiter : int
            Maximum number of optimiser iterations.

        Returns
        -------
        LMMResult
        """
        method = _check_method(method or self.method)
        solver = _check_solver(solver)
        t0 = time.perf_counter()
        obj = self.objective(method)
        if start is None:
            start = moment_start(self.design, self.X, self.y)
        callback = None
        if verbose:
            def callback(it, theta, f):
                print(f"iteration {it:3d}  criterion {f:.6f}  theta {np.round(theta, 6)}")
        ev, opt = fit_direct(obj, start, maxiter=maxiter, callback=callback)
        resid = obj.residuals(ev)
        elapsed = self.build_s + (time.perf_counter() - t0)
        return LMMResult(self, ev, opt, method, solver, resid, elapsed)

    def __repr__(self):
        levels = dict(zip(self.design.names, self.design.n_levels))
        return (f"LMM({self.formula!r}, n_obs={self.n_obs}, levels={levels}, "
                f"p={self.X.shape[1]})")


def fit(formula, data, method="REML", solver="direct", **kwargs):
    """Fit a linear mixed model with crossed random intercepts.

    Parameters
    ----------
    formula : str
        lme4 formula, e.g. ``"y ~ 1 + service + (1|s) + (1|d) + (1|dept)"``.
    data : pandas.DataFrame
    method : {"REML", "ML"}
    solver : {"direct"}
    **kwargs
        Passed to :meth:`LMM.fit` (``start``, ``verbose``, ``maxiter``).

    Returns
    -------
    LMMResult

    Examples
    --------
    >>> import numpy as np, pandas as pd
    >>> import lmmops
    >>> rng = np.random.default_rng(0)
    >>> df = pd.DataFrame({"g": rng.integers(0, 10, 400), "h": rng.integers(0, 6, 400)})
    >>> df["y"] = rng.normal(size=10)[df.g] + rng.normal(size=6)[df.h] + rng.normal(size=400)
    >>> res = lmmops.fit("y ~ 1 + (1|g) + (1|h)", df)
    >>> sorted(res.variances)
    ['Residual', 'g', 'h']
    >>> bool(res.loglik < 0)
    True
    """
    data_name = kwargs.pop("data_name", None)
    model = LMM.from_formula(formula, data, method=method, data_name=data_name)
    return model.fit(solver=solver, **kwargs)


class LMMResult:
    """A fitted linear mixed model.

    Attributes
    ----------
    formula, method, solver : str
    n_obs : int
    n_levels : dict
        Factor name to level count.
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
    optsum : OptSummary
    """

    def __init__(self, model, ev, opt, method, solver, resid, elapsed):
        self.model = model
        self.formula = model.formula
        self.method = method
        self.solver = solver
        self.data_name = model.data_name
        d = model.design
        self.n_obs = model.n_obs
        self.n_levels = dict(zip(d.names, d.n_levels))
        names = model.fixef_names
        self.fixef = pd.Series(ev.beta, index=names, name="Estimate")
        se = np.sqrt(np.diag(ev.beta_cov))
        self.fixef_se = pd.Series(se, index=names, name="Std. Error")
        self.tvalues = pd.Series(ev.beta / se, index=names, name="t value")
        self.vcov = pd.DataFrame(ev.beta_cov, index=names, columns=names)
        self.theta = pd.Series(ev.theta, index=list(d.names), name="theta")
        self.sigma = float(np.sqrt(ev.sigma2))
        self.variances = {nm: float(ev.sigma2 * t * t) for nm, t in zip(d.names, ev.theta)}
        self.variances["Residual"] = float(ev.sigma2)
        self.stddev = {k: float(np.sqrt(v)) for k, v in self.variances.items()}
        self.objective = float(ev.objective)
        self.loglik = -0.5 * self.objective
        self.reml_criterion = self.objective if method == "REML" else None
        self.deviance = self.objective if method == "ML" else None
        p = len(names)
        self.df = p + d.n_factors + 1
        self.aic = -2.0 * self.loglik + 2.0 * self.df
        self.bic = -2.0 * self.loglik + math.log(self.n_obs) * self.df
        self.df_resid = self.n_obs - self.df
        self.ranef = {
            nm: pd.Series(ev.theta[k] * ev.v[k], index=d.levels[k].rename(nm), name=nm)
            for k, nm in enumerate(d.names)
        }
        self.resid = resid
        self.fitted = model.y - resid
        self.converged = bool(opt.converged)
        self.iterations = int(opt.iterations)
        self.n_evaluations = int(opt.n_evaluations)
        self.gradient_norm = float(opt.gradient_norm)
        self.elapsed_s = float(elapsed)
        self.optsum = opt
        self.notes = []
        zero = [nm for nm, t in zip(d.names, ev.theta) if t == 0.0]
        self.singular = bool(zero)
        if zero:
            self.notes.append(
                "boundary (singular) fit: the variance of "
                + ", ".join(f"'{z}'" for z in zero)
                + " is estimated as 0"
            )
        if not self.converged:
            self.notes.append(f"did not converge: {opt.message}")

    def residuals(self, kind="conditional"):
        """Residuals of the fit.

        Parameters
        ----------
        kind : {"conditional", "marginal"}
            ``"conditional"``: ``y - X beta - Z b``; ``"marginal"``: ``y - X beta``.

        Returns
        -------
        ndarray, shape (n_obs,)
        """
        if kind == "conditional":
            return self.resid.copy()
        if kind == "marginal":
            return self.model.y - self.model.X @ self.fixef.to_numpy()
        raise LmmopsError(f"unknown residual kind {kind!r}; use 'conditional' or 'marginal'")

    # ------------------------------------------------------------------ output
    def to_dict(self):
        """The machine-readable result (the ``lmmops fit --json`` contract).

        Returns
        -------
        dict
            Keys: ``lmmops_version``, ``formula``, ``method``, ``solver``, ``n_obs``,
            ``n_levels``, ``loglik``, ``reml_criterion`` (REML) or ``deviance`` (ML),
            ``aic``, ``bic``, ``df``, ``fixef``, ``fixef_se``, ``variances``, ``stddev``,
            ``theta``, ``converged``, ``iterations``, ``n_evaluations``,
            ``gradient_norm``, ``elapsed_s``, ``singular``, ``notes``.
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
            "gradient_norm": self.gradient_norm,
            "elapsed_s": self.elapsed_s,
            "singular": self.singular,
            "notes": list(self.notes),
        })
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
        q = np.quantile(self.resid / self.sigma, [0, 0.25, 0.5, 0.75, 1.0])
        hdr = ["Min", "1Q", "Median", "3Q", "Max"]
        vals = [f"{v:.4f}" for v in q]
        w = max(len(v) for v in vals) + 1
        lines.append("".join(h.rjust(w) for h in hdr))
        lines.append("".join(v.rjust(w) for v in vals))
        lines.append("")
        lines.append("Random effects:")
        rows = [(nm, "(Intercept)", self.variances[nm], self.stddev[nm])
                for nm in self.n_levels]
        rows.append(("Residual", "", self.variances["Residual"], self.stddev["Residual"]))
        gw = max(len("Groups"), max(len(r[0]) for r in rows))
        lines.append(f" {'Groups':<{gw}} {'Name':<11} {'Variance':>10} {'Std.Dev.':>10}")
        for g, n, v, s in rows:
            lines.append(f" {g:<{gw}} {n:<11} {_fmt4(v):>10} {_fmt4(s):>10}")
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
