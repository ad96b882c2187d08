"""lmmops: linear mixed models with crossed random effects at scale.

The public surface:

- :func:`fit` and :class:`LMM`: fit ``y ~ X + (1|a) + (1|b) + ...`` by REML or ML from a
  pandas DataFrame and an lme4 formula.
- :class:`CrossedDesign`: grouping factors, counts and cross-tabulations.
- :class:`CovarianceOperator`: the n x n covariance V as a scipy LinearOperator.
"""

__version__ = "0.1.0"

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
    "__version__",
    "fit",
]
