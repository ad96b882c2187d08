"""The user API: :class:`LMM` (staged: build, then fit), :func:`fit`, and :class:`LMMResult`.

The shape follows lme4's modular pipeline: :meth:`LMM.from_formula` parses the formula
and validates the data (``lFormula``), :meth:`LMM.objective` returns the profiled
criterion as a function of ``theta`` (``mkLmerDevfun``), and :meth:`LMM.fit` optimises it
and packages the result (``optimizeLmer`` + ``mkMerMod``).
"""

from __future__ import annotations

import functools
import inspect
import math
import sys
import time
import warnings

import numpy as np
import pandas as pd

from lmmops._version import __version__
from lmmops.analysis.inference import confint, variance_covariance
from lmmops.analysis.outliers import msom, msom_scan, vsom
from lmmops.analysis.plots import plot
from lmmops.analysis.predict import predict
from lmmops.data.checks import check_method, check_response, check_weights
from lmmops.data.conditioning import UserScaleObjective, condition
from lmmops.data.design import CrossedDesign
from lmmops.data.formula import (
    RankDeficientWarning,
    fixed_effects_matrix,
    parse_formula,
    rank_message,
    response_vector,
)
from lmmops.errors import ArgumentError, DisconnectedDesignWarning, FormulaError, LmmopsError
from lmmops.estimation.direct import DirectObjective, moment_start
from lmmops.estimation.iterative import (
    DEFAULT_PRECONDITIONER,
    IterativeObjective,
    check_preconditioner,
)
from lmmops.estimation.protocol import diag_P as diag_P_of
from lmmops.estimation.protocol import level_diagonal_inverse, optimise, solver_info
from lmmops.guard import max_dense_bytes
from lmmops.options import resolve_options
from lmmops.threads import limit_threads, plan_threads

__all__ = ["LMM", "LMMResult", "fit"]

SOLVERS = ("auto", "direct", "iterative")

#: ``solver="auto"`` uses the direct solver while its dense Schur block has at most this many
#: rows (its Cholesky factor then costs at most ~2e11 flops per evaluation and
#: ``8 * AUTO_DIRECT_MAX_SCHUR**2`` bytes per copy), and the iterative solver otherwise.
AUTO_DIRECT_MAX_SCHUR = 8000


def _check_solver(solver):
    s = str(solver).lower()
    if s not in SOLVERS:
        raise LmmopsError(
            f"solver must be one of {', '.join(SOLVERS)}, got {solver!r}"
        )
    return s


def _thread_limited(fit):
    """Run ``LMM.fit`` inside :func:`lmmops.threads.limit_threads` (its ``threads=``).

    The plan depends on the solver the fit will use: the exact solver's dense Schur block
    size, or the iterative solver's parallel kernels. It is recorded in the notes.
    """
    signature = inspect.signature(fit)

    @functools.wraps(fit)
    def wrapper(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        arg = bound.arguments
        picked, _ = self.choose_solver(arg["solver"])
        q = list(self.design.n_levels)
        dense = sum(q) - max(q) + self.X.shape[1] + 1 if picked == "direct" else 0
        # the shorthands folded into one Options here, once; the fit receives only that
        opts = resolve_options(arg["options"], maxiter=arg["maxiter"],
                               n_probes=arg["n_probes"], seed=arg["seed"],
                               cg_rtol=arg["rtol"], threads=arg["threads"])
        arg.update(options=opts, maxiter=None, n_probes=None, seed=None, rtol=None,
                   threads=None)
        plan = plan_threads(opts.threads, dense_size=dense, parallel=picked == "iterative")
        with limit_threads(plan):
            res = fit(*bound.args, **bound.kwargs)
        res.notes.append(plan.note)
        return res

    return wrapper


class LMM:
    """A linear mixed model with crossed random intercepts, ready to fit.

    Parameters
    ----------
    design : CrossedDesign
        The grouping factors.
    X : ndarray, shape (n_obs, p)
        Fixed-effects model matrix. If it is rank deficient, the aliased columns (those in
        the span of the columns before them, by R's column-order test relative to each
        column's own conditioned norm) are dropped with lme4's message and reported as
        NaN coefficients (the selected generalised inverse with ``tau_1 = 0``); see
        :func:`lmmops.data.formula.rank_columns`.
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
    weights : array_like, shape (n_obs,), optional
        Prior weights, ``R = s^2 W^{-1}`` (lme4's ``weights=``): finite and > 0.

    Attributes
    ----------
    X : ndarray, shape (n_obs, rank)
        The kept (full-rank) columns of the fixed-effects matrix, used in the fit.
    X_full : ndarray, shape (n_obs, p)
        All columns, as given.
    conditioning : lmmops.data.conditioning.Conditioning
        The map between the user's scale and the conditioned data the solvers see.
    X_conditioned, y_conditioned : ndarray
        The conditioned ``X_c = X T`` (orthonormal columns of unit root mean square) and
        ``y_c = (y - X_c b) / s``; every reported quantity is mapped back to the scale of
        ``X`` and ``y``, so a fit does not depend on the units or the origin of y or of a
        covariate (see :mod:`lmmops.data.conditioning`).
    fixef_names : list of str
        Names of the kept columns; ``all_fixef_names`` names every column.
    rank_deficient : list of str
        Names of the dropped (aliased) columns; empty for a full-rank X.
    weights : ndarray or None

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
                 method="REML", data_name=None, weights=None):
        self.design = design
        design.check_distinct_partitions()
        self.X = np.ascontiguousarray(X, dtype=np.float64)
        self.y = check_response(y, response)
        if self.X.ndim != 2 or self.X.shape[0] != self.y.shape[0]:
            raise LmmopsError("X must be 2-d with one row per observation")
        if design.n_obs != self.y.shape[0]:
            raise LmmopsError(
                f"the design has {design.n_obs} rows but y has {self.y.shape[0]}"
            )
        if not np.all(np.isfinite(self.X)):
            raise LmmopsError("the fixed-effects matrix X has missing or non-finite values")
        names = list(fixef_names) if fixef_names is not None else [
            f"x{j}" for j in range(self.X.shape[1])
        ]
        self.weights = None if weights is None else check_weights(weights, self.y.shape[0])
        self.all_fixef_names = names
        self.X_full = self.X
        # the solvers see conditioned data (lmmops.data.conditioning); results are mapped back
        self.conditioning, keep, self.X_conditioned, self.y_conditioned = condition(
            self.X, self.y)
        kept = set(keep.tolist())
        dropped = [names[j] for j in range(len(names)) if j not in kept]
        self.keep = keep
        self.rank_deficient = dropped
        self.rank_message = rank_message(dropped) if dropped else None
        if dropped:
            warnings.warn(self.rank_message, RankDeficientWarning, stacklevel=2)
            self.X = np.ascontiguousarray(self.X[:, keep])
        self.fixef_names = [names[j] for j in keep]
        self.fixed_spec = None
        self.formula = formula
        self.response = response
        self.method = check_method(method)
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
    def from_formula(cls, formula, data, method="REML", data_name=None, weights=None):
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
        weights : str or array_like, optional
            Prior weights (``R = s^2 W^{-1}``): the name of a column of ``data`` or an
            array with one value per row, finite and > 0.

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
        LmmopsError
            For invalid weights (unknown column, wrong length, non-finite or <= 0).
        NotImplementedError
            For random slopes.
        """
        t0 = time.perf_counter()
        if not isinstance(data, pd.DataFrame):
            raise FormulaError(f"data must be a pandas DataFrame, got {type(data).__name__}")
        pf = parse_formula(formula)
        y = response_vector(data, pf.response)
        design = CrossedDesign.from_frame(data, list(pf.random))
        X, names, spec = fixed_effects_matrix(pf.fixed, data, return_spec=True)
        if isinstance(weights, str):
            if weights not in data.columns:
                raise LmmopsError(
                    f"unknown weights column '{weights}'; available columns: "
                    f"{', '.join(map(str, data.columns))}"
                )
            col = data[weights]
            if not (pd.api.types.is_numeric_dtype(col) or pd.api.types.is_bool_dtype(col)):
                raise LmmopsError(f"weights must be numeric: column '{weights}' has dtype "
                                  f"{col.dtype}")
            weights = col.to_numpy(dtype=np.float64, na_value=np.nan)
        elif weights is not None:  # a Series is aligned to the rows by its index
            weights = check_weights(weights, len(data), index=data.index)
        model = cls(design, X, y, fixef_names=names, formula=pf.formula,
                    response=pf.response, method=method, data_name=data_name,
                    weights=weights)
        model.fixed_spec = spec
        model.parsed_formula = pf
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
        UserScaleObjective
            ``obj(theta)`` returns the REML criterion or ML deviance of the user's X and
            y; ``obj.evaluate(theta)`` returns everything at ``theta`` on the user's scale.
            The exact solver's :class:`~lmmops.estimation.direct.DirectObjective` on the
            conditioned data is ``obj.conditioned``.
        """
        m = check_method(method or self.method)
        if m not in self._objectives:
            obj = DirectObjective(self.design, self.X_conditioned, self.y_conditioned,
                                  method=m, weights=self.weights)
            self._objectives[m] = UserScaleObjective(obj, self.conditioning)
        return self._objectives[m]

    def choose_solver(self, solver="auto"):
        """Resolve ``solver="auto"`` to ``"direct"`` or ``"iterative"``.

        Parameters
        ----------
        solver : {"auto", "direct", "iterative"}

        Returns
        -------
        picked : str
        reason : str
            Why, for the result's notes.
        """
        solver = _check_solver(solver)
        q = list(self.design.n_levels)
        m = sum(q) - max(q) + self.X.shape[1] + 1
        if solver != "auto":
            return solver, f"solver '{solver}' requested"

        fits = 4 * 8 * m * m <= max_dense_bytes()
        if m <= AUTO_DIRECT_MAX_SCHUR and fits:
            return "direct", (f"solver 'auto' picked 'direct': the dense Schur block is "
                              f"{m} x {m} ({8 * m * m / 2**20:.1f} MiB)")
        return "iterative", (f"solver 'auto' picked 'iterative': the dense Schur block "
                             f"would be {m} x {m} ({8 * m * m / 2**30:.2f} GiB per copy)")

    def iterative_objective(self, method=None, n_probes=16, seed=0, rtol=1e-8, **options):
        """The matrix-free stochastic criterion
        (:class:`lmmops.estimation.iterative.IterativeObjective`).

        Parameters
        ----------
        method : {"REML", "ML"}, optional
        n_probes : int
            Rademacher probes (fixed for the whole fit: common random numbers).
        seed : int
            Seed of the probes.
        rtol : float
            PCG tolerance.
        **options
            Passed to :class:`~lmmops.estimation.iterative.IterativeObjective`.

        Returns
        -------
        IterativeObjective
            On the conditioned data (:attr:`X_conditioned`, :attr:`y_conditioned`): its
            criterion differs from the user-scale one by
            ``conditioning.criterion_offset(method)`` and its estimates map back through
            :attr:`conditioning`.
        """
        m = check_method(method or self.method)
        return IterativeObjective(self.design, self.X_conditioned, self.y_conditioned,
                                  method=m, n_probes=n_probes,
                                  seed=seed, rtol=rtol, weights=self.weights, **options)

    @_thread_limited
    def fit(self, method=None, solver="auto", start=None, verbose=False, maxiter=None,
            n_probes=None, seed=None, rtol=None, progress=None, threads=None,
            preconditioner=None, options=None):
        """Fit by REML or ML.

        Parameters
        ----------
        method : {"REML", "ML"}, optional
            Default: the model's method.
        solver : {"auto", "direct", "iterative"}
            ``"direct"``: the exact blocked-Cholesky solver. ``"iterative"``: matrix-free
            PCG with stochastic log-determinant and trace estimators (Monte Carlo standard
            errors in ``mc_stderr``). ``"auto"`` (default): direct while the dense Schur
            block is small (see :meth:`choose_solver`), iterative otherwise.
        start : array_like, optional
            Initial ``theta`` (relative standard deviations, one per factor); default from
            one-way moment estimators.
        verbose : bool
            Print one line per iteration (criterion, step, CG iterations, Monte Carlo
            error) to standard error.
        maxiter : int, optional
            Maximum number of optimiser iterations (default 100, ``options.maxiter``).
        n_probes, seed, rtol : optional
            Shorthands for ``options.n_probes``, ``options.seed`` and ``options.cg_rtol``
            (defaults 16, 0, 1e-8). Iterative solver only: probes (at least 2, see
            :func:`lmmops.estimation.iterative.check_n_probes`), their seed, and the PCG tolerance
            (``0 < rtol < 1``). The iterative fit is
            :func:`lmmops.estimation.stochastic.fit_iterative`: converged within its Monte Carlo
            error and checked with as many fresh probes again, which then join the
            estimate.
        progress : callable, optional
            Called as ``progress(message)`` once per iteration (overrides ``verbose``).
        threads : "auto" or int, optional
            Shorthand for ``options.threads``. BLAS and Numba threads during the fit
            (:mod:`lmmops.threads`), restored
            afterwards. ``"auto"`` (default): one BLAS thread unless the exact solver's
            dense block is large and cores are idle, Numba's threads on idle cores only;
            an integer ``n``: ``n`` threads for both. The choice is in the notes.
        preconditioner : str, optional
            Iterative solver only: the level-space preconditioner of its PCG solves, one
            of :data:`lmmops.estimation.iterative.PRECONDITIONERS` (``"spectral"`` needs
            two factors); default
            :data:`lmmops.estimation.iterative.DEFAULT_PRECONDITIONER`. The kind used and
            the CG iterations per evaluation are in ``LMMResult.solver_info``.
        options : Options, optional
            Every solver and optimiser setting (:class:`lmmops.options.Options`, like lme4's
            ``lmerControl``): the optimiser's ``maxiter``, ``tol``, ``boundary_tol`` and
            ``restart``; the iterative solver's ``n_probes``, ``seed``, ``cg_rtol``,
            ``cg_maxiter``, ``deflation_rank`` and ``step_tol``; ``threads``. A keyword
            given above overrides the same setting here. The settings used are
            ``result.options``.

        Returns
        -------
        LMMResult

        Raises
        ------
        LmmopsError
            For an unknown method, solver, preconditioner or ``threads``, fewer than 2
            probes, ``rtol`` outside ``(0, 1)``, or a preconditioner with
            ``solver="direct"``.
        """

        method = check_method(method or self.method)
        picked, reason = self.choose_solver(solver)
        opts = resolve_options(options, maxiter=maxiter, n_probes=n_probes, seed=seed,
                               cg_rtol=rtol, threads=threads)
        if preconditioner is not None:
            check_preconditioner(preconditioner, self.design.n_factors)
            if solver == "direct":
                raise ArgumentError(
                    f"preconditioner={preconditioner!r} applies to the iterative solver; "
                    "the direct solver factors the system exactly (drop the preconditioner "
                    "or use solver='iterative')")
        t0 = time.perf_counter()
        if picked == "iterative":
            extra = {} if opts.deflation_rank is None else {
                "deflation_rank": opts.deflation_rank}
            obj = self.iterative_objective(
                method, n_probes=opts.n_probes, seed=opts.seed, rtol=opts.cg_rtol,
                maxiter=opts.cg_maxiter,
                preconditioner=preconditioner or DEFAULT_PRECONDITIONER, **extra)
        else:
            obj = self.objective(method).conditioned
        if start is None:
            start = moment_start(self.design, self.X_conditioned, self.y_conditioned)
        offset = self.conditioning.criterion_offset(method)  # progress on the user's scale
        if progress is None and verbose:
            def progress(msg):
                print(msg, file=sys.stderr, flush=True)
        callback = None
        if progress is not None:
            state = {"theta": np.asarray(start, dtype=float), "cg": 0}

            def callback(it, theta, f):
                step = float(np.max(np.abs(np.asarray(theta) - state["theta"])))
                state["theta"] = np.asarray(theta, dtype=float).copy()
                extra = ""
                if picked == "iterative":
                    cg = obj.cg_iterations - state["cg"]
                    state["cg"] = obj.cg_iterations
                    extra = (f"  CG iterations {cg:5d}  MC error "
                             f"{obj.last.get('objective_se', 0.0):.3g}")
                progress(f"iteration {it:3d}  criterion {f + offset:.6f}  step {step:.3g}{extra}  "
                         f"theta {np.round(theta, 6)}")
        ev, opt = optimise(obj, start, opts, callback)
        resid = obj.residuals(ev)
        elapsed = self.build_s + (time.perf_counter() - t0)
        res = LMMResult(self, ev, opt, method, picked, resid, elapsed)
        res._objective = obj
        res.options = opts
        if solver == "auto":
            res.notes.append(reason)
            if preconditioner is not None and picked == "direct":
                res.notes.append(f"preconditioner={preconditioner!r} unused: the direct "
                                 "solver factors the system exactly")
        if picked == "iterative":
            res._set_mc_stderr(obj, ev)
        res.solver_info = solver_info(obj)
        return res

    def __repr__(self):
        levels = dict(zip(self.design.names, self.design.n_levels))
        return (f"LMM({self.formula!r}, n_obs={self.n_obs}, levels={levels}, "
                f"p={self.X.shape[1]})")


def fit(formula, data, method="REML", solver="auto", **kwargs):
    """Fit a linear mixed model with crossed random intercepts.

    Parameters
    ----------
    formula : str
        lme4 formula, e.g. ``"y ~ 1 + service + (1|s) + (1|d) + (1|dept)"``.
    data : pandas.DataFrame
    method : {"REML", "ML"}
    solver : {"auto", "direct", "iterative"}
        See :meth:`LMM.fit`.
    **kwargs
        ``weights`` (a column name or an array of prior weights, see
        :meth:`LMM.from_formula`) and ``data_name``; the rest is passed to
        :meth:`LMM.fit` (``start``, ``verbose``, ``maxiter``, ``n_probes``, ``seed``,
        ``rtol``, ``progress``, ``threads``).

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
    weights = kwargs.pop("weights", None)
    model = LMM.from_formula(formula, data, method=method, data_name=data_name,
                             weights=weights)
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
        With user-scale criteria.
    evaluation : Evaluation
        The solver's evaluation at the optimum, on the conditioned scale of
        ``model.X_conditioned`` and ``model.y_conditioned`` (``model.conditioning``
        maps it back; every attribute above is already on the user's scale).
    """

    #: the settings of the fit (:class:`lmmops.options.Options`), set by :meth:`LMM.fit`
    options = None

    def __init__(self, model, ev, opt, method, solver, resid, elapsed):
        self.model = model
        self.formula = model.formula
        self.method = method
        self.solver = solver
        self.data_name = model.data_name
        d = model.design
        self.n_obs = model.n_obs
        self.n_levels = dict(zip(d.names, d.n_levels))
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
        self.fixef = pd.Series(beta, index=names, name="Estimate")
        se = np.sqrt(np.diag(cov))
        self.fixef_se = pd.Series(se, index=names, name="Std. Error")
        self.tvalues = pd.Series(beta / se, index=names, name="t value")
        self.vcov = pd.DataFrame(cov, index=names, columns=names)
        self.evaluation = ev
        self.theta = pd.Series(ev.theta, index=list(d.names), name="theta")
        sigma2 = s2 * ev.sigma2
        self.sigma = float(np.sqrt(sigma2))
        self.variances = {nm: float(sigma2 * t * t) for nm, t in zip(d.names, ev.theta)}
        self.variances["Residual"] = float(sigma2)
        self.stddev = {k: float(np.sqrt(v)) for k, v in self.variances.items()}
        self.objective = cond.criterion(ev.objective, method)
        self.loglik = -0.5 * self.objective
        self.reml_criterion = self.objective if method == "REML" else None
        self.deviance = self.objective if method == "ML" else None
        p = len(keep)
        self.df = p + d.n_factors + 1
        self.aic = -2.0 * self.loglik + 2.0 * self.df
        self.bic = -2.0 * self.loglik + math.log(self.n_obs) * self.df
        self.df_resid = self.n_obs - self.df
        self.ranef = {
            nm: pd.Series(s * ev.theta[k] * ev.v[k], index=d.levels[k].rename(nm), name=nm)
            for k, nm in enumerate(d.names)
        }
        self.resid = s * np.asarray(resid)
        self.fitted = model.y - self.resid
        self.converged = bool(opt.converged)
        self.iterations = int(opt.iterations)
        self.n_evaluations = int(opt.n_evaluations)
        self.gradient_norm = float(opt.gradient_norm)
        self.elapsed_s = float(elapsed)
        self.optsum = cond.opt_summary(opt, method)
        self.notes = []
        if self.rank_deficient:
            self.notes.append(model.rank_message)
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
        self.mc_stderr = {"loglik": 0.0, "variances": {k: 0.0 for k in self.variances}}
        #: The solver's record: ``preconditioner`` (the kind, None for the direct solver),
        #: ``cg_iterations`` (per evaluation, the CG iterations of the solve with that
        #: preconditioner; empty for the direct solver) and ``probe_cg_iterations`` (the
        #: same for the Jacobi probe block of the stochastic estimates).
        self.solver_info = {"preconditioner": None, "cg_iterations": [],
                            "probe_cg_iterations": []}

    def _set_mc_stderr(self, obj, ev):
        """Monte Carlo standard errors of an iterative fit (delta method).

        :func:`lmmops.estimation.stochastic.fit_iterative` leaves ``ev.tau_cov``, the Monte Carlo
        covariance of ``tau_hat = theta_hat^2`` (``H^{-1} Cov(g) H^{-1}`` on the free
        components, the spread of ``max(0, .)`` on boundary ones). The variances
        ``s^2 tau_k`` and the residual variance ``s^2(tau)`` follow by the delta method
        (``d s^2 / d tau_k = -||v_k||^2 / (tau_k dof)``, 0 on the boundary, where the
        estimate is held at 0). The log-likelihood's error is half the criterion's.
        """
        K = len(self.theta)
        tau = np.asarray(ev.theta, dtype=np.float64) ** 2
        C = np.asarray(getattr(ev, "tau_cov", np.full((K, K), np.nan)), dtype=np.float64)
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
        names = list(self.variances)
        self.mc_stderr = {
            "loglik": 0.5 * float(getattr(ev, "objective_se", 0.0)),
            "variances": {nm: float(x) for nm, x in zip(names, se)},
        }
        opt = self.optsum
        probes = getattr(opt, "n_probes", obj.n_probes)
        first = getattr(opt, "n_probes_initial", probes)
        used = f"{first} probes" if probes == first else f"{first} probes ({probes} in the end)"
        line = (f"iterative solver: {used}, {obj.cg_iterations} CG iterations; Monte Carlo "
                f"standard error of the log-likelihood {self.mc_stderr['loglik']:.3g}")
        shortfall = getattr(opt, "loglik_shortfall", None)
        if shortfall is not None:
            line += (f", expected log-likelihood shortfall from the Monte Carlo error of the "
                     f"estimate {shortfall:.2g}")
        self.notes.append(line)
        self.notes.extend(getattr(opt, "notes", []))

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

    def _fit_objective(self):
        """The objective the fit used and its evaluation at the optimum (conditioned
        scale), for the protocol functions of :mod:`lmmops.estimation.protocol`."""
        obj = getattr(self, "_objective", None)
        if obj is None:
            obj = self.model.objective(self.method).conditioned
        return obj, self.evaluation

    def _direct(self):
        """The exact solver's objective and evaluation at the optimum (conditioned scale)."""
        if self.solver != "direct":
            raise LmmopsError(f"this quantity is exact only on the direct solver (the fit "
                              f"used solver={self.solver!r}); refit with solver='direct'")
        return self._fit_objective()

    def _diag_P(self, conditioned=False):
        """``diag(P)``: exact on the direct solver; on the iterative solver a stochastic
        diagonal estimate (64 probes) whose standard errors are kept in ``_dP_se``.
        On the user's scale (``P`` scales as ``1/s^2``), or the solver's with
        ``conditioned=True``."""
        if getattr(self, "_dP_c", None) is None:
            est = diag_P_of(*self._fit_objective())
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
        """Prediction error variances of the BLUPs, per factor.

        Parameters
        ----------
        conditional_on_beta : bool
            ``False``: the diagonal of ``C^{ZZ} = G - G Z'P Z G`` (accounts for estimating
            ``tau``); ``True``: lme4's ``condVar``,
            ``s^2 Lambda (Lambda Z'WZ Lambda + I)^{-1} Lambda``, given ``tau_hat``.

        Returns
        -------
        dict of pandas.Series
            Indexed by level, as :attr:`ranef`. Exact on the direct solver; on the
            iterative solver a stochastic diagonal estimate
            (:meth:`lmmops.estimation.iterative.IterativeObjective.diag_inverse`) whose Monte Carlo
            standard errors are then in ``ranef_pev_se``.
        """
        d = self.model.design
        obj, ev = self._fit_objective()
        # exact (stderr 0) on the direct solver; on the iterative one a stochastic
        # diagonal (control variate + probes) whose Monte Carlo errors are kept
        est = level_diagonal_inverse(obj, ev, z_only=conditional_on_beta)
        off = d.offsets
        dg = [est.estimate[off[k]:off[k + 1]] for k in range(d.n_factors)]
        s2 = self.sigma ** 2
        self.ranef_pev_se = {
            nm: pd.Series(s2 * ev.theta[k] ** 2 * est.stderr[off[k]:off[k + 1]],
                          index=self.ranef[nm].index, name=nm)
            for k, nm in enumerate(d.names)}
        s2 = self.sigma ** 2
        return {nm: pd.Series(s2 * ev.theta[k] ** 2 * dg[k], index=self.ranef[nm].index,
                              name=nm) for k, nm in enumerate(d.names)}

    @property
    def variances_cov(self):
        """pandas.DataFrame: covariance of the variance estimates (inverse average
        information; order: the factors, then ``Residual``)."""
        if getattr(self, "_vcov_var", None) is None:

            names = list(self.n_levels) + ["Residual"]
            cov = variance_covariance(*self._fit_objective())
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
        return {k: float(np.sqrt(max(c.loc[k, k], 0.0))) for k in c.index}

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
        """

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
            obj = self._fit_objective()[0]
            return cond.vsom(vsom(obj, rows, start=self.evaluation.theta), self.method)
        # on the iterative solver the scan needs only P y and diag(P) (estimated
        # stochastically), a set I needs P delta_I (one PCG solve)
        obj, ev = self._fit_objective()
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
            ``factor``, ``level``, ``top``.

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
            probe block).
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
