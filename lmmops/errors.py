"""Exceptions and warnings raised by lmmops.

Every error that a user can cause by their input derives from :class:`LmmopsError`,
so that callers and the command-line tool can tell user errors from bugs. Each also
derives from the built-in exception a plain-Python caller would catch: :class:`ValueError`
where the input value is at fault (:class:`ArgumentError`, :class:`DesignError`, ...),
:class:`TypeError` for an input of the wrong type (:class:`ArgumentTypeError`) and
:class:`KeyError` for an unknown name (:class:`UnknownNameError`).
"""

__all__ = [
    "ArgumentError",
    "ArgumentTypeError",
    "ConvergenceWarning",
    "CorrectionRankWarning",
    "DataSourceError",
    "DenseTooLargeError",
    "DesignError",
    "DisconnectedDesignError",
    "DisconnectedDesignWarning",
    "FormulaError",
    "LmmopsError",
    "NumericalFailure",
    "RankDeficientError",
    "RankDeficientWarning",
    "RefitWarning",
    "UnknownNameError",
    "UserError",
]


class LmmopsError(Exception):
    """Base class of every error lmmops raises on purpose."""


class ArgumentError(LmmopsError, ValueError):
    """An argument has a value the function cannot take (shape, range, option name)."""


class ArgumentTypeError(LmmopsError, TypeError):
    """An argument has a type the function cannot use."""


class UnknownNameError(LmmopsError, KeyError):
    """A factor, kernel or other name that does not exist was asked for.

    Its message prints as given (a plain :class:`KeyError` would quote it).

    Examples
    --------
    >>> str(UnknownNameError("no factor named 'x'"))
    "no factor named 'x'"
    """

    def __str__(self):
        return str(self.args[0]) if self.args else ""


class DesignError(LmmopsError, ValueError):
    """The grouping factors or the response cannot define a crossed design."""


class DataSourceError(LmmopsError, ValueError):
    """A partition or a file of the data (a Dask DataFrame, a glob or a directory of
    files) cannot be used: unreadable, a schema unlike the others, a value it cannot
    hold. The message names the file (or partition) and the column."""


class DisconnectedDesignError(DesignError):
    """An operation that needs a connected level graph got a disconnected one."""


class FormulaError(LmmopsError, ValueError):
    """The model formula cannot be parsed or refers to something that does not exist."""


class RankDeficientError(LmmopsError, ValueError):
    """The fixed-effects model matrix X does not have full column rank."""


class DenseTooLargeError(LmmopsError, MemoryError):
    """A dense matrix was requested that exceeds the configured size limit."""


class NumericalFailure(LmmopsError):
    """The Cholesky factorisation failed at a particular ``theta`` (ill-conditioning)."""


class UserError(LmmopsError):
    """A problem with the command line or its inputs."""


class ConvergenceWarning(UserWarning):
    """An optimiser or iterative solver stopped before meeting its tolerance."""


class DisconnectedDesignWarning(UserWarning):
    """The level graph of the crossed factors has more than one connected component."""


class RankDeficientWarning(UserWarning):
    """The fixed-effects model matrix is rank deficient; aliased columns were dropped."""


class CorrectionRankWarning(UserWarning):
    """The low-rank correction is nearly as large as the level space itself."""


class RefitWarning(UserWarning):
    """Models fitted by REML were refitted by ML for a likelihood-ratio test."""
