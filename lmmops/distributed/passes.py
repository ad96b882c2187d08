"""The three passes over the partitions, as map and combine functions on pandas/NumPy.

1. ``levels``: the distinct labels of the columns whose level dictionary is not known
   from the metadata (skipped when every grouping factor and every non-numeric
   fixed-effect column is a categorical with known categories);
2. ``moments``: the count, means, centred cross-products and magnitudes of ``[X y]``
   (:class:`~lmmops.distributed.moments.Moments`) and the rows per level, which fix the
   conditioning, the rank test and the used levels;
3. ``statistics``: the level-space sufficient statistics of the conditioned rows
   (:class:`~lmmops.data.statistics.SufficientStatistics` for random intercepts,
   :class:`~lmmops.estimation.vector.VectorStatistics` for slope terms) and the
   unweighted counts and cell tables of the grouping factors.

Each map function takes one pandas partition, its position and the
:class:`~lmmops.distributed.frame.Plan`; each combine function takes a list of map or
combine outputs (a tree reduction applies it level by level). Everything returned is in
level space.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from lmmops.data.statistics import SufficientStatistics
from lmmops.data.terms import RandomEffectsTerm
from lmmops.distributed.frame import (
    combination_values,
    level_values,
    merge_level_values,
    prepare,
)
from lmmops.distributed.moments import Moments
from lmmops.estimation.vector import VectorStatistics

__all__ = ["combine_levels", "combine_moments", "combine_statistics", "map_levels",
           "map_moments", "map_statistics", "conditioned_rows"]


def map_levels(part, i, columns, interactions, labels):
    """Pass 1: ``{column: distinct labels}`` of the partition, and for each interaction
    factor ``{name: its distinct rows of component labels}``."""
    label = labels[i] if i < len(labels) else f"partition {i}"
    return ({c: level_values(part, c, label) for c in columns},
            {g: combination_values(part, cols, label) for g, cols in interactions.items()})


def combine_levels(parts):
    """Pass 1's combine: the union per column and per interaction."""
    return ({c: merge_level_values([p[0][c] for p in parts]) for c in parts[0][0]},
            {g: pd.concat([p[1][g] for p in parts], ignore_index=True).drop_duplicates(
                ignore_index=True) for g in parts[0][1]})


def map_moments(part, i, plan):
    """Pass 2: moments of ``[X y]`` (all fixed-effects columns) and rows per level."""
    a = prepare(part, plan, i)
    counts = [np.bincount(a["codes"][k], minlength=len(lv)).astype(np.int64)
              for k, lv in enumerate(plan.levels)]
    return Moments.from_arrays(a["X"], a["y"]), counts


def combine_moments(parts):
    """Pass 2's combine."""
    return (Moments.combine([p[0] for p in parts]),
            [sum(p[1][k] for p in parts) for k in range(len(parts[0][1]))])


def conditioned_rows(a, plan):
    """``(X_c, y_c)`` of a prepared partition: the kept columns in the conditioned
    basis and the conditioned response (:mod:`lmmops.data.conditioning`)."""
    cond = plan.conditioning
    Xc = cond.X(a["X"][:, plan.keep])
    yc = (a["y"] - Xc @ cond.b) / cond.scale
    return Xc, yc


def map_statistics(part, i, plan):
    """Pass 3: the level-space statistics of the conditioned rows.

    Returns
    -------
    (stats, design_stats)
        ``stats``: weighted :class:`SufficientStatistics` (random intercepts) or
        :class:`VectorStatistics` (slopes); ``design_stats``: unweighted
        :class:`SufficientStatistics` of the grouping factors (counts, cell tables, the
        moment start's sums), or None when it is ``stats`` itself (unweighted
        intercepts).
    """
    a = prepare(part, plan, i)
    Xc, yc = conditioned_rows(a, plan)
    q = [len(lv) for lv in plan.levels]
    codes = a["codes"]
    unweighted = None
    if plan.slopes:
        terms = [RandomEffectsTerm(plan.term_groups[t], codes[k], plan.levels[k],
                                   plan.term_columns[t], a["values"][t])
                 for t, (k, _) in enumerate(plan.term_specs)]
        stats = VectorStatistics.from_rows(terms, Xc, yc, a["w"])
        unweighted = SufficientStatistics.from_codes(codes, q, Xc, yc)
    else:
        stats = SufficientStatistics.from_codes(codes, q, Xc, yc, a["w"])
        if a["w"] is not None:
            unweighted = SufficientStatistics.from_codes(codes, q, Xc, yc)
    return stats, unweighted


def combine_statistics(parts):
    """Pass 3's combine."""
    first = parts[0][0]
    kind = VectorStatistics if isinstance(first, VectorStatistics) else SufficientStatistics
    stats = kind.combine([p[0] for p in parts])
    unw = None
    if parts[0][1] is not None:
        unw = SufficientStatistics.combine([p[1] for p in parts])
    return stats, unw
