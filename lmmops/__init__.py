"""lmmops: linear mixed models with crossed random effects at scale.

The public surface:

- :func:`fit` and :class:`LMM`: fit ``y ~ X + (1|a) + (1|b) + ...`` by REML or ML from a
  pandas DataFrame and an lme4 formula.
- :class:`CrossedDesign`: grouping factors, counts and cross-tabulations.
- :class:`CovarianceOperator` and :class:`LevelSpaceOperator`: the n x n covariance V and
  its q x q level-space form as scipy LinearOperators (:mod:`lmmops.linalg.operators`), with
  solvers and preconditioners in :mod:`lmmops.linalg.krylov` and
  :mod:`lmmops.linalg.preconditioners`, and the seed paper's inverses of V in
  :mod:`lmmops.paper.spectral` and :mod:`lmmops.paper.lowrank`.
- :func:`anova`: likelihood-ratio tests and an AIC/BIC table for nested fits.
- :mod:`lmmops.analysis.oneway` (the one-way model's estimators), :mod:`lmmops.estimation.mme`
  (Henderson's
  equations and PEV), :mod:`lmmops.analysis.outliers`, :mod:`lmmops.analysis.inference`.
"""

from lmmops import _compat
from lmmops._version import __version__
from lmmops.analysis import inference, oneway, outliers  # noqa: F401  (as attributes)
from lmmops.analysis.compare import anova
from lmmops.data.design import CrossedDesign
from lmmops.errors import (
    ConvergenceWarning,
    DataSourceError,
    DenseTooLargeError,
    DesignError,
    DisconnectedDesignError,
    FormulaError,
    LmmopsError,
    RankDeficientError,
    RankDeficientWarning,
)
from lmmops.estimation import mme  # noqa: F401  (as an attribute)
from lmmops.linalg.operators import CovarianceOperator, LevelSpaceOperator
from lmmops.model import LMM, fit
from lmmops.options import Options
from lmmops.result import LMMResult

_compat.install()

__all__ = [
    "ConvergenceWarning",
    "CovarianceOperator",
    "CrossedDesign",
    "DataSourceError",
    "DenseTooLargeError",
    "DesignError",
    "DisconnectedDesignError",
    "FormulaError",
    "LMM",
    "LMMResult",
    "LevelSpaceOperator",
    "LmmopsError",
    "Options",
    "RankDeficientError",
    "RankDeficientWarning",
    "__version__",
    "anova",
    "fit",
]


def __getattr__(name):
    """Deprecated 0.1 module paths as attributes (``lmmops._compat``)."""
    return _compat.module_getattr(name)
