"""lmmops: linear mixed models with crossed random effects at scale.

The public surface:

- :func:`fit` and :class:`LMM`: fit ``y ~ X + (1|a) + (1|b) + ...`` by REML or ML from a
  pandas DataFrame and an lme4 formula.
- :class:`CrossedDesign`: grouping factors, counts and cross-tabulations.
- :class:`CovarianceOperator` and :class:`LevelSpaceOperator`: the n x n covariance V and
  its q x q level-space form as scipy LinearOperators (:mod:`lmmops.operators`), with
  solvers and preconditioners in :mod:`lmmops.solvers` and :mod:`lmmops.preconditioners`,
  and the seed paper's inverses of V in :mod:`lmmops.spectral` and :mod:`lmmops.lowrank`.
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
from .operators import CovarianceOperator, LevelSpaceOperator

__all__ = [
    "ConvergenceWarning",
    "CovarianceOperator",
    "CrossedDesign",
    "DenseTooLargeError",
    "DesignError",
    "DisconnectedDesignError",
    "FormulaError",
    "LMM",
    "LMMResult",
    "LevelSpaceOperator",
    "LmmopsError",
    "RankDeficientError",
    "RankDeficientWarning",
    "__version__",
    "anova",
    "fit",
]
