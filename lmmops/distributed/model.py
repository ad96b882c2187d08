"""The model and the fit from a Dask DataFrame: :class:`DaskLMM` and :func:`fit_dask`.

:meth:`DaskLMM.from_formula` runs the passes of :mod:`lmmops.distributed.passes` over
the partitions (the levels when the metadata does not know them, the moments, the
statistics), each a map on the workers and a tree reduction
(:mod:`lmmops.distributed.reduction`), and rebuilds on the client the objects the
in-memory :class:`lmmops.LMM` builds from the rows, in level space: the level
dictionaries in the same order, the fixed-effects columns and their names, the rank test,
the conditioning, the design's counts and cell tables (:class:`LevelDesign`) and the
random-effects terms. :meth:`DaskLMM.fit` then runs the same estimation code (the exact
objectives built with ``X = y = None, stats=...``) and returns a :class:`DaskResult`:
an :class:`~lmmops.result.LMMResult` whose row-level outputs are Dask objects computed
by ``map_partitions``.
"""

from __future__ import annotations

import sys
import time
import warnings

import formulaic
import numpy as np
import pandas as pd
from scipy import stats

from lmmops.data.checks import check_method, warn_if_disconnected
from lmmops.data.formula import (
    RankDeficientWarning,
    grouping_columns,
    parse_formula,
    rank_message,
    response_vector,
)
from lmmops.data.terms import RandomEffectsTerm, order_terms, theta_layout
from lmmops.distributed.frame import (
    Plan,
    cast_categories,
    check_formula_for_partitions,
    discover_levels,
    fixed_specs,
    interaction_levels,
    prepare,
    prototype,
)
from lmmops.distributed.levelspace import LevelDesign, level_terms, moment_start_from_stats
from lmmops.distributed.leverage import leverage_parts, partition_leverages
from lmmops.distributed.moments import condition_from_moments
from lmmops.distributed.passes import (
    check_terms,
    combine_levels,
    combine_moments,
    combine_statistics,
    conditioned_rows,
    map_levels,
    map_moments,
    map_statistics,
)
from lmmops.distributed.pcg import DistributedGram
from lmmops.distributed.reduction import FAN_IN, client_info, client_peak_mb, map_reduce
from lmmops.errors import (
    ArgumentError,
    DesignError,
    FormulaError,
    LmmopsError,
)
from lmmops.estimation.direct import DirectObjective
from lmmops.estimation.iterative import DEFAULT_PRECONDITIONER, IterativeObjective
from lmmops.estimation.protocol import optimise
from lmmops.estimation.vector import VectorObjective, random_effects_matrix
from lmmops.estimation.vector_iterative import (
    VectorIterativeObjective,
    check_slope_preconditioner,
)
from lmmops.guard import max_dense_bytes
from lmmops.options import resolve_options
from lmmops.result import LMMResult
from lmmops.threads import limit_threads, plan_threads

__all__ = ["DaskLMM", "DaskResult", "fit_dask", "is_dask_dataframe"]

#: as :data:`lmmops.model.AUTO_DIRECT_MAX_SCHUR`
AUTO_DIRECT_MAX_SCHUR = 8000


def is_dask_dataframe(data):
    """Whether ``data`` is a ``dask.dataframe.DataFrame`` (without importing Dask)."""
    mod = type(data).__module__ or ""
    return mod.split(".")[0] in ("dask", "dask_expr") and hasattr(data, "to_delayed") \
        and hasattr(data, "_meta")


def _known(ddf, col):
    """Whether a column is a categorical whose categories the metadata knows."""
    if col not in ddf._meta.columns or not isinstance(ddf._meta[col].dtype, pd.CategoricalDtype):
        return False
    return bool(ddf[col].cat.known)


def _formula_columns(text, columns):
    try:
        used = formulaic.Formula(text).required_variables
    except Exception:  # the sandbox's own parse names the problem later
        used = set()
    return [c for c in columns if c in used]


class DaskLMM:
    """A linear mixed model whose rows are the partitions of a Dask DataFrame.

    Build it with :meth:`from_formula`; the attributes mirror :class:`lmmops.LMM`'s
    (``design``, ``terms``, ``conditioning``, ``fixef_names``, ``rank_deficient``, ...)
    in level space. ``passes`` records each pass over the data
    (:class:`~lmmops.distributed.reduction.TreeReduction`).
    """

    def __init__(self):
        self.passes = []

    # ------------------------------------------------------------------ build
    @classmethod
    def from_formula(cls, formula, ddf, method="REML", weights=None, data_name=None,
                     labels=None, fan_in=FAN_IN, progress_bar=False):
        """Build the model from an lme4 formula and a Dask DataFrame.

        Parameters
        ----------
        formula : str
        ddf : dask.dataframe.DataFrame
        method : {"REML", "ML"}
        weights : str, optional
            The name of a column of prior weights (finite, > 0).
        data_name : str, optional
        labels : sequence of str, optional
            How errors name each partition (the files it was read from); default
            ``"partition i"``.
        fan_in : int
            Partial results combined per task of the tree reductions.
        progress_bar : bool
            A tqdm bar per pass over the partitions, on standard error.

        Returns
        -------
        DaskLMM

        Raises
        ------
        FormulaError, DesignError, DataSourceError, LmmopsError
            As :meth:`lmmops.LMM.from_formula`, the partition's errors naming its file
            (or position) and the column.
        """
        with limit_threads("auto"):
            self = cls()
            self._build(formula, ddf, method, weights, data_name, labels, fan_in,
                        progress_bar)
            return self

    def _run(self, ddf, fn, combine, *args, name):
        res, rec = map_reduce(ddf, fn, combine, *args, fan_in=self.fan_in, name=name,
                              progress=self.progress)
        self.passes.append(rec)
        return res

    def _build(self, formula, ddf, method, weights, data_name, labels, fan_in, progress):
        t0 = time.perf_counter()
        self.fan_in, self.progress = int(fan_in), bool(progress)
        if self.fan_in < 2:
            raise ArgumentError(f"fan_in must be at least 2, got {fan_in}")
        self.method = check_method(method)
        self.data_name = data_name
        if not isinstance(getattr(ddf, "_meta", None), pd.DataFrame):
            raise FormulaError(f"data must be a Dask DataFrame, got {type(ddf).__name__}")
        self.ddf = ddf
        meta = ddf._meta
        columns = [c for c in meta.columns]
        pf = parse_formula(formula)
        self.parsed_formula = pf
        self.formula, self.response = pf.formula, pf.response
        response_vector(meta, pf.response)  # the column exists and is numeric
        if weights is not None and not isinstance(weights, str):
            raise ArgumentError("weights of a Dask DataFrame must be the name of one of its "
                                f"columns, got {type(weights).__name__}")
        if weights is not None:
            if weights not in columns:
                raise LmmopsError(f"unknown weights column '{weights}'; available columns: "
                                  f"{', '.join(map(str, columns))}")
            col = meta[weights]
            if not (pd.api.types.is_numeric_dtype(col) or pd.api.types.is_bool_dtype(col)):
                raise LmmopsError(f"weights must be numeric: column '{weights}' has dtype "
                                  f"{col.dtype}")
        self.weighted = weights is not None
        factors = []
        for g in pf.random:
            parts = (g,) if g in columns else grouping_columns(g)
            unknown = [p for p in parts if p not in columns]
            if unknown:
                raise DesignError(f"unknown column '{unknown[0]}' for grouping factor "
                                  f"'{g}'; available columns: "
                                  f"{', '.join(map(str, columns))}")
            factors.append((g, parts))
        effects = [t.effects for t in pf.random_terms]
        texts = [pf.fixed, *effects]
        check_formula_for_partitions(texts, dict(meta.dtypes))
        used = []
        for text in texts:
            used += [c for c in _formula_columns(text, columns) if c not in used]
        cat_cols = [c for c in used
                    if isinstance(meta[c].dtype, pd.CategoricalDtype)
                    or not pd.api.types.is_numeric_dtype(meta[c].dtype)
                    or pd.api.types.is_bool_dtype(meta[c].dtype)]
        group_cols = [parts[0] for _, parts in factors if len(parts) == 1]
        inter = {g: parts for g, parts in factors if len(parts) > 1}
        unknown = [c for c in dict.fromkeys(group_cols + cat_cols) if not _known(ddf, c)]
        labels = list(labels) if labels is not None else []
        found, combos_found = {}, {}
        if unknown or inter:
            found, combos_found = self._run(ddf, map_levels, combine_levels, unknown, inter,
                                            labels, name="levels")
        dictionary = {}
        for c in dict.fromkeys(group_cols + cat_cols):
            if c in found:
                dictionary[c] = discover_levels(found[c], c, meta[c].dtype)
            else:
                dictionary[c] = pd.Index(meta[c].dtype.categories)
        factor_levels, combos = [], {}
        for k, (g, parts) in enumerate(factors):
            if len(parts) == 1:
                factor_levels.append(dictionary[parts[0]])
            else:
                comp, codes, lab = interaction_levels(combos_found[g], parts, meta)
                combos[k] = (comp, codes)
                factor_levels.append(lab)
        intercepts = (all(t.is_intercept for t in pf.random_terms)
                      and len(pf.random_terms) == len(pf.random))
        if intercepts:  # lme4's term order, as the in-memory fit (LMM.from_formula)
            order = order_terms([len(lv) for lv in factor_levels])
            factors = [factors[i] for i in order]
            factor_levels = [factor_levels[i] for i in order]
            combos = {order.index(k): v for k, v in combos.items()}
        categories = {c: dictionary[c] for c in cat_cols}
        proto = prototype(meta, categories)
        names, fspec, tspecs = fixed_specs(pf.fixed, effects, proto)
        plan = Plan(pf.response, weights, factors, factor_levels,
                    categories, fspec, [], columns, dict(meta.dtypes), labels)
        plan.combos = combos
        plan.p_all = len(names)
        # the terms in the formula's order (lme4's order once the levels are known)
        group_pos = {g: k for k, (g, _) in enumerate(factors)}
        specs = []
        for rt, (tnames, tspec) in zip(pf.random_terms, tspecs):
            if len(tnames) == 0:
                raise DesignError(f"random-effects term {rt} has no columns: its effects "
                                  "remove the intercept and add nothing")
            pure = list(tnames) == ["(Intercept)"]
            specs.append((rt.group, tnames, None if pure else tspec))
        plan.slopes = not intercepts
        plan.term_specs = [(group_pos[g], sp_) for g, _, sp_ in specs]
        plan.term_groups = [g for g, _, _ in specs]
        plan.term_columns = [tuple(c) for _, c, _ in specs]
        # pass 2: moments of [X y] and rows per level (and what the term checks need)
        mom, counts, term_info, sizes = self._run(ddf, map_moments, combine_moments, plan,
                                                  name="moments")
        plan.row_offsets = np.concatenate(
            [[0], np.cumsum([sizes[i] for i in range(len(sizes))])]).astype(np.int64)
        if mom.n == 0:
            raise DesignError("the design has no observations")
        # as sorted_levels: a categorical's unused categories are dropped
        plan.levels = [lv[np.asarray(c) > 0] for lv, c in zip(plan.levels, counts)]
        self.n_obs = mom.n
        self.conditioning, keep = condition_from_moments(mom)
        plan.keep, plan.conditioning = keep, self.conditioning
        self.all_fixef_names = names
        self.keep = keep
        kept = set(keep.tolist())
        dropped = [names[j] for j in range(len(names)) if j not in kept]
        self.rank_deficient = dropped
        self.rank_message = rank_message(dropped) if dropped else None
        if dropped:
            warnings.warn(self.rank_message, RankDeficientWarning, stacklevel=3)
        self.fixef_names = [names[j] for j in keep]
        self.fixed_spec = fspec
        if not intercepts:
            check_terms(pf.random_terms, specs, term_info, mom.n)
        nl = [len(plan.levels[group_pos[g]]) for g, _, _ in specs]
        order = order_terms(nl)  # intercepts: the factors' order, set above
        specs = [specs[i] for i in order]
        plan.term_specs = [(group_pos[g], sp_) for g, _, sp_ in specs]
        plan.term_groups = [g for g, _, _ in specs]
        plan.term_columns = [tuple(c) for _, c, _ in specs]
        self.plan = plan
        # pass 3: the statistics
        stats, unweighted = self._run(ddf, map_statistics, combine_statistics, plan,
                                      name="statistics")
        dstats = unweighted if unweighted is not None else stats
        self.stats, self.design_stats = stats, dstats
        K = len(factors)
        tables = dstats.N if dstats.N or K < 2 else stats.N  # same pattern (w > 0)
        design = LevelDesign([g for g, _ in factors], plan.levels, dstats.D,
                             {(k, l): tables[(k, l)] for k in range(K)
                              for l in range(k + 1, K)}, mom.n)
        if intercepts:
            design.check_distinct_partitions()
        self.design = design
        if intercepts:
            self.terms = design.terms
        else:
            self.terms = level_terms(design, specs)
            # two names of one grouping (b:a and a:b) whose terms share no column: as
            # terms on one factor, as in memory (CrossedDesign.check_distinct_partitions)
            design.check_distinct_partitions(self.terms)
            for t in self.terms:
                if t.dim > 1 and t.n_levels <= t.dim:
                    raise DesignError(
                        f"number of levels of each grouping factor must be > number of "
                        f"random effects per level: term ({', '.join(t.columns)} | "
                        f"{t.group}) has {t.n_levels} levels of '{t.group}' for {t.dim} "
                        "random effects per level")
                if mom.n <= t.n_random_effects:
                    raise DesignError(
                        f"number of observations (={mom.n}) <= number of random effects "
                        f"(={t.n_random_effects}) for term ({', '.join(t.columns)} | "
                        f"{t.group}); the random-effects parameters and the residual "
                        "variance (or scale parameter) are probably unidentifiable")
        self.has_slopes = not intercepts
        p = len(keep)
        self.X = np.zeros((0, p))  # the shape of the kept fixed effects; no rows
        self.y = np.zeros(0)
        self.weights = None
        self._warn_disconnected()
        self.n_partitions = ddf.npartitions
        self.build_s = time.perf_counter() - t0

    def _warn_disconnected(self):
        """Warn when the crossed factors' level graph is disconnected
        (:func:`lmmops.data.checks.warn_if_disconnected`)."""
        warn_if_disconnected(self.design, stacklevel=4)

    def schur_rows(self):
        """Rows of the exact solver's dense block (as :meth:`lmmops.LMM.schur_rows`)."""
        if self.has_slopes:
            q = [t.n_random_effects for t in self.terms]
            return sum(q) - q[0] + self.X.shape[1] + 1
        q = list(self.design.n_levels)
        return sum(q) - max(q) + self.X.shape[1] + 1

    def objective(self, method=None):
        """The exact objective on the conditioned statistics (no rows)."""
        m = check_method(method or self.method)
        if self.has_slopes:
            return VectorObjective(self.terms, None, None, method=m, stats=self.stats)
        return DirectObjective(self.design, None, None, method=m, stats=self.stats)

    def iterative_objective(self, method, options, preconditioner=None, gram="client"):
        """The matrix-free objective on the conditioned statistics (no rows), with the
        probes and seed of ``options`` (the in-memory fit's, so the same estimates).

        ``gram="workers"`` (random intercepts): its PCG products apply ``Z'WZ`` as row
        blocks kept on the cluster (:class:`~lmmops.distributed.pcg.DistributedGram`)."""
        common = dict(method=method, n_probes=options.n_probes, seed=options.seed,
                      rtol=options.cg_rtol, maxiter=options.cg_maxiter, stats=self.stats)
        if gram not in ("client", "workers"):
            raise ArgumentError(f"gram must be 'client' or 'workers', got {gram!r}")
        if gram == "workers":
            if self.has_slopes:
                raise ArgumentError("gram='workers' is for random-intercept models")
            common["gram"] = DistributedGram.from_model(self)
        if self.has_slopes:
            return VectorIterativeObjective(
                self.terms, None, None,
                preconditioner=check_slope_preconditioner(preconditioner), **common)
        extra = {} if options.deflation_rank is None else {
            "deflation_rank": options.deflation_rank}
        return IterativeObjective(self.design, None, None,
                                  preconditioner=preconditioner or DEFAULT_PRECONDITIONER,
                                  **common, **extra)

    def fit(self, method=None, solver="auto", start=None, maxiter=None, threads=None,
            options=None, progress=None, verbose=False, gram="client", **kwargs):
        """Fit by REML or ML with the exact solver, in level space.

        Parameters
        ----------
        method : {"REML", "ML"}, optional
        solver : {"auto", "direct", "iterative"}
            As :meth:`lmmops.LMM.fit`; the iterative solver runs on the client on the
            reduced statistics (same probes and seed as in memory: the same estimates up
            to the summation order of the statistics).
        start : array_like, optional
        maxiter, threads : optional
            Shorthands for ``options.maxiter`` and ``options.threads``.
        **kwargs
            ``n_probes``, ``seed``, ``rtol`` (shorthands of ``options``) and
            ``preconditioner`` (iterative solver).
        options : Options, optional
        progress : callable, optional
            Called as ``progress(message)`` once per iteration.
        verbose : bool
            Print one line per iteration to standard error.
        gram : {"client", "workers"}
            Iterative solver, random intercepts: where ``Z'WZ`` of the PCG products
            lives; ``"workers"``: persisted row blocks on the cluster, the block vector
            scattered each product (:class:`~lmmops.distributed.pcg.DistributedGram`).

        Returns
        -------
        DaskResult
        """
        preconditioner = kwargs.pop("preconditioner", None)
        n_probes, seed, rtol = (kwargs.pop(k, None) for k in ("n_probes", "seed", "rtol"))
        unsupported = {k: v for k, v in kwargs.items() if v is not None}
        if unsupported:
            raise ArgumentError(f"{', '.join(sorted(unsupported))} not supported by a fit "
                                "from a Dask DataFrame")
        method = check_method(method or self.method)
        s = str(solver).lower()
        m = self.schur_rows()
        if s not in ("auto", "direct", "iterative"):
            raise LmmopsError(f"solver must be one of auto, direct, iterative, got {solver!r}")
        picked = s
        if s == "auto":
            small = m <= AUTO_DIRECT_MAX_SCHUR and 4 * 8 * m * m <= max_dense_bytes()
            picked = "direct" if small else "iterative"
        if preconditioner is not None and picked == "direct" and s == "direct":
            raise ArgumentError(
                f"preconditioner={preconditioner!r} applies to the iterative solver; the "
                "direct solver factors the system exactly")
        opts = resolve_options(options, maxiter=maxiter, threads=threads,
                               n_probes=n_probes, seed=seed, cg_rtol=rtol)
        plan = plan_threads(opts.threads, dense_size=m if picked == "direct" else 0,
                            parallel=picked == "iterative")
        t0 = time.perf_counter()
        with limit_threads(plan):
            if gram != "client" and picked != "iterative":
                raise ArgumentError("gram='workers' applies to the iterative solver "
                                    "(solver='iterative')")
            if picked == "iterative":
                obj = self.iterative_objective(method, opts, preconditioner, gram)
            else:
                obj = self.objective(method)
            if start is None and not self.has_slopes:
                U = self.design_stats
                start = moment_start_from_stats(self.design, U.TT, U.ZT, U.D)
            ev, opt = optimise(obj, start, opts, _callback(progress, verbose,
                                                           self.conditioning, method))
        elapsed = self.build_s + (time.perf_counter() - t0)
        res = DaskResult(self, obj, ev, opt, method, picked, np.zeros(0), elapsed, opts)
        res.n_workers = client_info()[0]
        res.client_peak_mb = client_peak_mb()  # the build and the fit
        res.notes.append(plan.note)
        if s == "auto":
            res.notes.append(
                f"solver 'auto' picked 'direct': the dense Schur block is {m} x {m} "
                f"({8 * m * m / 2**20:.1f} MiB)" if picked == "direct" else
                f"solver 'auto' picked 'iterative': the dense Schur block would be "
                f"{m} x {m} ({8 * m * m / 2**30:.2f} GiB per copy)")
        res.notes.append(self.log_line())
        return res

    def log_line(self):
        """What the passes cost: partitions, workers, passes, bytes gathered."""
        workers, link = client_info()
        moved = sum(p.nbytes for p in self.passes)
        secs = ", ".join(f"{p.name} {p.seconds:.2f} s" for p in self.passes)
        who = f"{workers} workers" if workers is not None else "dask's local scheduler"
        line = (f"dask: {self.n_partitions} partitions, {who}, {len(self.passes)} passes "
                f"({secs}), {moved} bytes gathered on the client")
        if link:
            line += f"; dashboard {link}"
        return line

    def __getstate__(self):
        """Pickled (sent to workers for predictions) without the Dask collection."""
        state = dict(self.__dict__)
        state["ddf"] = None
        return state

    def __repr__(self):
        levels = dict(zip(self.design.names, self.design.n_levels))
        return (f"DaskLMM({self.formula!r}, n_obs={self.n_obs}, levels={levels}, "
                f"p={self.X.shape[1]}, partitions={self.n_partitions})")


def _callback(progress, verbose, cond, method):
    if progress is None and verbose:
        def progress(msg):
            print(msg, file=sys.stderr, flush=True)
    if progress is None:
        return None
    offset = cond.criterion_offset(method)

    def callback(it, theta, f):
        progress(f"iteration {it:3d}  criterion {f + offset:.6f}  theta "
                 f"{np.round(theta, 6)}")

    return callback


def _rows(part, i, plan, ev, theta_terms, kind, lev=None):
    """Row-level outputs of one partition (``map_partitions``); ``lev`` =
    ``(objective, leverage parts, user-scale s^2)`` adds ``diag_P``, ``shift``,
    ``shift_var`` and ``studentized``."""
    a = prepare(part, plan, i)
    Xc, yc = conditioned_rows(a, plan)
    cond = plan.conditioning
    marginal = yc - Xc @ ev.beta
    if plan.slopes:
        terms = [RandomEffectsTerm(plan.term_groups[t], a["codes"][k], plan.levels[k],
                                   plan.term_columns[t], a["values"][t])
                 for t, (k, _) in enumerate(plan.term_specs)]
        Z = random_effects_matrix(terms)
        b = np.concatenate([(np.asarray(v).reshape(-1, L.shape[0]) @ L.T).ravel()
                            for v, L in zip(ev.v, theta_terms)])
        zb = Z @ b
    else:
        zb = np.zeros(len(yc))
        for k in range(a["codes"].shape[0]):
            zb += (ev.theta[k] * np.asarray(ev.v[k]))[a["codes"][k]]
    s = cond.scale
    out = {"marginal": s * marginal, "conditional": s * (marginal - zb)}
    out["fitted"] = a["y"] - out["conditional"]
    if kind == "pearson":  # sqrt(w) e / sigma
        w = np.ones(len(yc)) if a["w"] is None else a["w"]
        out["pearson"] = np.sqrt(w) * out["conditional"] / (s * np.sqrt(ev.sigma2))
    if lev is not None:
        obj, parts, s2 = lev
        if plan.slopes:
            tcodes = [a["codes"][k] for k, _ in plan.term_specs]
            h = partition_leverages(obj, ev, None, tcodes, a["values"], Xc)
        else:
            h = partition_leverages(obj, ev, parts, a["codes"], None, Xc)
        w = np.ones(len(yc)) if a["w"] is None else a["w"]
        dP = (w - w * w * h) / ev.sigma2 / cond.variance_scale  # user scale
        Py = w * out["conditional"] / s2
        out.update(diag_P=dP, shift=Py / dP, shift_var=1.0 / dP,
                   studentized=Py / np.sqrt(dP))
    if kind == "all":
        return pd.DataFrame(out, index=part.index)
    if kind == "msom":  # the mean-shift scan's columns (lmmops.analysis.outliers.msom_scan)
        t = out["studentized"]
        p = 2.0 * stats.norm.sf(np.abs(t))
        n = int(plan.row_offsets[-1])
        return pd.DataFrame({
            "row": plan.row_offsets[i] + np.arange(len(t)), "phi": out["shift"],
            "se": np.sqrt(out["shift_var"]), "t": t, "p_value": p,
            "p_bonferroni": np.minimum(1.0, n * p)}, index=part.index)
    return pd.Series(out[kind], index=part.index, name=kind)


def _predict_frame(result, newdata, random, interval, level):
    """:meth:`LMMResult.predict` for a pandas frame: its non-numeric effect columns cast
    to the fit's categories first (the model specifications were built on them)."""
    if not isinstance(newdata, pd.DataFrame):
        raise LmmopsError("newdata must be a pandas or a Dask DataFrame")
    plan = result.model.plan
    cats = {c: v for c, v in plan.categories.items() if c in newdata.columns}
    newdata = cast_categories(newdata, cats, "newdata")
    return LMMResult.predict(result, newdata, random=random, interval=interval, level=level)


def _predict_partition(part, result, random, interval, level):
    """Predictions of one partition of new data (``map_partitions``)."""
    out = _predict_frame(result, part, random, interval, level)
    if interval is None:
        return pd.Series(np.asarray(out, dtype=np.float64), index=part.index, name="fit")
    out = pd.DataFrame(out)
    out.index = part.index
    return out


class DaskResult(LMMResult):
    """The fit of a :class:`DaskLMM`: an :class:`~lmmops.result.LMMResult` whose
    row-level outputs are Dask objects (``map_partitions``), computed when asked.

    ``resid`` and ``fitted`` are Dask Series (conditional residuals and fitted values on
    the user's scale); :meth:`residuals` takes ``"conditional"``, ``"marginal"``,
    ``"pearson"`` and ``"model"``; the summary's residual quartiles are Dask's
    approximate quantiles.
    """

    def __init__(self, model, obj, ev, opt, method, solver, resid, elapsed, options=None):
        super().__init__(model, obj, ev, opt, method, solver, resid, elapsed, options)
        self.passes = list(model.passes)
        self.n_partitions = model.n_partitions
        self.resid = self._rows("conditional")
        self.fitted = self._rows("fitted")

    #: the row outputs that need ``diag(P)`` (exact solver)
    LEVERAGE_KINDS = ("diag_P", "shift", "shift_var", "studentized")

    def to_dict(self):
        """:meth:`LMMResult.to_dict` (the ``lmmops fit --json`` contract) and the record
        of the fit on the cluster, ``distributed`` (:meth:`distributed_info`)."""
        out = super().to_dict()
        out["distributed"] = self.distributed_info()
        return out

    def distributed_info(self):
        """What the fit cost on the cluster and on the client.

        Returns
        -------
        dict
            ``partitions`` (int); ``workers`` (int, or None on dask's local scheduler);
            ``bytes_gathered``: ``{"total": int, "per_pass": {name: int}}``, the pickled
            size of each pass's root received by the client; ``passes``: one
            ``{"name", "seconds", "bytes", "partitions"}`` per pass over the data, in
            order; ``client_peak_mb`` (float or None): the peak resident memory of the
            client's process at the end of the fit, in MiB (with a ``LocalCluster``
            started in the process it includes the scheduler); ``gram``: None, or for
            ``gram="workers"`` ``{"blocks", "products", "bytes_moved"}`` of the
            Gram matrix's row blocks on the workers.
        """
        passes = [{"name": p.name, "seconds": float(p.seconds), "bytes": int(p.nbytes),
                   "partitions": int(p.n_partitions)} for p in self.passes]
        gram = getattr(self._objective, "_ZtZ", None)
        gram_info = None
        if gram is not None and hasattr(gram, "bytes_moved"):  # DistributedGram
            gram_info = {"blocks": len(gram.blocks), "products": int(gram.products),
                         "bytes_moved": int(gram.bytes_moved)}
        workers = getattr(self, "n_workers", None)
        peak = getattr(self, "client_peak_mb", None)
        return {
            "partitions": int(self.n_partitions),
            "workers": None if workers is None else int(workers),
            "bytes_gathered": {"total": sum(p["bytes"] for p in passes),
                               "per_pass": {p["name"]: p["bytes"] for p in passes}},
            "passes": passes,
            "client_peak_mb": None if peak is None else float(peak),
            "gram": gram_info,
        }

    def _leverage(self):
        """``(objective, leverage parts, s^2)`` for the row outputs of ``diag(P)``; the
        exact solver only (the iterative one estimates it over the rows' probes)."""
        obj, ev = self.fit_objective()
        if not self.exact:
            raise LmmopsError("diag(P) per row (shift and studentized residuals) of a fit "
                              "from a Dask DataFrame needs the exact solver; refit with "
                              "solver='direct'")
        if getattr(self, "_lev", None) is None:
            if self.model.has_slopes:
                obj._inverse_parts(ev)  # cached in the objective, which the tasks carry
                parts = None
            else:
                parts = leverage_parts(obj, ev)
            self._lev = (obj, parts, self.sigma**2)
        return self._lev

    def _rows(self, kind, leverage=False):
        m = self.model
        ev = self.evaluation
        Ls = [t.relative_factor(ev.theta[sl]) for t, sl in
              zip(self.terms, theta_layout(self.terms))]
        cols = ["marginal", "conditional", "fitted"]
        if leverage or kind in self.LEVERAGE_KINDS or kind == "msom":
            cols += list(self.LEVERAGE_KINDS)
            leverage = True
        if kind == "msom":
            cols = ["row", "phi", "se", "t", "p_value", "p_bonferroni"]
        meta = (pd.DataFrame({k: pd.Series(dtype="int64" if k == "row" else "float64")
                              for k in cols})
                if kind in ("all", "msom") else pd.Series(dtype="float64", name=kind))
        import dask

        parts = m.ddf.to_delayed()
        plan = dask.delayed(m.plan, traverse=False)
        lev = dask.delayed(self._leverage(), traverse=False) if leverage else None
        out = [dask.delayed(_rows, pure=True)(p, i, plan, ev, Ls, kind, lev)
               for i, p in enumerate(parts)]
        import dask.dataframe as dd

        return dd.from_delayed(out, meta=meta, divisions=m.ddf.divisions)

    def residuals(self, kind="conditional"):
        """Row-level residuals as a Dask Series (see :meth:`LMMResult.residuals`).

        ``"conditional"``, ``"marginal"``, ``"pearson"`` (``sqrt(w) e / s``),
        ``"model"``, and with the exact solver the mean-shift ``"shift"`` and
        ``"studentized"`` residuals (``diag(P)`` per row from the level-space factor,
        :mod:`lmmops.distributed.leverage`).
        """
        if kind in ("shift", "studentized"):
            return self._rows(kind)
        if kind in ("conditional", "model"):
            return self._rows("conditional")
        if kind == "marginal":
            return self._rows("marginal")
        if kind == "pearson":
            return self._rows("pearson")
        if kind in self.RESIDUAL_KINDS:
            raise LmmopsError(f"residuals of kind {kind!r} need diag(P) per row, not yet "
                              "available for a fit from a Dask DataFrame")
        raise LmmopsError(f"unknown residual kind {kind!r}; use one of "
                          f"{', '.join(self.RESIDUAL_KINDS)}")

    def __getstate__(self):
        """Pickled without its Dask collections (the row outputs are rebuilt lazily)."""
        state = dict(self.__dict__)
        state["resid"] = state["fitted"] = None
        return state

    def predict(self, newdata=None, random=True, interval=None, level=0.95):
        """Predictions (see :func:`lmmops.analysis.predict.predict`).

        ``newdata`` may be a pandas DataFrame (computed here, in level space) or a Dask
        DataFrame (computed by ``map_partitions`` on the workers; a Dask Series, or a
        Dask DataFrame with ``interval``). Without ``newdata``: the fitted values (a Dask
        Series, ``interval=None`` only).
        """
        if newdata is None:
            if interval is not None or not random:
                raise LmmopsError("predictions for the fitted rows of a Dask fit are the "
                                  "fitted values (random=True, interval=None); pass the "
                                  "rows as newdata for intervals or random=False")
            return self._rows("fitted")
        if not is_dask_dataframe(newdata):
            return _predict_frame(self, newdata, random, interval, level)
        import dask

        me = dask.delayed(self, traverse=False)
        if interval is None:
            meta = pd.Series(dtype="float64", name="fit")
        else:
            meta = pd.DataFrame({c: pd.Series(dtype="float64")
                                 for c in ("fit", "se", "lower", "upper")})
        return newdata.map_partitions(_predict_partition, me, random, interval, level,
                                      meta=meta)

    def row_outputs(self, leverage=None):
        """A Dask DataFrame with the ``marginal`` and ``conditional`` residuals and the
        ``fitted`` values of every row (user scale), partitioned as the data.

        Parameters
        ----------
        leverage : bool, optional
            Add ``diag_P``, ``shift``, ``shift_var`` and ``studentized`` (the columns
            of :meth:`LMMResult.residual_table`); default: with the exact solver.
        """
        if leverage is None:
            leverage = self.exact
        return self._rows("all", leverage=bool(leverage))

    def residual_table(self):
        """The columns of :meth:`LMMResult.residual_table` per row, as a Dask DataFrame
        (exact solver; ``diag_P_se`` is 0)."""
        rows = self._rows("all", leverage=True)
        rows = rows.assign(diag_P_se=0.0)
        return rows[["fitted", "conditional", "marginal", "shift", "shift_var",
                     "studentized", "diag_P", "diag_P_se"]]

    def outliers(self, method="msom", rows=None, top=None):
        """The mean-shift outlier scan (see :meth:`LMMResult.outliers`), exact solver.

        With ``top``: a pandas DataFrame of the ``top`` largest ``|t|`` (as in memory:
        ``row`` is the 0-based position in the data, in partition order); without: the
        whole scan as a Dask DataFrame, unsorted. The VSOM and a set of rows need the
        rows in memory and are not available from a Dask DataFrame.
        """
        m = str(method).lower()
        if m not in ("msom", "vsom"):
            raise LmmopsError(f"unknown outlier method {method!r}; use 'msom' or 'vsom'")
        if m == "vsom" or rows is not None:
            raise LmmopsError("the variance-shift statistic and the mean shift of a set of "
                              "rows solve with those rows' columns of P, which a fit from "
                              "a Dask DataFrame does not hold; use the scan (top=...)")
        scan = self._rows("msom")
        if top is None:
            return scan
        t = scan.assign(abs_t=scan["t"].abs()).nlargest(int(top), "abs_t").compute()
        t = t.drop(columns="abs_t")
        t.index = pd.Index(t["row"].to_numpy(), name="observation")
        return t

    def plot(self, kind="diagnostics", ax=None, **kwargs):
        """Plots from level-space quantities only (``"caterpillar"``); the row-level
        ones would gather every row on the client."""
        if kind != "caterpillar":
            raise LmmopsError(f"plot({kind!r}) draws every row; from a Dask fit write the "
                              "rows with row_outputs() and plot a sample, or use "
                              "plot('caterpillar')")
        return LMMResult.plot(self, kind, ax=ax, **kwargs)

    def _scaled_residual_quantiles(self):
        r = self._rows("conditional") / self.sigma
        import dask

        lo, hi, mid = dask.compute(r.min(), r.max(), r.quantile([0.25, 0.5, 0.75]))
        mid = np.asarray(mid, dtype=float)
        return np.array([float(lo), mid[0], mid[1], mid[2], float(hi)])


def fit_dask(formula, ddf, method="REML", solver="auto", **kwargs):
    """:func:`lmmops.fit` for a Dask DataFrame (the rows stay on the workers).

    Parameters
    ----------
    formula : str
    ddf : dask.dataframe.DataFrame
    method : {"REML", "ML"}
    solver : {"auto", "direct"}
    **kwargs
        ``weights`` (a column name), ``data_name``, ``labels``, ``fan_in`` and
        ``progress_bar`` for :meth:`DaskLMM.from_formula`; the rest for
        :meth:`DaskLMM.fit`.

    Returns
    -------
    DaskResult
    """
    build = {k: kwargs.pop(k) for k in ("weights", "data_name", "labels", "fan_in",
                                        "progress_bar") if k in kwargs}
    model = DaskLMM.from_formula(formula, ddf, method=method, **build)
    return model.fit(solver=solver, **kwargs)

