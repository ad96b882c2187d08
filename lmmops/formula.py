"""lme4 formulas: split ``y ~ fixed + (1|g) + ...`` into a response, a fixed part and random terms.

The fixed part goes through formulaic with R's default treatment contrasts, and the
coefficient names are rewritten to lme4's (``service[T.1]`` becomes ``service1``,
``Intercept`` becomes ``(Intercept)``). Random terms may be

- ``(1|g)`` (also ``(1||g)``): a random intercept per level of ``g``;
- ``(1|a:b)``: a random intercept per observed combination of ``a`` and ``b``;
- ``(1|a/b)``: nesting, expanded to ``(1|a) + (1|a:b)``.

Random slopes such as ``(x|g)`` or ``(0 + x|g)`` raise :class:`NotImplementedError`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .conditioning import orthogonalise
from .errors import FormulaError, RankDeficientError

__all__ = [
    "ParsedFormula",
    "RankDeficientWarning",
    "check_full_rank",
    "fixed_effects_matrix",
    "lme4_names",
    "parse_formula",
    "rank_columns",
    "rank_message",
    "response_vector",
]


@dataclass(frozen=True)
class ParsedFormula:
    """A parsed lme4 formula.

    Attributes
    ----------
    formula : str
        The formula as given.
    response : str
        Left-hand side.
    fixed : str
        Right-hand side without the random terms (``"1"`` if nothing is left).
    random : tuple of str
        Grouping factors, one per random intercept, as written (``"s"``, ``"a:b"``).
    """

    formula: str
    response: str
    fixed: str
    random: tuple


def _split_top_level(s, sep):
    out, depth, cur = [], 0, []
    for ch in s:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == sep and depth == 0:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur))
    return out


def _random_terms(rhs):
    """Find ``( lhs | rhs )`` groups at any position; return (terms, remaining fixed text)."""
    terms, keep, i = [], [], 0
    while i < len(rhs):
        if rhs[i] == "(":
            depth, j = 0, i
            while j < len(rhs):
                if rhs[j] == "(":
                    depth += 1
                elif rhs[j] == ")":
                    depth -= 1
                    if depth == 0:
                        break
                j += 1
            if depth != 0:
                raise FormulaError(f"unbalanced parentheses in formula right-hand side '{rhs}'")
            inner = rhs[i + 1:j]
            if "|" in _strip_nested(inner):
                terms.append(inner)
                keep.append(" ")
            else:
                keep.append(rhs[i:j + 1])
            i = j + 1
        else:
            keep.append(rhs[i])
            i += 1
    return terms, "".join(keep)


def _strip_nested(s):
    """Text of ``s`` with nested parenthesised groups removed (to find a top-level bar)."""
    out, depth = [], 0
    for ch in s:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif depth == 0:
            out.append(ch)
    return "".join(out)


def _expand_grouping(expr, term):
    expr = expr.strip()
    if not expr:
        raise FormulaError(f"random term '({term})' has no grouping factor after '|'")
    if "/" in expr:
        parts = [p.strip() for p in expr.split("/")]
        if any(not p for p in parts):
            raise FormulaError(f"cannot parse nesting in random term '({term})'")
        return [":".join(parts[: i + 1]) for i in range(len(parts))]
    if "+" in expr or "*" in expr or "(" in expr:
        raise FormulaError(
            f"grouping factor '{expr}' in '({term})' is not supported; use a column name, "
            "a:b for an interaction or a/b for nesting"
        )
    return [":".join(p.strip() for p in expr.split(":"))]


def parse_formula(formula):
    """Parse an lme4 formula with random intercepts.

    Parameters
    ----------
    formula : str
        For example ``"y ~ 1 + service + (1|s) + (1|d) + (1|dept)"``.

    Returns
    -------
    ParsedFormula

    Raises
    ------
    FormulaError
        If there is no ``~``, no response, no random term, or a term cannot be parsed.
    NotImplementedError
        For random slopes such as ``(x|g)``.

    Examples
    --------
    >>> pf = parse_formula("y ~ x + (1|a/b) + (1|c)")
    >>> pf.response, pf.fixed, pf.random
    ('y', 'x', ('a', 'a:b', 'c'))
    """
    if not isinstance(formula, str) or "~" not in formula:
        raise FormulaError(f"a formula needs the form 'response ~ terms', got {formula!r}")
    lhs, rhs = formula.split("~", 1)
    lhs = lhs.strip()
    if not lhs:
        raise FormulaError(f"formula {formula!r} has no response on the left of '~'")
    if "~" in rhs:
        raise FormulaError(f"formula {formula!r} has more than one '~'")
    terms, fixed_text = _random_terms(rhs)
    if not terms:
        raise FormulaError(
            f"formula {formula!r} has no random-effects term such as (1|group); lmmops fits "
            "mixed models (use ordinary least squares for a purely fixed model)"
        )
    groups = []
    for term in terms:
        bar = "||" if "||" in term else "|"
        left, right = term.split(bar, 1)
        left_terms = {t.strip() for t in left.split("+")}
        if left_terms != {"1"}:
            raise NotImplementedError(
                f"random slopes are not supported yet: '({term.strip()})' has effects "
                f"'{left.strip()}'; only random intercepts (1|g) are implemented"
            )
        for g in _expand_grouping(right, term.strip()):
            if g in groups:
                raise FormulaError(f"grouping factor '{g}' appears twice in {formula!r}")
            groups.append(g)
    pieces = [p.strip() for p in _split_top_level(fixed_text, "+")]
    pieces = [p for p in pieces if p]
    fixed = " + ".join(pieces) if pieces else "1"
    return ParsedFormula(formula.strip(), lhs, fixed, tuple(groups))


_CONTRAST = re.compile(r"\[(?:T\.)?([^\]]*)\]")


def lme4_names(columns):
    """Rewrite formulaic column names in lme4's style.

    Parameters
    ----------
    columns : sequence of str

    Returns
    -------
    list of str

    Examples
    --------
    >>> lme4_names(["Intercept", "service[T.1]", "f[T.b]:x"])
    ['(Intercept)', 'service1', 'fb:x']
    """
    out = []
    for c in columns:
        if c == "Intercept":
            out.append("(Intercept)")
            continue
        out.append(_CONTRAST.sub(lambda m: m.group(1), c))
    return out


def fixed_effects_matrix(fixed, data, return_spec=False):
    """Build the fixed-effects model matrix with formulaic.

    Parameters
    ----------
    fixed : str
        Right-hand side of the fixed part (``"1 + service"``).
    data : pandas.DataFrame
    return_spec : bool
        Also return formulaic's model spec, which rebuilds the same columns (same factor
        levels and contrasts) for new data.

    Returns
    -------
    X : ndarray of float64, shape (n_obs, p)
    names : list of str
        lme4-style coefficient names.
    spec : formulaic.ModelSpec
        Only with ``return_spec=True``.

    Raises
    ------
    FormulaError
        For an unknown column, a missing value, or a term formulaic cannot evaluate.
    """
    import formulaic

    spec = fixed.replace("factor(", "C(")
    try:
        mm = formulaic.model_matrix(spec, data, na_action="raise")
    except Exception as exc:  # formulaic raises several types; name the problem
        msg = str(exc)
        m = re.search(r"`([^`]+)` is not present", msg)
        if m:
            raise FormulaError(
                f"unknown column '{m.group(1)}' in the fixed effects '{fixed}'; available "
                f"columns: {', '.join(map(str, data.columns))}"
            ) from None
        m = re.search(r"`([^`]+)` contains null values", msg)
        if m:
            col = m.group(1)
            nbad = int(data[col].isna().sum()) if col in data.columns else -1
            raise FormulaError(
                f"column '{col}' in the fixed effects has {nbad} missing value(s); remove or "
                "impute them before fitting (lmmops never drops rows silently)"
            ) from None
        raise FormulaError(f"cannot build the fixed effects '{fixed}': {msg}") from None
    X = np.asarray(mm, dtype=np.float64)
    names = lme4_names([str(c) for c in mm.columns])
    names = [n.replace("C(", "factor(") if "factor(" in fixed else n for n in names]
    if X.shape[0] != len(data):
        raise FormulaError("the fixed-effects matrix lost rows; check for missing values")
    if not np.all(np.isfinite(X)):
        bad = [names[j] for j in range(X.shape[1]) if not np.all(np.isfinite(X[:, j]))]
        raise FormulaError(f"fixed-effect column(s) {bad} contain non-finite values")
    if return_spec:
        return X, names, mm.model_spec
    return X, names


def check_full_rank(X, names, tol=1e-7):
    """Raise :class:`RankDeficientError` naming aliased columns if X is rank deficient.

    The strict counterpart of :func:`rank_columns` (which the model uses to drop aliased
    columns as lme4 does): the same rule decides which columns are aliased, the later of
    two collinear columns.

    Parameters
    ----------
    X : ndarray, shape (n_obs, p)
    names : sequence of str
    tol : float
        Relative tolerance (R's default 1e-7).

    Raises
    ------
    RankDeficientError

    Examples
    --------
    >>> X = np.column_stack([np.ones(4), [1., 2, 3, 4], [2., 4, 6, 8]])
    >>> check_full_rank(X, ["(Intercept)", "x", "x2"])  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    lmmops.errors.RankDeficientError: fixed-effect model matrix is rank deficient ...
    """
    _, aliased = rank_columns(X, names, tol=tol)
    if aliased:
        raise RankDeficientError(
            f"fixed-effect model matrix is rank deficient: {len(aliased)} column(s) are "
            f"linear combinations of the columns before them: {', '.join(aliased)}. Remove "
            "them, or fit through lmmops.fit / LMM, which drops them as lme4 does"
        )


class RankDeficientWarning(UserWarning):
    """The fixed-effects model matrix is rank deficient; aliased columns were dropped."""


def rank_columns(X, names, tol=1e-7):
    """Find a full-rank subset of the columns of X, as lme4 does (``chkRank.drop.cols``).

    The columns are taken in order, as R's ``qr`` (LINPACK ``dqrdc2``, limited pivoting)
    does: a column is aliased when what is left of it after projecting out the columns
    kept before it is at most ``tol`` times its own norm, so of two collinear columns the
    later is dropped. The norms are those of the conditioned columns
    (:func:`lmmops.conditioning.orthogonalise`): once the constant lies in the span of
    the kept columns a column is compared with its centred self, so the test does not
    depend on the units or the origin of a covariate (a covariate N(1e4, 1), a column
    times 3e7 or Unix times are kept); a column whose centred values are rounding noise
    is aliased with the intercept. In the cheat sheet's notation ``X T = [X_1 X_2]``
    with ``X_2`` (the kept columns) of full rank and ``X_1 = X_2 F``; the selected
    generalised inverse sets ``tau_1 = 0``.

    Parameters
    ----------
    X : ndarray, shape (n_obs, p)
    names : sequence of str
    tol : float
        Relative tolerance (R's default 1e-7).

    Returns
    -------
    keep : ndarray of int
        Indices of the kept columns, in their original order.
    dropped : list of str
        Names of the aliased (dropped) columns.

    Examples
    --------
    >>> X = np.column_stack([np.ones(4), [1., 2, 3, 4], [2., 4, 6, 8]])
    >>> keep, dropped = rank_columns(X, ["(Intercept)", "x", "x2"])
    >>> keep.tolist(), dropped
    ([0, 1], ['x2'])
    >>> t = 1.7e9 + np.array([0.0, 3600.0, 86400.0, 2e6])     # Unix times
    >>> rank_columns(np.column_stack([np.ones(4), t]), ["(Intercept)", "t"])[1]
    []
    """
    X = np.asarray(X, dtype=np.float64)
    keep = orthogonalise(X, tol=tol)[0]
    kept = set(keep.tolist())
    return keep, [names[j] for j in range(X.shape[1]) if j not in kept]


def rank_message(dropped):
    """lme4's message for dropped columns.

    Parameters
    ----------
    dropped : list of str

    Returns
    -------
    str

    Examples
    --------
    >>> rank_message(["x2"])
    'fixed-effect model matrix is rank deficient so dropping 1 column / coefficient (x2)'
    """
    k = len(dropped)
    plural = "s" if k > 1 else ""
    return (f"fixed-effect model matrix is rank deficient so dropping {k} column{plural} / "
            f"coefficient{plural} ({', '.join(dropped)})")


def response_vector(data, name):
    """Extract the response column as float64, with clear errors.

    Parameters
    ----------
    data : pandas.DataFrame
    name : str

    Returns
    -------
    ndarray of float64, shape (n_obs,)

    Raises
    ------
    FormulaError
        If the column is unknown, not numeric, or has missing or infinite values.
    """
    if name not in data.columns:
        raise FormulaError(
            f"unknown response column '{name}'; available columns: "
            f"{', '.join(map(str, data.columns))}"
        )
    col = data[name]
    if isinstance(col.dtype, pd.CategoricalDtype) or not (
        pd.api.types.is_numeric_dtype(col) or pd.api.types.is_bool_dtype(col)
    ):
        raise FormulaError(
            f"response '{name}' is not numeric (dtype {col.dtype}); a linear mixed model needs "
            "a numeric response"
        )
    y = col.to_numpy(dtype=np.float64, na_value=np.nan)
    bad = ~np.isfinite(y)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise FormulaError(
            f"response '{name}' has {rows.size} missing or non-finite value(s) (first at row "
            f"{rows[0]}); remove or impute them before fitting"
        )
    return y
