"""Random-effects terms: what one bar term ``(columns | group)`` of a formula contributes.

A :class:`RandomEffectsTerm` is lmmops' counterpart of lme4's ``reTrms`` entry and
MixedModels.jl's ``ReMat``: the grouping codes of one factor, the term's model-matrix
columns (their names and, for a slope term, their values per row), the factor's level
names, and the parametrisation of the term's relative covariance factor ``Lambda_k``
(``d x d`` lower triangular, ``d`` the number of columns). The term's covariance is
``s_e^2 Lambda_k Lambda_k'`` per level; its ``theta`` is the column-major lower triangle
of ``Lambda_k`` (lme4's ``getME(m, "theta")`` order), one number for an intercept term.

A scalar random intercept has one column, ``"(Intercept)"``, whose values are all 1 and
are not stored; a random-slope term ``(1 + x | g)`` stores its columns' values.
:attr:`CrossedDesign.terms <lmmops.data.design.CrossedDesign.terms>` gives one random
intercept per factor; :func:`build_terms` builds the terms of a parsed lme4 formula
(:func:`lmmops.data.formula.parse_formula`), with their model matrices, lme4's column
names and lme4's order, and refuses terms whose parameters are not identifiable.

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
import functools
import math

import numpy as np
import pandas as pd

from lmmops.data.formula import fixed_effects_matrix, rank_columns
from lmmops.errors import ArgumentError, DesignError, FormulaError

__all__ = ["CENTRE_RATIO", "RandomEffectsTerm", "build_terms", "centred_start",
           "centred_terms", "centring_offsets", "centring_shifts", "check_term_rank",
           "column_units",
           "covariance_entries", "lower_triangle", "lq_lower", "off_centre_hint",
           "order_terms", "recentre_theta", "theta_layout", "theta_lower_bounds",
           "theta_names", "theta_scales"]


@functools.lru_cache(maxsize=64)
def lower_triangle(d, order="C"):
    """Indices ``(rows, cols)`` of the lower triangle of a ``d x d`` matrix, in column-
    major order (``order="F"``: lme4's ``theta`` order within a term) or row-major
    (``"C"``); cached and read-only (``np.tril_indices`` costs 0.2 ms a call, which the
    optimiser's hot loop paid hundreds of times on small fits).

    Examples
    --------
    >>> lower_triangle(2, "F")
    (array([0, 1, 1]), array([0, 0, 1]))
    """
    if order == "F":
        cols, rows = np.triu_indices(d)
    else:
        rows, cols = np.tril_indices(d)
    rows.setflags(write=False)
    cols.setflags(write=False)
    return rows, cols


def covariance_entries(S):
    """The entries of a term's ``d x d`` covariance in the order of
    :attr:`~lmmops.result.LMMResult.varcorr` (and of the slope solvers'
    ``variance_covariance``): the variances, then the covariances below the diagonal,
    column by column.

    Examples
    --------
    >>> import numpy as np
    >>> covariance_entries(np.array([[4.0, 1.0, 2.0], [1.0, 9.0, 3.0], [2.0, 3.0, 16.0]]))
    array([ 4.,  9., 16.,  1.,  2.,  3.])
    """
    S = np.asarray(S, dtype=np.float64)
    d = S.shape[0]
    below = [S[i, j] for j in range(d) for i in range(j + 1, d)]
    return np.concatenate([np.diag(S), np.array(below, dtype=np.float64)])


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
    #: the formula sandbox's model specification of the term's columns (built by
    #: :func:`build_terms`), which rebuilds them on new data; None for a term built by hand
    spec: object = dataclasses.field(default=None, repr=False)

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
        L[lower_triangle(self.dim, "F")] = theta  # column-major lower triangle
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


def column_units(columns, S, n):
    """Per column of a term: its power-of-two unit ``c_i`` and the mean its spread is
    taken about, from the term's weighted cross-products ``S = sum_rows w z z'``.

    With an intercept column ``0``: the weighted mean ``m_i = S[i, 0] / S[0, 0]`` and
    spread ``s_i = sqrt(S[i, i] / S[0, 0] - m_i^2)``; without one, ``m_i = 0`` and
    ``s_i = sqrt(S[i, i] / n)``. ``c_i`` is the largest power of two not above ``s_i``
    (1 for the intercept and for a column without spread). ``S`` is the sum over the
    term's levels of the diagonal blocks of ``Z'WZ``, which the in-memory and the
    distributed solvers both hold, so both get the same units.

    Parameters
    ----------
    columns : sequence of str
        The term's column names.
    S : ndarray, shape (d, d)
    n : int
        Rows.

    Returns
    -------
    c, m : ndarray, shape (d,)
    """
    d = len(columns)
    S = np.asarray(S, dtype=np.float64)
    c, m = np.ones(d), np.zeros(d)
    i0 = columns.index(INTERCEPT) if INTERCEPT in columns else None
    for i, name in enumerate(columns):
        if name == INTERCEPT:
            continue
        if i0 is not None and S[i0, i0] > 0.0:
            m[i] = S[i, i0] / S[i0, i0]
            var = S[i, i] / S[i0, i0] - m[i] ** 2
            # cancellation when the mean dominates: the spread is then at most the
            # rounding of the mean; S's cross-products are what the solver sees
            var = max(var, 0.0)
        else:
            var = S[i, i] / max(int(n), 1)
        s = math.sqrt(var)
        if s > 0.0 and math.isfinite(s):
            c[i] = 2.0 ** math.floor(math.log2(s))
    return c, m


def theta_scales(terms, units):
    """Per entry of ``theta``, the power of two that puts a slope column on unit scale.

    Column ``i`` of a term with unit ``c_i`` (:func:`column_units`: the largest power
    of two not above its spread): the model with the column ``z_i / c_i`` has the same
    fit at ``T_k^c = diag(c) T_k``, which is lower triangular again, so the entry
    ``(i, j)`` of ``T_k`` is ``theta^c / c_i``: this function returns those factors
    ``1 / c_i``, one per entry of ``theta`` in its order. Powers of two make the change
    of variables exact in floating point. The optimiser works in ``theta^c``
    (:func:`lmmops.estimation.vector.fit_vector`), so that a covariate in seconds or in
    days (``Days * 86400``) gives the same path and the same optimum.

    Parameters
    ----------
    terms : sequence of RandomEffectsTerm
    units : sequence of (c, m)
        Per term, from :func:`column_units`.

    Returns
    -------
    ndarray, shape (n_theta,)
        Positive powers of two (all 1 for intercept-only terms).

    Examples
    --------
    >>> import numpy as np, pandas as pd
    >>> x = 86400.0 * np.arange(10)
    >>> Z = np.column_stack([np.ones(10), x])
    >>> t = RandomEffectsTerm("g", np.zeros(10, np.int32), pd.Index([0]),
    ...                       ("(Intercept)", "x"), Z)
    >>> units = [column_units(t.columns, Z.T @ Z, 10)]   # spread 2.5e5: c = 2**17
    >>> theta_scales([t], units).tolist()
    [1.0, 7.62939453125e-06, 7.62939453125e-06]
    """
    out = [1.0 / u[0][lower_triangle(t.dim, "F")[0]] for t, u in zip(terms, units)]
    return np.concatenate(out) if out else np.zeros(0)


def centred_start(terms, units):
    """The optimisers' start: lme4's ``T_k = I`` for the term's columns centred on their
    means and put on unit scale (:func:`theta_scales`), written as lme4's ``theta``.

    With ``G`` the map from the coefficients of the centred, scaled columns to the
    user's (``z_i = c_i z_i^c + m_i``: ``b_0 = b_0^c - sum_i (m_i / c_i) b_i^c``,
    ``b_i = b_i^c / c_i``), the start covariance is ``G G'`` and ``T_k`` its Cholesky
    factor. For centred columns of unit spread it is lme4's start; for a covariate far
    from 0 (a year, ``Days + 1000``) the intercept's start variance is that of the
    intercept at the covariate's mean, not at 0, which the optimiser would otherwise
    have to find (86 evaluations instead of 13 on sleepstudy with ``Days + 1000``).

    Parameters
    ----------
    terms : sequence of RandomEffectsTerm
    units : sequence of (c, m)
        Per term, from :func:`column_units`.

    Returns
    -------
    ndarray, shape (n_theta,)

    Examples
    --------
    >>> import numpy as np, pandas as pd
    >>> x = np.arange(4.0) + 10.0   # mean 11.5, spread 1.118: c = 1
    >>> Z = np.column_stack([np.ones(4), x])
    >>> t = RandomEffectsTerm("g", np.zeros(4, np.int32), pd.Index([0]),
    ...                       ("(Intercept)", "x"), Z)
    >>> T = t.relative_factor(centred_start([t], [column_units(t.columns, Z.T @ Z, 4)]))
    >>> np.round(T @ T.T, 12).tolist()
    [[133.25, -11.5], [-11.5, 1.0]]
    """
    out = []
    for t, (c, m) in zip(terms, units):
        G = np.diag(1.0 / c)
        if INTERCEPT in t.columns:
            i0 = t.columns.index(INTERCEPT)
            G[i0] -= m / c
            G[i0, i0] = 1.0
        T = np.linalg.cholesky(G @ G.T)
        rows, cols = lower_triangle(t.dim, "F")
        out.append(T[rows, cols])
    return np.concatenate(out) if out else np.zeros(0)


#: A slope column whose mean is this many times its spread or more is "far from
#: centred" (:func:`off_centre_hint`).
OFF_CENTRE_RATIO = 100.0


def off_centre_hint(terms, ratio=OFF_CENTRE_RATIO):
    """A sentence naming the slope columns whose mean is at least ``ratio`` times their
    spread in a term with an intercept, or ``""``.

    For such a column the user's intercept (the value at 0) is far outside the data: its
    variance and its correlation with the slope are nearly determined by the slope's
    (correlation near +-1), the criterion is flat and ill-conditioned along them, and
    ``X'V^{-1}X`` loses digits; lme4 has the same problem ("Model is nearly
    unidentifiable ... Rescale variables?"). The fit is the same model with the column
    centred (the covariance of the user's coefficients follows exactly), so the remedy is
    to centre it.

    Parameters
    ----------
    terms : sequence of RandomEffectsTerm
    ratio : float

    Returns
    -------
    str

    Examples
    --------
    >>> import numpy as np, pandas as pd
    >>> x = np.tile(np.arange(4.0), 5) + 1e5
    >>> t = RandomEffectsTerm("g", np.repeat(np.arange(5), 4).astype(np.int32),
    ...                       pd.Index(range(5)), ("(Intercept)", "x"),
    ...                       np.column_stack([np.ones(20), x]))
    >>> off_centre_hint([t])[:60]
    "slope column 'x' of the term on 'g' has mean 1e+05, 8.9e+04 "
    """
    found = [f"slope column '{terms[k].columns[i]}' of the term on '{terms[k].group}' has "
             f"mean {m:.3g}, {abs(m) / s:.2g} times its spread"
             for k, i, m, s in _off_centre_columns(terms, ratio)]
    if not found:
        return ""
    return ("; ".join(found) + ": the intercept at 0 is far outside the data and nearly "
            "aliased with the slope, which makes the criterion ill-conditioned; centre the "
            "column (e.g. x - mean(x)), which gives the same model")


#: A slope column whose mean is at least this many times its spread, in a term with an
#: intercept, is centred inside the exact slope fit (:func:`centring_shifts`).
CENTRE_RATIO = 10.0


def centring_shifts(terms, ratio=CENTRE_RATIO):
    """Per term the shifts ``m`` of its off-centre slope columns, or None if no column
    is off centre.

    A column ``x`` of a term with an intercept whose mean is at least ``ratio`` times
    its spread is shifted by its mean: ``Z = Z^c N`` with ``N = I + e_0 m'`` (``e_0``
    the intercept), so ``(1 + x | g)`` on ``x`` is the same model as on ``x - m`` with
    the coefficients ``b^c = N b`` and covariance ``N Sigma N'`` (:func:`recentre_theta`
    maps ``theta`` between the two). Terms without values, without an intercept or with
    uncorrelated columns (``||``, one column) are not shifted: for them a shift is a
    different model.

    Parameters
    ----------
    terms : sequence of RandomEffectsTerm
    ratio : float

    Returns
    -------
    list of ndarray (one ``(d,)`` per term) or None

    Examples
    --------
    >>> import numpy as np, pandas as pd
    >>> x = np.tile(np.arange(4.0), 5) + 1e5
    >>> t = RandomEffectsTerm("g", np.repeat(np.arange(5), 4).astype(np.int32),
    ...                       pd.Index(range(5)), ("(Intercept)", "x"),
    ...                       np.column_stack([np.ones(20), x]))
    >>> centring_shifts([t])[0].tolist()
    [0.0, 100001.5]
    """
    out = [np.zeros(t.dim) for t in terms]
    found = _off_centre_columns(terms, ratio)
    for k, i, m, _ in found:
        out[k][i] = m
    return out if found else None


def _mean_spread(z):
    """A column's mean and spread (root mean square about the mean)."""
    z = np.asarray(z, dtype=np.float64)
    m = float(z.mean())
    return m, float(np.sqrt(np.mean((z - m) ** 2)))


def _off_centre_columns(terms, ratio):
    """``(term, column, mean, spread)`` of each slope column, in a term with values and
    an intercept, whose mean is ``ratio`` spreads or more from 0."""
    found = []
    for k, t in enumerate(terms):
        if t.values is None or INTERCEPT not in t.columns:
            continue
        for i, name in enumerate(t.columns):
            if name == INTERCEPT or not t.values.shape[0]:
                continue
            m, s = _mean_spread(t.values[:, i])
            if s > 0.0 and abs(m) >= ratio * s:
                found.append((k, i, m, s))
    return found


def centring_offsets(terms, shifts):
    """The largest ``|m| / s`` of the columns shifted by ``shifts``
    (:func:`centring_shifts`): the shift ``m`` of a column over its spread ``s`` (the
    root mean square of its values about their mean), 0 if nothing is shifted.

    The criterion evaluated on the columns as given loses about ``eps (|m| / s)^2`` of
    itself to rounding (``docs/theory_slopes.rst``, "Conditioning").

    Examples
    --------
    >>> import numpy as np, pandas as pd
    >>> x = np.tile(np.arange(4.0), 5) + 1e5
    >>> t = RandomEffectsTerm("g", np.repeat(np.arange(5), 4).astype(np.int32),
    ...                       pd.Index(range(5)), ("(Intercept)", "x"),
    ...                       np.column_stack([np.ones(20), x]))
    >>> round(centring_offsets([t], centring_shifts([t])))
    89444
    """
    out = 0.0
    for t, m in zip(terms, shifts):
        for i in np.flatnonzero(m):
            s = _mean_spread(t.values[:, i])[1]
            out = max(out, math.inf if s == 0.0 else abs(float(m[i])) / s)
    return out


def centred_terms(terms, shifts):
    """The terms with their slope columns shifted by ``shifts`` (:func:`centring_shifts`):
    the same model, with the rows' values ``z - m`` (terms without a shift unchanged)."""
    return [t if not np.any(m) else dataclasses.replace(
        t, values=np.ascontiguousarray(t.values - m[None, :]), spec=None)
        for t, m in zip(terms, shifts)]


def lq_lower(M):
    """The lower-triangular ``L`` with a non-negative diagonal and ``L L' = M M'`` (the
    ``L`` of ``M = L Q``, from a QR of ``M'``), also for a singular ``M``.

    Examples
    --------
    >>> import numpy as np
    >>> M = np.array([[1.0, 2.0], [3.0, 4.0]])
    >>> L = lq_lower(M)
    >>> bool(np.allclose(L @ L.T, M @ M.T)), bool(L[0, 1] == 0.0)
    (True, True)
    """
    R = np.linalg.qr(np.asarray(M, dtype=np.float64).T, mode="r")
    R = R * np.where(np.diag(R) < 0.0, -1.0, 1.0)[:, None]
    return np.tril(R.T)


def recentre_theta(terms, theta, shifts, to="centred"):
    """lme4's ``theta`` of the user's columns mapped to that of the columns shifted by
    ``shifts`` (``to="centred"``), or back (``to="user"``).

    Per term ``T^c T^c' = N T T' N'`` with ``N = I + e_0 m'``: ``T^c`` is the
    lower-triangular factor of ``N T`` (:func:`lq_lower`), ``T`` that of ``N^{-1} T^c``
    (``N^{-1} = I - e_0 m'``). The conditional modes follow as ``b = N^{-1} b^c``; the
    spherical ``u = Lambda^{-1} b`` is rotated by the ``Q`` of that factorisation.

    Parameters
    ----------
    terms : sequence of RandomEffectsTerm
    theta : ndarray, shape (n_theta,)
    shifts : list of ndarray
    to : {"centred", "user"}

    Returns
    -------
    ndarray, shape (n_theta,)

    Examples
    --------
    >>> import numpy as np, pandas as pd
    >>> x = np.tile(np.arange(4.0), 5) + 100.0
    >>> t = RandomEffectsTerm("g", np.repeat(np.arange(5), 4).astype(np.int32),
    ...                       pd.Index(range(5)), ("(Intercept)", "x"),
    ...                       np.column_stack([np.ones(20), x]))
    >>> m = [np.array([0.0, 101.5])]
    >>> th = recentre_theta([t], np.array([2.0, 0.5, 1.0]), m, to="user")
    >>> np.round(recentre_theta([t], th, m), 12).tolist()
    [2.0, 0.5, 1.0]
    """
    if to not in ("centred", "user"):
        raise ArgumentError(f"to must be 'centred' or 'user', got {to!r}")
    theta = np.asarray(theta, dtype=np.float64)
    out = theta.copy()
    for t, m, sl in zip(terms, shifts, theta_layout(terms)):
        if not np.any(m):
            continue
        i0 = t.columns.index(INTERCEPT)
        N = np.eye(t.dim)
        N[i0] += m if to == "centred" else -m
        L = lq_lower(N @ t.relative_factor(theta[sl]))
        rows, cols = lower_triangle(t.dim, "F")
        out[sl] = L[rows, cols]
    return out


# ---------------------------------------------------------------- from a formula
#: Relative tolerance of the identifiability checks of :func:`build_terms` (R's 1e-7).
TOL = 1e-7


def check_term_rank(spec, names, aliased):
    """Refuse a random-effects term whose model matrix is rank deficient: ``aliased``
    (of its columns ``names``) are linear combinations of the columns before them."""
    if aliased:
        kept = [c for c in names if c not in aliased]
        raise DesignError(
            f"random-effects term {spec}: its model matrix is rank deficient: column(s) "
            f"{', '.join(aliased)} are linear combinations of the columns before them "
            f"({', '.join(kept) or 'none: an all-zero column'}), so the term's covariance is "
            "not identifiable; drop them from the term")


def order_terms(terms):
    """lme4's order of random-effects terms (``mkReTrms(reorder.terms = TRUE)``).

    lme4 1.1-31 (and reformulas' ``mkReTrms``) reorders only if some term has more levels
    than the term before it, and then takes ``rev(order(nl))``: decreasing number of
    levels, terms with equal numbers of levels in the *reverse* of their formula order
    (``order`` is stable, ``rev`` reverses the ties too).

    Parameters
    ----------
    terms : sequence of RandomEffectsTerm or of int
        Terms, or their numbers of levels.

    Returns
    -------
    list of int
        The positions of the terms in lme4's order.

    Examples
    --------
    >>> order_terms([18, 18, 5])          # already non-increasing: kept
    [0, 1, 2]
    >>> order_terms([5, 18, 18])          # reordered: the two ties swap
    [2, 1, 0]
    """
    nl = [t if isinstance(t, (int, np.integer)) else t.n_levels for t in terms]
    if not any(b > a for a, b in zip(nl, nl[1:])):
        return list(range(len(nl)))
    return sorted(range(len(nl)), key=nl.__getitem__)[::-1]


def build_terms(parsed, data, design):
    """The random-effects terms of a parsed formula, as lme4's ``mkReTrms`` builds them.

    Each term's model matrix is its effects formula evaluated as the fixed part is
    (:func:`lmmops.data.formula.fixed_effects_matrix`: the formula sandbox, R's treatment
    contrasts, lme4's column names such as ``"(Intercept)"``, ``"Days"``, ``"DaysFlate"``,
    ``"A:B"``); ``(0 + f | g)`` for a factor ``f`` has one column per level of ``f``, as
    R's ``model.matrix`` without an intercept. The terms are in lme4's order
    (:func:`order_terms`).

    Parameters
    ----------
    parsed : lmmops.data.formula.ParsedFormula
    data : pandas.DataFrame
    design : lmmops.data.design.CrossedDesign
        One factor per name in ``parsed.random`` (``CrossedDesign.from_frame(data,
        list(parsed.random))``); the terms' level codes and names are the design's.

    Returns
    -------
    tuple of RandomEffectsTerm
        ``values`` is None for a pure intercept term.

    Raises
    ------
    FormulaError
        For effects outside the allow-list, an unknown column, or a missing (NaN) or
        infinite value in a column of a term (naming the term and the column; no row is
        dropped).
    DesignError
        For a term whose parameters are not identifiable:

        - a vector-valued term on a factor with at most as many levels as the term has
          columns ("number of levels of each grouping factor must be > number of random
          effects per level": its ``d x d`` covariance needs more than ``d`` levels);
        - lme4's ``checkZdims``: "number of observations (=n) <= number of random effects
          (=q) for term (x | g); the random-effects parameters and the residual variance
          (or scale parameter) are probably unidentifiable";
        - a term without columns (``(0 | g)``);
        - a rank-deficient term model matrix (a column aliased with the term's intercept
          or with its other columns: ``(1 + x + x2 | g)`` with ``x2 = 2 x``), naming the
          columns;
        - in a term with an intercept, a column constant within every level of the
          grouping factor (a between-group covariate, ``(1 + Sex | Subject)``): its slope
          is a multiple of the intercept in each level;
        - two terms on the same factor where a column of one lies in the span of the
          other's (``(1 | g) + (1 + x | g)``, or ``(f || g)`` for a factor ``f``, which is
          ``(1 | g) + (0 + f | g)``): only the sum of their variances is identifiable.

        lme4 checks only the first (and, like :class:`~lmmops.data.design.CrossedDesign`,
        that each factor has fewer levels than observations); it fits the others and
        reports a singular fit or a warning.

    Examples
    --------
    >>> import numpy as np, pandas as pd
    >>> from lmmops.data.design import CrossedDesign
    >>> from lmmops.data.formula import parse_formula
    >>> rng = np.random.default_rng(0)
    >>> df = pd.DataFrame({"g": rng.integers(0, 6, 60), "h": rng.integers(0, 9, 60),
    ...                    "x": rng.normal(size=60)})
    >>> pf = parse_formula("y ~ x + (1 + x | g) + (1 | h)")
    >>> terms = build_terms(pf, df, CrossedDesign.from_frame(df, list(pf.random)))
    >>> [(t.group, t.columns) for t in terms]      # h has more levels: first
    [('h', ('(Intercept)',)), ('g', ('(Intercept)', 'x'))]
    >>> theta_names(terms)
    ['h.(Intercept)', 'g.(Intercept)', 'g.x.(Intercept)', 'g.x']
    """
    if not isinstance(data, pd.DataFrame):
        raise FormulaError(f"data must be a pandas DataFrame, got {type(data).__name__}")
    specs = tuple(parsed.random_terms)
    if not specs:
        raise FormulaError("the parsed formula has no random-effects terms")
    n = design.n_obs
    if len(data) != n:
        raise DesignError(f"the design has {n} rows but the data {len(data)}")
    built = []
    for spec in specs:
        k = design.index(spec.group)
        try:
            X, names, mspec = fixed_effects_matrix(spec.effects, data, return_spec=True,
                                                   what="random effects")
        except FormulaError as exc:
            raise FormulaError(f"random-effects term {spec}: {exc}") from None
        values = _check_term_matrix(spec, X, names, design.codes[k])
        term = RandomEffectsTerm(spec.group, design.codes[k], design.levels[k],
                                 tuple(names), values, spec=mspec)
        if term.dim > 1 and term.n_levels <= term.dim:
            raise DesignError(
                f"number of levels of each grouping factor must be > number of random "
                f"effects per level: term ({spec.effects} | {spec.group}) has "
                f"{term.n_levels} levels of '{spec.group}' for {term.dim} random effects "
                f"per level ({', '.join(names)}), too few to estimate its {term.dim} x "
                f"{term.dim} covariance; use fewer columns in the term or a factor with "
                "more levels")
        if n <= term.n_random_effects:  # lme4's checkZdims, its words
            raise DesignError(
                f"number of observations (={n}) <= number of random effects "
                f"(={term.n_random_effects}) for term ({spec.effects} | {spec.group}); the "
                "random-effects parameters and the residual variance (or scale parameter) "
                "are probably unidentifiable")
        built.append((spec, term))
    twins = {frozenset((design.names[k], design.names[l]))
             for k, l in design.identical_partitions()}
    _check_shared_columns(built, twins)
    return tuple(built[i][1] for i in order_terms([t for _, t in built]))


def _check_term_matrix(spec, X, names, codes):
    """The term's values (None for a pure intercept), after its identifiability checks."""
    if X.shape[1] == 0:
        raise DesignError(f"random-effects term {spec} has no columns: its effects remove "
                          "the intercept and add nothing")
    if list(names) == [INTERCEPT]:
        return None
    _, aliased = rank_columns(X, names, tol=TOL)
    check_term_rank(spec, names, aliased)
    if INTERCEPT in names:
        order = np.argsort(codes, kind="stable")
        starts = np.flatnonzero(np.r_[True, np.diff(codes[order]) != 0])
        for j, name in enumerate(names):
            if name == INTERCEPT:
                continue
            col = X[order, j]
            spread = np.max(np.maximum.reduceat(col, starts) - np.minimum.reduceat(col, starts))
            if spread <= TOL * (col.max() - col.min()):
                raise DesignError(
                    f"random-effects term {spec}: column '{name}' is constant within every "
                    f"level of '{spec.group}', so its random slope is a multiple of the "
                    "random intercept in each level and the two cannot be told apart; make "
                    "it a fixed effect only, or drop it from the term")
    values = np.array(X, dtype=np.float64, order="C")
    values.setflags(write=False)
    return values


def _check_shared_columns(built, twins=frozenset()):
    """Two terms on one factor, or on two factors that group the rows identically
    (``twins``: sets of their two names, ``(1 | b:a) + (0 + x | a:b)``): no column of one
    in the span of the other's columns."""
    for a, (spec_a, ta) in enumerate(built):
        for spec_b, tb in built[a + 1:]:
            if ta.group == tb.group:
                where = f"on grouping factor '{ta.group}'"
            elif frozenset((ta.group, tb.group)) in twins:
                where = (f"on grouping factors '{ta.group}' and '{tb.group}' (which group "
                         "the observations identically)")
            else:
                continue
            for (s1, t1), (s2, t2) in (((spec_a, ta), (spec_b, tb)),
                                       ((spec_b, tb), (spec_a, ta))):
                B = _values(t2)
                for j, name in enumerate(t1.columns):
                    col = _values(t1)[:, j]
                    coef = np.linalg.lstsq(B, col, rcond=None)[0]
                    resid = np.linalg.norm(col - B @ coef)
                    if resid <= TOL * np.linalg.norm(col):
                        how = ("is also a column" if name in t2.columns
                               else "lies in the span of the columns")
                        raise DesignError(
                            f"random-effects terms {s1} and {s2} {where}: column "
                            f"'{name}' of the first {how} of the "
                            f"second ({', '.join(t2.columns)}), so only the sum of the two "
                            "terms' variances along it is identifiable; merge them into one "
                            "term or drop one (for a factor f, (f || g) is (1 | g) + "
                            "(0 + f | g) in lme4: write (1 + f | g) or (0 + f | g))")


def _values(term):
    if term.values is None:
        return np.ones((term.codes.shape[0], 1))
    return term.values
