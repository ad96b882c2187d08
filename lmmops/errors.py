"""Exceptions and warnings raised by lmmops.

Every error that a user can cause by their input derives from :class:`LmmopsError`
(and from :class:`ValueError` where the input value is at fault), so that callers
and the command-line tool can tell user errors from bugs.
"""

__all__ = [
    "ConvergenceWarning",
    "DenseTooLargeError",
    "DesignError",
    "DisconnectedDesignError",
    "DisconnectedDesignWarning",
    "FormulaError",
    "LmmopsError",
    "RankDeficientError",
]


class LmmopsError(Exception):
    """Base class of every error lmmops raises on purpose."""


class DesignError(LmmopsError, ValueError):
    """The grouping factors or the response cannot define a crossed design."""


class DisconnectedDesignError(DesignError):
    """An operation that needs a connected level graph got a disconnected one."""


class FormulaError(LmmopsError, ValueError):
    """The model formula cannot be parsed or refers to something that does not exist."""


class RankDeficientError(LmmopsError, ValueError):
    """The fixed-effects model matrix X does not have full column rank."""


class DenseTooLargeError(LmmopsError, MemoryError):
    """A dense matrix was requested that exceeds the configured size limit."""


class ConvergenceWarning(UserWarning):
    """An optimiser or iterative solver stopped before meeting its tolerance."""


class DisconnectedDesignWarning(UserWarning):
    """The level graph of the crossed factors has more than one connected component."""
