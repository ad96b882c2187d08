"""The objective protocol: what a fitted objective answers, whichever solver it is.

The analysis layer and :class:`~lmmops.LMMResult` ask an objective for a few level-space
and observation-space quantities at its optimum. Each function here answers for both
objectives, the exact :class:`~lmmops.estimation.direct.DirectObjective` and the matrix-free
:class:`~lmmops.estimation.iterative.IterativeObjective`, as a
:class:`~lmmops.linalg.trace.TraceEstimate` whose standard error is 0 where the answer is
exact. Callers never branch on the solver; a new objective registers its own
implementation (:func:`functools.singledispatch`).

Examples
--------
>>> import numpy as np
>>> from lmmops.data.design import CrossedDesign
>>> from lmmops.estimation.direct import DirectObjective
>>> rng = np.random.default_rng(0)
>>> a, b = rng.integers(0, 6, 200), rng.integers(0, 4, 200)
>>> d = CrossedDesign.from_codes([a, b])
>>> y = rng.normal(size=6)[a] + rng.normal(size=4)[b] + rng.normal(size=200)
>>> obj = DirectObjective(d, np.ones((200, 1)), y)
>>> ev = obj.evaluate(np.array([0.8, 0.9]))
>>> est = diag_P(obj, ev)
>>> est.estimate.shape, float(np.max(est.stderr))
((200,), 0.0)
"""

from __future__ import annotations

import functools

import numpy as np

from lmmops.errors import ArgumentTypeError
from lmmops.estimation.direct import DirectObjective
from lmmops.estimation.iterative import IterativeObjective
from lmmops.estimation.mme import diag_P as _exact_diag_P
from lmmops.estimation.mme import level_space_diagonals
from lmmops.linalg.trace import TraceEstimate

__all__ = ["diag_P", "level_diagonal_inverse"]


@functools.singledispatch
def diag_P(obj, ev):
    """``diag(P)`` at ``ev``, one entry per observation (solver's scale).

    Exact on the direct solver; a stochastic diagonal estimate on the iterative one
    (:meth:`~lmmops.estimation.iterative.IterativeObjective.diag_P`).
    """
    raise ArgumentTypeError(f"no diag_P for {type(obj).__name__}")


@diag_P.register
def _(obj: DirectObjective, ev):
    d = _exact_diag_P(obj, ev)
    return TraceEstimate(d, np.zeros_like(d), 0)


@diag_P.register
def _(obj: IterativeObjective, ev):
    return obj.diag_P(ev)


@functools.singledispatch
def level_diagonal_inverse(obj, ev, z_only=False):
    """The random-effects diagonal of the inverse of the spherical mixed-model matrix.

    One entry per level, all factors concatenated in level-space order; with
    ``z_only=True`` conditional on ``beta`` (the fixed effects known), otherwise
    including the uncertainty of ``beta``. Times ``s^2 theta_k^2`` it is the prediction
    error variance of each BLUP.
    """
    raise ArgumentTypeError(f"no level_diagonal_inverse for {type(obj).__name__}")


@level_diagonal_inverse.register
def _(obj: DirectObjective, ev, z_only=False):
    d = np.concatenate(level_space_diagonals(obj, ev, z_only=z_only)["omega_diag"])
    return TraceEstimate(d, np.zeros_like(d), 0)


@level_diagonal_inverse.register
def _(obj: IterativeObjective, ev, z_only=False):
    return obj.diag_inverse(ev, z_only=z_only)
