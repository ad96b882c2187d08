"""Random-effects terms: what one bar term ``(columns | group)`` of a formula contributes.

A :class:`RandomEffectsTerm` is lmmops' counterpart of lme4's ``reTrms`` entry and
MixedModels.jl's ``ReMat``: the grouping codes of one factor, the term's model-matrix
columns (their names and, for a slope term, their values per row), the factor's level
names, and the parametrisation of the term's relative covariance factor ``Lambda_k``
(``d x d`` lower triangular, ``d`` the number of columns). The term's covariance is
``s_e^2 Lambda_k Lambda_k'`` per level; its ``theta`` is the column-major lower triangle
of ``Lambda_k`` (lme4's ``getME(m, "theta")`` order), one number for an intercept term.

Today every term is a scalar random intercept (one column, ``"(Intercept)"``, whose
values are all 1 and are not stored); the layers above take terms, so vector-valued
terms (random slopes) add columns here without a new concept downstream.

Examples
--------
>>> import numpy as np
>>> from lmmops.data.design import CrossedDesign
>>> d = CrossedDesign.from_codes([[0, 0, 1, 1, 2], [0, 1, 0, 1, 1]], names=["a", "b"])
>>> [t.group for t in d.terms]
['a', 'b']
>>> t = d.terms[0]
>>> t.columns, t.dim, t.n_levels, t.n_theta
(('(Intercept)',), 1, 3, 1)
>>> t.theta_names()
['a.(Intercept)']
>>> theta_layout(d.terms)
[slice(0, 1, None), slice(1, 2, None)]
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

from lmmops.errors import DesignError

__all__ = ["RandomEffectsTerm", "theta_layout", "theta_lower_bounds", "theta_names"]

INTERCEPT = "(Intercept)"


@dataclasses.dataclass(frozen=True, eq=False)
class RandomEffectsTerm:
    """One random-effects term ``(columns | group)``.

    Parameters
    ----------
    group : str
        The grouping factor's name as written in the formula (``"s"``, ``"a:b"``).
    codes : ndarray of int32, shape (n_obs,)
        Level codes ``0 .. n_levels - 1`` (read-only).
    levels : pandas.Index
        Level names in code order.
    columns : tuple of str
        Names of the term's model-matrix columns; ``("(Intercept)",)`` for a random
        intercept.
    values : ndarray, shape (n_obs, dim), optional
        The columns' values per row; None for a random intercept (all ones).

    Raises
    ------
    DesignError
        Where the codes, levels, columns and values do not agree in size.
    """

    group: str
    codes: np.ndarray
    levels: pd.Index
    columns: tuple = (INTERCEPT,)
    values: np.ndarray | None = None

    def __post_init__(self):
        if not self.columns:
            raise DesignError(f"term '{self.group}': a term needs at least one column")
        if self.values is None:
            if tuple(self.columns) != (INTERCEPT,):
                raise DesignError(f"term '{self.group}': the values of columns "
                                  f"{list(self.columns)} are missing")
        elif np.shape(self.values) != (self.codes.shape[0], len(self.columns)):
            raise DesignError(f"term '{self.group}': values of shape "
                              f"{np.shape(self.values)} for {self.codes.shape[0]} rows and "
                              f"{len(self.columns)} columns")
        if len(self.levels) <= int(np.max(self.codes, initial=-1)):
            raise DesignError(f"term '{self.group}': {len(self.levels)} level names for "
                              f"codes up to {int(np.max(self.codes))}")

    @property
    def dim(self):
        """Number of columns ``d`` (random effects per level)."""
        return len(self.columns)

    @property
    def n_levels(self):
        """Number of levels of the grouping factor."""
        return len(self.levels)

    @property
    def n_random_effects(self):
        """``d * n_levels``: the term's share of the level space."""
        return self.dim * self.n_levels

    @property
    def is_intercept(self):
        """Whether the term is a scalar random intercept ``(1 | group)``."""
        return self.values is None

    @property
    def n_theta(self):
        """Parameters of ``Lambda_k``: ``d (d + 1) / 2`` (its lower triangle)."""
        return self.dim * (self.dim + 1) // 2

    def theta_names(self):
        """lme4's names of the term's ``theta`` entries, in its order.

        ``group.column`` for a diagonal entry and ``group.column_i.column_j`` below it
        (lme4's ``names(getME(m, "theta"))``), column-major.
        """
        out = []
        for j in range(self.dim):
            for i in range(j, self.dim):
                if i == j:
                    out.append(f"{self.group}.{self.columns[i]}")
                else:
                    out.append(f"{self.group}.{self.columns[i]}.{self.columns[j]}")
        return out

    def relative_factor(self, theta):
        """``Lambda_k``: the ``d x d`` lower-triangular factor whose column-major lower
        triangle is ``theta`` (the term's ``n_theta`` entries).

        Examples
        --------
        >>> import pandas as pd
        >>> t = RandomEffectsTerm("g", np.zeros(3, np.int32), pd.Index(["a"]),
        ...                       ("(Intercept)", "x"), np.ones((3, 2)))
        >>> t.relative_factor([1.0, 0.5, 2.0])
        array([[1. , 0. ],
               [0.5, 2. ]])
        """
        theta = np.asarray(theta, dtype=np.float64)
        if theta.shape != (self.n_theta,):
            raise DesignError(f"term '{self.group}': {theta.shape} theta entries for "
                              f"{self.n_theta} parameters")
        L = np.zeros((self.dim, self.dim))
        L[np.triu_indices(self.dim)[::-1]] = theta  # column-major lower triangle
        return L

    def theta_lower_bounds(self):
        """Lower bounds of the term's ``theta``: 0 on the diagonal, ``-inf`` below it
        (lme4's ``getME(m, "lower")``)."""
        return [0.0 if i == j else -np.inf
                for j in range(self.dim) for i in range(j, self.dim)]


def theta_layout(terms):
    """The slice of the full ``theta`` vector that belongs to each term, in order."""
    out, start = [], 0
    for t in terms:
        out.append(slice(start, start + t.n_theta))
        start += t.n_theta
    return out


def theta_names(terms):
    """lme4's names of the whole ``theta`` vector."""
    return [name for t in terms for name in t.theta_names()]


def theta_lower_bounds(terms):
    """Lower bounds of the whole ``theta`` vector (0 or ``-inf``)."""
    return np.array([b for t in terms for b in t.theta_lower_bounds()], dtype=np.float64)
