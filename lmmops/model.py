"""The user API: :class:`LMM` (staged: build, then fit) and :func:`fit`; the fit returns an
:class:`~lmmops.result.LMMResult`.

The shape follows lme4's modular pipeline: :meth:`LMM.from_formula` parses the formula
and validates the data (``lFormula``), :meth:`LMM.objective` returns the profiled
criterion as a function of ``theta`` (``mkLmerDevfun``), and :meth:`LMM.fit` optimises it
and packages the result (``optimizeLmer`` + ``mkMerMod``).
"""

from __future__ import annotations

import functools
import inspect
import sys
import time
import warnings

import numpy as np
import pandas as pd

from lmmops.data.checks import (
    check_method,
    check_response,
    check_weights,
    warn_if_disconnected,
)
from lmmops.data.conditioning import UserScaleObjective, condition
from lmmops.data.design import CrossedDesign
from lmmops.data.formula import (
    RankDeficientWarning,
    fixed_effects_matrix,
    parse_formula,
    rank_message,
    response_vector,
)
from lmmops.data.terms import build_terms, off_centre_hint, order_terms
from lmmops.distributed import fit_dask, is_dask_dataframe
from lmmops.errors import (
    ArgumentError,
    FormulaError,
    LmmopsError,
    NumericalFailure,
    RankDeficientError,
)
from lmmops.estimation.direct import DirectObjective, moment_start
from lmmops.estimation.iterative import (
    DEFAULT_PRECONDITIONER,
    IterativeObjective,
    check_preconditioner,
)
from lmmops.estimation.protocol import optimise, progress_note
from lmmops.estimation.vector import VectorObjective
from lmmops.estimation.vector_iterative import (
    VectorIterativeObjective,
    check_slope_preconditioner,
)
from lmmops.guard import max_dense_bytes
from lmmops.options import resolve_options
from lmmops.result import LMMResult
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
        dense = self.schur_rows() if picked == "direct" else 0
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
        res.thread_plan = plan  # for the work after the fit (profile intervals)
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
                 method="REML", data_name=None, weights=None, terms=None):
        self.design = design
        #: the random-effects terms (:class:`~lmmops.data.terms.RandomEffectsTerm`), in
        #: lme4's order; default one random intercept per factor of ``design``
        self.terms = design.terms if terms is None else tuple(terms)
        #: whether a term is vector-valued or a factor carries several terms (random
        #: slopes): such models are fitted by :class:`~lmmops.estimation.vector.VectorObjective`
        self.has_slopes = not (all(t.is_intercept for t in self.terms)
                               and len(self.terms) == design.n_factors)
        design.check_distinct_partitions(None if terms is None else self.terms)
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
        """Warn when the crossed factors' level graph is disconnected
        (:func:`lmmops.data.checks.warn_if_disconnected`)."""
        warn_if_disconnected(self.design, stacklevel=3)

    @classmethod
    def from_formula(cls, formula, data, method="REML", data_name=None, weights=None):
        """Build a model from an lme4 formula and a DataFrame.

        Parameters
        ----------
        formula : str
            lme4 formula, e.g. ``"y ~ 1 + service + (1|s) + (1|d) + (1|dept)"`` or
            ``"Reaction ~ Days + (Days | Subject)"`` (random slopes: see
            :func:`lmmops.data.terms.build_terms` for the terms and their checks).
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
            Its terms (and, for random intercepts only, the design's factors) in lme4's
            order and with lme4's names: ``findbars`` order (``(1|a/b)`` is ``(1|b:a) +
            (1|a)``), then by decreasing number of levels if a term has more levels than
            the one before it (:func:`lmmops.data.terms.order_terms`).

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
        """
        # the build's dense steps are n x p passes (conditioning, rank test): one BLAS
        # thread, as threads='auto' gives a fit with no large dense block. Two OpenBLAS
        # threads made InstEval's build 0.083 s instead of 0.023 s (load 1.1, 2 cores)
        with limit_threads("auto"):
            return cls._from_formula(formula, data, method, data_name, weights)

    @classmethod
    def _from_formula(cls, formula, data, method, data_name, weights):
        t0 = time.perf_counter()
        if not isinstance(data, pd.DataFrame):
            raise FormulaError(f"data must be a pandas DataFrame, got {type(data).__name__}")
        pf = parse_formula(formula)
        y = response_vector(data, pf.response)
        # one intercept term per factor is the design's own; anything else (slopes,
        # several terms on a factor) is built from the formula's effects, in lme4's order,
        # and its factors' partitions are checked with the terms (two names of one
        # grouping with different columns, (1|a/b) + (0 + x|a:b), fit as in lme4)
        intercepts = (all(t.is_intercept for t in pf.random_terms)
                      and len(pf.random_terms) == len(pf.random))
        design = CrossedDesign.from_frame(data, list(pf.random), check=intercepts)
        if intercepts:  # lme4's term order (mkReTrms), as build_terms orders the others
            order = order_terms(list(design.n_levels))
            if order != list(range(design.n_factors)):
                design = design.permuted(order)
        terms = None if intercepts else build_terms(pf, data, design)
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
                    weights=weights, terms=terms)
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
            exact = VectorObjective if self.has_slopes else DirectObjective
            first = self.design if not self.has_slopes else self.terms
            obj = exact(first, self.X_conditioned, self.y_conditioned, method=m,
                        weights=self.weights)
            self._objectives[m] = UserScaleObjective(obj, self.conditioning)
        return self._objectives[m]

    def schur_rows(self):
        """Rows of the exact solver's dense block: the random effects of every term but
        the first (the factor with the most levels, or lme4's first term), plus the fixed
        effects and the response."""
        if self.has_slopes:
            q = [t.n_random_effects for t in self.terms]
            return sum(q) - q[0] + self.X.shape[1] + 1
        q = list(self.design.n_levels)
        return sum(q) - max(q) + self.X.shape[1] + 1

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
        m = self.schur_rows()
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
        (:class:`lmmops.estimation.iterative.IterativeObjective`; for random-slope terms
        :class:`lmmops.estimation.vector_iterative.VectorIterativeObjective`, which takes
        ``preconditioner="block_jacobi"`` or ``"auto"`` and no ``deflation_rank``).

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
        if self.has_slopes:
            if options.pop("deflation_rank", None) is not None:
                raise ArgumentError("deflation_rank is for random-intercept models; the "
                                    "random-slope iterative solver has no deflation basis "
                                    "(its control variate is the block-Jacobi blocks)")
            options["preconditioner"] = check_slope_preconditioner(
                options.get("preconditioner"))
            return VectorIterativeObjective(self.terms, self.X_conditioned,
                                            self.y_conditioned, method=m, n_probes=n_probes,
                                            seed=seed, rtol=rtol, weights=self.weights,
                                            **options)
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
            :data:`lmmops.estimation.iterative.DEFAULT_PRECONDITIONER`. Random-slope
            terms take only ``"block_jacobi"`` (the default for them) or ``"auto"``; the
            other kinds are for random intercepts and raise an ``ArgumentError``. The
            kind used and the CG iterations per evaluation are in
            ``LMMResult.solver_info``.
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
            if self.has_slopes:
                check_slope_preconditioner(preconditioner)
            else:
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
                preconditioner=preconditioner or (
                    "block_jacobi" if self.has_slopes else DEFAULT_PRECONDITIONER), **extra)
        else:
            obj = self.objective(method).conditioned
        if start is None and not self.has_slopes:  # slope terms: centred_start (fit_vector)
            start = moment_start(self.design, self.X_conditioned, self.y_conditioned)
        offset = self.conditioning.criterion_offset(method)  # progress on the user's scale
        if progress is None and verbose:
            def progress(msg):
                print(msg, file=sys.stderr, flush=True)
        callback = None
        if progress is not None:
            state = {"theta": None if start is None else np.asarray(start, dtype=float)}

            def callback(it, theta, f):
                prev = state["theta"]
                step = (float("nan") if prev is None
                        else float(np.max(np.abs(np.asarray(theta) - prev))))
                state["theta"] = np.asarray(theta, dtype=float).copy()
                extra = progress_note(obj, state)
                progress(f"iteration {it:3d}  criterion {f + offset:.6f}  step {step:.3g}{extra}  "
                         f"theta {np.round(theta, 6)}")
        hint = off_centre_hint(self.terms) if self.has_slopes else ""
        try:
            ev, opt = optimise(obj, start, opts, callback)
        except (RankDeficientError, NumericalFailure) as err:
            if not hint:
                raise
            raise type(err)(f"{err} ({hint})") from err
        resid = obj.residuals(ev)
        elapsed = self.build_s + (time.perf_counter() - t0)
        res = LMMResult(self, obj, ev, opt, method, picked, resid, elapsed, opts)
        if hint and not res.converged:
            res.notes.append(hint)
        if solver == "auto":
            res.notes.append(reason)
            if preconditioner is not None and picked == "direct":
                res.notes.append(f"preconditioner={preconditioner!r} unused: the direct "
                                 "solver factors the system exactly")
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
    data : pandas.DataFrame or dask.dataframe.DataFrame
        A Dask DataFrame is fitted where its partitions are
        (:func:`lmmops.distributed.fit_dask`): the client receives only level-space
        statistics, and the result's row-level outputs are Dask objects.
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
    if is_dask_dataframe(data):  # the rows stay on the workers (lmmops.distributed)
        return fit_dask(formula, data, method=method, solver=solver, **kwargs)
    data_name = kwargs.pop("data_name", None)
    weights = kwargs.pop("weights", None)
    model = LMM.from_formula(formula, data, method=method, data_name=data_name,
                             weights=weights)
    return model.fit(solver=solver, **kwargs)
