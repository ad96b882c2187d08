"""Solver and optimiser settings in one object, in the spirit of lme4's ``lmerControl``.

:class:`Options` holds every knob of a fit: the optimiser's iteration budget and
tolerances (both solvers), the iterative solver's probes, CG tolerance and iteration
budget, deflation rank and preconditioner, and the thread policy. Each is validated when
the object is made, so a bad setting is an :class:`~lmmops.errors.ArgumentError` naming
it before any work starts. ``maxiter`` is the optimiser's budget only; the CG budget per
solve is ``cg_maxiter``.

>>> from lmmops.options import Options
>>> opts = Options(n_probes=32, cg_rtol=1e-6)
>>> opts.n_probes, opts.cg_rtol, opts.maxiter
(32, 1e-06, 100)
>>> opts.replace(maxiter=50).maxiter
50
>>> Options(cg_maxiter=0)  # doctest: +IGNORE_EXCEPTION_DETAIL
Traceback (most recent call last):
lmmops.errors.ArgumentError: cg_maxiter must be a positive integer, got 0
"""

from __future__ import annotations

import dataclasses
import math
import numbers

from lmmops.errors import ArgumentError, ArgumentTypeError
from lmmops.estimation.iterative import check_n_probes, check_rtol, check_seed
from lmmops.threads import check_threads

__all__ = ["Options", "resolve_options"]


def _positive_int(value, name, allow_none=False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ArgumentError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _positive_float(value, name, upper=None):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentTypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not (math.isfinite(value) and value > 0 and (upper is None or value < upper)):
        bound = f" and < {upper}" if upper is not None else ""
        raise ArgumentError(f"{name} must be finite, > 0{bound}, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class Options:
    """Every solver and optimiser setting of a fit, validated on construction.

    Parameters
    ----------
    maxiter : int
        The optimiser's budget of accepted iterations (both solvers), restarts included.
    tol : float
        The exact optimiser stops when the Newton decrement is below ``tol`` times
        ``max(1, |criterion|)`` (the verification then applies, ``docs/guarantees.rst``).
    boundary_tol : float
        A ``theta_k`` below ``boundary_tol`` times ``max(1, scale_k)`` is tried at 0 (lme4's
        boundary test on the relative scale).
    restart : bool
        Whether the exact optimiser restarts from ``theta = 1`` when its verification is in
        doubt.
    n_probes : int
        Iterative solver: Rademacher probes, at least 2
        (:func:`lmmops.estimation.iterative.check_n_probes`).
    seed : int
        Iterative solver: the probes' seed (a non-negative integer).
    cg_rtol : float
        Iterative solver: the relative residual each PCG solve must reach, in ``(0, 1)``.
    cg_maxiter : int
        Iterative solver: the CG iteration budget of one solve; a solve that does not reach
        ``cg_rtol`` within it makes the fit say ``converged=False``.
    deflation_rank : int or None
        Iterative solver: the rank of the deflation basis of the stochastic log-determinant
        (None: the objective's default).
    step_tol : float
        Iterative solver: the fit has converged when every Newton step component is below
        ``step_tol`` times its Monte Carlo standard deviation.
    threads : "auto" or int
        BLAS and Numba threads (:mod:`lmmops.threads`).

    Examples
    --------
    >>> Options().as_dict()["cg_maxiter"]
    2000
    """

    maxiter: int = 100
    tol: float = 1e-13
    boundary_tol: float = 1e-4
    restart: bool = True
    n_probes: int = 16
    seed: int = 0
    cg_rtol: float = 1e-8
    cg_maxiter: int = 2000
    deflation_rank: int | None = None
    step_tol: float = 0.05
    threads: object = "auto"

    def __post_init__(self):
        set_ = object.__setattr__
        set_(self, "maxiter", _positive_int(self.maxiter, "maxiter"))
        set_(self, "tol", _positive_float(self.tol, "tol", upper=1.0))
        set_(self, "boundary_tol", _positive_float(self.boundary_tol, "boundary_tol",
                                                   upper=1.0))
        if not isinstance(self.restart, bool):
            raise ArgumentTypeError(f"restart must be True or False, got {self.restart!r}")
        set_(self, "n_probes", check_n_probes(self.n_probes))
        set_(self, "seed", check_seed(self.seed))
        set_(self, "cg_rtol", check_rtol(self.cg_rtol))
        set_(self, "cg_maxiter", _positive_int(self.cg_maxiter, "cg_maxiter"))
        set_(self, "deflation_rank", _positive_int(self.deflation_rank, "deflation_rank",
                                                   allow_none=True))
        set_(self, "step_tol", _positive_float(self.step_tol, "step_tol", upper=1.0))
        set_(self, "threads", check_threads(self.threads))

    def replace(self, **changes):
        """A copy with ``changes`` (validated); an unknown name is an ArgumentError.

        Examples
        --------
        >>> Options().replace(no_such_setting=1)  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        lmmops.errors.ArgumentError: unknown option 'no_such_setting'; ...
        """
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ArgumentError(f"unknown option {unknown[0]!r}; the options are "
                                f"{', '.join(sorted(known))}")
        return dataclasses.replace(self, **changes)

    def as_dict(self):
        """The settings as a plain dict (for the fit's record and its JSON)."""
        return dataclasses.asdict(self)


def resolve_options(options=None, **explicit):
    """``options`` (default :class:`Options`) with the keywords that are not None.

    The keyword shorthands of :meth:`lmmops.LMM.fit` (``maxiter=``, ``n_probes=``, ...)
    override the same settings of ``options``.

    Examples
    --------
    >>> resolve_options(Options(n_probes=8), n_probes=None, maxiter=20).maxiter
    20
    >>> resolve_options(Options(n_probes=8), n_probes=None).n_probes
    8
    """
    if options is None:
        options = Options()
    elif not isinstance(options, Options):
        raise ArgumentTypeError(f"options must be an lmmops.options.Options, got "
                                f"{type(options).__name__}")
    changes = {k: v for k, v in explicit.items() if v is not None}
    return options.replace(**changes) if changes else options
