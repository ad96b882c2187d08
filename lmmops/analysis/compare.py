"""Model comparison: likelihood-ratio tests and an AIC/BIC table, as lme4's ``anova``.

Models fitted by REML are refitted by ML first (REML likelihoods of models with different
fixed effects are not comparable), with lme4's message "refitting model(s) with ML
(instead of REML)". The models are ordered by their number of parameters and each is
tested against the previous one: ``Chisq = deviance_prev - deviance`` on
``Df = npar - npar_prev`` degrees of freedom.

The ``mc_error`` column is the Monte Carlo standard error of the deviance difference; it
is 0 for the exact (direct) solver; for the iterative solver it combines the fits' Monte
Carlo standard errors of the deviance (``2 * mc_stderr["loglik"]``) as if independent.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from scipy import stats

from lmmops.errors import LmmopsError, RefitWarning

__all__ = ["RefitWarning", "anova"]


def anova(*results, refit=True, names=None):
    """Compare nested fits by likelihood-ratio tests, with AIC and BIC.

    Parameters
    ----------
    *results : LMMResult
        Two or more fits to the same observations.
    refit : bool
        Refit REML fits by ML (lme4's default). With ``refit=False`` REML fits are
        compared as they are, which is valid only when their fixed effects are the same.
    names : sequence of str, optional
        Row labels; default the formulas.

    Returns
    -------
    pandas.DataFrame
        One row per model, ordered by the number of parameters: ``npar``, ``AIC``,
        ``BIC``, ``logLik``, ``deviance`` (``-2 logLik``), ``Chisq``, ``Df``,
        ``Pr(>Chisq)`` and ``mc_error``.

    Raises
    ------
    LmmopsError
        For fewer than two models, models fitted to different numbers of observations or
        different responses, or REML fits with different fixed effects and
        ``refit=False``.

    Examples
    --------
    >>> import numpy as np, pandas as pd, lmmops
    >>> rng = np.random.default_rng(4)
    >>> df = pd.DataFrame({"a": rng.integers(0, 12, 300), "b": rng.integers(0, 6, 300)})
    >>> df["y"] = rng.normal(size=12)[df.a] + 0.1 * rng.normal(size=6)[df.b] \\
    ...     + rng.normal(size=300)
    >>> small = lmmops.fit("y ~ 1 + (1|a)", df, method="ML")
    >>> big = lmmops.fit("y ~ 1 + (1|a) + (1|b)", df, method="ML")
    >>> tab = lmmops.anova(small, big)
    >>> list(tab.columns)
    ['npar', 'AIC', 'BIC', 'logLik', 'deviance', 'Chisq', 'Df', 'Pr(>Chisq)', 'mc_error']
    >>> int(tab["Df"].iloc[1])
    1
    """
    if len(results) < 2:
        raise LmmopsError("anova needs at least two fitted models")
    n = {r.n_obs for r in results}
    if len(n) > 1:
        raise LmmopsError(
            f"models were not all fitted to the same size of dataset: n_obs {sorted(n)}"
        )
    ys = [r.model.y for r in results]
    if any(not np.array_equal(ys[0], y) for y in ys[1:]):
        raise LmmopsError("models were not all fitted to the same response")
    fits = list(results)
    if any(r.method == "REML" for r in fits):
        if refit:
            warnings.warn("refitting model(s) with ML (instead of REML)", RefitWarning,
                          stacklevel=2)
            fits = [r if r.method == "ML" else r.model.fit(method="ML") for r in fits]
        else:
            xs = [r.model.X for r in fits]
            if any(x.shape != xs[0].shape or not np.allclose(x, xs[0]) for x in xs[1:]):
                raise LmmopsError(
                    "REML fits with different fixed effects cannot be compared; use "
                    "refit=True to compare ML fits"
                )
    labels = list(names) if names is not None else [r.formula or f"model{i + 1}"
                                                    for i, r in enumerate(fits)]
    if len(labels) != len(fits):
        raise LmmopsError(f"names has {len(labels)} entries for {len(fits)} models")
    order = sorted(range(len(fits)), key=lambda i: fits[i].df)
    rows = []
    prev = None
    for i in order:
        r = fits[i]
        dev = -2.0 * r.loglik
        mcs = getattr(r, "mc_stderr", None) or {}
        mc = 2.0 * float(mcs.get("loglik", 0.0) or 0.0)  # of the deviance
        row = {"npar": int(r.df), "AIC": r.aic, "BIC": r.bic, "logLik": r.loglik,
               "deviance": dev, "Chisq": np.nan, "Df": np.nan, "Pr(>Chisq)": np.nan,
               "mc_error": 0.0}
        if prev is not None:
            chisq = max(prev[1] - dev, 0.0)
            df = r.df - prev[0]
            row["Chisq"] = chisq
            row["Df"] = df
            row["Pr(>Chisq)"] = float(stats.chi2.sf(chisq, df)) if df > 0 else np.nan
            row["mc_error"] = float(np.hypot(prev[2], mc))
        rows.append(row)
        prev = (r.df, dev, mc)
    return pd.DataFrame(rows, index=pd.Index([labels[i] for i in order], name="model"))
