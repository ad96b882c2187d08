"""lmmops: linear mixed models with crossed random effects at scale.

The public surface:

- :func:`fit` and :class:`LMM`: fit ``y ~ X + (1|a) + (1|b) + ...`` by REML or ML from a
  pandas DataFrame and an lme4 formula.
- :class:`CrossedDesign`: grouping factors, counts and cross-tabulations.
- :class:`CovarianceOperator`: the n x n covariance V as a scipy LinearOperator.
- :func:`anova`: likelihood-ratio tests and an AIC/BIC table for nested fits.
- :mod:`lmmops.oneway` (the one-way model's estimators), :mod:`lmmops.mme` (Henderson's
  equations and PEV), :mod:`lmmops.outliers`, :mod:`lmmops.inference`.
"""

__version__ = "0.1.0"

from . import inference, mme, oneway, outliers  # noqa: F401  (submodules, as attributes)
from .compare import anova
from .design import CrossedDesign
from .errors import (
    ConvergenceWarning,
    DenseTooLargeError,
    DesignError,
    DisconnectedDesignError,
    FormulaError,
    LmmopsError,
    RankDeficientError,
)
from .formula import RankDeficientWarning
from .model import LMM, LMMResult, fit

__all__ = [
    "ConvergenceWarning",
    "CrossedDesign",
    "DenseTooLargeError",
    "DesignError",
    "DisconnectedDesignError",
    "FormulaError",
    "LMM",
    "LMMResult",
    "LmmopsError",
    "RankDeficientError",
    "RankDeficientWarning",
    "__version__",
    "anova",
    "fit",
]
