"""Benchmarks of the matrix-free stochastic REML fit (``solver="iterative"``,
lmmops.estimation.iterative).

- ``IterativeEvaluation``: one REML objective-and-gradient evaluation (block PCG with the
  probe columns) at n = 10^6 and 10^7 rows, K = 2 Zipf-skewed factors, with its CG
  iterations and the Monte Carlo standard error of the criterion as ``track_`` numbers,
  and the peak memory of building the objective.
- ``IterativeFit``: a whole REML fit at n = 10^6 (the issue-5 target at 10^7 is measured
  by ``asv_benchmarks/peers/scale.py``, too long for a routine asv run): ``time_fit`` with
  the fresh-probe check (the probes double once), ``time_fit_fixed_probes`` without it
  (``max_rounds=0``: the optimiser on the 16 fixed probes, as this benchmark timed before
  the fit was Monte Carlo checked), and the evaluations each takes.

The objective is built in ``setup`` (one O(n) pass plus the deflation basis), so the
timed part is the evaluation or the fit alone.
"""

import numpy as np

from .common import evaluation_benchmarks, pick, safe_import, warm_up_jit

with safe_import():
    from lmmops.data.design import CrossedDesign
    from lmmops.data.simulate import simulate_codes
    from lmmops.estimation.direct import moment_start
    from lmmops.estimation.iterative import IterativeObjective
    from lmmops.estimation.stochastic import fit_iterative

SIZES = {10**6: (100_000, 3_000), 10**7: (1_000_000, 30_000)}


def problem(n):
    levels = SIZES.get(n, (max(2, n // 10), max(2, n // 300)))
    codes = simulate_codes(n, list(levels), zipf=[1.0, 1.0], seed=5)
    rng = np.random.default_rng(6)
    y = (0.7 * rng.normal(size=levels[0])[codes[0]] + 0.9 * rng.normal(size=levels[1])[codes[1]]
         + rng.normal(size=n))
    return CrossedDesign.from_codes(codes), np.ones((n, 1)), y


def build_objective(n):
    """The iterative objective and its start for ``problem(n)``, compiled and warm."""
    try:
        d, X, y = problem(n)
    except NameError:
        raise NotImplementedError("lmmops.estimation.iterative is not available") from None
    warm_up_jit()
    obj = IterativeObjective(d, X, y, n_probes=16, seed=0)
    start = moment_start(d, X, y)
    return obj, start, obj.evaluate(start)


@evaluation_benchmarks
class IterativeEvaluation:
    params = [pick([10**6, 10**7], [2000])]
    param_names = ["n_obs"]
    timeout = pick(1800, 60)

    def setup(self, n):
        self.obj, self.theta, self.ev = build_objective(n)  # compiled outside the timing

    def peakmem_build_objective(self, n):
        d, X, y = problem(n)
        IterativeObjective(d, X, y, n_probes=16, seed=0)


class IterativeFit:
    params = [pick([10**6], [2000])]
    param_names = ["n_obs"]
    timeout = pick(1800, 60)
    number = 1
    repeat = 1

    def setup(self, n):
        self.obj, self.start, _ = build_objective(n)

    def time_fit(self, n):
        fit_iterative(self.obj, self.start)

    def time_fit_fixed_probes(self, n):
        # the work that the pre-restructuring benchmark timed (an optimiser on the 16
        # fixed probes, no fresh-probe check), plus the forward-difference Jacobian of the
        # Monte Carlo covariance (K evaluations) that every fit reports now
        fit_iterative(self.obj, self.start, max_rounds=0)

    def track_fit_iterations(self, n):
        _, opt = fit_iterative(self.obj, self.start)
        return int(opt.iterations)

    def track_fit_evaluations(self, n):
        _, opt = fit_iterative(self.obj, self.start)
        return int(opt.n_evaluations)

    def track_fit_fixed_probes_evaluations(self, n):
        _, opt = fit_iterative(self.obj, self.start, max_rounds=0)
        return int(opt.n_evaluations)
