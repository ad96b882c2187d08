"""What a partition contributes, and how its rows become model arrays.

A :class:`Plan` is built once on the client from the formula, the Dask DataFrame's
metadata and the level dictionaries; it is small (level-space: level labels, formulaic
model specifications) and travels to the workers, where :func:`prepare` turns one
pandas partition into the arrays the in-memory path would have built for those rows:
the level codes of each grouping factor, the fixed-effects rows, the response, the
weights and the values of each random-effects term. Errors name the partition (its
file, when the data was read from files) and the column.

The functions here see only pandas objects; Dask is used by
:mod:`lmmops.distributed.model`.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from lmmops.data.design import sorted_levels
from lmmops.data.formula import fixed_effects_matrix, response_vector
from lmmops.errors import DataSourceError, DesignError, FormulaError, LmmopsError

__all__ = ["Plan", "cast_categories", "check_formula_for_partitions", "combination_values",
           "discover_levels", "fixed_specs", "interaction_levels", "level_values",
           "merge_level_values", "prepare", "prototype"]

#: formulaic transforms whose result depends on the whole column (they learn a state,
#: the mean, the scale, the knots, from the data they first see)
STATEFUL = ("scale", "center", "poly", "bs")

_CALL = re.compile(r"\b(" + "|".join(STATEFUL) + r")\s*\(")
_FACTOR_CALL = re.compile(r"\b(?:C|factor)\s*\(\s*`?([A-Za-z_][A-Za-z0-9_.]*)`?")


def check_formula_for_partitions(texts, dtypes):
    """Refuse what a fit from partitions cannot reproduce exactly.

    Stateful transforms (``scale``, ``center``, ``poly``, ``bs``) learn their state from
    the data they see, which on a cluster is one partition; ``C(x)``/``factor(x)`` of a
    numeric column takes its levels from the data in the same way.

    Raises
    ------
    FormulaError
        Naming the transform or the column.
    """
    for text in texts:
        m = _CALL.search(text)
        if m:
            raise FormulaError(
                f"'{m.group(1)}(...)' in '{text}' learns its state from the whole column, "
                "which a fit from partitions does not hold; compute the transformed column "
                "before fitting (e.g. ddf['xs'] = (ddf.x - ddf.x.mean()) / ddf.x.std())")
        for col in _FACTOR_CALL.findall(text):
            if col in dtypes and pd.api.types.is_numeric_dtype(dtypes[col]) \
                    and not isinstance(dtypes[col], pd.CategoricalDtype):
                raise FormulaError(
                    f"'C({col})' of the numeric column '{col}' takes its levels from the "
                    "data; on a cluster make the column categorical with known categories "
                    f"first (ddf['{col}'] = ddf['{col}'].astype('category')"
                    ".cat.as_known())")


def _labels(part, column, label, what="grouping factor", error=DesignError, why=""):
    """One column of one partition as an array of labels (a categorical's categories'
    dtype); missing values refused with ``error``, naming the partition and the column
    (``what`` it is, and ``why`` appended to the message)."""
    s = part[column]
    if s.isna().any():
        rows = np.flatnonzero(s.isna().to_numpy())
        raise error(f"{label}: {what} '{column}' has {rows.size} missing value(s) (first "
                    f"at row {rows[0]} of the partition); remove or impute them before "
                    f"fitting{why}")
    if isinstance(s.dtype, pd.CategoricalDtype):
        s = s.astype(s.cat.categories.dtype)
    return s.to_numpy()


def level_values(part, column, label):
    """The distinct labels of one column in one partition (missing values refused)."""
    return pd.unique(_labels(part, column, label))


def combination_values(part, columns, label):
    """The distinct rows of an interaction's component columns in one partition (as
    object labels; missing values refused)."""
    out = {c: _labels(part, c, label) for c in columns}
    return pd.DataFrame(out).drop_duplicates(ignore_index=True)


def interaction_levels(rows, columns, meta):
    """The level dictionary of an interaction factor, as the in-memory path orders it.

    Parameters
    ----------
    rows : pandas.DataFrame
        The observed combinations of the component labels (distinct rows).
    columns : tuple of str
    meta : pandas.DataFrame
        The frame's metadata (a categorical component keeps its category order).

    Returns
    -------
    components : list of pandas.Index
        Each component's levels (observed only).
    codes : ndarray of int64, shape (m, len(columns))
        The combinations' component codes, in lexicographic order (the first component
        slowest), one per level.
    labels : pandas.Index
        ``"a_label:b_label"`` per level.
    """
    comps, codes = [], []
    for c in columns:
        vals = rows[c].to_numpy()
        dtype = meta[c].dtype
        if isinstance(dtype, pd.CategoricalDtype):
            cats = pd.Index(dtype.categories)
            lv = cats[cats.isin(pd.unique(vals))] if len(cats) else discover_levels(
                pd.unique(vals), c, dtype)
        else:
            lv = discover_levels(pd.unique(vals), c, dtype)
        comps.append(lv)
        codes.append(lv.get_indexer(vals))
    codes = np.column_stack(codes).astype(np.int64)
    order = np.lexsort(codes.T[::-1])
    codes = codes[order]
    labels = pd.Index([":".join(str(lv[j]) for lv, j in zip(comps, row)) for row in codes],
                      dtype=object)
    return comps, codes, labels


def _interaction_codes(part, columns, comps, combos, label):
    dims = [len(lv) for lv in comps]
    if float(np.prod([float(d) for d in dims])) >= 2.0**62:
        raise DesignError(f"the interaction of {', '.join(columns)} has too many possible "
                          "combinations for the partitioned fit; add the combined column")
    keys = []
    for c, lv in zip(columns, comps):
        keys.append(_codes(part, c, lv, label).astype(np.int64))
    key = np.ravel_multi_index(keys, dims) if len(part) else np.zeros(0, np.int64)
    table = np.ravel_multi_index(tuple(combos.T), dims)
    pos = np.searchsorted(table, key)
    pos = np.minimum(pos, len(table) - 1)
    bad = table[pos] != key
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        combo = ":".join(str(part[c].iloc[i]) for c in columns)
        raise DataSourceError(f"{label}: the combination {combo!r} of "
                              f"{', '.join(columns)} (row {i} of the partition) was not "
                              "seen by the level pass")
    return pos.astype(np.int32)


def merge_level_values(parts):
    """The union of partitions' distinct labels (any order)."""
    parts = [np.asarray(p) for p in parts]
    if not parts:
        return np.zeros(0)
    if all(p.dtype.kind in "biuf" for p in parts):
        return np.unique(np.concatenate(parts))
    return pd.unique(np.concatenate([p.astype(object) for p in parts]))


def discover_levels(values, column, dtype):
    """The level dictionary of a column, in the in-memory path's order
    (:func:`lmmops.data.design.sorted_levels` of all its values)."""
    values = np.asarray(values)
    if values.dtype.kind not in "biuf":
        values = values.astype(object)
    return sorted_levels(pd.Series(values, dtype=values.dtype), column)[1]


def prototype(meta, categories):
    """Two rows with the frame's columns and the global categories: the frame formulaic
    builds the model specifications on (their columns depend only on the categories)."""
    proto = meta.copy()
    for col, cats in categories.items():
        vals = [cats[0]] * len(proto) if len(cats) else [None] * len(proto)
        proto[col] = pd.Categorical(vals, categories=cats)
    return proto


class Plan:
    """Everything a partition needs to contribute: small, level-space, picklable.

    Attributes
    ----------
    response : str
    weights : str or None
        The weights column.
    factors : list of (name, columns)
        Grouping factors: a tuple of one column, or of an interaction's components.
    levels : list of pandas.Index
        Their level dictionaries.
    categories : dict
        Column -> categories of the non-numeric columns the formula's effects use, cast to
        ``pandas.Categorical`` before formulaic sees a partition.
    fixed_spec : formulaic.ModelSpec
    term_specs : list of (factor position, ModelSpec or None)
        Per random-effects term, in lme4's order; None for a pure intercept term.
    keep : ndarray of int or None
        Kept fixed-effects columns (after the rank test).
    columns : list of str
        The frame's columns (the schema every partition must have).
    labels : list of str
        Per partition, how errors name it ("file 'a.parquet'" or "partition 3").
    """

    def __init__(self, response, weights, factors, levels, categories, fixed_spec,
                 term_specs, columns, dtypes, labels):
        self.response = response
        self.weights = weights
        self.factors = list(factors)
        self.levels = list(levels)
        self.categories = dict(categories)
        self.fixed_spec = fixed_spec
        self.term_specs = list(term_specs)
        self.columns = list(columns)
        self.dtypes = dict(dtypes)
        self.labels = list(labels)
        self.keep = None
        self.conditioning = None

    def label(self, i):
        """How errors name partition ``i``."""
        return self.labels[i] if i < len(self.labels) else f"partition {i}"


def _check_schema(part, plan, label):
    cols = list(part.columns)
    if cols != plan.columns:
        missing = [c for c in plan.columns if c not in cols]
        extra = [c for c in cols if c not in plan.columns]
        what = (f"column '{missing[0]}' is missing" if missing
                else f"it has column '{extra[0]}' the others do not" if extra
                else "its columns are in another order")
        raise DataSourceError(f"{label}: the schema differs from the other partitions: "
                              f"{what} (columns {cols}, expected {plan.columns})")
    for c in plan.columns:
        a, b = part[c].dtype, plan.dtypes[c]
        num_a = pd.api.types.is_numeric_dtype(a) and not isinstance(a, pd.CategoricalDtype)
        num_b = pd.api.types.is_numeric_dtype(b) and not isinstance(b, pd.CategoricalDtype)
        if num_a != num_b:
            raise DataSourceError(f"{label}: the schema differs from the other partitions: "
                                  f"column '{c}' has dtype {a}, the others {b}")


def _codes(part, column, levels, label):
    values = _labels(part, column, label)
    codes = levels.get_indexer(values)
    bad = codes < 0
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataSourceError(f"{label}: grouping factor '{column}' has the level "
                              f"{values[i]!r} (row {i} of the partition), which is not "
                              f"among the column's known categories")
    return codes.astype(np.int32)


def _cast(part, plan, label):
    return cast_categories(part, plan.categories, label)


def cast_categories(part, categories, label):
    """``part`` with the columns of ``categories`` as ``pandas.Categorical`` of those
    categories (what formulaic saw when the specifications were built).

    Raises
    ------
    FormulaError
        For a missing value.
    DataSourceError
        For a value outside the categories (naming ``label`` and the column).
    """
    out = part.copy(deep=False)
    for col, cats in categories.items():
        vals = _labels(out, col, label, what="column", error=FormulaError,
                       why=" (lmmops never drops rows silently)")
        cat = pd.Categorical(vals, categories=cats)
        unknown = cat.codes < 0
        if unknown.any():
            i = int(np.flatnonzero(unknown)[0])
            raise DataSourceError(f"{label}: column '{col}' has the level {vals[i]!r} "
                                  f"(row {i} of the partition), which is not among its "
                                  "known categories")
        out[col] = cat
    return out


def _matrix(spec, part, label, what):
    try:
        mm = spec.get_model_matrix(part, na_action="raise")
    except LmmopsError as exc:
        raise type(exc)(f"{label}: {exc}") from None
    except Exception as exc:  # formulaic raises several types; name the problem
        msg = str(exc)
        m = re.search(r"`([^`]+)` contains null values", msg)
        if m:
            raise FormulaError(f"{label}: '{m.group(1)}' in the {what} has missing (NaN) "
                               "value(s); remove or impute them before fitting (lmmops "
                               "never drops rows silently)") from None
        raise FormulaError(f"{label}: cannot build the {what}: {msg}") from None
    X = np.asarray(mm, dtype=np.float64)
    if X.shape[0] != len(part):
        raise FormulaError(f"{label}: the {what} matrix lost rows; check for missing values")
    if not np.all(np.isfinite(X)):
        cols = [str(c) for c in mm.columns]
        bad = [cols[j] for j in range(X.shape[1]) if not np.all(np.isfinite(X[:, j]))]
        raise FormulaError(f"{label}: {what} column(s) {bad} contain non-finite values "
                           "(inf or NaN); remove or impute them before fitting")
    return X


def prepare(part, plan, i):
    """The arrays of partition ``i`` (a pandas DataFrame).

    Returns
    -------
    dict
        ``codes`` (``(K, n)`` int32), ``X`` (``(n, p)``, all columns, user scale), ``y``,
        ``w`` (or None) and ``values`` (per term, ``(n, d)`` or None).
    """
    label = plan.label(i)
    _check_schema(part, plan, label)
    codes = np.empty((len(plan.factors), len(part)), dtype=np.int32)
    for k, ((_, cols), lv) in enumerate(zip(plan.factors, plan.levels)):
        if len(cols) == 1:
            codes[k] = _codes(part, cols[0], lv, label)
        else:
            comps, combos = plan.combos[k]
            codes[k] = _interaction_codes(part, cols, comps, combos, label)
    try:
        y = response_vector(part, plan.response)
    except LmmopsError as exc:
        raise type(exc)(f"{label}: {exc}") from None
    w = None
    if plan.weights is not None:
        col = part[plan.weights]
        w = col.to_numpy(dtype=np.float64, na_value=np.nan)
        bad = ~np.isfinite(w) | (w <= 0)
        if bad.any():
            j = int(np.flatnonzero(bad)[0])
            raise DataSourceError(f"{label}: weights column '{plan.weights}' has "
                                  f"{int(bad.sum())} missing, non-finite or non-positive "
                                  f"value(s) (first at row {j} of the partition: {w[j]!r}); "
                                  "weights must be finite and > 0")
    cast = _cast(part, plan, label)
    X = _matrix(plan.fixed_spec, cast, label, "fixed effects")
    values = [None if spec is None else _matrix(spec, cast, label, "random effects")
              for _, spec in plan.term_specs]
    return {"codes": codes, "X": X, "y": y, "w": w, "values": values}


def fixed_specs(fixed, effects, proto):
    """Names and formulaic specifications of the fixed part and of each term's effects,
    built in the formula sandbox on the prototype frame."""
    _, names, spec = fixed_effects_matrix(fixed, proto, return_spec=True)
    terms = []
    for text in effects:
        try:
            _, tnames, tspec = fixed_effects_matrix(text, proto, return_spec=True,
                                                    what="random effects")
        except FormulaError as exc:
            raise FormulaError(f"random-effects term ({text} | ...): {exc}") from None
        terms.append((tuple(tnames), tspec))
    return names, spec, terms
