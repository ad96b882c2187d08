"""Benchmarks of the seed paper's inverses of V (lmmops.paper.spectral, lmmops.paper.lowrank).

- ``ApplyInverse``: time to apply each inverse (asymptotic, D2, D1, exact low-rank
  corrections on both bases) to a vector at n = 10^6 (two crossed factors with Poisson
  cell counts, g = h = 200), against one matvec of V itself.
- ``ImbalanceAccuracy``: ``track_`` the correction rank of the exact inverse and the
  relative error of the D1 and D2 approximations, ``||A b - V^{-1} b|| / ||V^{-1} b||``,
  as the design moves from mild to strong imbalance (Poisson cells, 50% and 90% missing
  cells, margins scaled by U(0.5, 2)).

Under ``LMMOPS_BENCH_TINY=1`` the designs shrink to about 10^3 rows.
"""

import numpy as np

from .common import TINY, pick, safe_import, warm_up_jit

with safe_import():
    from lmmops.data.design import CrossedDesign
    from lmmops.linalg.operators import CovarianceOperator
    from lmmops.paper.lowrank import ExactInverse
    from lmmops.paper.spectral import (
        ModifiedCovariance,
        ProportionalApproximation,
        asymptotic_inverse,
    )


def crossed_design(g, h, mean_count, missing=0.0, margin_scale=False, seed=0):
    """Two crossed factors with Poisson(mean) + 1 counts in the kept cells."""
    rng = np.random.default_rng(seed)
    counts = rng.poisson(mean_count, size=(g, h)) + 1
    if margin_scale:
        counts = np.maximum(1, np.round(counts * rng.uniform(0.5, 2, g)[:, None]
                                        * rng.uniform(0.5, 2, h)[None, :])).astype(int)
    if missing:
        keep = rng.random((g, h)) >= missing
        keep[np.arange(g), np.arange(g) % h] = True  # every row and column kept, connected
        keep[np.arange(h) % g, np.arange(h)] = True
        keep[np.arange(g), (np.arange(g) + 1) % h] = True
        counts = counts * keep
    a = np.repeat(np.repeat(np.arange(g), h), counts.ravel())
    b = np.repeat(np.tile(np.arange(h), g), counts.ravel())
    return CrossedDesign.from_codes([a, b], names=["a", "b"])


class ApplyInverse:
    """Apply an inverse of V to one vector at n ~ 10^6."""

    params = [["V matvec", "asymptotic", "D2", "D1", "exact (D1 base)", "exact (D2 base)"]]
    param_names = ["operator"]
    timeout = pick(600, 60)

    def setup(self, kind):
        try:
            design = crossed_design(*pick((200, 200, 24.0), (20, 20, 2.0)))
        except NameError:
            raise NotImplementedError("lmmops.paper.spectral is not available") from None
        warm_up_jit()
        V = CovarianceOperator(design, 1.0, [0.5, 0.8])
        ops = {
            "V matvec": lambda: V,
            "asymptotic": lambda: asymptotic_inverse(V),
            "D2": lambda: ProportionalApproximation(V).inverse(),
            "D1": lambda: ModifiedCovariance(V).inverse(),
            "exact (D1 base)": lambda: ExactInverse(V, base="modified"),
            "exact (D2 base)": lambda: ExactInverse(V, base="proportional"),
        }
        self.op = ops[kind]()
        self.b = np.random.default_rng(1).normal(size=design.n_obs)
        self.op @ self.b  # compile and build caches outside the timed part

    def time_apply(self, kind):
        self.op @ self.b


class ImbalanceAccuracy:
    """Correction rank and approximation error against the kind of imbalance."""

    params = [["poisson", "missing50", "missing90", "margins"]]
    param_names = ["design"]
    timeout = pick(600, 60)

    def setup(self, name):
        g = pick(80, 12)
        mean = pick(3.0, 2.0)
        spec = {"poisson": {}, "missing50": {"missing": 0.5}, "missing90": {"missing": 0.9},
                "margins": {"margin_scale": True}}[name]
        try:
            design = crossed_design(g, g, mean, seed=3, **spec)
        except NameError:
            raise NotImplementedError("lmmops.paper.spectral is not available") from None
        self.V = CovarianceOperator(design, 1.0, [0.5, 0.5])
        self.exact = ExactInverse(self.V, base="modified")
        self.b = np.random.default_rng(2).normal(size=design.n_obs)
        self.x = self.exact @ self.b
        self.d1 = ModifiedCovariance(self.V).inverse()
        self.d2 = ProportionalApproximation(self.V).inverse()

    def _rel(self, op):
        return float(np.linalg.norm(op @ self.b - self.x) / np.linalg.norm(self.x))

    def track_correction_rank_modified(self, name):
        return int(self.exact.correction_rank)

    def track_correction_rank_proportional(self, name):
        return int(ExactInverse(self.V, base="proportional").correction_rank)

    def track_relative_error_D1(self, name):
        return self._rel(self.d1)

    def track_relative_error_D2(self, name):
        return self._rel(self.d2)

    def track_exact_residual(self, name):
        """``||V x - b|| / ||b||`` for the exact inverse: machine precision."""
        return float(np.linalg.norm(self.V @ self.x - self.b) / np.linalg.norm(self.b))


if TINY:  # keep the test run short: fewer operators
    ApplyInverse.params = [["V matvec", "D1", "exact (D1 base)"]]
